"""QDQ ONNX export: validity, the fake-quantization points, and agreement with the integer
reference in units of output.h's LSB."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from quant_gru.export.onnx_qdq import STEP_OPERATORS, export_qdq_onnx
from quant_gru.kernels.torch.quantized_forward import build_programs, initial_codes, input_codes
from quant_gru.module import QuantGRU
from quant_gru.quantize.scales import dequantize
from quant_gru.reference import integer_gru

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INPUT, HIDDEN = 6, 16


def calibrated(layers: int, bidirectional: bool, batch_first: bool, bits: int) -> QuantGRU:
    torch.manual_seed(0)
    model = QuantGRU(
        INPUT, HIDDEN, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first
    )
    model.set_all_bitwidth(bits, is_symmetric=False)
    model.calibrating = True
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(5, 7, INPUT))
    model.calibrating = False
    model.calibration_method = "minmax"
    model.finalize_calibration()
    return model


def lsb_errors(model: QuantGRU, path: Path) -> np.ndarray:
    """|ORT - integer reference| of the output, in LSB of output.h, on new shapes."""
    dirs, layers = model.num_directions, model.num_layers
    steps, batch = 11, 3  # neither matches the calibration batches
    x = torch.randn(steps, batch, INPUT)
    h0 = torch.randn(layers * dirs, batch, HIDDEN) * 0.5
    programs = build_programs(model._quantized_model(), model._direction_weights())
    out, _, _ = integer_gru(
        programs,
        input_codes(x, programs),
        initial_codes(h0, programs, x),
        None,
        layers,
        model.bidirectional,
    )
    formats = [p.formats["output.h"] for p in programs[-dirs:]]
    blocks = [
        dequantize(out[..., d * HIDDEN : (d + 1) * HIDDEN], f.scale, f.zero_point)
        for d, f in enumerate(formats)
    ]
    expected = torch.cat(blocks, dim=-1)
    lsb = torch.tensor([f.scale for f in formats], dtype=torch.float64).repeat_interleave(HIDDEN)
    options = ort.SessionOptions()
    # ORT's extended (QDQ-fusing) optimizations change this graph's results by tens of LSB.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_x = x.transpose(0, 1) if model.batch_first else x
    actual = torch.from_numpy(session.run(None, {"input": feed_x.numpy(), "h0": h0.numpy()})[0])
    if model.batch_first:
        actual = actual.transpose(0, 1)
    return ((actual.double() - expected).abs() / lsb).flatten().numpy()


CASES = [(1, False, False), (1, True, True), (2, False, True), (2, True, False)]


@pytest.mark.parametrize(("layers", "bidirectional", "batch_first"), CASES)
@pytest.mark.parametrize("bits", [8, 6])
def test_matches_integer_reference(
    tmp_path: Path, layers: int, bidirectional: bool, batch_first: bool, bits: int
) -> None:
    model = calibrated(layers, bidirectional, batch_first, bits)
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    errors = np.round(lsb_errors(model, path), 3)  # float32 output vs float64 reference
    # A regression guard at today's measurement (at most 6 LSB, 91 % or more within 2 LSB),
    # not the target: the target of 99.9 % within 2 LSB needs the graph to follow the integer
    # model's rounding (half up, per-term requantization), see the module docstring.
    assert errors.max() <= 6
    assert np.mean(errors <= 2) >= 0.9


@pytest.mark.parametrize("bits", [8, 6])
def test_every_operator_fake_quantized_per_direction(tmp_path: Path, bits: int) -> None:
    model = calibrated(2, True, False, bits)
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path, with_hx=False)
    proto = onnx.load(str(path))
    nodes = list(proto.graph.node)
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes.extend(attribute.g.node)
    marker = "Q" if bits == 8 else "Round"
    pattern = re.compile(rf"^(l\d(?:_reverse)?)/([^/]+)/{marker}$")
    counts = Counter(m.groups() for n in nodes if (m := pattern.match(n.name)))
    pairs = ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert counts == Counter({(p, op): 1 for p in pairs for op in STEP_OPERATORS})


def test_uncalibrated_model_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="calibrate first"):
        export_qdq_onnx(QuantGRU(INPUT, HIDDEN), tmp_path / "qdq.onnx")


def test_non_float32_raises(tmp_path: Path) -> None:
    model = calibrated(1, False, False, 8).double()
    with pytest.raises(ValueError, match="float32"):
        export_qdq_onnx(model, tmp_path / "qdq.onnx")
