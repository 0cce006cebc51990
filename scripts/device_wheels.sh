#!/usr/bin/env bash
# The Python packages the borrowed GPU machines lack, as wheels for their python3 (3.12, x86-64),
# downloaded HERE (PyPI is reachable here, nothing is there) into .whl/ (ignored by git: add
# `/.whl/` to .git/info/exclude) for a device run to carry (`carry: [".whl"]`):
#   .whl/     pydantic (prune.core.config; not on the image), and the accelerate / peft this repo tests
#   .whl/tf/  transformers as tested here (the image had 5.17 on 2026-12-04) with the huggingface_hub,
#             tokenizers and other packages that version needs beyond the image's
# The versions are the ones installed in .venv (scripts/install.sh), so the GPU runs the tested stack.
# On the GPU machine, `source scripts/device_env.sh` installs them and sets PYTHONPATH.
#   bash scripts/device_wheels.sh          # about 25 MB
set -euo pipefail
cd "$(dirname "$0")/.."
V() { .venv/bin/python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
GET=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl/tf
"${GET[@]}" -d .whl "$(V pydantic)" "$(V pydantic_core)" "$(V annotated-types)" "$(V typing-inspection)" \
  "$(V typing_extensions)" "$(V accelerate)" "$(V peft)"
"${GET[@]}" -d .whl/tf "$(V transformers)" "$(V huggingface_hub)" "$(V tokenizers)" "$(V kernels)" "$(V regex)" \
  "$(V httpx2)" "$(V httpcore2)" "$(V truststore)" "$(V click)"
du -sh .whl
