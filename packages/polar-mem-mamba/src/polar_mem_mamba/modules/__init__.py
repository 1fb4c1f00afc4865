"""nn.Modules of polar-mem-mamba: the Mamba-2 mixer, encoder/decoder blocks, memory pool, attention."""

from polar_mem_mamba.modules.attention import GatedShortcutAttention, SelfAttention, rotate
from polar_mem_mamba.modules.blocks import BiMambaBlock, MambaBlock, PolarizedMemBlock
from polar_mem_mamba.modules.mamba2 import Mamba2
from polar_mem_mamba.modules.memory_pool import MemoryPool, MemoryPoolState

__all__ = [
    "BiMambaBlock",
    "GatedShortcutAttention",
    "Mamba2",
    "MambaBlock",
    "MemoryPool",
    "MemoryPoolState",
    "PolarizedMemBlock",
    "SelfAttention",
    "rotate",
]
