"""Persistent Triton backward kernels of one GRU direction: gru_forward.py's time loop in
reverse, as a tile kernel and a row kernel like the forward's.

Per step, from the gradient dh reaching h_t and the gates the forward saved:
dn = dh (1 - z), dz = dh (h_{t-1} - n), da_n = dn (1 - n²), da_r = da_n ghn r (1 - r),
da_z = dz z (1 - z) (ghn = R_n h_{t-1} + b_n); the gradient of the recurrent pre-activations
is dgh = (da_r, da_z, da_n r), of the input projections dgx = (da_r, da_z, da_n), and
dh_{t-1} = dh z + dgh R. The kernels store dgx and the n part of dgh (the r and z parts
equal dgx's). Programs own hidden units as in the forward; dgh, which every program
of a batch tile needs whole, goes through a global double buffer and a barrier per step (tile
kernel) or tagged words (row kernel, sync.py). The weight gradients are one matrix product over
all steps afterwards: dR = Σ_t dgh_tᵀ h_{t-1}, db = Σ_t dgh_t.
Padded steps (t at or past a sequence's length) pass dh through unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.triton import tuning
from quant_gru.kernels.triton.gru_forward import (
    _initial,
    _lengths,
    _program_tile,
    _rows_chunk,
    _step_time,
)
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.ops import recurrent_grad_type
from quant_gru.kernels.triton.plans import (
    Plan,
    backward_plan,
    check_step_offsets,
    interpreted,
    tile_candidates,
)
from quant_gru.kernels.triton.products import TF32, _product, dot_precision, rounded_to_tf32
from quant_gru.kernels.triton.qat_save import COEFFICIENTS, SAVE_BLOCKS
from quant_gru.kernels.triton.sync import _await_state, _barrier, _publish, zero_words

# The tile backward loads a step's six input tiles a step ahead up to this many elements a
# tile: measured on an H100, 16 x 8 to 32 x 8 tiles took 22-31 % less time a step (7.65 to 5.98
# us at (64, H=256) TF32); 64 x 32 tiles spilled registers and took 6 % more.
PREFETCH_ELEMENTS = 512


@triton.jit
def _step_inputs(
    t, steps, length, grad_out_ptr, grad_out_step, grad_out_offsets, out_ptr, saved_ptr, rows,
    units, own, own_offsets, batch, hidden, REVERSE: tl.constexpr,
):  # fmt: skip
    """What step ``t``'s gradients read besides the carry: the output's gradient (at
    t * ``grad_out_step`` + ``grad_out_offsets``: ``_grad_out_offsets``), the saved r, z, n,
    ghn and h_{t-1} (the output of the step before in the direction's order; masked where
    that is h0). None of it depends on the carry, so the kernels load it a step ahead."""
    plane = batch * hidden
    grad_out = tl.load(grad_out_ptr + t * grad_out_step + grad_out_offsets, mask=own, other=0.0)
    gates = saved_ptr + t * batch * 4 * hidden + rows[:, None] * (4 * hidden) + units[None, :]
    r = tl.load(gates, mask=own, other=0.0)
    z = tl.load(gates + hidden, mask=own, other=0.0)
    n = tl.load(gates + 2 * hidden, mask=own, other=0.0)
    ghn = tl.load(gates + 3 * hidden, mask=own, other=0.0)
    has_prev = _has_previous(t, length, REVERSE)
    t_prev = t + 1 if REVERSE else t - 1
    t_load = tl.minimum(tl.maximum(t_prev, 0), steps - 1)
    h_prev = tl.load(out_ptr + t_load * plane + own_offsets, mask=own & has_prev, other=0.0)
    return grad_out, r, z, n, ghn, h_prev


@triton.jit
def _grad_out_offsets(
    own_offsets, rows, units, row_stride, unit_stride, GRAD_OUT_CONTIGUOUS: tl.constexpr
):
    """The offsets of this program's block in a step of the output's gradient, which may have
    any strides: a loss's gradient often comes expanded (a sum's: stride 0 everywhere), and
    reading it in place saves a copy of (T, B, H) on the host's critical path. Contiguous,
    the block's own offsets (no more registers than before strides were taken)."""
    if GRAD_OUT_CONTIGUOUS:
        return own_offsets
    return rows[:, None] * row_stride + units[None, :] * unit_stride


