"""Activation quantization parameters from a value histogram: minmax, percentile and SQNR.

Every method picks a real range and returns what ``qparams_from_range`` gives for it, so the
encoding rules (float32 or power-of-two scales, ranges extended to contain 0, symmetric zero
point 0) hold whatever the method. The search runs on the host in float64, so a histogram
gives the same parameters on every device and every rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quant_gru.calibration.histogram import Histogram
from quant_gru.config import SCALE_TYPES, OperatorSpec
from quant_gru.quantize.scales import pot_exponent, qparams_from_range

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_PERCENTILE",
    "METHODS",
    "expected_squared_error",
    "percentile_range",
    "qparams_from_histogram",
]

METHODS: tuple[str, ...] = ("minmax", "percentile", "sqnr")
DEFAULT_METHOD = "sqnr"
DEFAULT_PERCENTILE = 99.99

# SQNR search grids. Ends shrink geometrically from the observed range: fine steps for the
# 1-D (symmetric) search, a coarser 2-D grid plus a local refinement for asymmetric ranges.
_SYMMETRIC_STEPS_PER_OCTAVE = 16
_SYMMETRIC_OCTAVES = 12
_ASYMMETRIC_STEPS_PER_OCTAVE = 8
_ASYMMETRIC_STEPS = 64  # per end: down to 2^-7.875 of the observed end
_REFINE_STEPS = 9  # per end, between the neighbours of the coarse optimum
_POT_EXPONENTS = 16  # power-of-two scales below the one covering the whole range
# Bins narrower than this fraction of the bin width (only the two outer bins, clipped to the
# data's min and max, can be) are treated as point masses.
_POINT_FRACTION = 1.0 / 64.0
_CHUNK_ELEMENTS = 1 << 21
_TIE_TOLERANCE = 1e-12

_Candidate = tuple[float, int]


def qparams_from_histogram(
    hist: Histogram,
    spec: OperatorSpec,
    scale_type: str,
    method: str = DEFAULT_METHOD,
    percentile: float = DEFAULT_PERCENTILE,
) -> tuple[float, int]:
    """Encoded scale and zero point of an activation operator from its histogram.

    - ``minmax``: the observed [min, max].
    - ``percentile``: the range keeping at least ``percentile`` percent of the values (rule in
      ``percentile_range``).
    - ``sqnr``: the candidate (scale, zero point) with the least expected squared quantization
      error over the histogram (``expected_squared_error``); the minmax parameters are a
      candidate, so the result is never worse than minmax on the histogram.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
    if not 0 < percentile <= 100:  # also rejects NaN
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    if hist.is_empty:
        raise ValueError(
            "no data was observed: the histogram is empty (were calibration batches run?)"
        )
    if method == "minmax":
        return qparams_from_range(hist.min_value, hist.max_value, spec, scale_type)
    if method == "percentile":
        low, high = percentile_range(hist, spec, percentile)
        return qparams_from_range(low, high, spec, scale_type)
    return _sqnr_search(hist, spec, scale_type)


# --- percentile ---------------------------------------------------------------------------------


