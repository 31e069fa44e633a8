"""The input projection's precision: narrow float32 inputs are projected in IEEE float32 even
where TF32 is allowed (kernels/triton/ops.py, IEEE_PROJECTION_INPUTS), and torch's switch is
left as it was found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant_gru.kernels.triton import ops


def _tf32_seen(monkeypatch: pytest.MonkeyPatch, inputs: int, dtype: torch.dtype) -> bool:
    """Whether the product inside input_projection ran with TF32 allowed."""
    seen = []
    original = F.linear

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(x, w, b)

    monkeypatch.setattr(ops.F, "linear", linear)
    x = torch.randn(5, 2, inputs, dtype=dtype)
    w, b = torch.randn(12, inputs, dtype=dtype), torch.randn(12, dtype=dtype)
    out = ops.input_projection(x, w, b)
    torch.testing.assert_close(out, x @ w.t() + b, rtol=1e-2, atol=1e-2)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    ("inputs", "dtype", "tf32_inside"),
    [
        (ops.IEEE_PROJECTION_INPUTS, torch.float32, False),
        (ops.IEEE_PROJECTION_INPUTS + 1, torch.float32, True),
        (8, torch.bfloat16, True),
    ],
)
def test_narrow_float32_projection_is_ieee(
    monkeypatch: pytest.MonkeyPatch, inputs: int, dtype: torch.dtype, tf32_inside: bool
) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert _tf32_seen(monkeypatch, inputs, dtype) is tf32_inside
    assert torch.backends.cuda.matmul.allow_tf32 is True


def test_switch_restored_when_the_product_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x, w = torch.randn(3, 2, 4), torch.randn(12, 5)  # 4 inputs against 5 columns
    with pytest.raises(RuntimeError):
        ops.input_projection(x, w, None)
    assert torch.backends.cuda.matmul.allow_tf32 is True
