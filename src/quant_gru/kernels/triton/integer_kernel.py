"""A persistent Triton kernel for the recurrence of the integer GRU (reference/README.md §7),
one layer and one direction, every time step in one launch.

Program (i, j) owns batch rows [i*BB, (i+1)*BB) and hidden units [j*BH, (j+1)*BH) of all three
gates. Each step it multiplies the whole previous state of its rows by its rows of R on the int8
matrix cores (integer_products.py; integer_digits.py: both in balanced base-256 digits, exact
int32 sums combined in int64), then evaluates every operator of §7 for its units in int64,
exactly as §3 to §6 define them, and hands its part of the new state to the other programs of
its batch tile as digits through a global double buffer and a barrier (sync.py).

Values are carried zero-corrected (q - zp): §5 then reads clamp(t_1 + ... + t_J, qmin - zp,
qmax - zp). The input projection's terms of every step come from the host (integer_gru.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from quant_gru.kernels.triton.gru_forward import _gate_columns, _resident_tiles, _step_time
from quant_gru.kernels.triton.integer_layout import (
    H_DIGIT_OFFSET,
    H_OPERAND_SHIFT,
    RANGE_G_PRE,
    RANGE_H,
    RANGE_NEW,
    RANGE_OLD,
    RANGE_R_PRE,
    RANGE_RB,
    RANGE_RH,
    RANGE_RRH,
    RANGE_Z_PRE,
    RH_PRE_SHIFT,
    RH_SHIFT,
    SHIFTS_OLD,
    SHIFTS_RRH,
    SHIFTS_ZG,
    TABLE_G,
    TABLE_R,
    TABLE_Z,
    TERM_G_FROM_RRH,
    TERM_G_FROM_WX,
    TERM_H_FROM_NEW,
    TERM_H_FROM_OLD,
    TERM_NEW_FROM_G,
    TERM_NEW_FROM_ZG,
    TERM_OLD,
    TERM_R_FROM_RB,
    TERM_R_FROM_WX,
    TERM_RB_FROM_RH,
    TERM_RRH,
    TERM_Z_FROM_RB,
    TERM_Z_FROM_WX,
    WX_ZERO_POINT,
)
from quant_gru.kernels.triton.integer_products import _recurrent_sums, _resident_sums
from quant_gru.kernels.triton.qat_save import (
    _qat_channels,
    _save_gates,
    _save_place,
    _save_recurrent,
    _save_state,
)
from quant_gru.kernels.triton.sync import _barrier

_TERM_BOUND = tl.constexpr(2**60)  # §4: every term saturates to [-2^60, 2^60]
_TERM_BITS = tl.constexpr(60)
_LONGEST_SHIFT = tl.constexpr(62)  # §3: shifts of 63 or more give 0
_SEGMENTS = tl.constexpr(512)  # §6: N


@triton.jit
def _rshr(v, n):
    """§3: floor((v + 2^(n-1)) / 2^n) for n >= 1, v for n = 0, 0 for n >= 63 (|v| < 2^62);
    ``n`` a tensor (per-channel shifts)."""
    n = n.to(tl.int64)
    shift = tl.minimum(tl.maximum(n, 1), _LONGEST_SHIFT)
    one = tl.full(shift.shape, 1, tl.int64)
    rounded = (v + (one << (shift - 1))) >> shift
    result = tl.where(n == 0, v, rounded)
    return tl.where(n > _LONGEST_SHIFT, 0, result)


@triton.jit
def _shift_right(v, N: tl.constexpr):
    """§3's rshr by the constant N (an immediate shift)."""
    if N == 0:
        result = v
    elif N > _LONGEST_SHIFT:
        result = v * 0
    else:
        result = (v.to(tl.int64) + (1 << (N - 1))) >> N
    return result


@triton.jit
def _saturated(x, N: tl.constexpr):
    """§4's term from x = v' * m and its shift N: rshr by N >= 0, else the saturated left shift
    clamp(x * 2^-N, -2^60, 2^60) without overflow; then the clamp to +-2^60."""
    if N >= 0:
        t = _shift_right(x, N)
    else:
        left: tl.constexpr = min(-N, 60)
        limit: tl.constexpr = 2**60 >> left
        t = tl.minimum(tl.maximum(x, -limit), limit) << left
    return tl.minimum(tl.maximum(t, -_TERM_BOUND), _TERM_BOUND)


