"""Calibration: statistics of the float forward turned into quantization parameters."""
