"""The opt-in autotuner of the tile plans (kernels/triton/tuning.py): which plan it keeps,
when it measures, the candidates it measures; on a GPU, training through tuned plans."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru import QuantGRU  # noqa: E402
from quant_gru.kernels.triton import plans, tuning  # noqa: E402
from quant_gru.kernels.triton.plans import Plan  # noqa: E402

from tolerance import assert_float_conformant, assert_ratio_to_reference  # noqa: E402

FAST = Plan(False, 32, 8, 64, 4)
DEFAULT = Plan(False, 16, 16, 64, 4)
SLOW = Plan(False, 64, 32, 64, 4)


@pytest.fixture(autouse=True)
def forget_measurements():
    tuning.chosen.clear()
    yield
    tuning.chosen.clear()


def fake_timing(times: dict[Plan, float], ran: list[Plan]):
    """``run`` that records each plan it is given, and a timer reading the plan's time."""

    def run(plan: Plan) -> None:
        ran.append(plan)

    def timer(call) -> float:
        call()
        return times[ran[-1]]

    return run, timer


def test_keeps_the_fastest_plan_and_remembers_it() -> None:
    ran: list[Plan] = []
    run, timer = fake_timing({DEFAULT: 2.0, FAST: 1.0, SLOW: 3.0}, ran)
    assert tuning.tuned("problem", DEFAULT, lambda: [SLOW, DEFAULT, FAST], run, timer) == FAST
    assert ran == [DEFAULT, SLOW, FAST]  # the default first, each plan once
    assert tuning.tuned("problem", DEFAULT, lambda: [SLOW, DEFAULT, FAST], run, timer) == FAST
    assert len(ran) == 3  # remembered, not measured again
    # Another problem is measured on its own; a tie keeps the default.
    ran.clear()
    run, timer = fake_timing({DEFAULT: 1.0, FAST: 1.0}, ran)
    assert tuning.tuned("other", DEFAULT, lambda: [FAST], run, timer) == DEFAULT


def test_takes_the_default_while_a_graph_is_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ran: list[Plan] = []
    run, timer = fake_timing({DEFAULT: 2.0, FAST: 1.0}, ran)
    assert tuning.tuned("problem", DEFAULT, lambda: [FAST], run, timer) == DEFAULT
    assert ran == [] and "problem" not in tuning.chosen  # measured after the capture


def test_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tuning.ENVIRONMENT, raising=False)
    assert not tuning.enabled()
    monkeypatch.setenv(tuning.ENVIRONMENT, "1")
    assert tuning.enabled()
    monkeypatch.setenv(tuning.ENVIRONMENT, "yes")
    with pytest.raises(ValueError, match="QUANT_GRU_AUTOTUNE must be '0' or '1', got 'yes'"):
        tuning.enabled()


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize(
    ("batch", "hidden", "element_size"),
    [
        (64, 256, 4),
        (64, 256, 2),
        (64, 512, 4),
        (256, 1024, 2),
        (256, 1024, 4),
        (20, 37, 4),
        (1000, 128, 4),
    ],
)
def test_candidates_fit_on_the_gpu(
    monkeypatch: pytest.MonkeyPatch, backward: bool, batch: int, hidden: int, element_size: int
) -> None:
    """Every candidate's grid fits on the SMs at once (its programs wait for each other). A
    forward candidate keeps R's slice on chip exactly when it fits RESIDENT_BYTES, taking the
    state in one chunk then for 16-bit types only; a backward one keeps it on chip, in one
    chunk, exactly when it fits and the type is 16-bit, and large float32 backward tiles are
    tried on 8 warps, and on 4 in chunks of 32. Each tile runs on the rule's warps and on 4."""
    sms = 132
    monkeypatch.setattr(plans, "resident_programs", lambda _device: sms)
    full = plans.padded(hidden)
    candidates = plans.tile_candidates(batch, hidden, element_size, DEVICE, backward)
    assert candidates, "no candidate"
    assert len(set(candidates)) == len(candidates)
    for plan in candidates:
        rows, units = plan.grid(batch, hidden)
        assert rows * units <= sms and plan.block_h < full and not plan.rows
        fits = 3 * plan.block_h * full * element_size <= plans.RESIDENT_BYTES
        if backward:
            on_chip = element_size < 4 and fits
            assert plan.resident == on_chip
            large = element_size == 4 and plan.block_b * plan.block_h >= plans.LARGE_TILE
            chunks = {min(plans.CHUNK, full), 32} if large else {min(plans.CHUNK, full)}
            assert plan.block_k in ({full} if on_chip else chunks)
        else:
            assert plan.resident == fits
            one_chunk = fits and element_size < 4
            assert plan.block_k == (full if one_chunk else min(plans.CHUNK, full))
        rule_warps = plans._tile_warps(plan.block_b, plan.block_h, element_size, backward)
        assert plan.warps in {rule_warps, 4}
    # Every tile is tried on 4 warps, and on the rule's warps where those differ.
    tried = {(p.block_b, p.block_h, p.warps) for p in candidates}
    for block_b, block_h, _ in tried:
        rule_warps = plans._tile_warps(block_b, block_h, element_size, backward)
        assert {(block_b, block_h, 4), (block_b, block_h, rule_warps)} <= tried


