"""Agreement between two outputs: MSE, cosine similarity, SQNR and distance in LSBs.

Inputs are tensors or arrays of the same shape, any float or integer dtype; every sum runs in
float64 (float32 sums lose digits on large outputs) and the results are Python floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _float64(value: ArrayLike | float) -> Tensor:
    return torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[Tensor, Tensor]:
    x, y = _float64(a), _float64(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def mse(a: ArrayLike, b: ArrayLike) -> float:
    """Mean of the squared differences (0.0 for empty inputs)."""
    x, y = _pair(a, b)
    return float((x - y).square().mean()) if x.numel() else 0.0


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Cosine similarity of the flattened inputs; 1.0 when both are all zeros, 0.0 when only
    one is (the angle is undefined there; these values keep "identical" at 1)."""
    x, y = _pair(a, b)
    x, y = x.flatten(), y.flatten()
    norms = float(x.norm()) * float(y.norm())
    if norms == 0.0:
        return 1.0 if bool(torch.equal(x, y)) else 0.0
    return float(x.dot(y)) / norms


def sqnr_db(signal: ArrayLike, noisy: ArrayLike) -> float:
    """10 log10(sum(signal^2) / sum((noisy - signal)^2)): inf when equal, -inf when the
    signal is all zeros and the noise is not."""
    x, y = _pair(signal, noisy)
    noise = float((y - x).square().sum())
    if noise == 0.0:
        return math.inf
    power = float(x.square().sum())
    return 10.0 * math.log10(power / noise) if power > 0.0 else -math.inf


def max_lsb(actual: ArrayLike, expected: ArrayLike, scale: ArrayLike | float) -> float:
    """max |actual - expected| / scale, with ``scale`` (a scalar, or one value per feature)
    broadcast on the last dimension; 0.0 for empty inputs."""
    x, y = _pair(actual, expected)
    step = _float64(scale)
    if step.dim() > 1 or (
        step.dim() == 1 and x.dim() > 0 and step.shape[0] not in (1, x.shape[-1])
    ):
        raise ValueError(
            f"scale must be a scalar or one value per feature ({x.shape[-1] if x.dim() else 1}), "
            f"got shape {tuple(step.shape)}"
        )
    if bool((step <= 0).any()):
        raise ValueError("scale must be positive")
    if x.numel() == 0:
        return 0.0
    return float(((x - y).abs() / step).max())
