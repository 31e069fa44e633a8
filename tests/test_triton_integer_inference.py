"""Quantized inference on the Triton kernels, float in and float out
(kernels/triton/integer_inference.py, projection_kernel.py), against the plain-PyTorch
quantized forward: outputs and final states identical to the bit (both dequantize the same
codes), for every configuration kind, dtype, layer count, direction, packing and state.

Without a GPU the kernels run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU
from quant_gru.config import GRUQuantConfig
from quant_gru.kernels.torch.quantized_forward import build_programs, input_codes
from test_bit_exact import calibrated_case, cases
from test_quantized_module import calibrated
from test_triton_integer import case_with, uniform_config

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru.kernels.derived import CalibrationCache, DerivedCache, TensorCache  # noqa: E402
from quant_gru.kernels.triton.integer_constants import kernel_constants  # noqa: E402
from quant_gru.kernels.triton.integer_gru import layer_input, run_direction  # noqa: E402
from quant_gru.kernels.triton.integer_projection import (  # noqa: E402
    codes_input_projection,
    digit_input_projection,
    float_input_projection,
    input_projection,
)
from quant_gru.kernels.triton.plans import Plan  # noqa: E402


def both_backends(model: QuantGRU, *args: object) -> tuple[tuple, tuple]:
    """(torch's, triton's) inference results of the same call."""
    results = []
    with torch.no_grad():
        for backend in ("torch", "triton"):
            model.backend = backend
            results.append(model(*args))
    return results[0], results[1]


def assert_identical(expected: tuple, actual: tuple) -> None:
    for want, got in zip(expected, actual, strict=True):
        if hasattr(want, "data"):  # PackedSequence
            want, got = want.data, got.data
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def assert_codes_or_refused(actual: torch.Tensor | None, expected: torch.Tensor, refused: bool):
    """The kernels' codes equal the plain path's, or (operands wider than a digit) None."""
    if refused:
        assert actual is None
        return
    assert actual is not None
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


@settings(
    max_examples=int(os.environ.get("INTEGER_KERNEL_EXAMPLES", "40")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_inference_equals_torch_path(case: dict) -> None:
    """Random configurations (widths 1..32, symmetry, signedness, granularity, scale type),
    layers, directions, lengths and states; one-digit inputs take the projection kernel,
    others the plain-PyTorch projection."""
    model, x, hx, lengths = calibrated_case(case)
    model.use_quantization = True
    model = model.to(DEVICE)
    x = x.to(DEVICE)
    hx = None if hx is None else hx.to(DEVICE)
    data = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    expected, actual = both_backends(model, data, hx)
    assert_identical(expected, actual)


def test_no_rows_or_steps_with_and_without_an_initial_state() -> None:
    """No rows: empty results as the plain path gives them, with and without hx. No step
    (inside the package; the public call refuses T = 0 as nn.GRU does): the final state is
    the initial one, zero where none is given (the kernels then read no initial state)."""
    torch.manual_seed(0)
    model = QuantGRU(12, 10, num_layers=2, bidirectional=True)
    model = calibrated(model, torch.randn(3, 6, 12)).to(DEVICE)
    x = torch.randn(3, 6, 12, device=DEVICE)
    hx = torch.randn(4, 6, 10, device=DEVICE)
    for state in (hx[:, :0], None):
        expected, actual = both_backends(model, x[:, :0], state)
        assert_identical(expected, actual)
    program = build_programs(model._quantized_model(), model._direction_weights())[0]
    constants = kernel_constants(program, DEVICE)
    wx = torch.zeros(0, 6, 30, dtype=torch.int32, device=DEVICE)
    start = torch.arange(-30, 30, dtype=torch.int64, device=DEVICE).view(6, 10)
    for h0, want in ((start, start), (None, torch.zeros_like(start))):
        _, h_n, _ = run_direction(program, constants, wx, h0, None, False, False)
        assert torch.equal(h_n, want)
        out = torch.empty(0, 6, 10, device=DEVICE)
        floats = (out, torch.empty(6, 10, device=DEVICE))
        _, h_n, _ = run_direction(program, constants, wx, h0, None, False, False, floats)
        scale = program.formats["output.h"].scale
        assert torch.equal(h_n, (want.double() * scale).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_layers_directions_batch_first(dtype: torch.dtype) -> None:
    """The kernels round the dequantized values to each dtype as torch does (through float32;
    bfloat16 to nearest even)."""
    torch.manual_seed(0)
    model = QuantGRU(12, 10, num_layers=2, bidirectional=True, batch_first=True)
    model = calibrated(model, torch.randn(3, 6, 12)).to(device=DEVICE, dtype=dtype)
    x = (torch.randn(3, 6, 12) * 1.5).to(device=DEVICE, dtype=dtype)
    hx = torch.randn(4, 3, 10).to(device=DEVICE, dtype=dtype)
    expected, actual = both_backends(model, x, hx)
    assert_identical(expected, actual)
    expected, actual = both_backends(model, x[0])  # unbatched, no hx
    assert_identical(expected, actual)


@pytest.mark.parametrize("width", [4, 8, 16])
def test_projection_kernel_equals_plain_projection(width: int) -> None:
    """Quantization (NaN to the zero point, infinities clamped) and matmul.Wx on the kernels,
    from floats or from codes, give the codes of the plain path; inputs wider than one digit
    are left to it."""
    case = case_with(uniform_config(width, False, False, "float"), input_size=40, hidden_size=24)
    model, _, _, _ = calibrated_case(case)
    programs = build_programs(model._quantized_model(), model._direction_weights())
    program = programs[0]
    x = torch.randn(7, 3, 40) * 2
    x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    codes = input_codes(x, programs) - program.formats["input.x"].zero_point
    expected = input_projection(program, codes.to(DEVICE))
    actual = float_input_projection(program, x.to(DEVICE))
    assert_codes_or_refused(actual, expected, refused=width > 8)
    from_codes = digit_input_projection(program, codes.to(DEVICE))
    assert_codes_or_refused(from_codes, expected, refused=width > 8)


@pytest.mark.parametrize(
    ("width", "input_width", "scale_type"),
    [(4, 4, "float"), (8, 8, "float"), (8, 6, "pot"), (4, 8, "pot"), (16, 8, "float")],
)
def test_requantized_layer_input_equals_plain_path(
    width: int, input_width: int, scale_type: str
) -> None:
    """A layer above the first: its input's terms and clamp (§8) and matmul.Wx on the kernels
    give the codes of the plain path from the codes of the layer below (power-of-two scales
    of other widths bring right and saturated left shifts); operands wider than a digit are
    left to the plain path."""
    config = uniform_config(width, False, False, scale_type)
    entries = config.to_dict()["GRU_config"]["operator_config"]
    entries["input.x"]["bitwidth"] = input_width
    config = GRUQuantConfig.from_dict(
        {"GRU_config": {"default_config": {"scale_type": scale_type}, "operator_config": entries}}
    )
    case = case_with(config, input_size=12, hidden_size=24, num_layers=2, bidirectional=True)
    model, _, _, _ = calibrated_case(case)
    programs = build_programs(model._quantized_model(), model._direction_weights())
    shifts = {int(term.n) for program in programs[2:] for term in program.terms["input.x"]}
    assert scale_type == "float" or shifts == {width - input_width}  # scales 2^n apart
    generator = torch.Generator().manual_seed(width)
    below = []
    for program in programs[:2]:
        fmt = program.formats["output.h"]
        codes = torch.randint(fmt.qmin, fmt.qmax + 1, (5, 3, 24), generator=generator)
        below.append((codes - fmt.zero_point).to(DEVICE))
    for program in programs[2:]:
        expected = input_projection(program, layer_input(program, below))
        actual = codes_input_projection(program, below)
        assert_codes_or_refused(actual, expected, refused=width > 8)


def test_programs_kept_while_weights_unchanged() -> None:
    """Repeated inference reuses the quantized weights; an in-place update (an optimizer
    step) makes them anew, and the outputs follow."""
    torch.manual_seed(0)
    model = calibrated(QuantGRU(8, 6), torch.randn(5, 2, 8)).to(DEVICE)
    quantized = model._quantized_model()
    first = build_programs(quantized, model._direction_weights())
    assert build_programs(quantized, model._direction_weights()) is first
    x = torch.randn(5, 2, 8, device=DEVICE)
    before, _ = both_backends(model, x)
    with torch.no_grad():
        model.weight_hh_l0.mul_(-1)
    assert build_programs(quantized, model._direction_weights()) is not first
    expected, actual = both_backends(model, x)
    assert_identical(expected, actual)
    assert not torch.equal(expected[0], before[0])


def test_derived_values_go_with_their_owner() -> None:
    cache: DerivedCache[list[int]] = DerivedCache()
    owner = dataclasses.make_dataclass("Owner", [])()
    made = cache.get(owner, DEVICE, lambda: [1])
    assert cache.get(owner, DEVICE, lambda: [2]) is made
    assert len(cache) == 1
    del owner
    gc.collect()
    assert len(cache) == 0


def test_calibration_values_are_kept_by_their_owners_identity() -> None:
    cache: CalibrationCache[list[int]] = CalibrationCache(size=2)
    terms = {"matmul.Wx": ()}  # a mapping: no weak references
    made = cache.get(terms, DEVICE, lambda: [1])
    assert cache.get(terms, DEVICE, lambda: [2]) is made
    assert cache.get({"matmul.Wx": ()}, DEVICE, lambda: [3]) == [3]  # equal, not the same
    assert cache.get(terms, DEVICE, lambda: [4], "variant") == [4]
    assert cache.get(terms, DEVICE, lambda: [5]) == [5]  # emptied when full


def test_tensor_values_kept_while_the_tensor_is_unmodified() -> None:
    cache: TensorCache[list[int]] = TensorCache()
    weight = torch.ones(3)
    made = cache.get(weight, lambda: [1])
    assert cache.get(weight, lambda: [2]) is made
    assert cache.get(weight.clone(), lambda: [3]) == [3]  # equal, not the same
    weight.add_(1)  # an optimizer's step: a new version
    assert cache.get(weight, lambda: [4]) == [4]
    assert cache.get(weight, lambda: [5]) == [4]
    weight.data = torch.zeros(3)  # new storage, the same version counter
    assert cache.get(weight, lambda: [8]) == [8]
    del weight
    gc.collect()
    assert len(cache) == 0
    with torch.inference_mode():
        frozen = torch.ones(3)  # no version counter: nothing kept
        assert cache.get(frozen, lambda: [6]) == [6]
        assert cache.get(frozen, lambda: [7]) == [7]
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("plan", "hidden"),
    [
        (Plan(rows=True, block_b=1, block_h=16, block_k=16, warps=4, single=True), 16),
        (Plan(rows=True, block_b=2, block_h=16, block_k=16, warps=4, single=False), 16),
        (Plan(rows=True, block_b=2, block_h=16, block_k=16, warps=4, single=False), 10),
        # Programs of 4 units (one row a program, many programs): the integer plan takes 32,
        # here all of H (under the interpreter programs run one after another, so none may
        # wait for another's words).
        (Plan(rows=True, block_b=1, block_h=4, block_k=32, warps=8, single=False), 32),
        (None, 16),  # the tile kernel
    ],
    ids=["rows-single-packed", "rows-words-packed", "rows-words-digits", "rows-widened", "tiles"],
)
def test_row_and_tile_kernels_agree(
    monkeypatch: pytest.MonkeyPatch, plan: Plan | None, hidden: int
) -> None:
    """Inference of one-digit models runs on the row kernel where the float kernels' plan has
    rows (its state kept in one program, or handed over as tagged words; four digits a word
    and dp4a where H is a multiple of 4, else a digit a word; programs of fewer than 16 units
    widened to 32), else on the tile kernel; each equals the plain-PyTorch path, with lengths
    and both directions."""
    from quant_gru.kernels.triton import integer_gru

    float_plan = plan or Plan(rows=False, block_b=16, block_h=16, block_k=16, warps=4)
    monkeypatch.setattr(integer_gru, "forward_plan", lambda *args: float_plan)
    torch.manual_seed(0)
    model = QuantGRU(12, hidden, bidirectional=True)
    model = calibrated(model, torch.randn(6, 3, 12)).to(DEVICE)
    x = torch.randn(6, 3, 12, device=DEVICE)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    programs = build_programs(model._quantized_model(), model._direction_weights())
    constants = kernel_constants(programs[0], DEVICE)
    rows = integer_gru.row_plan_for(3, hidden, constants, DEVICE)
    assert (rows is not None) == (plan is not None)
    if plan is not None:
        widened = plan.block_h < 16
        assert (rows.block_h, rows.warps) == ((32, 4) if widened else (plan.block_h, plan.warps))
    assert (constants.words is not None) == (hidden % 4 == 0)
    for data in (x, packed):
        expected, actual = both_backends(model, data)
        assert_identical(expected, actual)


def test_sequences_past_the_kernels_int32_offsets_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the float kernels (plans.check_step_offsets): past the limit of the int32 offsets
    (here lowered to 200 elements) quantized inference says so instead of overflowing."""
    from quant_gru.kernels.triton import plans

    monkeypatch.setattr(plans, "INDEX_LIMIT", 200)
    model = calibrated(QuantGRU(4, 8), torch.randn(2, 2, 4)).to(DEVICE)
    model.backend = "triton"
    with torch.no_grad():
        model(torch.randn(4, 2, 4, device=DEVICE))  # 4 * 2 * 3H = 192 elements
        with pytest.raises(ValueError, match=r"T \* B \* 24 = 5 \* 2 \* 24"):
            model(torch.randn(5, 2, 4, device=DEVICE))
