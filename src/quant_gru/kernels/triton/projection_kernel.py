"""Triton kernels for the integer GRU's input side (reference/README.md §7, §8): float inputs,
or the codes of the layer below, to operand digits; matmul.Wx on the int8 matrix cores with its
whole §4/§5 epilogue.

Both serve models whose input operand and W each take one balanced base-256 digit
(integer_digits.py); integer_projection.py decides and falls back to plain PyTorch otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quant_gru.kernels.triton.integer_kernel import (
    _channel_term,
    _rshr,
    _saturated,
    _shift_right,
)
from quant_gru.kernels.triton.qat_save import _rounded


@triton.jit
def _quantize_kernel(
    x_ptr,  # (n,) float: the layer input
    digits_ptr,  # (n,) int8: rshr(q - zp, e) - o
    n,
    format_ptr,  # (3,) float64: input.x's scale, qmin - zp, qmax - zp
    operand_shift,  # e: matmul.Wx's shift of the input operand (§4)
    offset,  # o: the digit offset (integer_digits.digit_offset)
    BLOCK: tl.constexpr,
):
    """§8's quantization (floor(x / s + 1/2), NaN to the zero point, clamped, in float64 like
    quantize.scales.quantize), then the operand shift and the digit offset."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside, other=0)
    level = input_levels(x, format_ptr)
    operand = _rshr(level.to(tl.int64), operand_shift)
    tl.store(digits_ptr + index, (operand - offset).to(tl.int8), mask=inside)


@triton.jit
def input_levels(x, format_ptr):
    """§8's zero-corrected levels of float inputs ``x`` by input.x's ``format_ptr`` (scale,
    qmin - zp, qmax - zp; float64): floor(x / s + 1/2) in float64, NaN to 0 (the zero point),
    clamped. Float64 results."""
    scale = tl.load(format_ptr)
    low = tl.load(format_ptr + 1)
    high = tl.load(format_ptr + 2)
    level = tl.floor(x.to(tl.float64) / scale + 0.5)
    level = tl.where(level != level, 0.0, level)
    return tl.minimum(tl.maximum(level, low), high)


@triton.jit
def _projection_kernel(
    digits_ptr,  # (M, K) int8: the input operand's digits (offset by o)
    weight_ptr,  # (N, K) int8: W, operand-shifted, one digit (K-major, as the int8 matrix
    # instructions of sm_90 take both operands)
    multiplier_ptr,  # (N,) int64: the dot term's m per channel
    shift_ptr,  # (N,) int64: its n per channel
    correction_ptr,  # (N,) int64: o * rowsum(W), undoing the offset
    bias_ptr,  # (N,) int64: the bias term's values plus matmul.Wx's zero point
    codes_ptr,  # (M, N): matmul.Wx's codes
    mask_ptr,  # (M, N) int8 out (MASKS): QAT's clamp mask of matmul.Wx
    mask_scale_ptr,  # (N,) float32 (MASKS): the float value's scale per channel
    mask_bias_ptr,  # (N,) the model's type (MASKS): the bias's values
    rows,
    columns,
    depth,
    qmin,
    qmax,
    mask_low,  # MASKS: the mask's thresholds (qat_save.point_thresholds)
    mask_high,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRE_SHIFT: tl.constexpr,  # the dot term's p
    NARROW: tl.constexpr,  # the sums and the term fit int32 (KernelConstants' NARROW test)
    MASKS: tl.constexpr = False,
    ROUND: tl.constexpr = 0,  # MASKS: the model's type (qat_save.rounding)
):
    """codes = clamp(term(Σ_k x_k W_k) + bias + zp, qmin, qmax): §4's dot term on exact int32
    sums of digit products (K at most integer_digits.MAX_PRODUCT_TERMS), §5's clamp. MASKS:
    also whether the float value of the product, (Σ_k x_k W_k) σ + b in the model's type,
    rounds inside matmul.Wx's range (what quantized_forward's graph computes as
    F.linear of the dequantized input and weights)."""
    row = tl.program_id(0) * BM + tl.arange(0, BM)
    column = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = row < rows
    column_ok = column < columns
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, depth, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < depth
        a = tl.load(
            digits_ptr + row.to(tl.int64)[:, None] * depth + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0,
        )
        w = tl.load(
            weight_ptr + column[None, :] * depth + ks[:, None],
            mask=k_ok[:, None] & column_ok[None, :],
            other=0,
        )
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    m = tl.load(multiplier_ptr + column, mask=column_ok, other=0)[None, :]
    n = tl.load(shift_ptr + column, mask=column_ok, other=1)[None, :]
    sums = acc.to(tl.int64) + tl.load(correction_ptr + column, mask=column_ok, other=0)[None, :]
    if NARROW:
        sums = sums.to(tl.int32)
    term = _channel_term(sums, m, n, PRE_SHIFT, NARROW)
    codes = term + tl.load(bias_ptr + column, mask=column_ok, other=0)[None, :]
    codes = tl.minimum(tl.maximum(codes, qmin), qmax)
    offsets = row.to(tl.int64)[:, None] * columns + column[None, :]
    own = row_ok[:, None] & column_ok[None, :]
    tl.store(codes_ptr + offsets, codes.to(codes_ptr.dtype.element_ty), mask=own)
    if MASKS:
        sigma = tl.load(mask_scale_ptr + column, mask=column_ok, other=0.0)[None, :]
        bias = tl.load(mask_bias_ptr + column, mask=column_ok, other=0.0).to(tl.float32)[None, :]
        value = _rounded(_rounded(sums.to(tl.float32) * sigma, ROUND) + bias, ROUND)
        inside = (value >= mask_low) & (value < mask_high)
        tl.store(mask_ptr + offsets, inside.to(tl.int8), mask=own)


@triton.jit
def _requantize_kernel(
    values_ptr,  # (n, H) int64: one direction's zero-corrected outputs of the layer below
    digits_ptr,  # (n, D * H) int8: the layer input's operand digits
    n,
    hidden,
    width,  # D * H: the layer input's row
    column,  # this direction's first column of the layer input
    C: tl.constexpr,  # (m, n, p, qmin - zp, qmax - zp, operand shift, digit offset)
    BLOCK: tl.constexpr,
):
    """§8's layer input of one direction block: the direction's term (§4), the clamp to
    input.x's range (§5), then matmul.Wx's operand shift and the digit offset."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n * hidden
    values = tl.load(values_ptr + index, mask=inside, other=0)
    term = _saturated(_shift_right(values, C[2]) * C[0], C[1])
    operand = _shift_right(tl.minimum(tl.maximum(term, C[3]), C[4]), C[5])
    row = index // hidden
    offsets = row * width + column + index - row * hidden
    tl.store(digits_ptr + offsets, (operand - C[6]).to(tl.int8), mask=inside)
