"""Quantized GRU speed on the GPU: QuantGRU's 8-bit integer model (the Triton integer kernel)
beside our float kernels and cuDNN's nn.GRU, in one run.

Shapes (B, T, I, H) of gpu_float_speed.py, one layer. The model is calibrated on one random
batch with the default 8-bit configuration. Inference is forward under no_grad, eagerly (one
call at a time, host costs included); QAT training is forward plus backward with
use_quantization on (straight-through gradients; in float32 and in TF32; --no-qat skips it),
with the weights fixed and with every weight changed in place after each step (as an
optimizer would: QAT then makes the weights' integer programs again every step).
Beside them: our float inference and training in float32 and TF32 (the faster of the two is
the fp32 family's), cuDNN's best, and the seed's 8-bit inference from DESIGN.md §4 (the same
H100 model). Median of CUDA-event timings after warm-up, in alternation, and the host's time
to queue each of our calls from an idle GPU (``*_host_ms``: where it reaches the event timing,
the call is bound by the host); peak memory above the inputs and weights. Writes
benchmarks/results/gpu_integer_speed.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from eager_host_time import host_us
from gpu_float_speed import SHAPES, paired_ms, peak_mb

from quant_gru import QuantGRU

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_integer_speed.json"
# The seed's 8-bit inference (ms), DESIGN.md §4, by (B, T, I, H).
SEED_INT8_MS = {
    (1, 1000, 256, 256): 16.5,
    (16, 1000, 128, 128): 18.4,
    (64, 100, 256, 256): 2.70,
    (64, 512, 512, 512): 12.7,
    (256, 200, 1024, 1024): 10.5,
}


def host_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median host time (ms) of ``fn`` from an idle GPU (eager_host_time.host_us): the time to
    queue its work; where it reaches the event timing, the call is bound by the host."""
    return host_us(fn, repeats) / 1e3


def _calibrated(shape: tuple[int, int, int, int]) -> QuantGRU:
    batch, steps, inputs, hidden = shape
    torch.manual_seed(0)
    model = QuantGRU(inputs, hidden).cuda()
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(steps, batch, inputs, device="cuda"))
    model.calibrating = False
    model.finalize_calibration()
    return model


