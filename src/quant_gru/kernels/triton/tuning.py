"""Opt-in measurement of the tile plans, like ``torch.backends.cudnn.benchmark``.

plans.py picks tiles by a rule: the fewest bytes each program reads from L2 a step. Measured on
an H100, other tiles ran up to a fifth faster at some shapes, and float32 and bfloat16 did not
agree on which. With ``QUANT_GRU_AUTOTUNE=1`` the first call of each kind of problem (kernel
direction, batch, hidden size, types, precision, whether gates are saved) times the rule's plan
and the other tile plans that fit on the GPU, on the call's own arguments, and every later call
takes the fastest. Each plan compiles once, so that first call takes seconds.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable, Sequence

import torch

from quant_gru.kernels.triton.plans import Plan

ENVIRONMENT = "QUANT_GRU_AUTOTUNE"
REPEATS = 3

# The fastest plan of each problem measured in this process.
chosen: dict[Hashable, Plan] = {}


def enabled() -> bool:
    value = os.environ.get(ENVIRONMENT, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENVIRONMENT} must be '0' or '1', got {value!r}")
    return value == "1"


def event_ms(run: Callable[[], object]) -> float:
    """GPU time of ``REPEATS`` calls of ``run`` after one untimed call (which compiles)."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEATS):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPEATS


def tuned(
    key: Hashable,
    default: Plan,
    candidates: Callable[[], Sequence[Plan]],
    run: Callable[[Plan], object],
    timer: Callable[[Callable[[], object]], float] = event_ms,
) -> Plan:
    """The fastest of ``default`` and ``candidates()`` for ``key``, measured by ``timer`` on
    ``run(plan)`` the first time and remembered (later calls cost one dictionary lookup).
    While a CUDA graph is being captured nothing can be timed: an unmeasured problem takes
    ``default`` then, and is measured later."""
    if key in chosen:
        return chosen[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default
    best = default, timer(functools.partial(run, default))
    for plan in dict.fromkeys(candidates()):
        if plan == default:
            continue
        elapsed = timer(functools.partial(run, plan))
        if elapsed < best[1]:
            best = plan, elapsed
    chosen[key] = best[0]
    return best[0]
