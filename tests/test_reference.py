"""The integer reference (quant_gru.reference) against independent oracles: hand-computed
rounding, Python big-integer arithmetic, float formulas and a float nn.GRU."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from quant_gru.calibration.minmax import direction_quant
from quant_gru.config import GRUQuantConfig, OperatorSpec
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.program import ActivationFormat, DirectionProgram, build_program
from quant_gru.quantize.requant import Term, make_term
from quant_gru.quantize.scales import dequantize, qparams_from_range, quantize
from quant_gru.quantize.tables import SEGMENTS, CodeFormat, Table, build_table
from quant_gru.reference import integer_gru
from quant_gru.reference.integer_gru import TRACED_OPERATORS, _operator, _rshr, _table, _term

LIMIT = 2**60


def rshr(v: int, n: int | list[int]) -> list[int]:
    return _rshr(torch.tensor([v]), torch.tensor(n)).tolist()


def term_of(m: list[int], n: list[int], pre_shift: int = 0) -> Term:
    return Term(torch.tensor(m), torch.tensor(n), pre_shift, (0, 0))


# --- §3: rounding right shift -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v", "n", "expected"),
    [
        (3, 1, 2),
        (-3, 1, -1),
        (-1, 1, 0),
        (1, 1, 1),
        (5, 2, 1),
        (6, 2, 2),
        (-6, 2, -1),
        (-2, 2, 0),
        (-5, 2, -1),
        (7, 0, 7),
        (-7, 0, -7),
        (2**62 - 1, 62, 1),
        (-(2**62) + 1, 62, -1),
    ],
)
def test_rshr_rounds_half_up(v: int, n: int, expected: int) -> None:
    assert rshr(v, n) == [expected]


@pytest.mark.parametrize("n", [63, 64, 100, 1000])
@pytest.mark.parametrize("v", [0, 1, -1, 2**61, -(2**61), 2**62 - 1, -(2**62) + 1])
def test_rshr_large_shift_is_zero(v: int, n: int) -> None:
    assert rshr(v, n) == [0]


def test_rshr_per_channel_shift() -> None:
    v = torch.tensor([[5, 5, 5, 5, 5], [-5, -5, -5, -5, -5]])
    n = torch.tensor([0, 1, 2, 3, 70])
    assert _rshr(v, n).tolist() == [[5, 3, 1, 1, 0], [-5, -2, -1, -1, 0]]


@pytest.mark.parametrize(
    ("v", "n", "expected"),
    [
        (3, -2, 12),
        (-3, -2, -12),
        (2**59, -1, LIMIT),
        (2**59 + 1, -1, LIMIT),
        (-(2**59) - 1, -1, -LIMIT),
        (2**58 - 1, -2, LIMIT - 4),
        (1, -60, LIMIT),
        (1, -61, LIMIT),
        (-1, -100, -LIMIT),
        (0, -100, 0),
        (2**61, -3, LIMIT),
    ],
)
def test_rshr_negative_shift_saturates(v: int, n: int, expected: int) -> None:
    assert rshr(v, n) == [expected]


# --- §4: one term -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v", "term", "expected"),
    [
        (5, term_of([3], [2]), 4),  # rshr(15, 2) = floor(17 / 4)
        (-5, term_of([3], [2]), -4),  # rshr(-15, 2) = floor(-13 / 4)
        (-2, term_of([3], [2]), -1),  # rshr(-6, 2): a tie, rounded up
        (5, term_of([1], [-3]), 40),
        (2**57, term_of([1], [-3]), LIMIT),
        (2**57 + 1, term_of([1], [-3]), LIMIT),
        (-(2**58), term_of([1], [-3]), -LIMIT),
        (1, term_of([2**30], [-40]), LIMIT),
        (-1, term_of([2**30], [-30]), -LIMIT),
        (2**61, term_of([1], [0]), LIMIT),  # n = 0 still saturates
        (-(2**61), term_of([1], [0]), -LIMIT),
        (12, term_of([2**30], [30], pre_shift=3), 2),  # rshr(12, 3) = 2
        (-12, term_of([2**30], [30], pre_shift=3), -1),  # rshr(-12, 3) = -1
        (-12, term_of([3 * 2**29], [30], pre_shift=3), -1),  # -1 * 1.5 = -1.5 -> -1
        (-20, term_of([3 * 2**29], [30], pre_shift=3), -3),  # rshr(-20, 3) = -2 -> -3
    ],
)
def test_term_hand_cases(v: int, term: Term, expected: int) -> None:
    assert _term(torch.tensor([v]), term).tolist() == [expected]


def test_term_per_channel() -> None:
    term = term_of([1, 3, 2**30], [1, 2, -31])
    v = torch.tensor([[3, 5, 1], [-3, -5, -1]])
    assert _term(v, term).tolist() == [[2, 4, LIMIT], [-1, -4, -LIMIT]]


def py_rshr(v: int, n: int) -> int:
    """§3 and §4 on Python integers (unbounded), straight from the formulas."""
    if n >= 1:
        return (v + (1 << (n - 1))) >> n
    return max(-LIMIT, min(LIMIT, v * 2 ** (-n))) if n < 0 else v


def py_term(v: int, term: Term, channel: int) -> int:
    m = int(term.m[channel if term.m.numel() > 1 else 0])
    n = int(term.n[channel if term.n.numel() > 1 else 0])
    return max(-LIMIT, min(LIMIT, py_rshr(py_rshr(v, term.pre_shift) * m, n)))


def _f32(value: float) -> Fraction:
    return Fraction(float(np.float32(value)))


@pytest.mark.parametrize("out_scale", [1e-3, 1e-30])
def test_term_wide_dot_product(out_scale: float) -> None:
    """32-bit operands, K = 64: B = 70 > 61, so operands are pre-shifted (e_a, e_c) = (5, 4)
    and the term integer by p = 30; with a tiny output scale the result saturates."""
    s_a = [_f32(0.0123), _f32(0.0456), _f32(3.7e-5)]
    s_c = _f32(1e-9)
    term = make_term([s * s_c for s in s_a], _f32(out_scale), [32, 32], 64, "float")
    assert term.operand_shifts == (5, 4)
    assert term.pre_shift == 30
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-(2**31), 2**31, (3, 64), generator=gen)
    a[0] = -(2**31)  # extreme rows: every product at its bound
    c = torch.randint(-(2**32), 2**32 + 1, (4, 64), generator=gen)
    c[0] = 2**32
    a_shifted = _rshr(a, term.operand_shifts[0])
    c_shifted = _rshr(c, term.operand_shifts[1])
    got = _term(torch.matmul(c_shifted, a_shifted.T), term)

    for row in range(4):
        for channel in range(3):
            pairs = list(zip(a[channel].tolist(), c[row].tolist(), strict=True))
            v = sum(py_rshr(x, 5) * py_rshr(y, 4) for x, y in pairs)
            assert int(got[row, channel]) == py_term(v, term, channel)
            exact = Fraction(sum(x * y for x, y in pairs)) * s_a[channel] * s_c / _f32(out_scale)
            if abs(exact) >= LIMIT:
                assert int(got[row, channel]) == (LIMIT if exact > 0 else -LIMIT)
            else:
                bound = sum(abs(x * y) for x, y in pairs) * s_a[channel] * s_c / _f32(out_scale)
                assert abs(int(got[row, channel]) - exact) <= bound * Fraction(1, 2**20) + 2


def test_term_left_shift_from_make_term() -> None:
    """ρ = 2^40: m = 2^30, n = -10, a saturated left shift."""
    term = make_term([Fraction(2**40)], Fraction(1), [31], 1, "float")
    assert (term.pre_shift, int(term.m[0]), int(term.n[0])) == (0, 2**30, -10)
    v = torch.tensor([0, 1, -3, 2**19, 2**20, 2**20 + 1, -(2**21), 2**31])
    expected = [0, 2**40, -3 * 2**40, 2**59, LIMIT, LIMIT, -LIMIT, LIMIT]
    assert _term(v, term).tolist() == expected


def test_term_shift_form() -> None:
    term = make_term([Fraction(1, 2**10)], Fraction(1, 2**3), [16], 1, "pot")
    assert (int(term.m[0]), int(term.n[0])) == (1, 7)
    v = torch.tensor([64, -64, 191, -192, 65535])
    assert _term(v, term).tolist() == [1, 0, 1, -1, 512]
    up = make_term([Fraction(2**5)], Fraction(1, 2**3), [16], 1, "pot")
    assert int(up.n[0]) == -8
    assert _term(torch.tensor([-3, 2**52]), up).tolist() == [-768, LIMIT]


# --- §5: an operator ----------------------------------------------------------------------------


def test_operator_adds_zero_point_and_clamps() -> None:
    fmt = ActivationFormat(0.5, 3, -8, 7)
    values = [torch.tensor([1, -20, 2, LIMIT]), torch.tensor([2, 0, 2, LIMIT])]
    assert _operator(fmt, values).tolist() == [6, -8, 7, 7]


# --- §6: tables ---------------------------------------------------------------------------------


def _float_activation(kind: str, u: float) -> float:
    return 1.0 / (1.0 + math.exp(-u)) if kind == "sigmoid" else math.tanh(u)


def _code_format(low: float, high: float, bits: int, unsigned: bool = False) -> CodeFormat:
    spec = OperatorSpec(bits, False, unsigned)
    scale, zero_point = qparams_from_range(low, high, spec, "float")
    return CodeFormat(Fraction(scale), zero_point, spec.qmin, spec.qmax)


@pytest.mark.parametrize(
    ("kind", "source", "target"),
    [
        ("sigmoid", (-6.0, 9.0), (0.0, 1.0, True)),
        ("sigmoid", (-20.0, 5.0), (0.0, 1.0, True)),
        ("sigmoid", (-3.0, 3.0), (-0.3, 1.2, False)),
        ("tanh", (-4.0, 4.0), (-1.0, 1.0, False)),
        ("tanh", (-13.0, 2.0), (-1.0, 0.7, False)),
    ],
)
def test_table_8bit_is_exact_lookup(
    kind: str, source: tuple[float, float], target: tuple[float, float, bool]
) -> None:
    src = _code_format(*source, 8)
    dst = _code_format(target[0], target[1], 8, target[2])
    table = build_table(kind, src, dst)
    assert table.k == 0
    codes = torch.arange(src.qmin, src.qmax + 1)
    got = _table(table, codes).tolist()
    mismatches, ties = 0, 0
    for q, y in zip(codes.tolist(), got, strict=True):
        level = _float_activation(kind, float(src.scale) * (q - src.zero_point)) / float(dst.scale)
        near_tie = abs(level + 0.5 - round(level + 0.5)) < 1e-9
        ties += near_tie
        expected = min(max(math.floor(level + 0.5) + dst.zero_point, dst.qmin), dst.qmax)
        if y != expected and not (near_tie and abs(y - expected) == 1):
            mismatches += 1
    assert mismatches == 0
    assert ties <= 1


@pytest.mark.parametrize(
    ("kind", "source", "target"),
    [
        ("sigmoid", (-20.0, 20.0), (0.0, 1.0, True)),
        ("sigmoid", (-2.0, 7.0), (0.0, 1.0, True)),
        ("tanh", (-9.0, 3.0), (-1.0, 1.0, False)),
    ],
)
def test_table_16bit_interpolates(
    kind: str, source: tuple[float, float], target: tuple[float, float, bool]
) -> None:
    src = _code_format(*source, 16)
    dst = _code_format(target[0], target[1], 16, target[2])
    table = build_table(kind, src, dst)
    assert table.k > 0
    codes = torch.arange(src.qmin, src.qmax + 1)
    got = _table(table, codes)
    y = table.y
    breakpoints = table.c_lo + (torch.arange(SEGMENTS + 1) << table.k)
    inside = breakpoints <= src.qmax
    assert torch.equal(got[breakpoints[inside] - src.qmin], y[inside])
    d = codes - table.c_lo
    assert torch.all(got[d <= 0] == y[0])
    assert torch.all(got[d >= SEGMENTS << table.k] == y[-1])
    middle = (d > 0) & (d < SEGMENTS << table.k)
    j = d[middle] >> table.k
    low, high = torch.minimum(y[j], y[j + 1]), torch.maximum(y[j], y[j + 1])
    assert torch.all((low <= got[middle]) & (got[middle] <= high))
    assert torch.all(got[1:] >= got[:-1])  # monotone, as the functions are
    # Close to the function: interpolation error h^2/8 max|f''| (<= 0.1 for sigmoid, 0.77 for
    # tanh) plus one code of rounding each for y_j and the interpolation.
    step = float(src.scale) * 2**table.k
    curvature = 0.1 if kind == "sigmoid" else 0.77
    allowed = step**2 / 8 * curvature / float(dst.scale) + 2
    u = float(src.scale) * (codes - src.zero_point).double()
    exact = (torch.sigmoid(u) if kind == "sigmoid" else torch.tanh(u)) / float(dst.scale)
    exact = (exact + dst.zero_point).clamp(dst.qmin, dst.qmax)
    assert (got.double() - exact).abs().max().item() <= allowed


def test_table_hand_interpolation() -> None:
    ys = [0] * (SEGMENTS + 1)
    ys[1], ys[2], ys[SEGMENTS] = 3, 0, 9
    table = Table(c_lo=10, k=2, y=torch.tensor(ys))
    q = torch.tensor([5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 10 + 4 * SEGMENTS, 10**6])
    # segment 0: 0 + rshr(3 r, 2) = 1, 2, 2; segment 1: 3 + rshr(-3 r, 2) = 2, 2, 1
    assert _table(table, q).tolist() == [0, 0, 1, 2, 2, 3, 2, 2, 1, 0, 9, 9]


# --- whole model against float ------------------------------------------------------------------

Ranges = dict[str, tuple[float, float]]
Weights = tuple[Tensor, Tensor, Tensor, Tensor]


def _float_direction(
    x: Tensor, h0: Tensor, weights: Weights, lengths: Tensor, reverse: bool, ranges: Ranges
) -> Tensor:
    """A float64 GRU direction split at §7's operators, widening `ranges` to every value."""

    def record(name: str, value: Tensor) -> Tensor:
        low, high = ranges.get(name, (math.inf, -math.inf))
        ranges[name] = (min(low, value.min().item()), max(high, value.max().item()))
        return value

    w_ih, w_hh, b_ih, b_hh = weights
    hidden = w_hh.shape[1]
    wx = record("matmul.Wx", record("input.x", x) @ w_ih.T + b_ih)
    h = record("output.h", h0)
    outputs = torch.zeros(x.shape[0], *h0.shape, dtype=x.dtype)
    for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
        rb = record("op.Rh_add_br", record("matmul.Rh", h @ w_hh.T) + b_hh)
        gx, gb = wx[t].split(hidden, -1), rb.split(hidden, -1)
        r = record("gate.r_out", torch.sigmoid(record("gate.r_pre", gx[0] + gb[0])))
        z = record("gate.z_out", torch.sigmoid(record("gate.z_pre", gx[1] + gb[1])))
        rrh = record("op.rRh", r * gb[2])
        g = record("gate.g_out", torch.tanh(record("gate.g_pre", gx[2] + rrh)))
        old = record("op.old_contrib", z * h)
        new = record("op.new_contrib", (1 - z) * g)
        active = (t < lengths).unsqueeze(-1)
        h = torch.where(active, record("output.h", old + new), h)
        outputs[t] = torch.where(active, h, 0.0)
    return outputs


