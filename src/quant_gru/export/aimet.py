"""AIMET encodings (format 1.0.0) of a calibrated QuantGRU.

AIMET describes every quantizer on an unsigned grid u in [0, 2^bw - 1] with
real = scale * (u + offset). Our codes q in [qmin, qmax] with real = scale * (q - zp) map to it
by u = q - qmin, so offset = qmin - zp (-128 for a symmetric signed 8-bit quantizer, -zp for an
unsigned one). Activation quantizers are named "<pair>.<operator>" (e.g. "l0_reverse.gate.z_out");
weights and biases take their state_dict names. Per-gate scales are written per channel, which
AIMET supports. The encodings describe the quantization grids only: the integer arithmetic
between them (rounding, tables) is the one of reference/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quant_gru.config import WEIGHT_OPERATORS
from quant_gru.quantize.params import DirectionQuant, OperatorQuant
from quant_gru.quantize.program import ACTIVATION_OPERATORS
from quant_gru.quantize.scales import per_row

VERSION = "1.0.0"
PARAMETER_NAMES = {
    "weight.W": "weight_ih_{pair}",
    "weight.R": "weight_hh_{pair}",
    "weight.bw": "bias_ih_{pair}",
    "weight.br": "bias_hh_{pair}",
}


def _entry(name: str, quant: OperatorQuant, rows: int | None) -> dict[str, Any]:
    scales = quant.scale if rows is None else per_row(quant.scale, rows)
    zero_points = quant.zero_point if rows is None else per_row(quant.zero_point, rows)
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if scales.numel() > 1 else "PER_TENSOR",
        "is_sym": quant.spec.is_symmetric,
        "bw": quant.spec.bitwidth,
        "scale": scales.tolist(),
        "offset": [float(quant.qmin - int(zp)) for zp in zero_points.tolist()],
    }


def encodings(
    quant: Sequence[DirectionQuant], pair_names: Sequence[str], hidden_size: int, bias: bool
) -> dict[str, Any]:
    activations, parameters = [], []
    for pair, direction in zip(pair_names, quant, strict=True):
        for op in ACTIVATION_OPERATORS:
            activations.append(_entry(f"{pair}.{op}", direction[op], None))
        for op in WEIGHT_OPERATORS:
            if op in ("weight.bw", "weight.br") and not bias:
                continue
            name = PARAMETER_NAMES[op].format(pair=pair)
            parameters.append(_entry(name, direction[op], 3 * hidden_size))
    return {
        "version": VERSION,
        "activation_encodings": activations,
        "param_encodings": parameters,
        "excluded_layers": [],
    }
