"""``RetNetStateExtractor``: RetNet retention states at any positions in ONE forward pass.

The state of layer ``l`` "at position t" is ``S_t = sum_{i<=t} gamma_h^(t-i) k_i^T v_i`` per head, the
state after consuming token ``t`` (equal to the final state of ``input_ids[:, :t+1]``), shape
``[H, Dk, Dv]`` ([10, 256, 512] for retnet-2.7B). The extractor runs the model layer by layer itself
(no hooks, no prefix re-runs): per layer it computes the states entering every chunk of 64 tokens ONCE
(fla's ``chunk_fwd_h`` on CUDA, the reference on CPU) and uses them both for the layer's output (fla's
``chunk_fwd_o``) and for the exact state at each requested position (chunk-entry state plus an in-chunk
correction of at most 64 rank-one terms, one Triton kernel per layer writing the result tensor directly).
Positions are checked once on the host; the layer loop never waits for the device. States accumulate in
fp32; the chunk-entry states are kept in fp32 when ``state_dtype`` is fp32, else in the model's dtype
(as fla's own forward keeps them). The deepest requested layer's output and everything after it are
skipped unless logits are asked for.

The public API (``extract_states``, ``extract_states_at_positions``, ``extract_states_single_pass``,
``run_with_cache``, ``extract_states_incremental``) is :class:`~retnet_forgetting.extractors.base.
StateExtractor`'s; this class adds ``extract_readouts``. Works with this package's reference
``RetNetForCausalLM`` and with fla's (same module names). TransformerLens-style names:
``blocks.{l}.attn.hook_state``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from retnet_forgetting.extractors.base import LayerFn, Pass, StateExtractor, StateInputs, join_blocks
from retnet_forgetting.ops.retention import (
    DEFAULT_CHUNK_SIZE,
    STATE_BACKENDS,
    check_backend,
    chunk_output,
    chunk_states,
    states_at_positions,
)
from retnet_forgetting.ops.retention.positions import MAX_GROUP, position_groups
from retnet_forgetting.reference.layers import retention_output, retention_qkv


class RetNetStateExtractor(StateExtractor):
    """Extract per-layer retention states from a RetNet (reference or fla) in one chunked pass.

    Args:
        model: ``RetNetForCausalLM`` (``retnet_forgetting.reference`` or fla's).
        chunk_size: chunk length of the chunked form (64 as in fla).
        backend: ``"auto"`` (fla kernels and the Triton in-chunk correction for CUDA tensors), ``"torch"``,
            ``"fla"`` or ``"triton"`` (the Triton correction also on CPU under ``TRITON_INTERPRET=1``).
        state_dtype: dtype of returned states (accumulation is always fp32).
        position_block: positions per block when streaming every position, and per call of the PyTorch
            correction (bounds transient memory); the Triton path computes all requested positions of a
            layer in one call.
        precision: the Triton correction's dot (``"auto"``: IEEE fp32 for fp32 models, tensor cores in the
            model's dtype otherwise; ``"fast"``; ``"ieee"``).
        max_group: requested positions of one chunk handled by one program of the Triton correction (it
            loads the chunk's keys, values and entry state once for all of them).
    """

    family = "RetNet"
    hook_module = "attn"

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                 state_dtype: torch.dtype = torch.float32, position_block: int = 64, precision: str = "auto",
                 max_group: int = MAX_GROUP):
        check_backend(backend, STATE_BACKENDS)
        super().__init__(model, chunk_size, state_dtype, position_block)
        self.decoder = getattr(model, "model", model)
        self.layers = self.decoder.layers
        self.backend, self.precision, self.max_group = backend, precision, max_group

    @classmethod
    def find_mixers(cls, model: nn.Module) -> list[nn.Module]:
        layers = getattr(getattr(model, "model", model), "layers", None)
        if layers is None or not all(hasattr(getattr(la, "attn", None), "q_proj") for la in layers):
            raise TypeError(f"model: expected a RetNet (model.layers[i].attn.q_proj ...), "
                            f"got {type(model).__name__}")
        return [la.attn for la in layers]

    # ------------------------------------------------------------------ RetNet kernels
    @property
    def _mix_backend(self) -> str:
        return "auto" if self.backend == "triton" else self.backend  # "triton" names the correction only

    def chunk_states(self, inputs: StateInputs) -> torch.Tensor:
        fp32 = self.state_dtype.itemsize >= 4 or inputs.k.dtype == torch.float32
        return chunk_states(inputs.k, inputs.v, self.chunk_size, backend=self._mix_backend, fp32_states=fp32)

    def states_at(self, inputs: StateInputs, scanned: torch.Tensor, p: Pass, sl: slice) -> torch.Tensor:
        groups = p.memo.get(sl.start)
        if groups is None and p.positions.is_cuda and self.backend != "torch":  # once per pass and block
            groups = p.memo[sl.start] = position_groups(p.host_positions[:, sl], self.chunk_size,
                                                        self.max_group, p.positions.device)
        return states_at_positions(inputs.k, inputs.v, p.positions[:, sl], h=scanned,
                                   chunk_size=self.chunk_size, backend=self.backend,
                                   out_dtype=self.state_dtype, precision=self.precision, checked=True,
                                   groups=groups)

    def _block(self, num_positions: int, stream: bool) -> int:
        direct = not stream and self.backend != "torch" and self._device().type == "cuda"
        return num_positions if direct else self.position_block  # Triton: one call writes the result

    def _forward(self, p: Pass, at_layer: LayerFn, logits: bool) -> torch.Tensor | None:
        """Layer by layer: each requested layer's chunk-entry states serve its output too."""
        x = self.decoder.embeddings(p.ids)
        requested = set(p.layers)
        last = self.num_layers - 1 if logits else max(p.layers)
        for i in range(last + 1):
            block = self.layers[i]
            normed = block.attn_norm(x)
            q, k, v = retention_qkv(block.attn, normed)
            h = at_layer(i, StateInputs(k=k, v=v, log_a=None, q=q)) if i in requested else None
            if i == last and not logits:
                break
            if h is None:
                h = chunk_states(k, v, self.chunk_size, backend=self._mix_backend, fp32_states=False)
            o = chunk_output(q, k, v, h, chunk_size=self.chunk_size, backend=self._mix_backend)
            del h
            x = x + retention_output(block.attn, o, normed)
            x = x + block.mlp(block.mlp_norm(x))
        if not logits:
            return None
        return self.model.lm_head(self.decoder.norm(x))

    # ------------------------------------------------------------------ RetNet-only API
    @torch.inference_mode()
    def extract_readouts(self, input_ids: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, layers: Iterable[int] | None = None,
                         return_states: bool = False) -> Any:
        """Training-free readout ``r = kbar^T S_t``: the state at each of ``positions [B, K]`` queried with
        the mean of the model's own (rotated) keys at ``key_positions [B, J]`` (e.g. the name tokens of
        the query; ``-1`` entries are ignored): ``{layer: [B, K, H, Dv]}`` fp32, and the states
        ``{layer: [B, K, H, Dk, Dv]}`` of the same pass when ``return_states``."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        keys = torch.as_tensor(key_positions, dtype=torch.long).cpu()
        if attention_mask is not None:  # the columns of the key tokens after right-alignment
            mapped = (attention_mask.cumsum(1) - 1).gather(1, keys.clamp_min(0))
            keys = torch.where(keys >= 0, mapped, -1)
        keys = keys.to(self._device())
        out: dict[int, list[torch.Tensor]] = {}
        states_out: dict[int, list[torch.Tensor]] = {}
        kbars: dict[int, torch.Tensor] = {}

        def keep(layer: int, _pos: torch.Tensor, states: torch.Tensor, inputs: StateInputs) -> None:
            if layer not in kbars:
                kbars[layer] = _mean_key(inputs.k, keys)
            out.setdefault(layer, []).append(torch.einsum("bhk,bnhkv->bnhv", kbars[layer], states.float()))
            if return_states:
                states_out.setdefault(layer, []).append(states)

        self._run(input_ids, attention_mask, positions, layers, keep)
        return (join_blocks(out), join_blocks(states_out)) if return_states else join_blocks(out)


def _mean_key(k: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Mean of ``k [B, T, H, Dk]`` over ``key_positions [B, J]`` (``-1`` = none): ``[B, H, Dk]`` fp32."""
    valid = (key_positions >= 0).float()
    picked = k[torch.arange(k.shape[0], device=k.device)[:, None], key_positions.clamp_min(0)].float()
    return torch.einsum("bjhk,bj->bhk", picked, valid) / valid.sum(1).clamp_min(1)[:, None, None]
