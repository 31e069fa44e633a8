"""The integer reference of the quantized GRU (README.md in this folder is its specification)."""

from __future__ import annotations

from quant_gru.reference.integer_gru import integer_gru

__all__ = ["integer_gru"]
