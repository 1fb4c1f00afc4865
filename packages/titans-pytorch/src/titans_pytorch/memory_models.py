"""Memory networks ``M``: the weights that the neural memory trains at test time.

Each model maps [..., n, dim] -> [..., n, dim], holds only parameters (no buffers), and keeps the public
titans-pytorch parameter names (``weights.0``, ``norm.gamma``, ...) so checkpoints line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter, ParameterList


def _xavier(*shape: int) -> Parameter:
    return Parameter(nn.init.xavier_uniform_(torch.empty(*shape)))


class LayerNorm(nn.Module):
    """LayerNorm without affine terms, scaled by ``gamma + 1`` (gamma starts at 0).

    ``gamma`` may carry a leading batch axis ([b, dim]) when called functionally with per-sample weights.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.gamma
        if gamma.ndim == 2:
            gamma = gamma.unsqueeze(-2)
        return F.layer_norm(x, x.shape[-1:]) * (gamma + 1.0)


class ResidualNorm(nn.Module):
    """``x + LayerNorm(model(x))``: the TTT output wrapper around a memory model."""

    def __init__(self, dim: int, model: nn.Module):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.model(x)) + x


class MemoryMLP(nn.Module):
    """``depth`` bias-free matrices with GELU between them; hidden width ``dim * expansion_factor``."""

    def __init__(self, dim: int, depth: int, expansion_factor: float = 2.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MemoryMLP: depth must be >= 1, got {depth}")
        hidden = int(dim * expansion_factor)
        dims = (dim, *(hidden,) * (depth - 1), dim)
        self.weights = ParameterList([_xavier(i, o) for i, o in zip(dims[:-1], dims[1:])])

    def forward(self, x: Tensor) -> Tensor:
        for i, w in enumerate(self.weights):
            x = (F.gelu(x) if i else x) @ w
        return x


class GatedResidualMemoryMLP(nn.Module):
    """``depth`` GELU MLP blocks, each mixed into the residual by a sigmoid gate, then a projection."""

    def __init__(self, dim: int, depth: int, expansion_factor: float = 4.0):
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.weights = ParameterList(
            [
                ParameterList([_xavier(dim, hidden), _xavier(hidden, dim), _xavier(2 * dim, dim)])
                for _ in range(depth)
            ]
        )
        self.final_proj = _xavier(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        for w1, w2, to_gates in self.weights:
            branch = F.gelu(x @ w1) @ w2
            gates = torch.cat((branch, x), dim=-1) @ to_gates
            x = torch.lerp(x, branch, gates.sigmoid())
        return x @ self.final_proj


class FactorizedMemoryMLP(nn.Module):
    """MemoryMLP whose square matrices are factored through rank ``k`` (fewer memory parameters)."""

    def __init__(self, dim: int, depth: int, k: int = 32):
        super().__init__()
        self.weights = ParameterList(
            [ParameterList([_xavier(dim, k), _xavier(k, dim)]) for _ in range(depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, (w1, w2) in enumerate(self.weights):
            x = (F.gelu(x) if i else x) @ w1 @ w2
        return x


class MemorySwiGluMLP(nn.Module):
    """``depth`` residual gated-GELU feedforwards followed by a LayerNorm."""

    def __init__(self, dim: int, depth: int = 1, expansion_factor: float = 4.0):
        super().__init__()
        inner = int(dim * expansion_factor * 2 / 3)
        self.weights = ParameterList(
            [ParameterList([_xavier(dim, inner * 2), _xavier(inner, dim)]) for _ in range(depth)]
        )
        self.norm = LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for w1, w2 in self.weights:
            h, gates = (x @ w1).chunk(2, dim=-1)
            x = x + (h * F.gelu(gates)) @ w2
        return self.norm(x)


class MemoryAttention(nn.Module):
    """Causal attention (l2-normed q/k, fixed ``scale``) in parallel with a GELU feedforward."""

    def __init__(self, dim: int, scale: float = 8.0, expansion_factor: float = 2.0):
        super().__init__()
        self.scale = scale
        hidden = int(dim * expansion_factor)
        self.weights = ParameterList(
            [
                _xavier(dim, dim),
                _xavier(dim, dim),
                _xavier(dim, dim),
                _xavier(dim, hidden),
                _xavier(hidden, dim),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        wq, wk, wv, w1, w2 = self.weights
        q, k = F.normalize(x @ wq, dim=-1), F.normalize(x @ wk, dim=-1)
        attn = F.scaled_dot_product_attention(q, k, x @ wv, scale=self.scale, is_causal=True)
        return attn + F.gelu(x @ w1) @ w2