@triton.jit
def _term(v, C: tl.constexpr, TERM: tl.constexpr, NARROW: tl.constexpr):
    """§4: the term t = clamp(rshr(rshr(v, p) * m, n), -2^60, 2^60) of v with the constants
    (m, n, p) at ``TERM`` of the specialization C (n <= 0: the saturated left shift).
    NARROW: v is int32, p = 0, 1 <= n <= 62 and |t| < 2^60 (KernelConstants.narrow), so the
    term is one widening multiply and a rounding shift. Returns int64, int32 where NARROW is 2
    (|t| < 2^29)."""
    if NARROW:
        t = _shift_right(v.to(tl.int64) * C[TERM], C[TERM + 1])
    else:
        t = _saturated(_shift_right(v.to(tl.int64), C[TERM + 2]) * C[TERM], C[TERM + 1])
    return _carried(t, NARROW)


@triton.jit
def _carried(v, NARROW: tl.constexpr):
    """A value as the kernel carries it: int32 where NARROW is 2 (SHORT: every value and term
    below 2^29, KernelConstants.narrow), else int64."""
    if NARROW == 2:  # noqa: SIM108  (a constexpr branch)
        result = v.to(tl.int32)
    else:
        result = v.to(tl.int64)
    return result


@triton.jit
def _initial_state(h0_ptr, offsets, own, HAS_H0: tl.constexpr):
    """The zero-corrected initial state of the program's (rows, units): h0's, or 0 (the code
    of a zero state is the zero point) without reading h0."""
    if HAS_H0:
        h = tl.load(h0_ptr + offsets, mask=own, other=0)
    else:
        h = tl.zeros(offsets.shape, dtype=tl.int64)
    return h


@triton.jit
def _channel_term(v, m, n, P: tl.constexpr, NARROW: tl.constexpr):
    """§4's term of v with per-channel multipliers ``m`` and shifts ``n`` (tensors that
    broadcast against v) and the pre-shift P; NARROW as in _term. Returns int64."""
    if NARROW:
        t = _rshr(v.to(tl.int64) * m, n)
    else:
        x = _shift_right(v.to(tl.int64), P) * m
        right = _rshr(x, tl.maximum(n, 0))
        left = tl.minimum(tl.maximum(-n, 0), _TERM_BITS).to(tl.int64)
        bound = tl.full(left.shape, 1, tl.int64) << _TERM_BITS
        limit = bound >> left  # 2^(60 - left)
        saturated = tl.minimum(tl.maximum(x, -limit), limit) << left
        t = tl.where(n >= 0, right, saturated)
        t = tl.minimum(tl.maximum(t, -bound), bound)
    return t


@triton.jit
def _clamp(v, C: tl.constexpr, RANGE: tl.constexpr):
    """§5's clamp of a sum of terms to the operator's zero-corrected code range at ``RANGE``
    of C. (Values stay int64 even where they fit 32 bits: casts between the widths cost
    more instructions than they save.)"""
    return tl.minimum(tl.maximum(v, C[RANGE]), C[RANGE + 1])


@triton.jit
def _activation(
    pre, C: tl.constexpr, tables, TABLE: tl.constexpr, INDEX: tl.constexpr, NARROW: tl.constexpr
):
    """§6: the table at ``TABLE`` of C (its knots: row INDEX of ``tables``) on zero-corrected
    pre-activations; returns zero-corrected outputs (int32 where NARROW is 2: the host checked
    that the interpolation fits)."""
    k: tl.constexpr = C[TABLE + 1]
    knots = tables + INDEX * (_SEGMENTS + 1)
    span: tl.constexpr = 512 << k
    d = tl.minimum(tl.maximum(_carried(pre, NARROW) + (C[TABLE + 2] - C[TABLE]), 0), span)
    j = d >> k
    r = d - (j << k)
    low = _carried(tl.load(knots + j), NARROW)
    high = _carried(tl.load(knots + tl.minimum(j + 1, _SEGMENTS)), NARROW)
    rise = (high - low) * r
    if k > 0:
        rise = (rise + (1 << (k - 1))) >> k  # §3's rshr, in the carried type
    return low + rise - C[TABLE + 3]


