"""QAT's weights on one kernel: a weight's codes, and its dequantized codes and clamp mask in
the weight's type, from its float values in one pass, for up to four weights a launch (a
direction's W, R and biases; the plain-PyTorch references are quantize.program.quantize_weight
and kernels/torch/quantized_forward.weight_point, a dozen tensor operations each).

QAT makes the weights' programs again after every weight update, and its backward reads all
four weights' points, when the host's cost of a dozen small operations a weight shows in the
step's time. The points made with a weight's codes are kept for as long as those codes live.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.derived import DerivedCache
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div
from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.params import OperatorQuant

__all__ = ["kept_value", "kernel_weight_point", "kernel_weights_codes"]

_BLOCK = 1024
_WARPS = 4

# The points made with a weight's codes, kept as long as the codes tensor lives.
_POINTS: DerivedCache[tuple[Tensor, Tensor]] = DerivedCache()


@triton.jit
def _weight_point_block(
    block,
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
    index = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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


@triton.jit
def _weight_point_kernel(
    # Up to four weights, one after another along the grid: each one's pointers and sizes as
    # _weight_point_block takes them, and ``end``, the grid's blocks up to its last.
    w0, s0, c0, v0, m0, n0, g0, lo0, hi0, end0,
    w1, s1, c1, v1, m1, n1, g1, lo1, hi1, end1,
    w2, s2, c2, v2, m2, n2, g2, lo2, hi2, end2,
    w3, s3, c3, v3, m3, n3, g3, lo3, hi3,
    CODES: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    if block < end0:
        _weight_point_block(block, w0, s0, c0, v0, m0, n0, g0, lo0, hi0, CODES, BLOCK)
    elif block < end1:
        _weight_point_block(block - end0, w1, s1, c1, v1, m1, n1, g1, lo1, hi1, CODES, BLOCK)
    elif block < end2:
        _weight_point_block(block - end1, w2, s2, c2, v2, m2, n2, g2, lo2, hi2, CODES, BLOCK)
    else:
        _weight_point_block(block - end2, w3, s3, c3, v3, m3, n3, g3, lo3, hi3, CODES, BLOCK)


_launch_kernel = Launcher(_weight_point_kernel)
_MOST_WEIGHTS = 4


def kernel_weights_codes(
    weights: Sequence[Tensor], quants: Sequence[OperatorQuant]
) -> list[Tensor]:
    """quantize_weight's codes of each weight or bias, made on the kernel with its points (a
    direction's four on one launch), which kernel_weight_point then returns for these codes
    without a launch."""
    made = _points(weights, quants, codes=True)
    codes: list[Tensor] = []
    for out, points in made:
        assert out is not None
        _POINTS.keep(out, out.device, points)
        codes.append(out)
    return codes


def kernel_weight_point(
    weight: Tensor, quant: OperatorQuant, codes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(dequantized codes, clamp mask) of a weight or bias with symmetric parameters
    ``quant`` (1, 3 or one scale a row), both in the weight's type: weight_point's values to
    the bit (a 16-bit type's value rounded through float32, as torch rounds float64). Those
    kept with ``codes`` (kernel_weights_codes' codes of this weight) where there are some."""
    kept = None if codes is None else _POINTS.find(codes, codes.device)
    return kept if kept is not None else _points([weight], [quant], codes=False)[0][1]


def kept_value(codes: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The dequantized codes kept with ``codes`` (kernel_weights_codes'), when kept in
    ``dtype``."""
    kept = _POINTS.find(codes, codes.device)
    return kept[0] if kept is not None and kept[0].dtype == dtype else None


def _points(
    weights: Sequence[Tensor], quants: Sequence[OperatorQuant], codes: bool
) -> list[tuple[Tensor | None, tuple[Tensor, Tensor]]]:
    """Each weight's codes (when ``codes``) and points, made on as few launches as there are
    groups of up to four weights."""
    made: list[tuple[Tensor | None, tuple[Tensor, Tensor]]] = []
    launches: list[tuple[tuple[object, ...], int]] = []  # each weight's arguments, blocks
    for weight, quant in zip(weights, quants, strict=True):
        rows = weight.shape[0]
        groups = quant.scale.numel()
        if rows % groups:
            raise ValueError(f"{groups} scales do not divide {rows} rows evenly")
        if not weight.is_contiguous():  # the kernel reads the data alone: no detach otherwise
            weight = weight.detach().contiguous()
        device = weight.device
        out = torch.empty(weight.shape, dtype=torch.int64, device=device) if codes else None
        value = torch.empty(weight.shape, dtype=torch.float32, device=device)
        mask = torch.empty_like(weight)
        if weight.numel():
            scales = device_copy(quant.scale, device, torch.float64)
            arguments = (
                weight, scales, value if out is None else out, value, mask, weight.numel(),
                weight.numel() // groups, quant.qmin, quant.qmax,
            )  # fmt: skip
            launches.append((arguments, ceil_div(weight.numel(), _BLOCK)))
        made.append((out, (value, mask)))
    for start in range(0, len(launches), _MOST_WEIGHTS):
        _launch_group(launches[start : start + _MOST_WEIGHTS], codes)
    # In the weight's type once made (the masks are already).
    return [(out, (_in_type(value, mask.dtype), mask)) for out, (value, mask) in made]


def _launch_group(group: list[tuple[tuple[object, ...], int]], codes: bool) -> None:
    """One launch for up to four weights (arguments, blocks): the places left over repeat the
    last weight's arguments and get no blocks."""
    ends: list[int] = []
    for _, blocks in group:
        ends.append(blocks + (ends[-1] if ends else 0))
    ends += [ends[-1]] * (_MOST_WEIGHTS - len(group))
    places = [arguments for arguments, _ in group]
    places += [places[-1]] * (_MOST_WEIGHTS - len(group))
    flat: list[object] = []
    for index, arguments in enumerate(places):
        flat += arguments
        if index < _MOST_WEIGHTS - 1:
            flat.append(ends[index])
    _launch_kernel((ends[-1], 1), flat, dict(CODES=codes, BLOCK=_BLOCK), _WARPS)


def _in_type(value: Tensor, dtype: torch.dtype) -> Tensor:
    return value if value.dtype == dtype else value.to(dtype)  # no call for a no-op
