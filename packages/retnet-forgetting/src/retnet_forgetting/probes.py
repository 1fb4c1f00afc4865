"""Linear probes from states to the fact's value, for many groups (layers x heads) at once.

Features are ``X [G, N, F]``: G probe groups (e.g. every (layer, head), or every layer with its heads
concatenated), N examples, F features; labels ``y [N]`` in ``0..C-1``. Everything is batched over G, so
all layers x heads train in one call (on the GPU when X lives there).

- :func:`fit_ridge`: closed-form ridge regression onto one-hot labels (eigendecomposition once, every
  ``lambda`` for free), ``lambda`` picked per group on a validation split; primal or dual form by size.
- :func:`fit_logistic`: multinomial logistic regression, full batch, Adam, L2, early stopping per group
  on validation accuracy.
- :func:`nearest_centroid`: the training-free decision rule used for the model's own readout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LinearProbe:
    """``scores = ((X - mean) / std) @ W + b``; ``W [G, F, C]``, ``b [G, C]``, ``lam``/``val_acc`` ``[G]``."""

    W: torch.Tensor
    b: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    val_acc: torch.Tensor
    lam: torch.Tensor | None = None

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        Xs = (X.to(self.W) - self.mean) / self.std
        return torch.einsum("gnf,gfc->gnc", Xs, self.W) + self.b[:, None]

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """``[G, N]`` predicted labels."""
        return self.scores(X).argmax(-1)


def _standardize(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = X.mean(1, keepdim=True)
    std = X.std(1, keepdim=True).clamp_min(1e-6)
    return mean, std


def _check(X: torch.Tensor, y: torch.Tensor) -> None:
    if X.dim() != 3 or y.dim() != 1 or X.shape[1] != y.shape[0]:
        raise ValueError(f"X {tuple(X.shape)}, y {tuple(y.shape)}: expected X [G, N, F] and y [N]")


def fit_ridge(X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor,
              num_classes: int, lambdas: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4),
              ) -> LinearProbe:
    """Ridge onto centered one-hot targets, for every group; best ``lambda`` per group on validation."""
    _check(X, y)
    X = X.double()
    mean, std = _standardize(X)
    Xs = (X - mean) / std
    Y = torch.nn.functional.one_hot(y.to(X.device), num_classes).double()
    prior = Y.mean(0)
    Y = Y - prior
    G, N, F = Xs.shape
    lam = torch.tensor(lambdas, dtype=torch.float64, device=X.device)
    if F <= N:  # primal: eig of X^T X [F, F]
        e, V = torch.linalg.eigh(Xs.transpose(1, 2) @ Xs)
        proj = V.transpose(1, 2) @ (Xs.transpose(1, 2) @ Y)  # [G, F, C]
        Ws = torch.einsum("gfj,lgj,gjc->lgfc", V, 1.0 / (e[None] + lam[:, None, None] * N), proj)
    else:  # dual: eig of X X^T [N, N]
        e, U = torch.linalg.eigh(Xs @ Xs.transpose(1, 2))
        proj = U.transpose(1, 2) @ Y  # [G, N, C]
        alpha = torch.einsum("gnj,lgj,gjc->lgnc", U, 1.0 / (e[None] + lam[:, None, None] * N), proj)
        Ws = torch.einsum("gnf,lgnc->lgfc", Xs, alpha)
    Xv = (X_val.to(X) - mean) / std
    pred = torch.einsum("gnf,lgfc->lgnc", Xv, Ws).argmax(-1)
    acc = (pred == y_val.to(X.device)).double().mean(-1)  # [lambdas, G]
    best = acc.argmax(0)
    W = Ws[best, torch.arange(G)]
    b = prior.expand(G, -1)
    return LinearProbe(W.float(), b.float(), mean.float(), std.float(), acc.max(0).values.float(),
                       lam[best].float())


def fit_logistic(X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor,
                 num_classes: int, weight_decay: float = 1e-3, lr: float = 1e-2, max_steps: int = 500,
                 patience: int = 50, sync: Callable[[bool], bool] | None = None) -> LinearProbe:
    """Multinomial logistic regression for every group at once, keeping each group's best-validation
    weights (early stopping when no group improved for ``patience`` steps). ``sync`` maps this process's
    "some group improved" flag to the verdict of all processes sharing the groups (e.g.
    :func:`retnet_forgetting.distributed.any_rank`), so that they stop together, as one process would."""
    _check(X, y)
    X = X.float()
    mean, std = _standardize(X)
    Xs, Xv = (X - mean) / std, (X_val.to(X) - mean) / std
    y, y_val = y.to(X.device), y_val.to(X.device)
    G, _, F = Xs.shape
    W = torch.zeros(G, F, num_classes, device=X.device, requires_grad=True)
    b = torch.zeros(G, num_classes, device=X.device, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    best_acc = torch.full((G,), -1.0, device=X.device)
    best_W, best_b = W.detach().clone(), b.detach().clone()
    since = 0
    for _ in range(max_steps):
        with torch.enable_grad():
            logits = torch.einsum("gnf,gfc->gnc", Xs, W) + b[:, None]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(G), reduction="sum")
            loss = loss / len(y)
            loss = loss + weight_decay * W.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = ((torch.einsum("gnf,gfc->gnc", Xv, W) + b[:, None]).argmax(-1) == y_val).float().mean(-1)
            better = acc > best_acc
            best_acc = torch.where(better, acc, best_acc)
            best_W[better], best_b[better] = W[better], b[better]
            improved = bool(better.any())
            since = 0 if (sync(improved) if sync is not None else improved) else since + 1
        if since >= patience:
            break
    return LinearProbe(best_W, best_b, mean, std, best_acc)


def nearest_centroid(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """Cosine nearest class mean, per group: ``train [G, N, F]``, ``test [G, M, F]`` -> labels ``[G, M]``."""
    train, test = train.float(), test.float()
    one_hot = torch.nn.functional.one_hot(y.to(train.device), num_classes).float()
    centroids = torch.einsum("gnf,nc->gcf", train, one_hot) / one_hot.sum(0).clamp_min(1)[None, :, None]
    centroids = centroids - centroids.mean(1, keepdim=True)
    unit = torch.nn.functional.normalize
    test = unit(test - train.mean(1, keepdim=True), dim=-1)
    sims = torch.einsum("gmf,gcf->gmc", test, unit(centroids, dim=-1))
    return sims.argmax(-1)
