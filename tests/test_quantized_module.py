"""QuantGRU with use_quantization: calibration flow, configuration, and model quality."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU
from quant_gru.config import GRUQuantConfig, QuantConfigError


def calibrated(model: QuantGRU, *batches: torch.Tensor) -> QuantGRU:
    model.calibrating = True
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.calibrating = False
    model.use_quantization = True
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_quantized_forward_without_calibration_says_how() -> None:
    model = QuantGRU(4, 8, use_quantization=True)
    with pytest.raises(RuntimeError, match=r"model\.calibrating = True"):
        model(torch.randn(3, 2, 4))
    with pytest.raises(RuntimeError, match="no calibration statistics"):
        model.finalize_calibration()
    assert not model.is_calibrated()


def test_calibration_observes_every_operator_including_h0() -> None:
    torch.manual_seed(0)
    model = QuantGRU(4, 8, num_layers=2, bidirectional=True)
    model.calibrating = True
    hx = torch.full((4, 2, 8), 5.0)  # far outside what the GRU itself produces (|h| < 1)
    model(torch.randn(3, 2, 4), hx)
    ranges = model.calibration_ranges
    assert torch.isfinite(ranges).all()
    assert ranges.shape == (4, 14, 2)
    assert (ranges[:, 1, 1] == 5.0).all(), "h0 must be part of output.h's range"


def test_padded_steps_are_not_observed() -> None:
    """A packed batch gives the same statistics as its sequences one by one."""
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4)
    lengths = torch.tensor([6, 2, 4])
    packed_model = QuantGRU(4, 5, bidirectional=True)
    single_model = QuantGRU(4, 5, bidirectional=True)
    single_model.load_state_dict(packed_model.state_dict())
    packed_model.calibrating = single_model.calibrating = True
    with torch.no_grad():
        packed_model(pack_padded_sequence(x, lengths, enforce_sorted=False))
        for b, length in enumerate(lengths.tolist()):
            single_model(x[:length, b : b + 1])
    torch.testing.assert_close(
        packed_model.calibration_ranges, single_model.calibration_ranges, rtol=1e-12, atol=1e-12
    )


def test_reset_calibration_forgets() -> None:
    model = calibrated(QuantGRU(4, 8), torch.randn(3, 2, 4))
    model(torch.randn(3, 2, 4))
    assert model.is_calibrated()
    model.reset_calibration()
    assert not model.is_calibrated()
    assert not torch.isfinite(model.calibration_ranges).any()
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(torch.randn(3, 2, 4))


def test_lazy_finalize_on_first_quantized_forward() -> None:
    model = calibrated(QuantGRU(4, 8), torch.randn(3, 2, 4))
    assert not model.is_calibrated()
    model(torch.randn(3, 2, 4))
    assert model.is_calibrated()


def test_invalid_bitwidth_config_leaves_module_unchanged(tmp_path) -> None:
    model = calibrated(QuantGRU(4, 8), torch.randn(3, 2, 4))
    model.finalize_calibration()
    before = model.quant_config
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"GRU_config": {"operator_config": {"weight.W": {"bitwidth": 33}}}}))
    with pytest.raises(QuantConfigError, match=r"'weight\.W'\]\.bitwidth.*33"):
        model.load_bitwidth_config(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"GRU_config": {"operator_config": {"gate.q": {}}}}))
    with pytest.raises(QuantConfigError, match=r"unknown operator 'gate\.q'"):
        model.load_bitwidth_config(unknown)
    with pytest.raises(QuantConfigError, match=r"1\.\.32"):
        model.set_all_bitwidth(0)
    assert model.quant_config is before
    assert model.is_calibrated()


def test_config_changes_take_effect(tmp_path) -> None:
    torch.manual_seed(2)
    x = torch.rand(20, 8, 6) * 1.5 - 0.7
    model = calibrated(QuantGRU(6, 16), x)
    with torch.no_grad():
        float_out = model.to_float()(x)[0]
        eight = model(x)[0]
        model.set_all_bitwidth(4, is_symmetric=False)
        assert model.quant_config.spec("weight.W").is_symmetric
        four = model(x)[0]
        path = tmp_path / "cfg.json"
        GRUQuantConfig.default().with_all_bitwidth(12, is_symmetric=False).save(path)
        model.load_bitwidth_config(path)
        twelve = model(x)[0]
    errors = [(out - float_out).square().mean().item() for out in (four, eight, twelve)]
    assert errors[0] > errors[1] > errors[2], errors


def test_disable_quantization_runs_float(tmp_path) -> None:
    torch.manual_seed(3)
    x = torch.randn(5, 2, 4)
    model = calibrated(QuantGRU(4, 8), x)
    path = tmp_path / "off.json"
    path.write_text(json.dumps({"GRU_config": {"default_config": {"disable_quantization": True}}}))
    model.load_bitwidth_config(path)
    with torch.no_grad():
        disabled = model(x)[0]
        model.use_quantization = False
        torch.testing.assert_close(disabled, model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "bits, check",
    [(8, "cosine"), (16, "mse")],
)
def test_quality_on_the_seed_setting(bits: int, check: str, device: torch.device) -> None:
    """I=128, H=256, B=64, T=50, inputs uniform in [-0.7, 0.8]: calibrated on other data than
    evaluated. 8 bits: cosine to float >= 0.999; 16 bits: MSE <= 1e-6."""
    torch.manual_seed(4)
    model = QuantGRU(128, 256).to(device)
    model.set_all_bitwidth(bits, is_symmetric=False)

    def batch() -> torch.Tensor:
        return torch.rand(50, 64, 128, device=device) * 1.5 - 0.7

    calibrated(model, batch(), batch())
    x = batch()
    with torch.no_grad():
        quantized, h_n = model(x)
        reference, _ = model.to_float()(x)
    if check == "cosine":
        assert cosine(quantized, reference) >= 0.999
    else:
        mse = (quantized - reference).square().mean().item()
        assert mse <= 1e-6, mse
    assert math.isfinite(h_n.sum().item())
    torch.testing.assert_close(h_n[0], quantized[-1], rtol=0, atol=0)


def test_non_finite_inputs(device: torch.device) -> None:
    """§8: +inf saturates to qmax, -inf to qmin, NaN reads as 0; the output stays finite."""
    torch.manual_seed(5)
    model = calibrated(QuantGRU(3, 4).to(device), torch.randn(6, 2, 3, device=device))
    x = torch.randn(6, 2, 3, device=device)
    with torch.no_grad():
        zero_input = x.clone()
        zero_input[2, 0, 1] = 0.0
        nan_input = x.clone()
        nan_input[2, 0, 1] = math.nan
        torch.testing.assert_close(model(nan_input)[0], model(zero_input)[0], rtol=0, atol=0)
        huge, inf = x.clone(), x.clone()
        huge[1, 1, 0], inf[1, 1, 0] = 1e30, math.inf
        torch.testing.assert_close(model(inf)[0], model(huge)[0], rtol=0, atol=0)
        assert torch.isfinite(model(inf)[0]).all()


def test_dtype_change_keeps_statistics() -> None:
    model = calibrated(QuantGRU(3, 4), torch.randn(6, 2, 3))
    ranges = model.calibration_ranges.clone()
    model.double()
    assert model.calibration_ranges.dtype == torch.float64
    torch.testing.assert_close(model.calibration_ranges, ranges, rtol=0, atol=0)
    model.half()
    torch.testing.assert_close(model.calibration_ranges, ranges, rtol=0, atol=0)


def test_calibration_does_not_change_float_results() -> None:
    torch.manual_seed(6)
    reference = nn.GRU(4, 6, num_layers=2).double()
    model = QuantGRU.from_float(reference)
    model.calibrating = True
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    out, _ = model(x)
    torch.testing.assert_close(out, reference(x)[0], rtol=1e-10, atol=1e-12)
