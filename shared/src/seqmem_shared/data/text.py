"""Streaming text for language modelling: documents -> token blocks, resumable mid-stream.

:class:`StreamingTextDataset` reads documents from a Hugging Face dataset (streamed) or local files,
keeps those of its split and its shard, tokenizes them on the fly, joins them with EOS separators and
cuts the token stream into blocks of exactly ``block_size`` tokens::

    doc 1 tokens, EOS, doc 2 tokens, EOS, ...  ->  [block 0][block 1][block 2]...[last, padded]

Each item is ``{"input_ids": LongTensor [block_size], "attention_mask": LongTensor [block_size]}``;
every block is full (mask all ones) except possibly the last of a pass, which is padded with the
tokenizer's padding id and mask 0, or dropped with ``drop_last=True``. Blocks do not overlap; a model
predicting the next token inside a block (labels = input_ids shifted by one) sees every token.

Sources
    A Hugging Face dataset id (``"roneneldan/TinyStories"``: a string that is no existing path, has no
    file suffix and looks like ``name`` or ``owner/name``; ``"hf:<id>"`` forces it), read with
    ``datasets.load_dataset(id, hf_config, split=hf_split, streaming=True)`` (needs the ``hf`` extra);
    or local files, directories (searched recursively) and globs, or a list of them, of these types:

    - ``.txt`` / ``.txt.gz``: ``txt_mode="paragraph"`` (default) makes one document of each run of
      non-blank lines (documents are separated by blank lines; one big file still splits into many
      documents), ``"line"`` one per non-blank line, ``"file"`` one per file;
    - ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document in ``text_field``;
    - ``.parquet``: the string column ``text_field`` (read in batches with pyarrow).

    Files are read in sorted order, as UTF-8 (invalid bytes replaced). Empty documents are skipped.

Split
    A document belongs to ``"val"`` when ``blake2b(text) / 2**64 < val_fraction``, else to ``"train"``
    (``"all"`` keeps both). The split is a pure function of the text: the same for every seed, order,
    shard count and source, and train and val never share a document (duplicates land together).

Sharding
    Document ``i`` of the source stream (counting every document, before the split) belongs to shard
    ``i % (world_size * num_workers)``; rank ``r``'s DataLoader worker ``w`` reads shard
    ``r * num_workers + w``. Ranks and workers therefore see disjoint documents. ``rank``/``world_size``
    default to ``torch.distributed`` when it is initialized. (Every shard reads, but does not tokenize,
    the whole stream.)

Shuffling
    ``shuffle_buffer=n`` keeps ``n`` full blocks and emits a uniformly chosen one as each new block
    arrives (draws are a hash of ``seed``, pass, shard and draw number); 0 keeps the stream order.

Resuming
    ``state_dict()`` describes the position after the last block yielded (documents consumed, tokens
    carried over, the shuffle buffer); after ``load_state_dict(state)`` the next ``iter()`` yields exactly
    the blocks the interrupted pass would have yielded next. Every other ``iter()`` starts a new pass
    (pass number = ``epoch``, which salts the shuffle). The state is tracked in the process that iterates:
    iterate in-process (``num_workers=0``, or :meth:`StreamingTextDataset.batches`), or use a loader that
    saves per-worker dataset states (``torchdata``'s ``StatefulDataLoader``).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from seqmem_shared.io import jsonl_records
from seqmem_shared.tokenization import Tokenizer, get_tokenizer

STATE_VERSION = 1
SPLITS = ("train", "val", "all")
TXT_MODES = ("paragraph", "line", "file")
_KINDS = {".txt": "txt", ".txt.gz": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
_GLOB_CHARS = set("*?[")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((k for suffix, k in _KINDS.items() if name.endswith(suffix)), None)


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def resolve_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The local text files named by ``source`` (files, directories, globs), sorted within each item."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        if _GLOB_CHARS & set(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not found:
                raise FileNotFoundError(f"source {text!r}: the glob matches no file")
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise FileNotFoundError(f"source {text!r}: the directory holds no {'/'.join(_KINDS)} file")
        elif Path(text).is_file():
            found = [Path(text)]
        else:
            raise FileNotFoundError(f"source {text!r}: no such file or directory")
        for p in found:
            if _kind(p) is None:
                raise ValueError(f"source {str(p)!r}: unsupported file type; expected {', '.join(_KINDS)}")
            if p not in files:
                files.append(p)
    return files


def _is_hf_name(source: Any) -> bool:
    if not isinstance(source, str):
        return False
    if source.startswith("hf:"):
        return True
    looks_local = (_GLOB_CHARS & set(source) or _kind(Path(source)) is not None or source.count("/") > 1
                   or source.startswith(("/", ".", "~")) or os.path.exists(source))
    return not looks_local  # hub ids are "name" or "owner/name"


def in_val_split(text: str, val_fraction: float) -> bool:
    """Whether the document ``text`` belongs to the validation split (a hash of the text only)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"seqmem.split")
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2.0**64


