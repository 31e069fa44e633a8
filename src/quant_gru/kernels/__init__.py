"""Realizations of the GRU recurrence: `torch` (plain PyTorch, any device)."""
