"""What is read from a GGUF file, read once per process.

Parsing a GGUF file's metadata takes seconds (``gguf.GGUFReader`` reads a tokenizer's
vocabulary and merges field by field: about 3 s for SmolLM2-135M on one core, docs/BENCHMARKS.md
"Loading a GGUF file"), and a run asks for it several times: the integrity check before anything
loads (in the pre-flight and again in ``load_model``), the license lookup of the model card, and
the config and tokenizer transformers builds from it (:func:`prune.model.loading.load_config`,
``load_tokenizer``). :func:`kept_per_file` keeps each result while the file keeps its path, size
and modification time, so an edited or replaced file is read again. The header reader
memory-maps the file: nothing is copied into memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

_KEPT: dict[tuple, Any] = {}
_MOST = 8  # results kept at most (the oldest goes first)


def kept_per_file(what: str, path: str | os.PathLike, read: Callable[[], Any]) -> Any:
    """``read()`` once per process for ``what`` of the file at ``path`` while it stays the same;
    a read that raises is not kept (it raises again next time)."""
    file = Path(path).resolve()
    stat = file.stat()
    # ctime and the inode too: an edit in place that keeps size and mtime (cp -p, rsync -t) changes them
    key = (what, str(file), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)
    if key not in _KEPT:
        value = read()
        if len(_KEPT) >= _MOST:
            _KEPT.pop(next(iter(_KEPT)))
        _KEPT[key] = value
    return _KEPT[key]


def gguf_reader(path: str | os.PathLike):
    """``gguf.GGUFReader`` of ``path`` (read-only), parsed once while the file stays the same."""
    import gguf

    return kept_per_file("header", path, lambda: gguf.GGUFReader(str(Path(path).resolve()), "r"))
