"""Out-of-core pruning: write the pruned checkpoint straight from the source safetensors shards.

``prune_checkpoint(folder, removed, out_dir)`` never instantiates the model and never holds
a tensor in memory: every tensor of a kept block is copied byte for byte from its source
shard under its new name (block indices renumbered ``0 .. len(kept)-1``), tensors of removed
blocks are skipped, everything outside the blocks (embeddings, norm, LM head) is copied
unchanged. Each source shard gives one output shard (so no output shard is larger than the
largest source shard), with a new ``model.safetensors.index.json``. ``config.json`` gets
:func:`prune.model.loading.pruned_config_updates` and is written by ``save_pretrained``; tokenizer,
generation config and other small files are carried over (not the original model card, nor
weights in other formats, nor a pruned source's ``eval.*`` / ``recipe.yaml``).

Which checkpoint tensor belongs to which block is decided by transformers' own key mapping
(:class:`~prune.skeleton.Skeleton`), and the written folder is checked the same way: it must
fill every parameter of the model its new config builds. Writing is atomic (a staging folder
renamed at the end, as :func:`prune.save`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prune.core.console import say
from prune.core.errors import PruneError
from prune.core.faults import fault_point
from prune.core.records import PruningRecord, complement
from prune.export.public import clean_config_file, clean_tokenizer_config
from prune.export.saving import check_extra_files, staged, write_extras
from prune.io.safetensors import (
    INDEX_NAME,
    SINGLE_NAME,
    TensorEntry,
    byte_ranges,
    copy_bytes,
    local_folder,
)
from prune.io.source import ModelSource
from prune.model.loading import TOKENIZER_FILES, check_cut_keeps_attention, dtype_name, pruned_config_updates
from prune.model.surgery import check_indices, query_rescale

#: files never carried over: weights in other formats (and params.json, Mistral's config of its consolidated weights,
#: which names the original depth), a PEFT adapter's config (its weights are not copied, and it numbers the original
#: blocks: transformers then fails to load the output), the original model card, our own outputs
SKIP_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|^README\.md$|^config\.json$|^params\.json$|"
                        rf"^{re.escape(INDEX_NAME)}$|^pytorch_model.*\.json$|^pruning\.json$|^\..*|^adapter_config\.json$|"
                        r"^eval\.(json|md)$|^recipe\.yaml$|^mergekit\.yaml$")  # a pruned source's: stale here


#: GPT-2's fused query/key/value projection (weight and bias), whose query part :func:`query_rescale` scales
QUERY_KEY = re.compile(r"(^|\.)attn\.c_attn\.(weight|bias)$")


def renumber_key(key: str, attr: str, old: int, new: int) -> str:
    """``key`` with its block index ``old`` (the segment ``<attr>.<old>.``) replaced by ``new``."""
    pattern = re.compile(rf"(^|\.){re.escape(attr)}\.{old}\.")
    match = pattern.search(key)
    if match is None:
        raise PruneError(f"cannot find block {old} in checkpoint key {key!r} (expected '{attr}.{old}.')")
    return key[: match.start()] + f"{match.group(1)}{attr}.{new}." + key[match.end():]


@dataclass(frozen=True)
class Converted:
    """A source tensor written in another floating dtype (``output.dtype``), or with the first
    ``rescale[0]`` entries of its last dimension multiplied by ``rescale[1]`` (as
    :func:`prune.model.surgery.remove_layers` does in memory, in float32 or wider, rounded once to the
    target): read, changed and written one
    tensor at a time, so memory holds at most one tensor. ``through``: rounded to that dtype first, as a model
    loaded in it (``model.dtype``) and saved in another (``output.dtype``) is."""

    entry: TensorEntry
    target: torch.dtype
    rescale: tuple[int, float] | None = None
    through: torch.dtype | None = None

    @property
    def dtype(self) -> str:
        return SAFETENSORS_NAMES[self.target]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.target

    @property
    def nbytes(self) -> int:
        return self.entry.numel() * self.target.itemsize

    def write(self, out) -> None:
        begin, end = byte_ranges(self.entry.file)[self.entry.key]
        with self.entry.file.open("rb") as handle:
            handle.seek(begin)
            raw = bytearray(handle.read(end - begin))
        tensor = torch.frombuffer(raw, dtype=self.entry.torch_dtype) if raw else torch.empty(0, dtype=self.entry.torch_dtype)
        if self.through is not None:
            tensor = tensor.to(self.through)
        if self.rescale is not None:  # in float32 (float64 if stored or written so), rounded once to the target
            width, factor = self.rescale
            tensor = tensor.to(torch.promote_types(torch.promote_types(tensor.dtype, self.through or self.target),
                                                   torch.float32))
            tensor.view(self.entry.shape)[..., :width].mul_(factor)
            if self.through is not None:  # in memory the model holds it in its own dtype before the save
                tensor = tensor.to(self.through)
        out.write(tensor.to(self.target).view(torch.uint8).numpy().tobytes())


SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def convert_entries(tensors: list[tuple[str, TensorEntry]], target: torch.dtype | None,
                    through: torch.dtype | None = None) -> list[tuple[str, object]]:
    """Floating tensors not already in ``target`` wrapped as :class:`Converted` (``None``: unchanged); ``through``:
    every floating tensor not stored in it is rounded to it on the way (:attr:`Converted.through`)."""
    if target is None:
        return tensors
    out = []
    for name, e in tensors:
        if isinstance(e, Converted):
            e = dataclasses.replace(e, target=target, through=through)
        elif e.torch_dtype.is_floating_point and (e.torch_dtype != target or through not in (None, e.torch_dtype)):
            e = Converted(e, target, through=through if through != e.torch_dtype else None)
        out.append((name, e))
    return out


def write_safetensors(path: Path, tensors: list[tuple[str, TensorEntry]], metadata: dict | None = None,
                      bar=None) -> int:
    """Write ``(name, source entry)`` pairs as one safetensors file, copying bytes; returns data bytes.

    Tensors are laid out like the reference serializer (largest element size first, then by
    name), so every tensor stays aligned to its element size; the header is padded to 8 bytes.
    ``bar`` (a tqdm bar in bytes) advances by each tensor written.
    """
    def order(item):
        name, entry = item
        return (-entry.torch_dtype.itemsize, name)

    tensors = sorted(tensors, key=order)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, entry in tensors:
        header[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    ranges: dict[Path, dict[str, tuple[int, int]]] = {}
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, entry in tensors:
            if isinstance(entry, Converted):
                entry.write(out)
            else:
                if entry.file not in ranges:
                    ranges[entry.file] = byte_ranges(entry.file)
                copy_bytes(entry.file, *ranges[entry.file][entry.key], out)
            if bar is not None:
                bar.update(entry.nbytes)
    return offset


#: where a file of a model folder may link to outside it: a content-addressed store (git-annex, DVC, the Hub cache)
LINK_STORES = re.compile(r"/(\.git/annex/objects|\.dvc/cache|models--[^/]+/blobs)/")


def carried_files(source: Path) -> list[Path]:
    """The small non-weight files of ``source`` to copy (tokenizer, generation config, ...), checked before any
    writing. A file linking out of ``source`` is taken only from a content-addressed store (git-annex, DVC, the
    Hub cache's blobs); elsewhere (``LICENSE -> ~/.cache/huggingface/token``) its target is not the model's to
    publish: a file the checkpoint needs (tokenizer, generation config) is refused in one line, any other is left
    behind with a note."""
    import sys

    from prune.io.guard import inside_folder
    from prune.io.staging import CHECKPOINT_FILE

    from transformers.utils.hub import CHAT_TEMPLATE_DIR

    carried = []
    templates = source / CHAT_TEMPLATE_DIR  # transformers 5 saves each named chat template but the default there
    extra = sorted(templates.iterdir()) if templates.is_dir() and inside_folder(templates, source) else []
    for item in sorted(source.iterdir()) + extra:
        if not item.is_file() or (item.parent == source and SKIP_FILES.match(item.name)):
            continue
        if not inside_folder(item, source) and not LINK_STORES.search(item.resolve().as_posix()):
            if CHECKPOINT_FILE.match(item.name):
                raise PruneError(f"{item} links out of the model folder, to {item.resolve()}: its target is not copied "
                                 "into an output (copy the file itself into the folder, e.g. cp -L, then rerun)")
            print(f"note: {item.name} of {source} links out of the model folder: not copied", file=sys.stderr)
            continue
        carried.append(item)
    return carried


def plan_tensors(sk, kept: list[int]) -> dict[str, list[tuple[str, TensorEntry]]]:
    """Source shard name -> ``(new name, entry)`` of every tensor the pruned checkpoint keeps."""
    position = {old: new for new, old in enumerate(kept)}
    attr = sk.layers_path.rpartition(".")[2]
    by_shard: dict[str, list[tuple[str, TensorEntry]]] = {f.name: [] for f in sk.checkpoint.files}
    left_out = set(sk.unused) | set(sk.tied_copies())
    for key, entry in sk.checkpoint.entries.items():
        if key in left_out:
            continue  # not a parameter of the model, or a tied copy (transformers drops / ties it on load, prune.save too)
        block = sk.block_of.get(key)
        if block is None:
            by_shard[entry.file.name].append((key, entry))
        elif block in position:
            factor = query_rescale(sk.model.config, block, position[block])
            written = entry
            if factor != 1.0 and QUERY_KEY.search(key):  # GPT-2's index-scaled attention: as remove_layers does
                written = Converted(entry, entry.torch_dtype, (sk.model.config.hidden_size, factor))
            by_shard[entry.file.name].append((renumber_key(key, attr, block, position[block]), written))
    return {name: items for name, items in by_shard.items() if items}


def conversion(sk, planned: dict, dtype: str | None, through: str | None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(target, via)`` of the copy: the dtype the tensors are written in (None: as stored) and the one they pass
    through on the way (a load in ``through``, then a save in ``dtype``, as an in-memory run does)."""
    from prune.core.config import resolve_dtype

    target = resolve_dtype(dtype)
    target = None if target == "auto" else target
    if target is None and {e.torch_dtype for items in planned.values() for _, e in items
                           if getattr(e, "torch_dtype", torch.float32).is_floating_point} - {sk.dtype}:
        # stored otherwise than a load with dtype auto gives (a mixed checkpoint, or a config that names another
        # dtype than the tensors'): that dtype, the one prune.save writes after an in-memory run
        target = sk.dtype
    via = resolve_dtype(through) if through else None
    via = sk.dtype if via == "auto" else via  # a load with dtype auto takes the config's (else the stored) dtype
    via = None if via == target else via
    if via is not None and target is None:
        target = sk.dtype
    return target, via


def written_dtype(shards: dict) -> str | None:
    """The dtype of the floating tensors a copy writes (``{shard: [(name, entry)]}`` after :func:`convert_entries`)."""
    stored = next((e.torch_dtype for items in shards.values() for _, e in items if e.torch_dtype.is_floating_point), None)
    return dtype_name(stored)


def planned_dtype(folder: str | os.PathLike, removed, dtype: str | None, through: str | None,
                  trust_remote_code: bool = False) -> str | None:
    """What :func:`prune_checkpoint` of a local ``folder`` will record as the saved dtype, known before anything is
    written (the card of an out-of-core run is rendered first)."""
    from prune.model.skeleton import Skeleton

    sk = Skeleton(folder, trust_remote_code=trust_remote_code)  # meta: headers only
    planned = plan_tensors(sk, complement(len(sk.model.get_submodule(sk.layers_path)), removed))
    target, via = conversion(sk, planned, dtype, through)
    return written_dtype({name: convert_entries(items, target, via) for name, items in planned.items()})


def prune_checkpoint(
    source: str | os.PathLike,
    removed,
    out_dir: str | os.PathLike,
    *,
    pruning: PruningRecord | dict | None = None,
    files: dict[str, str] | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    dtype: str | None = None,
    through: str | None = None,
    base_model: str | None = None,
    inputs=(),
    new_step: bool = True,
    progress: bool = False,
) -> Path:
    """Write the checkpoint of ``source`` without the blocks ``removed`` (0-based) to ``out_dir``.

    ``source`` is a safetensors model folder or a Hub id; ``files`` are written as by
    :func:`prune.save`. With ``pruning`` (a record, or ``{}`` for a bare ``prune remove``)
    the folder gets ``pruning.json`` with its lineage (a pruned source's record is extended:
    indices mapped to the original model) and a model card; the source's ``eval.*`` and
    ``recipe.yaml`` are never carried over (they describe another model). ``dtype``
    (``bfloat16``, ``float16``, ``float32``; ``auto``/None = the dtype a load with ``dtype="auto"``
    gives: the config's, else the stored one) converts floating tensors one at a time; ``through``: each is rounded
    to that dtype first (``prune run``'s ``model.dtype``, which an in-memory run loads the weights in before it
    saves them in ``output.dtype``). Returns the output folder. Without ``dtype`` the result equals,
    tensor for tensor, the checkpoint ``prune.remove_layers`` + ``prune.save`` would write.
    ``new_step=False``: ``pruning`` already has its lineage (``prune run`` out of core) and is
    written as it is. ``inputs``: paths the output must never touch (:mod:`prune.io.guard`).
    ``progress``: a bar of the bytes written.
    """
    from transformers import AutoConfig

    from prune.io.source import resolve_source
    from prune.model.skeleton import Skeleton

    from prune.io.guard import input_paths
    from prune.io.staging import check_output_dir

    check_extra_files(files)
    src = resolve_source(source) if not isinstance(source, ModelSource) else source
    if src.kind == "hub":  # an existing or unsafe output is refused before the shards are downloaded
        check_output_dir(out_dir, overwrite, inputs, flag="--output")
    folder = local_folder(src)
    inputs = [*inputs, *input_paths(folder, label="the source model")]
    check_output_dir(out_dir, overwrite, inputs, flag="--output")  # before reading any shard
    sk = Skeleton(folder, trust_remote_code=trust_remote_code)  # meta model: key mapping only
    n_layers = len(sk.layers)
    removed = check_indices(removed, n_layers)
    kept = complement(n_layers, removed)
    check_source_complete(sk, removed)
    record = None
    if pruning is not None and not new_step:
        from prune.export.lineage import as_record

        record = as_record(pruning)
    elif pruning is not None:  # lineage first: a record that contradicts the weights fails before writing
        record = remove_record(src, pruning, n_layers, removed, sk, base_model=base_model)
    planned = plan_tensors(sk, kept)
    target, via = conversion(sk, planned, dtype, through)
    shards = {name: convert_entries(items, target, via) for name, items in planned.items()}
    carried = carried_files(folder)  # tokenizer, generation config, ...: links checked before writing
    if not any(f.name in TOKENIZER_FILES for f in carried):  # the output would fail prune check and pipeline()
        say(f"note: {src.display} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): neither has {out_dir} (copy "
            "them in from the model it came from before loading it with a tokenizer or pushing it)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    from prune.export.check import CheckReport, check_generation_config

    generation = CheckReport(folder)  # carried as it is: a copy `prune check` refuses is said before writing
    check_generation_config(folder, config, generation)
    if generation.problems:
        say(f"note: {src.display}: {generation.problems[0].message}; {out_dir} carries it as it is, so `prune check` "
            "and `prune push` refuse the output: fix generation_config.json (in the source or the output)")
    check_cut_keeps_attention(config, kept)
    for key, value in pruned_config_updates(config, kept).items():
        setattr(config, key, value)
    if record is not None:
        record.dtype = written_dtype(shards)
        if "README.md" not in (files or {}):
            from prune.export.card import render_card
            from prune.export.public import public_yaml

            name = Path(out_dir).name
            recipe_yaml = (files or {}).get("recipe.yaml")
            files = {**(files or {}), "README.md": render_card(
                record, model_name=name, load_id=f"path/to/{name}", recipe_yaml=public_yaml(recipe_yaml) if recipe_yaml else None)}
    with staged(out_dir, overwrite, inputs) as stage:
        names = [SINGLE_NAME] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        total = 0
        fault_point("saving")
        size = sum(e.nbytes for tensors in shards.values() for _, e in tensors)
        with tqdm(total=size, desc="writing shards", unit="B", unit_scale=True, disable=not progress) as bar:
            for name, (source_shard, tensors) in zip(names, shards.items()):
                meta = sk.checkpoint.file_metadata.get(source_shard) or {"format": "pt"}
                total += write_safetensors(stage / name, tensors, meta, bar)
                weight_map.update({key: name for key, _ in tensors})
        fault_point("saved_weights")
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for item in carried:
            copy = stage / item.relative_to(folder)
            copy.parent.mkdir(exist_ok=True)
            shutil.copy2(item, copy)
        config.save_pretrained(stage)  # as save_pretrained writes it: no local _name_or_path
        clean_config_file(stage, dtype=dtype_name(target))
        clean_tokenizer_config(stage)  # how the source was loaded (local_files_only), as the in-memory save drops it
        check_complete(stage, trust_remote_code=trust_remote_code)
        write_extras(stage, record, files)
    return Path(out_dir).expanduser()


def remove_record(src, pruning: PruningRecord | dict, n_layers: int, removed: list[int], sk,
                  base_model: str | None = None) -> PruningRecord:
    """The lineage record of removing ``removed`` from ``src`` (``n_layers`` blocks): the
    fields of ``pruning`` (a run's record, or ``{}``), this step's indices, parameter counts
    from the shard headers, and the source's own record as parent."""
    from prune.core.console import versions
    from prune.export.lineage import extend, read_parent

    data = pruning.model_dump(exclude_unset=True) if isinstance(pruning, PruningRecord) else dict(pruning)
    numel = {k: sk.checkpoint.entries[k].numel() for k in sk.counted_keys()}
    gone = set(removed)
    facts = {"params_before": sum(numel.values()),
             "params_after": sum(n for k, n in numel.items() if sk.block_of.get(k) not in gone),
             "model_type": sk.model.config.model_type}
    kept = complement(n_layers, removed)
    made = dict(removed=sorted(removed), kept=kept, layers_before=n_layers, layers_after=len(kept))
    if clash := [key for key, value in made.items() if data.get(key) not in (None, value)]:
        raise PruneError(f"pruning= records {', '.join(f'{k} {data[k]}' for k in clash)}, but removing "
                         f"{made['removed']} from the {n_layers} blocks of {src.display} makes "
                         f"{', '.join(f'{k} {made[k]}' for k in clash)}: leave these fields out of pruning= "
                         "(prune_checkpoint fills them from removed=) or fix them")
    data.update(made)
    for key, value in facts.items():
        data.setdefault(key, value)
    data.setdefault("versions", versions())
    data.setdefault("command", "remove")
    data.pop("source", None)
    record = PruningRecord.model_validate(data)
    return extend(record, read_parent(src, n_layers), src, base_model)


def check_source_complete(sk, removed: list[int]) -> None:
    """Refuse a source checkpoint that lacks a weight the output keeps (one of a removed block's may be missing):
    its copy would lack it too (it was reported, after writing, as an internal error)."""
    from prune.model.loading import decoder_layers_path

    path = decoder_layers_path(sk.model)
    gone = tuple(f"{path}.{i}." for i in removed)
    lacking = [name for name in sk.missing_parameters() if not name.startswith(gone)]
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise PruneError(f"{sk.folder} lacks weights for {', '.join(lacking[:3])}{more}: it is not a complete checkpoint "
                         f"(prune check {sk.folder} says what is missing; re-download or re-save it)")


def check_complete(folder: Path, *, trust_remote_code: bool = False) -> None:
    """Refuse a written checkpoint that does not fill every parameter of the model its config builds."""
    from prune.model.skeleton import Skeleton

    sk = Skeleton(folder, trust_remote_code=trust_remote_code)
    missing = sk.missing_parameters()
    if missing:
        raise PruneError(f"internal error: the pruned checkpoint lacks weights for {missing[:3]}; please report this")
