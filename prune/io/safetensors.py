"""Safetensors checkpoints on disk, read without loading them: one reader for the whole toolkit.

Everything is read through ``safetensors.safe_open`` (names, dtypes, shapes, metadata, whole
tensors, and ``get_slice`` for partial reads), which also refuses truncated and corrupt files;
``model.safetensors.index.json`` is read by :func:`read_index` only. Each read opens the shard
and closes it again, so nothing stays memory-mapped between reads (the out-of-core paths keep
their memory flat).

The one thing ``safe_open`` does not expose is where a tensor's bytes lie in its file. The
out-of-core writer copies those bytes verbatim (:func:`copy_bytes`) and whole tensors are read
with a plain file read of their range (:meth:`Checkpoint.read`): ``safe_open``'s memory map
would keep a tensor's pages resident beside its copy, which measured +348 MiB of peak memory
in sequential scoring and 2.7x the peak of out-of-core pruning (docs/BENCHMARKS.md), so
:func:`byte_ranges` reads the offsets from the header (already validated by ``safe_open``).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from prune.core.errors import PruneError, first_line

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100_000_000  # safetensors caps headers at 100 MB

#: safetensors dtype name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: its file, name, dtype and shape (from ``safe_open``)."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise PruneError(f"{self.file.name}: tensor dtype {self.dtype} is not supported out of core") from None

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel() * self.torch_dtype.itemsize



@contextlib.contextmanager
def open_file(path: str | os.PathLike) -> Iterator:
    """``safe_open(path)``, with a truncated, corrupt or unreadable file as one :class:`PruneError` line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PruneError(f"{path} is truncated or corrupt ({first_line(exc)}); re-download or re-save it") from None
    with handle:
        yield handle


