"""Persistent Triton kernels for the float GRU recurrence of one layer and one direction.

One launch runs every time step. The input projection of all steps (x W_ih^T + b_ih) is one
large matrix product before the launch; the kernels add the recurrent product and the gates.
Program (i, j) owns batch rows [i*BB, (i+1)*BB) and hidden units [j*BH, (j+1)*BH) of all three
gates: it holds (or re-reads from L2) the 3*BH rows of R = W_hh it needs and reads the whole
previous state of its batch rows, which the programs of its batch tile wrote (sync.py).

- The tile kernel (``_gru_forward_tile_kernel``): tiles of 16 to 64 batch rows, products on the
  matrix cores (tl.dot), states exchanged through a global double buffer and a barrier per
  step. When one program can hold all of R it holds the whole state and needs no barrier.
- The row kernel (``_gru_forward_row_kernel``): one batch row a program, products on the CUDA
  cores in float32, states handed over in tagged words. For small batches, where a 16-row
  matrix-core tile would be mostly padding and a step is all latency.

Semantics are kernels/torch/float_gru.py's (nn.GRU's): r = σ(gx_r + R_r h + b_r),
z = σ(gx_z + R_z h + b_z), n = tanh(gx_n + r ⊙ (R_n h + b_n)), h' = (1 - z) ⊙ n + z ⊙ h;
steps at or past a sequence's length keep its state and write zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.triton import tuning
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import (
    Plan,
    check_step_offsets,
    forward_plan,
    interpreted,
    padded,
    tile_candidates,
)
from quant_gru.kernels.triton.products import (
    TF32,
    TF32_HALF,
    TF32_SPLIT,
    _half_scales,
    _product,
    _round_tf32,
    dot_precision,
    forward_tf32,
    rounded_to_tf32,
    scaled_half,
    state_bounds,
)
from quant_gru.kernels.triton.sync import _await_state, _barrier, _publish, zero_words


@triton.jit
def _program_tile(batch, hidden, BB: tl.constexpr, BH: tl.constexpr):
    """This program's batch rows and hidden units, their masks, and the offsets of its
    (BB, BH) block in a (B, H) tensor."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    units = tl.program_id(1) * BH + tl.arange(0, BH)
    row_ok = rows < batch
    unit_ok = units < hidden
    own = row_ok[:, None] & unit_ok[None, :]
    return rows, units, row_ok, unit_ok, own, rows[:, None] * hidden + units[None, :]


