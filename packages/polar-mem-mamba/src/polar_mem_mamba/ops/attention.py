"""Scaled dot-product attention over [batch, length, heads, head_dim]: flash_attn on CUDA, else SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seqmem_shared.backends import optional_import, resolve_backend

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] via ``F.scaled_dot_product_attention``.

    ``causal`` needs ``Lq == Lk`` (query i sees keys 0..i).
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, dropout_p: float = 0.0,
              backend: str = "auto") -> torch.Tensor:
    """Same as :func:`attention_reference`; ``backend`` in "auto" | "torch" | "flash_attn".

    "auto" uses flash_attn for fp16/bf16 CUDA tensors when it imports, SDPA otherwise.
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention: expected equal query/key lengths, got {q.shape[1]} and "
                         f"{k.shape[1]}")
    which = resolve_backend(backend, q, k, v, fast="flash_attn")
    if which == "flash_attn" and (q.dtype in _FLASH_DTYPES or backend == "flash_attn"):
        module = optional_import("flash_attn", "attention")
        if module is not None:
            return module.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
        if backend == "flash_attn":
            raise RuntimeError("backend='flash_attn' requested but flash_attn cannot be imported")
    return attention_reference(q, k, v, causal=causal, dropout_p=dropout_p)
