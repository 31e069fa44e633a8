"""Float GRU speed on the GPU: QuantGRU's Triton kernels beside cuDNN's nn.GRU, in one run.

Shapes (B, T, I, H) of issue 6 plus a 2-layer bidirectional case. Precisions: cuDNN fp32 (TF32
off), cuDNN tf32, cuDNN bf16; QuantGRU fp32, tf32 and bf16 (the Triton kernels honour
torch.backends.cuda.matmul.allow_tf32). Inference is forward under no_grad, timed eagerly (one
call at a time, the host's launch costs included, as a training or serving loop without CUDA
graphs sees it) and as a CUDA-graph replay (the GPU's time alone: cuDNN launches kernels per
step for H > 192, so its eager times are mostly launch costs); training is forward plus
backward, eagerly. Median of CUDA-event timings after warm-up, cuDNN and ours in alternation;
peak memory above the inputs and weights. Prints tables of ratios (cuDNN's best of the same
family over ours) and writes benchmarks/results/gpu_float_speed.json, or with --autotune (the
tile plans measured first, kernels/triton/tuning.py) gpu_float_speed_autotuned.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quant_gru import QuantGRU
from quant_gru.kernels.triton import tuning

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_float_speed.json"
RESULTS_AUTOTUNED = RESULTS.with_name("gpu_float_speed_autotuned.json")
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


def event_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def paired_ms(
    first: Callable[[], object], second: Callable[[], object], repeats: int, warmup: int = 3
) -> tuple[float, float]:
    """Medians of CUDA-event timings of two callables timed in alternation after ``warmup``
    calls each, so that a slow spell of the machine falls on both."""
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(event_ms(first))
        times[1].append(event_ms(second))
    return statistics.median(times[0]), statistics.median(times[1])


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph: its replay, which launches every kernel at once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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
        cudnn_infer, ours_infer = paired_ms(infer(cudnn), infer(ours), repeats)
        cudnn_graph, ours_graph = paired_ms(graphed(infer(cudnn)), graphed(infer(ours)), repeats)
        cudnn_train, ours_train = paired_ms(step(cudnn), step(ours), repeats)
        row[name] = {
            "cudnn_infer_ms": cudnn_infer,
            "ours_infer_ms": ours_infer,
            "cudnn_infer_graph_ms": cudnn_graph,
            "ours_infer_graph_ms": ours_graph,
            "cudnn_infer_peak_mb": peak_mb(infer(cudnn)),
            "ours_infer_peak_mb": peak_mb(infer(ours)),
            "max_abs_difference": error,
            "cudnn_train_ms": cudnn_train,
            "ours_train_ms": ours_train,
            "cudnn_train_peak_mb": peak_mb(step(cudnn)),
            "ours_train_peak_mb": peak_mb(step(ours)),
        }
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return row


def table(rows: list[dict], kind: str = "infer") -> str:
    """Markdown table of one kind of timing: 'infer', 'infer_graph' or 'train'."""
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
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="measure the tile plans first (QUANT_GRU_AUTOTUNE=1, during each warm-up)",
    )
    parser.add_argument(
        "--shapes",
        type=lambda text: [SHAPES[int(i)] for i in text.split(",")],
        default=SHAPES,
        help="comma-separated indices into SHAPES (default: all)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    if args.autotune:
        os.environ[tuning.ENVIRONMENT] = "1"
    out = args.out or (RESULTS_AUTOTUNED if args.autotune else RESULTS)
    rows: list[dict] = []
    document = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "inference": "forward under no_grad, one call at a time as eager code runs it "
        "(launch costs included); median of CUDA events after warm-up, cuDNN and ours in "
        "alternation",
        "inference_graph": "the same forward captured in a CUDA graph and replayed: the GPU's "
        "time without the host's launch costs",
        "training": "forward + backward of sum(output), one call at a time; median of CUDA "
        "events after warm-up, in alternation",
        "autotuned": args.autotune,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        rows.append(measure(shape, args.repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        # Written after every shape: a run cut short keeps the rows it measured.
        out.write_text(json.dumps(document, indent=2) + "\n")
    for kind in ("infer", "infer_graph", "train"):
        print()
        print(table(rows, kind))


if __name__ == "__main__":
    main()
