"""Launching the persistent kernels with less host time than ``kernel[grid](...)``.

On every launch, Triton's JIT binds the arguments, derives their specialization (each
pointer's 16-byte alignment, each integer's being 1 or a multiple of 16, the constexprs),
builds a cache key from it and from the options as a string, and looks the compiled kernel up:
about 30 µs of host time on an H100's host, all of it before the kernel starts.
``Launcher`` remembers each compiled kernel under a key of its own that tells apart everything
the specialization depends on (a key finer than Triton's only costs an extra entry), and
launches it the way Triton's launch does, with the same launch hooks. Measured there, an eager
inference call at (64, 100, 256, 256) spends 114-118 µs of host time with it, 126-132 µs
without. Every kernel of the package launches through it. Under TRITON_INTERPRET=1, and for
arguments the key does not know, it takes Triton's path.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver

from quant_gru.kernels.triton.plans import interpreted

_INT32_LOW, _INT32_END = -(2**31), 2**31
_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter
_FLOAT32_MAX = 3.4028234663852886e38


def argument_key(argument: object) -> Hashable | None:
    """What Triton's specialization of ``argument`` can depend on; None for a kind of argument
    this module does not know (the launch then takes Triton's path)."""
    if isinstance(argument, torch.Tensor):
        return argument.dtype, argument.data_ptr() % 16 == 0
    if isinstance(argument, bool) or argument is None:
        return "constant", argument
    if isinstance(argument, int):
        return argument == 1, argument % 16 == 0, _INT32_LOW <= argument < _INT32_END
    if isinstance(argument, float):  # not specialized on its value; kept apart by range
        return "float", abs(argument) <= _FLOAT32_MAX
    return None


class Launcher:
    """``launcher(grid, arguments, constants, warps, stages)`` launches ``kernel`` like
    ``kernel[grid](*arguments, **constants, num_warps=warps, num_stages=stages)`` (Triton's
    default stages where ``stages`` is None): ``arguments`` are the runtime parameters, in
    order, and ``constants`` every constexpr parameter after them."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        # key -> (compiled kernel, the constexprs' values in the kernel's parameter order)
        self._compiled: dict[Hashable, tuple[Any, tuple[object, ...]]] = {}

    def __call__(
        self,
        grid: tuple[int, int],
        arguments: Sequence[object],
        constants: dict[str, object],
        warps: int,
        stages: int | None = None,
    ) -> None:
        options: dict[str, int] = {"num_warps": warps}
        if stages is not None:
            options["num_stages"] = stages
        if interpreted():
            self._kernel[grid](*arguments, **constants, **options)
            return
        device = driver.active.get_current_device()
        key = self._key(device, arguments, constants, warps, stages)
        entry = None if key is None else self._compiled.get(key)
        if entry is None:
            compiled = self._kernel[grid](*arguments, **constants, **options)
            if hasattr(compiled, "result"):  # compiled in the background
                compiled = compiled.result()
            names = self._kernel.arg_names[len(arguments) :]
            if key is not None and set(names) == set(constants):
                self._compiled[key] = compiled, tuple(constants[name] for name in names)
            return
        compiled, constexprs = entry
        full_grid = (grid[0], grid[1], 1)
        stream = driver.active.get_current_stream(device)
        values = (*arguments, *constexprs)
        runtime = knobs.runtime
        compiled.run(
            *full_grid, stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata(full_grid, stream, *values),
            runtime.launch_enter_hook, runtime.launch_exit_hook, *values,
        )  # fmt: skip

    @staticmethod
    def _key(
        device: int,
        arguments: Sequence[object],
        constants: dict[str, object],
        warps: int,
        stages: int | None,
    ) -> Hashable | None:
        parts: list[Hashable] = [device, warps, stages, *constants.items()]
        append = parts.append
        values: Sequence[Any] = arguments
        for argument in values:
            # argument_key's parts, those of tensors and ints (most arguments) made inline: a
            # call an argument took a third of the key's time.
            kind = type(argument)
            if kind is _TENSOR or kind is _PARAMETER:
                append((argument.dtype, not argument.data_ptr() & 15))
            elif kind is int:
                append((argument == 1, not argument & 15, _INT32_LOW <= argument < _INT32_END))
            else:
                part = argument_key(argument)
                if part is None:
                    return None
                append(part)
        return tuple(parts)
