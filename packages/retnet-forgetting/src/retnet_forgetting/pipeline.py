"""``retnet-forgetting run``: dataset -> state extraction -> probes -> analysis, with progress and resume.

Every stage writes into ``out_dir`` and is skipped when its output exists (the state store resumes
shard by shard). Under ``torchrun`` every rank extracts its share of the shards on its own GPU, then fits
its share of the probe jobs; rank 0 gathers them and writes the report (:mod:`retnet_forgetting.distributed`).
See ``configs/quick.yaml`` for every option.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.io import atomic_write, atomic_write_json

from retnet_forgetting.analysis import (
    accuracy_by_lag,
    half_life_table,
    plot_curves,
    plot_summary,
    write_report,
)
from retnet_forgetting.data.recall import RecallConfig, generate_recall_dataset
from retnet_forgetting.extraction import RetNetStateExtractor
from retnet_forgetting.loading import get_model_config, load_retnet_model
from retnet_forgetting.probes import fit_logistic, fit_ridge, nearest_centroid
from retnet_forgetting.reductions import StateReduction, derotate_states
from retnet_forgetting.reference import RetNetConfig
from retnet_forgetting.store import StateStore, estimate_bytes

log = logging.getLogger("seqmem.retnet")

DEFAULTS: dict[str, Any] = {
    "out_dir": "outputs/retnet-forgetting",
    "tokenizer": "gpt2",
    "model": {"name_or_path": None, "config": None, "dtype": "bfloat16", "implementation": "auto",
              "backend": "auto", "device": None},
    "dataset": {},
    "extraction": {"batch_size": 8, "layers": None, "derotate": True, "shard_rows": 256, "dtype": "float16",
                   "readout": True, "backend": "auto",
                   "reduction": {"kind": "bilinear", "rank_k": 16, "rank_v": 16}},
    "probes": {"kinds": ["ridge", "logistic"], "groups": ["head", "layer"], "model_answer": True,
               "logistic": {"max_steps": 300, "lr": 1e-2, "weight_decay": 1e-3}},
}
"""``extraction.backend``: the extractor's kernels (``"auto"``: fla and Triton for CUDA tensors;
``"torch"``: the PyTorch reference everywhere); ``model.backend``: the same for the model's own forward
passes (:func:`~retnet_forgetting.loading.load_retnet_model`). ``probes.model_answer``: also score the
model's own answer (its argmax at the query) per lag, as the curve ``model_answer`` (layer and head -1)."""


