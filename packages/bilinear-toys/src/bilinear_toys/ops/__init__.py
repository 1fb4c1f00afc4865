"""Operators with a pure-PyTorch reference and optional fast paths."""
