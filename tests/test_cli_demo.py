"""``quant-gru demo`` as a user runs it (a subprocess): the report folder, the accuracies the
demo promises on Japanese Vowels, ONNX Runtime's agreement, and its error paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aeon")
pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")

PNG = b"\x89PNG\r\n\x1a\n"


def quant_gru(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quant_gru", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The default demo, once for the module (about half a minute on two cores)."""
    out = tmp_path_factory.mktemp("demo") / "report"
    done = quant_gru("demo", "--out", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def test_demo_writes_the_report(demo_report: tuple[Path, str]) -> None:
    out, stdout = demo_report
    for name in ("report.md", "results.json", "quant_params_8bit_sqnr.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("accuracy_vs_bits.png", "operator_sqnr.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    for name in ("gru_float.onnx", "gru_qdq_8bit.onnx", "gru_qdq_qat.onnx"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![accuracy against bits](accuracy_vs_bits.png)" in report
    assert "| `op.new_contrib` |" in report  # the per-operator table
    assert "| float |" in stdout and "after QAT" in stdout  # the summary table is printed


def test_demo_accuracy(demo_report: tuple[Path, str]) -> None:
    """The issue's bars: float >= 95 %, 8-bit post-training (sqnr) within 1 point of float,
    4 bits after QAT within 3, ONNX Runtime's QDQ accuracy equal to PyTorch's within 0.5."""
    results = json.loads((demo_report[0] / "results.json").read_text())
    float_accuracy = results["float_accuracy"]
    assert float_accuracy >= 95
    assert results["ptq"]["sqnr"]["8"] >= float_accuracy - 1
    assert results["qat_accuracy"] >= float_accuracy - 3
    for label, (torch_accuracy, ort_accuracy) in results["onnx"].items():
        assert abs(torch_accuracy - ort_accuracy) <= 0.5, label
    qdq = [label for label in results["onnx"] if label.startswith("QDQ")]
    assert len(qdq) == 2


def test_demo_is_reproducible(tmp_path: Path, demo_report: tuple[Path, str]) -> None:
    """The same seed gives the same numbers (a shorter run against itself)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = quant_gru("demo", "-o", str(out), "--epochs", "2", "--qat-epochs", "1")
        assert done.returncode == 0, done.stderr[-2000:]
        numbers = json.loads((out / "results.json").read_text())
        runs.append({k: v for k, v in numbers.items() if k != "seconds"})
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--hidden-size", "-3"], "--hidden-size must be at least 1, got -3"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_demo_bad_arguments_exit_2(args: list[str], message: str) -> None:
    done = quant_gru("demo", *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_demo_refuses_a_file_as_report_folder(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    done = quant_gru("demo", "--out", str(target))
    assert done.returncode == 2
    assert f"--out {target} exists and is not a folder" in done.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message given without a GPU"
)
def test_demo_cuda_without_a_gpu_exit_2(tmp_path: Path) -> None:
    done = quant_gru("demo", "--out", str(tmp_path / "r"), "--device", "cuda")
    assert done.returncode == 2
    assert "no CUDA device is available" in done.stderr


def test_help_and_default_subcommand() -> None:
    done = quant_gru("--help")
    assert done.returncode == 0
    for name in ("demo", "calibrate", "export", "compare", "bench"):
        assert name in done.stdout
    done = quant_gru("--epochs", "0")  # no subcommand: the demo's options
    assert done.returncode == 2 and "quant-gru demo: error: --epochs" in done.stderr
    assert quant_gru("demo", "--help").returncode == 0
