"""Write a pruned model as a standard Hugging Face checkpoint, atomically.

``save(model, tokenizer, out_dir, pruning=...)`` writes ``config.json``, safetensors
weights, tokenizer files, ``pruning.json`` and any extra text files into a hidden
sibling folder ``.<name>.incomplete-<pid>`` and renames it to ``out_dir`` only when
everything is written: an interrupted save never leaves a folder that looks complete.
An existing ``out_dir`` is refused unless ``overwrite=True`` (then it is replaced only
after the new folder is complete).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from prune.core.errors import PruneError
from prune.core.records import RECORD_FILE, PruningRecord, complement, is_block_map, record_json
from prune.core.faults import fault_point
from prune.export.public import clean_config_file, clean_tokenizer_config, public_text
from prune.model.loading import dtype_name, is_dispatched, weights_dtype

if TYPE_CHECKING:
    from prune.choose.rules import Selection

from prune.io.guard import check_output, input_paths, safe_join  # noqa: F401  (re-exported)
from prune.io.staging import (  # noqa: F401  (re-exported: the atomic-folder code lives in prune.io.staging)
    INCOMPLETE_MARKER,
    INCOMPLETE_TAG,
    _replace,
    check_output_dir,
    recover,
    remove_stale_staging,
    staged,
    staging_dir,
)


def save(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    pruning: PruningRecord | dict | Selection | None = None,
    files: dict[str, str] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    source=None,
    inputs=(),
) -> Path:
    """Save ``model`` and ``tokenizer`` as a plain checkpoint (safetensors) plus metadata.

    ``pruning`` (a record, its dict, or the :class:`~prune.choose.rules.Selection` whose blocks
    ``remove_layers`` removed) is written as ``pruning.json``; ``files`` maps relative file names to text
    contents written beside it (``recipe.yaml``, ``eval.md``, ``README.md`` ...). With a
    ``pruning`` record and no ``README.md`` in ``files``, the record gets its lineage (a
    record of only ``removed`` counts as one step from an original model; ``source``: the
    model it was pruned from, when known: a path, Hub id or :class:`~prune.io.source.ModelSource`) and a model card
    is written, so the folder is ready for ``prune push``. ``dtype`` (``auto``/None = as
    loaded, ``bfloat16``, ``float16``, ``float32``) converts the saved weights only (the
    model in memory is untouched). ``config.json`` is exactly what ``save_pretrained``
    writes, minus the GGUF loader's ``quantization_config`` (weights are saved dequantized).
    Every JSON/YAML file is cleaned of local paths (:mod:`prune.export.public`). ``inputs``:
    paths the output must never touch (:mod:`prune.io.guard`). Returns the final folder. Under a
    launcher rank 0 writes it and the other ranks return at once, with no collective (so a script may call it
    on every rank, or on rank 0 alone; a rank that reads the folder next waits for it, e.g. with a barrier).
    """
    from prune.core import dist

    w = dist.world()
    if w.distributed and not w.is_main:  # every rank wrote the folder (the second refused, or replaced the first's)
        return Path(out_dir).expanduser()
    from prune.measure.scoring import check_model

    check_model(model, "the model to save")
    check_extra_files(files)
    if isinstance(source, (str, os.PathLike)):  # a path or Hub id, as prune.load takes it
        from prune.io.source import resolve_source

        source = resolve_source(str(source))
    if pruning is not None and "README.md" not in (files or {}):
        pruning, card = record_and_card(model, pruning, out_dir, source=source, dtype=dtype)
        files = {**(files or {}), "README.md": card}
    inputs = [*inputs, *own_inputs(model, source)]
    with staged(out_dir, overwrite, inputs) as stage:
        if is_dispatched(model):  # Accelerate's offload hooks untie tied weights after a forward:
            model.tie_weights()  # re-tie, or the tied copy (lm_head) would be saved twice
        fault_point("saving")
        target = saved_dtype(model, dtype)
        state = None if target == weights_dtype(model) else converted_state(model, target)
        model.save_pretrained(stage, max_shard_size=max_shard_size, state_dict=state)
        if state is not None and any(p.is_meta for p in model.parameters()):
            convert_shards(stage, target)  # offloaded weights were read back from disk as stored
        fault_point("saved_weights")
        clean_config_file(stage, dtype=None if state is None else dtype_name(target))
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
            clean_tokenizer_config(stage)  # transformers writes how it was loaded (local_files_only) into it
        else:  # the output would fail prune check and pipeline(), as prune_checkpoint says of a source without one
            from prune.core.console import say

            say(f"note: no tokenizer given: {out_dir} has no tokenizer files (pass the tokenizer, or copy its files in "
                "before loading it with a tokenizer or pushing it)")
        write_extras(stage, pruning, files)
    return Path(out_dir).expanduser()


def saved_dtype(model, dtype: str | None):
    """The torch dtype the weights are saved in: ``dtype`` (``output.dtype``), ``auto``/None = as loaded."""
    from prune.core.config import resolve_dtype

    target = resolve_dtype(dtype)
    return weights_dtype(model) if target == "auto" else target


def out_of_core_dtype(recipe) -> str:
    """What a recipe saves out of core (no model in memory), as :func:`saved_dtype` in memory:
    ``output.dtype``, ``auto`` = the dtype the model is loaded in (``model.dtype``; ``auto`` = as stored)."""
    wanted = recipe.output.dtype
    return wanted if wanted != "auto" else recipe.model.dtype


def converted_state(model, dtype) -> dict:
    """The model's state dict with floating tensors in ``dtype``; tensors that share storage
    (tied embeddings) stay shared, so ``save_pretrained`` still saves them once."""
    done: dict = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in done:
            done[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        out[name] = done[key]
    return out


def convert_shards(folder: Path, dtype) -> None:
    """Every floating tensor of the safetensors files in ``folder`` rewritten in ``dtype``, one tensor
    in memory at a time (:mod:`prune.export.outofcore`'s writer), and the index's ``total_size`` with
    them. ``save_pretrained`` reads a weight offloaded to disk back as it was stored, whatever the
    state dict it was given holds for it (a meta placeholder): without this, a model dispatched with
    disk offload was saved half in ``dtype``, half in its stored dtype, under a config naming ``dtype``."""
    from prune.export.outofcore import convert_entries, write_safetensors
    from prune.io.safetensors import file_tensors

    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        entries, metadata = file_tensors(shard)
        tmp = shard.with_name(shard.name + ".tmp")
        total += write_safetensors(tmp, convert_entries(list(entries.items()), dtype), metadata)
        tmp.replace(shard)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def loaded_from(model) -> Path | None:
    """The local folder ``model`` was loaded from (``name_or_path``), or None: built in memory (``""``, which is not
    the working directory), or a Hub id."""
    loaded = str(getattr(model, "name_or_path", "") or "")
    folder = Path(loaded).expanduser() if loaded else None
    return folder if folder is not None and folder.is_dir() else None


def original_folder(folder: Path | None):
    """The model folder a model was loaded from, as a source to check a record's block count against (a
    ``pruning={"removed": [1]}`` of a 10-block original that lost two blocks claimed a 9-block one), or None."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    from prune.io.source import resolve_source

    return resolve_source(str(folder))


