"""QAT's layer input on one kernel: from the float input of the first layer, everything the
integer forward and QAT's backward read of it, in one pass (plain-PyTorch references:
quantized_forward.input_codes for the codes, here less the zero point;
integer_projection.digit_input_projection's operand digits; integer_qat's float32
dequantization and clamp mask).

Made separately, they took about twenty tensor operations a QAT step, each a pass over the
(T, B, I) input on the device and a launch's cost on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.triton.integer_kernel import _rshr
from quant_gru.kernels.triton.integer_projection import input_format, projection_operands
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div
from quant_gru.kernels.triton.projection_kernel import input_levels
from quant_gru.kernels.triton.qat_save import point_thresholds
from quant_gru.quantize.program import DirectionProgram

__all__ = ["InputPoint", "QatInput", "qat_input"]

_BLOCK = 1024
_WARPS = 4


@dataclass(frozen=True)
class InputPoint:
    """The first layer input's dequantized codes and clamp mask, both in x's type: what QAT's
    backward reads of it."""

    value: Tensor
    mask: Tensor


@dataclass(frozen=True)
class QatInput:
    """The first layer's input.x, from its float values x (T, B, I): the zero-corrected codes
    q - zp (int64: quantized_forward.input_codes' less input.x's zero point); the operand
    digits of ``program``'s matmul.Wx (int8, (T, B, I), as the projection kernels take them;
    None where its operands take more than one digit) with the operand shift and offset they
    were made with; its point."""

    levels: Tensor
    digits: Tensor | None
    operand: tuple[int, int]
    point: InputPoint


@triton.jit
def _qat_input_kernel(
    x_ptr,  # (n,) float: the layer input
    levels_ptr,  # (n,) int64 out: q - zp
    digits_ptr,  # (n,) int8 out (DIGITS): rshr(level, e) - o
    value_ptr,  # (n,) float32 out: s * level
    mask_ptr,  # (n,) out, x's type: low <= x < high in float32 (qat_save.point_thresholds)
    n,
    format_ptr,  # (3,) float64: input.x's scale, qmin - zp, qmax - zp
    operand_shift,  # e: matmul.Wx's shift of the input operand (§4)
    offset,  # o: the digit offset (integer_digits.digit_offset)
    mask_low,
    mask_high,
    DIGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside, other=0)
    level = input_levels(x, format_ptr)
    levels = level.to(tl.int64)
    tl.store(levels_ptr + index, levels, mask=inside)
    if DIGITS:
        operand = _rshr(levels, operand_shift) - offset
        tl.store(digits_ptr + index, operand.to(tl.int8), mask=inside)
    # The exact float64 product rounded once: what float32 arithmetic on the code and the
    # float32 scale gives, and float64 dequantization converted to float32.
    scale = tl.load(format_ptr)
    tl.store(value_ptr + index, (level * scale).to(tl.float32), mask=inside)
    wide = x.to(tl.float32)
    kept = (wide >= mask_low) & (wide < mask_high)
    # Through float32: Triton's interpreter converts a boolean to bfloat16 as a bit pattern.
    ones = tl.where(kept, 1.0, 0.0)
    tl.store(mask_ptr + index, ones.to(mask_ptr.dtype.element_ty), mask=inside)


_launch = Launcher(_qat_input_kernel)


def qat_input(x: Tensor, program: DirectionProgram) -> QatInput:
    """The first layer's input.x of float ``x`` (T, B, I) for QAT, digits by ``program``'s
    (a first-layer program's) matmul.Wx operands."""
    fmt = program.formats["input.x"]
    operands = projection_operands(program, x.device)
    digits_wanted = operands.digits is not None
    x = x.detach().contiguous()
    levels = torch.empty(x.shape, dtype=torch.int64, device=x.device)
    digits = torch.empty(x.shape, dtype=torch.int8, device=x.device) if digits_wanted else levels
    value = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    mask = torch.empty_like(x)
    if x.numel():
        low, high = point_thresholds(fmt)
        _launch(
            (ceil_div(x.numel(), _BLOCK), 1),
            (
                x, levels, digits, value, mask, x.numel(), input_format(fmt, x.device),
                operands.x_shift, operands.x_offset, low, high,
            ),
            dict(DIGITS=digits_wanted, BLOCK=_BLOCK), _WARPS,
        )  # fmt: skip
    return QatInput(
        levels=levels,
        digits=digits if digits_wanted else None,
        operand=(operands.x_shift, operands.x_offset),
        point=InputPoint(value.to(x.dtype), mask),
    )
