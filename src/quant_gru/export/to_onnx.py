"""The seed's ONNX export recipe in one call."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from quant_gru.module import QuantGRU


def to_onnx(
    model: QuantGRU,
    path: str | os.PathLike[str],
    export_format: str = "float",
    with_hx: bool = False,
    opset: int = 17,
    dynamo: bool = False,
) -> None:
    """Export ``model`` to ``path`` with dynamic batch and sequence length.

    Switches ``export_mode`` on with ``export_format``, runs ``torch.onnx.export`` (the classic
    exporter by default, the newer one with ``dynamo=True``) and restores the module's modes
    whatever happens. Inputs ``input`` (and ``hx`` with ``with_hx``), outputs ``output`` and
    ``hidden``, laid out as the module's ``batch_first`` says.

    ``'float'`` gives the ONNX GRU operator per layer; ``'qdq'`` the calibrated quantized model
    with a quantization point at every operator and the integer model's arithmetic between them
    (export/onnx_qdq.py; a pending calibration is finalized first). QDQ export needs the
    classic exporter, whose newest opset is 20: 9- to 16-bit operators then use the float
    form of their quantization points; ``onnx_qdq.export_qdq_onnx`` writes opset 21 and more.
    """
    from quant_gru.export.onnx_qdq import NOT_CALIBRATED
    from quant_gru.module import QuantGRU

    if not isinstance(model, QuantGRU):
        raise TypeError(f"to_onnx expects a QuantGRU, got {type(model).__name__}")
    if export_format not in ("float", "qdq"):
        raise ValueError(f"export_format must be 'float' or 'qdq', got {export_format!r}")
    if export_format == "qdq":
        if dynamo:
            raise ValueError(
                "export_format='qdq' needs the classic exporter (dynamo=False): the newer "
                "exporter does not run the symbolic that writes the QDQ graph"
            )
        if not model.is_calibrated() and not model._has_statistics():
            raise RuntimeError(NOT_CALIBRATED)
    saved = (model.export_mode, model.export_format, model.training)
    model.export_format = export_format
    states = model.num_layers * model.num_directions
    parameter = next(model.parameters())
    example = torch.randn(2, 3, model.input_size, dtype=parameter.dtype, device=parameter.device)
    if not model.batch_first:
        example = example.transpose(0, 1)
    args: tuple[torch.Tensor, ...] = (example,)
    if with_hx:
        args += (example.new_zeros(states, 2, model.hidden_size),)
    try:
        model.export_mode = True
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notices
            if dynamo:
                _export_dynamo(model, args, path, opset)
            else:
                _export_classic(model, args, path, opset)
    finally:
        model.export_mode, model.export_format = saved[0], saved[1]
        model.train(saved[2])


def _export_classic(
    model: QuantGRU, args: tuple[torch.Tensor, ...], path: str | os.PathLike[str], opset: int
) -> None:
    batch_axis, time_axis = (0, 1) if model.batch_first else (1, 0)
    dynamic: dict[str, Any] = {
        "input": {batch_axis: "batch", time_axis: "seq_len"},
        "output": {batch_axis: "batch", time_axis: "seq_len"},
        "hidden": {1: "batch"},
    }
    names = ["input"]
    if len(args) > 1:
        names.append("hx")
        dynamic["hx"] = {1: "batch"}
    torch.onnx.export(
        model,
        args,
        os.fspath(path),
        input_names=names,
        output_names=["output", "hidden"],
        dynamic_axes=dynamic,
        opset_version=opset,
        dynamo=False,
    )


def _export_dynamo(
    model: QuantGRU, args: tuple[torch.Tensor, ...], path: str | os.PathLike[str], opset: int
) -> None:
    batch, steps = torch.export.Dim("batch"), torch.export.Dim("seq_len")
    batch_axis, time_axis = (0, 1) if model.batch_first else (1, 0)
    shapes: tuple[dict[int, Any], ...] = ({batch_axis: batch, time_axis: steps},)
    if len(args) > 1:
        shapes += ({1: batch},)
    try:
        program = torch.onnx.export(
            model,
            args,
            dynamic_shapes=shapes,
            input_names=["input", "hx"][: len(args)],
            output_names=["output", "hidden"],
            opset_version=opset,
            dynamo=True,
        )
    except Exception as error:  # the newer exporter's failures come in many types
        raise RuntimeError(
            f"the dynamo-based ONNX exporter failed ({type(error).__name__}: {error}); "
            "export with dynamo=False (the classic exporter) instead"
        ) from error
    assert program is not None
    program.save(os.fspath(path))
    _check_dynamic(path, batch_axis, time_axis)


def _check_dynamic(path: str | os.PathLike[str], batch_axis: int, time_axis: int) -> None:
    """Some torch releases' newer exporter fixes the example's sequence length in the graph;
    such a file would refuse every other length, so it is removed and the export fails."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    fixed = [
        (name, dims[axis].dim_value)
        for name, axis in (("batch", batch_axis), ("sequence length", time_axis))
        if dims[axis].HasField("dim_value")
    ]
    if fixed:
        os.remove(path)
        what = ", ".join(f"{name} {value}" for name, value in fixed)
        raise RuntimeError(
            f"the dynamo-based ONNX exporter of torch {torch.__version__} fixed the input's "
            f"{what} to the example's; export with dynamo=False (the classic exporter) instead"
        )
