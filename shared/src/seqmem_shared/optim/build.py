"""``build_optimizer``: AdamW or Muon + AdamW over a model, with the standard parameter routing."""

from __future__ import annotations

import torch
from torch import nn

from seqmem_shared.optim.groups import MuonFilter, classify_parameters, param_groups
from seqmem_shared.optim.muon import NS_STEPS, MuonAdamW

OPTIMIZER_NAMES = ("muon", "adamw")


def build_optimizer(
    model: nn.Module,
    name: str = "muon",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.95,
    nesterov: bool = True,
    adamw_lr: float | None = None,
    fused: bool | None = None,
    *,
    eps: float = 1e-8,
    adjust_lr_fn: str | None = "match_rms_adamw",
    ns_steps: int = NS_STEPS,
    muon_filter: MuonFilter | None = None,
    muon_impl: str = "auto",
) -> torch.optim.Optimizer:
    """The optimizer for ``model``'s trainable parameters.

    ``"adamw"``: ``torch.optim.AdamW`` with two groups, ``weight_decay`` on matrices, embeddings, heads and
    conv kernels and 0 on biases, norms, SSM ``A_log``/``dt_bias``/``D`` and other 0-D/1-D parameters.
    ``"muon"``: :class:`MuonAdamW`: Muon (``lr``) on the hidden matrices and AdamW (``adamw_lr``, default
    ``lr``) on the rest, routed by :func:`param_groups`. The default ``adjust_lr_fn="match_rms_adamw"``
    scales Muon updates to AdamW's RMS, so one ``lr``/``weight_decay`` serves both and switching ``name``
    needs no retuning; ``adjust_lr_fn="original"`` is KellerJordan's ``max(1, rows/cols) ** 0.5`` scaling,
    which wants a much larger Muon lr (~0.02) and an explicit ``adamw_lr``.
    ``fused=None`` fuses AdamW when every parameter is on CUDA.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"name={name!r}: expected one of {OPTIMIZER_NAMES}")
    if not lr > 0:
        raise ValueError(f"lr={lr}: expected > 0")
    if adamw_lr is not None and not adamw_lr > 0:
        raise ValueError(f"adamw_lr={adamw_lr}: expected > 0 or None")
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ValueError(f"betas={betas}: expected two values in [0, 1)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for p in params)

    if name == "adamw":
        cats = classify_parameters(model, muon_filter)
        decay = [p for c in ("muon", "adamw") for _, p in cats[c]]
        no_decay = [p for _, p in cats["adamw_no_decay"]]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=lr if adamw_lr is None else adamw_lr, betas=betas, eps=eps,
                                 weight_decay=weight_decay, fused=fused)
    return MuonAdamW(param_groups(model, weight_decay=weight_decay, muon_filter=muon_filter), lr=lr,
                     weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                     adjust_lr_fn=adjust_lr_fn, adamw_lr=adamw_lr, betas=betas, eps=eps, fused=fused,
                     muon_impl=muon_impl)
