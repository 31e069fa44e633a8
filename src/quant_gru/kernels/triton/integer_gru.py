"""The integer GRU of reference/README.md with its recurrence on the Triton kernel
(integer_kernel.py): the contract of kernels/torch/quant_gru.quantized_gru.

Outside the time loop, in plain PyTorch on the inputs' device: the layer input (§8) and the
input projection matmul.Wx (§7) of every step at once. The kernel runs the recurrence, with the
constants integer_constants.py derives from each DirectionProgram.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quant_gru.kernels.torch.quant_gru import apply_term, prepared_codes
from quant_gru.kernels.triton import integer_layout as layout
from quant_gru.kernels.triton.integer_constants import (
    KernelConstants,
    kernel_constants,
    zero_corrected_range,
)
from quant_gru.kernels.triton.integer_kernel import _integer_gru_kernel
from quant_gru.kernels.triton.integer_plans import (
    PACKED_UNITS,
    IntegerPlan,
    integer_plan,
    integer_row_plan,
    merged_gates,
)
from quant_gru.kernels.triton.integer_projection import input_projection
from quant_gru.kernels.triton.integer_row_kernel import _integer_gru_row_kernel
from quant_gru.kernels.triton.launch import Launcher
from quant_gru.kernels.triton.plans import (
    Plan,
    ceil_div,
    check_step_offsets,
    forward_plan,
    interpreted,
    resident_programs,
)
from quant_gru.kernels.triton.sync import zero_words
from quant_gru.quantize.program import ACTIVATION_OPERATORS, DirectionProgram

__all__ = ["triton_integer_gru"]

# Triton's own launch path spends tens of microseconds of host time a launch (launch.py).
_launch_rows = Launcher(_integer_gru_row_kernel)
_launch_tiles = Launcher(_integer_gru_kernel)


def plan_for(
    batch: int, hidden: int, constants: KernelConstants, device: torch.device
) -> IntegerPlan:
    """The grid and tiles of one direction's launches (integer_plans.py)."""
    return integer_plan(
        batch, hidden, constants.h_digits, constants.r_digits, resident_programs(device)
    )


def row_plan_for(
    batch: int, hidden: int, constants: KernelConstants, device: torch.device
) -> Plan | None:
    """The row kernel's plan (integer_row_kernel.py) where it applies: one-digit models, on
    the float kernels' row plans (their R slices in float32 registers, ours in int32), which
    small batches take, with more units a program where those hold few
    (integer_plans.integer_row_plan); None: the tile kernel."""
    if constants.h_digits != 1 or constants.r_digits != 1:
        return None
    plan = forward_plan(batch, hidden, 4, device)
    if not plan.rows:
        return None
    return integer_row_plan(plan, hidden, constants.words is not None)