@triton.jit
def _lengths(lengths_ptr, rows, row_ok, steps, BB: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Each of this program's rows' length: from ``lengths_ptr``, or ``steps`` for every row
    (no lengths given: no tensor to fill on the host)."""
    if HAS_LENGTHS:
        return tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    return tl.zeros((BB,), dtype=tl.int32) + steps


@triton.jit
def _initial(ptr, own_offsets, own, BB: tl.constexpr, BH: tl.constexpr, GIVEN: tl.constexpr):
    """This program's block of a (B, H) starting value in float32: loaded, or zeros where it
    is not ``GIVEN`` (no tensor of zeros to fill on the host)."""
    if GIVEN:
        return tl.load(ptr + own_offsets, mask=own, other=0.0).to(tl.float32)
    return tl.zeros((BB, BH), dtype=tl.float32)


@triton.jit
def _gate_biases(bias_ptr, units, unit_ok, hidden):
    bias_r = tl.load(bias_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)
    bias_z = tl.load(bias_ptr + hidden + units, mask=unit_ok, other=0.0).to(tl.float32)
    bias_n = tl.load(bias_ptr + 2 * hidden + units, mask=unit_ok, other=0.0).to(tl.float32)
    return bias_r[None, :], bias_z[None, :], bias_n[None, :]


@triton.jit
def _input_projections(gx_rows, t, batch, hidden, own):
    """This program's (BB, BH) blocks of gx_r, gx_z, gx_n at step ``t``."""
    step_rows = gx_rows + t * batch * 3 * hidden
    gx_r = tl.load(step_rows, mask=own, other=0.0)
    gx_z = tl.load(step_rows + hidden, mask=own, other=0.0)
    gx_n = tl.load(step_rows + 2 * hidden, mask=own, other=0.0)
    return gx_r, gx_z, gx_n


@triton.jit
def _rows_chunk(buffer, rows, row_ok, row_length, start, valid, BK: tl.constexpr):
    """Columns [start, start + BK) of this program's batch rows of an exchange buffer whose
    rows are ``row_length`` long (zeros in rows past the batch and from column start + valid
    on), read from L2 (.cg), where the other programs' stores are."""
    ks = tl.arange(0, BK)
    return tl.load(
        buffer + rows[:, None] * row_length + start + ks[None, :],
        mask=row_ok[:, None] & (ks < valid)[None, :],
        other=0.0,
        cache_modifier=".cg",
    )


@triton.jit
def _weight_chunk(w_ptr, units, unit_ok, k0, hidden, BK: tl.constexpr):
    """Rows [k0, k0 + BK) of R_r^T, R_z^T, R_n^T restricted to this program's units: three
    (BK, BH) tiles, zeros past H."""
    ks = k0 + tl.arange(0, BK)
    mask = (ks < hidden)[:, None] & unit_ok[None, :]
    offsets = units[None, :] * hidden + ks[:, None]
    w_r = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    w_z = tl.load(w_ptr + hidden * hidden + offsets, mask=mask, other=0.0)
    w_n = tl.load(w_ptr + 2 * hidden * hidden + offsets, mask=mask, other=0.0)
    return w_r, w_z, w_n


@triton.jit
def _store_weight_chunk(ptr, w_r, w_z, w_n, units, unit_ok, k0, hidden, BK: tl.constexpr):
    """Store three (BK, BH) tiles where ``_weight_chunk`` loads them from."""
    ks = k0 + tl.arange(0, BK)
    mask = (ks < hidden)[:, None] & unit_ok[None, :]
    offsets = units[None, :] * hidden + ks[:, None]
    tl.store(ptr + offsets, w_r, mask=mask)
    tl.store(ptr + hidden * hidden + offsets, w_z, mask=mask)
    tl.store(ptr + 2 * hidden * hidden + offsets, w_n, mask=mask)


@triton.jit
def _gate_columns(hidden, BH: tl.constexpr):
    """The columns of this program's R^T tiles: the three gates side by side, gate g's unit u
    at column g * BH + u, and a fourth gate of zeros (tensor dimensions are powers of two).
    One product of N = 4 BH a chunk then takes one matrix instruction where three of N = BH
    took three, each waited for, and spreads over the warps where a (16, BH) tile is copied
    on each. Returns the row of R of each column and whether it has one."""
    columns = tl.arange(0, 4 * BH)
    gate = columns // BH
    unit = tl.program_id(1) * BH + columns % BH
    return gate * hidden + unit, (gate < 3) & (unit < hidden)


@triton.jit
def _weight_tile(w_ptr, r_rows, column_ok, k0, hidden, BK: tl.constexpr):
    """Rows [k0, k0 + BK) of R^T at the columns _gate_columns gives: (BK, 4 BH), zeros where
    a column has no row of R and past H."""
    ks = k0 + tl.arange(0, BK)
    offsets = r_rows[None, :] * hidden + ks[:, None]
    return tl.load(w_ptr + offsets, mask=(ks < hidden)[:, None] & column_ok[None, :], other=0)


@triton.jit
def _split_gates(acc, BB: tl.constexpr, BH: tl.constexpr):
    """A (BB, 4 BH) product's gates r, z, n as (BB, BH) each (_gate_columns' order)."""
    parts = tl.permute(tl.reshape(acc, (BB, 2, 2, BH)), (0, 3, 1, 2))  # [b, u, g // 2, g % 2]
    even, odd = tl.split(parts)
    gate_r, gate_n = tl.split(even)
    gate_z, _ = tl.split(odd)
    return gate_r, gate_z, gate_n


@triton.jit
def _resident_tiles(w_ptr, r_rows, column_ok, hidden, BK, CHUNKS):
    """This program's whole R^T slice, kept on chip for every step: a tuple of CHUNKS
    (BK, 4 BH) tiles, so that the products take the state in chunks too and fewer operand
    registers are live at once. (Unannotated: mypy has no type for Triton's tuples; the
    caller's constexpr arguments stay constexpr here.)"""
    tiles = ()
    for chunk in tl.static_range(CHUNKS):  # Triton's tuples take `+`, not `*` unpacking
        tiles = tiles + (_weight_tile(w_ptr, r_rows, column_ok, chunk * BK, hidden, BK),)  # noqa: RUF005
    return tiles


@triton.jit
def _step_time(step, steps, REVERSE: tl.constexpr):
    """The time index of loop iteration ``step`` and of the next one (clamped to a valid step
    on the last iteration: its inputs are loaded, not used). The backward passes
    ``not REVERSE``: it visits the steps in the opposite order."""
    if REVERSE:
        return steps - 1 - step, tl.maximum(steps - 2 - step, 0)
    return step, tl.minimum(step + 1, steps - 1)


@triton.jit
def _update(
    h, gx_r, gx_z, gx_n, acc_r, acc_z, acc_n, bias_r, bias_z, bias_n,
    t, length, out_ptr, saved_ptr, rows, units, own, own_offsets, batch, hidden,
    SAVE: tl.constexpr,
):  # fmt: skip
    """The gates from the recurrent products ``acc_*``; writes step ``t``'s output (and, when
    SAVE, r, z, n and R_n h + b_n) and returns the new state (the old one past a length)."""
    r = tl.sigmoid(gx_r.to(tl.float32) + acc_r + bias_r)
    z = tl.sigmoid(gx_z.to(tl.float32) + acc_z + bias_z)
    ghn = acc_n + bias_n
    n = 2.0 * tl.sigmoid(2.0 * (gx_n.to(tl.float32) + r * ghn)) - 1.0  # tanh
    h_new = (1.0 - z) * n + z * h
    if SAVE:
        saved = saved_ptr + t * batch * 4 * hidden + rows[:, None] * (4 * hidden) + units[None, :]
        saved_type = saved_ptr.dtype.element_ty
        tl.store(saved, r.to(saved_type), mask=own)
        tl.store(saved + hidden, z.to(saved_type), mask=own)
        tl.store(saved + 2 * hidden, n.to(saved_type), mask=own)
        tl.store(saved + 3 * hidden, ghn.to(saved_type), mask=own)
    active = (t < length)[:, None]
    out = out_ptr + t * batch * hidden + own_offsets
    tl.store(out, tl.where(active, h_new, 0.0).to(out_ptr.dtype.element_ty), mask=own)
    return tl.where(active, h_new, h)


@triton.jit
def _gru_forward_tile_kernel(
    gx_ptr,  # (T, B, 3H) input projections with b_ih
    w_ptr,  # (3H, H) recurrent weights, gate order r, z, n
    bias_ptr,  # (3H,) recurrent bias (zeros without bias)
    h0_ptr,  # (B, H)
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, H)
    h_n_ptr,  # (B, H)
    exchange_ptr,  # (2, B, H): float32, or the weights' type when 16-bit (what tl.dot reads)
    saved_ptr,  # (T, B, 4H): r, z, n and R_n h + b_n of every step (SAVE only)
    counter_ptr,  # (number of batch tiles,) int32, zeros
    scales_ptr,  # (2, 3H) float32: products.scaled_half's scales (TF32_HALF only)
    bounds_ptr,  # (B,) float32: products.state_bounds (TF32_HALF with HAS_H0 only)
    steps,
    batch,
    hidden,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or products.forward_tf32 (float32); ignored for 16-bit
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    RESIDENT: tl.constexpr,  # R's slice is loaded once, before the time loop
    CHUNKS: tl.constexpr,  # RESIDENT: CHUNKS * BK covers H
    SINGLE: tl.constexpr,  # one hidden tile holds every unit (BH == BK): the state stays here
    SAVE: tl.constexpr,  # training: keep what the backward needs
    HAS_LENGTHS: tl.constexpr,  # else every row runs all steps (lengths_ptr unused)
    HAS_H0: tl.constexpr,  # else the state starts at zeros (h0_ptr unused)
):
    rows, units, row_ok, unit_ok, own, own_offsets = _program_tile(batch, hidden, BB, BH)
    hidden_tiles = tl.num_programs(1)
    counter = counter_ptr + tl.program_id(0)
    plane = batch * hidden
    exchange_type = exchange_ptr.dtype.element_ty

    length = _lengths(lengths_ptr, rows, row_ok, steps, BB, HAS_LENGTHS)
    h = _initial(h0_ptr, own_offsets, own, BB, BH, HAS_H0)
    # TF32_HALF: each state row enters the products as float16 times its 2^s, each row of R
    # as float16 times its 2^k.
    down_r, down_z, down_n, h_up, h_down = _half_scales(
        scales_ptr, bounds_ptr, rows, row_ok, units, unit_ok, hidden, PRECISION, HAS_H0
    )
    if not SINGLE:
        tl.store(exchange_ptr + own_offsets, (h * h_up).to(exchange_type), mask=own)
        _barrier(counter, hidden_tiles)
    bias_r, bias_z, bias_n = _gate_biases(bias_ptr, units, unit_ok, hidden)
    dtype = w_ptr.dtype.element_ty
    r_rows, column_ok = _gate_columns(hidden, BH)
    if RESIDENT:
        w_all = _resident_tiles(w_ptr, r_rows, column_ok, hidden, BK, CHUNKS)

    # Each step's input projections are loaded one step ahead: they do not depend on the
    # state, so their latency hides behind the previous step's work.
    gx_rows = gx_ptr + rows[:, None] * (3 * hidden) + units[None, :]
    gx_r, gx_z, gx_n = _input_projections(gx_rows, steps - 1 if REVERSE else 0, batch, hidden, own)

    for step in range(steps):
        t, t_next = _step_time(step, steps, REVERSE)
        next_r, next_z, next_n = _input_projections(gx_rows, t_next, batch, hidden, own)
        source = exchange_ptr + (step % 2) * plane
        acc = tl.zeros((BB, 4 * BH), dtype=tl.float32)
        if SINGLE:
            # This program holds the whole state (CHUNKS == 1): no exchange.
            acc = _product((h * h_up).to(dtype), w_all[0], acc, PRECISION)
        elif RESIDENT:
            for chunk in tl.static_range(CHUNKS):
                k0 = chunk * BK
                h_k = _rows_chunk(source, rows, row_ok, hidden, k0, hidden - k0, BK).to(dtype)
                acc = _product(h_k, w_all[chunk], acc, PRECISION)
        else:
            for k0 in range(0, hidden, BK):
                h_k = _rows_chunk(source, rows, row_ok, hidden, k0, hidden - k0, BK).to(dtype)
                w = _weight_tile(w_ptr, r_rows, column_ok, k0, hidden, BK)
                acc = _product(h_k, w, acc, PRECISION)
        acc_r, acc_z, acc_n = _split_gates(acc, BB, BH)
        if PRECISION == "tf32-half":  # exact: powers of two
            acc_r = acc_r * down_r * h_down
            acc_z = acc_z * down_z * h_down
            acc_n = acc_n * down_n * h_down

        h = _update(
            h, gx_r, gx_z, gx_n, acc_r, acc_z, acc_n, bias_r, bias_z, bias_n,
            t, length, out_ptr, saved_ptr, rows, units, own, own_offsets, batch, hidden, SAVE,
        )  # fmt: skip
        gx_r, gx_z, gx_n = next_r, next_z, next_n
        if not SINGLE:
            target = exchange_ptr + ((step + 1) % 2) * plane + own_offsets
            tl.store(target, (h * h_up).to(exchange_type), mask=own)
            _barrier(counter, hidden_tiles * (step + 2))

    tl.store(h_n_ptr + own_offsets, h.to(h_n_ptr.dtype.element_ty), mask=own)


