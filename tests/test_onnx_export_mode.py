"""export_mode: the seed's torch.onnx.export recipe gives a graph whose batch and sequence length
stay dynamic. With export_format='float' ONNX Runtime agrees with the float forward; with 'qdq'
it returns exactly the quantized forward's values (the integer model's codes, dequantized)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

from quant_gru import QuantGRU

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CASES = [
    dict(input_size=6, hidden_size=11, num_layers=1, batch_first=True, bidirectional=False),
    dict(input_size=5, hidden_size=37, num_layers=2, batch_first=True, bidirectional=True),
    dict(
        input_size=3, hidden_size=8, num_layers=3, batch_first=False, bidirectional=True, bias=False
    ),
]


def export(model: QuantGRU, path, with_hx: bool, export_format: str = "float") -> None:
    """The seed's recipe (classic exporter), with an initial state input when asked."""
    example = torch.randn(2, 7, model.input_size)
    if not model.batch_first:
        example = example.transpose(0, 1)
    batch_axis, time_axis = (0, 1) if model.batch_first else (1, 0)
    dynamic = {
        "input": {batch_axis: "batch", time_axis: "seq_len"},
        "output": {batch_axis: "batch", time_axis: "seq_len"},
        "hidden": {1: "batch"},
    }
    args: tuple = (example,)
    names = ["input"]
    if with_hx:
        args = (example, torch.randn(model.num_layers * model.num_directions, 2, model.hidden_size))
        names.append("hx")
        dynamic["hx"] = {1: "batch"}
    model.export_mode = True
    model.export_format = export_format
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=names,
            output_names=["output", "hidden"],
            dynamic_axes=dynamic,
            dynamo=False,
        )
    model.export_mode = False


