#!/usr/bin/env bash
# Training-free repair in `prune run` (heal.method: bridge) against the plain cut, on SmolLM2-135M:
# for each k, the same recipe (recipes/smollm2-bridge.yaml) with and without its heal section
# (the blocks are the same: selection runs before healing), then the paired comparisons.
#   bash scripts/bench_bridge_run.sh 10 7            # runs left to do; finished runs are kept (a rerun resumes)
#   .venv/bin/python scripts/bench_bridge_table.py    # the docs table from the finished runs
# Each run is niced, one thread (two side by side on 2 cores: `bash ... 10 & bash ... 7 &`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench_cache/bridge_run
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PRUNE=".venv/bin/python -m prune"
for k in "$@"; do
  plain="$OUT/k$k-plain" bridged="$OUT/k$k-bridge"
  [ -f "$plain/pruning.json" ] || nice -n 10 $PRUNE run recipes/smollm2-bridge.yaml --set heal=null \
      --set select.n_layers="$k" --set output.dir="$plain" --set output.overwrite=true
  # the original was evaluated in the plain run: the bridged run evaluates only its own model
  [ -f "$bridged/pruning.json" ] || nice -n 10 $PRUNE run recipes/smollm2-bridge.yaml \
      --set select.n_layers="$k" --set output.dir="$bridged" --set evaluate.original=false --set output.overwrite=true
  $PRUNE compare "$plain" "$bridged" -o "$OUT/k$k-plain-vs-bridge.json" > "$OUT/k$k-plain-vs-bridge.md"
  $PRUNE compare "$plain/eval/original" "$bridged" -o "$OUT/k$k-original-vs-bridge.json" > "$OUT/k$k-original-vs-bridge.md"
  $PRUNE compare "$plain" -o "$OUT/k$k-original-vs-plain.json" > "$OUT/k$k-original-vs-plain.md"
done
