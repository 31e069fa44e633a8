"""export_mode with export_format='float': the seed's torch.onnx.export recipe gives a graph whose
batch and sequence length stay dynamic, and ONNX Runtime agrees with the float forward."""

from __future__ import annotations

import warnings

import pytest
import torch

from quant_gru import QuantGRU

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

CASES = [
    dict(input_size=6, hidden_size=11, num_layers=1, batch_first=True, bidirectional=False),
    dict(input_size=5, hidden_size=37, num_layers=2, batch_first=True, bidirectional=True),
    dict(
        input_size=3, hidden_size=8, num_layers=3, batch_first=False, bidirectional=True, bias=False
    ),
]


def export(model: QuantGRU, path, with_hx: bool) -> None:
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


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("kwargs", CASES)
def test_exported_graph_runs_any_batch_and_length(tmp_path, kwargs: dict, with_hx: bool) -> None:
    torch.manual_seed(0)
    model = QuantGRU(**kwargs).eval()
    path = tmp_path / "gru.onnx"
    export(model, path, with_hx)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, steps in ((1, 1), (3, 25), (5, 7)):
        x = torch.randn(batch, steps, model.input_size)
        if not model.batch_first:
            x = x.transpose(0, 1).contiguous()
        feed = {"input": x.numpy()}
        hx = None
        if with_hx:
            hx = torch.randn(model.num_layers * model.num_directions, batch, model.hidden_size)
            feed["hx"] = hx.numpy()
        output, hidden = session.run(None, feed)
        with torch.no_grad():
            expected, expected_h = model(x, hx)
        assert output.shape == tuple(expected.shape)
        assert abs(torch.from_numpy(output) - expected).max() < 1e-5
        assert abs(torch.from_numpy(hidden) - expected_h).max() < 1e-5


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
    with pytest.raises(NotImplementedError, match="export_format='float'"):
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
    to_onnx(model, path, with_hx=True, dynamo=dynamo)
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
    with pytest.raises(NotImplementedError, match="qdq"):
        to_onnx(model, tmp_path / "gru.onnx", export_format="qdq")
    assert model.training and not model.export_mode and model.export_format == "float"
    with pytest.raises(ValueError, match="'float' or 'qdq'"):
        to_onnx(model, tmp_path / "gru.onnx", export_format="int4")
    with pytest.raises(TypeError, match="expects a QuantGRU, got GRU"):
        to_onnx(torch.nn.GRU(4, 5), tmp_path / "gru.onnx")
