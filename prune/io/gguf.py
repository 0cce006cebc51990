"""What is read from a GGUF file, read once per process.

Parsing a GGUF file's metadata takes seconds (``gguf.GGUFReader`` reads a tokenizer's
vocabulary and merges field by field: about 3 s for SmolLM2-135M on one core, docs/BENCHMARKS.md
"Loading a GGUF file"), and a run asks for it several times: the integrity check before anything
loads (in the pre-flight and again in ``load_model``), the license lookup of the model card, and
the config and tokenizer transformers builds from it (:func:`prune.model.loading.load_config`,
``load_tokenizer``). :func:`kept_per_file` keeps each result while the file keeps its path, size
and modification time, so an edited or replaced file is read again. The header reader
memory-maps the file: nothing is copied into memory. :func:`lend_kept_reader` lends it to
transformers' own GGUF loading, which would parse the file again for each ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
    """``gguf.GGUFReader`` of ``path`` (read-only), parsed once while the file stays the same, after
    :func:`check_header`."""
    from gguf.gguf_reader import GGUFReader  # the class itself, also while :func:`lend_kept_reader` stands in for it

    def read():
        check_header(path)
        return GGUFReader(str(Path(path).resolve()), "r")

    return kept_per_file("header", path, read)


@contextlib.contextmanager
def lend_kept_reader(active: bool = True) -> Iterator[None]:
    """Inside this block transformers' GGUF loading gets :func:`gguf_reader`'s kept reader: its
    ``load_gguf_checkpoint`` builds a ``gguf.GGUFReader`` (a parse of the whole header) for the config, the
    tokenizer and again for the weights; with this, one parse per file and process serves them all.
    transformers only reads the reader (its fields and memory-mapped tensors). ``active`` False: a no-op."""
    if not active:
        yield
        return
    import gguf

    lent = gguf.GGUFReader

    def kept(path, mode="r"):
        return gguf_reader(path) if mode == "r" else lent(path, mode)

    gguf.GGUFReader = kept
    try:
        yield
    finally:
        gguf.GGUFReader = lent


#: bytes of each fixed-size GGUF value type (uint8 int8 uint16 int16 uint32 int32 float32 bool uint64 int64 float64)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_NESTING = 8  # arrays of arrays, at most this deep


def check_header(path: str | os.PathLike) -> None:
    """Every count and length a GGUF (v2, v3) header declares fits in the bytes the file holds, before
    ``GGUFReader`` parses it: the reader reads past the end as empty arrays and allocates as it goes, so a
    51-byte file declaring an array of 2**40 items ran until memory ran out. Raises :class:`PruneError`."""
    import mmap
    import struct

    from prune.core.errors import PruneError

    def bad(problem: str):
        return PruneError(f"GGUF file {path}: {problem}; it is truncated or corrupt (download it again)")

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise bad("shorter than a GGUF header (24 bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            size, pos = len(m), 4
            if m[:4] != b"GGUF":
                raise bad("no GGUF magic at its start")
            order = "<" if struct.unpack_from("<I", m, 4)[0] < 0x10000 else ">"  # a big-endian file's version
            if struct.unpack_from(order + "I", m, 4)[0] < 2:
                return  # version 1 (32-bit counts): the reader refuses it itself

            def skip(n: int) -> None:
                nonlocal pos
                if pos + n > size:
                    raise bad(f"its header declares {n} bytes at byte {pos}, past the end of the file ({size} bytes)")
                pos += n

            def number(fmt: str) -> int:
                at = pos
                skip(struct.calcsize(fmt))
                return struct.unpack_from(order + fmt, m, at)[0]

            def value(kind: int, depth: int = 0) -> None:
                if kind in _FIXED:
                    skip(_FIXED[kind])
                elif kind == _STRING:
                    skip(number("Q"))
                elif kind == _ARRAY:
                    item, count = number("I"), number("Q")
                    if item in _FIXED:
                        skip(count * _FIXED[item])
                    elif item not in (_STRING, _ARRAY) or depth >= _NESTING:
                        raise bad(f"an array of value type {item} at byte {pos}" + (" nested too deep" if item in
                                                                                  (_STRING, _ARRAY) else ""))
                    elif count * 8 > size - pos:  # a string or an array takes 8 bytes at least
                        raise bad(f"its header declares an array of {count} items at byte {pos}, more than the file holds")
                    else:
                        for _ in range(count):
                            value(item, depth + 1)
                else:
                    raise bad(f"an unknown value type {kind} at byte {pos}")

            skip(4)  # the version
            tensors, keys = number("Q"), number("Q")
            if keys * 12 + tensors * 24 > size - pos:  # a key: its name's length and a type; a tensor's info: more
                raise bad(f"its header declares {keys} keys and {tensors} tensors, more than the file holds")
            alignment = 32  # GGUF's default: every tensor's offset a multiple of it
            for _ in range(keys):
                length = number("Q")
                skip(length)
                name, kind = bytes(m[pos - length:pos]), number("I")
                if name == b"general.alignment" and kind == 4:  # uint32
                    alignment = number("I")
                    if alignment == 0 or alignment & (alignment - 1):
                        raise bad(f"general.alignment {alignment} is not a power of two")
                else:
                    value(kind)
            for _ in range(tensors):
                length = number("Q")
                skip(length)
                tensor = bytes(m[pos - length:pos]).decode(errors="replace")
                skip(8 * number("I") + 4)  # the dimensions and the type
                offset = number("Q")
                if offset % alignment:  # the reader would read the tensor from other bytes
                    raise bad(f"tensor {tensor!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
