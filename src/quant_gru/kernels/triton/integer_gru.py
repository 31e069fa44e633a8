"""The integer GRU of reference/README.md with its recurrence on the Triton kernel
(integer_kernel.py): the contract of kernels/torch/quant_gru.quantized_gru.

Outside the time loop, in plain PyTorch on the inputs' device: the layer input (§8), the input
projection matmul.Wx and the terms of the gate pre-activations that come from it (§7), for
every step at once. The kernel runs the recurrence; this module also derives its constants
from each DirectionProgram (the layout of integer_layout.py, R in the digits of
integer_digits.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from quant_gru.kernels.torch.quant_gru import (
    apply_term,
    check_programs,
    exact_int_matmul,
    rounding_right_shift,
)
from quant_gru.kernels.triton import integer_layout as layout
from quant_gru.kernels.triton.integer_digits import (
    MAX_PRODUCT_TERMS,
    digit_offset,
    digits_for_span,
    digits_for_values,
    split_digits,
    wrap_int64,
)
from quant_gru.kernels.triton.integer_kernel import _integer_gru_kernel
from quant_gru.kernels.triton.plans import interpreted
from quant_gru.quantize.program import ACTIVATION_OPERATORS, ActivationFormat, DirectionProgram
from quant_gru.quantize.requant import Term, ceil_log2

__all__ = ["triton_integer_gru"]

_TILE_ROWS = 16  # tl.dot's smallest tile
_TILE_UNITS = 16
_CHUNK = 64  # K chunk of the recurrent product


@dataclass(frozen=True)
class _KernelConstants:
    """What the kernel reads besides the step inputs, for one (layer, direction)."""

    digits: Tensor  # (r_digits, 3H, H) int8: R, operand-shifted, in digits
    correction: Tensor  # (3H,) int64: o * rowsum(R) modulo 2^64
    rh_m: Tensor  # (3H,) int64
    rh_n: Tensor  # (3H,) int64
    rb_bias: Tensor  # (3H,) int64: op.Rh_add_br's term of weight.br
    scalars: Tensor  # (layout.SCALARS,) int64
    tables: Tensor  # (3, 513) int64
    h_digits: int
    r_digits: int


def _range(fmt: ActivationFormat) -> tuple[int, int]:
    """§5's clamp bounds on zero-corrected values."""
    return fmt.qmin - fmt.zero_point, fmt.qmax - fmt.zero_point


def _shifted(value: int, shift: int) -> int:
    """rshr of §3 on one integer (monotone: bounds shift to bounds)."""
    return value if shift == 0 else (value + (1 << (shift - 1))) >> shift


def _channels(values: Tensor, width: int) -> Tensor:
    """A term's per-channel constant (1 or ``width`` values) as ``width`` int64 values."""
    return values.to(torch.int64).cpu().expand(width).contiguous()


def kernel_constants(program: DirectionProgram, device: torch.device) -> _KernelConstants:
    """The kernel's constants for ``program`` (integer_layout.py), on ``device``."""
    fmt, terms, hidden = program.formats, program.terms, program.hidden_size
    rows = 3 * hidden
    scalars = [0] * layout.SCALARS

    def put(where: object, *values: int) -> None:
        start = int(where.value)  # type: ignore[attr-defined]  # a tl.constexpr
        scalars[start : start + len(values)] = values

    def put_term(where: object, term: Term) -> None:
        if term.m.numel() != 1:
            raise ValueError(f"a single-channel term was expected, got {term.m.numel()} channels")
        put(where, int(term.m.item()), int(term.n.item()), term.pre_shift)

    (rh_dot,) = terms["matmul.Rh"]
    weight_shift, h_shift = rh_dot.operand_shifts
    weight = rounding_right_shift(program.weight_R.cpu().to(torch.int64), weight_shift)
    r_digits = digits_for_values(int(weight.min()), int(weight.max())) if weight.numel() else 1
    h_low, h_high = (_shifted(v, h_shift) for v in _range(fmt["output.h"]))
    h_digits = digits_for_span(h_low, h_high)
    if hidden * min(h_digits, r_digits) > MAX_PRODUCT_TERMS:
        raise ValueError(
            f"hidden_size {hidden} is too large for exact int32 sums of "
            f"{min(h_digits, r_digits)}-digit products (at most {MAX_PRODUCT_TERMS})"
        )
    offset = digit_offset(h_low, h_digits)
    correction = [wrap_int64(offset * int(s)) for s in weight.sum(dim=1).tolist()]
    put(layout.RH_PRE_SHIFT, rh_dot.pre_shift)
    put(layout.H_OPERAND_SHIFT, h_shift)
    put(layout.H_DIGIT_OFFSET, offset)

    rb_term, br_term = terms["op.Rh_add_br"]
    put_term(layout.TERM_RB_FROM_RH, rb_term)
    rb_bias = apply_term(program.bias_r.cpu().to(torch.int64), br_term)
    put_term(layout.TERM_R_FROM_RB, terms["gate.r_pre"][1])
    put_term(layout.TERM_Z_FROM_RB, terms["gate.z_pre"][1])
    (rrh_term,) = terms["op.rRh"]
    put_term(layout.TERM_RRH, rrh_term)
    put_term(layout.TERM_G_FROM_RRH, terms["gate.g_pre"][1])
    (old_term,) = terms["op.old_contrib"]
    put_term(layout.TERM_OLD, old_term)
    new_g, new_zg = terms["op.new_contrib"]
    put_term(layout.TERM_NEW_FROM_G, new_g)
    put_term(layout.TERM_NEW_FROM_ZG, new_zg)
    h_old, h_new = terms["output.h"]
    put_term(layout.TERM_H_FROM_OLD, h_old)
    put_term(layout.TERM_H_FROM_NEW, h_new)
    for name, where in layout.RANGES.items():
        put(where, *_range(fmt[name]))
    for name, term in (("op.rRh", rrh_term), ("op.old_contrib", old_term)):
        put(layout.PRODUCT_SHIFTS[name], *term.operand_shifts)
    put(layout.PRODUCT_SHIFTS["op.new_contrib"], *new_zg.operand_shifts)
    sources = {"gate.r_out": "gate.r_pre", "gate.z_out": "gate.z_pre", "gate.g_out": "gate.g_pre"}
    for name, where in layout.TABLES.items():
        table = program.tables[name]
        put(where, table.c_lo, table.k, fmt[sources[name]].zero_point, fmt[name].zero_point)

    def on_device(values: Tensor | list[int]) -> Tensor:
        return torch.as_tensor(values, dtype=torch.int64).to(device).contiguous()

    return _KernelConstants(
        digits=split_digits(weight, r_digits).view(r_digits, rows, hidden).to(device),
        correction=on_device(correction),
        rh_m=on_device(_channels(rh_dot.m, rows)),
        rh_n=on_device(_channels(rh_dot.n, rows)),
        rb_bias=on_device(rb_bias.expand(rows)),
        scalars=on_device(scalars),
        tables=on_device(torch.stack([program.tables[name].y.cpu() for name in layout.TABLES])),
        h_digits=h_digits,
        r_digits=r_digits,
    )


