"""What the two arithmetics of the QDQ graph share: the integer programs of a calibrated
QuantGRU, its weights as ``DequantizeLinear`` of their codes, and the interface the graph
skeleton (onnx_qdq.py) calls per (layer, direction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from quant_gru.export.onnx_graph import GraphWriter, Nodes
from quant_gru.export.qdq_points import dequantized_weight

if TYPE_CHECKING:
    from quant_gru.module import QuantGRU
    from quant_gru.quantize.params import OperatorQuant
    from quant_gru.quantize.program import DirectionProgram

# DirectionProgram field holding each weight operator's codes.
WEIGHT_CODES = {
    "weight.W": "weight_W",
    "weight.R": "weight_R",
    "weight.bw": "bias_w",
    "weight.br": "bias_r",
}


class QDQOperators:
    """Emits the operators of one (layer, direction); values between operators are float32
    outputs of ``DequantizeLinear`` (or its float form).

    Subclasses implement ``layer_input``, ``initial_state``, ``projection``, ``prepare`` and
    ``step``.
    """

    def __init__(self, model: QuantGRU, writer: GraphWriter, opset: int) -> None:
        from quant_gru.kernels.torch.quantized_forward import build_programs

        quantized = model._quantized_model()
        self.quant = quantized.quant
        self.programs: list[DirectionProgram] = build_programs(
            quantized, model._direction_weights()
        )
        self.hidden = model.hidden_size
        self.writer = writer
        self.opset = opset

    def weight_quant(self, index: int, op: str) -> OperatorQuant:
        return self.quant[index][op]

    def row_scales(self, index: int, op: str) -> np.ndarray:
        """The weight's scale of each of its 3H rows (float64)."""
        from quant_gru.quantize.scales import per_row

        quant = self.weight_quant(index, op)
        return per_row(quant.scale.detach().cpu(), 3 * self.hidden).double().numpy()

    def weight(self, g: Nodes, pair: str, index: int, op: str) -> str:
        """The dequantized weight as MatMul's right operand ([K, 3H]) or bias ([3H]), float32,
        channels in nn.GRU's gate order."""
        codes = getattr(self.programs[index], WEIGHT_CODES[op]).detach().cpu().numpy()
        bits = self.weight_quant(index, op).spec.bitwidth
        scales = self.row_scales(index, op)
        return dequantized_weight(g, f"{pair}/{op}", codes, scales, bits, self.opset)

    # The skeleton's interface -------------------------------------------------------------

    def layer_input(self, g: Nodes, pair: str, index: int, sources: list[str]) -> str:
        """input.x (dequantized, [T, B, I]) from the float input (layer 0: one source) or from
        the dequantized outputs of each direction of the layer below."""
        raise NotImplementedError

    def initial_state(self, g: Nodes, pair: str, index: int, h0: str) -> str:
        """output.h's dequantized codes of the float initial state h0 ([B, H])."""
        raise NotImplementedError

    def projection(self, g: Nodes, pair: str, index: int, x: str) -> str:
        """matmul.Wx (dequantized, [T, B, 3H]) of the dequantized input.x."""
        raise NotImplementedError

    def prepare(self, g: Nodes, pair: str, index: int) -> dict[str, str]:
        """Values the time step reads from the outer graph (the recurrent weights), computed
        once before the loop."""
        raise NotImplementedError

    def step(
        self, g: Nodes, pair: str, index: int, outer: dict[str, str], h: str, wx_t: str
    ) -> str:
        """The next dequantized output.h ([B, H]) from the previous one and this step's
        dequantized matmul.Wx ([B, 3H]); ``outer`` is what ``prepare`` returned."""
        raise NotImplementedError
