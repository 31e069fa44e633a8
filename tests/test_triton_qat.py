"""QAT on the Triton kernels (kernels/triton/integer_qat.py) against the plain path's graph of
straight-through hooks (kernels/torch/quantized_forward.py), which test_qat_gradients.py holds
to a hand-written backward.

Forward values: the integer model's on both, to the bit. Gradients, the ratio-to-reference
rung: the kernels' error against the graph run in float64 (same codes) is at most twice the
graph's own error at the model's precision. Inputs are wider than the calibration data, so
points saturate and the masks matter.

Without a GPU the kernels run under TRITON_INTERPRET=1 at small sizes (one hidden tile a batch
tile); on a GPU, at sizes with several.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from quant_gru import QuantGRU

from tolerance import assert_ratio_to_reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru.kernels.triton import integer_gru  # noqa: E402

GPU = DEVICE.type == "cuda"
# The float32 oracle can be exact on a gradient; then an error this small is accepted.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def calibrated(
    input_size: int, hidden: int, layers: int, bidirectional: bool, bits: int, dropout: float
) -> QuantGRU:
    torch.manual_seed(0)
    model = QuantGRU(
        input_size, hidden, num_layers=layers, bidirectional=bidirectional, dropout=dropout
    )
    if bits != 8:
        model.set_all_bitwidth(bits, is_symmetric=False)
    model = model.to(DEVICE)
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(6, 3, input_size, device=DEVICE))
    model.calibrating = False
    model.use_quantization = True
    return model.train()


def run(model: QuantGRU, backend: str, dtype: torch.dtype, inputs: dict) -> dict:
    """Outputs and every gradient of Σ out * d_out + Σ h_n * d_hn, as float64 on the CPU
    (the same dropout masks on every run)."""
    model = copy.deepcopy(model).to(dtype)
    torch.manual_seed(5)
    model.backend = backend
    x = inputs["x"].to(dtype, copy=True).requires_grad_()
    hx = None if inputs["hx"] is None else inputs["hx"].to(dtype, copy=True).requires_grad_()
    source = x
    if inputs["lengths"] is not None:
        source = torch.nn.utils.rnn.pack_padded_sequence(x, inputs["lengths"], enforce_sorted=False)
    out, h_n = model(source, hx)
    if inputs["lengths"] is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])
    loss = (out * inputs["d_out"].to(dtype)).sum() + (h_n * inputs["d_hn"].to(dtype)).sum()
    loss.backward()
    results = {"out": out, "h_n": h_n, "grad x": x.grad}
    if hx is not None:
        results["grad hx"] = hx.grad
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    return {name: value.detach().double().cpu() for name, value in results.items()}


CASES = {
    "one layer, hx": dict(layers=1, bidirectional=False, lengths=False, hx=True, bits=8),
    "two layers, both directions": dict(
        layers=2, bidirectional=True, lengths=False, hx=False, bits=8
    ),
    "packed, hx": dict(layers=2, bidirectional=True, lengths=True, hx=True, bits=8),
    "4-bit": dict(layers=1, bidirectional=True, lengths=False, hx=True, bits=4),
    "16-bit": dict(layers=1, bidirectional=False, lengths=False, hx=True, bits=16),
    "three layers, dropout": dict(
        layers=3, bidirectional=False, lengths=False, hx=True, bits=8, dropout=0.4
    ),
    "packed, dropout, no hx": dict(
        layers=2, bidirectional=True, lengths=True, hx=False, bits=8, dropout=0.4
    ),
}


@pytest.mark.parametrize(
    ("case", "dtype", "kernel"),
    [(case, torch.float32, "planned") for case in CASES]
    + [("one layer, hx", torch.bfloat16, kernel) for kernel in ("planned", "tiles")]
    + [("one layer, hx", torch.float16, "planned")]
    + [(case, torch.float32, "tiles") for case in ("packed, hx", "4-bit")]
    + [("packed, hx", torch.float32, "tiles, a product a gate")],
    ids=lambda value: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None,
)
def test_qat_on_the_kernels_matches_the_graph(
    case: str, dtype: torch.dtype, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kernel``: as planned (small batches of one-digit models on the row kernel), or every
    recurrence on the tile kernel (with its products one a gate: integer_plans.merged_gates)."""
    if kernel.startswith("tiles"):
        monkeypatch.setattr(integer_gru, "row_plan_for", lambda *arguments: None)
    if kernel.endswith("a gate"):
        monkeypatch.setattr(integer_gru, "merged_gates", lambda plan, save: False)
    spec = CASES[case]
    input_size, hidden, batch, steps = (24, 48, 5, 9) if GPU else (5, 7, 3, 4)
    model = calibrated(
        input_size, hidden, spec["layers"], spec["bidirectional"], spec["bits"],
        spec.get("dropout", 0.0),
    )  # fmt: skip
    directions = 2 if spec["bidirectional"] else 1
    generator = torch.Generator().manual_seed(1)
    states = (spec["layers"] * directions, batch, hidden)
    inputs = {
        "x": torch.randn(steps, batch, input_size, generator=generator).to(DEVICE) * 1.8,
        "hx": torch.randn(*states, generator=generator).to(DEVICE) * 0.8 if spec["hx"] else None,
        "lengths": torch.tensor([steps, 1, steps - 1, 2, 3][:batch]) if spec["lengths"] else None,
        "d_out": torch.randn(steps, batch, directions * hidden, generator=generator).to(DEVICE),
        "d_hn": torch.randn(*states, generator=generator).to(DEVICE),
    }
    exact = run(model, "torch", torch.float64, inputs)
    oracle = run(model, "torch", dtype, inputs)
    actual = run(model, "triton", dtype, inputs)
    assert torch.equal(actual["out"], oracle["out"])
    assert torch.equal(actual["h_n"], oracle["h_n"])
    for name in exact:
        if name.startswith("grad"):
            assert_ratio_to_reference(
                actual[name], oracle[name], exact[name], f"{case}: {name}", FLOOR[dtype]
            )


