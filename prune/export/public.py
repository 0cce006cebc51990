"""What may be published: no absolute or machine-local path in any file of an output folder.

* :func:`public_path`: a local path as it may appear in a published file. A path under
  ``$PRUNE_DATA_DIR`` becomes ``${PRUNE_DATA_DIR}/...`` (recipes expand it again on any
  machine); a path under the current directory becomes relative to it (``runs/step1``); any
  other absolute path becomes ``<local>/<file name>`` (redacted, the name kept).
* :func:`public_data`: the same applied to every string of a JSON-like value that is an
  absolute path (or starts with ``~``); everything else is left as it is.
* :func:`public_source`: a model source as recorded: a Hub id as it is; a local GGUF file or
  folder by its name plus ``sha256`` (of the GGUF file; of a folder: of the sorted
  ``name  sha256`` lines of its ``config.json`` and weight files), so a reader can tell which
  local model was meant without learning where it was.
* :func:`public_text`: a file about to be written, by its suffix: ``.json`` and ``.yaml``
  are parsed and written back with :func:`public_data` applied.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from prune.core.records import SourceRecord

REDACTED = "<local>"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def hub_id(value) -> str | None:
    """``value`` when it is a Hub repo id huggingface_hub accepts (and not a token), else None: a parent's
    recorded ``repo_id`` / ``base_model`` comes from a file anyone may have edited."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from prune.core.secrets import looks_like_token

    if not isinstance(value, str) or not value or looks_like_token(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def is_local_path(text: str) -> bool:
    """An absolute path, or one starting with ``~`` (the only strings :func:`public_data` rewrites)."""
    return isinstance(text, str) and "\n" not in text and (text.startswith(("/", "~")) or Path(text).is_absolute())


def public_path(path: str | os.PathLike) -> str:
    """``path`` as it may be published (see module docstring)."""
    text = str(path)
    if not is_local_path(text):
        return text
    p = Path(text).expanduser().absolute()
    data = os.environ.get("PRUNE_DATA_DIR")
    if data and Path(data).is_absolute():
        for root in {Path(data), Path(data).resolve()}:
            if p.is_relative_to(root):
                return "${PRUNE_DATA_DIR}/" + p.relative_to(root).as_posix()
    cwd = Path.cwd().absolute()
    if cwd != Path(cwd.anchor) and p.is_relative_to(cwd):
        rel = p.relative_to(cwd).as_posix()
        return rel if rel != "." else p.name
    return f"{REDACTED}/{p.name}" if p.name else REDACTED


def public_data(value: Any) -> Any:
    """``value`` with every absolute / home path string made public (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: public_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_data(v) for v in value]
    if isinstance(value, str) and is_local_path(value):
        return public_path(value)
    return value


def public_yaml(text: str) -> str:
    """YAML text (a recipe) with its local paths made public, dumped as ``Recipe.to_yaml`` does."""
    return yaml.safe_dump(public_data(yaml.safe_load(text)), sort_keys=False)


def public_text(name: str, text: str) -> str:
    """A file's text as it may be published: JSON and YAML files are cleaned of local paths."""
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return text
        return json.dumps(public_data(data), indent=1) + "\n"
    if name.endswith((".yaml", ".yml")):
        try:
            return public_yaml(text)
        except yaml.YAMLError:
            return text
    return text


# ---- sources -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (cached per path, size and modification time)."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).absolute()), st.st_size, st.st_mtime)


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 of the lines ``<name>  <sha256>`` of ``config.json`` and every weight file, sorted."""
    root = Path(folder)
    names = sorted(p.name for p in root.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES))
    lines = "".join(f"{name}  {file_sha256(root / name)}\n" for name in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def public_source(src) -> SourceRecord:
    """A :class:`~prune.io.source.ModelSource` as it is recorded in ``pruning.json``."""
    if src.kind == "hub":
        return SourceRecord(kind="hub", path=src.path, gguf_file=src.gguf_file, revision=src.revision)
    if src.kind == "gguf":
        file = Path(src.path) / src.gguf_file
        return SourceRecord(kind="gguf", path=src.gguf_file, gguf_file=src.gguf_file,
                            sha256=file_sha256(file) if file.is_file() else None)
    folder = Path(src.path)
    return SourceRecord(kind=src.kind, path=folder.name, sha256=folder_sha256(folder) if folder.is_dir() else None)


def public_source_record(source: SourceRecord | None) -> SourceRecord | None:
    """A source already recorded (perhaps by an older version, with a local path), made public."""
    if source is None or source.kind == "hub" or not is_local_path(source.path):
        return source
    return source.model_copy(update={"path": Path(source.path).name})


def matches_source(recorded: SourceRecord, src) -> bool:
    """True when the local ``src`` is the model ``recorded`` (same sha256; by name when none was recorded)."""
    want = getattr(recorded, "sha256", None)
    if src.kind == "hub":
        return recorded.kind == "hub" and recorded.path == src.path
    if want is None:
        name = src.gguf_file if src.kind == "gguf" else Path(src.path).name
        return name == Path(recorded.path).name
    return public_source(src).sha256 == want


# ---- config.json ---------------------------------------------------------------------------
#: keys transformers' tokenizer ``save_pretrained`` copies from how the tokenizer was loaded (offline, from a
#: folder), not settings of the tokenizer: a published file would hand them to whoever loads it
TOKENIZER_LOAD_KEYS = ("is_local", "local_files_only")


def clean_tokenizer_config(folder: Path) -> None:
    """Drop :data:`TOKENIZER_LOAD_KEYS` from a ``tokenizer_config.json`` written by ``save_pretrained``."""
    file = Path(folder) / "tokenizer_config.json"
    if not file.is_file():
        return
    data = json.loads(file.read_text(encoding="utf-8"))
    if isinstance(data, dict) and any(k in data for k in TOKENIZER_LOAD_KEYS):
        for key in TOKENIZER_LOAD_KEYS:
            data.pop(key, None)
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def clean_config_file(folder: Path, dtype: str | None = None) -> None:
    """Drop the GGUF loader's ``quantization_config`` from a ``config.json`` written by
    ``save_pretrained`` (the weights are saved dequantized) and, with ``dtype``, record the
    dtype the weights were converted to; the file is otherwise left as written."""
    file = Path(folder) / "config.json"
    data = json.loads(file.read_text())
    changed = False
    qc = data.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "gguf":
        data.pop("quantization_config")
        changed = True
    if dtype is not None:
        key = "torch_dtype" if "torch_dtype" in data and "dtype" not in data else "dtype"
        changed, data[key] = changed or data.get(key) != dtype, dtype
    if changed:
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
