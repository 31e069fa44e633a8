"""The plain-PyTorch integer GRU (kernels/torch/quant_gru.py) against independent oracles:
Python-int arithmetic for §3, §4, §6 and every operator of §7 and §8, and nn.GRU in float."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from quant_gru.calibration.minmax import direction_quant
from quant_gru.config import GRUQuantConfig
from quant_gru.kernels.torch.quant_gru import (
    TRACED_OPERATORS,
    apply_term,
    exact_int_matmul,
    quantized_gru,
    rounding_right_shift,
    saturating_left_shift,
    table_lookup,
)
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.program import ActivationFormat, DirectionProgram, build_program
from quant_gru.quantize.requant import Term
from quant_gru.quantize.scales import dequantize, quantize
from quant_gru.quantize.tables import Table

LIMIT = 1 << 60

# --- Python-int oracles ------------------------------------------------------------------------


def rshr(v: int, n: int) -> int:
    """§3 literally: (v + 2^(n-1)) >> n on unbounded Python ints."""
    return v if n == 0 else (v + (1 << (n - 1))) >> n


def term_of(v: int, m: int, n: int, p: int) -> int:
    """§4 on Python ints: pre-shift, multiply, shift (either way), clamp to +-2^60."""
    w = rshr(v, p) * m
    t = rshr(w, n) if n >= 1 else w * 2 ** (-n)
    return max(-LIMIT, min(LIMIT, t))


def lookup(table: Table, q: int) -> int:
    """§6 evaluation on Python ints."""
    y = [int(v) for v in table.y.tolist()]
    d = q - table.c_lo
    if d <= 0:
        return y[0]
    if d >= (len(y) - 1) << table.k:
        return y[-1]
    j = d >> table.k
    r = d - (j << table.k)
    return y[j] + rshr((y[j + 1] - y[j]) * r, table.k)


# --- §3, §4, §6 and the exact matmul -----------------------------------------------------------


def test_rounding_right_shift_ties_and_large_shifts() -> None:
    rng = random.Random(1)
    values, shifts = [], []
    for _ in range(3000):
        n = rng.randrange(0, 70)
        kind = rng.randrange(3)
        if kind == 0 and 1 <= n <= 61:  # an exact tie, either sign
            v = (2 * rng.randrange(-(1 << (61 - n)), 1 << (61 - n)) + 1) << (n - 1)
        elif kind == 1:
            v = rng.choice([0, 1, -1, (1 << 62) - 1, -(1 << 62) + 1, 3, -3])
        else:
            v = rng.randrange(-(1 << 62) + 1, 1 << 62)
        values.append(v)
        shifts.append(n)
    v = torch.tensor(values)
    expected = [rshr(a, n) for a, n in zip(values, shifts, strict=True)]
    assert rounding_right_shift(v, torch.tensor(shifts)).tolist() == expected
    for n in (0, 1, 2, 31, 62, 63, 64, 100):
        assert rounding_right_shift(v, n).tolist() == [rshr(a, n) for a in values]
    small = torch.tensor([-3, -1, 3, -2, -5, 5])
    assert rounding_right_shift(small, 1).tolist() == [-1, 0, 2, -1, -2, 3]


def test_saturating_left_shift_and_terms() -> None:
    rng = random.Random(2)
    values = [rng.choice([0, 1, -1, (1 << 61), -(1 << 61)]) for _ in range(50)]
    values += [rng.randrange(-(1 << rng.randrange(62)), 1 << rng.randrange(62)) for _ in range(950)]
    v = torch.tensor(values)
    for s in (0, 1, 2, 30, 59, 60, 61, 62, 63, 90):
        expected = [max(-LIMIT, min(LIMIT, a * 2**s)) for a in values]
        assert saturating_left_shift(v, s).tolist() == expected
    shifts = [rng.randrange(0, 80) for _ in values]
    expected = [max(-LIMIT, min(LIMIT, a * 2**s)) for a, s in zip(values, shifts, strict=True)]
    assert saturating_left_shift(v, torch.tensor(shifts)).tolist() == expected

    # Whole terms, per channel, with shifts of both signs and pre-shifts; negated terms.
    channels = 64
    for trial in range(40):
        p = rng.choice([0, 0, 1, 5, 30])
        m = [rng.choice([1, rng.randrange(1 << 30, 1 << 31)]) for _ in range(channels)]
        n = [rng.choice([-70, -40, -3, 0, 1, 2, 3, 17, 40, 62, 63, 80]) for _ in range(channels)]
        if trial % 2:
            m, n = m[:1], n[:1]
        term = Term(torch.tensor(m), torch.tensor(n), p, (0, 0))
        rows = [
            [rng.randrange(-(1 << (31 + p)), (1 << (31 + p)) + 1) for _ in range(channels)]
            for _ in range(8)
        ]
        rows[0] = [(2 * rng.randrange(-1000, 1000) + 1) << max(p - 1, 0) for _ in range(channels)]
        negate = trial % 4 >= 2
        got = apply_term(torch.tensor(rows), term, negate=negate).tolist()
        for row, got_row in zip(rows, got, strict=True):
            for c, a in enumerate(row):
                k = c if len(m) > 1 else 0
                assert got_row[c] == term_of(-a if negate else a, m[k], n[k], p)


@pytest.mark.parametrize(
    ("a_bits", "b_bits", "depth"),
    [(8, 8, 300), (16, 16, 64), (24, 24, 8), (32, 16, 4), (32, 24, 32), (32, 28, 2), (31, 31, 1)],
)
def test_exact_int_matmul_matches_python_ints(a_bits: int, b_bits: int, depth: int) -> None:
    rng = np.random.default_rng(a_bits * 100 + b_bits)

    def operand(bits: int, shape: tuple[int, ...]) -> np.ndarray:
        values = rng.integers(-(1 << bits), (1 << bits) + 1, size=shape, dtype=np.int64)
        extremes = [-(1 << bits), 1 << bits, (1 << (bits - 1)) - 1, -(1 << (bits - 1)), 0]
        flat = values.reshape(-1)
        flat[: min(5, flat.size)] = extremes[: min(5, flat.size)]
        return values

    a = operand(a_bits, (3, 5, depth))
    b = operand(b_bits, (depth, 7))
    bound = a_bits + b_bits + (depth - 1).bit_length()
    expected = np.matmul(a.astype(object), b.astype(object))
    for bits in ((a_bits, b_bits), None):
        got = exact_int_matmul(torch.from_numpy(a), torch.from_numpy(b), bound, bits)
        assert got.dtype == torch.int64
        assert (got.numpy().astype(object) == expected).all()
        # All-extreme operands: the bound is reached.
        top = np.full((2, depth), -(1 << a_bits), dtype=np.int64)
        right = np.full((depth, 3), -(1 << b_bits), dtype=np.int64)
        got = exact_int_matmul(torch.from_numpy(top), torch.from_numpy(right), bound, bits)
        assert got.tolist() == np.matmul(top.astype(object), right.astype(object)).tolist()


def test_exact_int_matmul_refuses_results_beyond_int64() -> None:
    a = torch.ones(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="62 bits"):
        exact_int_matmul(a, a.T, 63)


def test_table_lookup_matches_python_ints() -> None:
    rng = random.Random(3)
    for k in (0, 1, 3, 7, 12, 23):
        for _ in range(3):
            c_lo = rng.randrange(-(1 << 31), 1 << 20)
            high = rng.choice([255, 65535, (1 << 32) - 1])
            y = sorted(rng.randrange(0, high + 1) for _ in range(513))
            if rng.random() < 0.5:
                y = [rng.randrange(-(1 << 31), 1 << 31) for _ in range(513)]
            table = Table(c_lo, k, torch.tensor(y))
            span = 512 << k
            codes = [rng.randrange(c_lo - 10, c_lo + span + 10) for _ in range(400)]
            codes += [c_lo, c_lo - 1, c_lo + 1, c_lo + span, c_lo + span - 1, c_lo + span + 1]
            codes += [c_lo + (j << k) + (1 << k) // 2 for j in range(0, 512, 37)]
            got = table_lookup(table, torch.tensor(codes)).tolist()
            assert got == [lookup(table, q) for q in codes]


# --- whole model: calibration from a float run, programs, codes --------------------------------


def _weights(gru: nn.GRU, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return tuple(getattr(gru, name + suffix).detach() for name in names)  # type: ignore[return-value]


def _valid(steps: int, batch: int, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        return torch.ones(steps, batch, dtype=torch.bool)
    return torch.arange(steps).unsqueeze(1) < lengths.cpu().unsqueeze(0)


def _calibrate(
    gru: nn.GRU, x: Tensor, h0: Tensor, lengths: Tensor | None
) -> list[dict[str, tuple[float, float]]]:
    """Ranges of every operator of §7, from a float64 run step by step, widened by 10%."""
    steps, batch, _ = x.shape
    hidden, num_dirs = gru.hidden_size, 2 if gru.bidirectional else 1
    valid = _valid(steps, batch, lengths)
    layer_input = x.double().cpu()
    ranges = []
    for layer in range(gru.num_layers):
        outputs = []
        for direction in range(num_dirs):
            w, r, bw, br = (p.double().cpu() for p in _weights(gru, layer, direction))
            h = h0[layer * num_dirs + direction].double().cpu()
            seen: dict[str, list[Tensor]] = {"output.h": [h.reshape(-1)]}

            def note(name: str, value: Tensor, mask: Tensor, seen: dict = seen) -> None:
                seen.setdefault(name, []).append(value[mask].reshape(-1))

            wx = layer_input @ w.T + bw
            note("input.x", layer_input, valid)
            note("matmul.Wx", wx, valid)
            out = torch.zeros(steps, batch, hidden, dtype=torch.float64)
            for t in range(steps - 1, -1, -1) if direction else range(steps):
                m = valid[t]
                rh = h @ r.T
                rb = rh + br
                r_pre = wx[t, :, :hidden] + rb[:, :hidden]
                z_pre = wx[t, :, hidden : 2 * hidden] + rb[:, hidden : 2 * hidden]
                gate_r, gate_z = torch.sigmoid(r_pre), torch.sigmoid(z_pre)
                rrh = gate_r * rb[:, 2 * hidden :]
                g_pre = wx[t, :, 2 * hidden :] + rrh
                g = torch.tanh(g_pre)
                old, new = gate_z * h, (1 - gate_z) * g
                h_next = old + new
                values = {
                    "matmul.Rh": rh,
                    "op.Rh_add_br": rb,
                    "gate.r_pre": r_pre,
                    "gate.z_pre": z_pre,
                    "gate.r_out": gate_r,
                    "gate.z_out": gate_z,
                    "op.rRh": rrh,
                    "gate.g_pre": g_pre,
                    "gate.g_out": g,
                    "op.old_contrib": old,
                    "op.new_contrib": new,
                    "output.h": h_next,
                }
                for name, value in values.items():
                    note(name, value, m)
                h = torch.where(m.unsqueeze(1), h_next, h)
                out[t] = torch.where(m.unsqueeze(1), h_next, torch.zeros_like(h_next))
            outputs.append(out)
            found = {}
            for name, parts in seen.items():
                every = torch.cat(parts)
                low, high = every.min().item(), every.max().item()
                margin = 0.1 * (high - low)
                found[name] = (low - margin, high + margin)
            ranges.append(found)
        layer_input = torch.cat(outputs, dim=-1)
    return ranges


def _programs(
    gru: nn.GRU, ranges: Sequence[dict[str, tuple[float, float]]], config: GRUQuantConfig
) -> list[DirectionProgram]:
    num_dirs = 2 if gru.bidirectional else 1
    quants: list[DirectionQuant] = []
    programs = []
    for index, found in enumerate(ranges):
        layer, direction = divmod(index, num_dirs)
        weights = tuple(w.float().cpu() for w in _weights(gru, layer, direction))
        quant = direction_quant(found, weights, config)  # type: ignore[arg-type]
        below = [quants[(layer - 1) * num_dirs + d]["output.h"] for d in range(num_dirs) if layer]
        programs.append(build_program(weights, quant, config.scale_type, below))  # type: ignore[arg-type]
        quants.append(quant)
    return programs


def _encode(values: Tensor, fmt: ActivationFormat) -> Tensor:
    return quantize(values, fmt.scale, fmt.zero_point, fmt.qmin, fmt.qmax)


def _decode(codes: Tensor, fmt: ActivationFormat) -> Tensor:
    return dequantize(codes, fmt.scale, fmt.zero_point)


def _setup(
    config: GRUQuantConfig,
    layers: int = 2,
    bidirectional: bool = True,
    sizes: tuple[int, int, int, int] = (7, 12, 10, 5),
    lengths: Sequence[int] | None = (10, 4, 7, 1, 9),
    seed: int = 0,
) -> tuple[nn.GRU, Tensor, Tensor, Tensor | None, list[DirectionProgram]]:
    input_size, hidden, steps, batch = sizes
    torch.manual_seed(seed)
    gru = nn.GRU(input_size, hidden, layers, bidirectional=bidirectional).double()
    num_dirs = 2 if bidirectional else 1
    x = torch.randn(steps, batch, input_size, dtype=torch.float64)
    h0 = 0.5 * torch.randn(layers * num_dirs, batch, hidden, dtype=torch.float64)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    programs = _programs(gru, _calibrate(gru, x, h0, lens), config)
    return gru, x, h0, lens, programs


def _run(
    programs: Sequence[DirectionProgram],
    x: Tensor,
    h0: Tensor,
    lengths: Tensor | None,
    layers: int,
    bidirectional: bool,
    device: torch.device,
    trace: bool = False,
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]] | None]:
    x_codes = _encode(x, programs[0].formats["input.x"]).to(device)
    h0_codes = torch.stack(
        [_encode(h0[i], p.formats["output.h"]) for i, p in enumerate(programs)]
    ).to(device)
    lens = None if lengths is None else lengths.to(device)
    out, h_n, traces = quantized_gru(
        programs, x_codes, h0_codes, lens, layers, bidirectional, trace
    )
    assert out.device.type == device.type and h_n.device.type == device.type
    cpu_traces = None if traces is None else [{k: v.cpu() for k, v in t.items()} for t in traces]
    return out.cpu(), h_n.cpu(), cpu_traces


def _reference_float(
    gru: nn.GRU, x: Tensor, h0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    if lengths is None:
        return gru(x, h0)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h_n = gru(packed, h0)
    out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    return out, h_n


def _dequantized(
    programs: Sequence[DirectionProgram], out: Tensor, h_n: Tensor, num_dirs: int
) -> tuple[Tensor, Tensor]:
    hidden = programs[0].hidden_size
    last = programs[-num_dirs:]
    values = torch.cat(
        [
            _decode(out[..., d * hidden : (d + 1) * hidden], p.formats["output.h"])
            for d, p in enumerate(last)
        ],
        dim=-1,
    )
    finals = torch.stack([_decode(h_n[i], p.formats["output.h"]) for i, p in enumerate(programs)])
    return values, finals


FLOAT_CASES = {
    "float16": (GRUQuantConfig.default().with_all_bitwidth(16, is_symmetric=False), "max", 2e-3),
    "pot16": (
        GRUQuantConfig.from_dict(
            {"GRU_config": {"default_config": {"scale_type": "pot"}}}
        ).with_all_bitwidth(16, is_symmetric=False),
        "max",
        2e-3,
    ),
    "float8": (GRUQuantConfig.default(), "cosine", 0.999),
    "pot8": (
        GRUQuantConfig.from_dict({"GRU_config": {"default_config": {"scale_type": "pot"}}}),
        "cosine",
        0.99,  # power-of-two scales are up to 2x coarser than float ones: about 7 bits
    ),
}


@pytest.mark.parametrize("case", list(FLOAT_CASES))
@pytest.mark.parametrize("packed", [False, True])
def test_agrees_with_float_gru(case: str, packed: bool, device: torch.device) -> None:
    config, metric, threshold = FLOAT_CASES[case]
    lengths = (10, 4, 7, 1, 9) if packed else None
    gru, x, h0, lens, programs = _setup(config, lengths=lengths, seed=len(case))
    out, h_n, _ = _run(programs, x, h0, lens, 2, True, device)
    values, finals = _dequantized(programs, out, h_n, 2)
    with torch.no_grad():
        expected, expected_h = _reference_float(gru, x, h0, lens)
    valid = _valid(x.shape[0], x.shape[1], lens)
    pairs = [(values[valid], expected[valid]), (finals, expected_h)]
    for got, want in pairs:
        if metric == "max":
            assert (got - want).abs().max().item() < threshold
        else:
            cosine = torch.nn.functional.cosine_similarity(got.reshape(-1), want.reshape(-1), dim=0)
            assert cosine.item() > threshold
    if lens is not None:  # padded steps hold zp(output.h)
        zero_points = torch.tensor([p.formats["output.h"].zero_point for p in programs[-2:]])
        padded = out[~valid].view(-1, 2, programs[0].hidden_size)
        assert (padded == zero_points.view(1, 2, 1)).all()


# --- every operator against a Python-int evaluation of §7 and §8 ------------------------------

ORACLE_CASES = {
    "default8": GRUQuantConfig.default(),
    "asym16_pot_per_gate": GRUQuantConfig.from_dict(
        {"GRU_config": {"default_config": {"scale_type": "pot"}}}
    )
    .with_all_bitwidth(16, is_symmetric=False)
    .replace_operator("weight.W", granularity="per_gate"),
    "asym32_float": GRUQuantConfig.default().with_all_bitwidth(32, is_symmetric=False),
    "sym32_pot_per_tensor": GRUQuantConfig.from_dict(
        {"GRU_config": {"default_config": {"scale_type": "pot"}}}
    )
    .with_all_bitwidth(32, is_symmetric=True)
    .replace_operator("weight.R", granularity="per_tensor"),
    "mixed": GRUQuantConfig.default()
    .replace_operator("matmul.Rh", bitwidth=24)
    .replace_operator("output.h", bitwidth=12)
    .replace_operator("gate.g_pre", bitwidth=20)
    .replace_operator("op.new_contrib", bitwidth=3, is_symmetric=True)
    .replace_operator("gate.z_out", bitwidth=30),
}


def _q(fmt: ActivationFormat, terms: Sequence[int]) -> int:
    return max(fmt.qmin, min(fmt.qmax, fmt.zero_point + sum(terms)))


def _t(term: Term, v: int, channel: int = 0, negate: bool = False) -> int:
    k = channel if term.m.numel() > 1 else 0
    return term_of(-v if negate else v, int(term.m[k]), int(term.n[k]), term.pre_shift)


def _dot(weights: list[int], operand: list[int], shifts: tuple[int, int]) -> int:
    return sum(
        rshr(w, shifts[0]) * rshr(a, shifts[1]) for w, a in zip(weights, operand, strict=True)
    )


def _check_step(
    p: DirectionProgram, trace: dict[str, Tensor], h_prev: list[int], t: int, b: int
) -> None:
    """Recompute every operator of step t, sequence b from the trace's inputs (§7)."""
    f, terms, hidden = p.formats, p.terms, p.hidden_size

    def code(name: str, channel: int) -> int:
        return int(trace[name][t, b, channel])

    def hat(name: str, channel: int) -> int:
        return code(name, channel) - f[name].zero_point

    x_hat = [int(v) - f["input.x"].zero_point for v in trace["input.x"][t, b].tolist()]
    h_hat = [v - f["output.h"].zero_point for v in h_prev]
    w, r = p.weight_W.tolist(), p.weight_R.tolist()
    dot_x, bias_x = terms["matmul.Wx"]
    (dot_h,) = terms["matmul.Rh"]
    rb_rh, rb_br = terms["op.Rh_add_br"]
    for j in range(3 * hidden):
        wx = _q(
            f["matmul.Wx"],
            [
                _t(dot_x, _dot(w[j], x_hat, dot_x.operand_shifts), j),
                _t(bias_x, int(p.bias_w[j]), j),
            ],
        )
        assert code("matmul.Wx", j) == wx, ("matmul.Wx", t, b, j)
        rh = _q(f["matmul.Rh"], [_t(dot_h, _dot(r[j], h_hat, dot_h.operand_shifts), j)])
        assert code("matmul.Rh", j) == rh, ("matmul.Rh", t, b, j)
        rb = _q(f["op.Rh_add_br"], [_t(rb_rh, hat("matmul.Rh", j)), _t(rb_br, int(p.bias_r[j]), j)])
        assert code("op.Rh_add_br", j) == rb, ("op.Rh_add_br", t, b, j)
    for i in range(hidden):
        expected: dict[str, int] = {}
        for gate, offset in (("r", 0), ("z", hidden)):
            pre_terms = terms[f"gate.{gate}_pre"]
            expected[f"gate.{gate}_pre"] = _q(
                f[f"gate.{gate}_pre"],
                [
                    _t(pre_terms[0], hat("matmul.Wx", offset + i)),
                    _t(pre_terms[1], hat("op.Rh_add_br", offset + i)),
                ],
            )
            expected[f"gate.{gate}_out"] = lookup(
                p.tables[f"gate.{gate}_out"], code(f"gate.{gate}_pre", i)
            )
        (rrh,) = terms["op.rRh"]
        e_a, e_c = rrh.operand_shifts
        product = rshr(hat("gate.r_out", i), e_a) * rshr(hat("op.Rh_add_br", 2 * hidden + i), e_c)
        expected["op.rRh"] = _q(f["op.rRh"], [_t(rrh, product)])
        g_wx, g_rrh = terms["gate.g_pre"]
        expected["gate.g_pre"] = _q(
            f["gate.g_pre"],
            [_t(g_wx, hat("matmul.Wx", 2 * hidden + i)), _t(g_rrh, hat("op.rRh", i))],
        )
        expected["gate.g_out"] = lookup(p.tables["gate.g_out"], code("gate.g_pre", i))
        (old,) = terms["op.old_contrib"]
        e_a, e_c = old.operand_shifts
        product = rshr(hat("gate.z_out", i), e_a) * rshr(h_hat[i], e_c)
        expected["op.old_contrib"] = _q(f["op.old_contrib"], [_t(old, product)])
        new_g, new_zg = terms["op.new_contrib"]
        e_a, e_c = new_zg.operand_shifts
        product = rshr(hat("gate.z_out", i), e_a) * rshr(hat("gate.g_out", i), e_c)
        expected["op.new_contrib"] = _q(
            f["op.new_contrib"],
            [_t(new_g, hat("gate.g_out", i)), _t(new_zg, product, negate=True)],
        )
        h_old, h_new = terms["output.h"]
        expected["output.h"] = _q(
            f["output.h"],
            [_t(h_old, hat("op.old_contrib", i)), _t(h_new, hat("op.new_contrib", i))],
        )
        for name, value in expected.items():
            assert code(name, i) == value, (name, t, b, i)


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_every_operator_matches_python_ints(case: str, device: torch.device) -> None:
    layers, num_dirs = 2, 2
    _, x, h0, lens, programs = _setup(
        ORACLE_CASES[case], sizes=(6, 4, 5, 3), lengths=(5, 2, 4), seed=7
    )
    assert lens is not None
    out, h_n, traces = _run(programs, x, h0, lens, layers, True, device, trace=True)
    assert traces is not None and len(traces) == layers * num_dirs
    untraced = _run(programs, x, h0, lens, layers, True, device)
    assert torch.equal(untraced[0], out) and torch.equal(untraced[1], h_n)
    h0_codes = torch.stack([_encode(h0[i], p.formats["output.h"]) for i, p in enumerate(programs)])
    hidden = programs[0].hidden_size
    for index, (program, trace) in enumerate(zip(programs, traces, strict=True)):
        layer, direction = divmod(index, num_dirs)
        assert set(trace) == set(TRACED_OPERATORS)
        for b, length in enumerate(lens.tolist()):
            for t in range(x.shape[0]):
                if t >= length:  # padded: every operator holds its zero point
                    for name, values in trace.items():
                        assert (values[t, b] == program.formats[name].zero_point).all(), name
                    continue
                first = t == (length - 1 if direction else 0)
                neighbour = t + 1 if direction else t - 1
                previous = h0_codes[index, b] if first else trace["output.h"][neighbour, b]
                _check_step(program, trace, previous.tolist(), t, b)
            last = 0 if direction else length - 1
            assert h_n[index, b].tolist() == trace["output.h"][last, b].tolist()
        if layer:  # §8: input.x from the layer below, one term per direction block
            fmt = program.formats["input.x"]
            for d in range(num_dirs):
                below = traces[(layer - 1) * num_dirs + d]["output.h"]
                zp = programs[(layer - 1) * num_dirs + d].formats["output.h"].zero_point
                term = program.terms["input.x"][d]
                valid = _valid(x.shape[0], x.shape[1], lens)
                for t, b in zip(*torch.nonzero(valid, as_tuple=True), strict=True):
                    for i in range(hidden):
                        want = _q(fmt, [_t(term, int(below[t, b, i]) - zp)])
                        assert int(trace["input.x"][t, b, d * hidden + i]) == want
        else:
            x_codes = _encode(x, program.formats["input.x"])
            valid = _valid(x.shape[0], x.shape[1], lens).unsqueeze(-1)
            assert torch.equal(
                trace["input.x"],
                torch.where(
                    valid, x_codes, x_codes.new_tensor(program.formats["input.x"].zero_point)
                ),
            )
    for d in range(num_dirs):
        last = traces[(layers - 1) * num_dirs + d]["output.h"]
        assert torch.equal(out[..., d * hidden : (d + 1) * hidden], last)