def own_inputs(model, source=None) -> list:
    """What :func:`save` never replaces nor writes into: the model folder ``model`` was loaded from and the
    ``source`` named (a GGUF source: the file alone, as a run protects it; its folder may hold the output)."""
    folder = loaded_from(model)
    out = input_paths(folder if folder is not None and (folder / "config.json").is_file() else None,
                      label="the folder the model was loaded from")
    if source is not None and source.kind == "gguf":
        out += input_paths(Path(source.path) / source.gguf_file, label="the source GGUF file")
    elif source is not None and source.kind == "folder":
        out += input_paths(source.path, label="the source model")
    return out


def selection_record(pruning):
    """``pruning=`` as a record: a :class:`~prune.choose.rules.Selection` (what ``prune.select`` and the
    strategies return) is its removal from ``n_layers`` blocks, with the selection kept beside it."""
    from prune.choose.rules import Selection

    if isinstance(pruning, Selection):
        return {"removed": list(pruning.removed), "layers_before": pruning.n_layers, "selection": pruning.to_dict()}
    return pruning


def check_record_fits(record: PruningRecord, n_now: int, source=None) -> None:
    """A removal the model as it is now can be the result of: its blocks inside the stack before it, the blocks
    it keeps as many as the model has (not saved before ``remove_layers``), and the stack before it the
    ``source``'s (when its config is readable). A record of a removal that did not happen wrote a lineage
    from an original that never existed."""
    from prune.model.loading import load_config

    removed = sorted(record.removed)
    before = record.layers_before or n_now + len(removed)
    if outside := [i for i in removed if not 0 <= i < before]:
        raise PruneError(f"pruning= removes blocks {outside}, outside the {before} blocks before the removal "
                         "(0-based indices of the model as it was before remove_layers)")
    remove_first = (f"the model still has all {n_now} blocks: remove them first (prune.remove_layers(model, "
                    f"{removed})), then save")
    if record.layers_before is not None and not record.kept and before - len(removed) != n_now:
        raise PruneError(remove_first if before == n_now else
                         f"pruning= removes {len(removed)} of {before} blocks, leaving {before - len(removed)}, but the "
                         f"model has {n_now}")
    if source is None:
        return
    try:
        n_source = load_config(source).num_hidden_layers
    except Exception:  # noqa: BLE001 - a Hub id offline, an unreadable config: the check is skipped, not the save
        return
    if n_source != before:
        raise PruneError(remove_first if n_source == n_now else
                         f"pruning= describes a removal from {before} blocks, but the source {source.display} has "
                         f"{n_source} (give the removal made from it, in its own block indices)")


