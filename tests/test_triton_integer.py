"""The Triton kernel of the integer GRU (kernels/triton/integer_kernel.py) against the integer
reference: every code of every operator at every step identical (the bit-exact rung).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (one hidden tile a batch tile:
interpreted programs run one after another, so they cannot meet at a barrier); on a GPU the
grid of several hidden tiles with its barrier runs too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant_gru.config import OPERATORS, WEIGHT_OPERATORS, GRUQuantConfig
from quant_gru.kernels.torch.quantized_forward import initial_codes, input_codes
from quant_gru.reference import integer_gru
from test_bit_exact import assert_same_run, cases, run_both

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru.kernels.triton import integer_gru as integer_host  # noqa: E402
from quant_gru.kernels.triton.integer_digits import (  # noqa: E402
    MAX_PRODUCT_TERMS,
    digit_offset,
    digits_for_span,
    digits_for_values,
    split_digits,
    wrap_int64,
)
from quant_gru.kernels.triton.integer_gru import triton_integer_gru  # noqa: E402
from quant_gru.kernels.triton.integer_plans import (  # noqa: E402
    RESIDENT_BYTES,
    ROW_UNITS,
    WIDE_CHUNK,
    IntegerPlan,
    integer_plan,
    integer_row_plan,
    merged_gates,
)


def uniform_config(width: int, symmetric: bool, unsigned: bool, scale_type: str) -> GRUQuantConfig:
    operators = {}
    for name in OPERATORS:
        entry: dict = {"bitwidth": width}
        if name in WEIGHT_OPERATORS:
            entry.update(is_symmetric=True, is_unsigned=False, granularity="per_channel")
        else:
            entry.update(is_symmetric=symmetric, is_unsigned=unsigned)
        operators[name] = entry
    return GRUQuantConfig.from_dict(
        {"GRU_config": {"default_config": {"scale_type": scale_type}, "operator_config": operators}}
    )


def case_with(config: GRUQuantConfig, **overrides: object) -> dict:
    case = {
        "config": config,
        "input_size": 5,
        "hidden_size": 6,
        "num_layers": 1,
        "bidirectional": False,
        "bias": True,
        "batch": 3,
        "steps": 4,
        "lengths": None,
        "with_hx": True,
        "input_scale": 1.0,
        "seed": 0,
    }
    case.update(overrides)
    return case


@settings(
    max_examples=int(os.environ.get("INTEGER_KERNEL_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_kernel_codes_equal_reference(case: dict) -> None:
    """Widths 1..32, symmetry, signedness, granularity, scale type, layers, directions,
    lengths and initial states drawn at random."""
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


@pytest.mark.parametrize(
    ("width", "symmetric", "unsigned", "scale_type"),
    [(8, False, False, "float"), (8, True, True, "pot"), (16, False, True, "float"),
     (32, False, False, "float"), (4, True, False, "pot")],
)  # fmt: skip
def test_uniform_widths(width: int, symmetric: bool, unsigned: bool, scale_type: str) -> None:
    """Every operator at one width: 8 bits (one digit a value: one int8 product a gate), 16
    and 32 (several digits), 4; both directions of two layers with lengths."""
    config = uniform_config(width, symmetric, unsigned, scale_type)
    case = case_with(
        config, num_layers=2, bidirectional=True, lengths=[4, 1, 3], input_scale=30.0, seed=width
    )
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


def test_chunks_of_the_state_and_several_batch_tiles() -> None:
    """H = 72: the recurrent product over two chunks of K (and padding past H); 20 rows: two
    batch tiles, one of them partly past the batch. (16 inputs and 60 rows: the input
    projection is one int8 product.)"""
    config = uniform_config(8, False, False, "float")
    case = case_with(config, input_size=16, hidden_size=72, batch=20, steps=3)
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


def test_batch_split_over_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """More batch rows than one launch takes: each launch its own rows, same codes."""
    real = integer_host.plan_for

    def small_launches(*args: object) -> IntegerPlan:
        plan = real(*args)  # type: ignore[arg-type]
        return dataclasses.replace(plan, launch_rows=plan.block_b)

    monkeypatch.setattr(integer_host, "plan_for", small_launches)
    case = case_with(uniform_config(8, False, True, "float"), batch=35, lengths=None, steps=3)
    case["lengths"] = [1 + i % 3 for i in range(35)]
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


@pytest.mark.parametrize("resident", [True, False])
def test_r_on_chip_or_read_every_step(monkeypatch: pytest.MonkeyPatch, resident: bool) -> None:
    """One-digit models with R's slice loaded once (several chunks of K: H = 72) or re-read
    every step: the same codes."""
    real = integer_host.plan_for

    def forced(*args: object) -> IntegerPlan:
        plan = real(*args)  # type: ignore[arg-type]
        assert plan.chunks(72) == 2  # the loaded slice covers several chunks of K
        return dataclasses.replace(plan, resident=resident)

    monkeypatch.setattr(integer_host, "plan_for", forced)
    config = uniform_config(8, False, False, "float")
    case = case_with(
        config, input_size=8, hidden_size=72, batch=5, steps=3, lengths=[3, 1, 2, 3, 2]
    )
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


@pytest.mark.parametrize(
    ("bits", "resident"), [(8, True), (8, False), (16, False)], ids=["8-on-chip", "8", "16"]
)
def test_a_product_a_gate(monkeypatch: pytest.MonkeyPatch, bits: int, resident: bool) -> None:
    """The tile kernel's products one a gate (what QAT's saving launches on large tiles
    take, integer_plans.merged_gates) instead of one of N = 4 BH: the same codes, with R's
    slice kept on chip (two chunks of K) or re-read, and with several digits (16 bits)."""
    monkeypatch.setattr(integer_host, "merged_gates", lambda plan, save: False)
    real = integer_host.plan_for

    def forced(*args: object) -> IntegerPlan:
        return dataclasses.replace(real(*args), resident=resident)  # type: ignore[arg-type]

    monkeypatch.setattr(integer_host, "plan_for", forced)
    config = uniform_config(bits, False, False, "float")
    case = case_with(
        config, input_size=8, hidden_size=72, batch=5, steps=3, lengths=[3, 1, 2, 3, 2]
    )
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


def test_merged_gates_rule() -> None:
    """One product for the three gates but on QAT's saving launches with large tiles."""
    small = IntegerPlan(16, 16, 64, 4, False, 16)
    large = IntegerPlan(64, 32, WIDE_CHUNK, 8, False, 64)
    assert merged_gates(small, save=True) and merged_gates(small, save=False)
    assert merged_gates(large, save=False) and not merged_gates(large, save=True)


