"""The Triton GRU direction as torch.library custom operators: torch.compile sees one opaque,
differentiable operator per (layer, direction) instead of tracing the launchers, and the fake
implementations give it the output shapes. Importing this module defines the operators but
imports nothing from triton (the kernels load on first call), so it is safe at package import.

``direction`` is what the GRU calls: the custom operator under torch.compile, and in eager
code the same implementation without the operator's dispatch (an autograd.Function when
training), which costs a few hundred microseconds of host time a call.
"""

# No `from __future__ import annotations`: torch.library reads the annotations at definition.

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Float32 input projections of at most this many input features run in IEEE float32 even
# where TF32 is allowed. They are memory-bound there (a few products an output element), so
# exactness costs no time; and a TF32 projection measured up to 2.9x cuDNN's error in a first
# layer's final state on an H100 (at (48, H=512) with I=24, where cuDNN's own projection
# is exact), at most 1.2x in IEEE float32.
IEEE_PROJECTION_INPUTS = 32
_matmul_switch = threading.Lock()


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:  # noqa: UP045
    """Every step's input projection x W_ih^T + b_ih, one product (see IEEE_PROJECTION_INPUTS
    for its precision). Under torch.compile the product follows torch's TF32 switch as is."""
    narrow = x.shape[-1] <= IEEE_PROJECTION_INPUTS and x.dtype == torch.float32
    if not narrow or torch.compiler.is_compiling():
        return F.linear(x, w_ih, b_ih)
    with _ieee_matmuls():
        return F.linear(x, w_ih, b_ih)


@contextmanager
def _ieee_matmuls() -> Iterator[None]:
    """Float32 matrix products in IEEE float32 inside, torch's TF32 switch restored after
    (one thread at a time, so that two threads cannot restore each other's value)."""
    with _matmul_switch:
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed


def layer_direction(
    x: Tensor,
    w_ih: Tensor,
    b_ih: Optional[Tensor],  # noqa: UP045
    h0: Optional[Tensor],  # noqa: UP045
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor]:
    """One (layer, direction) from its input ``x`` (T, B, I): ``input_projection``, then
    ``direction``. Eager training runs the two as one autograd node (``_EagerLayer``): the
    projection then records nothing for autograd, and its backward needs no node of its own,
    which saves host time on every step."""
    if save and not torch.compiler.is_compiling():
        from quant_gru.kernels.triton.plans import batch_limit

        limit = batch_limit(x.device)
        if limit is None or x.shape[1] <= limit:
            out, h_n = _EagerLayer.apply(x, w_ih, b_ih, h0, w_hh, b_hh, lengths, reverse)
            return out, h_n
    gates_x = input_projection(x, w_ih, b_ih)
    return direction(gates_x, h0, w_hh, b_hh, lengths, reverse, save)


def direction(
    gates_x: Tensor,
    h0: Optional[Tensor],  # noqa: UP045
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor]:
    """(output (T, B, H), h_n (B, H)) of one direction from ``h0`` (None: zeros) over rows
    ``lengths`` long (int32; None: T); differentiable when ``save``. Batches larger than one
    launch takes run in slices of rows (rows are independent)."""
    from quant_gru.kernels.triton.plans import batch_limit

    limit = batch_limit(gates_x.device)
    if limit is not None and gates_x.shape[1] > limit:
        slices = [slice(rows, rows + limit) for rows in range(0, gates_x.shape[1], limit)]
        parts = [
            direction(
                gates_x[:, r],
                None if h0 is None else h0[r],
                w_hh,
                b_hh,
                None if lengths is None else lengths[r],
                reverse,
                save,
            )
            for r in slices
        ]
        return torch.cat([out for out, _ in parts], dim=1), torch.cat([h for _, h in parts])
    if torch.compiler.is_compiling():
        out, h_n, _ = gru_direction(gates_x, h0, w_hh, b_hh, lengths, reverse, save)
        return out, h_n
    if not save:
        from quant_gru.kernels.triton.gru_forward import gru_direction_forward

        return gru_direction_forward(gates_x, h0, w_hh, b_hh, lengths, reverse)
    out, h_n = _EagerDirection.apply(gates_x, h0, w_hh, b_hh, lengths, reverse)
    return out, h_n


def _forward(
    gates_x: Tensor,
    h0: Optional[Tensor],  # noqa: UP045
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
    save: bool,
    rounded: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor]:
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    saved = _saved_like(gates_x, save)
    out, h_n = gru_direction_forward(
        gates_x, h0, w_hh, b_hh, lengths, reverse, saved if save else None, rounded=rounded
    )
    return out, h_n, saved


