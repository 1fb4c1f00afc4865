"""Model configuration and the polynomial toy transformer."""

from bilinear_toys.models.config import ModelConfig
from bilinear_toys.models.toy_transformer import BilinearLayer, QuadraticAttention, ToyTransformer

__all__ = ["BilinearLayer", "ModelConfig", "QuadraticAttention", "ToyTransformer"]
