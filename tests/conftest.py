from __future__ import annotations

import pytest
import torch


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=available_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every conformance test runs on the CPU, and on the GPU when one is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _exact_gpu_float32():
    """cuDNN and cuBLAS may use TF32 for float32 by default; the oracle must not."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
