"""The one writer of the generated blocks in docs/BENCHMARKS.md, for the benchmark scripts.

A block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; its body is replaced
whole, under a line that names the command that made it and when."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def replace_block(block: str, body: str, command: str, source: str = "", path: Path = DOCS) -> bool:
    """Put ``body`` in ``block`` of ``path`` with a stamp naming ``command`` (and ``source``, what
    it read); False, with nothing written, when the file has no such block."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:  # scripts run side by side: one writer at a time,
        fcntl.flock(lock, fcntl.LOCK_EX)                             # each reading what the last one wrote
        text = path.read_text()
        if begin not in text or end not in text:
            return False
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        stamp = (f"_Tables generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}`"
                 f"{f' from {source}' if source else ''}._")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(f"{head}{begin}\n{stamp}\n\n{body}\n{end}{tail}")
            os.replace(tmp, path)  # whole or not at all
        finally:
            tmp.unlink(missing_ok=True)
    return True
