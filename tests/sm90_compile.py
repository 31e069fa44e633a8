"""Compile every Triton kernel of the package for sm_90a, as the GPU's Triton compiles them,
without a GPU: run by tests/test_sm90_compile.py in a process whose ``triton`` is the GPU
image's version.

TRITON_INTERPRET=1 runs the kernels' Python, not Triton's compiler, so a kernel can pass every
test here and still fail to compile on the GPU (a constexpr branch returning other types than
the code after it did, for one). This drives the package on CPU tensors with every
``launch.Launcher`` compiling its kernel for an H100 (Triton's own ``warmup``: bind, specialize,
compile, no launch) instead of launching it, on the GPU's plans (132 programs), over the
float, integer and QAT paths and the autotuner's tile plans. Prints each kernel's number of
compiled specializations; exits non-zero where a compilation fails, a kernel needs more
shared memory than an H100 block has, or a launcher of the package compiled nothing.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections import Counter
from collections.abc import Sequence
from types import ModuleType

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import quant_gru.kernels.triton as kernels
from quant_gru import QuantGRU
from quant_gru.kernels import backend
from quant_gru.kernels.torch.quantized_forward import (
    build_programs,
    initial_codes,
    input_codes,
)
from quant_gru.kernels.triton import launch, tuning
from quant_gru.kernels.triton.integer_gru import triton_integer_gru

H100_PROGRAMS = 132
H100_SHARED_BYTES = 232448  # a block's most shared memory on an H100 (227 KiB)


class _Hopper:
    """Triton's driver interface as far as compiling needs it: an H100, device 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


compiled: Counter[str] = Counter()
too_large: list[str] = []
most_shared: Counter[str] = Counter()
_seen: set[object] = set()


def _compile(
    self: launch.Launcher,
    grid: tuple[int, int],
    arguments: Sequence[object],
    constants: dict[str, object],
    warps: int,
    stages: int | None = None,
) -> None:
    """Launcher.__call__'s stand-in: each new specialization compiled, nothing launched."""
    options = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    key = (id(self._kernel), launch.Launcher._key(0, arguments, constants, warps, stages))
    if key in _seen:
        return
    _seen.add(key)
    kernel = self._kernel.warmup(*arguments, grid=grid, **constants, **options)
    name = self._kernel.fn.__name__
    compiled[name] += 1
    shared = kernel.metadata.shared  # the launch would fail past the multiprocessor's
    most_shared[name] = max(most_shared[name], shared)
    if shared > H100_SHARED_BYTES:
        too_large.append(f"{name} {constants}: {shared} bytes of shared memory")


def _kernel_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{kernels.__name__}.{info.name}")
        for info in pkgutil.iter_modules(kernels.__path__)
    ]


def _on_gpu_plans() -> None:
    for module in _kernel_modules():
        if hasattr(module, "resident_programs"):
            module.resident_programs = lambda device: H100_PROGRAMS
    backend._triton_unavailable = lambda x, forced: None  # CPU tensors take the kernels


def _traced(model: QuantGRU) -> None:
    """The tile kernel with every operator's trace (the tests' runs)."""
    programs = build_programs(model._quantized_model(), model._direction_weights())
    x = torch.randn(2, 3, model.input_size)
    codes, h0 = input_codes(x, programs), initial_codes(None, programs, x)
    triton_integer_gru(programs, codes, h0, None, model.num_layers, model.bidirectional, True)


def _calibrated(model: QuantGRU, inputs: int) -> QuantGRU:
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(3, 4, inputs))
    model.calibrating = False
    model.finalize_calibration()
    model.use_quantization = True
    return model


def _run(model: QuantGRU, batch: int, train: bool, **extra: bool) -> None:
    inputs = model.input_size
    x = torch.randn(2, batch, inputs, dtype=model.weight_ih_l0.dtype)
    layers = model.num_layers * (2 if model.bidirectional else 1)
    hx = torch.randn(layers, batch, model.hidden_size, dtype=x.dtype) if extra.get("hx") else None
    if extra.get("lengths"):
        lengths = torch.tensor([2] + [1] * (batch - 1))
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    if not train:
        with torch.no_grad():
            model(x, hx)
        return
    if isinstance(x, torch.Tensor):
        x.requires_grad_()
    out, h_n = model(x, hx)
    values = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    (values.float().sum() + h_n.float().sum()).backward()


# (batch, hidden): a row plan holding all of R, one row with a slice, wide rows, 16-row tiles
# with R on chip, 64-row tiles reading it every step.
SHAPES = ((16, 128), (1, 256), (64, 256), (64, 512), (256, 1024))


def main() -> int:
    print(f"triton {triton.__version__}")
    driver.set_active(_Hopper())
    launch.Launcher.__call__ = _compile
    _on_gpu_plans()
    torch.manual_seed(0)
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for batch, hidden in SHAPES:
            model = QuantGRU(32, hidden).to(dtype)
            _run(model, batch, train=False)
            _run(model, batch, train=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = QuantGRU(32, 512, num_layers=2, bidirectional=True)
    _run(model, 64, train=True, hx=True, lengths=True)
    _run(model.half(), 8, train=False, hx=True)
    for batch, hidden in SHAPES:  # 8-bit (SHORT), inference and QAT
        model = _calibrated(QuantGRU(32, hidden), 32)
        _run(model, batch, train=False)
        _run(model, batch, train=True)
    model = _calibrated(QuantGRU(32, 256, num_layers=2, bidirectional=True), 32)
    _run(model, 16, train=False, hx=True, lengths=True)
    _run(model, 64, train=True, hx=True, lengths=True)
    for width in (16, 32):  # wider values (NARROW 1, int64) and several digits
        model = QuantGRU(32, 256)
        model.set_all_bitwidth(width, is_symmetric=False)
        _calibrated(model, 32)
        _run(model, 64, train=False)
        _run(model, 1, train=True)
        _traced(model)
    _traced(_calibrated(QuantGRU(32, 64), 32))

    # The tile plans QUANT_GRU_AUTOTUNE=1 tries (plans.tile_candidates), each run once.
    os.environ[tuning.ENVIRONMENT] = "1"
    tuning.tuned.__defaults__ = (lambda run: (run(), 0.0)[1],)
    for dtype, tf32 in ((torch.float32, True), (torch.float32, False), (torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for batch, hidden in ((64, 256), (64, 512), (256, 1024)):
            _run(QuantGRU(32, hidden).to(dtype), batch, train=True)

    for name, count in sorted(compiled.items()):
        print(f"{name}: {count} specializations, at most {most_shared[name]} bytes shared")
    launchers = {
        value._kernel.fn.__name__
        for module in _kernel_modules()
        for value in vars(module).values()
        if isinstance(value, launch.Launcher)
    }
    missing = sorted(launchers - set(compiled))
    if missing:
        print("never compiled:", ", ".join(missing))
    for line in too_large:
        print("too much shared memory:", line)
    return 1 if missing or too_large else 0


if __name__ == "__main__":
    sys.exit(main())
