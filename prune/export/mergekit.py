"""mergekit interop: the ``passthrough`` slices of a pruned model, and slices as a block choice.

A layer-pruned model is mergekit's ``passthrough`` merge of one model with the kept blocks as
slices. Each maximal run of consecutive kept ORIGINAL blocks ``a, a+1, ..., b-1`` is one slice
``layer_range: [a, b]`` (mergekit's ranges are half-open, 0-based), in order:

    slices:
      - sources: [{model: ORIGINAL, layer_range: [0, 2]}]
      - sources: [{model: ORIGINAL, layer_range: [4, 8]}]
    merge_method: passthrough
    dtype: bfloat16

:func:`mergekit_config` writes that for a run folder (``prune export-mergekit RUN``);
:func:`blocks_from_slices` reads such slices back (``prune remove --slices``) as the blocks
to remove. Only in-order, non-overlapping slices of one model describe a pruning (mergekit
can also repeat or reorder blocks; those are refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from prune.core.errors import PruneError, overwrite_flag, first_line
from prune.core.records import PruningRecord, complement
from prune.model.loading import INDEX_LIST_KEYS, LAYOUT_REWRITES


def kept_ranges(kept: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as half-open ``(start, end)`` ranges, in order."""
    out: list[list[int]] = []
    for i in kept:
        if out and i == out[-1][1]:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def original_model_id(record: PruningRecord) -> str:
    """The model a passthrough merge reads: the original's Hub id, else the Hub parent declared
    for a local original (``model.base_model`` of the first step), else its local name."""
    source = record.original.source if record.original else record.source
    if source is None:
        return "path/to/original/model"
    if source.kind == "hub":
        return source.path
    return record.chain()[0].base_model or source.gguf_file or source.path


def original_config(record: PruningRecord, model: str | None = None) -> dict | None:
    """The original's ``config.json`` where it can be read without a download: ``model`` or the recorded source
    as a local folder, or a Hub id's file in the local Hub cache; None otherwise."""
    from huggingface_hub import try_to_load_from_cache

    source = record.original.source if record.original else record.source
    name = model or (source.path if source is not None and not source.gguf_file else None)
    if not name:
        return None
    local = Path(name).expanduser() / "config.json"
    file = local if local.is_file() else None
    if file is None and "/" in name and not Path(name).expanduser().exists():
        try:
            cached = try_to_load_from_cache(name, "config.json", revision=source.revision if source and not model else None)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under it
            cached = None
        file = Path(cached) if isinstance(cached, str) else None
    try:
        data = json.loads(file.read_text()) if file is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_model_arg(record: PruningRecord, model: str | None, original: dict | None) -> None:
    """Refuse a ``--model`` that cannot be the original: a local path that is missing or holds no model config,
    or a model of another block count or type than ``pruning.json``'s original (a Hub id is not checked offline)."""
    from prune.export.public import is_local_path

    if model is not None and not model.strip():  # an unset variable, --model "$ORIG": it fell back without a word
        raise PruneError("--model is empty: give the original model's folder or Hub id, or leave --model out to use "
                         "the one pruning.json names")
    if not model:
        return
    path = Path(model).expanduser()
    if is_local_path(model) or path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise PruneError(f"--model {model} is not a model folder (no config.json there): give the original model's "
                             "folder or Hub id")
    if original is None or record.original is None:
        return
    n, kind = original.get("num_hidden_layers", original.get("n_layer")), original.get("model_type")
    if record.original.n_layers is not None and n is not None and n != record.original.n_layers:
        raise PruneError(f"--model {model} has {n} blocks, but the original this folder was pruned from had "
                         f"{record.original.n_layers}: give the original model")
    if record.original.model_type and kind and kind != record.original.model_type:
        raise PruneError(f"--model {model} is a {kind} model, but the original was a {record.original.model_type}: "
                         "give the original model")


