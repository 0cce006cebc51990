#!/usr/bin/env bash
# Device check of `prune eval`'s lm-eval backends on a GPU machine (not runnable on the 2-core CPU box).
#
#   MODEL=/path/to/a/saved/checkpoint DATA=/path/to/shared/data bash scripts/device_check_eval.sh
#
# 1. hf in memory (the default) on the GPU;
# 2. hf loaded by lm-eval itself (--model hf --model-args ...);
# 3. hf data-parallel, one process per GPU, the way lm-eval does it (accelerate launch);
# 4. vllm (skipped with a note when vLLM is not installed);
# then a paired comparison of 1 against 2 and 4 (the same questions: differences should be ~0).
# Writes everything under ${OUT:-out/device_check_eval}; exits non-zero at the first failure.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a saved checkpoint folder}
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/device_check_eval}
PY=${PY:-python}
TASKS=${TASKS:-arc_easy,piqa}
LIMIT=${LIMIT:-200}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
mkdir -p "$OUT"
common=(--tasks "$TASKS" --limit "$LIMIT" --data-dir "$DATA" --dtype bfloat16 --quiet)

echo "== 1. hf in memory (device_map cuda)"
$PY -m prune.cli eval "$MODEL" "${common[@]}" --device-map cuda --batch-size auto --output-path "$OUT/hf_memory" \
    -o "$OUT/hf_memory.json"

echo "== 2. hf loaded by lm-eval"
$PY -m prune.cli eval "$MODEL" "${common[@]}" --model hf --model-args "device=cuda" --batch-size auto \
    --output-path "$OUT/hf_named" -o "$OUT/hf_named.json"
$PY -m prune.cli compare "$OUT/hf_memory" "$OUT/hf_named"

if [ "$GPUS" -gt 1 ]; then
  echo "== 3. hf data-parallel on $GPUS GPUs (accelerate launch)"
  accelerate launch --multi_gpu --num_processes "$GPUS" -m prune.cli eval "$MODEL" "${common[@]}" --model hf \
      --model-args "dtype=bfloat16" --batch-size 16 --output-path "$OUT/hf_dp" -o "$OUT/hf_dp.json"
  $PY -m prune.cli compare "$OUT/hf_memory" "$OUT/hf_dp"
else
  echo "== 3. skipped: one GPU (data-parallel needs two or more)"
fi

if $PY -c "import vllm" 2>/dev/null; then
  echo "== 4. vllm"
  $PY -m prune.cli eval "$MODEL" "${common[@]}" --model vllm --model-args "gpu_memory_utilization=0.5" \
      --batch-size auto --output-path "$OUT/vllm" -o "$OUT/vllm.json"
  $PY -m prune.cli compare "$OUT/hf_memory" "$OUT/vllm"
else
  echo "== 4. skipped: vLLM is not installed (pip install vllm); the one-line error:"
  $PY -m prune.cli eval "$MODEL" --tasks "$TASKS" --data-dir "$DATA" --model vllm || true
fi
echo "device check done: $OUT"
