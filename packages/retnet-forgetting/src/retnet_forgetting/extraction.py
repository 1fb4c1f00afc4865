"""``RetNetStateExtractor``: RetNet retention states at any positions in ONE forward pass.

The state of layer ``l`` "at position t" is ``S_t = sum_{i<=t} gamma_h^(t-i) k_i^T v_i`` per head, the
state after consuming token ``t`` (equal to the final state of ``input_ids[:, :t+1]``), shape
``[H, Dk, Dv]`` ([10, 256, 512] for retnet-2.7B). The extractor runs the model layer by layer itself
(no hooks, no prefix re-runs): per layer it computes the states entering every chunk of 64 tokens (fla's
``chunk_fwd_h`` on CUDA, the reference on CPU), then the exact state at each requested position from the
chunk-entry state plus an in-chunk correction of at most 64 rank-one terms. States accumulate in fp32.
Layers after the deepest requested one are skipped.

Works with this package's reference ``RetNetForCausalLM`` and with fla's (same module names).
TransformerLens-style names: ``blocks.{l}.attn.hook_state``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from retnet_forgetting.ops.retention import DEFAULT_CHUNK_SIZE, chunk_states, retention, states_at_positions
from retnet_forgetting.padding import check_inputs, check_positions, gather_rows, right_align_index
from retnet_forgetting.reference.layers import retention_output, retention_qkv

StateSink = Callable[..., None]
"""``sink(layer, positions [B, n], states [B, n, ...])`` receives streamed states."""


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_state"


class RetNetStateExtractor:
    """Extract per-layer retention states from a RetNet (reference or fla) in one chunked pass.

    Args:
        model: ``RetNetForCausalLM`` (``retnet_forgetting.reference`` or fla's).
        chunk_size: chunk length of the chunked form (64 as in fla).
        backend: ``"auto"`` (fla kernels and the Triton in-chunk correction for CUDA tensors), ``"torch"``,
            ``"fla"`` or ``"triton"`` (the Triton correction also on CPU under ``TRITON_INTERPRET=1``).
        state_dtype: dtype of returned states (accumulation is always fp32).
        position_block: requested positions processed at a time (bounds transient memory).
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                 state_dtype: torch.dtype = torch.float32, position_block: int = 64):
        self.model = model
        self.decoder = getattr(model, "model", model)
        layers = getattr(self.decoder, "layers", None)
        if layers is None or not all(hasattr(getattr(la, "attn", None), "q_proj") for la in layers):
            raise TypeError(f"model: expected a RetNet (model.layers[i].attn.q_proj ...), "
                            f"got {type(model).__name__}")
        self.layers = layers
        self.num_layers = len(layers)
        self.chunk_size, self.backend = chunk_size, backend
        self.state_dtype, self.position_block = state_dtype, position_block

    @property
    def hook_names(self) -> list[str]:
        return [hook_name(layer) for layer in range(self.num_layers)]

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def extract_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Final state per layer (after each row's last real token): ``{layer: [B, H, Dk, Dv]}``."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        last = _last_columns(input_ids, attention_mask)
        states = self.extract_states_at_positions(input_ids, last, attention_mask, layers)
        return {layer: s[:, 0] for layer, s in states.items()}

    @torch.inference_mode()
    def extract_states_at_positions(self, input_ids: torch.Tensor, positions: torch.Tensor | list[int],
                                    attention_mask: torch.Tensor | None = None,
                                    layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """States after the tokens at ``positions`` (``[K]`` shared or ``[B, K]`` per row, columns of
        ``input_ids``): ``{layer: [B, K, H, Dk, Dv]}``."""
        out: dict[int, list[torch.Tensor]] = {}
        self._run(input_ids, attention_mask, positions, layers,
                  lambda layer, _pos, s: out.setdefault(layer, []).append(s))
        return {layer: torch.cat(parts, dim=1) for layer, parts in out.items()}

    @torch.inference_mode()
    def extract_states_single_pass(self, input_ids: torch.Tensor,
                                   attention_mask: torch.Tensor | None = None,
                                   layers: Iterable[int] | None = None, sink: StateSink | None = None,
                                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                   ) -> dict[int, torch.Tensor] | None:
        """The state at EVERY position, in blocks of ``position_block`` positions.

        With ``sink``, each block goes to ``sink(layer, positions [B, n], states [B, n, ...])`` (after
        ``reduce`` if given) and nothing is kept (retnet-2.7B: 84 MB per position over its 32 layers in bf16);
        without, returns ``{layer: [B, T, ...]}``. With padding, only real positions are emitted (rows
        shorter than the batch repeat their last position so that blocks stay rectangular).
        """
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(T).expand(B, T)
        else:  # real columns of each row, in order; shorter rows repeat their last one
            index, lengths = right_align_index(attention_mask)
            rank = torch.minimum(torch.arange(T)[None], (lengths - 1)[:, None])
            positions = index.gather(1, rank)
        out: dict[int, list[torch.Tensor]] = {}

        def keep(layer: int, pos: torch.Tensor, states: torch.Tensor) -> None:
            states = reduce(states) if reduce is not None else states
            if sink is not None:
                sink(layer, pos, states)
            else:
                out.setdefault(layer, []).append(states)

        self._run(input_ids, attention_mask, positions, layers, keep)
        return None if sink is not None else {layer: torch.cat(p, dim=1) for layer, p in out.items()}

    @torch.inference_mode()
    def run_with_cache(self, input_ids: torch.Tensor, positions: torch.Tensor | list[int] | None = None,
                       attention_mask: torch.Tensor | None = None, layers: Iterable[int] | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits ``[B, T, V]``, ``{"blocks.{l}.attn.hook_state": states}``), TransformerLens style.

        Final states ``[B, H, Dk, Dv]`` when ``positions`` is None, else ``[B, K, H, Dk, Dv]``.
        """
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        final = positions is None
        if final:
            positions = _last_columns(input_ids, attention_mask)
        out: dict[int, list[torch.Tensor]] = {}
        logits = self._run(input_ids, attention_mask, positions, layers,
                           lambda layer, _p, s: out.setdefault(layer, []).append(s), logits=True)
        cache = {hook_name(layer): torch.cat(p, 1) for layer, p in out.items()}
        if final:
            cache = {name: s[:, 0] for name, s in cache.items()}
        return logits, cache

    @torch.inference_mode()
    def extract_readouts(self, input_ids: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, layers: Iterable[int] | None = None,
                         return_states: bool = False) -> Any:
        """Training-free readout ``r = kbar^T S_t``: the state at each of ``positions [B, K]`` queried with
        the mean of the model's own (rotated) keys at ``key_positions [B, J]`` (e.g. the name tokens of
        the query; ``-1`` entries are ignored): ``{layer: [B, K, H, Dv]}`` fp32, and the states
        ``{layer: [B, K, H, Dk, Dv]}`` of the same pass when ``return_states``."""
        out: dict[int, list[torch.Tensor]] = {}
        states_out: dict[int, list[torch.Tensor]] = {}

        def keep(layer: int, _pos: torch.Tensor, states: torch.Tensor, kbar: torch.Tensor) -> None:
            out.setdefault(layer, []).append(torch.einsum("bhk,bnhkv->bnhv", kbar, states.float()))
            if return_states:
                states_out.setdefault(layer, []).append(states)

        self._run(input_ids, attention_mask, positions, layers, keep, key_positions=key_positions)
        readouts = {layer: torch.cat(p, dim=1) for layer, p in out.items()}
        if return_states:
            return readouts, {layer: torch.cat(p, dim=1) for layer, p in states_out.items()}
        return readouts

    @torch.no_grad()
    def extract_states_incremental(self, input_ids: torch.Tensor, positions: Iterable[int] | None = None,
                                   layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """TEST ORACLE ONLY (O(N^2)): re-run the model on every prefix ``input_ids[:, :t+1]`` and take its
        final recurrent state: ``{layer: [B, K, H, Dk, Dv]}`` fp32. No padding support."""
        T = input_ids.shape[1]
        positions = list(range(T)) if positions is None else [int(p) for p in positions]
        layers = self._layers(layers)
        per_pos = [self._final_states_by_model(input_ids[:, : t + 1]) for t in positions]
        return {layer: torch.stack([s[layer].float() for s in per_pos], dim=1) for layer in layers}

    # ------------------------------------------------------------------ internals
    def _final_states_by_model(self, ids: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(ids, use_cache=True)
        states = getattr(out, "states", None)
        if states is not None:
            return states
        cache = out.past_key_values  # fla Cache: cache[l]["recurrent_state"]
        return [cache[layer]["recurrent_state"] for layer in range(self.num_layers)]

    def _layers(self, layers: Iterable[int] | None) -> list[int]:
        chosen = list(range(self.num_layers)) if layers is None else sorted({int(x) for x in layers})
        bad = [x for x in chosen if not 0 <= x < self.num_layers]
        if bad:
            raise ValueError(f"layers={bad}: expected indices in [0, {self.num_layers - 1}]")
        return chosen

    _inputs = staticmethod(check_inputs)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             positions: torch.Tensor | list[int], layers: Iterable[int] | None, emit: StateSink,
             logits: bool = False, key_positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """One layer-by-layer pass; ``emit(layer, positions, states)`` per block of positions (with the
        mean key at ``key_positions`` as a 4th argument when given)."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        layers = self._layers(layers)
        positions = check_positions(positions, B, T)
        given = positions
        if key_positions is not None:
            key_positions = torch.as_tensor(key_positions, dtype=torch.long).cpu()
        index = None
        if attention_mask is not None:
            if not bool(attention_mask.gather(1, positions).all()):
                raise ValueError("positions: some requested positions are padding (attention_mask == 0)")
            index, _ = right_align_index(attention_mask)
            columns = attention_mask.cumsum(1) - 1  # column of each real token after right-alignment
            positions = columns.gather(1, positions)
            if key_positions is not None:
                mapped = columns.gather(1, key_positions.clamp_min(0))
                key_positions = torch.where(key_positions >= 0, mapped, -1)
            input_ids = gather_rows(input_ids, index.to(input_ids.device))
        device = self._device()
        input_ids, positions = input_ids.to(device), positions.to(device)
        mix_backend = "auto" if self.backend == "triton" else self.backend  # "triton" names the correction
        x = self.decoder.embeddings(input_ids)
        last_layer = self.num_layers - 1 if logits else max(layers)
        for layer_idx in range(last_layer + 1):
            layer = self.layers[layer_idx]
            normed = layer.attn_norm(x)
            q, k, v = retention_qkv(layer.attn, normed)
            if layer_idx in layers:
                extra = () if key_positions is None else (_mean_key(k, key_positions.to(device)),)
                h = chunk_states(k, v, self.chunk_size, backend=mix_backend)
                for start in range(0, positions.shape[1], self.position_block):
                    sl = slice(start, start + self.position_block)
                    s = states_at_positions(k, v, positions[:, sl], h=h, chunk_size=self.chunk_size,
                                            backend=self.backend, out_dtype=self.state_dtype)
                    emit(layer_idx, given[:, sl], s, *extra)
                del h
            o, _ = retention(q, k, v, mode="chunk", backend=mix_backend)
            x = x + retention_output(layer.attn, o, normed)
            x = x + layer.mlp(layer.mlp_norm(x))
        if not logits:
            return None
        out = self.model.lm_head(self.decoder.norm(x))
        if index is not None:
            out = gather_rows(out, torch.argsort(index.to(out.device), dim=1))
        return out

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def _mean_key(k: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Mean of ``k [B, T, H, Dk]`` over ``key_positions [B, J]`` (``-1`` = none): ``[B, H, Dk]`` fp32."""
    valid = (key_positions >= 0).float()
    picked = k[torch.arange(k.shape[0], device=k.device)[:, None], key_positions.clamp_min(0)].float()
    return torch.einsum("bjhk,bj->bhk", picked, valid) / valid.sum(1).clamp_min(1)[:, None, None]


def _last_columns(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Column of each row's last real token: ``[B, 1]``."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B, 1), T - 1, dtype=torch.long)
    return (attention_mask * torch.arange(1, T + 1)).argmax(1, keepdim=True)
