"""A calibrated QuantGRU survives state_dict, torch.save, deepcopy, pickle and quant-param files
with identical codes; bad files and mismatched modules raise and change nothing."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle

import pytest
import torch

from quant_gru import QuantGRU
from quant_gru.export.quant_params import QuantParamsError
from quant_gru.kernels.torch.quantized_forward import build_programs

SHAPE = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True)


def calibrated_model(**overrides) -> QuantGRU:
    torch.manual_seed(0)
    model = QuantGRU(**{**SHAPE, **overrides})
    model.set_all_bitwidth(7, is_symmetric=False)
    model.calibration_method = "minmax"  # persistence does not depend on the method; fast
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(6, 3, model.input_size))
    model.calibrating = False
    model.use_quantization = True
    model.finalize_calibration()
    return model


def fresh(**overrides) -> QuantGRU:
    return QuantGRU(**{**SHAPE, **overrides}, use_quantization=True)


def assert_same_codes(a: QuantGRU, b: QuantGRU) -> None:
    """Same integer programs (weights' codes, every constant) and the same outputs."""
    pa = build_programs(a._quantized_model(), a._direction_weights())
    pb = build_programs(b._quantized_model(), b._direction_weights())
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x.weight_W, y.weight_W) and torch.equal(x.weight_R, y.weight_R)
        assert torch.equal(x.bias_w, y.bias_w) and torch.equal(x.bias_r, y.bias_r)
        assert x.formats == y.formats
        for op in x.terms:
            for s, t in zip(x.terms[op], y.terms[op], strict=True):
                assert torch.equal(s.m, t.m) and torch.equal(s.n, t.n)
                assert (s.pre_shift, s.operand_shifts) == (t.pre_shift, t.operand_shifts)
        for op in x.tables:
            assert x.tables[op].c_lo == y.tables[op].c_lo and x.tables[op].k == y.tables[op].k
            assert torch.equal(x.tables[op].y, y.tables[op].y)
    inputs = torch.randn(5, 2, a.input_size) * 2
    with torch.no_grad():
        assert torch.equal(a(inputs)[0], b(inputs)[0])


def test_state_dict_round_trip() -> None:
    model = calibrated_model()
    clone = fresh()
    clone.load_state_dict(model.state_dict())
    assert clone.is_calibrated() and clone.quant_config == model.quant_config
    assert_same_codes(model, clone)


def test_torch_save_of_state_dict_with_weights_only_and_of_the_module() -> None:
    model = calibrated_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = fresh()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_codes(model, clone)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert_same_codes(model, torch.load(buffer, weights_only=False))


def test_deepcopy_and_pickle() -> None:
    model = calibrated_model()
    assert_same_codes(model, copy.deepcopy(model))
    assert_same_codes(model, pickle.loads(pickle.dumps(model)))


def test_uncalibrated_state_dict_has_nn_gru_keys_only() -> None:
    model = QuantGRU(**SHAPE)
    assert list(model.state_dict()) == list(torch.nn.GRU(**SHAPE).state_dict())
    # A calibrated one loads into nn.GRU with strict=False (the seed's recipe), or via to_float.
    gru = torch.nn.GRU(**SHAPE)
    result = gru.load_state_dict(calibrated_model().state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith("quant_") for k in result.unexpected_keys)


def test_bad_quant_state_in_state_dict_is_reported_and_changes_nothing() -> None:
    model = calibrated_model()
    state = model.state_dict()
    state["quant_l1_reverse.activation_zero_point"] = torch.full((14,), 1000, dtype=torch.int64)
    target = calibrated_model()
    target.set_all_bitwidth(5)
    before = target.quant_config
    with pytest.raises(RuntimeError, match=r"quant_l1_reverse\.activation_zero_point\[0\]"):
        target.load_state_dict(state)
    assert target.quant_config is before


def test_quant_params_file_round_trip(tmp_path) -> None:
    model = calibrated_model()
    path = tmp_path / "params.json"
    model.export_quant_params(path, include_weights=True)
    clone = fresh()
    clone.load_state_dict(model.state_dict(), strict=False)
    clone.reset_calibration()
    clone.load_quant_params(path)
    assert_same_codes(model, clone)
    doc = json.loads(path.read_text())
    programs = build_programs(model._quantized_model(), model._direction_weights())
    assert doc["pairs"][3]["name"] == "l1_reverse"
    assert doc["pairs"][3]["integer_weights"]["weight.R"] == programs[3].weight_R.tolist()
    table = doc["pairs"][0]["integer_program"]["tables"]["gate.z_out"]
    assert table["y"] == programs[0].tables["gate.z_out"].y.tolist()
    model.export_quant_params(tmp_path / "lean.json")
    assert "integer_weights" not in json.loads((tmp_path / "lean.json").read_text())["pairs"][0]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(hidden_size=7), "model.hidden_size"),
        (dict(num_layers=1), "model.num_layers"),
        (dict(bidirectional=False), "model.bidirectional"),
        (dict(input_size=5), "model.input_size"),
        (dict(bias=False), "model.bias"),
    ],
)
def test_loading_into_a_mismatched_module_fails_cleanly(tmp_path, overrides, key) -> None:
    path = tmp_path / "params.json"
    calibrated_model().export_quant_params(path)
    target = fresh(**overrides)
    config = target.quant_config
    with pytest.raises(QuantParamsError, match=key):
        target.load_quant_params(path)
    assert not target.is_calibrated() and target.quant_config is config