def with_replacement(record: PruningRecord) -> PruningRecord:
    """``record`` with the kept blocks of the replacement its healing record made (``heal_model(..., "replace")``
    returns ``kept`` and ``replacement.replaces``), as ``prune heal --method replace`` records it: the run is
    removed and one of its blocks, trained, stays in its place (so the stack before had ``kept`` and ``removed``
    together, that block counted once). A record whose ``removed`` is not the replaced run is refused."""
    replacement = (record.healing or {}).get("replacement") if isinstance(record.healing, dict) else None
    if not isinstance(replacement, dict) or record.kept:
        return record
    replaces, kept = replacement.get("replaces"), record.healing.get("kept")
    if not (isinstance(replaces, list) and is_block_map(replaces) and isinstance(kept, list) and is_block_map(kept)):
        return record
    if sorted(record.removed) != replaces:
        raise PruneError(f"pruning= removes blocks {sorted(record.removed)}, but its healing record's trained block "
                         f"stands in for the run {replaces}: give pruning={{'removed': {replaces}, 'healing': ...}} (the "
                         "blocks of the model before heal_model, 0-based)")
    out = record.model_copy(deep=True)
    out.kept = list(kept)
    out.layers_before = out.layers_before or len(set(kept) | set(replaces))
    return out


def matching_cut(model, source):
    """The cut :func:`prune.remove_layers` made of ``model`` (:func:`prune.model.surgery.cut_trail`), when a record
    relative to ``source`` can be checked against it: the model was loaded from ``source`` (or, with no source
    known, from wherever it was), and no other code changed its stack since. None otherwise."""
    from prune.model.loading import decoder_layers
    from prune.model.surgery import cut_trail, model_place

    trail = cut_trail(model)
    if trail is None or len(trail.kept) != len(decoder_layers(model)):
        return None
    if source is not None and model_place(source.path) != trail.loaded_from:
        return None  # a record relative to another model (a folder saved since, say): its own frame
    return trail