def file_tensors(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``(name -> TensorEntry, metadata)`` of one safetensors file, from its header only."""
    path = Path(path)
    with open_file(path) as handle:
        entries = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            entries[key] = TensorEntry(path, key, view.get_dtype(), tuple(view.get_shape()))
        return entries, handle.metadata() or {}


def read_index(folder: str | os.PathLike) -> tuple[dict[str, str] | None, list[str]]:
    """``(weight_map, shard names)`` of a checkpoint folder: ``(None, ["model.safetensors"])`` for a
    single file, else the index's map and its shards in order of first appearance (transformers'
    order: a single file wins over an index beside it). One line on a bad index or a missing shard;
    ``PruneError`` too when the folder has no safetensors weights."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if (folder / SINGLE_NAME).is_file():
        return None, [SINGLE_NAME]
    if index.is_file():
        try:
            data = json.loads(index.read_bytes().decode("utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):  # bad UTF-8 or JSON, huge numbers, deep nesting
            raise PruneError(f"{index} is not a valid index (it needs a weight_map of tensor -> shard file); "
                             "re-save or re-download the model") from None
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise PruneError(f"{index} points outside its folder ({name!r}); refusing to read it")
            if not (folder / name).is_file():
                what = "is not a file" if (folder / name).exists() else "is missing"  # a folder, a device (/dev/zero)
                raise PruneError(f"{folder} is incomplete: weight shard {name} listed in {INDEX_NAME} {what} "
                                 "(re-download or re-save the model)")
        return weight_map, names
    other = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = f" (it has {other[0]}: re-save it with save_pretrained to get safetensors)" if other else ""
    raise PruneError(f"{folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}){hint}")


def byte_ranges(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Absolute ``[begin, end)`` byte range of every tensor in a safetensors file (the layout is
    ``[8-byte length N][N bytes of JSON header][data]``; offsets in the header are relative to
    the data). Only the byte-copy writer needs this; the file was validated by ``safe_open``."""
    with Path(path).open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(min(size, MAX_HEADER)))
    start = 8 + size
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


class Checkpoint:
    """The safetensors weights of a model folder (one file or an indexed set of shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        weight_map, names = read_index(self.folder)
        self.files: list[Path] = [self.folder / n for n in names]
        self._ranges: dict[Path, dict[str, tuple[int, int]]] = {}  # byte ranges, read on first use
        self.file_metadata: dict[str, dict] = {}
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            entries, self.file_metadata[file.name] = file_tensors(file)
            for key, entry in entries.items():
                if key in self.entries:  # which copy a reader takes is its own rule (transformers: the last shard)
                    raise PruneError(f"{self.folder}: tensor {key} is stored in both {self.entries[key].file.name} and "
                                     f"{file.name}; re-save the model (save_pretrained) so each tensor is stored once")
                self.entries[key] = entry
        if weight_map is not None and set(weight_map) != set(self.entries):
            missing = sorted(set(weight_map) ^ set(self.entries))[:3]
            raise PruneError(f"{self.folder}: {INDEX_NAME} and the shards disagree about tensors {missing}; "
                             "re-save or re-download the model")

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (what the weights take in memory at the checkpoint's dtypes)."""
        return sum(e.nbytes for e in self.entries.values())

    def file_bytes(self) -> dict[str, int]:
        return {f.name: f.stat().st_size for f in self.files}

    @property
    def largest_file_bytes(self) -> int:
        return max(self.file_bytes().values())

    def bytes_at(self, keys, dtype: torch.dtype | None = None) -> int:
        """Bytes the tensors ``keys`` take in memory, floating ones converted to ``dtype`` when given."""
        total = 0
        for key in keys:
            e = self.entries[key]
            if dtype is not None and e.dtype in FLOAT_DTYPES:
                total += e.numel() * torch.empty((), dtype=dtype).element_size()
            else:
                total += e.nbytes
        return total

    def float_dtype(self) -> torch.dtype | None:
        """The checkpoint's own dtype, as transformers reads it for ``dtype="auto"`` when the config names
        none: an index's ``metadata.dtype``, else the first floating tensor of the first shard in name order
        (its keys in the file's order); ``None`` if there is no floating tensor."""
        index = self.folder / INDEX_NAME
        if len(self.files) > 1 or (index.is_file() and not (self.folder / SINGLE_NAME).is_file()):
            named = (json.loads(index.read_bytes().decode("utf-8")).get("metadata") or {}).get("dtype")
            if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
                return getattr(torch, named)
        for file in sorted(self.files, key=lambda f: f.name):
            for e in self.entries.values():
                if e.file == file and e.dtype in FLOAT_DTYPES:
                    return DTYPES[e.dtype]
        return None

    # ---- reading -------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` read from its shard into a fresh CPU tensor of its own dtype, with a plain
        file read of its byte range (no memory map: ``safe_open``'s map would hold the tensor's
        pages resident beside the copy, doubling the peak of an out-of-core step)."""
        e = self.entries[key]
        if e.file not in self._ranges:
            self._ranges[e.file] = byte_ranges(e.file)
        begin, end = self._ranges[e.file][key]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with e.file.open("rb") as handle:
            handle.seek(begin)
            if handle.readinto(buffer.numpy()) != end - begin:
                raise PruneError(f"{e.file} is truncated (tensor {key} runs past the end of the file)")
        return buffer.view(e.torch_dtype).reshape(e.shape)

    def lazy(self, key: str) -> LazyTensor:
        return LazyTensor(self, key)


class LazyTensor:
    """A tensor read from its shard only when sliced (``t[...]``): ``safe_open``'s ``get_slice``."""

    def __init__(self, checkpoint: Checkpoint, key: str):
        self.checkpoint = checkpoint
        self.key = key
        entry = checkpoint.entries[key]
        self.shape = torch.Size(entry.shape)
        self.dtype = entry.torch_dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.checkpoint.entries[self.key].dtype

    def __getitem__(self, index) -> torch.Tensor:
        if index is Ellipsis or index == slice(None) or index == ():  # the whole tensor: one plain read
            return self.checkpoint.read(self.key)
        with open_file(self.checkpoint.entries[self.key].file) as handle:  # a part: safe_open reads only it
            return handle.get_slice(self.key)[index]


def copy_bytes(file: Path, begin: int, end: int, out, chunk: int = 16 << 20) -> None:
    """Copy the raw bytes ``[begin, end)`` of ``file`` to the open binary file ``out``, ``chunk`` at a time."""
    remaining = end - begin
    with Path(file).open("rb") as handle:
        handle.seek(begin)
        while remaining:
            data = handle.read(min(chunk, remaining))
            if not data:
                raise PruneError(f"{file} is truncated")
            out.write(data)
            remaining -= len(data)


def local_folder(source, *, revision: str | None = None) -> Path:
    """The local folder holding a model's files: the folder itself, or a Hub id's cached snapshot
    (downloaded when missing; offline, only what is cached). GGUF sources are refused, a Hub repo's GGUF
    file too (the repo's safetensors, if it has any, are another model than the file named)."""
    from prune.io.source import ModelSource, resolve_source

    src = source if isinstance(source, ModelSource) else resolve_source(source, revision=revision)
    if src.gguf_file:
        raise PruneError(f"{src.display} is a GGUF file: out-of-core work (prune remove, sequential execution) reads "
                         "safetensors shards (save the model as safetensors first, or score it in memory: "
                         "score.execution: in_memory, --execution in_memory)")
    if src.kind == "folder":
        return Path(src.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.path, revision=src.revision or revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, ...
        first = first_line(exc)
        raise PruneError(f"could not fetch {src.path} from the Hub: {first}") from exc
