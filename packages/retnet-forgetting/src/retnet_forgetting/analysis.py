"""Forgetting analysis: accuracy vs lag, per-head memory half-lives vs the retention decay, plots, report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retnet_forgetting.ops.retention import retention_log_decay


def accuracy_by_lag(pred: torch.Tensor, y: torch.Tensor, lags: torch.Tensor, groups: list[dict[str, Any]],
                    probe: str):
    """Long table (pandas) of accuracy per group and lag: ``pred [G, N]``, ``y [N]``, ``lags [N]``;
    ``groups[g]`` describes group g (e.g. ``{"layer": 3, "head": 1}``)."""
    import pandas as pd

    correct = (pred.cpu() == y.cpu()[None]).float()
    rows = []
    for lag in sorted(set(lags.tolist())):
        sel = lags.cpu() == lag
        acc = correct[:, sel].mean(1)
        for g, desc in enumerate(groups):
            rows.append({**desc, "probe": probe, "lag": int(lag), "accuracy": float(acc[g]),
                         "n": int(sel.sum())})
    return pd.DataFrame(rows)


def half_life(lags: np.ndarray, acc: np.ndarray, chance: float) -> float:
    """Lag at which accuracy first falls halfway from its shortest-lag value to chance (log-lag linear
    interpolation); ``inf`` when it never does, ``nan`` when there is nothing to forget."""
    order = np.argsort(lags)
    lags, acc = np.asarray(lags, float)[order], np.asarray(acc, float)[order]
    start = acc[0]
    if start - chance < 0.05:
        return math.nan
    target = chance + (start - chance) / 2
    for i in range(1, len(lags)):
        if acc[i] <= target:
            a0, a1 = acc[i - 1], acc[i]
            frac = (a0 - target) / (a0 - a1) if a0 != a1 else 0.0
            return float(math.exp(math.log(lags[i - 1]) + frac * (math.log(lags[i]) - math.log(lags[i - 1]))))
    return math.inf


def decay_half_lives(num_heads: int) -> list[float]:
    """Half-life of each head's retention decay: ``ln 0.5 / ln gamma_h`` tokens (22 ... 11k for 10 heads)."""
    return (math.log(0.5) / retention_log_decay(num_heads)).tolist()


def half_life_table(curves, chance: float, num_heads: int):
    """Per (probe, layer, head) memory half-life next to the head's decay half-life."""
    import pandas as pd

    theory = decay_half_lives(num_heads)
    rows = []
    for (probe, layer, head), g in curves.groupby(["probe", "layer", "head"]):
        rows.append({"probe": probe, "layer": int(layer), "head": int(head),
                     "half_life": half_life(g["lag"].to_numpy(), g["accuracy"].to_numpy(), chance),
                     "decay_half_life": theory[int(head)] if head >= 0 else math.nan,
                     "accuracy_at_min_lag": float(g.sort_values("lag")["accuracy"].iloc[0])})
    return pd.DataFrame(rows)


def plot_curves(curves, out_dir: str | Path, chance: float, num_heads: int) -> list[Path]:
    """PNG plots: accuracy vs lag per layer (one line per head, gamma_h^lag dashed), and a layer x head
    heatmap of accuracy at the longest lag. matplotlib is imported here only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    log_g = retention_log_decay(num_heads).numpy()
    for probe, pc in curves.groupby("probe"):
        layers = sorted(pc["layer"].unique())
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False, sharey=True)
        for ax, layer in zip(axes[0], layers):
            for head, g in pc[pc["layer"] == layer].groupby("head"):
                g = g.sort_values("lag")
                label = "all heads" if head < 0 else f"head {head}"
                line = ax.plot(g["lag"], g["accuracy"], marker="o", label=label)[0]
                if head >= 0:
                    lags = np.geomspace(max(1, g["lag"].min()), g["lag"].max(), 50)
                    top = g["accuracy"].iloc[0]
                    decay = np.exp((lags - lags[0]) * log_g[head])  # gamma_h^lag, 1 at the shortest lag
                    ax.plot(lags, chance + (top - chance) * decay, ls="--", lw=0.8, color=line.get_color())
            ax.axhline(chance, color="gray", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{probe}: layer {layer}")
            ax.set_xlabel("lag (tokens)")
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_lag_{probe}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
        heads = pc[pc["head"] >= 0]
        if len(heads):
            longest = heads[heads["lag"] == heads["lag"].max()].pivot_table(index="layer", columns="head",
                                                                            values="accuracy")
            fig, ax = plt.subplots(figsize=(1 + 0.6 * longest.shape[1], 1 + 0.4 * longest.shape[0]))
            im = ax.imshow(longest.to_numpy(), aspect="auto", vmin=chance, vmax=1, cmap="viridis")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{probe}: accuracy at lag {int(heads['lag'].max())}")
            fig.colorbar(im)
            fig.tight_layout()
            path = out_dir / f"heatmap_{probe}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def write_report(out_dir: str | Path, curves, half_lives, info: dict[str, Any], plots: list[Path]) -> Path:
    """``report.md`` with the setup, the half-life table and the plots."""
    from seqmem_shared.io import atomic_write_text

    out_dir = Path(out_dir)
    lines = ["# RetNet forgetting report", "", "## Setup", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Accuracy at each lag (best group per probe)", ""]
    best = curves.groupby(["probe", "lag"])["accuracy"].max().unstack(0)
    lines += [_markdown(best.reset_index()), ""]
    lines += ["## Memory half-life per head vs retention decay half-life", "",
              "Half-life: lag at which probe accuracy falls halfway from its shortest-lag value to chance "
              "(inf: never within the tested lags; nan: nothing decodable). "
              "Decay half-life: ln 0.5 / ln gamma_h.",
              ""]
    table = half_lives.sort_values(["probe", "layer", "head"])
    lines += [_markdown(table), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _markdown(df) -> str:
    """A pandas frame as a Markdown table (floats with 3 decimals)."""
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
