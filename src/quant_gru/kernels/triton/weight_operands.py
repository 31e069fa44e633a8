"""A weight's one-digit operands on one kernel: from its codes (rows, K), the operand-shifted
codes rshr(q, e) as int8 digits, the offset correction o * rowsum
(integer_digits.py) after given head rows, and its bias's term (one per row): what the integer
kernels read of W and bw, and of R and br.

The plain-PyTorch reference is ``one_digit_operands_reference`` (rounding_right_shift,
``.to(torch.int8)``, ``sum(dim=1) * o``, ``torch.cat``, apply_term and a clamp): nine or ten
small operations a weight, each a launch on a GPU, made again after every weight update in QAT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.torch.quant_gru import (
    TermChannels,
    apply_term,
    rounding_right_shift,
    term_channels,
)
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div
from quant_gru.quantize.requant import TERM_LIMIT, Term

__all__ = [
    "BiasTerm",
    "OneDigitOperands",
    "bias_term",
    "one_digit_operands",
    "one_digit_operands_reference",
]

_BLOCK_ROWS = 16
_BLOCK_COLUMNS = 128
_WARPS = 4


@dataclass(frozen=True)
class BiasTerm:
    """clamp(term(codes) + add, low, high) per row: a bias's §4 term moved by a constant and
    clamped, formed on the kernel as ``channels`` says (term_channels'; None: by apply_term)."""

    codes: Tensor  # (rows,) int64
    term: Term
    channels: TermChannels | None
    add: int = 0
    low: int = -(2**63)  # no clamp
    high: int = 2**63 - 1

    def value(self, rows: int) -> Tensor:
        """The bias's value in plain PyTorch: (rows,) int64."""
        term = apply_term(self.codes.to(torch.int64), self.term)
        return (term + self.add).clamp(self.low, self.high).expand(rows).contiguous()


def bias_term(
    codes: Tensor, term: Term, add: int = 0, low: int = -(2**63), high: int = 2**63 - 1
) -> BiasTerm:
    """BiasTerm of bias codes (rows,), with its term's channels where a kernel can form it."""
    channels = term_channels(term, codes.shape[0], codes.device)
    return BiasTerm(codes, term, channels, add, low, high)


@dataclass(frozen=True)
class OneDigitOperands:
    digits: Tensor  # (rows, K) int8: rshr(q, shift), each within [-128, 127]
    rows: Tensor  # (HEAD + 1, rows) int64: the head rows, then o * rowsum(digits) mod 2^64
    bias: Tensor | None  # (rows,) int64: BiasTerm's value, where asked for


@triton.jit
def _one_digit_operands_kernel(
    codes_ptr,  # (rows, columns) int64: the weight's codes
    head_ptr,  # (HEAD, rows) int64: copied to the first HEAD rows of rows_ptr
    digits_ptr,  # (rows, columns) int8 out
    rows_ptr,  # (HEAD + 1, rows) int64 out
    bias_ptr,  # (rows,) int64 (BIAS): the bias's codes
    term_ptr,  # (3, rows) int64 (BIAS): its term's m, h and n per row
    bias_out_ptr,  # (rows,) int64 out (BIAS)
    rows,
    columns,
    offset,
    add,
    low,
    high,
    SHIFT: tl.constexpr,
    HEAD: tl.constexpr,
    BIAS: tl.constexpr,
    SATURATE: tl.constexpr,
    LIMIT: tl.constexpr,  # 2^60
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    base = row.to(tl.int64)[:, None] * columns
    total = tl.zeros((BLOCK_ROWS,), dtype=tl.int64)
    for start in range(0, columns, BLOCK_COLUMNS):
        column = start + tl.arange(0, BLOCK_COLUMNS)
        where = row_ok[:, None] & (column < columns)[None, :]
        value = tl.load(codes_ptr + base + column[None, :], mask=where, other=0)
        if SHIFT > 62:  # §3: rshr by more gives 0
            value = value * 0
        elif SHIFT > 0:
            value = (value + (1 << (SHIFT - 1))) >> SHIFT
        tl.store(digits_ptr + base + column[None, :], value.to(tl.int8), mask=where)
        total += tl.sum(value, axis=1)
    for head in tl.static_range(HEAD):
        kept = tl.load(head_ptr + head * rows + row, mask=row_ok, other=0)
        tl.store(rows_ptr + head * rows + row, kept, mask=row_ok)
    # int64 products wrap modulo 2^64, as the kernels' sums do.
    tl.store(rows_ptr + HEAD * rows + row, total * offset, mask=row_ok)
    if BIAS:  # apply_term's (h + v * m) >> n, then its clamp to +-2^60 where it can matter
        v = tl.load(bias_ptr + row, mask=row_ok, other=0)
        m = tl.load(term_ptr + row, mask=row_ok, other=0)
        h = tl.load(term_ptr + rows + row, mask=row_ok, other=0)
        n = tl.load(term_ptr + 2 * rows + row, mask=row_ok, other=0)
        term = (h + v * m) >> n
        if SATURATE:
            term = tl.minimum(tl.maximum(term, -LIMIT), LIMIT)
        term = tl.minimum(tl.maximum(term + add, low), high)
        tl.store(bias_out_ptr + row, term, mask=row_ok)


_launch_kernel = Launcher(_one_digit_operands_kernel)


def one_digit_operands(
    codes: Tensor,
    shift: int,
    offset: int,
    head: Tensor | None = None,
    bias: BiasTerm | None = None,
) -> OneDigitOperands:
    """One-digit operands of weight codes (rows, K), int64 on the kernels' device: the
    caller has checked that rshr(codes, shift) lies in [-128, 127] (for a checked weight
    range: reading the codes here would wait for the device). ``head`` (HEAD, rows) int64
    rows go before the correction row; ``bias``: also its value."""
    rows, columns = codes.shape
    if codes.dtype != torch.int64 or shift < 0:
        raise ValueError(f"expected int64 codes and a shift >= 0, got {codes.dtype}, {shift}")
    head = codes.new_empty(0, rows) if head is None else head.to(torch.int64).contiguous()
    if head.dim() != 2 or head.shape[1] != rows:
        raise ValueError(f"head rows must be (HEAD, {rows}), got {tuple(head.shape)}")
    if bias is not None and bias.codes.shape != (rows,):
        raise ValueError(f"a bias of {rows} codes was expected, got {tuple(bias.codes.shape)}")
    # A term the kernel cannot form is made by apply_term.
    on_kernel = bias if bias is not None and bias.channels is not None else None
    codes = codes.contiguous()
    digits = torch.empty(rows, columns, dtype=torch.int8, device=codes.device)
    out = codes.new_empty(head.shape[0] + 1, rows)
    bias_out = None if on_kernel is None else codes.new_empty(rows)
    if rows:
        if on_kernel is None:  # unread: any tensors and numbers in their places
            bias_codes, term, add, low, high, saturate = out, out, 0, 0, 0, False
        else:
            assert on_kernel.channels is not None
            bias_codes = on_kernel.codes.to(torch.int64).contiguous()
            term, saturate = on_kernel.channels.channels, on_kernel.channels.saturate
            add, low, high = on_kernel.add, on_kernel.low, on_kernel.high
        _launch_kernel(
            (ceil_div(rows, _BLOCK_ROWS), 1),
            (
                codes, head, digits, out, bias_codes, term,
                out if bias_out is None else bias_out, rows, columns, offset, add, low, high,
            ),
            dict(
                SHIFT=shift, HEAD=head.shape[0], BIAS=on_kernel is not None,
                SATURATE=saturate, LIMIT=TERM_LIMIT,
                BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLUMNS=_BLOCK_COLUMNS,
            ),
            _WARPS,
        )  # fmt: skip
    if bias is not None and bias_out is None:
        bias_out = bias.value(rows)
    return OneDigitOperands(digits, out, bias_out)


def one_digit_operands_reference(
    codes: Tensor,
    shift: int,
    offset: int,
    head: Tensor | None = None,
    bias: BiasTerm | None = None,
) -> OneDigitOperands:
    """one_digit_operands in plain PyTorch (the bias by apply_term)."""
    value = rounding_right_shift(codes.to(torch.int64), shift)
    correction = (value.sum(dim=1) * offset)[None]
    rows = correction if head is None else torch.cat([head.to(torch.int64), correction])
    bias_out = None if bias is None else bias.value(codes.shape[0])
    return OneDigitOperands(value.to(torch.int8).contiguous(), rows.contiguous(), bias_out)
