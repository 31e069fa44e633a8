"""How far ONNX Runtime's result of the QDQ export is from the integer reference, in LSB of the
output scale, for both arithmetics of the graph and both ONNX Runtime optimization levels.

Setting: the seed's shapes (I=128, H=256), one layer and a 2-layer bidirectional GRU, inputs
uniform in [-0.7, 0.8], MinMax calibration on two batches of (T=50, B=16), evaluation on a
batch of another shape (T=37, B=5) with an initial state: dynamic batch and length at work.
Every operator at the same width (asymmetric activations, symmetric per-channel weights).
Writes docs/results/onnx_lsb.json and prints a markdown table.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from quant_gru import QuantGRU
from quant_gru.analysis import reference_output
from quant_gru.export.onnx_qdq import export_qdq_onnx

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "onnx_lsb.json"
MODELS = {"1 layer": (1, False), "2 layers, bidirectional": (2, True)}
LEVELS = {"basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}


def inputs(steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(steps, batch, 128, generator=generator) * 1.5 - 0.7


def calibrated(layers: int, bidirectional: bool, bits: int) -> QuantGRU:
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    model = QuantGRU(128, 256, num_layers=layers, bidirectional=bidirectional)
    model.set_all_bitwidth(bits, is_symmetric=False)
    model.calibration_method = "minmax"
    model.calibrating = True
    with torch.no_grad():
        for _ in range(2):
            model(inputs(50, 16, data))
    model.calibrating = False
    model.finalize_calibration()
    return model


def lsb_distances(model: QuantGRU, path: Path, level: str) -> np.ndarray:
    data = torch.Generator().manual_seed(2)
    x = inputs(37, 5, data)
    states = model.num_layers * model.num_directions
    h0 = torch.rand(states, 5, 256, generator=data) - 0.5
    reference = reference_output(model, x, h0)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run(None, {"input": x.numpy(), "h0": h0.numpy()})[0])
    # Whole LSB: an exactly matching code differs by float32 rounding only (< 0.01 LSB here).
    distance = (actual.double() - reference.dequantized()).abs() / reference.scale
    return torch.round(distance).numpy()


def measure(model_name: str, bits: int, arithmetic: str, level: str) -> dict[str, object]:
    layers, bidirectional = MODELS[model_name]
    model = calibrated(layers, bidirectional, bits)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "qdq.onnx"
        export_qdq_onnx(model, path, arithmetic=arithmetic)
        distance = lsb_distances(model, path, level)
    counts = {str(k): float(np.mean(distance == k)) for k in range(4)}
    return {
        "model": model_name,
        "bits": bits,
        "arithmetic": arithmetic,
        "ort_optimization": level,
        "elements": int(distance.size),
        "fraction_at_lsb": counts,
        "fraction_above_3": float(np.mean(distance > 3)),
        "within_2": float(np.mean(distance <= 2)),
        "worst_lsb": float(distance.max()),
    }


def main() -> None:
    rows = [
        measure(model_name, bits, arithmetic, level)
        for model_name in MODELS
        for arithmetic in ("integer", "float")
        for bits in (4, 8, 12, 16, 20, 24)
        for level in LEVELS
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | arithmetic | bits | ORT opt. | 0 LSB | 1 | 2 | 3 | > 3 | within 2 | worst |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        at = row["fraction_at_lsb"]
        assert isinstance(at, dict)
        cells = " | ".join(f"{100 * at[str(k)]:.2f} %" for k in range(4))
        print(
            f"| {row['model']} | {row['arithmetic']} | {row['bits']} | {row['ort_optimization']} "
            f"| {cells} | {100 * float(row['fraction_above_3']):.2f} % "  # type: ignore[arg-type]
            f"| {100 * float(row['within_2']):.2f} % | {row['worst_lsb']:.0f} |"  # type: ignore[arg-type]
        )


if __name__ == "__main__":
    main()
