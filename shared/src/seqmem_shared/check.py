"""``seqmem-check``: print the environment and which fast backends are usable, and why not.

The first thing to run when something is slow: it says whether the Triton kernels, mamba_ssm,
flash-attn, fla, causal-conv1d, accelerated-scan and Liger are importable here, and what failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import json
import platform
import sys
from typing import Any

# (import name, what seqmem uses it for)
OPTIONAL = [
    ("triton", "seqmem_shared RMSNorm / cross-entropy kernels"),
    ("mamba_ssm.ops.triton.ssd_combined", "polar-mem-mamba Mamba-2 chunk scan"),
    ("causal_conv1d", "polar-mem-mamba short convolution"),
    ("flash_attn", "polar-mem-mamba attention"),
    ("fla", "retnet-forgetting RetNet kernels"),
    ("accelerated_scan.scalar", "titans-pytorch associative scan"),
    ("liger_kernel", "benchmark peer"),
    ("quimb", "bilinear-toys circuit analysis"),
    ("datasets", "Hugging Face streaming text data"),
]
# Probes that must go through a package's own loader (mamba-ssm 2.x needs its Mamba-1 extension stubbed).
LOADERS = {"mamba_ssm.ops.triton.ssd_combined": ("polar_mem_mamba.ops.ssd.mamba_ssm", "load_chunk_scan")}
DISTRIBUTIONS = ["seqmem-shared", "polar-mem-mamba", "titans-pytorch", "bilinear-toys", "retnet-forgetting"]


def _probe(module: str) -> dict[str, Any]:
    try:
        if module in LOADERS and importlib.util.find_spec(LOADERS[module][0].split(".")[0]) is not None:
            loader_module, loader = LOADERS[module]
            if getattr(importlib.import_module(loader_module), loader)() is None:
                raise ImportError(f"{loader_module}.{loader}() found no usable kernel (see the log above)")
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - report whatever broke
        first = str(exc).splitlines()[0] if str(exc) else ""
        return {"usable": False, "why": f"{type(exc).__name__}: {first}"}
    top = sys.modules.get(module.split(".")[0], mod)
    return {"usable": True, "version": getattr(top, "__version__", None)}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """The environment report as a JSON-serializable dict."""
    import torch

    from seqmem_shared.backends import triton_status

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": {
            "available": cuda,
            "torch_cuda": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda else [],
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        },
        "packages": {d: _version(d) for d in DISTRIBUTIONS},
        "optional": {},
    }
    for module, purpose in OPTIONAL:
        report["optional"][module] = {"for": purpose, **_probe(module)}
    ok, why = triton_status()
    report["triton_kernels"] = {"usable": ok, "why": why}
    report["torch_muon"] = hasattr(torch.optim, "Muon")
    return report


def _print(report: dict[str, Any]) -> None:
    cuda = report["cuda"]
    print(f"python {report['python']}  torch {report['torch']}  ({report['platform']})")
    gpus = ", ".join(cuda["devices"]) or "none"
    print(f"CUDA available: {cuda['available']}  "
          f"(torch built for CUDA {cuda['torch_cuda']}; devices: {gpus})")
    print("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in report["packages"].items()))
    tk = report["triton_kernels"]
    print(f"seqmem Triton kernels: {'yes' if tk['usable'] else 'no'} ({tk['why']})")
    print(f"torch.optim.Muon: {'yes' if report['torch_muon'] else 'no (seqmem Newton-Schulz used)'}")
    print("optional fast paths:")
    width = max(len(m) for m in report["optional"])
    for module, info in report["optional"].items():
        version = info.get("version") or ""
        state = f"yes {version}".strip() if info["usable"] else f"no  {info['why']}"
        print(f"  {module:<{width}}  {state}   [{info['for']}]")
    if not cuda["available"]:
        print("No CUDA device: every op runs its pure-PyTorch reference.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqmem-check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
