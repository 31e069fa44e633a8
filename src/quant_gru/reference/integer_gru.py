"""The integer reference of the quantized GRU: README.md §3 to §8, literally, on int64 CPU tensors.

This is the oracle the other realizations are held to. It favours clarity over speed: every
requantization goes through `_term` (§4) and `_operator` (§5), every activation through
`_table` (§6), and nothing inside the time loop touches a float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from quant_gru.quantize.program import ACTIVATION_OPERATORS, ActivationFormat, DirectionProgram
from quant_gru.quantize.requant import TERM_LIMIT, Term
from quant_gru.quantize.tables import SEGMENTS, Table

__all__ = ["TRACED_OPERATORS", "integer_gru"]

# Operators recorded by the trace, in §7's order (input.x first).
TRACED_OPERATORS = ACTIVATION_OPERATORS

_SHIFT_TO_ZERO = 63  # §3: rshr(v, n) = 0 for n >= 63 when |v| < 2^62
_OPERAND_LIMIT = 2**62  # §3: every operand of rshr is below this in magnitude
_TERM_BITS = TERM_LIMIT.bit_length() - 1  # 60


# --- §3, §4, §5, §6: the arithmetic primitives --------------------------------------------------


def _rshr(v: Tensor, n: int | Tensor) -> Tensor:
    """Rounding right shift of §3, elementwise (`n` broadcasts against `v`, e.g. per channel).

    n >= 63 gives 0 and n = 0 gives v (§3); n < 0 is §4's saturated left shift,
    clamp(v * 2^(-n), -2^60, 2^60), computed without overflow by clamping v to 2^60 >> (-n)
    (to 1 once -n >= 60) before shifting.
    """
    if v.dtype != torch.int64:
        raise TypeError(f"rshr needs int64 operands, got {v.dtype}")
    if bool((v.abs() >= _OPERAND_LIMIT).any()):
        raise OverflowError("rshr operand reaches 2^62, outside the bounds of §4")
    shift = torch.as_tensor(n, dtype=torch.int64, device=v.device)
    v, shift = torch.broadcast_tensors(v, shift)
    one = torch.ones_like(shift)

    right = shift.clamp(1, _SHIFT_TO_ZERO - 1)
    half = torch.bitwise_left_shift(one, right - 1)
    rounded = torch.bitwise_right_shift(v + half, right)

    left = (-shift).clamp(0, _TERM_BITS)
    limit = torch.bitwise_left_shift(one, _TERM_BITS - left)
    saturated = torch.bitwise_left_shift(torch.minimum(torch.maximum(v, -limit), limit), left)

    result = torch.where(shift >= 1, rounded, torch.where(shift == 0, v, saturated))
    return torch.where(shift >= _SHIFT_TO_ZERO, torch.zeros_like(v), result)


def _term(v: Tensor, term: Term) -> Tensor:
    """One term of §4: v' = rshr(v, p), then clamp(rshr(v' * m, n), -2^60, 2^60).

    `v` is the term integer, made by the caller from operands already pre-shifted by
    `term.operand_shifts`; m and n broadcast along the last (channel) dimension.
    """
    scaled = _rshr(v, term.pre_shift) * term.m
    return _rshr(scaled, term.n).clamp(-TERM_LIMIT, TERM_LIMIT)


def _operator(fmt: ActivationFormat, terms_values: Sequence[Tensor]) -> Tensor:
    """An operator's code from its terms (§5): clamp(zp + t_1 + ... + t_J, qmin, qmax)."""
    total = torch.tensor(fmt.zero_point, dtype=torch.int64)
    for value in terms_values:
        total = total + value
    return total.clamp(fmt.qmin, fmt.qmax)


