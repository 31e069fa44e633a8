"""Constants of one requantization term (reference/README.md §4), derived exactly from the
encoded scales with rational arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

OPERAND_BITS_LIMIT = 61  # §4: term integers stay within 2^61 after the operand pre-shift
MULTIPLIER_OPERAND_BITS = 31  # §4: |v'| <= 2^31 before the multiply by m < 2^31
MULTIPLIER_BITS = 31
TERM_LIMIT = 2**60  # §4: every term saturates to [-2^60, 2^60]


@dataclass(frozen=True)
class Term:
    """How one term is brought into its operator's scale.

    m, n: per-channel multiplier and shift (int64, shape (C,), C = 1 or 3H); m = 1 in shift form.
    pre_shift: p of §4, applied to the term integer before the multiply.
    operand_shifts: (e_a, e_c) of §4, applied to the two operands of a (dot) product.
    """

    m: Tensor
    n: Tensor
    pre_shift: int
    operand_shifts: tuple[int, int]


def ceil_log2(k: int) -> int:
    return (k - 1).bit_length() if k > 1 else 0


def floor_log2(value: Fraction) -> int:
    """floor(log2(value)) of a positive rational, exactly."""
    guess = value.numerator.bit_length() - value.denominator.bit_length()
    if Fraction(2) ** guess > value:
        guess -= 1
    elif Fraction(2) ** (guess + 1) <= value:
        guess += 1
    return guess


def multiplier_and_shift(ratio: Fraction) -> tuple[int, int]:
    """(m, n) with 2^30 <= m < 2^31 and m * 2^-n = ratio to 31 significant bits (§4)."""
    exponent = floor_log2(ratio)
    shift = MULTIPLIER_BITS - 1 - exponent
    scaled = ratio * Fraction(2) ** shift
    m = (scaled + Fraction(1, 2)).__floor__()
    if m == 2**MULTIPLIER_BITS:
        m, shift = m // 2, shift - 1
    return m, shift


def make_term(
    term_scales: Sequence[Fraction],
    out_scale: Fraction,
    operand_bits: Sequence[int],
    dot_length: int,
    scale_type: str,
) -> Term:
    """Constants of a term whose integer is a code, a product of two, or a dot product.

    term_scales: the term's scale per channel (product of its codes' scales); out_scale: the
    operator's scale; operand_bits: alpha of each operand (one or two entries); dot_length: K
    of a dot product, 1 otherwise.
    """
    bound = sum(operand_bits) + ceil_log2(dot_length)
    excess = max(0, bound - OPERAND_BITS_LIMIT)
    if excess and len(operand_bits) != 2:
        raise ValueError(f"a single-operand term cannot exceed {OPERAND_BITS_LIMIT} bits")
    shift_a = (excess + 1) // 2
    operand_shifts = (shift_a, excess - shift_a)
    bound -= excess
    if scale_type == "pot":
        pre_shift = 0
        pairs = [(1, -_exact_log2(s * 2**excess / out_scale)) for s in term_scales]
    else:
        pre_shift = max(0, bound - MULTIPLIER_OPERAND_BITS)
        pairs = [
            multiplier_and_shift(s * Fraction(2) ** (excess + pre_shift) / out_scale)
            for s in term_scales
        ]
    return Term(
        m=torch.tensor([m for m, _ in pairs], dtype=torch.int64),
        n=torch.tensor([n for _, n in pairs], dtype=torch.int64),
        pre_shift=pre_shift,
        operand_shifts=operand_shifts,
    )


def _exact_log2(ratio: Fraction) -> int:
    exponent = floor_log2(ratio)
    if Fraction(2) ** exponent != ratio:
        raise ValueError(f"power-of-two scales must give a power-of-two ratio, got {ratio}")
    return exponent
