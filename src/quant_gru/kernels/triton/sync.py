"""How the programs of a persistent kernel hand the state of one step to the next.

Two ways, both needing every program of the grid resident at once (the launchers size the grid
to at most one program per SM):

- ``_barrier``: programs store their part of the state, then meet at an atomic counter;
  after it everyone reads the whole state. Two round trips to L2 (the atomic, the reads).
- ``_publish`` / ``_await_state``: each element carries the step it belongs to. A state value
  (float32 bits, or an integer kernel's digit: ``_publish_bits`` / ``_await_bits``) and its
  step number share one 64-bit word, which a single store writes whole, so a reader that sees
  the step it waits for also sees that step's value. Readers re-read until every word is
  current: one round trip when the writers are ahead. Words are 8 bytes, so this suits small
  batch tiles, where the latency matters most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def zero_words(*shape: int, device: torch.device) -> torch.Tensor:
    """Tagged words for ``_publish`` / ``_await_state``, all tags 0 (no step yet)."""
    return torch.zeros(shape, device=device, dtype=torch.int64)


@triton.jit
def _publish(words_ptr, offsets, mask, state, tag):
    """Store float32 ``state`` at ``offsets`` of the int64 words, each marked with ``tag``."""
    _publish_bits(words_ptr, offsets, mask, state.to(tl.int32, bitcast=True), tag)


@triton.jit
def _publish_bits(words_ptr, offsets, mask, bits, tag):
    """Store int32 ``bits`` at ``offsets`` of the int64 words, each marked with ``tag``."""
    word = bits.to(tl.int64) & 0xFFFFFFFF
    tl.store(words_ptr + offsets, word | (tl.cast(tag, tl.int64) << 32), mask=mask)


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
    """The float32 state at ``offsets`` once every word there carries ``tag``: _await_bits."""
    return _await_bits(words_ptr, offsets, mask, tag, COMPILED).to(tl.float32, bitcast=True)


@triton.jit
def _await_bits(words_ptr, offsets, mask, tag, COMPILED: tl.constexpr):
    """The int32 bits at ``offsets`` once every word there carries ``tag`` (masked-out
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
    return (words & 0xFFFFFFFF).to(tl.int32)
