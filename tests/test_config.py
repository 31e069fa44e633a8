"""Tests of quant_gru.config: the bit-width configuration and its JSON format."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import pickle
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant_gru.config import (
    GRANULARITIES,
    OPERATOR_DOCS,
    OPERATORS,
    SCALE_TYPES,
    WEIGHT_OPERATORS,
    GRUQuantConfig,
    OperatorSpec,
    QuantConfigError,
    UnknownOperatorError,
    load_bitwidth_config,
)

CONFIG_SOURCE = Path(__file__).resolve().parents[1] / "src" / "quant_gru" / "config.py"
SHIPPED_JSON = CONFIG_SOURCE.parent / "configs" / "default_bitwidth.json"

SEED_EXAMPLE: dict[str, Any] = {
    "GRU_config": {
        "default_config": {"disable_quantization": False},
        "operator_config": {
            "input.x": {"bitwidth": 8, "is_symmetric": False, "is_unsigned": False},
            "input.h": {"bitwidth": 8, "is_symmetric": False, "is_unsigned": False},
            "weight.W": {"bitwidth": 8, "is_symmetric": True, "is_unsigned": False},
            "weight.R": {"bitwidth": 8, "is_symmetric": True, "is_unsigned": False},
            "gate.z_out": {"bitwidth": 8, "is_symmetric": False, "is_unsigned": True},
        },
    }
}
OPS = "GRU_config.operator_config"


def with_operator(name: str, entry: object) -> dict[str, Any]:
    return {"GRU_config": {"operator_config": {name: entry}}}


def with_defaults(**defaults: object) -> dict[str, Any]:
    return {"GRU_config": {"default_config": defaults}}


# --- the shipped default ------------------------------------------------------------------------


def test_shipped_default_has_every_operator_in_catalogue_order() -> None:
    config = GRUQuantConfig.default()
    assert len(OPERATORS) == 18
    assert tuple(config.operators) == OPERATORS
    assert config.disable_quantization is False
    assert config.scale_type == "float"


def test_shipped_default_values() -> None:
    config = GRUQuantConfig.default()
    for name, spec in config.operators.items():
        assert spec.bitwidth == 8, name
        if name in WEIGHT_OPERATORS:
            assert spec == OperatorSpec(8, True, False, "per_channel"), name
        elif name in ("gate.z_out", "gate.r_out"):
            assert spec == OperatorSpec(8, False, True), name
        else:
            assert spec == OperatorSpec(8, False, False), name


def test_shipped_file_lists_all_operators_in_seed_shape() -> None:
    data = json.loads(SHIPPED_JSON.read_text(encoding="utf-8"))
    assert list(data) == ["GRU_config"]
    assert list(data["GRU_config"]["operator_config"]) == list(OPERATORS)
    assert data == GRUQuantConfig.default().to_dict()


def test_default_does_not_depend_on_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tuple(GRUQuantConfig.default().operators) == OPERATORS


def test_catalogue_constants() -> None:
    assert tuple(OPERATOR_DOCS) == OPERATORS
    assert all(OPERATOR_DOCS[name].strip() for name in OPERATORS)
    assert set(WEIGHT_OPERATORS) <= set(OPERATORS)
    assert GRANULARITIES == ("per_tensor", "per_gate", "per_channel")
    assert SCALE_TYPES == ("float", "pot")


def test_config_module_needs_only_the_standard_library() -> None:
    """config.py (and the file helper it uses) import the standard library only, no torch."""
    allowed_local = {"quant_gru._files"}
    for source in (CONFIG_SOURCE, CONFIG_SOURCE.with_name("_files.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert module in allowed_local or top in sys.stdlib_module_names, (
                    f"{source.name} imports {module}"
                )


# --- round trips --------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip() -> None:
    config = GRUQuantConfig.default().replace_operator("gate.g_out", bitwidth=5, is_symmetric=True)
    data = config.to_dict()
    json.dumps(data)  # JSON-serialisable
    again = GRUQuantConfig.from_dict(data)
    assert again == config
    assert hash(again) == hash(config)


def test_to_dict_writes_granularity_only_for_weights() -> None:
    entries = GRUQuantConfig.default().to_dict()["GRU_config"]["operator_config"]
    for name, entry in entries.items():
        assert ("granularity" in entry) == (name in WEIGHT_OPERATORS), name


def test_save_load_round_trip_and_file_format(tmp_path: Path) -> None:
    config = dataclasses.replace(
        GRUQuantConfig.default().with_all_bitwidth(4), scale_type="pot", disable_quantization=True
    )
    path = tmp_path / "bits.json"
    config.save(path)
    assert GRUQuantConfig.load(path) == config
    assert load_bitwidth_config(str(path)) == config

    raw = path.read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("}\n")
    assert text.splitlines()[1].startswith('  "GRU_config"')  # indent 2
    data = json.loads(text)
    assert list(data) == ["GRU_config"]
    assert list(data["GRU_config"]) == ["default_config", "operator_config"]
    assert data["GRU_config"]["default_config"] == {
        "disable_quantization": True,
        "scale_type": "pot",
    }
    assert list(data["GRU_config"]["operator_config"]) == list(OPERATORS)
    assert data["GRU_config"]["operator_config"]["weight.W"] == {
        "bitwidth": 4,
        "is_symmetric": True,
        "is_unsigned": False,
        "granularity": "per_channel",
    }


def test_save_writes_output_h_for_alias(tmp_path: Path) -> None:
    config = GRUQuantConfig.from_dict(with_operator("input.h", {"bitwidth": 6}))
    path = tmp_path / "bits.json"
    config.save(path)
    entries = json.loads(path.read_text(encoding="utf-8"))["GRU_config"]["operator_config"]
    assert "input.h" not in entries
    assert entries["output.h"]["bitwidth"] == 6


def test_save_is_atomic_when_replace_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bits.json"
    GRUQuantConfig.default().save(path)
    original = path.read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("simulated failure")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated failure"):
        GRUQuantConfig.default().with_all_bitwidth(4).save(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bits.json"]


def test_save_cleans_up_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bits.json"
    GRUQuantConfig.default().save(path)
    original = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        GRUQuantConfig.default().with_all_bitwidth(4).save(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bits.json"]


def test_save_into_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        GRUQuantConfig.default().save(missing / "bits.json")
    assert not missing.exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_save_keeps_permissions_of_the_file_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "bits.json"
    GRUQuantConfig.default().save(path)
    path.chmod(0o640)
    GRUQuantConfig.default().with_all_bitwidth(4).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


_spec_for = {
    name: st.builds(
        OperatorSpec,
        bitwidth=st.integers(1, 32),
        is_symmetric=st.just(True) if name in WEIGHT_OPERATORS else st.booleans(),
        is_unsigned=st.just(False) if name in WEIGHT_OPERATORS else st.booleans(),
        granularity=st.sampled_from(GRANULARITIES)
        if name in WEIGHT_OPERATORS
        else st.just("per_tensor"),
    )
    for name in OPERATORS
}
_configs = st.builds(
    GRUQuantConfig,
    operators=st.fixed_dictionaries(_spec_for),
    disable_quantization=st.booleans(),
    scale_type=st.sampled_from(SCALE_TYPES),
)


@settings(max_examples=60, deadline=None)
@given(config=_configs)
def test_any_valid_config_round_trips_through_json(config: GRUQuantConfig) -> None:
    text = json.dumps(config.to_dict())
    assert GRUQuantConfig.from_dict(json.loads(text)) == config


# --- partial files ------------------------------------------------------------------------------


def test_seed_example_loads_as_partial_config(tmp_path: Path) -> None:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(SEED_EXAMPLE), encoding="utf-8")
    config = GRUQuantConfig.load(path)
    default = GRUQuantConfig.default()

    assert tuple(config.operators) == OPERATORS
    assert config.spec("output.h") == OperatorSpec(8, False, False)
    assert config.spec("input.h") == config.spec("output.h")
    # Granularity was not given for the weights: it comes from the default (per_channel).
    assert config.spec("weight.W") == OperatorSpec(8, True, False, "per_channel")
    assert config.spec("gate.z_out") == OperatorSpec(8, False, True)
    listed = {"input.x", "output.h", "weight.W", "weight.R", "gate.z_out"}
    for name in set(OPERATORS) - listed:
        assert config.spec(name) == default.spec(name), name
    assert config.scale_type == "float"
    assert config.disable_quantization is False


def test_missing_entry_keys_take_that_operators_default() -> None:
    config = GRUQuantConfig.from_dict(
        {
            "GRU_config": {
                "operator_config": {"gate.r_out": {"bitwidth": 4}, "weight.bw": {"bitwidth": 16}}
            }
        }
    )
    assert config.spec("gate.r_out") == OperatorSpec(4, False, True)
    assert config.spec("weight.bw") == OperatorSpec(16, True, False, "per_channel")


def test_minimal_documents() -> None:
    assert GRUQuantConfig.from_dict({"GRU_config": {}}) == GRUQuantConfig.default()
    config = GRUQuantConfig.from_dict(with_defaults(disable_quantization=True))
    assert config.disable_quantization is True
    assert config.scale_type == "float"
    assert config.operators == GRUQuantConfig.default().operators


def test_from_dict_does_not_modify_its_input() -> None:
    data = copy.deepcopy(SEED_EXAMPLE)
    GRUQuantConfig.from_dict(data)
    assert data == SEED_EXAMPLE


# --- validation ---------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, object, type[Exception], tuple[str, ...]]] = [
    ("top level not an object", [], QuantConfigError, ("(top level)", "[] (list)")),
    ("missing GRU_config", {}, QuantConfigError, ("(top level)", "'GRU_config'", "missing")),
    (
        "unknown top-level key",
        {"GRU_config": {}, "extra": 1},
        QuantConfigError,
        ("extra: unknown key 'extra'", "'GRU_config'"),
    ),
    ("GRU_config not an object", {"GRU_config": 5}, QuantConfigError, ("GRU_config:", "got 5")),
    (
        "unknown section key",
        {"GRU_config": {"operators": {}}},
        QuantConfigError,
        ("GRU_config.operators", "'operators'", "'operator_config'"),
    ),
    (
        "default_config not an object",
        {"GRU_config": {"default_config": "float"}},
        QuantConfigError,
        ("GRU_config.default_config:", "'float' (str)"),
    ),
    (
        "unknown default_config key",
        with_defaults(bits=8),
        QuantConfigError,
        ("GRU_config.default_config.bits", "'bits'", "'scale_type'"),
    ),
    (
        "disable_quantization as string",
        with_defaults(disable_quantization="false"),
        QuantConfigError,
        ("GRU_config.default_config.disable_quantization", "a bool", "'false' (str)"),
    ),
    (
        "disable_quantization as int",
        with_defaults(disable_quantization=0),
        QuantConfigError,
        ("GRU_config.default_config.disable_quantization", "got 0"),
    ),
    (
        "unknown scale_type",
        with_defaults(scale_type="log2"),
        QuantConfigError,
        ("GRU_config.default_config.scale_type", "'pot'", "'log2' (str)"),
    ),
    (
        "operator_config not an object",
        {"GRU_config": {"operator_config": []}},
        QuantConfigError,
        (f"{OPS}:", "[] (list)"),
    ),
    (
        "unknown operator",
        with_operator("weight.X", {"bitwidth": 8}),
        UnknownOperatorError,
        (f"{OPS}['weight.X']", "'weight.X'", "input.x", "op.new_contrib", "input.h"),
    ),
    (
        "operator entry not an object",
        with_operator("input.x", 8),
        QuantConfigError,
        (f"{OPS}['input.x']:", "got 8"),
    ),
    (
        "unknown key in operator entry",
        with_operator("input.x", {"bitwidth": 8, "bits": 4}),
        QuantConfigError,
        (f"{OPS}['input.x'].bits", "'bits'", "'bitwidth'", "'is_unsigned'", "'granularity'"),
    ),
    (
        "bitwidth missing",
        with_operator("input.x", {"is_symmetric": True}),
        QuantConfigError,
        (f"{OPS}['input.x'].bitwidth", "missing"),
    ),
    (
        "bitwidth too large",
        with_operator("weight.W", {"bitwidth": 33}),
        QuantConfigError,
        (f"{OPS}['weight.W'].bitwidth: expected an integer in 1..32, got 33",),
    ),
    (
        "bitwidth zero",
        with_operator("input.x", {"bitwidth": 0}),
        QuantConfigError,
        (f"{OPS}['input.x'].bitwidth", "got 0"),
    ),
    (
        "bitwidth negative",
        with_operator("input.x", {"bitwidth": -8}),
        QuantConfigError,
        (f"{OPS}['input.x'].bitwidth", "got -8"),
    ),
    (
        "bitwidth bool",
        with_operator("weight.W", {"bitwidth": True}),
        QuantConfigError,
        (f"{OPS}['weight.W'].bitwidth: expected an integer in 1..32, got True (bool)",),
    ),
    (
        "bitwidth float",
        with_operator("input.x", {"bitwidth": 8.0}),
        QuantConfigError,
        (f"{OPS}['input.x'].bitwidth", "got 8.0"),
    ),
    (
        "bitwidth string",
        with_operator("input.x", {"bitwidth": "8"}),
        QuantConfigError,
        (f"{OPS}['input.x'].bitwidth", "'8' (str)"),
    ),
    (
        "bitwidth null",
        with_operator("input.x", {"bitwidth": None}),
        QuantConfigError,
        (f"{OPS}['input.x'].bitwidth", "None"),
    ),
    (
        "is_symmetric not a bool",
        with_operator("input.x", {"bitwidth": 8, "is_symmetric": "yes"}),
        QuantConfigError,
        (f"{OPS}['input.x'].is_symmetric", "a bool", "'yes' (str)"),
    ),
    (
        "is_unsigned not a bool",
        with_operator("gate.z_out", {"bitwidth": 8, "is_unsigned": 1}),
        QuantConfigError,
        (f"{OPS}['gate.z_out'].is_unsigned", "a bool", "got 1"),
    ),
    (
        "unknown granularity",
        with_operator("weight.W", {"bitwidth": 8, "granularity": "per_row"}),
        QuantConfigError,
        (f"{OPS}['weight.W'].granularity", "'per_channel'", "'per_row' (str)"),
    ),
    (
        "granularity on a non-weight operator",
        with_operator("input.x", {"bitwidth": 8, "granularity": "per_tensor"}),
        QuantConfigError,
        (f"{OPS}['input.x'].granularity", "weight.W", "'per_tensor' (str)"),
    ),
    (
        "asymmetric weight",
        with_operator("weight.R", {"bitwidth": 8, "is_symmetric": False}),
        QuantConfigError,
        (f"{OPS}['weight.R'].is_symmetric", "symmetric and signed", "False (bool)"),
    ),
    (
        "unsigned bias",
        with_operator("weight.bw", {"bitwidth": 8, "is_unsigned": True}),
        QuantConfigError,
        (f"{OPS}['weight.bw'].is_unsigned", "symmetric and signed", "True (bool)"),
    ),
    (
        "alias and canonical name both given",
        {
            "GRU_config": {
                "operator_config": {"output.h": {"bitwidth": 8}, "input.h": {"bitwidth": 4}}
            }
        },
        QuantConfigError,
        (f"{OPS}['input.h']", "alias", "'output.h'"),
    ),
]


@pytest.mark.parametrize(
    ("document", "error", "fragments"),
    [pytest.param(doc, err, frags, id=case) for case, doc, err, frags in ERROR_CASES],
)
def test_from_dict_rejects(
    document: object, error: type[Exception], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(error) as caught:
        GRUQuantConfig.from_dict(document)  # type: ignore[arg-type]
    assert isinstance(caught.value, QuantConfigError)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(("case", "document", "error", "fragments"), ERROR_CASES[:6])
def test_load_names_the_file_and_the_key(
    tmp_path: Path,
    case: str,
    document: object,
    error: type[Exception],
    fragments: tuple[str, ...],
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(error) as caught:
        GRUQuantConfig.load(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("bitwidth", [1, 2, 8, 16, 31, 32])
def test_bitwidth_bounds_accepted(bitwidth: int) -> None:
    config = GRUQuantConfig.from_dict(with_operator("weight.W", {"bitwidth": bitwidth}))
    assert config.spec("weight.W").bitwidth == bitwidth
    assert GRUQuantConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("bitwidth", [0, 33])
def test_bitwidth_bounds_rejected_everywhere(bitwidth: int) -> None:
    with pytest.raises(QuantConfigError, match=rf"got {bitwidth}$"):
        GRUQuantConfig.from_dict(with_operator("input.x", {"bitwidth": bitwidth}))
    with pytest.raises(QuantConfigError, match=r"OperatorSpec\.bitwidth"):
        OperatorSpec(bitwidth, False, False)
    with pytest.raises(QuantConfigError, match=r"with_all_bitwidth\(bitwidth\)"):
        GRUQuantConfig.default().with_all_bitwidth(bitwidth)
    with pytest.raises(QuantConfigError, match=r"replace_operator\('input.x'\)\.bitwidth"):
        GRUQuantConfig.default().replace_operator("input.x", bitwidth=bitwidth)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError) as caught:
        GRUQuantConfig.load(path)
    assert str(path) in str(caught.value)


def test_load_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "GRU_config": {\n    "default_config": {,}\n  }\n}\n', encoding="utf-8")
    with pytest.raises(QuantConfigError) as caught:
        GRUQuantConfig.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert "line 3, column 24" in message


def test_load_rejects_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "twice.json"
    path.write_text(
        '{"GRU_config": {"operator_config": {"input.x": {"bitwidth": 8}, '
        '"input.x": {"bitwidth": 4}}}}',
        encoding="utf-8",
    )
    with pytest.raises(QuantConfigError, match=r"'input\.x': key given twice"):
        GRUQuantConfig.load(path)


def test_load_rejects_invalid_utf8_and_accepts_bom(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"GRU_config": {"x\xe9": 1}}')
    with pytest.raises(QuantConfigError, match="not valid UTF-8"):
        GRUQuantConfig.load(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SEED_EXAMPLE).encode("utf-8"))
    assert GRUQuantConfig.load(path) == GRUQuantConfig.from_dict(SEED_EXAMPLE)


# --- OperatorSpec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bitwidth", "is_unsigned", "qmin", "qmax"),
    [
        (1, False, -1, 0),
        (1, True, 0, 1),
        (8, False, -128, 127),
        (8, True, 0, 255),
        (32, False, -(2**31), 2**31 - 1),
        (32, True, 0, 2**32 - 1),
    ],
)
def test_integer_range(bitwidth: int, is_unsigned: bool, qmin: int, qmax: int) -> None:
    for is_symmetric in (False, True):
        spec = OperatorSpec(bitwidth, is_symmetric, is_unsigned)
        assert (spec.qmin, spec.qmax) == (qmin, qmax)


def test_operator_spec_validates_its_fields() -> None:
    with pytest.raises(QuantConfigError, match=r"OperatorSpec\.is_symmetric.*'no' \(str\)"):
        OperatorSpec(8, "no", False)  # type: ignore[arg-type]
    with pytest.raises(QuantConfigError, match=r"OperatorSpec\.bitwidth.*True \(bool\)"):
        OperatorSpec(True, False, False)
    with pytest.raises(QuantConfigError, match=r"OperatorSpec\.granularity.*'per_row'"):
        OperatorSpec(8, True, False, "per_row")


def test_operator_spec_to_dict() -> None:
    spec = OperatorSpec(8, True, False, "per_gate")
    assert spec.to_dict() == {
        "bitwidth": 8,
        "is_symmetric": True,
        "is_unsigned": False,
        "granularity": "per_gate",
    }
    assert "granularity" not in spec.to_dict(include_granularity=False)


# --- GRUQuantConfig as a value ------------------------------------------------------------------


def test_config_is_immutable_hashable_and_picklable() -> None:
    config = GRUQuantConfig.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scale_type = "pot"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.operators["input.x"] = OperatorSpec(4, False, False)  # type: ignore[index]
    assert {config: 1}[GRUQuantConfig.from_dict(config.to_dict())] == 1
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config


def test_constructor_orders_checks_and_copies_operators() -> None:
    specs = dict(GRUQuantConfig.default().operators)
    reversed_specs = dict(reversed(list(specs.items())))
    config = GRUQuantConfig(operators=reversed_specs)
    assert tuple(config.operators) == OPERATORS
    assert config == GRUQuantConfig.default()

    reversed_specs["input.x"] = OperatorSpec(4, False, False)  # the caller's dict stays theirs
    assert config.spec("input.x").bitwidth == 8

    aliased = {("input.h" if k == "output.h" else k): v for k, v in specs.items()}
    assert GRUQuantConfig(operators=aliased) == config


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda ops: ops.pop("gate.g_out"), ("GRUQuantConfig.operators", "missing gate.g_out")),
        (
            lambda ops: ops.__setitem__("input.x", {"bitwidth": 8}),
            ("GRUQuantConfig.operators['input.x']", "OperatorSpec"),
        ),
        (
            lambda ops: ops.__setitem__("weight.W", OperatorSpec(8, False, False)),
            ("GRUQuantConfig.operators['weight.W'].is_symmetric", "False (bool)"),
        ),
        (
            lambda ops: ops.__setitem__("input.x", OperatorSpec(8, False, False, "per_channel")),
            ("GRUQuantConfig.operators['input.x'].granularity", "'per_channel' (str)"),
        ),
        (
            lambda ops: ops.__setitem__("input.h", ops["output.h"]),
            ("GRUQuantConfig.operators['input.h']", "alias"),
        ),
    ],
)
def test_constructor_rejects(
    change: Callable[[dict[str, Any]], object], fragments: tuple[str, ...]
) -> None:
    operators: dict[str, Any] = dict(GRUQuantConfig.default().operators)
    change(operators)
    with pytest.raises(QuantConfigError) as caught:
        GRUQuantConfig(operators=operators)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_global_settings_are_validated_on_replace() -> None:
    with pytest.raises(QuantConfigError, match=r"GRUQuantConfig\.scale_type.*'log2' \(str\)"):
        dataclasses.replace(GRUQuantConfig.default(), scale_type="log2")
    with pytest.raises(QuantConfigError, match=r"GRUQuantConfig\.disable_quantization"):
        dataclasses.replace(GRUQuantConfig.default(), disable_quantization="yes")  # type: ignore[arg-type]


# --- derived configs and lookups ----------------------------------------------------------------


def test_with_all_bitwidth_keeps_weights_symmetric() -> None:
    default = GRUQuantConfig.default()
    config = default.with_all_bitwidth(4, is_symmetric=False)
    for name, spec in config.operators.items():
        before = default.spec(name)
        assert spec.bitwidth == 4
        assert spec.is_unsigned == before.is_unsigned
        assert spec.granularity == before.granularity
        assert spec.is_symmetric == (name in WEIGHT_OPERATORS)
    assert config.scale_type == default.scale_type
    assert default.spec("input.x").bitwidth == 8  # the original is untouched


def test_with_all_bitwidth_symmetric_by_default() -> None:
    config = GRUQuantConfig.default().with_all_bitwidth(16)
    assert all(spec.is_symmetric and spec.bitwidth == 16 for spec in config.operators.values())
    assert config.spec("gate.z_out").is_unsigned is True


def test_with_all_bitwidth_checks_is_symmetric() -> None:
    with pytest.raises(QuantConfigError, match=r"with_all_bitwidth\(is_symmetric\).*'no'"):
        GRUQuantConfig.default().with_all_bitwidth(8, is_symmetric="no")  # type: ignore[arg-type]


def test_alias_lookup_and_replace() -> None:
    default = GRUQuantConfig.default()
    assert default.spec("input.h") is default.spec("output.h")
    config = default.replace_operator("input.h", bitwidth=12, is_symmetric=True)
    assert config.spec("output.h") == OperatorSpec(12, True, False)
    assert "input.h" not in config.operators
    assert tuple(config.operators) == OPERATORS
    assert default.spec("output.h").bitwidth == 8


def test_replace_operator_validates() -> None:
    default = GRUQuantConfig.default()
    assert default.replace_operator("weight.W", granularity="per_gate").spec("weight.W") == (
        OperatorSpec(8, True, False, "per_gate")
    )
    with pytest.raises(QuantConfigError, match=r"replace_operator\('weight\.W'\)\.is_unsigned"):
        default.replace_operator("weight.W", is_unsigned=True)
    with pytest.raises(QuantConfigError, match=r"replace_operator\('input\.x'\)\.granularity"):
        default.replace_operator("input.x", granularity="per_channel")
    with pytest.raises(QuantConfigError, match=r"unknown key 'bits'"):
        default.replace_operator("input.x", bits=4)
    with pytest.raises(UnknownOperatorError, match=r"'gate\.q_out'"):
        default.replace_operator("gate.q_out", bitwidth=4)


def test_unknown_operator_lookup_is_a_key_error_with_a_readable_message() -> None:
    with pytest.raises(KeyError) as caught:
        GRUQuantConfig.default().spec("weight.X")
    error = caught.value
    assert isinstance(error, UnknownOperatorError)
    assert isinstance(error, QuantConfigError)
    message = str(error)
    assert message.startswith("GRUQuantConfig.spec: unknown operator 'weight.X'")
    assert all(name in message for name in OPERATORS)
