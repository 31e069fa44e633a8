"""Quantized inference on the Triton kernels, float input to float output: the values of
kernels/torch/quantized_forward.quantized_forward without autograd, to the bit, with fewer
passes over memory.

Each layer's input is quantized (the first layer's) or requantized from the codes of the layer
below (§8) and projected by projection_kernel.py where its operands take one digit (else in
plain PyTorch), each recurrence runs on integer_kernel.py or integer_row_kernel.py, and the
last layer's kernels write the dequantized outputs and final states straight into the
result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from quant_gru.kernels.torch.quantized_forward import (
    QuantizedModel,
    build_programs,
    initial_codes,
    input_codes,
)
from quant_gru.kernels.torch.stack import DirectionWeights, GRUShape
from quant_gru.kernels.triton.integer_constants import kernel_constants
from quant_gru.kernels.triton.integer_gru import layer_input, run_direction, zero_corrected_state
from quant_gru.kernels.triton.integer_projection import (
    codes_input_projection,
    float_input_projection,
    input_projection,
)


def quantized_inference(
    x: Tensor,
    h0: Tensor | None,
    lengths: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
    model: QuantizedModel,
) -> tuple[Tensor, Tensor]:
    """Time-major x (T, B, I) and h0 (L*D, B, H) or None -> (output (T, B, D*H), h_n), in x's
    dtype; nothing recorded for autograd."""
    programs = build_programs(model, weights)
    steps, batch, _ = x.shape
    num_dirs, hidden = shape.num_directions, shape.hidden_size
    # A zero initial state's zero-corrected codes are zero: the kernels start there unasked.
    h0_codes = None if h0 is None else initial_codes(h0, programs, x)
    out = torch.empty(steps, batch, num_dirs * hidden, dtype=x.dtype, device=x.device)
    h_n = torch.empty(len(programs), batch, hidden, dtype=x.dtype, device=x.device)
    below: list[Tensor] = []
    x_codes: Tensor | None = None  # layer 0's input codes, zero-corrected, where the kernels refuse
    for layer in range(shape.num_layers):
        outputs: list[Tensor] = []
        last = layer == shape.num_layers - 1
        for direction in range(num_dirs):
            index = layer * num_dirs + direction
            program = programs[index]
            if layer > 0:
                wx = codes_input_projection(program, below)
            elif program.formats["input.x"] == programs[0].formats["input.x"]:
                # Both directions of the first layer quantize x by the same parameters (§8).
                wx = float_input_projection(program, x)
            else:
                wx = None
            if wx is None:
                if layer > 0:
                    codes = layer_input(program, below)
                else:
                    if x_codes is None:  # once for both directions
                        x_zero = programs[0].formats["input.x"].zero_point
                        x_codes = input_codes(x, programs) - x_zero
                    codes = x_codes
                wx = input_projection(program, codes)
            floats = None
            if last:
                floats = (out[..., direction * hidden : (direction + 1) * hidden], h_n[index])
            values, final, _ = run_direction(
                program, kernel_constants(program, x.device), wx,
                zero_corrected_state(h0_codes, index, program), lengths, direction == 1, False,
                floats,
            )  # fmt: skip
            if not last:
                outputs.append(values)
                h_n[index] = _dequantized(final, program.formats["output.h"].scale, x.dtype)
        below = outputs
    return out, h_n


def _dequantized(values: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """Zero-corrected values as quantize.scales.dequantize gives them, in ``dtype``."""
    return (values.double() * scale).to(dtype)
