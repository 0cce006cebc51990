"""Scratch folders a process must remove even when it leaves through ``os._exit``.

A launched rank that the launcher stops (SIGTERM after another rank failed) leaves at once with
``os._exit`` (:func:`prune.cli.dist_exit`), which runs no ``finally`` block: folders registered here
(the sequential engine's spilled hidden states, up to (L + 1) x windows x seq_len x hidden x 4 bytes)
are removed by :func:`remove_all` first. A normal exit removes them where they were made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_FOLDERS: set[Path] = set()


def register(folder: Path) -> None:
    _FOLDERS.add(Path(folder))


def unregister(folder: Path) -> None:
    _FOLDERS.discard(Path(folder))


def remove_all() -> None:
    """Remove every registered folder (ignoring errors): the last thing before ``os._exit``."""
    for folder in list(_FOLDERS):
        shutil.rmtree(folder, ignore_errors=True)
        _FOLDERS.discard(folder)
