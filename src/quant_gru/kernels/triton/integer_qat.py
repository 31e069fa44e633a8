"""QAT on the Triton kernels: the integer GRU's forward on the integer kernel, which also saves
what the gradients need (qat_save.py), and a backward on the float backward kernels
(gru_backward.py with QAT), in place of the plain-PyTorch straight-through graph that
kernels/torch/quantized_forward.py builds a step at a time.

The gradients are that graph's (the float GRU's at the dequantized codes, each point's gradient
blocked where its float value rounds outside its range), the recurrence's values computed in
the kernel in the model's type: they agree with the graph's to float rounding, and a mask may
differ where a value lies within rounding of a range's edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from quant_gru.kernels.derived import DerivedCache
from quant_gru.kernels.torch.quant_gru import prepared_codes
from quant_gru.kernels.torch.stack import DirectionWeights
from quant_gru.kernels.triton.gru_backward import qat_direction_backward
from quant_gru.kernels.triton.integer_constants import kernel_constants, magnitude
from quant_gru.kernels.triton.integer_gru import QatSave, run_direction, stack_layers
from quant_gru.kernels.triton.integer_projection import (
    WxMasks,
    digit_input_projection,
    digits_projection,
    input_projection,
)
from quant_gru.kernels.triton.ops import recurrent_weight_grad
from quant_gru.kernels.triton.qat_input import InputPoint, QatInput, qat_input
from quant_gru.kernels.triton.qat_save import (
    COEFFICIENTS,
    point_thresholds,
    projection_mask_values,
    qat_constants,
    rounding,
)
from quant_gru.kernels.triton.weight_points import kernel_weight_point
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.program import ActivationFormat, DirectionProgram
from quant_gru.quantize.scales import dequantize

__all__ = ["KernelQat"]


@dataclass(frozen=True)
class DirectionRecord:
    """What one (layer, direction)'s backward reads from its forward: its layer input's
    values, as zero-corrected codes (T, B, I) or, for the first layer, dequantized with their
    clamp mask (qat_input.py, in the model's type); the outputs (T, B, H; 0 at padded steps),
    h0 and the final state (B, H each); the sequences' lengths; and the kernel's save."""

    x: Tensor | InputPoint
    out: Tensor
    h0: Tensor | None  # None: a zero state
    h_n: Tensor
    lengths: Tensor | None  # int32, on the device
    save: QatSave


class KernelQat:
    """QAT's forward and gradients on the kernels for one call of the quantized forward with
    ``programs`` (quantized_forward.StraightThrough): ``realization`` (the contract of
    kernels/torch/quant_gru.quantized_gru, its traces DirectionRecords) and ``direction``."""

    def __init__(
        self,
        programs: Sequence[DirectionProgram],
        quant: Sequence[DirectionQuant],
        dtype: torch.dtype,
    ) -> None:
        self.quant, self.dtype, self.rounding = quant, dtype, rounding(dtype)
        # Realizations may get a layer's programs alone (dropout between layers).
        self._index = {id(program): i for i, program in enumerate(programs)}
        self._input: QatInput | None = None

    def input_codes(self, x: Tensor, programs: Sequence[DirectionProgram]) -> Tensor:
        """quantized_forward.input_codes' codes of ``x`` less input.x's zero point (the
        first layer's input as the kernels take it: realization knows them by identity),
        made on one kernel with what the first layer's projection and backward read of the
        input (qat_input.py)."""
        self._input = qat_input(x, programs[0])
        return self._input.levels

    def realization(
        self,
        programs: Sequence[DirectionProgram],
        x_codes: Tensor,
        h0_codes: Tensor | None,
        lengths: Tensor | None,
        num_layers: int,
        bidirectional: bool,
        trace: bool = False,
    ) -> tuple[Tensor, Tensor, list[Any]]:
        """The integer GRU's codes, as integer_gru.triton_integer_gru's (``h0_codes`` None:
        zero states, which the kernels start from unread; ``x_codes`` zero-corrected where
        they are input_codes' of this call), and a DirectionRecord per (layer, direction) of
        ``programs`` (those of this call, from any layer) as its traces, whatever ``trace``
        says."""
        num_dirs = 2 if bidirectional else 1
        # The first layer's input as input_codes made it (not a layer's above, with dropout).
        first = self._input if self._input is not None and x_codes is self._input.levels else None
        x_codes, h0_codes, _ = prepared_codes(
            programs, x_codes, h0_codes, lengths, num_layers, num_dirs, steps_mask=False
        )
        if lengths is not None:  # once for every kernel of the call, forward and backward
            lengths = lengths.to(x_codes.device, torch.int32)
        records: list[Any] = []

        def direction(
            index: int, program: DirectionProgram, x: Tensor, h0: Tensor | None
        ) -> tuple[Tensor, Tensor]:
            quant = self.quant[self._index[id(program)]]
            wx_masks: WxMasks | None = self._wx_masks(program, quant, x)
            x_input = first if index < num_dirs else None
            wx = None
            if x_input is not None and x_input.digits is not None:
                wx = digits_projection(program, x_input.digits, x_input.operand, wx_masks)
            if wx is None:
                wx = digit_input_projection(program, x, wx_masks)
            if wx is None:
                wx_masks = None
                wx = input_projection(program, x)
            save = self._save(program, quant, x, wx_masks)
            out, h_n, _ = run_direction(
                program, kernel_constants(program, x.device), wx, h0, lengths,
                index % num_dirs == 1, False, save=save,
            )  # fmt: skip
            kept = x if x_input is None else x_input.point  # not the first layer's codes
            records.append(DirectionRecord(kept, out, h0, h_n, lengths, save))
            return out, h_n

        out_codes, h_n_codes = stack_layers(
            programs, x_codes, h0_codes, num_layers, num_dirs, direction,
            zero_corrected=first is not None,
        )  # fmt: skip
        return out_codes, h_n_codes, records

    def _wx_masks(self, program: DirectionProgram, quant: DirectionQuant, x: Tensor) -> WxMasks:
        steps, batch, _ = x.shape
        low, high = point_thresholds(program.formats["matmul.Wx"])
        out = torch.empty(steps, batch, 3 * program.hidden_size, dtype=torch.int8, device=x.device)
        scale, bias = projection_mask_values(program, quant, self.dtype, x.device)
        return WxMasks(out, scale, bias, low, high, self.rounding)

    def _save(
        self,
        program: DirectionProgram,
        quant: DirectionQuant,
        x: Tensor,
        wx_masks: WxMasks | None,
    ) -> QatSave:
        steps, batch, _ = x.shape
        hidden = program.hidden_size
        constants, bias = qat_constants(program, quant, self.dtype, x.device)
        return QatSave(
            constants=constants,
            bias=bias,
            coefficients=torch.empty(
                steps, batch, COEFFICIENTS * hidden, dtype=torch.float32, device=x.device
            ),
            masks=torch.empty(steps, batch, hidden, dtype=torch.int8, device=x.device),
            rounding=self.rounding,
            wx_masks=None if wx_masks is None else wx_masks.out,
        )

    def direction(
        self,
        index: int,
        program: DirectionProgram,
        record: Any,
        x: Tensor,
        h0: Tensor | None,
        weights: DirectionWeights,
        lengths: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor]:
        """The direction's outputs (T, B, H) and final state, their values the dequantized
        codes and their gradients the straight-through ones, from the layer input ``x`` and
        initial state ``h0`` (None: zeros) of the gradient graph (``lengths``: the record has
        them on the device already)."""
        context = _Context(program, self.quant[index], record, reverse)
        return _KernelQatDirection.apply(context, x, h0, *weights)


@dataclass(frozen=True)
class _Context:
    program: DirectionProgram
    quant: DirectionQuant
    record: DirectionRecord
    reverse: bool


class _KernelQatDirection(torch.autograd.Function):
    """One direction of QAT's gradient graph: values from the integer forward, gradients from
    the QAT backward kernel and products over all steps."""

    @staticmethod
    def forward(
        ctx: Any,
        context: _Context,
        x: Tensor,
        h0: Tensor | None,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None,
        b_hh: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.context = context
        fmt = context.program.formats["output.h"]
        out = _dequantized(context.record.out, fmt, x.dtype)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, out)
        return out, _dequantized(context.record.h_n, fmt, x.dtype)

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself recorded
    def backward(ctx: Any, grad_out: Tensor, grad_h_n: Tensor) -> tuple[Tensor | None, ...]:
        context: _Context = ctx.context
        x, h0, w_ih, w_hh, b_ih, b_hh, out = ctx.saved_tensors
        program, quant, record = context.program, context.quant, context.record
        dtype, fmt = x.dtype, program.formats
        points = _WEIGHT_POINTS.get(
            program,
            x.device,
            lambda: _weight_points(program, quant, (w_ih, w_hh, b_ih, b_hh)),
            dtype,
        )
        (w_value, w_mask), (r_value, r_mask), (bw_value, bw_mask), (_, br_mask) = points
        lengths = record.lengths
        grad_gx, grad_h0, grad_rb, grad_rh = qat_direction_backward(
            grad_out, grad_h_n, record.save.coefficients, record.save.masks, r_value, lengths,
            context.reverse, dtype,
        )  # fmt: skip

        # Only the gradients autograd asks for: each costs the host several operations, and
        # the default initial state (zeros made by the caller) asks for none.
        needs_x, needs_h0, needs_w_ih, needs_w_hh, needs_b_ih, needs_b_hh = ctx.needs_input_grad[1:]
        x_mask = None  # the first layer's input: its values and mask made in the forward
        if isinstance(record.x, InputPoint):
            x_value, x_mask = record.x.value, record.x.mask
        elif record.save.wx_masks is None or needs_w_ih:
            x_value = _dequantized(record.x, fmt["input.x"], dtype)
        if record.save.wx_masks is None:
            wx_value = F.linear(x_value, w_value, bw_value)
            grad_gx.mul_(_mask(wx_value, fmt["matmul.Wx"]))
        else:
            grad_gx.mul_(record.save.wx_masks)
        rows = grad_gx.flatten(0, 1)
        grad_x = grad_w_ih = grad_b_ih = grad_w_hh = grad_b_hh = grad_h = None
        if needs_x:
            x_mask = _mask(x, fmt["input.x"]) if x_mask is None else x_mask
            grad_x = (grad_gx @ w_value).mul_(x_mask)
        if needs_w_ih:
            grad_w_ih = (rows.t() @ x_value.flatten(0, 1)).mul_(w_mask)
        if needs_b_ih:
            grad_b_ih = rows.sum(0).mul_(bw_mask)
        if needs_w_hh:
            h0_value = None  # a zero state adds nothing to the gradient
            if record.h0 is not None:
                h0_value = _dequantized(record.h0, fmt["output.h"], dtype)
            grad_w_hh = torch.empty(w_hh.shape, dtype=torch.float32, device=x.device)
            recurrent_weight_grad([(grad_rh, grad_w_hh)], out, h0_value, lengths, context.reverse)
            grad_w_hh = grad_w_hh.to(dtype).mul_(r_mask)
        if needs_b_hh:
            grad_b_hh = grad_rb.flatten(0, 1).sum(0).to(dtype).mul_(br_mask)
        if needs_h0:
            grad_h = grad_h0.to(dtype).mul_(_mask(h0, fmt["output.h"]))
        return None, grad_x, grad_h, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


# The weights' points of a program: the program is made again whenever its weights change
# (quantized_forward.ProgramCache), so its entry holds for every backward through it.
_WEIGHT_POINTS: DerivedCache[list[tuple[Tensor, Tensor]]] = DerivedCache()


def _weight_points(
    program: DirectionProgram, quant: DirectionQuant, weights: DirectionWeights
) -> list[tuple[Tensor, Tensor]]:
    """(dequantized codes, clamp mask) of weight.W, weight.R, weight.bw and weight.br, in the
    weights' type (absent biases: zeros): quantized_forward.weight_point's, on the kernel (or
    kept from when ``program``'s codes were made there)."""
    w_ih, w_hh, b_ih, b_hh = weights
    values = (w_ih, w_hh, _bias(b_ih, w_ih), _bias(b_hh, w_hh))
    codes = (program.weight_W, program.weight_R, program.bias_w, program.bias_r)
    names = ("weight.W", "weight.R", "weight.bw", "weight.br")
    return [
        kernel_weight_point(v, quant[n], c) for n, v, c in zip(names, values, codes, strict=True)
    ]


def _dequantized(codes: Tensor, fmt: ActivationFormat, dtype: torch.dtype) -> Tensor:
    """Zero-corrected codes' values s (q - zp) in ``dtype``, to the bit as
    quantize.scales.dequantize's float64 values converted to ``dtype``: in one pass of float32
    arithmetic for a float32 model whose codes lie below 2^24 in magnitude (the scale is a
    float32 value: one rounding of the exact product either way), else through float64 (a
    float32 product rounded again to a 16-bit type could differ)."""
    if dtype == torch.float32 and magnitude(fmt) < _FLOAT32_INTEGERS:
        if torch.get_default_dtype() == torch.float32:  # the product promotes to float32
            return codes * float(fmt.scale)
        return codes.to(torch.float32) * float(fmt.scale)
    return dequantize(codes, fmt.scale, 0).to(dtype)


_FLOAT32_INTEGERS = 2**24  # float32 holds every integer below this exactly


def _mask(value: Tensor, fmt: ActivationFormat) -> Tensor:
    """quantized_forward.point_mask of a float32, bfloat16 or float16 ``value``, by two
    comparisons in float32 (qat_save.point_thresholds)."""
    low, high = point_thresholds(fmt)
    wide = value.detach().float()
    return ((wide >= low) & (wide < high)).to(value.dtype)


def _bias(bias: Tensor | None, weight: Tensor) -> Tensor:
    return bias if bias is not None else weight.new_zeros(weight.shape[0])
