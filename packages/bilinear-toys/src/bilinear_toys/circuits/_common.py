"""Helpers shared by the circuit modules: model checks, lazy quimb, RoPE matrices per offset."""

from __future__ import annotations

from types import ModuleType

import torch

from bilinear_toys.models.rope import rope_matrix
from bilinear_toys.models.toy_transformer import ToyTransformer


def quimb_tensor() -> ModuleType:
    """``quimb.tensor``, imported on first use."""
    try:
        import quimb.tensor as qtn
    except ImportError as exc:  # pragma: no cover - quimb is a declared dependency
        raise ImportError(f"bilinear_toys.circuits needs quimb ({exc}); install quimb>=1.8") from None
    return qtn


def require_polynomial(model: ToyTransformer, what: str) -> None:
    """Circuits read the logits as a polynomial of the weights: no norms, no biases."""
    c = model.config
    if not c.is_polynomial or c.bias:
        raise ValueError(f"{what}: needs a polynomial model (norm=None, qk_norm=False, bias=False), got "
                         f"norm={c.norm!r}, qk_norm={c.qk_norm}, bias={c.bias}")


def check_layer(model: ToyTransformer, layer: int) -> None:
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(f"layer={layer}: expected 0 <= layer < n_layers={model.config.n_layers}")


def key_rotation(model: ToyTransformer, offsets: torch.Tensor | int | None,
                 like: torch.Tensor) -> torch.Tensor:
    """[..., dh, dh] ``R`` with ``rot_q_i . rot_k_j = q_i^T R k_j`` for key offsets ``i - j``.

    RoPE gives ``R = R(j - i)`` (the rotation by the negative offset); without RoPE, or for
    ``offsets=None`` (the *content-only* circuit), ``R`` is the identity.
    """
    dh = model.config.d_head
    if offsets is None or not model.config.use_rope:
        eye = torch.eye(dh, dtype=like.dtype, device=like.device)
        if offsets is None or isinstance(offsets, int):
            return eye
        return eye.expand(*torch.as_tensor(offsets).shape, dh, dh)
    off = torch.as_tensor(offsets, device=like.device)
    return rope_matrix(-off, dh, model.config.rope_base).to(like.dtype)
