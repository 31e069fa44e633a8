"""The quantization points of a QDQ graph: a ``QuantizeLinear`` / ``DequantizeLinear`` pair per
activation operator, and weights as ``DequantizeLinear`` of their integer codes.

ONNX integer types hold 8 bits (any opset used here) and 16 bits (``int16`` / ``uint16`` from
opset 21). An operator whose code range is a type's full range gets a pair of that type. A
narrower range gets the smallest type that holds it, with a ``Clip`` to the operator's range in
front of the ``QuantizeLinear`` (the clip in a wider container). A range no available type holds
(more than 16 bits, or 9 to 16 bits before opset 21) is quantized with float operators
(``Div``, ``Round``, ``Add``, ``Clip``; then ``Sub``, ``Mul``), exact while codes stay within
float32's 24-bit significand. Node names: ``<pair>/<operator>/Q`` and ``/DQ`` (the ``Clip`` and
``Mul`` of the float form).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from quant_gru.export.onnx_graph import Nodes

if TYPE_CHECKING:
    from quant_gru.quantize.program import ActivationFormat

INT16_OPSET = 21  # int16 / uint16 QuantizeLinear and DequantizeLinear


def container(qmin: int, qmax: int, opset: int) -> int | None:
    """The smallest ONNX integer type holding [qmin, qmax] at ``opset``, if any."""
    from onnx import TensorProto

    candidates = [
        (TensorProto.INT8, -(1 << 7), (1 << 7) - 1),
        (TensorProto.UINT8, 0, (1 << 8) - 1),
    ]
    if opset >= INT16_OPSET:
        candidates += [
            (TensorProto.INT16, -(1 << 15), (1 << 15) - 1),
            (TensorProto.UINT16, 0, (1 << 16) - 1),
        ]
    for kind, low, high in candidates:
        if low <= qmin and qmax <= high:
            return kind
    return None


def _full_range(kind: int, qmin: int, qmax: int) -> bool:
    from onnx import helper

    info = np.iinfo(helper.tensor_dtype_to_np_dtype(kind))
    return (int(info.min), int(info.max)) == (qmin, qmax)


def qdq(
    g: Nodes, value: str, prefix: str, fmt: ActivationFormat, opset: int, in_range: bool = False
) -> str:
    """Quantize then dequantize the float32 ``value`` with ``fmt``; returns the dequantized
    value (float32). Rounding is ``QuantizeLinear``'s (half to even). ``in_range``: the value
    is known to lie in the operator's range, so a wider container needs no clip."""
    from onnx import helper

    const, scale_value = g.writer.const, np.float32(fmt.scale)
    scale = const(f"{prefix}/scale", scale_value)
    kind = container(fmt.qmin, fmt.qmax, opset)
    if kind is not None:
        zp = const(f"{prefix}/zero_point", fmt.zero_point, helper.tensor_dtype_to_np_dtype(kind))
        if not in_range and not _full_range(kind, fmt.qmin, fmt.qmax):
            # The container is wider than the operator: clip to the operator's range first.
            low = const(f"{prefix}/low", scale_value * np.float32(fmt.qmin - fmt.zero_point))
            high = const(f"{prefix}/high", scale_value * np.float32(fmt.qmax - fmt.zero_point))
            value = g.op("Clip", [value, low, high], name=f"{prefix}/Clip")
        codes = g.op("QuantizeLinear", [value, scale, zp], name=f"{prefix}/Q")
        return g.op("DequantizeLinear", [codes, scale, zp], name=f"{prefix}/DQ")
    zp = const(f"{prefix}/zero_point_float", np.float32(fmt.zero_point))
    low = const(f"{prefix}/qmin", np.float32(fmt.qmin))
    high = const(f"{prefix}/qmax", np.float32(fmt.qmax))
    scaled = g.op("Div", [value, scale], name=f"{prefix}/Div")
    rounded = g.op("Round", [scaled], name=f"{prefix}/Round")
    shifted = g.op("Add", [rounded, zp], name=f"{prefix}/AddZeroPoint")
    codes = g.op("Clip", [shifted, low, high], name=f"{prefix}/Q")
    centred = g.op("Sub", [codes, zp], name=f"{prefix}/SubZeroPoint")
    return g.op("Mul", [centred, scale], name=f"{prefix}/DQ")


def dequantized_weight(
    g: Nodes, prefix: str, codes: np.ndarray, scales: np.ndarray, bits: int, opset: int
) -> str:
    """``DequantizeLinear`` of integer weight codes with one scale per output channel: a
    matrix stored as MatMul's right operand [K, 3H] (channel axis 1), a bias [3H] (axis 0).
    int8 up to 8 bits, int16 up to 16 bits from opset 21, int32 otherwise."""
    if bits <= 8:
        dtype: type = np.int8
    elif bits <= 16 and opset >= INT16_OPSET:
        dtype = np.int16
    else:
        dtype = np.int32
    axis = codes.ndim - 1
    stored = g.writer.const(f"{prefix}/codes", np.ascontiguousarray(codes.T).astype(dtype))
    scale = g.writer.const(f"{prefix}/scale", scales.astype(np.float32))
    return g.op("DequantizeLinear", [stored, scale], name=f"{prefix}/DQ", axis=axis)
