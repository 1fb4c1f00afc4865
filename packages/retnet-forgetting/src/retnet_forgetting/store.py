"""A sharded, memory-mappable, resumable store of (reduced) states: safetensors shards + a JSON manifest.

Layout of ``root/``: ``manifest.json`` (layers, records with their feature shapes, dtype, shard row
ranges and which are done) and ``shard_{i:05d}.safetensors`` holding, for rows ``[start, stop)`` of
the dataset, ``"{record}.layer_{l}"`` tensors ``[rows, *shape]`` plus ``"row"`` (the row indices). A
shard is written atomically (temp file, then rename), so a shard file that exists is complete: an
interrupted run resumes with the missing shards, and ranks of a torchrun job can write disjoint shards
of one store. ``load`` memory-maps the shards (safetensors) and concatenates what is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.io import atomic_write, atomic_write_json


def estimate_bytes(num_rows: int, records: int, layers: int, heads: int, features: int,
                   dtype: torch.dtype = torch.float16) -> int:
    """Bytes a store will take: ``rows * records * layers * heads * features * itemsize``."""
    return num_rows * records * layers * heads * features * torch.empty(0, dtype=dtype).element_size()


class StateStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] | None = (json.loads(self.manifest_path.read_text())
                                                if self.manifest_path.exists() else None)

    def create(self, num_rows: int, shard_rows: int, layers: Iterable[int],
               records: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float16,
               meta: dict[str, Any] | None = None) -> None:
        """Start a store, or check that an existing one was made with the same layout (resume)."""
        spec = {"num_rows": num_rows, "shard_rows": shard_rows, "layers": sorted(int(x) for x in layers),
                "records": {name: list(shape) for name, shape in records.items()},
                "dtype": str(dtype).removeprefix("torch."), "meta": meta or {}}
        if self.manifest is not None:
            old = {k: self.manifest[k] for k in spec}
            if json.loads(json.dumps(old)) != json.loads(json.dumps(spec, default=str)):
                diff = [k for k in spec
                        if json.dumps(old[k], default=str) != json.dumps(spec[k], default=str)]
                raise ValueError(f"{self.root}: existing store differs in {diff}; use a new directory")
            return
        shards = [{"file": f"shard_{i:05d}.safetensors", "start": s, "stop": min(s + shard_rows, num_rows)}
                  for i, s in enumerate(range(0, num_rows, shard_rows))]
        self.manifest = {**spec, "shards": shards}
        self._save_manifest()

    def _save_manifest(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)

    def pending(self) -> list[dict[str, Any]]:
        """Shards still to write (each ``{"file", "start", "stop"}``)."""
        self._require()
        return [s for s in self.manifest["shards"] if not (self.root / s["file"]).exists()]

    def write_shard(self, shard: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write ``{"{record}.layer_{l}": [rows, ...]}`` for ``shard``'s rows (atomically)."""
        from safetensors.torch import save_file

        self._require()
        rows = shard["stop"] - shard["start"]
        dtype = getattr(torch, self.manifest["dtype"])
        m = self.manifest
        expected = {f"{r}.layer_{layer}": shape for r, shape in m["records"].items() for layer in m["layers"]}
        if set(tensors) != set(expected):
            raise ValueError(f"shard tensors: expected keys {sorted(expected)}, got {sorted(tensors)}")
        out = {}
        for k, v in tensors.items():
            want = (rows, *expected[k])
            if tuple(v.shape) != want:
                raise ValueError(f"{k}: expected shape {want}, got {tuple(v.shape)}")
            out[k] = v.detach().to("cpu", dtype).contiguous()
        out["row"] = torch.arange(shard["start"], shard["stop"])
        atomic_write(self.root / shard["file"], lambda p: save_file(out, str(p)))

    def load(self, record: str, layers: Iterable[int] | None = None, dtype: torch.dtype = torch.float32,
             ) -> dict[int, torch.Tensor]:
        """``{layer: [num_rows, ...]}`` for ``record``, from the (memory-mapped) finished shards."""
        from safetensors import safe_open

        self._require()
        if self.pending():
            raise RuntimeError(f"{self.root}: {len(self.pending())} shards unfinished; run extraction again")
        layers = self.manifest["layers"] if layers is None else list(layers)
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        for shard in self.manifest["shards"]:
            with safe_open(str(self.root / shard["file"]), framework="pt") as f:
                for layer in layers:
                    parts[layer].append(f.get_tensor(f"{record}.layer_{layer}").to(dtype))
        return {layer: torch.cat(p) for layer, p in parts.items()}

    def _require(self) -> None:
        if self.manifest is None:
            raise FileNotFoundError(f"{self.root}: no manifest.json (create the store first)")


def stream_states_to_store(extractor: Any, input_ids: torch.Tensor, root: str | Path,
                           layers: Iterable[int] | None = None, reduce: Any = None,
                           dtype: torch.dtype = torch.bfloat16) -> dict[int, StateStore]:
    """The state at every position of ONE sequence (``input_ids [1, T]`` or ``[T]``), streamed to disk.

    One store per layer at ``root/layer_{l}`` (rows = positions, one shard per ``position_block`` of the
    extractor, record ``"state"``), written while the single pass runs, so memory holds one block at a
    time (retnet-2.7B: 2.6 MB per position and layer in bf16). Layers whose shards all exist are not
    extracted again (resume). ``reduce`` maps ``[1, n, H, Dk, Dv]`` states to ``[1, n, ...]`` features.
    """
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one sequence [1, T] or [T], "
                         f"got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    layers = list(range(extractor.num_layers)) if layers is None else sorted(int(x) for x in layers)
    probe = torch.zeros(1, 1, *extractor_state_shape(extractor))
    shape = tuple((reduce(probe) if reduce is not None else probe).shape[2:])
    stores = {}
    for layer in layers:
        store = StateStore(Path(root) / f"layer_{layer}")
        store.create(T, extractor.position_block, [layer], {"state": shape}, dtype,
                     meta={"positions": "rows are token positions"})
        stores[layer] = store
    todo = [layer for layer in layers if stores[layer].pending()]

    def sink(layer: int, positions: torch.Tensor, states: torch.Tensor) -> None:
        start = int(positions[0, 0])
        shard = next(s for s in stores[layer].manifest["shards"] if s["start"] == start)
        if not (stores[layer].root / shard["file"]).exists():
            stores[layer].write_shard(shard, {f"state.layer_{layer}": states[0]})

    if todo:
        extractor.extract_states_single_pass(input_ids, layers=todo, sink=sink, reduce=reduce)
    return stores


def extractor_state_shape(extractor: Any) -> tuple[int, int, int]:
    """``(H, Dk, Dv)`` of the extractor's model."""
    attn = extractor.layers[0].attn
    return attn.num_heads, attn.head_k_dim, attn.head_v_dim
