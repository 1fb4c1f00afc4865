"""Markdown tables from a ``gpu_rule_recovery.py`` JSON: fit per mechanism (gap to the generator's floor
and to the achievable Bayes loss) and precision / recall of the weight-based detections.

    python packages/bilinear-toys/bench/rule_recovery_table.py \
        docs/bench-results/bilinear_rule_recovery_h200_2026-12-03.json
"""

from __future__ import annotations

import json
import sys

MECHS = ("all", "none", "bigram", "skip_trigram", "induction", "bracket")


def _pr(e: dict) -> str:
    return f"{e['precision']:.2f} / {e['recall']:.2f}"


def fit_table(results: list[dict]) -> str:
    rows = ["| model | steps | val loss | plateau (last 30%) | gap to achievable: " + " / ".join(MECHS)
            + " | gap to floor: " + " / ".join(MECHS) + " | fitted |", "|---" * 7 + "|"]
    for r in results:
        ach, flo = r["gap_to_achievable"], r["gap_to_floor"]
        fitted = "yes" if r["fitted"] else "no"
        rows.append(f"| {r['job']['name']} | {r['steps']} | {r['losses']['all']['loss']:.3f} | "
                    f"{r['plateau']['improvement']:+.3f} | " + " / ".join(f"{ach[m]:.2f}" for m in MECHS)
                    + " | " + " / ".join(f"{flo[m]:.2f}" for m in MECHS) + f" | {fitted} |")
    return "\n".join(rows)


def reference_table(results: list[dict]) -> str:
    langs = {}
    for r in results:
        langs.setdefault(r["job"]["seed"], r["losses"])
    rows = ["| language seed | " + " | ".join(MECHS) + " |", "|---" * (len(MECHS) + 1) + "|"]
    for seed, losses in sorted(langs.items()):
        rows.append(f"| {seed}: floor / achievable (count) | " + " | ".join(
            f"{losses[m]['floor']:.3f} / {losses[m]['achievable']:.3f} ({losses[m]['count']})" for m in MECHS)
            + " |")
    return "\n".join(rows)


def recovery_table(results: list[dict], key: str) -> str:
    rows = ["| model | thresholds | bigrams P / R | skip-trigrams P / R (recall@8) | skip-trigrams, direct "
            "paths P / R | prev-token heads P / R (detected; reference) | induction heads P / R (detected; "
            "reference) |",
            "|---" * 7 + "|"]
    for r in results:
        rec = r.get(key)
        if rec is None:
            continue
        h = rec["heads"]
        thr = rec.get("thresholds", "defaults")
        thr = ", ".join(f"{k} {v:.3g}" for k, v in thr.items()) if isinstance(thr, dict) else thr
        heads = [f"{_pr(h[k])} ({len(h[k]['detected'])}; {len(h[k]['reference'])})"
                 for k in ("previous_token", "induction")]
        skip = rec["skip_trigrams"]
        rows.append(f"| {r['job']['name']} | {thr} | {_pr(rec['bigrams'])} | {_pr(skip)} "
                    f"({skip['recall_at_k']:.2f}) | {_pr(rec['skip_trigrams_direct_paths'])} | "
                    + " | ".join(heads) + " |")
    return "\n".join(rows)


def main() -> None:
    with open(sys.argv[1]) as f:
        d = json.load(f)
    res = [r for r in d["results"] if "error" not in r]
    print(f"device {d['device']}, wall {d['wall_s']} s\n")
    for r in d["results"]:
        if "error" in r:
            print(f"job {r['job']['name']} failed: {r['error']}\n")
    print(reference_table(res), "\n")
    print(fit_table(res), "\n")
    print("Default thresholds (every model):\n")
    print(recovery_table(res, "recovery"), "\n")
    print("Calibrated on the calibration-language model of the group, applied unchanged:\n")
    print(recovery_table(res, "recovery_calibrated"))


if __name__ == "__main__":
    main()
