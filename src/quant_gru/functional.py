"""The GRU as a function of its input and weights: input validation (done here, once) and
dispatch to a backend.

Errors follow nn.GRU's exception types, with messages that say what was expected and what
came, so code written against nn.GRU catches the same exceptions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from quant_gru import sequence
from quant_gru.kernels.backend import resolve as backend_choice
from quant_gru.kernels.torch.decomposed_gru import PointHook, decomposed_direction
from quant_gru.kernels.torch.float_gru import gru_direction
from quant_gru.kernels.torch.quantized_forward import QuantizedModel, quantized_forward
from quant_gru.kernels.torch.stack import (
    DirectionWeights,
    GRUShape,
    dropout_between_layers,
    records_gradient,
    run_layers,
)
from quant_gru.kernels.torch.traceable_gru import traceable_gru
from quant_gru.kernels.triton import ops as triton_ops


def gru(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
    dropout: float = 0.0,
    training: bool = False,
    observe: Callable[[int], PointHook] | None = None,
    backend: str = "auto",
) -> tuple[Tensor | PackedSequence, Tensor]:
    """nn.GRU's forward: `weights` lists (layer, direction) pairs in nn.GRU's order.

    With `observe`, the float GRU runs decomposed at the integer model's quantization points
    and `observe(pair_index)` gives the hook that sees them (calibration). `backend` picks the
    realization of the plain forward (kernels/backend.py).
    """

    def run_direction(
        index: int, x: Tensor, h0: Tensor | None, lengths: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        if triton:
            w_ih, w_hh, b_ih, b_hh = weights[index]
            return triton_ops.layer_direction(x, w_ih, b_ih, h0, w_hh, b_hh, valid, reverse, save)
        assert h0 is not None  # made for every other path
        if observe is not None:
            return decomposed_direction(x, h0, weights[index], lengths, reverse, observe(index))
        return gru_direction(x, h0, *weights[index], lengths, reverse)

    _check_weight_count(weights, shape)
    x, h0, lengths, layout = _validated_time_major(input, hx, weights[0][0], shape)
    # Whether autograd records this call: then the kernels save what the backward needs.
    save = records_gradient(x, h0, weights)
    triton = observe is None and backend_choice(backend, x) == "triton"
    # The kernels take lengths as int32 (made once here) and start from zeros without hx.
    valid = None if lengths is None or not triton else lengths.to(x.device, torch.int32)
    if h0 is None and not triton:
        h0 = _zero_state(x, shape)
    out, h_n = run_layers(
        x, h0, lengths, shape, run_direction, dropout_between_layers(dropout, training)
    )
    return (
        sequence.output_from_time_major(out, layout),
        sequence.hidden_from_working_order(h_n, layout),
    )


def quantized_gru(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
    model: QuantizedModel,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> tuple[Tensor | PackedSequence, Tensor]:
    """The integer GRU of reference/README.md, dequantized; differentiable (straight-through)
    when autograd records. `backend` picks the realization of the integer recurrence: the
    Triton kernel or plain PyTorch (kernels/backend.py); both give the same codes."""
    _check_weight_count(weights, shape)
    x, h0, lengths, layout = _validated_time_major(input, hx, weights[0][0], shape)
    if backend_choice(backend, x) != "triton":
        out, h_n = quantized_forward(x, h0, lengths, weights, shape, model, dropout, training)
    elif records_gradient(x, h0, weights) or dropout_between_layers(dropout, training):
        # Imported here: importing the package must not import triton (kernels/triton/ops.py).
        from quant_gru.kernels.triton.integer_gru import triton_integer_gru
        from quant_gru.kernels.triton.integer_qat import KernelQat
        from quant_gru.kernels.triton.weight_points import kernel_weights_codes

        model = dataclasses.replace(
            model,
            realization=triton_integer_gru,
            straight_through=KernelQat,
            weight_quantizer=kernel_weights_codes,
        )
        out, h_n = quantized_forward(x, h0, lengths, weights, shape, model, dropout, training)
    else:
        # Inference: float to float on the kernels, the same values to the bit.
        from quant_gru.kernels.triton.integer_inference import quantized_inference

        out, h_n = quantized_inference(x, h0, lengths, weights, shape, model)
    return (
        sequence.output_from_time_major(out, layout),
        sequence.hidden_from_working_order(h_n, layout),
    )


def export_gru(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
) -> tuple[Tensor, Tensor]:
    """The float GRU through ATen's GRU operator, so ONNX export keeps the sequence length
    dynamic (kernels/torch/traceable_gru.py). Tensors only: a PackedSequence is refused."""
    return traceable_gru(_validated_export_input(input, hx, weights, shape), hx, weights, shape)


def export_qdq_input(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
) -> tuple[Tensor, Tensor | None, bool]:
    """Validate an export_format='qdq' call; returns the input and hx batched (3-D) and
    whether they were unbatched. Tensors only: a PackedSequence is refused."""
    input = _validated_export_input(input, hx, weights, shape)
    unbatched = input.dim() == 2
    if unbatched:
        input = input.unsqueeze(0 if shape.batch_first else 1)
        hx = None if hx is None else hx.unsqueeze(1)
    return input, hx, unbatched


def _validated_export_input(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
) -> Tensor:
    """Check an export-mode call like any forward call; export takes tensors only."""
    if isinstance(input, PackedSequence):
        raise TypeError(
            "export_mode takes a Tensor input; a PackedSequence cannot be exported (export "
            "with a padded tensor, or set export_mode = False)"
        )
    _check_weight_count(weights, shape)
    _validated_time_major(input, hx, weights[0][0], shape)
    return input


def _check_weight_count(weights: Sequence[DirectionWeights], shape: GRUShape) -> None:
    expected_pairs = shape.num_layers * shape.num_directions
    if len(weights) != expected_pairs:
        raise ValueError(
            f"expected weights for {expected_pairs} (layer, direction) pairs, got {len(weights)}"
        )


def _zero_state(x: Tensor, shape: GRUShape) -> Tensor:
    """The initial state without hx: zeros (layers x directions, B, H) for time-major x."""
    return x.new_zeros(shape.num_layers * shape.num_directions, x.shape[1], shape.hidden_size)


def _validated_time_major(
    input: Tensor | PackedSequence,
    hx: Tensor | None,
    reference_weight: Tensor,
    shape: GRUShape,
) -> tuple[Tensor, Tensor | None, Tensor | None, sequence.SequenceLayout]:
    """Check every argument of a forward call, then bring it into the kernels' layout; h0 is
    None without hx."""
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

    if hx is None:
        return x, None, lengths, layout
    expected_hidden = (
        shape.num_layers * shape.num_directions,
        x.shape[1],
        shape.hidden_size,
    )
    return x, _validated_hidden(hx, expected_hx_dim, expected_hidden, x, layout), lengths, layout


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
