"""The demo's report folder: ``report.md`` (the summary tables) and two plots."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from quant_gru.demo.pipeline import METHODS, WIDTHS, Results, Settings
from quant_gru.quantize.program import ACTIVATION_OPERATORS


def summary_table(results: Results) -> str:
    """Accuracy of every variant, as a markdown table (printed and written)."""
    lines = [
        "| model | test accuracy |",
        "|---|---:|",
        f"| float | {results.float_accuracy:.2f} % |",
    ]
    for method in METHODS:
        for bits in WIDTHS:
            lines.append(f"| {bits} bits, {method} | {results.ptq[method][bits]:.2f} % |")
    bits = results.qat_bits
    lines.append(f"| {bits} bits, sqnr, before QAT | {results.qat_before:.2f} % |")
    lines.append(f"| {bits} bits, after QAT | {results.qat_accuracy:.2f} % |")
    for label, (torch_accuracy, ort_accuracy) in results.onnx.items():
        lines.append(
            f"| ONNX Runtime, {label} | {ort_accuracy:.2f} % (PyTorch {torch_accuracy:.2f} %) |"
        )
    return "\n".join(lines)


def write_report(settings: Settings, results: Results) -> list[Path]:
    """Write report.md and the plots into ``settings.out``; returns the paths written."""
    out = settings.out
    plots = [
        _accuracy_plot(out / "accuracy_vs_bits.png", results),
        _sqnr_plot(out / "operator_sqnr.png", results),
    ]
    width_columns = " | ".join(f"{b} bits" for b in WIDTHS)
    ptq_rows = "\n".join(
        f"| {method} | " + " | ".join(f"{results.ptq[method][b]:.2f} %" for b in WIDTHS) + " |"
        for method in METHODS
    )
    labels = list(results.operator_sqnr)
    sqnr_rows = "\n".join(
        f"| `{op}` | "
        + " | ".join(_db(results.operator_sqnr[label][op]) for label in labels)
        + " |"
        for op in ACTIVATION_OPERATORS
    )
    onnx_rows = "\n".join(
        f"| {label} | {t:.2f} % | {o:.2f} % |" for label, (t, o) in results.onnx.items()
    )
    timing = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in results.seconds.items())
    text = f"""# quant-gru demo: Japanese Vowels

A `QuantGRU` classifier (12 cepstral coefficients per frame, {settings.hidden_size} hidden units,
one layer, packed sequences of 7 to 29 frames; a linear layer on the last state) trained in
float on {results.sizes["train"]} utterances of nine speakers and tested on
{results.sizes["test"]}. Seed {settings.seed}, device {results.device}.

## Summary

{summary_table(results)}

## Post-training quantization

Every operator at the same width (asymmetric activations, symmetric per-channel weights);
statistics from one float pass over the training set, parameters by each calibration method.
Float accuracy: {results.float_accuracy:.2f} %.

| method | {width_columns} |
|---|{"---:|" * len(WIDTHS)}
{ptq_rows}

![accuracy against bits](accuracy_vs_bits.png)

## Quantization-aware training

From the {settings.qat_bits}-bit model calibrated with sqnr ({results.qat_before:.2f} %),
{settings.qat_epochs} epochs of training through the integer model (straight-through
gradients): {results.qat_accuracy:.2f} %.

## Per-operator SQNR

SQNR of every operator of the integer model against the float model at the same point, on
the test set (each runs its own recurrence, so an operator inherits the noise of those before
it). The QAT column compares with the float model of the fine-tuned weights.

| operator | {" | ".join(labels)} |
|---|{"---:|" * len(labels)}
{sqnr_rows}

![per-operator SQNR](operator_sqnr.png)

## ONNX Runtime

The GRU exported with `quant_gru.export.to_onnx` and run by ONNX Runtime on the padded test
set; the classifier's head reads the output at each utterance's last frame.

| export | PyTorch | ONNX Runtime |
|---|---:|---:|
{onnx_rows}

Files: {", ".join(f"`{name}`" for name in results.files)}.

Time: {timing}.
"""
    report = out / "report.md"
    report.write_text(text)
    numbers = out / "results.json"
    numbers.write_text(json.dumps(_json_ready(dataclasses.asdict(results)), indent=2) + "\n")
    return [report, numbers, *plots]


def _json_ready(value: object) -> object:
    """Results as JSON: infinite SQNR (an exact operator) as null."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def _db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.1f} dB"


def _accuracy_plot(path: Path, results: Results) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for method, marker in zip(METHODS, "osd", strict=True):
        accuracy = [results.ptq[method][b] for b in WIDTHS]
        axes.plot(WIDTHS, accuracy, marker=marker, label=f"post-training, {method}")
    axes.axhline(results.float_accuracy, color="black", linestyle="--", label="float")
    axes.plot(
        [4],
        [results.qat_accuracy],
        marker="*",
        markersize=14,
        linestyle="none",
        label="4 bits after QAT",
    )
    axes.set_xlabel("bits (every operator)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_xticks(list(WIDTHS))
    axes.set_title("Japanese Vowels: accuracy against bit width")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _sqnr_plot(path: Path, results: Results) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results.operator_sqnr)
    figure, axes = plt.subplots(figsize=(8.0, 4.4))
    width = 0.8 / max(len(labels), 1)
    positions = range(len(ACTIVATION_OPERATORS))
    for k, label in enumerate(labels):
        values = [min(results.operator_sqnr[label][op], 120.0) for op in ACTIVATION_OPERATORS]
        axes.bar([p + k * width for p in positions], values, width=width, label=label)
    axes.set_xticks([p + width * (len(labels) - 1) / 2 for p in positions])
    axes.set_xticklabels(ACTIVATION_OPERATORS, rotation=45, ha="right")
    axes.set_ylabel("SQNR against float (dB)")
    axes.set_title("Per-operator SQNR on the test set")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
