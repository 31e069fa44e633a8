"""Float ONNX export: a QuantGRU's float forward as one ONNX ``GRU`` operator per layer.

The graph is built directly with ``onnx.helper`` rather than traced: tracing unrolls the time
loop to the example's length, while the ``GRU`` operator keeps ``seq_len`` and ``batch`` dynamic.
Two conventions differ between ``nn.GRU`` and ONNX and are converted here: the gate order
(PyTorch stacks r, z, n; ONNX stacks z, r, h) and where the reset gate applies (``nn.GRU``
multiplies it into ``W_hn h + b_hn``, which is ONNX's ``linear_before_reset=1``). Dropout is
not part of the graph: it is an inference graph, as ``nn.GRU`` computes in eval mode.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quant_gru.export.onnx_common import check_module, check_opset, save_checked

if TYPE_CHECKING:
    import onnx

    from quant_gru.module import QuantGRU

MIN_OPSET = 14  # the current GRU revision (GRU-14); earlier opsets are not tested


def export_float_onnx(
    model: QuantGRU,
    path: str | os.PathLike[str],
    opset: int = 17,
    with_hx: bool = True,
) -> None:
    """Write ``model``'s float forward to ``path`` as an ONNX model.

    Inputs: ``input`` ([seq_len, batch, input_size], or batch first) and, with ``with_hx``,
    ``h0`` ([num_layers * num_directions, batch, hidden_size]); outputs ``output`` and
    ``h_n``, as ``nn.GRU`` returns them. ``seq_len`` and ``batch`` are symbolic dimensions.
    Raises ``ValueError`` for a module this export does not represent (non-float32 parameters,
    quantized mode) and for an opset outside what the graph and the installed onnx support.
    """
    check_module(model, "export_float_onnx")
    if model.use_quantization and not model.quant_config.disable_quantization:
        raise ValueError(
            "float ONNX export represents the float forward, but the module runs its quantized "
            "model (use_quantization=True); set use_quantization=False to export the float GRU"
        )
    check_opset(opset, MIN_OPSET)
    description = "QuantGRU float forward (torch.nn.GRU semantics)"
    save_checked(_graph(model, with_hx), opset, description, path)


def _onnx_gates(weight: torch.Tensor, hidden_size: int) -> np.ndarray:
    """Rows of a [3H, ...] weight or bias from PyTorch's r, z, n order to ONNX's z, r, h."""
    r, z, n = weight.detach().to("cpu", torch.float32).split(hidden_size, dim=0)
    return torch.cat((z, r, n), dim=0).numpy()


def _layer_initializers(model: QuantGRU, layer: int) -> tuple[np.ndarray, ...]:
    """W [D, 3H, in], R [D, 3H, H] and B [D, 6H] of one layer, in ONNX layout."""
    hidden = model.hidden_size
    dirs = model.num_directions
    pairs = model._direction_weights()[layer * dirs : (layer + 1) * dirs]
    ws, rs, bs = [], [], []
    for w_ih, w_hh, b_ih, b_hh in pairs:
        ws.append(_onnx_gates(w_ih, hidden))
        rs.append(_onnx_gates(w_hh, hidden))
        if b_ih is None or b_hh is None:
            bs.append(np.zeros(6 * hidden, dtype=np.float32))
        else:
            bs.append(np.concatenate((_onnx_gates(b_ih, hidden), _onnx_gates(b_hh, hidden))))
    return np.stack(ws), np.stack(rs), np.stack(bs)


def _graph(model: QuantGRU, with_hx: bool) -> onnx.GraphProto:
    from onnx import TensorProto, helper, numpy_helper

    hidden, dirs, layers = model.hidden_size, model.num_directions, model.num_layers
    direction = "bidirectional" if model.bidirectional else "forward"
    nodes: list[Any] = []
    initializers: list[Any] = [
        numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "merge_directions_shape"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "slice_axes"),
    ]

    def io_dims(features: int) -> list[int | str]:
        lead: list[int | str] = ["batch", "seq_len"] if model.batch_first else ["seq_len", "batch"]
        return [*lead, features]

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, io_dims(model.input_size))]
    if with_hx:
        inputs.append(
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [layers * dirs, "batch", hidden])
        )
    outputs = [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, io_dims(dirs * hidden)),
        helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [layers * dirs, "batch", hidden]),
    ]

    x = "input"
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", ["input"], ["x_l0"], perm=[1, 0, 2]))
        x = "x_l0"
    final_states: list[str] = []
    for layer in range(layers):
        w, r, b = _layer_initializers(model, layer)
        names = (f"W_l{layer}", f"R_l{layer}", f"B_l{layer}")
        initializers += [
            numpy_helper.from_array(a, n) for a, n in zip((w, r, b), names, strict=True)
        ]
        initial_h = ""
        if with_hx:
            bounds = (f"h0_start_l{layer}", f"h0_end_l{layer}")
            for name, value in zip(bounds, (layer * dirs, (layer + 1) * dirs), strict=True):
                initializers.append(numpy_helper.from_array(np.array([value], np.int64), name))
            initial_h = f"h0_l{layer}"
            nodes.append(helper.make_node("Slice", ["h0", *bounds, "slice_axes"], [initial_h]))
        y, y_h = f"y_l{layer}", f"h_n_l{layer}"
        nodes.append(
            helper.make_node(
                "GRU",
                [x, *names, "", initial_h],
                [y, y_h],
                name=f"gru_l{layer}",
                direction=direction,
                hidden_size=hidden,
                linear_before_reset=1,
            )
        )
        final_states.append(y_h)
        # Y is [seq_len, D, batch, H]; the next layer and the output take [seq_len, batch, D*H].
        last = layer == layers - 1
        merged = "output" if last and not model.batch_first else f"x_l{layer + 1}"
        nodes.append(helper.make_node("Transpose", [y], [f"y_t_l{layer}"], perm=[0, 2, 1, 3]))
        nodes.append(
            helper.make_node("Reshape", [f"y_t_l{layer}", "merge_directions_shape"], [merged])
        )
        x = merged
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["output"], perm=[1, 0, 2]))
    if len(final_states) == 1:
        nodes.append(helper.make_node("Identity", final_states, ["h_n"]))
    else:
        nodes.append(helper.make_node("Concat", final_states, ["h_n"], axis=0))
    return helper.make_graph(nodes, "quant_gru_float", inputs, outputs, initializers)