def _rounded_for_backward(gates_x: Tensor, w_hh: Tensor) -> Optional[Tensor]:  # noqa: UP045
    """An empty (3H, H) tensor for the forward to fill with R rounded to TF32 where the
    backward runs the TF32 tile kernel (float32 weights, TF32 on), else None: the forward
    rounds R in its registers (row kernels) or rounds it anyway (tile kernels), which saves
    the backward two launches on the host's critical path."""
    from quant_gru.kernels.triton.plans import backward_plan
    from quant_gru.kernels.triton.products import TF32, dot_precision

    if w_hh.dtype != torch.float32 or dot_precision(w_hh.dtype) != TF32:
        return None
    batch, hidden = gates_x.shape[1], w_hh.shape[1]
    if backward_plan(batch, hidden, w_hh.element_size(), gates_x.device).rows:
        return None
    return torch.empty(w_hh.shape, device=w_hh.device, dtype=torch.float32)


@torch.library.custom_op("quant_gru::gru_direction", mutates_args=())
def gru_direction(
    gates_x: Tensor,
    h0: Optional[Tensor],  # noqa: UP045 (torch.library's schema inference)
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output (T, B, H), h_n (B, H), saved gates (T, B, 4H) in ``recurrent_grad_type``, empty
    unless ``save``) over precomputed input projections ``gates_x`` (T, B, 3H) from ``h0``
    (None: zeros); ``lengths`` (B,) int32 (None: every row T long)."""
    return _forward(gates_x, h0, w_hh, b_hh, lengths, reverse, save)


@gru_direction.register_fake
def _gru_direction_fake(
    gates_x: Tensor,
    h0: Optional[Tensor],  # noqa: UP045
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch, three_h = gates_x.shape
    out = gates_x.new_empty(steps, batch, three_h // 3)
    return out, gates_x.new_empty(batch, three_h // 3), _saved_like(gates_x, save)


def _backward_kernels(
    grad_out: Tensor,
    grad_h_n: Optional[Tensor],  # noqa: UP045 (torch.library's schema inference)
    out: Tensor,
    h0: Optional[Tensor],  # noqa: UP045
    saved: Tensor,
    w_hh: Tensor,
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of gates_x, grad of h0 (float32), grad of R_n h + b_n (T, B, H) in
    recurrent_grad_type). The recurrent pre-activations' gradient is (grad of gates_x's r and
    z parts, the last). None for grad_h_n or h0: zeros; for lengths: every row T long."""
    from quant_gru.kernels.triton.gru_backward import gru_direction_backward as launch

    return launch(grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse, out.dtype)


# The operator wraps the plain function, which eager backward calls directly.
gru_direction_backward = torch.library.custom_op(
    "quant_gru::gru_direction_backward", _backward_kernels, mutates_args=()
)


