# Sourced on a borrowed GPU machine (`source scripts/device_env.sh`): installs the wheels that
# scripts/device_wheels.sh put in .whl/ (carried with the run) and puts them, and this repo, first
# on PYTHONPATH. With no .whl/ it only sets the offline environment (the image's packages are used,
# and `import prune` fails without pydantic).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  _pip="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
  $_pip --target /tmp/prune-base .whl/*.whl && export PYTHONPATH="/tmp/prune-base${PYTHONPATH:+:$PYTHONPATH}"
  if ls .whl/tf/*.whl >/dev/null 2>&1; then
    $_pip --target /tmp/prune-tf .whl/tf/*.whl && export PYTHONPATH="/tmp/prune-tf:$PYTHONPATH"
  fi
  unset _pip
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import transformers, prune; print('device env: transformers', transformers.__version__)" || echo "device env: prune does not import (run scripts/device_wheels.sh here and carry .whl)"
