"""QAT's weights on one kernel each: a weight's codes, and its dequantized codes and clamp mask
in the weight's type, from its float values in one pass (the plain-PyTorch references are
quantize.program.quantize_weight and kernels/torch/quantized_forward.weight_point, a dozen
tensor operations each).

QAT makes the weights' programs again after every weight update, and its backward reads all
four weights' points, when the host's cost of a dozen small operations a weight shows in the
step's time. The points made with a weight's codes are kept for as long as those codes live.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.derived import DerivedCache
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div
from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.params import OperatorQuant

__all__ = ["kept_value", "kernel_weight_codes", "kernel_weight_point"]

_BLOCK = 1024
_WARPS = 4

# The points made with a weight's codes, kept as long as the codes tensor lives.
_POINTS: DerivedCache[tuple[Tensor, Tensor]] = DerivedCache()


@triton.jit
def _weight_point_kernel(
    weight_ptr,  # (rows * columns,) float: the weight
    scale_ptr,  # (groups,) float64: one scale per group of rows (tensor, gate or channel)
    codes_ptr,  # (rows * columns,) int64 out (CODES): clamp(level, qmin, qmax), NaN: 0
    value_ptr,  # (rows * columns,) float32 out: s * code
    mask_ptr,  # (rows * columns,) out, the weight's type: qmin <= level <= qmax
    n,
    group_size,  # elements per scale: rows per group * columns
    qmin,
    qmax,
    CODES: tl.constexpr,
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
    if CODES:
        tl.store(codes_ptr + index, code.to(tl.int64), mask=inside)
    tl.store(value_ptr + index, (code * scale).to(tl.float32), mask=inside)
    # Through float32: Triton's interpreter converts a boolean to bfloat16 as a bit pattern.
    ones = tl.where(kept, 1.0, 0.0)
    tl.store(mask_ptr + index, ones.to(mask_ptr.dtype.element_ty), mask=inside)


_launch_kernel = Launcher(_weight_point_kernel)


def kernel_weight_codes(weight: Tensor, quant: OperatorQuant) -> Tensor:
    """quantize_weight's codes of a weight or bias, made on the kernel with its points, which
    kernel_weight_point then returns for these codes without a launch."""
    codes, points = _points(weight, quant, codes=True)
    assert codes is not None
    _POINTS.keep(codes, codes.device, points)
    return codes


def kernel_weight_point(
    weight: Tensor, quant: OperatorQuant, codes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(dequantized codes, clamp mask) of a weight or bias with symmetric parameters
    ``quant`` (1, 3 or one scale a row), both in the weight's type: weight_point's values to
    the bit (a 16-bit type's value rounded through float32, as torch rounds float64). Those
    kept with ``codes`` (kernel_weight_codes' codes of this weight) where there are some."""
    kept = None if codes is None else _POINTS.find(codes, codes.device)
    return kept if kept is not None else _points(weight, quant, codes=False)[1]


def kept_value(codes: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The dequantized codes kept with ``codes`` (kernel_weight_codes'), when kept in
    ``dtype``."""
    kept = _POINTS.find(codes, codes.device)
    return kept[0] if kept is not None and kept[0].dtype == dtype else None


def _points(
    weight: Tensor, quant: OperatorQuant, codes: bool
) -> tuple[Tensor | None, tuple[Tensor, Tensor]]:
    rows = weight.shape[0]
    groups = quant.scale.numel()
    if rows % groups:
        raise ValueError(f"{groups} scales do not divide {rows} rows evenly")
    if not weight.is_contiguous():  # the kernel reads the data alone: no detach otherwise
        weight = weight.detach().contiguous()
    out = torch.empty(weight.shape, dtype=torch.int64, device=weight.device) if codes else None
    value = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    mask = torch.empty_like(weight)
    if weight.numel():
        scales = device_copy(quant.scale, weight.device, torch.float64)
        _launch_kernel(
            (ceil_div(weight.numel(), _BLOCK), 1),
            (
                weight, scales, value if out is None else out, value, mask, weight.numel(),
                weight.numel() // groups, quant.qmin, quant.qmax,
            ),
            dict(CODES=codes, BLOCK=_BLOCK), _WARPS,
        )  # fmt: skip
    return out, (value if value.dtype == weight.dtype else value.to(weight.dtype), mask)
