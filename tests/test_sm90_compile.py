"""Every Triton kernel compiles for the GPU (sm_90a) with the GPU image's Triton: the tests
under TRITON_INTERPRET=1 run the kernels' Python only (tests/sm90_compile.py says why that is
not enough). The compiler runs in a process of its own, with that Triton version installed
(once, without dependencies) under the user's cache directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_TRITON = "3.6.0"  # the GPU image's (torch 2.11 + CUDA 13)
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quant-gru"


def _gpu_triton() -> Path:
    """A directory holding that Triton version: QUANT_GRU_GPU_TRITON, else installed into the
    cache on first use."""
    given = os.environ.get("QUANT_GRU_GPU_TRITON")
    if given:
        return Path(given)
    target = CACHE / f"triton-{GPU_TRITON}"
    if not (target / "triton" / "__init__.py").exists():
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        result = subprocess.run(
            [*command, str(target), f"triton=={GPU_TRITON}"], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"could not install triton=={GPU_TRITON}: {result.stderr[-500:]}")
    return target


def test_every_kernel_compiles_for_sm90a() -> None:
    triton_path = _gpu_triton()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(triton_path), str(ROOT / "src")])
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sm90_compile.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert f"triton {GPU_TRITON}" in result.stdout, result.stdout[-2000:]
