"""Bit-exactness: the plain-PyTorch quantized path against the integer reference.

Random configurations of every kind the config allows (widths 1..32 per operator, symmetry,
signedness, weight granularity, scale type), shapes, layers, directions, sequence lengths and
initial states: every code of every operator at every step must agree.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant_gru import QuantGRU
from quant_gru.kernels.torch.quant_gru import quantized_gru
from quant_gru.kernels.torch.quantized_forward import build_programs, initial_codes, input_codes
from quant_gru.quantize.scales import dequantize
from quant_gru.reference import integer_gru

from strategies import quant_configs
from tolerance import assert_codes_equal


@st.composite
def cases(draw: st.DrawFn) -> dict:
    batch, steps = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lengths = None
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    return {
        "config": draw(quant_configs()),
        "input_size": draw(st.integers(1, 9)),
        "hidden_size": draw(st.integers(1, 9)),
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "batch": batch,
        "steps": steps,
        "lengths": lengths,
        "with_hx": draw(st.booleans()),
        "input_scale": draw(st.sampled_from([0.01, 1.0, 30.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def calibrated_case(
    case: dict,
) -> tuple[QuantGRU, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The case's model, calibrated and quantized by its config (on the CPU), and its input,
    initial state and lengths."""
    torch.manual_seed(case["seed"])
    model = QuantGRU(
        case["input_size"],
        case["hidden_size"],
        num_layers=case["num_layers"],
        bidirectional=case["bidirectional"],
        bias=case["bias"],
    )
    states = case["num_layers"] * (2 if case["bidirectional"] else 1)
    shape = (case["steps"], case["batch"])
    scale = case["input_scale"]
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(*shape, case["input_size"]) * scale)
        model(torch.randn(*shape, case["input_size"]) * scale)
    model.calibrating = False
    model.calibration_method = "minmax"  # where parameters come from does not matter here
    model.quant_config = case["config"]
    model.finalize_calibration()

    x = torch.randn(*shape, case["input_size"]) * scale * 1.3  # beyond the calibrated range too
    hx = torch.randn(states, case["batch"], case["hidden_size"]) if case["with_hx"] else None
    lengths = torch.tensor(case["lengths"]) if case["lengths"] is not None else None
    return model, x, hx, lengths


def run_both(case: dict, device: torch.device, realization=quantized_gru):
    """The reference's codes and traces, and those of ``realization`` on ``device``."""
    model, x, hx, lengths = calibrated_case(case)
    programs = build_programs(model._quantized_model(), model._direction_weights())
    x_codes = input_codes(x, programs)
    h0_codes = initial_codes(hx, programs, x)
    args = (case["num_layers"], case["bidirectional"])
    expected = integer_gru(programs, x_codes, h0_codes, lengths, *args, trace=True)
    actual = realization(
        programs,
        x_codes.to(device),
        h0_codes.to(device),
        None if lengths is None else lengths.to(device),
        *args,
        trace=True,
    )
    return model, x, hx, lengths, programs, expected, actual


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_torch_path_codes_equal_reference(case: dict, device: torch.device) -> None:
    _, _, _, _, _, expected, actual = run_both(case, device)
    assert_same_run(actual, expected)


def assert_same_run(actual: tuple, expected: tuple) -> None:
    """Output codes, h_n codes and every traced operator's codes identical."""
    assert_codes_equal(actual[0], expected[0], "output codes")
    assert_codes_equal(actual[1], expected[1], "h_n codes")
    for index, (want, got) in enumerate(zip(expected[2], actual[2], strict=True)):
        assert want.keys() == got.keys()
        for name in want:
            assert_codes_equal(got[name], want[name], f"pair {index} {name}")


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_module_output_is_the_dequantized_reference(case: dict, device: torch.device) -> None:
    """The module's quantized forward (eval and training, which records the STE graph) returns
    exactly the reference codes, dequantized."""
    case = {**case, "lengths": None}
    model, x, hx, _, programs, expected, _ = run_both(case, torch.device("cpu"))
    num_dirs = 2 if case["bidirectional"] else 1
    hidden = case["hidden_size"]
    blocks = []
    for d, program in enumerate(programs[-num_dirs:]):
        fmt = program.formats["output.h"]
        codes = expected[0][..., d * hidden : (d + 1) * hidden]
        blocks.append(dequantize(codes, fmt.scale, fmt.zero_point))
    want = torch.cat(blocks, dim=-1).float().to(device)
    model.use_quantization = True
    model.to(device)
    x = x.to(device)
    hx = None if hx is None else hx.to(device)
    with torch.no_grad():
        out, _ = model.eval()(x, hx)
    assert torch.equal(out, want)
    trained, _ = model.train()(x.requires_grad_(), hx)
    assert torch.equal(trained.detach(), want)
