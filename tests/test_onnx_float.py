"""Float ONNX export: the graph run in onnxruntime against QuantGRU's float forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quant_gru import QuantGRU
from quant_gru.export.onnx_float import export_float_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# (input_size, hidden_size, num_layers, bidirectional, batch_first, bias)
CONFIGS = [
    (5, 37, 1, False, False, True),
    (7, 8, 1, True, False, True),
    (3, 16, 2, False, True, True),
    (6, 11, 2, True, True, False),
    (4, 37, 3, True, False, True),
    (9, 5, 3, False, False, False),
    (2, 13, 3, True, True, True),
]
# Shapes of the runs, none of them an export example (the export takes none).
RUNS = [(1, 1), (5, 17), (1, 40), (5, 1)]  # (batch, seq_len)


def _model(config: tuple[int, int, int, bool, bool, bool], seed: int) -> QuantGRU:
    input_size, hidden, layers, bidirectional, batch_first, bias = config
    torch.manual_seed(seed)
    model = QuantGRU(
        input_size,
        hidden,
        num_layers=layers,
        bias=bias,
        batch_first=batch_first,
        dropout=0.3 if layers > 1 else 0.0,  # not in the graph; eval mode does not apply it
        bidirectional=bidirectional,
    )
    return model.eval()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_float_forward(
    config: tuple[int, int, int, bool, bool, bool], with_hx: bool, tmp_path: Path
) -> None:
    model = _model(config, seed=hash(config) % 1000)
    path = tmp_path / "gru.onnx"
    export_float_onnx(model, path, with_hx=with_hx)
    session = _session(path)
    states = model.num_layers * model.num_directions
    for batch, steps in RUNS:
        shape = (batch, steps) if model.batch_first else (steps, batch)
        x = torch.randn(*shape, model.input_size)
        feeds = {"input": x.numpy()}
        hx = torch.randn(states, batch, model.hidden_size) if with_hx else None
        if hx is not None:
            feeds["h0"] = hx.numpy()
        with torch.no_grad():
            want_output, want_h_n = model(x, hx)
        got_output, got_h_n = session.run(["output", "h_n"], feeds)
        assert isinstance(want_output, torch.Tensor)
        assert got_output.shape == tuple(want_output.shape)
        assert got_h_n.shape == tuple(want_h_n.shape)
        np.testing.assert_allclose(got_output, want_output.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got_h_n, want_h_n.numpy(), rtol=0, atol=1e-5)


def test_without_h0_input_means_zero_state(tmp_path: Path) -> None:
    model = _model((4, 6, 2, True, False, True), seed=1)
    path = tmp_path / "gru.onnx"
    export_float_onnx(model, path, with_hx=False)
    x = torch.randn(9, 3, 4)
    with torch.no_grad():
        want_output, want_h_n = model(x, torch.zeros(4, 3, 6))
    got_output, got_h_n = _session(path).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got_output, want_output.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_h_n, want_h_n.numpy(), rtol=0, atol=1e-5)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


@pytest.mark.parametrize("batch_first", [False, True])
def test_checker_and_symbolic_shapes(batch_first: bool, tmp_path: Path) -> None:
    model = _model((5, 7, 2, True, batch_first, True), seed=2)
    path = tmp_path / "gru.onnx"
    export_float_onnx(model, path, opset=17)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert sum(node.op_type == "GRU" for node in proto.graph.node) == 2
    lead = ["batch", "seq_len"] if batch_first else ["seq_len", "batch"]
    inputs = {v.name: _dims(v) for v in proto.graph.input}
    outputs = {v.name: _dims(v) for v in proto.graph.output}
    assert inputs == {"input": [*lead, 5], "h0": [4, "batch", 7]}
    assert outputs == {"output": [*lead, 14], "h_n": [4, "batch", 7]}


def test_other_opset(tmp_path: Path) -> None:
    model = _model((3, 4, 1, True, False, True), seed=3)
    path = tmp_path / "gru.onnx"
    export_float_onnx(model, path, opset=14)
    x, hx = torch.randn(6, 2, 3), torch.randn(2, 2, 4)
    with torch.no_grad():
        want_output, want_h_n = model(x, hx)
    got_output, got_h_n = _session(path).run(None, {"input": x.numpy(), "h0": hx.numpy()})
    np.testing.assert_allclose(got_output, want_output.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_h_n, want_h_n.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_non_float32_model_is_refused(dtype: torch.dtype, tmp_path: Path) -> None:
    model = QuantGRU(3, 4, dtype=dtype)
    path = tmp_path / "gru.onnx"
    with pytest.raises(ValueError, match=rf"requires float32 parameters, got {dtype}"):
        export_float_onnx(model, path)
    assert not path.exists()


def test_quantized_mode_and_bad_opset_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gru.onnx"
    with pytest.raises(ValueError, match="use_quantization=True"):
        export_float_onnx(QuantGRU(3, 4, use_quantization=True), path)
    with pytest.raises(ValueError, match="opset must be an int"):
        export_float_onnx(QuantGRU(3, 4), path, opset=9)
    with pytest.raises(TypeError, match="expects a QuantGRU"):
        export_float_onnx(torch.nn.GRU(3, 4), path)  # type: ignore[arg-type]
    assert not path.exists()


def test_importing_the_package_does_not_import_onnx() -> None:
    import subprocess
    import sys

    code = "import sys, quant_gru, quant_gru.export.onnx_float; assert 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
