"""CPU tests of seqmem_shared.train: exact resume, metrics, atomic checkpoints, config errors, DDP."""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from seqmem_shared.config import ConfigError
from seqmem_shared.train import (
    Callback,
    CheckpointError,
    TrainConfig,
    Trainer,
    all_reduce_mean,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    load_checkpoint,
    move_to_device,
    save_checkpoint,
)
from seqmem_shared.train.config import _CHECKS
from torch import nn

V, T = 16, 6  # vocabulary, sequence length of the toy task: predict (token + 1) % V


class TinyNet(nn.Module):
    """Embedding -> MLP with dropout -> logits [B, T, V]."""

    def __init__(self, dropout: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 8)
        self.hidden = nn.Linear(8, 32)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(32, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(F.gelu(self.hidden(self.emb(x)))))


def loss_with_acc(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss, {"acc": (logits.argmax(-1) == y).float().mean()}


def plain_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return loss_with_acc(model, batch)[0]


class GeneratorSource:
    """Draws batches from its own generator, ignoring ``index``: only its saved state makes resume exact."""

    def __init__(self, batch_size: int = 4, seed: int = 123) -> None:
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, V, (self.batch_size, T), generator=self.gen)
        return x, (x + 1) % V

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def fixed_data(n: int = 64, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))
    return x, (x + 1) % V


def slicer(data: tuple[torch.Tensor, torch.Tensor], batch_size: int):
    """``get_batch(index)``: the index-th slice of ``data`` (wrapping around)."""
    x, y = data

    def get_batch(index: int):
        rows = torch.arange(index * batch_size, (index + 1) * batch_size) % len(x)
        return x[rows], y[rows]

    return get_batch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_trainer(out_dir, model=None, data=None, loss_fn=loss_with_acc, callbacks=None, eval_fn=None,
                 **overrides) -> Trainer:
    cfg = dict(max_steps=20, lr=1e-2, log_every=1, save_every=5, out_dir=str(out_dir), progress=False, seed=3)
    cfg.update(overrides)
    model = model if model is not None else TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    return Trainer(model, TrainConfig(**cfg), loss_fn, data if data is not None else GeneratorSource(),
                   eval_fn=eval_fn, optimizer=opt, scheduler=warmup_cosine(opt, 3, cfg["max_steps"]),
                   callbacks=callbacks)


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            raise RuntimeError("simulated crash")


# ---------------------------------------------------------------------------------------- resume


def test_resume_after_crash_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit()

    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "b", callbacks=[CrashAt(13)]).fit()  # last checkpoint: step 10
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 13))  # crashed in step 13

    # fresh model init, fresh data generator, fresh optimizer: everything must come from the checkpoint
    resumed = make_trainer(tmp_path / "b", model=TinyNet(seed=99), data=GeneratorSource(seed=5))
    assert resumed.fit()["step"] == 20
    assert_same_weights(straight.raw_model, resumed.raw_model)
    assert torch.equal(straight.data.data.gen.get_state(), resumed.data.data.gen.get_state())
    for p in straight.optimizer.state:
        q = dict(resumed.raw_model.named_parameters())[
            next(n for n, x in straight.raw_model.named_parameters() if x is p)]
        assert torch.equal(straight.optimizer.state[p]["exp_avg"], resumed.optimizer.state[q]["exp_avg"])

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 21))  # lines 11-13 of the crashed run were dropped
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]


