"""Saving and loading toy transformers: ``{dataset}_{model_type}_config.json`` +
``toy_transformer_{dataset}_{model_type}.safetensors`` (atomic writes), and the seed's ``.pt`` state dicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from seqmem_shared.io import atomic_path, atomic_write_json

from bilinear_toys.models import ModelConfig, ToyTransformer


def checkpoint_paths(out_dir: str | Path, dataset: str, model_type: str) -> tuple[Path, Path]:
    """``(config.json, weights.safetensors)`` paths for a run."""
    out = Path(out_dir)
    return (out / f"{dataset}_{model_type}_config.json",
            out / f"toy_transformer_{dataset}_{model_type}.safetensors")


def save_model(model: ToyTransformer, out_dir: str | Path, dataset: str, extra: dict | None = None
               ) -> tuple[Path, Path]:
    """Write the config (plus ``extra`` keys such as final losses) and the weights; returns both paths."""
    from safetensors.torch import save_file

    cfg_path, weights_path = checkpoint_paths(out_dir, dataset, model.config.model_type)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(cfg_path, {**model.config.to_dict(), **(extra or {})})
    return cfg_path, weights_path


_SEED_KEYS = [
    (re.compile(r"^layers\.(\d+)\.attn\.(q|k|v|o)\.(weight|bias)$"), r"blocks.\1.attn.\2.\3"),
    (re.compile(r"^layers\.(\d+)\.(q|k|v|o)\.(weight|bias)$"), r"blocks.\1.attn.\2.\3"),
    (re.compile(r"^layers\.(\d+)\.bilinear\.proj1\.(weight|bias)$"), r"blocks.\1.mlp.left.\2"),
    (re.compile(r"^layers\.(\d+)\.bilinear\.proj2\.(weight|bias)$"), r"blocks.\1.mlp.right.\2"),
    (re.compile(r"^layers\.(\d+)\.bilinear\.down\.(weight|bias)$"), r"blocks.\1.mlp.down.\2"),
]
_SEED_DROPPED = re.compile(r"(rotary\.|mask\.mask|^head\.weight$)")
_SEED_QK_NORM = re.compile(r"^layers\.(\d+)\.(?:attn\.)?norm\.weight$")


def convert_seed_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Map the seed's ``ToyTransformer`` keys (``layers.{i}.q``, ``bilinear.proj1``, ...) to ours.

    Returns ``(state_dict, config overrides)`` (``bias``/``qk_norm``/``tie_weights`` as found). The seed's
    RoPE tables and masks are rebuilt, not loaded; its per-head qk RMSNorm weight (shared by q and k) is
    copied to both ``q_norm`` and ``k_norm``.
    """
    out: dict[str, torch.Tensor] = {}
    tied = "head.weight" not in state or torch.equal(state["head.weight"], state.get("embed.weight"))
    for key, value in state.items():
        if key == "embed.weight":
            out[key] = value
            continue
        if key == "head.weight" and not tied:
            out["unembed.weight"] = value
            continue
        if _SEED_DROPPED.search(key):
            continue
        m = _SEED_QK_NORM.match(key)
        if m:
            out[f"blocks.{m.group(1)}.attn.q_norm.weight"] = value
            out[f"blocks.{m.group(1)}.attn.k_norm.weight"] = value.clone()
            continue
        for pattern, repl in _SEED_KEYS:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            raise ValueError(f"seed state dict: unexpected key {key!r}; expected embed/head/layers.* keys")
    overrides = {"bias": any(k.endswith(".bias") and ".attn." in k for k in out),
                 "qk_norm": any("q_norm" in k for k in out), "tie_weights": tied}
    return out, overrides


def load_model(path: str | Path, config: ModelConfig | str | Path | None = None,
               map_location: str | torch.device = "cpu") -> ToyTransformer:
    """Load a ``.safetensors`` (ours) or ``.pt`` (ours or the seed's) checkpoint.

    ``config`` is a :class:`ModelConfig`, a path to the JSON, or None: the JSON beside the weights
    (``toy_transformer_{dataset}_{model_type}.* -> {dataset}_{model_type}_config.json``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    if config is None:
        m = re.match(r"^toy_transformer_(.+)\.(safetensors|pt)$", path.name)
        if not m:
            raise ValueError(f"checkpoint {path.name!r}: expected toy_transformer_<dataset>_<model_type>"
                             ".safetensors|.pt, or pass config=")
        config = path.parent / f"{m.group(1)}_config.json"
    if not isinstance(config, ModelConfig):
        cfg_path = Path(config)
        if not cfg_path.is_file():
            raise FileNotFoundError(f"config {str(cfg_path)!r}: no such file")
        config = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(map_location))
    else:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a seqmem_shared.train checkpoint
        if any(k.startswith("layers.") for k in state):
            state, overrides = convert_seed_state_dict(state)
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    model = ToyTransformer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path.name!r}: does not match {config.model_type} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(map_location).eval()
