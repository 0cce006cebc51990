"""Resumable runs: what an interrupted ``prune run`` had finished, kept beside its output folder.

While a run works, ``.<output name>.progress/`` (a hidden sibling of the output folder, never a
checkpoint) receives each finished expensive stage as JSON: ``scores.json`` (the original
model's scores), ``selection.json`` (the chosen blocks) and ``original.json`` (the original
model's evaluation), plus ``recipe.json``, the recipe they were computed under. After the
output folder is saved the progress folder is removed.

``prune run RECIPE --resume`` reuses those stages when the recipe is the same (output keys
aside) and recomputes the rest; a different recipe is refused with a one-line message. The
pruned model, its scores and its evaluation are always recomputed: everything saved is a
deterministic function of the stored stages, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prune.core import dist
from prune.core.errors import PruneError

STAGES = ("scores", "selection", "original")


def progress_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).expanduser().resolve()
    return out.parent / f".{out.name}.progress"


def fingerprint(recipe) -> dict:
    """The recipe as the stored stages depend on it: everything except the ``output`` section."""
    data = recipe.model_dump(mode="json")
    data.pop("output", None)
    return data


class RunProgress:
    """The progress folder of one run. ``get(stage)`` returns a stored stage (only when resuming),
    ``put(stage, data)`` stores one atomically, ``finish()`` removes the folder."""

    def __init__(self, out_dir: str | os.PathLike, recipe, resume: bool = False):
        self.folder = progress_dir(out_dir)
        self.recipe = fingerprint(recipe)
        self.resumed: list[str] = []
        stored = self._read("recipe")
        if resume:
            if stored is None:
                raise PruneError(f"nothing to resume: no saved progress at {self.folder} (run without --resume)")
            if stored != self.recipe:
                changed = sorted(k for k in set(stored) | set(self.recipe) if stored.get(k) != self.recipe.get(k))
                raise PruneError(f"cannot resume: the recipe changed since the interrupted run (sections: "
                                 f"{', '.join(changed)}); restore it or run without --resume to start over")
            self.resume = True
        else:
            self.resume = False
            if self.folder.exists():
                shutil.rmtree(self.folder)

    def found(self) -> list[str]:
        """The stages a resumed run will reuse."""
        return [s for s in STAGES if self.resume and (self.folder / f"{s}.json").is_file()]

    def stage(self, name: str, compute, encode=lambda x: x, decode=lambda x: x):
        """``decode(stored)`` when resuming a run that finished stage ``name``; otherwise
        ``compute()``, stored as ``encode(result)`` before it is returned."""
        main = dist.world().is_main  # under a launcher rank 0 reads and writes, the others follow
        stored = dist.broadcast(self.get(name) if main else None)
        if stored is not None:
            return decode(stored)
        result = compute()
        if main:
            self.put(name, encode(result))
        return result

    def get(self, stage: str):
        if not self.resume:
            return None
        data = self._read(stage)
        if data is not None:
            self.resumed.append(stage)
        return data

    def put(self, stage: str, data) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "recipe.json").is_file():
            self._write("recipe", self.recipe)
        self._write(stage, data)

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _read(self, name: str):
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a stage cut short is recomputed

    def _write(self, name: str, data) -> None:
        tmp = self.folder / f".{name}.json.tmp"
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(self.folder / f"{name}.json")
