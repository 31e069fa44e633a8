"""Quantization parameters of one (layer, direction): encoded scales and zero points."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from quant_gru.config import OperatorSpec


@dataclass(frozen=True)
class OperatorQuant:
    """One operator's parameters (reference/README.md §1, §2).

    ``scale`` holds encoded scales as float64 values: one for activations; 1, 3 or 3H for
    weights and biases, by granularity. ``zero_point`` is an integer per scale (0 if symmetric).
    """

    spec: OperatorSpec
    scale: Tensor
    zero_point: Tensor

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    @classmethod
    def per_tensor(cls, spec: OperatorSpec, scale: float, zero_point: int) -> OperatorQuant:
        return cls(
            spec,
            torch.tensor([scale], dtype=torch.float64),
            torch.tensor([zero_point], dtype=torch.int64),
        )

    def scalar(self) -> tuple[float, int]:
        """(scale, zero point) of a per-tensor operator."""
        if self.scale.numel() != 1:
            raise ValueError(f"operator has {self.scale.numel()} scales, expected one")
        return float(self.scale.item()), int(self.zero_point.item())


# Operator name (quant_gru.config.OPERATORS) -> its parameters, for one (layer, direction).
DirectionQuant = Mapping[str, OperatorQuant]
