"""Out-of-core pruning: write the pruned checkpoint straight from the source safetensors shards.

``prune_checkpoint(folder, removed, out_dir)`` never instantiates the model and never holds
a tensor in memory: every tensor of a kept block is copied byte for byte from its source
shard under its new name (block indices renumbered ``0 .. len(kept)-1``), tensors of removed
blocks are skipped, everything outside the blocks (embeddings, norm, LM head) is copied
unchanged. Each source shard gives one output shard (so no output shard is larger than the
largest source shard), with a new ``model.safetensors.index.json``. ``config.json`` gets
:func:`prune.models.pruned_config_updates`; tokenizer, generation config and other small
files are carried over (not the original model card, nor weights in other formats).

Which checkpoint tensor belongs to which block is decided by transformers' own key mapping
(:class:`~prune.skeleton.Skeleton`), and the written folder is checked the same way: it must
fill every parameter of the model its new config builds. Writing is atomic (a staging folder
renamed at the end, as :func:`prune.save`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

from prune.io.safetensors import INDEX_NAME, SINGLE_NAME, TensorEntry, byte_ranges, copy_bytes, local_folder
from prune.core.errors import PruneError
from prune.export.saving import staged, write_extras
from prune.model.loading import plain_config_dict, pruned_config_updates
from prune.model.surgery import check_indices

#: files never carried over: weights in other formats, the original model card, our own outputs
SKIP_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|^README\.md$|^config\.json$|"
                        rf"^{re.escape(INDEX_NAME)}$|^pytorch_model.*\.json$|^pruning\.json$|^\..*")


def renumber_key(key: str, attr: str, old: int, new: int) -> str:
    """``key`` with its block index ``old`` (the segment ``<attr>.<old>.``) replaced by ``new``."""
    pattern = re.compile(rf"(^|\.){re.escape(attr)}\.{old}\.")
    match = pattern.search(key)
    if match is None:
        raise PruneError(f"cannot find block {old} in checkpoint key {key!r} (expected '{attr}.{old}.')")
    return key[: match.start()] + f"{match.group(1)}{attr}.{new}." + key[match.end():]


def write_safetensors(path: Path, tensors: list[tuple[str, TensorEntry]], metadata: dict | None = None) -> int:
    """Write ``(name, source entry)`` pairs as one safetensors file, copying bytes; returns data bytes.

    Tensors are laid out like the reference serializer (largest element size first, then by
    name), so every tensor stays aligned to its element size; the header is padded to 8 bytes.
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
            if entry.file not in ranges:
                ranges[entry.file] = byte_ranges(entry.file)
            copy_bytes(entry.file, *ranges[entry.file][entry.key], out)
    return offset


def carry_files(source: Path, stage: Path) -> list[str]:
    """Copy the small non-weight files of ``source`` (tokenizer, generation config, ...) to ``stage``."""
    carried = []
    for item in sorted(source.iterdir()):
        if item.is_file() and not SKIP_FILES.match(item.name):
            shutil.copy2(item, stage / item.name)
            carried.append(item.name)
    return carried


def plan_tensors(sk, kept: list[int]) -> dict[str, list[tuple[str, TensorEntry]]]:
    """Source shard name -> ``(new name, entry)`` of every tensor the pruned checkpoint keeps."""
    position = {old: new for new, old in enumerate(kept)}
    attr = sk.layers_path.rpartition(".")[2]
    by_shard: dict[str, list[tuple[str, TensorEntry]]] = {f.name: [] for f in sk.checkpoint.files}
    for key, entry in sk.checkpoint.entries.items():
        if key in sk.unused:
            continue  # not a parameter of the model (transformers drops it on load, so does prune.save)
        block = sk.block_of.get(key)
        if block is None:
            by_shard[entry.file.name].append((key, entry))
        elif block in position:
            by_shard[entry.file.name].append((renumber_key(key, attr, block, position[block]), entry))
    return {name: items for name, items in by_shard.items() if items}


def prune_checkpoint(
    source: str | os.PathLike,
    removed,
    out_dir: str | os.PathLike,
    *,
    pruning: dict | None = None,
    files: dict[str, str] | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    inputs=(),
) -> Path:
    """Write the checkpoint of ``source`` without the blocks ``removed`` (0-based) to ``out_dir``.

    ``source`` is a safetensors model folder or a Hub id; ``pruning`` and ``files`` are
    written as by :func:`prune.save`. Returns the output folder. The result loads with
    ``AutoModelForCausalLM.from_pretrained`` and equals, tensor for tensor, the checkpoint
    ``prune.remove_layers`` + ``prune.save`` would write.
    """
    from transformers import AutoConfig

    from prune.model.skeleton import Skeleton

    from prune.io.guard import input_paths
    from prune.io.staging import check_output_dir

    folder = local_folder(source)
    inputs = [*inputs, *input_paths(folder, label="the source model")]
    check_output_dir(out_dir, overwrite, inputs, flag="--output")  # before reading any shard
    sk = Skeleton(folder, trust_remote_code=trust_remote_code)  # meta model: key mapping only
    n_layers = len(sk.layers)
    removed = check_indices(removed, n_layers)
    kept = [i for i in range(n_layers) if i not in set(removed)]
    shards = plan_tensors(sk, kept)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    for key, value in pruned_config_updates(config, kept).items():
        setattr(config, key, value)
    with staged(out_dir, overwrite, inputs) as stage:
        names = [SINGLE_NAME] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        total = 0
        for name, (source_shard, tensors) in zip(names, shards.items()):
            meta = sk.checkpoint.file_metadata.get(source_shard) or {"format": "pt"}
            total += write_safetensors(stage / name, tensors, meta)
            weight_map.update({key: name for key, _ in tensors})
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        carry_files(folder, stage)
        (stage / "config.json").write_text(json.dumps(plain_config_dict(config), indent=2, sort_keys=True) + "\n")
        check_complete(stage, trust_remote_code=trust_remote_code)
        write_extras(stage, pruning, files)
    return Path(out_dir).expanduser()


def check_complete(folder: Path, *, trust_remote_code: bool = False) -> None:
    """Refuse a written checkpoint that does not fill every parameter of the model its config builds."""
    from prune.model.skeleton import Skeleton

    sk = Skeleton(folder, trust_remote_code=trust_remote_code)
    missing = sk.missing_parameters()
    if missing:
        raise PruneError(f"internal error: the pruned checkpoint lacks weights for {missing[:3]}; please report this")
