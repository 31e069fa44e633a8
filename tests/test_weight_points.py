"""QAT's weight points on the kernel (kernels/triton/weight_points.py) against the plain
PyTorch points (quantized_forward.weight_point), bit for bit: the dequantized codes and the
clamp masks of every weight and bias, in every float type, for every granularity, widths up to
32 bits, float and power-of-two scales, weights that saturate, NaN and infinities.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from quant_gru import QuantGRU
from quant_gru.config import OPERATORS, WEIGHT_OPERATORS

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru.kernels.torch.quantized_forward import build_programs, weight_point  # noqa: E402
from quant_gru.kernels.triton.weight_points import kernel_weight_point  # noqa: E402

NAMES = ("weight.W", "weight.R", "weight.bw", "weight.br")


def _config(path: Path, width: int, granularity: str, scale_type: str) -> Path:
    operators: dict = {}
    for name in OPERATORS:
        entry: dict = {"bitwidth": 8}
        if name in WEIGHT_OPERATORS:
            entry.update(
                bitwidth=width, is_symmetric=True, is_unsigned=False, granularity=granularity
            )
        else:
            entry.update(is_symmetric=False, is_unsigned=False)
        operators[name] = entry
    config = {
        "GRU_config": {"default_config": {"scale_type": scale_type}, "operator_config": operators}
    }
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("width", "granularity", "scale_type"),
    [
        (8, "per_tensor", "float"),
        (4, "per_gate", "pot"),
        (16, "per_channel", "float"),
        (32, "per_channel", "float"),
        (2, "per_gate", "float"),
    ],
)
def test_kernel_weight_points_equal_the_plain_points(
    tmp_path: Path, dtype: torch.dtype, width: int, granularity: str, scale_type: str
) -> None:
    torch.manual_seed(0)
    model = QuantGRU(6, 5)
    model.load_bitwidth_config(_config(tmp_path / "config.json", width, granularity, scale_type))
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(4, 2, 6))
    model.calibrating = False
    model.finalize_calibration()
    model = model.to(DEVICE, dtype)
    with torch.no_grad():  # past the calibrated ranges, and values that are not numbers
        for parameter in model.parameters():
            parameter.mul_(1.7)
        model.weight_hh_l0[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        model.bias_ih_l0[1] = float("nan")
    quantized = model._quantized_model()
    weights = model._direction_weights()[0]
    (program,) = build_programs(quantized, [weights])
    quant = quantized.quant[0]
    saturated = 0
    for name, value in zip(NAMES, weights, strict=True):
        expected_value, expected_mask = weight_point(program, quant, name, value)
        value_on_kernel, mask_on_kernel = kernel_weight_point(value, quant[name])
        assert value_on_kernel.dtype == mask_on_kernel.dtype == dtype
        assert torch.equal(value_on_kernel, expected_value), name
        assert torch.equal(mask_on_kernel, expected_mask), name
        saturated += int((expected_mask == 0).sum())
    assert saturated > 3  # the case exercises the masks, not only the NaN and infinities
