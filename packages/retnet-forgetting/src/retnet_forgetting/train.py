"""``retnet-forgetting train-tiny``: train a small RetNet on associative recall + filler.

Hub weights are not reachable everywhere, so this gives a model whose memory is real: the loss is the
next-token loss on the answer tokens (the VALUE after the query), through ``seqmem_shared.train``
(warmup-cosine, checkpoints, resume). fla's model on CUDA when installed, the reference elsewhere.
The trained model is saved as ``out_dir/model`` (config.json + model.safetensors), loadable by
``load_retnet_model`` and usable as ``model.name_or_path`` of ``retnet-forgetting run``.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import torch

from retnet_forgetting.data.recall import RecallConfig, generate_recall_dataset
from retnet_forgetting.loading import load_retnet_model
from retnet_forgetting.reference import RetNetConfig

TRAIN_DEFAULTS: dict[str, Any] = {
    "out_dir": "outputs/retnet-tiny",
    "tokenizer": "bytes",
    "device": None,
    "implementation": "auto",
    "model": {"hidden_size": 128, "num_hidden_layers": 2, "num_heads": 4, "vocab_size": 259},
    "dataset": {"num_sequences": 4000, "lags": [16, 32, 64, 128, 256], "filler": "random", "num_names": 200,
                "num_values": 10, "max_prefix_tokens": 16},
    "train": {"max_steps": 1000, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.01, "batch_size": 32,
              "eval_every": 200, "log_every": 50, "save_every": 500, "precision": "auto"},
}


def load_train_config(path: str | Path | None) -> dict[str, Any]:
    cfg = copy.deepcopy(TRAIN_DEFAULTS)
    if path is None:
        return cfg
    import yaml

    user = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(user) - set(cfg)
    if unknown:
        raise ValueError(f"train-tiny config: unknown keys {sorted(unknown)}; expected some of {sorted(cfg)}")
    for k, v in user.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg[k], dict) and isinstance(v, dict) else v
    return cfg


def recall_batch(rows, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` = the answer tokens only (-100 else)."""
    T = max(len(x) for x in rows["input_ids"])
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (x, a) in enumerate(zip(rows["input_ids"], rows["answer_position"])):
        x = torch.as_tensor(list(x))
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
        labels[i, a:len(x)] = x[a:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_tiny(cfg: dict[str, Any]) -> Path:
    """Train; returns the directory of the saved model."""
    from seqmem_shared.io import atomic_write_json
    from seqmem_shared.tokenization import get_tokenizer
    from seqmem_shared.train import TrainConfig, Trainer

    out = Path(cfg["out_dir"])
    tokenizer = get_tokenizer(cfg["tokenizer"])
    model_cfg = RetNetConfig(**cfg["model"])
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size}: expected >= {tokenizer.vocab_size}")
    torch.manual_seed(0)
    model, _ = load_retnet_model(model_cfg, device=cfg["device"], dtype=torch.float32,
                                 implementation=cfg["implementation"], tokenizer=False)
    model.train()
    df = generate_recall_dataset(RecallConfig(**cfg["dataset"]), tokenizer)
    train_rows, val_rows = df[df["split"] == "train"], df[df["split"] != "train"]
    t = dict(cfg["train"])
    batch_size = t.pop("batch_size")

    def get_batch(index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(index)
        return recall_batch(train_rows.iloc[[rng.randrange(len(train_rows)) for _ in range(batch_size)]])

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    @torch.no_grad()
    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        m.eval()
        device = next(m.parameters()).device
        correct = total = 0
        for start in range(0, min(len(val_rows), 512), batch_size):
            b = recall_batch(val_rows.iloc[start:start + batch_size])
            logits = m(input_ids=b["input_ids"].to(device)).logits
            q = torch.tensor(val_rows["query_position"].to_numpy()[start:start + batch_size])
            pred = logits[torch.arange(len(q)), q.to(device)].argmax(-1).cpu()
            target = b["input_ids"][torch.arange(len(q)), q + 1]
            correct += int((pred == target).sum())
            total += len(q)
        m.train()
        return {"recall_acc": correct / max(total, 1)}

    trainer = Trainer(model, TrainConfig(**t, out_dir=str(out / "train"), best_metric="recall_acc",
                                         best_mode="max"), loss_fn, get_batch, eval_fn)
    metrics = trainer.fit()
    model.eval()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    atomic_write_json(out / "train_summary.json", {"metrics": metrics, "config": cfg})
    return model_dir
