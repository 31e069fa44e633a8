"""The tile kernels' matrix products, and the precision they take for float32.

With torch's TF32 switch off, float32 products run in IEEE float32 (on the CUDA cores). With
it on they run on the matrix cores in TF32 with R rounded to the nearest TF32 value once a call
(``rounded_to_tf32``). Matrix cores read a float32 operand's top 19 bits, which truncates it: a
bias that a recurrence accumulates (measured on an H100: about twice the error of rounded
operands). The state is rounded every step (TF32), or, in the forward below
SPLIT_BELOW_HIDDEN units, split into two rounded TF32 parts whose products are summed
(TF32_SPLIT): the state then enters the product almost exactly, which keeps the forward's error
within twice cuDNN's where rounding alone measured up to 2.3x.

From SPLIT_BELOW_HIDDEN on, the forward's rounded TF32 operands travel as float16 with
power-of-two scales (TF32_HALF): float16 has TF32's 10 mantissa bits, so a float32 value scaled
into float16's normal range and rounded to nearest is the rounded TF32 value, scaled; the
matrix cores multiply float16 pairs exactly and sum in float32 as they do TF32 pairs, and the
sum is scaled back exactly. What changes is half the bytes a step to read (the state and R's
slice) at twice the matrix-core rate. The scales (``_half_scale``, one for each row of R and
each batch row of the state) keep a row's largest element and a state row's bound below 2^15,
so nothing overflows; elements more than 2^29 below their row's largest become float16
subnormals, off by at most 2^-25 of the row's scale, far below TF32's error of the largest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.derived import TensorCache
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import ceil_div

TF32 = "tf32-rounded"
TF32_SPLIT = "tf32-split"
TF32_HALF = "tf32-half"
# Scaled float16 operands hold values below 2^HALF_TOP (float16's largest is 65504 < 2^16).
HALF_TOP = tl.constexpr(15)
# The scale exponents stay within this magnitude, so that 2^exponent is a normal float32.
HALF_EXPONENT_LIMIT = tl.constexpr(112)
HALF_BLOCK = 4096  # elements a program of _scaled_half_kernel
# The forward splits the state under TF32 below this hidden size, and rounds it from here on.
# Measured on an H100, worst ratio of the output's and every gradient's error to cuDNN's TF32
# error: rounding alone 1.6-1.9x at H=160 and 1.7-1.8x at (16, H=384), at most 1.12x from
# H=448 to 1024 (batches 4 to 256); splitting at most 1.4x everywhere. What the split costs a
# step: 22 % at (256, H=1024), 41 % at (64, H=512).
SPLIT_BELOW_HIDDEN = 448


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' PRECISION for states of ``dtype``: "ieee", or TF32 for float32 with torch's
    TF32 switch on (ignored for 16-bit types, whose products are exact in float32)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return TF32
    return "ieee"


def forward_tf32(hidden: int) -> str:
    """The forward's TF32 product (TF32_SPLIT or TF32_HALF) at this hidden size."""
    return TF32_SPLIT if hidden < SPLIT_BELOW_HIDDEN else TF32_HALF


def scaled_half(weight: Tensor) -> tuple[Tensor, Tensor]:
    """TF32_HALF's R: ``weight`` (float32, (rows, K), contiguous) as float16, each row j times
    2^k_j, and a float32 (2, rows) tensor of 2^k_j and 2^-k_j, where k_j (``_half_scale``)
    brings row j's largest magnitude below 2^HALF_TOP: a row's scale is its own, so no row
    costs another precision. Made on the device (no value read on the host), once per weight
    version."""
    return _HALF_WEIGHTS.get(weight, lambda: _scaled_half(weight))


def _scaled_half(weight: Tensor) -> tuple[Tensor, Tensor]:
    rows, columns = weight.shape
    bounds = torch.linalg.vector_norm(weight, float("inf"), dim=1)
    half = torch.empty(weight.shape, device=weight.device, dtype=torch.float16)
    scales = torch.empty(2, rows, device=weight.device, dtype=torch.float32)
    count = weight.numel()
    _launch_scaled_half(
        (ceil_div(count, HALF_BLOCK), 1),
        (weight, half, bounds, scales, count, columns, rows),
        {"BLOCK": HALF_BLOCK},
        4,
    )
    return half, scales


