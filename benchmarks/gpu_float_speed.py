"""Float GRU speed on the GPU: QuantGRU's Triton kernels beside cuDNN's nn.GRU, in one run.

Shapes (B, T, I, H) of issue 6 plus a 2-layer bidirectional case. Precisions: cuDNN fp32 (TF32
off), cuDNN tf32, cuDNN bf16; QuantGRU fp32, tf32 and bf16 (the Triton kernels honour
torch.backends.cuda.matmul.allow_tf32). Inference is forward under no_grad; training is forward
plus backward. Median of CUDA-event timings after warm-up; peak memory above the inputs and
weights. Prints a table of ratios (cuDNN's best of the same family over ours) and
writes benchmarks/results/gpu_float_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quant_gru import QuantGRU

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_float_speed.json"
# (B, T, I, H, layers, bidirectional)
SHAPES = [
    (1, 1000, 256, 256, 1, False),
    (16, 1000, 128, 128, 1, False),
    (64, 100, 256, 256, 1, False),
    (64, 512, 512, 512, 1, False),
    (256, 200, 1024, 1024, 1, False),
    (16, 200, 128, 128, 2, True),
]
PRECISIONS = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
}


def cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median of CUDA-event timings of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(shape: tuple[int, int, int, int, int, bool], repeats: int) -> dict:
    batch, steps, inputs, hidden, layers, bidirectional = shape
    torch.manual_seed(0)
    row: dict = {"shape": list(shape[:4]), "layers": layers, "bidirectional": bidirectional}
    for name, (dtype, tf32) in PRECISIONS.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        ours = QuantGRU(inputs, hidden, num_layers=layers, bidirectional=bidirectional)
        ours = ours.cuda().to(dtype)
        ours.backend = "triton"
        cudnn = ours.to_float().cuda().to(dtype)
        cudnn.flatten_parameters()
        x = torch.randn(steps, batch, inputs, device="cuda", dtype=dtype)

        def infer(module: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return module(x)

            return run

        def step(module: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
            def run() -> object:
                out, _ = module(x.requires_grad_())
                out.float().sum().backward()
                return out

            return run

        with torch.no_grad():
            error = (ours(x)[0].double() - cudnn(x)[0].double()).abs().max().item()
        row[name] = {
            "cudnn_infer_ms": cuda_ms(infer(cudnn), repeats),
            "ours_infer_ms": cuda_ms(infer(ours), repeats),
            "cudnn_infer_peak_mb": peak_mb(infer(cudnn)),
            "ours_infer_peak_mb": peak_mb(infer(ours)),
            "max_abs_difference": error,
            "cudnn_train_ms": cuda_ms(step(cudnn), repeats),
            "ours_train_ms": cuda_ms(step(ours), repeats),
            "cudnn_train_peak_mb": peak_mb(step(cudnn)),
            "ours_train_peak_mb": peak_mb(step(ours)),
        }
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return row


def table(rows: list[dict], kind: str = "infer") -> str:
    """Markdown table of one kind of timing ('infer' or 'train')."""
    lines = [
        f"| shape (B, T, I, H), {kind} | cuDNN fp32 / tf32 / bf16 (ms) "
        "| ours fp32 / tf32 / bf16 (ms) | speed-up fp32 family | speed-up bf16 |",
        "|---|---|---|---:|---:|",
    ]
    for row in rows:
        label = ", ".join(map(str, row["shape"]))
        if row["layers"] > 1 or row["bidirectional"]:
            label += f" ({row['layers']} layers{', bidir.' if row['bidirectional'] else ''})"
        cudnn = [row[p][f"cudnn_{kind}_ms"] for p in PRECISIONS]
        ours = [row[p][f"ours_{kind}_ms"] for p in PRECISIONS]
        fp32_family = min(cudnn[:2]) / min(ours[:2])
        bf16 = cudnn[2] / ours[2]
        lines.append(
            f"| {label} | {' / '.join(f'{v:.2f}' for v in cudnn)} "
            f"| {' / '.join(f'{v:.2f}' for v in ours)} | {fp32_family:.2f}x | {bf16:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for shape in SHAPES:
        rows.append(measure(shape, args.repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    document = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "inference": "forward under no_grad; median of CUDA events after warm-up",
        "training": "forward + backward of sum(output); median of CUDA events after warm-up",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows))
    print()
    print(table(rows, "train"))


if __name__ == "__main__":
    main()