def mergekit_config(record: PruningRecord, model: str | None = None, dtype: str | None = None,
                    config: dict | None = None, original: dict | None = None) -> dict:
    """The passthrough config that rebuilds ``record``'s kept blocks from the original model. Refused
    where a passthrough merge cannot rebuild the folder's weights: a healed step (trained or refitted
    weights), GPT-2 with ``scale_attn_by_inverse_layer_idx`` (``config``: the folder's config.json)
    whose moved blocks carry a rescaled query, a config with per-layer lists (``layer_types``,
    ``mlp_only_layers``: mergekit copies them unsliced), a layout that depends on the block position
    (:data:`~prune.model.loading.LAYOUT_REWRITES`, Qwen3-MoE's dense and sparse blocks) unless the
    ``original`` config shows the merged model's layout equals the kept blocks', or an original mergekit
    cannot read (a GGUF file, local or on the Hub, unless ``model`` names a copy)."""
    kept = record.kept_original or record.kept
    if not kept:
        raise PruneError("pruning.json records no kept blocks: nothing to export")
    healed = [s.step or i + 1 for i, s in enumerate(record.chain()) if s.healing]
    if healed:
        raise PruneError(f"step {healed[0]} of this folder was healed: its weights are not the original's blocks, "
                         "which is all a mergekit passthrough merge copies (export the run folder before healing, "
                         "or use this folder's weights as they are)")
    config = config or {}
    if config.get("model_type") == "gpt2" and config.get("scale_attn_by_inverse_layer_idx") and \
            any(old != new for new, old in enumerate(kept)):
        raise PruneError("GPT-2 with scale_attn_by_inverse_layer_idx: the blocks that moved carry a rescaled query "
                         "(their attention scale depends on their index), which a mergekit passthrough merge of the "
                         "original's blocks would not: use this folder's weights as they are")
    n = config.get("num_hidden_layers", config.get("n_layer"))
    if isinstance(n, int) and n != len(kept):  # the record does not describe these weights (check refuses it too)
        raise PruneError(f"pruning.json records {len(kept)} kept blocks but config.json has {n}: the record does not "
                         "describe this folder's weights (prune check says more)")
    per_layer = [k for k, v in config.items() if isinstance(v, list) and v and
                 ((k in INDEX_LIST_KEYS) or ("layer" in k and len(v) == n))]
    if per_layer:
        raise PruneError(f"{config.get('model_type', 'this model')}: config.json has per-layer settings "
                         f"({', '.join(per_layer)}) that prune sliced to the kept blocks, but a mergekit passthrough merge "
                         "copies from the original unchanged (it sets only num_hidden_layers): the merged model would "
                         "not load or not match; use this folder's weights as they are")
    rewrite = LAYOUT_REWRITES.get(config.get("model_type"))
    if rewrite is not None and kept != list(range(len(kept))):  # blocks moved: does the merge rebuild their layout?
        kind = config["model_type"]
        if original is None:
            raise PruneError(f"{kind}: which blocks are dense or sparse depends on their position, and the original's "
                             "config.json is not readable here to check that a passthrough merge keeps each kept block's "
                             "kind: pass --model with a local copy of the original")
        from transformers import AutoConfig

        try:
            layout = AutoConfig.for_model(**original)  # with its attribute names (num_experts: num_local_experts)
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
            raise PruneError(f"the original's config.json is not a {kind} config transformers can build "
                             f"({first_line(exc)}): pass --model with a copy of the original") from None
        if rewrite(layout, kept) != rewrite(layout, list(range(len(kept)))):
            raise PruneError(f"{kind}: the original's dense/sparse layout depends on the block position, so a passthrough "
                             "merge (which keeps the original's config, with num_hidden_layers alone changed) would build "
                             "other blocks than the kept ones: use this folder's weights as they are")
    source = record.original.source if record.original else record.source
    if model is None and source is not None and source.gguf_file:  # a local one too: its Hub base model's
        # weights are not the (dequantized) GGUF weights this folder holds
        where = f" of {source.path}" if source.kind == "hub" else ""
        raise PruneError(f"the original is the GGUF file {source.gguf_file}{where}, which mergekit cannot read (and a "
                         "release of the model in safetensors holds other weights than a quantized file): pass --model "
                         "with a safetensors copy of the same weights")
    name = model or original_model_id(record)
    slices = [{"sources": [{"model": name, "layer_range": [a, b]}]} for a, b in kept_ranges(kept)]
    return {"slices": slices, "merge_method": "passthrough", "dtype": dtype or record.dtype or "float32"}


