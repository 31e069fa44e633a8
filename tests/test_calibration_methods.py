"""Streaming histogram and histogram-based calibration methods (minmax, percentile, SQNR).

Oracles are independent of the code under test: numpy binning for the histogram, and the SQNR
of quantize-dequantize on the raw samples for the methods.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from quant_gru.calibration.histogram import E_MIN, NUM_BINS, Histogram
from quant_gru.calibration.methods import (
    METHODS,
    expected_squared_error,
    percentile_range,
    qparams_from_histogram,
)
from quant_gru.config import OperatorSpec
from quant_gru.quantize.scales import dequantize, is_encoded, qparams_from_range, quantize

SAMPLES = 1 << 20
MODES = {  # name: (is_symmetric, is_unsigned)
    "asymmetric": (False, False),
    "symmetric": (True, False),
    "unsigned": (True, True),
}


def laplace(count: int, seed: int) -> Tensor:
    """Laplace(0, 1) samples (float64) by the inverse CDF."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=generator, dtype=torch.float64) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def with_outliers(values: Tensor, count: int, magnitude: float = 50.0) -> Tensor:
    """`values` with `count` entries (spread over the tensor) set to +-magnitude, as float32."""
    out = values.clone()
    positions = torch.linspace(0, values.numel() - 1, count).long()
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(count)[:count]
    out[positions] = magnitude * signs
    return out.float()


def state(hist: Histogram) -> dict[str, Tensor]:
    return {key: value.cpu() for key, value in hist.to_tensors().items()}


def assert_same(a: Histogram, b: Histogram) -> None:
    left, right = state(a), state(b)
    for key in left:
        assert torch.equal(left[key], right[key]), key


def stream(batches: list[Tensor]) -> Histogram:
    hist = Histogram.empty()
    for batch in batches:
        hist = hist.update(batch)
    return hist


# --- histogram: independent oracle ----------------------------------------------------------