def check_against_cut(record: PruningRecord, trail) -> None:
    """Refuse a record whose removal is not the one :func:`prune.remove_layers` made (blocks 2 and 3 recorded
    where 4 and 6 went: a lineage, card and mergekit slices of other blocks than the weights hold)."""
    removed = sorted(record.removed)
    before = record.layers_before or trail.layers_before
    kept = list(record.kept) or complement(before, [i for i in removed if 0 <= i < before])
    if before == trail.layers_before and kept == list(trail.kept):
        return
    cut = complement(trail.layers_before, list(trail.kept))
    raise PruneError(f"pruning= records blocks {removed} of {before} removed, but prune.remove_layers cut blocks {cut} "
                     f"of the {trail.layers_before} this model had when loaded: give pruning={{'removed': {cut}}} (or "
                     "the Selection those blocks came from)")


def record_and_card(model, pruning: PruningRecord | dict, out_dir, *, source=None, dtype: str | None = None,
                    rows: list[dict] | None = None, settings: dict | None = None, recipe_yaml: str | None = None):
    """``(record, card)`` for :func:`save` from the Python API: ``pruning`` normalised to a
    lineage record of the model as it is now (blocks, parameters, dtype) and its card."""
    from prune.core.console import versions
    from prune.export.card import render_card
    from prune.export.lineage import as_record, extend, normalize_step, read_parent
    from prune.model.loading import count_parameters, decoder_layers

    n_now = len(decoder_layers(model))
    record = as_record(selection_record(pruning), "pruning=")
    folder = loaded_from(model)
    if source is None and folder is not None and (folder / RECORD_FILE).is_file():  # its lineage, not a first step
        from prune.io.source import resolve_source                                # from an original of its size

        source = resolve_source(str(folder))
    record = with_replacement(record)
    frame = source or original_folder(folder)  # what the record's indices are relative to (resolved once)
    trail = matching_cut(model, frame)
    if trail is not None:
        check_against_cut(record, trail)
    if record.layers_before is None or not record.kept or record.step == 1 and not record.kept_original:
        check_record_fits(record, n_now, frame)
        record = normalize_step(record, n_now)
        if trail is not None and record.params_before is None:
            record.params_before = trail.params_before  # the model as loaded: the card's original count
        if source is not None:  # a pruned source: this step extends its lineage (indices in the original)
            parent = read_parent(source, record.layers_before)
            if parent is not None and record.params_before is None:
                record.params_before = parent.params_after
            record = extend(record, parent, source)
    if record.params_after is None:
        record.params_after = count_parameters(model)
    record.model_type = record.model_type or model.config.model_type
    record.dtype = dtype_name(saved_dtype(model, dtype))
    record.command = record.command or "save"
    record.versions = record.versions or versions()
    if record.created is None:  # not extended above (no pruned source): dated here
        from prune.core.records import utc_now

        record.created = utc_now()
    name = Path(out_dir).name
    card = render_card(record, rows=rows, settings=settings, recipe_yaml=recipe_yaml, model_name=name,
                       load_id=f"path/to/{name}")
    return record, card


def check_extra_files(files: dict[str, str] | None) -> None:
    """Refuse extra ``files`` that would replace what the checkpoint writes itself (``config.json``, the weights,
    the tokenizer's files, ``pruning.json``: a ``files={"config.json": "{}"}`` left a folder nothing loads), or
    whose contents are not text; ``README.md`` (the card) may be given."""
    from prune.io.staging import CHECKPOINT_FILE

    for name, text in (files or {}).items():
        if (name != "README.md" and CHECKPOINT_FILE.match(Path(name).name) and Path(name).parent == Path(".")) \
                or name == RECORD_FILE:
            raise PruneError(f"files names {name}, which the checkpoint writes itself (its config, weights, tokenizer "
                             f"or record{': pass the record as pruning=' if name == RECORD_FILE else ''}): give "
                             "another name")
        if not isinstance(text, str):
            raise PruneError(f"files[{name!r}] is a {type(text).__name__}: extra files are text (a str)")


