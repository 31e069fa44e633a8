"""The integer QDQ arithmetic: between the quantization points, the graph performs the integer
model's own arithmetic (reference/README.md §4 to §8), so ONNX Runtime reproduces its codes.

Every operator reads its operands' dequantized values and recovers their zero-corrected codes
exactly (``Round(value / scale)`` in float64: a float32 value ``s * q`` divided by ``s`` is
within 2^-23 relative of ``q``). Terms are formed and requantized as §4 says: the integer
``v`` (a code, a product, a dot product), its pre-shift ``rshr(v, p)``, then
``floor(v' * m * 2^-n + 1/2)``, the rounding right shift written with ``Floor`` (ties up).
Each operator sums its terms, clips to its code range and passes through its
``QuantizeLinear`` / ``DequantizeLinear`` pair, which then rounds nothing. Sigmoid and tanh are
§6's tables: ``Gather`` of the table entries and the same interpolation.

Arithmetic is float64, where the integers of widths up to 16 bits are exact (a dot product
of K terms stays below 2^53 while 2^(a + c) * K does); the only inexact step is the product
``v' * (m * 2^-n)``, whose relative error of 2^-53 changes a rounding only for a value within
that distance of a tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quant_gru.export.onnx_graph import Nodes
from quant_gru.export.qdq_operators import QDQOperators
from quant_gru.export.qdq_points import qdq
from quant_gru.quantize.program import ActivationFormat
from quant_gru.quantize.requant import Term
from quant_gru.quantize.tables import SEGMENTS, Table


def _double() -> int:
    from onnx import TensorProto

    return int(TensorProto.DOUBLE)


class IntegerOperators(QDQOperators):
    # --- building blocks ---------------------------------------------------------------------

    def _const(self, name: str, value: object) -> str:
        return self.writer.const(name, np.asarray(value, dtype=np.float64))

    def _codes(self, g: Nodes, value: str, prefix: str, scale: np.ndarray | float) -> str:
        """Zero-corrected codes (float64) of a dequantized value with ``scale``."""
        from onnx import TensorProto

        s = self._const(f"{prefix}/scale_double", scale)
        wide = g.op("Cast", [value], name=f"{prefix}/ToDouble", to=TensorProto.DOUBLE)
        return g.op("Round", [g.op("Div", [wide, s], name=f"{prefix}/Div")], name=f"{prefix}/codes")

    def _rshr(self, g: Nodes, value: str, shift: int, prefix: str) -> str:
        """rshr(value, shift) of §3 on float64 integers."""
        if shift == 0:
            return value
        factor = self._const(f"shift/{shift}", np.ldexp(1.0, -shift))
        half = self._const("half", 0.5)
        scaled = g.op("Mul", [value, factor], name=f"{prefix}/Shift")
        return g.op("Floor", [g.op("Add", [scaled, half], name=f"{prefix}/Half")], name=prefix)

    def _term(self, g: Nodes, value: str, term: Term, prefix: str) -> str:
        """A term of §4 in its operator's scale: floor(rshr(v, p) * m * 2^-n + 1/2)."""
        value = self._rshr(g, value, term.pre_shift, f"{prefix}/pre_shift")
        m, n = term.m.numpy(), term.n.numpy()
        ratio = np.ldexp(m.astype(np.float64), -n)
        factor = self._const(f"{prefix}/multiplier", ratio if ratio.size > 1 else ratio[0])
        half = self._const("half", 0.5)
        scaled = g.op("Mul", [value, factor], name=f"{prefix}/Mul")
        return g.op("Floor", [g.op("Add", [scaled, half], name=f"{prefix}/Half")], name=prefix)

    def _point(self, g: Nodes, codes: str, prefix: str, fmt: ActivationFormat) -> str:
        """The quantization point of zero-corrected codes already in range: float32
        ``s * codes`` through the operator's Q/DQ pair (which returns the same codes)."""
        from onnx import TensorProto

        scale = self.writer.const(f"{prefix}/scale", np.float32(fmt.scale))
        narrow = g.op("Cast", [codes], name=f"{prefix}/ToFloat", to=TensorProto.FLOAT)
        value = g.op("Mul", [narrow, scale], name=f"{prefix}/Value")
        return qdq(g, value, prefix, fmt, self.opset, in_range=True)

    def _operator(self, g: Nodes, pair: str, index: int, op: str, terms: Sequence[str]) -> str:
        """§5: the sum of the terms, clipped to the operator's range, as its Q/DQ point."""
        fmt = self.programs[index].formats[op]
        prefix = f"{pair}/{op}"
        total = terms[0]
        for k, term in enumerate(terms[1:], 1):
            total = g.op("Add", [total, term], name=f"{prefix}/sum{k}")
        low = self._const(f"{prefix}/low", fmt.qmin - fmt.zero_point)
        high = self._const(f"{prefix}/high", fmt.qmax - fmt.zero_point)
        clipped = g.op("Clip", [total, low, high], name=f"{prefix}/Saturate")
        return self._point(g, clipped, prefix, fmt)

    def _read(self, g: Nodes, value: str, pair: str, index: int, op: str, tag: str) -> str:
        """The zero-corrected codes of operator ``op``'s dequantized ``value``."""
        fmt = self.programs[index].formats[op]
        return self._codes(g, value, f"{pair}/{op}/{tag}", fmt.scale)

    def _table(self, g: Nodes, pair: str, index: int, op: str, source: str, pre: str) -> str:
        """§6: the table of ``op`` evaluated on the zero-corrected codes ``pre`` of ``source``."""
        from onnx import TensorProto

        program = self.programs[index]
        table: Table = program.tables[op]
        src, out = program.formats[source], program.formats[op]
        prefix, step = f"{pair}/{op}", 1 << table.k
        const = self._const
        entries = const(f"{prefix}/table", table.y.numpy())
        offset = const(f"{prefix}/table_offset", src.zero_point - table.c_lo)
        zero, end = const("zero", 0.0), const(f"{prefix}/table_end", SEGMENTS * step)
        d = g.op("Add", [pre, offset], name=f"{prefix}/Offset")
        d = g.op("Clip", [d, zero, end], name=f"{prefix}/Bound")

        def gather(position: str, tag: str) -> str:
            indices = g.op("Cast", [position], name=f"{prefix}/{tag}Index", to=TensorProto.INT64)
            return g.op("Gather", [entries, indices], name=f"{prefix}/{tag}Gather", axis=0)

        if table.k == 0:
            y = gather(d, "")
        else:
            segment = self._rshr_floor(g, d, table.k, f"{prefix}/Segment")
            start = g.op(
                "Mul", [segment, const(f"shift/up{table.k}", step)], name=f"{prefix}/Start"
            )
            rest = g.op("Sub", [d, start], name=f"{prefix}/Rest")
            last = const("last_segment", SEGMENTS)
            nxt = g.op("Add", [segment, const("one", 1.0)], name=f"{prefix}/Next")
            nxt = g.op("Min", [nxt, last], name=f"{prefix}/NextBound")
            y0, y1 = gather(segment, "Low"), gather(nxt, "High")
            rise = g.op("Sub", [y1, y0], name=f"{prefix}/Rise")
            partial = g.op("Mul", [rise, rest], name=f"{prefix}/Partial")
            y = g.op("Add", [y0, self._rshr(g, partial, table.k, f"{prefix}/Interpolate")])
        zp = const(f"{prefix}/zero_point_double", out.zero_point)
        return self._point(g, g.op("Sub", [y, zp], name=f"{prefix}/Centre"), prefix, out)

    def _rshr_floor(self, g: Nodes, value: str, shift: int, name: str) -> str:
        """floor(value / 2^shift) (the segment index d >> k of §6)."""
        factor = self._const(f"shift/{shift}", np.ldexp(1.0, -shift))
        return g.op("Floor", [g.op("Mul", [value, factor], name=f"{name}/Scale")], name=name)

    def _weight_codes(self, g: Nodes, pair: str, index: int, op: str, shift: int) -> str:
        """A weight's codes (float64; matrices [K, 3H]) read back from its DequantizeLinear,
        pre-shifted by §4's operand shift."""
        dequantized = self.weight(g, pair, index, op)
        codes = self._codes(g, dequantized, f"{pair}/{op}/read", self.row_scales(index, op))
        return self._rshr(g, codes, shift, f"{pair}/{op}/operand_shift")

    def _product(self, g: Nodes, a: str, c: str, term: Term, prefix: str) -> str:
        """The integer of a product term: operands pre-shifted (§4), then multiplied."""
        shift_a, shift_c = term.operand_shifts
        a = self._rshr(g, a, shift_a, f"{prefix}/shift_a")
        c = self._rshr(g, c, shift_c, f"{prefix}/shift_c")
        return g.op("Mul", [a, c], name=f"{prefix}/product")

    # --- the skeleton's interface ------------------------------------------------------------

    def layer_input(self, g: Nodes, pair: str, index: int, sources: list[str]) -> str:
        program = self.programs[index]
        fmt = program.formats["input.x"]
        prefix = f"{pair}/input.x"
        if not program.terms["input.x"]:
            return self._point(g, self._float_to_codes(g, sources[0], prefix, fmt), prefix, fmt)
        directions = len(sources)
        first_below = (index // directions - 1) * directions
        below = self.programs[first_below : first_below + directions]
        blocks = []
        for d, (source, term) in enumerate(zip(sources, program.terms["input.x"], strict=True)):
            tag = f"below{d}"
            codes = self._codes(g, source, f"{prefix}/{tag}", below[d].formats["output.h"].scale)
            blocks.append(self._term(g, codes, term, f"{prefix}/{tag}/term"))
        joined = blocks[0]
        if len(blocks) > 1:
            joined = g.op("Concat", blocks, name=f"{prefix}/concat", axis=-1)
        return self._operator(g, pair, index, "input.x", [joined])

    def _float_to_codes(self, g: Nodes, value: str, prefix: str, fmt: ActivationFormat) -> str:
        """§8: clamp(floor(x / s + 1/2), qmin - zp, qmax - zp) in float64."""
        from onnx import TensorProto

        wide = g.op("Cast", [value], name=f"{prefix}/ToDouble", to=TensorProto.DOUBLE)
        scaled = g.op("Div", [wide, self._const(f"{prefix}/scale_double", fmt.scale)])
        rounded = g.op("Floor", [g.op("Add", [scaled, self._const("half", 0.5)])])
        low = self._const(f"{prefix}/low", fmt.qmin - fmt.zero_point)
        high = self._const(f"{prefix}/high", fmt.qmax - fmt.zero_point)
        return g.op("Clip", [rounded, low, high], name=f"{prefix}/Saturate")

    def initial_state(self, g: Nodes, pair: str, index: int, h0: str) -> str:
        fmt = self.programs[index].formats["output.h"]
        prefix = f"{pair}/output.h/h0"
        return self._point(g, self._float_to_codes(g, h0, prefix, fmt), prefix, fmt)

    def projection(self, g: Nodes, pair: str, index: int, x: str) -> str:
        terms = self.programs[index].terms["matmul.Wx"]
        shift_w, shift_x = terms[0].operand_shifts
        weight = self._weight_codes(g, pair, index, "weight.W", shift_w)
        bias = self._weight_codes(g, pair, index, "weight.bw", 0)
        x_codes = self._read(g, x, pair, index, "input.x", "read")
        x_codes = self._rshr(g, x_codes, shift_x, f"{pair}/input.x/operand_shift")
        dot = g.op("MatMul", [x_codes, weight], name=f"{pair}/W_matmul")
        prefix = f"{pair}/matmul.Wx"
        return self._operator(
            g,
            pair,
            index,
            "matmul.Wx",
            [
                self._term(g, dot, terms[0], f"{prefix}/term0"),
                self._term(g, bias, terms[1], f"{prefix}/term1"),
            ],
        )

    def prepare(self, g: Nodes, pair: str, index: int) -> dict[str, str]:
        terms = self.programs[index].terms
        shift_r = terms["matmul.Rh"][0].operand_shifts[0]
        return {
            "R": self._weight_codes(g, pair, index, "weight.R", shift_r),
            "br": self._term(
                g,
                self._weight_codes(g, pair, index, "weight.br", 0),
                terms["op.Rh_add_br"][1],
                f"{pair}/op.Rh_add_br/term1",
            ),
        }

    def step(
        self, g: Nodes, pair: str, index: int, outer: dict[str, str], h: str, wx_t: str
    ) -> str:
        terms = self.programs[index].terms
        split = self.writer.const("split_gates", np.array([self.hidden] * 3, dtype=np.int64))

        def read(value: str, op: str, tag: str = "read") -> str:
            return self._read(g, value, pair, index, op, tag)

        def term(value: str, op: str, k: int) -> str:
            return self._term(g, value, terms[op][k], f"{pair}/{op}/term{k}")

        def operator(op: str, *values: str) -> str:
            return self._operator(g, pair, index, op, values)

        def product(a: str, c: str, op: str, k: int) -> str:
            return self._product(g, a, c, terms[op][k], f"{pair}/{op}/term{k}")

        h_codes = read(h, "output.h")
        shift_h = terms["matmul.Rh"][0].operand_shifts[1]
        h_dot = self._rshr(g, h_codes, shift_h, f"{pair}/output.h/operand_shift")
        rh = operator(
            "matmul.Rh",
            term(g.op("MatMul", [h_dot, outer["R"]], name=f"{pair}/R_matmul"), "matmul.Rh", 0),
        )
        rb = operator("op.Rh_add_br", term(read(rh, "matmul.Rh"), "op.Rh_add_br", 0), outer["br"])
        wx = read(wx_t, "matmul.Wx")
        rb_codes = read(rb, "op.Rh_add_br")
        x_r, x_z, x_n = g.ops("Split", [wx, split], 3, name=f"{pair}/split_wx", axis=-1)
        b_r, b_z, b_n = g.ops("Split", [rb_codes, split], 3, name=f"{pair}/split_rb", axis=-1)
        r_pre = operator("gate.r_pre", term(x_r, "gate.r_pre", 0), term(b_r, "gate.r_pre", 1))
        z_pre = operator("gate.z_pre", term(x_z, "gate.z_pre", 0), term(b_z, "gate.z_pre", 1))
        r = self._table(g, pair, index, "gate.r_out", "gate.r_pre", read(r_pre, "gate.r_pre"))
        z = self._table(g, pair, index, "gate.z_out", "gate.z_pre", read(z_pre, "gate.z_pre"))
        r_codes, z_codes = read(r, "gate.r_out"), read(z, "gate.z_out")
        r_rb = operator("op.rRh", term(product(r_codes, b_n, "op.rRh", 0), "op.rRh", 0))
        g_pre = operator(
            "gate.g_pre", term(x_n, "gate.g_pre", 0), term(read(r_rb, "op.rRh"), "gate.g_pre", 1)
        )
        gate = self._table(g, pair, index, "gate.g_out", "gate.g_pre", read(g_pre, "gate.g_pre"))
        g_codes = read(gate, "gate.g_out")
        old = operator(
            "op.old_contrib",
            term(product(z_codes, h_codes, "op.old_contrib", 0), "op.old_contrib", 0),
        )
        # (1 - z) * g as g - z * g (§7); the second term is that of the negated integer.
        zg = product(z_codes, g_codes, "op.new_contrib", 1)
        negated = g.op("Neg", [zg], name=f"{pair}/op.new_contrib/negate")
        new = operator(
            "op.new_contrib", term(g_codes, "op.new_contrib", 0), term(negated, "op.new_contrib", 1)
        )
        return operator(
            "output.h",
            term(read(old, "op.old_contrib"), "output.h", 0),
            term(read(new, "op.new_contrib"), "output.h", 1),
        )
