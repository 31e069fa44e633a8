"""Which realization runs a float forward and the integer recurrence: Triton kernels or PyTorch.

``'auto'`` takes Triton for float32, bfloat16 and float16 inputs on a CUDA device when triton
is installed, PyTorch otherwise. ``'triton'`` insists and raises ``RuntimeError`` saying why
it cannot; ``'torch'`` always takes PyTorch. The environment variable ``QUANT_GRU_BACKEND``
sets the choice for modules left at ``'auto'`` (torch.compile reads it when it compiles).
Under ``TRITON_INTERPRET=1`` a forced ``'triton'`` runs the kernels on the CPU (how the tests
check them without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "torch")
# Looked up once (without importing triton): torch.compile cannot trace importlib.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
ENVIRONMENT = "QUANT_GRU_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(value: object, what: str = "backend") -> str:
    if value not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    assert isinstance(value, str)
    return value


def resolve(requested: str, x: Tensor) -> str:
    """'triton' or 'torch' for a forward on ``x``."""
    choice = requested
    if choice == "auto":
        choice = check_backend(os.environ.get(ENVIRONMENT, "auto"), ENVIRONMENT)
    if choice == "torch":
        return "torch"
    reason = _triton_unavailable(x, forced=choice == "triton")
    if choice == "triton" and reason is not None:
        raise RuntimeError(f"backend 'triton' was requested, but {reason}")
    return "torch" if reason is not None else "triton"


def _triton_unavailable(x: Tensor, forced: bool) -> str | None:
    # The interpreter is a test harness: only a forced 'triton' uses it for CPU tensors.
    interpreted = forced and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if x.device.type != "cuda" and not interpreted:
        return f"the input is on {x.device} and the Triton kernels run on CUDA devices"
    if not TRITON_INSTALLED:
        return "triton is not installed (pip install 'quant-gru[triton]')"
    if x.dtype not in TRITON_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in TRITON_DTYPES)
        return f"the Triton kernels take {names}, got {str(x.dtype).removeprefix('torch.')}"
    return None
