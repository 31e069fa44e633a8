"""QDQ ONNX export: a calibrated QuantGRU as a float graph with a fake quantization (quantize,
then dequantize) at every activation operator of the integer model (reference/README.md §7).

Why this shape: runtimes and hardware toolchains recognise ``QuantizeLinear`` /
``DequantizeLinear`` pairs around float operators and fuse them into integer kernels, while the
graph itself stays runnable anywhere. The time loop is one ``Scan`` per (layer, direction), so
``seq_len`` and ``batch`` stay dynamic; the reverse direction scans its input and writes its
output backwards (``scan_input_directions`` / ``scan_output_directions`` = 1). The input
projection ``matmul.Wx`` of all steps does not depend on ``h`` and is computed before the Scan,
which receives it as its scan input.

Fake quantization of an operator with (s, zp, qmin, qmax):

- an 8- or 16-bit operator whose range is its container's full range (int8, uint8, int16,
  uint16) becomes a ``QuantizeLinear`` / ``DequantizeLinear`` pair of that type (nodes
  ``<pair>/<operator>/Q`` and ``/DQ``; int16 and uint16 need opset 21);
- any other width is emulated in float, since ONNX has no narrower integer types:
  ``q = Clip(Round(v / s) + zp, qmin, qmax)``, ``v' = (q - zp) * s`` (nodes named
  ``<pair>/<operator>/...``). Above 24 bits float32 cannot hold every code exactly.

Weights and biases are ``DequantizeLinear`` of the integer codes the integer model uses
(per row, axis of the output channels) for widths up to 16 bits, float constants equal to
``codes * scale`` above.

Where ONNX Runtime may differ from the integer reference by a few LSB: ONNX rounds half to
even, the integer model half up; the integer model evaluates sigmoid and tanh with integer
tables (§6) and requantizes each term of a sum separately in fixed point (§4, §5), the graph
rounds the float sum once; float32 arithmetic rounds where the integer model is exact. A
difference in the hidden state can then propagate through the following steps (measured on
small models: at most 4 to 6 LSB of output.h, 91 % or more of the outputs within 2 LSB).
ONNX Runtime's extended graph optimizations (its QDQ fusions) changed this graph's results by
tens of LSB with onnxruntime 1.32; ``GraphOptimizationLevel.ORT_ENABLE_BASIC`` keeps them.

Not represented: packed sequences (per-sequence lengths; the graph runs every sequence over
all ``seq_len`` steps) and training-only inter-layer dropout.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quant_gru.export.onnx_common import check_module, check_opset, save_checked
from quant_gru.quantize.program import ACTIVATION_OPERATORS

if TYPE_CHECKING:
    import onnx

    from quant_gru.module import QuantGRU
    from quant_gru.quantize.params import OperatorQuant
    from quant_gru.quantize.program import ActivationFormat, DirectionProgram

MIN_OPSET = 21  # int16 / uint16 QuantizeLinear and DequantizeLinear

# The activation operators of one step, in §7's order (input.x first: the layer input).
STEP_OPERATORS = ACTIVATION_OPERATORS


def export_qdq_onnx(
    model: QuantGRU,
    path: str | os.PathLike[str],
    opset: int = 21,
    with_hx: bool = True,
) -> None:
    """Write ``model``'s quantized forward to ``path`` as a QDQ ONNX model.

    Inputs and outputs are those of the float export (``input``, optional ``h0``; ``output``,
    ``h_n``; symbolic ``seq_len`` and ``batch``). Raises ``RuntimeError`` for an uncalibrated
    model and ``ValueError`` for non-float32 parameters or an unsupported opset.
    """
    check_module(model, "export_qdq_onnx")
    if not model.is_calibrated():
        raise RuntimeError(
            "QDQ ONNX export needs quantization parameters, but the QuantGRU is not calibrated: "
            "calibrate first (model.calibrating = True, run forward on calibration data, "
            "model.calibrating = False, model.finalize_calibration())"
        )
    check_opset(opset, MIN_OPSET)
    description = "QuantGRU quantized forward (QDQ, fake quantization at every operator)"
    save_checked(_Builder(model).graph(with_hx), opset, description, path)


def _container(qmin: int, qmax: int) -> int | None:
    """The ONNX integer type whose full range is exactly [qmin, qmax], if any."""
    from onnx import TensorProto

    types = {
        (-(1 << 7), (1 << 7) - 1): TensorProto.INT8,
        (0, (1 << 8) - 1): TensorProto.UINT8,
        (-(1 << 15), (1 << 15) - 1): TensorProto.INT16,
        (0, (1 << 16) - 1): TensorProto.UINT16,
    }
    return types.get((qmin, qmax))


def _weight_container(quant: OperatorQuant) -> int | None:
    """Integer type holding a weight's codes (DequantizeLinear does not clip, so any width up
    to the container's fits)."""
    from onnx import TensorProto

    bits, unsigned = quant.spec.bitwidth, quant.spec.is_unsigned
    if bits <= 8:
        return TensorProto.UINT8 if unsigned else TensorProto.INT8
    if bits <= 16:
        return TensorProto.UINT16 if unsigned else TensorProto.INT16
    return None