def _infer(model: QuantGRU, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def _train(model: QuantGRU, x: torch.Tensor, update: bool = False) -> Callable[[], object]:
    """A training step; ``update``: then every weight changes in place, as an optimizer's
    step does (for QAT, the weights' integer programs are made again every step)."""
    parameters = list(model.parameters())

    def run() -> object:
        out, _ = model(x.requires_grad_())
        out.sum().backward()
        if update:
            with torch.no_grad():
                torch._foreach_add_(parameters, 0.0)
        return out

    return run


def _quantized(model: QuantGRU, on: bool, tf32: bool) -> None:
    model.use_quantization = on
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def measure(shape: tuple[int, int, int, int], repeats: int, qat: bool) -> dict:
    batch, steps, inputs, _ = shape
    model = _calibrated(shape)
    cudnn = model.to_float().cuda()
    x = torch.randn(steps, batch, inputs, device="cuda")
    row: dict = {"shape": list(shape), "seed_int8_infer_ms": SEED_INT8_MS.get(shape)}
    for tf32 in (False, True):
        name = "tf32" if tf32 else "fp32"
        _quantized(model, False, tf32)
        float_infer, cudnn_infer = paired_ms(_infer(model, x), _infer(cudnn, x), repeats)
        float_train, cudnn_train = paired_ms(_train(model, x), _train(cudnn, x), repeats)
        row[name] = {
            "ours_infer_ms": float_infer,
            "cudnn_infer_ms": cudnn_infer,
            "ours_train_ms": float_train,
            "cudnn_train_ms": cudnn_train,
            "ours_infer_host_ms": host_ms(_infer(model, x), repeats),
            "ours_train_host_ms": host_ms(_train(model, x), repeats),
        }
    _quantized(model, True, False)
    int_infer, _ = paired_ms(_infer(model, x), _infer(cudnn, x), repeats)
    row["int8"] = {
        "infer_ms": int_infer,
        "infer_host_ms": host_ms(_infer(model, x), repeats),
        "infer_peak_mb": peak_mb(_infer(model, x)),
    }
    if qat:
        for tf32 in (False, True):
            name = "tf32" if tf32 else "fp32"
            _quantized(model, True, tf32)
            qat_train, _ = paired_ms(_train(model, x), _train(cudnn, x), repeats)
            row["int8"][f"qat_train_{name}_ms"] = qat_train
            row["int8"][f"qat_train_host_{name}_ms"] = host_ms(_train(model, x), repeats)
            _quantized(model, False, tf32)
            float_step, _ = paired_ms(_train(model, x, True), _train(cudnn, x, True), repeats)
            _quantized(model, True, tf32)
            qat_step, _ = paired_ms(_train(model, x, True), _train(cudnn, x, True), repeats)
            row["int8"][f"qat_updated_{name}_ms"] = qat_step
            row["int8"][f"qat_updated_host_{name}_ms"] = host_ms(_train(model, x, True), repeats)
            row[name]["ours_train_updated_ms"] = float_step
        row["int8"]["qat_train_peak_mb"] = peak_mb(_train(model, x))
    _quantized(model, False, False)  # torch's TF32 flags back to their defaults
    return row


def summary(row: dict) -> str:
    ours_float = min(row["fp32"]["ours_infer_ms"], row["tf32"]["ours_infer_ms"])
    float_train = min(row["fp32"]["ours_train_ms"], row["tf32"]["ours_train_ms"])
    int8 = row["int8"]
    seed = row["seed_int8_infer_ms"]
    text = (
        f"{tuple(row['shape'])}: int8 inference {int8['infer_ms']:.2f} ms "
        f"({ours_float / int8['infer_ms']:.2f}x our float {ours_float:.2f}; "
        f"{seed / int8['infer_ms'] if seed else float('nan'):.1f}x the seed's {seed}; "
        f"host {int8['infer_host_ms']:.2f} ms against float32's "
        f"{row['fp32']['ours_infer_host_ms']:.2f})"
    )
    if "qat_train_tf32_ms" in int8:
        qat = min(int8["qat_train_fp32_ms"], int8["qat_train_tf32_ms"])
        updated = min(int8["qat_updated_fp32_ms"], int8["qat_updated_tf32_ms"])
        float_updated = min(row[p]["ours_train_updated_ms"] for p in ("fp32", "tf32"))
        text += (
            f"; QAT step {qat:.2f} ms ({qat / float_train:.2f}x our float step "
            f"{float_train:.2f}; float32 {int8['qat_train_fp32_ms']:.2f} vs "
            f"{row['fp32']['ours_train_ms']:.2f}, TF32 {int8['qat_train_tf32_ms']:.2f} vs "
            f"{row['tf32']['ours_train_ms']:.2f}); weights updated every step: "
            f"{updated:.2f} ms ({updated / float_updated:.2f}x our float {float_updated:.2f}); "
            f"TF32 host a step: QAT {int8['qat_train_host_tf32_ms']:.2f}, updated "
            f"{int8['qat_updated_host_tf32_ms']:.2f}, float {row['tf32']['ours_train_host_ms']:.2f}"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--shapes",
        type=lambda text: [SHAPES[int(i)] for i in text.split(",")],
        default=[s for s in SHAPES if s[4] == 1 and not s[5]],
        help="comma-separated indices into gpu_float_speed.SHAPES (default: the one-layer ones)",
    )
    parser.add_argument(
        "--no-qat", dest="qat", action="store_false", help="skip the QAT training step"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows: list[dict] = []
    document = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "qat": args.qat,
        "rows": rows,
    }
    for shape in args.shapes:
        rows.append(measure(tuple(shape[:4]), args.repeats, args.qat))
        print(summary(rows[-1]), flush=True)
        # Written after every shape: a run cut short keeps the rows it measured.
        args.out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