def _widened(ranges: Ranges) -> Ranges:
    return {k: (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)) for k, (lo, hi) in ranges.items()}


def _weights(gru: nn.GRU, layer: int, direction: int) -> Weights:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    w_ih, w_hh, b_ih, b_hh = (
        getattr(gru, name + suffix).detach()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )
    return w_ih, w_hh, b_ih, b_hh


def calibrated_programs(
    gru: nn.GRU, x: Tensor, h0: Tensor, lengths: Tensor, config: GRUQuantConfig
) -> list[DirectionProgram]:
    """MinMax parameters from a float run on x, widened by 10%, and the programs built on them."""
    directions = 2 if gru.bidirectional else 1
    programs: list[DirectionProgram] = []
    below: list[DirectionQuant] = []
    layer_x = x
    for layer in range(gru.num_layers):
        quants, outputs = [], []
        for direction in range(directions):
            index = layer * directions + direction
            ranges: Ranges = {}
            weights = _weights(gru, layer, direction)
            outputs.append(
                _float_direction(layer_x, h0[index], weights, lengths, direction == 1, ranges)
            )
            quant = direction_quant(_widened(ranges), weights, config)
            below_outputs = [q["output.h"] for q in below]
            programs.append(build_program(weights, quant, config.scale_type, below_outputs))
            quants.append(quant)
        below, layer_x = quants, torch.cat(outputs, dim=-1)
    return programs