def _table(table: Table, q: Tensor) -> Tensor:
    """Evaluate the piecewise-linear table (c_lo, k, y_0..y_N) of §6 on codes `q`."""
    if table.y.numel() != SEGMENTS + 1:
        raise ValueError(f"a table has {SEGMENTS + 1} entries, got {table.y.numel()}")
    y = table.y.to("cpu", torch.int64)
    span = SEGMENTS << table.k
    d = q - table.c_lo
    inside = d.clamp(1, span - 1)
    j = torch.bitwise_right_shift(inside, table.k)
    r = inside - torch.bitwise_left_shift(j, table.k)
    low, high = y[j], y[j + 1]
    interpolated = low + _rshr((high - low) * r, table.k)
    return torch.where(d <= 0, y[0], torch.where(d >= span, y[SEGMENTS], interpolated))


# --- term integers of §7 ------------------------------------------------------------------------


def _hat(codes: Tensor, fmt: ActivationFormat) -> Tensor:
    """Zero-corrected value q - zp of §1."""
    return codes - fmt.zero_point


def _code_term(a: Tensor, term: Term) -> Tensor:
    """Term of a single zero-corrected code (§4; its operand shift is 0 by construction)."""
    return _term(_rshr(a, term.operand_shifts[0]), term)


def _product(a: Tensor, c: Tensor, term: Term) -> Tensor:
    """The integer a * c of a product term, from operands pre-shifted by (e_a, e_c) (§4)."""
    return _rshr(a, term.operand_shifts[0]) * _rshr(c, term.operand_shifts[1])


def _dot_term(weight: Tensor, c: Tensor, term: Term) -> Tensor:
    """Term of the dot products Σ_k weight[j, k] c[..., k] (§4); `weight` is already
    pre-shifted by operand_shifts[0] (once per call), `c` is shifted here."""
    return _term(torch.matmul(_rshr(c, term.operand_shifts[1]), weight.T), term)


# --- §7: one time step --------------------------------------------------------------------------


def _input_projection(program: DirectionProgram, weight_W: Tensor, x: Tensor) -> Tensor:
    """matmul.Wx of §7 for every step at once: (T, B, I) input.x codes -> (T, B, 3H) codes."""
    fmt = program.formats
    dot, bias = program.terms["matmul.Wx"]
    x_hat = _hat(x, fmt["input.x"])
    return _operator(
        fmt["matmul.Wx"],
        (_dot_term(weight_W, x_hat, dot), _code_term(_cpu_codes(program.bias_w), bias)),
    )


def _step(program: DirectionProgram, weight_R: Tensor, wx: Tensor, h: Tensor) -> dict[str, Tensor]:
    """One step of §7 from wx (B, 3H) and the previous state h (B, H), both codes.

    Returns the codes of every per-step operator; "output.h" is the new state.
    """
    fmt, terms, tables = program.formats, program.terms, program.tables
    hidden = program.hidden_size
    r_rows, z_rows, g_rows = slice(0, hidden), slice(hidden, 2 * hidden), slice(2 * hidden, None)
    h_hat = _hat(h, fmt["output.h"])
    wx_hat = _hat(wx, fmt["matmul.Wx"])

    (rh_dot,) = terms["matmul.Rh"]
    rh = _operator(fmt["matmul.Rh"], (_dot_term(weight_R, h_hat, rh_dot),))

    rh_term, br_term = terms["op.Rh_add_br"]
    rb = _operator(
        fmt["op.Rh_add_br"],
        (
            _code_term(_hat(rh, fmt["matmul.Rh"]), rh_term),
            _code_term(_cpu_codes(program.bias_r), br_term),
        ),
    )
    rb_hat = _hat(rb, fmt["op.Rh_add_br"])

    def gate_pre(name: str, rows: slice, second: Tensor) -> Tensor:
        first_term, second_term = terms[name]
        return _operator(
            fmt[name], (_code_term(wx_hat[:, rows], first_term), _code_term(second, second_term))
        )

    r_pre = gate_pre("gate.r_pre", r_rows, rb_hat[:, r_rows])
    z_pre = gate_pre("gate.z_pre", z_rows, rb_hat[:, z_rows])
    r = _table(tables["gate.r_out"], r_pre)
    z = _table(tables["gate.z_out"], z_pre)
    r_hat, z_hat = _hat(r, fmt["gate.r_out"]), _hat(z, fmt["gate.z_out"])

    (rrh_term,) = terms["op.rRh"]
    rrh = _operator(fmt["op.rRh"], (_term(_product(r_hat, rb_hat[:, g_rows], rrh_term), rrh_term),))
    g_pre = gate_pre("gate.g_pre", g_rows, _hat(rrh, fmt["op.rRh"]))
    g = _table(tables["gate.g_out"], g_pre)
    g_hat = _hat(g, fmt["gate.g_out"])

    (old_term,) = terms["op.old_contrib"]
    old = _operator(fmt["op.old_contrib"], (_term(_product(z_hat, h_hat, old_term), old_term),))
    g_term, zg_term = terms["op.new_contrib"]
    new = _operator(
        fmt["op.new_contrib"],
        (_code_term(g_hat, g_term), _term(-_product(z_hat, g_hat, zg_term), zg_term)),
    )
    old_out, new_out = terms["output.h"]
    h_next = _operator(
        fmt["output.h"],
        (
            _code_term(_hat(old, fmt["op.old_contrib"]), old_out),
            _code_term(_hat(new, fmt["op.new_contrib"]), new_out),
        ),
    )
    return {
        "matmul.Rh": rh,
        "op.Rh_add_br": rb,
        "gate.r_pre": r_pre,
        "gate.z_pre": z_pre,
        "gate.r_out": r,
        "gate.z_out": z,
        "op.rRh": rrh,
        "gate.g_pre": g_pre,
        "gate.g_out": g,
        "op.old_contrib": old,
        "op.new_contrib": new,
        "output.h": h_next,
    }


