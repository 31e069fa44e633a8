"""MinMax calibration from known ranges: each activation operator covers its range."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from quant_gru.calibration.parameters import assemble_direction_quant
from quant_gru.config import GRUQuantConfig
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.scales import qparams_from_range


def direction_quant(
    ranges: Mapping[str, tuple[float, float]],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    config: GRUQuantConfig,
) -> DirectionQuant:
    """Parameters of one (layer, direction) from activation ranges and the float weights."""
    activations = {
        name: qparams_from_range(low, high, config.spec(name), config.scale_type)
        for name, (low, high) in ranges.items()
    }
    return assemble_direction_quant(activations, weights, config)
