"""The demo from data to report: every number the report shows is computed here."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant_gru import QuantGRU
from quant_gru.analysis import operator_sqnr
from quant_gru.demo.classifier import VowelClassifier
from quant_gru.demo.data import Utterances, load_japanese_vowels
from quant_gru.demo.onnx_check import onnx_accuracy
from quant_gru.demo.training import accuracy, calibrate, train
from quant_gru.export import to_onnx

METHODS = ("sqnr", "percentile", "minmax")
WIDTHS = (8, 6, 5, 4, 3)


@dataclass
class Settings:
    out: Path
    hidden_size: int = 64
    epochs: int = 30
    qat_epochs: int = 10
    qat_bits: int = 4
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Results:
    float_accuracy: float = 0.0
    losses: list[float] = field(default_factory=list)
    # method -> bits -> accuracy (percent) after post-training quantization
    ptq: dict[str, dict[int, float]] = field(default_factory=dict)
    qat_bits: int = 4
    qat_before: float = 0.0
    qat_accuracy: float = 0.0
    qat_losses: list[float] = field(default_factory=list)
    # export name -> (PyTorch accuracy, ONNX Runtime accuracy)
    onnx: dict[str, tuple[float, float]] = field(default_factory=dict)
    # label -> operator -> SQNR dB of the (one-layer, one-direction) GRU on the test set
    # (the QAT entry against the float model with the fine-tuned weights)
    operator_sqnr: dict[str, dict[str, float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    sizes: dict[str, int] = field(default_factory=dict)


def run(settings: Settings) -> Results:
    results = Results(device=str(settings.device), qat_bits=settings.qat_bits)
    settings.out.mkdir(parents=True, exist_ok=True)
    clock = _Clock(results)

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    train_set, test_set = load_japanese_vowels()
    results.sizes = {"train": len(train_set), "test": len(test_set)}
    clock.lap("load data")

    model = VowelClassifier(settings.hidden_size).to(settings.device)
    results.losses = train(model, train_set, settings.epochs, 1e-2, generator, "train (float)")
    results.float_accuracy = accuracy(model, test_set)
    clock.lap("train")

    calibrate(model, train_set)
    gru = model.gru
    for method in METHODS:
        results.ptq[method] = {}
        for bits in WIDTHS:
            _quantize(gru, method, bits)
            results.ptq[method][bits] = accuracy(model, test_set)
    gru.use_quantization = False
    clock.lap("post-training quantization")

    qat = copy.deepcopy(model)
    _quantize(qat.gru, "sqnr", settings.qat_bits)
    results.qat_before = accuracy(qat, test_set)
    results.qat_losses = train(
        qat, train_set, settings.qat_epochs, 2e-3, generator, f"QAT ({settings.qat_bits} bits)"
    )
    results.qat_accuracy = accuracy(qat, test_set)
    clock.lap("quantization-aware training")

    packed = _packed(test_set, settings.device)
    for bits in (8, settings.qat_bits):
        _quantize(gru, "sqnr", bits)
        results.operator_sqnr[f"{bits} bits, sqnr"] = operator_sqnr(gru, packed)["l0"]
    results.operator_sqnr[f"{settings.qat_bits} bits, QAT"] = operator_sqnr(qat.gru, packed)["l0"]
    _quantize(gru, "sqnr", 8)
    clock.lap("per-operator SQNR")

    _export(settings, results, model, qat, test_set)
    clock.lap("export and ONNX Runtime")
    return results


def _quantize(gru: QuantGRU, method: str, bits: int) -> None:
    """Every operator at ``bits`` (asymmetric activations), parameters by ``method`` from the
    statistics already collected."""
    gru.set_all_bitwidth(bits, is_symmetric=False)
    gru.calibration_method = method
    gru.finalize_calibration()
    gru.use_quantization = True


def _packed(data: Utterances, device: torch.device) -> torch.nn.utils.rnn.PackedSequence:
    return torch.nn.utils.rnn.pack_padded_sequence(
        data.features.to(device), data.lengths, batch_first=True, enforce_sorted=False
    )


def _export(
    settings: Settings,
    results: Results,
    model: VowelClassifier,
    qat: VowelClassifier,
    test_set: Utterances,
) -> None:
    out = settings.out
    params = out / "quant_params_8bit_sqnr.json"
    model.gru.export_quant_params(params)
    exports = [
        ("float", model, "float", out / "gru_float.onnx"),
        ("QDQ, 8 bits, sqnr", model, "qdq", out / "gru_qdq_8bit.onnx"),
        (f"QDQ, {settings.qat_bits} bits, QAT", qat, "qdq", out / "gru_qdq_qat.onnx"),
    ]
    for label, which, export_format, path in exports:
        which.gru.use_quantization = export_format == "qdq"
        torch_accuracy = accuracy(which, test_set)
        to_onnx(which.gru, path, export_format=export_format)
        results.onnx[label] = (torch_accuracy, onnx_accuracy(which, path, test_set))
        results.files.append(path.name)
    results.files.insert(0, params.name)


class _Clock:
    def __init__(self, results: Results) -> None:
        self.results = results
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.results.seconds[name] = now - self.start
        self.start = now
