"""Titans neural memory and the Memory-as-Context transformer (drop-in for titans-pytorch 0.5.x)."""

from titans_pytorch.cuda_graphs import TrainStep, graphed_memory
from titans_pytorch.mac_transformer import MemoryAsContextTransformer
from titans_pytorch.memory_models import (
    FactorizedMemoryMLP,
    GatedResidualMemoryMLP,
    MemoryAttention,
    MemoryMLP,
    MemorySwiGluMLP,
)
from titans_pytorch.neural_memory import NeuralMemory, NeuralMemState, mem_state_detach
from titans_pytorch.variants import MemoryAsGateTransformer, MemoryAsLayerTransformer, NeuralMemoryLM

__all__ = [
    "FactorizedMemoryMLP",
    "GatedResidualMemoryMLP",
    "MemoryAsContextTransformer",
    "MemoryAsGateTransformer",
    "MemoryAsLayerTransformer",
    "MemoryAttention",
    "MemoryMLP",
    "MemorySwiGluMLP",
    "NeuralMemState",
    "NeuralMemory",
    "NeuralMemoryLM",
    "TrainStep",
    "graphed_memory",
    "mem_state_detach",
]
