"""QDQ ONNX export: a calibrated QuantGRU as a graph with a quantization point (a
``QuantizeLinear`` / ``DequantizeLinear`` pair, qdq_points.py) at every activation operator of
the integer model (reference/README.md §7), carrying the calibrated scale and zero point, and
the weights as ``DequantizeLinear`` of their integer codes (per row, axis 0).

Two arithmetics fill the space between the points:

- ``"integer"`` (default, qdq_integer_ops.py): the integer model's own arithmetic, so ONNX
  Runtime reproduces the integer reference's codes;
- ``"float"`` (qdq_float_ops.py): float MatMul / Add / Mul / Sigmoid / Tanh, the conventional
  form that QDQ-fusing runtimes replace with their own integer kernels, within a few LSB.

The time loop is one ONNX ``Loop`` per (layer, direction), so batch and sequence length stay
dynamic; the reverse direction reads step ``T - 1 - i`` at iteration ``i`` and its stacked
outputs are reversed afterwards. matmul.Wx of all steps does not depend on ``h`` and is computed
before the loop. (``Loop`` rather than ``Scan``: torch's classic exporter can emit it, which
``export_mode`` needs, see qdq_trace.py.)

Not represented: packed sequences (per-sequence lengths; the graph runs every sequence over all
``seq_len`` steps) and training-only inter-layer dropout.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from quant_gru.export.onnx_common import check_module, check_opset, save_checked
from quant_gru.export.onnx_graph import GraphWriter, Nodes

if TYPE_CHECKING:
    import onnx

    from quant_gru.export.qdq_operators import QDQOperators
    from quant_gru.module import QuantGRU

MIN_OPSET = 13  # per-axis DequantizeLinear
ARITHMETICS = ("integer", "float")
_INT64_MIN = np.iinfo(np.int64).min
NOT_CALIBRATED = (
    "QDQ ONNX export needs quantization parameters, but the QuantGRU is not calibrated: "
    "calibrate first (model.calibrating = True, run forward on calibration data, "
    "model.calibrating = False; finalize_calibration() is then optional)"
)


def export_qdq_onnx(
    model: QuantGRU,
    path: str | os.PathLike[str],
    opset: int = 21,
    with_hx: bool = True,
    arithmetic: str = "integer",
) -> None:
    """Write ``model``'s quantized forward to ``path`` as a QDQ ONNX model.

    Inputs and outputs are those of the float export (``input``, optional ``h0``; ``output``,
    ``h_n``; symbolic ``seq_len`` and ``batch``). From opset 21 operators of 9 to 16 bits get
    int16 / uint16 pairs; before, a float form (qdq_points.py). Raises ``RuntimeError`` for an
    uncalibrated model and ``ValueError`` for non-float32 parameters, an unsupported opset or
    an unknown arithmetic.
    """
    graph = qdq_graph(model, opset, with_hx, arithmetic, "export_qdq_onnx")
    description = f"QuantGRU quantized forward (QDQ, {arithmetic} arithmetic)"
    save_checked(graph, opset, description, path)


def qdq_graph(
    model: QuantGRU, opset: int, with_hx: bool, arithmetic: str, what: str
) -> onnx.GraphProto:
    """The QDQ graph of ``model`` (checks as export_qdq_onnx says; ``what`` names the caller)."""
    check_module(model, what)
    if not model.is_calibrated() and not model._has_statistics():
        raise RuntimeError(NOT_CALIBRATED)
    check_opset(opset, MIN_OPSET)
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    writer = GraphWriter()
    operators: QDQOperators
    if arithmetic == "integer":
        from quant_gru.export.qdq_integer_ops import IntegerOperators

        operators = IntegerOperators(model, writer, opset)
    else:
        from quant_gru.export.qdq_float_ops import FloatOperators

        operators = FloatOperators(model, writer, opset)
    return _Skeleton(model, writer, operators).graph(with_hx)


class _Skeleton:
    """Inputs, layers, directions and their loops; the operators fill in the arithmetic."""

    def __init__(self, model: QuantGRU, writer: GraphWriter, operators: QDQOperators) -> None:
        self.model = model
        self.writer = writer
        self.operators = operators

    def _loop(
        self, main: Nodes, pair: str, index: int, reverse: bool, h0: str, wx: str
    ) -> tuple[str, str]:
        """The recurrence of one (layer, direction): (h_last [B, H], outputs [T, B, H])."""
        from onnx import TensorProto, helper

        writer, hidden = self.writer, self.model.hidden_size
        outer = self.operators.prepare(main, pair, index)
        first = writer.const("axis0", np.array([0], dtype=np.int64))
        shape = main.op("Shape", [wx], name=f"{pair}/wx_shape")
        time_dim = writer.const("time_dim", np.array(0, dtype=np.int64))
        steps = main.op("Gather", [shape, time_dim], name=f"{pair}/trip_count", axis=0)
        keep_going = writer.const("true", np.array(True))

        body = writer.nodes()
        iteration, condition, h = f"{pair}/i", f"{pair}/condition", f"{pair}/h_prev"
        t = iteration
        if reverse:
            last = body.op("Sub", [steps, writer.const("one_int", np.array(1, np.int64))])
            t = body.op("Sub", [last, iteration], name=f"{pair}/reverse_time")
        wx_t = body.op("Gather", [wx, t], name=f"{pair}/wx_t", axis=0)
        h_next = self.operators.step(body, pair, index, outer, h, wx_t)
        carried = body.op("Identity", [condition], name=f"{pair}/continue")
        y_t = body.op("Identity", [h_next], name=f"{pair}/y")
        inputs = [
            helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
            helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
            helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", hidden]),
        ]
        outputs = [
            helper.make_tensor_value_info(name, kind, None)
            for name, kind in (
                (carried, TensorProto.BOOL),
                (h_next, TensorProto.FLOAT),
                (y_t, TensorProto.FLOAT),
            )
        ]
        graph = helper.make_graph(body.nodes, f"{pair}_step", inputs, outputs)
        h_last, ys = main.ops("Loop", [steps, keep_going, h0], 2, name=f"{pair}/loop", body=graph)
        if reverse:
            start = writer.const("minus_one", np.array([-1], dtype=np.int64))
            end = writer.const("int64_min", np.array([_INT64_MIN], dtype=np.int64))
            ys = main.op("Slice", [ys, start, end, first, start], name=f"{pair}/reverse_outputs")
        return h_last, ys

    def graph(self, with_hx: bool) -> onnx.GraphProto:
        from onnx import TensorProto, helper

        model, writer = self.model, self.writer
        hidden, dirs, layers = model.hidden_size, model.num_directions, model.num_layers
        main = writer.nodes()

        def io_dims(features: int) -> list[int | str]:
            lead: list[int | str] = (
                ["batch", "seq_len"] if model.batch_first else ["seq_len", "batch"]
            )
            return [*lead, features]

        state_dims: list[int | str] = [layers * dirs, "batch", hidden]
        inputs = [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, io_dims(model.input_size))
        ]
        if with_hx:
            inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_dims))
        outputs = [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, io_dims(dirs * hidden)),
            helper.make_tensor_value_info("h_n", TensorProto.FLOAT, state_dims),
        ]
        x = "input"
        if model.batch_first:
            x = main.op("Transpose", [x], name="input_time_major", perm=[1, 0, 2])
        zeros = ""
        if not with_hx:
            # The code of 0.0 dequantizes to exactly 0: h0 is zeros of shape [batch, H].
            batch_dim = writer.const("batch_dim", np.array([1], dtype=np.int64))
            full_shape = main.op("Shape", [x], name="input_shape")
            shape = main.op("Gather", [full_shape, batch_dim], name="batch_size", axis=0)
            hidden_dim = writer.const("hidden_dim", np.array([hidden], dtype=np.int64))
            state_shape = main.op("Concat", [shape, hidden_dim], name="h0_shape", axis=0)
            zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
            zeros = main.op("ConstantOfShape", [state_shape], name="h0_zeros", value=zero)
        axes = writer.const("axis0", np.array([0], dtype=np.int64))
        sources, finals = [x], []
        for layer in range(layers):
            directions: list[str] = []
            for d in range(dirs):
                index = layer * dirs + d
                pair = f"l{layer}" + ("_reverse" if d else "")
                x_q = self.operators.layer_input(main, pair, index, sources)
                wx = self.operators.projection(main, pair, index, x_q)
                if with_hx:
                    row = writer.const(f"{pair}/h0_index", np.array(index, dtype=np.int64))
                    h0 = main.op("Gather", ["h0", row], name=f"{pair}/h0_gather", axis=0)
                    h0 = self.operators.initial_state(main, pair, index, h0)
                else:
                    h0 = zeros
                h_last, ys = self._loop(main, pair, index, bool(d), h0, wx)
                directions.append(ys)
                finals.append(main.op("Unsqueeze", [h_last, axes], name=f"{pair}/h_n"))
            sources = directions
        last = (
            sources[0] if dirs == 1 else main.op("Concat", sources, name="output_concat", axis=-1)
        )
        if model.batch_first:
            main.named("Transpose", [last], "output", "output", perm=[1, 0, 2])
        else:
            main.named("Identity", [last], "output", "output")
        main.named("Concat", finals, "h_n", "h_n", axis=0)
        return helper.make_graph(main.nodes, "quant_gru_qdq", inputs, outputs, writer.initializers)