@triton.jit
def _has_previous(t, length, REVERSE: tl.constexpr):
    """(BB, 1): whether h_{t-1} is an output of this direction (else it is h0)."""
    if REVERSE:
        has_prev = (t + 1 < length)[:, None]
    else:
        has_prev = ((length * 0 + t - 1) >= 0)[:, None] & (t < length)[:, None]
    return has_prev


@triton.jit
def _step_gradients(
    carry, h0, t, length, grad_out, r, z, n, ghn, h_prev, grad_gx_ptr, grad_ghn_ptr,
    rows, units, own, own_offsets, batch, hidden, REVERSE: tl.constexpr,
):  # fmt: skip
    """Step ``t``'s gradients of this program's units from ``carry`` (the gradient of h_t from
    the steps after it) and the step's inputs (``_step_inputs``): stores dgx and dghn and
    returns (dh, z, active, da_r, da_z, dghn)."""
    active = (t < length)[:, None]
    dh = carry + tl.where(active, grad_out.to(tl.float32), 0.0)
    r = r.to(tl.float32)
    z = z.to(tl.float32)
    n = n.to(tl.float32)
    ghn = ghn.to(tl.float32)
    h_prev = tl.where(_has_previous(t, length, REVERSE), h_prev.to(tl.float32), h0)

    dn = dh * (1.0 - z)
    dz = dh * (h_prev - n)
    da_n = tl.where(active, dn * (1.0 - n * n), 0.0)
    da_r = tl.where(active, da_n * ghn * r * (1.0 - r), 0.0)
    da_z = tl.where(active, dz * z * (1.0 - z), 0.0)
    dghn = da_n * r

    three = t * batch * 3 * hidden + rows[:, None] * (3 * hidden) + units[None, :]
    gx_type = grad_gx_ptr.dtype.element_ty
    tl.store(grad_gx_ptr + three, da_r.to(gx_type), mask=own)
    tl.store(grad_gx_ptr + three + hidden, da_z.to(gx_type), mask=own)
    tl.store(grad_gx_ptr + three + 2 * hidden, da_n.to(gx_type), mask=own)
    ghn_out = grad_ghn_ptr + t * batch * hidden + own_offsets
    tl.store(ghn_out, dghn.to(grad_ghn_ptr.dtype.element_ty), mask=own)
    return dh, z, active, da_r, da_z, dghn


@triton.jit
def _qat_step_inputs(
    t, grad_out_ptr, grad_out_step, grad_out_offsets, saved_ptr, mask_ptr, rows, units, own,
    own_offsets, batch, hidden,
):  # fmt: skip
    """QAT's counterpart of _step_inputs: the output's gradient, the five coefficients and the
    mask byte the integer kernel saved for step ``t`` (qat_save.py)."""
    grad_out = tl.load(grad_out_ptr + t * grad_out_step + grad_out_offsets, mask=own, other=0.0)
    step = saved_ptr + t * batch * SAVE_BLOCKS * hidden
    five = step + rows[:, None] * (SAVE_BLOCKS * hidden) + units[None, :]
    p = tl.load(five, mask=own, other=0.0)
    e_z = tl.load(five + hidden, mask=own, other=0.0)
    e_g = tl.load(five + 2 * hidden, mask=own, other=0.0)
    e_r = tl.load(five + 3 * hidden, mask=own, other=0.0)
    e_n = tl.load(five + 4 * hidden, mask=own, other=0.0)
    masks = tl.load(mask_ptr + t * batch * hidden + own_offsets, mask=own, other=0).to(tl.int32)
    return grad_out, p, e_z, e_g, e_r, e_n, masks