def merge_config(user: dict[str, Any]) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``user`` (nested dicts merged); unknown top-level keys are an error."""
    unknown = set(user) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    for k, v in user.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg[k], dict) and isinstance(v, dict) else v
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path}: no such file")
    return merge_config(yaml.safe_load(path.read_text()) or {})


def run(cfg: dict[str, Any]) -> Path | None:
    """Run every stage; returns the report path (None on ranks other than 0 under torchrun)."""
    import pandas as pd
    from seqmem_shared.tokenization import get_tokenizer
    from seqmem_shared.train import barrier, init_distributed

    cfg = merge_config(cfg)
    dist = init_distributed()
    if dist.world_size > 1:
        cfg["model"]["device"] = str(dist.device)
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(cfg["tokenizer"])
    if dist.rank == 0:
        atomic_write_json(out / "config.json", cfg)
        build_dataset(cfg, tokenizer, out)
    barrier()
    df = build_dataset(cfg, tokenizer, out)
    model = build_model(cfg, tokenizer)
    extract(cfg, model, df, out / "states", rank=dist.rank, world_size=dist.world_size)
    barrier()
    curves = probe(cfg, StateStore(out / "states"), df, model)  # probe jobs split over ranks
    if dist.rank != 0:
        return None
    if cfg["probes"]["model_answer"]:
        curves = pd.concat([curves, model_answer_curve(cfg, model, df, out)], ignore_index=True)
    atomic_write(out / "curves.csv", lambda p: curves.to_csv(p, index=False))
    info = get_model_config(model)
    chance = 1.0 / len(df.attrs.get("values") or sorted(df["fact_value"].unique()))
    half = half_life_table(curves, chance, info["num_heads"])
    atomic_write(out / "half_lives.csv", lambda p: half.to_csv(p, index=False))
    plots = plot_curves(curves, out, chance, info["num_heads"]) + plot_summary(curves, half, out, chance)
    setup = {"model": cfg["model"]["name_or_path"] or "random init from config",
             "layers x heads": f"{info['num_layers']} x {info['num_heads']}",
             "state per head": f"{info['head_k_dim']} x {info['head_v_dim']}",
             "sequences": len(df), "lags": sorted(df["target_lag"].unique().tolist()),
             "filler": cfg["dataset"].get("filler", "prose"), "chance": round(chance, 3),
             "reduction": cfg["extraction"]["reduction"], "de-rotated": cfg["extraction"]["derotate"]}
    return write_report(out, curves, half, setup, plots)


def model_answer_curve(cfg: dict[str, Any], model: torch.nn.Module, df, out: Path):
    """Accuracy per lag of the model's own answers (argmax over the vocabulary at the query) on the test
    split (``probe = "model_answer"``, chance ~ 1 / number of values). The answers are cached in
    ``out/answers.parquet`` (resume skips the forward passes)."""
    import pandas as pd

    from retnet_forgetting.train import answer_tokens, predict_answers

    path = out / "answers.parquet"
    test = df[df["split"] == "test"]
    if path.exists():
        answers = pd.read_parquet(path)
    else:
        log.info("model answers: %d test rows", len(test))
        answers = pd.DataFrame({"sequence_id": test["sequence_id"].to_numpy(), "answer": answer_tokens(test),
                                "predicted": predict_answers(model, test, cfg["extraction"]["batch_size"])})
        atomic_write(path, lambda p: answers.to_parquet(p, index=False))
    return accuracy_by_lag(torch.tensor(answers["predicted"].to_numpy())[None],
                           torch.tensor(answers["answer"].to_numpy()),
                           torch.tensor(test["target_lag"].to_numpy()),
                           [{"layer": -1, "head": -1}], "model_answer")


def build_dataset(cfg: dict[str, Any], tokenizer: Any, out: Path):
    import pandas as pd

    path = out / "dataset.parquet"
    if path.exists():
        df = pd.read_parquet(path)
        df.attrs["values"] = sorted(df["fact_value"].unique().tolist())
        return df
    df = generate_recall_dataset(RecallConfig(**cfg["dataset"]), tokenizer)
    df["input_text"] = [tokenizer.decode(list(ids)) for ids in df["input_ids"]]
    values = df.attrs["values"]
    df.attrs = {}  # parquet metadata stays plain
    atomic_write(path, lambda p: df.to_parquet(p, index=False))
    df.attrs["values"] = values
    return df


def build_model(cfg: dict[str, Any], tokenizer: Any) -> torch.nn.Module:
    m = cfg["model"]
    dtype = getattr(torch, m["dtype"])
    source = m["name_or_path"]
    if source is None:
        if not m["config"]:
            raise ValueError("model: give name_or_path (hub name or checkpoint dir) or config (random init)")
        source = RetNetConfig(**m["config"])
        if source.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.config.vocab_size={source.vocab_size}: expected >= the tokenizer's "
                             f"{tokenizer.vocab_size}")
    torch.manual_seed(0)
    model, _ = load_retnet_model(source, device=m["device"], dtype=dtype, implementation=m["implementation"],
                                 tokenizer=False, backend=m["backend"])
    return model


def extract(cfg: dict[str, Any], model: torch.nn.Module, df, root: Path, rank: int = 0,
            world_size: int = 1) -> StateStore:
    """States at each row's fact and query positions (reduced, optionally de-rotated) and the readout.

    With ``world_size > 1`` rank ``r`` writes the pending shards ``r, r + world_size, ...``."""
    from tqdm.auto import tqdm

    e = cfg["extraction"]
    info = get_model_config(model)
    layers = list(range(info["num_layers"])) if e["layers"] is None else list(e["layers"])
    reduction = StateReduction(**e["reduction"])
    H, Dk, Dv = info["state_shape"]
    feat = (H, reduction.features(Dk, Dv))
    records = {"fact": feat, "query": feat}
    if e["readout"]:
        records["readout"] = (H, Dv)
    dtype = getattr(torch, e["dtype"])
    size = estimate_bytes(len(df), 2, len(layers), H, feat[1], dtype) + (
        estimate_bytes(len(df), 1, len(layers), H, Dv, dtype) if e["readout"] else 0)
    log.info("state store: %d rows x %d layers, about %.1f MB", len(df), len(layers), size / 2**20)
    from seqmem_shared.train import barrier

    meta = {"reduction": reduction.to_dict(), "derotate": e["derotate"]}
    if rank == 0:
        StateStore(root).create(len(df), e["shard_rows"], layers, records, dtype, meta=meta)
    barrier()
    store = StateStore(root)
    store.create(len(df), e["shard_rows"], layers, records, dtype, meta=meta)  # checks the layout
    extractor = RetNetStateExtractor(model, backend=e["backend"], state_dtype=torch.float32)
    pad = 0
    mine = store.pending()[rank::world_size]
    for shard in tqdm(mine, desc=f"extract (rank {rank})" if world_size > 1 else "extract", disable=not mine):
        parts: dict[str, list[torch.Tensor]] = {f"{r}.layer_{layer}": [] for r in records for layer in layers}
        for start in range(shard["start"], shard["stop"], e["batch_size"]):
            rows = df.iloc[start:min(start + e["batch_size"], shard["stop"])]
            T = max(len(x) for x in rows["input_ids"])
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for i, x in enumerate(rows["input_ids"]):
                ids[i, :len(x)] = torch.as_tensor(list(x))
                mask[i, :len(x)] = 1
            positions = torch.tensor(rows[["fact_position", "query_position"]].to_numpy(), dtype=torch.long)
            if e["readout"]:
                J = max(len(x) for x in rows["name_positions"])
                keys = torch.full((len(rows), J), -1, dtype=torch.long)
                for i, x in enumerate(rows["name_positions"]):
                    keys[i, :len(x)] = torch.as_tensor(list(x))
                readouts, states = extractor.extract_readouts(ids, positions, keys, mask, layers,
                                                              return_states=True)
                for layer in layers:
                    parts[f"readout.layer_{layer}"].append(readouts[layer][:, 1].cpu())  # at the query
            else:
                states = extractor.extract_states_at_positions(ids, positions, mask, layers)
            for layer, s in states.items():
                if e["derotate"]:
                    s = derotate_states(s, positions.to(s.device))
                s = reduction(s)
                parts[f"fact.layer_{layer}"].append(s[:, 0].cpu())
                parts[f"query.layer_{layer}"].append(s[:, 1].cpu())
        store.write_shard(shard, {k: torch.cat(v) for k, v in parts.items()})
    return store


def probe(cfg: dict[str, Any], store: StateStore, df, model: torch.nn.Module):
    """Probe accuracy per lag for every (layer, head) and every layer, on the held-out-name test split.

    Under torchrun each rank fits its share of the probe jobs (:mod:`retnet_forgetting.distributed`) and
    rank 0 returns the gathered table (other ranks None), equal to the one-process result."""
    from retnet_forgetting.distributed import JOB_COLUMN, any_rank, gather_frames, my_jobs

    p = cfg["probes"]
    device = next(model.parameters()).device
    y = torch.tensor(df["value_label"].to_numpy())
    lags = torch.tensor(df["target_lag"].to_numpy())
    split = df["split"].to_numpy()
    tr, va, te = (torch.as_tensor(split == s) for s in ("train", "val", "test"))
    C = int(y.max()) + 1
    layers = store.manifest["layers"]
    query = store.load("query")
    X = torch.stack([query[layer] for layer in layers], dim=0).to(device)  # [L, N, H, F]
    L, N, H, F = X.shape
    frames = []
    for group in p["groups"]:
        if group == "head":
            Xg = X.permute(0, 2, 1, 3).reshape(L * H, N, F)
            descs = [{"layer": layer, "head": h} for layer in layers for h in range(H)]
        elif group == "layer":
            Xg = X.reshape(L, N, H * F)
            descs = [{"layer": layer, "head": -1} for layer in layers]
        else:
            raise ValueError(f"probes.groups: {group!r} is not one of 'head', 'layer'")
        jobs = my_jobs(len(descs))
        Xg, descs = Xg[jobs], [{**descs[j], JOB_COLUMN: j} for j in jobs]
        for kind in p["kinds"]:
            if kind == "ridge":
                pr = fit_ridge(Xg[:, tr], y[tr], Xg[:, va], y[va], C)
            elif kind == "logistic":
                pr = fit_logistic(Xg[:, tr], y[tr], Xg[:, va], y[va], C, **p["logistic"], sync=any_rank)
            else:
                raise ValueError(f"probes.kinds: {kind!r} is not one of 'ridge', 'logistic'")
            frames.append(accuracy_by_lag(pr.predict(Xg[:, te]), y[te], lags[te], descs, f"{kind}_{group}"))
    if "readout" in store.manifest["records"]:
        R = store.load("readout")
        Rg = torch.stack([R[layer] for layer in layers]).permute(0, 2, 1, 3).reshape(L * H, N, -1)
        jobs = my_jobs(L * H)
        pred = nearest_centroid(Rg[jobs][:, tr], y[tr], Rg[jobs][:, te], C)
        descs = [{"layer": layers[j // H], "head": j % H, JOB_COLUMN: j} for j in jobs]
        frames.append(accuracy_by_lag(pred, y[te], lags[te], descs, "readout_head"))
    return gather_frames(frames)
