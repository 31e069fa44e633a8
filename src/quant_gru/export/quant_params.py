"""Quantization-parameter files: a calibrated QuantGRU's parameters as JSON, and back.

The file alone reproduces the integer codes: besides the bit-width config and each operator's
scales and zero points, it carries the encoded integers (float32 bit patterns or power-of-two
exponents) and, per (layer, direction), the integer program of reference/README.md (the
requantization constants of every term and the sigmoid/tanh tables). With
``include_weights`` it also carries the integer weights.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from quant_gru._files import atomic_write_text
from quant_gru.config import OPERATORS, WEIGHT_OPERATORS, GRUQuantConfig, QuantConfigError
from quant_gru.quant_state import check_scale, check_zero_point
from quant_gru.quantize.params import DirectionQuant, OperatorQuant
from quant_gru.quantize.program import DirectionProgram
from quant_gru.quantize.scales import pot_exponent

FORMAT = "quant-gru/quant-params"
VERSION = 1
MODEL_KEYS = ("input_size", "hidden_size", "num_layers", "bidirectional", "bias")


class QuantParamsError(ValueError):
    """A quant-params file that is malformed or does not fit the module; names the JSON path."""


def encoded_integer(scale: float, scale_type: str) -> int:
    """The integer a scale is stored as: float32 bits, or the power-of-two exponent."""
    if scale_type == "pot":
        return pot_exponent(scale)
    return int(struct.unpack("<I", struct.pack("<f", scale))[0])


def document(
    model_info: Mapping[str, Any],
    config: GRUQuantConfig,
    quant: Sequence[DirectionQuant],
    programs: Sequence[DirectionProgram],
    pair_names: Sequence[str],
    include_weights: bool,
) -> dict[str, Any]:
    """The JSON document of a calibrated module."""
    pairs = []
    for name, direction, program in zip(pair_names, quant, programs, strict=True):
        operators = {}
        for op in OPERATORS:
            q = direction[op]
            scales = q.scale.tolist()
            operators[op] = {
                **q.spec.to_dict(include_granularity=op in WEIGHT_OPERATORS),
                "scale": scales,
                "zero_point": q.zero_point.tolist(),
                "encoded_scale": [encoded_integer(s, config.scale_type) for s in scales],
            }
        entry: dict[str, Any] = {
            "name": name,
            "layer": int(name[1:].split("_")[0]),
            "direction": "reverse" if name.endswith("_reverse") else "forward",
            "operators": operators,
            "integer_program": _program(program),
        }
        if include_weights:
            entry["integer_weights"] = {
                "weight.W": program.weight_W.tolist(),
                "weight.R": program.weight_R.tolist(),
                "weight.bw": program.bias_w.tolist(),
                "weight.br": program.bias_r.tolist(),
            }
        pairs.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": dict(model_info),
        **config.to_dict(),
        "pairs": pairs,
    }


def _program(program: DirectionProgram) -> dict[str, Any]:
    return {
        "terms": {
            op: [
                {
                    "m": t.m.tolist(),
                    "n": t.n.tolist(),
                    "pre_shift": t.pre_shift,
                    "operand_shifts": list(t.operand_shifts),
                }
                for t in terms
            ]
            for op, terms in program.terms.items()
        },
        "tables": {
            op: {"c_lo": table.c_lo, "k": table.k, "y": table.y.tolist()}
            for op, table in program.tables.items()
        },
    }


def write(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def read(
    path: str | os.PathLike[str], model_info: Mapping[str, Any], pair_names: Sequence[str]
) -> tuple[GRUQuantConfig, list[DirectionQuant]]:
    """Parse and validate a file against the module it is loaded into."""
    where = os.fspath(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise QuantParamsError(f"{where}: not valid JSON ({error})") from None
    _expect(isinstance(doc, dict), where, "a JSON object at the top level", type(doc).__name__)
    _expect(doc.get("format") == FORMAT, f"{where}: format", repr(FORMAT), doc.get("format"))
    _expect(doc.get("version") == VERSION, f"{where}: version", VERSION, doc.get("version"))
    model = _object(doc.get("model"), f"{where}: model")
    for key in MODEL_KEYS:
        _expect(
            model.get(key) == model_info[key],
            f"{where}: model.{key}",
            f"{model_info[key]!r} (this module's)",
            model.get(key),
        )
    try:
        config = GRUQuantConfig.from_dict({"GRU_config": doc.get("GRU_config")})
    except QuantConfigError as error:
        raise QuantParamsError(f"{where}: {error}") from None
    pairs = doc.get("pairs")
    _expect(
        isinstance(pairs, list) and len(pairs) == len(pair_names),
        f"{where}: pairs",
        f"a list of {len(pair_names)} (layer, direction) entries",
        f"{len(pairs)} entries" if isinstance(pairs, list) else pairs,
    )
    quant = []
    for index, (name, entry) in enumerate(zip(pair_names, pairs, strict=True)):
        path_i = f"{where}: pairs[{index}]"
        entry = _object(entry, path_i)
        _expect(entry.get("name") == name, f"{path_i}.name", repr(name), entry.get("name"))
        quant.append(_read_pair(entry, config, model_info["hidden_size"], path_i))
    return config, quant


def _read_pair(
    entry: Mapping[str, Any], config: GRUQuantConfig, hidden_size: int, where: str
) -> DirectionQuant:
    operators = _object(entry.get("operators"), f"{where}.operators")
    quant: dict[str, OperatorQuant] = {}
    for op in OPERATORS:
        path = f"{where}.operators['{op}']"
        item = _object(operators.get(op), path)
        spec = config.spec(op)
        for key, want in spec.to_dict(include_granularity=op in WEIGHT_OPERATORS).items():
            _expect(
                item.get(key) == want, f"{path}.{key}", f"{want!r} (from GRU_config)", item.get(key)
            )
        count = {"per_tensor": 1, "per_gate": 3, "per_channel": 3 * hidden_size}[spec.granularity]
        scales, zero_points = item.get("scale"), item.get("zero_point")
        for key, values, kind in (("scale", scales, float), ("zero_point", zero_points, int)):
            _expect(
                isinstance(values, list)
                and len(values) == count
                and all(isinstance(v, kind) and not isinstance(v, bool) for v in values),
                f"{path}.{key}",
                f"a list of {count} {kind.__name__}s",
                values,
            )
        assert isinstance(scales, list) and isinstance(zero_points, list)
        encoded = item.get("encoded_scale")
        for i, scale in enumerate(scales):
            try:
                check_scale(scale, config.scale_type, f"{path}.scale[{i}]")
                check_zero_point(zero_points[i], spec, f"{path}.zero_point[{i}]")
            except ValueError as error:
                raise QuantParamsError(str(error)) from None
            if encoded is not None:
                _expect(
                    isinstance(encoded, list)
                    and len(encoded) == count
                    and encoded[i] == encoded_integer(scale, config.scale_type),
                    f"{path}.encoded_scale[{i}]",
                    f"{encoded_integer(scale, config.scale_type)} (the encoding of scale[{i}])",
                    encoded[i] if isinstance(encoded, list) and i < len(encoded) else encoded,
                )
        quant[op] = OperatorQuant(
            spec,
            torch.tensor(scales, dtype=torch.float64),
            torch.tensor(zero_points, dtype=torch.int64),
        )
    return quant


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise QuantParamsError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _expect(condition: bool, where: str, expected: object, got: object) -> None:
    if not condition:
        text = repr(got)
        if len(text) > 80:
            text = text[:77] + "..."
        raise QuantParamsError(f"{where}: expected {expected}, got {text}")
