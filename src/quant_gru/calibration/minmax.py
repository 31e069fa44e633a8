"""MinMax calibration: each activation operator's parameters cover its observed range."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from quant_gru.config import WEIGHT_OPERATORS, GRUQuantConfig
from quant_gru.quantize.params import DirectionQuant, OperatorQuant
from quant_gru.quantize.program import ACTIVATION_OPERATORS
from quant_gru.quantize.scales import qparams_from_range, weight_scales

_WEIGHT_INDEX = dict(zip(WEIGHT_OPERATORS, range(4), strict=True))


def direction_quant(
    ranges: Mapping[str, tuple[float, float]],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    config: GRUQuantConfig,
) -> DirectionQuant:
    """Parameters of one (layer, direction) from activation ranges and the float weights.

    A missing bias (bias=False) gets scale 1: its codes are all zero whatever the scale.
    """
    missing = [name for name in ACTIVATION_OPERATORS if name not in ranges]
    if missing:
        raise ValueError(f"no calibration range for operators {missing}")
    quant: dict[str, OperatorQuant] = {}
    for name in ACTIVATION_OPERATORS:
        spec = config.spec(name)
        low, high = ranges[name]
        scale, zero_point = qparams_from_range(low, high, spec, config.scale_type)
        quant[name] = OperatorQuant.per_tensor(spec, scale, zero_point)
    for name, index in _WEIGHT_INDEX.items():
        spec = config.spec(name)
        weight = weights[index]
        if weight is None:
            quant[name] = OperatorQuant.per_tensor(spec, 1.0, 0)
            continue
        scales = weight_scales(weight, spec, config.scale_type)
        quant[name] = OperatorQuant(spec, scales, scales.new_zeros(scales.shape).long())
    return quant