def write_extras(stage: Path, pruning: PruningRecord | dict | None, files: dict[str, str] | None) -> None:
    """``pruning.json`` (a :class:`~prune.core.records.PruningRecord`, or a dict validated as one)
    and the extra text files of a checkpoint folder, JSON and YAML files cleaned of local paths
    (:func:`prune.export.public.public_text`)."""
    from prune.export.lineage import as_record

    if pruning is not None:
        (stage / RECORD_FILE).write_text(public_text(RECORD_FILE, record_json(as_record(selection_record(pruning)))))
    for name, text in (files or {}).items():
        target = safe_join(stage, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(public_text(name, text))


# ---- lineage, model card, push: what `prune run` adds around `save` ---------------------
def preflight_export(recipe, src, n_layers: int) -> PruningRecord | None:
    """Checks before any weights are loaded: the source's own ``pruning.json`` (when it was
    itself pruned) agrees with its ``n_layers`` blocks, ``model.base_model`` is only given
    for a local source, and ``output.push_to_hub`` can be attempted (valid repo id, a token,
    not offline). Returns the parent record or ``None``."""
    from prune.export.lineage import read_parent

    base = getattr(recipe.model, "base_model", None)
    if base and src.kind == "hub" and base != src.path:
        raise PruneError(f"model.base_model={base!r} is only for a local source: {src.path} is a Hub id and is the "
                         "base model itself (remove model.base_model)")
    if recipe.heal is not None and not getattr(recipe.heal, "merge", True):
        raise PruneError("heal.merge: false (a LoRA adapter instead of merged weights) is for `prune heal RUN_DIR "
                         "--set merge=false`, which writes the adapter of the saved pruned run; in a recipe keep "
                         "merge: true, or run without heal and heal the output afterwards")
    parent = read_parent(src, n_layers)
    if recipe.output.push_to_hub is not None:
        from prune.export.push import check_can_push

        check_can_push(recipe.output.push_to_hub.repo_id)
    return parent


def prepare_export(pruning: PruningRecord | dict, evaluation: dict, recipe, src, parent: PruningRecord | None, *,
                   new_step: bool = True, out_dir=None, model=None) -> tuple[PruningRecord, str]:
    """``(record, card)``: the record with the recipe (local paths made public, so each step of a
    chain keeps its own), extended with its lineage when it is a ``new_step`` (``prune heal``
    keeps the step it heals), and the model card text written as ``README.md``. ``recipe`` is
    ``None`` for a folder that has none (then ``out_dir`` names the output)."""
    from prune.export.card import render_card
    from prune.export.lineage import as_record, extend
    from prune.export.public import public_data, public_yaml

    out_dir = str(out_dir if out_dir is not None else recipe.output.dir)
    record = as_record(pruning)
    if recipe is not None:
        record = record.model_copy(update={"recipe": public_data(recipe.model_dump(mode="json"))})
    if new_step:
        record = extend(record, parent, src, getattr(recipe.model, "base_model", None) if recipe else None)
        record.command = "run"
    if recipe is not None:
        if model is not None:
            record.dtype = dtype_name(saved_dtype(model, recipe.output.dtype))
        elif record.dtype is None:  # out of core: the engine's planned dtype (Sequential.saved_dtype), else the recipe's
            record.dtype = None if out_of_core_dtype(recipe) == "auto" else out_of_core_dtype(recipe)
    push = recipe.output.push_to_hub if recipe is not None else None
    name = Path(out_dir).name
    card = render_card(record, rows=evaluation.get("rows"), recipe_yaml=public_yaml(recipe.to_yaml()) if recipe else None,
                       settings=public_data(evaluation.get("settings")) if recipe is not None and recipe.evaluate else None,
                       model_name=name, load_id=push.repo_id if push else f"path/to/{name}",
                       paired=evaluation.get("paired"))
    return record, card
