"""``bilinear-analyze``: a Markdown + HTML circuit report with PNG plots, read off the weights."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.io import atomic_path, atomic_write_text

from bilinear_toys import circuits as C
from bilinear_toys.models import ToyTransformer


class _Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        fmt = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                       + "".join("| " + " | ".join(r) + " |\n" for r in fmt))
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in fmt)
        self.html.append("<table border=1 cellpadding=3><tr>" + "".join(f"<th>{html.escape(h)}</th>"
                         for h in header) + f"</tr>{cells}</table>")

    def figure(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        path = self.out / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        self.md.append(f"![{name}]({name}.png)\n")
        self.html.append(f'<img src="{name}.png" alt="{name}" style="max-width: 900px">')


def _heatmap(ax, m: torch.Tensor, title: str, xlabel: str = "", ylabel: str = "") -> None:
    m = m.detach().float().cpu().numpy()
    lim = float(abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


@torch.no_grad()
def write_report(model: ToyTransformer, out_dir: str | Path, top_k: int = 20, max_offset: int = 16,
                 rules: dict[str, Any] | None = None, max_vocab_plot: int = 64) -> Path:
    """Write ``report.md``, ``report.html`` and PNGs under ``out_dir``; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bilinear_toys.recovery import extended_direct_path, rule_recovery

    C._common.require_polynomial(model, "bilinear-analyze")
    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    n_l, n_h = cfg.n_layers, cfg.n_head
    vp = min(cfg.vocab_size, max_vocab_plot)
    r = _Report(out)
    r.heading(f"Circuit report: {cfg.model_type}", 1)
    r.text(f"vocab {cfg.vocab_size}, d_model {cfg.d_model}, {n_h} heads of {cfg.d_head}, n_ctx {cfg.n_ctx}, "
           f"RoPE {cfg.use_rope}. Every number below is computed from the weights, except the behavioural "
           "head scores (repeated random tokens).")

    r.heading("Bigrams: next-token logits from a one-token context (direct + self-attention + MLP)")
    d = extended_direct_path(model).float()
    s = d - d.mean(dim=1, keepdim=True)
    vals, idx = s.flatten().topk(min(top_k, s.numel()))
    r.table(["current", "next", "centered logit"],
            [[int(i) // cfg.vocab_size, int(i) % cfg.vocab_size, float(v)] for v, i in zip(vals, idx)])
    fig, ax = plt.subplots(figsize=(5, 4))
    _heatmap(ax, s[:vp, :vp], f"direct path (first {vp} tokens, centered)", "next", "current")
    r.figure(fig, "direct_path")

    r.heading("Attention heads")
    rows = []
    for layer in range(n_l):
        for h in range(n_h):
            rows.append([layer, h, C.copying_score(model, layer, h), C.ov_diagonal_score(model, layer, h),
                         C.previous_token_score_weights(model, layer, h, max_offset)])
    r.table(["layer", "head", "OV copying score", "OV diagonal score", "prev-token score (weights)"], rows)
    fig, axes = plt.subplots(n_l, n_h, figsize=(3 * n_h, 3 * n_l), squeeze=False)
    for layer in range(n_l):
        for h in range(n_h):
            lam = C.ov_eigenvalues(model, layer, h)
            axes[layer][h].scatter(lam.real.cpu().numpy(), lam.imag.cpu().numpy(), s=8)
            axes[layer][h].axvline(0, color="gray", lw=0.5)
            axes[layer][h].set_title(f"OV eigenvalues L{layer}H{h}", fontsize=9)
    r.figure(fig, "ov_eigenvalues")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer in range(n_l):
        for h in range(n_h):
            prof = C.positional_profile(model, layer, h, max_offset).cpu().numpy()
            ax.plot(prof, marker=".", label=f"L{layer}H{h}")
    ax.set_xlabel("key offset (positions back)")
    ax.set_ylabel("mean squared QK score")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    r.figure(fig, "qk_positional_profile")
    fig, axes = plt.subplots(n_l, n_h, figsize=(3.5 * n_h, 3 * n_l), squeeze=False)
    for layer in range(n_l):
        for h in range(n_h):
            _heatmap(axes[layer][h], C.qk_circuit(model, layer, h, None)[:vp, :vp],
                     f"QK content-only L{layer}H{h}", "key token", "query token")
    r.figure(fig, "qk_content_only")
    fig, axes = plt.subplots(n_l, n_h, figsize=(3.5 * n_h, 3 * n_l), squeeze=False)
    for layer in range(n_l):
        for h in range(n_h):
            _heatmap(axes[layer][h], C.ov_circuit(model, layer, h)[:vp, :vp], f"OV L{layer}H{h}", "out",
                     "src")
    r.figure(fig, "ov_circuits")

    r.heading(f"Skip-trigrams (layer 0, offsets 1..{max_offset} averaged, centered over src, "
              "copying C == A and same-token A == B excluded)")
    tri = C.top_skip_trigrams(model, k=top_k, offsets=range(1, max_offset + 1), exclude_copying=True,
                              exclude_same_token=True)
    r.table(["src A", "dst B", "out C", "score"], [list(t) for t in tri])

    if n_l > 1:
        r.heading("Composition (layer l1 head -> later head)")
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, kind in zip(axes, "qkv"):
            comp = C.composition_scores(model, kind)
            flat = torch.cat([comp[l1, :, l2, :] for l1 in range(n_l) for l2 in range(l1 + 1, n_l)], dim=1)
            _heatmap(ax, flat, f"{kind.upper()}-composition", "later heads", "earlier heads")
        r.figure(fig, "composition_scores")
        ind_w = C.induction_scores_weights(model, max_offset)
        beh = C.head_scores_behaviour(model, half=min(32, (cfg.n_ctx - 1) // 2))
        r.table(["layer", "head", "induction (weights)", "induction (behaviour)", "prev-token (behaviour)"],
                [[layer, h, float(ind_w[layer, h]), float(beh["induction"][layer, h]),
                  float(beh["previous_token"][layer, h])] for layer in range(n_l) for h in range(n_h)])

    if cfg.has_mlp:
        r.heading("Bilinear MLPs")
        tokens = s.max(dim=0).values.topk(min(top_k, cfg.vocab_size)).indices
        rows = []
        fig, axes = plt.subplots(n_l, 2, figsize=(10, 3.5 * n_l), squeeze=False)
        for layer in range(n_l):
            b = C.token_interaction_matrices(model, layer, tokens)
            vals, _ = C.interaction_eigen(b)
            ranks = C.effective_rank(vals)
            ks = list(range(0, cfg.d_model + 1, max(1, cfg.d_model // 32)))
            ks, err = C.truncation_curve(b, model.W_E, ks=ks)
            for j, t in enumerate(tokens.tolist()[:top_k]):
                rows.append([layer, t, float(ranks[j]), int(C.rank_for_fraction(vals[j], 0.9))])
            for j in range(min(8, len(tokens))):
                axes[layer][0].plot(vals[j].abs().cpu().numpy(), label=f"token {int(tokens[j])}")
                axes[layer][1].plot(ks, err[:, j].cpu().numpy())
            axes[layer][0].set_yscale("log")
            axes[layer][0].set_title(f"layer {layer}: |eigenvalues| of token interaction matrices",
                                     fontsize=9)
            axes[layer][0].legend(fontsize=6)
            axes[layer][1].set_title(f"layer {layer}: truncation (rel. error on embeddings)", fontsize=9)
            axes[layer][1].set_xlabel("top-k eigenvectors kept")
        r.figure(fig, "bilinear_spectra")
        r.table(["layer", "output token", "effective rank", "rank for 90%"], rows)

    if rules is not None:
        r.heading("Recovery of the planted rules")
        rec = rule_recovery(model, rules, max_offset)
        r.md.append("```json\n" + json.dumps(rec, indent=1) + "\n```\n")
        r.html.append("<pre>" + html.escape(json.dumps(rec, indent=1)) + "</pre>")
        atomic_write_text(out / "recovery.json", json.dumps(rec, indent=1) + "\n")

    atomic_write_text(out / "report.md", "\n".join(r.md))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>bilinear-toys report</title></head>"
            "<body style='font-family: sans-serif'>" + "\n".join(r.html) + "</body></html>\n")
    return atomic_write_text(out / "report.html", page)
