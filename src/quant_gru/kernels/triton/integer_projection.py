"""matmul.Wx of the integer GRU (reference/README.md §7) for every step at once, outside the
recurrence: from zero-corrected input codes (plain PyTorch, any widths), or on the kernels of
projection_kernel.py where the operands take one digit each: straight from the float input of
the first layer, or from the codes of the layer below (operand digits, then the int8 product
with its whole epilogue).

What depends on the weights alone (W's digits and row sums, the bias term; the shifted W of
the plain-PyTorch projection when first read) is made once per program: ProgramCache
(quantized_forward.py) keeps a program while its weights are unchanged, so inference finds
them here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quant_gru.kernels.derived import CalibrationCache, DerivedCache
from quant_gru.kernels.torch.quant_gru import apply_term, exact_int_matmul, rounding_right_shift
from quant_gru.kernels.triton.integer_constants import (
    plain_term,
    shifted,
    shifted_range,
    zero_corrected_range,
)
from quant_gru.kernels.triton.integer_digits import (
    MAX_PRODUCT_TERMS,
    digit_offset,
    digits_for_span,
    digits_for_values,
    one_digit_products,
)
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div, power_of_two
from quant_gru.kernels.triton.projection_kernel import (
    _projection_kernel,
    _quantize_kernel,
    _requantize_kernel,
)
from quant_gru.kernels.triton.weight_operands import bias_term, one_digit_operands
from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.program import ActivationFormat, DirectionProgram
from quant_gru.quantize.requant import ceil_log2

# Codes of matmul.Wx are kept in the narrowest of these that holds their range.
_CODE_TYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_QUANTIZE_BLOCK = 1024
# Product tiles (M, N, K chunk, warps, stages), measured on an H100 at (51200 x 1024) @ (1024 x
# 3072) and (32768 x 512) @ (512 x 1536) among ten tilings: for codes alone 128 x 256 x 128 on 8
# warps (0.75 and 0.25 ms; cuBLAS's int8 product without the epilogue 0.55 and 0.16 ms); with
# QAT's masks too, whose float epilogue spills the larger tiles' registers, 64 x 128 x 128 on 4
# warps (0.95 and 0.26 ms against 1.22 and 0.37 ms on the codes' tiles). int8 tl.dot takes
# K >= 32.
_CODE_TILES = (128, 256, 128, 8, 3)
_MASK_TILES = (64, 128, 128, 4, 4)
_ELEMENTWISE_WARPS = 4

_launch_quantize = Launcher(_quantize_kernel)
_launch_requantize = Launcher(_requantize_kernel)
_launch_projection = Launcher(_projection_kernel)


def code_type(fmt: ActivationFormat) -> torch.dtype:
    """The narrowest integer type that holds the operator's codes."""
    for dtype in _CODE_TYPES:
        info = torch.iinfo(dtype)
        if info.min <= fmt.qmin and fmt.qmax <= info.max:
            return dtype
    raise ValueError(f"codes in [{fmt.qmin}, {fmt.qmax}] do not fit 64 bits")


@dataclass(frozen=True)
class ProjectionOperands:
    """One program's matmul.Wx operands on one device."""

    codes: Tensor  # (3H, I) int64: W's codes
    weight_shift: int  # W's operand shift
    weight_range: tuple[int, int]
    bias: Tensor  # (3H,) int64: the bias term of weight.bw plus matmul.Wx's zero point
    x_shift: int  # the input operand's shift
    x_range: tuple[int, int]  # the shifted input operand's range
    # One digit each (the kernels' case; multiplier given), else None:
    digits: Tensor | None  # (3H, I) int8: W
    x_offset: int  # o of the input operand's digits
    correction: Tensor | None  # (3H,) int64: o * rowsum(W)
    multiplier: Tensor | None  # (3H,) int64: the dot term's m per channel
    shift: Tensor | None  # (3H,) int64: its n per channel
    narrow: bool  # sums and term in int32 (integer_constants.plain_term)
    x_format: Tensor | None  # (3,) float64: input.x's scale, qmin - zp, qmax - zp

    @functools.cached_property
    def weight(self) -> Tensor:
        """(3H, I) int64: W after its operand shift, the plain-PyTorch projection's operand,
        made when first read (the kernels read the digits; QAT remakes the operands after
        every weight update)."""
        return rounding_right_shift(self.codes, self.weight_shift)


_OPERANDS: DerivedCache[ProjectionOperands] = DerivedCache()


def projection_operands(program: DirectionProgram, device: torch.device) -> ProjectionOperands:
    """The program's operands on ``device``, made once per program."""
    return _OPERANDS.get(program, device, lambda: _make_operands(program, device))


def _make_operands(program: DirectionProgram, device: torch.device) -> ProjectionOperands:
    static = _CALIBRATED.get(program.terms, device, lambda: _calibrated(program, device))
    dot, bias_dot = program.terms["matmul.Wx"]
    codes = program.weight_W.to(device, torch.int64)
    zero_point = program.formats["matmul.Wx"].zero_point
    bias = bias_term(program.bias_w.to(device, torch.int64), bias_dot, zero_point)
    if static.multiplier is None:
        return dataclasses.replace(static, codes=codes, bias=bias.value(codes.shape[0]))
    # One launch for W's digits, o * rowsum(W) and the bias term.
    made = one_digit_operands(codes, dot.operand_shifts[0], static.x_offset, bias=bias)
    assert made.bias is not None
    return dataclasses.replace(
        static, codes=codes, bias=made.bias, digits=made.digits, correction=made.rows[0]
    )