def test_only_the_requested_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the input and some weights frozen and hx given without a gradient, the kernels'
    backward returns the gradients asked for, each equal to the bit to the same gradient when
    everything is asked for (the backward leaves the others out)."""
    model = calibrated(5, 7, 1, False, 8, 0.0)
    model.backend = "triton"
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 5, generator=generator) * 1.8).to(DEVICE)
    hx = (torch.randn(1, 3, 7, generator=generator) * 0.8).to(DEVICE)

    def gradients(frozen: tuple[str, ...], x_grad: bool) -> dict:
        model.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen)
        source = x.clone().requires_grad_(x_grad)
        out, h_n = model(source, hx)
        (out.sum() + h_n.sum()).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        return {"x": source.grad, **grads}

    every = gradients((), True)
    some = gradients(("weight_ih_l0", "bias_hh_l0"), False)
    for name, grad in some.items():
        if name in ("x", "weight_ih_l0", "bias_hh_l0"):
            assert grad is None, name
        else:
            assert grad is not None and torch.equal(grad, every[name]), name


@pytest.mark.parametrize(
    ("scale", "zero_point", "qmin", "qmax"),
    [
        (0.0123, 3, -128, 127),
        (2.0**-7, 0, 0, 255),
        (0.37, -2, -8, 7),
        (1e-30, 0, -(2**31), 2**31 - 1),
    ],
)
def test_mask_thresholds_equal_the_rounding_rule(
    scale: float, zero_point: int, qmin: int, qmax: int
) -> None:
    """Two float32 comparisons give quantized_forward.point_mask's clamp mask for every
    float32 value, the neighbours of each threshold included."""
    from quant_gru.kernels.torch.quantized_forward import point_mask
    from quant_gru.kernels.triton.qat_save import point_thresholds
    from quant_gru.quantize.program import ActivationFormat

    scale = float(torch.tensor(scale, dtype=torch.float32))  # scales are float32 values
    fmt = ActivationFormat(scale, zero_point, qmin, qmax)
    low, high = point_thresholds(fmt)
    edges = torch.tensor([low, high], dtype=torch.float32)
    values = torch.cat(
        [
            edges,
            torch.nextafter(edges, torch.full_like(edges, float("inf"))),
            torch.nextafter(edges, torch.full_like(edges, -float("inf"))),
            torch.randn(1000) * scale * (qmax - qmin),
        ]
    )
    inside = (values >= low) & (values < high)
    assert torch.equal(inside.float(), point_mask(values, fmt))
    assert inside[0] and not inside[1]  # low is inside, high is not
