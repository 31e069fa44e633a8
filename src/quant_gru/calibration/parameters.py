"""Quantization parameters of one (layer, direction): activation parameters (from any
calibration method) together with the weights' max-abs scales."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from quant_gru.config import WEIGHT_OPERATORS, GRUQuantConfig
from quant_gru.quantize.params import DirectionQuant, OperatorQuant
from quant_gru.quantize.program import ACTIVATION_OPERATORS
from quant_gru.quantize.scales import weight_scales


def assemble_direction_quant(
    activations: Mapping[str, tuple[float, int]],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    config: GRUQuantConfig,
) -> DirectionQuant:
    """`activations`: (encoded scale, zero point) of every activation operator. Weights and
    biases are symmetric with max-abs scales at their granularity; a missing bias
    (bias=False) gets scale 1, as its codes are all zero whatever the scale."""
    missing = [name for name in ACTIVATION_OPERATORS if name not in activations]
    if missing:
        raise ValueError(f"no parameters for operators {missing}")
    quant: dict[str, OperatorQuant] = {}
    for name in ACTIVATION_OPERATORS:
        scale, zero_point = activations[name]
        quant[name] = OperatorQuant.per_tensor(config.spec(name), scale, zero_point)
    for name, weight in zip(WEIGHT_OPERATORS, weights, strict=True):
        spec = config.spec(name)
        if weight is None:
            quant[name] = OperatorQuant.per_tensor(spec, 1.0, 0)
            continue
        scales = weight_scales(weight, spec, config.scale_type)
        quant[name] = OperatorQuant(spec, scales, scales.new_zeros(scales.shape).long())
    return quant
