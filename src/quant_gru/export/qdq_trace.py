"""``export_mode`` with ``export_format='qdq'``: the QDQ graph inside ``torch.onnx.export``.

Tracing a Python time loop would unroll it to the example's length (DESIGN.md's export trap),
so forward runs the quantized model through ``QDQExport``, an autograd function whose ONNX
``symbolic`` writes the QDQ graph of onnx_qdq.py (with its ``Loop``) into the exported graph,
node by node. Its forward computes what that graph computes: the integer model, dequantized.

The symbolic uses the classic exporter's graph context (``dynamo=False``); the newer exporter
does not call symbolics, so forward refuses to run under it with a clear message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    import onnx

    from quant_gru.module import QuantGRU

# The arithmetic of the graph that export_mode writes (onnx_qdq.py).
TRACED_ARITHMETIC = "integer"


def check_not_dynamo() -> None:
    """RuntimeError when called under torch.export / the dynamo-based ONNX exporter."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        raise RuntimeError(
            "export_format='qdq' needs the classic ONNX exporter: call torch.onnx.export(..., "
            "dynamo=False), quant_gru.export.to_onnx(model, path, export_format='qdq'), or "
            "quant_gru.export.onnx_qdq.export_qdq_onnx(model, path)"
        )


@contextmanager
def untraced() -> Iterator[None]:
    """Suspend the classic exporter's tracer (for host-side work such as finalizing the
    calibration, which must see plain shapes and record nothing)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)  # type: ignore[attr-defined]


class QDQExport(torch.autograd.Function):
    """(input (T, B, I) or batch-first, hx or None, model) -> (output, h_n)."""

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, hx: Tensor | None, model: QuantGRU
    ) -> tuple[Tensor, Tensor]:
        from quant_gru import functional

        weights, shape = model._direction_weights(), model._shape()
        with untraced():  # the symbolic stands for this computation in the exported graph
            output, h_n = functional.quantized_gru(
                input, hx, weights, shape, model._quantized_model(), 0.0, False
            )
        assert isinstance(output, Tensor)
        return output, h_n

    @staticmethod
    def symbolic(g: Any, input: Any, hx: Any, model: QuantGRU) -> tuple[Any, Any]:
        from quant_gru.export.onnx_qdq import qdq_graph

        with_hx = hx is not None and not _is_none(hx)
        graph = qdq_graph(model, g.opset, with_hx, TRACED_ARITHMETIC, "export_format='qdq'")
        values = {"input": input}
        if with_hx:
            values["h0"] = hx
        for initializer in graph.initializer:
            values[initializer.name] = g.op("Constant", value_t=_tensor(initializer))
        _emit(g, graph.node, values)
        return values["output"], values["h_n"]


def _is_none(value: Any) -> bool:
    node = getattr(value, "node", None)
    return node is not None and value.node().mustBeNone()


def _tensor(proto: onnx.TensorProto) -> Tensor:
    from onnx import numpy_helper

    array = np.array(numpy_helper.to_array(proto))  # writable copy
    return torch.from_numpy(array)


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes in the classic exporter's ``name_kind`` keyword form."""
    from onnx import AttributeProto, helper

    suffix = {
        AttributeProto.INT: "i",
        AttributeProto.INTS: "i",
        AttributeProto.FLOAT: "f",
        AttributeProto.FLOATS: "f",
        AttributeProto.STRING: "s",
        AttributeProto.TENSOR: "t",
    }
    attributes = {}
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            continue  # a Loop body, emitted as the node's block
        if attribute.type not in suffix:
            raise NotImplementedError(f"attribute {attribute.name} of {node.op_type}")
        value = helper.get_attribute_value(attribute)
        if attribute.type == AttributeProto.TENSOR:
            value = _tensor(value)
        elif attribute.type == AttributeProto.STRING:
            value = value.decode()
        attributes[f"{attribute.name}_{suffix[attribute.type]}"] = value
    return attributes


def _emit(g: Any, nodes: Any, values: dict[str, Any]) -> None:
    """Emit ONNX ``nodes`` into the classic exporter's graph context ``g``; ``values`` maps
    value names to the exporter's values and receives the nodes' outputs."""
    from torch.onnx._internal.torchscript_exporter import jit_utils, utils

    for node in nodes:
        inputs = [values[name] for name in node.input]
        count = len(node.output)
        attributes = _attributes(node)
        if node.op_type == "Loop":
            (body,) = [a.g for a in node.attribute if a.name == "body"]
            outputs, (context,), _ = jit_utils.add_op_with_blocks(
                g, "Loop", *inputs, outputs=count, n_blocks=1, **attributes
            )
            for body_input in body.input:
                values[body_input.name] = utils._add_input_to_block(context.block)
            _emit(context, body.node, values)
            for body_output in body.output:
                utils._add_output_to_block(context.block, values[body_output.name])
        else:
            outputs = g.op(node.op_type, *inputs, outputs=count, **attributes)
        outputs = outputs if count > 1 else [outputs]
        for name, value in zip(node.output, outputs, strict=True):
            values[name] = value
