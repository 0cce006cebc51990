#!/usr/bin/env bash
# GPU checks of the scale work (issue 4), for a machine with one CUDA GPU and python3 with torch,
# transformers and accelerate (datasets, lm-eval and gguf are not needed; pydantic is, and the
# borrowed GPU image lacks it: run `bash scripts/device_wheels.sh` here first and carry .whl, which
# scripts/device_env.sh, sourced below, installs there).
#
#   bash scripts/device_check_scale.sh          # log in $OUT/device_check_scale.log, timing in $OUT/gpu_scale.json
#
# 1. The GPU tests of tests/test_scale.py and tests/test_distill.py: a GPU+CPU device map (two GPUs
#    when present) scores like one GPU, sequential scoring on the GPU equals in-memory scoring, the
#    memory plan reads GPU memory, `prune run` distils on the GPU (teacher in memory, top-k cache)
#    like on the CPU.
# 2. GPU timing of scoring overhead on a random 1.1B Llama-shaped model built in the script, and
#    sequential scoring on the GPU (scripts/device_check_scale.py timing).
# 3. With 2 or more GPUs: scoring and perplexity of the same random model alone and under
#    `accelerate launch --multi_gpu --num_processes N` (one GPU per process); scores must agree
#    (1e-6: GPU kernels) and the perplexity too; the speed-up is printed ($OUT/multi_gpu_*.json).
# pytest is the image's (KINDS.md lists it); wheels of it in .whl/ would be installed by
# device_env.sh like the others. Text for the tests (WikiText-2 for the tokenizer and scoring, C4
# for healing): $PRUNE_DATA_DIR (or ../shared/data) when it has both, else Python's docstrings.
# Takes about 2-4 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
source scripts/device_env.sh  # offline, the carried wheels (.whl), this repo first on PYTHONPATH
LOG="$OUT/device_check_scale.log"
status=0
{
  echo "== device_check_scale $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
  "$PY" -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"

  "$PY" -c "import pytest" 2>/dev/null || echo "ERROR: pytest is not installed (carry its wheels in .whl/)"
  DATA="${PRUNE_DATA_DIR:-$PWD/../shared/data}"
  if [ ! -f "$DATA/wikitext2_raw/wiki.test.raw" ] || [ ! -f "$DATA/c4/c4_web_1480.jsonl" ]; then
    "$PY" scripts/device_check_scale.py text "$WORK/data"
    DATA="$WORK/data"
  fi
  export PRUNE_DATA_DIR="$DATA"

  echo "== 1. GPU tests (tests/test_scale.py tests/test_distill.py -k gpu)"
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_scale.py tests/test_distill.py -k gpu -m "not integration" -rs || status=1
  echo "== 2. GPU timing"
  timeout 300 "$PY" scripts/device_check_scale.py timing "$OUT" || status=1
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "${NGPU:-0}" -ge 2 ]; then
    echo "== 3. multi-GPU: 1 process vs accelerate launch --multi_gpu --num_processes $NGPU"
    timeout 300 "$PY" scripts/device_check_scale.py multi "$OUT" || status=1
    timeout 300 "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$NGPU" \
      scripts/device_check_scale.py multi "$OUT" || status=1
    "$PY" - "$OUT" "$NGPU" <<'PYEOF' || status=1
import json, sys
one = json.load(open(f"{sys.argv[1]}/multi_gpu_1.json")); many = json.load(open(f"{sys.argv[1]}/multi_gpu_{sys.argv[2]}.json"))
diff = max(abs(a - b) for a, b in zip(one["block_influence"], many["block_influence"]))
for key in ("angular", "cka"):
    diff = max(diff, max(abs(a - b) for ra, rb in zip(one[key], many[key]) for a, b in zip(ra, rb)))
ppl = abs(one["perplexity"] - many["perplexity"]) / one["perplexity"]
print(f"scores max diff {diff:.2e}, perplexity rel diff {ppl:.2e}; scoring {one['scoring_seconds']:.2f} s -> "
      f"{many['scoring_seconds']:.2f} s ({one['scoring_seconds'] / many['scoring_seconds']:.2f}x), perplexity "
      f"{one['perplexity_seconds']:.2f} s -> {many['perplexity_seconds']:.2f} s")
assert diff < 1e-6 and ppl < 1e-5, "multi-GPU results differ from one GPU"
PYEOF
  else
    echo "== 3. multi-GPU: skipped ($NGPU GPU(s); needs 2 or more)"
  fi
  echo "== done: status $status (0 = all passed)"
  exit $status
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
rm -rf "$WORK"
exit $status
