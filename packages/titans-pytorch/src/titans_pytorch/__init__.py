"""Titans neural memory and the Memory-as-Context transformer (drop-in for titans-pytorch 0.5.x)."""

from titans_pytorch.mac_transformer import MemoryAsContextTransformer
from titans_pytorch.memory_models import (
    FactorizedMemoryMLP,
    GatedResidualMemoryMLP,
    MemoryAttention,
    MemoryMLP,
    MemorySwiGluMLP,
)
from titans_pytorch.neural_memory import NeuralMemory, NeuralMemState, mem_state_detach

__all__ = [
    "FactorizedMemoryMLP",
    "GatedResidualMemoryMLP",
    "MemoryAsContextTransformer",
    "MemoryAttention",
    "MemoryMLP",
    "MemorySwiGluMLP",
    "NeuralMemState",
    "NeuralMemory",
    "mem_state_detach",
]