class _Nodes:
    """The node list of one graph (the main graph or a Scan body)."""

    def __init__(self, builder: _Builder) -> None:
        self.builder = builder
        self.nodes: list[Any] = []

    def op(self, op_type: str, inputs: list[str], name: str = "", **attrs: Any) -> str:
        return self.ops(op_type, inputs, 1, name, **attrs)[0]

    def ops(
        self, op_type: str, inputs: list[str], count: int, name: str = "", **attrs: Any
    ) -> list[str]:
        from onnx import helper

        outputs = [self.builder.fresh() for _ in range(count)]
        node_name = name or f"{op_type}_{self.builder.fresh()}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs


class _Builder:
    """Builds the graph; initializers live in the main graph, and Scan bodies read them (and
    the dequantized weights) from the outer scope."""

    def __init__(self, model: QuantGRU) -> None:
        from quant_gru.kernels.torch.quantized_forward import build_programs

        self.model = model
        quantized = model._quantized_model()
        self.quant = quantized.quant
        self.programs: list[DirectionProgram] = build_programs(
            quantized, model._direction_weights()
        )
        self.initializers: list[Any] = []
        self._constants: set[str] = set()
        self._count = 0

    def fresh(self) -> str:
        self._count += 1
        return f"t{self._count}"

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self._constants:
            self._constants.add(name)
            self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def fake_quant(
        self, g: _Nodes, value: str, pair: str, op: str, fmt: ActivationFormat, tag: str = ""
    ) -> str:
        """Quantize then dequantize ``value`` with operator ``op``'s parameters."""
        from onnx import helper

        prefix = f"{pair}/{op}" + (f"/{tag}" if tag else "")
        scale = self.const(f"{prefix}/scale", np.array(fmt.scale, dtype=np.float32))
        container = _container(fmt.qmin, fmt.qmax)
        if container is not None:
            dtype = helper.tensor_dtype_to_np_dtype(container)
            zp = self.const(f"{prefix}/zero_point", np.array(fmt.zero_point, dtype=dtype))
            q = g.op("QuantizeLinear", [value, scale, zp], name=f"{prefix}/Q")
            return g.op("DequantizeLinear", [q, scale, zp], name=f"{prefix}/DQ")
        zp = self.const(f"{prefix}/zero_point", np.array(fmt.zero_point, dtype=np.float32))
        lo = self.const(f"{prefix}/qmin", np.array(fmt.qmin, dtype=np.float32))
        hi = self.const(f"{prefix}/qmax", np.array(fmt.qmax, dtype=np.float32))
        scaled = g.op("Div", [value, scale], name=f"{prefix}/Div")
        rounded = g.op("Round", [scaled], name=f"{prefix}/Round")
        shifted = g.op("Add", [rounded, zp], name=f"{prefix}/AddZeroPoint")
        codes = g.op("Clip", [shifted, lo, hi], name=f"{prefix}/Clip")
        centred = g.op("Sub", [codes, zp], name=f"{prefix}/SubZeroPoint")
        return g.op("Mul", [centred, scale], name=f"{prefix}/Mul")

    def weight(self, g: _Nodes, pair: str, op: str, codes: torch.Tensor, index: int) -> str:
        """A weight ([3H, K] stored transposed as [K, 3H]) or bias [3H] from its integer codes."""
        from onnx import helper

        from quant_gru.quantize.scales import per_row

        quant = self.quant[index][op]
        scales = per_row(quant.scale.detach().cpu(), codes.shape[0]).numpy()
        values = codes.detach().cpu().numpy()
        container = _weight_container(quant)
        if container is not None:
            dtype = helper.tensor_dtype_to_np_dtype(container)
            info = np.iinfo(dtype)
            if values.min(initial=0) >= info.min and values.max(initial=0) <= info.max:
                stored = self.const(f"{pair}/{op}/codes", values.astype(dtype))
                scale = self.const(f"{pair}/{op}/scale", scales.astype(np.float32))
                value = g.op("DequantizeLinear", [stored, scale], name=f"{pair}/{op}/DQ", axis=0)
                if values.ndim == 1:
                    return value
                # DQ of the [3H, K] codes per row, then Transpose for x @ W^T.
                return g.op("Transpose", [value], name=f"{pair}/{op}/T", perm=[1, 0])
        shape = (-1, 1) if values.ndim == 2 else (-1,)
        dequantized = values.astype(np.float64) * scales.reshape(shape)
        if values.ndim == 2:
            dequantized = dequantized.T
        return self.const(f"{pair}/{op}/value", np.ascontiguousarray(dequantized, np.float32))

    def step(self, pair: str, index: int, r_t: str, b_r: str) -> Any:
        """The Scan body: (h_prev [B, H], wx_t [B, 3H]) -> (h_next, y_t), §7's step."""
        from onnx import TensorProto, helper

        g, fmt = _Nodes(self), self.programs[index].formats
        hidden = self.model.hidden_size
        split = self.const("split_gates", np.array([hidden] * 3, dtype=np.int64))

        def fq(value: str, op: str) -> str:
            return self.fake_quant(g, value, pair, op, fmt[op])

        h, wx_t = f"{pair}/h_prev", f"{pair}/wx_t"
        rh = fq(g.op("MatMul", [h, r_t], name=f"{pair}/R_matmul"), "matmul.Rh")
        rb = fq(g.op("Add", [rh, b_r], name=f"{pair}/br_add"), "op.Rh_add_br")
        x_r, x_z, x_n = g.ops("Split", [wx_t, split], 3, name=f"{pair}/split_wx", axis=1)
        rb_r, rb_z, rb_n = g.ops("Split", [rb, split], 3, name=f"{pair}/split_rb", axis=1)
        r_pre = fq(g.op("Add", [x_r, rb_r], name=f"{pair}/r_add"), "gate.r_pre")
        z_pre = fq(g.op("Add", [x_z, rb_z], name=f"{pair}/z_add"), "gate.z_pre")
        r = fq(g.op("Sigmoid", [r_pre], name=f"{pair}/r_sigmoid"), "gate.r_out")
        z = fq(g.op("Sigmoid", [z_pre], name=f"{pair}/z_sigmoid"), "gate.z_out")
        r_rb = fq(g.op("Mul", [r, rb_n], name=f"{pair}/r_mul"), "op.rRh")
        g_pre = fq(g.op("Add", [x_n, r_rb], name=f"{pair}/g_add"), "gate.g_pre")
        gate = fq(g.op("Tanh", [g_pre], name=f"{pair}/g_tanh"), "gate.g_out")
        old = fq(g.op("Mul", [z, h], name=f"{pair}/old_mul"), "op.old_contrib")
        # (1 - z) * g as g - z * g, the form of §7.
        zg = g.op("Mul", [z, gate], name=f"{pair}/zg_mul")
        new = fq(g.op("Sub", [gate, zg], name=f"{pair}/new_sub"), "op.new_contrib")
        h_next = fq(g.op("Add", [old, new], name=f"{pair}/h_add"), "output.h")
        y_t = g.op("Identity", [h_next], name=f"{pair}/y")
        inputs = [
            helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info(wx_t, TensorProto.FLOAT, ["batch", 3 * hidden]),
        ]
        outputs = [
            helper.make_tensor_value_info(h_next, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(y_t, TensorProto.FLOAT, None),
        ]
        return helper.make_graph(g.nodes, f"{pair}_step", inputs, outputs)

    def graph(self, with_hx: bool) -> onnx.GraphProto:
        from onnx import TensorProto, helper

        model = self.model
        hidden, dirs, layers = model.hidden_size, model.num_directions, model.num_layers
        main = _Nodes(self)

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
            shape = main.op("Shape", [x], name="input_shape", start=1, end=2)
            hidden_dim = self.const("hidden_dim", np.array([hidden], dtype=np.int64))
            state_shape = main.op("Concat", [shape, hidden_dim], name="h0_shape", axis=0)
            zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
            zeros = main.op("ConstantOfShape", [state_shape], name="h0_zeros", value=zero)
        axes = self.const("unsqueeze_axes", np.array([0], dtype=np.int64))
        finals: list[str] = []
        for layer in range(layers):
            directions: list[str] = []
            for d in range(dirs):
                index = layer * dirs + d
                pair = f"l{layer}" + ("_reverse" if d else "")
                program, fmt = self.programs[index], self.programs[index].formats
                x_q = self.fake_quant(main, x, pair, "input.x", fmt["input.x"])
                w_t = self.weight(main, pair, "weight.W", program.weight_W, index)
                b_w = self.weight(main, pair, "weight.bw", program.bias_w, index)
                r_t = self.weight(main, pair, "weight.R", program.weight_R, index)
                b_r = self.weight(main, pair, "weight.br", program.bias_r, index)
                projected = main.op("MatMul", [x_q, w_t], name=f"{pair}/W_matmul")
                biased = main.op("Add", [projected, b_w], name=f"{pair}/bw_add")
                wx = self.fake_quant(main, biased, pair, "matmul.Wx", fmt["matmul.Wx"])
                if with_hx:
                    row = self.const(f"{pair}/h0_index", np.array(index, dtype=np.int64))
                    h0 = main.op("Gather", ["h0", row], name=f"{pair}/h0_gather", axis=0)
                    h0 = self.fake_quant(main, h0, pair, "output.h", fmt["output.h"], tag="h0")
                else:
                    h0 = zeros
                h_last, y = main.ops(
                    "Scan",
                    [h0, wx],
                    2,
                    name=f"{pair}/scan",
                    body=self.step(pair, index, r_t, b_r),
                    num_scan_inputs=1,
                    scan_input_directions=[d],
                    scan_output_directions=[d],
                )
                directions.append(y)
                finals.append(main.op("Unsqueeze", [h_last, axes], name=f"{pair}/h_n"))
            if dirs == 1:
                x = directions[0]
            else:
                x = main.op("Concat", directions, name=f"l{layer}/concat", axis=-1)
        if model.batch_first:
            last = helper.make_node("Transpose", [x], ["output"], name="output", perm=[1, 0, 2])
        else:
            last = helper.make_node("Identity", [x], ["output"], name="output")
        main.nodes.append(last)
        main.nodes.append(helper.make_node("Concat", finals, ["h_n"], name="h_n", axis=0))
        return helper.make_graph(main.nodes, "quant_gru_qdq", inputs, outputs, self.initializers)
