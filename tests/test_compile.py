"""torch.compile sees QuantGRU without a graph break (fullgraph=True), forward and backward:
the plain path traces as torch operations, the Triton path as its custom operators
(kernels/triton/ops.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from quant_gru import QuantGRU

from tolerance import assert_float_conformant

GPU = torch.cuda.is_available()


def step(model: QuantGRU, x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """Output, h_n and the gradients of the input and every parameter; through
    torch.compile(fullgraph=True), which raises at any graph break, when given a backend."""
    run = model if backend is None else torch.compile(model, backend=backend, fullgraph=True)
    x = x.detach().requires_grad_()
    out, h_n = run(x)
    (out.square().sum() + h_n.sum()).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), h_n.detach(), x.grad, *grads


def test_plain_path_compiles_without_a_graph_break() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = QuantGRU(5, 12, num_layers=2, bidirectional=True, batch_first=True)
    model.backend = "torch"
    x = torch.randn(3, 6, 5)
    for got, want in zip(step(model, x, "aot_eager"), step(model, x), strict=True):
        assert_float_conformant(got, want.double())


@pytest.mark.skipif(
    not GPU or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA device and triton (the interpreter does not run under torch.compile; "
    "the custom operators themselves run under it in test_triton_forward.py)",
)
def test_triton_path_compiles_without_a_graph_break() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = QuantGRU(5, 12, num_layers=2, bidirectional=True).cuda()
    model.backend = "triton"
    x = torch.randn(6, 3, 5, device="cuda")
    for got, want in zip(step(model, x, "inductor"), step(model, x), strict=True):
        assert_float_conformant(got, want.double())
