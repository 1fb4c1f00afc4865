"""``get_tokenizer(name)``: the offline tokenizers shipped with seqmem, local files and hub names.

The vocabulary files live in ``data/`` inside this package (with their licenses; see
``data/README.md``) and are read with :mod:`importlib.resources`, so they work from an installed wheel.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from seqmem_shared.tokenization.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    RestrictedVocabTokenizer,
    Tokenizer,
)

GPT2_EOS = "<|endoftext|>"
TINYSTORIES_SPECIALS = ("[BEGIN]", "[END]", "[PAD]", "[UNK]")  # GPT-Neo ids 50257-50260, in this order

# Special-token spellings recognized in a tokenizer.json that does not name its roles.
_ROLE_SPELLINGS = {
    "bos_id": ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "[BEGIN]", "<|startoftext|>"),
    "eos_id": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "[END]"),
    "pad_id": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "unk_id": ("<unk>", "[UNK]", "<|unk|>"),
}


def _read_data(*parts: str) -> str:
    return resources.files("seqmem_shared.tokenization").joinpath("data", *parts).read_text(encoding="utf-8")


def _gpt2_backend(extra_specials: tuple[str, ...] = ()) -> Any:
    """GPT-2 byte-level BPE (ids identical to OpenAI's encoder) as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = json.loads(_read_data("gpt2", "encoder.json"))
    lines = _read_data("gpt2", "vocab.bpe").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([GPT2_EOS, *extra_specials])
    return backend


def _gpt2() -> Tokenizer:
    backend = _gpt2_backend()
    eos = backend.token_to_id(GPT2_EOS)  # 50256; GPT-2 uses it as its bos token as well
    return HFTokenizer(backend, "gpt2", bos_id=eos, eos_id=eos)


def _simplestories() -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(_read_data("simplestories-4096", "tokenizer.json"))
    return HFTokenizer(backend, "simplestories", **_guess_special_ids(backend))


def _tinystories_10k() -> Tokenizer:
    backend = _gpt2_backend(TINYSTORIES_SPECIALS)
    neo_ids = json.loads(_read_data("tinystories-10k", "ts_tok_ids_to_neo.json"))
    begin, end, pad, unk = (neo_ids.index(backend.token_to_id(t)) for t in TINYSTORIES_SPECIALS)
    base = HFTokenizer(backend, "gpt-neo")
    return RestrictedVocabTokenizer(base, neo_ids, "tinystories-10k", bos_id=begin, eos_id=end, pad_id=pad,
                                    unk_id=unk)


OFFLINE_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "gpt2": _gpt2,
    "simplestories": _simplestories,
    "tinystories-10k": _tinystories_10k,
    "bytes": ByteTokenizer,
}


def _guess_special_ids(backend: Any) -> dict[str, int | None]:
    """Special ids of a ``tokenizers.Tokenizer`` from the usual spellings of its special tokens."""
    vocab = backend.get_vocab(with_added_tokens=True)
    found = {role: next((vocab[s] for s in spellings if s in vocab), None)
             for role, spellings in _ROLE_SPELLINGS.items()}
    model_unk = getattr(backend.model, "unk_token", None)
    if model_unk is not None and model_unk in vocab:
        found["unk_id"] = vocab[model_unk]
    return found


def _from_file(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"tokenizer file {path}: not a valid tokenizers JSON file ({exc})") from exc
    return HFTokenizer(backend, path, **_guess_special_ids(backend))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _from_hub(name: str) -> Tokenizer:
    """A Hugging Face hub tokenizer: through ``transformers`` when installed (exact special ids from the
    tokenizer config), else ``tokenizers.Tokenizer.from_pretrained`` (special ids guessed)."""
    errors = []
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None  # noqa: N806
    if AutoTokenizer is not None:
        try:
            hf = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - network, missing repo, auth: all mean "not loadable"
            errors.append(f"transformers: {_first_line(exc)}")
        else:
            if getattr(hf, "backend_tokenizer", None) is None:
                raise ValueError(f"tokenizer {name!r}: only a slow (Python) tokenizer exists; "
                                 "save it as tokenizer.json and pass that path")
            ids = {role: getattr(hf, f"{role[:-3]}_token_id", None) for role in _ROLE_SPELLINGS}
            return HFTokenizer(hf.backend_tokenizer, name, **ids)
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"tokenizers: {_first_line(exc)}")
        raise OSError(f"tokenizer {name!r}: could not load it from the Hugging Face hub (no network, no "
                      f"cached copy, or no such repository): {'; '.join(errors)}. Offline names: "
                      f"{', '.join(OFFLINE_TOKENIZERS)}") from exc
    return HFTokenizer(backend, name, **_guess_special_ids(backend))


def _valid_names() -> str:
    return (f"{', '.join(repr(n) for n in OFFLINE_TOKENIZERS)}, a path to a tokenizer.json (or a directory "
            "holding one), or a Hugging Face hub name 'owner/name' (or 'hf:name')")


def _resolve(name: str | os.PathLike) -> tuple[str, str]:
    """(kind, key) of a tokenizer name: kind is 'offline', 'file' or 'hub'."""
    text = os.fspath(name)
    if text in OFFLINE_TOKENIZERS:
        return "offline", text
    if text.startswith("hf:"):
        return "hub", text[3:]
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer directory {text}: has no tokenizer.json")
    if path.is_file():
        return "file", str(path.resolve())
    if text.endswith(".json") or isinstance(name, os.PathLike):
        raise FileNotFoundError(f"tokenizer file {text}: does not exist")
    if "/" in text:
        return "hub", text
    raise ValueError(f"unknown tokenizer {text!r}: expected {_valid_names()}")


@functools.cache
def _load(kind: str, key: str) -> Tokenizer:
    builder = {"offline": lambda k: OFFLINE_TOKENIZERS[k](), "file": _from_file, "hub": _from_hub}[kind]
    tok = builder(key)
    tok._registry_name = key if kind != "hub" else f"hf:{key}"
    return tok


def get_tokenizer(name: str | os.PathLike | Tokenizer) -> Tokenizer:
    """The tokenizer called ``name`` (built once per process, then cached).

    ``name`` is one of the offline tokenizers shipped with seqmem: ``"gpt2"`` (GPT-2 byte-level BPE,
    50257 ids, eos = bos = ``<|endoftext|>`` 50256), ``"simplestories"`` (4096-token WordPiece,
    lowercasing; ``[UNK]`` 0, ``[EOS]`` 1), ``"tinystories-10k"`` (GPT-Neo BPE restricted to 10,000 ids;
    other GPT-2 tokens become ``[UNK]``; ``[BEGIN]``/``[END]``/``[PAD]``/``[UNK]`` are 9996-9999) or
    ``"bytes"`` (UTF-8 bytes 0-255, BOS/EOS/PAD 256/257/258); a path to a ``tokenizer.json`` or a
    directory holding one; or a Hugging Face hub name (``"owner/name"`` or ``"hf:name"``), fetched on
    demand. A :class:`Tokenizer` is returned as is. Unknown names raise ValueError listing the valid ones.
    """
    if isinstance(name, Tokenizer):
        return name
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"tokenizer name: expected str or path, got {type(name).__name__}")
    return _load(*_resolve(name))
