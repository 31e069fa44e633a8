"""Where quantization noise comes from: the SQNR of every operator of the integer model against
the float GRU at the same point.

Both models run their own recurrence over the same input, so an operator's SQNR includes the
noise it inherits from earlier operators and earlier steps: it is what the value seen at that
point loses, end to end. Padded steps of packed sequences are left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from quant_gru import functional
from quant_gru.kernels.torch.decomposed_gru import PointHook
from quant_gru.kernels.torch.quant_gru import quantized_gru as integer_codes
from quant_gru.kernels.torch.quantized_forward import build_programs, initial_codes, input_codes
from quant_gru.quantize.program import ACTIVATION_OPERATORS
from quant_gru.quantize.scales import dequantize
from quant_gru.reference import integer_gru

if TYPE_CHECKING:
    from quant_gru.module import QuantGRU


@dataclass(frozen=True)
class OutputCodes:
    """The GRU output as output.h codes (T, B, D*H), with each feature's scale and zero point
    (float64, (D*H,): the last layer's directions side by side)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor

    def dequantized(self) -> Tensor:
        return (self.codes.double() - self.zero_point) * self.scale

    def codes_of(self, values: Tensor) -> Tensor:
        """Codes of dequantized float values (exact while |code - zero point| < 2^22)."""
        return torch.round(values.double().cpu() / self.scale + self.zero_point).long()


def reference_output(model: QuantGRU, x: Tensor, h0: Tensor | None = None) -> OutputCodes:
    """The integer reference's output (reference/README.md) for time-major ``x`` (T, B, I) and
    an optional initial state (L*D, B, H): the oracle the other realizations answer to."""
    programs = build_programs(model._quantized_model(), model._direction_weights())
    codes, _, _ = integer_gru(
        programs,
        input_codes(x, programs),
        initial_codes(h0, programs, x),
        None,
        model.num_layers,
        model.bidirectional,
    )
    formats = [p.formats["output.h"] for p in programs[-model.num_directions :]]
    hidden = model.hidden_size
    scale = torch.tensor([f.scale for f in formats], dtype=torch.float64)
    zero_point = torch.tensor([f.zero_point for f in formats], dtype=torch.float64)
    return OutputCodes(codes, scale.repeat_interleave(hidden), zero_point.repeat_interleave(hidden))


def operator_sqnr(
    model: QuantGRU, input: Tensor | PackedSequence, hx: Tensor | None = None
) -> dict[str, dict[str, float]]:
    """SQNR in dB of every activation operator, per (layer, direction) name (``l0``,
    ``l0_reverse``, ...): 10 log10(sum float^2 / sum (quantized - float)^2); +inf where the
    two agree exactly. The model must be calibrated (or hold statistics to finalize)."""
    weights, shape = model._direction_weights(), model._shape()
    quantized = model._quantized_model()
    x, h0, lengths, _ = functional._validated_time_major(input, hx, weights[0][0], shape)
    float_values = _float_values(model, input, hx)
    with torch.no_grad():
        programs = build_programs(quantized, weights)
        _, _, traces = integer_codes(
            programs,
            input_codes(x, programs),
            initial_codes(h0, programs, x),
            lengths,
            shape.num_layers,
            shape.bidirectional,
            trace=True,
        )
    assert traces is not None
    steps, batch = x.shape[0], x.shape[1]
    valid = torch.ones(steps, batch, 1, dtype=torch.bool, device=x.device)
    if lengths is not None:
        time = torch.arange(steps, device=x.device).unsqueeze(1)
        valid = (time < lengths.to(x.device).view(1, -1)).unsqueeze(-1)
    result: dict[str, dict[str, float]] = {}
    for index, (name, program) in enumerate(zip(model._pair_names, programs, strict=True)):
        result[name] = {}
        for op in ACTIVATION_OPERATORS:
            fmt = program.formats[op]
            reference = float_values[index][op]
            noisy = dequantize(traces[index][op], fmt.scale, fmt.zero_point)
            result[name][op] = _sqnr_db(reference, noisy, valid)
    return result


def _float_values(
    model: QuantGRU, input: Tensor | PackedSequence, hx: Tensor | None
) -> list[dict[str, Tensor]]:
    """Every operator's float value (T, B, C) per (layer, direction), from the float GRU
    decomposed at the quantization points."""
    steps_of: list[dict[str, dict[int, Tensor]]] = [defaultdict(dict) for _ in model._pair_names]
    whole: list[dict[str, Tensor]] = [{} for _ in model._pair_names]

    def observe(pair: int) -> PointHook:
        def record(name: str, value: Tensor, valid: Tensor | None, step: int | None) -> Tensor:
            if name in ACTIVATION_OPERATORS:
                if step is None:
                    whole[pair][name] = value.detach()
                elif step >= 0:  # step -1 is h0, not an output of the step
                    steps_of[pair][name][step] = value.detach()
            return value

        return record

    with torch.no_grad():
        functional.gru(
            input, hx, model._direction_weights(), model._shape(), 0.0, False, observe=observe
        )
    values = []
    for pair in range(len(model._pair_names)):
        found = dict(whole[pair])
        for name, by_step in steps_of[pair].items():
            found[name] = torch.stack([by_step[t] for t in sorted(by_step)])
        values.append(found)
    return values


def _sqnr_db(reference: Tensor, noisy: Tensor, valid: Tensor) -> float:
    mask = valid.expand_as(reference)
    signal = reference[mask].double().square().sum().item()
    noise = (noisy - reference)[mask].double().square().sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
