"""``quant-gru calibrate``: calibrate a GRU on data and write its quantization parameters."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable, Sequence

import torch

from quant_gru.calibration.methods import METHODS
from quant_gru.cli.errors import CLIError
from quant_gru.cli.files import (
    batched,
    check_features,
    describe,
    load_data,
    load_model,
    output_path,
    sequences_and_steps,
)
from quant_gru.config import QuantConfigError
from quant_gru.module import QuantGRU

NAME = "calibrate"
HELP = (
    "calibrate a GRU (an nn.GRU or QuantGRU state_dict) on data and write its quantization "
    "parameters as JSON (QuantGRU.load_quant_params reads them)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="state_dict file (.pt) of the GRU")
    parser.add_argument(
        "data",
        metavar="DATA",
        help="calibration data, .pt or .npy: (T, B, I), (B, T, I) with --batch-first, or (T, I)",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="QUANT_PARAMS.json", help="file to write"
    )
    parser.add_argument(
        "--method", choices=METHODS, default="sqnr", help="how ranges are chosen (default: sqnr)"
    )
    parser.add_argument(
        "--percentile",
        type=float,
        metavar="P",
        help="percent of values the percentile method keeps (default 99.99)",
    )
    widths = parser.add_mutually_exclusive_group()
    widths.add_argument("--bits", type=int, metavar="N", help="every operator at N bits")
    widths.add_argument(
        "--config",
        metavar="BITWIDTH.json",
        help="bit-width config file (default: the model file's, else 8 bits everywhere)",
    )
    parser.add_argument(
        "--symmetric", action="store_true", help="with --bits: symmetric activations too"
    )
    parser.add_argument("--batch-first", action="store_true", help="DATA is (B, T, I)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="sequences per calibration forward (default: 64)",
    )


def run(args: argparse.Namespace) -> None:
    _check_options(args)
    target = output_path(args.output, "-o/--output")
    model = load_model(args.model, args.batch_first)
    data = load_data(args.data)
    check_features(data, model, args.data)
    data = batched(data, args.batch_first)
    _configure(model, args)
    sequences, steps = sequences_and_steps(data, args.batch_first)
    chunks = torch.split(data, args.batch_size, dim=0 if args.batch_first else 1)
    calibrate(model, _progress(chunks))
    model.calibration_method = args.method
    if args.percentile is not None:
        model.percentile_value = args.percentile
    model.finalize_calibration()
    model.export_quant_params(target)
    print(
        f"calibrated {describe(model)} on {sequences} sequences of {steps} steps "
        f"({args.method}, output.h {model.quant_config.spec('output.h').bitwidth}-bit): "
        f"wrote {target}"
    )


def calibrate(model: QuantGRU, batches: Iterable[torch.Tensor]) -> None:
    """Collect the calibration statistics of ``batches`` (no parameters computed yet)."""
    model.eval()
    model.use_quantization = False
    model.reset_calibration()
    model.calibrating = True
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        model.calibrating = False


def _check_options(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, found {args.batch_size}")
    if args.percentile is not None and args.method != "percentile":
        raise CLIError(f"--percentile applies to --method percentile, not {args.method!r}")
    if args.percentile is not None and not 0 < args.percentile <= 100:
        raise CLIError(f"--percentile: expected a number in (0, 100], found {args.percentile}")
    if args.symmetric and args.bits is None:
        raise CLIError("--symmetric applies with --bits (a --config file sets it per operator)")


def _configure(model: QuantGRU, args: argparse.Namespace) -> None:
    try:
        if args.bits is not None:
            model.set_all_bitwidth(args.bits, is_symmetric=args.symmetric)
        elif args.config is not None:
            model.load_bitwidth_config(args.config)
    except OSError as error:
        raise CLIError(f"--config {args.config}: cannot read it ({error.strerror})") from None
    except (QuantConfigError, ValueError) as error:
        option = "--bits" if args.bits is not None else f"--config {args.config}"
        raise CLIError(f"{option}: {error}") from None


def _progress(chunks: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
    """A progress bar on stderr when tqdm is installed and stderr is a terminal."""
    try:
        # Untyped package: imported as a module object so the type checker needs no stubs.
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        return chunks
    result: Iterable[torch.Tensor] = tqdm(
        chunks, desc="calibrate", unit="batch", disable=None, leave=False
    )
    return result
