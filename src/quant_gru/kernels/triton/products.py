"""The tile kernels' matrix products, and the precision they take for float32.

With torch's TF32 switch off, float32 products run in IEEE float32 (on the CUDA cores). With
it on they run on the matrix cores in TF32 with R rounded to the nearest TF32 value once a call
(``rounded_to_tf32``). Matrix cores read a float32 operand's top 19 bits, which truncates it: a
bias that a recurrence accumulates (measured on an H100: about twice the error of rounded
operands). The state is rounded every step (TF32), or, in the forward below
SPLIT_BELOW_HIDDEN units, split into two rounded TF32 parts whose products are summed
(TF32_SPLIT): the state then enters the product almost exactly, which keeps the forward's error
within twice cuDNN's where rounding alone measured up to 2.3x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TF32 = "tf32-rounded"
TF32_SPLIT = "tf32-split"
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
    """The forward's TF32 product (TF32_SPLIT or TF32) at this hidden size."""
    return TF32_SPLIT if hidden < SPLIT_BELOW_HIDDEN else TF32


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
    """acc + a @ b; under TF32 and TF32_SPLIT, b already rounded (``rounded_to_tf32``)."""
    if PRECISION == "tf32-split":
        high = _round_tf32(a)
        acc = tl.dot(_round_tf32(a - high), b, acc, input_precision="tf32")
        acc = tl.dot(high, b, acc, input_precision="tf32")
    elif PRECISION == "tf32-rounded":
        acc = tl.dot(_round_tf32(a), b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc
