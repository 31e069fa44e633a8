"""Exact integer matrix products on the int8 matrix cores: operands written in balanced
base-256 digits.

A value y is written y = Σ_i d_i 256^i with digits d_i in [-128, 127], one int8 each. A product
of two digit tensors summed over K terms is exact in int32 while K * 2^14 < 2^31; the kernel
sums the digit products of equal weight 256^s and combines them in int64. That combination is
exact modulo 2^64, and the true result is below 2^62 in magnitude (reference/README.md §4), so
it comes out exact.

An operand known to lie in [lo, hi] is moved by an offset o first, y = x - o, so that it needs
no more digits than the span hi - lo asks for: any 8-bit code range takes one digit, whatever
its zero point. Then R x = R y + o * rowsum(R) for every output channel.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIGIT_BITS = 8
_HALF = 1 << (DIGIT_BITS - 1)  # 128
# One int32 sum of digit products takes at most this many terms: 2^14 each, below 2^31.
MAX_PRODUCT_TERMS = (2**31 - 1) // (_HALF * _HALF)


def _digit_range(digits: int) -> tuple[int, int]:
    """The values that ``digits`` balanced digits can write: [-128 * u, 127 * u] with
    u = (256^digits - 1) / 255."""
    unit = ((1 << (DIGIT_BITS * digits)) - 1) // ((1 << DIGIT_BITS) - 1)
    return -_HALF * unit, (_HALF - 1) * unit


def digits_for_span(low: int, high: int) -> int:
    """The fewest digits (at least 1) that write every value of [low, high] once offset by
    ``digit_offset(low, digits)``: those with high - low < 256^digits."""
    if high < low:
        raise ValueError(f"an empty range [{low}, {high}]")
    digits = 1
    while high - low >= 1 << (DIGIT_BITS * digits):
        digits += 1
    return digits


def digit_offset(low: int, digits: int) -> int:
    """The offset o that moves [low, ...] to the bottom of the digits' range."""
    return low - _digit_range(digits)[0]


def digits_for_values(low: int, high: int) -> int:
    """The fewest digits (at least 1) that write every value of [low, high] without an
    offset (weights: their products need no correction)."""
    digits = 1
    while True:
        bottom, top = _digit_range(digits)
        if bottom <= low and high <= top:
            return digits
        digits += 1


def split_digits(values: Tensor, digits: int) -> Tensor:
    """int64 ``values`` as ``digits`` balanced digits, lowest first: int8 (digits, *shape).
    Every value must lie in the digits' range (the caller chose ``digits`` for it: checking
    here would cost a read of the device on every call)."""
    if digits == 1:  # the value is its own digit
        return values.to(torch.int8)[None]
    parts = []
    rest = values.to(torch.int64)
    for _ in range(digits):
        digit = ((rest + _HALF) & ((1 << DIGIT_BITS) - 1)) - _HALF
        parts.append(digit.to(torch.int8))
        rest = (rest - digit) >> DIGIT_BITS
    return torch.stack(parts)


def wrap_int64(value: int) -> int:
    """``value`` modulo 2^64 as a signed 64-bit integer (the kernel's arithmetic)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def one_digit_products(
    x: Tensor, low: int, high: int, weight: Tensor, weight_range: tuple[int, int]
) -> Tensor | None:
    """x (..., K) @ weight (N, K)^T exactly, for int64 x within [low, high] and weights within
    ``weight_range``, as one int8 matrix product (torch._int_mm, int32 sums) when both take one
    digit and the shapes suit it; None otherwise."""
    depth = x.shape[-1]
    rows = x.numel() // depth if depth else 0
    if digits_for_span(low, high) > 1 or digits_for_values(*weight_range) > 1:
        return None
    if depth > MAX_PRODUCT_TERMS or rows == 0 or depth == 0:
        return None
    # cuBLAS's int8 product wants more than 16 rows and K, N multiples of 8 (and torch
    # 2.13's CPU product is wrong for K = 1): the same rule on every device.
    if rows <= 16 or depth % 8 or weight.shape[0] % 8:
        return None
    offset = digit_offset(low, 1)
    digits = (x - offset).to(torch.int8).reshape(rows, depth)
    weight8 = weight.to(torch.int8)
    sums = torch._int_mm(digits, weight8.t()).to(torch.int64)
    return (sums + offset * weight.sum(dim=1)).view(*x.shape[:-1], weight.shape[0])
