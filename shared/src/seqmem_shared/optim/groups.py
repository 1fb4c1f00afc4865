"""Routing parameters between Muon and AdamW, and between decay and no-decay.

Every trainable parameter lands in exactly one of three categories (a tied parameter once, by identity):

- ``"muon"``: hidden 2-D matrices: ``nn.Linear`` weights inside the network (attention, MLP,
  ``in_proj``/``out_proj``/``x_proj``, ...) and any other 2-D parameter not excluded below.
- ``"adamw"`` (AdamW with weight decay): embeddings (``nn.Embedding``/``nn.EmbeddingBag`` weights, anything
  shared with them, and parameters whose dotted name has an ``embed``/``wte``/``wpe``/``W_E``/``W_pos``
  component), output heads (an ``nn.Linear`` named ``lm_head``/``unembed``/``output``/``head``/``W_U``, or
  one outside the numbered block stacks whose ``out_features`` equals an embedding's ``num_embeddings``;
  a raw parameter named ``W_U``) and tensors with more than two dimensions (conv kernels such as a
  depthwise ``Conv1d`` weight ``[C, 1, K]``).
- ``"adamw_no_decay"`` (AdamW without weight decay): 0-D/1-D parameters, biases (``bias``, ``*_bias``),
  parameters of normalization modules (class name containing ``Norm``), the SSM parameters ``A_log``,
  ``dt_bias`` and ``D`` (whatever their rank), and tensors flagged ``_no_weight_decay = True`` (the
  mamba_ssm convention).

Frozen parameters (``requires_grad=False``) are left out. ``muon_filter(name, param)`` overrides the rule:
True sends the parameter to Muon, False to AdamW (decay decided by the rule above), None keeps the rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

MuonFilter = Callable[[str, nn.Parameter], "bool | None"]

CATEGORIES = ("muon", "adamw", "adamw_no_decay")
SSM_PARAM_NAMES = frozenset({"A_log", "dt_bias", "D"})
HEAD_NAMES = frozenset({"lm_head", "unembed", "output", "head", "W_U"})
EMBED_NAMES = frozenset({"wte", "wpe", "W_E", "W_pos"})
_NUMBERED = re.compile(r"^\d+$")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _is_embed_name(name: str) -> bool:
    return any("embed" in part.lower() or part in EMBED_NAMES for part in name.split("."))


def _has_index(path: str) -> bool:
    return any(_NUMBERED.match(part) for part in path.split("."))


def classify_parameters(model: nn.Module, muon_filter: MuonFilter | None = None) -> dict[str, list[Any]]:
    """``{category: [(name, param), ...]}`` over the trainable parameters of ``model`` (see module doc).

    Parameters keep the order of ``model.named_parameters()``; a parameter reached under several names
    (tied weights) is classified once, looking at every module that owns it.
    """
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}  # id -> [(module path, leaf name, module)]
    for path, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((path, leaf, module))
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, _EMBEDDINGS)}

    out: dict[str, list[Any]] = {c: [] for c in CATEGORIES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        refs = owners[id(p)]
        leaves = {leaf for _, leaf, _ in refs}
        no_decay = (
            p.ndim < 2
            or bool(leaves & SSM_PARAM_NAMES)
            or any(leaf == "bias" or leaf.endswith("_bias") for leaf in leaves)
            or any("norm" in type(m).__name__.lower() for _, _, m in refs)
            or bool(getattr(p, "_no_weight_decay", False))
        )
        embedding = any(isinstance(m, _EMBEDDINGS) for _, _, m in refs) or any(
            _is_embed_name(f"{path}.{leaf}" if path else leaf) for path, leaf, _ in refs)
        head = bool(leaves & HEAD_NAMES) or any(
            isinstance(m, nn.Linear) and (path.rsplit(".", 1)[-1] in HEAD_NAMES
                                          or (m.out_features in vocab_sizes and not _has_index(path)))
            for path, _, m in refs)
        default_muon = p.ndim == 2 and not (no_decay or embedding or head)

        choice = muon_filter(name, p) if muon_filter is not None else None
        if choice is None:
            use_muon = default_muon
        elif choice and p.ndim != 2:
            raise ValueError(f"muon_filter sent {name!r} (shape {list(p.shape)}) to Muon: "
                             "expected a 2-D parameter")
        else:
            use_muon = bool(choice)
        category = "muon" if use_muon else ("adamw_no_decay" if no_decay else "adamw")
        out[category].append((name, p))
    return out


def param_groups(
    model: nn.Module,
    muon_lr: float | None = None,
    adamw_lr: float | None = None,
    weight_decay: float = 0.0,
    muon_filter: MuonFilter | None = None,
) -> list[dict[str, Any]]:
    """Param-group dicts for Muon + AdamW, each with ``params`` and ``use_muon`` (KellerJordan's convention).

    Returns up to three groups, in this order and without empty ones: Muon (``use_muon=True``,
    ``weight_decay``), AdamW with ``weight_decay`` and AdamW with ``weight_decay=0.0`` (see the module doc
    for who goes where). ``lr`` is set on the Muon/AdamW groups only when ``muon_lr``/``adamw_lr`` is given,
    so that the optimizer's own default applies otherwise.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: expected >= 0")
    cats = classify_parameters(model, muon_filter)
    groups = []
    for category, use_muon, wd, lr in (("muon", True, weight_decay, muon_lr),
                                       ("adamw", False, weight_decay, adamw_lr),
                                       ("adamw_no_decay", False, 0.0, adamw_lr)):
        if cats[category]:
            group: dict[str, Any] = {"params": [p for _, p in cats[category]], "use_muon": use_muon,
                                     "weight_decay": wd}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    return groups
