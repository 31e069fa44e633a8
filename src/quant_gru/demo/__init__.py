"""The end-to-end demo (``quant-gru demo``): a speech classifier on the Japanese Vowels dataset
trained in float, quantized after training with every calibration method at several widths,
fine-tuned quantization-aware at 4 bits, exported to ONNX and checked in ONNX Runtime, with a
report folder of tables and plots."""
