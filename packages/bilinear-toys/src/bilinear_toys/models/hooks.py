"""TransformerLens-style hook points (no TransformerLens dependency).

A :class:`HookPoint` is an identity module; :class:`HookedModule` collects every hook point under its
dotted module name and offers ``run_with_cache`` and temporary forward hooks by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

Hook = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity; hooks added with :meth:`HookedModule.hooks` see (and may replace) the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HookedModule(nn.Module):
    """Base class of modules with hook points; call :meth:`setup_hooks` at the end of ``__init__``."""

    def setup_hooks(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Hook]]) -> Iterator[None]:
        """Add forward hooks ``(name or name filter, fn(activation, hook))`` for the ``with`` block."""
        handles = []
        try:
            for selector, fn in fwd_hooks:
                names = [n for n in self.hook_dict if (selector(n) if callable(selector) else n == selector)]
                if not names:
                    raise KeyError(f"hook {selector!r}: no such hook point; expected one of "
                                   f"{', '.join(self.hook_dict)}")
                for n in names:
                    hp = self.hook_dict[n]
                    handles.append(hp.register_forward_hook(lambda m, inp, out, fn=fn: fn(out, m)))
            yield
        finally:
            for h in handles:
                h.remove()

    def run_with_cache(self, tokens: torch.Tensor, names_filter: Callable[[str], bool] | None = None,
                       **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, cache)``: cache maps hook names to (detached) activations of this forward."""
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach()

        selector = names_filter if names_filter is not None else (lambda n: True)
        with self.hooks([(selector, save)]):
            logits = self(tokens, **kwargs)
        return logits, cache
