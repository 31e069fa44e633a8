"""Plain-PyTorch recurrences: the CPU path, the export path and the reference for fast kernels."""
