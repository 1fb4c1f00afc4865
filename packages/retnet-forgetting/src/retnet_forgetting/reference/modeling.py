"""``RetNetModel`` and ``RetNetForCausalLM``: fla's RetNet in plain PyTorch, with fla's state-dict keys.

Keys: ``model.embeddings.weight``, ``model.layers.{l}.{attn_norm,mlp_norm}.weight``,
``model.layers.{l}.attn.{q,k,v,g,o}_proj.weight``, ``model.layers.{l}.attn.g_norm_swish_gate.weight``,
``model.layers.{l}.mlp.{gate,up,down}_proj.weight``, ``model.norm.weight``, ``lm_head.weight``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from seqmem_shared.kernels.rms_norm import RMSNorm
from torch import nn

from retnet_forgetting.padding import gather_rows, right_align_index, scatter_rows
from retnet_forgetting.reference.configuration import RetNetConfig
from retnet_forgetting.reference.layers import GatedMLP, MultiScaleRetention


@dataclass
class RetNetOutput:
    """``logits [B, T, V]``; ``loss`` (next-token CE) when labels were given; ``states``: final state of
    every layer ``[B, H, Dk, Dv]`` fp32 when ``use_cache``; ``hidden_states``: the input of every layer
    and the final normed output when asked."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    states: list[torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None


class RetNetBlock(nn.Module):
    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = MultiScaleRetention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_intermediate_size)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, seqlen_offset: int = 0, backend: str = "auto",
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        o, state = self.attn(self.attn_norm(x), initial_state, output_final_state, seqlen_offset, backend)
        x = x + o
        return x + self.mlp(self.mlp_norm(x)), state


class RetNetModel(nn.Module):
    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(RetNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                states: list[torch.Tensor] | None = None, use_cache: bool = False, seqlen_offset: int = 0,
                output_hidden_states: bool = False, backend: str = "auto") -> RetNetOutput:
        """``input_ids [B, T]`` -> last hidden state ``[B, T, D]`` (+ final states, hidden states).

        ``attention_mask [B, T]`` (1 = token, 0 = padding, on either side): each sequence is processed as
        if it stood alone; outputs at padding positions are meaningless. ``states`` continue earlier
        calls (then ``seqlen_offset`` must give the number of tokens already consumed).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
        index = None
        if attention_mask is not None and not bool(attention_mask.all()):
            if states is not None or use_cache:
                raise ValueError("attention_mask with padding: states/use_cache are not supported; use "
                                 "RetNetStateExtractor for the states of padded batches")
            index, _ = right_align_index(attention_mask.to(input_ids.device))
            input_ids = gather_rows(input_ids, index)
        x = self.embeddings(input_ids)
        hidden, finals = [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(x)
            x, s = layer(x, None if states is None else states[i], use_cache, seqlen_offset, backend)
            finals.append(s)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        if index is not None:
            x = scatter_rows(x, index)
            hidden = [scatter_rows(h, index) for h in hidden]
        return RetNetOutput(last_hidden_state=x, states=finals if use_cache else None,
                            hidden_states=tuple(hidden) if output_hidden_states else None)


class RetNetForCausalLM(nn.Module):
    """RetNet language model; ``state_dict()`` keys equal fla's ``RetNetForCausalLM``.

    ``retention_backend`` is the retention kernels' backend of :meth:`forward` calls that name none."""

    retention_backend = "auto"

    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.config = config
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def reset_parameters(self) -> None:
        """fla's initialization: normal(0, initializer_range) for linear and embedding weights, norms 1."""
        std = self.config.initializer_range
        if self.lm_head.weight.is_meta:  # shapes only (e.g. counting parameters): nothing to initialize
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif m is not self and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                nn.init.ones_(m.weight)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, states: list[torch.Tensor] | None = None,
                use_cache: bool = False, seqlen_offset: int = 0, output_hidden_states: bool = False,
                backend: str | None = None) -> RetNetOutput:
        """Logits ``[B, T, V]``; ``labels [B, T]`` (unshifted, -100 ignored) give the next-token loss."""
        out = self.model(input_ids, attention_mask, states, use_cache, seqlen_offset, output_hidden_states,
                         backend or self.retention_backend)
        out.logits = self.lm_head(out.last_hidden_state)
        if labels is not None:
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
            out.loss = F.cross_entropy(out.logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
        return out

    # -- checkpoints in Hugging Face layout (config.json + safetensors) --
    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> RetNetForCausalLM:
        """Load a local directory written by fla/transformers (``model.safetensors`` or sharded with an
        ``model.safetensors.index.json``)."""
        path = Path(path)
        config = RetNetConfig.from_pretrained(path)
        with torch.device("meta"), _skip_init():
            model = cls(config)
        state = load_safetensors_dir(path)
        if config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state.get("model.embeddings.weight"))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match RetNetForCausalLM: missing keys "
                             f"{missing[:5]}, unexpected keys {unexpected[:5]}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embeddings.weight
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        from seqmem_shared.io import atomic_write

        path = Path(path)
        self.config.save_pretrained(path)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        atomic_write(path / "model.safetensors",
                     lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        return path


@contextmanager
def _skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` fills no-ops while building a model whose weights get loaded anyway."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``path/model.safetensors`` or of the shards in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state
