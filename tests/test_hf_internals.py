"""The private transformers internals of prune/model/hf_internals.py still behave as checked."""

import transformers
from transformers import AutoModelForCausalLM

from prune.model.arch import meta_model
from prune.model.hf_internals import CHECKED_WITH, checkpoint_key_renamer, load_state_dict_into
from conftest import build_model


def test_internals_checked_against_the_installed_transformers():
    # If this fails after an upgrade, re-check prune/model/hf_internals.py against the new version.
    assert transformers.__version__.split(".")[0] == CHECKED_WITH.split(".")[0]


def test_renamer_and_loader_fill_a_meta_model_like_from_pretrained():
    model = build_model("qwen3_moe")  # MoE: the expert weights go through transformers' conversions
    state = model.state_dict()
    meta = meta_model(model.config, real_buffers=True)
    rename = checkpoint_key_renamer(meta)
    meta_sd = meta.state_dict()
    assert all(rename(k, meta_sd) in meta_sd for k in state)
    info = load_state_dict_into(meta, dict(state), "cpu", next(model.parameters()).dtype, rename.mapping)
    assert not info.mismatched_keys
    filled = meta.state_dict()
    assert all(v.device.type != "meta" for v in filled.values())
    assert set(state) <= set(filled)  # every key of the model's own state, so none is skipped below
    assert all((filled[k] == v).all() for k, v in state.items())
    assert isinstance(meta, AutoModelForCausalLM._model_mapping[type(model.config)])
