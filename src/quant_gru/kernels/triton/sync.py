"""How the programs of a persistent kernel hand the state of one step to the next.

Two ways, both needing every program of the grid resident at once (the launchers size the grid
to at most one program per SM):

- ``_barrier``: programs store their part of the state, then meet at an atomic counter;
  after it everyone reads the whole state. Two round trips to L2 (the atomic, the reads).
- ``_publish`` / ``_await_state``: each element carries the step it belongs to. A state value
  (float32 bits) and its step number share one 64-bit word, which a single store writes
  whole, so a reader that sees the step it waits for also sees that step's value. Readers
  re-read until every word is current: one round trip when the writers are ahead. Words are
  8 bytes, so this suits small batch tiles, where the latency matters most.
- ``_publish_packed`` / ``_await_packed_rows``: the same in 4-byte words, for states that are
  exactly a bfloat16, float16 or TF32 value (what the tile kernels' products read): as a
  float32 such a value has its low 13 bits zero, which carry the step instead (modulo 2^13).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant_gru.kernels.triton.products import TF32


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


# True: the tile kernels hand states over in packed words wherever the products read them as
# 16-bit or TF32 values (``packs_exchange``); False: every tile kernel meets at the barrier.
# Off until timed on a GPU (benchmarks/tile_exchange.py); the tests run both.
PACKED_EXCHANGE = False


def packs_exchange(weight_dtype: torch.dtype, precision: str) -> bool:
    """Whether a tile kernel whose products take ``precision`` (products.dot_precision, or the
    forward's TF32 variant) over weights of ``weight_dtype`` exchanges packed words: where every
    exchanged value is exactly what its product reads, a 16-bit or TF32 value."""
    return PACKED_EXCHANGE and (weight_dtype != torch.float32 or precision == TF32)


def exchange_buffers(
    planes: int,
    batch: int,
    width: int,
    batch_tiles: int,
    weight_dtype: torch.dtype,
    packed: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A tile kernel's (exchange buffer (planes, batch, width), barrier counters): packed words,
    all tags 0, and the buffer in the counters' place (unused); or values in float32 (16-bit
    weights: their type, which is what tl.dot reads) and a zero counter per batch tile."""
    if packed:
        words = torch.zeros(planes, batch, width, device=device, dtype=torch.int32)
        return words, words
    exchange = torch.empty(planes, batch, width, device=device, dtype=weight_dtype)
    return exchange, torch.zeros(batch_tiles, device=device, dtype=torch.int32)


def zero_words(*shape: int, device: torch.device) -> torch.Tensor:
    """Tagged words for ``_publish`` / ``_await_state``, all tags 0 (no step yet)."""
    return torch.zeros(shape, device=device, dtype=torch.int64)


@triton.jit
def _publish(words_ptr, offsets, mask, state, tag):
    """Store float32 ``state`` at ``offsets`` of the int64 words, each marked with ``tag``."""
    bits = state.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    tl.store(words_ptr + offsets, bits | (tl.cast(tag, tl.int64) << 32), mask=mask)


@triton.jit
def _every_thread(ok):
    """1 where every thread of the program holds 1 at this place of its registers, else 0.

    A CTA-wide AND over all threads (bar.red), not a tl.min: reductions count a value that
    several threads hold in copies (a replicated layout) once, yet each of those threads
    loaded its copy itself, and a copy loaded a moment earlier can be stale."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $1, 0; bar.red.and.pred p, 0, p; selp.s32 $0, 1, 0, p; }",
        "=r,r",
        [ok],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _await_state(words_ptr, offsets, mask, tag, COMPILED: tl.constexpr):
    """The float32 state at ``offsets`` once every word there carries ``tag`` (masked-out
    places read 0). Tags only grow, and the double buffer keeps a word from moving past
    ``tag`` before this program has read it. ``COMPILED``: False under TRITON_INTERPRET=1,
    which runs one thread a program (and no inline assembly)."""
    words = tl.load(words_ptr + offsets, mask=mask, other=0, volatile=True)
    # The condition recomputes the tags rather than carrying them: triton 3.6 fails to
    # compile a while loop that carries a second tensor.
    if COMPILED:
        while tl.min(_every_thread(~mask | ((words >> 32).to(tl.int32) >= tag))) == 0:
            words = tl.load(words_ptr + offsets, mask=mask, other=0, volatile=True)
    else:
        while tl.min(tl.where(mask, (words >> 32).to(tl.int32), tag)) < tag:
            words = tl.load(words_ptr + offsets, mask=mask, other=0, volatile=True)
    return (words & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)


# Packed words: the low 13 bits of a float32 are zero in every bfloat16, float16 and TF32 value
# (10 or fewer mantissa bits) and carry the tag there. Tags wrap modulo 2^13; a reader compares
# for equality, and the double buffer keeps a word at its step or the one two before (never two
# after), which differ modulo 2^13.


@triton.jit
def _publish_packed(words_ptr, offsets, mask, value, tag):
    """Store float32 ``value`` (exactly a bfloat16, float16 or TF32 value: its low 13 bits
    zero) at ``offsets`` of the int32 words, its low bits holding ``tag`` modulo 2^13."""
    bits = value.to(tl.int32, bitcast=True)
    tl.store(words_ptr + offsets, (bits & -8192) | (tag & 8191), mask=mask)


@triton.jit
def _await_packed_rows(
    words_ptr, rows, row_ok, row_length, start, width, tag, COMPILED: tl.constexpr
):  # fmt: skip
    """Wait until every word of columns [start, start + width) of ``rows`` of the int32 words
    (rows ``row_length`` long) carries ``tag`` (modulo 2^13), checking 64 columns at a time
    (few registers). The chunks the products take are loaded afterwards, all together, where
    waiting on each in turn would make a round trip to L2 of each; the words cannot move on
    before this program publishes its next step."""
    current = tag & 8191
    stale = tl.full((), 1, dtype=tl.int32)
    while stale != 0:
        bad = tl.zeros((rows.shape[0], 64), dtype=tl.int1)
        for k0 in range(0, width, 64):
            ks = k0 + tl.arange(0, 64)
            mask = row_ok[:, None] & (ks < width)[None, :]
            offsets = rows[:, None] * row_length + start + ks[None, :]
            words = tl.load(words_ptr + offsets, mask=mask, other=0, volatile=True)
            bad = bad | (mask & ((words & 8191) != current))
        # Under the interpreter (one thread a program, no inline assembly) a plain reduction.
        stale = 1 - tl.min(_every_thread(~bad)) if COMPILED else tl.max(bad.to(tl.int32))


@triton.jit
def _packed_values(words):
    """The float32 values of packed words (their tags cleared)."""
    return (words & -8192).to(tl.float32, bitcast=True)