def _draw(seed: int, epoch: int, shard: int, draw: int, n: int) -> int:
    """A uniform index in [0, n) from a hash of its coordinates (stateless, so resumable)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{shard}:{draw}".encode(), digest_size=8, person=b"seqmem.shuf")
    return int.from_bytes(digest.digest(), "little") % n


@dataclass
class _Pass:
    """The live position of one pass over the stream (what ``state_dict`` saves)."""

    epoch: int
    shard: tuple[int, int]
    docs: int = 0  # documents of the source stream consumed (read, and tokenized when ours)
    carry: list[int] = field(default_factory=list)  # tokens read but not yet yielded are carry[pos:]
    pos: int = 0
    buffer: list[torch.Tensor] = field(default_factory=list)  # shuffle buffer of full blocks
    draws: int = 0
    done: bool = False


class StreamingTextDataset(IterableDataset):
    """Blocks of ``block_size`` tokens from a stream of documents (see the module docstring).

    Args:
        source: a Hugging Face dataset name, or local file(s)/directory(ies)/glob(s).
        tokenizer: a :class:`~seqmem_shared.tokenization.Tokenizer` or a name for ``get_tokenizer``;
            it must have an eos token (the document separator).
        block_size: tokens per block.
        split: ``"train"``, ``"val"`` or ``"all"``; ``val_fraction``: share of documents in val.
        seed: seeds the shuffle buffer (the split does not depend on it).
        text_field: the document field of jsonl/parquet rows and Hugging Face examples.
        txt_mode: how ``.txt`` files split into documents: ``"paragraph"``, ``"line"`` or ``"file"``.
        hf_split, hf_config: the Hugging Face split and configuration to stream.
        rank, world_size: this process's shard of the documents (default: from ``torch.distributed``).
        shuffle_buffer: blocks held for shuffling (0: stream order).
        drop_last: drop the final partial block of a pass instead of padding it.
        add_bos: also put the bos token before every document.
        encode_batch_size: documents tokenized together (the tokenizer batches them in Rust).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer | str,
                 block_size: int, split: str = "train", val_fraction: float = 0.01, seed: int = 0, *,
                 text_field: str = "text", txt_mode: str = "paragraph", hf_split: str = "train",
                 hf_config: str | None = None, rank: int | None = None, world_size: int | None = None,
                 shuffle_buffer: int = 0, drop_last: bool = False, add_bos: bool = False,
                 encode_batch_size: int = 64) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction={val_fraction}: expected a fraction in [0, 1]")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: expected a positive number of tokens")
        if txt_mode not in TXT_MODES:
            raise ValueError(f"txt_mode={txt_mode!r}: expected one of {', '.join(TXT_MODES)}")
        if shuffle_buffer < 0 or encode_batch_size < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer}, encode_batch_size={encode_batch_size}: "
                             "expected shuffle_buffer >= 0 and encode_batch_size >= 1")
        if (rank is None) != (world_size is None):
            raise ValueError("rank and world_size: give both or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
        self.tokenizer = get_tokenizer(tokenizer)
        if self.tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {self.tokenizer.name!r}: has no eos token to separate documents")
        if add_bos and self.tokenizer.bos_id is None:
            raise ValueError(f"add_bos=True but tokenizer {self.tokenizer.name!r} has no bos token")
        hf = _is_hf_name(source)
        self.hf_name = str(source).removeprefix("hf:") if hf else None
        self.files: list[Path] | None = None if hf else resolve_files(source)
        self.block_size = block_size
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.text_field, self.txt_mode = text_field, txt_mode
        self.hf_split, self.hf_config = hf_split, hf_config
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.drop_last, self.add_bos = shuffle_buffer, drop_last, add_bos
        self.encode_batch_size = encode_batch_size
        self._live: _Pass | None = None
        self._pending: dict[str, Any] | None = None
        self._next_epoch = 0

    # -- documents -----------------------------------------------------------------------------
    def documents(self) -> Iterator[str]:
        """Every document of the source, in a fixed order, before split and sharding."""
        if self.files is None:
            yield from self._hf_documents()
            return
        for path in self.files:
            kind = _kind(path)
            if kind == "txt":
                yield from self._txt_documents(path)
            elif kind == "jsonl":
                yield from self._jsonl_documents(path)
            else:
                yield from self._parquet_documents(path)

    def _txt_documents(self, path: Path) -> Iterator[str]:
        with _open_text(path) as f:
            if self.txt_mode == "file":
                yield f.read()
                return
            lines: list[str] = []
            for line in f:
                line = line.rstrip("\n")
                if self.txt_mode == "line":
                    if line.strip():
                        yield line
                elif line.strip():
                    lines.append(line)
                elif lines:
                    yield "\n".join(lines)
                    lines = []
            if lines:
                yield "\n".join(lines)

    def _jsonl_documents(self, path: Path) -> Iterator[str]:
        with _open_text(path) as f:
            for lineno, row in jsonl_records(f, path):
                text = row.get(self.text_field) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                                     f"text_field={self.text_field!r}")
                yield text

    def _parquet_documents(self, path: Path) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"{path}: reading parquet needs pyarrow "
                              "(pip install 'seqmem-shared[hf]')") from exc
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise ValueError(f"{path}: no column text_field={self.text_field!r}; columns: {names}")
        for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"{path}: column {self.text_field!r} holds {type(text).__name__}, "
                                     "expected strings")
                yield text or ""

    def _hf_documents(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"source {self.hf_name!r}: streaming a Hugging Face dataset needs the datasets "
                              "library (pip install 'seqmem-shared[hf]')") from exc
        stream = datasets.load_dataset(self.hf_name, self.hf_config, split=self.hf_split, streaming=True)
        for example in stream:
            if self.text_field not in example:
                raise ValueError(f"source {self.hf_name!r}: examples have no field "
                                 f"text_field={self.text_field!r}; fields: {sorted(example)}")
            yield example[self.text_field] or ""

    def _wanted(self, text: str) -> bool:
        if not text.strip():
            return False
        return self.split == "all" or in_val_split(text, self.val_fraction) == (self.split == "val")

    # -- sharding and state ----------------------------------------------------------------------
    def shard(self) -> tuple[int, int]:
        """(index, count) of the shard that iterating here reads (rank x DataLoader worker)."""
        rank, world = self.rank, self.world_size
        if world is None:
            dist = torch.distributed
            initialized = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _config(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "split": self.split, "val_fraction": self.val_fraction,
                "seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "drop_last": self.drop_last,
                "add_bos": self.add_bos}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last block yielded (tensors and plain Python values only)."""
        if self._pending is not None:
            return self._pending
        p = self._live or _Pass(epoch=self._next_epoch, shard=self.shard())
        buffer = (torch.stack(p.buffer) if p.buffer
                  else torch.empty((0, self.block_size), dtype=torch.long))
        return {"version": STATE_VERSION, "config": self._config(), "epoch": p.epoch, "shard": list(p.shard),
                "docs": p.docs, "carry": torch.tensor(p.carry[p.pos:], dtype=torch.long), "buffer": buffer,
                "draws": p.draws, "done": p.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next ``iter()``; settings that change the stream must match."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"state: expected a StreamingTextDataset state dict of version {STATE_VERSION}")
        for key, value in self._config().items():
            if state["config"].get(key) != value:
                raise ValueError(f"state: {key}={state['config'].get(key)!r} in the saved state but "
                                 f"{value!r} in this dataset")
        self._pending = state

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard = self.shard()
        state, self._pending = self._pending, None
        if state is None or state["done"]:
            epoch = self._next_epoch if state is None else state["epoch"] + 1
            p = _Pass(epoch=epoch, shard=shard)
        else:
            if tuple(state["shard"]) != shard:
                raise ValueError(f"state: saved for shard {tuple(state['shard'])} (index, count), but this "
                                 f"process reads shard {shard}; resume with the same ranks and workers")
            p = _Pass(epoch=state["epoch"], shard=shard, docs=state["docs"], carry=state["carry"].tolist(),
                      buffer=list(state["buffer"].long().unbind(0)), draws=state["draws"])
        self._live, self._next_epoch = p, p.epoch + 1
        return self._blocks(p)

    # -- blocks --------------------------------------------------------------------------------
    def _block(self, tokens: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.full((self.block_size,), self.tokenizer.padding_id, dtype=torch.long)
        ids[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask = torch.zeros(self.block_size, dtype=torch.long)
        mask[: len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _chunks(self, p: _Pass) -> Iterator[list[str]]:
        """Lists of up to ``encode_batch_size`` documents of this split and shard, advancing ``p.docs``."""
        index, count = p.shard
        chunk: list[str] = []
        read = p.docs
        for i, text in enumerate(itertools.islice(self.documents(), p.docs, None), start=p.docs):
            read = i + 1
            if i % count == index and self._wanted(text):
                chunk.append(text)
                if len(chunk) == self.encode_batch_size:
                    p.docs = read
                    yield chunk
                    chunk = []
        p.docs = read
        if chunk:
            yield chunk

    def _blocks(self, p: _Pass) -> Iterator[dict[str, torch.Tensor]]:
        bs, bos, eos = self.block_size, self.tokenizer.bos_id, self.tokenizer.eos_id
        prefix = [bos] if self.add_bos else []
        chunks = self._chunks(p)
        while True:
            # Emit every full block in the carry (on resume, the carry saved mid-document comes first).
            while len(p.carry) - p.pos >= bs:
                block = p.carry[p.pos : p.pos + bs]
                p.pos += bs
                if not self.shuffle_buffer:
                    yield self._block(block)
                    continue
                p.buffer.append(torch.tensor(block, dtype=torch.long))
                if len(p.buffer) >= self.shuffle_buffer:
                    yield self._pop_random(p)
            del p.carry[: p.pos]
            p.pos = 0
            chunk = next(chunks, None)
            if chunk is None:
                break
            for ids in self.tokenizer.encode_batch(chunk):
                p.carry.extend(prefix + ids + [eos])
        while p.buffer:
            yield self._pop_random(p)
        tail, p.carry = p.carry, []
        if tail and not self.drop_last:
            yield self._block(tail)
        p.done = True

    def _pop_random(self, p: _Pass) -> dict[str, torch.Tensor]:
        j = _draw(self.seed, p.epoch, p.shard[0], p.draws, len(p.buffer))
        p.buffer[j], p.buffer[-1] = p.buffer[-1], p.buffer[j]
        block = p.buffer.pop()
        p.draws += 1
        return {"input_ids": block, "attention_mask": torch.ones(self.block_size, dtype=torch.long)}

    # -- batching ------------------------------------------------------------------------------
    def batches(self, batch_size: int, drop_last: bool = False) -> BlockBatches:
        """A re-iterable, resumable loader of [batch_size, block_size] batches (see :class:`BlockBatches`)."""
        return BlockBatches(self, batch_size, drop_last=drop_last)


class BlockBatches:
    """Batches ``{"input_ids", "attention_mask"}: LongTensor [B, block_size]`` of a dataset, in-process.

    ``state_dict``/``load_state_dict`` are the dataset's: saved after a batch, they resume at the next
    batch exactly. Each ``iter()`` is a pass (the last batch may be smaller unless ``drop_last``), so it
    can be handed to ``seqmem_shared.train.Trainer`` as ``train_data`` directly.
    """

    def __init__(self, dataset: StreamingTextDataset, batch_size: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive number of blocks")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        items: list[dict[str, torch.Tensor]] = []
        for item in self.dataset:
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items)
                items = []
        if items and not self.drop_last:
            yield self._collate(items)

    @staticmethod
    def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
