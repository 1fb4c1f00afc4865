"""Tokenizers that work offline: ``get_tokenizer("gpt2" | "simplestories" | "tinystories-10k" | "bytes")``.

Every :class:`Tokenizer` has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id``/``eos_id``/``pad_id``/``unk_id`` (None where absent), and the batched
``enc(texts, max_length, padding=True) -> (input_ids [B, T], attention_mask [B, T])`` and ``dec(ids)``.
A local ``tokenizer.json`` path or a Hugging Face hub name works too.
"""

from seqmem_shared.tokenization.registry import OFFLINE_TOKENIZERS, get_tokenizer
from seqmem_shared.tokenization.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    RestrictedVocabTokenizer,
    Tokenizer,
)

__all__ = ["OFFLINE_TOKENIZERS", "ByteTokenizer", "HFTokenizer", "RestrictedVocabTokenizer", "Tokenizer",
           "get_tokenizer"]
