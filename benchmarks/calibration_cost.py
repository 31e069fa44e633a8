"""Cost of calibrating a batch against a float forward of it, on the CPU.

Calibration runs the float GRU decomposed at every quantization point and adds all values to
per-operator histograms. Median wall time of several runs after a warm-up; the time of
finalize_calibration (the SQNR search) is reported separately, as it runs once.
Writes benchmarks/results/calibration_cost.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from cpu_timing import median_ms

from quant_gru import QuantGRU

RESULTS = Path(__file__).resolve().parent / "results" / "calibration_cost.json"
SHAPES = [(64, 50, 128, 256), (16, 100, 32, 64), (1, 1000, 256, 256)]  # (B, T, I, H)


def bench(batch: int, steps: int, inputs: int, hidden: int) -> dict[str, float | int]:
    torch.manual_seed(0)
    model = QuantGRU(inputs, hidden)
    x = torch.rand(steps, batch, inputs) * 1.5 - 0.7
    with torch.no_grad():
        float_ms = median_ms(lambda: model(x))
        model.calibrating = True
        calibrate_ms = median_ms(lambda: model(x))
        model.calibrating = False
    start = time.perf_counter()
    model.finalize_calibration()
    finalize_ms = 1000 * (time.perf_counter() - start)
    return {
        "B": batch,
        "T": steps,
        "I": inputs,
        "H": hidden,
        "float_forward_ms": float_ms,
        "calibration_forward_ms": calibrate_ms,
        "ratio": calibrate_ms / float_ms,
        "finalize_sqnr_ms": finalize_ms,
    }


def main() -> None:
    rows = [bench(*shape) for shape in SHAPES]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| B, T, I, H | float forward (ms) | calibration forward (ms) | ratio | finalize (ms) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['B']}, {r['T']}, {r['I']}, {r['H']} | {r['float_forward_ms']:.1f} | "
            f"{r['calibration_forward_ms']:.1f} | {r['ratio']:.2f} | {r['finalize_sqnr_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
