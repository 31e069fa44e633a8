"""QAT's weight points on one kernel: a weight's dequantized codes and clamp mask, both in the
weight's type, from its float values in one pass (the plain-PyTorch reference is
kernels/torch/quantized_forward.weight_point, a dozen tensor operations a weight).

QAT's backward needs them for all four weights after every weight update, when the host's
cost of a dozen small operations a weight shows in the step's time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.triton.plans import ceil_div
from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.params import OperatorQuant

__all__ = ["kernel_weight_point"]

_BLOCK = 1024


@triton.jit
def _weight_point_kernel(
    weight_ptr,  # (rows * columns,) float: the weight
    scale_ptr,  # (groups,) float64: one scale per group of rows (tensor, gate or channel)
    value_ptr,  # (rows * columns,) float32 out: s * clamp(level, qmin, qmax)
    mask_ptr,  # (rows * columns,) out, the weight's type: qmin <= level <= qmax
    n,
    group_size,  # elements per scale: rows per group * columns
    qmin,
    qmax,
    BLOCK: tl.constexpr,
):
    """level = floor(w / s + 1/2) in float64 (§8); the code is the level clamped (NaN: 0), its
    value s * code in float64 rounded to float32 once; the mask is 0 for NaN."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    scale = tl.load(scale_ptr + index // group_size, mask=inside, other=1.0)
    weight = tl.load(weight_ptr + index, mask=inside, other=0).to(tl.float64)
    level = tl.floor(weight / scale + 0.5)
    kept = (level >= qmin) & (level <= qmax)
    code = tl.minimum(tl.maximum(tl.where(level != level, 0.0, level), qmin), qmax)
    tl.store(value_ptr + index, (code * scale).to(tl.float32), mask=inside)
    # Through float32: Triton's interpreter converts a boolean to bfloat16 as a bit pattern.
    ones = tl.where(kept, 1.0, 0.0)
    tl.store(mask_ptr + index, ones.to(mask_ptr.dtype.element_ty), mask=inside)


def kernel_weight_point(weight: Tensor, quant: OperatorQuant) -> tuple[Tensor, Tensor]:
    """(dequantized codes, clamp mask) of a weight or bias with symmetric parameters
    ``quant`` (1, 3 or one scale a row), both in the weight's type: weight_point's values to
    the bit (a 16-bit type's value rounded through float32, as torch rounds float64)."""
    rows = weight.shape[0]
    groups = quant.scale.numel()
    if rows % groups:
        raise ValueError(f"{groups} scales do not divide {rows} rows evenly")
    weight = weight.detach().contiguous()
    value = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    mask = torch.empty_like(weight)
    if weight.numel():
        scales = device_copy(quant.scale, weight.device, torch.float64)
        _weight_point_kernel[(ceil_div(weight.numel(), _BLOCK),)](
            weight, scales, value, mask, weight.numel(), weight.numel() // groups,
            quant.qmin, quant.qmax, BLOCK=_BLOCK,
        )  # fmt: skip
    return value.to(weight.dtype), mask
