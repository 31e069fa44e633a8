"""Where an eager call's time goes on the host: QuantGRU (Triton) beside cuDNN's nn.GRU.

For each shape (B, T, I, H) in TF32, the median host time of one call made after a
synchronize, as gpu_float_speed.py's eager timings make them: an inference call, and a
training step's forward (the module call and the loss) and backward (``loss.backward()``,
until it returns). GPU work is asynchronous, so these are the host's own costs: where they
exceed the GPU's time, they are what an eager call waits for. Prints one line a shape and
module, and writes benchmarks/results/eager_host_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quant_gru import QuantGRU

RESULTS = Path(__file__).resolve().parent / "results" / "eager_host_time.json"
SHAPES = [(64, 100, 256, 256), (16, 1000, 128, 128), (64, 512, 512, 512), (256, 200, 1024, 1024)]


def host_us(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    """Median host microseconds of ``fn``, each call made after a synchronize."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def phases(module: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Host µs of an inference call, and of a training step's forward and backward."""

    def infer() -> None:
        with torch.no_grad():
            module(x)

    forward, backward = [], []
    feed = x.detach().requires_grad_()
    for step in range(repeats + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, _ = module(feed)
        loss = out.float().sum()
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        if step >= 5:
            forward.append(middle - start)
            backward.append(end - middle)
    torch.cuda.synchronize()
    return {
        "infer_us": host_us(infer, repeats),
        "train_forward_us": statistics.median(forward) * 1e6,
        "train_backward_us": statistics.median(backward) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for batch, steps, inputs, hidden in SHAPES:
        torch.manual_seed(0)
        ours = QuantGRU(inputs, hidden).cuda()
        ours.backend = "triton"
        x = torch.randn(steps, batch, inputs, device="cuda")
        row: dict[str, object] = {"shape": [batch, steps, inputs, hidden]}
        for name, module in (("cudnn", ours.to_float().cuda()), ("ours", ours)):
            row[name] = timings = phases(module, x, args.repeats)
            print((batch, steps, inputs, hidden), name, {k: round(v) for k, v in timings.items()})
        rows.append(row)
    document = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "precision": "tf32",
        "what": "median host microseconds of one call after a synchronize",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