def export_mergekit(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, *, model: str | None = None,
                    dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write ``mergekit.yaml`` (default: inside ``run_dir``) for the run's kept blocks; returns the file. An
    existing one is replaced only with ``overwrite``; another ``output`` is never an input."""
    from prune.core.records import RECORD_FILE, read_record
    from prune.io.guard import check_output, input_paths, write_file

    from prune.io.staging import existing

    run = existing(run_dir)
    if not (run / RECORD_FILE).is_file():
        raise PruneError(f"{run} has no {RECORD_FILE}: give a folder written by prune run / remove / heal")
    out = Path(output).expanduser() if output else run / "mergekit.yaml"
    if out.resolve() == (run / "mergekit.yaml").resolve() and out.exists() and not overwrite:  # as report's files
        raise PruneError(f"{out} already exists (pass --overwrite to replace it, or --output another file)")
    if output and out.resolve() != (run / "mergekit.yaml").resolve():  # never over the run's files or another input
        inputs = [(run / f.name, "a file of the run folder", False) for f in run.iterdir() if f.name != "mergekit.yaml"]
        check_output(out, [*input_paths(run, label="the run folder", inside_ok=True), *inputs,
                           *input_paths(model, label="the --model")], overwrite=overwrite,
                     kind="file", what="--output file", flag="--output", example="mergekit.yaml")
    record = read_record(run / RECORD_FILE)
    model_config = None
    if (run / "config.json").is_file():
        try:
            model_config = json.loads((run / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise PruneError(f"{run / 'config.json'}: not readable JSON ({exc}); give a folder written by prune") from None
        if not isinstance(model_config, dict):
            raise PruneError(f"{run / 'config.json'}: not a model config (a JSON object); give a folder written by prune")
    original = original_config(record, model)
    check_model_arg(record, model, original)
    config = mergekit_config(record, model, dtype, model_config, original)
    note = ("# mergekit passthrough config for the blocks this model kept (original indices, half-open ranges)\n"
            f"# written by prune from {RECORD_FILE}; run with: mergekit-yaml {out.name} OUTPUT_DIR\n")
    if model and out.resolve().is_relative_to(run.resolve()):  # a file of the run folder is published with it (push)
        from prune.export.public import is_local_path, public_path

        if is_local_path(model):
            for piece in config["slices"]:
                piece["sources"][0]["model"] = public_path(model)
            note += (f"# --model was the local folder {public_path(model)}: set `model` to its path before running "
                     "(a file of the run folder holds no machine-local path)\n")
    source = record.original.source if record.original else None
    if model is None and source is not None and source.kind != "hub":
        note += (f"# the original was the local {source.kind} {source.gguf_file or source.path}: check that `model` names "
                 "the same weights (or pass --model)\n")
        from prune.core.console import say

        say(f"note: the original was the local {source.kind} {source.gguf_file or source.path}; {out.name} names "
            f"{config['slices'][0]['sources'][0]['model']!r} for mergekit to read: check that it holds the same weights "
            f"from where mergekit runs (or write again with --model PATH and {overwrite_flag()})")
    return write_file(out, note + yaml.safe_dump(config, sort_keys=False))


# ---- slices -> blocks to remove ------------------------------------------------------------
def parse_slices(spec: str | list) -> list[tuple[int, int]]:
    """Half-open ranges from a mergekit config file, its ``slices`` list, or inline YAML such as
    ``[[0, 2], [4, 8]]`` (``[start, end]`` pairs)."""
    return read_slices(spec)[0]


#: the keys of a mergekit passthrough config a pruning reads (``base_model`` is unread by passthrough); any other
#: changes what mergekit builds (``parameters: scale`` zeroes a projection, ``tokenizer_source`` another
#: vocabulary) and is refused, not dropped
SLICES_KEYS, SLICE_KEYS, SOURCE_KEYS = {"merge_method", "slices", "dtype", "out_dtype", "base_model"}, {"sources"}, \
    {"model", "layer_range"}


def _only_known(data: dict, known: set, where: str) -> None:
    other = sorted(str(k) for k in data if k not in known)
    if other:
        why = ("mergekit's parameters change the weights (a scale of 0 turns a projection off)" if "parameters" in other
               else "mergekit builds something else with it")
        raise PruneError(f"--slices: {where} key {other[0]!r} is not read by a pruning, which keeps blocks as they are "
                         f"({why}): drop it, or run mergekit itself")


def read_slices(spec: str | list) -> tuple[list[tuple[int, int]], str | None, str | None]:
    """:func:`parse_slices`'s ranges, the model the slices name (None for bare ranges) and the dtype the config
    writes (``out_dtype``, else ``dtype``; None when it names none)."""
    from prune.core.yamlsafe import load_yaml

    data = spec
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.suffix in (".yaml", ".yml") and not path.is_file():  # a file name, not inline ranges
            raise PruneError(f"--slices file not found: {spec} (give a mergekit config file or ranges like [[0, 2], [4, 8]])")
        try:
            data = load_yaml(path.read_text() if path.is_file() else spec, "--slices")
        except PruneError as exc:
            raise PruneError(f"{exc}; give a mergekit config file or ranges like [[0, 2], [4, 8]]") from None
    dtype = None
    if isinstance(data, dict):
        method = data.get("merge_method", "passthrough")
        if method != "passthrough":  # a linear or SLERP merge of the slices is not the blocks they name, kept
            raise PruneError(f"--slices: the config's merge_method is {method!r}; a pruning keeps blocks as they are "
                             "(merge_method: passthrough)")
        _only_known(data, SLICES_KEYS, "the config's")
        dtype = data.get("out_dtype") or data.get("dtype")
        if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
            raise PruneError(f"--slices: the config's dtype {dtype!r} is not one of bfloat16, float16, float32")
        data = data.get("slices")
    if not isinstance(data, list) or not data:
        raise PruneError("--slices: expected a mergekit config with `slices`, or ranges like [[0, 2], [4, 8]]")
    ranges, models = [], set()
    for item in data:
        if isinstance(item, dict):
            _only_known(item, SLICE_KEYS, "a slice's")
            sources = item.get("sources") or []
            if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
                raise PruneError("--slices: each slice must have exactly one source (a pruning reads one model)")
            _only_known(sources[0], SOURCE_KEYS, "a source's")
            models.add(sources[0].get("model"))
            item = sources[0].get("layer_range")
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise PruneError(f"--slices: {item!r} is not a layer_range [start, end] of two integers")
        ranges.append((int(item[0]), int(item[1])))
    if len(models) > 1:
        raise PruneError(f"--slices: the slices read {len(models)} different models; a pruning keeps blocks of one")
    return ranges, next(iter(models), None), dtype


def check_slices_model(named: str | None, model: str, pruned: bool) -> None:
    """Refuse slices that name another model than MODEL when MODEL is itself a pruned folder: prune export-mergekit
    writes the original's block numbers and names the original, so they would remove other blocks of MODEL."""
    if not named or not pruned:
        return
    same = named == model or (Path(named).expanduser().exists() and Path(model).expanduser().exists()
                              and Path(named).expanduser().resolve() == Path(model).expanduser().resolve())
    if not same:
        raise PruneError(f"--slices name the model {named}, but {model} is a pruned model (its blocks are numbered after "
                         f"an earlier pruning): apply them to {named}, or give ranges in {model}'s own numbering")


def blocks_from_slices(spec: str | list, n_layers: int) -> list[int]:
    """The blocks to remove so that exactly the blocks of the slices remain (0-based, of
    ``n_layers``); refuses empty, out-of-range, overlapping or out-of-order slices."""
    kept: list[int] = []
    for start, end in parse_slices(spec):
        if not 0 <= start < end <= n_layers:
            raise PruneError(f"--slices: layer_range [{start}, {end}] is not inside 0..{n_layers} "
                             "(half-open, 0-based: [start, end) with start < end)")
        if kept and start < kept[-1] + 1:
            raise PruneError(f"--slices: layer_range [{start}, {end}] overlaps or comes before the previous slice "
                             "(repeating or reordering blocks is not a pruning)")
        kept += range(start, end)
    removed = complement(n_layers, kept)
    if not removed:
        raise PruneError(f"--slices keep all {n_layers} blocks: nothing to remove")
    return removed
