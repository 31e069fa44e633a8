"""The GRU as a function of its input and weights: input validation (done here, once) and
dispatch to a backend.

Errors follow nn.GRU's exception types, with messages that say what was expected and what
came, so code written against nn.GRU catches the same exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from quant_gru import sequence
from quant_gru.kernels.torch.float_gru import gru_direction

# One (layer, direction)'s parameters: w_ih (3H, I_l), w_hh (3H, H), b_ih (3H,), b_hh (3H,).
DirectionWeights = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


@dataclass(frozen=True)
class GRUShape:
    """The structural hyper-parameters that a forward call is validated against."""

    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    batch_first: bool

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1


def gru(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor | PackedSequence, Tensor]:
    """nn.GRU's forward: `weights` lists (layer, direction) pairs in nn.GRU's order."""
    expected_pairs = shape.num_layers * shape.num_directions
    if len(weights) != expected_pairs:
        raise ValueError(
            f"expected weights for {expected_pairs} (layer, direction) pairs, got {len(weights)}"
        )
    x, h0, lengths, layout = _validated_time_major(input, hx, weights[0][0], shape)
    out, h_n = _run_layers(x, h0, lengths, weights, shape, dropout, training)
    return (
        sequence.output_from_time_major(out, layout),
        sequence.hidden_from_working_order(h_n, layout),
    )


def _run_layers(
    x: Tensor,
    h0: Tensor,
    lengths: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
    dropout: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """Stack layers on time-major input; inter-layer dropout as nn.GRU applies it."""
    finals: list[Tensor] = []
    layer_input = x
    for layer in range(shape.num_layers):
        direction_outputs = []
        for direction in range(shape.num_directions):
            index = layer * shape.num_directions + direction
            out, h_last = gru_direction(
                layer_input, h0[index], *weights[index], lengths, reverse=direction == 1
            )
            direction_outputs.append(out)
            finals.append(h_last)
        layer_input = torch.cat(direction_outputs, dim=-1)
        if dropout > 0 and training and layer < shape.num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, torch.stack(finals)


def _validated_time_major(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    reference_weight: Tensor,
    shape: GRUShape,
) -> tuple[Tensor, Tensor, Tensor | None, sequence.SequenceLayout]:
    """Check every argument of a forward call, then bring it into the kernels' layout."""
    lengths: Tensor | None
    if isinstance(input, PackedSequence):
        x, lengths, layout = sequence.packed_to_time_major(input)
        expected_hx_dim = 3
    elif isinstance(input, Tensor):
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        x, layout = sequence.tensor_to_time_major(input, shape.batch_first)
        lengths = None
        expected_hx_dim = input.dim()
    else:
        raise TypeError(
            f"GRU: expected input to be a Tensor or a PackedSequence, got {type(input).__name__}"
        )

    if x.dtype != reference_weight.dtype:
        raise ValueError(
            f"GRU input dtype ({x.dtype}) does not match weight dtype "
            f"({reference_weight.dtype}). Convert input: input.to({reference_weight.dtype}), "
            f"or convert model: model.to({x.dtype})"
        )
    if x.device != reference_weight.device:
        raise RuntimeError(
            f"GRU input is on {x.device} but the weights are on {reference_weight.device}. "
            "Move one of them: input.to(device) or model.to(device)"
        )
    if x.shape[-1] != shape.input_size:
        raise RuntimeError(
            "input.size(-1) must be equal to input_size. "
            f"Expected {shape.input_size}, got {x.shape[-1]}"
        )
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in GRU, got 0")

    expected_hidden = (
        shape.num_layers * shape.num_directions,
        x.shape[1],
        shape.hidden_size,
    )
    if hx is None:
        h0 = x.new_zeros(expected_hidden)
    else:
        h0 = _validated_hidden(hx, expected_hx_dim, expected_hidden, x, layout)
    return x, h0, lengths, layout


def _validated_hidden(
    hx: object,
    expected_dim: int,
    expected_hidden: tuple[int, int, int],
    x: Tensor,
    layout: sequence.SequenceLayout,
) -> Tensor:
    if not isinstance(hx, Tensor):
        raise TypeError(f"GRU: expected hx to be a Tensor or None, got {type(hx).__name__}")
    if hx.dim() != expected_dim:
        kind = "unbatched 2-D" if layout.unbatched else "batched 3-D"
        raise RuntimeError(
            f"For {kind} input, hx should also be {expected_dim}-D but got {hx.dim()}-D tensor"
        )
    # The caller's hx has the working shape, less the batch dimension when unbatched.
    expected = (expected_hidden[0], expected_hidden[2]) if layout.unbatched else expected_hidden
    if tuple(hx.shape) != expected:
        raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")
    h0 = sequence.hidden_to_working_order(hx, layout)
    if h0.dtype != x.dtype:
        raise RuntimeError(
            f"GRU hx dtype ({h0.dtype}) does not match input dtype ({x.dtype}); "
            f"convert it: hx.to({x.dtype})"
        )
    if h0.device != x.device:
        raise RuntimeError(f"GRU hx is on {h0.device} but the input is on {x.device}")
    return h0
