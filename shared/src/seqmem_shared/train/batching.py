"""``Batches``: turn an iterable of examples into a resumable ``next_batch`` source for the Trainer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch.utils.data import default_collate

log = logging.getLogger("seqmem")


class Batches:
    """Stack ``batch_size`` consecutive examples of ``examples`` per ``next_batch`` call.

    ``examples`` is re-iterated when it runs out (a new epoch). When it has ``state_dict()`` /
    ``load_state_dict()`` (e.g. ``StreamingTextDataset``), that state is the resume position and is
    exact, since no example is read ahead; otherwise the position is the count of examples consumed and
    resume re-reads and skips them. ``collate`` defaults to ``torch.utils.data.default_collate`` (dicts
    of tensors -> dict of stacked ``[batch_size, ...]`` tensors). Under DDP each rank needs its own
    shard of the examples (e.g. a dataset built with the rank).
    """

    def __init__(self, examples: Iterable[Any], batch_size: int,
                 collate: Callable[[list[Any]], Any] | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Batches.batch_size: expected a positive integer, got {batch_size!r}")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate or default_collate
        self.stateful = callable(getattr(examples, "state_dict", None)) and callable(
            getattr(examples, "load_state_dict", None))
        self.consumed = 0
        self._skip = 0
        self._it: Any = None

    def _next_example(self) -> Any:
        if self._it is None:
            self._it = iter(self.examples)
        try:
            return next(self._it)
        except StopIteration:
            if self._it is self.examples:
                raise RuntimeError("Batches: the examples iterator ran out; pass a re-iterable dataset"
                                   ) from None
        self._it = iter(self.examples)
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError("Batches: the examples iterable is empty") from None

    def next_batch(self, index: int | None = None) -> Any:
        """The next ``batch_size`` examples, collated (``index`` is ignored: the stream is sequential)."""
        while self._skip:
            self._next_example()
            self._skip -= 1
        items = [self._next_example() for _ in range(self.batch_size)]
        self.consumed += len(items)
        return self.collate(items)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"consumed": self.consumed}
        if self.stateful:
            state["examples"] = self.examples.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self._it = None
        if self.stateful and state.get("examples") is not None:
            self.examples.load_state_dict(state["examples"])
            self._skip = 0
        else:
            log.warning("seqmem: Batches: examples have no state_dict(); resuming by skipping %d examples",
                        self.consumed)
            self._skip = self.consumed
