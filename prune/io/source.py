"""Where a model comes from: a Hub id, a local folder or a GGUF file, classified before loading."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune.core.errors import PruneError


#: a Hub repository id (``name`` or ``org/name``), as a model or dataset is named on the Hub
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
    """Where a model comes from. ``kind`` is ``"hub"``, ``"folder"`` or ``"gguf"``."""

    kind: str
    path: str  # Hub id or local folder (for GGUF: the folder holding the file)
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def display(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "gguf_file": self.gguf_file, "revision": self.revision}


def resolve_source(source: str | os.PathLike, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Classify ``source`` and check that a local one exists, before anything is loaded. A ``revision``
    is a Hub branch, tag or commit: with a local source (a folder named like a Hub id shadows the
    repo) it is refused rather than ignored."""
    src = _classify(source, gguf_file, revision)
    if revision and src.kind != "hub":
        raise PruneError(f"revision {revision!r} is for a Hub repo, but {source} is a local {src.kind} here "
                         f"({Path(src.display).resolve()}): drop the revision to use it, or give the Hub id where no "
                         "such path exists")
    return src


def _classify(source: str | os.PathLike, gguf_file: str | None, revision: str | None) -> ModelSource:
    text = str(source)
    path = Path(text).expanduser()
    if text.strip():  # a folder whose replacement a killed writer left half done: finished first
        from prune.io.staging import existing

        existing(path)
    if text.lower().endswith(".gguf") and not path.is_dir():  # a folder named *.gguf is a folder
        if not path.is_file():
            raise PruneError(f"GGUF file not found: {text} (check the path)")
        if gguf_file is not None and gguf_file != path.name:
            raise PruneError(f"{text} is a GGUF file and gguf_file names another ({gguf_file}): give the folder "
                             "with gguf_file, or the file alone")
        return ModelSource("gguf", str(path.parent), path.name, revision)
    if path.is_dir():
        from prune.io.staging import INCOMPLETE_MARKER

        if (path / INCOMPLETE_MARKER).is_file():  # a killed run's staging folder: its files may be cut short
            raise PruneError(f"{text} is an unfinished output (it holds {INCOMPLETE_MARKER}: the command writing it was "
                             "stopped): give a finished folder, or run that command again")
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise PruneError(f"GGUF file not found: {path / gguf_file} (check gguf_file)")
            return ModelSource("gguf", str(path), gguf_file, revision)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise PruneError(f"{text} holds GGUF files ({', '.join(ggufs[:3])}{', ...' if len(ggufs) > 3 else ''}) "
                                 "but no config.json: give the .gguf file's path, or set gguf_file")
            raise PruneError(
                f"{text} is a folder but not a model: it has no config.json "
                "(point to a folder written by save_pretrained, a .gguf file, or a Hub id)"
            )
        return ModelSource("folder", str(path), None, revision)
    if path.exists():
        raise PruneError(f"{text} is a file, not a model (give a model folder, a .gguf file or a Hub id)")
    if not HUB_ID.match(text):
        raise PruneError(f"model path not found: {text} (check the path, or give a Hub id like org/name)")
    return ModelSource("hub", text, gguf_file, revision)


#: the JSON files transformers reads a tokenizer from
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def broken_json(src: ModelSource, names: tuple[str, ...]) -> str | None:
    """``"FILE is not valid JSON (what, at line L column C): fix or replace it"`` for the first of ``names`` in a
    local model folder that does not parse; None when they all do (or the model is not a local folder)."""
    if src.kind != "folder":
        return None
    for name in names:
        file = Path(src.path).expanduser() / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_bytes())
        except json.JSONDecodeError as exc:
            return f"{file} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): fix or replace it"
        except (UnicodeDecodeError, OSError, RecursionError) as exc:
            return f"{file} is not valid JSON ({type(exc).__name__}): fix or replace it"
    return None
