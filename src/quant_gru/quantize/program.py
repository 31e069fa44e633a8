"""The integer program of one (layer, direction): codes of the weights, the constants of every
term (§4) and the activation tables (§6), assembled from quantization parameters.

Both realizations of the integer model (reference/ and kernels/torch/) run a DirectionProgram;
they share nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from torch import Tensor

from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.params import DirectionQuant, OperatorQuant
from quant_gru.quantize.requant import Term, make_term
from quant_gru.quantize.scales import per_row, quantize
from quant_gru.quantize.tables import CodeFormat, Table, build_table

# The activation operators (those with one scale and zero point, computed by §5 or §6), in the
# order of §7: the layer input, the input projection, then one step's operators.
ACTIVATION_OPERATORS = (
    "input.x",
    "matmul.Wx",
    "matmul.Rh",
    "op.Rh_add_br",
    "gate.r_pre",
    "gate.z_pre",
    "gate.r_out",
    "gate.z_out",
    "op.rRh",
    "gate.g_pre",
    "gate.g_out",
    "op.old_contrib",
    "op.new_contrib",
    "output.h",
)
WEIGHT_POINTS = ("weight.W", "weight.R", "weight.bw", "weight.br")
TABLES = {
    "gate.r_out": ("sigmoid", "gate.r_pre"),
    "gate.z_out": ("sigmoid", "gate.z_pre"),
    "gate.g_out": ("tanh", "gate.g_pre"),
}


@dataclass(frozen=True)
class ActivationFormat:
    """Encoded scale (as a float), zero point and code range of an activation operator."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class DirectionProgram:
    """Everything a realization needs to run one (layer, direction) of the integer GRU.

    weight_W (3H, I), weight_R (3H, H), bias_w (3H,), bias_r (3H,): int64 codes, before any
    operand pre-shift; weight_ranges[point]: the (qmin, qmax) those codes lie in (bounds known
    without reading the codes back from the device). terms[op]: the terms of operator `op` in
    §7's order; for `input.x` of a layer above the first, one term per direction of the layer
    below (empty for layer 0).
    """

    input_size: int
    hidden_size: int
    formats: Mapping[str, ActivationFormat]
    weight_W: Tensor
    weight_R: Tensor
    bias_w: Tensor
    bias_r: Tensor
    terms: Mapping[str, tuple[Term, ...]]
    tables: Mapping[str, Table]
    weight_ranges: Mapping[str, tuple[int, int]]


def quantize_weight(weight: Tensor, quant: OperatorQuant) -> Tensor:
    """Weight or bias codes (§8): symmetric, one scale per row after expansion. Nothing is
    recorded for autograd (codes carry no gradient)."""
    scales = per_row(device_copy(quant.scale, weight.device), weight.shape[0])
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return quantize(weight.detach(), scales.view(shape), 0, quant.qmin, quant.qmax)


@dataclass(frozen=True)
class DirectionConstants:
    """The part of a program that depends on the quantization parameters alone (not on the
    weights), so it can be built once per calibration and reused by every forward."""

    input_size: int
    hidden_size: int
    formats: Mapping[str, ActivationFormat]
    terms: Mapping[str, tuple[Term, ...]]
    tables: Mapping[str, Table]
    weight_ranges: Mapping[str, tuple[int, int]]


