"""The Triton GRU direction as torch.library custom operators: torch.compile sees one opaque,
differentiable operator per (layer, direction) instead of tracing the launchers, and the fake
implementations give it the output shapes. Importing this module defines the operators but
imports nothing from triton (the kernels load on first call), so it is safe at package import.
"""

# No `from __future__ import annotations`: torch.library reads the annotations at definition.

from typing import Any, Optional

import torch
from torch import Tensor


@torch.library.custom_op("quant_gru::gru_direction", mutates_args=())
def gru_direction(
    gates_x: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045 (torch.library's schema inference)
    lengths: Tensor,
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output (T, B, H), h_n (B, H), saved gates (T, B, 4H) float32, empty unless ``save``)
    over precomputed input projections ``gates_x`` (T, B, 3H); ``lengths`` (B,) int32."""
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    saved = _saved_like(gates_x, save)
    out, h_n = gru_direction_forward(
        gates_x, h0, w_hh, b_hh, lengths, reverse, saved if save else None
    )
    return out, h_n, saved


@gru_direction.register_fake
def _gru_direction_fake(
    gates_x: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Tensor,
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch, three_h = gates_x.shape
    out = gates_x.new_empty(steps, batch, three_h // 3)
    return out, gates_x.new_empty(batch, three_h // 3), _saved_like(gates_x, save)


@torch.library.custom_op("quant_gru::gru_direction_backward", mutates_args=())
def gru_direction_backward(
    grad_out: Tensor,
    grad_h_n: Tensor,
    out: Tensor,
    h0: Tensor,
    saved: Tensor,
    w_hh: Tensor,
    lengths: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of gates_x, grad of h0 (float32), grad of the recurrent pre-activations
    (T, B, 3H) in recurrent_grad_type)."""
    from quant_gru.kernels.triton.gru_backward import gru_direction_backward as launch

    return launch(grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse, out.dtype)


@gru_direction_backward.register_fake
def _gru_direction_backward_fake(
    grad_out: Tensor,
    grad_h_n: Tensor,
    out: Tensor,
    h0: Tensor,
    saved: Tensor,
    w_hh: Tensor,
    lengths: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch, hidden = out.shape
    grad_gh = out.new_empty(steps, batch, 3 * hidden, dtype=recurrent_grad_type(w_hh))
    return (
        out.new_empty(steps, batch, 3 * hidden),
        h0.new_empty(h0.shape, dtype=torch.float32),
        grad_gh,
    )


def recurrent_grad_type(w_hh: Tensor) -> torch.dtype:
    """The type of dgh, which feeds the weight-gradient product: float32 for float32 weights;
    16-bit weights' own type, as in their forward products (the product accumulates in
    float32 either way)."""
    return torch.float32 if w_hh.dtype == torch.float32 else w_hh.dtype


def _saved_like(gates_x: Tensor, save: bool) -> Tensor:
    steps, batch, three_h = gates_x.shape
    shape = (steps, batch, 4 * (three_h // 3)) if save else (0,)
    return gates_x.new_empty(shape, dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _, h0, w_hh, b_hh, lengths, reverse, save = inputs
    if not save:
        raise RuntimeError("quant_gru::gru_direction records gradients only with save=True")
    out, _, saved = output
    ctx.save_for_backward(h0, w_hh, out, saved, lengths)
    ctx.reverse, ctx.has_bias = reverse, b_hh is not None


def _backward(
    ctx: Any,
    grad_out: Tensor | None,
    grad_h_n: Tensor | None,
    _grad_saved: Any,
) -> tuple[Optional[Tensor], ...]:  # noqa: UP045
    h0, w_hh, out, saved, lengths = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.contiguous()
    grad_gx, grad_h0, grad_gh = gru_direction_backward(
        grad_out, grad_h_n, out, h0, saved, w_hh, lengths, ctx.reverse
    )
    # The weight gradients: one product over every step (dR = Σ_t dgh_tᵀ h_{t-1}).
    previous = previous_states(out, h0, lengths, ctx.reverse).to(grad_gh.dtype)
    grad_w = (grad_gh.flatten(0, 1).t() @ previous.flatten(0, 1)).to(w_hh.dtype)
    grad_b = grad_gh.sum(dim=(0, 1)).to(w_hh.dtype) if ctx.has_bias else None
    return grad_gx, grad_h0.to(h0.dtype), grad_w, grad_b, None, None, None


gru_direction.register_autograd(_backward, setup_context=_setup_context)


def previous_states(out: Tensor, h0: Tensor, lengths: Tensor, reverse: bool) -> Tensor:
    """h_{t-1} of every step (T, B, H): the neighbouring output in the direction's order, h0
    where there is none. Padded steps get values their zero gradients ignore."""
    steps = out.shape[0]
    if not reverse:
        return torch.cat([h0.unsqueeze(0).to(out.dtype), out[:-1]])
    shifted = torch.cat([out[1:], out.new_zeros(1, *out.shape[1:])])
    time = torch.arange(steps, device=out.device).view(-1, 1, 1)
    has_next = (time + 1) < lengths.view(1, -1, 1).to(out.device)
    return torch.where(has_next, shifted, h0.unsqueeze(0).to(out.dtype))