def _magnitude_bits(low: int, high: int) -> int:
    """B with |v| <= 2^B for every v in [low, high]."""
    return max(abs(low), abs(high)).bit_length()


def gate_inputs(program: DirectionProgram, x: Tensor) -> tuple[Tensor, Tensor]:
    """matmul.Wx (zero-corrected, (T, B, 3H)) of zero-corrected input.x values ``x``, and the
    terms of gate.r_pre, gate.z_pre and gate.g_pre that come from it, side by side (§7)."""
    fmt, terms, hidden = program.formats, program.terms, program.hidden_size
    dot, bias = terms["matmul.Wx"]
    weight_shift, x_shift = dot.operand_shifts
    weight = rounding_right_shift(program.weight_W.to(x.device, torch.int64), weight_shift)
    operand = rounding_right_shift(x, x_shift)
    x_bits = _magnitude_bits(*(_shifted(v, x_shift) for v in _range(fmt["input.x"])))
    weight_bits = int(weight.abs().max()).bit_length() if weight.numel() else 0
    bound = x_bits + weight_bits + ceil_log2(program.input_size)
    products = exact_int_matmul(operand, weight.t(), bound, (x_bits, weight_bits))
    biases = apply_term(program.bias_w.to(x.device, torch.int64), bias)
    low, high = _range(fmt["matmul.Wx"])
    wx = (apply_term(products, dot) + biases).clamp(low, high)
    gates = [("gate.r_pre", 0), ("gate.z_pre", 1), ("gate.g_pre", 2)]
    terms_from_wx = [
        apply_term(wx[..., g * hidden : (g + 1) * hidden].contiguous(), terms[name][0])
        for name, g in gates
    ]
    return wx, torch.cat(terms_from_wx, dim=-1).contiguous()