@triton.jit
def _product(a, c, C: tl.constexpr, SHIFTS: tl.constexpr, NARROW: tl.constexpr):
    """The integer a * c of a product term, from operands pre-shifted by (e_a, e_c) (§4);
    NARROW: no shifts, and the product fits int32."""
    if NARROW:  # noqa: SIM108  (a constexpr branch)
        product = a * c
    else:
        product = _shift_right(a, C[SHIFTS]) * _shift_right(c, C[SHIFTS + 1])
    return product


@triton.jit
def _channel(ptr, gate, units, unit_ok, hidden):
    """Gate ``gate``'s per-channel int64 constants for this program's units, as a (1, BH) row."""
    return tl.load(ptr + gate * hidden + units, mask=unit_ok, other=0)[None, :]


@triton.jit
def _rh_term(sums, m, n, correction, C: tl.constexpr, NARROW: tl.constexpr):
    """matmul.Rh's term of one gate's recurrent product: the digit products' sums plus the
    offset's correction (exact modulo 2^64, and the true value is below 2^62; below 2^31 when
    NARROW), with each channel's multiplier ``m`` and shift: C's shared RH_SHIFT where there is
    one (``m`` scaled to it), else ``n``. The channel constants are (1, BH) rows."""
    v = sums + correction
    if NARROW:
        v = v.to(tl.int32)
    SHIFT: tl.constexpr = C[RH_SHIFT]
    if SHIFT >= 0:
        t = _saturated(_shift_right(v.to(tl.int64), C[RH_PRE_SHIFT]) * m, SHIFT)
    else:
        t = _channel_term(v, m, n, C[RH_PRE_SHIFT], NARROW)
    return _carried(t, NARROW)


@triton.jit
def _wx_step(wx_rows, t, batch, hidden, own, C: tl.constexpr, NARROW: tl.constexpr):
    """This program's zero-corrected matmul.Wx values of step ``t``, per gate."""
    step_rows = wx_rows + t * batch * 3 * hidden
    wx_r = _carried(tl.load(step_rows, mask=own, other=0), NARROW) - C[WX_ZERO_POINT]
    wx_z = _carried(tl.load(step_rows + hidden, mask=own, other=0), NARROW) - C[WX_ZERO_POINT]
    wx_n = _carried(tl.load(step_rows + 2 * hidden, mask=own, other=0), NARROW)
    return wx_r, wx_z, wx_n - C[WX_ZERO_POINT]


@triton.jit
def _bfloat16(value):
    """float32 to bfloat16, rounded to nearest even in integers (Triton's interpreter would
    truncate; the values are finite)."""
    bits = value.to(tl.uint32, bitcast=True)
    bits += ((bits >> 16) & 1) + 0x7FFF
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _output(v, scale_ptr, destination, OUT_FLOAT: tl.constexpr):
    """Zero-corrected values as stored: int64, or (OUT_FLOAT) dequantized in float64 and
    rounded to the destination's type through float32, as torch converts float64."""
    if OUT_FLOAT:
        value = (v.to(tl.float64) * tl.load(scale_ptr)).to(tl.float32)
        if destination.dtype.element_ty == tl.bfloat16:
            result = _bfloat16(value)
        else:
            result = value.to(destination.dtype.element_ty)
    else:
        result = v.to(tl.int64)
    return result


@triton.jit
def _store_digits(
    planes, own_offsets, own, h, C: tl.constexpr, batch, hidden, H_DIGITS: tl.constexpr
):
    """Store this program's part of the state as the digits of rshr(h, e_c) - o (§4's operand
    shift of matmul.Rh, then integer_digits' offset), one (B, H) int8 plane each."""
    y = _shift_right(h.to(tl.int64), C[H_OPERAND_SHIFT]) - C[H_DIGIT_OFFSET]
    for i in tl.static_range(H_DIGITS):
        digit = ((y + 128) & 255) - 128
        tl.store(planes + i * batch * hidden + own_offsets, digit.to(tl.int8), mask=own)
        y = (y - digit) >> 8


