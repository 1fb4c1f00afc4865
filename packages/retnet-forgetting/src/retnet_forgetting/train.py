"""``retnet-forgetting train-tiny``: train a small RetNet on associative recall + filler.

Hub weights are not reachable everywhere, so this gives a model whose memory is real: the loss is the
next-token loss on the answer tokens (the VALUE after the query), through ``seqmem_shared.train``
(warmup-cosine, checkpoints, resume). fla's model on CUDA when installed, the reference elsewhere.
The trained model is saved as ``out_dir/model`` (config.json + model.safetensors), loadable by
``load_retnet_model`` and usable as ``model.name_or_path`` of ``retnet-forgetting run``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from seqmem_shared.backends import default_device

from retnet_forgetting.data.recall import RecallConfig, generate_recall_dataset
from retnet_forgetting.loading import get_model_config, load_retnet_model
from retnet_forgetting.ops.retention import fla_backward_hazard_on
from retnet_forgetting.reference import RetNetConfig

log = logging.getLogger("seqmem.retnet")

TRAIN_DEFAULTS: dict[str, Any] = {
    "out_dir": "outputs/retnet-tiny",
    "tokenizer": "bytes",
    "device": None,
    "implementation": "auto",
    "backend": "auto",
    "model": {"hidden_size": 128, "num_hidden_layers": 2, "num_heads": 4, "vocab_size": 259},
    "dataset": {"num_sequences": 4000, "lags": [16, 32, 64, 128, 256], "filler": "random", "num_names": 200,
                "num_values": 10, "max_prefix_tokens": 16},
    "train": {"max_steps": 1000, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.01, "batch_size": 32,
              "eval_every": 200, "log_every": 50, "save_every": 500, "precision": "auto"},
}
"""``train`` takes the fields of ``seqmem_shared.train.TrainConfig`` (e.g. ``time_limit_s``: stop after
this many seconds of training, then evaluate and save; a rerun resumes; null: no limit) and
``bucket_by_lag`` (default true: every batch holds one target lag, so short-lag batches are not padded
to the longest lag), ``curriculum_steps`` (0: none; else the longest lag trained on grows from the
shortest to the longest over these steps), ``tokens_per_batch`` (0: ``batch_size`` rows per batch; else
a fixed token count per batch, see :class:`LagBatches`) and ``eval_rows`` (validation rows per
evaluation)."""
TRAIN_EXTRAS = {"batch_size": 32, "bucket_by_lag": True, "curriculum_steps": 0, "tokens_per_batch": 0,
                "eval_rows": 1024}


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


class LagBatches:
    """``get_batch(index)`` for the Trainer, deterministic in ``index``: ``batch_size`` random training rows,
    all of one target lag (drawn uniformly) when ``bucket_by_lag``, else of any lag.

    ``curriculum`` > 0 (micro-batches; one per step in a single process): batch ``index`` draws only from
    the shortest ``ceil(n_lags * (index + 1) / curriculum)`` lags, so the longest lag allowed grows from
    the shortest to all of them over the first ``curriculum`` batches (needs ``bucket_by_lag``).

    ``tokens_per_batch`` > 0: every batch is ``[tokens_per_batch // T, T]`` with ``T`` the bucket's length
    rounded up to 64 * 2^k, so all batches hold the same number of token slots (``batch_size`` is unused).
    Kernels autotuned on the token count (fla's norms key on it) then tune once, not once per length."""

    def __init__(self, rows, batch_size: int, bucket_by_lag: bool = True, curriculum: int = 0,
                 pad_id: int = 0, tokens_per_batch: int = 0):
        self.batch_size, self.curriculum, self.tokens_per_batch = batch_size, curriculum, tokens_per_batch
        lags = rows["target_lag"].to_numpy()
        members = ([np.flatnonzero(lags == lag) for lag in sorted(set(lags.tolist()))] if bucket_by_lag
                   else [np.arange(len(rows))])
        self.groups = [_padded(rows.iloc[m], pad_id) for m in members]  # (ids, labels) [n, T] each
        if tokens_per_batch:
            longest = _pow2_length(max(ids.shape[1] for ids, _ in self.groups))
            if tokens_per_batch % longest:
                raise ValueError(f"train.tokens_per_batch={tokens_per_batch}: expected a multiple of "
                                 f"{longest} (the longest rows rounded up to 64 * 2^k)")

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(index)
        n = len(self.groups)
        if self.curriculum > 0:
            n = min(n, math.ceil(n * (index + 1) / self.curriculum))
        ids, labels = self.groups[rng.randrange(n)]
        if self.tokens_per_batch:
            T = _pow2_length(ids.shape[1])
            rows = self.tokens_per_batch // T
        else:
            rows = self.batch_size
        pick = [rng.randrange(len(ids)) for _ in range(rows)]
        ids, labels = ids[pick], labels[pick]
        lengths = (labels != -100).argmax(1) + 1  # each row ends with its answer token
        if self.tokens_per_batch:
            ids = np.pad(ids, ((0, 0), (0, T - ids.shape[1])))
            labels = np.pad(labels, ((0, 0), (0, T - labels.shape[1])), constant_values=-100)
        else:
            T = min(ids.shape[1], -(-int(lengths.max()) // 64) * 64)  # whole 64-token chunks: fewer variants
        return {"input_ids": torch.from_numpy(ids[:, :T]), "labels": torch.from_numpy(labels[:, :T]),
                "attention_mask": torch.from_numpy((np.arange(T)[None] < lengths[:, None]).astype(np.int64))}


def _pow2_length(n: int) -> int:
    """The smallest ``64 * 2^k >= n``."""
    return 64 * 2 ** max(0, math.ceil(math.log2(n / 64)))


def _padded(rows, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``recall_batch`` of all ``rows`` as numpy arrays (built once, sliced per batch)."""
    b = recall_batch(rows, pad_id)
    return b["input_ids"].numpy(), b["labels"].numpy()


@torch.no_grad()
def predict_answers(model: torch.nn.Module, rows, batch_size: int = 32, fixed_shape: bool | None = None,
                    ) -> np.ndarray:
    """The model's own answer: argmax over the vocabulary of its logits at each row's ``query_position``
    (the token after it is the fact's value). Rows are batched by length (right padding); ``[len(rows)]``.

    ``fixed_shape`` (default: for fla models) pads every batch to ``[batch_size, longest row rounded up to
    64 * 2^k]``: fla's norm kernels compile and autotune once per token count, not once per batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if fixed_shape is None:
        fixed_shape = type(model).__module__.startswith("fla")
    width = _pow2_length(int(rows["num_tokens"].max())) if fixed_shape and len(rows) else 0
    order = np.argsort(rows["num_tokens"].to_numpy(), kind="stable")
    pred = np.zeros(len(rows), dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        sel = order[start:start + batch_size]
        part = rows.iloc[sel]
        ids = recall_batch(part)["input_ids"]
        if fixed_shape:
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1], 0, batch_size - len(sel)))
        q = torch.tensor(part["query_position"].to_numpy(), device=device)
        logits = model(input_ids=ids.to(device)).logits
        pred[sel] = logits[torch.arange(len(sel), device=device), q].argmax(-1).cpu().numpy()
    model.train(was_training)
    return pred


def answer_tokens(rows) -> np.ndarray:
    """The token each row's query should be answered with (the fact's value token): ``[len(rows)]``."""
    pairs = zip(rows["input_ids"], rows["answer_position"])
    return np.array([int(ids[a]) for ids, a in pairs], dtype=np.int64)


def recall_accuracy_by_lag(model: torch.nn.Module, rows, batch_size: int = 32) -> dict[str, float]:
    """``{"recall_acc": overall, "recall_acc_lag{L}": per target lag}`` of the model's own answers."""
    correct = predict_answers(model, rows, batch_size) == answer_tokens(rows)
    out = {"recall_acc": float(correct.mean()) if len(rows) else 0.0}
    lags = rows["target_lag"].to_numpy()
    for lag in sorted(set(lags.tolist())):
        out[f"recall_acc_lag{lag}"] = float(correct[lags == lag].mean())
    return out


class _Terminated(Exception):
    """Raised in the main thread on SIGTERM (e.g. from ``timeout``) while training."""


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises :class:`_Terminated` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _trainable_implementation(cfg: dict[str, Any]) -> str:
    """``cfg["implementation"]``, unless fla's backward is known to be miscompiled on the training GPU:
    then ``"auto"`` trains the reference model (same weight names: the checkpoint loads into fla) and
    ``"fla"`` is an error."""
    implementation = cfg["implementation"]
    if implementation == "reference":
        return implementation
    hazard = fla_backward_hazard_on(default_device(cfg["device"] or None))
    if hazard and implementation == "fla":
        raise ValueError(f"implementation='fla': {hazard}; expected 'auto' or 'reference' to train here")
    if hazard:
        log.warning("train-tiny: %s; training the reference model (its checkpoint loads into fla)", hazard)
        return "reference"
    return implementation


def train_tiny(cfg: dict[str, Any]) -> Path:
    """Train; returns the directory of the saved model (``out_dir/model``). ``out_dir/train_summary.json``
    holds the final metrics (loss, the model's recall accuracy per lag on validation names), the step
    reached, the wall time and the config. A SIGTERM during training (a ``timeout`` running out) stops it
    and saves the model as it is, marked ``"interrupted": true`` in the summary."""
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
                                 implementation=_trainable_implementation(cfg), tokenizer=False,
                                 backend=cfg["backend"])
    model.train()
    implementation = get_model_config(model)["implementation"]
    num_parameters = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    log.info("train-tiny: %s RetNet, %d layers x %d heads, %.2fM parameters on %s", implementation,
             model_cfg.num_hidden_layers, model_cfg.num_heads, num_parameters / 1e6, device)
    started = time.perf_counter()
    df = generate_recall_dataset(RecallConfig(**cfg["dataset"]), tokenizer)
    train_rows, val_rows = df[df["split"] == "train"], df[df["split"] != "train"]
    t = dict(cfg["train"])
    extras = {k: t.pop(k, v) for k, v in TRAIN_EXTRAS.items()}
    eval_rows = val_rows.iloc[:int(extras["eval_rows"])]
    if extras["curriculum_steps"] and not extras["bucket_by_lag"]:
        raise ValueError("train.curriculum_steps: expected 0 when train.bucket_by_lag is false")
    batches = LagBatches(train_rows, int(extras["batch_size"]), bool(extras["bucket_by_lag"]),
                         int(extras["curriculum_steps"]) * int(t.get("grad_accum_steps", 1)),
                         tokens_per_batch=int(extras["tokens_per_batch"] or 0))

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return recall_accuracy_by_lag(m, eval_rows, int(extras["batch_size"]))

    train_cfg = TrainConfig(**t, out_dir=str(out / "train"), best_metric="recall_acc", best_mode="max")
    trainer = Trainer(model, train_cfg, loss_fn, batches, eval_fn)
    with _sigterm_raises():
        try:
            metrics, interrupted = trainer.fit(), False
        except _Terminated:
            log.warning("train-tiny: SIGTERM at step %d; saving the model as it is", trainer.step)
            metrics, interrupted = dict(trainer.last_metrics), True
    model.eval()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    summary = {"metrics": metrics, "steps": trainer.step, "interrupted": interrupted,
               "wall_s": round(time.perf_counter() - started, 1),
               "train_s": round(trainer._elapsed, 1),
               "num_parameters": num_parameters, "implementation": implementation, "device": str(device),
               "config": cfg}
    atomic_write_json(out / "train_summary.json", summary)
    return model_dir
