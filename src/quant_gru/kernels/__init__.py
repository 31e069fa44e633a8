"""Realizations of the GRU recurrence: `torch` (plain PyTorch, any device) and `triton`
(persistent kernels on CUDA); backend.py chooses between them."""
