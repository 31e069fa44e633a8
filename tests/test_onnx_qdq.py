"""QDQ ONNX export (export/onnx_qdq.py) in ONNX Runtime against the integer reference.

The integer arithmetic must reproduce the reference's codes exactly for every configuration of
widths up to 16 bits; the conventional float arithmetic is held to its measured LSB distance.
Every graph runs on shapes the export never saw (it has no example input at all).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant_gru.analysis import OutputCodes, reference_output
from quant_gru.config import GRUQuantConfig
from quant_gru.export.onnx_qdq import export_qdq_onnx
from quant_gru.module import QuantGRU
from quant_gru.quantize.program import ACTIVATION_OPERATORS

from strategies import quant_configs
from tolerance import assert_codes_equal, assert_within_lsb, lsb_errors

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INPUT, HIDDEN = 6, 16


def calibrated(
    layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    config: GRUQuantConfig | None = None,
    input_size: int = INPUT,
    hidden_size: int = HIDDEN,
    bias: bool = True,
    seed: int = 0,
) -> QuantGRU:
    torch.manual_seed(seed)
    model = QuantGRU(
        input_size,
        hidden_size,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
    )
    if config is not None:
        model.quant_config = config
    model.calibrating = True
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(5, 7, input_size) if batch_first else torch.randn(7, 5, input_size))
    model.calibrating = False
    model.calibration_method = "minmax"  # fast; where parameters come from does not matter here
    model.finalize_calibration()
    return model


def widths(bits: int, symmetric: bool = False) -> GRUQuantConfig:
    return GRUQuantConfig.default().with_all_bitwidth(bits, is_symmetric=symmetric)


def session(path: Path, level: str = "ORT_ENABLE_ALL") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_both(
    model: QuantGRU, path: Path, steps: int, batch: int, level: str = "ORT_ENABLE_ALL"
) -> tuple[torch.Tensor, OutputCodes]:
    """(ORT output, the integer reference's output), time-major, on a new input 1.3 times the
    calibration data's spread (saturation included) and a random initial state."""
    dirs, layers, hidden = model.num_directions, model.num_layers, model.hidden_size
    x = torch.randn(steps, batch, model.input_size) * 1.3
    h0 = torch.randn(layers * dirs, batch, hidden) * 0.5
    expected = reference_output(model, x, h0)
    feed_x = x.transpose(0, 1) if model.batch_first else x
    feed = {"input": feed_x.numpy(), "h0": h0.numpy()}
    actual = torch.from_numpy(session(path, level).run(None, feed)[0])
    if model.batch_first:
        actual = actual.transpose(0, 1)
    return actual, expected


# --- the integer arithmetic: the reference's codes --------------------------------------------


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    config=quant_configs(max_width=16),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    sizes=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    opset=st.sampled_from([13, 17, 21]),
    seed=st.integers(0, 2**16),
)
def test_integer_arithmetic_reproduces_the_reference_codes(
    tmp_path: Path,
    config: GRUQuantConfig,
    layers: int,
    bidirectional: bool,
    batch_first: bool,
    bias: bool,
    sizes: tuple[int, int],
    opset: int,
    seed: int,
) -> None:
    model = calibrated(layers, bidirectional, batch_first, config, *sizes, bias, seed)
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path, opset=opset)
    actual, expected = run_both(model, path, steps=5, batch=3)
    assert_codes_equal(expected.codes_of(actual), expected.codes, "ORT output codes")


CASES = [(1, False, False), (1, True, True), (2, False, True), (2, True, False)]


@pytest.mark.parametrize(("layers", "bidirectional", "batch_first"), CASES)
@pytest.mark.parametrize("bits", [8, 16])
def test_integer_arithmetic_on_common_widths(
    tmp_path: Path, layers: int, bidirectional: bool, batch_first: bool, bits: int
) -> None:
    """The seed's setting (16 hidden units here, 11 steps): every output code, with ORT's full
    graph optimizations, which must not change the result."""
    model = calibrated(layers, bidirectional, batch_first, widths(bits))
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path)
    actual, expected = run_both(model, path, steps=11, batch=3)
    assert_codes_equal(expected.codes_of(actual), expected.codes, "ORT output codes")
    # The acceptance rung, which exact codes satisfy with room to spare.
    errors = lsb_errors(actual, expected.codes, expected.scale, expected.zero_point)
    assert_within_lsb(errors, 2, 0.999, "ORT output")


# --- the float arithmetic: within a few LSB ---------------------------------------------------