def state_bounds(h0: Tensor | None, fallback: Tensor) -> Tensor:
    """max |h0[b]| of each batch row b, float32 (B,) on the device (``fallback`` without h0:
    the kernel then reads nothing). A row's state never exceeds max(1, max |h0[b]|) in
    magnitude: each step averages it with a tanh."""
    if h0 is None:
        return fallback
    return torch.linalg.vector_norm(h0, float("inf"), dim=1, dtype=torch.float32)


@triton.jit
def _half_scale(bound):
    """2^e and 2^-e (float32) for the exponent e that brings ``bound`` (>= 0) below 2^HALF_TOP
    and to at least 2^(HALF_TOP - 1) where it is normal, within +-HALF_EXPONENT_LIMIT."""
    biased = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = HALF_TOP + 126 - biased
    exponent = tl.minimum(tl.maximum(exponent, -HALF_EXPONENT_LIMIT), HALF_EXPONENT_LIMIT)
    up = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    return up, down


@triton.jit
def _scaled_half_kernel(
    weight_ptr, half_ptr, bounds_ptr, scales_ptr, count, columns, rows, BLOCK: tl.constexpr
):
    """half = float16(weight * 2^k_row), rounded to nearest; each row's first element's
    program writes the row's 2^k and 2^-k."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    row = offsets // columns
    up, down = _half_scale(tl.load(bounds_ptr + row, mask=inside, other=0.0))
    weight = tl.load(weight_ptr + offsets, mask=inside, other=0.0)
    tl.store(half_ptr + offsets, (weight * up).to(tl.float16), mask=inside)
    first = inside & (offsets - row * columns == 0)
    tl.store(scales_ptr + row, up, mask=first)
    tl.store(scales_ptr + rows + row, down, mask=first)


@triton.jit
def _half_scales(
    scales_ptr, bounds_ptr, rows, row_ok, units, unit_ok, hidden,
    PRECISION: tl.constexpr, HAS_H0: tl.constexpr,
):  # fmt: skip
    """TF32_HALF's scales for a (rows, units) block of the three gates' products: R's 2^-k of
    each gate's channels ((1, BH) rows, ``scaled_half``), and the state's 2^s and 2^-s of each
    batch row ((BB, 1) columns, from max(1, max |h0[b]|), ``state_bounds``); ones for other
    products."""
    if PRECISION == "tf32-half":
        downs = scales_ptr + 3 * hidden + units
        down_r = tl.load(downs, mask=unit_ok, other=1.0)[None, :]
        down_z = tl.load(downs + hidden, mask=unit_ok, other=1.0)[None, :]
        down_n = tl.load(downs + 2 * hidden, mask=unit_ok, other=1.0)[None, :]
        bound = tl.full(rows.shape, 1.0, tl.float32)
        if HAS_H0:
            bound = tl.maximum(tl.load(bounds_ptr + rows, mask=row_ok, other=1.0), 1.0)
        up, down = _half_scale(bound)
        scales = (down_r, down_z, down_n, up[:, None], down[:, None])
    else:  # one return: Triton 3.6 refuses returns of different types after a constexpr if
        scales = (1.0, 1.0, 1.0, 1.0, 1.0)
    return scales


def rounded_to_tf32(weight: Tensor, out: Tensor | None = None) -> Tensor:
    """A float32 ``weight`` rounded to the nearest TF32 values (ties away from zero), as the
    kernels' TF32 products take it; written into ``out`` (contiguous, weight's shape) when
    given."""
    bits = weight.contiguous().view(torch.int32) + 0x1000
    if out is None:
        return (bits & -8192).view(torch.float32)
    torch.bitwise_and(bits, -8192, out=out.view(torch.int32))
    return out


@triton.jit
def _round_tf32(x):
    """``x`` rounded to the nearest TF32 value (10 mantissa bits), ties away from zero."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _product(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b; under TF32 and TF32_SPLIT, b already rounded (``rounded_to_tf32``);
    under TF32_HALF both scaled float16 (``scaled_half``)."""
    if PRECISION == "tf32-split":
        high = _round_tf32(a)
        acc = tl.dot(_round_tf32(a - high), b, acc, input_precision="tf32")
        acc = tl.dot(high, b, acc, input_precision="tf32")
    elif PRECISION == "tf32-half":  # float16 operands (scaled), float32 sums
        acc = tl.dot(a, b, acc)
    elif PRECISION == "tf32-rounded":
        acc = tl.dot(_round_tf32(a), b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


_launch_scaled_half = Launcher(_scaled_half_kernel)
_HALF_WEIGHTS: TensorCache[tuple[Tensor, Tensor]] = TensorCache()
