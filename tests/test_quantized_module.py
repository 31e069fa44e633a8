"""QuantGRU with use_quantization: calibration flow, configuration, and model quality."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU
from quant_gru.calibration.statistics import OPERATOR_INDEX
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
    h_index = OPERATOR_INDEX["output.h"]
    assert (ranges[:, h_index, 1] == 5.0).all(), "h0 must be part of output.h's range"


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


BAD_CONFIGS = {
    "width 0": ({"operator_config": {"gate.z_out": {"bitwidth": 0}}}, "bitwidth", "0"),
    "width 33": ({"operator_config": {"op.rRh": {"bitwidth": 33}}}, "bitwidth", "33"),
    "width as string": ({"operator_config": {"input.x": {"bitwidth": "8"}}}, "bitwidth", "'8'"),
    "symmetric as int": (
        {"operator_config": {"input.x": {"bitwidth": 8, "is_symmetric": 1}}},
        "is_symmetric",
        "1",
    ),
    "asymmetric weights": (
        {"operator_config": {"weight.R": {"bitwidth": 8, "is_symmetric": False}}},
        "weight.R",
        "False",
    ),
    "unknown operator": ({"operator_config": {"gate.q": {"bitwidth": 8}}}, "gate.q", "gate.q"),
    "unknown entry key": (
        {"operator_config": {"input.x": {"bitwidth": 8, "bits": 4}}},
        "bits",
        "bits",
    ),
    "alias and name": (
        {"operator_config": {"input.h": {"bitwidth": 8}, "output.h": {"bitwidth": 8}}},
        "input.h",
        "output.h",
    ),
    "bad scale type": ({"default_config": {"scale_type": "log"}}, "scale_type", "'log'"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_every_config_error_names_the_key_and_changes_nothing(name: str, tmp_path) -> None:
    section, key, shown = BAD_CONFIGS[name]
    model = calibrated(QuantGRU(4, 8), torch.randn(3, 2, 4))
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        before = model(x)[0]
    config = model.quant_config
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"GRU_config": section}))
    with pytest.raises(QuantConfigError) as caught:
        model.load_bitwidth_config(path)
    assert key in str(caught.value) and shown in str(caught.value), str(caught.value)
    assert model.quant_config is config and model.is_calibrated()
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)


def test_malformed_and_missing_config_files(tmp_path) -> None:
    model = QuantGRU(4, 8)
    config = model.quant_config
    broken = tmp_path / "broken.json"
    broken.write_text('{"GRU_config": {"operator_config": {')
    with pytest.raises(QuantConfigError, match="line 1"):
        model.load_bitwidth_config(broken)
    with pytest.raises(FileNotFoundError, match=r"absent\.json"):
        model.load_bitwidth_config(tmp_path / "absent.json")
    assert model.quant_config is config


def test_packed_quantized_forward_equals_each_sequence_alone(device: torch.device) -> None:
    """Lengths only decide which steps run: a packed batch gives every sequence the codes it
    gets on its own."""
    torch.manual_seed(7)
    model = QuantGRU(4, 6, num_layers=2, bidirectional=True).to(device)
    x = torch.randn(7, 3, 4, device=device)
    calibrated(model, x)
    lengths = torch.tensor([7, 3, 5])
    hx = torch.randn(4, 3, 6, device=device) * 0.5
    with torch.no_grad():
        packed_out, packed_h = model(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out)
        for b, length in enumerate(lengths.tolist()):
            alone, alone_h = model(x[:length, b : b + 1], hx[:, b : b + 1])
            assert torch.equal(padded[:length, b], alone[:, 0])
            assert torch.equal(packed_h[:, b], alone_h[:, 0])


def test_qat_with_inter_layer_dropout_trains(device: torch.device) -> None:
    torch.manual_seed(8)
    model = QuantGRU(4, 6, num_layers=3, dropout=0.4, bidirectional=True).to(device)
    x = torch.randn(5, 2, 4, device=device)
    calibrated(model, x)
    model.train()
    out, h_n = model(x.requires_grad_())
    (out.square().sum() + h_n.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        first, second = model(x)[0], model(x)[0]
        assert not torch.equal(first, second), "dropout should make training forwards differ"
        evaluated, again = model.eval()(x)[0], model(x)[0]
    assert torch.equal(evaluated, again)


def test_quantized_forward_under_inference_mode() -> None:
    """A model built and run under torch.inference_mode (weights without version counters)
    quantizes its weights on every call instead of keeping them, and gives the same outputs."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4)
    with torch.inference_mode():
        model = calibrated(QuantGRU(4, 6), torch.randn(5, 2, 4))
        first, _ = model(x)
        model.weight_hh_l0.mul_(-1)
        changed, _ = model(x)
    with torch.no_grad():
        expected, _ = model(x)
    assert torch.equal(changed, expected)
    assert not torch.equal(first, changed)


def test_calibration_method_and_percentile_are_validated() -> None:
    model = QuantGRU(3, 4)
    assert model.calibration_method == "sqnr" and model.percentile_value == 99.99
    with pytest.raises(ValueError, match=r"'minmax', 'percentile', 'sqnr', got 'kl'"):
        model.calibration_method = "kl"
    for bad in (0, 100.5, -1, True, "99"):
        with pytest.raises(ValueError, match=r"\(0, 100\], got"):
            model.percentile_value = bad
    assert model.calibration_method == "sqnr" and model.percentile_value == 99.99


def output_sqnr(method: str, bits: int) -> float:
    """Output SQNR (dB) on the seed's test setting, calibrated on other data."""
    torch.manual_seed(4)
    model = QuantGRU(128, 256)
    model.set_all_bitwidth(bits, is_symmetric=False)
    model.calibration_method = method
    data = torch.Generator().manual_seed(9)
    batches = [torch.rand(50, 64, 128, generator=data) * 1.5 - 0.7 for _ in range(3)]
    calibrated(model, *batches[:2])
    with torch.no_grad():
        quantized = model(batches[2])[0].double()
        model.use_quantization = False
        reference = model(batches[2])[0].double()
    noise = (quantized - reference).square().sum()
    return 10 * math.log10(reference.square().sum() / noise)


def test_sqnr_calibration_is_at_least_minmax_end_to_end() -> None:
    sqnr, minmax = output_sqnr("sqnr", 8), output_sqnr("minmax", 8)
    assert sqnr >= minmax, (sqnr, minmax)


def test_changing_the_method_recomputes_parameters() -> None:
    torch.manual_seed(10)
    x = torch.randn(50, 8, 3)
    x[0, 0, 0] = 40.0  # an outlier the methods treat differently
    model = calibrated(QuantGRU(3, 5), x)
    model.calibration_method = "minmax"
    minmax_scale = model._quantized_model().quant[0]["input.x"].scale.item()
    model.calibration_method = "percentile"
    model.percentile_value = 99.0
    percentile_scale = model._quantized_model().quant[0]["input.x"].scale.item()
    assert percentile_scale < minmax_scale