def _programs_on_device(device: torch.device) -> int | None:
    """How many programs may wait for each other: the SM count on a GPU, None (one hidden
    tile a batch tile) under the interpreter."""
    if interpreted() or device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _tiles(batch: int, hidden: int, device: torch.device) -> tuple[int, int, int]:
    """(rows a program, units a program, batch rows a launch): every program of a launch
    resident at once (at most one a multiprocessor)."""
    full = max(_TILE_UNITS, triton.next_power_of_2(hidden))
    programs = _programs_on_device(device)
    if programs is None:
        return _TILE_ROWS, full, batch
    units = _TILE_UNITS
    while units < full and triton.cdiv(hidden, units) * triton.cdiv(batch, _TILE_ROWS) > programs:
        units *= 2
    tiles_a_launch = max(1, programs // triton.cdiv(hidden, units))
    return _TILE_ROWS, units, tiles_a_launch * _TILE_ROWS


def run_direction(
    program: DirectionProgram,
    constants: _KernelConstants,
    gate_terms: Tensor,
    h0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    trace: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The recurrence over ``gate_terms`` (T, B, 3H, contiguous) from the zero-corrected
    state ``h0`` (B, H): zero-corrected outputs (T, B, H; 0 at padded steps), the final
    state and, with ``trace``, the kernel's trace (T, B, 15H; integer_layout.TRACE_BLOCKS)."""
    steps, batch, _ = gate_terms.shape
    hidden = program.hidden_size
    device = gate_terms.device
    out = torch.zeros(steps, batch, hidden, dtype=torch.int64, device=device)
    traced = (
        torch.zeros(steps, batch, layout.TRACE_WIDTH * hidden, dtype=torch.int64, device=device)
        if trace
        else None
    )
    h_n = h0.contiguous().clone()
    if steps == 0 or batch == 0:
        return out, h_n, traced
    rows, units, launch_rows = _tiles(batch, hidden, device)
    lengths32 = out if lengths is None else lengths.to(device=device, dtype=torch.int32)
    exchange = torch.empty(2, constants.h_digits, batch, hidden, dtype=torch.int8, device=device)
    for start in range(0, batch, launch_rows):
        end = min(batch, start + launch_rows)
        grid = (triton.cdiv(end - start, rows), triton.cdiv(hidden, units))
        counters = torch.zeros(grid[0], dtype=torch.int32, device=device)
        _integer_gru_kernel[grid](
            gate_terms, constants.digits, constants.correction, constants.rh_m, constants.rh_n,
            constants.rb_bias, constants.scalars, constants.tables, h_n, lengths32, out, h_n,
            out if traced is None else traced, exchange, counters, steps, batch, hidden,
            start, end,
            REVERSE=reverse, BB=rows, BH=units, BK=min(_CHUNK, units),
            H_DIGITS=constants.h_digits, R_DIGITS=constants.r_digits,
            HAS_LENGTHS=lengths is not None, TRACE=traced is not None,
        )  # fmt: skip
    return out, h_n, traced


def _trace_codes(
    program: DirectionProgram,
    x: Tensor,
    wx: Tensor,
    traced: Tensor,
    out: Tensor,
    active: Tensor | None,
) -> dict[str, Tensor]:
    """Every operator's codes by step (the zero point at padded steps), from zero-corrected
    values: the layer input, matmul.Wx, the kernel's trace and the outputs."""
    fmt, hidden = program.formats, program.hidden_size
    values = {"input.x": x, "matmul.Wx": wx, "output.h": out}
    start = 0
    for name, width in layout.TRACE_BLOCKS:
        values[name] = traced[..., start * hidden : (start + width) * hidden]
        start += width
    codes = {}
    for name in ACTIVATION_OPERATORS:
        zero = fmt[name].zero_point
        code = values[name] + zero
        codes[name] = code if active is None else torch.where(active, code, zero)
    return codes


def triton_integer_gru(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor,
    lengths: Tensor | None,
    num_layers: int,
    bidirectional: bool,
    trace: bool = False,
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]] | None]:
    """The integer GRU (§7, §8) on codes, its recurrence on the Triton kernel; arguments and
    results as kernels/torch/quant_gru.quantized_gru's."""
    num_dirs = 2 if bidirectional else 1
    check_programs(programs, x_codes, h0_codes, num_layers, num_dirs)
    device = x_codes.device
    steps = x_codes.shape[0]
    active = None
    if lengths is not None:
        time = torch.arange(steps, device=device).unsqueeze(1)
        active = (time < lengths.to(device).view(1, -1)).unsqueeze(-1)
    x_codes = x_codes.to(torch.int64)
    h0_codes = h0_codes.to(device=device, dtype=torch.int64)
    constants = [kernel_constants(program, device) for program in programs]

    finals: list[Tensor] = []
    traces: list[dict[str, Tensor]] = []
    below: list[Tensor] = []
    for layer in range(num_layers):
        outputs: list[Tensor] = []
        for direction in range(num_dirs):
            index = layer * num_dirs + direction
            program = programs[index]
            if layer == 0:
                x = x_codes - programs[0].formats["input.x"].zero_point
            else:
                x = _layer_input(program, below)
            h_zero = program.formats["output.h"].zero_point
            wx, gate_terms = gate_inputs(program, x)
            out, h_n, traced = run_direction(
                program, constants[index], gate_terms, h0_codes[index] - h_zero, lengths,
                direction == 1, trace,
            )  # fmt: skip
            outputs.append(out)
            finals.append(h_n + h_zero)
            if traced is not None:
                traces.append(_trace_codes(program, x, wx, traced, out, active))
        below = outputs
    last = programs[-num_dirs:]
    out_codes = torch.cat(
        [out + p.formats["output.h"].zero_point for out, p in zip(below, last, strict=True)],
        dim=-1,
    )
    return out_codes, torch.stack(finals), traces if trace else None


def _layer_input(program: DirectionProgram, below: Sequence[Tensor]) -> Tensor:
    """Zero-corrected input.x values of a layer above the first from the zero-corrected
    outputs of each direction of the layer below (§8: one term each)."""
    low, high = _range(program.formats["input.x"])
    blocks = [
        apply_term(out, term).clamp(low, high)
        for term, out in zip(program.terms["input.x"], below, strict=True)
    ]
    return torch.cat(blocks, dim=-1)