@triton.jit
def _qat_step_gradients(
    carry, t, length, grad_out, p, e_z, e_g, e_r, e_n, masks, grad_gx_ptr, grad_rb_ptr,
    grad_rh_ptr, rows, units, own, batch, hidden,
):  # fmt: skip
    """QAT's counterpart of _step_gradients (qat_save.py's formulas): stores the gradients of
    the gate pre-activations (dgx), of op.Rh_add_br and of matmul.Rh, each (T, B, 3H), and
    returns (dh, P, active, matmul.Rh's gradient per gate)."""
    active = (t < length)[:, None]
    dh = carry + tl.where(active, grad_out.to(tl.float32), 0.0)
    d_z = tl.where(active, dh * e_z, 0.0)
    d_g = tl.where(active, dh * e_g, 0.0)
    d_r = d_g * e_r
    rb_r = tl.where((masks & 1) != 0, d_r, 0.0)
    rb_z = tl.where((masks & 2) != 0, d_z, 0.0)
    rb_n = tl.where((masks & 4) != 0, d_g * e_n, 0.0)
    rh_r = tl.where((masks & 8) != 0, rb_r, 0.0)
    rh_z = tl.where((masks & 16) != 0, rb_z, 0.0)
    rh_n = tl.where((masks & 32) != 0, rb_n, 0.0)

    three = t * batch * 3 * hidden + rows[:, None] * (3 * hidden) + units[None, :]
    gx_type = grad_gx_ptr.dtype.element_ty
    tl.store(grad_gx_ptr + three, d_r.to(gx_type), mask=own)
    tl.store(grad_gx_ptr + three + hidden, d_z.to(gx_type), mask=own)
    tl.store(grad_gx_ptr + three + 2 * hidden, d_g.to(gx_type), mask=own)
    tl.store(grad_rb_ptr + three, rb_r, mask=own)
    tl.store(grad_rb_ptr + three + hidden, rb_z, mask=own)
    tl.store(grad_rb_ptr + three + 2 * hidden, rb_n, mask=own)
    tl.store(grad_rh_ptr + three, rh_r, mask=own)
    tl.store(grad_rh_ptr + three + hidden, rh_z, mask=own)
    tl.store(grad_rh_ptr + three + 2 * hidden, rh_n, mask=own)
    return dh, p.to(tl.float32), active, rh_r, rh_z, rh_n


@triton.jit
def _inputs(
    t, steps, length, grad_out_ptr, grad_out_step, grad_out_offsets, out_ptr, saved_ptr,
    mask_ptr, rows, units, own, own_offsets, batch, hidden, REVERSE: tl.constexpr,
    QAT: tl.constexpr,
):  # fmt: skip
    """Step ``t``'s inputs: _step_inputs', or (QAT) _qat_step_inputs'."""
    if QAT:
        inputs = _qat_step_inputs(
            t, grad_out_ptr, grad_out_step, grad_out_offsets, saved_ptr, mask_ptr, rows, units,
            own, own_offsets, batch, hidden,
        )  # fmt: skip
    else:
        inputs = _step_inputs(
            t, steps, length, grad_out_ptr, grad_out_step, grad_out_offsets, out_ptr, saved_ptr,
            rows, units, own, own_offsets, batch, hidden, REVERSE,
        )  # fmt: skip
    return inputs


@triton.jit
def _gradients(
    carry, h0, t, length, inputs, grad_gx_ptr, grad_ghn_ptr, grad_rh_ptr, rows, units, own,
    own_offsets, batch, hidden, REVERSE: tl.constexpr, QAT: tl.constexpr,
):  # fmt: skip
    """Step ``t``'s gradients from its ``inputs`` (_inputs): (dh, the coefficient of dh in
    dh_{t-1}, active, the recurrent pre-activations' gradient per gate)."""
    if QAT:
        grad_out, p, e_z, e_g, e_r, e_n, masks = inputs
        result = _qat_step_gradients(
            carry, t, length, grad_out, p, e_z, e_g, e_r, e_n, masks, grad_gx_ptr, grad_ghn_ptr,
            grad_rh_ptr, rows, units, own, batch, hidden,
        )  # fmt: skip
    else:
        grad_out, r, z, n, ghn, h_prev = inputs
        result = _step_gradients(
            carry, h0, t, length, grad_out, r, z, n, ghn, h_prev, grad_gx_ptr, grad_ghn_ptr,
            rows, units, own, own_offsets, batch, hidden, REVERSE,
        )  # fmt: skip
    return result


