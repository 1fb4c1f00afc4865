"""Tests of seqmem_shared.data.text.StreamingTextDataset: sources, split, packing, resume, sharding."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from seqmem_shared.data.text import StreamingTextDataset, in_val_split
from seqmem_shared.tokenization import get_tokenizer
from torch.utils.data import DataLoader

BYTES = get_tokenizer("bytes")
EOS = BYTES.eos_id


def make_docs(n: int = 120) -> list[str]:
    """Distinct documents of varied length (1 to ~60 bytes), no blank lines inside."""
    return [f"doc {i}: " + "ab c" * (i % 13) + "\nline two" * (i % 3) for i in range(n)]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=17)
    return path


def stream(blocks: list[dict[str, torch.Tensor]]) -> list[int]:
    """The real tokens of a list of blocks, in order."""
    return [t for b in blocks for t in b["input_ids"][b["attention_mask"].bool()].tolist()]


def docs_of(blocks: list[dict[str, torch.Tensor]]) -> list[str]:
    """The documents packed into byte-tokenized blocks (split at the eos separators)."""
    out, cur = [], []
    for t in stream(blocks):
        if t == EOS:
            out.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t)
    assert not cur, "the stream must end with an eos"
    return out


def same_blocks(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
        for x, y in zip(a, b))


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", make_docs())


# -- sources ---------------------------------------------------------------------------------------

def test_txt_jsonl_parquet_give_the_same_blocks(tmp_path: Path) -> None:
    docs = make_docs()
    sources = [write_txt(tmp_path / "a.txt", docs), write_jsonl(tmp_path / "b.jsonl", docs),
               write_parquet(tmp_path / "c.parquet", docs)]
    results = [list(StreamingTextDataset(s, "bytes", 32, split="all")) for s in sources]
    assert docs_of(results[0]) == docs
    assert same_blocks(results[0], results[1]) and same_blocks(results[0], results[2])


def test_txt_modes_and_directories(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_txt(tmp_path / "sub" / "b.txt", ["b1\nb1 second line", "b2"])
    write_txt(tmp_path / "a.txt", ["a1", "a2"])
    (tmp_path / "notes.md").write_text("ignored: not a text source suffix")
    ds = lambda mode: StreamingTextDataset(tmp_path, "bytes", 8, split="all", txt_mode=mode)  # noqa: E731
    assert list(ds("paragraph").documents()) == ["a1", "a2", "b1\nb1 second line", "b2"]
    assert list(ds("line").documents()) == ["a1", "a2", "b1", "b1 second line", "b2"]
    assert list(ds("file").documents()) == ["a1\n\na2\n", "b1\nb1 second line\n\nb2\n"]
    glob_ds = StreamingTextDataset(str(tmp_path / "**" / "*.txt"), "bytes", 8, split="all")
    assert glob_ds.files == ds("paragraph").files


def test_bad_sources_and_fields(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        StreamingTextDataset(tmp_path / "missing.jsonl", "bytes", 8)
    with pytest.raises(FileNotFoundError, match="no such file"):
        StreamingTextDataset("data/not/here", "bytes", 8)  # too many slashes for a hub id
    with pytest.raises(FileNotFoundError, match="matches no file"):
        StreamingTextDataset(str(tmp_path / "*.txt"), "bytes", 8)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        StreamingTextDataset(tmp_path / "x.csv", "bytes", 8)
    path = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="body")
    with pytest.raises(ValueError, match=r"d.jsonl:1: .*text_field='text'"):
        list(StreamingTextDataset(path, "bytes", 8))
    assert docs_of(list(StreamingTextDataset(path, "bytes", 8, split="all", text_field="body"))) == ["a", "b"]
    pq_path = write_parquet(tmp_path / "d.parquet", ["a"], field="body")
    with pytest.raises(ValueError, match="no column text_field='text'"):
        list(StreamingTextDataset(pq_path, "bytes", 8))
    with pytest.raises(ValueError, match="split="):
        StreamingTextDataset(path, "bytes", 8, split="test")
    with pytest.raises(ValueError, match="val_fraction="):
        StreamingTextDataset(path, "bytes", 8, val_fraction=1.5)


def test_hugging_face_source_streams_through_datasets(monkeypatch) -> None:
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"story": d} for d in make_docs(20)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = StreamingTextDataset("someone/stories", "bytes", 16, split="all", text_field="story",
                              hf_config="en", hf_split="validation")
    assert ds.files is None
    assert docs_of(list(ds)) == make_docs(20)
    assert calls == [("someone/stories", "en", "validation", True)]


# -- packing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_blocks_pack_documents_with_eos_and_pad_only_the_last(jsonl: Path, tokenizer: str) -> None:
    tok = get_tokenizer(tokenizer)
    docs = make_docs()
    blocks = list(StreamingTextDataset(jsonl, tok, 16, split="all", encode_batch_size=7))
    expected = [t for d in docs for t in tok.encode(d, eos=True)]
    assert stream(blocks) == expected
    assert all(b["input_ids"].shape == b["attention_mask"].shape == (16,) for b in blocks)
    assert all(b["attention_mask"].all() for b in blocks[:-1])
    n_last = len(expected) % 16
    assert len(blocks) == -(-len(expected) // 16)
    if n_last:
        assert blocks[-1]["attention_mask"].sum() == n_last
        assert (blocks[-1]["input_ids"][n_last:] == tok.padding_id).all()
    dropped = list(StreamingTextDataset(jsonl, tok, 16, split="all", drop_last=True))
    assert len(dropped) == len(expected) // 16 and all(b["attention_mask"].all() for b in dropped)


def test_add_bos(jsonl: Path) -> None:
    blocks = list(StreamingTextDataset(jsonl, "bytes", 64, split="all", add_bos=True))
    assert stream(blocks) == [t for d in make_docs() for t in BYTES.encode(d, bos=True, eos=True)]


# -- split -----------------------------------------------------------------------------------------

def test_split_is_disjoint_complete_and_order_independent(tmp_path: Path) -> None:
    docs = [f"document number {i}" for i in range(1000)]
    forward = write_jsonl(tmp_path / "f.jsonl", docs)
    backward = write_jsonl(tmp_path / "b.jsonl", docs[::-1])
    get = lambda src, split: docs_of(list(StreamingTextDataset(src, "bytes", 64, split=split,  # noqa: E731
                                                               val_fraction=0.2)))
    train, val = get(forward, "train"), get(forward, "val")
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert 150 < len(val) < 250
    assert val == [d for d in docs if in_val_split(d, 0.2)]
    assert get(backward, "val") == val[::-1] and get(backward, "train") == train[::-1]
    assert get(forward, "val") == val  # deterministic across runs


# -- resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle_buffer", [0, 6])
def test_resume_mid_stream_is_exact(jsonl: Path, tmp_path: Path, shuffle_buffer: int) -> None:
    make = lambda: StreamingTextDataset(jsonl, "bytes", 24, val_fraction=0.25,  # noqa: E731
                                        shuffle_buffer=shuffle_buffer, seed=3, encode_batch_size=5)
    full = list(make())
    assert len(full) > 20
    for cut in (0, 1, 7, len(full) - 3, len(full) - 1, len(full)):
        ds = make()
        it = iter(ds)
        head = [next(it) for _ in range(cut)]
        buf = io.BytesIO()
        torch.save(ds.state_dict(), buf)
        buf.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert same_blocks(head + list(resumed), full), f"cut={cut}"


def test_passes_and_shuffle(jsonl: Path) -> None:
    ds = StreamingTextDataset(jsonl, "bytes", 16, split="all", shuffle_buffer=8, seed=1)
    first, second = list(ds), list(ds)
    key = lambda blocks: sorted(tuple(b["input_ids"].tolist()) for b in blocks)  # noqa: E731
    plain = list(StreamingTextDataset(jsonl, "bytes", 16, split="all"))
    assert key(first) == key(second) == key(plain)  # the same blocks, reordered
    assert not same_blocks(first, plain) and not same_blocks(first, second)
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["done"]
    again = StreamingTextDataset(jsonl, "bytes", 16, split="all", shuffle_buffer=8, seed=1)
    assert same_blocks(list(again), first)  # the seed fixes the order


def test_state_must_match_the_dataset(jsonl: Path) -> None:
    ds = StreamingTextDataset(jsonl, "bytes", 16)
    next(iter(ds))
    state = ds.state_dict()
    with pytest.raises(ValueError, match="block_size=16 in the saved state but 32"):
        StreamingTextDataset(jsonl, "bytes", 32).load_state_dict(state)
    other = StreamingTextDataset(jsonl, "bytes", 16, rank=1, world_size=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="shard"):
        iter(other)


def test_batches_resume_at_batch_boundaries(jsonl: Path) -> None:
    make = lambda: StreamingTextDataset(jsonl, "bytes", 16, split="all").batches(4)  # noqa: E731
    full = list(make())
    assert all(b["input_ids"].shape == b["attention_mask"].shape == (4, 16) for b in full[:-1])
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert len(head) + len(rest) == len(full)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(head + rest, full))


# -- sharding --------------------------------------------------------------------------------------

def test_ranks_read_disjoint_documents(jsonl: Path) -> None:
    per_rank = [docs_of(list(StreamingTextDataset(jsonl, "bytes", 16, val_fraction=0.2, rank=r,
                                                  world_size=3))) for r in range(3)]
    single = docs_of(list(StreamingTextDataset(jsonl, "bytes", 16, val_fraction=0.2)))
    assert all(per_rank)
    assert sum(len(d) for d in per_rank) == len(single)
    assert sorted(d for docs in per_rank for d in docs) == sorted(single)


def test_dataloader_workers_read_disjoint_documents(jsonl: Path) -> None:
    blocks = list(DataLoader(StreamingTextDataset(jsonl, "bytes", 16, split="all"), batch_size=None,
                             num_workers=2))
    # Worker w of 2 on one rank reads what rank w of 2 reads without workers.
    shards = [list(StreamingTextDataset(jsonl, "bytes", 16, split="all", rank=w, world_size=2))
              for w in range(2)]
    docs = [docs_of(s) for s in shards]
    assert not set(docs[0]) & set(docs[1]) and sorted(docs[0] + docs[1]) == sorted(make_docs())
    key = lambda bs: sorted(tuple(b["input_ids"].tolist()) for b in bs)  # noqa: E731
    assert key(blocks) == key(shards[0] + shards[1])