def test_wide_chunks_of_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """K in chunks of 128 (the large tiles' WIDE_CHUNK), R re-read every step: H = 200 takes
    two chunks, the second partly past H; the same codes."""
    real = integer_host.plan_for

    def forced(*args: object) -> IntegerPlan:
        plan = real(*args)  # type: ignore[arg-type]
        return dataclasses.replace(plan, block_k=WIDE_CHUNK, resident=False)

    monkeypatch.setattr(integer_host, "plan_for", forced)
    config = uniform_config(8, False, False, "float")
    case = case_with(config, input_size=8, hidden_size=200, batch=3, steps=2, lengths=[2, 1, 2])
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


def test_no_steps_or_no_rows() -> None:
    """Empty outputs, and h_n = h0 (no step) or empty (no rows), as the reference gives."""
    case = case_with(uniform_config(8, False, False, "float"), num_layers=2, bidirectional=True)
    _, x, hx, _, programs, _, _ = run_both(case, DEVICE, triton_integer_gru)
    x_codes, h0_codes = input_codes(x, programs), initial_codes(hx, programs, x)
    for xs, hs in ((x_codes[:0], h0_codes), (x_codes[:, :0], h0_codes[:, :0])):
        expected = integer_gru(programs, xs, hs, None, 2, True, trace=True)
        actual = triton_integer_gru(programs, xs.to(DEVICE), hs.to(DEVICE), None, 2, True, True)
        assert_same_run(actual, expected)


