"""Remove decoder blocks in place and rewire the model into a plain checkpoint.

``remove_layers(model, indices)`` keeps the surviving block modules themselves (no copy
of the model), then makes everything that indexes blocks by position agree again:

* every kept module's ``layer_idx`` (attention modules use it to index the KV cache);
* the config (``num_hidden_layers``, per-layer lists like ``layer_types``, position
  dependent layouts: see :func:`prune.model.loading.pruned_config_updates`);
* ``hf_device_map`` entries of dispatched models (removed blocks dropped, kept renamed);
* tied input/output embeddings stay tied.

Finally the pruned config is instantiated on the meta device and its parameter names and
shapes compared with the pruned model's, so a config that would rebuild a different
model (and load with missing or unexpected weights) is caught here, not after saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prune.core.errors import PruneError
from prune.core.records import block_number, complement
from prune.model.arch import block_index, meta_model
from prune.model.loading import (
    PERIODS,
    check_cut_keeps_attention,
    count_parameters,
    decoder_layers_path,
    pruned_config_updates,
)


@dataclass(frozen=True)
class CutTrail:
    """What :func:`remove_layers` has cut from a model in memory, so a record saved with it can be checked against
    what happened (:func:`prune.export.saving.record_and_card`): ``kept``, the blocks left, as 0-based positions in
    the stack as it was at the first cut, of ``layers_before`` blocks and ``params_before`` parameters; the model
    was then loaded from ``loaded_from`` (its ``name_or_path``; ``""`` when built in memory)."""

    kept: tuple[int, ...]
    layers_before: int
    params_before: int
    loaded_from: str


_TRAIL = "_prune_cut_trail"


def model_place(name) -> str:
    """``name_or_path`` as kept in a trail: a local path resolved (a relative path would change with the working
    directory), a Hub id as it is, ``""`` for a model built in memory."""
    from pathlib import Path

    path = Path(str(name or "")).expanduser()
    return str(path.resolve()) if name and path.exists() else str(name or "")


def cut_trail(model: nn.Module) -> CutTrail | None:
    """The blocks :func:`remove_layers` has cut from ``model`` so far (None: never cut by it)."""
    trail = getattr(model, _TRAIL, None)
    return trail if isinstance(trail, CutTrail) else None


def check_indices(indices, n_layers: int) -> list[int]:
    """Sorted block indices to remove; refuses empty, all, out-of-range and repeated indices."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise PruneError(f"block indices {indices!r}: give a list of integers (e.g. [3] for one block)")
    indices = [block_number(i) for i in indices]
    if not indices:
        raise PruneError("no blocks to remove: give at least one block index")
    for i in indices:
        if not 0 <= i < n_layers:
            raise PruneError(f"block index {i} is out of range: the model has blocks 0..{n_layers - 1}")
    check_no_repeats(indices)
    if len(indices) >= n_layers:
        raise PruneError(f"cannot remove all {n_layers} blocks: at least one must stay")
    return sorted(indices)


def check_no_repeats(indices: list[int]) -> None:
    """Refuse a block given twice (``[3, 3]``: a typo for two blocks, which removing or skipping once hid)."""
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise PruneError(f"block indices repeated: {dupes} (give each block once)")


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def query_rescale(config, old: int, new: int) -> float:
    """The factor a kept block's query projection takes when it moves from position ``old`` to
    ``new``: ``(new + 1) / (old + 1)`` for GPT-2 with ``scale_attn_by_inverse_layer_idx`` (its
    attention scales the scores by ``1 / (layer_idx + 1)``, fixed when the block is built, so a
    reload at the new index would change the function), else 1."""
    if getattr(config, "model_type", None) == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        if old != new and getattr(config, "add_cross_attention", False):
            raise PruneError("GPT-2 with scale_attn_by_inverse_layer_idx and add_cross_attention: moving a block would "
                             "change its cross-attention's scaling, which is not rewritten; keep the blocks in place")
        return (new + 1) / (old + 1)
    return 1.0


def _rescale_query(block: nn.Module, factor: float) -> None:
    """Fold ``factor`` into GPT-2's query columns (``c_attn``'s first ``embed_dim`` outputs) and divide
    the block's score scaling by it: the same attention, and the scaling a reload computes."""
    attn = block.attn
    E = attn.embed_dim
    with torch.no_grad():
        attn.c_attn.weight[..., :E].mul_(factor)
        attn.c_attn.bias[:E].mul_(factor)
    attn.scaling = attn.scaling / factor


