"""Operators with a fast CUDA path and a pure-PyTorch reference of the same signature."""