def _quantize_with(value: Tensor, program: DirectionProgram, name: str) -> Tensor:
    fmt = program.formats[name]
    return quantize(value, fmt.scale, fmt.zero_point, fmt.qmin, fmt.qmax)


def _dequantize_with(codes: Tensor, program: DirectionProgram) -> Tensor:
    fmt = program.formats["output.h"]
    return dequantize(codes, fmt.scale, fmt.zero_point)


@dataclasses.dataclass(frozen=True)
class Model:
    gru: nn.GRU
    x: Tensor
    h0: Tensor | None
    lengths: Tensor | None
    programs: list[DirectionProgram]


def make_model(
    config: GRUQuantConfig,
    num_layers: int = 2,
    bidirectional: bool = True,
    lengths: list[int] | None = None,
    with_hx: bool = True,
    sizes: tuple[int, int, int, int] = (7, 4, 5, 16),
    seed: int = 0,
    weight_range: float = 0.6,
) -> Model:
    steps, batch, inputs, hidden = sizes
    torch.manual_seed(seed)
    gru = nn.GRU(inputs, hidden, num_layers, bidirectional=bidirectional).double()
    with torch.no_grad():
        for parameter in gru.parameters():
            parameter.uniform_(-weight_range, weight_range)
    directions = 2 if bidirectional else 1
    x = torch.randn(steps, batch, inputs, dtype=torch.float64)
    h0 = 0.5 * torch.randn(num_layers * directions, batch, hidden, dtype=torch.float64)
    valid = torch.tensor(lengths if lengths is not None else [steps] * batch)
    hx = h0 if with_hx else torch.zeros_like(h0)
    programs = calibrated_programs(gru, x, hx, valid, config)
    return Model(
        gru,
        x,
        h0 if with_hx else None,
        None if lengths is None else valid,
        programs,
    )


