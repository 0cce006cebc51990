"""Remove decoder blocks in place and rewire the model into a plain checkpoint.

``remove_layers(model, indices)`` keeps the surviving block modules themselves (no copy
of the model), then makes everything that indexes blocks by position agree again:

* every kept module's ``layer_idx`` (attention modules use it to index the KV cache);
* the config (``num_hidden_layers``, per-layer lists like ``layer_types``, position
  dependent layouts: see :func:`prune.models.pruned_config_updates`);
* ``hf_device_map`` entries of dispatched models (removed blocks dropped, kept renamed);
* tied input/output embeddings stay tied.

Finally the pruned config is instantiated on the meta device and its parameter names and
shapes compared with the pruned model's, so a config that would rebuild a different
model (and load with missing or unexpected weights) is caught here, not after saving.
"""

from __future__ import annotations


from torch import nn

from prune.core.errors import PruneError
from prune.core.records import complement
from prune.model.arch import block_index, meta_model
from prune.model.loading import decoder_layers_path, pruned_config_updates


def check_indices(indices, n_layers: int) -> list[int]:
    """Sorted block indices to remove; refuses empty, all, out-of-range and repeated indices."""
    indices = list(indices)
    if not indices:
        raise PruneError("no blocks to remove: give at least one block index")
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool):
            raise PruneError(f"block index {i!r} is not an integer")
        if not 0 <= i < n_layers:
            raise PruneError(f"block index {i} is out of range: the model has blocks 0..{n_layers - 1}")
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise PruneError(f"block indices repeated: {dupes} (give each block once)")
    if len(indices) >= n_layers:
        raise PruneError(f"cannot remove all {n_layers} blocks: at least one must stay")
    return sorted(indices)


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def remove_layers(model: nn.Module, indices) -> list[int]:
    """Remove the decoder blocks at 0-based ``indices`` from ``model`` in place.

    Returns the original indices of the kept blocks, in order. Raises :class:`PruneError`
    for an empty, complete, out-of-range or repeated list of indices.
    """
    path = decoder_layers_path(model)
    layers = model.get_submodule(path)
    n_layers = len(layers)
    removed = check_indices(indices, n_layers)
    kept = complement(n_layers, removed)
    tied_before = _tied(model)

    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
    for new_index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index

    for key, value in pruned_config_updates(model.config, kept).items():
        setattr(model.config, key, value)
    _rename_device_map(model, path, kept)
    if tied_before and not _tied(model):  # defensive: the embeddings were never touched
        model.tie_weights()
    check_rebuild(model)
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
