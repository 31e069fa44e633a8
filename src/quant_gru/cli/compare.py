"""``quant-gru compare``: float, quantized, integer reference and ONNX Runtime on one data set."""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quant_gru import metrics
from quant_gru.analysis import OutputCodes, reference_output
from quant_gru.cli.errors import CLIError
from quant_gru.cli.files import (
    batched,
    check_features,
    describe,
    load_data,
    load_model,
    load_params,
    output_path,
    sequences_and_steps,
    write_json,
)
from quant_gru.module import QuantGRU

NAME = "compare"
HELP = (
    "compare a GRU's quantized outputs (PyTorch, integer reference, ONNX Runtime) with its "
    "float output on data: MSE, cosine, SQNR, and the distance from the reference in LSBs"
)
ROWS = {
    "quantized": "quantized (PyTorch)",
    "reference": "integer reference",
    "onnxruntime": "ONNX Runtime",
}
STATE_INPUTS = ("h0", "hx")  # the QDQ builder's and torch.onnx's initial-state input names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="state_dict file (.pt) of the GRU")
    parser.add_argument(
        "quant_params", metavar="QUANT_PARAMS", help="JSON from 'quant-gru calibrate'"
    )
    parser.add_argument(
        "data", metavar="DATA", help=".pt or .npy: (T, B, I), (B, T, I) with --batch-first"
    )
    parser.add_argument(
        "--onnx",
        metavar="QDQ.onnx",
        help="also run this graph in ONNX Runtime (an initial-state input is fed zeros)",
    )
    parser.add_argument("--batch-first", action="store_true", help="DATA is (B, T, I)")
    parser.add_argument(
        "--json",
        metavar="OUT.json",
        help="write the numbers as JSON (null where the SQNR is infinite: identical outputs)",
    )


def run(args: argparse.Namespace) -> None:
    json_path = output_path(args.json, "--json") if args.json is not None else None
    model = load_model(args.model, args.batch_first)
    load_params(model, args.quant_params, "QUANT_PARAMS")
    data = load_data(args.data)
    check_features(data, model, args.data)
    data = batched(data, args.batch_first)
    session = _session(args.onnx, model) if args.onnx is not None else None

    reference = reference_output(model, _time_major(data, model))
    bitwidth = model.quant_config.spec("output.h").bitwidth
    with torch.no_grad():
        model.use_quantization = False
        expected = _time_major(model(data)[0], model).double()
        model.use_quantization = True
        outputs = {"quantized": _time_major(model(data)[0], model)}
    reference_values = reference.dequantized()
    outputs["reference"] = reference_values
    if session is not None:
        outputs["onnxruntime"] = _time_major(_run_session(session, model, data), model)

    results: dict[str, dict[str, float | None]] = {}
    for name, actual in outputs.items():
        row: dict[str, float | None] = {
            "mse": metrics.mse(expected, actual),
            "cosine": metrics.cosine(expected, actual),
            "sqnr_db": metrics.sqnr_db(expected, actual),
            "max_lsb_vs_reference": None,
        }
        if name != "reference":
            # Both read back as codes, so equal codes show exactly 0.
            snapped = (reference.codes_of(actual) - reference.zero_point) * reference.scale
            row["max_lsb_vs_reference"] = metrics.max_lsb(
                snapped, reference_values, reference.scale
            )
        results[name] = row
    sequences, steps = sequences_and_steps(data, args.batch_first)
    print(
        f"compare: {describe(model)}, {sequences} sequences of {steps} steps, output.h "
        f"{bitwidth}-bit; against the float output"
    )
    print(_table(results))
    if json_path is not None:
        document = _document(args, results, reference, bitwidth, model, (sequences, steps))
        write_json(json_path, document)


def _time_major(tensor: Tensor, model: QuantGRU) -> Tensor:
    return tensor.transpose(0, 1) if model.batch_first else tensor


def _session(path: str, model: QuantGRU) -> Any:
    """An ONNX Runtime session of ``path``, its inputs checked against the model and layout."""
    if not Path(path).is_file():
        raise CLIError(f"--onnx {path}: no such file")
    try:
        # Untyped package: imported as a module object so the type checker needs no stubs.
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        raise CLIError("--onnx needs onnxruntime: pip install 'quant-gru[onnx]'") from None
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types for unreadable graphs
        raise CLIError(f"--onnx {path}: ONNX Runtime cannot load it ({error})") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if "input" not in inputs or not set(inputs) <= {"input", *STATE_INPUTS}:
        raise CLIError(
            f"--onnx {path}: expected inputs 'input' and optionally one of {STATE_INPUTS}, "
            f"found {sorted(inputs)}"
        )
    dims = inputs["input"]
    batch_axis = 0 if model.batch_first else 1
    if len(dims) == 3 and "batch" in dims and dims.index("batch") != batch_axis:
        layout = "(B, T, I)" if dims.index("batch") == 0 else "(T, B, I)"
        flag = "with" if dims.index("batch") == 0 else "without"
        raise CLIError(f"--onnx {path}: the graph takes {layout} input; run {flag} --batch-first")
    if len(dims) != 3 or (isinstance(dims[2], int) and dims[2] != model.input_size):
        raise CLIError(
            f"--onnx {path}: expected a 3-D input with {model.input_size} features (the "
            f"model's input_size), found dimensions {dims}"
        )
    return session


def _run_session(session: Any, model: QuantGRU, data: Tensor) -> Tensor:
    batch = data.shape[0 if model.batch_first else 1]
    feed: dict[str, np.ndarray] = {"input": data.numpy()}
    for item in session.get_inputs():
        if item.name in STATE_INPUTS:
            states = model.num_layers * model.num_directions
            feed[item.name] = np.zeros((states, batch, model.hidden_size), dtype=np.float32)
    names = [o.name for o in session.get_outputs()]
    output = session.run([names[names.index("output") if "output" in names else 0]], feed)[0]
    return torch.from_numpy(np.asarray(output))


def _table(results: dict[str, dict[str, float | None]]) -> str:
    header = f"{'':<21}{'MSE':>11}{'cosine':>11}{'SQNR (dB)':>11}  max LSB vs reference"
    lines = [header]
    for name, row in results.items():
        lsb = row["max_lsb_vs_reference"]
        lines.append(
            f"{ROWS[name]:<21}{row['mse']:>11.3e}{row['cosine']:>11.6f}{row['sqnr_db']:>11.2f}"
            f"  {'-' if lsb is None else f'{lsb:g}'}"
        )
    return "\n".join(lines)


def _document(
    args: argparse.Namespace,
    results: dict[str, dict[str, float | None]],
    reference: OutputCodes,
    bitwidth: int,
    model: QuantGRU,
    shape: tuple[int, int],
) -> dict[str, Any]:
    finite = {
        name: {k: v if v is None or math.isfinite(v) else None for k, v in row.items()}
        for name, row in results.items()
    }
    return {
        "model": args.model,
        "quant_params": args.quant_params,
        "data": args.data,
        "onnx": args.onnx,
        "sequences": shape[0],
        "steps": shape[1],
        "against": "float",
        "output_h": {
            "bitwidth": bitwidth,
            # One per last-layer direction (forward, then reverse).
            "scale": reference.scale[:: model.hidden_size].tolist(),
            "zero_point": reference.zero_point[:: model.hidden_size].long().tolist(),
        },
        "results": finite,
    }
