"""The quant-gru subcommands as a user runs them: ``python -m quant_gru ...`` in a subprocess on
a tiny model and data set. Outputs are checked against the library called directly (the same
calibration in process, the module's forward, ONNX Runtime) and against numpy.

Each start-up imports torch (about 2 s of one core), so independent commands run concurrently.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from quant_gru import QuantGRU, metrics
from quant_gru.cli import SUBCOMMANDS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INPUT, HIDDEN, LAYERS = 6, 8, 2
BATCH, STEPS = 10, 7
CALIBRATION = ("--bits", "6", "--method", "percentile", "--percentile", "99.5")
CHUNK = 4  # --batch-size: three calibration forwards over the 10 sequences


@dataclass(frozen=True)
class Workspace:
    root: Path
    gru: torch.nn.GRU
    data: torch.Tensor  # batch-first (BATCH, STEPS, INPUT)
    model: Path  # the nn.GRU's state_dict
    data_npy: Path
    data_pt: Path


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "quant_gru", *map(str, args)]


def run_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run ``commands`` concurrently; no CUDA device is visible to them."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    processes = [
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args[3:]} exited {result.returncode}:\n{result.stderr}"
    return result


def fresh_model(workspace: Workspace, batch_first: bool = True) -> QuantGRU:
    model = QuantGRU(INPUT, HIDDEN, LAYERS, bidirectional=True, batch_first=batch_first)
    model.load_state_dict(workspace.gru.state_dict())
    return model.eval()


def quantized(model: QuantGRU, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    model.use_quantization = True
    with torch.no_grad():
        return model(x, h0)[0]


def session_output(path: Path, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = {name: value.numpy() for name, value in feed.items()}
    return torch.from_numpy(session.run(["output"], arrays)[0])


def output_scale(model: QuantGRU) -> float:
    quant = model._quantized_model().quant
    return min(float(q["output.h"].scale.min()) for q in quant)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    gru = torch.nn.GRU(INPUT, HIDDEN, LAYERS, bidirectional=True)
    data = torch.randn(BATCH, STEPS, INPUT)
    torch.save(gru.state_dict(), root / "model.pt")
    np.save(root / "data.npy", data.numpy())
    torch.save(data, root / "data.pt")
    return Workspace(root, gru, data, root / "model.pt", root / "data.npy", root / "data.pt")


@pytest.fixture(scope="module")
def calibration(workspace: Workspace) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = workspace.root / "qp.json"
    options = ["-o", path, "--batch-first", "--batch-size", CHUNK, *CALIBRATION]
    command = cli("calibrate", workspace.model, workspace.data_npy, *options)
    (result,) = run_all([command], workspace.root)
    return result, path


@pytest.fixture(scope="module")
def exports(
    workspace: Workspace, calibration: tuple[subprocess.CompletedProcess[str], Path]
) -> dict[str, Path]:
    """Float (time-major, with an initial-state input, default opset), QDQ (batch-first, opset
    21) and QDQ from a calibrated QuantGRU's state_dict without a quant-params file (with an
    initial-state input, default opset)."""
    _, params = calibration
    model = fresh_model(workspace)
    model.load_quant_params(params)
    calibrated = workspace.root / "calibrated.pt"
    torch.save(model.state_dict(), calibrated)  # a QuantGRU state_dict with its quant state
    paths = {name: workspace.root / f"{name}.onnx" for name in ("float", "qdq", "qdq_state")}
    qdq = ["--format", "qdq", "--batch-first"]
    from_file = [*qdq, "--quant-params", params, "--opset", 21]
    commands = [
        cli("export", workspace.model, "-o", paths["float"], "--with-hx"),
        cli("export", workspace.model, "-o", paths["qdq"], *from_file),
        cli("export", calibrated, "-o", paths["qdq_state"], *qdq, "--with-hx"),
    ]
    for result in run_all(commands, workspace.root):
        assert "wrote" in succeeded(result).stdout
    return paths


def test_calibrate_writes_parameters_that_reproduce_the_same_calibration(
    workspace: Workspace, calibration: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    result, params = calibration
    assert f"wrote {params}" in succeeded(result).stdout
    # The oracle: the same calibration through the library, over the same chunks.
    expected = fresh_model(workspace)
    expected.set_all_bitwidth(6, is_symmetric=False)
    expected.calibrating = True
    with torch.no_grad():
        for chunk in torch.split(workspace.data, CHUNK):
            expected(chunk)
    expected.calibrating = False
    expected.calibration_method = "percentile"
    expected.percentile_value = 99.5
    expected.finalize_calibration()

    loaded = fresh_model(workspace)
    loaded.load_quant_params(params)
    assert loaded.quant_config.spec("output.h").bitwidth == 6
    x = torch.randn(3, 11, INPUT) * 1.2
    actual = quantized(loaded, x)
    assert torch.equal(actual, quantized(expected, x))
    loaded.use_quantization = False
    with torch.no_grad():
        assert not torch.equal(actual, loaded(x)[0])  # quantization is in force


def test_export_float_runs_in_onnxruntime_like_the_module(
    workspace: Workspace, exports: dict[str, Path]
) -> None:
    graph = onnx.load(str(exports["float"]))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    model = fresh_model(workspace, batch_first=False)
    x, hx = torch.randn(9, 4, INPUT), torch.randn(2 * LAYERS, 4, HIDDEN)
    with torch.no_grad():
        expected = model(x, hx)[0]
    actual = session_output(exports["float"], {"input": x, "hx": hx})
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_export_qdq_reproduces_the_quantized_module(
    workspace: Workspace,
    calibration: tuple[subprocess.CompletedProcess[str], Path],
    exports: dict[str, Path],
) -> None:
    model = fresh_model(workspace)
    model.load_quant_params(calibration[1])
    x = torch.randn(5, 12, INPUT)  # batch-first, a length the export never saw
    h0 = torch.randn(2 * LAYERS, 5, HIDDEN) * 0.5
    half_lsb = output_scale(model) / 2  # within half an LSB: the same output code
    cases = [
        ("qdq", 21, {"input": x}, quantized(model, x)),
        ("qdq_state", 17, {"input": x, "h0": h0}, quantized(model, x, h0)),
    ]
    for name, opset, feed, expected in cases:
        graph = onnx.load(str(exports[name]))
        assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        actual = session_output(exports[name], feed)
        torch.testing.assert_close(actual, expected, atol=half_lsb, rtol=0, msg=name)


def test_compare_reports_exact_codes_and_the_metrics_of_the_outputs(
    workspace: Workspace,
    calibration: tuple[subprocess.CompletedProcess[str], Path],
    exports: dict[str, Path],
) -> None:
    report = workspace.root / "compare.json"
    options = ["--onnx", exports["qdq"], "--batch-first", "--json", report]
    command = cli("compare", workspace.model, calibration[1], workspace.data_pt, *options)
    (result,) = run_all([command], workspace.root)
    lines = succeeded(result).stdout.splitlines()
    assert any(line.startswith("ONNX Runtime") for line in lines)
    doc = json.loads(report.read_text())
    rows = doc["results"]
    assert set(rows) == {"quantized", "reference", "onnxruntime"}
    assert rows["quantized"]["max_lsb_vs_reference"] == 0
    assert rows["onnxruntime"]["max_lsb_vs_reference"] == 0
    assert (doc["sequences"], doc["steps"]) == (BATCH, STEPS)

    model = fresh_model(workspace)
    model.load_quant_params(calibration[1])
    with torch.no_grad():
        reference = model(workspace.data)[0].double().numpy()
    approx = quantized(model, workspace.data).double().numpy()
    noise = approx - reference
    assert rows["quantized"]["mse"] == pytest.approx(np.mean(noise**2), rel=1e-9)
    cos = np.sum(approx * reference) / np.linalg.norm(approx) / np.linalg.norm(reference)
    assert rows["quantized"]["cosine"] == pytest.approx(cos, rel=1e-9)
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum(noise**2))
    assert rows["onnxruntime"]["sqnr_db"] == pytest.approx(sqnr, rel=1e-6)
    assert 0 < rows["reference"]["mse"] < 1e-2


def test_bench_times_the_three_forwards(workspace: Workspace) -> None:
    report = workspace.root / "bench.json"
    command = cli(
        "bench", "--shape", 2, 3, 4, 5, "--repeats", 3, "--device", "cpu", "--json", report
    )
    (result,) = run_all([command], workspace.root)
    assert "QuantGRU quantized" in succeeded(result).stdout
    doc = json.loads(report.read_text())
    assert doc["device"] == "cpu"
    assert doc["shape"] == {"B": 2, "T": 3, "I": 4, "H": 5}
    assert set(doc["results"]) == {"nn_gru", "quant_gru_float", "quant_gru_quantized"}
    base = doc["results"]["nn_gru"]["median_ms"]
    for row in doc["results"].values():
        assert len(row["times_ms"]) == 3 and all(t > 0 for t in row["times_ms"])
        assert row["median_ms"] == statistics.median(row["times_ms"])
        assert row["ratio"] == pytest.approx(row["median_ms"] / base)


def test_errors_exit_2_with_a_message_that_names_the_problem(workspace: Workspace) -> None:
    root = workspace.root / "errors"
    root.mkdir()
    np.save(root / "wide.npy", np.zeros((2, 3, INPUT - 1), dtype=np.float32))
    (root / "bad.json").write_text(
        json.dumps({"format": "quant-gru/quant-params", "version": 1, "model": {"input_size": 9}})
    )
    model, data = workspace.model, workspace.data_npy
    cases = [
        (("calibrate", "missing.pt", data, "-o", "qp.json"), ["model file missing.pt", "no such"]),
        (
            ("calibrate", model, "wide.npy", "-o", "qp.json"),
            ["wide.npy", f"expected {INPUT} features", f"found {INPUT - 1}"],
        ),
        (("export", model, "-o", "x.onnx", "--format", "qdq"), ["--quant-params", "required"]),
        (
            ("export", model, "-o", "x.onnx", "--format", "qdq", "--quant-params", "bad.json"),
            ["bad.json", "model.input_size", f"expected {INPUT}", "got 9"],
        ),
        (("bench", "--device", "cuda"), ["--device cuda", "no CUDA device"]),
        (("calibrate", model, data, "-o", "qp.json", "--bogus"), ["unrecognized", "--bogus"]),
    ]
    results = run_all([cli(*args) for args, _ in cases], root)
    for (args, expected), result in zip(cases, results, strict=True):
        assert result.returncode == 2, f"{args}: exit {result.returncode}\n{result.stderr}"
        for text in expected:
            assert text in result.stderr, f"{args}: {text!r} not in {result.stderr!r}"
        if "--bogus" not in args:  # a CLIError: one line, prefixed with the subcommand
            assert result.stderr.startswith(f"quant-gru {args[0]}: error: "), result.stderr
            assert result.stderr.strip().count("\n") == 0, result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["bad.json", "wide.npy"]  # nothing written


def test_help_of_every_subcommand(workspace: Workspace) -> None:
    names = [name for name in SUBCOMMANDS if name != "demo"]
    results = run_all([cli(name, "--help") for name in names], workspace.root)
    for name, result in zip(names, results, strict=True):
        assert succeeded(result).stdout.startswith(f"usage: quant-gru {name} ")


def test_metrics_against_hand_computed_values() -> None:
    signal, noisy = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])
    assert metrics.mse(signal, noisy) == 0.5
    assert metrics.sqnr_db(signal, noisy) == pytest.approx(10 * math.log10(25.0))
    assert metrics.sqnr_db(signal, signal) == math.inf
    assert metrics.cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert metrics.cosine(signal, 2 * signal) == pytest.approx(1.0)
    # Per-feature scales on the last dimension: |0 - 1| / 0.5 = 2 and |2 - 2.5| / 0.1 = 5.
    actual, expected = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 2.5]])
    assert metrics.max_lsb(actual, expected, torch.tensor([0.5, 0.1])) == pytest.approx(5.0)
    assert metrics.max_lsb(actual, expected, 0.5) == 2.0