@triton.jit
def _gru_forward_row_kernel(
    gx_ptr,  # (T, B, 3H) input projections with b_ih
    w_ptr,  # (3H, H) recurrent weights, gate order r, z, n
    bias_ptr,  # (3H,) recurrent bias (zeros without bias)
    h0_ptr,  # (B, H)
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, H)
    h_n_ptr,  # (B, H)
    words_ptr,  # (2, B, H) int64, zeros: the states h_s, tagged s + 1 (sync.py)
    saved_ptr,  # (T, B, 4H): r, z, n and R_n h + b_n of every step (SAVE only)
    rounded_ptr,  # (3H, H) float32: R rounded to TF32, for the backward (ROUND_R only)
    steps,
    batch,
    hidden,
    REVERSE: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,  # padded H: the program's R^T slice (3, BK, BH) stays in registers
    SINGLE: tl.constexpr,  # the program holds every unit (BH == BK): the state stays here
    SAVE: tl.constexpr,
    ROUND_R: tl.constexpr,  # write rounded_ptr (the programs of the first batch tile)
    HAS_LENGTHS: tl.constexpr,  # else every row runs all steps (lengths_ptr unused)
    HAS_H0: tl.constexpr,  # else the state starts at zeros (h0_ptr unused)
    COMPILED: tl.constexpr,  # False under TRITON_INTERPRET=1
):
    rows, units, row_ok, unit_ok, own, own_offsets = _program_tile(batch, hidden, BB, BH)
    plane = batch * hidden
    length = _lengths(lengths_ptr, rows, row_ok, steps, BB, HAS_LENGTHS)
    h = _initial(h0_ptr, own_offsets, own, BB, BH, HAS_H0)
    if not SINGLE:
        _publish(words_ptr, own_offsets, own, h, 1)
    bias_r, bias_z, bias_n = _gate_biases(bias_ptr, units, unit_ok, hidden)

    ks = tl.arange(0, BK)
    k_ok = ks < hidden
    # R^T (1, BK, BH) a gate, reduced over K (axis 1) against the state.
    w_r, w_z, w_n = _weight_chunk(w_ptr, units, unit_ok, 0, hidden, BK)
    # The TF32 backward's R, rounded from registers instead of by two launches on the host
    # (the constexpr test apart, so that it compiles away).
    if ROUND_R:  # noqa: SIM102
        if tl.program_id(0) == 0:
            _store_weight_chunk(
                rounded_ptr, _round_tf32(w_r), _round_tf32(w_z), _round_tf32(w_n),
                units, unit_ok, 0, hidden, BK,
            )  # fmt: skip
    w_r = w_r.to(tl.float32)[None, :, :]
    w_z = w_z.to(tl.float32)[None, :, :]
    w_n = w_n.to(tl.float32)[None, :, :]
    state_offsets = rows[:, None] * hidden + ks[None, :]
    state_mask = row_ok[:, None] & k_ok[None, :]

    gx_rows = gx_ptr + rows[:, None] * (3 * hidden) + units[None, :]
    gx_r, gx_z, gx_n = _input_projections(gx_rows, steps - 1 if REVERSE else 0, batch, hidden, own)

    for step in range(steps):
        t, t_next = _step_time(step, steps, REVERSE)
        next_r, next_z, next_n = _input_projections(gx_rows, t_next, batch, hidden, own)
        if SINGLE:  # units past H hold zeros, like the words past H
            state = h[:, :, None]  # (BB, BK, 1) against R^T's (1, BK, BH)
        else:
            source = words_ptr + (step % 2) * plane
            state = _await_state(source, state_offsets, state_mask, step + 1, COMPILED)
            state = state[:, :, None]
        acc_r = tl.sum(state * w_r, axis=1)
        acc_z = tl.sum(state * w_z, axis=1)
        acc_n = tl.sum(state * w_n, axis=1)
        h = _update(
            h, gx_r, gx_z, gx_n, acc_r, acc_z, acc_n, bias_r, bias_z, bias_n,
            t, length, out_ptr, saved_ptr, rows, units, own, own_offsets, batch, hidden, SAVE,
        )  # fmt: skip
        gx_r, gx_z, gx_n = next_r, next_z, next_n
        if not SINGLE:
            _publish(words_ptr + ((step + 1) % 2) * plane, own_offsets, own, h, step + 2)

    tl.store(h_n_ptr + own_offsets, h.to(h_n_ptr.dtype.element_ty), mask=own)