@triton.jit
def _channel_constants(
    rh_ptr, rb_bias_ptr, units, unit_ok, hidden, C: tl.constexpr, NARROW: tl.constexpr
):
    """This program's per-channel constants, (1, BH) rows per gate r, z, n: matmul.Rh's
    multipliers, its shifts (with C's shared shift: the multipliers again, unused), the digit
    offset's corrections, and op.Rh_add_br's term of weight.br (carried as the values are).
    Loaded once, for every step."""
    m_r = _channel(rh_ptr, 0, units, unit_ok, hidden)
    m_z = _channel(rh_ptr, 1, units, unit_ok, hidden)
    m_n = _channel(rh_ptr, 2, units, unit_ok, hidden)
    if C[RH_SHIFT] < 0:
        n_r = _channel(rh_ptr + 3 * hidden, 0, units, unit_ok, hidden)
        n_z = _channel(rh_ptr + 3 * hidden, 1, units, unit_ok, hidden)
        n_n = _channel(rh_ptr + 3 * hidden, 2, units, unit_ok, hidden)
    else:
        n_r = m_r
        n_z = m_z
        n_n = m_n
    c_r = _channel(rh_ptr + 6 * hidden, 0, units, unit_ok, hidden)
    c_z = _channel(rh_ptr + 6 * hidden, 1, units, unit_ok, hidden)
    c_n = _channel(rh_ptr + 6 * hidden, 2, units, unit_ok, hidden)
    b_r = _carried(_channel(rb_bias_ptr, 0, units, unit_ok, hidden), NARROW)
    b_z = _carried(_channel(rb_bias_ptr, 1, units, unit_ok, hidden), NARROW)
    b_n = _carried(_channel(rb_bias_ptr, 2, units, unit_ok, hidden), NARROW)
    return m_r, m_z, m_n, n_r, n_z, n_n, c_r, c_z, c_n, b_r, b_z, b_n


@triton.jit
def _gru_step(
    sum_r, sum_z, sum_n, wx_r, wx_z, wx_n, h, channels, C: tl.constexpr, tables,
    NARROW: tl.constexpr, SAVE: tl.constexpr = False, save=None, ROUND: tl.constexpr = 0,
):  # fmt: skip
    """Every operator of §7 after the recurrent product, for a block of units: from the
    recurrent sums (int64, before the offset's correction), matmul.Wx's values and the state
    (zero-corrected). Returns the 15 traced operators' values (integer_layout.TRACE_BLOCKS'
    order) and the new state, last. SAVE: stores what QAT's backward reads as the step goes
    (qat_save.py; ``save`` as its parts take it)."""
    m_r, m_z, m_n, n_r, n_z, n_n, c_r, c_z, c_n, b_r, b_z, b_n = channels
    # matmul.Rh and op.Rh_add_br, per gate (per-channel constants).
    rh_r = _clamp(_rh_term(sum_r, m_r, n_r, c_r, C, NARROW), C, RANGE_RH)
    rh_z = _clamp(_rh_term(sum_z, m_z, n_z, c_z, C, NARROW), C, RANGE_RH)
    rh_n = _clamp(_rh_term(sum_n, m_n, n_n, c_n, C, NARROW), C, RANGE_RH)
    if SAVE:
        _save_recurrent(save, (sum_r, sum_z, sum_n), channels, (rh_r, rh_z, rh_n), ROUND)
    rb_r = _clamp(_term(rh_r, C, TERM_RB_FROM_RH, NARROW) + b_r, C, RANGE_RB)
    rb_z = _clamp(_term(rh_z, C, TERM_RB_FROM_RH, NARROW) + b_z, C, RANGE_RB)
    rb_n = _clamp(_term(rh_n, C, TERM_RB_FROM_RH, NARROW) + b_n, C, RANGE_RB)

    # The gates, with matmul.Wx's values.
    r_pre = _term(wx_r, C, TERM_R_FROM_WX, NARROW)
    r_pre += _term(rb_r, C, TERM_R_FROM_RB, NARROW)
    r_pre = _clamp(r_pre, C, RANGE_R_PRE)
    z_pre = _term(wx_z, C, TERM_Z_FROM_WX, NARROW)
    z_pre += _term(rb_z, C, TERM_Z_FROM_RB, NARROW)
    z_pre = _clamp(z_pre, C, RANGE_Z_PRE)
    r = _activation(r_pre, C, tables, TABLE_R, 0, NARROW)
    z = _activation(z_pre, C, tables, TABLE_Z, 1, NARROW)
    rrh = _product(r, rb_n, C, SHIFTS_RRH, NARROW)
    rrh = _clamp(_term(rrh, C, TERM_RRH, NARROW), C, RANGE_RRH)
    if SAVE:
        z_value, z_slope = _save_gates(
            save, wx_r, wx_z, rb_r, rb_z, rb_n, r_pre, z_pre, r, z, rrh, ROUND
        )
    g_pre = _term(wx_n, C, TERM_G_FROM_WX, NARROW)
    g_pre += _term(rrh, C, TERM_G_FROM_RRH, NARROW)
    g_pre = _clamp(g_pre, C, RANGE_G_PRE)
    g = _activation(g_pre, C, tables, TABLE_G, 2, NARROW)

    # The new state: old = z * h, new = g - z * g, h' = old + new.
    old = _product(z, h, C, SHIFTS_OLD, NARROW)
    old = _clamp(_term(old, C, TERM_OLD, NARROW), C, RANGE_OLD)
    zg = -_product(z, g, C, SHIFTS_ZG, NARROW)
    new = _term(g, C, TERM_NEW_FROM_G, NARROW)
    new += _term(zg, C, TERM_NEW_FROM_ZG, NARROW)
    new = _clamp(new, C, RANGE_NEW)
    h_new = _term(old, C, TERM_H_FROM_OLD, NARROW)
    h_new += _term(new, C, TERM_H_FROM_NEW, NARROW)
    h_new = _clamp(h_new, C, RANGE_H)
    if SAVE:
        _save_state(save, wx_n, rrh, g_pre, g, old, new, h, z_value, z_slope, ROUND)
    return rh_r, rh_z, rh_n, rb_r, rb_z, rb_n, r_pre, z_pre, r, z, rrh, g_pre, g, old, new, h_new