def percentile_range(hist: Histogram, spec: OperatorSpec, percentile: float) -> tuple[float, float]:
    """The range kept by the percentile method; at most (100 - p)% of the values lie outside.

    - Asymmetric: at most (100 - p)/2 % of the values lie below the lower bound and as many
      above the upper bound. The lower bound is the lower edge of the first bin whose cumulative
      count (from below) exceeds that share, the upper bound the upper edge of the last bin
      whose cumulative count from above exceeds it: whole bins are kept, so the kept mass is at
      least the requested one. Bounds are then clipped to the observed [min, max].
    - Symmetric signed: [-M, M] with M the upper edge of the magnitude bin where more than
      (100 - p)% of the values have a larger or equal magnitude bin, clipped to max |v|.
    - Symmetric unsigned: only the upper tail, (100 - p)% above the upper bound (negative
      values clamp to code 0 whatever the range).
    p = 100 gives the observed range.
    """
    counts = hist.counts.detach().to("cpu")
    width, start = hist.width, hist.start
    if spec.is_symmetric and not spec.is_unsigned:
        # Bin k covers magnitudes [k w, (k+1) w) for k >= 0 and (m w, (m+1) w] with m = -k-1
        # for k < 0; the folded bins are contiguous and at most NUM_BINS of them.
        absolute = torch.arange(counts.numel(), dtype=torch.int64) + start
        magnitude = torch.where(absolute >= 0, absolute, -absolute - 1)
        first = int(magnitude.min())
        folded = torch.zeros_like(counts).scatter_add_(0, magnitude - first, counts)
        bin_index = _upper_crossing(folded, hist.total * (100.0 - percentile) / 100.0)
        largest = max(-hist.min_value, hist.max_value)
        bound = min((first + bin_index + 1) * width, largest)
        return -bound, bound
    share = (100.0 - percentile) / 100.0
    if not spec.is_symmetric:
        share /= 2
    allowed = hist.total * share
    high = min((start + _upper_crossing(counts, allowed) + 1) * width, hist.max_value)
    if spec.is_symmetric:  # unsigned: the lower end does not matter
        return hist.min_value, high
    low = max((start + _lower_crossing(counts, allowed)) * width, hist.min_value)
    return low, high


def _lower_crossing(counts: Tensor, allowed: float) -> int:
    """The first bin whose cumulative count (from below, inclusive) exceeds `allowed`."""
    cumulative = torch.cumsum(counts, 0)
    return int(
        torch.searchsorted(
            cumulative.double(), torch.tensor([allowed], dtype=torch.float64), right=True
        )
    )


def _upper_crossing(counts: Tensor, allowed: float) -> int:
    """The last bin whose cumulative count from above (inclusive) exceeds `allowed`."""
    return counts.numel() - 1 - _lower_crossing(counts.flip(0), allowed)


# --- SQNR ---------------------------------------------------------------------------------------


def expected_squared_error(
    hist: Histogram, scale: float, zero_point: int, spec: OperatorSpec
) -> float:
    """Expected sum over the histogram's values of (v - dequantize(quantize(v)))^2.

    Values are taken as spread uniformly within their bin (the outer bins clipped to the observed
    min and max), and the error is integrated exactly over each bin: rounding noise inside the
    range, clipping error outside. Unlike evaluating bin centres, this stays right when the
    scale is close to or below the bin width.
    """
    if hist.is_empty:
        return 0.0
    bins = _HistogramBins(hist)
    zp = torch.tensor([float(zero_point)], dtype=torch.float64)
    return float(bins.errors(torch.tensor([scale], dtype=torch.float64), zp, spec)[0])