@pytest.mark.parametrize(("layers", "bidirectional", "batch_first"), CASES)
@pytest.mark.parametrize("bits", [8, 6])
def test_float_arithmetic_stays_within_a_few_lsb(
    tmp_path: Path, layers: int, bidirectional: bool, batch_first: bool, bits: int
) -> None:
    """A regression guard at the measured distance (docs/onnx.md): the conventional graph
    rounds once per operator, half to even, and evaluates sigmoid and tanh in float."""
    model = calibrated(layers, bidirectional, batch_first, widths(bits))
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path, arithmetic="float")
    # Basic optimizations: ORT's QDQ fusions change this graph (docs/onnx.md).
    actual, expected = run_both(model, path, 11, 3, "ORT_ENABLE_BASIC")
    errors = lsb_errors(actual, expected.codes, expected.scale, expected.zero_point)
    assert_within_lsb(errors, 6, 1.0, "float arithmetic, worst case")
    assert_within_lsb(errors, 2, 0.9, "float arithmetic")


# --- the graph's structure --------------------------------------------------------------------


def all_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = list(proto.graph.node)
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes.extend(attribute.g.node)
    return nodes


def point_counts(proto: onnx.ModelProto, suffix: str) -> Counter[tuple[str, str]]:
    pattern = re.compile(rf"^(l\d(?:_reverse)?)/([^/]+)/{suffix}$")
    return Counter(m.groups() for n in all_nodes(proto) if (m := pattern.match(n.name)))


@pytest.mark.parametrize("arithmetic", ["integer", "float"])
@pytest.mark.parametrize(("bits", "opset"), [(8, 21), (12, 21), (12, 17), (20, 21), (5, 13)])
def test_one_quantization_point_per_operator_and_direction(
    tmp_path: Path, arithmetic: str, bits: int, opset: int
) -> None:
    """One Q and one DQ per activation operator of every (layer, direction), of the ONNX type
    the width allows at the opset, or the float form beyond it; weights DequantizeLinear."""
    model = calibrated(2, True, False, widths(bits))
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path, opset=opset, with_hx=False, arithmetic=arithmetic)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    pairs = ["l0", "l0_reverse", "l1", "l1_reverse"]
    weights = ("weight.W", "weight.R", "weight.bw", "weight.br")
    expected = Counter({(p, op): 1 for p in pairs for op in ACTIVATION_OPERATORS})
    assert point_counts(proto, "Q") == expected
    assert point_counts(proto, "DQ") == expected + Counter(
        {(p, w): 1 for p in pairs for w in weights}
    )
    by_name = {n.name: n for n in all_nodes(proto)}
    native = bits <= 8 or (bits <= 16 and opset >= 21)
    want = ("QuantizeLinear", "DequantizeLinear") if native else ("Clip", "Mul")
    for pair in pairs:
        for op in ACTIVATION_OPERATORS:
            got = (by_name[f"{pair}/{op}/Q"].op_type, by_name[f"{pair}/{op}/DQ"].op_type)
            assert got == want, (pair, op)
        for weight in weights:
            assert by_name[f"{pair}/{weight}/DQ"].op_type == "DequantizeLinear"
    kinds = {n.op_type for n in all_nodes(proto)}
    assert "Loop" in kinds and "Scan" not in kinds
    assert ("Sigmoid" in kinds) == (arithmetic == "float")


def test_operator_parameters_are_the_calibrated_ones(tmp_path: Path) -> None:
    model = calibrated(1, False, False, widths(8))
    path = tmp_path / "qdq.onnx"
    export_qdq_onnx(model, path)
    initializers = {
        i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
    }
    quant = model._quantized_model().quant[0]
    for op in ACTIVATION_OPERATORS:
        scale, zero_point = quant[op].scalar()
        assert initializers[f"l0/{op}/scale"] == torch.tensor(scale, dtype=torch.float32).item()
        assert initializers[f"l0/{op}/zero_point"] == zero_point


# --- bad use ----------------------------------------------------------------------------------


def test_bad_use_raises_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "qdq.onnx"
    with pytest.raises(RuntimeError, match="not calibrated: calibrate first"):
        export_qdq_onnx(QuantGRU(INPUT, HIDDEN), path)
    model = calibrated()
    with pytest.raises(ValueError, match=r"arithmetic must be one of \('integer', 'float'\)"):
        export_qdq_onnx(model, path, arithmetic="int8")
    with pytest.raises(ValueError, match=r"opset must be an int in \[13, "):
        export_qdq_onnx(model, path, opset=12)
    with pytest.raises(ValueError, match="float32"):
        export_qdq_onnx(calibrated().double(), path)
    assert not path.exists()