def test_resume_without_rng_restore_would_differ(tmp_path):
    """Guard for the test above: dropout really consumes RNG, so skipping the RNG restore changes weights."""
    straight = make_trainer(tmp_path / "a", max_steps=6, save_every=3)
    straight.fit()
    with pytest.raises(RuntimeError):
        make_trainer(tmp_path / "b", max_steps=6, save_every=3, callbacks=[CrashAt(4)]).fit()
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    ckpt["rng"][0]["torch"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    resumed = make_trainer(tmp_path / "b", max_steps=6, save_every=3)
    resumed.fit()
    assert not torch.equal(straight.raw_model.hidden.weight, resumed.raw_model.hidden.weight)


def test_resume_iterable_by_skipping(tmp_path, caplog):
    data = fixed_data(40)
    batches = [(data[0][i:i + 4], data[1][i:i + 4]) for i in range(0, 40, 4)]  # 10 batches, re-iterated
    straight = make_trainer(tmp_path / "a", data=batches, max_steps=14)
    straight.fit()
    with pytest.raises(RuntimeError):
        make_trainer(tmp_path / "b", data=batches, max_steps=14, callbacks=[CrashAt(12)]).fit()
    with caplog.at_level(logging.WARNING, logger="seqmem"):
        resumed = make_trainer(tmp_path / "b", data=batches, max_steps=14)
        resumed.fit()
    assert "skipping 10 consumed batches" in caplog.text
    assert_same_weights(straight.raw_model, resumed.raw_model)


def test_streaming_text_batches_resume_exactly(tmp_path, caplog):
    """The real text pipeline: StreamingTextDataset.batches() is a stateful iterable of batches."""
    text_mod = pytest.importorskip("seqmem_shared.data.text")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "abcdefghij"[i % 10] * (5 + i % 7) for i in range(60)))

    def source():
        return text_mod.StreamingTextDataset(corpus, "bytes", block_size=T, split="all").batches(4)

    def byte_loss(model, batch):  # bytes -> our 16-token toy vocabulary
        x = batch["input_ids"] % V
        return plain_loss(model, (x, (x + 1) % V))

    straight = make_trainer(tmp_path / "a", data=source(), loss_fn=byte_loss, max_steps=12)
    straight.fit()
    crashing = make_trainer(tmp_path / "b", data=source(), loss_fn=byte_loss, max_steps=12,
                            callbacks=[CrashAt(8)])
    with pytest.raises(RuntimeError):
        crashing.fit()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["data_state"]
    assert saved[0] is not None  # the stream position itself is checkpointed (no skip-replay)
    resumed_data = source()
    resumed = make_trainer(tmp_path / "b", data=resumed_data, loss_fn=byte_loss, max_steps=12)
    with caplog.at_level(logging.WARNING, logger="seqmem"):
        resumed.fit()
    assert "skipping" not in caplog.text
    assert nested_equal(resumed_data.state_dict(), straight.data.data.state_dict())  # same stream position
    assert_same_weights(straight.raw_model, resumed.raw_model)


class NumpyStateSource(GeneratorSource):
    """Its state holds a numpy array, which torch.load(weights_only=True) refuses."""

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state().numpy()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(torch.from_numpy(state["gen"]))


def test_resume_with_numpy_data_state(tmp_path, caplog):
    straight = make_trainer(tmp_path / "a", data=NumpyStateSource(), max_steps=6, save_every=3)
    straight.fit()
    with pytest.raises(RuntimeError):
        make_trainer(tmp_path / "b", data=NumpyStateSource(), max_steps=6, save_every=3,
                     callbacks=[CrashAt(4)]).fit()
    with pytest.raises(CheckpointError, match="pass weights_only=False if you trust the file"):
        load_checkpoint(tmp_path / "b" / "checkpoint.pt", TinyNet())
    with caplog.at_level(logging.WARNING, logger="seqmem"):
        resumed = make_trainer(tmp_path / "b", data=NumpyStateSource(seed=1), max_steps=6, save_every=3)
        resumed.fit()
    assert "loading it with weights_only=False" in caplog.text
    assert_same_weights(straight.raw_model, resumed.raw_model)


def test_exhausted_iterator_is_a_clear_error(tmp_path):
    x, y = fixed_data(8)
    with pytest.raises(RuntimeError, match="ran out of batches"):
        make_trainer(tmp_path, data=iter([(x, y)] * 3), max_steps=5).fit()


