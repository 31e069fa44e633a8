"""Output SQNR of the integer GRU against the float GRU, for every width from 2 to 16 bits.

The seed's test setting: I=128, H=256, B=64, T=50, inputs uniform in [-0.7, 0.8], MinMax
calibration on two batches (examples/calibration_methods.py compares the methods),
evaluation on a third. Every operator at the same width
(asymmetric activations, symmetric per-channel weights), float and power-of-two scales.
Writes docs/results/sqnr_vs_bitwidth.json and prints a markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from quant_gru import QuantGRU

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "sqnr_vs_bitwidth.json"


def batch(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(50, 64, 128, generator=generator) * 1.5 - 0.7


def measure(bits: int, scale_type: str) -> dict[str, float]:
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    model = QuantGRU(128, 256)
    config = model.quant_config.with_all_bitwidth(bits, is_symmetric=False)
    model.quant_config = dataclasses.replace(config, scale_type=scale_type)
    model.calibration_method = "minmax"
    model.calibrating = True
    with torch.no_grad():
        model(batch(data))
        model(batch(data))
        model.calibrating = False
        x = batch(data)
        reference, _ = model(x)
        model.use_quantization = True
        quantized, _ = model(x)
    noise = (quantized - reference).double().square().sum().item()
    signal = reference.double().square().sum().item()
    cos = torch.nn.functional.cosine_similarity(
        quantized.double().flatten(), reference.double().flatten(), dim=0
    )
    return {
        "bits": bits,
        "scale_type": scale_type,
        "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
        "cosine": cos.item(),
        "mse": noise / reference.numel(),
    }


def main() -> None:
    rows = [measure(bits, kind) for bits in range(2, 17) for kind in ("float", "pot")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print("| bits | SQNR float (dB) | cosine | MSE | SQNR pot (dB) | cosine | MSE |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    by_key = {(r["bits"], r["scale_type"]): r for r in rows}
    for bits in range(2, 17):
        f, p = by_key[bits, "float"], by_key[bits, "pot"]
        print(
            f"| {bits} | {f['sqnr_db']:.1f} | {f['cosine']:.5f} | {f['mse']:.2e} "
            f"| {p['sqnr_db']:.1f} | {p['cosine']:.5f} | {p['mse']:.2e} |"
        )


if __name__ == "__main__":
    main()
