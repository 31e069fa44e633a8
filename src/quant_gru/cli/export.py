"""``quant-gru export``: write a GRU as an ONNX model, float or QDQ."""

from __future__ import annotations

import argparse
import sys

from quant_gru.cli.errors import CLIError
from quant_gru.cli.files import load_model, load_params, output_path

NAME = "export"
HELP = "export a GRU to ONNX: float (ONNX GRU operators) or QDQ (the calibrated integer model)"
DEFAULT_OPSET = 17  # read by every current ONNX Runtime and TensorRT
FLOAT_OPSETS = (7, 20)  # the classic torch.onnx exporter's range (ONNX GRU from opset 7)
QDQ_MIN_OPSET = 13  # per-axis DequantizeLinear
EPILOG = f"""\
formats:
  float  torch.onnx's classic exporter (quant_gru.export.to_onnx), opset {FLOAT_OPSETS[0]} to
         {FLOAT_OPSETS[1]}; inputs 'input' (and 'hx' with --with-hx), outputs 'output', 'hidden'.
  qdq    the graph builder of quant_gru.export.onnx_qdq.export_qdq_onnx at every opset from
         {QDQ_MIN_OPSET} (the same graph to_onnx's QDQ export writes through the tracer, which
         stops at opset 20); inputs 'input' (and 'h0' with --with-hx), outputs 'output', 'h_n'.
         Opset 21 or later gives 9- to 16-bit operators int16 Q/DQ pairs. ONNX Runtime
         reproduces the integer reference's codes exactly.
Both keep batch and sequence length dynamic; the layout follows --batch-first.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("model", metavar="MODEL", help="state_dict file (.pt) of the GRU")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    parser.add_argument(
        "--format", choices=("float", "qdq"), default="float", help="graph format (default float)"
    )
    parser.add_argument(
        "--quant-params",
        metavar="QP.json",
        help="quantization parameters from 'quant-gru calibrate' (qdq; optional when MODEL "
        "is a calibrated QuantGRU's state_dict)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset (default {DEFAULT_OPSET})",
    )
    parser.add_argument("--batch-first", action="store_true", help="(B, T, I) input and output")
    parser.add_argument(
        "--with-hx", action="store_true", help="an initial-state input (else zeros)"
    )


def run(args: argparse.Namespace) -> None:
    target = output_path(args.output, "-o/--output")
    _check_opset(args.format, args.opset)
    model = load_model(args.model, args.batch_first)
    if args.format == "float":
        if args.quant_params is not None:
            print("quant-gru export: note: --format float ignores --quant-params", file=sys.stderr)
        from quant_gru.export import to_onnx

        to_onnx(model, target, export_format="float", with_hx=args.with_hx, opset=args.opset)
    else:
        load_params(model, args.quant_params, "--quant-params")
        from quant_gru.export.onnx_qdq import export_qdq_onnx

        export_qdq_onnx(model, target, opset=args.opset, with_hx=args.with_hx)
    print(f"exported {args.format} ONNX (opset {args.opset}): wrote {target}")


def _check_opset(export_format: str, opset: int) -> None:
    try:
        import onnx
    except ImportError:
        raise CLIError("export needs onnx: pip install 'quant-gru[onnx]'") from None
    newest = onnx.defs.onnx_opset_version()
    low, high = FLOAT_OPSETS if export_format == "float" else (QDQ_MIN_OPSET, newest)
    if not low <= opset <= high:
        raise CLIError(
            f"--opset: the {export_format} format takes opsets {low} to {high}, found {opset}"
        )
