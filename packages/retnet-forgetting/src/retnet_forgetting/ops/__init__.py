"""Operators with a pure-PyTorch reference and fast paths (fla on CUDA)."""