@triton.jit
def _column_chunk(w_ptr, gate, units, unit_ok, k0, hidden, BK: tl.constexpr):
    """Rows [k0, k0 + BK) of gate ``gate``'s block of R, this program's columns (units):
    a (BK, BH) tile, zeros past H."""
    ks = k0 + tl.arange(0, BK)
    return tl.load(
        w_ptr + (gate * hidden + ks[:, None]) * hidden + units[None, :],
        mask=(ks < hidden)[:, None] & unit_ok[None, :],
        other=0.0,
    )


@triton.jit
def _resident_columns(w_ptr, units, unit_ok, hidden, BK, CHUNKS):
    """This program's columns of R, kept on chip for every step: a tuple of 3 * CHUNKS
    (BK, BH) tiles, gate-major. (Unannotated: mypy has no type for Triton's tuples.)"""
    columns = ()
    for gate in tl.static_range(3):
        for chunk in tl.static_range(CHUNKS):
            tile = _column_chunk(w_ptr, gate, units, unit_ok, chunk * BK, hidden, BK)
            columns = columns + (tile,)  # noqa: RUF005 (Triton's tuples take `+` only)
    return columns


@triton.jit
def _gru_backward_tile_kernel(
    grad_out_ptr,  # (T, B, H), any strides
    grad_h_n_ptr,  # (B, H)
    out_ptr,  # (T, B, H): the forward's outputs, h_t at valid steps
    h0_ptr,  # (B, H)
    saved_ptr,  # (T, B, 4H): r, z, n, ghn (ops.recurrent_grad_type)
    w_ptr,  # (3H, H)
    lengths_ptr,  # (B,) int32
    grad_ghn_ptr,  # (T, B, H) out: grad of R_n h + b_n (ops.recurrent_grad_type)
    grad_gx_ptr,  # (T, B, 3H) out
    grad_h0_ptr,  # (B, H) float32 out
    grad_rh_ptr,  # QAT: (T, B, 3H) float32 out, matmul.Rh's gradient
    mask_ptr,  # QAT: (T, B, H) int8, the saved masks
    exchange_ptr,  # (2, B, 3H): float32, or the weights' type when 16-bit (what tl.dot reads)
    counter_ptr,  # (batch tiles,) int32, zeros
    steps,
    batch,
    hidden,
    grad_out_step,  # grad_out's strides (any: _grad_out_offsets)
    grad_out_row,
    grad_out_unit,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,  # products.dot_precision (float32); ignored for 16-bit types
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    RESIDENT: tl.constexpr,  # R's columns of this program are loaded once, before the loop
    CHUNKS: tl.constexpr,  # RESIDENT: CHUNKS * BK covers H
    PREFETCH: tl.constexpr,  # load each step's inputs during the step before
    HAS_LENGTHS: tl.constexpr,  # else every row ran all steps (lengths_ptr unused)
    HAS_H0: tl.constexpr,  # else the state started at zeros (h0_ptr unused)
    HAS_GRAD_H_N: tl.constexpr,  # else h_n's gradient is zeros (grad_h_n_ptr unused)
    GRAD_OUT_CONTIGUOUS: tl.constexpr,  # grad_out's strides are (B * H, H, 1)
    QAT: tl.constexpr = False,  # saved_ptr: QAT's coefficients (qat_save.py); grad_ghn_ptr:
    # op.Rh_add_br's gradient (T, B, 3H)
):
    rows, units, row_ok, unit_ok, own, own_offsets = _program_tile(batch, hidden, BB, BH)
    hidden_tiles = tl.num_programs(1)
    counter = counter_ptr + tl.program_id(0)
    dtype = w_ptr.dtype.element_ty
    exchange_type = exchange_ptr.dtype.element_ty

    length = _lengths(lengths_ptr, rows, row_ok, steps, BB, HAS_LENGTHS)
    grad_out_offsets = _grad_out_offsets(
        own_offsets, rows, units, grad_out_row, grad_out_unit, GRAD_OUT_CONTIGUOUS
    )
    carry = _initial(grad_h_n_ptr, own_offsets, own, BB, BH, HAS_GRAD_H_N)
    h0 = _initial(h0_ptr, own_offsets, own, BB, BH, HAS_H0)
    if RESIDENT:
        columns = _resident_columns(w_ptr, units, unit_ok, hidden, BK, CHUNKS)
    # A step's inputs are loaded a step ahead where the registers allow (PREFETCH): they do
    # not depend on the carry, so their latency hides behind the previous step's work.
    if PREFETCH:
        inputs = _inputs(
            0 if REVERSE else steps - 1, steps, length, grad_out_ptr, grad_out_step,
            grad_out_offsets, out_ptr, saved_ptr, mask_ptr, rows, units, own, own_offsets,
            batch, hidden, REVERSE, QAT,
        )  # fmt: skip

    for step in range(steps):
        t, t_next = _step_time(step, steps, not REVERSE)  # time runs backwards
        if PREFETCH:
            current = inputs
            inputs = _inputs(
                t_next, steps, length, grad_out_ptr, grad_out_step, grad_out_offsets, out_ptr,
                saved_ptr, mask_ptr, rows, units, own, own_offsets, batch, hidden, REVERSE, QAT,
            )  # fmt: skip
        else:
            current = _inputs(
                t, steps, length, grad_out_ptr, grad_out_step, grad_out_offsets, out_ptr,
                saved_ptr, mask_ptr, rows, units, own, own_offsets, batch, hidden, REVERSE, QAT,
            )  # fmt: skip
        dh, z, active, da_r, da_z, dghn = _gradients(
            carry, h0, t, length, current, grad_gx_ptr, grad_ghn_ptr, grad_rh_ptr, rows, units,
            own, own_offsets, batch, hidden, REVERSE, QAT,
        )  # fmt: skip
        buffer = exchange_ptr + (step % 2) * batch * 3 * hidden
        mine = rows[:, None] * (3 * hidden) + units[None, :]
        tl.store(buffer + mine, da_r.to(exchange_type), mask=own)
        tl.store(buffer + mine + hidden, da_z.to(exchange_type), mask=own)
        tl.store(buffer + mine + 2 * hidden, dghn.to(exchange_type), mask=own)
        _barrier(counter, hidden_tiles * (step + 1))

        acc = tl.zeros((BB, BH), dtype=tl.float32)
        if RESIDENT:
            for gate in tl.static_range(3):
                for chunk in tl.static_range(CHUNKS):
                    k0 = chunk * BK
                    d_k = _rows_chunk(
                        buffer, rows, row_ok, 3 * hidden, gate * hidden + k0, hidden - k0, BK
                    )
                    acc = _product(d_k.to(dtype), columns[gate * CHUNKS + chunk], acc, PRECISION)
        else:
            for gate in tl.static_range(3):
                for k0 in range(0, hidden, BK):
                    d_k = _rows_chunk(
                        buffer, rows, row_ok, 3 * hidden, gate * hidden + k0, hidden - k0, BK
                    )
                    w_k = _column_chunk(w_ptr, gate, units, unit_ok, k0, hidden, BK)
                    acc = _product(d_k.to(dtype), w_k, acc, PRECISION)
        carry = tl.where(active, dh * z + acc, dh)

    tl.store(grad_h0_ptr + own_offsets, carry, mask=own)


