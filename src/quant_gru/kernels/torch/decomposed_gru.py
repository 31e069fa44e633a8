"""The float GRU of one direction, decomposed at the quantization points of the integer model
(reference/README.md §7), with a hook at every point.

The hook sees each operator's float value and returns the value the computation continues with:
the value itself to collect calibration statistics, or a fake-quantized stand-in for
quantization-aware training. float_gru.py stays the plain path (it follows ATen's order of
operations to match nn.GRU to the last bit); this one follows the integer model's.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class PointHook(Protocol):
    def __call__(self, name: str, value: Tensor, valid: Tensor | None, step: int | None) -> Tensor:
        """`name`: operator (quant_gru.config.OPERATORS); `valid`: bool mask broadcastable to
        `value` marking entries of real (not padded) steps, or None; `step`: the time step of a
        per-step value, -1 for h0, None for values covering all steps or none (weights)."""
        ...


def decomposed_direction(
    x: Tensor,
    h0: Tensor,
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    lengths: Tensor | None,
    reverse: bool,
    point: PointHook,
) -> tuple[Tensor, Tensor]:
    """One direction over time-major x (T, B, I) from h0 (B, H); returns (output, h_n) like
    float_gru.gru_direction, with the same treatment of lengths."""
    w_ih, w_hh, b_ih, b_hh = weights
    steps = x.shape[0]
    valid = None
    if lengths is not None:
        valid = (torch.arange(steps, device=x.device).unsqueeze(1) < lengths).unsqueeze(-1)
    zeros = w_ih.new_zeros(w_ih.shape[0])
    w_x = point("weight.W", w_ih, None, None)
    w_h = point("weight.R", w_hh, None, None)
    bias_x = point("weight.bw", b_ih if b_ih is not None else zeros, None, None)
    bias_h = point("weight.br", b_hh if b_hh is not None else zeros, None, None)

    x = point("input.x", x, valid, None)
    gates_x = point("matmul.Wx", F.linear(x, w_x, bias_x), valid, None)
    h = point("output.h", h0, None, -1)
    outputs: list[Tensor] = [x.new_empty(0)] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        active = None if valid is None else valid[t]
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=-1)
        rh = point("matmul.Rh", F.linear(h, w_h), active, t)
        rb = point("op.Rh_add_br", rh + bias_h, active, t)
        rb_r, rb_z, rb_n = rb.chunk(3, dim=-1)
        r = point(
            "gate.r_out", torch.sigmoid(point("gate.r_pre", x_r + rb_r, active, t)), active, t
        )
        z = point(
            "gate.z_out", torch.sigmoid(point("gate.z_pre", x_z + rb_z, active, t)), active, t
        )
        r_rb = point("op.rRh", r * rb_n, active, t)
        g = point("gate.g_out", torch.tanh(point("gate.g_pre", x_n + r_rb, active, t)), active, t)
        old = point("op.old_contrib", z * h, active, t)
        new = point("op.new_contrib", (1 - z) * g, active, t)
        h_next = point("output.h", old + new, active, t)
        if active is None:
            h = h_next
            outputs[t] = h_next
        else:
            h = torch.where(active, h_next, h)
            outputs[t] = torch.where(active, h_next, torch.zeros_like(h_next))
    return torch.stack(outputs), h
