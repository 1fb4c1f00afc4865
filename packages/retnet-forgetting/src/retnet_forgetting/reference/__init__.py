"""Pure-PyTorch RetNet matching fla's (configuration, layers and model), for CPU and as the oracle."""

from retnet_forgetting.reference.configuration import RETNET_2_7B, RetNetConfig
from retnet_forgetting.reference.layers import (
    GatedMLP,
    MultiScaleRetention,
    RMSNormSwishGate,
    RotaryEmbedding,
    retention_output,
    retention_qkv,
)
from retnet_forgetting.reference.modeling import RetNetBlock, RetNetForCausalLM, RetNetModel, RetNetOutput

__all__ = [
    "RETNET_2_7B", "GatedMLP", "MultiScaleRetention", "RMSNormSwishGate", "RetNetBlock", "RetNetConfig",
    "RetNetForCausalLM", "RetNetModel", "RetNetOutput", "RotaryEmbedding", "retention_output",
    "retention_qkv",
]