@pytest.mark.parametrize(
    ("batch", "hidden", "backward", "element_size", "tiles", "chunk", "warps"),
    [
        (256, 1024, False, 4, (64, 32), 64, 8),
        (256, 1024, True, 4, (32, 64), 64, 8),
        (128, 1024, True, 4, (32, 32), 64, 4),
        (256, 512, True, 4, (32, 32), 64, 4),
        (64, 512, False, 4, (32, 8), 64, 4),
        (64, 512, True, 4, (16, 16), 64, 2),
        (64, 256, True, 4, (16, 16), 64, 2),
        (64, 192, True, 4, (16, 16), 64, 2),
        (64, 256, False, 2, (16, 32), 256, 4),
        (128, 256, False, 2, (16, 32), 256, 4),
        (64, 256, True, 2, (16, 32), 256, 4),
        (32, 256, True, 2, (16, 32), 256, 4),
        (64, 512, False, 2, (16, 16), 512, 2),
        (64, 512, True, 2, (16, 16), 512, 2),
        (256, 1024, True, 2, (64, 32), 64, 4),
    ],
)
def test_rule_tiles(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    hidden: int,
    backward: bool,
    element_size: int,
    tiles: tuple[int, int],
    chunk: int,
    warps: int,
) -> None:
    """The tile rule's plans on 132 SMs (an H100) where plans.py documents its measurements
    (for the forward, the tile kernel's plan: at (64, 256) the forward takes the row kernel):
    the float32 backward takes its own least-read tiles of 16 units or more, 16-bit types the
    forward's, which are the widest whose R slice stays on chip; large float32 tiles run on 8
    warps, small 16-bit ones and small float32 backward ones on 2; every grid fits on the SMs
    at once."""
    monkeypatch.setattr(plans, "resident_programs", lambda _device: 132)
    make = plans.backward_plan if backward else plans.tile_plan
    plan = make(batch, hidden, element_size, DEVICE)
    assert not plan.rows
    rows, units = plan.grid(batch, hidden)
    assert rows * units <= 132
    assert ((plan.block_b, plan.block_h), plan.block_k, plan.warps) == (tiles, chunk, warps)
    forward = plans.tile_plan(batch, hidden, element_size, DEVICE)
    if element_size == 2:
        assert (plan.block_b, plan.block_h) == (forward.block_b, forward.block_h)


@pytest.mark.parametrize(
    ("batch", "hidden", "tiles", "chunk", "warps"),
    [((256, 1024, (64, 32), 64, 8)), ((64, 512, (16, 16), 512, 2))],
)
def test_rule_tiles_of_tf32_on_16_bit_operands(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    hidden: int,
    tiles: tuple[int, int],
    chunk: int,
    warps: int,
) -> None:
    """TF32_HALF: the 16-bit types' tiles and chunks, but a float32 state, so large tiles run
    on 8 warps as float32 ones do (bfloat16's stay on 4); small ones on 2, as 16-bit ones."""
    monkeypatch.setattr(plans, "resident_programs", lambda _device: 132)
    plan = plans.forward_plan(batch, hidden, 2, DEVICE, float_state=True)
    assert ((plan.block_b, plan.block_h), plan.block_k, plan.warps) == (tiles, chunk, warps)
    sixteen_bit = plans.forward_plan(batch, hidden, 2, DEVICE)
    assert dataclasses.replace(sixteen_bit, warps=plan.warps) == plan
    candidates = plans.tile_candidates(batch, hidden, 2, DEVICE, False, float_state=True)
    assert plan in candidates


