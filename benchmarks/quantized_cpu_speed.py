"""CPU speed of the plain-PyTorch paths: float, calibration, quantized inference, QAT step, and
the integer reference, beside nn.GRU, on the seed's test shape and a small one.

These are reference paths, not the fast ones (those are the Triton kernels); the numbers say
what a user without a GPU waits. Median wall time of several runs after a warm-up.
Writes benchmarks/results/quantized_cpu_speed.json.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from cpu_timing import median_ms

from quant_gru import QuantGRU
from quant_gru.kernels.torch.quantized_forward import build_programs, initial_codes, input_codes
from quant_gru.reference import integer_gru

RESULTS = Path(__file__).resolve().parent / "results" / "quantized_cpu_speed.json"
SHAPES = [(64, 50, 128, 256), (16, 100, 32, 64)]  # (B, T, I, H)


def bench(batch: int, steps: int, inputs: int, hidden: int) -> dict[str, float | int]:
    torch.manual_seed(0)
    model = QuantGRU(inputs, hidden)
    reference = model.to_float()
    x = torch.rand(steps, batch, inputs) * 1.5 - 0.7

    def calibrate() -> None:
        model.calibrating = True
        with torch.no_grad():
            model(x)
        model.calibrating = False

    def quantized() -> None:
        with torch.no_grad():
            model(x)

    def qat_step() -> None:
        out, _ = model.train()(x.requires_grad_())
        out.sum().backward()

    def float_train_step() -> None:
        out, _ = reference(x.requires_grad_())
        out.sum().backward()

    row: dict[str, float | int] = {"B": batch, "T": steps, "I": inputs, "H": hidden}
    with torch.no_grad():
        row["nn_gru_ms"] = median_ms(lambda: reference(x))
        row["float_ms"] = median_ms(lambda: model(x))
    row["calibration_ms"] = median_ms(calibrate)
    model.use_quantization = True
    model.eval()
    row["quantized_ms"] = median_ms(quantized)
    programs = build_programs(model._quantized_model(), model._direction_weights())
    codes, h0 = input_codes(x, programs), initial_codes(None, programs, x)
    row["reference_ms"] = median_ms(
        lambda: integer_gru(programs, codes, h0, None, 1, False), repeats=2
    )
    row["nn_gru_train_step_ms"] = median_ms(float_train_step)
    row["qat_train_step_ms"] = median_ms(qat_step)
    return row


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [bench(*shape) for shape in SHAPES]
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    keys = [k for k in rows[0] if k.endswith("_ms")]
    print("| B, T, I, H | " + " | ".join(k.removesuffix("_ms") + " (ms)" for k in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for row in rows:
        shape = f"{row['B']}, {row['T']}, {row['I']}, {row['H']}"
        print(f"| {shape} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
