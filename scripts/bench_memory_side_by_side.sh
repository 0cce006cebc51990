#!/usr/bin/env bash
# Peak memory of scoring above the loaded model, one code tree after another (docs/BENCHMARKS.md,
# "Rerun with the allocator's variable left out"). glibc's mmap threshold is fixed, so a freed
# tensor leaves the process and VmHWM follows the live tensors (the default dynamic threshold moves
# the peak by up to 190 MiB between identical runs).
#   bash scripts/bench_memory_side_by_side.sh OLD_TREE [NEW_TREE]    (NEW_TREE: this checkout)
# OLD_TREE: e.g. `mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old && ln -s $PWD/.venv /tmp/old/.venv`
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
old="${1:?give the tree of the code before (a git archive with .venv linked)}"
new="${2:-$here}"
export MALLOC_MMAP_THRESHOLD_=131072 BENCH_THREADS=1 BENCH_WINDOWS=64
export BENCH_METHODS=forward_base,score_bi_angular,score_full
export PRUNE_DATA_DIR="${PRUNE_DATA_DIR:-$(dirname "$here")/shared/data}"
for tree in "$old" "$new"; do
  echo "== $tree $(date +%T)"
  (cd "$tree" && nice -n 5 .venv/bin/python scripts/bench_scale.py --cases memory --fresh)
done
