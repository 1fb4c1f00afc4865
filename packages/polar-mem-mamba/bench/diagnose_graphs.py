"""Which part of a sweep model breaks CUDA-graph replay? Captures pieces of increasing size (the SSD
reference, the short convolution, one Mamba-2 mixer, one BiMamba block, the encoder, the decoder, the
whole model, a lockstep training step with AdamW, then a lockstep group: several runs of the grid side
by side, one graph and stream each) each as forward + backward in a CUDA graph, in its own subprocess
(a sticky CUDA error such as "illegal instruction" ends the process), replays it and compares the loss
and gradients with the eager ones. Prints one JSON line per probe and a summary.

    python packages/polar-mem-mamba/bench/diagnose_graphs.py \\
        --config packages/polar-mem-mamba/configs/capacity_cliff_small.yaml --architecture mamba2
    python packages/polar-mem-mamba/bench/diagnose_graphs.py ... --probe ssd   # one probe, this process

Without CUDA every probe runs its eager step only (a smoke test of the probes themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
from polar_mem_mamba import Config
from polar_mem_mamba.data import MQARBatches
from polar_mem_mamba.modules.blocks import BiMambaBlock
from polar_mem_mamba.modules.mamba2 import Mamba2
from polar_mem_mamba.ops.conv import causal_conv1d_reference
from polar_mem_mamba.ops.ssd import ssd_chunked
from polar_mem_mamba.sweep import load_sweep
from polar_mem_mamba.train import build_model, mqar_loss

Step = Callable[[], torch.Tensor]


def _config(args: argparse.Namespace) -> Config:
    only = [f"architecture={args.architecture}", f"num_pairs={args.num_pairs}", f"d_state={args.d_state}"]
    _, configs = load_sweep(args.config, [], only)
    if not configs:
        raise SystemExit(f"--config {args.config}: no run with {', '.join(only)}")
    return configs[0].replace(batch_size=args.batch_size)


def _group(args: argparse.Namespace) -> list[Config]:
    """The first ``--group-size`` runs of the grid at ``--num-pairs`` and ``--d-state`` (every
    architecture and learning rate there), as a queue worker would train them in lockstep."""
    _, configs = load_sweep(args.config, [], [f"num_pairs={args.num_pairs}", f"d_state={args.d_state}"])
    return [c.replace(batch_size=args.batch_size) for c in configs[:args.group_size]]


def _leaf(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device).requires_grad_()


def _probes(config: Config, device: torch.device) -> dict[str, tuple[Step, list[torch.Tensor]]]:
    """name -> (step returning a scalar loss after ``backward``, tensors whose grads are compared)."""
    torch.manual_seed(0)
    model = build_model(config, device=device)
    mixer = next((m for m in model.modules() if isinstance(m, Mamba2)), None)
    if mixer is None:
        raise SystemExit(f"--architecture {config.architecture}: has no Mamba-2 mixer to diagnose")
    bimamba = next((m for m in model.modules() if isinstance(m, BiMambaBlock)), None)
    b, d = config.batch_size, config.d_model
    length = 2 * config.num_pairs + 2  # the encoder's length
    heads, p, n = mixer.nheads, mixer.headdim, mixer.d_state
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def on(fn: Callable[[], torch.Tensor]) -> Step:
        """Forward ``fn`` under autocast, backward of the mean square of its output."""
        def step() -> torch.Tensor:
            with autocast:
                loss = fn().float().square().mean()
            loss.backward()
            return loss.detach()
        return step

    ssd_in = [_leaf(b, length, heads, p, device=device), _leaf(b, length, heads, device=device),
              _leaf(b, length, 1, n, device=device), _leaf(b, length, 1, n, device=device)]
    a = -torch.rand(heads, device=device) - 0.5
    channels = mixer.d_inner + 2 * n
    conv_in = [_leaf(b, channels, length, device=device), _leaf(channels, 4, device=device)]
    hidden = _leaf(b, length, d, device=device)
    dec_in = _leaf(b, config.num_queries + 1, d, device=device)
    batch = {k: v.to(device) for k, v in MQARBatches(config, b)(0).items()}
    loss_fn = mqar_loss(config)
    params = [q for q in model.parameters() if q.requires_grad]
    probes: dict[str, tuple[Step, list[torch.Tensor]]] = {
        "ssd": (on(lambda: ssd_chunked(ssd_in[0], ssd_in[1], a, ssd_in[2], ssd_in[3], config.chunk_size,
                                       dt_softplus=True)), ssd_in),
        "conv": (on(lambda: causal_conv1d_reference(*conv_in)), conv_in),
        "mamba2_mixer": (on(lambda: mixer(hidden)), [hidden, *mixer.parameters()]),
        "encoder": (on(lambda: model.encoder(hidden)), [hidden]),
        "decoder": (on(lambda: model.decoder(dec_in, hidden)), [hidden, dec_in]),
    }
    if bimamba is not None:
        probes["bimamba_block"] = (on(lambda: bimamba(hidden)), [hidden])

    def whole() -> torch.Tensor:
        with autocast:
            loss, _ = loss_fn(model, batch)
        loss.backward()
        return loss.detach()

    probes["model"] = (whole, params)
    return probes


def _grads(tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [None if t.grad is None else t.grad.detach().clone() for t in tensors]


def _zero(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def run_probe(name: str, config: Config, group: list[Config] | None = None) -> dict:
    """Eager step, then (on CUDA) capture + 3 replays; the largest |graph - eager| over loss and grads.
    ``lockstep_group`` trains ``group`` (default: ``config`` alone) side by side."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "lockstep_step":
        return _lockstep_probe([config], device)
    if name == "lockstep_group":
        return _lockstep_probe(group or [config], device)
    step, tensors = _probes(config, device)[name]
    if device.type != "cuda":
        _zero(tensors)
        return {"probe": name, "eager_loss": float(step()), "graph": "skipped (no CUDA)"}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _zero(tensors)
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    eager_grads = _grads(tensors)
    _zero(tensors)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    diffs = [float((captured - eager).abs())]
    diffs += [float((g - e).abs().max()) for g, e in zip(_grads(tensors), eager_grads)
              if g is not None and e is not None]
    return {"probe": name, "eager_loss": float(eager), "graph": "ok", "max_abs_diff": max(diffs)}


