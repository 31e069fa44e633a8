"""The float GRU recurrence of one layer and one direction, in plain PyTorch.

This is the reference realization of the float model (and the CPU path): the input projection
for every step is one matrix product outside the time loop, the recurrent product runs once per
step. Autograd differentiates it, so it needs no backward of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gru_direction(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, Tensor]:
    """Run one GRU direction over a time-major sequence.

    Args:
        x: input, shape (T, B, I).
        h0: initial hidden state, shape (B, H).
        w_ih, w_hh, b_ih, b_hh: nn.GRU's parameters of this layer and direction
            (gate order r, z, n along the first dimension).
        lengths: valid length of each sequence, shape (B,), int64 on x's device, or None when
            every sequence has length T. Steps at or past a sequence's length leave its hidden
            state unchanged and write zeros to the output, which is how nn.GRU treats packed
            sequences.
        reverse: process the sequence from its last valid step to its first.

    Returns:
        output (T, B, H) and the final hidden state (B, H).
    """
    gates_x = F.linear(x, w_ih, b_ih)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs: list[Tensor] = [x.new_empty(0)] * x.shape[0]
    h = h0
    for t in steps:
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        # n + z * (h - n) is (1 - z) * n + z * h with one rounding fewer, as ATen writes it.
        h_next = n + z * (h - n)
        if lengths is None:
            h = h_next
            outputs[t] = h_next
        else:
            active = (lengths > t).unsqueeze(-1)
            h = torch.where(active, h_next, h)
            outputs[t] = torch.where(active, h_next, torch.zeros_like(h_next))
    return torch.stack(outputs), h
