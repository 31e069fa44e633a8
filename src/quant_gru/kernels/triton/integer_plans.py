"""How the integer kernel splits one direction over programs (its grid and tiles).

As for the float kernels (plans.py), every program of a launch must be resident at once: a
launch has at most one program a multiprocessor, and larger batches run in several launches
of whole batch tiles. Among the tilings with the most programs (the pointwise work of a step
spreads over all of them), the plan takes the one that reads the fewest bytes a step: each
program reads its rows of the state (one byte a digit) and, unless its slice of R stays on
chip, that slice (one byte a digit).

R's slice stays on chip only up to RESIDENT_BYTES. Measured on an H100 (8-bit model, a whole
inference): at (64, H=512) 16 x 16 tiles 2.60 ms re-reading their 24 KiB slice every step
against 3.15 keeping it; at (256, H=1024) 64 x 32 tiles re-reading 3.00 ms, 128 x 16 tiles
keeping their 48 KiB 3.51 (ptxas, sm_90a: kept int8 slices spill registers, 1.5 KB a thread
there, 0.1 KB re-read). Slices up to 8 KiB are not measured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from quant_gru.kernels.triton.plans import (
    ROW_SLICE_ELEMENTS,
    ROW_SLICE_ELEMENTS_4_WARPS,
    Plan,
    ceil_div,
    padded,
    power_of_two,
)

ROW_TILES = (16, 32, 64, 128)  # tl.dot takes at least 16 rows
UNIT_TILES = (16, 32, 64, 128, 256)
CHUNK = 64  # K chunk of the recurrent product
# K chunk of tiles of LARGE_TILE elements or more that read R every step. Triton (3.6) waits
# for each chunk's int8 wgmma before the next (float ones stay in flight): longer chunks,
# fewer waits. Measured on an H100, (256, H=1024) 64 x 32 tiles, a whole 8-bit inference:
# 2.92 ms in chunks of 128 against 3.15 in chunks of 64 (and 2.92 / 3.15 in another run).
WIDE_CHUNK = 128
MIN_CHUNK = 32  # tl.dot of int8 on the matrix cores takes K >= 32 (past H: masked zeros)
LARGE_TILE = 2048  # tiles of this many elements or more run on 8 warps, others on 4
RESIDENT_BYTES = 8 * 1024  # R's slices (int8) kept on chip up to this size
PACKED_UNITS = 16  # the fewest units a row program packs its products for (dp4a)
# Row programs of the float plans with fewer units than PACKED_UNITS (one row, many programs)
# take this many instead, four digits a word. Measured on an H100, 8-bit inference at
# (1, 1000, 256, 256), one row a program (whole call, ms): 4 units on 4 warps (64 programs,
# the float plan, a digit a word) 2.02; 32 on 4 1.61; 64 on 4 1.76; 64 on 8 1.78; 128 on 8
# 2.00; all 256 on 16 warps 3.00 (our float inference 1.70 in that run).
ROW_UNITS = 32


@dataclass(frozen=True)
class IntegerPlan:
    """Programs own ``block_b`` batch rows and ``block_h`` hidden units of all three gates and
    read the state in chunks of ``block_k``; ``resident``: R's slice is loaded once, before
    the time loop; a launch takes ``launch_rows`` batch rows."""

    block_b: int
    block_h: int
    block_k: int
    warps: int
    resident: bool
    launch_rows: int

    def chunks(self, hidden: int) -> int:
        """How many chunks of ``block_k`` cover H."""
        return ceil_div(hidden, self.block_k)


# Cached: a plan is made for every launch, and searching the tilings took about 160 us of host
# time a call.
@functools.lru_cache(maxsize=4096)
def integer_plan(
    batch: int, hidden: int, h_digits: int, r_digits: int, programs: int | None
) -> IntegerPlan:
    """The plan for ``batch`` rows of H = ``hidden`` with the state and R in ``h_digits`` and
    ``r_digits`` digits, on a GPU of ``programs`` multiprocessors (None: under the
    interpreter, where programs run one after another, so each batch tile is one program
    holding every unit). R's slice stays on chip only with one digit each (the kernel's
    single-product path)."""
    full = max(UNIT_TILES[0], power_of_two(hidden))
    block_k = max(MIN_CHUNK, min(CHUNK, full))
    one_digit = h_digits == 1 and r_digits == 1

    def resident(block_h: int) -> bool:
        chunks = ceil_div(hidden, block_k)
        return one_digit and 3 * block_h * chunks * block_k <= RESIDENT_BYTES

    if programs is None:
        return IntegerPlan(ROW_TILES[0], full, block_k, 4, resident(full), batch)
    best: tuple[tuple[int, int, int], IntegerPlan] | None = None
    for block_h in (u for u in UNIT_TILES if u <= full):
        hidden_tiles = ceil_div(hidden, block_h)
        if hidden_tiles > programs:
            continue
        for block_b in ROW_TILES:
            batch_tiles = min(ceil_div(batch, block_b), programs // hidden_tiles)
            grid = batch_tiles * hidden_tiles
            on_chip = resident(block_h)
            slice_bytes = 0 if on_chip else 3 * block_h * hidden * r_digits
            step_bytes = grid * (block_b * hidden * h_digits + slice_bytes)
            large = block_b * block_h >= LARGE_TILE
            warps = 8 if large else 4
            chunk = WIDE_CHUNK if large and not on_chip and full >= WIDE_CHUNK else block_k
            plan = IntegerPlan(block_b, block_h, chunk, warps, on_chip, batch_tiles * block_b)
            # Fewest launches, then most programs, then fewest bytes a step.
            score = (ceil_div(batch, plan.launch_rows), -grid, step_bytes)
            if best is None or score < best[0]:
                best = (score, plan)
    if best is None:
        raise ValueError(f"hidden_size {hidden} needs more than {programs} programs a batch tile")
    return best[1]


def merged_gates(plan: IntegerPlan, save: bool) -> bool:
    """Whether the tile kernel takes the three gates in one product of N = 4 BH (else one
    product a gate): everywhere but QAT's saving launches (``save``) on tiles of LARGE_TILE
    elements or more. Compiled for sm_90a (Triton 3.6), the saving kernel at (256, H=1024)
    (64 x 32 tiles, 8 warps, K chunks of 128) spills 1.1 KB a thread with one product against
    0.24 KB with three (time loop: 4186 against 3879 instructions), while at (64, H=512)
    (16 x 16, 4 warps) one product needs 1095 instructions a step and three 2492. On an H100
    a QAT step at (256, 200, 1024, 1024) took 21.64 ms with the kernels of 0865297 (one
    product) against 19.08 with 72dfc5f's (three; an A/B in one run, where the float
    backward differed too), and 8.96 against 9.87 ms at (64, 512, 512, 512)."""
    return not (save and plan.block_b * plan.block_h >= LARGE_TILE)


# Cached as integer_plan is: the row plan is made on every launch.
@functools.lru_cache(maxsize=4096)
def integer_row_plan(float_plan: Plan, hidden: int, words: bool) -> Plan:
    """The integer row kernel's plan from the float row kernel's ``float_plan`` (the same
    rows and hand-over): where its programs hold fewer than PACKED_UNITS units and R has
    words of four digits (``words``), ROW_UNITS units a program instead (fewer programs, each
    with products four digits at a time), on 4 warps or, past ROW_SLICE_ELEMENTS_4_WARPS
    words, 8; unchanged where that slice would not fit ROW_SLICE_ELEMENTS."""
    if float_plan.single or float_plan.block_h >= PACKED_UNITS or not words:
        return float_plan
    full = padded(hidden)
    block_h = min(ROW_UNITS, full)
    slice_words = 3 * block_h * full // 4
    if block_h < PACKED_UNITS or slice_words > ROW_SLICE_ELEMENTS:
        return float_plan
    warps = 4 if slice_words <= ROW_SLICE_ELEMENTS_4_WARPS else 8
    return replace(float_plan, block_h=block_h, warps=warps)
