"""The private transformers internals this toolkit truly needs, in one place.

Checked against transformers 5.25.0 (tests/test_hf_internals.py fails on another major version, and
its behaviour tests, with this module to look at, when an internal moves):

* ``transformers.conversion_mapping.get_model_conversion_mapping`` and
  ``transformers.core_model_loading.{WeightRenaming, WeightConverter, rename_source_key}``: how
  ``from_pretrained`` renames checkpoint keys to parameter names (legacy ``gamma``/``beta``
  names, MoE expert layouts). The out-of-core skeleton must map keys exactly the same way.
* ``transformers.core_model_loading.convert_and_load_state_dict_in_model`` with
  ``transformers.modeling_utils.LoadStateDictConfig`` and ``PreTrainedModel._get_dtype_plan``:
  filling a meta model's parameters from (lazy) checkpoint tensors with those conversions.

One more behaviour is relied on elsewhere, for speed only: ``transformers.modeling_gguf_pytorch_utils.
load_gguf_checkpoint`` builds its reader as ``gguf.GGUFReader`` at call time, which
``prune.io.gguf.lend_kept_reader`` stands in for (should that change, a GGUF load parses the file again
for each read, as it did before; tests/test_integration_smollm2.py counts one parse per load).
"""

from __future__ import annotations

from collections.abc import Callable

CHECKED_WITH = "5.25.0"


def checkpoint_key_renamer(model) -> Callable[[str, dict], str]:
    """``rename(key, meta_state_dict) -> parameter name``, as ``from_pretrained`` renames ``key`` for ``model``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(key: str, meta_state_dict: dict) -> str:
        return rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state_dict)[0]

    rename.mapping = mapping
    return rename


def load_state_dict_into(model, state: dict, device, dtype, weight_mapping):
    """Fill ``model``'s parameters from ``state`` (name -> tensor or lazy slice) on ``device`` at
    ``dtype``, converting as ``from_pretrained`` does; returns transformers' loading info
    (``.mismatched_keys`` ...)."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    try:
        plan = model._get_dtype_plan(dtype)
    except AttributeError:  # pragma: no cover - older transformers
        plan = {}
    config = LoadStateDictConfig(device_map={"": device}, dtype=dtype, dtype_plan=plan, weight_mapping=weight_mapping)
    info, _ = convert_and_load_state_dict_in_model(model, state, config)
    return info