class _HistogramBins:
    """The non-empty bins of a histogram in the form the error integral needs (host, float64)."""

    def __init__(self, hist: Histogram) -> None:
        counts = hist.counts.detach().to("cpu")
        index = torch.nonzero(counts).reshape(-1)
        mass = counts[index].double()
        lower = ((index + hist.start).double() * hist.width).clamp(min=hist.min_value)
        upper = ((index + hist.start + 1).double() * hist.width).clamp(max=hist.max_value)
        point = (upper - lower) < hist.width * _POINT_FRACTION
        # Point masses: values at the bin's midpoint.
        self.points = ((lower + upper) / 2)[point]
        self.point_mass = mass[point]
        # Uniform bins: the integral of the error over [a, b] weighted by mass / (b - a) is
        # sum_j G(edge_j) * weight_j with G an antiderivative, over the distinct edges.
        lower, upper, mass = lower[~point], upper[~point], mass[~point]
        density = mass / (upper - lower)
        self.edges, inverse = torch.unique(torch.cat([lower, upper]), return_inverse=True)
        self.edge_weight = torch.zeros_like(self.edges)
        self.edge_weight.index_add_(0, inverse, torch.cat([-density, density]))

    def errors(self, scales: Tensor, zero_points: Tensor, spec: OperatorSpec) -> Tensor:
        """Expected squared error of every candidate (scales[c], zero_points[c]), float64 (C,)."""
        result = torch.empty_like(scales)
        columns = max(self.edges.numel(), 1)
        chunk = max(1, _CHUNK_ELEMENTS // columns)
        for begin in range(0, scales.numel(), chunk):
            s = scales[begin : begin + chunk, None]
            low_code = spec.qmin - zero_points[begin : begin + chunk, None]
            high_code = spec.qmax - zero_points[begin : begin + chunk, None]
            uniform = _integrated_error(self.edges / s, low_code, high_code, self.edge_weight)
            points = _code_error(self.points / s, low_code, high_code).square() @ self.point_mass
            result[begin : begin + chunk] = s[:, 0] ** 3 * uniform + s[:, 0] ** 2 * points
        return result


def _code_error(t: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """t - clamp(floor(t + 1/2), low, high): the quantization error in units of the scale."""
    return t - torch.minimum(torch.maximum(torch.floor(t + 0.5), low), high)


def _integrated_error(t: Tensor, low: Tensor, high: Tensor, weight: Tensor) -> Tensor:
    """sum_j G(t[:, j]) * weight[j], with G an antiderivative in t of _code_error(t, low, high)^2.

    Inside [low - 1/2, high + 1/2] the error is a sawtooth in [-1/2, 1/2): each whole period
    adds 1/12 and a partial one (f^3 + 1/8) / 3. Beyond the ends it is t - high (or t - low),
    whose square integrates to cubes. G's constants drop out because the weights sum to zero.
    `t` is overwritten.
    """
    above = (t - high).clamp_(min=0.5).pow_(3) @ weight
    below = (t - low).clamp_(max=-0.5).pow_(3) @ weight
    inside = t.clamp_(low - 0.5, high + 0.5)
    periods = (inside + 0.5).floor_()
    partial = inside.sub_(periods).pow_(3) @ weight
    return (periods @ weight) / 12 + (partial + above + below) / 3


class _Search:
    """_Candidate (scale, zero point) pairs with their expected errors, each evaluated once."""

    def __init__(self, hist: Histogram, spec: OperatorSpec, scale_type: str) -> None:
        self.bins = _HistogramBins(hist)
        self.spec = spec
        self.scale_type = scale_type
        self.errors: dict[_Candidate, float] = {}

    def evaluate(self, ranges: list[tuple[float, float]]) -> list[float]:
        """The expected error of the parameters `qparams_from_range` gives for each range."""
        params = [qparams_from_range(low, high, self.spec, self.scale_type) for low, high in ranges]
        new = [p for p in dict.fromkeys(params) if p not in self.errors]
        if new:
            scales = torch.tensor([p[0] for p in new], dtype=torch.float64)
            zero_points = torch.tensor([float(p[1]) for p in new], dtype=torch.float64)
            errors = self.bins.errors(scales, zero_points, self.spec)
            # Overflowing cubes (absurd candidates on extreme data) must lose, not win as NaN.
            values = torch.nan_to_num(errors, nan=math.inf).tolist()
            self.errors.update(zip(new, values, strict=True))
        return [self.errors[p] for p in params]

    def best(self) -> _Candidate:
        """The least error; among (numerically) tied ones the largest scale, then the first."""
        smallest = min(self.errors.values())
        tied = [p for p, e in self.errors.items() if e <= smallest + _TIE_TOLERANCE * abs(smallest)]
        return max(tied, key=lambda p: p[0])


def _geometric(steps_per_octave: int, count: int) -> list[float]:
    """Shrink factors 1, 2^(-1/steps), 2^(-2/steps), ... (count of them)."""
    return [2.0 ** (-i / steps_per_octave) for i in range(count)]


def _between_neighbours(factors: list[float], index: int) -> list[float]:
    """_REFINE_STEPS factors spaced geometrically from factors[index - 1] to factors[index + 1]."""
    wide = factors[max(index - 1, 0)]
    narrow = factors[min(index + 1, len(factors) - 1)]
    return [wide * (narrow / wide) ** (k / (_REFINE_STEPS - 1)) for k in range(_REFINE_STEPS)]


def _first_min(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def _sqnr_search(hist: Histogram, spec: OperatorSpec, scale_type: str) -> _Candidate:
    """Search candidate ranges for the least expected squared error on the histogram.

    The full observed range is always the first candidate. _Candidates, all mapped through
    ``qparams_from_range``:

    - float, symmetric: magnitude M * 2^(-i/16), i < 192 (12 octaves), then 9 factors between
      the neighbours of the best one.
    - float, asymmetric: lower end L * 2^(-i/8) and upper end H * 2^(-j/8), i, j < 64 (64 x 64,
      about 8 octaves per end), then a 9 x 9 grid between the neighbours of the best pair.
    - pot: each scale 2^k from the one of the full range down by 16 exponents; asymmetric
      operators also search the zero point, from lower ends L * 2^(-i/8), i < 64, and the end
      that keeps the upper end H unclipped.
    """
    search = _Search(hist, spec, scale_type)
    search.evaluate([(hist.min_value, hist.max_value)])
    top = pot_exponent(qparams_from_range(hist.min_value, hist.max_value, spec, scale_type)[0])
    low, high = min(hist.min_value, 0.0), max(hist.max_value, 0.0)
    if spec.is_symmetric:
        magnitude = high if spec.is_unsigned else max(-low, high)
        if magnitude <= 0:
            return search.best()

        def ranges(magnitudes: list[float]) -> list[tuple[float, float]]:
            return [(0.0 if spec.is_unsigned else -m, m) for m in magnitudes]

        if scale_type == "pot":
            unit = max(spec.qmax, 1)
            search.evaluate(ranges([math.ldexp(unit, top - k) for k in range(_POT_EXPONENTS + 1)]))
            return search.best()
        factors = _geometric(
            _SYMMETRIC_STEPS_PER_OCTAVE, _SYMMETRIC_STEPS_PER_OCTAVE * _SYMMETRIC_OCTAVES
        )
        errors = search.evaluate(ranges([magnitude * f for f in factors]))
        refined = _between_neighbours(factors, _first_min(errors))
        search.evaluate(ranges([magnitude * f for f in refined]))
        return search.best()
    if low == high:
        return search.best()
    factors = _geometric(_ASYMMETRIC_STEPS_PER_OCTAVE, _ASYMMETRIC_STEPS)
    if scale_type == "pot":
        search.evaluate(_pot_asymmetric_ranges(low, high, top, spec))
        return search.best()
    low_factors = factors if low < 0 else [0.0]
    high_factors = factors if high > 0 else [0.0]
    pairs = [(low * f, high * g) for f in low_factors for g in high_factors]
    best = divmod(_first_min(search.evaluate(pairs)), len(high_factors))
    if low < 0:
        low_factors = _between_neighbours(factors, best[0])
    if high > 0:
        high_factors = _between_neighbours(factors, best[1])
    search.evaluate([(low * f, high * g) for f in low_factors for g in high_factors])
    return search.best()


def _pot_asymmetric_ranges(
    low: float, high: float, top: int, spec: OperatorSpec
) -> list[tuple[float, float]]:
    """Ranges [s (qmin - zp), s (qmax - zp)] (exact, so they map back to s = 2^k and zp) for
    k = top, top - 1, ..., top - 16 and zero points placing the lower end near each candidate."""
    factors = _geometric(_ASYMMETRIC_STEPS_PER_OCTAVE, _ASYMMETRIC_STEPS)
    ranges = []
    for k in range(top, top - _POT_EXPONENTS - 1, -1):
        scale = math.ldexp(1.0, k)
        window = scale * (spec.qmax - spec.qmin)
        lower_ends = [low * f for f in factors] + [min(high - window, 0.0)]
        zero_points = {
            min(max(math.floor(spec.qmin - end / scale + 0.5), spec.qmin), spec.qmax)
            for end in lower_ends
        }
        ranges += [
            (scale * (spec.qmin - zp), scale * (spec.qmax - zp)) for zp in sorted(zero_points)
        ]
    return ranges