@triton.jit
def _gru_backward_row_kernel(
    grad_out_ptr,  # (T, B, H), any strides
    grad_h_n_ptr,  # (B, H)
    out_ptr,  # (T, B, H): the forward's outputs, h_t at valid steps
    h0_ptr,  # (B, H)
    saved_ptr,  # (T, B, 4H): r, z, n, ghn (ops.recurrent_grad_type)
    w_ptr,  # (3H, H)
    lengths_ptr,  # (B,) int32
    grad_ghn_ptr,  # (T, B, H) out: grad of R_n h + b_n
    grad_gx_ptr,  # (T, B, 3H) out
    grad_h0_ptr,  # (B, H) float32 out
    grad_rh_ptr,  # QAT: (T, B, 3H) float32 out, matmul.Rh's gradient
    mask_ptr,  # QAT: (T, B, H) int8, the saved masks
    words_ptr,  # (2, B, 3H) int64, zeros: dgh of loop iteration s, tagged s + 1 (sync.py)
    steps,
    batch,
    hidden,
    grad_out_step,  # grad_out's strides (any: _grad_out_offsets)
    grad_out_row,
    grad_out_unit,
    REVERSE: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,  # padded 3H (padded H when SINGLE): R's columns stay in registers
    SINGLE: tl.constexpr,  # the program holds every unit (BH == BK): dgh stays here
    HAS_LENGTHS: tl.constexpr,  # else every row ran all steps (lengths_ptr unused)
    HAS_H0: tl.constexpr,  # else the state started at zeros (h0_ptr unused)
    HAS_GRAD_H_N: tl.constexpr,  # else h_n's gradient is zeros (grad_h_n_ptr unused)
    GRAD_OUT_CONTIGUOUS: tl.constexpr,  # grad_out's strides are (B * H, H, 1)
    COMPILED: tl.constexpr,  # False under TRITON_INTERPRET=1
    QAT: tl.constexpr = False,  # as the tile kernel's
):
    rows, units, row_ok, unit_ok, own, own_offsets = _program_tile(batch, hidden, BB, BH)
    length = _lengths(lengths_ptr, rows, row_ok, steps, BB, HAS_LENGTHS)
    grad_out_offsets = _grad_out_offsets(
        own_offsets, rows, units, grad_out_row, grad_out_unit, GRAD_OUT_CONTIGUOUS
    )
    carry = _initial(grad_h_n_ptr, own_offsets, own, BB, BH, HAS_GRAD_H_N)
    h0 = _initial(h0_ptr, own_offsets, own, BB, BH, HAS_H0)

    # dh_{t-1}[j] = Σ_k dgh[k] R[k, j] over the 3H rows k of R, gates one after another:
    # (SINGLE) as a (BK, BH) block of R's columns per gate, else as one block of all 3H rows.
    if SINGLE:
        w_r_columns = _column_chunk(w_ptr, 0, units, unit_ok, 0, hidden, BK)
        w_r_columns = w_r_columns.to(tl.float32)[None, :, :]
        w_z_columns = _column_chunk(w_ptr, 1, units, unit_ok, 0, hidden, BK)
        w_z_columns = w_z_columns.to(tl.float32)[None, :, :]
        w_n_columns = _column_chunk(w_ptr, 2, units, unit_ok, 0, hidden, BK)
        w_n_columns = w_n_columns.to(tl.float32)[None, :, :]
    else:
        ks = tl.arange(0, BK)
        k_ok = ks < 3 * hidden
        w_mask = k_ok[:, None] & unit_ok[None, :]
        w_offsets = ks[:, None] * hidden + units[None, :]
        w_columns = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
        w_columns = w_columns.to(tl.float32)[None, :, :]  # (1, BK, BH)
        dgh_offsets = rows[:, None] * (3 * hidden) + ks[None, :]
        dgh_mask = row_ok[:, None] & k_ok[None, :]
        mine = rows[:, None] * (3 * hidden) + units[None, :]

    # A step's inputs are loaded a step ahead: they do not depend on the carry, so their
    # latency hides behind the previous step's work.
    inputs = _inputs(
        0 if REVERSE else steps - 1, steps, length, grad_out_ptr, grad_out_step,
        grad_out_offsets, out_ptr, saved_ptr, mask_ptr, rows, units, own, own_offsets, batch,
        hidden, REVERSE, QAT,
    )  # fmt: skip

    for step in range(steps):
        t, t_next = _step_time(step, steps, not REVERSE)  # time runs backwards
        current = inputs
        inputs = _inputs(
            t_next, steps, length, grad_out_ptr, grad_out_step, grad_out_offsets, out_ptr,
            saved_ptr, mask_ptr, rows, units, own, own_offsets, batch, hidden, REVERSE, QAT,
        )  # fmt: skip
        dh, z, active, da_r, da_z, dghn = _gradients(
            carry, h0, t, length, current, grad_gx_ptr, grad_ghn_ptr, grad_rh_ptr, rows, units,
            own, own_offsets, batch, hidden, REVERSE, QAT,
        )  # fmt: skip
        if SINGLE:  # units past H hold zeros
            acc = tl.sum(da_r[:, :, None] * w_r_columns, axis=1)
            acc += tl.sum(da_z[:, :, None] * w_z_columns, axis=1)
            acc += tl.sum(dghn[:, :, None] * w_n_columns, axis=1)
        else:
            words = words_ptr + (step % 2) * batch * 3 * hidden
            _publish(words, mine, own, da_r, step + 1)
            _publish(words, mine + hidden, own, da_z, step + 1)
            _publish(words, mine + 2 * hidden, own, dghn, step + 1)
            dgh = _await_state(words, dgh_offsets, dgh_mask, step + 1, COMPILED)
            acc = tl.sum(dgh[:, :, None] * w_columns, axis=1)
        carry = tl.where(active, dh * z + acc, dh)

    tl.store(grad_h0_ptr + own_offsets, carry, mask=own)


