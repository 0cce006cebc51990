"""Architecture facts shared by every stage: a model built without memory, and block-indexed names.

:func:`meta_model` is the one place a model is constructed from a config without weights
(Accelerate's ``init_empty_weights``); :func:`block_index` reads the block number out of a
parameter, checkpoint or device-map name (``model.layers.12.mlp.up_proj.weight`` -> 12).
"""

from __future__ import annotations

import re
from functools import lru_cache

from torch import nn


#: the MLP's last projection (its output is what the block adds to the residual stream), by architecture
OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out")


def meta_model(config, *, trust_remote_code: bool = False, dtype=None, cls=None, real_buffers: bool = False) -> nn.Module:
    """The model ``config`` describes, its parameters on the meta device (no memory, no init).

    ``cls``: build this class instead of ``AutoModelForCausalLM``'s choice; ``real_buffers``: keep
    buffers (rotary ``inv_freq`` ...) real on the CPU, as a model that will run needs them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=not real_buffers):
        if cls is not None:
            return cls(config)
        kwargs = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        return AutoModelForCausalLM.from_config(config, **kwargs)


@lru_cache(maxsize=64)
def _block_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)(\..*)?$")


def block_index(name: str, prefix: str) -> tuple[int, str] | None:
    """``(block, rest)`` when ``name`` is ``<prefix>.<block><rest>`` (``rest`` is ``""`` or starts
    with a dot), else ``None``; ``prefix`` is the decoder stack's path, e.g. ``model.layers``."""
    match = _block_pattern(prefix).match(name)
    return (int(match.group(1)), match.group(2) or "") if match else None