# --- §8: directions, lengths and layers ---------------------------------------------------------


def _direction(
    program: DirectionProgram,
    x: Tensor,
    h0: Tensor,
    lengths: Tensor,
    reverse: bool,
    trace: bool,
) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
    """One (layer, direction) over x (T, B, I) from h0 (B, H) (§8).

    Returns the output codes (T, B, H), zp(output.h) at padded steps, the final state (B, H)
    and, with `trace`, every operator's codes by time step (zp at padded steps).
    """
    steps = x.shape[0]
    fmt = program.formats
    weight_W = _rshr(_cpu_codes(program.weight_W), program.terms["matmul.Wx"][0].operand_shifts[0])
    weight_R = _rshr(_cpu_codes(program.weight_R), program.terms["matmul.Rh"][0].operand_shifts[0])
    wx = _input_projection(program, weight_W, x)
    out_zero = torch.tensor(fmt["output.h"].zero_point, dtype=torch.int64)
    outputs = torch.empty(steps, *h0.shape, dtype=torch.int64)
    traces: dict[str, Tensor] | None = None
    if trace:
        traces = {"input.x": x, "matmul.Wx": wx}
        for name in TRACED_OPERATORS[2:]:
            width = 3 * h0.shape[-1] if name in ("matmul.Rh", "op.Rh_add_br") else h0.shape[-1]
            traces[name] = torch.empty(steps, h0.shape[0], width, dtype=torch.int64)

    h = h0
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        active = (t < lengths).unsqueeze(-1)
        values = _step(program, weight_R, wx[t], h)
        h = torch.where(active, values["output.h"], h)
        outputs[t] = torch.where(active, values["output.h"], out_zero)
        if traces is not None:
            for name, value in values.items():
                traces[name][t] = value

    if traces is not None:
        valid = (torch.arange(steps).unsqueeze(1) < lengths).unsqueeze(-1)
        traces = {
            name: torch.where(valid, traces[name], fmt[name].zero_point)
            for name in TRACED_OPERATORS
        }
    return outputs, h, traces


def _layer_input(
    program: DirectionProgram, below: Sequence[tuple[ActivationFormat, Tensor]]
) -> Tensor:
    """input.x codes of a layer above the first (§8): the feature block of each direction d of
    the layer below, requantized by one term, Q[input.x](ĥ_(l-1,d))."""
    terms = program.terms["input.x"]
    if len(terms) != len(below):
        raise ValueError(f"input.x has {len(terms)} terms for {len(below)} directions below")
    blocks = [
        _operator(program.formats["input.x"], (_code_term(_hat(codes, fmt), term),))
        for (fmt, codes), term in zip(below, terms, strict=True)
    ]
    return torch.cat(blocks, dim=-1)