def test_finished_run_is_not_retrained(tmp_path):
    first = make_trainer(tmp_path, max_steps=5)
    metrics = first.fit()
    lines = (tmp_path / "metrics.jsonl").read_text()
    again = make_trainer(tmp_path, model=TinyNet(seed=42), max_steps=5)
    assert again.fit() == metrics
    assert_same_weights(first.raw_model, again.raw_model)
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_resume_false_starts_over(tmp_path):
    make_trainer(tmp_path, max_steps=4).fit()
    fresh = make_trainer(tmp_path, max_steps=4, resume=False)
    calls = []
    fresh.callbacks.append(type("Spy", (), {"on_step_end": lambda self, t, s, m: calls.append(s)})())
    fresh.fit()
    assert calls == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- metrics, eval


def test_metrics_jsonl_and_fit_result(tmp_path):
    eval_calls = []

    def eval_fn(model):
        assert not model.training
        assert not torch.is_grad_enabled()
        eval_calls.append(1)
        x, y = fixed_data(16)
        return {"loss": F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item(), "calls": len(eval_calls)}

    trainer = make_trainer(tmp_path, max_steps=6, log_every=2, eval_every=3, save_every=0, eval_fn=eval_fn,
                           examples_per_batch=4, tokens_per_batch=4 * T)
    result = trainer.fit()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    train_keys = {"step", "loss", "lr", "grad_norm", "acc", "tokens_per_s", "examples_per_s", "elapsed_s"}
    assert set(records[0]) == train_keys
    assert set(records[1]) == {"step", "lr", "eval_loss", "eval_calls"}  # eval-only step
    assert set(records[3]) == train_keys | {"eval_loss", "eval_calls"}
    assert records[3]["eval_calls"] == 2 and len(eval_calls) == 2
    for r in (records[0], records[2], records[3]):
        assert r["tokens_per_s"] == pytest.approx(r["examples_per_s"] * T)
        assert 0.0 <= r["acc"] <= 1.0 and r["grad_norm"] > 0 and math.isfinite(r["loss"])
    # lr recorded after the step's scheduler update: base lr 1e-2 x factor(step)
    sched = warmup_cosine(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2), 3, 6)
    lrs = []
    for _ in range(6):
        sched.optimizer.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert [r["lr"] for r in records] == pytest.approx([lrs[1], lrs[2], lrs[3], lrs[5]])
    assert result["step"] == 6 and result["eval_calls"] == 2
    assert result["loss"] == records[3]["loss"] and result["eval_loss"] == records[3]["eval_loss"]
    assert (tmp_path / "checkpoint.pt").is_file()  # final checkpoint even with save_every=0


def test_progress_bar_and_eval_lines(tmp_path, capsys):
    make_trainer(tmp_path, max_steps=4, log_every=2, eval_every=2, progress=True,
                 eval_fn=lambda m: {"loss": 0.5}).fit()
    out, err = capsys.readouterr()
    assert "train" in err and "4/4" in err and "loss=" in err and "lr=" in err  # tqdm bar with postfix
    assert "step 2: eval_loss=0.5" in out and "step 4: eval_loss=0.5" in out  # tqdm.write, above the bar


def test_loss_is_logged_as_window_mean(tmp_path):
    seen = []

    def loss_fn(model, batch):
        loss, _ = loss_with_acc(model, batch)
        seen.append(loss.item())
        return loss

    make_trainer(tmp_path, loss_fn=loss_fn, max_steps=6, log_every=3).fit()
    records = read_metrics(tmp_path)
    assert [r["loss"] for r in records] == pytest.approx([sum(seen[:3]) / 3, sum(seen[3:]) / 3], rel=1e-6)
    assert "acc" not in records[0]  # plain-tensor loss_fn: no extra metrics


def test_bad_loss_fn_output(tmp_path):
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar loss tensor .* got shape \(4, 6\)"):
        make_trainer(tmp_path, loss_fn=lambda m, b: F.cross_entropy(
            m(b[0]).transpose(1, 2), b[1], reduction="none")).fit()


