"""The integer tile kernel's recurrent product (integer_kernel.py): Σ_k R[g*H + i, k] y[b, k]
for the three gates g of a program's (rows, units), exact in int64 (modulo 2^64), on the int8
matrix cores from the state's digit planes (y, the offset state, in the double buffer) and R's
digits (integer_digits.py).

The gates go in one product of N = 4 BH (gru_forward._gate_columns' columns, a fourth gate of
zeros) or one product each (integer_plans.merged_gates says which); R's slice is read every
step or kept on chip (resident, one digit each); one digit each sums in int32 over all of K,
several digits weight each digit product by 256^(i + j) in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quant_gru.kernels.triton.gru_forward import _split_gates, _weight_tile


@triton.jit
def _digit_chunk(planes, digit, rows, row_ok, k0, batch, hidden, BK: tl.constexpr):
    """Columns [k0, k0 + BK) of this program's rows of one digit plane (B, H) of the state
    (zeros past the batch and past H), read from L2 where the other programs stored them."""
    ks = k0 + tl.arange(0, BK)
    return tl.load(
        planes + digit * batch * hidden + rows[:, None] * hidden + ks[None, :],
        mask=row_ok[:, None] & (ks < hidden)[None, :],
        other=0,
        cache_modifier=".cg",
    )


@triton.jit
def _weight_digits(digits_ptr, digit, r_rows, column_ok, k0, hidden, BK: tl.constexpr):
    """Rows [k0, k0 + BK) of one digit of R^T at the rows of R ``r_rows``: those
    gru_forward._gate_columns gives ((BK, 4 BH) int8), or one gate's ((BK, BH))."""
    return _weight_tile(digits_ptr + digit * 3 * hidden * hidden, r_rows, column_ok, k0, hidden, BK)


@triton.jit
def _recurrent_sums(
    planes, digits_ptr, rows, row_ok, r_rows, column_ok, batch, hidden,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
    H_DIGITS: tl.constexpr, R_DIGITS: tl.constexpr, MERGED: tl.constexpr,
):  # fmt: skip
    """Σ_k R[g*H + i, k] y[b, k] for the three gates g, in int64 (modulo 2^64), from the digit
    planes of y (the offset state) and the digits of R. MERGED: the gates in one product of
    N = 4 BH at _gate_columns' ``r_rows``; else a product a gate, ``r_rows`` gate r's rows of
    R (the units) and ``column_ok`` the units' mask."""
    if MERGED:
        sum_r, sum_z, sum_n = _merged_sums(
            planes, digits_ptr, rows, row_ok, r_rows, column_ok, batch, hidden,
            BB, BH, BK, H_DIGITS, R_DIGITS,
        )  # fmt: skip
    else:
        sum_r, sum_z, sum_n = _sums_by_gate(
            planes, digits_ptr, rows, row_ok, r_rows, column_ok, batch, hidden,
            BB, BH, BK, H_DIGITS, R_DIGITS,
        )  # fmt: skip
    return sum_r, sum_z, sum_n


@triton.jit
def _merged_sums(
    planes, digits_ptr, rows, row_ok, r_rows, column_ok, batch, hidden,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
    H_DIGITS: tl.constexpr, R_DIGITS: tl.constexpr,
):  # fmt: skip
    """_recurrent_sums' three gates from one product of N = 4 BH."""
    if H_DIGITS * R_DIGITS == 1:
        # One digit each: int32 sums over all of K are exact (integer_digits.MAX_PRODUCT_TERMS).
        acc = tl.zeros((BB, 4 * BH), dtype=tl.int32)
        for k0 in range(0, hidden, BK):
            y = _digit_chunk(planes, 0, rows, row_ok, k0, batch, hidden, BK)
            w = _weight_digits(digits_ptr, 0, r_rows, column_ok, k0, hidden, BK)
            acc = tl.dot(y, w, acc, out_dtype=tl.int32)
        sums = acc.to(tl.int64)
    else:
        # Several digits: each chunk's digit products are exact in int32 and weighted by
        # 256^(i + j) in int64.
        sums = tl.zeros((BB, 4 * BH), dtype=tl.int64)
        for k0 in range(0, hidden, BK):
            for i in tl.static_range(H_DIGITS):
                y = _digit_chunk(planes, i, rows, row_ok, k0, batch, hidden, BK)
                for j in tl.static_range(R_DIGITS):
                    w = _weight_digits(digits_ptr, j, r_rows, column_ok, k0, hidden, BK)
                    sums += tl.dot(y, w, out_dtype=tl.int32).to(tl.int64) << (8 * (i + j))
    return _split_gates(sums, BB, BH)


