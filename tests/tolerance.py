"""The tolerance ladder: one named assertion per kind of agreement the project promises.

- bit-exact: integer codes of every quantized realization equal the integer reference's.
- float conformance: a float realization against an independent float oracle (nn.GRU, a
  float64 reference), as an error relative to the size of the oracle's values.
- ratio-to-reference: a fast float kernel's error against float64 is at most a multiple of
  the error the oracle (cuDNN) makes at the same precision.
- LSB: a float result of a runtime that is not ours (ONNX Runtime) against the integer
  reference, in units of the output scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Relative agreement with nn.GRU that the float path promises, per dtype.
FLOAT_CONFORMANCE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def scaled_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1e-3): relative error of the tensor.

    Scaling by the largest magnitude (floored so all-zero tensors do not divide by zero)
    judges each element against the precision the whole tensor is computed at, which is
    what a reordered floating-point sum can promise; element-wise relative error is not.
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected64 = expected.detach().double().cpu()
    diff = (actual.detach().double().cpu() - expected64).abs().max().item()
    scale = max(expected64.abs().max().item(), 1e-3)
    return diff / scale


def assert_float_conformant(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """The float-conformance rung: scaled error within the tolerance of actual's dtype.

    The oracle may be computed at a higher precision than `actual` (a float64 oracle for a
    float32 result); the promise is the one of the precision being judged.
    """
    rtol = FLOAT_CONFORMANCE_RTOL[actual.dtype]
    error = scaled_error(actual, expected)
    assert error <= rtol, f"{what}: scaled error {error:.3e} exceeds {rtol:.0e} ({actual.dtype})"


def assert_codes_equal(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """The bit-exact rung: integer codes identical, element for element."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    mismatches = (actual.cpu() != expected.cpu()).sum().item()
    assert mismatches == 0, f"{what}: {mismatches} of {expected.numel()} codes differ"


def lsb_errors(actual: Tensor, expected_codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """|actual - dequantized expected codes| in units of the scale, per element (float64);
    scale and zero_point broadcast against the last dimension."""
    expected = (expected_codes.double() - zero_point.double()) * scale.double()
    return (actual.detach().double().cpu() - expected).abs() / scale.double()


def assert_within_lsb(errors: Tensor, lsb: float, fraction: float, what: str = "") -> None:
    """The LSB rung: at least `fraction` of the elements within `lsb` of the reference."""
    # The float32 result of an exactly matching code q differs from the float64 dequantized
    # reference by its rounding, |q| * 2^-24 LSB: below 0.01 LSB for codes up to 17 bits.
    within = (errors <= lsb + 0.01).double().mean().item()
    worst = errors.max().item()
    assert within >= fraction, (
        f"{what}: {within:.4%} of elements within {lsb} LSB (need {fraction:.2%}), "
        f"worst {worst:.2f}"
    )


RATIO_TO_REFERENCE = 2.0


def assert_ratio_to_reference(
    actual: Tensor, oracle: Tensor, exact: Tensor, what: str = "", floor: float = 0.0
) -> None:
    """The ratio-to-reference rung: `actual`'s scaled error against the float64 result `exact`
    is at most twice the error that `oracle` (cuDNN, or the plain path, at the same precision)
    makes. `floor`: an error always accepted, for oracles that happen to be exact."""
    error, reference = scaled_error(actual, exact), scaled_error(oracle, exact)
    limit = max(RATIO_TO_REFERENCE * reference, floor)
    assert error <= limit, (
        f"{what}: scaled error {error:.3e} exceeds {RATIO_TO_REFERENCE}x the reference's "
        f"{reference:.3e}"
    )
