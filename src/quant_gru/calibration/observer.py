"""Range statistics of every activation operator, collected from the float forward."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quant_gru.kernels.torch.decomposed_gru import PointHook
from quant_gru.quantize.program import ACTIVATION_OPERATORS

OPERATOR_INDEX = {name: i for i, name in enumerate(ACTIVATION_OPERATORS)}


def empty_ranges(pairs: int, device: torch.device | None = None) -> Tensor:
    """(pairs, operators, 2) of [min, max], empty: [+inf, -inf]."""
    ranges = torch.empty(pairs, len(ACTIVATION_OPERATORS), 2, dtype=torch.float64, device=device)
    ranges[..., 0] = math.inf
    ranges[..., 1] = -math.inf
    return ranges


def range_hook(ranges: Tensor) -> PointHook:
    """A hook that widens `ranges` (operators, 2) of one (layer, direction) in place with the
    finite values of real steps (padded steps of packed sequences and NaN/inf are left out)."""

    def hook(name: str, value: Tensor, valid: Tensor | None, step: int | None) -> Tensor:
        index = OPERATOR_INDEX.get(name)
        if index is None:  # weights: their scales come from the weights themselves
            return value
        seen = value.detach().double()
        counted = torch.isfinite(seen) if valid is None else torch.isfinite(seen) & valid
        low = seen.masked_fill(~counted, math.inf).amin()
        high = seen.masked_fill(~counted, -math.inf).amax()
        with torch.no_grad():
            ranges[index, 0] = torch.minimum(ranges[index, 0], low)
            ranges[index, 1] = torch.maximum(ranges[index, 1], high)
        return value

    return hook