def remove_layers(model: nn.Module, indices) -> list[int]:
    """Remove the decoder blocks at 0-based ``indices`` from ``model`` in place.

    Returns the original indices of the kept blocks, in order. Raises :class:`PruneError`
    for an empty, complete, out-of-range or repeated list of indices. A kept block whose
    computation depends on its index (:func:`query_rescale`) is rewritten to compute the same
    function at its new index, so the saved model equals the pruned model in memory. The cut is
    remembered on the model (:func:`cut_trail`), cuts after the first composed with it.
    """
    path = decoder_layers_path(model)
    layers = model.get_submodule(path)
    n_layers = len(layers)
    removed = check_indices(indices, n_layers)
    kept = complement(n_layers, removed)
    tied_before = _tied(model)
    factors = [query_rescale(model.config, old, new) for new, old in enumerate(kept)]  # refusals before any change
    updates = pruned_config_updates(model.config, kept)  # a layout the config cannot describe: refused here too
    check_cut_keeps_attention(model.config, kept)
    if any(f != 1.0 and layers[old].attn.c_attn.weight.is_meta for old, f in zip(kept, factors)):
        raise PruneError("GPT-2 with scale_attn_by_inverse_layer_idx needs its query weights in memory to move a "
                         "block (they are offloaded): load it without disk offload")

    prior = cut_trail(model)
    if prior is None:
        trail = CutTrail(tuple(kept), n_layers, count_parameters(model), model_place(getattr(model, "name_or_path", "")))
    else:  # a stack changed by other code since (its length differs): what was cut is no longer known
        trail = CutTrail(tuple(prior.kept[i] for i in kept), prior.layers_before, prior.params_before,
                         prior.loaded_from) if len(prior.kept) == n_layers else None
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
    for new_index, (block, factor) in enumerate(zip(getattr(parent, attr), factors)):
        if factor != 1.0:
            _rescale_query(block, factor)
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index

    for key, value in updates.items():
        old = getattr(model.config, key, None)
        setattr(model.config, key, value)
        if key in PERIODS:  # a block's copy of a period the kept list supersedes (EXAONE-4's attention keeps one)
            for block in getattr(parent, attr):
                for module in block.modules():
                    if key in vars(module) and vars(module)[key] == old:
                        setattr(module, key, value)
    _rename_device_map(model, path, kept)
    if tied_before and not _tied(model):  # defensive: the embeddings were never touched
        model.tie_weights()
    check_rebuild(model)
    if trail is not None:
        setattr(model, _TRAIL, trail)
    elif prior is not None:
        delattr(model, _TRAIL)
    return kept


def _rename_device_map(model: nn.Module, path: str, kept: list[int]) -> None:
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return
    position = {old: new for new, old in enumerate(kept)}
    renamed = {}
    for name, device in device_map.items():
        found = block_index(name, path)
        if found is None:
            renamed[name] = device
        elif found[0] in position:
            renamed[f"{path}.{position[found[0]]}{found[1]}"] = device
    model.hf_device_map = renamed


#: module attributes that describe how a model is being run, not what it computes
RUNTIME_STATE = ("training", "gradient_checkpointing")


def check_rebuild(model: nn.Module) -> None:
    """Refuse a pruned model whose config would rebuild different parameters on reload."""
    fresh = meta_model(model.config, cls=type(model))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        shape = [k for k in set(want) & set(have) if want[k] != have[k]][:3]
        raise PruneError(
            f"internal error: the pruned config does not rebuild the pruned model "
            f"(missing {missing}, unexpected {extra}, shape mismatch {shape}); please report this"
        )
    rebuilt = dict(fresh.named_modules())
    stack = decoder_layers_path(model) + "."
    for name, module in model.named_modules():  # constants fixed at construction (a scaling, a window)
        other = rebuilt.get(name)
        in_block = name.startswith(stack)
        for key, value in vars(module).items() if other is not None else ():
            if key.startswith("_") or key in RUNTIME_STATE:
                continue
            theirs = vars(other).get(key)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, theirs))
            # in a block, also a layer type, a flag or a window that one side lacks (outside, the meta-built rotary
            # embedding leaves numbers it computes at load time None)
            plain = in_block and all(v is None or isinstance(v, (str, bool, int, float)) for v in (value, theirs))
            if (numbers and not math.isclose(value, theirs, rel_tol=1e-9)) or (plain and not numbers and value != theirs):
                raise PruneError(f"internal error: {name}.{key} is {value} in the pruned model but {theirs} when its "
                                 "config is loaded again (the saved model would compute something else); please report this")
