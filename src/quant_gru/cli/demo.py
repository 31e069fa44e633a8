"""``quant-gru demo``: the end-to-end job on the Japanese Vowels speech dataset."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from quant_gru.cli.errors import CLIError

NAME = "demo"
HELP = (
    "train a float QuantGRU classifier on Japanese Vowels (speech), quantize it after training "
    "with every calibration method, fine-tune it quantization-aware at 4 bits, export float "
    "and QDQ ONNX, check ONNX Runtime, and write a report folder with plots"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("reports/demo"), help="report folder (created)"
    )
    parser.add_argument("--hidden-size", type=int, default=64, help="GRU hidden units (64)")
    parser.add_argument("--epochs", type=int, default=30, help="float training epochs (30)")
    parser.add_argument("--qat-epochs", type=int, default=10, help="QAT epochs (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train and quantize: auto uses the GPU when there is one",
    )


def run(args: argparse.Namespace) -> None:
    from quant_gru.demo.pipeline import Settings
    from quant_gru.demo.pipeline import run as run_pipeline
    from quant_gru.demo.report import summary_table, write_report

    for option in ("hidden_size", "epochs", "qat_epochs"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise CLIError(f"{flag} must be at least 1, got {getattr(args, option)}")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder")
    settings = Settings(
        out=args.out,
        hidden_size=args.hidden_size,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        seed=args.seed,
        device=_device(args.device),
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporters' and loaders' deprecation notices
            results = run_pipeline(settings)
            written = write_report(settings, results)
    except ImportError as error:
        raise CLIError(str(error)) from error
    print(summary_table(results))
    print(f"\nReport: {', '.join(str(p) for p in written)}")
    print(f"Done in {time.perf_counter() - start:.0f} s on {results.device}.")


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