@given(low=st.integers(-(2**40), 2**40), span=st.integers(0, 2**33))
def test_offset_digits_write_every_value_of_the_range(low: int, span: int) -> None:
    high = low + span
    digits = digits_for_span(low, high)
    offset = digit_offset(low, digits)
    values = torch.tensor([low, high, low + span // 2], dtype=torch.int64)
    parts = split_digits(values - offset, digits)
    assert parts.dtype == torch.int8
    rebuilt = sum(parts[i].to(torch.int64) << (8 * i) for i in range(digits))
    assert torch.equal(rebuilt + offset, values)
    assert digits == 1 or span >= 256 ** (digits - 1)  # the fewest


def test_packed_words_hold_four_digits_lowest_first() -> None:
    """dp4a's operands: word j of a row is Σ_i (digit 4j + i mod 256) 256^i, as a signed
    int32; on the device the kernels read them from."""
    from quant_gru.kernels.triton.integer_constants import packed_words

    digits = torch.randint(-128, 128, (5, 12), dtype=torch.int8, generator=torch.Generator())
    digits[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)
    parts = digits.to(torch.int64).view(5, 3, 4) & 0xFF
    words = sum(parts[..., i] << (8 * i) for i in range(4))
    expected = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    actual = packed_words(digits.to(DEVICE))
    assert actual.dtype == torch.int32
    assert torch.equal(actual.cpu(), expected)


def test_digit_counts() -> None:
    assert digits_for_span(-128, 127) == 1  # any 8-bit code range
    assert digits_for_span(0, 255) == 1
    assert digits_for_span(-255, 255) == 2  # an 8-bit zero-corrected range
    assert digits_for_values(-128, 127) == 1
    assert digits_for_values(0, 128) == 2
    # Without an offset four digits reach 127 * (2^32 - 1) / 255 < 2^31 - 1: a fifth.
    assert digits_for_values(-(2**31), 2**31 - 1) == 5
    assert digits_for_values(-(2**30), 2**30) == 4
    assert wrap_int64(2**63) == -(2**63)
    assert wrap_int64(-1 - 2**64) == -1
    assert MAX_PRODUCT_TERMS * 2**14 < 2**31 <= (MAX_PRODUCT_TERMS + 1) * 2**14


def test_module_backends_agree() -> None:
    """QuantGRU's quantized forward through the kernel ('triton') and through plain PyTorch
    ('torch'): the same outputs, in training and in inference (the gradients:
    test_triton_qat.py)."""
    from quant_gru import QuantGRU

    torch.manual_seed(0)
    model = QuantGRU(4, 6, num_layers=2, bidirectional=True, batch_first=True).to(DEVICE)
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(3, 5, 4, device=DEVICE))
    model.calibrating = False
    model.use_quantization = True
    x = torch.randn(3, 5, 4, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model.backend = backend
        out, h_n = model.train()(x.clone().requires_grad_())
        with torch.no_grad():
            evaluated = model.eval()(x)
        results[backend] = (out.detach(), h_n.detach(), *evaluated)
    for want, got in zip(results["torch"], results["triton"], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("width", "scale_type", "expected"),
    [(8, "float", 2), (16, "float", 0), (32, "float", 0)],
)
def test_narrow_kernel_where_every_value_fits_32_bits(
    width: int, scale_type: str, expected: int
) -> None:
    """8-bit float-scale models take the SHORT kernel (NARROW 2: every value and term in
    int32); 16- and 32-bit ones the general int64 one. test_uniform_widths checks both exact."""
    from quant_gru.kernels.triton.integer_constants import kernel_constants

    case = case_with(uniform_config(width, False, False, scale_type))
    _, _, _, _, programs, _, _ = run_both(case, DEVICE, triton_integer_gru)
    assert kernel_constants(programs[0], DEVICE).narrow == expected


@pytest.mark.parametrize("level", [0, 1])
def test_wider_kernels_give_the_short_kernels_codes(
    level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SHORT model (8 bits, float scales) run on the NARROW 1 kernel (int32 values, int64
    terms) and on the general int64 one: the reference's codes on each, so each level's code
    path is held to the reference on one model."""
    from quant_gru.kernels.triton import integer_constants

    real = integer_host.kernel_constants

    def widened(*args: object) -> integer_constants.KernelConstants:
        constants = real(*args)  # type: ignore[arg-type]
        assert constants.narrow == 2
        return dataclasses.replace(constants, narrow=level)

    monkeypatch.setattr(integer_host, "kernel_constants", widened)
    config = uniform_config(8, False, False, "float")
    case = case_with(config, num_layers=2, bidirectional=True, lengths=[4, 1, 3], seed=3)
    _, _, _, _, _, expected, actual = run_both(case, DEVICE, triton_integer_gru)
    assert_same_run(actual, expected)


@pytest.mark.parametrize(("low", "high"), [(-128, 127), (0, 255), (-250, 5), (-7, 7)])
def test_one_digit_products_are_exact(low: int, high: int) -> None:
    """The input projection's int8 product: any range of 256 values after its offset."""
    from quant_gru.kernels.triton.integer_digits import one_digit_products

    generator = torch.Generator().manual_seed(low)
    x = torch.randint(low, high + 1, (3, 7, 24), generator=generator)
    weight = torch.randint(-128, 128, (16, 24), generator=generator)
    products = one_digit_products(x, low, high, weight, (-128, 127))
    assert products is not None
    assert torch.equal(products, x @ weight.t())
    assert one_digit_products(x, low, high + 256, weight, (-128, 127)) is None  # two digits
    assert one_digit_products(x, low, high, weight, (-128, 128)) is None
    assert one_digit_products(x[:, :5], low, high, weight, (-128, 127)) is None  # 15 rows


def test_constants_of_the_quantization_parameters_are_made_once() -> None:
    """Calls with the same calibration share them; a new calibration (new terms) makes its
    own, and the kernel follows it (test_kernel_codes_equal_reference runs many in a row)."""
    from quant_gru.kernels.triton.integer_constants import kernel_constants

    case = case_with(uniform_config(8, False, False, "float"))
    _, _, _, _, programs, _, _ = run_both(case, DEVICE, triton_integer_gru)
    first = kernel_constants(programs[0], DEVICE)
    assert kernel_constants(programs[0], DEVICE).tables is first.tables
    copied = dataclasses.replace(programs[0], terms=dict(programs[0].terms))
    assert kernel_constants(copied, DEVICE).tables is not first.tables


def test_plans_keep_every_program_resident() -> None:
    """At most one program a multiprocessor a launch; the most programs, then the fewest
    bytes a step; R on chip only with one digit each and where its slice fits."""
    for batch, hidden in [(1, 256), (64, 512), (256, 1024), (1000, 256), (3, 72)]:
        for h_digits, r_digits in [(1, 1), (2, 1), (4, 4)]:
            plan = integer_plan(batch, hidden, h_digits, r_digits, 132)
            grid = -(-min(batch, plan.launch_rows) // plan.block_b) * -(-hidden // plan.block_h)
            assert grid <= 132
            slice_bytes = 3 * plan.block_h * plan.chunks(hidden) * plan.block_k
            assert plan.resident == (h_digits == r_digits == 1 and slice_bytes <= RESIDENT_BYTES)
    assert (
        integer_plan(256, 1024, 1, 1, 132).block_b * integer_plan(256, 1024, 1, 1, 132).block_h
        == 2048
    )
    assert integer_plan(7, 40, 1, 1, None).block_h == 64  # one program holds every unit
    with pytest.raises(ValueError, match="more than 4 programs"):
        integer_plan(16, 4096, 1, 1, 4)


def test_row_plans_of_few_units_are_widened() -> None:
    """The float row plans' programs of a few units (one row, many programs) take ROW_UNITS
    units four digits a word, on 4 warps or, where the slice's words pass the 4-warp budget,
    8; plans of 16 units or more, single ones, and models without words keep the float plan."""
    from quant_gru.kernels.triton.plans import _plan

    def widened(batch: int, hidden: int, words: bool = True) -> tuple[int, int]:
        plan = integer_row_plan(_plan(batch, hidden, 4, 132, False), hidden, words)
        return plan.block_h, plan.warps

    assert widened(1, 256) == (ROW_UNITS, 4)  # the float plan: 4 units a program
    assert widened(1, 1024) == (ROW_UNITS, 8)  # 24576 words: the 8-warp budget
    assert widened(1, 256, words=False) == (4, 4)  # a digit a word: as the float plan
    assert widened(64, 256) == (64, 8)  # 2 rows x 64 units: unchanged
    assert widened(16, 128) == (128, 8)  # one program holds all of R


def test_chunks_of_k_suit_int8_matrix_cores() -> None:
    """tl.dot of int8 on a GPU takes K >= 32: small H still gets chunks of 32 (zeros past H)."""
    for programs in (None, 132):
        assert integer_plan(4, 5, 1, 1, programs).block_k == 32
        assert integer_plan(4, 1000, 1, 1, programs).block_k == 64
    # Tiles of LARGE_TILE elements that re-read R: chunks of 128 (fewer int8 waits a step).
    assert integer_plan(256, 1024, 1, 1, 132).block_k == WIDE_CHUNK
    assert integer_plan(64, 512, 1, 1, 132).block_k == 64  # 16 x 16 tiles