def _lockstep_probe(configs: list[Config], device: torch.device) -> dict:
    """The real lockstep loop (3 eager steps, capture, replays on one stream per run) for ``configs``
    trained together, graphs vs eager: the largest difference of a run's final training loss."""
    from polar_mem_mamba.lockstep import train_lockstep

    losses = {}
    for graphs in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            cfgs = [c.replace(out_dir=tmp, run_name=f"{i}", max_steps=8, log_every=8, eval_every=0,
                              warmup_steps=0) for i, c in enumerate(configs)]
            losses[graphs] = [m["loss"] for _, m in train_lockstep(cfgs, device=device, graphs=graphs)]
    return {"probe": "lockstep_group" if len(configs) > 1 else "lockstep_step", "runs": len(configs),
            "architectures": sorted({c.architecture for c in configs}), "eager_loss": losses[False][0],
            "graph": "ok" if device.type == "cuda" else "skipped (no CUDA)",
            "max_abs_diff": max(abs(a - b) for a, b in zip(losses[True], losses[False]))}


PROBES = ("ssd", "conv", "mamba2_mixer", "bimamba_block", "encoder", "decoder", "model", "lockstep_step",
          "lockstep_group")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep YAML; the model is taken from its grid")
    parser.add_argument("--architecture", default="mamba2")
    parser.add_argument("--num-pairs", type=int, default=32)
    parser.add_argument("--d-state", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=8, help="runs in the lockstep_group probe")
    parser.add_argument("--probe", choices=PROBES, help="run this probe here (default: each in a subprocess)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per probe subprocess")
    args = parser.parse_args()
    config = _config(args)
    if args.probe:
        group = _group(args) if args.probe == "lockstep_group" else None
        print(json.dumps(run_probe(args.probe, config, group)), flush=True)
        return
    results = []
    for name in PROBES:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--probe", name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            error = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            row = (json.loads(lines[-1]) if proc.returncode == 0 and lines
                   else {"probe": name, "graph": "error", "error": error})
        except subprocess.TimeoutExpired:
            row = {"probe": name, "graph": "timeout"}
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps({"bench": "polar_mem_mamba.diagnose_graphs", "architecture": config.architecture,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