_launch_tiles = Launcher(_gru_forward_tile_kernel)
_launch_rows = Launcher(_gru_forward_row_kernel)


def gru_direction_forward(
    gates_x: Tensor,
    h0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    saved: Tensor | None = None,
    plan: Plan | None = None,
    rounded: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence over precomputed input projections ``gates_x`` (T, B, 3H) from ``h0``
    (B, H; None: zeros) with every row ``lengths`` long (None: T); returns output (T, B, H)
    and h_n (B, H) in ``gates_x``'s dtype. With ``saved`` (T, B, 4H), also fills it with r, z,
    n and R_n h + b_n of every step; with ``rounded`` (3H, H, contiguous; float32 weights),
    with R rounded to TF32 (products.rounded_to_tf32) for the TF32 backward. ``plan``
    overrides the choice of kernel and tiles (plans.forward_plan)."""
    steps, batch, three_h = gates_x.shape
    check_step_offsets(steps, batch, three_h // 3 * (4 if saved is not None else 3))
    hidden = three_h // 3
    device, dtype = gates_x.device, gates_x.dtype
    out = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    h_n = torch.empty(batch, hidden, device=device, dtype=dtype)
    if steps == 0 or batch == 0:
        if h0 is None:
            h_n.zero_()
        else:
            h_n.copy_(h0)
        return out, h_n
    precision = dot_precision(dtype)
    if precision == TF32:
        precision = forward_tf32(hidden)
    # TF32_HALF's operands are 16-bit: the tiles of 16-bit types.
    element_size = 2 if precision == TF32_HALF else w_hh.element_size()
    if plan is None:
        plan = forward_plan(batch, hidden, element_size, device, precision == TF32_HALF)
        if tuning.enabled():
            save = saved is not None
            problem = ("forward", batch, hidden, w_hh.dtype, precision, save)
            arguments = (gates_x, h0, w_hh, b_hh, lengths, reverse, saved)
            plan = tuning.tuned(
                (*problem, device),
                plan,
                lambda: tile_candidates(
                    batch, hidden, element_size, device, False, precision == TF32_HALF
                ),
                lambda p: gru_direction_forward(*arguments, p),
            )
    # Absent lengths and h0 take the out tensor's place: the kernels do not read them then.
    lengths32 = out if lengths is None else lengths.to(device=device, dtype=torch.int32)
    bias = b_hh if b_hh is not None else w_hh.new_zeros(three_h)
    start = out if h0 is None else h0.contiguous()
    operands = (gates_x.contiguous(), w_hh.contiguous(), bias.contiguous(), start)
    given = {"HAS_LENGTHS": lengths is not None, "HAS_H0": h0 is not None}
    grid = plan.grid(batch, hidden)
    if plan.rows:
        words = out if plan.single else zero_words(2, batch, hidden, device=device)
        _launch_rows(
            grid,
            (
                *operands, lengths32, out, h_n, words, words if saved is None else saved,
                words if rounded is None else rounded, steps, batch, hidden,
            ),
            dict(
                REVERSE=reverse, BB=plan.block_b, BH=plan.block_h, BK=plan.block_k,
                SINGLE=plan.single, SAVE=saved is not None, ROUND_R=rounded is not None,
                **given, COMPILED=not interpreted(),
            ),
            plan.warps,
        )  # fmt: skip
        return out, h_n
    # 16-bit states are exchanged in their own type: tl.dot reads nothing finer.
    exchange_type = w_hh.dtype if dtype != torch.float32 else torch.float32
    scales = bounds = out
    if precision == TF32_HALF:
        half, scales = scaled_half(operands[1])
        operands = (operands[0], half, *operands[2:])
        bounds = state_bounds(h0, out)
        exchange_type = torch.float16
    elif precision == TF32_SPLIT:
        operands = (operands[0], rounded_to_tf32(w_hh, rounded), *operands[2:])
    if rounded is not None and precision != TF32_SPLIT:
        rounded_to_tf32(w_hh, rounded)
    exchange = torch.empty(2, batch, hidden, device=device, dtype=exchange_type)
    counters = torch.zeros(grid[0], device=device, dtype=torch.int32)
    if plan.single and plan.block_k != padded(hidden):
        raise ValueError(f"a single-tile plan holds the whole state in one chunk, got {plan}")
    _launch_tiles(
        grid,
        (
            *operands, lengths32, out, h_n, exchange, exchange if saved is None else saved,
            counters, scales, bounds, steps, batch, hidden,
        ),
        dict(
            REVERSE=reverse, PRECISION=precision,
            BB=plan.block_b, BH=plan.block_h, BK=plan.block_k,
            RESIDENT=plan.resident, CHUNKS=plan.resident_chunks(hidden),
            SINGLE=plan.single, SAVE=saved is not None, **given,
        ),
        plan.warps,
    )  # fmt: skip
    return out, h_n
