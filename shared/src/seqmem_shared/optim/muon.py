"""Muon (momentum + Newton-Schulz orthogonalization) and ``MuonAdamW``, Muon and AdamW as one optimizer.

``Muon`` has the constructor, parameter-group keys, state keys (``momentum_buffer``) and update of
``torch.optim.Muon`` (torch >= 2.9), so state dicts move between the two. Per step, for a matrix ``W``
with gradient ``G`` and momentum buffer ``B``::

    B <- momentum * B + (1 - momentum) * G
    U <- (1 - momentum) * G + momentum * B   (nesterov)   or   U <- B
    O <- newton_schulz(U)                     # ~ U V^T of the SVD U S V^T, singular values in ~[0.68, 1.13]
    W <- W * (1 - lr * weight_decay) - lr * scale(W.shape) * O

with ``scale`` = ``max(1, rows / cols) ** 0.5`` ("original", KellerJordan), ``0.2 * max(rows, cols) ** 0.5``
("match_rms_adamw", Moonshot: the update RMS of AdamW, so Muon reuses AdamW's lr and weight decay) or
``(rows / cols) ** 0.5`` ("spectral_unclamped", Bernstein).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("seqmem")

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral_unclamped")
MUON_IMPLS = ("auto", "torch", "seqmem")


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    """``closure()`` with gradients enabled (an optimizer step runs under ``no_grad``), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def newton_schulz(
    grad: Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate orthogonalization of ``grad`` [..., m, n] by a quintic Newton-Schulz iteration.

    Normalizes by the Frobenius norm (so the spectral norm is <= 1), then applies
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` ``steps`` times, on the wide orientation (m <= n) so
    that ``A`` is the smaller Gram matrix. Runs in ``dtype`` (default: bfloat16 on CUDA, float32
    elsewhere) and returns ``grad.dtype``, same shape.
    """
    if grad.ndim < 2:
        raise ValueError(f"grad.ndim={grad.ndim}: expected a matrix [..., m, n]")
    if dtype is None:
        dtype = torch.bfloat16 if grad.is_cuda else torch.float32
    a, b, c = coefficients
    x = grad.to(dtype=dtype, copy=True)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # [batch, m, n]: baddbmm fuses the adds into the matmuls (as addmm)
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT
    return x.to(grad.dtype)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size | tuple[int, ...]) -> float:
    """Muon's per-matrix learning rate for a ``[rows, cols]`` parameter (see the module doc)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return lr * math.sqrt(rows / cols)
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: expected None or one of {ADJUST_LR_FNS}")


def _check_muon_args(lr: float, weight_decay: float, momentum: float, ns_steps: int,
                     adjust_lr_fn: str | None) -> None:
    if not lr >= 0:
        raise ValueError(f"lr={lr}: expected >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay}: expected >= 0")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum}: expected 0 <= momentum < 1")
    if not (isinstance(ns_steps, int) and ns_steps >= 1):
        raise ValueError(f"ns_steps={ns_steps!r}: expected an integer >= 1")
    if adjust_lr_fn not in (None, *ADJUST_LR_FNS):
        raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: expected None or one of {ADJUST_LR_FNS}")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; same constructor, group keys and state as ``torch.optim.Muon``.

    ``ns_dtype`` (not part of the state dict) is the Newton-Schulz compute dtype: default bfloat16 on
    CUDA and float32 elsewhere (``torch.optim.Muon`` always uses bfloat16).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        _check_muon_args(lr, weight_decay, momentum, ns_steps, adjust_lr_fn)
        self.ns_dtype = ns_dtype
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": tuple(ns_coefficients), "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in param_group["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon parameter of shape {list(p.shape)}: expected a 2-D matrix")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` when given."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, wd, mu = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                      self.ns_dtype)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups with ``use_muon=True`` and AdamW for the others, as one ``Optimizer``.

    Takes the groups of :func:`seqmem_shared.optim.param_groups` (every group needs ``use_muon``). It owns
    a Muon (``torch.optim.Muon`` when torch has it and ``muon_impl`` is "auto" or "torch", else
    :class:`Muon`; both have the same math) and a ``torch.optim.AdamW`` that share its ``param_groups``
    (the very same dicts, so LR schedulers and ``GradScaler`` see every group) and its ``state``, so that
    ``state_dict``/``load_state_dict``/``zero_grad`` are the plain ``torch.optim.Optimizer`` ones.
    Group defaults: Muon groups get ``lr``, ``momentum``, ``nesterov``, ``ns_steps``, ``adjust_lr_fn``;
    AdamW groups get ``adamw_lr`` (default ``lr``), ``betas``, ``eps``, ``fused``; both get ``weight_decay``.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        adamw_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        fused: bool | None = None,
        muon_impl: str = "auto",
    ) -> None:
        _check_muon_args(lr, weight_decay, momentum, ns_steps, adjust_lr_fn)
        if muon_impl not in MUON_IMPLS:
            raise ValueError(f"muon_impl={muon_impl!r}: expected one of {MUON_IMPLS}")
        if muon_impl == "torch" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"muon_impl='torch': torch {torch.__version__} has no torch.optim.Muon "
                             "(added in torch 2.9)")
        self._muon_kwargs = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                             "nesterov": nesterov, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        self._adamw_kwargs = {"lr": lr if adamw_lr is None else adamw_lr, "weight_decay": weight_decay,
                              "betas": betas, "eps": eps, "fused": fused}
        self._muon_impl = muon_impl
        self.muon: torch.optim.Optimizer | None = None
        self.adamw: torch.optim.Optimizer | None = None
        super().__init__(params, defaults={})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (it needs ``use_muon``) to the Muon or AdamW it belongs to, and to this optimizer."""
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError("MuonAdamW param group: expected a dict with 'params' and 'use_muon' "
                             "(build them with seqmem_shared.optim.param_groups)")
        use_muon = bool(param_group["use_muon"])
        child = self.muon if use_muon else self.adamw
        if child is not None:
            child.add_param_group(param_group)
        elif use_muon:
            self.muon = self._new_muon(param_group)
        else:
            self.adamw = torch.optim.AdamW([param_group], **self._adamw_kwargs)
        super().add_param_group(param_group)
        self._link()

    def _new_muon(self, param_group: dict[str, Any]) -> torch.optim.Optimizer:
        if self._muon_impl != "seqmem" and hasattr(torch.optim, "Muon"):
            try:
                return torch.optim.Muon([param_group], **self._muon_kwargs)
            except (TypeError, ValueError) as exc:  # an older torch.optim.Muon without this adjust_lr_fn
                if self._muon_impl == "torch":
                    raise
                log.info("seqmem: torch.optim.Muon rejected %s (%s); using seqmem_shared.optim.Muon",
                         self._muon_kwargs, exc)
        return Muon([param_group], **self._muon_kwargs)

    def _link(self) -> None:
        """Make the children use this optimizer's group dicts and state."""
        for child, flag in ((self.muon, True), (self.adamw, False)):
            if child is not None:
                child.param_groups = [g for g in self.param_groups if bool(g["use_muon"]) is flag]
                child.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [bool(g.get("use_muon")) for g in state_dict["param_groups"]]
        mine = [bool(g["use_muon"]) for g in self.param_groups]
        if saved != mine:
            raise ValueError(f"optimizer state dict has groups use_muon={saved}: expected {mine}")
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon step and one AdamW step; returns ``closure()`` (evaluated once) when given."""
        loss = _evaluate(closure)
        for child in (self.muon, self.adamw):
            if child is not None:
                child.step()
        return loss
