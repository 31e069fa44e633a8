"""Persistent Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1): the only package that
imports triton, and only when a kernel is first used."""