def runs_on_new_shapes(model: QuantGRU, path, with_hx: bool):
    """(x, hx, ORT output, ORT hidden) for batch sizes and lengths the export never saw (a
    longer sequence would expose an unrolled loop), inputs beyond the calibrated range too."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, steps in ((1, 1), (3, 25), (5, 7)):
        x = torch.randn(batch, steps, model.input_size) * 1.3
        if not model.batch_first:
            x = x.transpose(0, 1).contiguous()
        feed = {"input": x.numpy()}
        hx = None
        if with_hx:
            hx = torch.randn(model.num_layers * model.num_directions, batch, model.hidden_size)
            feed["hx"] = hx.numpy()
        output, hidden = session.run(None, feed)
        yield x, hx, torch.from_numpy(output), torch.from_numpy(hidden)


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("kwargs", CASES)
def test_exported_graph_runs_any_batch_and_length(tmp_path, kwargs: dict, with_hx: bool) -> None:
    torch.manual_seed(0)
    model = QuantGRU(**kwargs).eval()
    path = tmp_path / "gru.onnx"
    export(model, path, with_hx)
    for x, hx, output, hidden in runs_on_new_shapes(model, path, with_hx):
        with torch.no_grad():
            expected, expected_h = model(x, hx)
        assert output.shape == expected.shape
        assert abs(output - expected).max() < 1e-5
        assert abs(hidden - expected_h).max() < 1e-5


def test_export_mode_forward_equals_float_forward() -> None:
    torch.manual_seed(1)
    model = QuantGRU(4, 9, num_layers=2, bidirectional=True).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        model.export_mode = True
        got = model(x)
        unbatched = model(x[:, 0])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unbatched[0], expected[0][:, 0], rtol=1e-12, atol=1e-12)


def test_export_settings_are_validated() -> None:
    model = QuantGRU(4, 5)
    with pytest.raises(ValueError, match="'float' or 'qdq', got 'int8'"):
        model.export_format = "int8"
    model.export_mode, model.export_format = True, "qdq"
    with pytest.raises(RuntimeError, match="not calibrated: calibrate first"):
        model(torch.randn(3, 1, 4))
    model.export_format = "float"
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    with pytest.raises(TypeError, match="PackedSequence cannot be exported"):
        model(packed)
    with pytest.raises(RuntimeError, match="Expected 4, got 7"):
        model(torch.randn(3, 1, 7))


@pytest.mark.parametrize("dynamo", [False, True])
def test_to_onnx_helper(tmp_path, dynamo: bool) -> None:
    from quant_gru.export import to_onnx

    torch.manual_seed(2)
    model = QuantGRU(4, 10, num_layers=2, bidirectional=True, batch_first=True).train()
    path = tmp_path / "gru.onnx"
    try:
        to_onnx(model, path, with_hx=True, dynamo=dynamo)
    except RuntimeError as error:
        # Some torch releases' newer exporter fixes the sequence length (torch 2.11 does):
        # that must fail clearly, leave no file behind, and restore the module.
        assert dynamo and "fixed the input's sequence length" in str(error)
        assert not path.exists()
        assert model.training and not model.export_mode
        return
    assert model.training and not model.export_mode  # modes restored
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, hx = torch.randn(3, 19, 4), torch.randn(4, 3, 10)
    names = [i.name for i in session.get_inputs()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output, hidden = session.run(None, dict(zip(names, (x.numpy(), hx.numpy()), strict=True)))
    with torch.no_grad():
        expected, expected_h = model.eval()(x, hx)
    assert abs(torch.from_numpy(output) - expected).max() < 1e-5
    assert abs(torch.from_numpy(hidden) - expected_h).max() < 1e-5


def test_to_onnx_restores_the_module_when_export_fails(tmp_path) -> None:
    from quant_gru.export import to_onnx

    model = QuantGRU(4, 5).train()
    with pytest.raises(RuntimeError, match="not calibrated"):
        to_onnx(model, tmp_path / "gru.onnx", export_format="qdq")
    assert model.training and not model.export_mode and model.export_format == "float"
    model = calibrated(QuantGRU(4, 5)).double()  # QDQ export takes float32 parameters only
    with pytest.raises(ValueError, match="float32"):
        to_onnx(model, tmp_path / "gru.onnx", export_format="qdq")
    assert not model.export_mode and model.export_format == "float"
    with pytest.raises(ValueError, match="classic exporter"):
        to_onnx(model.float(), tmp_path / "gru.onnx", export_format="qdq", dynamo=True)
    with pytest.raises(ValueError, match="'float' or 'qdq'"):
        to_onnx(model, tmp_path / "gru.onnx", export_format="int4")
    with pytest.raises(TypeError, match="expects a QuantGRU, got GRU"):
        to_onnx(torch.nn.GRU(4, 5), tmp_path / "gru.onnx")


# --- export_format='qdq' ----------------------------------------------------------------------


def calibrated(model: QuantGRU, bits: int = 8) -> QuantGRU:
    """Statistics collected; the parameters are left to the export (finalize is optional)."""
    model.set_all_bitwidth(bits, is_symmetric=False)
    model.calibration_method = "minmax"
    model.calibrating = True
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(4, 9, model.input_size)
            model(x if model.batch_first else x.transpose(0, 1))
    model.calibrating = False
    return model


def quantized_reference(model: QuantGRU, x: torch.Tensor, hx: torch.Tensor | None):
    mode = model.export_mode, model.use_quantization
    model.export_mode, model.use_quantization = False, True
    with torch.no_grad():
        result = model(x, hx)
    model.export_mode, model.use_quantization = mode
    return result


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("kwargs", CASES)
def test_qdq_recipe_runs_any_batch_and_length(tmp_path, kwargs: dict, with_hx: bool) -> None:
    """The seed's QDQ recipe: ONNX Runtime returns the quantized forward's values exactly, on
    shapes the export never saw (a longer sequence would expose an unrolled loop)."""
    torch.manual_seed(0)
    model = calibrated(QuantGRU(**kwargs).eval())
    path = tmp_path / "gru_qdq.onnx"
    export(model, path, with_hx, export_format="qdq")
    assert model.is_calibrated()  # switching to QDQ export finalized the statistics
    for x, hx, output, hidden in runs_on_new_shapes(model, path, with_hx):
        expected, expected_h = quantized_reference(model, x, hx)
        assert torch.equal(output, expected)
        assert torch.equal(hidden, expected_h)


def test_qdq_export_mode_forward_is_the_quantized_forward() -> None:
    torch.manual_seed(3)
    model = calibrated(QuantGRU(4, 9, num_layers=2, bidirectional=True))
    x = torch.randn(6, 3, 4)
    model.export_mode, model.export_format = True, "qdq"
    with torch.no_grad():
        got = model(x)
        unbatched = model(x[:, 0])
    expected = quantized_reference(model, x, None)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(unbatched[0], expected[0][:, 0])


def test_to_onnx_qdq(tmp_path, device: torch.device) -> None:
    """From a module on any device: the graph is the same, ORT returns its values exactly."""
    from quant_gru.export import to_onnx

    torch.manual_seed(4)
    model = calibrated(QuantGRU(4, 10, num_layers=2, bidirectional=True, batch_first=True))
    model.to(device).train()
    path = tmp_path / "gru_qdq.onnx"
    to_onnx(model, path, export_format="qdq", with_hx=True)
    assert model.training and not model.export_mode and model.export_format == "float"
    proto = onnx.load(str(path))
    kinds = Counter(n.op_type for n in proto.graph.node)
    assert kinds["Loop"] == 4 and kinds["QuantizeLinear"] > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, hx = torch.randn(3, 19, 4), torch.randn(4, 3, 10)
    output, hidden = session.run(None, {"input": x.numpy(), "hx": hx.numpy()})
    expected, expected_h = (
        t.cpu() for t in quantized_reference(model, x.to(device), hx.to(device))
    )
    assert torch.equal(torch.from_numpy(output), expected)
    assert torch.equal(torch.from_numpy(hidden), expected_h)


def test_qdq_under_the_newer_exporter_fails_clearly() -> None:
    model = calibrated(QuantGRU(4, 5))
    model.export_mode, model.export_format = True, "qdq"
    with pytest.raises(Exception, match=r"classic ONNX exporter.*dynamo=False"):
        torch.onnx.export(model, (torch.randn(3, 2, 4),), dynamo=True)


def test_a_graph_with_a_fixed_sequence_length_is_refused(tmp_path) -> None:
    """What to_onnx checks after the newer exporter: a graph whose input length is fixed."""
    from quant_gru.export.to_onnx import _check_dynamic

    model = QuantGRU(3, 4).eval()
    model.export_mode = True
    for axes, error in (({0: "seq_len", 1: "batch"}, None), ({1: "batch"}, "sequence length 5")):
        path = tmp_path / "gru.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = (torch.randn(5, 2, 3),)
            torch.onnx.export(
                model,
                example,
                str(path),
                input_names=["input"],
                dynamic_axes={"input": axes},
                dynamo=False,
            )
        if error is None:
            _check_dynamic(path, 1, 0)
            assert path.exists()
        else:
            with pytest.raises(RuntimeError, match=f"fixed the input's {error} to the example"):
                _check_dynamic(path, 1, 0)
            assert not path.exists()