def run_integer(
    model: Model, trace: bool = False
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]] | None]:
    gru, programs = model.gru, model.programs
    directions = 2 if gru.bidirectional else 1
    x_codes = _quantize_with(model.x, programs[0], "input.x")
    h0_codes = torch.stack(
        [
            _quantize_with(model.h0[i], p, "output.h")
            if model.h0 is not None
            else torch.full((model.x.shape[1], gru.hidden_size), p.formats["output.h"].zero_point)
            for i, p in enumerate(programs)
        ]
    )
    return integer_gru(
        programs, x_codes, h0_codes, model.lengths, gru.num_layers, directions == 2, trace
    )


def float_reference(model: Model) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        if model.lengths is None:
            return model.gru(model.x, model.h0)
        packed = pack_padded_sequence(model.x, model.lengths, enforce_sorted=False)
        out, h_n = model.gru(packed, model.h0)
        padded, _ = pad_packed_sequence(out, total_length=model.x.shape[0])
        return padded, h_n


def dequantized(model: Model) -> tuple[Tensor, Tensor]:
    out_codes, h_n_codes, _ = run_integer(model)
    gru, programs = model.gru, model.programs
    directions = 2 if gru.bidirectional else 1
    last = programs[-directions:]
    blocks = out_codes.split(gru.hidden_size, dim=-1)
    out = torch.cat([_dequantize_with(b, p) for b, p in zip(blocks, last, strict=True)], -1)
    h_n = torch.stack([_dequantize_with(h, p) for h, p in zip(h_n_codes, programs, strict=True)])
    return out, h_n


