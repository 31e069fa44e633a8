"""Encoded scales, zero points, and the float <-> code conversions of reference/README.md §2, §8."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from quant_gru.config import SCALE_TYPES, OperatorSpec

MIN_SCALE_EXPONENT = -64
MAX_SCALE_EXPONENT = 64
MIN_SCALE = 2.0**MIN_SCALE_EXPONENT
MAX_SCALE = 2.0**MAX_SCALE_EXPONENT


def encode_scale(scale: float, scale_type: str) -> float:
    """The encoded value of a positive scale: float32 (rounded to nearest), or the smallest power
    of two at least as large (so the calibrated range still fits), within [2^-64, 2^64]."""
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"a scale must be finite and positive, got {scale!r}")
    if scale_type == "float":
        encoded = float(np.float32(scale))
        return min(max(encoded, MIN_SCALE), MAX_SCALE)
    return 2.0 ** pot_exponent(scale)


def pot_exponent(scale: float) -> int:
    """ceil(log2(scale)) exactly, clamped to the encodable exponents."""
    mantissa, exponent = math.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = exponent - 1 if mantissa == 0.5 else exponent
    return min(max(ceil_log2, MIN_SCALE_EXPONENT), MAX_SCALE_EXPONENT)


def is_encoded(scale: float, scale_type: str) -> bool:
    """Whether `scale` is a value `encode_scale` can return (used to validate loaded files)."""
    if not math.isfinite(scale) or not MIN_SCALE <= scale <= MAX_SCALE:
        return False
    if scale_type == "float":
        return float(np.float32(scale)) == scale
    mantissa, _ = math.frexp(scale)
    return mantissa == 0.5


def qparams_from_range(
    low: float, high: float, spec: OperatorSpec, scale_type: str
) -> tuple[float, int]:
    """Encoded scale and zero point that cover [low, high] (extended to contain 0).

    Asymmetric: the range maps onto [qmin, qmax]. Symmetric signed: max(|low|, |high|) maps to
    qmax (to 1 for a 1-bit operator, whose codes are {-1, 0}). Symmetric unsigned: high maps to
    qmax and negative values clamp to 0. A range of zero width gets scale 1.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"a calibration range must be finite and ordered, got [{low}, {high}]")
    low, high = min(low, 0.0), max(high, 0.0)
    if spec.is_symmetric:
        magnitude = high if spec.is_unsigned else max(-low, high)
        raw = magnitude / max(spec.qmax, 1)
    else:
        raw = (high - low) / (spec.qmax - spec.qmin)
    scale = encode_scale(raw if raw > 0 else 1.0, scale_type)
    if spec.is_symmetric:
        return scale, 0
    zero_point = math.floor(spec.qmin - low / scale + 0.5)
    return scale, min(max(zero_point, spec.qmin), spec.qmax)


def weight_scales(weight: Tensor, spec: OperatorSpec, scale_type: str) -> Tensor:
    """Symmetric scales of a weight (3H, K) or bias (3H,) at the spec's granularity.

    Returns float64 values of the encoded scales, shape (1,), (3,) or (3H,).
    """
    rows = weight.detach().double().reshape(weight.shape[0], -1).abs()
    if not torch.isfinite(rows).all():
        raise ValueError("cannot quantize weights that contain NaN or infinity")
    groups = {"per_tensor": 1, "per_gate": 3, "per_channel": rows.shape[0]}[spec.granularity]
    magnitudes = rows.reshape(groups, -1).amax(dim=1).tolist()
    scales = [qparams_from_range(-a, a, spec, scale_type)[0] for a in magnitudes]
    return torch.tensor(scales, dtype=torch.float64)


def per_row(scales: Tensor, rows: int) -> Tensor:
    """Expand per-tensor (1,) or per-gate (3,) scales to one per row (rows,)."""
    return scales.repeat_interleave(rows // scales.numel())


def quantize(
    x: Tensor, scale: Tensor | float, zero_point: Tensor | int, qmin: int, qmax: int
) -> Tensor:
    """Float to int64 codes by §8: floor(x / s + 1/2) + zp in float64, clamped; NaN -> zp."""
    x64 = x.detach().double()
    # In place on the quotient (a new tensor): fewer operations, which the weights' programs
    # pay at every weight update. nan_to_num_ also makes +-inf the largest finite values,
    # which the clamp takes to qmax and qmin as it would the infinities.
    rounded = (x64 / _operand(scale, torch.float64, x64.device)).add_(0.5).floor_()
    rounded.nan_to_num_(nan=0.0)
    if isinstance(zero_point, Tensor):
        zp = zero_point.to(device=x64.device, dtype=torch.int64)
        clamped = torch.maximum(torch.minimum(rounded, (qmax - zp).double()), (qmin - zp).double())
        return clamped.to(torch.int64) + zp
    codes = rounded.clamp_(qmin - zero_point, qmax - zero_point).to(torch.int64)
    return codes + zero_point if zero_point else codes


def dequantize(codes: Tensor, scale: Tensor | float, zero_point: Tensor | int) -> Tensor:
    """int64 codes to float64 values: s * (q - zp)."""
    if isinstance(zero_point, Tensor):
        zero_point = zero_point.to(codes.device)
    elif not zero_point:  # symmetric: nothing to subtract
        return codes.double() * _operand(scale, torch.float64, codes.device)
    return (codes - zero_point).double() * _operand(scale, torch.float64, codes.device)


def _operand(value: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor | float:
    """A scale as an operand: a Python number as it is (a tensor made of it on the host would
    be copied to the device, which waits for the device's queue), a tensor on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return float(value)
