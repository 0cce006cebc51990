"""Safetensors checkpoints on disk, read without loading them: headers, sizes, one tensor at a time.

A safetensors file is ``[8-byte little-endian header length N][N bytes of JSON header][data]``;
the header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` of strings.
A sharded checkpoint adds ``model.safetensors.index.json`` (``{"metadata", "weight_map"}``).

:class:`Checkpoint` reads only the headers, so the size of every tensor, shard and block is
known before a byte of weights is read. :meth:`Checkpoint.read` reads one tensor with plain
file reads (no memory map, so nothing stays mapped into the process afterwards).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from prune.core.errors import PruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range ``[begin, end)``."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_header_shape(header, path) -> dict:
    """``header`` if it has the safetensors shape (name -> ``{"dtype": str, "shape": [int],
    "data_offsets": [begin, end]}``, optional ``__metadata__`` of strings); else one line."""
    if not isinstance(header, dict):
        raise PruneError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, not a table of tensors "
                         "(re-download it)")
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise PruneError(f"{path} is corrupt: __metadata__ is not a mapping (re-download it)")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
                and all(_is_int(s) for s in info["shape"]) and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_int(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise PruneError(f"{path} is corrupt: the header entry of tensor {str(name)[:80]!r} is malformed "
                             "(re-download it)")
    return header


def read_index(folder: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """``(weight_map, metadata)`` of ``folder``'s ``model.safetensors.index.json``, checked: UTF-8 JSON,
    a mapping whose ``weight_map`` maps tensor names to shard file names inside ``folder``."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise PruneError(f"{index} is not UTF-8 text (corrupt; re-download or re-save the model)") from None
    except (json.JSONDecodeError, RecursionError):
        raise PruneError(f"{index} is not valid JSON (corrupt; re-download or re-save the model)") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise PruneError(f"{index} is corrupt: it needs a \"weight_map\" of tensor name -> shard file "
                         "(re-download or re-save the model)")
    root = folder.resolve()
    for shard in set(weight_map.values()):
        if Path(shard).is_absolute() or not (root / shard).resolve().is_relative_to(root) or "/" in shard \
                or "\\" in shard:
            raise PruneError(f"{index} names the shard {shard[:80]!r}, which is outside the model folder "
                             "(refused: only the folder's own files are read)")
    metadata = data.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file: the JSON header and the absolute offset of its data."""
    path = Path(path)
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise PruneError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000 or size > path.stat().st_size - 8:
            raise PruneError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise PruneError(f"{path} is not a safetensors file (unreadable header)") from None
    return check_header_shape(header, path), 8 + size


class Checkpoint:
    """The safetensors weights of a model folder (one file or an indexed set of shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map, self.index_metadata = read_index(self.folder)
            names = list(dict.fromkeys(weight_map.values()))  # shard order of first appearance
        elif (self.folder / SINGLE_NAME).is_file():
            self.index_metadata, weight_map, names = {}, {}, [SINGLE_NAME]
        else:
            other = sorted(p.name for p in self.folder.glob("*.bin")) if self.folder.is_dir() else []
            hint = f" (it has {other[0]}: re-save it with save_pretrained to get safetensors)" if other else ""
            raise PruneError(f"{self.folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}){hint}; "
                             "out-of-core execution reads safetensors shards")
        self.files: list[Path] = [self.folder / n for n in names]
        self.file_metadata: dict[str, dict] = {}
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            if not file.is_file():
                raise PruneError(f"checkpoint shard missing: {file} (listed in {INDEX_NAME}); the download is incomplete")
            header, start = read_header(file)
            self.file_metadata[file.name] = header.pop("__metadata__", None) or {}
            for key, info in header.items():
                begin, end = info["data_offsets"]
                self.entries[key] = TensorEntry(file, info["dtype"], tuple(info["shape"]), start + begin, start + end)
        listed = set(weight_map)
        if listed and listed != set(self.entries):
            missing = sorted(listed - set(self.entries))[:3]
            raise PruneError(f"{self.folder}: {INDEX_NAME} lists tensors the shards do not hold: {missing}")

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
        """The dtype of the first floating tensor (the checkpoint's own dtype), ``None`` if there is none."""
        for e in self.entries.values():
            if e.dtype in FLOAT_DTYPES:
                return DTYPES[e.dtype]
        return None

    # ---- reading -------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` read from its shard into a fresh CPU tensor of its own dtype."""
        e = self.entries[key]
        buffer = torch.empty(e.nbytes, dtype=torch.uint8)
        with e.file.open("rb") as handle:
            handle.seek(e.begin)
            if handle.readinto(buffer.numpy()) != e.nbytes:
                raise PruneError(f"{e.file} is truncated (tensor {key} runs past the end of the file)")
        return buffer.view(e.torch_dtype).reshape(e.shape)

    def lazy(self, key: str) -> LazyTensor:
        return LazyTensor(self, key)


class LazyTensor:
    """A tensor read from its shard only when sliced (``t[...]``), like safetensors' slice objects."""

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
        return self.checkpoint.read(self.key)[index]


def copy_bytes(entry: TensorEntry, out, chunk: int = 16 << 20) -> None:
    """Copy the raw bytes of ``entry`` to the open binary file ``out``, ``chunk`` bytes at a time."""
    remaining = entry.nbytes
    with entry.file.open("rb") as handle:
        handle.seek(entry.begin)
        while remaining:
            data = handle.read(min(chunk, remaining))
            if not data:
                raise PruneError(f"{entry.file} is truncated")
            out.write(data)
            remaining -= len(data)


def local_folder(source, *, revision: str | None = None) -> Path:
    """The local folder holding a model's files: the folder itself, or a Hub id's cached snapshot
    (downloaded when missing; offline, only what is cached). GGUF sources are refused."""
    from prune.io.source import ModelSource, resolve_source

    src = source if isinstance(source, ModelSource) else resolve_source(source, revision=revision)
    if src.kind == "gguf":
        raise PruneError(f"{src.display} is a GGUF file: out-of-core execution reads safetensors shards "
                         "(use execution: in_memory, or save the model as safetensors first)")
    if src.kind == "folder":
        return Path(src.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.path, revision=src.revision or revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PruneError(f"could not fetch {src.path} from the Hub: {first}") from exc