def _cpu_codes(codes: Tensor) -> Tensor:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"expected integer codes, got {codes.dtype}")
    return codes.detach().to("cpu", torch.int64)


def _check_range(codes: Tensor, fmt: ActivationFormat, what: str) -> None:
    if codes.numel() and not bool(((codes >= fmt.qmin) & (codes <= fmt.qmax)).all()):
        raise ValueError(f"{what} codes must lie in [{fmt.qmin}, {fmt.qmax}]")


def integer_gru(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor,
    lengths: Tensor | None,
    num_layers: int,
    bidirectional: bool,
    trace: bool = False,
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]] | None]:
    """Run the integer GRU of README.md §7 and §8 on codes.

    programs: one per (layer, direction), index layer * D + direction (nn.GRU's order).
    x_codes: (T, B, I) codes of layer 0's input.x; h0_codes: (L * D, B, H) codes of each
    (layer, direction)'s output.h; lengths: (B,) valid steps per sequence, or None for T.

    Returns int64 CPU tensors: the last layer's output.h codes (T, B, D * H), directions
    concatenated, zp(output.h) at padded steps; h_n (L * D, B, H); and with `trace` one dict
    per program mapping each operator of §7 (and input.x) to its codes (T, B, C) by time step,
    with the operator's zero point at padded steps.
    """
    directions = 2 if bidirectional else 1
    if len(programs) != num_layers * directions:
        raise ValueError(f"expected {num_layers * directions} programs, got {len(programs)}")
    x = _cpu_codes(x_codes)
    h0 = _cpu_codes(h0_codes)
    if x.dim() != 3:
        raise ValueError(f"x_codes must be (T, B, I), got shape {tuple(x.shape)}")
    steps, batch, _ = x.shape
    if h0.dim() != 3 or h0.shape[:2] != (len(programs), batch):
        raise ValueError(f"h0_codes must be ({len(programs)}, {batch}, H), got {tuple(h0.shape)}")
    if lengths is None:
        valid_lengths = torch.full((batch,), steps, dtype=torch.int64)
    else:
        valid_lengths = _cpu_codes(lengths)
        if valid_lengths.shape != (batch,):
            raise ValueError(f"lengths must be ({batch},), got {tuple(valid_lengths.shape)}")
        if bool(((valid_lengths < 0) | (valid_lengths > steps)).any()):
            raise ValueError(f"lengths must lie in [0, {steps}]")

    first_formats = {programs[d].formats["input.x"] for d in range(directions)}
    if len(first_formats) != 1:
        raise ValueError("both directions of layer 0 must share input.x parameters (§8)")

    layer_x = x
    below: list[tuple[ActivationFormat, Tensor]] = []
    h_n: list[Tensor] = []
    traces: list[dict[str, Tensor]] = []
    for layer in range(num_layers):
        outputs: list[tuple[ActivationFormat, Tensor]] = []
        for direction in range(directions):
            index = layer * directions + direction
            program = programs[index]
            fmt = program.formats
            if layer > 0:
                layer_x = _layer_input(program, below)
            if layer_x.shape[-1] != program.input_size:
                raise ValueError(
                    f"program {index} takes {program.input_size} features, got {layer_x.shape[-1]}"
                )
            if h0.shape[-1] != program.hidden_size:
                raise ValueError(f"program {index} has hidden size {program.hidden_size}")
            _check_range(layer_x, fmt["input.x"], "input.x")
            _check_range(h0[index], fmt["output.h"], "h0")
            out, last, direction_trace = _direction(
                program, layer_x, h0[index], valid_lengths, direction == 1, trace
            )
            outputs.append((fmt["output.h"], out))
            h_n.append(last)
            if direction_trace is not None:
                traces.append(direction_trace)
        below = outputs
    out_codes = torch.cat([codes for _, codes in below], dim=-1)
    return out_codes, torch.stack(h_n), traces if trace else None