@triton.jit
def _sums_by_gate(
    planes, digits_ptr, rows, row_ok, r_rows, unit_ok, batch, hidden,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
    H_DIGITS: tl.constexpr, R_DIGITS: tl.constexpr,
):  # fmt: skip
    """_recurrent_sums' three gates from a product each, of the same state chunk: gate r at
    R's rows ``r_rows``, z's H and n's 2H on."""
    z_rows = r_rows + hidden
    n_rows = r_rows + 2 * hidden
    if H_DIGITS * R_DIGITS == 1:
        acc_r = tl.zeros((BB, BH), dtype=tl.int32)
        acc_z = tl.zeros((BB, BH), dtype=tl.int32)
        acc_n = tl.zeros((BB, BH), dtype=tl.int32)
        for k0 in range(0, hidden, BK):
            y = _digit_chunk(planes, 0, rows, row_ok, k0, batch, hidden, BK)
            w_r = _weight_digits(digits_ptr, 0, r_rows, unit_ok, k0, hidden, BK)
            w_z = _weight_digits(digits_ptr, 0, z_rows, unit_ok, k0, hidden, BK)
            w_n = _weight_digits(digits_ptr, 0, n_rows, unit_ok, k0, hidden, BK)
            acc_r = tl.dot(y, w_r, acc_r, out_dtype=tl.int32)
            acc_z = tl.dot(y, w_z, acc_z, out_dtype=tl.int32)
            acc_n = tl.dot(y, w_n, acc_n, out_dtype=tl.int32)
        sum_r = acc_r.to(tl.int64)
        sum_z = acc_z.to(tl.int64)
        sum_n = acc_n.to(tl.int64)
    else:
        sum_r = tl.zeros((BB, BH), dtype=tl.int64)
        sum_z = tl.zeros((BB, BH), dtype=tl.int64)
        sum_n = tl.zeros((BB, BH), dtype=tl.int64)
        for k0 in range(0, hidden, BK):
            for i in tl.static_range(H_DIGITS):
                y = _digit_chunk(planes, i, rows, row_ok, k0, batch, hidden, BK)
                for j in tl.static_range(R_DIGITS):
                    w_r = _weight_digits(digits_ptr, j, r_rows, unit_ok, k0, hidden, BK)
                    w_z = _weight_digits(digits_ptr, j, z_rows, unit_ok, k0, hidden, BK)
                    w_n = _weight_digits(digits_ptr, j, n_rows, unit_ok, k0, hidden, BK)
                    sum_r += tl.dot(y, w_r, out_dtype=tl.int32).to(tl.int64) << (8 * (i + j))
                    sum_z += tl.dot(y, w_z, out_dtype=tl.int32).to(tl.int64) << (8 * (i + j))
                    sum_n += tl.dot(y, w_n, out_dtype=tl.int32).to(tl.int64) << (8 * (i + j))
    return sum_r, sum_z, sum_n


@triton.jit
def _resident_sums(
    planes, w_all, rows, row_ok, batch, hidden,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, CHUNKS: tl.constexpr,
    MERGED: tl.constexpr,
):  # fmt: skip
    """_recurrent_sums from R's slice kept on chip, one digit each: _resident_tiles' tiles
    (MERGED), or a tuple of them a gate."""
    if MERGED:
        acc = tl.zeros((BB, 4 * BH), dtype=tl.int32)
        for chunk in tl.static_range(CHUNKS):
            y = _digit_chunk(planes, 0, rows, row_ok, chunk * BK, batch, hidden, BK)
            acc = tl.dot(y, w_all[chunk], acc, out_dtype=tl.int32)
        sum_r, sum_z, sum_n = _split_gates(acc.to(tl.int64), BB, BH)
    else:
        acc_r = tl.zeros((BB, BH), dtype=tl.int32)
        acc_z = tl.zeros((BB, BH), dtype=tl.int32)
        acc_n = tl.zeros((BB, BH), dtype=tl.int32)
        for chunk in tl.static_range(CHUNKS):
            y = _digit_chunk(planes, 0, rows, row_ok, chunk * BK, batch, hidden, BK)
            acc_r = tl.dot(y, w_all[0][chunk], acc_r, out_dtype=tl.int32)
            acc_z = tl.dot(y, w_all[1][chunk], acc_z, out_dtype=tl.int32)
            acc_n = tl.dot(y, w_all[2][chunk], acc_n, out_dtype=tl.int32)
        sum_r = acc_r.to(tl.int64)
        sum_z = acc_z.to(tl.int64)
        sum_n = acc_n.to(tl.int64)
    return sum_r, sum_z, sum_n