# The operands' parts that depend on a calibration alone (the weights' ones left empty), by
# the programs' terms.
_CALIBRATED: CalibrationCache[ProjectionOperands] = CalibrationCache()


def _calibrated(program: DirectionProgram, device: torch.device) -> ProjectionOperands:
    fmt = program.formats
    dot = program.terms["matmul.Wx"][0]
    weight_shift, x_shift = dot.operand_shifts
    weight_range = shifted_range(program, "weight.W", weight_shift)  # no read back
    x_range = tuple(shifted(v, x_shift) for v in zero_corrected_range(fmt["input.x"]))
    empty = torch.empty(0, dtype=torch.int64, device=device)
    base = ProjectionOperands(
        codes=empty,
        weight_shift=weight_shift,
        weight_range=weight_range,
        bias=empty,
        x_shift=x_shift,
        x_range=(x_range[0], x_range[1]),
        digits=None,
        x_offset=0,
        correction=None,
        multiplier=None,
        shift=None,
        narrow=False,
        x_format=None,
    )
    one_digit = digits_for_span(*x_range) == 1 and digits_for_values(*weight_range) == 1
    if not one_digit or not 0 < program.input_size <= MAX_PRODUCT_TERMS:
        return base
    bound = max(map(abs, x_range)) * max(map(abs, weight_range)) * program.input_size
    rows = 3 * program.hidden_size
    # The operand shifts are applied to the operands, so the term sees none.
    return dataclasses.replace(
        base,
        x_offset=digit_offset(x_range[0], 1),
        multiplier=device_copy(dot.m, device, torch.int64).expand(rows).contiguous(),
        shift=device_copy(dot.n, device, torch.int64).expand(rows).contiguous(),
        narrow=plain_term(dataclasses.replace(dot, operand_shifts=(0, 0)), bound),
        x_format=input_format(fmt["input.x"], device),
    )


# Cached: the operands are remade at every weight update, input.x's format only at a
# calibration, and a copy from the host to the device waits for the device's queue.
@functools.lru_cache(maxsize=64)
def input_format(fmt: ActivationFormat, device: torch.device) -> Tensor:
    """input.x's scale, qmin - zp and qmax - zp, float64 on the device (a Python float would
    reach the kernel as float32)."""
    values = [fmt.scale, *zero_corrected_range(fmt)]
    return torch.tensor(values, dtype=torch.float64, device=device)


def input_projection(program: DirectionProgram, x: Tensor) -> Tensor:
    """matmul.Wx's codes (T, B, 3H) of zero-corrected input.x values ``x`` (§7), in the
    narrowest integer type that holds them (plain PyTorch)."""
    operands = projection_operands(program, x.device)
    operand = rounding_right_shift(x, operands.x_shift)
    low, high = operands.x_range
    weight, weight_range = operands.weight, operands.weight_range
    products = one_digit_products(operand, low, high, weight, weight_range)
    if products is None:
        x_bits = max(abs(low), abs(high)).bit_length()
        weight_bits = max(abs(v) for v in weight_range).bit_length()
        bound = x_bits + weight_bits + ceil_log2(program.input_size)
        products = exact_int_matmul(operand, weight.t(), bound, (x_bits, weight_bits))
    dot = program.terms["matmul.Wx"][0]
    wx = program.formats["matmul.Wx"]
    codes = (apply_term(products, dot) + operands.bias).clamp(wx.qmin, wx.qmax)
    return codes.to(code_type(wx))


def float_input_projection(program: DirectionProgram, x: Tensor) -> Tensor | None:
    """matmul.Wx's codes (T, B, 3H) of the float layer input ``x`` (T, B, I), quantized by
    input.x's format (§8) on the kernels, equal to input_projection of its codes; None when
    the operands do not take one digit each (the caller quantizes and takes the general
    path)."""
    operands = projection_operands(program, x.device)
    if operands.digits is None:
        return None
    assert operands.x_format is not None
    steps, batch, depth = x.shape
    x = x.contiguous()
    digits = torch.empty(steps * batch, depth, dtype=torch.int8, device=x.device)
    if digits.numel():
        _launch_quantize(
            (ceil_div(digits.numel(), _QUANTIZE_BLOCK), 1),
            (x, digits, digits.numel(), operands.x_format, operands.x_shift, operands.x_offset),
            dict(BLOCK=_QUANTIZE_BLOCK), _ELEMENTWISE_WARPS,
        )  # fmt: skip
    return _digit_projection(program, operands, digits).view(steps, batch, 3 * program.hidden_size)