def build_program(
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    quant: DirectionQuant,
    scale_type: str,
    below_outputs: Sequence[OperatorQuant] = (),
) -> DirectionProgram:
    """Assemble the program; `below_outputs` are the output.h parameters of each direction of
    the layer below (empty for layer 0)."""
    rows, input_size = weights[0].shape
    constants = build_constants(input_size, rows // 3, quant, scale_type, below_outputs)
    return with_weights(constants, weights, quant)


# Weights' codes from their float values and parameters, as quantize_weight makes them, for a
# direction's weights at once (a realization may make them otherwise, e.g. on one kernel that
# also keeps what QAT reads).
WeightsQuantizer = Callable[[Sequence[Tensor], Sequence[OperatorQuant]], list[Tensor]]


def quantize_weights(weights: Sequence[Tensor], quants: Sequence[OperatorQuant]) -> list[Tensor]:
    """quantize_weight of each weight with its parameters."""
    return [quantize_weight(w, q) for w, q in zip(weights, quants, strict=True)]


def with_weights(
    constants: DirectionConstants,
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    quant: DirectionQuant,
    quantizer: WeightsQuantizer = quantize_weights,
) -> DirectionProgram:
    """Complete cached constants with the codes of the current weights."""
    w_ih, w_hh, b_ih, b_hh = weights
    # A missing bias is zeros (made only then: a tensor op costs host time a step).
    biases = [b if b is not None else w_ih.new_zeros(w_ih.shape[0]) for b in (b_ih, b_hh)]
    names = ("weight.W", "weight.R", "weight.bw", "weight.br")
    codes = quantizer([w_ih, w_hh, *biases], [quant[name] for name in names])
    return DirectionProgram(
        input_size=constants.input_size,
        hidden_size=constants.hidden_size,
        formats=constants.formats,
        weight_W=codes[0],
        weight_R=codes[1],
        bias_w=codes[2],
        bias_r=codes[3],
        terms=constants.terms,
        tables=constants.tables,
        weight_ranges=constants.weight_ranges,
    )


def build_constants(
    input_size: int,
    hidden: int,
    quant: DirectionQuant,
    scale_type: str,
    below_outputs: Sequence[OperatorQuant] = (),
) -> DirectionConstants:
    """Terms (§4) and tables (§6) of one (layer, direction)."""
    rows = 3 * hidden
    formats = {name: _format(quant[name]) for name in ACTIVATION_OPERATORS}
    scale = {name: Fraction(fmt.scale) for name, fmt in formats.items()}
    bits = {name: q.spec.bitwidth for name, q in quant.items()}

    def row_scales(name: str) -> list[Fraction]:
        return [Fraction(s) for s in per_row(quant[name].scale, rows).tolist()]

    def term(out: str, scales: Sequence[Fraction], operands: Sequence[str], dot: int = 1) -> Term:
        return make_term(scales, scale[out], [bits[o] for o in operands], dot, scale_type)

    def activation_term(out: str, *operands: str) -> Term:
        """A term made of activation codes only: its scale is the product of theirs."""
        return term(out, [math.prod((scale[o] for o in operands), start=Fraction(1))], operands)

    s_W, s_R, s_bw, s_br = (
        row_scales(n) for n in ("weight.W", "weight.R", "weight.bw", "weight.br")
    )
    terms: dict[str, tuple[Term, ...]] = {
        "input.x": tuple(
            make_term(
                [Fraction(float(below.scale.item()))],
                scale["input.x"],
                [below.spec.bitwidth],
                1,
                scale_type,
            )
            for below in below_outputs
        ),
        "matmul.Wx": (
            term(
                "matmul.Wx",
                [s * scale["input.x"] for s in s_W],
                ("weight.W", "input.x"),
                input_size,
            ),
            term("matmul.Wx", s_bw, ("weight.bw",)),
        ),
        "matmul.Rh": (
            term(
                "matmul.Rh", [s * scale["output.h"] for s in s_R], ("weight.R", "output.h"), hidden
            ),
        ),
        "op.Rh_add_br": (
            activation_term("op.Rh_add_br", "matmul.Rh"),
            term("op.Rh_add_br", s_br, ("weight.br",)),
        ),
        "gate.r_pre": (
            activation_term("gate.r_pre", "matmul.Wx"),
            activation_term("gate.r_pre", "op.Rh_add_br"),
        ),
        "gate.z_pre": (
            activation_term("gate.z_pre", "matmul.Wx"),
            activation_term("gate.z_pre", "op.Rh_add_br"),
        ),
        "op.rRh": (activation_term("op.rRh", "gate.r_out", "op.Rh_add_br"),),
        "gate.g_pre": (
            activation_term("gate.g_pre", "matmul.Wx"),
            activation_term("gate.g_pre", "op.rRh"),
        ),
        "op.old_contrib": (activation_term("op.old_contrib", "gate.z_out", "output.h"),),
        "op.new_contrib": (
            activation_term("op.new_contrib", "gate.g_out"),
            activation_term("op.new_contrib", "gate.z_out", "gate.g_out"),
        ),
        "output.h": (
            activation_term("output.h", "op.old_contrib"),
            activation_term("output.h", "op.new_contrib"),
        ),
    }
    tables = {
        out: build_table(kind, _code_format(formats[source]), _code_format(formats[out]))
        for out, (kind, source) in TABLES.items()
    }
    weight_ranges = {name: (quant[name].qmin, quant[name].qmax) for name in WEIGHT_POINTS}
    return DirectionConstants(input_size, hidden, formats, terms, tables, weight_ranges)


def _format(quant: OperatorQuant) -> ActivationFormat:
    scale, zero_point = quant.scalar()
    return ActivationFormat(scale, zero_point, quant.qmin, quant.qmax)


def _code_format(fmt: ActivationFormat) -> CodeFormat:
    return CodeFormat(Fraction(fmt.scale), fmt.zero_point, fmt.qmin, fmt.qmax)
