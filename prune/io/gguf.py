"""A GGUF file's parsed header, read once per process.

Parsing a GGUF file's metadata takes seconds (``gguf.GGUFReader`` reads a tokenizer's
vocabulary and merges field by field: about 3.5 s for SmolLM2-135M on one core), and a run
asks for it several times: the integrity check before anything loads (in the pre-flight and
again in ``load_model``) and the license lookup of the model card. :func:`gguf_reader` keeps the
last few readers, keyed by the file's path, size and modification time, so an edited or
replaced file is read again. The reader memory-maps the file: nothing is copied into memory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def gguf_reader(path: str | os.PathLike):
    """``gguf.GGUFReader`` of ``path`` (read-only), parsed once while the file stays the same;
    a file that fails to parse raises each time (failures are not kept)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _reader(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path, "r")
