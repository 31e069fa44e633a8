"""The integer GRU's recurrence on row programs, for small batches (reference/README.md §7): the
float row kernel's plan and hand-over (gru_forward.py, plans.py), integer_kernel.py's step.

Program (i, j) owns BB batch rows and hidden units [j*BH, (j+1)*BH) of all three gates, and
holds its rows of R (one digit, int8 widened to int32) in registers for every step. The
recurrent product is a broadcast multiply and a sum over K on the CUDA cores: exact int32
sums of one-digit products (integer_digits.MAX_PRODUCT_TERMS), no shared-memory staging for
the matrix instructions. Programs hand the state's digits to each other as tagged words
(sync.py: no barrier; a reader waits only for the words it reads), or, where one program
holds every unit (SINGLE), keep it.

Models whose state or R takes more than one digit, and traced runs, take integer_kernel.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quant_gru.kernels.triton.gru_forward import (
    _lengths,
    _program_tile,
    _step_time,
    _weight_chunk,
)
from quant_gru.kernels.triton.integer_kernel import (
    _carried,
    _channel_constants,
    _gru_step,
    _initial_state,
    _output,
    _state_digit,
    _wx_step,
)
from quant_gru.kernels.triton.qat_save import _qat_channels, _save_place
from quant_gru.kernels.triton.sync import _await_bits, _publish_bits


@triton.jit
def _word_rows(words_ptr, gate, units, unit_ok, hidden, BK: tl.constexpr):
    """R_gate^T's rows for this program's units as words of four digits of K:
    (1, BK / 4, BH) int32 (zeros past H)."""
    quarter = hidden // 4
    ks = tl.arange(0, BK // 4)
    offsets = gate * hidden * quarter + units[None, :] * quarter + ks[:, None]
    mask = (ks < quarter)[:, None] & unit_ok[None, :]
    return tl.load(words_ptr + offsets, mask=mask, other=0)[None, :, :]


@triton.jit
def _pack(digits, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    """(ROWS, COLUMNS) int32 digits as (ROWS, COLUMNS / 4) words, four digits a word, the
    first in the lowest byte (integer_constants.packed_words)."""
    parts = tl.reshape(digits & 0xFF, (ROWS, COLUMNS // 4, 4))
    shifts = tl.arange(0, 4) * 8
    return tl.sum(parts << shifts[None, None, :], axis=2)


@triton.jit
def _dot4(a, b, COMPILED: tl.constexpr):
    """Σ over the four bytes of a_i * b_i (signed), per element: dp4a on a GPU; shifts and
    products under the interpreter (no inline assembly)."""
    if COMPILED:
        result = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;",
            "=r,r,r,r",
            [a, b, tl.zeros_like(a)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        result = tl.zeros_like(a)
        for byte in tl.static_range(4):
            result += ((a << (24 - 8 * byte)) >> 24) * ((b << (24 - 8 * byte)) >> 24)
    return result


@triton.jit
def _publish_state(
    words_ptr, h, rows, row_ok, units, width, C: tl.constexpr, tag,
    BB: tl.constexpr, BH: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """Publish this program's (BB, BH) block of the state's digits, tagged: a word a digit,
    or (PACKED) a word per four units."""
    digits = _state_digit(h, C)
    if PACKED:
        columns = tl.program_id(1) * (BH // 4) + tl.arange(0, BH // 4)
        mask = row_ok[:, None] & (columns < width)[None, :]
        offsets = rows[:, None] * width + columns[None, :]
        _publish_bits(words_ptr, offsets, mask, _pack(digits, BB, BH), tag)
    else:
        mask = row_ok[:, None] & (units < width)[None, :]
        _publish_bits(words_ptr, rows[:, None] * width + units[None, :], mask, digits, tag)


@triton.jit
def _integer_gru_row_kernel(
    wx_ptr,  # (T, B, 3H): matmul.Wx's codes
    digits_ptr,  # (1, 3H, H) int8: R (operand-shifted), one digit; PACKED: (3H, H/4) int32 words
    rh_ptr,  # (3, 3H) int64: as integer_kernel's
    rb_bias_ptr,  # (3H,) int64
    tables,  # (3, 513) int64
    h0_ptr,  # (B, H) int64, zero-corrected
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, ·) rows of out_stride, as integer_kernel's
    h_n_ptr,  # (B, H)
    scale_ptr,  # (1,) float64 (OUT_FLOAT)
    words_ptr,  # (2, B, H) int64, zeros: the state's digits tagged with their step (not
    # SINGLE); PACKED: (2, B, H/4), four digits a word
    qat_ptr,  # as integer_kernel's (SAVE only)
    qat_bias_ptr,
    save_ptr,
    mask_ptr,
    steps,
    batch,
    hidden,
    out_stride,
    REVERSE: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,  # padded H: the program's R^T slice (3, BK, BH) stays in registers
    SINGLE: tl.constexpr,  # the program holds every unit (BH == BK): the state stays here
    HAS_LENGTHS: tl.constexpr,
    NARROW: tl.constexpr,
    C: tl.constexpr,  # KernelConstants.specialization
    OUT_FLOAT: tl.constexpr,
    PACKED: tl.constexpr,  # H and BH multiples of 4: products of four digits at a time (dp4a)
    COMPILED: tl.constexpr,  # False under TRITON_INTERPRET=1
    SAVE: tl.constexpr = False,  # as integer_kernel's
    ROUND: tl.constexpr = 0,
    HAS_H0: tl.constexpr = True,  # else the state starts at zero (h0_ptr unread)
):
    rows, units, row_ok, unit_ok, own, own_offsets = _program_tile(batch, hidden, BB, BH)
    length = _lengths(lengths_ptr, rows, row_ok, steps, BB, HAS_LENGTHS)
    h = _carried(_initial_state(h0_ptr, own_offsets, own, HAS_H0), NARROW)
    channels = _channel_constants(rh_ptr, rb_bias_ptr, units, unit_ok, hidden, C, NARROW)
    qat_channels = _qat_channels(qat_ptr, qat_bias_ptr, units, unit_ok, hidden, SAVE)
    if PACKED:
        width = hidden // 4  # the state's words a row
        w_r = _word_rows(digits_ptr, 0, units, unit_ok, hidden, BK)
        w_z = _word_rows(digits_ptr, 1, units, unit_ok, hidden, BK)
        w_n = _word_rows(digits_ptr, 2, units, unit_ok, hidden, BK)
        ks = tl.arange(0, BK // 4)
        state_mask = row_ok[:, None] & (ks < width)[None, :]
    else:
        width = hidden
        w_r, w_z, w_n = _weight_chunk(digits_ptr, units, unit_ok, 0, hidden, BK)
        w_r = w_r.to(tl.int32)[None, :, :]  # (1, BK, BH) against the state's (BB, BK, 1)
        w_z = w_z.to(tl.int32)[None, :, :]
        w_n = w_n.to(tl.int32)[None, :, :]
        ks = tl.arange(0, BK)
        state_mask = row_ok[:, None] & (ks < width)[None, :]
    plane = batch * width
    state_offsets = rows[:, None] * width + ks[None, :]
    if not SINGLE:
        _publish_state(words_ptr, h, rows, row_ok, units, width, C, 1, BB, BH, PACKED)

    # matmul.Wx's codes are loaded a step ahead: their latency hides behind the step before.
    wx_rows = wx_ptr + rows[:, None] * (3 * hidden) + units[None, :]
    wx_r, wx_z, wx_n = _wx_step(wx_rows, steps - 1 if REVERSE else 0, batch, hidden, own, C, NARROW)

    for step in range(steps):
        t, t_next = _step_time(step, steps, REVERSE)
        next_r, next_z, next_n = _wx_step(wx_rows, t_next, batch, hidden, own, C, NARROW)
        if SINGLE:  # the units past H meet rows of R that are zero
            y = _state_digit(h, C)
            if PACKED:
                y = _pack(y, BB, BK)
        else:
            source = words_ptr + (step % 2) * plane
            y = _await_bits(source, state_offsets, state_mask, step + 1, COMPILED)
        y = y[:, :, None]  # (BB, K, 1) against R^T's (1, K, BH)
        if PACKED:
            sum_r = tl.sum(_dot4(y, w_r, COMPILED), axis=1).to(tl.int64)
            sum_z = tl.sum(_dot4(y, w_z, COMPILED), axis=1).to(tl.int64)
            sum_n = tl.sum(_dot4(y, w_n, COMPILED), axis=1).to(tl.int64)
        else:
            sum_r = tl.sum(y * w_r, axis=1).to(tl.int64)
            sum_z = tl.sum(y * w_z, axis=1).to(tl.int64)
            sum_n = tl.sum(y * w_n, axis=1).to(tl.int64)
        save = _save_place(
            SAVE, save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat_ptr, qat_channels
        )
        values = _gru_step(
            sum_r, sum_z, sum_n, wx_r, wx_z, wx_n, h, channels, C, tables, NARROW, SAVE, save,
            ROUND,
        )  # fmt: skip
        h_new = values[15]

        active = (t < length)[:, None]
        out = out_ptr + (t * batch + rows[:, None]) * out_stride + units[None, :]
        tl.store(out, _output(tl.where(active, h_new, 0), scale_ptr, out_ptr, OUT_FLOAT), mask=own)
        h = tl.where(active, h_new, h)
        wx_r, wx_z, wx_n = next_r, next_z, next_n
        if not SINGLE:
            target = words_ptr + ((step + 1) % 2) * plane
            _publish_state(target, h, rows, row_ok, units, width, C, step + 2, BB, BH, PACKED)

    tl.store(h_n_ptr + own_offsets, _output(h, scale_ptr, h_n_ptr, OUT_FLOAT), mask=own)