def digit_input_projection(
    program: DirectionProgram, x: Tensor, masks: WxMasks | None = None
) -> Tensor | None:
    """matmul.Wx's codes (T, B, 3H) of zero-corrected input.x values ``x`` (T, B, I) on the
    kernel, equal to input_projection's, and QAT's clamp masks into ``masks``; None when the
    operands do not take one digit each."""
    operands = projection_operands(program, x.device)
    if operands.digits is None:
        return None
    digits = (rounding_right_shift(x, operands.x_shift) - operands.x_offset).to(torch.int8)
    return digits_projection(program, digits, (operands.x_shift, operands.x_offset), masks)


def digits_projection(
    program: DirectionProgram,
    digits: Tensor,
    operand: tuple[int, int],
    masks: WxMasks | None = None,
) -> Tensor | None:
    """matmul.Wx's codes (T, B, 3H) of the input operand's digits (T, B, I), made as the
    projection kernels make them with the operand shift and offset ``operand`` (rshr(q - zp,
    e) - o, int8), and QAT's clamp masks into ``masks``; None when ``program``'s operands do
    not take one digit each or take them with another shift or offset."""
    operands = projection_operands(program, digits.device)
    if operands.digits is None or (operands.x_shift, operands.x_offset) != operand:
        return None
    steps, batch, depth = digits.shape
    flat = digits.view(steps * batch, depth)
    return _digit_projection(program, operands, flat, masks).view(
        steps, batch, 3 * program.hidden_size
    )


@dataclass(frozen=True)
class WxMasks:
    """Where the projection kernel writes QAT's clamp masks of matmul.Wx (``out``, (T, B, 3H)
    int8) and what it computes them from: the float value's scale per channel (``scale``,
    (3H,) float32) and the bias's values (``bias``, (3H,) in the model's type; both from
    qat_save.projection_mask_values), the thresholds, the model type's rounding."""

    out: Tensor
    scale: Tensor
    bias: Tensor
    low: float
    high: float
    rounding: int


def codes_input_projection(program: DirectionProgram, below: Sequence[Tensor]) -> Tensor | None:
    """matmul.Wx's codes (T, B, 3H) of a layer above the first from the zero-corrected outputs
    of each direction of the layer below (T, B, H, int64; §8's terms and clamp on the kernels),
    equal to input_projection of integer_gru.layer_input; None when the operands do not take
    one digit each."""
    operands = projection_operands(program, below[0].device)
    if operands.digits is None:
        return None
    steps, batch, hidden = below[0].shape
    width = len(below) * hidden
    low, high = zero_corrected_range(program.formats["input.x"])
    digits = torch.empty(steps * batch, width, dtype=torch.int8, device=below[0].device)
    for direction, (term, values) in enumerate(zip(program.terms["input.x"], below, strict=True)):
        if not values.numel():
            continue
        constants = (
            int(term.m.item()), int(term.n.item()), term.pre_shift, low, high,
            operands.x_shift, operands.x_offset,
        )  # fmt: skip
        _launch_requantize(
            (ceil_div(values.numel(), _QUANTIZE_BLOCK), 1),
            (values.contiguous(), digits, steps * batch, hidden, width, direction * hidden),
            dict(C=constants, BLOCK=_QUANTIZE_BLOCK), _ELEMENTWISE_WARPS,
        )  # fmt: skip
    return _digit_projection(program, operands, digits).view(steps, batch, 3 * program.hidden_size)


def _digit_projection(
    program: DirectionProgram,
    operands: ProjectionOperands,
    digits: Tensor,
    masks: WxMasks | None = None,
) -> Tensor:
    """matmul.Wx's codes (rows, 3H) of the input operand's digits (rows, I), on the kernel
    (and ``masks``' masks)."""
    assert operands.digits is not None and operands.correction is not None
    assert operands.multiplier is not None and operands.shift is not None
    rows, depth = digits.shape
    columns = operands.digits.shape[0]
    wx = program.formats["matmul.Wx"]
    codes = torch.empty(rows, columns, dtype=code_type(wx), device=digits.device)
    if rows and columns:
        tile_m, tile_n, chunk, warps, stages = _MASK_TILES if masks else _CODE_TILES
        block_m = min(tile_m, max(16, power_of_two(rows)))
        block_n = min(tile_n, max(16, power_of_two(columns)))
        block_k = max(32, min(chunk, power_of_two(depth)))
        grid = (ceil_div(rows, block_m), ceil_div(columns, block_n))
        dot = program.terms["matmul.Wx"][0]
        _launch_projection(
            grid,
            (
                digits, operands.digits, operands.multiplier, operands.shift,
                operands.correction, operands.bias, codes,
                *((masks.out, masks.scale, masks.bias) if masks else (codes,) * 3),
                rows, columns, depth, wx.qmin, wx.qmax,
                *((masks.low, masks.high) if masks else (0.0, 0.0)),
            ),
            dict(
                BM=block_m, BN=block_n, BK=block_k, PRE_SHIFT=dot.pre_shift,
                NARROW=operands.narrow, MASKS=masks is not None,
                ROUND=masks.rounding if masks else 0,
            ),
            warps if block_m * block_n >= 128 * 128 else 4,
            stages,
        )  # fmt: skip
    return codes
