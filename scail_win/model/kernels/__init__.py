"""Compute kernels with a PyTorch path and an optional fast path, each picked once."""