def test_single_layer_without_lengths_or_hx(device: torch.device) -> None:
    """Without lengths every step is computed; h0 = zp(output.h) when no hx is given."""
    config = GRUQuantConfig.default().with_all_bitwidth(16, is_symmetric=False)
    gru, x, _, _, programs = _setup(config, layers=1, bidirectional=False, lengths=None, seed=3)
    zeros = torch.zeros(1, x.shape[1], gru.hidden_size, dtype=torch.float64)
    programs = _programs(gru, _calibrate(gru, x, zeros, None), config)
    out, h_n, traces = _run(programs, x, zeros, None, 1, False, device, trace=True)
    assert traces is not None
    h0_codes = _encode(zeros[0], programs[0].formats["output.h"])
    assert (h0_codes == programs[0].formats["output.h"].zero_point).all()
    for t in range(x.shape[0]):
        previous = h0_codes if t == 0 else traces[0]["output.h"][t - 1]
        for b in range(x.shape[1]):
            _check_step(programs[0], traces[0], previous[b].tolist(), t, b)
    values, finals = _dequantized(programs, out, h_n, 1)
    with torch.no_grad():
        expected, expected_h = gru(x)
    assert (values - expected).abs().max().item() < 2e-3
    assert (finals - expected_h).abs().max().item() < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["default8", "asym32_float", "mixed"])
def test_cuda_codes_equal_cpu_codes(case: str) -> None:
    _, x, h0, lens, programs = _setup(ORACLE_CASES[case], sizes=(9, 16, 12, 6), lengths=None)
    lens = torch.tensor([12, 3, 11, 1, 7, 12])
    on_cpu = _run(programs, x, h0, lens, 2, True, torch.device("cpu"), trace=True)
    on_gpu = _run(programs, x, h0, lens, 2, True, torch.device("cuda"), trace=True)
    assert torch.equal(on_cpu[0], on_gpu[0]) and torch.equal(on_cpu[1], on_gpu[1])
    assert on_cpu[2] is not None and on_gpu[2] is not None
    for cpu_trace, gpu_trace in zip(on_cpu[2], on_gpu[2], strict=True):
        for name in TRACED_OPERATORS:
            assert torch.equal(cpu_trace[name], gpu_trace[name]), name
