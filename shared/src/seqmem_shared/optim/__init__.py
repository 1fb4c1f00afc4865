"""Optimizers for seqmem: Muon + AdamW with standard parameter routing, warmup-cosine, gradient clipping.

- :func:`param_groups` / :func:`classify_parameters`: which parameters go to Muon, AdamW, AdamW without
  weight decay (see :mod:`seqmem_shared.optim.groups`).
- :func:`build_optimizer`: ``"adamw"`` or ``"muon"`` (:class:`MuonAdamW`, one ``torch.optim.Optimizer``).
- :class:`Muon`, :func:`newton_schulz`: our Muon, the fallback for torch < 2.9 (``torch.optim.Muon``'s math).
- :func:`cosine_with_warmup`, :func:`clip_grad_norm`.
"""

from seqmem_shared.optim.build import OPTIMIZER_NAMES, build_optimizer
from seqmem_shared.optim.clip import clip_grad_norm
from seqmem_shared.optim.groups import classify_parameters, param_groups
from seqmem_shared.optim.muon import Muon, MuonAdamW, newton_schulz
from seqmem_shared.optim.schedule import cosine_with_warmup, warmup_cosine_factor

__all__ = [
    "OPTIMIZER_NAMES",
    "Muon",
    "MuonAdamW",
    "build_optimizer",
    "classify_parameters",
    "clip_grad_norm",
    "cosine_with_warmup",
    "newton_schulz",
    "param_groups",
    "warmup_cosine_factor",
]
