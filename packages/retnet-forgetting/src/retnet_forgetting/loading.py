"""Loading RetNet models: fla's Hugging Face classes when usable, else the pure-PyTorch reference.

``load_retnet_model("fla-hub/retnet-2.7B-100B")`` (hub name or local directory with ``config.json`` +
safetensors) or ``load_retnet_model(RetNetConfig(...))`` (random initialization). Both implementations
have the same module names and state-dict keys, so everything downstream works with either.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.backends import default_device, optional_import
from torch import nn

from retnet_forgetting.ops.retention import check_backend, retention_log_decay
from retnet_forgetting.reference import RETNET_2_7B, RetNetConfig, RetNetForCausalLM

log = logging.getLogger("seqmem.retnet")

DEFAULT_MODEL = "fla-hub/retnet-2.7B-100B"
IMPLEMENTATIONS = ("auto", "fla", "reference")


def load_retnet_model(name_or_path: str | Path | RetNetConfig | dict = DEFAULT_MODEL,
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                      implementation: str = "auto", tokenizer: bool = True,
                      backend: str = "auto") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None).

    ``implementation``: ``"fla"`` (fla's ``RetNetForCausalLM``; needs fla and, to run, CUDA),
    ``"reference"`` (this package's pure-PyTorch model) or ``"auto"`` (fla when importable and the device
    is CUDA). ``device`` defaults to CUDA when available. A config builds randomly initialized weights.
    ``backend``: the reference model's retention kernels (``"auto"``: fla's on CUDA; ``"torch"``: PyTorch
    only, no Triton compilation; ``"fla"``); fla's own model takes only ``"auto"``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    check_backend(backend)
    device = default_device(device)
    use_fla = implementation == "fla" or (implementation == "auto" and device.type == "cuda"
                                          and optional_import("fla.models", "RetNet models") is not None)
    if use_fla and optional_import("fla.models", "RetNet models") is None:
        raise ImportError("implementation='fla' needs fla: pip install flash-linear-attention "
                          "(or use implementation='reference')")

    if isinstance(name_or_path, (RetNetConfig, dict)):
        config = (name_or_path if isinstance(name_or_path, RetNetConfig)
                  else RetNetConfig.from_dict(name_or_path))
        with torch.device(device):  # initialize where the model will live (2.7B: 11 GB in fp32)
            model = _fla_from_config(config) if use_fla else RetNetForCausalLM(config)
        return _with_backend(model.to(dtype=dtype).eval(), backend), None

    path = _local_dir(str(name_or_path))
    config = RetNetConfig.from_pretrained(path)
    if "retnet-2.7b" in str(name_or_path).lower():
        verify_2_7b_config(config)
    if use_fla:
        import transformers
        from packaging.version import Version

        # transformers >= 4.56 calls it ``dtype``; older versions ``torch_dtype``
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **{key: dtype})
    else:
        model = RetNetForCausalLM.from_pretrained(path, dtype=dtype)
    model = _with_backend(model.to(device).eval(), backend)
    tok = _tokenizer(path) if tokenizer else None
    log.info("loaded %s (%s, %.2fM parameters) on %s", name_or_path, type(model).__module__,
             sum(p.numel() for p in model.parameters()) / 1e6, device)
    return model, tok


def _with_backend(model: nn.Module, backend: str) -> nn.Module:
    if backend == "auto":
        return model
    if not isinstance(model, RetNetForCausalLM):
        raise ValueError(f"backend={backend!r}: expected 'auto' for fla's model (other backends need "
                         "implementation='reference')")
    model.retention_backend = backend
    return model


def verify_2_7b_config(config: RetNetConfig) -> None:
    """Raise when a config claimed to be retnet-2.7B differs from its known architecture."""
    wrong = {k: (getattr(config, k), v) for k, v in RETNET_2_7B.items()
             if k in ("hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v", "vocab_size")
             and getattr(config, k) != v}
    if wrong:
        raise ValueError("retnet-2.7B config mismatch (field: got, expected): "
                         + ", ".join(f"{k}: {a}, {b}" for k, (a, b) in wrong.items()))
    n = config.num_parameters()
    if abs(n / 1e9 - 2.72) > 0.01:
        raise ValueError(f"retnet-2.7B config gives {n / 1e9:.3f}B parameters: expected 2.72B")


def to_fla_config(config: RetNetConfig) -> Any:
    """fla's ``RetNetConfig`` with the same fields."""
    from fla.models import RetNetConfig as FlaRetNetConfig

    d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    return FlaRetNetConfig(**d)


def _fla_from_config(config: RetNetConfig) -> nn.Module:
    from fla.models import RetNetForCausalLM as FlaRetNetForCausalLM

    return FlaRetNetForCausalLM(to_fla_config(config))


def _local_dir(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a RetNet checkpoint directory)")
        return path
    if path.exists() or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: not a checkpoint directory nor a hub name "
                                f"like {DEFAULT_MODEL!r}")
    hub = optional_import("huggingface_hub", "downloading checkpoints")
    if hub is None:
        raise ImportError(f"{name_or_path}: huggingface_hub is needed to fetch hub checkpoints")
    try:
        patterns = ["*.json", "*.safetensors", "*.model"]
        return Path(hub.snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no disk: one clear message
        raise OSError(f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(exc).__name__}); "
                      f"offline? Download it elsewhere (huggingface-cli download {name_or_path} "
                      "--local-dir DIR) and pass DIR") from exc


def _tokenizer(path: Path) -> Any:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def get_model_config(model: nn.Module) -> dict[str, Any]:
    """Architecture facts of a loaded RetNet (reference or fla): sizes, state shape, decays, half-lives."""
    c = model.config
    H = c.num_heads
    dk = round(c.hidden_size * c.expand_k) // H
    dv = round(c.hidden_size * c.expand_v) // H
    log_gamma = retention_log_decay(H)
    param = next(model.parameters())
    return {
        "implementation": "fla" if type(model).__module__.startswith("fla") else "reference",
        "num_layers": c.num_hidden_layers, "num_heads": H, "hidden_size": c.hidden_size,
        "head_k_dim": dk, "head_v_dim": dv, "state_shape": (H, dk, dv), "vocab_size": c.vocab_size,
        "gammas": log_gamma.exp().tolist(),
        "half_lives": (math.log(0.5) / log_gamma).tolist(),
        "state_bytes_per_position_fp32": 4 * c.num_hidden_layers * H * dk * dv,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(param.dtype), "device": str(param.device),
    }


def print_model_structure(model: nn.Module, max_depth: int = 5, print_fn: Any = print) -> str:
    """Module tree down to ``max_depth`` with parameter counts; printed and returned."""
    lines = []
    for name, module in model.named_modules():
        depth = name.count(".") + 1 if name else 0
        if depth > max_depth or any(p.isdigit() and p != "0" for p in name.split(".")):
            continue
        n = sum(p.numel() for p in module.parameters())
        lines.append(f"{'  ' * depth}{name or type(model).__name__}: {type(module).__name__} ({n:,} params)")
    n_layers = len(getattr(getattr(model, "model", model), "layers", []))
    if n_layers > 1:
        lines.append(f"  (layers 1..{n_layers - 1} repeat layer 0)")
    text = "\n".join(lines)
    print_fn(text)
    return text
