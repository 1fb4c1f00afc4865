#!/usr/bin/env bash
# The shrunk capacity-cliff sweep on one GPU: queue workers, then the report, into OUT_DIR.
#   bash packages/polar-mem-mamba/bench/h200_capacity_cliff_small.sh OUT_DIR [SECONDS] [WORKERS] [GROUP] [RESUME]
# SECONDS (default 240): no worker starts a group that would likely end later than this. WORKERS
# (default 2) processes, each training GROUP (default 17) runs of one num_pairs at a time in lockstep.
# Writes OUT_DIR/sweep/{results.csv,best_lr.md,heatmap_*.png,cliff.png,runs/} and OUT_DIR/sweep.log, and
# OUT_DIR/sweep_results.tgz: the sweep without checkpoints (the finished runs' results.json). Run it again
# on the same OUT_DIR to finish an interrupted sweep, or on a fresh machine with RESUME = an earlier
# sweep_results.tgz: its finished runs are unpacked first and skipped.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [SECONDS] [WORKERS] [GROUP] [RESUME]}
seconds=${2:-240}
workers=${3:-2}
group=${4:-17}
resume=${5:-}
config="$(cd "$(dirname "$0")/.." && pwd)/configs/capacity_cliff_small.yaml"
mkdir -p "$out"
if [[ -n "$resume" ]]; then
    tar xzf "$resume" -C "$out"
fi
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=32
start=$(date +%s)
python3 -m polar_mem_mamba.sweep --config "$config" --out-dir "$out/sweep" --workers "$workers" \
    --group-size "$group" --time-limit "$seconds" 2>&1 | tee "$out/sweep.log"
echo "sweep wall_s $(( $(date +%s) - start )) workers $workers group $group" | tee -a "$out/sweep.log"
tar czf "$out/sweep_results.tgz.tmp" --exclude='*.pt' --exclude='.claim' -C "$out" sweep
mv "$out/sweep_results.tgz.tmp" "$out/sweep_results.tgz"