def corrupt(doc: dict, change: str) -> dict | str:
    operators = doc["pairs"][1]["operators"]
    if change == "truncated":
        return json.dumps(doc)[:500]
    if change == "scale as string":
        operators["gate.r_pre"]["scale"] = ["0.5"]
    elif change == "scale not float32":
        operators["gate.r_pre"]["scale"] = [0.1]
        operators["gate.r_pre"].pop("encoded_scale")
    elif change == "zero point out of range":
        operators["op.rRh"]["zero_point"] = [500]
    elif change == "wrong number of weight scales":
        operators["weight.W"]["scale"] = operators["weight.W"]["scale"][:-1]
    elif change == "encoded scale disagrees":
        operators["gate.z_out"]["encoded_scale"] = [12345]
    elif change == "bitwidth disagrees with config":
        operators["op.rRh"]["bitwidth"] = 3
    elif change == "version":
        doc["version"] = 99
    elif change == "missing pair":
        doc["pairs"].pop()
    elif change == "bad config":
        doc["GRU_config"]["operator_config"]["weight.W"]["bitwidth"] = 40
    return doc


CORRUPTIONS = {
    "truncated": "not valid JSON",
    "scale as string": r"operators\['gate\.r_pre'\]\.scale",
    "scale not float32": r"operators\['gate\.r_pre'\]\.scale\[0\]: expected a float32",
    "zero point out of range": r"operators\['op\.rRh'\]\.zero_point\[0\]",
    "wrong number of weight scales": r"operators\['weight\.W'\]\.scale: expected a list of 18",
    "encoded scale disagrees": r"operators\['gate\.z_out'\]\.encoded_scale\[0\]",
    "bitwidth disagrees with config": r"operators\['op\.rRh'\]\.bitwidth",
    "version": "version: expected 1, got 99",
    "missing pair": "pairs: expected a list of 4",
    "bad config": r"'weight\.W'\]\.bitwidth.*40",
}


@pytest.mark.parametrize("change", list(CORRUPTIONS))
def test_malformed_files_fail_cleanly(tmp_path, change: str) -> None:
    source = calibrated_model()
    path = tmp_path / "params.json"
    source.export_quant_params(path)
    broken = corrupt(json.loads(path.read_text()), change)
    path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    target = calibrated_model()
    target.set_all_bitwidth(5)
    before_config, before_model = target.quant_config, target._quantized_model()
    with pytest.raises(QuantParamsError, match=CORRUPTIONS[change]):
        target.load_quant_params(path)
    assert target.quant_config is before_config and target._quantized_model() is before_model


def test_export_is_atomic(tmp_path, monkeypatch) -> None:
    model = calibrated_model()
    path = tmp_path / "params.json"
    path.write_text("previous content")

    def failing_replace(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        model.export_quant_params(path)
    assert path.read_text() == "previous content"
    assert os.listdir(tmp_path) == ["params.json"]


def test_export_of_an_uncalibrated_module_says_how(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="not calibrated"):
        QuantGRU(**SHAPE).export_quant_params(tmp_path / "params.json")


@pytest.mark.parametrize("granularity", ["per_tensor", "per_gate", "per_channel"])
def test_aimet_encodings_describe_the_same_grids(tmp_path, granularity: str) -> None:
    """For every quantizer, AIMET's real value of each grid point equals ours."""
    model = calibrated_model()
    config = model.quant_config
    for name in ("weight.W", "weight.R", "weight.bw", "weight.br"):
        config = config.replace_operator(name, granularity=granularity)
    model.quant_config = config
    model.finalize_calibration()
    path = tmp_path / "encodings.json"
    model.export_aimet_encodings(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == "1.0.0"
    entries = {e["name"]: e for e in doc["activation_encodings"] + doc["param_encodings"]}
    assert len(doc["activation_encodings"]) == 4 * 14 and len(doc["param_encodings"]) == 4 * 4
    quant = model._quantized_model().quant
    for pair_index, pair in enumerate(model._pair_names):
        for op, key in [("gate.z_out", f"{pair}.gate.z_out"), ("weight.R", f"weight_hh_{pair}")]:
            ours, entry = quant[pair_index][op], entries[key]
            assert entry["bw"] == ours.spec.bitwidth and entry["is_sym"] == ours.spec.is_symmetric
            rows = len(entry["scale"])
            assert entry["enc_type"] == ("PER_TENSOR" if rows == 1 else "PER_CHANNEL")
            scales = ours.scale.repeat_interleave(rows // ours.scale.numel())
            zero_points = ours.zero_point.repeat_interleave(rows // ours.scale.numel())
            for q in (ours.qmin, ours.qmax):
                aimet_real = torch.tensor(entry["scale"], dtype=torch.float64) * (
                    q - ours.qmin + torch.tensor(entry["offset"], dtype=torch.float64)
                )
                assert torch.equal(aimet_real, scales * (q - zero_points))
