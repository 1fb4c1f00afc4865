"""Command line: ``retnet-forgetting run --config X.yaml`` and ``retnet-forgetting train-tiny``.

On several GPUs (or CPU processes, gloo): ``torchrun --nproc_per_node=N -m retnet_forgetting.cli run --config
X.yaml`` splits the extraction shards and the probe jobs over the ranks; rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

SET_HELP = "override one entry, e.g. --set model.name_or_path=DIR --set train.max_steps=500 (YAML values)"


def apply_overrides(cfg: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``cfg`` with each ``"section.key=value"`` of ``items`` set (``value`` parsed as YAML); a top-level
    key must exist, and every dotted prefix must name a mapping."""
    import yaml

    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set {item!r}: expected section.key=value")
        if parts[0] not in cfg:
            raise ValueError(f"--set {item!r}: unknown key {parts[0]!r}; expected one of {sorted(cfg)}")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a mapping in the config")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(text)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retnet-forgetting", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="dataset -> state extraction -> probes -> analysis (resumable)")
    run.add_argument("--config", required=True, help="YAML file (see configs/quick.yaml)")
    run.add_argument("--out-dir", help="override out_dir of the config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    tiny = sub.add_parser("train-tiny", help="train a small RetNet on recall data plus filler")
    tiny.add_argument("--config", help="YAML file with a train_tiny section (see configs/train_tiny.yaml)")
    tiny.add_argument("--out-dir", help="override out_dir")
    tiny.add_argument("--max-steps", type=int, help="override train.max_steps")
    tiny.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "run":
        from seqmem_shared.train import ranks_finish_together

        from retnet_forgetting.pipeline import load_config
        from retnet_forgetting.pipeline import run as run_pipeline

        cfg = apply_overrides(load_config(args.config), args.set)
        if args.out_dir:
            cfg["out_dir"] = args.out_dir
        with ranks_finish_together():  # the other ranks wait for rank 0's analysis
            report = run_pipeline(cfg)
        if report is not None:  # rank 0 (or a single process)
            print(report)
        return 0
    from retnet_forgetting.train import load_train_config, train_tiny

    cfg = apply_overrides(load_train_config(args.config), args.set)
    if args.out_dir:
        cfg["out_dir"] = args.out_dir
    if args.max_steps:
        cfg["train"]["max_steps"] = args.max_steps
        cfg["train"]["warmup_steps"] = min(cfg["train"].get("warmup_steps", 0), args.max_steps)
    print(train_tiny(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
