"""Exports of a QuantGRU: ONNX (to_onnx), quantization-parameter files, AIMET encodings."""

from quant_gru.export.to_onnx import to_onnx

__all__ = ["to_onnx"]
