"""Calibration statistics reduced across data-parallel ranks, so every rank computes the same
parameters as one process that saw all the data."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def reduce_ranges(ranges: Tensor) -> Tensor:
    """[min, max] statistics (..., 2) combined over all ranks when torch.distributed is
    initialised (a copy; the input is left as it is), else a copy of the local ones."""
    reduced = ranges.detach().clone()
    if not (dist.is_available() and dist.is_initialized()):
        return reduced
    lows, highs = reduced[..., 0].contiguous(), reduced[..., 1].contiguous()
    dist.all_reduce(lows, op=dist.ReduceOp.MIN)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX)
    return torch.stack([lows, highs], dim=-1)
