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
    for probe, pc in curves[curves["layer"] >= 0].groupby("probe"):
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
        paths.append(_save(fig, out_dir / f"accuracy_vs_lag_{probe}.png"))
        heads = pc[pc["head"] >= 0]
        if len(heads):
            paths.append(_heatmaps(heads, probe, out_dir, chance))
    return paths


def _heatmaps(heads, probe: str, out_dir: Path, chance: float) -> Path:
    """One panel per lag: accuracy of every (layer, head)."""
    import matplotlib.pyplot as plt

    lags = sorted(heads["lag"].unique())
    grids = [heads[heads["lag"] == lag].pivot_table(index="layer", columns="head", values="accuracy")
             for lag in lags]
    rows, cols = grids[0].shape
    fig, axes = plt.subplots(1, len(lags), figsize=(1.2 + len(lags) * (0.4 + 0.25 * cols), 1.5 + 0.3 * rows),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, lag, grid in zip(axes[0], lags, grids):
        im = ax.imshow(grid.to_numpy(), aspect="auto", vmin=chance, vmax=1, cmap="viridis")
        ax.set_title(f"lag {int(lag)}", fontsize=8)
        ax.set_xticks(range(cols), [str(h) for h in grid.columns], fontsize=6)
        ax.set_yticks(range(rows), [str(x) for x in grid.index], fontsize=6)
        ax.set_xlabel("head", fontsize=7)
    axes[0][0].set_ylabel("layer", fontsize=7)
    fig.suptitle(f"{probe}: accuracy per layer and head", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, pad=0.01)
    return _save(fig, out_dir / f"heatmap_{probe}.png", tight=False)


def plot_summary(curves, half_lives, out_dir: str | Path, chance: float) -> list[Path]:
    """``summary.png``: the model's own answers and the whole-layer probes vs lag; ``half_life_vs_decay.png``:
    each (layer, head)'s memory half-life against its decay half-life (head probes; a half-life beyond the
    longest lag is drawn on the line marked "beyond the longest lag")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    whole = curves[curves["head"] < 0]
    if len(whole):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for (probe, layer), g in whole.groupby(["probe", "layer"]):
            g = g.sort_values("lag")
            own = probe == "model_answer"
            ax.plot(g["lag"], g["accuracy"], marker="o", lw=2.5 if own else 1,
                    color="black" if own else f"C{int(layer) % 10}",
                    ls="-" if own or probe.startswith("ridge") else "--",
                    label="model's own answer" if own else f"{probe}, layer {layer}")
        ax.axhline(chance, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("lag (tokens)")
        ax.set_ylabel("accuracy (test names)")
        ax.legend(fontsize=6, ncol=2)
        paths.append(_save(fig, out_dir / "summary.png"))
    heads = half_lives[half_lives["head"] >= 0]
    if len(heads):
        top = 2.0 * float(curves["lag"].max())
        fig, ax = plt.subplots(figsize=(5.5, 4))
        markers = dict(zip(sorted(heads["probe"].unique()), "osD^v"))
        for (probe, layer), g in heads.groupby(["probe", "layer"]):
            g = g[g["half_life"].notna()]
            if not len(g):
                continue
            y = np.where(np.isinf(g["half_life"]), top, g["half_life"])
            ax.scatter(g["decay_half_life"], y, marker=markers[probe], s=18, alpha=0.8,
                       label=f"{probe}, layer {layer}")
        lim = [min(heads["decay_half_life"].min(), curves["lag"].min()) / 1.5, top * 1.5]
        ax.plot(lim, lim, color="gray", lw=0.8, ls=":")
        ax.axhline(top, color="gray", lw=0.5)
        ax.text(lim[0] * 1.1, top * 1.08, "beyond the longest lag", fontsize=6, color="gray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("decay half-life ln 0.5 / ln gamma_h (tokens)")
        ax.set_ylabel("memory half-life (tokens)")
        ax.legend(fontsize=5, ncol=2)
        paths.append(_save(fig, out_dir / "half_life_vs_decay.png"))
    return paths


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG at ``path`` and close it (``tight``: ``tight_layout`` first)."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, curves, half_lives, info: dict[str, Any], plots: list[Path]) -> Path:
    """``report.md`` with the setup, the half-life table and the plots."""
    import pandas as pd
    from seqmem_shared.io import atomic_write_text

    out_dir = Path(out_dir)
    lines = ["# RetNet forgetting report", "", "## Setup", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Accuracy at each lag (best group per probe)", ""]
    best = curves.groupby(["probe", "lag"])["accuracy"].max().unstack(0)
    lines += [_markdown(best.reset_index()), ""]
    own = curves[curves["probe"] == "model_answer"]
    if len(own):
        lines += ["## The model's own answers", "",
                  "Accuracy of the model's argmax at the query (the token it would write next), test rows.",
                  ""]
        lines += [_markdown(own[["lag", "accuracy", "n"]].sort_values("lag")), ""]
    lines += ["## Memory half-life per head vs retention decay half-life", "",
              "Half-life: lag at which accuracy falls halfway from its shortest-lag value to chance "
              "(inf: never within the tested lags; nan: nothing decodable at the shortest lag). "
              "Decay half-life: ln 0.5 / ln gamma_h. Column `all`: the probe on the whole layer.",
              ""]
    for probe, table in half_lives[half_lives["layer"] >= 0].groupby("probe"):
        kind = probe.rsplit("_", 1)[0]
        table = pd.concat([table, half_lives[half_lives["probe"] == f"{kind}_layer"]]) \
            if probe.endswith("_head") else table
        if probe.endswith("_layer") and f"{kind}_head" in set(half_lives["probe"]):
            continue  # shown as the `all` column of the head table
        grid = table.pivot_table(index="layer", columns="head", values="half_life", dropna=False)
        grid.columns = ["all" if c < 0 else f"head {c}" for c in grid.columns]
        grid = grid[[c for c in grid.columns if c != "all"] + [c for c in grid.columns if c == "all"]]
        decay = {f"head {h}": d for h, d in zip(table["head"], table["decay_half_life"]) if h >= 0}
        grid.index = [f"layer {x}" for x in grid.index]
        grid.loc["decay"] = [decay.get(c, math.nan) for c in grid.columns]
        lines += [f"### {probe}", "", _markdown(grid.reset_index().rename(columns={"index": ""})), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _markdown(df) -> str:
    """A pandas frame as a Markdown table (floats with 3 decimals)."""
    def cell(v: Any) -> str:
        if isinstance(v, float) and math.isfinite(v) and abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
