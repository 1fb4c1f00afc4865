"""CUDA graphs for host-bound work: a whole training step, and a NeuralMemory read's forward + backward.

At the issue's sizes (dim 384, 2k tokens) the MAC step launches about 9,000 small kernels (31 ms of GPU
time on an H100) behind 300-400 ms of Python and dispatcher work. A CUDA graph records the kernels once and
replays them: the same kernels on the same data, with the host cost paid once. CPU tensors run the plain
eager code, which is also the reference the graphs are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def default_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """``model(batch, return_loss=True)`` (next-token loss of the MAC/MAG/MAL/LMM models)."""
    return model(batch, return_loss=True)


class TrainStep:
    """``step(batch) -> loss`` (detached, fp32 scalar tensor): one optimisation step on ``batch``.

    Eager order: zero grads, forward under autocast (``autocast_dtype``; None disables it), backward,
    ``clip_grad_norm_(max_grad_norm)`` when given, ``optimizer.step()``. With ``cuda_graph`` (default:
    True for CUDA batches) the first ``warmup`` calls run eagerly on a side stream (allocator, cuBLAS,
    compiled kernels settle), the next call captures the step into a CUDA graph and every later call copies
    its batch into the captured input and replays: one real step per call throughout. Graph mode needs a
    fixed batch shape, a model without host synchronisation in forward/backward and an optimizer created
    with ``capturable=True`` (set here if it has not stepped yet); float learning rates become device
    tensors so that LR schedulers still apply.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[nn.Module, Tensor], Tensor] = default_loss,
        max_grad_norm: float | None = None,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        cuda_graph: bool | None = None,
        warmup: int = 3,
    ):
        if warmup < 1:
            raise ValueError(f"TrainStep: warmup must be >= 1, got {warmup}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.max_grad_norm, self.autocast_dtype = max_grad_norm, autocast_dtype
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self.calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_batch: Tensor | None = None
        self._static_loss: Tensor | None = None

    @property
    def graphed(self) -> bool:
        """Whether the step has been captured (later calls replay the graph)."""
        return self._graph is not None

    def _eager(self, batch: Tensor, cache_casts: bool = True) -> Tensor:
        with torch.autocast(
            batch.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
            cache_enabled=cache_casts,
        ):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return loss.detach().float()

    def _make_capturable(self, device: torch.device) -> None:
        for group in self.optimizer.param_groups:
            if "capturable" not in group:
                raise ValueError(
                    f"TrainStep: cuda_graph needs an optimizer with a 'capturable' option, "
                    f"got {type(self.optimizer).__name__}"
                )
            if not group["capturable"]:
                if self.optimizer.state:
                    raise ValueError(
                        "TrainStep: cuda_graph needs the optimizer built with capturable=True "
                        "(it has already stepped without it)"
                    )
                group["capturable"] = True
            if isinstance(group["lr"], float):
                group["lr"] = torch.tensor(group["lr"], device=device)

    def __call__(self, batch: Tensor) -> Tensor:
        use_graph = self.cuda_graph if self.cuda_graph is not None else batch.is_cuda
        if use_graph and not batch.is_cuda:
            raise ValueError("TrainStep: cuda_graph=True needs CUDA batches")
        self.calls += 1
        if not use_graph:
            self.optimizer.zero_grad(set_to_none=True)
            return self._eager(batch)
        if self._graph is not None:
            if batch.shape != self._static_batch.shape or batch.dtype != self._static_batch.dtype:
                raise ValueError(
                    f"TrainStep: the graph was captured for batches {tuple(self._static_batch.shape)} "
                    f"{self._static_batch.dtype}, got {tuple(batch.shape)} {batch.dtype}"
                )
            self._static_batch.copy_(batch)
            self._graph.replay()
            return self._static_loss.clone()
        if self.calls == 1:
            self._make_capturable(batch.device)
        side = torch.cuda.Stream(device=batch.device)
        side.wait_stream(torch.cuda.current_stream(batch.device))
        if self.calls <= self.warmup:
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._eager(batch, cache_casts=False)
            torch.cuda.current_stream(batch.device).wait_stream(side)
            return loss
        self._static_batch = batch.clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_loss = self._eager(self._static_batch, cache_casts=False)
        self._graph = graph
        graph.replay()
        return self._static_loss.clone()


class _Read(nn.Module):
    """``seq -> memory(seq)[0]`` as a module (the graphed callable; the state is dropped)."""

    def __init__(self, memory: nn.Module):
        super().__init__()
        self.memory = memory

    def forward(self, seq: Tensor) -> Tensor:
        return self.memory(seq)[0]


def graphed_memory(memory: nn.Module, sample: Tensor, warmup: int = 3) -> Callable[[Tensor], Tensor]:
    """``seq [b, n, d] -> retrieved [b, n, d]`` of a fresh state, forward and backward CUDA-graphed.

    Built with ``torch.cuda.make_graphed_callables`` for inputs shaped like ``sample`` (same shape, dtype
    and ``requires_grad``); gradients reach the memory's parameters as usual. Under autocast, build and call
    it inside ``torch.autocast(..., cache_enabled=False)`` with the same dtype. For a CPU ``sample`` the
    eager call is returned.
    """
    read = _Read(memory)
    if not sample.is_cuda:
        return read
    return torch.cuda.make_graphed_callables(
        read, (sample,), num_warmup_iters=warmup, allow_unused_input=True
    )
