"""Bit-width configuration of the quantized GRU.

A configuration says, for each of the GRU's quantized operators (``OPERATORS``), how many bits it
uses, whether its quantization is symmetric, whether its integer range is unsigned and, for weights
and biases, the granularity of its scales. It is stored as JSON in this shape::

    {"GRU_config": {
        "default_config": {"disable_quantization": false, "scale_type": "float"},
        "operator_config": {
            "input.x":  {"bitwidth": 8, "is_symmetric": false, "is_unsigned": false},
            "weight.W": {"bitwidth": 8, "is_symmetric": true, "is_unsigned": false,
                         "granularity": "per_channel"},
            ...}}}

Files may be partial: operators left out of ``operator_config`` take the shipped default
(``configs/default_bitwidth.json``, see ``GRUQuantConfig.default()``), as do keys left out of
``default_config`` or of an operator entry (except ``bitwidth``, which every entry must give).
``input.h`` is read as an alias of ``output.h``; written files always say ``output.h``.

Every input is validated before anything is built; a problem raises ``QuantConfigError`` whose
message starts with the JSON path of the offending key and says what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

from quant_gru._files import atomic_write_text

__all__ = [
    "GRANULARITIES",
    "MAX_BITWIDTH",
    "MIN_BITWIDTH",
    "OPERATORS",
    "OPERATOR_ALIASES",
    "OPERATOR_DOCS",
    "SCALE_TYPES",
    "WEIGHT_OPERATORS",
    "GRUQuantConfig",
    "OperatorSpec",
    "QuantConfigError",
    "UnknownOperatorError",
    "load_bitwidth_config",
]

OPERATORS: tuple[str, ...] = (
    "input.x",
    "output.h",
    "weight.W",
    "weight.R",
    "weight.bw",
    "weight.br",
    "matmul.Wx",
    "matmul.Rh",
    "gate.z_pre",
    "gate.z_out",
    "gate.r_pre",
    "gate.r_out",
    "gate.g_pre",
    "gate.g_out",
    "op.Rh_add_br",
    "op.rRh",
    "op.old_contrib",
    "op.new_contrib",
)
WEIGHT_OPERATORS: tuple[str, ...] = ("weight.W", "weight.R", "weight.bw", "weight.br")
OPERATOR_ALIASES: Mapping[str, str] = MappingProxyType({"input.h": "output.h"})

# Equations follow torch.nn.GRU: r and z are sigmoid gates, g (nn.GRU's n) is the tanh candidate
# and h_t = (1 - z) * g + z * h_{t-1}.
OPERATOR_DOCS: Mapping[str, str] = MappingProxyType(
    {
        "input.x": "The layer input x_t.",
        "output.h": "The hidden state h (also the initial state h0 and the layer output).",
        "weight.W": "Input weight matrix W (gate order r, z, n as in nn.GRU).",
        "weight.R": "Recurrent weight matrix R (gate order r, z, n as in nn.GRU).",
        "weight.bw": "Input bias b_w (nn.GRU's bias_ih, gate order r, z, n).",
        "weight.br": "Recurrent bias b_r (nn.GRU's bias_hh, gate order r, z, n).",
        "matmul.Wx": "Input projection W x_t + b_w, all three gates.",
        "matmul.Rh": "Recurrent projection R h_{t-1}, all three gates (no bias).",
        "gate.z_pre": "Update gate pre-activation.",
        "gate.z_out": "Update gate z = sigmoid(z_pre), in [0, 1].",
        "gate.r_pre": "Reset gate pre-activation.",
        "gate.r_out": "Reset gate r = sigmoid(r_pre), in [0, 1].",
        "gate.g_pre": "Candidate pre-activation W_n x_t + b_in + r * (R_n h_{t-1} + b_hn).",
        "gate.g_out": "Candidate g = tanh(g_pre) (nn.GRU's n), in [-1, 1].",
        "op.Rh_add_br": "Recurrent projection with its bias, R h_{t-1} + b_r, all three gates.",
        "op.rRh": "Reset-gated recurrent candidate part, r * (R_n h_{t-1} + b_hn).",
        "op.old_contrib": "Contribution of the previous state, z * h_{t-1}.",
        "op.new_contrib": "Contribution of the candidate, (1 - z) * g.",
    }
)

GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_gate", "per_channel")
SCALE_TYPES: tuple[str, ...] = ("float", "pot")  # pot: power-of-two scales
MIN_BITWIDTH = 1
MAX_BITWIDTH = 32

_ROOT_KEY = "GRU_config"
_SECTION_KEYS = ("default_config", "operator_config")
_DEFAULT_CONFIG_KEYS = ("disable_quantization", "scale_type")
_SPEC_KEYS = ("bitwidth", "is_symmetric", "is_unsigned", "granularity")
_DEFAULTS_PATH = f"{_ROOT_KEY}.default_config"
_OPERATORS_PATH = f"{_ROOT_KEY}.operator_config"
_TOP_LEVEL = "(top level)"
_WEIGHT_RULE = "weights and biases are quantized symmetric and signed"
_VALID_OPERATORS_TEXT = ", ".join(OPERATORS) + "".join(
    f" (alias {alias} -> {name})" for alias, name in OPERATOR_ALIASES.items()
)
_T = TypeVar("_T")


class QuantConfigError(ValueError):
    """An invalid bit-width configuration.

    The message starts with the JSON path of the offending key, e.g.
    ``GRU_config.operator_config['weight.W'].bitwidth: expected an integer in 1..32, got 33``.
    """


class UnknownOperatorError(QuantConfigError, KeyError):
    """An operator name that is neither in ``OPERATORS`` nor an alias of one."""

    def __str__(self) -> str:
        # KeyError.__str__ would print the message as a quoted repr.
        return str(self.args[0]) if self.args else ""


# --- value checks shared by the JSON reader and the dataclass constructors ----------------------


def _describe(value: object) -> str:
    """The offending value as shown in messages: plain numbers as-is, others with their type."""
    if type(value) in (int, float):
        return repr(value)
    text = repr(value)
    if len(text) > 60:  # keep messages readable when a whole object lands in the wrong place
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _child(path: str, key: object) -> str:
    """JSON path of ``key`` under ``path``; operator names contain dots, so they get brackets."""
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _fail(path: str, expected: str, value: object) -> NoReturn:
    raise QuantConfigError(f"{path}: expected {expected}, got {_describe(value)}")


def _expect_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, "a bool", value)
    return value


def _expect_bitwidth(value: object, path: str) -> int:
    # bool is an int subclass, but `"bitwidth": true` is a mistake, not a 1-bit request.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"an integer in {MIN_BITWIDTH}..{MAX_BITWIDTH}", value)
    if not MIN_BITWIDTH <= value <= MAX_BITWIDTH:
        _fail(path, f"an integer in {MIN_BITWIDTH}..{MAX_BITWIDTH}", value)
    return value


def _expect_choice(value: object, choices: tuple[str, ...], path: str) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(path, "one of " + ", ".join(map(repr, choices)), value)
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def check(value: object, path: str) -> str:
        return _expect_choice(value, choices, path)

    return check


def _expect_mapping(value: object, path: str, expected: str = "an object") -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        _fail(path, expected, value)
    return value


def _reject_unknown_keys(fields: Mapping[Any, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in fields:
        if key not in allowed:
            valid = ", ".join(map(repr, allowed))
            raise QuantConfigError(f"{_child(path, key)}: unknown key {key!r}; valid keys: {valid}")


def _take(
    fields: Mapping[Any, Any],
    key: str,
    path: str,
    check: Callable[[object, str], _T],
    fallback: _T | None,
) -> _T:
    """``fields[key]`` checked, else ``fallback``; a missing key without a fallback is an error."""
    if key in fields:
        return check(fields[key], _child(path, key))
    if fallback is None:
        raise QuantConfigError(f"{_child(path, key)}: required key is missing")
    return fallback


def _canonical_operator(name: object, path: str) -> str:
    if isinstance(name, str):
        canonical = OPERATOR_ALIASES.get(name, name)
        if canonical in OPERATORS:
            return canonical
    raise UnknownOperatorError(
        f"{path}: unknown operator {name!r}; expected one of {_VALID_OPERATORS_TEXT}"
    )


def _reject_alias_conflicts(names: Iterable[object], path: str) -> None:
    given = set(names)
    for alias, canonical in OPERATOR_ALIASES.items():
        if alias in given and canonical in given:
            raise QuantConfigError(
                f"{_child(path, alias)}: {alias!r} is an alias of {canonical!r} and both are "
                "given; keep only one"
            )


# --- the configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorSpec:
    """Quantization settings of one operator.

    ``granularity`` matters only for weight operators (``WEIGHT_OPERATORS``); the others are
    always quantized per tensor.
    """

    bitwidth: int
    is_symmetric: bool
    is_unsigned: bool
    granularity: str = "per_tensor"

    def __post_init__(self) -> None:
        _expect_bitwidth(self.bitwidth, "OperatorSpec.bitwidth")
        _expect_bool(self.is_symmetric, "OperatorSpec.is_symmetric")
        _expect_bool(self.is_unsigned, "OperatorSpec.is_unsigned")
        _expect_choice(self.granularity, GRANULARITIES, "OperatorSpec.granularity")

    @property
    def qmin(self) -> int:
        """Smallest value of the full ``bitwidth``-bit integer range (0 when unsigned)."""
        return 0 if self.is_unsigned else -(1 << (self.bitwidth - 1))

    @property
    def qmax(self) -> int:
        """Largest value of the full ``bitwidth``-bit integer range."""
        if self.is_unsigned:
            return (1 << self.bitwidth) - 1
        return (1 << (self.bitwidth - 1)) - 1

    def to_dict(self, include_granularity: bool = True) -> dict[str, Any]:
        """The JSON entry of this operator (the config leaves granularity out for non-weights)."""
        entry: dict[str, Any] = {
            "bitwidth": self.bitwidth,
            "is_symmetric": self.is_symmetric,
            "is_unsigned": self.is_unsigned,
        }
        if include_granularity:
            entry["granularity"] = self.granularity
        return entry


def _check_operator_rules(name: str, spec: OperatorSpec, path: str) -> None:
    """Rules that depend on which operator a spec belongs to."""
    if name in WEIGHT_OPERATORS:
        if not spec.is_symmetric:
            _fail(_child(path, "is_symmetric"), f"True ({_WEIGHT_RULE})", spec.is_symmetric)
        if spec.is_unsigned:
            _fail(_child(path, "is_unsigned"), f"False ({_WEIGHT_RULE})", spec.is_unsigned)
    elif spec.granularity != "per_tensor":
        _fail(
            _child(path, "granularity"),
            f"'per_tensor' (only {', '.join(WEIGHT_OPERATORS)} take another granularity)",
            spec.granularity,
        )


class _OperatorTable(Mapping[str, OperatorSpec]):
    """Read-only operator -> spec mapping that, unlike MappingProxyType, hashes and pickles."""

    __slots__ = ("_specs",)

    def __init__(self, items: Iterable[tuple[str, OperatorSpec]]) -> None:
        self._specs: dict[str, OperatorSpec] = dict(items)

    def __getitem__(self, name: str) -> OperatorSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __hash__(self) -> int:
        # Order-independent, to agree with Mapping.__eq__.
        return hash(frozenset(self._specs.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._specs!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (tuple(self._specs.items()),))


def _normalize_operators(operators: object, path: str) -> _OperatorTable:
    """Check a complete operator mapping and order it like ``OPERATORS``."""
    mapping = _expect_mapping(operators, path, "a mapping of operator name to OperatorSpec")
    _reject_alias_conflicts(mapping, path)
    specs: dict[str, OperatorSpec] = {}
    for name, spec in mapping.items():
        entry_path = _child(path, name)
        canonical = _canonical_operator(name, entry_path)
        if not isinstance(spec, OperatorSpec):
            _fail(entry_path, "an OperatorSpec", spec)
        _check_operator_rules(canonical, spec, entry_path)
        specs[canonical] = spec
    missing = [name for name in OPERATORS if name not in specs]
    if missing:
        raise QuantConfigError(
            f"{path}: expected all {len(OPERATORS)} operators, missing {', '.join(missing)}"
        )
    return _OperatorTable((name, specs[name]) for name in OPERATORS)


@dataclass(frozen=True)
class GRUQuantConfig:
    """Bit-width configuration of a quantized GRU: one ``OperatorSpec`` per operator.

    Immutable and hashable. ``operators`` holds all of ``OPERATORS`` in catalogue order; a plain
    dict given to the constructor is checked and stored read-only. Derive variants with
    ``replace_operator``, ``with_all_bitwidth`` or ``dataclasses.replace`` (all validated).
    """

    operators: Mapping[str, OperatorSpec]
    disable_quantization: bool = False
    scale_type: str = "float"

    def __post_init__(self) -> None:
        table = _normalize_operators(self.operators, "GRUQuantConfig.operators")
        _expect_bool(self.disable_quantization, "GRUQuantConfig.disable_quantization")
        _expect_choice(self.scale_type, SCALE_TYPES, "GRUQuantConfig.scale_type")
        object.__setattr__(self, "operators", table)

    # --- constructors ---------------------------------------------------------------------------

    @staticmethod
    def default() -> GRUQuantConfig:
        """The shipped default: 8 bits everywhere, per-channel symmetric weights, unsigned z/r."""
        return _shipped_default()

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> GRUQuantConfig:
        """Read the JSON shape described in the module docstring (a parsed JSON object).

        Partial input is completed from the shipped default: operators missing from
        ``operator_config`` take their default spec, a missing ``is_symmetric``, ``is_unsigned``
        or ``granularity`` takes that operator's default value, and missing ``default_config``
        keys take the default's. ``bitwidth`` is required in every operator entry.
        """
        return _parse_config(data, base=_shipped_default())

    @staticmethod
    def load(path: str | os.PathLike[str]) -> GRUQuantConfig:
        """Read a JSON file (UTF-8) written by ``save`` or by hand; see ``from_dict``."""
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8-sig")  # -sig: tolerate an editor's BOM
        except UnicodeDecodeError as exc:
            raise QuantConfigError(
                f"{source}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        try:
            return _parse_config(_parse_json(text), base=_shipped_default())
        except QuantConfigError as exc:
            raise type(exc)(f"{source}: {exc}") from None

    # --- output ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The full JSON shape (every operator listed); ``from_dict`` reads it back equal."""
        return {
            _ROOT_KEY: {
                "default_config": {
                    "disable_quantization": self.disable_quantization,
                    "scale_type": self.scale_type,
                },
                "operator_config": {
                    name: spec.to_dict(include_granularity=name in WEIGHT_OPERATORS)
                    for name, spec in self.operators.items()
                },
            }
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_dict()`` as JSON (UTF-8, indent 2, trailing newline).

        The write is atomic: readers see either the old file or the complete new one.
        """
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(Path(path), text)

    # --- lookup and derived configs -------------------------------------------------------------

    def spec(self, name: str) -> OperatorSpec:
        """The spec of operator ``name`` (aliases accepted); unknown names raise
        ``UnknownOperatorError`` (a ``KeyError`` and a ``QuantConfigError``)."""
        return self.operators[_canonical_operator(name, "GRUQuantConfig.spec")]

    def replace_operator(self, name: str, **changes: Any) -> GRUQuantConfig:
        """A new config with ``OperatorSpec`` fields of operator ``name`` changed, validated."""
        canonical = _canonical_operator(name, "GRUQuantConfig.replace_operator")
        is_weight = canonical in WEIGHT_OPERATORS
        entry = {**self.operators[canonical].to_dict(include_granularity=is_weight), **changes}
        path = f"GRUQuantConfig.replace_operator({name!r})"
        spec = _parse_operator_entry(canonical, entry, path, fallback=None)
        return dataclasses.replace(self, operators={**self.operators, canonical: spec})

    def with_all_bitwidth(self, bitwidth: int, is_symmetric: bool = True) -> GRUQuantConfig:
        """A new config with every operator at ``bitwidth`` bits and ``is_symmetric``.

        Weights and biases stay symmetric whatever ``is_symmetric`` says (they are always
        quantized symmetric signed). Each operator keeps its ``is_unsigned`` and granularity.
        """
        bitwidth = _expect_bitwidth(bitwidth, "GRUQuantConfig.with_all_bitwidth(bitwidth)")
        is_symmetric = _expect_bool(is_symmetric, "GRUQuantConfig.with_all_bitwidth(is_symmetric)")
        operators = {
            name: dataclasses.replace(
                spec,
                bitwidth=bitwidth,
                is_symmetric=True if name in WEIGHT_OPERATORS else is_symmetric,
            )
            for name, spec in self.operators.items()
        }
        return dataclasses.replace(self, operators=operators)


def load_bitwidth_config(path: str | os.PathLike[str]) -> GRUQuantConfig:
    """Read a bit-width configuration file; same as ``GRUQuantConfig.load``."""
    return GRUQuantConfig.load(path)


# --- JSON reading and writing -------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json would silently keep the last of two equal keys; a config that says two things is wrong.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise QuantConfigError(f"{key!r}: key given twice in the same JSON object")
        result[key] = value
    return result


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise QuantConfigError(
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _parse_operator_entry(
    name: str, entry: object, path: str, fallback: OperatorSpec | None
) -> OperatorSpec:
    """One ``operator_config`` entry; absent optional keys come from ``fallback``."""
    fields = _expect_mapping(entry, path)
    _reject_unknown_keys(fields, _SPEC_KEYS, path)
    is_weight = name in WEIGHT_OPERATORS
    if "granularity" in fields and not is_weight:
        _fail(
            _child(path, "granularity"),
            f"no granularity (only {', '.join(WEIGHT_OPERATORS)} take one)",
            fields["granularity"],
        )
    bitwidth = _take(fields, "bitwidth", path, _expect_bitwidth, None)
    is_symmetric = _take(
        fields,
        "is_symmetric",
        path,
        _expect_bool,
        None if fallback is None else fallback.is_symmetric,
    )
    is_unsigned = _take(
        fields,
        "is_unsigned",
        path,
        _expect_bool,
        None if fallback is None else fallback.is_unsigned,
    )
    granularity = "per_tensor"
    if is_weight:
        default = "per_tensor" if fallback is None else fallback.granularity
        granularity = _take(fields, "granularity", path, _one_of(GRANULARITIES), default)
    spec = OperatorSpec(bitwidth, is_symmetric, is_unsigned, granularity)
    _check_operator_rules(name, spec, path)
    return spec


def _parse_config(data: object, base: GRUQuantConfig | None) -> GRUQuantConfig:
    """Validate a whole JSON document, then build; ``base`` completes partial input.

    Without a base (reading the shipped default itself) every operator and every key except
    ``granularity`` must be present.
    """
    root = _expect_mapping(data, _TOP_LEVEL, f"an object with the key {_ROOT_KEY!r}")
    _reject_unknown_keys(root, (_ROOT_KEY,), "")
    if _ROOT_KEY not in root:
        raise QuantConfigError(f"{_TOP_LEVEL}: required key {_ROOT_KEY!r} is missing")
    section = _expect_mapping(root[_ROOT_KEY], _ROOT_KEY)
    _reject_unknown_keys(section, _SECTION_KEYS, _ROOT_KEY)

    defaults = _expect_mapping(section.get("default_config", {}), _DEFAULTS_PATH)
    _reject_unknown_keys(defaults, _DEFAULT_CONFIG_KEYS, _DEFAULTS_PATH)
    disable_quantization = _take(
        defaults,
        "disable_quantization",
        _DEFAULTS_PATH,
        _expect_bool,
        False if base is None else base.disable_quantization,
    )
    scale_type = _take(
        defaults,
        "scale_type",
        _DEFAULTS_PATH,
        _one_of(SCALE_TYPES),
        "float" if base is None else base.scale_type,
    )

    entries = _expect_mapping(section.get("operator_config", {}), _OPERATORS_PATH)
    _reject_alias_conflicts(entries, _OPERATORS_PATH)
    specs: dict[str, OperatorSpec] = {}
    for name, entry in entries.items():
        entry_path = _child(_OPERATORS_PATH, name)
        canonical = _canonical_operator(name, entry_path)
        fallback = None if base is None else base.operators[canonical]
        specs[canonical] = _parse_operator_entry(canonical, entry, entry_path, fallback)
    if base is not None:
        specs = {name: specs.get(name, base.operators[name]) for name in OPERATORS}
    return GRUQuantConfig(
        operators=specs, disable_quantization=disable_quantization, scale_type=scale_type
    )


@functools.cache
def _shipped_default() -> GRUQuantConfig:
    # Loaded once: the config is immutable, so every caller can share the same object.
    resource = files("quant_gru").joinpath("configs").joinpath("default_bitwidth.json")
    try:
        return _parse_config(_parse_json(resource.read_text(encoding="utf-8")), base=None)
    except QuantConfigError as exc:
        raise type(exc)(f"shipped quant_gru/configs/default_bitwidth.json: {exc}") from None