def _cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


CONFIG_8 = GRUQuantConfig.default()
CONFIG_16 = GRUQuantConfig.default().with_all_bitwidth(16, is_symmetric=False)
CONFIG_16_POT = dataclasses.replace(CONFIG_16, scale_type="pot")
CONFIG_32 = GRUQuantConfig.default().with_all_bitwidth(32, is_symmetric=False)

SHAPES: dict[str, dict[str, object]] = {
    "2layer-bidir-packed-hx": {"lengths": [7, 3, 5, 1]},
    "2layer-bidir": {"with_hx": False},
    "1layer-packed": {"num_layers": 1, "bidirectional": False, "lengths": [2, 7, 7, 4]},
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    ("config", "max_error"), [(CONFIG_16, 2e-3), (CONFIG_16_POT, 4e-3), (CONFIG_32, 2e-3)]
)
def test_matches_float_gru_at_wide_widths(
    shape: str, config: GRUQuantConfig, max_error: float
) -> None:
    model = make_model(config, **SHAPES[shape])  # type: ignore[arg-type]
    out, h_n = dequantized(model)
    expected_out, expected_h_n = float_reference(model)
    assert (out - expected_out).abs().max().item() < max_error
    assert (h_n - expected_h_n).abs().max().item() < max_error
    if model.lengths is not None:  # padded steps dequantize to exactly 0, like nn.GRU's padding
        padded = torch.arange(out.shape[0]).unsqueeze(1) >= model.lengths
        assert torch.all(out[padded] == 0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_float_gru_at_8_bits(shape: str) -> None:
    # nn.GRU's own initialisation range, 1/sqrt(H): with the wider +-0.6 of the other tests,
    # two 8-bit layers accumulate about one code of error per operator (checked exactly by
    # test_every_operator_against_python_integers) to a cosine of 0.9990 on some seeds.
    model = make_model(CONFIG_8, weight_range=0.25, **SHAPES[shape])  # type: ignore[arg-type]
    out, h_n = dequantized(model)
    expected_out, expected_h_n = float_reference(model)
    assert _cosine(out, expected_out) > 0.999
    assert _cosine(h_n, expected_h_n) > 0.999


# --- traces -------------------------------------------------------------------------------------


def test_trace_shapes_and_consistency() -> None:
    lengths = [7, 3, 5, 1]
    model = make_model(CONFIG_8, lengths=lengths)
    out_codes, h_n_codes, traces = run_integer(model, trace=True)
    assert traces is not None and len(traces) == 4
    steps, batch, inputs, hidden = 7, 4, 5, 16
    assert out_codes.shape == (steps, batch, 2 * hidden) and out_codes.dtype == torch.int64
    assert h_n_codes.shape == (4, batch, hidden) and h_n_codes.dtype == torch.int64
    wide = {"input.x", "matmul.Wx", "matmul.Rh", "op.Rh_add_br"}
    padded = torch.arange(steps).unsqueeze(1) >= torch.tensor(lengths)
    for index, (trace, program) in enumerate(zip(traces, model.programs, strict=True)):
        assert set(trace) == set(TRACED_OPERATORS)
        for name, codes in trace.items():
            width = {"input.x": inputs if index < 2 else 2 * hidden}.get(
                name, 3 * hidden if name in wide else hidden
            )
            assert codes.shape == (steps, batch, width), name
            assert codes.dtype == torch.int64
            fmt = program.formats[name]
            assert torch.all((codes >= fmt.qmin) & (codes <= fmt.qmax)), name
            assert torch.all(codes[padded] == fmt.zero_point), name
        # h_n is output.h at the last step processed: t = L - 1 forward, t = 0 reverse
        last = [length - 1 for length in lengths] if index % 2 == 0 else [0] * batch
        for b, t in enumerate(last):
            assert torch.equal(h_n_codes[index, b], trace["output.h"][t, b])
    assert torch.equal(out_codes[..., :hidden], traces[2]["output.h"])
    assert torch.equal(out_codes[..., hidden:], traces[3]["output.h"])


def test_trace_off_returns_none_and_same_codes() -> None:
    model = make_model(CONFIG_8, lengths=[7, 3, 5, 1])
    out, h_n, traces = run_integer(model)
    out_traced, h_n_traced, _ = run_integer(model, trace=True)
    assert traces is None
    assert torch.equal(out, out_traced) and torch.equal(h_n, h_n_traced)


# --- §7 and §8 recomputed with Python integers from the traces ----------------------------------


def py_table(table: Table, q: int) -> int:
    y = table.y.tolist()
    d = q - table.c_lo
    if d <= 0:
        return y[0]
    if d >= SEGMENTS * 2**table.k:
        return y[-1]
    j, r = divmod(d, 2**table.k)
    return y[j] + py_rshr((y[j + 1] - y[j]) * r, table.k)


def py_step(program: DirectionProgram, x: list[int], h: list[int]) -> dict[str, list[int]]:
    """§7 for one sequence, scalar Python integers, from input.x and previous output.h codes."""
    fmt, terms, tables = program.formats, program.terms, program.tables
    hid = program.hidden_size

    def hat(name: str, q: int) -> int:
        return q - fmt[name].zero_point

    def q(name: str, *values: int) -> int:
        return min(max(fmt[name].zero_point + sum(values), fmt[name].qmin), fmt[name].qmax)

    def single(term: Term, a: int, ch: int = 0) -> int:
        return py_term(py_rshr(a, term.operand_shifts[0]), term, ch)

    def prod(term: Term, a: int, c: int) -> int:
        return py_rshr(a, term.operand_shifts[0]) * py_rshr(c, term.operand_shifts[1])

    def dot(term: Term, row: list[int], vec: list[int], ch: int) -> int:
        return py_term(sum(prod(term, a, c) for a, c in zip(row, vec, strict=True)), term, ch)

    w, r_mat = program.weight_W.tolist(), program.weight_R.tolist()
    bw, br = program.bias_w.tolist(), program.bias_r.tolist()
    xh = [hat("input.x", v) for v in x]
    hh = [hat("output.h", v) for v in h]
    t_wx, t_bw = terms["matmul.Wx"]
    wx = [q("matmul.Wx", dot(t_wx, w[j], xh, j), single(t_bw, bw[j], j)) for j in range(3 * hid)]
    rh = [q("matmul.Rh", dot(terms["matmul.Rh"][0], r_mat[j], hh, j)) for j in range(3 * hid)]
    t_rh, t_br = terms["op.Rh_add_br"]
    rb = [
        q("op.Rh_add_br", single(t_rh, hat("matmul.Rh", rh[j])), single(t_br, br[j], j))
        for j in range(3 * hid)
    ]
    v: dict[str, list[int]] = {"matmul.Wx": wx, "matmul.Rh": rh, "op.Rh_add_br": rb}
    for name, gate in (("gate.r_pre", 0), ("gate.z_pre", 1)):
        t1, t2 = terms[name]
        v[name] = [
            q(
                name,
                single(t1, hat("matmul.Wx", wx[gate * hid + i])),
                single(t2, hat("op.Rh_add_br", rb[gate * hid + i])),
            )
            for i in range(hid)
        ]
    v["gate.r_out"] = [py_table(tables["gate.r_out"], c) for c in v["gate.r_pre"]]
    v["gate.z_out"] = [py_table(tables["gate.z_out"], c) for c in v["gate.z_pre"]]
    rr = [hat("gate.r_out", c) for c in v["gate.r_out"]]
    zz = [hat("gate.z_out", c) for c in v["gate.z_out"]]
    (t_rrh,) = terms["op.rRh"]
    v["op.rRh"] = [
        q("op.rRh", py_term(prod(t_rrh, rr[i], hat("op.Rh_add_br", rb[2 * hid + i])), t_rrh, 0))
        for i in range(hid)
    ]
    t1, t2 = terms["gate.g_pre"]
    v["gate.g_pre"] = [
        q(
            "gate.g_pre",
            single(t1, hat("matmul.Wx", wx[2 * hid + i])),
            single(t2, hat("op.rRh", v["op.rRh"][i])),
        )
        for i in range(hid)
    ]
    v["gate.g_out"] = [py_table(tables["gate.g_out"], c) for c in v["gate.g_pre"]]
    gg = [hat("gate.g_out", c) for c in v["gate.g_out"]]
    (t_old,) = terms["op.old_contrib"]
    v["op.old_contrib"] = [
        q("op.old_contrib", py_term(prod(t_old, zz[i], hh[i]), t_old, 0)) for i in range(hid)
    ]
    t_g, t_zg = terms["op.new_contrib"]
    v["op.new_contrib"] = [
        q("op.new_contrib", single(t_g, gg[i]), py_term(-prod(t_zg, zz[i], gg[i]), t_zg, 0))
        for i in range(hid)
    ]
    t_old_h, t_new_h = terms["output.h"]
    v["output.h"] = [
        q(
            "output.h",
            single(t_old_h, hat("op.old_contrib", v["op.old_contrib"][i])),
            single(t_new_h, hat("op.new_contrib", v["op.new_contrib"][i])),
        )
        for i in range(hid)
    ]
    return v


def py_layer_input(
    program: DirectionProgram, below: list[tuple[DirectionProgram, list[int]]]
) -> list[int]:
    """§8's layer boundary for one step and sequence, Python integers."""
    fmt = program.formats["input.x"]
    codes: list[int] = []
    for (below_program, h), term in zip(below, program.terms["input.x"], strict=True):
        zp = below_program.formats["output.h"].zero_point
        for value in h:
            t = py_term(py_rshr(value - zp, term.operand_shifts[0]), term, 0)
            codes.append(min(max(fmt.zero_point + t, fmt.qmin), fmt.qmax))
    return codes


ORACLE_CONFIGS: dict[str, Callable[[], GRUQuantConfig]] = {
    "8bit": lambda: CONFIG_8,
    "16bit-pot": lambda: CONFIG_16_POT,
    # small power-of-two shifts make exact ties of rshr common, e.g. where -(z g) and z g round
    # differently (§5)
    "5bit-pot": lambda: dataclasses.replace(
        CONFIG_8.with_all_bitwidth(5, is_symmetric=False), scale_type="pot"
    ),
    "32bit": lambda: CONFIG_32,
    "mixed": lambda: (
        CONFIG_8.replace_operator("weight.W", bitwidth=32)
        .replace_operator("input.x", bitwidth=32)
        .replace_operator("gate.z_out", bitwidth=31)
        .replace_operator("gate.g_out", bitwidth=32)
        .replace_operator("gate.g_pre", bitwidth=12)
        .replace_operator("op.rRh", bitwidth=5, is_symmetric=True)
    ),
}


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_every_operator_against_python_integers(name: str) -> None:
    """Each traced operator at each valid step equals §7 recomputed with Python integers from
    that step's traced inputs; layer inputs equal §8's boundary of the traced outputs below."""
    lengths = [4, 2, 3]
    model = make_model(ORACLE_CONFIGS[name](), lengths=lengths, sizes=(4, 3, 3, 4), seed=1)
    _, _, traces = run_integer(model, trace=True)
    assert traces is not None and model.h0 is not None
    h0_codes = torch.stack(
        [_quantize_with(model.h0[i], p, "output.h") for i, p in enumerate(model.programs)]
    )
    if name == "32bit":
        assert model.programs[0].terms["matmul.Wx"][0].operand_shifts != (0, 0)
    for index, (trace, program) in enumerate(zip(traces, model.programs, strict=True)):
        reverse = index % 2 == 1
        for b, length in enumerate(lengths):
            h = h0_codes[index, b].tolist()
            for t in range(length - 1, -1, -1) if reverse else range(length):
                if index >= 2:
                    below = [
                        (model.programs[d], traces[d]["output.h"][t, b].tolist()) for d in (0, 1)
                    ]
                    assert trace["input.x"][t, b].tolist() == py_layer_input(program, below)
                values = py_step(program, trace["input.x"][t, b].tolist(), h)
                for op, expected in values.items():
                    assert trace[op][t, b].tolist() == expected, (index, b, t, op)
                h = values["output.h"]
