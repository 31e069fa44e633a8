"""The integer GRU of reference/README.md with its recurrence on the Triton kernel
(integer_kernel.py): the contract of kernels/torch/quant_gru.quantized_gru.

Outside the time loop, in plain PyTorch on the inputs' device: the layer input (§8) and the
input projection matmul.Wx (§7) of every step at once. The kernel runs the recurrence, with the
constants integer_constants.py derives from each DirectionProgram.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from quant_gru.kernels.torch.quant_gru import (
    apply_term,
    exact_int_matmul,
    prepared_codes,
    rounding_right_shift,
)
from quant_gru.kernels.triton import integer_layout as layout
from quant_gru.kernels.triton.integer_constants import (
    KernelConstants,
    kernel_constants,
    shifted,
    value_range,
    zero_corrected_range,
)
from quant_gru.kernels.triton.integer_digits import one_digit_products
from quant_gru.kernels.triton.integer_kernel import _integer_gru_kernel
from quant_gru.kernels.triton.integer_plans import IntegerPlan, integer_plan
from quant_gru.kernels.triton.plans import resident_programs
from quant_gru.quantize.program import ACTIVATION_OPERATORS, ActivationFormat, DirectionProgram
from quant_gru.quantize.requant import ceil_log2

__all__ = ["triton_integer_gru"]

# Codes of matmul.Wx go to the kernel in the narrowest of these that holds their range.
_CODE_TYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _code_type(fmt: ActivationFormat) -> torch.dtype:
    for dtype in _CODE_TYPES:
        info = torch.iinfo(dtype)
        if info.min <= fmt.qmin and fmt.qmax <= info.max:
            return dtype
    raise ValueError(f"codes in [{fmt.qmin}, {fmt.qmax}] do not fit 64 bits")


def input_projection(program: DirectionProgram, x: Tensor) -> Tensor:
    """matmul.Wx's codes (T, B, 3H) of zero-corrected input.x values ``x`` (§7), in the
    narrowest integer type that holds them."""
    fmt = program.formats
    dot, bias = program.terms["matmul.Wx"]
    weight_shift, x_shift = dot.operand_shifts
    weight = rounding_right_shift(program.weight_W.to(x.device, torch.int64), weight_shift)
    operand = rounding_right_shift(x, x_shift)
    low, high = (shifted(v, x_shift) for v in zero_corrected_range(fmt["input.x"]))
    weight_range = value_range(weight)
    products = one_digit_products(operand, low, high, weight, weight_range)
    if products is None:
        x_bits = max(abs(low), abs(high)).bit_length()
        weight_bits = max(abs(v) for v in weight_range).bit_length()
        bound = x_bits + weight_bits + ceil_log2(program.input_size)
        products = exact_int_matmul(operand, weight.t(), bound, (x_bits, weight_bits))
    biases = apply_term(program.bias_w.to(x.device, torch.int64), bias)
    wx = fmt["matmul.Wx"]
    codes = (apply_term(products, dot) + biases + wx.zero_point).clamp(wx.qmin, wx.qmax)
    return codes.to(_code_type(wx))


def plan_for(
    batch: int, hidden: int, constants: KernelConstants, device: torch.device
) -> IntegerPlan:
    """The grid and tiles of one direction's launches (integer_plans.py)."""
    return integer_plan(
        batch, hidden, constants.h_digits, constants.r_digits, resident_programs(device)
    )


def run_direction(
    program: DirectionProgram,
    constants: KernelConstants,
    wx_codes: Tensor,
    h0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    trace: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The recurrence over matmul.Wx's codes ``wx_codes`` (T, B, 3H, contiguous) from the
    zero-corrected state ``h0`` (B, H): zero-corrected outputs (T, B, H; 0 at padded steps),
    the final state and, with ``trace``, the kernel's trace (T, B, 15H;
    integer_layout.TRACE_BLOCKS)."""
    steps, batch, _ = wx_codes.shape
    hidden = program.hidden_size
    device = wx_codes.device
    # The kernel writes every element of both at every step (0 at padded steps).
    out = torch.empty(steps, batch, hidden, dtype=torch.int64, device=device)
    traced = (
        torch.empty(steps, batch, layout.TRACE_WIDTH * hidden, dtype=torch.int64, device=device)
        if trace
        else None
    )
    h_n = h0.clone(memory_format=torch.contiguous_format)  # the kernel reads h0 from it
    if steps == 0 or batch == 0:
        return out, h_n, traced
    plan = plan_for(batch, hidden, constants, device)
    lengths32 = out if lengths is None else lengths.to(device=device, dtype=torch.int32)
    exchange = torch.empty(2, constants.h_digits, batch, hidden, dtype=torch.int8, device=device)
    for start in range(0, batch, plan.launch_rows):
        end = min(batch, start + plan.launch_rows)
        grid = (triton.cdiv(end - start, plan.block_b), triton.cdiv(hidden, plan.block_h))
        counters = torch.zeros(grid[0], dtype=torch.int32, device=device)
        _integer_gru_kernel[grid](
            wx_codes, constants.digits, constants.rh, constants.rb_bias, constants.scalars,
            constants.tables, h_n, lengths32, out, h_n,
            out if traced is None else traced, exchange, counters, steps, batch, hidden,
            start, end,
            REVERSE=reverse, BB=plan.block_b, BH=plan.block_h, BK=plan.block_k,
            H_DIGITS=constants.h_digits, R_DIGITS=constants.r_digits,
            HAS_LENGTHS=lengths is not None, TRACE=traced is not None, NARROW=constants.narrow,
            RESIDENT=plan.resident, CHUNKS=plan.chunks(hidden), num_warps=plan.warps,
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
    """Every operator's codes by step (the zero point at padded steps): from the layer input
    ``x`` (zero-corrected), matmul.Wx's codes, the kernel's trace and the outputs."""
    fmt, hidden = program.formats, program.hidden_size
    values = {"input.x": x, "matmul.Wx": wx.to(torch.int64) - fmt["matmul.Wx"].zero_point}
    values["output.h"] = out
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
    x_codes, h0_codes, active = prepared_codes(
        programs, x_codes, h0_codes, lengths, num_layers, num_dirs
    )
    device = x_codes.device
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
            wx = input_projection(program, x)
            out, h_n, traced = run_direction(
                program, constants[index], wx, h0_codes[index] - h_zero, lengths,
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
    low, high = zero_corrected_range(program.formats["input.x"])
    blocks = [
        apply_term(out, term).clamp(low, high)
        for term, out in zip(program.terms["input.x"], below, strict=True)
    ]
    return torch.cat(blocks, dim=-1)