def oracle(values: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(exponent, start, counts) by the documented rule, with numpy on the finite values."""
    data = values[np.isfinite(values)].astype(np.float64)
    low, high = float(data.min()), float(data.max())
    magnitude = max(abs(low), abs(high))
    bound = E_MIN if magnitude == 0 else max(E_MIN, int(np.frexp(magnitude)[1]) - 1 - 50)
    exponent = bound
    while np.floor_divide(high, 2.0**exponent) - np.floor_divide(low, 2.0**exponent) >= NUM_BINS:
        exponent += 1
    # numpy's floor division (via fmod) is exact even where data / 2^e would underflow.
    start = int(np.floor_divide(low, 2.0**exponent))
    indices = np.floor_divide(data, 2.0**exponent).astype(np.int64) - start
    return exponent, start, np.bincount(indices, minlength=NUM_BINS)


def assert_matches_oracle(hist: Histogram, values: np.ndarray) -> None:
    exponent, start, counts = oracle(values)
    assert (hist.exponent, hist.start) == (exponent, start)
    assert np.array_equal(hist.counts.cpu().numpy(), counts)
    finite = values[np.isfinite(values)]
    assert hist.total == finite.size
    assert (hist.min_value, hist.max_value) == (float(finite.min()), float(finite.max()))


def test_update_matches_numpy_oracle_and_edges(device: torch.device) -> None:
    values = with_outliers(laplace(100_000, seed=1), 10)
    hist = Histogram.empty(device).update(values.to(device))
    assert hist.counts.device.type == device.type
    assert_matches_oracle(hist, values.numpy())
    # Bin i is [edge i, edge i+1): numpy's histogram over the edges agrees.
    edges = hist.bin_edges().cpu().numpy()
    assert np.array_equal(np.histogram(values.numpy(), bins=edges)[0], hist.counts.cpu().numpy())
    assert torch.equal(hist.centers().cpu(), torch.from_numpy((edges[:-1] + edges[1:]) / 2))


def test_order_and_split_independence(device: torch.device) -> None:
    values = with_outliers(laplace(60_000, seed=2), 6).to(device)
    # Start with a narrow batch so that the bin width has to grow several times.
    order = torch.argsort(values.abs().cpu()).to(device)
    narrow_first = values[order]
    reference = Histogram.empty(device).update(values)
    permutation = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(3))
    shuffled = values[permutation.to(device)]
    for batches in (
        list(narrow_first.split(1000)),
        list(narrow_first.flip(0).split(7001)),
        list(shuffled.split(4096)),
        [shuffled[:5], shuffled[5:], narrow_first[:0]],
    ):
        assert_same(stream(batches), reference)
    assert_matches_oracle(reference, values.cpu().numpy())


def test_merge_equals_single_stream(device: torch.device) -> None:
    values = with_outliers(laplace(30_000, seed=4), 4).to(device)
    parts = [values[:100].abs(), values[100:20_000], values[20_000:]]  # different ranges
    hists = [stream(list(part.split(3000))) for part in parts]
    reference = Histogram.empty(device).update(torch.cat(parts))
    a, b, c = hists
    assert_same(Histogram.merge(Histogram.merge(a, b), c), reference)
    assert_same(Histogram.merge(a, Histogram.merge(b, c)), reference)
    assert_same(Histogram.merge(c, Histogram.merge(a, b)), reference)
    assert_same(Histogram.merge(Histogram.empty(device), reference), reference)
    assert_same(Histogram.merge(reference, Histogram.empty(device)), reference)


def test_non_finite_values_are_ignored(device: torch.device) -> None:
    finite = laplace(5000, seed=5).float()
    special = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    mixed = torch.cat([finite[:2000], special, finite[2000:]]).to(device)
    hist = Histogram.empty(device).update(mixed)
    assert hist.total == finite.numel() == int(hist.counts.sum())
    assert_same(hist, Histogram.empty(device).update(finite.to(device)))
    # A batch with nothing finite changes nothing.
    assert_same(hist.update(special.to(device)), hist)
    assert Histogram.empty(device).update(special.to(device)).is_empty


def test_huge_outlier_doubles_the_width(device: torch.device) -> None:
    small = (torch.rand(10_000, generator=torch.Generator().manual_seed(6)) - 0.5).to(device)
    before = Histogram.empty(device).update(small)
    outlier = torch.tensor([3.0e6], device=device)
    after = before.update(outlier)
    assert after.exponent > before.exponent
    assert after.width == 2.0 ** round(math.log2(after.width))
    assert_same(after, Histogram.empty(device).update(torch.cat([small, outlier])))
    assert_matches_oracle(after, torch.cat([small, outlier]).cpu().numpy())
    # The old counts merged into the two wide bins around zero: [-w, 0) and [0, w).
    assert after.start == -1
    assert int(after.counts[0]) == int((small < 0).sum())
    assert int(after.counts[1]) == int((small >= 0).sum())


def test_degenerate_and_extreme_values(device: torch.device) -> None:
    zeros = Histogram.empty(device).update(torch.zeros(100, device=device))
    assert (zeros.exponent, zeros.start, int(zeros.counts[0])) == (E_MIN, 0, 100)
    constant = Histogram.empty(device).update(torch.full((10,), 3.0, device=device))
    assert (constant.exponent, constant.start) == (1 - 50, 3 * 2**49)
    # A tiny negative value next to a huge positive one is in bin -1, not 0 (no underflow to -0).
    for dtype, tiny, huge in ((torch.float32, -1e-40, 2.0**100), (torch.float64, -1e-300, 1e300)):
        hist = Histogram.empty(device).update(
            torch.tensor([tiny, huge], dtype=dtype, device=device)
        )
        assert hist.start == -1 and int(hist.counts[0]) == 1
    # float32 batches after float64 data too wide for a float32 bin width.
    wide = torch.tensor([-1e300, 1e300], dtype=torch.float64, device=device)
    narrow = torch.tensor([-1.0, -1e-40, 0.0, 1.0], device=device)
    hist = Histogram.empty(device).update(wide).update(narrow)
    assert_matches_oracle(hist, torch.cat([wide, narrow.double()]).cpu().numpy())
    # Other dtypes are widened exactly.
    halves = torch.tensor([-1.5, 0.25, 7.0], dtype=torch.float16, device=device)
    assert_same(
        Histogram.empty(device).update(halves), Histogram.empty(device).update(halves.float())
    )
    ints = torch.tensor([-3, 0, 5], device=device)
    assert_same(Histogram.empty(device).update(ints), Histogram.empty(device).update(ints.double()))


def test_tensor_round_trip_and_validation(device: torch.device) -> None:
    hist = Histogram.empty(device).update(laplace(1000, seed=7).to(device))
    tensors = hist.to_tensors()
    assert tensors["counts"].shape == (NUM_BINS,) and tensors["counts"].dtype == torch.int64
    assert tensors["meta"].dtype == torch.int64 and tensors["range"].dtype == torch.float64
    assert_same(Histogram.from_tensors(tensors), hist)
    assert Histogram.from_tensors(Histogram.empty(device).to_tensors()).is_empty
    bad_total = dict(tensors, meta=tensors["meta"] + torch.tensor([0, 0, 1], device=device))
    with pytest.raises(ValueError, match="sum to total"):
        Histogram.from_tensors(bad_total)
    bad_exponent = dict(tensors, meta=tensors["meta"] + torch.tensor([1, 0, 0], device=device))
    with pytest.raises(ValueError, match="exponent, start"):
        Histogram.from_tensors(bad_exponent)
    with pytest.raises(ValueError, match="shape"):
        Histogram.from_tensors(dict(tensors, counts=tensors["counts"][:-1]))


# --- methods: SQNR of quantize-dequantize on the raw samples --------------------------------


@pytest.fixture(scope="module")
def data() -> dict[str, Tensor]:
    base = laplace(SAMPLES, seed=0)
    return {
        # 0.01% of the values at +-50 (as the typical outlier case).
        "outliers": with_outliers(base, SAMPLES // 10_000),
        # Two values at +-50 in 2^20: rare enough that clipping them pays even at 8 bits.
        "rare": with_outliers(base, 2),
    }


@pytest.fixture(scope="module")
def histograms(data: dict[str, Tensor]) -> dict[tuple[str, str], tuple[Tensor, Histogram]]:
    result = {}
    for name, values in data.items():
        for mode, (_, unsigned) in MODES.items():
            samples = values.abs() if unsigned else values
            # float64 copies (exact) spare a conversion in every SQNR measurement.
            result[name, mode] = (samples.double(), Histogram.empty().update(samples))
    return result


def sqnr_db(samples: Tensor, scale: float, zero_point: int, spec: OperatorSpec) -> float:
    """Signal power over quantize-dequantize noise power of float64 `samples`, in dB."""
    codes = quantize(samples, scale, zero_point, spec.qmin, spec.qmax)
    error = samples - dequantize(codes, scale, zero_point)
    return 10 * math.log10(float(samples.square().sum() / error.square().sum()))


def measure(
    histograms: dict[tuple[str, str], tuple[Tensor, Histogram]],
    name: str,
    mode: str,
    bits: int,
    scale_type: str,
) -> dict[str, float]:
    samples, hist = histograms[name, mode]
    spec = OperatorSpec(bits, *MODES[mode])
    result = {}
    for method in METHODS:
        scale, zero_point = qparams_from_histogram(hist, spec, scale_type, method)
        assert is_encoded(scale, scale_type)
        assert spec.qmin <= zero_point <= spec.qmax
        assert zero_point == 0 or not spec.is_symmetric
        result[method] = sqnr_db(samples, scale, zero_point, spec)
    return result


@pytest.mark.parametrize("scale_type", ["float", "pot"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_sqnr_never_worse_than_minmax(
    histograms: dict[tuple[str, str], tuple[Tensor, Histogram]],
    bits: int,
    mode: str,
    scale_type: str,
) -> None:
    for name in ("outliers", "rare"):
        db = measure(histograms, name, mode, bits, scale_type)
        assert db["sqnr"] >= db["minmax"] - 0.05, (name, db)
        assert db["sqnr"] >= db["percentile"] - 0.05, (name, db)


@pytest.mark.parametrize("mode", list(MODES))
def test_sqnr_gains_on_outliers(
    histograms: dict[tuple[str, str], tuple[Tensor, Histogram]], mode: str
) -> None:
    # 0.01% at +-50: clipping them costs 1e-4 * ~40^2 = 0.16 per value, more than minmax's
    # 8-bit rounding noise (100 / 255)^2 / 12 = 0.013, so large gains show at low widths only
    # (a brute-force scan on these samples finds at most +0.25 dB at 8 bits).
    four = measure(histograms, "outliers", mode, 4, "float")
    assert four["sqnr"] >= four["minmax"] + 3, four
    # With outliers rare enough, clipping them wins at 8 bits too. Unsigned codes spend all
    # 2^8 levels on [0, 50], so minmax is 6 dB better there and the best clip gains +2.2 dB.
    eight = measure(histograms, "rare", mode, 8, "float")
    assert eight["sqnr"] >= eight["minmax"] + (2 if mode == "unsigned" else 3), eight


@pytest.mark.parametrize(
    ("name", "mode", "bits"),
    [("outliers", "symmetric", 4), ("rare", "symmetric", 8), ("rare", "unsigned", 8)],
)
def test_sqnr_finds_the_best_symmetric_range(
    histograms: dict[tuple[str, str], tuple[Tensor, Histogram]], name: str, mode: str, bits: int
) -> None:
    """Against a brute-force scan of clipping magnitudes on the raw samples."""
    samples, hist = histograms[name, mode]
    spec = OperatorSpec(bits, *MODES[mode])

    def scan(magnitudes: np.ndarray) -> tuple[float, float]:
        return max(
            (sqnr_db(samples, *qparams_from_range(-m, m, spec, "float"), spec), m)
            for m in magnitudes.tolist()
        )

    _, coarse = scan(np.geomspace(1.0, 50.0, 12))  # steps of 1.43x
    best, _ = scan(coarse * np.geomspace(1 / 1.43, 1.43, 13))  # then of 1.06x
    found = sqnr_db(samples, *qparams_from_histogram(hist, spec, "float", "sqnr"), spec)
    assert found >= best - 0.05


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_clips_at_most_the_requested_share(
    histograms: dict[tuple[str, str], tuple[Tensor, Histogram]], mode: str, percentile: float
) -> None:
    samples, hist = histograms["outliers", mode]
    spec = OperatorSpec(8, *MODES[mode])
    scale, zero_point = qparams_from_histogram(hist, spec, "float", "percentile", percentile)
    assert (scale, zero_point) == qparams_from_range(
        *percentile_range(hist, spec, percentile), spec, "float"
    )
    restored = dequantize(
        quantize(samples, scale, zero_point, spec.qmin, spec.qmax), scale, zero_point
    )
    clipped = int(((samples - restored).abs() > scale * 0.501).sum())
    allowed = samples.numel() * (100 - percentile) / 100
    assert clipped <= allowed
    if percentile < 99.99:  # whole bins are kept, so a little less than the share is clipped
        assert clipped >= 0.8 * allowed
    full = qparams_from_histogram(hist, spec, "float", "minmax")
    assert qparams_from_histogram(hist, spec, "float", "percentile", 100) == full


def test_minmax_is_the_observed_range(device: torch.device) -> None:
    values = with_outliers(laplace(10_000, seed=8), 4).to(device)
    hist = Histogram.empty(device).update(values)
    for mode, flags in MODES.items():
        spec = OperatorSpec(8, *flags)
        for scale_type in ("float", "pot"):
            expected = qparams_from_range(
                float(values.min()), float(values.max()), spec, scale_type
            )
            assert qparams_from_histogram(hist, spec, scale_type, "minmax") == expected, mode
            # The search runs on the host: every device gives the same parameters.
            for method in METHODS:
                assert qparams_from_histogram(hist, spec, scale_type, method) == (
                    qparams_from_histogram(hist.to("cpu"), spec, scale_type, method)
                )


def test_expected_error_predicts_the_raw_error(
    histograms: dict[tuple[str, str], tuple[Tensor, Histogram]],
) -> None:
    samples, hist = histograms["outliers", "asymmetric"]
    for bits in (2, 4, 8, 16):
        spec = OperatorSpec(bits, False, False)
        for low, high in ((-50.0, 50.0), (-3.0, 6.0), (-0.5, 0.25)):
            scale, zero_point = qparams_from_range(low, high, spec, "float")
            codes = quantize(samples, scale, zero_point, spec.qmin, spec.qmax)
            actual = float((samples - dequantize(codes, scale, zero_point)).square().sum())
            predicted = expected_squared_error(hist, scale, zero_point, spec)
            assert predicted == pytest.approx(actual, rel=0.02), (bits, low, high)


def test_small_and_degenerate_histograms() -> None:
    spec = OperatorSpec(8, False, False)
    for values in ([0.0, 0.0], [2.5], [-1.0, 1.0], [1e-30, 2e-30]):
        hist = Histogram.empty().update(torch.tensor(values, dtype=torch.float64))
        for method in METHODS:
            for scale_type in ("float", "pot"):
                scale, zero_point = qparams_from_histogram(hist, spec, scale_type, method)
                assert is_encoded(scale, scale_type) and spec.qmin <= zero_point <= spec.qmax


def test_argument_validation() -> None:
    spec = OperatorSpec(8, False, False)
    hist = Histogram.empty().update(laplace(100, seed=9))
    with pytest.raises(ValueError, match="'minmax', 'percentile', 'sqnr'"):
        qparams_from_histogram(hist, spec, "float", "entropy")
    for bad in (0.0, -1.0, 100.5, math.nan):
        with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
            qparams_from_histogram(hist, spec, "float", "percentile", bad)
    with pytest.raises(ValueError, match="percentile must be a number"):
        qparams_from_histogram(hist, spec, "float", "percentile", True)
    with pytest.raises(ValueError, match="no data was observed"):
        qparams_from_histogram(Histogram.empty(), spec, "float", "sqnr")
