"""Titans neural memory and the Memory-as-Context transformer."""
