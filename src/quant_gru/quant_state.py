"""The quantization state of a QuantGRU (bit-width config and calibrated parameters) as plain
tensors, so that it travels in ``state_dict`` and survives ``torch.load(weights_only=True)``.

Entries, under the module's prefix, present only once the module is calibrated:

- ``quant_config.specs``  int64 (18, 4): per operator (quant_gru.config.OPERATORS order)
  bitwidth, is_symmetric, is_unsigned, granularity index (GRANULARITIES order);
- ``quant_config.flags``  int64 (2,): scale type index (SCALE_TYPES order), disable_quantization;
- per (layer, direction) ``l{k}{suffix}`` (nn.GRU's naming):
  ``quant_l{k}{suffix}.activation_scale`` float64 (14,) and ``.activation_zero_point`` int64
  (14,) in ACTIVATION_OPERATORS order, and ``.weight_W_scale``, ``.weight_R_scale``,
  ``.weight_bw_scale``, ``.weight_br_scale`` float64 (1, 3 or 3H by granularity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from quant_gru.config import (
    GRANULARITIES,
    OPERATORS,
    SCALE_TYPES,
    WEIGHT_OPERATORS,
    GRUQuantConfig,
    OperatorSpec,
)
from quant_gru.quantize.params import DirectionQuant, OperatorQuant
from quant_gru.quantize.program import ACTIVATION_OPERATORS
from quant_gru.quantize.scales import is_encoded

SPECS_KEY = "quant_config.specs"
FLAGS_KEY = "quant_config.flags"


def weight_key(name: str) -> str:
    return name.replace(".", "_") + "_scale"  # weight.W -> weight_W_scale


def encode_state(
    config: GRUQuantConfig, quant: Sequence[DirectionQuant], pair_names: Sequence[str]
) -> dict[str, Tensor]:
    """State-dict entries (without the module prefix) of a calibrated module."""
    specs = [
        [s.bitwidth, int(s.is_symmetric), int(s.is_unsigned), GRANULARITIES.index(s.granularity)]
        for s in (config.operators[name] for name in OPERATORS)
    ]
    flags = [SCALE_TYPES.index(config.scale_type), int(config.disable_quantization)]
    entries = {
        SPECS_KEY: torch.tensor(specs, dtype=torch.int64),
        FLAGS_KEY: torch.tensor(flags, dtype=torch.int64),
    }
    for pair, direction in zip(pair_names, quant, strict=True):
        base = f"quant_{pair}."
        entries[base + "activation_scale"] = torch.cat(
            [direction[n].scale for n in ACTIVATION_OPERATORS]
        ).double()
        entries[base + "activation_zero_point"] = torch.cat(
            [direction[n].zero_point for n in ACTIVATION_OPERATORS]
        ).long()
        for name in WEIGHT_OPERATORS:
            entries[base + weight_key(name)] = direction[name].scale.double().clone()
    return entries


def has_state(state: Mapping[str, object], prefix: str) -> bool:
    return prefix + SPECS_KEY in state


def decode_state(
    state: Mapping[str, object], prefix: str, pair_names: Sequence[str], hidden_size: int
) -> tuple[GRUQuantConfig, list[DirectionQuant]]:
    """Parse and validate entries written by encode_state; raises ValueError naming the key."""
    specs = _tensor(state, prefix + SPECS_KEY, (len(OPERATORS), 4), torch.int64)
    flags = _tensor(state, prefix + FLAGS_KEY, (2,), torch.int64)
    entries = {}
    for name, (bits, symmetric, unsigned, granularity) in zip(
        OPERATORS, specs.tolist(), strict=True
    ):
        if not 0 <= granularity < len(GRANULARITIES):
            raise ValueError(f"{prefix + SPECS_KEY}: granularity index {granularity} of {name}")
        entries[name] = {
            "bitwidth": bits,
            "is_symmetric": bool(symmetric),
            "is_unsigned": bool(unsigned),
            **({"granularity": GRANULARITIES[granularity]} if name in WEIGHT_OPERATORS else {}),
        }
    scale_index, disable = flags.tolist()
    if not 0 <= scale_index < len(SCALE_TYPES):
        raise ValueError(f"{prefix + FLAGS_KEY}: scale type index {scale_index}")
    config = GRUQuantConfig.from_dict(
        {
            "GRU_config": {
                "default_config": {
                    "disable_quantization": bool(disable),
                    "scale_type": SCALE_TYPES[scale_index],
                },
                "operator_config": entries,
            }
        }
    )
    quant = [
        _decode_pair(state, f"{prefix}quant_{pair}.", config, hidden_size) for pair in pair_names
    ]
    return config, quant


def _decode_pair(
    state: Mapping[str, object], base: str, config: GRUQuantConfig, hidden_size: int
) -> DirectionQuant:
    count = len(ACTIVATION_OPERATORS)
    scales = _tensor(state, base + "activation_scale", (count,), torch.float64)
    zero_points = _tensor(state, base + "activation_zero_point", (count,), torch.int64)
    quant: dict[str, OperatorQuant] = {}
    for i, name in enumerate(ACTIVATION_OPERATORS):
        spec = config.spec(name)
        scale, zero_point = float(scales[i]), int(zero_points[i])
        check_scale(scale, config.scale_type, f"{base}activation_scale[{i}] ({name})")
        check_zero_point(zero_point, spec, f"{base}activation_zero_point[{i}] ({name})")
        quant[name] = OperatorQuant.per_tensor(spec, scale, zero_point)
    for name in WEIGHT_OPERATORS:
        spec = config.spec(name)
        groups = {"per_tensor": 1, "per_gate": 3, "per_channel": 3 * hidden_size}[spec.granularity]
        key = base + weight_key(name)
        weight_scales = _tensor(state, key, (groups,), torch.float64)
        for i, scale in enumerate(weight_scales.tolist()):
            check_scale(scale, config.scale_type, f"{key}[{i}]")
        quant[name] = OperatorQuant(
            spec, weight_scales.clone(), torch.zeros(groups, dtype=torch.int64)
        )
    return quant


def check_scale(scale: float, scale_type: str, where: str) -> None:
    if not is_encoded(scale, scale_type):
        kind = "a float32 value" if scale_type == "float" else "a power of two"
        raise ValueError(f"{where}: expected {kind} in [2^-64, 2^64], got {scale!r}")


def check_zero_point(zero_point: int, spec: OperatorSpec, where: str) -> None:
    low, high = (0, 0) if spec.is_symmetric else (spec.qmin, spec.qmax)
    if not low <= zero_point <= high:
        raise ValueError(f"{where}: expected a zero point in [{low}, {high}], got {zero_point}")


def _tensor(
    state: Mapping[str, object], key: str, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    if key not in state:
        raise ValueError(f"{key}: missing from the state dict")
    value = state[key]
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
        got = (
            f"{tuple(value.shape)} {value.dtype}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise ValueError(f"{key}: expected a {dtype} tensor of shape {shape}, got {got}")
    return value.detach().cpu()
