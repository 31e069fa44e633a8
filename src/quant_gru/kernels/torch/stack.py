"""Layers and directions of a GRU stacked over one per-direction runner, and the shapes that
describe them; shared by the float, calibration and quantized paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


# Runs one (layer, direction): (pair index, x (T, B, I), h0 (B, H) or None for zeros, lengths,
# reverse) -> (output (T, B, H), h_n (B, H)).
DirectionRunner = Callable[[int, Tensor, Tensor | None, Tensor | None, bool], tuple[Tensor, Tensor]]


# Applied to a layer's output before the next layer reads it: (layer index, output) -> input.
BetweenLayers = Callable[[int, Tensor], Tensor]


def run_layers(
    x: Tensor,
    h0: Tensor | None,
    lengths: Tensor | None,
    shape: GRUShape,
    run_direction: DirectionRunner,
    between_layers: BetweenLayers | None = None,
) -> tuple[Tensor, Tensor]:
    """Stack layers on time-major input from h0 (layers x directions, B, H; None: each
    runner starts from zeros); `between_layers` is where inter-layer dropout goes."""
    finals: list[Tensor] = []
    layer_input = x
    for layer in range(shape.num_layers):
        direction_outputs = []
        for direction in range(shape.num_directions):
            index = layer * shape.num_directions + direction
            start = None if h0 is None else h0[index]
            out, h_last = run_direction(index, layer_input, start, lengths, direction == 1)
            direction_outputs.append(out)
            finals.append(h_last)
        # One direction: its output as it is (a concatenation of one tensor would copy it).
        layer_input = (
            direction_outputs[0]
            if len(direction_outputs) == 1
            else torch.cat(direction_outputs, dim=-1)
        )
        if between_layers is not None and layer < shape.num_layers - 1:
            layer_input = between_layers(layer, layer_input)
    # One (layer, direction): a view (torch.stack would copy, and cost a launch).
    h_n = finals[0].unsqueeze(0) if len(finals) == 1 else torch.stack(finals)
    return layer_input, h_n


def dropout_between_layers(dropout: float, training: bool) -> BetweenLayers | None:
    """nn.GRU's inter-layer dropout, or None where it does nothing."""
    if dropout == 0 or not training:
        return None
    return lambda _layer, output: F.dropout(output, p=dropout, training=True)


def records_gradient(x: Tensor, h0: Tensor | None, weights: Sequence[DirectionWeights]) -> bool:
    """Whether autograd records a forward of ``x`` from ``h0`` with ``weights``."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (h0 is not None and h0.requires_grad)
        or any(w is not None and w.requires_grad for pair in weights for w in pair)
    )
