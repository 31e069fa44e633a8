"""The quantized GRU's forward on float tensors: inputs to codes, the integer model, codes back to
floats; and, when autograd records, the straight-through graph that gives QAT its gradients.

Forward values are the integer model's, exactly (reference/README.md). Gradients are those of the
float GRU evaluated at the quantized activations: the float operations of
decomposed_gru.py run on the dequantized codes of every operator, and each quantization point
passes its gradient through where its value lay inside the code range and blocks it where it
saturated (the straight-through estimator with clamp masks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from quant_gru.kernels.derived import Stamp, tensor_stamp
from quant_gru.kernels.torch.decomposed_gru import PointHook, decomposed_direction
from quant_gru.kernels.torch.quant_gru import quantized_gru
from quant_gru.kernels.torch.stack import (
    DirectionWeights,
    GRUShape,
    records_gradient,
    run_layers,
)
from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.program import (
    ActivationFormat,
    DirectionConstants,
    DirectionProgram,
    WeightsQuantizer,
    quantize_weights,
    with_weights,
)
from quant_gru.quantize.scales import dequantize, per_row, quantize

# (programs, x_codes, h0_codes, lengths, num_layers, bidirectional, trace) ->
# (out_codes, h_n_codes, traces): the contract of kernels/torch/quant_gru.quantized_gru and
# reference/integer_gru.integer_gru.
Realization = Callable[..., tuple[Tensor, Tensor, list[Any] | None]]


class StraightThrough(Protocol):
    """Another realization of QAT's gradients than the graph of hooks below, for one call:
    ``realization`` gives the codes and, as its traces, whatever ``direction`` reads; then
    ``direction`` gives each (layer, direction)'s outputs and final state with the
    straight-through gradients, valued to the bit as the dequantized codes in the input's
    type (quantize.scales.dequantize's float64 values, converted): those are then the
    forward's values themselves."""

    def input_codes(self, x: Tensor, programs: Sequence[DirectionProgram]) -> Tensor:
        """input_codes' codes of ``x`` in the form ``realization`` takes them (which then
        receives them)."""
        ...

    def realization(
        self, *arguments: Any, **options: Any
    ) -> tuple[Tensor, Tensor, list[Any] | None]: ...

    def direction(
        self,
        index: int,
        program: DirectionProgram,
        record: Any,
        x: Tensor,
        h0: Tensor | None,
        weights: DirectionWeights,
        lengths: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor]: ...


# (programs, quant, the model's dtype) -> the StraightThrough of one call.
StraightThroughFactory = Callable[
    [Sequence[DirectionProgram], Sequence[DirectionQuant], torch.dtype], StraightThrough
]
_WEIGHT_FIELDS = {
    "weight.W": "weight_W",
    "weight.R": "weight_R",
    "weight.bw": "bias_w",
    "weight.br": "bias_r",
}


class ProgramCache:
    """The programs of the weights a forward last saw, kept while those weights are unchanged:
    the same tensors, not modified in place since (their version counters), same storage.
    Inference then skips quantizing the weights, and the realizations' own caches keyed on
    the programs (kernels/derived.py) hold too."""

    def __init__(self) -> None:
        self._weights: tuple[Tensor | None, ...] = ()
        self._stamps: tuple[Stamp | None, ...] = ()
        self._programs: list[DirectionProgram] = []

    def get(self, weights: tuple[Tensor | None, ...]) -> list[DirectionProgram] | None:
        same = len(weights) == len(self._weights) and all(
            a is b for a, b in zip(weights, self._weights, strict=True)
        )
        return self._programs if same and _stamps(weights) == self._stamps else None

    def put(self, weights: tuple[Tensor | None, ...], programs: list[DirectionProgram]) -> None:
        self._weights, self._stamps, self._programs = weights, _stamps(weights), programs


def _stamps(weights: tuple[Tensor | None, ...]) -> tuple[Stamp | None, ...]:
    return tuple(None if w is None else tensor_stamp(w) for w in weights)


@dataclass(frozen=True)
class QuantizedModel:
    """What the quantized forward needs besides the float weights, per (layer, direction)."""

    quant: Sequence[DirectionQuant]
    constants: Sequence[DirectionConstants]
    realization: Realization = quantized_gru
    # QAT's gradients: None for the graph of hooks (_straight_through).
    straight_through: StraightThroughFactory | None = None
    weight_quantizer: WeightsQuantizer = quantize_weights
    programs: ProgramCache = field(default_factory=ProgramCache, compare=False, repr=False)


def quantized_forward(
    x: Tensor,
    h0: Tensor | None,
    lengths: Tensor | None,
    weights: Sequence[DirectionWeights],
    shape: GRUShape,
    model: QuantizedModel,
    dropout: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """Time-major x (T, B, I) and h0 (L*D, B, H) or None -> (output (T, B, D*H), h_n)."""
    programs = build_programs(model, weights)
    records = records_gradient(x, h0, weights)
    masks = _dropout_masks(x, shape, dropout, training)
    kernel = None
    if records and model.straight_through is not None:
        kernel = model.straight_through(programs, model.quant, x.dtype)
    # The kernels start a default (zero) state without reading codes of it: none are made.
    h0_codes = None if h0 is None and kernel is not None else initial_codes(h0, programs, x)
    if kernel is None:
        realization, quantize_input = model.realization, input_codes
    else:
        realization, quantize_input = kernel.realization, kernel.input_codes
    out_codes, h_n_codes, traces = _integer_model(
        quantize_input(x, programs), h0_codes, lengths, shape, programs, realization, masks,
        records, x.dtype,
    )  # fmt: skip
    hidden = shape.hidden_size
    if not records:
        return _dequantized_outputs(out_codes, h_n_codes, programs, shape, x.dtype)
    assert traces is not None

    def run_direction(
        index: int, x_in: Tensor, h_in: Tensor | None, lens: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        if kernel is not None:
            return kernel.direction(
                index, programs[index], traces[index], x_in, h_in, weights[index], lens, reverse
            )
        assert h_in is not None and h0_codes is not None  # `start` below; codes made above
        hook = _straight_through(
            programs[index], model.quant[index], traces[index], h0_codes[index]
        )
        return decomposed_direction(x_in, h_in, weights[index], lens, reverse, hook)

    # The hooks' graph starts from a tensor; the kernels' from None for zeros.
    start = h0
    if h0 is None and kernel is None:
        start = x.new_zeros(len(programs), x.shape[1], hidden)
    between = None if masks is None else (lambda layer, o: o * masks[layer])
    out_graph, h_n_graph = run_layers(x, start, lengths, shape, run_direction, between)
    if kernel is not None:  # valued as the dequantized codes already (StraightThrough)
        return out_graph, h_n_graph
    # Forward values stay the integer model's to the bit; gradients come from the graph.
    out, h_n = _dequantized_outputs(out_codes, h_n_codes, programs, shape, x.dtype)
    return out + (out_graph - out_graph.detach()), h_n + (h_n_graph - h_n_graph.detach())


def _dequantized_outputs(
    out_codes: Tensor,
    h_n_codes: Tensor,
    programs: Sequence[DirectionProgram],
    shape: GRUShape,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The last layer's output codes and every final state's, dequantized, in ``dtype``."""
    num_dirs, hidden = shape.num_directions, shape.hidden_size
    out = torch.cat(
        [
            _dequantize(out_codes[..., d * hidden : (d + 1) * hidden], p, "output.h")
            for d, p in enumerate(programs[-num_dirs:])
        ],
        dim=-1,
    ).to(dtype)
    h_n = torch.stack(
        [_dequantize(h_n_codes[i], p, "output.h") for i, p in enumerate(programs)]
    ).to(dtype)
    return out, h_n


def build_programs(
    model: QuantizedModel, weights: Sequence[DirectionWeights]
) -> list[DirectionProgram]:
    """The integer programs of the current (float) weights (model.programs keeps the last)."""
    flat = tuple(w for pair in weights for w in pair)
    # Made afresh under torch.compile (version counters are not traced) and for weights made
    # under torch.inference_mode (they have no version counter).
    cacheable = not torch.compiler.is_compiling() and not any(
        w is not None and w.is_inference() for w in flat
    )
    cached = model.programs.get(flat) if cacheable else None
    if cached is not None:
        return cached
    # The quantizers record nothing for autograd: the weights go to them as they are.
    quantizer = model.weight_quantizer
    programs = [
        with_weights(c, w, q, quantizer)
        for c, w, q in zip(model.constants, weights, model.quant, strict=True)
    ]
    if cacheable:
        model.programs.put(flat, programs)
    return programs


def input_codes(x: Tensor, programs: Sequence[DirectionProgram]) -> Tensor:
    """Codes of layer 0's input.x (§8; both directions share its parameters)."""
    return _quantize(x, programs[0], "input.x")


def _integer_model(
    x_codes: Tensor,
    h0_codes: Tensor | None,
    lengths: Tensor | None,
    shape: GRUShape,
    programs: Sequence[DirectionProgram],
    realization: Realization,
    masks: Sequence[Tensor] | None,
    trace: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, list[Any] | None]:
    """The codes of the whole stack. Without dropout the realization runs every layer (layer
    boundaries stay integer, §8); with dropout in training each layer runs alone and the
    dropped-out dequantized output is quantized again for the next layer. ``x_codes``: layer
    0's input codes; ``h0_codes``: None for a zero state where ``realization`` is a kernel's
    (KernelQat's); ``dtype``: the model's type."""
    if masks is None:
        return realization(
            programs, x_codes, h0_codes, lengths, shape.num_layers, shape.bidirectional, trace
        )
    num_dirs, hidden = shape.num_directions, shape.hidden_size
    finals: list[Tensor] = []
    traces: list[Any] = []
    for layer in range(shape.num_layers):
        pairs = slice(layer * num_dirs, (layer + 1) * num_dirs)
        out_codes, h_n_codes, layer_traces = realization(
            programs[pairs],
            x_codes,
            None if h0_codes is None else h0_codes[pairs],
            lengths,
            1,
            shape.bidirectional,
            trace,
        )
        finals.append(h_n_codes)
        traces.extend(layer_traces or [])
        if layer < shape.num_layers - 1:
            values = torch.cat(
                [
                    _dequantize(out_codes[..., d * hidden : (d + 1) * hidden], p, "output.h")
                    for d, p in enumerate(programs[pairs])
                ],
                dim=-1,
            ).to(dtype)
            x_codes = _quantize(values * masks[layer], programs[pairs.stop], "input.x")
    return out_codes, torch.cat(finals), traces if trace else None


def _dropout_masks(
    x: Tensor, shape: GRUShape, dropout: float, training: bool
) -> list[Tensor] | None:
    """Explicit inter-layer dropout masks, so the integer model and the gradient graph drop the
    same elements."""
    if dropout == 0 or not training or shape.num_layers == 1:
        return None
    features = shape.hidden_size * shape.num_directions
    ones = x.new_ones(x.shape[0], x.shape[1], features)
    return [F.dropout(ones, p=dropout, training=True) for _ in range(shape.num_layers - 1)]


def initial_codes(h0: Tensor | None, programs: Sequence[DirectionProgram], x: Tensor) -> Tensor:
    """Codes of h0 per (layer, direction) (§8): hx quantized, or the code of zero."""
    batch, hidden = x.shape[1], programs[0].hidden_size
    if h0 is None:
        # Filled on the device: a tensor of the zero points made on the host would be copied
        # there, waiting for its queue. One fill where they are all the same.
        shape = (len(programs), batch, hidden)
        points = [program.formats["output.h"].zero_point for program in programs]
        if len(set(points)) == 1:
            return torch.full(shape, points[0], dtype=torch.int64, device=x.device)
        codes = torch.empty(shape, dtype=torch.int64, device=x.device)
        for i, point in enumerate(points):
            codes[i].fill_(point)
        return codes
    return torch.stack([_quantize(h0[i], p, "output.h") for i, p in enumerate(programs)])


def _quantize(values: Tensor, program: DirectionProgram, name: str) -> Tensor:
    fmt = program.formats[name]
    return quantize(values, fmt.scale, fmt.zero_point, fmt.qmin, fmt.qmax)


def _dequantize(codes: Tensor, program: DirectionProgram, name: str) -> Tensor:
    fmt = program.formats[name]
    return dequantize(codes, fmt.scale, fmt.zero_point)


def _straight_through(
    program: DirectionProgram, quant: DirectionQuant, trace: Mapping[str, Tensor], h0_codes: Tensor
) -> PointHook:
    """The hook that replaces every operator's float value by its dequantized code."""

    def hook(name: str, value: Tensor, valid: Tensor | None, step: int | None) -> Tensor:
        if name in _WEIGHT_FIELDS:
            dequantized, inside = weight_point(program, quant, name, value)
        else:
            fmt = program.formats[name]
            if step is None:
                codes = trace[name]
            elif step < 0:
                codes = h0_codes
            else:
                codes = trace[name][step]
            dequantized = dequantize(codes, fmt.scale, fmt.zero_point).to(value.dtype)
            inside = point_mask(value, fmt)
        kept = value * inside
        return dequantized + (kept - kept.detach())

    return hook


def point_mask(value: Tensor, fmt: ActivationFormat) -> Tensor:
    """1 where the float ``value`` of a point rounds inside its code range (§8), else 0, in
    value's type: the straight-through estimator's clamp mask."""
    scale = torch.tensor(fmt.scale, dtype=torch.float64, device=value.device)
    level = torch.floor(value.detach().double() / scale + 0.5) + fmt.zero_point
    return ((level >= fmt.qmin) & (level <= fmt.qmax)).to(value.dtype)


def weight_point(
    program: DirectionProgram, quant: DirectionQuant, name: str, value: Tensor
) -> tuple[Tensor, Tensor]:
    """A weight point's dequantized codes and clamp mask for its float weight ``value``, both
    in value's type."""
    codes: Tensor = getattr(program, _WEIGHT_FIELDS[name])
    rows = per_row(device_copy(quant[name].scale, value.device), value.shape[0])
    scale = rows.view((-1,) + (1,) * (value.dim() - 1))
    level = torch.floor(value.detach().double() / scale + 0.5)
    inside = ((level >= quant[name].qmin) & (level <= quant[name].qmax)).to(value.dtype)
    return dequantize(codes, scale, 0).to(value.dtype), inside
