"""``quant-gru bench``: forward-pass timings of nn.GRU and QuantGRU (float and quantized)."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from quant_gru.cli.errors import CLIError
from quant_gru.cli.files import output_path, write_json
from quant_gru.module import QuantGRU

NAME = "bench"
HELP = (
    "time forward passes of nn.GRU, QuantGRU in float and QuantGRU quantized (calibrated on "
    "random data): the median of N runs after a warm-up"
)
# The seed's shape (64 50 128 256) takes seconds per quantized pass on a CPU.
DEFAULT_SHAPE = (16, 50, 64, 128)
ROWS = {
    "nn_gru": "nn.GRU",
    "quant_gru_float": "QuantGRU float",
    "quant_gru_quantized": "QuantGRU quantized",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=list(DEFAULT_SHAPE),
        metavar=("B", "T", "I", "H"),
        help="batch, steps, input size, hidden size (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, metavar="N", help="timed runs each (default: 10)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="auto: cuda when available (default)",
    )
    parser.add_argument("--json", metavar="OUT", help="write the timings as JSON")


def run(args: argparse.Namespace) -> None:
    if any(n < 1 for n in args.shape):
        raise CLIError(f"--shape: expected four positive integers B T I H, found {args.shape}")
    if args.repeats < 1:
        raise CLIError(f"--repeats: expected a positive integer, found {args.repeats}")
    device = _device(args.device)
    json_path = output_path(args.json, "--json") if args.json is not None else None
    batch, steps, inputs, hidden = args.shape

    torch.manual_seed(0)
    model = QuantGRU(inputs, hidden, device=device).eval()
    gru = model.to_float().eval()
    x = torch.randn(steps, batch, inputs, device=device)
    model.calibrating = True
    with torch.no_grad():
        model(x)
    model.calibrating = False
    model.calibration_method = "minmax"  # the fastest; the method does not change the timing
    model.finalize_calibration()

    def quant_gru(quantized: bool) -> Callable[[], object]:
        def forward() -> object:
            model.use_quantization = quantized
            return model(x)

        return forward

    forwards = {
        "nn_gru": lambda: gru(x),
        "quant_gru_float": quant_gru(False),
        "quant_gru_quantized": quant_gru(True),
    }
    with torch.no_grad():
        times = {name: _times_ms(fn, args.repeats, device) for name, fn in forwards.items()}
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["nn_gru"]
    print(
        f"bench: B={batch} T={steps} I={inputs} H={hidden} on {_device_name(device)}, "
        f"median of {args.repeats} runs"
    )
    print(f"{'':<20}{'ms':>10}{'vs nn.GRU':>11}")
    for name, ms in medians.items():
        print(f"{ROWS[name]:<20}{ms:>10.3f}{ms / base:>10.2f}x")
    if json_path is not None:
        write_json(
            json_path,
            {
                "device": _device_name(device),
                "shape": {"B": batch, "T": steps, "I": inputs, "H": hidden},
                "repeats": args.repeats,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "results": {
                    name: {"median_ms": medians[name], "ratio": medians[name] / base, "times_ms": t}
                    for name, t in times.items()
                },
            },
        )


def _device(choice: str) -> torch.device:
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and available) else "cpu")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _times_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall times of ``repeats`` calls after one warm-up call (CUDA: event times, the device
    synchronized, since launches return before the work is done)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            result.append(float(start.elapsed_time(end)))
        else:
            begin = time.perf_counter()
            fn()
            result.append(1000 * (time.perf_counter() - begin))
    return result