_launch_tiles = Launcher(_gru_backward_tile_kernel)
_launch_rows = Launcher(_gru_backward_row_kernel)


def gru_direction_backward(
    grad_out: Tensor,
    grad_h_n: Tensor | None,
    out: Tensor,
    h0: Tensor | None,
    saved: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    gx_dtype: torch.dtype,
    plan: Plan | None = None,
    rounded: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of the input projections (T, B, 3H), grad of h0 (B, H) float32, grad of
    R_n h + b_n (T, B, H) in ``recurrent_grad_type``). None for ``grad_h_n`` or ``h0`` means
    zeros, for ``lengths`` (int32 when given) every row T long. ``plan`` overrides the choice
    of kernel and tiles (plans.backward_plan, or the autotuner's: tuning.py). ``rounded``: R
    rounded to TF32 already (the forward's, gru_forward.gru_direction_forward), which the
    TF32 tile kernel then takes instead of rounding it here."""
    steps, batch, hidden = out.shape
    check_step_offsets(steps, batch, 4 * hidden)
    device = out.device
    if plan is None:
        plan = backward_plan(batch, hidden, w_hh.element_size(), device)
        if tuning.enabled():
            problem = ("backward", batch, hidden, out.dtype, w_hh.dtype, dot_precision(w_hh.dtype))
            arguments = (grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse, gx_dtype)
            plan = tuning.tuned(
                (*problem, device),
                plan,
                lambda: tile_candidates(batch, hidden, w_hh.element_size(), device, True),
                lambda p: gru_direction_backward(*arguments, p),
            )
    grad_ghn = torch.empty(steps, batch, hidden, device=device, dtype=recurrent_grad_type(w_hh))
    grad_gx = torch.empty(steps, batch, 3 * hidden, device=device, dtype=gx_dtype)
    grad_h0 = _launch(
        plan, grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse, grad_gx, grad_ghn,
        None, rounded,
    )  # fmt: skip
    return grad_gx, grad_h0, grad_ghn


def qat_direction_backward(
    grad_out: Tensor,
    grad_h_n: Tensor | None,
    coefficients: Tensor,
    masks: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    gx_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """QAT's backward of one direction from what the integer kernel saved (qat_save.py:
    ``coefficients`` (T, B, 5H) float32, ``masks`` (T, B, H) int8) and the dequantized R
    ``w_hh``: the gradients of the gate pre-activations (T, B, 3H, ``gx_dtype``), of h0's
    value (B, H) float32, of op.Rh_add_br and of matmul.Rh (T, B, 3H each, float32)."""
    steps, batch, hidden = masks.shape
    check_step_offsets(steps, batch, COEFFICIENTS * hidden)
    plan = backward_plan(batch, hidden, w_hh.element_size(), masks.device)
    grad_gx = torch.empty(steps, batch, 3 * hidden, device=masks.device, dtype=gx_dtype)
    grad_rb = torch.empty(steps, batch, 3 * hidden, device=masks.device, dtype=torch.float32)
    grad_rh = torch.empty_like(grad_rb)
    grad_h0 = _launch(
        plan, grad_out, grad_h_n, grad_out, None, coefficients, w_hh, lengths, reverse, grad_gx,
        grad_rb, (grad_rh, masks), None,
    )  # fmt: skip
    return grad_gx, grad_h0, grad_rb, grad_rh


def _launch(
    plan: Plan,
    grad_out: Tensor,
    grad_h_n: Tensor | None,
    out: Tensor,
    h0: Tensor | None,
    saved: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    grad_gx: Tensor,
    grad_ghn: Tensor,
    qat: tuple[Tensor, Tensor] | None,
    rounded: Tensor | None,
) -> Tensor:
    """Run ``plan``'s backward kernel into ``grad_gx`` and ``grad_ghn`` (QAT: op.Rh_add_br's
    gradient, and ``qat``: matmul.Rh's gradient out, the saved masks); returns h0's
    gradient."""
    steps, batch, three_h = grad_gx.shape
    hidden = three_h // 3
    device = grad_gx.device
    grad_h0 = torch.empty(batch, hidden, device=device, dtype=torch.float32)
    grid = plan.grid(batch, hidden)
    # Absent inputs take the out tensor's place: the kernels do not read them then.
    given = {
        "HAS_LENGTHS": lengths is not None,
        "HAS_H0": h0 is not None,
        "HAS_GRAD_H_N": grad_h_n is not None,
        "GRAD_OUT_CONTIGUOUS": grad_out.is_contiguous(),
        "QAT": qat is not None,
    }
    operands = (
        grad_out,
        out if grad_h_n is None else grad_h_n.contiguous(),
        out,
        out if h0 is None else h0.contiguous(),
        saved,
    )
    outputs = (
        w_hh.contiguous(), out if lengths is None else lengths, grad_ghn, grad_gx, grad_h0,
        *(qat if qat is not None else (grad_gx, grad_gx)),
    )  # fmt: skip
    if plan.rows:
        words = grad_gx if plan.single else zero_words(2, batch, 3 * hidden, device=device)
        _launch_rows(
            grid,
            (*operands, *outputs, words, steps, batch, hidden, *grad_out.stride()),
            dict(
                REVERSE=reverse, BB=plan.block_b, BH=plan.block_h, BK=plan.block_k,
                SINGLE=plan.single, **given, COMPILED=not interpreted(),
            ),
            plan.warps,
        )  # fmt: skip
        return grad_h0
    exchange_type = recurrent_grad_type(w_hh)
    exchange = torch.empty(2, batch, 3 * hidden, device=device, dtype=exchange_type)
    counters = torch.zeros(grid[0], device=device, dtype=torch.int32)
    precision = dot_precision(w_hh.dtype)
    if precision == TF32:
        outputs = (rounded_to_tf32(w_hh) if rounded is None else rounded, *outputs[1:])
    _launch_tiles(
        grid,
        (*operands, *outputs, exchange, counters, steps, batch, hidden, *grad_out.stride()),
        dict(
            REVERSE=reverse, PRECISION=precision, BB=plan.block_b, BH=plan.block_h,
            BK=plan.block_k, RESIDENT=plan.resident,
            CHUNKS=plan.resident_chunks(hidden),
            PREFETCH=plan.block_b * plan.block_h <= PREFETCH_ELEMENTS, **given,
        ),
        plan.warps,
    )  # fmt: skip
    return grad_h0
