"""A persistent Triton kernel for the float GRU recurrence of one layer and one direction.

One launch runs every time step. The input projection of all steps (x W_ih^T + b_ih) is one
large matrix product before the launch; the kernel adds the recurrent product and the gates.

Work split: program (i, j) owns batch rows [i*BB, (i+1)*BB) and hidden units [j*BH, (j+1)*BH)
of all three gates, so it reads the 3*BH rows of R = W_hh it needs (from L2, where R stays
resident across steps) and the whole previous state of its batch rows. States are exchanged
through a global double buffer; after each step the programs of one batch tile meet at a
barrier (an atomic counter per batch tile), which needs every program of the grid resident at
once: the launcher sizes the grid to at most one program per SM. A batch tile with a single
hidden tile meets only itself, which is also how the kernel runs under TRITON_INTERPRET=1,
where programs run one after another.

Semantics are kernels/torch/float_gru.py's (nn.GRU's): r = σ(gx_r + R_r h + b_r),
z = σ(gx_z + R_z h + b_z), n = tanh(gx_n + r ⊙ (R_n h + b_n)), h' = (1 - z) ⊙ n + z ⊙ h;
steps at or past a sequence's length keep its state and write zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _barrier(counter_ptr, target):
    """Wait until the batch tile's counter reaches ``target`` after adding this program's 1.

    The CTA barrier makes every thread's stores precede the release of the (single-thread)
    atomic; the acquiring spin and the second CTA barrier order the loads that follow."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


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
def _gru_forward_kernel(
    gx_ptr,  # (T, B, 3H) input projections with b_ih
    w_ptr,  # (3H, H) recurrent weights, gate order r, z, n
    bias_ptr,  # (3H,) recurrent bias (zeros without bias)
    h0_ptr,  # (B, H)
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, H)
    h_n_ptr,  # (B, H)
    exchange_ptr,  # (2, B, H) float32
    saved_ptr,  # (T, B, 4H) float32: r, z, n and R_n h + b_n of every step (SAVE only)
    counter_ptr,  # (number of batch tiles,) int32, zeros
    steps,
    batch,
    hidden,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32; ignored for 16-bit types
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    RESIDENT: tl.constexpr,  # BK covers H and R's slice is loaded once, before the time loop
    SINGLE: tl.constexpr,  # one hidden tile holds every unit (BH == BK): the state stays here
    SAVE: tl.constexpr,  # training: keep what the backward needs
):
    rows, units, row_ok, unit_ok, own, own_offsets = _program_tile(batch, hidden, BB, BH)
    hidden_tiles = tl.num_programs(1)
    counter = counter_ptr + tl.program_id(0)
    plane = batch * hidden

    length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    h = tl.load(h0_ptr + own_offsets, mask=own, other=0.0).to(tl.float32)
    if not SINGLE:
        tl.store(exchange_ptr + own_offsets, h, mask=own)
        _barrier(counter, hidden_tiles)
    bias_r = tl.load(bias_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)
    bias_z = tl.load(bias_ptr + hidden + units, mask=unit_ok, other=0.0).to(tl.float32)
    bias_n = tl.load(bias_ptr + 2 * hidden + units, mask=unit_ok, other=0.0).to(tl.float32)
    dtype = w_ptr.dtype.element_ty
    if RESIDENT:
        # The whole R^T slice of this program (BK = padded H) stays in registers.
        ks_all = tl.arange(0, BK)
        k_all_ok = ks_all < hidden
        w_mask_all = k_all_ok[:, None] & unit_ok[None, :]
        w_offsets_all = units[None, :] * hidden + ks_all[:, None]
        w_r_all = tl.load(w_ptr + w_offsets_all, mask=w_mask_all, other=0.0)
        w_z_all = tl.load(w_ptr + hidden * hidden + w_offsets_all, mask=w_mask_all, other=0.0)
        w_n_all = tl.load(w_ptr + 2 * hidden * hidden + w_offsets_all, mask=w_mask_all, other=0.0)

    # This step's input projections are loaded one step ahead: they do not depend on the
    # state, so their latency hides behind the previous step's work.
    gx_rows = gx_ptr + rows[:, None] * (3 * hidden) + units[None, :]
    first = steps - 1 if REVERSE else 0
    gx_r = tl.load(gx_rows + first * batch * 3 * hidden, mask=own, other=0.0)
    gx_z = tl.load(gx_rows + first * batch * 3 * hidden + hidden, mask=own, other=0.0)
    gx_n = tl.load(gx_rows + first * batch * 3 * hidden + 2 * hidden, mask=own, other=0.0)

    for step in range(steps):
        t = steps - 1 - step if REVERSE else step
        # The next step's row, clamped to a valid step on the last one (loaded, not used).
        t_next = tl.maximum(t - 1, 0) if REVERSE else tl.minimum(t + 1, steps - 1)
        gx_next = gx_rows + t_next * batch * 3 * hidden
        next_r = tl.load(gx_next, mask=own, other=0.0)
        next_z = tl.load(gx_next + hidden, mask=own, other=0.0)
        next_n = tl.load(gx_next + 2 * hidden, mask=own, other=0.0)
        source = exchange_ptr + (step % 2) * plane
        acc_r = tl.zeros((BB, BH), dtype=tl.float32)
        acc_z = tl.zeros((BB, BH), dtype=tl.float32)
        acc_n = tl.zeros((BB, BH), dtype=tl.float32)
        if RESIDENT:
            if SINGLE:
                h_all = h.to(dtype)  # this program holds the whole state: no exchange
            else:
                h_all = tl.load(
                    source + rows[:, None] * hidden + ks_all[None, :],
                    mask=row_ok[:, None] & k_all_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                ).to(dtype)
            acc_r = tl.dot(h_all, w_r_all, acc_r, input_precision=PRECISION)
            acc_z = tl.dot(h_all, w_z_all, acc_z, input_precision=PRECISION)
            acc_n = tl.dot(h_all, w_n_all, acc_n, input_precision=PRECISION)
        else:
            for k0 in range(0, hidden, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < hidden
                # .cg: read the state from L2, where the other programs' stores are.
                h_k = tl.load(
                    source + rows[:, None] * hidden + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                ).to(dtype)
                w_mask = k_ok[:, None] & unit_ok[None, :]
                w_offsets = units[None, :] * hidden + ks[:, None]  # R^T tile (BK, BH)
                w_r = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
                w_z = tl.load(w_ptr + hidden * hidden + w_offsets, mask=w_mask, other=0.0)
                w_n = tl.load(w_ptr + 2 * hidden * hidden + w_offsets, mask=w_mask, other=0.0)
                acc_r = tl.dot(h_k, w_r, acc_r, input_precision=PRECISION)
                acc_z = tl.dot(h_k, w_z, acc_z, input_precision=PRECISION)
                acc_n = tl.dot(h_k, w_n, acc_n, input_precision=PRECISION)

        r = tl.sigmoid(gx_r.to(tl.float32) + acc_r + bias_r[None, :])
        z = tl.sigmoid(gx_z.to(tl.float32) + acc_z + bias_z[None, :])
        pre_n = gx_n.to(tl.float32) + r * (acc_n + bias_n[None, :])
        gx_r, gx_z, gx_n = next_r, next_z, next_n
        n = 2.0 * tl.sigmoid(2.0 * pre_n) - 1.0  # tanh
        h_new = (1.0 - z) * n + z * h
        if SAVE:
            saved = (
                saved_ptr + t * batch * 4 * hidden + rows[:, None] * (4 * hidden) + units[None, :]
            )
            tl.store(saved, r, mask=own)
            tl.store(saved + hidden, z, mask=own)
            tl.store(saved + 2 * hidden, n, mask=own)
            tl.store(saved + 3 * hidden, acc_n + bias_n[None, :], mask=own)
        active = (t < length)[:, None]
        h = tl.where(active, h_new, h)
        out = out_ptr + t * plane + own_offsets
        tl.store(out, tl.where(active, h_new, 0.0).to(out_ptr.dtype.element_ty), mask=own)
        if not SINGLE:
            tl.store(exchange_ptr + ((step + 1) % 2) * plane + own_offsets, h, mask=own)
            _barrier(counter, hidden_tiles * (step + 2))

    tl.store(h_n_ptr + own_offsets, h.to(h_n_ptr.dtype.element_ty), mask=own)


# R^T slices up to this size stay in registers for the whole launch (48 KiB: 48 registers a
# thread for 8 warps); larger ones are re-read from L2 every step.
RESIDENT_BYTES = 48 * 1024
# All of R up to this size lives in one program (16 warps: 48 registers a thread).
SINGLE_BYTES = 96 * 1024


def _warps(resident: bool, weight_bytes: int) -> int:
    """Enough warps that a resident R slice takes at most about 48 registers a thread."""
    if not resident:
        return 4
    return 16 if weight_bytes > RESIDENT_BYTES else 8


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(batch: int, hidden: int, element_size: int, device: torch.device) -> tuple[int, int]:
    """(BB, BH). When all of R fits in one program's registers, one program per batch tile of
    16 rows holds every hidden unit and needs no barrier. Otherwise batch tiles of up to 64
    rows and hidden tiles as small as fill the SMs once (every program must be resident for
    the barrier). One hidden tile when interpreted."""
    full = max(16, triton.next_power_of_2(hidden))
    if 3 * full * full * element_size <= SINGLE_BYTES:
        return 16, full
    block_b = min(64, max(16, triton.next_power_of_2(batch)))
    batch_tiles = triton.cdiv(batch, block_b)
    if _interpreted() or device.type != "cuda":
        return block_b, full
    programs = torch.cuda.get_device_properties(device).multi_processor_count
    block_h = 16
    while block_h < full and batch_tiles * triton.cdiv(hidden, block_h) > programs:
        block_h *= 2
    if batch_tiles * triton.cdiv(hidden, block_h) > programs:
        raise ValueError(
            f"batch {batch} needs {batch_tiles} batch tiles, more than the {programs} SMs the "
            "persistent kernel can keep resident"
        )
    return block_b, block_h


def gru_direction_forward(
    gates_x: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    saved: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence over precomputed input projections ``gates_x`` (T, B, 3H) from ``h0``
    (B, H); returns output (T, B, H) and h_n (B, H) in ``gates_x``'s dtype. With ``saved``
    (T, B, 4H) float32, also fills it with r, z, n and R_n h + b_n of every step."""
    steps, batch, three_h = gates_x.shape
    hidden = three_h // 3
    device, dtype = gates_x.device, gates_x.dtype
    out = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    h_n = torch.empty(batch, hidden, device=device, dtype=dtype)
    if steps == 0 or batch == 0:
        h_n.copy_(h0)
        return out, h_n
    block_b, block_h = _tiles(batch, hidden, w_hh.element_size(), device)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h))
    if lengths is None:
        lengths32 = torch.full((batch,), steps, device=device, dtype=torch.int32)
    else:
        lengths32 = lengths.to(device=device, dtype=torch.int32)
    bias = b_hh if b_hh is not None else w_hh.new_zeros(three_h)
    exchange = torch.empty(2, batch, hidden, device=device, dtype=torch.float32)
    counters = torch.zeros(grid[0], device=device, dtype=torch.int32)
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    padded = max(16, triton.next_power_of_2(hidden))
    weight_bytes = 3 * padded * block_h * w_hh.element_size()
    single = block_h == padded and weight_bytes <= SINGLE_BYTES
    resident = single or weight_bytes <= RESIDENT_BYTES
    _gru_forward_kernel[grid](
        gates_x.contiguous(),
        w_hh.contiguous(),
        bias.contiguous(),
        h0.contiguous(),
        lengths32,
        out,
        h_n,
        exchange,
        exchange if saved is None else saved,
        counters,
        steps,
        batch,
        hidden,
        REVERSE=reverse,
        PRECISION="tf32" if tf32 else "ieee",
        BB=block_b,
        BH=block_h,
        BK=padded if resident else min(64, padded),
        RESIDENT=resident,
        SINGLE=single,
        SAVE=saved is not None,
        num_warps=_warps(resident, weight_bytes),
    )
    return out, h_n
