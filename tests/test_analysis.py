"""quant_gru.analysis.operator_sqnr against SQNRs computed independently from the module's own
outputs and from quantizing the input directly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU
from quant_gru.analysis import operator_sqnr
from quant_gru.quantize.program import ACTIVATION_OPERATORS
from quant_gru.quantize.scales import dequantize, quantize

# The module returns float32 values; analysis keeps its dequantized values in float64. Their
# rounding (2^-24 relative, on values up to 2^7 LSB) moves an 8-bit SQNR by about 1e-4 dB.
DB = 1e-3


def sqnr(reference: torch.Tensor, noisy: torch.Tensor) -> float:
    signal = reference.double().square().sum().item()
    noise = (noisy.double() - reference.double()).square().sum().item()
    return 10 * math.log10(signal / noise)


def calibrated(bits: int, **kwargs: object) -> tuple[QuantGRU, torch.Tensor]:
    torch.manual_seed(0)
    model = QuantGRU(5, 12, **kwargs)  # type: ignore[arg-type]
    x = torch.randn(9, 4, 5)
    model.calibrating = True
    with torch.no_grad():
        model(x)
    model.calibrating = False
    model.calibration_method = "minmax"
    model.set_all_bitwidth(bits, is_symmetric=False)
    return model, x


@pytest.mark.parametrize("bits", [4, 8])
def test_output_and_input_sqnr_match_independent_computations(bits: int) -> None:
    model, x = calibrated(bits)
    result = operator_sqnr(model, x)
    assert set(result) == {"l0"} and set(result["l0"]) == set(ACTIVATION_OPERATORS)
    with torch.no_grad():
        reference, _ = model(x)
        model.use_quantization = True
        quantized, _ = model(x)
    # output.h over every step is the GRU's output.
    assert result["l0"]["output.h"] == pytest.approx(sqnr(reference, quantized), abs=DB)
    quant = model._quantized_model().quant[0]["input.x"]
    scale, zero_point = quant.scalar()
    codes = quantize(x, scale, zero_point, quant.qmin, quant.qmax)
    direct = sqnr(x, dequantize(codes, scale, zero_point))
    assert result["l0"]["input.x"] == pytest.approx(direct, abs=DB)


def test_more_bits_less_noise_at_every_operator() -> None:
    low = operator_sqnr(*calibrated(6, num_layers=2, bidirectional=True))
    high = operator_sqnr(*calibrated(12, num_layers=2, bidirectional=True))
    assert set(low) == {"l0", "l0_reverse", "l1", "l1_reverse"}
    for pair in low:
        for op in ACTIVATION_OPERATORS:
            assert high[pair][op] > low[pair][op] + 20, (pair, op)


def test_padded_steps_are_left_out() -> None:
    """A packed batch gives the SQNR of the valid steps: the same as running each sequence on
    its own and pooling signal and noise."""
    model, x = calibrated(8)
    lengths = torch.tensor([9, 4, 6, 2])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    pooled = operator_sqnr(model, packed)["l0"]["output.h"]
    with torch.no_grad():
        references, noisy = [], []
        for b, n in enumerate(lengths.tolist()):
            model.use_quantization = False
            references.append(model(x[:n, b])[0])
            model.use_quantization = True
            noisy.append(model(x[:n, b])[0])
    assert pooled == pytest.approx(sqnr(torch.cat(references), torch.cat(noisy)), abs=DB)


def test_needs_calibration() -> None:
    with pytest.raises(RuntimeError, match="not calibrated"):
        operator_sqnr(QuantGRU(3, 4), torch.randn(2, 1, 3))
