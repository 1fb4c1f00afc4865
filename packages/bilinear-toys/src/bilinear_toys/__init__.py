"""Polynomial toy transformers (quadratic attention, bilinear MLPs) and weight-based circuit analysis."""

from bilinear_toys.models import ModelConfig, ToyTransformer

__all__ = ["ModelConfig", "ToyTransformer"]
