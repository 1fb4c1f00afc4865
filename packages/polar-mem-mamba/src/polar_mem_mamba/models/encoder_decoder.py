"""``HybridMambaEncoderDecoder``: the encoder-decoder of the capacity-cliff study, one class for all
five named architectures (:data:`polar_mem_mamba.config.ARCHITECTURES`).

Data flow (MQAR): the encoder reads ``[BOS k1 v1 ... kN vN EOS]`` bidirectionally. Architectures
without cross-attention (mamba2, polar, polar_pool, attention) run the decoder over the stream
``[encoder_out ; embed(BOS q1 ... qM)]`` left to right, so their recurrent state (or causal
attention) is the path by which the pairs reach the queries: that is where the capacity cliff lives.
The hybrid decoder reads only ``embed(BOS q1 ... qM)`` and reaches the encoder through GSA
cross-attention (as in the original design: with the prefix too, the SSM path learns the shortcut
"answer with some value from the context" first and recall training stalls). Logits are returned for
the decoder positions only. Token embeddings are shared by encoder and decoder; the output head is separate (a
head tied to the embeddings makes "answer with some value from the context" a strong shortcut, and
training stalls on it).
"""

from __future__ import annotations

import math

import torch
from seqmem_shared.kernels import RMSNorm
from torch import nn

from polar_mem_mamba.config import Config
from polar_mem_mamba.modules import (
    BiMambaBlock,
    GatedShortcutAttention,
    MambaBlock,
    PolarizedMemBlock,
    SelfAttention,
)


class Encoder(nn.Module):
    """Bidirectional stack: BiMambaBlocks, with bidirectional attention at layers ``n // 2`` and ``n - 1``
    when the architecture has encoder attention (every layer for the attention baseline)."""

    def __init__(self, config: Config, device=None, dtype=None) -> None:
        super().__init__()
        arch, n = config.arch, config.encoder_layers
        factory = {"device": device, "dtype": dtype, "backend": config.backend}
        attn_at = set(range(n)) if arch.mixer == "attention" else ({n // 2, n - 1} if arch.encoder_attention
                                                                   else set())
        self.attention_layers = tuple(sorted(attn_at))
        self.layers = nn.ModuleList([
            SelfAttention(config.d_model, config.n_heads, causal=False, dropout=config.dropout, **factory)
            if i in attn_at else BiMambaBlock(config.d_model, **_mamba_kwargs(config), **factory)
            for i in range(n)
        ])
        self.norm = RMSNorm(config.d_model, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, d_model] embeddings -> [B, S, d_model]."""
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Decoder(nn.Module):
    """Causal stack over the decoder stream (``[encoder_out ; decoder embeddings]`` or the embeddings).

    Blocks by architecture: ``mamba2`` MambaBlock; ``polar`` PolarizedMemBlock; ``polar_pool`` and
    ``hybrid`` PolarizedMemBlock with a MemoryPool each, over one pool state written every
    ``mem_update_freq`` layers (layers 0, f, 2f, ...) and read by every layer; ``attention`` causal
    SelfAttention. GSA cross-attention to the encoder
    output follows the layers in ``cross_attn_layers`` when the architecture has it.
    """

    def __init__(self, config: Config, device=None, dtype=None) -> None:
        super().__init__()
        arch, d = config.arch, config.d_model
        factory = {"device": device, "dtype": dtype, "backend": config.backend}
        heads = {"n_heads": config.n_heads, "dropout": config.dropout}
        pool = {"pool_size": config.mem_pool_size if arch.memory_pool else 0,
                "summary_dim": config.mem_summary_dim}
        layers: list[nn.Module] = []
        for i in range(config.decoder_layers):
            if arch.mixer == "attention":
                layers.append(SelfAttention(d, causal=True, **heads, **factory))
            elif arch.polarized:
                layers.append(PolarizedMemBlock(d, **pool, writes=i % config.mem_update_freq == 0,
                                                **_mamba_kwargs(config), **factory))
            else:
                layers.append(MambaBlock(d, **_mamba_kwargs(config), **factory))
        self.layers = nn.ModuleList(layers)
        cross = config.cross_attn_layers if arch.cross_attention else ()
        self.cross_attn = nn.ModuleDict({
            str(i): GatedShortcutAttention(d, **heads, **factory) for i in cross
        })
        self.norm = RMSNorm(d, **factory)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] decoder stream, encoder_out [B, S, d_model] -> [B, T, d_model]."""
        x0, state = x, None
        for i, layer in enumerate(self.layers):
            if isinstance(layer, PolarizedMemBlock):
                x, state = layer(x, state)
            else:
                x = layer(x)
            if str(i) in self.cross_attn:
                x = self.cross_attn[str(i)](x, x0, encoder_out)
        return self.norm(x)


def _mamba_kwargs(config: Config) -> dict[str, int]:
    return {"d_state": config.d_state, "d_conv": config.d_conv, "expand": config.expand,
            "headdim": config.headdim, "chunk_size": config.chunk_size}


class HybridMambaEncoderDecoder(nn.Module):
    """Encoder-decoder for MQAR recall; the architecture is ``config.architecture``.

    ``forward(encoder_ids [B, S], decoder_ids [B, M]) -> logits [B, M, vocab_size]``; the logits at
    decoder position ``t`` depend on the whole encoder input and on ``decoder_ids[:, :t + 1]`` only.
    """

    def __init__(self, config: Config, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config: expected a polar_mem_mamba.Config, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(config.d_model))
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = Encoder(config, device=device, dtype=dtype)
        self.decoder = Decoder(config, device=device, dtype=dtype)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False, device=device, dtype=dtype)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> embeddings [B, L, d_model] (= ``self.embed(ids)``).

        Looked up with ``index_select``, whose backward is an ``index_add_``: ``nn.Embedding``'s CUDA
        backward sorts more than 3072 indices with a host synchronisation, which a CUDA graph cannot
        capture (pytorch/pytorch#82886).
        """
        return self.embed.weight.index_select(0, ids.reshape(-1)).view(*ids.shape, -1)

    def encode(self, encoder_ids: torch.Tensor) -> torch.Tensor:
        """encoder_ids [B, S] -> encoder_out [B, S, d_model]."""
        return self.encoder(self.dropout(self.embed_ids(encoder_ids)))

    def hidden_states(self, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        """Final decoder hidden states at the decoder positions, [B, M, d_model]."""
        self._check_ids(encoder_ids, "encoder_ids")
        self._check_ids(decoder_ids, "decoder_ids")
        if encoder_ids.shape[0] != decoder_ids.shape[0]:
            raise ValueError(f"decoder_ids: expected batch size {encoder_ids.shape[0]} (as encoder_ids), "
                             f"got {decoder_ids.shape[0]}")
        encoder_out = self.encode(encoder_ids)
        stream = self.dropout(self.embed_ids(decoder_ids)).to(encoder_out.dtype)
        if not self.config.arch.encoder_prefix:
            return self.decoder(stream, encoder_out)
        return self.decoder(torch.cat([encoder_out, stream], dim=1), encoder_out)[:, encoder_ids.shape[1]:]

    def forward(self, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        """encoder_ids [B, S], decoder_ids [B, M] -> logits [B, M, vocab_size]."""
        return self.head(self.hidden_states(encoder_ids, decoder_ids))

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.long, torch.int32):
            what = (f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                    else type(ids).__name__)
            raise ValueError(f"{name}: expected an integer tensor [batch, length], got {what}")
