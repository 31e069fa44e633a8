"""Calibration statistics: a histogram of every activation operator of every (layer, direction),
collected from the float forward and reduced across data-parallel ranks."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

from quant_gru.calibration.histogram import Histogram
from quant_gru.kernels.torch.decomposed_gru import PointHook
from quant_gru.quantize.program import ACTIVATION_OPERATORS

OPERATOR_INDEX = {name: i for i, name in enumerate(ACTIVATION_OPERATORS)}
_Pending = tuple[Tensor, Tensor | None]


class CalibrationStatistics:
    """Histograms[pair][operator] in ACTIVATION_OPERATORS order.

    The hooks only keep references to the values a forward produces; ``flush`` then adds them
    to the histograms with one update per operator, which keeps calibration cheap.
    """

    def __init__(self, pairs: int, device: torch.device | str | None = None) -> None:
        self.histograms = [
            [Histogram.empty(device) for _ in ACTIVATION_OPERATORS] for _ in range(pairs)
        ]
        self._pending: dict[tuple[int, int], list[_Pending]] = defaultdict(list)

    def hook(self, pair: int) -> PointHook:
        """The hook that records one (layer, direction)'s operators during a forward."""

        def record(name: str, value: Tensor, valid: Tensor | None, step: int | None) -> Tensor:
            index = OPERATOR_INDEX.get(name)
            if index is not None:  # weights are calibrated from the weights themselves
                self._pending[pair, index].append((value.detach(), valid))
            return value

        return record

    def flush(self) -> None:
        """Add the values recorded since the last flush (padded steps left out)."""
        for (pair, index), items in self._pending.items():
            values = _valid_values(items)
            self.histograms[pair][index] = self.histograms[pair][index].update(values)
        self._pending.clear()

    def discard_pending(self) -> None:
        self._pending.clear()

    @property
    def is_complete(self) -> bool:
        return all(not h.is_empty for row in self.histograms for h in row)

    def ranges(self) -> Tensor:
        """[min, max] of every operator, (pairs, operators, 2) float64 on the CPU."""
        return torch.tensor(
            [[[h.min_value, h.max_value] for h in row] for row in self.histograms],
            dtype=torch.float64,
        )

    def to(self, device: torch.device | str) -> CalibrationStatistics:
        moved = CalibrationStatistics(0)
        moved.histograms = [[h.to(device) for h in row] for row in self.histograms]
        return moved

    def reduced(self) -> list[list[Histogram]]:
        """The histograms of all ranks merged (a copy), when torch.distributed is initialised.

        Merging is exact and order-independent, so every rank gets what one process that saw
        all the data would have.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return [list(row) for row in self.histograms]
        local = [[h.to_tensors() for h in row] for row in self.histograms]
        device = torch.device("cpu") if dist.get_backend() == "gloo" else None
        gathered = {}
        for key in ("counts", "meta", "range"):
            stacked = torch.stack([torch.stack([t[key] for t in row]) for row in local])
            stacked = stacked.to(device) if device is not None else stacked
            parts = [torch.empty_like(stacked) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, stacked.contiguous())
            gathered[key] = parts
        merged = []
        for p, row in enumerate(self.histograms):
            merged_row = []
            for i in range(len(row)):
                total = Histogram.empty(row[i].device)
                for rank in range(dist.get_world_size()):
                    part = {key: gathered[key][rank][p, i] for key in gathered}
                    total = Histogram.merge(total, Histogram.from_tensors(part))
                merged_row.append(total)
            merged.append(merged_row)
        return merged


def _valid_values(items: list[_Pending]) -> Tensor:
    """One flat tensor of the recorded values at real (not padded) steps."""
    unmasked = [v.reshape(-1) for v, valid in items if valid is None]
    masked = [(v, valid) for v, valid in items if valid is not None]
    if masked and all(v.shape == masked[0][0].shape for v, _ in masked):
        values = torch.stack([v for v, _ in masked])
        keep = torch.stack([valid.expand_as(v) for v, valid in masked])
        unmasked.append(values[keep])
    else:
        unmasked.extend(v[valid.expand_as(v)] for v, valid in masked)
    return torch.cat(unmasked)
