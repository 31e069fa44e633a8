"""Integer piecewise-linear tables for sigmoid and tanh (reference/README.md §6)."""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

SEGMENTS = 512
SATURATION = {"sigmoid": 12, "tanh": 6}
_CONTEXT = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Table:
    """(c_lo, k, y_0 .. y_N) of §6; y is int64 of shape (SEGMENTS + 1,)."""

    c_lo: int
    k: int
    y: Tensor


@dataclass(frozen=True)
class CodeFormat:
    """What a table needs to know of an operator: encoded scale, zero point, code range."""

    scale: Fraction
    zero_point: int
    qmin: int
    qmax: int


def _floor(value: Fraction) -> int:
    return value.__floor__()


def _ceil(value: Fraction) -> int:
    return value.__ceil__()


def _function(kind: str, u: decimal.Decimal) -> decimal.Decimal:
    with decimal.localcontext(_CONTEXT):
        if kind == "sigmoid":
            return 1 / (1 + (-u).exp())
        return 1 - 2 / ((2 * u).exp() + 1)


def _decimal(value: Fraction) -> decimal.Decimal:
    with decimal.localcontext(_CONTEXT):
        return decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)


def build_table(kind: str, source: CodeFormat, target: CodeFormat) -> Table:
    """The table mapping codes of `source` (a pre-activation) to codes of `target`."""
    if kind not in SATURATION:
        raise ValueError(f"kind must be one of {tuple(SATURATION)}, got {kind!r}")
    bound = SATURATION[kind]
    c_lo = max(source.qmin, source.zero_point + _floor(Fraction(-bound) / source.scale))
    c_hi = min(source.qmax, source.zero_point + _ceil(Fraction(bound) / source.scale))
    k = 0
    while SEGMENTS * 2**k < c_hi - c_lo:
        k += 1
    in_scale = _decimal(source.scale)
    out_scale = _decimal(target.scale)
    ys = []
    with decimal.localcontext(_CONTEXT):
        for j in range(SEGMENTS + 1):
            u = in_scale * (c_lo + j * 2**k - source.zero_point)
            level = (_function(kind, u) / out_scale + decimal.Decimal("0.5")).to_integral_value(
                rounding=decimal.ROUND_FLOOR
            )
            ys.append(min(max(int(level) + target.zero_point, target.qmin), target.qmax))
    return Table(c_lo=c_lo, k=k, y=torch.tensor(ys, dtype=torch.int64))