@gru_direction_backward.register_fake
def _gru_direction_backward_fake(
    grad_out: Tensor,
    grad_h_n: Optional[Tensor],  # noqa: UP045
    out: Tensor,
    h0: Optional[Tensor],  # noqa: UP045
    saved: Tensor,
    w_hh: Tensor,
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch, hidden = out.shape
    grad_ghn = out.new_empty(steps, batch, hidden, dtype=recurrent_grad_type(w_hh))
    return (
        out.new_empty(steps, batch, 3 * hidden),
        out.new_empty(batch, hidden, dtype=torch.float32),
        grad_ghn,
    )


def recurrent_grad_type(w_hh: Tensor) -> torch.dtype:
    """The type of the gates saved for the backward and of dgh, which feeds the weight-gradient
    product: float32 for float32 weights; 16-bit weights' own type, as in their forward
    products (arithmetic stays float32 in the kernels, products accumulate in float32)."""
    return torch.float32 if w_hh.dtype == torch.float32 else w_hh.dtype


def _saved_like(gates_x: Tensor, save: bool) -> Tensor:
    steps, batch, three_h = gates_x.shape
    shape = (steps, batch, 4 * (three_h // 3)) if save else (0,)
    return gates_x.new_empty(shape, dtype=recurrent_grad_type(gates_x))


def _setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...], *more_saved: Tensor
) -> None:
    """The operator's (``more_saved``: kept after its saved tensors, for the eager layer)."""
    _, h0, w_hh, b_hh, lengths, reverse, save = inputs
    if not save:
        raise RuntimeError("quant_gru::gru_direction records gradients only with save=True")
    out, _, saved = output
    ctx.save_for_backward(h0, w_hh, out, saved, lengths, *more_saved)
    # No zero-filled gradient for the saved gates (an output as large as four outputs).
    ctx.set_materialize_grads(False)
    ctx.reverse, ctx.has_bias = reverse, b_hh is not None


def _backward(
    ctx: Any,
    grad_out: Tensor | None,
    grad_h_n: Tensor | None,
    _grad_saved: Any,
) -> tuple[Optional[Tensor], ...]:  # noqa: UP045
    return _gradients(ctx, grad_out, grad_h_n, gru_direction_backward)


def _gradients(
    ctx: Any,
    grad_out: Tensor | None,
    grad_h_n: Tensor | None,
    kernels: Callable[..., tuple[Tensor, Tensor, Tensor]],
    grad_b_ih: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Optional[Tensor], ...]:  # noqa: UP045
    """Every input's gradient, with the backward kernels run by ``kernels``: the operator
    under torch.compile, ``_backward_kernels`` directly in eager code. ``grad_b_ih`` (3H,),
    when given, receives Σ dgx, the input bias's gradient, which b_hh's shares in its r and z
    rows: one sum over (T, B, 3H) for both."""
    h0, w_hh, out, saved, lengths = ctx.saved_tensors[:5]
    # The kernels read grad_out with any strides: a loss's gradient stays as it comes (often
    # expanded), and an absent one is a single zero expanded.
    grad_out = out.new_zeros(1).expand(out.shape) if grad_out is None else grad_out
    grad_gx, grad_h0, grad_ghn = kernels(
        grad_out, grad_h_n, out, h0, saved, w_hh, lengths, ctx.reverse
    )
    # The weight gradients: products over every step (dR = Σ_t dgh_tᵀ h_{t-1}), where dgh is
    # dgx in its r and z parts, written into their gate rows (no concatenation afterwards).
    # dgh has R's type (recurrent_grad_type); dgx, the inputs' type, is the same one whenever
    # the GRU calls this (the conversions guard a direct call of the operator with mixed types).
    hidden = out.shape[-1]
    grad_w = w_hh.new_empty(w_hh.shape)
    grad_rz = _as(grad_gx[..., : 2 * hidden], grad_w.dtype)
    pairs = ((grad_rz, grad_w[:-hidden]), (grad_ghn, grad_w[-hidden:]))
    recurrent_weight_grad(pairs, out, h0, lengths, ctx.reverse)
    if grad_b_ih is not None:
        _step_sum(_as(grad_gx, grad_b_ih.dtype), grad_b_ih)
    grad_b = None
    if ctx.has_bias:  # summed whole: a sum over the r and z slice would copy it first
        grad_b = w_hh.new_empty(3 * hidden)
        if grad_b_ih is None:
            _step_sum(_as(grad_gx, grad_b.dtype), grad_b)
        else:
            grad_b[:-hidden].copy_(grad_b_ih[:-hidden])
        _step_sum(grad_ghn, grad_b[-hidden:])  # the n rows: R_n h + b_n's gradient
    grad_start = None if h0 is None else _as(grad_h0, h0.dtype)
    return grad_gx, grad_start, grad_w, grad_b, None, None, None


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, without a dispatch when it is already (host time a call)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _step_sum(grad: Tensor, into: Tensor) -> None:
    """Σ over steps and rows of ``grad`` (T, B, K) into ``into`` (K,). 16-bit: a product with
    ones, which accumulates in float32 without a temporary; a bfloat16 sum over two dimensions
    allocated four times the tensor's size (measured on an H100, torch 2.11)."""
    rows = grad.flatten(0, 1)
    if grad.dtype == torch.float32:
        torch.sum(rows, dim=0, out=into)
    else:
        torch.mm(rows.new_ones(1, rows.shape[0]), rows, out=into.view(1, -1))


gru_direction.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(
    ctx: Any,
    gates_x: Tensor,
    h0: Optional[Tensor],  # noqa: UP045
    w_hh: Tensor,
    b_hh: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    reverse: bool,
    *more_saved: Tensor,
) -> tuple[Tensor, Tensor]:
    """The operator's forward and setup_context for eager autograd, keeping R rounded for the
    backward where it needs it (``_rounded_for_backward``) and ``more_saved`` after the
    operator's saved tensors."""
    rounded = _rounded_for_backward(gates_x, w_hh)
    out, h_n, saved = _forward(gates_x, h0, w_hh, b_hh, lengths, reverse, True, rounded)
    inputs = (gates_x, h0, w_hh, b_hh, lengths, reverse, True)
    _setup_context(ctx, inputs, (out, h_n, saved), *more_saved)
    ctx.rounded = rounded
    return out, h_n


def _eager_gradients(
    ctx: Any,
    grad_out: Tensor | None,
    grad_h_n: Tensor | None,
    grad_b_ih: Tensor | None = None,
) -> tuple[Optional[Tensor], ...]:  # noqa: UP045
    """``_gradients`` straight to the kernels (the operator's dispatch costs host time with
    nothing to do), with the forward's rounded R."""
    from quant_gru.kernels.triton.gru_backward import gru_direction_backward as launch

    def kernels(*arguments: Any) -> tuple[Tensor, Tensor, Tensor]:
        grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse = arguments
        operands = (grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse, out.dtype)
        return launch(*operands, rounded=ctx.rounded)

    return _gradients(ctx, grad_out, grad_h_n, kernels, grad_b_ih)


class _EagerDirection(torch.autograd.Function):
    """The operator's forward and backward for eager autograd, without its dispatch."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor]:
        """(gates_x, h0, w_hh, b_hh, lengths, reverse), as ``_eager_forward`` takes them."""
        return _eager_forward(ctx, *inputs)

    @staticmethod
    def backward(
        ctx: Any,
        grad_out: Tensor | None,
        grad_h_n: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        return _eager_gradients(ctx, grad_out, grad_h_n)[:6]


class _EagerLayer(torch.autograd.Function):
    """``_EagerDirection`` with the input projection inside: x W_ih^T + b_ih in the forward,
    and its gradients from the gates' in the backward (the products autograd's node for it
    would launch, less that node's host time)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w_ih: Tensor,
        b_ih: Optional[Tensor],  # noqa: UP045
        *direction: Any,
    ) -> tuple[Tensor, Tensor]:
        """``direction``: (h0, w_hh, b_hh, lengths, reverse), as ``_eager_forward`` takes them."""
        gates_x = input_projection(x, w_ih, b_ih)
        return _eager_forward(ctx, gates_x, *direction, x, w_ih)

    @staticmethod
    def backward(
        ctx: Any,
        grad_out: Tensor | None,
        grad_h_n: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        x, w_ih = ctx.saved_tensors[5:]
        need_x, need_w_ih, need_b_ih = ctx.needs_input_grad[:3]
        grad_b_ih = w_ih.new_empty(w_ih.shape[0]) if need_b_ih else None
        gradients = _eager_gradients(ctx, grad_out, grad_h_n, grad_b_ih)
        grad_gx, grad_h0, grad_w_hh, grad_b_hh = gradients[:4]
        assert grad_gx is not None
        rows = grad_gx.flatten(0, 1)
        grad_x = torch.mm(rows, w_ih).view(x.shape) if need_x else None
        grad_w_ih = torch.mm(rows.t(), x.reshape(rows.shape[0], -1)) if need_w_ih else None
        return grad_x, grad_w_ih, grad_b_ih, grad_h0, grad_w_hh, grad_b_hh, None, None


def recurrent_weight_grad(
    pairs: Sequence[tuple[Tensor, Tensor]],
    out: Tensor,
    h0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
) -> None:
    """For each (``grad`` (T, B, K), ``into`` (K, H) of grad's type) of ``pairs``:
    Σ_t grad_tᵀ h_{t-1} into ``into``, where h_{t-1} is the neighbouring output in the
    direction's order or h0 (None: zeros, which add nothing), without building the (T, B, H)
    tensor of h_{t-1}: the outputs shifted by one step (taken once for every pair), plus h0 at
    each sequence's first step. Padded steps have zero gradients and zero outputs, so they add
    nothing."""
    previous_rows: Tensor | None = None
    # A sequence's first step in reverse is its last valid one: the same rows for every pair.
    last = None
    if h0 is not None and reverse and lengths is not None:
        last = (lengths.to(out.device).long() - 1).clamp(min=0).view(1, -1, 1)
    for grad, into in pairs:
        if previous_rows is None or previous_rows.dtype != grad.dtype:
            # Reverse: step t follows step t + 1.
            shifted = out[1:] if reverse else out[:-1]
            previous_rows = _as(shifted, grad.dtype).flatten(0, 1)
        rest = grad[:-1] if reverse else grad[1:]
        if h0 is None:
            torch.mm(rest.flatten(0, 1).t(), previous_rows, out=into)
            continue
        if not reverse:
            first = grad[0]
        elif last is None:
            first = grad[-1]
        else:
            first = grad.gather(0, last.expand(1, *grad.shape[1:]))[0]
        torch.mm(first.t(), _as(h0, grad.dtype), out=into)
        into.addmm_(rest.flatten(0, 1).t(), previous_rows)
