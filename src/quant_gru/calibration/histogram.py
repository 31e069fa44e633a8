"""An order-independent streaming histogram of activation values.

Calibration sees its data in batches, and data-parallel ranks must end with the statistics one
process would have collected from all the data. So the histogram is a function of the data as a
multiset, never of the order or of the split in which it arrived:

- Bins have width ``w = 2^e`` (integer ``e``) and are aligned at multiples of ``w``: a value
  ``v`` falls in bin ``floor(v / w)``, computed exactly (scaling by a power of two is exact).
- At most ``NUM_BINS`` consecutive bins are kept, from bin ``start = floor(min / w)``.
- ``e`` is a function of the observed ``[min, max]`` only (``fit_exponent``): the smallest
  ``e >= max(E_MIN, floor(log2 max|v|) - 50)`` for which ``[min, max]`` spans at most
  ``NUM_BINS`` bins. The lower bound keeps bin indices below ``2^51`` in magnitude (exact in
  float64); an all-zero stream stays at ``E_MIN``.
- When new data or a merge widens the range, ``e`` grows and the old counts move to bin
  ``old_index >> (e_new - e_old)``: aligned bins merge exactly, so the counts equal those of
  binning all the data directly at the final ``e``.

Non-finite values are not counted. Exact ``min``, ``max`` and the total count are kept too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["E_MIN", "NUM_BINS", "Histogram", "fit_exponent"]

NUM_BINS = 2048
E_MIN = -60
# Bin indices stay below 2^(_INDEX_BITS + 1) in magnitude, so float64 holds them (and the
# bin centres, index + 1/2) exactly.
_INDEX_BITS = 50


def _floor_log2(value: float) -> int:
    """floor(log2(value)) exactly, for a finite positive value."""
    return math.frexp(value)[1] - 1  # value = m * 2^exponent with m in [0.5, 1)


def _floor_index(value: float, exponent: int) -> int:
    """floor(value / 2^exponent) exactly (a negative value that underflows to -0 is bin -1)."""
    index = math.floor(math.ldexp(value, -exponent))
    return -1 if index == 0 and value < 0 else index


def _fits(low: float, high: float, exponent: int) -> bool:
    return _floor_index(high, exponent) - _floor_index(low, exponent) < NUM_BINS


def fit_exponent(low: float, high: float) -> int:
    """The bin-width exponent for data in [low, high] (finite, ordered).

    Monotone in the range (a wider range never gets a smaller exponent), which is what makes the
    streamed and merged histograms equal to one built from all the data at once.
    """
    magnitude = max(abs(low), abs(high))
    exponent = E_MIN
    if magnitude > 0:
        exponent = max(exponent, _floor_log2(magnitude) - _INDEX_BITS)
    span = high - low
    if span > 0 and math.isfinite(span):
        # Below this, span / w > 2 * NUM_BINS: it cannot fit, so this is a lower bound.
        exponent = max(exponent, _floor_log2(span) - _floor_log2(NUM_BINS))
    while not _fits(low, high, exponent):
        exponent += 1
    return exponent


def _rebin(counts: Tensor, exponent: int, start: int, new_exponent: int, new_start: int) -> Tensor:
    """Counts moved to coarser (or equal) aligned bins; bins outside the new window are empty."""
    if exponent == new_exponent and start == new_start:
        return counts
    shift = min(new_exponent - exponent, 62)  # indices are < 2^52: larger shifts change nothing
    absolute = torch.arange(NUM_BINS, dtype=torch.int64, device=counts.device) + start
    target = ((absolute >> shift) - new_start).clamp_(0, NUM_BINS - 1)
    return torch.zeros_like(counts).scatter_add_(0, target, counts)


def _bin_counts(flat: Tensor, exponent: int, start: int) -> Tensor:
    """Counts of finite values `flat` (float32 or float64) in bins [start, start + NUM_BINS)."""
    if flat.dtype == torch.float32 and exponent > 127:
        flat = flat.double()  # 2^exponent is not a float32 (after float64 data widened the range)
    if exponent > 0:
        # Floor division goes through fmod, which is exact even where the quotient underflows:
        # a tiny negative value stays in bin -1 (a product could round to -0, i.e. bin 0).
        scaled = torch.div(flat, math.ldexp(1.0, exponent), rounding_mode="floor")
    else:
        scaled = flat * math.ldexp(1.0, -exponent)  # exact: scaling up, indices stay < 2^51
        scaled.floor_()
    if scaled.dtype == torch.float64 or float(np.float32(start)) == start:
        # Both operands are integers held exactly and the difference is in [0, NUM_BINS), so
        # int32 holds it (and halves the conversion and counting cost).
        indices = scaled.sub_(start).to(torch.int32)
    else:
        indices = scaled.to(torch.int64).sub_(start)
    return torch.bincount(indices, minlength=NUM_BINS)


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of values in ``NUM_BINS`` aligned bins of width ``2^exponent`` from bin ``start``.

    Immutable: ``update`` and ``merge`` return new histograms. ``counts`` lives on the device of
    the data; the other fields are host scalars. An empty histogram has ``total == 0``,
    ``exponent == E_MIN``, ``start == 0`` and ``[min_value, max_value] == [+inf, -inf]``.
    """

    counts: Tensor  # int64 (NUM_BINS,)
    exponent: int
    start: int
    total: int
    min_value: float
    max_value: float

    @staticmethod
    def empty(device: torch.device | str | None = None) -> Histogram:
        """A histogram that has seen no data."""
        counts = torch.zeros(NUM_BINS, dtype=torch.int64, device=device)
        return Histogram(counts, E_MIN, 0, 0, math.inf, -math.inf)

    @property
    def is_empty(self) -> bool:
        return self.total == 0

    @property
    def width(self) -> float:
        """The bin width 2^exponent."""
        return math.ldexp(1.0, self.exponent)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device: torch.device | str) -> Histogram:
        """The same histogram with its counts on `device`."""
        counts = self.counts.to(device)
        if counts is self.counts:
            return self
        return Histogram(
            counts, self.exponent, self.start, self.total, self.min_value, self.max_value
        )

    def update(self, values: Tensor) -> Histogram:
        """This histogram with the finite values of `values` (any shape) added.

        Returns a new histogram on the device of `values`; `self` is left as it is. One pass for
        the range (one host sync for two scalars), one for the bin indices and one bincount.
        """
        flat = values.detach().reshape(-1)
        if not flat.is_floating_point():
            flat = flat.double()
        elif flat.dtype != torch.float64:
            flat = flat.float()  # exact for float16 and bfloat16
        if flat.numel() == 0:
            return self.to(flat.device)
        low, high = torch.stack(torch.aminmax(flat)).tolist()  # NaN propagates to both
        if not (math.isfinite(low) and math.isfinite(high)):
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                return self.to(flat.device)
            low, high = torch.stack(torch.aminmax(flat)).tolist()
        low, high = min(low, self.min_value), max(high, self.max_value)
        exponent = fit_exponent(low, high)
        start = _floor_index(low, exponent)
        counts = _bin_counts(flat, exponent, start)
        if not self.is_empty:
            counts += _rebin(
                self.counts.to(flat.device), self.exponent, self.start, exponent, start
            )
        return Histogram(counts, exponent, start, self.total + flat.numel(), low, high)

    @staticmethod
    def merge(first: Histogram, second: Histogram) -> Histogram:
        """The histogram of both histograms' data: exact, commutative and associative.

        The result lives on `first`'s device (or `second`'s when `first` is empty).
        """
        if second.is_empty:
            return first
        if first.is_empty:
            return second
        low = min(first.min_value, second.min_value)
        high = max(first.max_value, second.max_value)
        exponent = fit_exponent(low, high)
        start = _floor_index(low, exponent)
        counts = _rebin(first.counts, first.exponent, first.start, exponent, start)
        counts = counts + _rebin(
            second.counts.to(first.device), second.exponent, second.start, exponent, start
        )
        return Histogram(counts, exponent, start, first.total + second.total, low, high)

    def to_tensors(self) -> dict[str, Tensor]:
        """Fixed-shape tensors on the counts' device, for buffers and all-gather:
        ``counts`` int64 (NUM_BINS,), ``meta`` int64 (exponent, start, total), ``range``
        float64 (min, max)."""
        device = self.counts.device
        return {
            "counts": self.counts.clone(),
            "meta": torch.tensor(
                [self.exponent, self.start, self.total], dtype=torch.int64, device=device
            ),
            "range": torch.tensor(
                [self.min_value, self.max_value], dtype=torch.float64, device=device
            ),
        }

    @staticmethod
    def from_tensors(tensors: Mapping[str, Tensor]) -> Histogram:
        """The histogram `to_tensors` wrote, checked for consistency (ValueError otherwise)."""
        missing = [key for key in ("counts", "meta", "range") if key not in tensors]
        if missing:
            raise ValueError(f"histogram tensors: missing {missing}")
        counts, meta, bounds = tensors["counts"], tensors["meta"], tensors["range"]
        expected = {
            "counts": (counts, torch.int64, (NUM_BINS,)),
            "meta": (meta, torch.int64, (3,)),
            "range": (bounds, torch.float64, (2,)),
        }
        for key, (tensor, dtype, shape) in expected.items():
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(
                    f"histogram tensors: {key!r} must be {dtype} of shape {shape}, "
                    f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
                )
        exponent, start, total = (int(v) for v in meta.tolist())
        low, high = (float(v) for v in bounds.tolist())
        if bool((counts < 0).any()) or int(counts.sum()) != total:
            raise ValueError(
                f"histogram tensors: counts must be non-negative and sum to total {total}, "
                f"got {int(counts.sum())} (smallest count {int(counts.min())})"
            )
        if total == 0:
            expected_meta, expected_range = (E_MIN, 0), [math.inf, -math.inf]
        elif math.isfinite(low) and math.isfinite(high) and low <= high:
            exponent_of_range = fit_exponent(low, high)
            expected_meta = (exponent_of_range, _floor_index(low, exponent_of_range))
            expected_range = [low, high]
        else:
            raise ValueError(
                f"histogram tensors: range must be finite and ordered, got {[low, high]}"
            )
        if (exponent, start) != expected_meta or [low, high] != expected_range:
            raise ValueError(
                f"histogram tensors: total {total} and range {[low, high]} need (exponent, start) "
                f"= {expected_meta} and range {expected_range}, got {(exponent, start)}"
            )
        return Histogram(counts.detach().clone(), exponent, start, total, low, high)

    def bin_edges(self) -> Tensor:
        """float64 (NUM_BINS + 1,) edges on the counts' device; bin i is [edge i, edge i+1)."""
        indices = torch.arange(NUM_BINS + 1, dtype=torch.float64, device=self.counts.device)
        return (indices + self.start) * self.width

    def centers(self) -> Tensor:
        """float64 (NUM_BINS,) bin centres on the counts' device."""
        indices = torch.arange(NUM_BINS, dtype=torch.float64, device=self.counts.device)
        return (indices + (self.start + 0.5)) * self.width