@pytest.mark.parametrize(
    ("batch", "hidden", "expected"),
    [
        (16, 128, ("single", 8, 1)),
        (132, 100, ("single", 8, 1)),
        (264, 128, ("single", 8, 1)),
        (16, 64, ("single", 4, 1)),
        (1, 256, ("handover", 4, 1)),
        (265, 128, "tile"),
        (20, 256, ("wide", 8, 1)),
        (64, 256, ("wide", 8, 2)),
        (128, 256, "tile"),
        (64, 512, "tile"),
    ],
)
@pytest.mark.parametrize("backward", [False, True])
def test_rule_rows(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    hidden: int,
    expected: tuple[str, int, int] | str,
    backward: bool,
) -> None:
    """On 132 SMs: one row a program holding all of R wherever R fits (H up to 128) and the
    rows fill at most two waves of the SMs (those programs never wait for each other); the
    handover between programs of a row for other small
    batches; in the forward, programs of up to 2 rows (16-bit types: 1) holding 64 units of R
    at H=256 (the backward takes the tile kernel there); the tile kernels otherwise. The row
    kernels compute in float32 whatever the type."""
    monkeypatch.setattr(plans, "resident_programs", lambda _device: 132)
    make = plans.backward_plan if backward else plans.forward_plan
    if backward and expected != "tile" and expected[0] == "wide":
        expected = "tile"
    for element_size in (2, 4):
        plan = make(batch, hidden, element_size, DEVICE)
        if expected == "tile":
            assert not plan.rows
            continue
        kind, warps, block_b = expected
        if kind == "wide" and element_size == 2 and block_b > plans.ROW_WIDE_MAX_ROWS_16_BIT:
            assert not plan.rows
            continue
        full = plans.padded(hidden)
        assert plan.rows and plan.single == (kind == "single") and plan.warps == warps
        rows, units = plan.grid(batch, hidden)
        assert plan.block_b == block_b
        if plan.single:
            assert (plan.block_h, plan.block_k) == (full, full) and rows == batch
        else:  # programs that wait for each other must all be resident
            assert rows * units <= 132
        if kind == "wide":
            assert (plan.block_h, plan.block_k) == (64, full)


def test_no_candidates_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert plans.tile_candidates(64, 256, 4, DEVICE, False) == []


@pytest.mark.skipif(DEVICE.type != "cuda", reason="measures kernels on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_through_tuned_plans(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """With the autotuner on, the forward and backward each measure their problem once, and
    the output and every gradient keep their accuracy against float64: float32 at its
    conformance rung, bfloat16 within twice the error of the untuned plans."""
    torch.manual_seed(0)
    model = QuantGRU(24, 96, bidirectional=True).to(DEVICE, dtype)
    model.backend = "triton"
    oracle = model.to_float().to(DEVICE, torch.float64)
    x = torch.randn(30, 40, 24, device=DEVICE)

    def train(module: torch.nn.Module, precision: torch.dtype) -> list[torch.Tensor]:
        module.zero_grad()
        x_ = x.detach().to(precision).requires_grad_()
        out, _ = module(x_)
        (out.double() * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum().backward()
        return [out.detach(), x_.grad, *(p.grad for p in module.parameters())]

    untuned = train(model, dtype)
    exact = train(oracle, torch.float64)
    monkeypatch.setenv(tuning.ENVIRONMENT, "1")
    for _ in range(2):  # the second call takes the remembered plans
        tuned = train(model, dtype)
    assert sorted(problem[0] for problem in tuning.chosen) == ["backward", "forward"]
    names = ["output", "input grad"] + [name for name, _ in model.named_parameters()]
    for name, ours, before, expected in zip(names, tuned, untuned, exact, strict=True):
        if dtype == torch.float32:
            assert_float_conformant(ours, expected, name)
        else:
            assert_ratio_to_reference(ours, before, expected, name)
