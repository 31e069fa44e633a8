"""The tile kernels' two ways of handing a step's state over, on the GPU: the barrier against
packed tagged words (kernels/triton/sync.py), in one run.

For each shape and precision (TF32, bf16): the forward and the backward kernel alone (µs a
step, CUDA-graph replay, the two modes in alternation, best of three), the module's graphed
and eager inference and eager training in both modes beside cuDNN's nn.GRU (the same
alternation), and whether the two modes' outputs,
saved gates and gradients are bit-identical. Writes benchmarks/results/tile_exchange.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from gpu_float_speed import event_ms, graphed  # run as a script: benchmarks/ is on the path

from quant_gru import QuantGRU
from quant_gru.kernels.triton import sync
from quant_gru.kernels.triton.gru_backward import gru_direction_backward
from quant_gru.kernels.triton.gru_forward import gru_direction_forward
from quant_gru.kernels.triton.plans import backward_plan, forward_plan

RESULTS = Path(__file__).resolve().parent / "results" / "tile_exchange.json"
SHAPES = [(64, 512, 512, 512), (256, 200, 1024, 1024), (64, 100, 256, 256)]  # (B, T, I, H)
PRECISIONS = {"tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}
MODES = {"barrier": False, "packed": True}


def median_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    return statistics.median(event_ms(fn) for _ in range(repeats))


def in_mode(packed: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        sync.PACKED_EXCHANGE = packed
        return fn()

    return run


def best_in_alternation(
    fns: dict[str, Callable[[], object]], rounds: int, graph: bool
) -> dict[str, float]:
    times: dict[str, list[float]] = {mode: [] for mode in fns}
    for _ in range(rounds):
        for mode, fn in fns.items():
            times[mode].append(median_ms(graphed(fn) if graph else fn))
    return {mode: min(values) for mode, values in times.items()}


def measure(shape: tuple[int, int, int, int], precision: str) -> dict:
    batch, steps, inputs, hidden = shape
    dtype, tf32 = PRECISIONS[precision]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = QuantGRU(inputs, hidden).cuda().to(dtype)
    model.backend = "triton"
    x = torch.randn(steps, batch, inputs, device="cuda", dtype=dtype)
    with torch.no_grad():
        gates_x = torch.nn.functional.linear(x, model.weight_ih_l0, model.bias_ih_l0)
    w_hh, b_hh = model.weight_hh_l0.detach(), model.bias_hh_l0.detach()
    grad_out = torch.randn(steps, batch, hidden, device="cuda", dtype=dtype)
    saved = torch.empty(steps, batch, 4 * hidden, device="cuda", dtype=dtype)

    results = {}
    for mode, packed in MODES.items():
        sync.PACKED_EXCHANGE = packed
        out, h_n = gru_direction_forward(gates_x, None, w_hh, b_hh, None, False, saved)
        grads = gru_direction_backward(grad_out, None, out, None, saved, w_hh, None, False, dtype)
        results[mode] = (out, h_n, saved.clone(), *grads)
    identical = all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))
    out = results["barrier"][0]

    def forward() -> object:
        return gru_direction_forward(gates_x, None, w_hh, b_hh, None, False)

    def backward() -> object:
        return gru_direction_backward(grad_out, None, out, None, saved, w_hh, None, False, dtype)

    x_grad = x.clone().requires_grad_()
    cudnn = model.to_float().cuda().to(dtype)
    cudnn.flatten_parameters()

    def infer(module: torch.nn.Module = model) -> object:
        with torch.no_grad():
            return module(x)

    def train(module: torch.nn.Module = model) -> object:
        output, _ = module(x_grad)
        output.float().sum().backward()
        return output

    row: dict = {
        "shape": list(shape),
        "precision": precision,
        "forward_plan": str(forward_plan(batch, hidden, w_hh.element_size(), x.device)),
        "backward_plan": str(backward_plan(batch, hidden, w_hh.element_size(), x.device)),
        "bit_identical": identical,
    }
    for name, fn, graph, rounds in (
        ("forward_us_a_step", forward, True, 3),
        ("backward_us_a_step", backward, True, 3),
        ("infer_graph_ms", infer, True, 2),
        ("infer_ms", infer, False, 2),
        ("train_ms", train, False, 2),
    ):
        fns = {mode: in_mode(packed, fn) for mode, packed in MODES.items()}
        if fn in (infer, train):  # cuDNN's nn.GRU beside ours, in the same alternation
            fns["cudnn"] = lambda fn=fn: fn(cudnn)
        best = best_in_alternation(fns, rounds, graph)
        scale = 1000 / steps if name.endswith("a_step") else 1.0
        row[name] = {mode: round(value * scale, 3) for mode, value in best.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    before = sync.PACKED_EXCHANGE
    rows = []
    try:
        for shape in SHAPES:
            for precision in PRECISIONS:
                rows.append(measure(shape, precision))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        sync.PACKED_EXCHANGE = before
    document = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
