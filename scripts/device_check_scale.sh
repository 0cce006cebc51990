#!/usr/bin/env bash
# GPU checks of the scale work (issue 4), for a machine with one CUDA GPU and python3 with torch,
# transformers and accelerate (datasets, lm-eval, gguf and pydantic are not needed).
#
#   bash scripts/device_check_scale.sh          # log in $OUT/device_check_scale.log, timing in $OUT/gpu_scale.json
#
# 1. tests/test_scale.py's GPU tests: a GPU+CPU device map (two GPUs when present) scores like one
#    GPU, sequential scoring on the GPU equals in-memory scoring, the memory plan reads GPU memory.
# 2. GPU timing of scoring overhead on a random 1.1B Llama-shaped model built in the script, and
#    sequential scoring on the GPU (scripts/device_check_scale.py timing).
# pytest is taken from the environment, else from pure-Python wheels in .whl/ (make them with
# `pip download --no-deps -d .whl pytest iniconfig pluggy pygments packaging`). Text for the tests'
# tokenizer: WikiText-2 when $PRUNE_DATA_DIR (or ../shared/data) has it, else Python's docstrings.
# Takes about 2-4 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/device_check_scale.log"
status=0
{
  echo "== device_check_scale $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
  "$PY" -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"

  if ! "$PY" -c "import pytest" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$PY" -c "import sys, zipfile, glob; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob('.whl/*.whl')]" "$WORK/pylib"
      export PYTHONPATH="$PYTHONPATH:$WORK/pylib"
      echo "pytest taken from .whl/"
    else
      echo "ERROR: pytest is not installed and .whl/ has no wheels (see the header of this script)"
    fi
  fi
  DATA="${PRUNE_DATA_DIR:-$PWD/../shared/data}"
  if [ ! -f "$DATA/wikitext2_raw/wiki.test.raw" ]; then
    "$PY" scripts/device_check_scale.py text "$WORK/data"
    DATA="$WORK/data"
  fi
  export PRUNE_DATA_DIR="$DATA"

  echo "== 1. GPU tests (tests/test_scale.py -k gpu)"
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_scale.py -k gpu -m "not integration" -rs || status=1
  echo "== 2. GPU timing"
  timeout 300 "$PY" scripts/device_check_scale.py timing "$OUT" || status=1
  echo "== done: status $status (0 = all passed)"
  exit $status
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
rm -rf "$WORK"
exit $status