@dataclass(frozen=True)
class QatSave:
    """The integer kernel's QAT outputs for one direction (qat_save.py): its constants, the
    coefficients (T, B, 5H) float32 and the recurrent masks (T, B, H) int8 it fills, and the
    model type's rounding; and matmul.Wx's masks (T, B, 3H) int8 where the projection kernel
    made them (integer_projection.WxMasks)."""

    constants: Tensor
    bias: Tensor  # weight.br's values (qat_save.qat_constants)
    coefficients: Tensor
    masks: Tensor
    rounding: int
    wx_masks: Tensor | None = None

    @property
    def operands(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.constants, self.bias, self.coefficients, self.masks


def run_direction(
    program: DirectionProgram,
    constants: KernelConstants,
    wx_codes: Tensor,
    h0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    trace: bool,
    floats: tuple[Tensor, Tensor] | None = None,
    save: QatSave | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The recurrence over matmul.Wx's codes ``wx_codes`` (T, B, 3H, contiguous) from the
    zero-corrected state ``h0`` (B, H; None: zero, not read): zero-corrected outputs (T, B, H;
    0 at padded steps), the final state and, with ``trace``, the kernel's trace (T, B, 15H;
    integer_layout.TRACE_BLOCKS). ``floats``: float destinations (out (T, B, H), a view
    whose rows may be longer; h_n (B, H), contiguous) that get the dequantized outputs and
    final state instead (output.h's scale, quantize.scales.dequantize) and are returned.
    ``save``: where the kernel stores what QAT's backward reads (qat_save.py).
    Small batches of one-digit models run on the row kernel, the rest and traced runs on the
    tile kernel."""
    steps, batch, _ = wx_codes.shape
    hidden = program.hidden_size
    device = wx_codes.device
    widest = layout.TRACE_WIDTH * hidden if trace else 3 * hidden
    if floats is not None:
        widest = max(widest, floats[0].stride(1))
    check_step_offsets(steps, batch, widest)
    if floats is None:
        # The kernel writes every element of both (0 at padded steps).
        out = torch.empty(steps, batch, hidden, dtype=torch.int64, device=device)
        h_n = torch.empty(batch, hidden, dtype=torch.int64, device=device)
        scale = out
    else:
        out, h_n = floats
        scale = constants.output_scale
        rows_apart = out.stride(0) // max(batch, 1)
        if out.shape != (steps, batch, hidden) or out.stride()[1:] != (rows_apart, 1):
            raise ValueError("float outputs must be (T, B, H) rows of one (T, B, ·) tensor")
    traced = (
        torch.empty(steps, batch, layout.TRACE_WIDTH * hidden, dtype=torch.int64, device=device)
        if trace
        else None
    )
    if steps == 0 or batch == 0:  # the final state is the initial one
        if h0 is None:
            h_n.zero_()
        elif floats is None:
            h_n.copy_(h0)
        else:
            h_n.copy_((h0.double() * scale).float())
        return out, h_n, traced
    initial = out if h0 is None else h0.contiguous()  # None: a place the kernels do not read
    lengths32 = out if lengths is None else lengths.to(device=device, dtype=torch.int32)
    rows = None if trace else row_plan_for(batch, hidden, constants, device)
    if rows is not None:
        # Four digits a word where R has words and programs hold 16 units or more. Measured on
        # an H100 against a digit a word: 1.45x at (16, H=128), 1.30x at (64, H=256), but
        # 0.90x at (1, H=256), whose programs hold 4 units.
        packed = constants.words is not None and rows.block_h >= PACKED_UNITS
        width = hidden // 4 if packed else hidden
        words = out if rows.single else zero_words(2, batch, width, device=device)
        _launch_rows(
            rows.grid(batch, hidden),
            (
                wx_codes, constants.words if packed else constants.digits, constants.rh,
                constants.rb_bias, constants.tables, initial, lengths32, out, h_n, scale, words,
                *(save.operands if save else (out,) * 4), steps, batch, hidden,
                out.stride(1),
            ),
            dict(
                REVERSE=reverse, BB=rows.block_b, BH=rows.block_h, BK=rows.block_k,
                SINGLE=rows.single, HAS_LENGTHS=lengths is not None, NARROW=constants.narrow,
                C=constants.specialization, OUT_FLOAT=floats is not None, PACKED=packed,
                COMPILED=not interpreted(), SAVE=save is not None, HAS_H0=h0 is not None,
                ROUND=save.rounding if save else 0,
            ),
            rows.warps,
        )  # fmt: skip
        return out, h_n, traced
    plan = plan_for(batch, hidden, constants, device)
    exchange = torch.empty(2, constants.h_digits, batch, hidden, dtype=torch.int8, device=device)
    for start in range(0, batch, plan.launch_rows):
        end = min(batch, start + plan.launch_rows)
        grid = (ceil_div(end - start, plan.block_b), ceil_div(hidden, plan.block_h))
        counters = torch.zeros(grid[0], dtype=torch.int32, device=device)
        _launch_tiles(
            grid,
            (
                wx_codes, constants.digits, constants.rh, constants.rb_bias,
                constants.tables, initial, lengths32, out, h_n, scale,
                out if traced is None else traced, *(save.operands if save else (out,) * 4),
                exchange, counters, steps, batch, hidden, out.stride(1), start, end,
            ),
            dict(
                REVERSE=reverse, BB=plan.block_b, BH=plan.block_h, BK=plan.block_k,
                H_DIGITS=constants.h_digits, R_DIGITS=constants.r_digits,
                HAS_LENGTHS=lengths is not None, TRACE=traced is not None,
                NARROW=constants.narrow, RESIDENT=plan.resident, CHUNKS=plan.chunks(hidden),
                C=constants.specialization, OUT_FLOAT=floats is not None, SAVE=save is not None,
                ROUND=save.rounding if save else 0, HAS_H0=h0 is not None,
                MERGED=merged_gates(plan, save is not None),
            ),
            plan.warps,
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
    traces: list[dict[str, Tensor]] = []

    def direction(
        index: int, program: DirectionProgram, x: Tensor, h0: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        wx = input_projection(program, x)
        constants = kernel_constants(program, x.device)
        out, h_n, traced = run_direction(
            program, constants, wx, h0, lengths, index % num_dirs == 1, trace
        )
        if traced is not None:
            traces.append(_trace_codes(program, x, wx, traced, out, active))
        return out, h_n

    out_codes, h_n_codes = stack_layers(
        programs, x_codes, h0_codes, num_layers, num_dirs, direction
    )
    return out_codes, h_n_codes, traces if trace else None


# (index, program, zero-corrected layer input, zero-corrected h0 or None for zero) -> the
# direction's zero-corrected outputs (T, B, H) and final state (B, H).
DirectionRun = Callable[[int, DirectionProgram, Tensor, Tensor | None], tuple[Tensor, Tensor]]


def stack_layers(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor | None,
    num_layers: int,
    num_dirs: int,
    direction: DirectionRun,
    zero_corrected: bool = False,
) -> tuple[Tensor, Tensor]:
    """The integer GRU's layers over prepared codes (quant_gru.prepared_codes), each
    (layer, direction) run by ``direction``: the output codes (T, B, D*H) of the last layer
    and the final state codes (L*D, B, H). Layer inputs above the first by §8
    (layer_input); the first's is made once for both directions, which share input.x's
    parameters (§8). ``h0_codes`` None: every direction starts from a zero state;
    ``zero_corrected``: ``x_codes`` are less input.x's zero point already."""
    finals: list[Tensor] = []
    below: list[Tensor] = []
    first = x_codes if zero_corrected else x_codes - programs[0].formats["input.x"].zero_point
    for layer in range(num_layers):
        outputs: list[Tensor] = []
        for index in range(layer * num_dirs, (layer + 1) * num_dirs):
            program = programs[index]
            x = first if layer == 0 else layer_input(program, below)
            h0 = zero_corrected_state(h0_codes, index, program)
            out, h_n = direction(index, program, x, h0)
            outputs.append(out)
            finals.append(h_n + program.formats["output.h"].zero_point)
        below = outputs
    last = programs[-num_dirs:]
    parts = [out + p.formats["output.h"].zero_point for out, p in zip(below, last, strict=True)]
    out_codes = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # no copy of one
    return out_codes, torch.stack(finals)


def zero_corrected_state(
    codes: Tensor | None, index: int, program: DirectionProgram
) -> Tensor | None:
    """Direction ``index``'s initial state codes less output.h's zero point, as the kernels
    take them (None, a zero state, stays None)."""
    return None if codes is None else codes[index] - program.formats["output.h"].zero_point


def layer_input(program: DirectionProgram, below: Sequence[Tensor]) -> Tensor:
    """Zero-corrected input.x values of a layer above the first from the zero-corrected
    outputs of each direction of the layer below (§8: one term each)."""
    low, high = zero_corrected_range(program.formats["input.x"])
    blocks = [
        apply_term(out, term).clamp(low, high)
        for term, out in zip(program.terms["input.x"], below, strict=True)
    ]
    return torch.cat(blocks, dim=-1)