@triton.jit
def _state_digit(h, C: tl.constexpr):
    """The one-digit operand of matmul.Rh of state values: rshr(h, e_c) - o, int32."""
    return (_shift_right(h.to(tl.int64), C[H_OPERAND_SHIFT]) - C[H_DIGIT_OFFSET]).to(tl.int32)


@triton.jit
def _integer_gru_kernel(
    wx_ptr,  # (T, B, 3H): matmul.Wx's codes, in the narrowest integer type that holds them
    digits_ptr,  # (R_DIGITS, 3H, H) int8: R (operand-shifted) in digits
    rh_ptr,  # (3, 3H) int64: matmul.Rh's m and n per channel, and o * rowsum(R) mod 2^64
    rb_bias_ptr,  # (3H,) int64: op.Rh_add_br's term of weight.br
    tables,  # (3, 513) int64: the knots of gate.r_out, gate.z_out, gate.g_out
    h0_ptr,  # (B, H) int64, zero-corrected
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, ·) rows of out_stride: zero-corrected outputs (0 at padded steps), int64
    h_n_ptr,  # (B, H): the final state, int64 (OUT_FLOAT: both dequantized, in their type)
    scale_ptr,  # (1,) float64: output.h's scale (OUT_FLOAT)
    trace_ptr,  # (T, B, 15H) int64 (TRACE only; integer_layout.TRACE_BLOCKS)
    qat_ptr,  # float32: qat_save.qat_constants (SAVE only)
    qat_bias_ptr,  # (3H,) the model's type: weight.br's values (SAVE only)
    save_ptr,  # (T, B, 5H) float32: QAT's coefficients (SAVE only; qat_save.py)
    mask_ptr,  # (T, B, H) int8: QAT's recurrent masks (SAVE only)
    exchange_ptr,  # (2, H_DIGITS, B, H) int8: the state's digits, double-buffered
    counter_ptr,  # (number of batch tiles,) int32, zeros
    steps,
    batch,
    hidden,
    out_stride,  # elements from one (step, row) of the outputs to the next
    row_start,  # this launch's rows: [row_start, row_end)
    row_end,
    REVERSE: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    H_DIGITS: tl.constexpr,
    R_DIGITS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    TRACE: tl.constexpr,
    NARROW: tl.constexpr,  # KernelConstants.narrow: 1 int32 values, plain terms; 2 all int32
    RESIDENT: tl.constexpr,  # one digit each: R's slice is loaded once, before the time loop
    CHUNKS: tl.constexpr,  # RESIDENT: CHUNKS * BK covers H
    C: tl.constexpr,  # the specialization: integer_layout's constants (KernelConstants)
    OUT_FLOAT: tl.constexpr,  # outputs and final state as floats s * (q - zp) (quantize.scales)
    HAS_H0: tl.constexpr = True,  # else the state starts at zero (h0_ptr unread)
    SAVE: tl.constexpr = False,  # store what QAT's backward reads (qat_save.py)
    ROUND: tl.constexpr = 0,  # SAVE: the model's type (qat_save.rounding)
    MERGED: tl.constexpr = True,  # the gates in one product (integer_plans.merged_gates)
):
    rows = row_start + tl.program_id(0) * BB + tl.arange(0, BB)
    units = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok = rows < row_end
    unit_ok = units < hidden
    own = row_ok[:, None] & unit_ok[None, :]
    own_offsets = rows[:, None] * hidden + units[None, :]
    hidden_tiles = tl.num_programs(1)
    counter = counter_ptr + tl.program_id(0)
    plane_set = H_DIGITS * batch * hidden

    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    else:
        length = tl.zeros((BB,), dtype=tl.int32) + steps
    h = _carried(_initial_state(h0_ptr, own_offsets, own, HAS_H0), NARROW)
    _store_digits(exchange_ptr, own_offsets, own, h, C, batch, hidden, H_DIGITS)
    _barrier(counter, hidden_tiles)

    channels = _channel_constants(rh_ptr, rb_bias_ptr, units, unit_ok, hidden, C, NARROW)
    qat_channels = _qat_channels(qat_ptr, qat_bias_ptr, units, unit_ok, hidden, SAVE)

    if MERGED:
        r_rows, column_ok = _gate_columns(hidden, BH)
    else:  # gate r's rows; z's and n's H and 2H on
        r_rows, column_ok = units, unit_ok
    if RESIDENT:
        if MERGED:
            w_all = _resident_tiles(digits_ptr, r_rows, column_ok, hidden, BK, CHUNKS)
        else:
            w_all = (
                _resident_tiles(digits_ptr, r_rows, column_ok, hidden, BK, CHUNKS),
                _resident_tiles(digits_ptr, r_rows + hidden, column_ok, hidden, BK, CHUNKS),
                _resident_tiles(digits_ptr, r_rows + 2 * hidden, column_ok, hidden, BK, CHUNKS),
            )

    # matmul.Wx's codes are loaded a step ahead: their latency hides behind the step before.
    wx_rows = wx_ptr + rows[:, None] * (3 * hidden) + units[None, :]
    wx_r, wx_z, wx_n = _wx_step(wx_rows, steps - 1 if REVERSE else 0, batch, hidden, own, C, NARROW)

    for step in range(steps):
        t, t_next = _step_time(step, steps, REVERSE)
        next_r, next_z, next_n = _wx_step(wx_rows, t_next, batch, hidden, own, C, NARROW)
        planes = exchange_ptr + (step % 2) * plane_set
        if RESIDENT:
            sum_r, sum_z, sum_n = _resident_sums(
                planes, w_all, rows, row_ok, batch, hidden, BB, BH, BK, CHUNKS, MERGED
            )
        else:
            sum_r, sum_z, sum_n = _recurrent_sums(
                planes, digits_ptr, rows, row_ok, r_rows, column_ok, batch, hidden,
                BB, BH, BK, H_DIGITS, R_DIGITS, MERGED,
            )  # fmt: skip

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
        if TRACE:
            row = trace_ptr + t * batch * 15 * hidden + rows[:, None] * (15 * hidden)
            row += units[None, :]
            for i in tl.static_range(15):  # integer_layout.TRACE_BLOCKS
                # Through tl.where on the block's mask: storing the values as they are failed
                # to compile for sm_90a (Triton 3.6: "operand #1 does not dominate this use"
                # in the layout conversions) for a general (int64) kernel of the sweep.
                tl.store(row + i * hidden, tl.where(own, values[i], 0), mask=own)
        h = tl.where(active, h_new, h)
        wx_r, wx_z, wx_n = next_r, next_z, next_n

        next_planes = exchange_ptr + ((step + 1) % 2) * plane_set
        _store_digits(next_planes, own_offsets, own, h, C, batch, hidden, H_DIGITS)
        _barrier(counter, hidden_tiles * (step + 2))

    tl.store(h_n_ptr + own_offsets, _output(h, scale_ptr, h_n_ptr, OUT_FLOAT), mask=own)
