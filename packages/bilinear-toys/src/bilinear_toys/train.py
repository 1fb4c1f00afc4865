"""Training toy transformers with the shared loop (Muon on hidden matrices, AdamW on embeddings).

Datasets: ``synthetic`` (offline default, :class:`~bilinear_toys.data.SyntheticLanguage`), the Hugging Face
corpora ``simplestories`` / ``tinystories`` / ``fineweb`` (streamed; need network and ``datasets``), and
``text:PATH`` (local txt/jsonl/parquet files through ``StreamingTextDataset``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.backends import default_device

from bilinear_toys.checkpoint import save_model
from bilinear_toys.data import SyntheticLanguage
from bilinear_toys.models import ModelConfig, ToyTransformer

# dataset -> (Hugging Face id, hf config, tokenizer name)
HF_DATASETS = {
    "simplestories": ("SimpleStories/SimpleStories", None, "simplestories"),
    "tinystories": ("roneneldan/TinyStories", None, "tinystories-10k"),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "gpt2"),
}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy on ``input_ids`` [B, T+1], ignoring padded targets (``attention_mask`` 0)."""
    from seqmem_shared.kernels import cross_entropy

    ids = batch["input_ids"]
    target = ids[:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    logits = model(ids[:, :-1])
    loss = cross_entropy(logits.flatten(0, 1), target.flatten())
    return loss, {}


@dataclass
class DataSpec:
    """What a dataset name resolves to: a train source for the Trainer, validation batches, a vocab size,
    the name used in file names, and (synthetic) the generator."""

    name: str
    train: Any
    val_batches: list[dict[str, torch.Tensor]]
    vocab_size: int
    tokenizer: Any = None
    language: SyntheticLanguage | None = None


def build_data(dataset: str, n_ctx: int, batch_size: int, *, vocab_size: int = 128, seed: int = 0,
               tokenizer: str | None = None, val_batches: int = 4, synthetic_pool: int | None = None,
               workers: int = 0) -> DataSpec:
    """Resolve ``dataset`` (see the module docstring) into train/val data of blocks of ``n_ctx + 1``.
    ``synthetic_pool``/``workers``: pre-generate that many synthetic sequences in ``workers`` processes
    (see :meth:`SyntheticLanguage.batches`) instead of generating each batch on the fly."""
    if dataset == "synthetic":
        lang = SyntheticLanguage(vocab_size=vocab_size, seq_len=n_ctx + 1, seed=seed)
        val_tokens, _ = lang.generate(val_batches * batch_size, seed=seed + 10_000)
        val = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in val_tokens.split(batch_size)]
        train = lang.batches(batch_size, seed=seed, pool_size=synthetic_pool, workers=workers)
        return DataSpec("synthetic", train, val, vocab_size, language=lang)
    from seqmem_shared.data.text import StreamingTextDataset
    from seqmem_shared.tokenization import get_tokenizer

    if dataset.startswith("text:"):
        source, hf_config, tok_name, name = dataset[5:], None, tokenizer or "simplestories", "text"
    elif dataset in HF_DATASETS:
        source, hf_config, tok_name = HF_DATASETS[dataset]
        source, tok_name, name = f"hf:{source}", tokenizer or tok_name, dataset
    else:
        raise ValueError(f"dataset={dataset!r}: expected 'synthetic', 'text:PATH' or one of "
                         f"{', '.join(HF_DATASETS)}")
    tok = get_tokenizer(tok_name)
    train = StreamingTextDataset(source, tok, block_size=n_ctx + 1, split="train", seed=seed,
                                 hf_config=hf_config, shuffle_buffer=256).batches(batch_size)
    val_ds = StreamingTextDataset(source, tok, block_size=n_ctx + 1, split="val", hf_config=hf_config)
    val = list(itertools.islice(iter(val_ds.batches(batch_size)), val_batches))
    if not val:  # tiny local corpora may have no validation document
        val = list(itertools.islice(iter(StreamingTextDataset(source, tok, block_size=n_ctx + 1, split="all")
                                         .batches(batch_size)), val_batches))
    return DataSpec(name, train, val, tok.vocab_size, tokenizer=tok)


def make_eval_fn(val_batches: list[dict[str, torch.Tensor]]):
    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        losses = [lm_loss(model, {k: v.to(device) for k, v in b.items()})[0].item() for b in val_batches]
        return {"loss": sum(losses) / max(len(losses), 1)}
    return eval_fn


def train_model(model_config: ModelConfig, data: DataSpec, train_config, out_dir: str | Path,
                device: str | torch.device | None = None) -> tuple[ToyTransformer, dict[str, Any]]:
    """Train with :class:`seqmem_shared.train.Trainer`, then save config + safetensors under ``out_dir``."""
    from seqmem_shared.train import Trainer, seed_everything

    device = default_device(device)
    seed_everything(train_config.seed)
    model = ToyTransformer(model_config).to(device)
    trainer = Trainer(model, train_config, lm_loss, data.train, eval_fn=make_eval_fn(data.val_batches))
    metrics = trainer.fit()
    final = make_eval_fn(data.val_batches)(model.eval())["loss"]
    if not math.isfinite(final):  # checked before saving: an earlier run's files stay intact
        raise RuntimeError(f"training diverged: final validation loss {final}; nothing was saved")
    extra = {"dataset": data.name, "final_val_loss": final, "max_iters": train_config.max_steps,
             "learning_rate": train_config.lr}
    save_model(model, out_dir, data.name, extra)
    if data.language is not None:
        from seqmem_shared.io import atomic_write_json

        atomic_write_json(Path(out_dir) / f"{data.name}_rules.json",
                          {**data.language.rules.to_dict(), "vocab_size": data.vocab_size,
                           "seed": data.language.seed})
    return model, {**metrics, "final_val_loss": final}
