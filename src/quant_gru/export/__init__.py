"""Exports of a QuantGRU: quantization-parameter files (ONNX export follows)."""
