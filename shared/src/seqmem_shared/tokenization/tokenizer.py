"""The ``Tokenizer`` interface and its three implementations.

Every tokenizer maps text to integer ids in ``[0, vocab_size)`` and back, and names its special ids
(``bos_id``, ``eos_id``, ``pad_id``, ``unk_id``; None where the vocabulary has none).

Conventions shared by all of them:

- ``encode`` never adds special tokens by itself; ask with ``bos=True`` / ``eos=True``.
- Special tokens written literally in the text (``"<|endoftext|>"``, ``"[END]"``, ...) are recognized,
  as Hugging Face tokenizers do; the byte tokenizer has no textual specials (every string is bytes).
- ``enc`` pads on the right with ``pad_id``, or ``eos_id`` when the vocabulary has no pad token
  (GPT-2, SimpleStories), or 0 when it has neither; the attention mask says which positions are real.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

PADDING_MODES = (True, False, "longest", "max_length")


def _id_list(ids: Any) -> list[int]:
    """A 1-D sequence of ids (list, tuple, tensor, ndarray, or a single int) as a list of ints."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim > 1:
            raise ValueError(f"ids: expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        return ids.reshape(-1).tolist()
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """Text <-> token ids, plus batched ``enc``/``dec`` to and from padded LongTensors."""

    def __init__(self, name: str, vocab_size: int, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None) -> None:
        self.name = name
        self.vocab_size = int(vocab_size)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self._registry_name: str | None = None  # set by get_tokenizer: unpickles through its cache

    # -- implemented by subclasses -------------------------------------------------------------
    @abstractmethod
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (already range-checked), special tokens rendered as text."""

    # -- single texts --------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; ``bos``/``eos`` prepend/append ``bos_id``/``eos_id``."""
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """``[encode(t, bos=bos, eos=eos) for t in texts]``, batched where the backend can."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        prefix, suffix = self._specials(bos, eos)
        return [prefix + ids + suffix for ids in self._encode_batch(texts)]

    def decode(self, ids: Any) -> str:
        """Text of a 1-D sequence of ids (list, tensor or ndarray); special tokens are kept as text."""
        ids = _id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: token id {bad[0]} is out of range [0, {self.vocab_size}) "
                             f"for {self.name!r}")
        return self._decode(ids)

    # -- batches -------------------------------------------------------------------------------
    @property
    def padding_id(self) -> int:
        """The id ``enc`` pads with: ``pad_id``, else ``eos_id``, else 0."""
        for i in (self.pad_id, self.eos_id):
            if i is not None:
                return i
        return 0

    def enc(self, texts: str | Sequence[str], max_length: int | None = None, padding: bool | str = True, *,
            bos: bool = False, eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch into ``(input_ids, attention_mask)``, both LongTensors of shape [B, T].

        A single string is a batch of one. Sequences longer than ``max_length`` are truncated at the
        end; the ``bos``/``eos`` tokens asked for are always kept. ``padding``: ``True``/``"longest"``
        pads on the right to the longest sequence, ``"max_length"`` to ``max_length``, ``False`` pads
        nothing (then every sequence must have the same length, else ValueError). Padding uses
        :attr:`padding_id`; ``attention_mask`` is 1 on real tokens and 0 on padding.
        """
        if padding not in PADDING_MODES:
            raise ValueError(f"padding={padding!r}: expected one of True, False, 'longest', 'max_length'")
        n_special = int(bos) + int(eos)
        if max_length is not None and max_length < n_special:
            raise ValueError(f"max_length={max_length}: must be >= {n_special} to hold the bos/eos tokens")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if isinstance(texts, str):
            texts = [texts]
        prefix, suffix = self._specials(bos, eos)
        seqs = self.encode_batch(texts)
        if max_length is not None:
            keep = max_length - len(prefix) - len(suffix)
            seqs = [s[:keep] for s in seqs]
        seqs = [prefix + s + suffix for s in seqs]
        lengths = [len(s) for s in seqs]
        if padding is False and len(set(lengths)) > 1:
            raise ValueError(f"padding=False but the sequences have different lengths "
                             f"{sorted(set(lengths))}; pass padding=True")
        width = max_length if padding == "max_length" else max(lengths, default=0)
        input_ids = torch.full((len(seqs), width), self.padding_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[row, : len(s)] = 1
        return input_ids, attention_mask

    def dec(self, ids: Any, attention_mask: Any = None) -> str | list[str]:
        """Decode ids of shape [T] (-> str) or [B, T] (-> list of B str), skipping padding.

        Padding is the positions where ``attention_mask`` is 0 when it is given, else the tokens equal
        to ``pad_id`` (when this vocabulary has one: without it, eos-padding cannot be told apart from a
        real eos, so pass the mask).
        """
        ids_t = torch.as_tensor(ids).long().cpu()
        if ids_t.dim() > 2:
            raise ValueError(f"ids: expected shape [T] or [B, T], got {tuple(ids_t.shape)}")
        if attention_mask is None:
            keep = ids_t != (self.pad_id if self.pad_id is not None else -1)
        else:
            keep = torch.as_tensor(attention_mask).cpu().bool()
            if keep.shape != ids_t.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(ids_t.shape)} like ids, "
                                 f"got {tuple(keep.shape)}")
        if ids_t.dim() < 2:
            return self.decode(ids_t.reshape(-1)[keep.reshape(-1)])
        return [self.decode(row[k]) for row, k in zip(ids_t, keep)]

    # -- helpers -------------------------------------------------------------------------------
    def _specials(self, bos: bool, eos: bool) -> tuple[list[int], list[int]]:
        for flag, role, value in ((bos, "bos", self.bos_id), (eos, "eos", self.eos_id)):
            if flag and value is None:
                raise ValueError(f"{role}=True but tokenizer {self.name!r} has no {role} token")
        return ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])

    def special_ids(self) -> dict[str, int | None]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self._registry_name is not None:  # rebuild through the cache (cheap in DataLoader workers)
            from seqmem_shared.tokenization.registry import get_tokenizer

            return get_tokenizer, (self._registry_name,)
        return super().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        specials = ", ".join(f"{k}={v}" for k, v in self.special_ids().items() if v is not None)
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, {specials})"


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (GPT-2 BPE, SimpleStories WordPiece, any tokenizer.json)."""

    def __init__(self, backend: Any, name: str, **special_ids: int | None) -> None:
        super().__init__(name, backend.get_vocab_size(with_added_tokens=True), **special_ids)
        self.backend = backend

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


class RestrictedVocabTokenizer(Tokenizer):
    """A base tokenizer whose ids are remapped onto a subset of its vocabulary; the rest map to unk.

    ``new_to_base[j]`` is the base id of new id ``j``; base ids absent from it encode to ``unk_id``.
    Decoding maps back to base ids and decodes with the base tokenizer. (TinyStories-10k: GPT-Neo
    BPE restricted to its 10,000 most frequent TinyStories tokens plus four specials.)
    """

    def __init__(self, base: Tokenizer, new_to_base: Sequence[int], name: str,
                 **special_ids: int | None) -> None:
        super().__init__(name, len(new_to_base), **special_ids)
        if self.unk_id is None:
            raise ValueError(f"{name}: a restricted vocabulary needs an unk_id for the ids it drops")
        self.base = base
        self.new_to_base = np.asarray(new_to_base, dtype=np.int64)
        self.base_to_new = np.full(base.vocab_size, self.unk_id, dtype=np.int64)
        self.base_to_new[self.new_to_base] = np.arange(len(self.new_to_base))

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.base_to_new[np.asarray(ids, dtype=np.int64)].tolist()
                for ids in self.base._encode_batch(texts)]

    def _decode(self, ids: list[int]) -> str:
        return self.base._decode(self.new_to_base[np.asarray(ids, dtype=np.int64)].tolist())


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then BOS=256, EOS=257, PAD=258 (vocab_size 259).

    Decoding replaces invalid UTF-8 with U+FFFD and renders the specials as ``<|bos|>``, ``<|eos|>``,
    ``<|pad|>``; encoding never produces them from text.
    """

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")

    def __init__(self, name: str = "bytes") -> None:
        super().__init__(name, 256 + len(self.SPECIALS), bos_id=256, eos_id=257, pad_id=258)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(self.SPECIALS[i - 256])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)
