"""Hypothesis strategies shared by the tests that sweep quantization configurations."""

from __future__ import annotations

from hypothesis import strategies as st

from quant_gru.config import GRANULARITIES, OPERATORS, WEIGHT_OPERATORS, GRUQuantConfig


@st.composite
def quant_configs(draw: st.DrawFn, max_width: int = 32) -> GRUQuantConfig:
    """Any configuration the config allows with widths up to ``max_width``: per operator a
    width (the common 2, 4, 8, 16 drawn often), symmetry and signedness; per weight a
    granularity; a scale type."""
    common = [w for w in (2, 4, 8, 16) if w <= max_width]
    widths = st.one_of(st.integers(1, max_width), st.sampled_from(common))
    operators = {}
    for name in OPERATORS:
        entry = {"bitwidth": draw(widths)}
        if name in WEIGHT_OPERATORS:
            entry.update(is_symmetric=True, is_unsigned=False)
            entry["granularity"] = draw(st.sampled_from(GRANULARITIES))
        else:
            entry.update(is_symmetric=draw(st.booleans()), is_unsigned=draw(st.booleans()))
        operators[name] = entry
    scale_type = draw(st.sampled_from(["float", "pot"]))
    return GRUQuantConfig.from_dict(
        {"GRU_config": {"default_config": {"scale_type": scale_type}, "operator_config": operators}}
    )