def test_best_checkpoint_and_callbacks(tmp_path):
    values = iter([3.0, 1.0, 2.0])
    events = []

    class Recorder(Callback):
        def on_fit_start(self, trainer):
            events.append("start")

        def on_eval_end(self, trainer, step, metrics):
            events.append(("eval", step, metrics["loss"]))

        def on_save(self, trainer, step, path):
            events.append(("save", step, Path(path).name))

        def on_fit_end(self, trainer, metrics):
            events.append(("end", metrics["step"]))

    trainer = make_trainer(tmp_path, max_steps=6, eval_every=2, save_every=3, best_metric="loss",
                           eval_fn=lambda m: {"loss": next(values)}, callbacks=[Recorder()])
    trainer.fit()
    assert events == ["start", ("eval", 2, 3.0), ("save", 2, "best.pt"), ("save", 3, "checkpoint.pt"),
                      ("eval", 4, 1.0), ("save", 4, "best.pt"), ("eval", 6, 2.0),
                      ("save", 6, "checkpoint.pt"), ("end", 6)]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 4 and best["extra"]["trainer"]["best"] == 1.0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["extra"]["trainer"]["best"] == 1.0


def test_best_metric_must_be_returned_by_eval_fn(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig.best_metric: 'acc' .* expected one of \['loss'\]"):
        make_trainer(tmp_path, max_steps=2, eval_fn=lambda m: {"loss": 1.0}, best_metric="acc").fit()


def test_early_stop_logs_partial_window_and_saves(tmp_path):
    class StopAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            assert set(metrics) == {"step", "lr"}  # no log or eval at these steps: no device sync
            trainer.should_stop = step == 4

    result = make_trainer(tmp_path, max_steps=50, log_every=10, save_every=0, callbacks=[StopAt()]).fit()
    assert result["step"] == 4 and "loss" in result
    assert [r["step"] for r in read_metrics(tmp_path)] == [4]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    rerun = make_trainer(tmp_path, max_steps=50, log_every=10, save_every=0)
    assert rerun.fit() == result and rerun.step == 4  # an early-stopped run counts as finished


class TickingClock:
    """Stands in for the training loop's ``time`` module: its clock moves only when ``tick`` is called."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_time_limit_stops_saves_and_resume_continues(tmp_path, monkeypatch, caplog):
    import seqmem_shared.train.loop as loop

    clock = TickingClock()
    monkeypatch.setattr(loop, "time", clock)

    def one_second_steps(model, batch):  # every training step takes exactly 1 s of the loop's clock
        clock.tick(1.0)
        return loss_with_acc(model, batch)

    def eval_fn(model):
        x, y = fixed_data(16)
        return {"loss": F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()}

    def trainer(limit):
        return make_trainer(tmp_path / "b", loss_fn=one_second_steps, eval_fn=eval_fn, log_every=10,
                            save_every=0, time_limit_s=limit)

    with caplog.at_level(logging.INFO, logger="seqmem"):
        result = trainer(2.5).fit()
    assert result["step"] == 3 and "loss" in result and "eval_loss" in result  # partial window, evaluated
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [3]
    assert "seqmem: step 1, 1 steps into this fit, at 1.0 s" in caplog.text
    assert "seqmem: time_limit_s=2.5 reached at step 3 after 3.0 s; stopping" in caplog.text
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert ckpt["extra"]["trainer"]["stopped_early"] and ckpt["extra"]["trainer"]["time_limited"]

    again = trainer(2.5).fit()  # the rerun resumes (unlike a callback's stop), with a fresh limit
    assert again["step"] == 6 and again["elapsed_s"] == 6.0  # the elapsed clock itself carries over
    resumed = trainer(None)
    assert resumed.fit()["step"] == 20
    final = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["extra"]["trainer"]
    assert not final["stopped_early"] and not final["time_limited"]
    straight = make_trainer(tmp_path / "a", loss_fn=one_second_steps, eval_fn=eval_fn, save_every=0)
    straight.fit()
    assert_same_weights(straight.raw_model, resumed.raw_model)  # stopping and resuming changed nothing


# ----------------------------------------------------------------------------- accumulation


def test_grad_accumulation_matches_big_batch(tmp_path):
    data = fixed_data(64)
    common = dict(max_steps=8, save_every=0, grad_clip=None)
    small = make_trainer(tmp_path / "a", model=TinyNet(dropout=0.0), data=slicer(data, 4), loss_fn=plain_loss,
                         grad_accum_steps=2, **common)
    big = make_trainer(tmp_path / "b", model=TinyNet(dropout=0.0), data=slicer(data, 8), loss_fn=plain_loss,
                       **common)
    small.fit()
    big.fit()
    for (name, p), q in zip(small.raw_model.named_parameters(), big.raw_model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    assert small.data.kind == "callable"


def test_precision_modes_on_cpu(tmp_path):
    assert make_trainer(tmp_path / "auto", max_steps=1).autocast_dtype is None  # fp32 on CPU unless asked
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        trainer = make_trainer(tmp_path / precision, max_steps=3, precision=precision)
        assert trainer.autocast_dtype is dtype and trainer.scaler.is_enabled() == (precision == "fp16")
        result = trainer.fit()
        assert math.isfinite(result["loss"])
        assert trainer.raw_model.hidden.weight.dtype is torch.float32


# -------------------------------------------------------------------------------- checkpoints


def test_atomic_checkpoint_survives_failing_save(tmp_path, monkeypatch):
    model = TinyNet()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, step=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.out.weight.add_(1.0)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # written half-way, then the process "dies"
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    restored = TinyNet(seed=5)
    assert load_checkpoint(path, restored)["step"] == 1
    for k, v in restored.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_trainer_save_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=4, save_every=2)
    real_save = torch.save
    calls = []

    def save_then_fail_second(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 2:
            raise OSError("killed mid-save")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail_second)
    with pytest.raises(OSError, match="killed mid-save"):
        trainer.fit()
    assert calls == [2, 4]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


class PoisonAt:
    """``get_batch(index)`` whose targets from optimizer step ``step`` (1-based) on are -1, which
    :func:`nan_loss` turns into a NaN loss."""

    def __init__(self, step: int, batch_size: int = 4) -> None:
        self.step, self.batch_size = step, batch_size

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, V, (self.batch_size, T), generator=torch.Generator().manual_seed(index))
        return x, (x + 1) % V if index + 1 < self.step else torch.full((self.batch_size, T), -1)


def nan_loss(model, batch):
    x, y = batch
    loss = plain_loss(model, (x, y.clamp(min=0)))
    return loss * float("nan") if (y < 0).any() else loss


def test_nonfinite_loss_stops_before_saving_the_diverged_model(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn=nan_loss, data=PoisonAt(7), max_steps=20, log_every=4,
                           save_every=5)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    message = str(err.value)
    assert message.startswith("Trainer: the loss is not finite since step 7 (diverged); "
                              f"the last checkpoint {tmp_path / 'checkpoint.pt'} is kept;"), message
    assert "TrainConfig.lr" in message and "\n" not in message
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5  # raised at the log step 8, before the save at step 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["step"] for r in read_metrics(tmp_path)] == [4]


def test_nonfinite_stop_can_be_turned_off(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn=nan_loss, data=PoisonAt(2), max_steps=3, log_every=1,
                           save_every=0, stop_on_nonfinite=False)
    trainer.fit()  # trains on
    assert math.isnan(read_metrics(tmp_path)[-1]["loss"])
    fresh = make_trainer(tmp_path / "b", loss_fn=nan_loss, data=PoisonAt(1), max_steps=3, save_every=0)
    with pytest.raises(FloatingPointError, match="since step 1 .*no checkpoint was written"):
        fresh.fit()


class NanWeightAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.raw_model.out.weight.data[0, 0] = float("inf")


def test_nonfinite_weights_are_not_saved(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=20, log_every=0, save_every=5, callbacks=[NanWeightAt(10)])
    with pytest.raises(FloatingPointError, match="weights are not finite at step 10 .*checkpoint.pt is kept"):
        trainer.fit()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5


def test_checkpoint_contents_and_rng_restore(tmp_path):
    import random

    import numpy as np

    model, path = TinyNet(), tmp_path / "c.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = warmup_cosine(opt, 2, 10)
    save_checkpoint(path, model, opt, sched, step=7, extra={"note": "x"}, data_state={"pos": 3},
                    config=TrainConfig(max_steps=10))
    draws = (random.random(), np.random.rand(), torch.rand(3))
    ckpt = load_checkpoint(path, model, opt, sched)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    assert ckpt["step"] == 7 and ckpt["extra"] == {"note": "x"} and ckpt["data_state"] == {"pos": 3}
    assert TrainConfig.from_dict(ckpt["config"]) == TrainConfig(max_steps=10)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "step", "rng", "data_state", "config", "extra"}


def test_load_checkpoint_errors_name_the_file(tmp_path):
    model = TinyNet()
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(missing, model)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a zip archive")
    with pytest.raises(CheckpointError, match=r"corrupt.pt: not a readable checkpoint") as err:
        load_checkpoint(corrupt, model)
    assert "\n" not in str(err.value)

    keyless = tmp_path / "keyless.pt"
    torch.save({"weights": {}}, keyless)
    with pytest.raises(CheckpointError, match=r"keyless.pt: checkpoint lacks key\(s\) \['model', 'step'\]"):
        load_checkpoint(keyless, model)

    other = tmp_path / "other.pt"
    save_checkpoint(other, nn.Sequential(nn.Linear(8, 32)), step=0)
    with pytest.raises(CheckpointError, match=r"other.pt: model weights do not match") as err:
        load_checkpoint(other, model)
    assert "missing keys [emb.weight" in str(err.value)
    assert "unexpected keys [0.weight, 0.bias]" in str(err.value)

    wide = tmp_path / "wide.pt"
    wide_model = TinyNet()
    wide_model.out = nn.Linear(32, V + 1)
    save_checkpoint(wide, wide_model, step=0)
    shapes = r"wide.pt: model weight shapes differ: \[out.weight \(17, 32\) vs model \(16, 32\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_checkpoint(wide, model)

    no_opt = tmp_path / "no_opt.pt"
    save_checkpoint(no_opt, model, step=0)
    with pytest.raises(CheckpointError, match="no_opt.pt: checkpoint has no optimizer state"):
        load_checkpoint(no_opt, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_checkpoints_are_portable_across_wrappers(tmp_path):
    model = TinyNet(seed=1)
    compiled = torch.compile(model, backend="eager")  # a wrapper only: nothing is compiled until called
    save_checkpoint(tmp_path / "c.pt", compiled, step=0)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    assert set(saved) == set(model.state_dict())  # no "_orig_mod." prefixes

    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": prefixed, "step": 3}, tmp_path / "ddp.pt")
    target = TinyNet(seed=2)
    assert load_checkpoint(tmp_path / "ddp.pt", torch.compile(target, backend="eager"))["step"] == 3
    assert_same_weights(model, target)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_steps", 0, "a positive integer"),
        ("max_steps", 2.5, "a positive integer"),
        ("lr", -1.0, "a positive float"),
        ("lr", "fast", "a positive float"),
        ("weight_decay", -0.1, "a non-negative float"),
        ("optimizer", "sgd", "one of 'adamw', 'muon'"),
        ("betas", [0.9], "two floats in [0, 1)"),
        ("betas", [0.9, 1.5], "two floats in [0, 1)"),
        ("min_lr_ratio", 2.0, "a float in [0, 1]"),
        ("grad_clip", -1.0, "a non-negative float"),
        ("precision", "fp8", "one of 'auto', 'bf16', 'fp16', 'fp32'"),
        ("grad_accum_steps", 0, "a positive integer"),
        ("log_every", -1, "a non-negative integer"),
        ("warmup_steps", 2000, "an integer <= max_steps=1000"),
        ("seed", True, "a non-negative integer"),
        ("compile", "yes", "true or false"),
        ("best_mode", "avg", "one of 'min', 'max'"),
        ("out_dir", 3, "a directory path or null"),
        ("tokens_per_batch", 0, "a positive integer or null"),
        ("time_limit_s", 0, "a positive number of seconds or null"),
        ("time_limit_s", -60.0, "a positive number of seconds or null"),
        ("time_limit_s", "soon", "a positive number of seconds or null"),
    ],
)
def test_config_errors_name_the_field(field, value, expected):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({field: value})
    assert err.value.field == field
    message = str(err.value)
    assert message.startswith(f"TrainConfig.{field}: expected {expected}") and repr(value) in message
    assert "\n" not in message


def test_config_unknown_key_roundtrip_and_yaml_floats(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field 'learning_rate'; expected one of max_steps, lr, "):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    cfg = TrainConfig.from_dict({"lr": "3e-4", "betas": [0.8, 0.9], "grad_clip": None, "out_dir": tmp_path})
    assert cfg.lr == 3e-4 and cfg.betas == (0.8, 0.9) and cfg.out_dir == str(tmp_path)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert set(_CHECKS) == set(TrainConfig.field_names())  # every field is validated
    with pytest.raises(ValueError, match=r"TrainConfig.optimizer_kwargs: expected a mapping"):
        TrainConfig(optimizer_kwargs=["adamw_lr"])
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, {"max_steps": 2, "progress": False}, plain_loss, GeneratorSource(),
                      optimizer=opt, scheduler=warmup_cosine(opt, 1, 2))
    assert trainer.config.max_steps == 2 and trainer.out_dir is None
    assert trainer.fit()["step"] == 2  # no out_dir: nothing written


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_default_optimizer_and_schedule(tmp_path, name):
    optim = pytest.importorskip("seqmem_shared.optim", reason="seqmem_shared.optim not built yet")
    if not hasattr(optim, "build_optimizer"):
        pytest.skip("seqmem_shared.optim.build_optimizer not built yet")
    model = TinyNet(dropout=0.0)
    cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, optimizer=name, log_every=1,
                      optimizer_kwargs={"eps": 1e-7}, progress=False, out_dir=str(tmp_path))
    trainer = Trainer(model, cfg, plain_loss, GeneratorSource())
    assert trainer.optimizer.param_groups[-1]["eps"] == 1e-7
    lrs = []
    trainer.callbacks.append(type("LR", (), {"on_step_end": lambda s, t, step, m: lrs.append(m["lr"])})())
    result = trainer.fit()
    assert max(lrs) == pytest.approx(1e-2, rel=1e-6) and lrs[-1] == pytest.approx(1e-3, rel=1e-3)
    assert lrs[0] < lrs[1]  # warmup
    first = read_metrics(tmp_path)[0]["loss"]
    assert result["loss"] < first


# -------------------------------------------------------------------------------- misc helpers


def test_move_to_device_keeps_structure():
    Pair = collections.namedtuple("Pair", "x y")
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(3), "tag")], "p": Pair(torch.ones(1), 5)}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["a"].is_meta and moved["b"][0].is_meta and moved["b"][1][0].is_meta
    assert moved["b"][1][1] == "tag" and isinstance(moved["p"], Pair)
    assert moved["p"].x.is_meta and moved["p"].y == 5


def test_distributed_helpers_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    assert all_reduce_mean(2.5) == 2.5
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t) is t


def test_compile_flag_wraps_model(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model, *args, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = make_trainer(tmp_path, max_steps=2, compile=True)
    assert compiled == [trainer.raw_model]
    trainer.fit()


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_bf16_autocast_and_exact_resume(tmp_path):
    def cuda_trainer(out_dir, **kw):
        return make_trainer(out_dir, model=TinyNet(seed=kw.pop("seed", 0)).cuda(), data=GeneratorSource(),
                            max_steps=8, save_every=4, **kw)

    straight = cuda_trainer(tmp_path / "a")
    assert straight.autocast_dtype is torch.bfloat16  # precision="auto" on a bf16-capable GPU
    result = straight.fit()
    assert math.isfinite(result["loss"]) and result["grad_norm"] > 0
    with pytest.raises(RuntimeError):
        cuda_trainer(tmp_path / "b", callbacks=[CrashAt(6)]).fit()
    resumed = cuda_trainer(tmp_path / "b", seed=9)
    resumed.fit()  # CUDA RNG (dropout) restored from the checkpoint
    for (name, p), q in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------- DDP

DDP_JOB = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    from seqmem_shared.train import Trainer, TrainConfig, cleanup, get_rank, init_distributed

    def data(index):
        gen = torch.Generator().manual_seed(1000 + index)  # batch `index` is a pure function of index
        x = torch.randint(0, 16, (4, 6), generator=gen)
        return {"x": x, "y": (x + 1) % 16}

    def loss_fn(model, batch):
        logits = model(batch["x"])
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    def evaluate(model):
        batch = {k: v.to(next(model.parameters()).device) for k, v in data(10**6).items()}
        return {"loss": loss_fn(model, batch).item()}

    def run(out_dir, accum, device=None):
        info = init_distributed()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 16))
        model = model.to(device or info.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
        cfg = TrainConfig(max_steps=6, grad_accum_steps=accum, log_every=2, save_every=3, eval_every=3,
                          out_dir=out_dir, progress=False, precision="fp32",
                          time_limit_s=3600)  # never reached: rank 0's decision is broadcast every step
        trainer = Trainer(model, cfg, loss_fn, data, eval_fn=evaluate, optimizer=opt, scheduler=sched)
        result = trainer.fit()
        out = {"weights": {k: v.cpu() for k, v in trainer.raw_model.state_dict().items()}, "result": result}
        torch.save(out, f"{out_dir}/rank{get_rank()}.pt")
        cleanup()

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_ddp_matches_single_process(tmp_path: Path, env_extra: dict[str, str], single_device: str | None,
                                      atol: float) -> None:
    """Two ranks launched the way torchrun does (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* env) vs one process
    with 2 micro-batches (the same global batch and batch indices)."""
    job = tmp_path / "ddp_job.py"
    job.write_text(DDP_JOB)
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **env_extra}
    runs = [[str(ddp_dir), "1", {"RANK": str(r), "LOCAL_RANK": str(r)}] for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(job), out_dir, accum], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, **rank_env})
             for out_dir, accum, rank_env in runs]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    spec = importlib.util.spec_from_file_location("ddp_job", job)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run(str(single_dir), 2, single_device)  # in this (non-distributed) process

    r0, r1 = (torch.load(ddp_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(single_dir / "rank0.pt", weights_only=True)
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k  # DDP keeps the ranks in lockstep
        torch.testing.assert_close(v, single["weights"][k], atol=atol, rtol=atol, msg=k)
    r0["result"].pop("elapsed_s"), r1["result"].pop("elapsed_s")
    assert r0["result"] == r1["result"]  # eval on rank 0 is broadcast; losses are all-reduced
    assert r0["result"]["loss"] == pytest.approx(single["result"]["loss"], rel=atol)
    assert r0["result"]["eval_loss"] == pytest.approx(single["result"]["eval_loss"], rel=atol)
    assert [r["step"] for r in read_metrics(ddp_dir)] == [2, 3, 4, 6]  # written once, by rank 0
    ckpt = torch.load(ddp_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2 and ckpt["extra"]["trainer"]["consumed"] == [6, 6]
    assert ckpt["extra"]["trainer"]["world_size"] == 2
    for k, v in ckpt["model"].items():
        assert torch.equal(v.cpu(), r0["weights"][k]), k


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    _check_ddp_matches_single_process(tmp_path, {"CUDA_VISIBLE_DEVICES": ""}, "cpu", atol=1e-5)  # gloo


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_two_gpus_nccl_match_single_process(tmp_path):
    _check_ddp_matches_single_process(tmp_path, {}, None, atol=1e-4)  # nccl, cuda:0 and cuda:1
