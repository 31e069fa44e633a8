"""How the persistent kernels split one GRU direction over programs.

Every program of a persistent kernel must be resident at once (they wait for each other every
step), so a grid never has more programs than the GPU has SMs. Under TRITON_INTERPRET=1
programs run one after another and could never wait for each other: there each batch tile is
one program holding every hidden unit.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# Tile kernels load R^T slices up to this size once, before the time loop (Triton keeps a
# tl.dot operand loaded there in shared memory); larger ones are re-read from L2 every step,
# which measured faster on an H100 for 96 KiB float32 slices.
RESIDENT_BYTES = 48 * 1024
# The tile kernels' products take the state in chunks of this many units (K) where R's slice
# is re-read every step, and in float32 where it stays on chip: fewer operand registers live
# at once. At H=256 with 16-row tiles, TF32 with a split state spilled 1.9 KB (ptxas, sm_90a)
# in one chunk of K and took 107 us a step on an H100; in chunks of 64, 6.3 us.
CHUNK = 64
# All of R up to this size lives in one program (16 warps: 48 registers a thread).
SINGLE_BYTES = 96 * 1024
# Batches up to this size take the row kernel with one batch row a program and a slice of R
# (products on the CUDA cores, states handed over in tagged words) where all of R does not fit
# one program: measured on an H100, its steps take less time than the tile kernel's in float32
# and TF32 up to 16 rows, and no more in bfloat16. (Row programs holding all of R, and the
# forward's wide slices, reach past it: ROW_REGISTER_ELEMENTS.)
ROW_KERNEL_MAX_BATCH = 16
# Warps of a tile program (``_tile_warps``): 8 for tiles of at least LARGE_TILE elements
# with a float32 state (float32, and TF32 on 16-bit operands in the forward), 2 for tiles of
# at most SMALL_TILE elements in 16-bit types and in the float32 backward, else 4. Measured
# on an H100, a step:
# - float32 (TF32) at (256, H=1024), forward 64 x 32 tiles: 18.5 us on 8 warps, 20.1 on 4
#   (training forward 18.6 against 21.9); backward 32 x 64: 33 against 35-36 on 4 in chunks
#   of 32 (the autotuner tries that too), 45-46 on 4 in chunks of 64.
# - TF32 on 16-bit operands (TF32_HALF), forward 64 x 32 tiles at (256, H=1024), the gates in
#   one product: a whole inference 2.47 ms on 8 warps, 3.22 on 4 (ptxas: 4 warps spill).
# - float32 tiles of 1024 elements at (128, H=1024) and (256, H=512): 4 warps fastest, by
#   8 to 20 %; bfloat16 64 x 32 at (256, H=1024): 8.5 on 4, 10.4 on 8.
# - 2 warps against 4, tiles of 128 and 256 elements at (64, H=256) and (64, H=512):
#   bfloat16 forward 2.7 against 3.0 and 3.4 against 3.6, backward 3.5 against 3.9 and 4.4
#   against 4.7; float32 backward 6.2 against 6.4 and 7.9 against 9.2. The float32 forward
#   was mixed (5.3 against 4.8 at (64, H=512) without saving, 5.0 against 7.1 saving), so it
#   keeps 4.
LARGE_TILE = 2048
SMALL_TILE = 256
# The float32 backward's hidden tiles have at least this many units: fewer programs meet at
# each barrier. Measured on an H100 (TF32, us a step, 2 warps), 16 x 16 tiles against 16 x 8:
# (32, H=256) 4.86 against 5.56, (64, H=256) 4.84 against 5.51, (64, H=192) 4.26 against 4.77;
# (128, H=256) and (64, H=384) took 16 x 16 already (4.85, 6.24; 16 x 8: 6.34, 7.60).
FLOAT32_BACKWARD_UNITS = 16
# One row a program with a slice of R keeps it in float32 registers: at most 96 a thread, for
# 4 warps (fastest where it fits) or 8.
ROW_SLICE_ELEMENTS_4_WARPS = 96 * 32 * 4
ROW_SLICE_ELEMENTS = 96 * 32 * 8
# Row programs that hold all of R (``_single_row_plan``), or wide slices of it for larger
# batches (``_wide_row_plan``): up to 192 float32 elements of R a thread on 8 warps, so all of
# R up to H = 128. Measured on an H100, forward / backward a step:
# - all of R, float32: (16, H=128) 0.76 / 1.23 us on 8 warps, 1.01 / 1.31 on 16, against
#   1.43 / 1.85 with the handover between 8 programs a row; (64, H=128) 0.77 / 1.22 against
#   8.4 / 4.3 for the tile kernels; (4, H=64) 0.53 / 0.64 on 4 warps, 0.64 / 0.77 on 8.
#   bfloat16 (16, H=128) 0.82 / 1.26 on 8 warps, 1.12 / 1.58 on 16.
# - wide slices, forward: float32 (64, H=256) 2 rows x 64 units a program 3.2 us, against
#   4.4 for the TF32 tile kernel and 15.6 for the IEEE one; (32, H=256) 1 x 64 2.2 against 4.9
#   (TF32). bfloat16 2.7 against 2.7, and 2.0 against 2.7. With 4 rows a program, at
#   (128, H=256): float32 5.5 against 5.8-7.3 (TF32), bfloat16 4.9 against 3.3; so 2 at most.
#   Several rows in the backward row kernel spill registers (ptxas, sm_90a). Measured again
#   with the 16-bit tiles of ``_resident_tiles``, bfloat16 a step: (64, H=256) 2 rows a program
#   2.19 us against 2.07 for 16 x 32 tiles (saving: 2.29 against 2.16); (32, H=256) one row
#   1.55 against 2.03-2.14. So 16-bit types take wide rows of one row a program only.
# - all of R, past one program per SM (132 on the H100), TF32 / bf16 against the tile
#   kernels, forward / backward: H=128 at 264 rows (2 waves) 2.1 / 3.4 against 4.5 / 5.1,
#   bf16 2.0 / 2.8 against 2.4 / 6.0; at 528 rows mixed (TF32 3.2 / 5.4 against 3.7 / 5.1,
#   bf16 3.2 / 5.1 against 2.4 / 6.5). H=64 at 528 rows 2.0 / 2.4 against 2.3 / 4.7 (TF32).
#   Hence ROW_SINGLE_WAVES.
ROW_REGISTER_ELEMENTS = 192 * 32 * 8
ROW_WIDE_MAX_ROWS = 2
ROW_WIDE_MAX_ROWS_16_BIT = 1
ROW_SINGLE_WAVES = 2


@dataclass(frozen=True)
class Plan:
    """A grid of (batch tiles, hidden tiles) programs, each owning ``block_b`` batch rows and
    ``block_h`` hidden units of all three gates, reading the state in chunks of ``block_k``.

    ``rows``: the row kernel (CUDA-core products, tagged state words); otherwise the tile
    kernel (tl.dot, barrier). ``resident``: R's slice is loaded once, before the time loop.
    ``single``: one hidden tile holds every unit, so the state never leaves the program."""

    rows: bool
    block_b: int
    block_h: int
    block_k: int
    warps: int
    resident: bool = True
    single: bool = False

    def grid(self, batch: int, hidden: int) -> tuple[int, int]:
        return ceil_div(batch, self.block_b), ceil_div(hidden, self.block_h)

    def resident_chunks(self, hidden: int) -> int:
        """How many K chunks of ``block_k`` hold a resident R slice (1 when not resident)."""
        return padded(hidden) // self.block_k if self.resident else 1


# The kernels address (T, B, width) tensors with int32 products of step, row and channel.
INDEX_LIMIT = 2**31


def check_step_offsets(steps: int, batch: int, width: int) -> None:
    """Refuse a sequence whose (T, B, width) tensors the kernels' int32 offsets cannot
    address, rather than let them overflow."""
    if steps * batch * width >= INDEX_LIMIT:
        raise ValueError(
            f"the Triton kernels address at most 2^31 elements a tensor, and T * B * {width} = "
            f"{steps} * {batch} * {width} is {steps * batch * width}: split the sequence into "
            "chunks (passing h_n on as hx) or use backend='torch'"
        )


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resident_programs(device: torch.device) -> int | None:
    """The SM count, or None where programs cannot wait for each other (one hidden tile)."""
    if interpreted() or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    # Cached: plans are made on every call, and the properties never change.
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def batch_limit(device: torch.device) -> int | None:
    """The most batch rows one launch takes (64-row tiles, one program per SM); None where
    there is no limit (under the interpreter)."""
    programs = resident_programs(device)
    return None if programs is None else 64 * programs


def padded(hidden: int) -> int:
    return max(16, power_of_two(hidden))


# Plain integer helpers: triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# calls from Python cost microseconds each, and Plan.grid runs on every launch.
def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def power_of_two(n: int) -> int:
    """The smallest power of two at least ``n`` (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def _fewest_units(row_tiles: int, hidden: int, smallest: int, programs: int) -> int | None:
    """The fewest hidden units a program (a power of two from ``smallest``) with which
    ``row_tiles`` batch tiles fill at most ``programs`` SMs; None when even one hidden tile
    a batch tile is too many."""
    full = padded(hidden)
    block_h = smallest
    while block_h < full and row_tiles * ceil_div(hidden, block_h) > programs:
        block_h *= 2
    return None if row_tiles * ceil_div(hidden, block_h) > programs else block_h


def row_plan(
    batch: int, hidden: int, device: torch.device, backward: bool = False, element_size: int = 4
) -> Plan | None:
    return _row_plan(batch, hidden, resident_programs(device), backward, element_size)


def _row_plan(
    batch: int, hidden: int, programs: int | None, backward: bool, element_size: int
) -> Plan | None:
    """Row programs, R's slice in float32 registers. Where all of R fits one program
    (``_single_row_plan``), one row a program holding every hidden unit; else, up to
    ROW_KERNEL_MAX_BATCH rows, one row a program with the fewest hidden units that fill the
    SMs once; for larger batches the forward's ``_wide_row_plan``. None when none fits. The
    forward holds R's rows of its units in all three gates (3 x block_h x padded H), the
    backward R's columns of its units (padded 3H x block_h)."""
    single = _single_row_plan(batch, hidden, programs)
    if single is not None:
        return single
    if batch > ROW_KERNEL_MAX_BATCH:
        if backward:
            return None
        wide_rows = ROW_WIDE_MAX_ROWS if element_size == 4 else ROW_WIDE_MAX_ROWS_16_BIT
        return _wide_row_plan(batch, hidden, programs, wide_rows)
    full = padded(hidden)
    block_k = max(16, power_of_two(3 * hidden)) if backward else full
    per_unit = block_k if backward else 3 * full
    if programs is None:
        block_h = full  # one hidden tile: no register budget to respect under the interpreter
    else:
        fewest = _fewest_units(batch, hidden, 4, programs)
        if fewest is None or per_unit * fewest > ROW_SLICE_ELEMENTS:
            return None
        block_h = fewest
    warps = 4 if per_unit * block_h <= ROW_SLICE_ELEMENTS_4_WARPS else 8
    return Plan(rows=True, block_b=1, block_h=block_h, block_k=block_k, warps=warps)


def _single_row_plan(batch: int, hidden: int, programs: int | None) -> Plan | None:
    """One batch row a program holding all of R (3 x padded H x padded H in float32) and the
    whole state, which never leaves it: no handover between programs, so they need not all be
    resident, and rows past one program per SM run in later waves. Where R fits
    ROW_REGISTER_ELEMENTS and the rows fill at most ROW_SINGLE_WAVES waves of the SMs: on 8
    warps, or 4 where R takes at most half of that. Under the interpreter only up to
    ROW_KERNEL_MAX_BATCH rows, so that larger batches exercise the tile kernels there."""
    full = padded(hidden)
    if 3 * full * full > ROW_REGISTER_ELEMENTS:
        return None
    if batch > (ROW_KERNEL_MAX_BATCH if programs is None else ROW_SINGLE_WAVES * programs):
        return None
    warps = 4 if 3 * full * full <= ROW_REGISTER_ELEMENTS // 2 else 8
    return Plan(rows=True, block_b=1, block_h=full, block_k=full, warps=warps, single=True)


def _wide_row_plan(batch: int, hidden: int, programs: int | None, max_rows: int) -> Plan | None:
    """The forward for batches over ROW_KERNEL_MAX_BATCH: programs of up to ``max_rows``
    rows on 8 warps, each holding R's rows of the most units (a power of two below padded H)
    that fit ROW_REGISTER_ELEMENTS, handing the state over in tagged words; None where the
    grid would not fit on the SMs at once, and under the interpreter."""
    if programs is None:
        return None
    full = padded(hidden)
    block_h = full // 2
    while block_h > 4 and 3 * block_h * full > ROW_REGISTER_ELEMENTS:
        block_h //= 2
    if 3 * block_h * full > ROW_REGISTER_ELEMENTS:
        return None
    for block_b in range(1, max_rows + 1):
        if ceil_div(batch, block_b) * ceil_div(hidden, block_h) <= programs:
            return Plan(rows=True, block_b=block_b, block_h=block_h, block_k=full, warps=8)
    return None


def tile_tiles(batch: int, hidden: int, element_size: int, device: torch.device) -> tuple[int, int]:
    return _tile_tiles(batch, hidden, element_size, resident_programs(device))


def _tile_tiles(
    batch: int, hidden: int, element_size: int, programs: int | None
) -> tuple[int, int]:
    """(block_b, block_h) of the forward tile kernel. When all of R fits in one program's
    registers, one program per batch tile of 16 rows holds every hidden unit and needs no
    barrier. 16-bit types take ``_resident_tiles`` where they fit. Otherwise the tiles of
    ``_least_reads``, where a program reads the state of its
    rows a step, and its R slice unless that stays on chip. Measured on an H100 with the TF32
    forward: 8-unit tiles of 16 rows at (64, H=256), 4.4 against 6.1 us a step with 16 units;
    at (64, H=512) 32 rows of 8 units, whose R stays on chip, 7.0 against 8.7 with 16 rows of
    16 units re-reading it; 64-row tiles at (256, H=1024)."""
    full = padded(hidden)
    if 3 * full * full * element_size <= SINGLE_BYTES:
        return 16, full
    if element_size < 4 and programs is not None:
        tiles = _resident_tiles(batch, hidden, element_size, programs)
        if tiles is not None:
            return tiles

    def reads(block_b: int, block_h: int) -> int:
        weight_bytes = 3 * block_h * full * element_size
        return block_b * full * element_size + (
            0 if weight_bytes <= RESIDENT_BYTES else weight_bytes
        )

    return _least_reads(batch, hidden, programs, reads)


def _resident_tiles(
    batch: int, hidden: int, element_size: int, programs: int
) -> tuple[int, int] | None:
    """16-bit types: the widest hidden tile (at least 8 units, less than padded H) whose R
    slice stays on chip (RESIDENT_BYTES), with the fewest batch rows (16, 32 or 64) that fit
    the grid on the SMs; None where none does. Measured on an H100 (bfloat16, us a step,
    against the fewest units with 16 rows): (64, H=256) 16 x 32 tiles, forward 2.07 against
    2.06, saving 2.16 against 2.20, backward 2.76 against 2.92; (128, H=256) forward 2.14
    against 2.57, saving 2.34 against 2.70, backward 2.84 against 3.19; (64, H=512) 16 x 16,
    3.21, the same tiles (32 x 8 took 3.20)."""
    full = padded(hidden)
    block_h = full // 2
    while block_h > 8 and 3 * block_h * full * element_size > RESIDENT_BYTES:
        block_h //= 2
    if 3 * block_h * full * element_size > RESIDENT_BYTES:
        return None
    rows = max(16, power_of_two(batch))
    for block_b in (16, 32, 64):
        if block_b > rows:
            break
        if ceil_div(batch, block_b) * ceil_div(hidden, block_h) <= programs:
            return block_b, block_h
    return None


def _backward_tiles(
    batch: int, hidden: int, element_size: int, programs: int | None
) -> tuple[int, int]:
    """(block_b, block_h) of the backward tile kernel. 16-bit types take the forward's tiles
    (R's columns then often stay on chip). Float32, whose columns are re-read every step, takes
    the tiles of ``_least_reads`` where a program reads the three gates' gradients of its rows
    and R's columns of its units a step. Measured on an H100 (TF32, us a step, this rule
    against the forward's tiles, both on 4 warps): (256, H=1024) 32 x 64 tiles 35 against 44;
    (128, H=1024) 32 x 32, 21 against 28; (256, H=512) 32 x 32, 13 against 18. Hidden tiles
    of 16 units at least (FLOAT32_BACKWARD_UNITS)."""
    if element_size < 4:
        return _tile_tiles(batch, hidden, element_size, programs)
    full = padded(hidden)

    def reads(block_b: int, block_h: int) -> int:
        return 3 * full * (block_b + block_h) * element_size

    return _least_reads(batch, hidden, programs, reads, FLOAT32_BACKWARD_UNITS)


def _least_reads(
    batch: int,
    hidden: int,
    programs: int | None,
    reads: Callable[[int, int], int],
    smallest: int = 8,
) -> tuple[int, int]:
    """Of batch tiles of 16, 32 or 64 rows, each with hidden tiles (``smallest`` units or
    more) as small as fill the SMs once, the one whose program ``reads`` the fewest bytes
    from L2 a step (the fewer rows on a tie). Under the interpreter: one program a batch tile
    of up to 64 rows."""
    rows = max(16, power_of_two(batch))
    if programs is None:
        return min(64, rows), padded(hidden)
    best: tuple[int, int, int] | None = None
    for block_b in (16, 32, 64):
        if block_b > rows:
            break
        block_h = _fewest_units(ceil_div(batch, block_b), hidden, smallest, programs)
        if block_h is None:
            continue
        cost = reads(block_b, block_h)
        if best is None or cost < best[0]:
            best = (cost, block_b, block_h)
    if best is None:
        raise ValueError(
            f"batch {batch} needs {ceil_div(batch, 64)} batch tiles, more than the {programs} "
            "SMs the persistent kernel can keep resident"
        )
    return best[1], best[2]


def _resident_chunk(full: int, element_size: int) -> int:
    """The K chunk of a resident R slice: all of it at once for 16-bit types, CHUNK for
    float32 (measured on an H100 at (64, H=256), 16-row tiles: bfloat16 3.0 against 4.6 us a
    step in chunks of 64; float32 16 against 45 us, TF32 with a split state 6.3 against 107)."""
    return full if element_size < 4 else min(CHUNK, full)


def tile_plan(batch: int, hidden: int, element_size: int, device: torch.device) -> Plan:
    return _tile_plan(batch, hidden, element_size, resident_programs(device))


def _tile_plan(
    batch: int, hidden: int, element_size: int, programs: int | None, float_state: bool = False
) -> Plan:
    block_b, block_h = _tile_tiles(batch, hidden, element_size, programs)
    full = padded(hidden)
    weight_bytes = 3 * full * block_h * element_size
    single = block_h == full and weight_bytes <= SINGLE_BYTES
    if not single:
        return _forward_tile_plan(block_b, block_h, hidden, element_size, float_state)
    # One program holds all of R: enough warps for about 48 registers a thread. The state never
    # leaves its registers, so the products take it in one chunk.
    warps = 16 if weight_bytes > RESIDENT_BYTES else 8
    return Plan(False, block_b, block_h, full, warps, resident=True, single=True)


def _forward_tile_plan(
    block_b: int, block_h: int, hidden: int, element_size: int, float_state: bool = False
) -> Plan:
    """The forward tile kernel's plan for these tiles (not single): R's slice stays on chip
    where it fits RESIDENT_BYTES, in K chunks by ``_resident_chunk``, else it is read in
    chunks every step. ``float_state``: float32 states on operands of ``element_size``
    bytes (TF32_HALF)."""
    full = padded(hidden)
    resident = 3 * block_h * full * element_size <= RESIDENT_BYTES
    block_k = _resident_chunk(full, element_size) if resident else min(CHUNK, full)
    warps = _tile_warps(block_b, block_h, element_size, backward=False, float_state=float_state)
    return Plan(False, block_b, block_h, block_k, warps, resident=resident)


def _tile_warps(
    block_b: int, block_h: int, element_size: int, backward: bool, float_state: bool = False
) -> int:
    """The warps of a tile program (measurements at LARGE_TILE)."""
    tile = block_b * block_h
    if (element_size == 4 or float_state) and tile >= LARGE_TILE:
        return 8
    if tile <= SMALL_TILE and (backward or element_size < 4):
        return 2
    return 4


def forward_plan(
    batch: int, hidden: int, element_size: int, device: torch.device, float_state: bool = False
) -> Plan:
    """``float_state``: operands of ``element_size`` bytes with float32 states (TF32_HALF)."""
    return _plan(
        batch, hidden, element_size, resident_programs(device), backward=False,
        float_state=float_state,
    )  # fmt: skip


def backward_plan(batch: int, hidden: int, element_size: int, device: torch.device) -> Plan:
    return _plan(batch, hidden, element_size, resident_programs(device), backward=True)


# Cached: a plan is made on every call, and in Python that cost tens of microseconds of the
# host time an eager call spends before its kernel starts.
@functools.lru_cache(maxsize=4096)
def _plan(
    batch: int,
    hidden: int,
    element_size: int,
    programs: int | None,
    backward: bool,
    float_state: bool = False,
) -> Plan:
    """The forward's kernel and tiles: the row kernel where a few programs hold R in
    registers (``_row_plan``), else the tile kernel. The backward's: the row kernel where R's
    columns fit likewise, else the tile kernel with ``_backward_tiles``."""
    plan = _row_plan(batch, hidden, programs, backward, element_size)
    if plan is not None:
        return plan
    if not backward:
        return _tile_plan(batch, hidden, element_size, programs, float_state)
    block_b, block_h = _backward_tiles(batch, hidden, element_size, programs)
    return _backward_tile_plan(block_b, block_h, hidden, element_size)


def _backward_tile_plan(block_b: int, block_h: int, hidden: int, element_size: int) -> Plan:
    """The backward tile kernel's plan for these tiles: R's columns stay on chip in one chunk
    for 16-bit types where they fit RESIDENT_BYTES, else it reads them in chunks every step.
    Measured on an H100: bfloat16 at (64, H=256) 3.6 against 5.0 us a step; float32 slower on
    chip (8.2 against 6.0 us, TF32)."""
    full = padded(hidden)
    resident = element_size < 4 and 3 * full * block_h * element_size <= RESIDENT_BYTES
    block_k = full if resident else min(CHUNK, full)
    warps = _tile_warps(block_b, block_h, element_size, backward=True)
    return Plan(False, block_b, block_h, block_k, warps, resident=resident)


def tile_candidates(
    batch: int,
    hidden: int,
    element_size: int,
    device: torch.device,
    backward: bool,
    float_state: bool = False,
) -> list[Plan]:
    """The tile plans the autotuner measures (tuning.py): batch tiles of 16 to 64 rows and
    hidden tiles of 8 to 32 units (64 too in the backward) whose grid fits on the SMs once.
    R's slice stays on chip where it fits RESIDENT_BYTES (in the backward, for 16-bit types
    only), else it is read in chunks every step: of 64 rows. Each plan runs on the warps of
    ``_tile_warps`` and, where those are not 4, on 4 as well (large float32 backward tiles
    then in chunks of 32). Each plan costs a compilation, so the set keeps to the tiles that
    came out fastest somewhere in a sweep on an H100. None under the interpreter."""
    programs = resident_programs(device)
    if programs is None:
        return []
    full = padded(hidden)
    rows = max(16, power_of_two(batch))
    plans = []
    for block_b in (16, 32, 64):
        for block_h in (8, 16, 32, 64) if backward else (8, 16, 32):
            grid = ceil_div(batch, block_b) * ceil_div(hidden, block_h)
            if block_b > rows or block_h >= full or grid > programs:
                continue
            if backward:
                plan = _backward_tile_plan(block_b, block_h, hidden, element_size)
            else:
                plan = _forward_tile_plan(block_b, block_h, hidden, element_size, float_state)
            plans.append(plan)
            if plan.warps == 8 and backward:
                plans.append(replace(plan, block_k=min(32, full), warps=4))
            elif plan.warps != 4:
                plans.append(replace(plan, warps=4))
    return plans
