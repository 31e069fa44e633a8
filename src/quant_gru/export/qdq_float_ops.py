"""The conventional QDQ arithmetic: float operators (MatMul, Add, Mul, Sigmoid, Tanh) between
quantization points, one rounding per operator (``QuantizeLinear``'s, half to even).

This is the form QDQ-aware runtimes and toolchains pattern-match and replace with their own
integer kernels. It follows the integer model to within a few LSB, not bit for bit: it rounds
each operator's float sum once where the integer model rounds each term (half up), evaluates
sigmoid and tanh exactly where the integer model uses tables, and accumulates in float32
(docs/onnx.md has the measured distribution).
"""

from __future__ import annotations

import numpy as np

from quant_gru.export.onnx_graph import Nodes
from quant_gru.export.qdq_operators import QDQOperators
from quant_gru.export.qdq_points import qdq


class FloatOperators(QDQOperators):
    def _fq(self, g: Nodes, value: str, pair: str, index: int, op: str, tag: str = "") -> str:
        prefix = f"{pair}/{op}" + (f"/{tag}" if tag else "")
        return qdq(g, value, prefix, self.programs[index].formats[op], self.opset)

    def layer_input(self, g: Nodes, pair: str, index: int, sources: list[str]) -> str:
        value = sources[0]
        if len(sources) > 1:
            value = g.op("Concat", sources, name=f"{pair}/input_concat", axis=-1)
        return self._fq(g, value, pair, index, "input.x")

    def initial_state(self, g: Nodes, pair: str, index: int, h0: str) -> str:
        return self._fq(g, h0, pair, index, "output.h", tag="h0")

    def projection(self, g: Nodes, pair: str, index: int, x: str) -> str:
        w_t = self.weight(g, pair, index, "weight.W")
        b_w = self.weight(g, pair, index, "weight.bw")
        projected = g.op("MatMul", [x, w_t], name=f"{pair}/W_matmul")
        biased = g.op("Add", [projected, b_w], name=f"{pair}/bw_add")
        return self._fq(g, biased, pair, index, "matmul.Wx")

    def prepare(self, g: Nodes, pair: str, index: int) -> dict[str, str]:
        return {
            "R_t": self.weight(g, pair, index, "weight.R"),
            "br": self.weight(g, pair, index, "weight.br"),
        }

    def step(
        self, g: Nodes, pair: str, index: int, outer: dict[str, str], h: str, wx_t: str
    ) -> str:
        def fq(value: str, op: str) -> str:
            return self._fq(g, value, pair, index, op)

        split = g.writer.const("split_gates", np.array([self.hidden] * 3, dtype=np.int64))
        r_t, b_r = outer["R_t"], outer["br"]
        rh = fq(g.op("MatMul", [h, r_t], name=f"{pair}/R_matmul"), "matmul.Rh")
        rb = fq(g.op("Add", [rh, b_r], name=f"{pair}/br_add"), "op.Rh_add_br")
        x_r, x_z, x_n = g.ops("Split", [wx_t, split], 3, name=f"{pair}/split_wx", axis=-1)
        rb_r, rb_z, rb_n = g.ops("Split", [rb, split], 3, name=f"{pair}/split_rb", axis=-1)
        r_pre = fq(g.op("Add", [x_r, rb_r], name=f"{pair}/r_add"), "gate.r_pre")
        z_pre = fq(g.op("Add", [x_z, rb_z], name=f"{pair}/z_add"), "gate.z_pre")
        r = fq(g.op("Sigmoid", [r_pre], name=f"{pair}/r_sigmoid"), "gate.r_out")
        z = fq(g.op("Sigmoid", [z_pre], name=f"{pair}/z_sigmoid"), "gate.z_out")
        r_rb = fq(g.op("Mul", [r, rb_n], name=f"{pair}/r_mul"), "op.rRh")
        g_pre = fq(g.op("Add", [x_n, r_rb], name=f"{pair}/g_add"), "gate.g_pre")
        gate = fq(g.op("Tanh", [g_pre], name=f"{pair}/g_tanh"), "gate.g_out")
        old = fq(g.op("Mul", [z, h], name=f"{pair}/old_mul"), "op.old_contrib")
        # (1 - z) * g as g - z * g, the form of §7.
        zg = g.op("Mul", [z, gate], name=f"{pair}/zg_mul")
        new = fq(g.op("Sub", [gate, zg], name=f"{pair}/new_sub"), "op.new_contrib")
        return fq(g.op("Add", [old, new], name=f"{pair}/h_add"), "output.h")
