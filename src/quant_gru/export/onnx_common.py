"""What the directly built ONNX exports share: the checks of the module and opset, and writing
a checked model file."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import onnx

    from quant_gru.module import QuantGRU


def check_module(model: object, what: str) -> QuantGRU:
    """`model` as a QuantGRU with float32 parameters; TypeError or ValueError otherwise."""
    from quant_gru.module import QuantGRU

    if not isinstance(model, QuantGRU):
        raise TypeError(f"{what} expects a QuantGRU, got {type(model).__name__}")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes != [str(torch.float32)]:
        raise ValueError(
            f"{what} requires float32 parameters, got {', '.join(dtypes)}; "
            "convert the module with model.float() first"
        )
    return model


def check_opset(opset: object, minimum: int) -> None:
    """An int between `minimum` and the installed onnx's newest opset; ValueError otherwise."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not minimum <= opset <= newest:
        raise ValueError(
            f"opset must be an int in [{minimum}, {newest}] (the installed onnx's newest), "
            f"got {opset!r}"
        )


def save_checked(
    graph: onnx.GraphProto, opset: int, description: str, path: str | os.PathLike[str]
) -> None:
    """Wrap `graph` in a model of `opset`, check it fully, and write it."""
    import onnx

    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        producer_name="quant_gru",
        doc_string=description,
    )
    # The oldest IR version the opset allows, so older runtimes accept the file.
    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, os.fspath(path))
