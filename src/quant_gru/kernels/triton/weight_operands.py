"""A weight's one-digit operands on one kernel: from its codes (rows, K), the operand-shifted
codes rshr(q, e) as int8 digits (and as int64 where asked), and the offset correction
o * rowsum (integer_digits.py) after given head rows: what the integer kernels read of W and R.

The plain-PyTorch reference is ``one_digit_operands_reference`` (rounding_right_shift,
``.to(torch.int8)``, ``sum(dim=1) * o``, ``torch.cat``): six or seven small operations a weight,
each a launch on a GPU, made again after every weight update in QAT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.torch.quant_gru import rounding_right_shift
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div

__all__ = ["OneDigitOperands", "one_digit_operands", "one_digit_operands_reference"]

_BLOCK_ROWS = 16
_BLOCK_COLUMNS = 128
_WARPS = 4


@dataclass(frozen=True)
class OneDigitOperands:
    digits: Tensor  # (rows, K) int8: rshr(q, shift), each within [-128, 127]
    shifted: Tensor | None  # (rows, K) int64: the same values, where asked for
    rows: Tensor  # (HEAD + 1, rows) int64: the head rows, then o * rowsum(digits) mod 2^64


@triton.jit
def _one_digit_operands_kernel(
    codes_ptr,  # (rows, columns) int64: the weight's codes
    head_ptr,  # (HEAD, rows) int64: copied to the first HEAD rows of rows_ptr
    digits_ptr,  # (rows, columns) int8 out
    shifted_ptr,  # (rows, columns) int64 out (SHIFTED)
    rows_ptr,  # (HEAD + 1, rows) int64 out
    rows,
    columns,
    offset,
    SHIFT: tl.constexpr,
    HEAD: tl.constexpr,
    SHIFTED: tl.constexpr,
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
        if SHIFTED:
            tl.store(shifted_ptr + base + column[None, :], value, mask=where)
        total += tl.sum(value, axis=1)
    for head in tl.static_range(HEAD):
        kept = tl.load(head_ptr + head * rows + row, mask=row_ok, other=0)
        tl.store(rows_ptr + head * rows + row, kept, mask=row_ok)
    # int64 products wrap modulo 2^64, as the kernels' sums do.
    tl.store(rows_ptr + HEAD * rows + row, total * offset, mask=row_ok)


_launch_kernel = Launcher(_one_digit_operands_kernel)


def one_digit_operands(
    codes: Tensor, shift: int, offset: int, head: Tensor | None = None, shifted: bool = False
) -> OneDigitOperands:
    """One-digit operands of weight codes (rows, K), int64 on the kernels' device: the
    caller has checked that rshr(codes, shift) lies in [-128, 127] (for a checked weight
    range: reading the codes here would wait for the device). ``head`` (HEAD, rows) int64
    rows go before the correction row; ``shifted``: also the shifted codes in int64."""
    rows, columns = codes.shape
    if codes.dtype != torch.int64 or shift < 0:
        raise ValueError(f"expected int64 codes and a shift >= 0, got {codes.dtype}, {shift}")
    head = codes.new_empty(0, rows) if head is None else head.to(torch.int64).contiguous()
    if head.dim() != 2 or head.shape[1] != rows:
        raise ValueError(f"head rows must be (HEAD, {rows}), got {tuple(head.shape)}")
    codes = codes.contiguous()
    digits = torch.empty(rows, columns, dtype=torch.int8, device=codes.device)
    wide = torch.empty_like(codes) if shifted else None
    out = codes.new_empty(head.shape[0] + 1, rows)
    if rows:
        _launch_kernel(
            (ceil_div(rows, _BLOCK_ROWS), 1),
            (codes, head, digits, digits if wide is None else wide, out, rows, columns, offset),
            dict(
                SHIFT=shift, HEAD=head.shape[0], SHIFTED=shifted,
                BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLUMNS=_BLOCK_COLUMNS,
            ),
            _WARPS,
        )  # fmt: skip
    return OneDigitOperands(digits, wide, out)


def one_digit_operands_reference(
    codes: Tensor, shift: int, offset: int, head: Tensor | None = None, shifted: bool = False
) -> OneDigitOperands:
    """one_digit_operands in plain PyTorch."""
    value = rounding_right_shift(codes.to(torch.int64), shift)
    correction = (value.sum(dim=1) * offset)[None]
    rows = correction if head is None else torch.cat([head.to(torch.int64), correction])
    return OneDigitOperands(
        value.to(torch.int8).contiguous(), value if shifted else None, rows.contiguous()
    )
