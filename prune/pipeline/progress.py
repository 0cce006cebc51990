"""Resumable runs: what an interrupted ``prune run`` had finished, kept beside its output folder.

While a run works, ``.<output name>.progress/`` (a hidden sibling of the output folder, never a
checkpoint) receives each finished expensive stage as JSON: ``scores.json`` (the original
model's scores), ``selection.json`` (the chosen blocks) and ``original.json`` (the original
model's evaluation), plus ``recipe.json``, the recipe they were computed under. After the
output folder is saved the progress folder is removed.

``prune run RECIPE --resume`` reuses each stored stage whose recipe sections (:data:`STAGE_SECTIONS`; output
and heal read by none) and inputs are the same (:func:`input_fingerprint`: each model file's size, mtime and a
hash of its header, or the Hub commit; each data file's size, mtime and hash; with lm-eval tasks, every file of
the task data and task folders and lm-eval's version; the package version), and recomputes the rest, with a
note; when no stored stage holds, the resume is refused with a one-line message naming what changed. The same
recipe run again without ``--resume`` is refused while finished stages wait (they are not thrown away unasked).
The
pruned model, its scores and its evaluation are always recomputed: everything saved is a
deterministic function of the stored stages, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from prune.core import dist
from prune.core.errors import PruneError, spelled
from prune.core.console import say

STAGES = ("scores", "selection", "original")
#: files up to this size are hashed whole; larger ones by their first HEAD bytes (a safetensors
#: file by its whole JSON header, which names every tensor's dtype, shape and offsets)
WHOLE = 64 << 20
HEAD = 1 << 20


def file_fingerprint(path: Path) -> dict:
    """``{"size", "mtime_ns", "sha256"}``: the hash covers the whole file up to :data:`WHOLE`
    bytes, else its first :data:`HEAD` bytes (for ``.safetensors`` the whole header)."""
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if st.st_size <= WHOLE:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            n = HEAD
            if path.suffix == ".safetensors":
                n = 8 + min(int.from_bytes(handle.read(8), "little"), 100 << 20)
                handle.seek(0)
            digest.update(handle.read(n))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}


def _model_fingerprint(model) -> dict:
    from prune.io.source import resolve_source

    src = resolve_source(model.source, model.gguf_file, model.revision)
    if src.kind == "gguf":
        return {src.gguf_file: file_fingerprint(Path(src.path) / src.gguf_file)}
    if src.kind == "folder":
        folder = Path(src.path)
        return {p.name: file_fingerprint(p) for p in sorted(folder.iterdir())
                if p.is_file() and not p.name.startswith(".")}
    try:  # a Hub id: the commit of the cached snapshot the run reads
        from huggingface_hub import snapshot_download

        commit = Path(snapshot_download(src.path, revision=src.revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached: the revision asked for is all there is
        commit = None
    return {"hub": src.path, "revision": src.revision, "commit": commit}


def input_fingerprint(recipe) -> dict:
    """What the stored stages were computed from besides the recipe: the model files, the
    local data files (every file of a folder ``datasets`` reads), the package and library versions."""
    from prune.core.console import __version__, versions

    texts = {"calibration": recipe.calibration}
    ev = recipe.evaluate
    if ev is not None and ev.perplexity is not None:
        texts["evaluate.perplexity"] = ev.perplexity
    if ev is not None and ev.fidelity is not None and ev.fidelity.path is not None:
        texts["evaluate.fidelity"] = ev.fidelity
    data = {}
    for key, cfg in texts.items():
        path = Path(cfg.path).expanduser()
        data[key] = (file_fingerprint(path) if path.is_file() else _folder_fingerprint(path) if path.is_dir()
                     else {"dataset": cfg.path})
    return {"model": _model_fingerprint(recipe.model), "data": data, "tasks": _task_fingerprint(recipe),
            "prune": __version__, "versions": versions()}


def _folder_fingerprint(folder: Path) -> dict:
    """Every file under ``folder``, by its path inside it (a local dataset folder, a task folder)."""
    return {str(p.relative_to(folder)): file_fingerprint(p) for p in sorted(folder.rglob("*")) if p.is_file()}


#: a data file a task YAML names: the shipped copies' ``{data_dir}/...``, a user task's absolute path
_TASK_FILE = re.compile(r"""\{data_dir\}/([^'"\s]+)|:\s*['"]?(/[^'"\s]+)""")


def _task_data_files(yaml_files: list[Path], root: Path | None) -> list[Path]:
    """The data files task YAMLs read outside the folders fingerprinted whole: a file, the files a glob
    matches (``/data/train/*.jsonl``), or every file under a folder (``dataset_path: /data/mytask``)."""
    import glob

    found = []
    for yaml_file in yaml_files:
        try:
            text = yaml_file.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for shipped, absolute in _TASK_FILE.findall(text):
            name = str(root / shipped) if shipped and root is not None else absolute or None
            if name is None:
                continue
            for match in sorted(glob.glob(name, recursive=True)) if glob.has_magic(name) else [name]:
                path = Path(match)
                if path.is_file():
                    found.append(path)
                elif path.is_dir():
                    found += sorted(p for p in path.rglob("*") if p.is_file())
    return found


def _task_fingerprint(recipe) -> dict | None:
    """The lm-eval tasks' inputs (the stored original evaluation and a task-floor search read them):
    lm-eval's version, every file of the task data folder's ``tasks/`` (``evaluate.data_dir``, else
    ``$PRUNE_DATA_DIR``) and of ``evaluate.task_dirs``, and the data files their YAMLs name elsewhere
    (the shipped last-word task reads ``tinystories/``), by path. None without tasks."""
    from importlib.metadata import version

    from prune.measure.lmeval import data_dir

    ev, sel = recipe.evaluate, recipe.select
    proxy = sel.proxy_task if sel.strategy == "search" else None
    if not ((ev is not None and ev.tasks) or proxy):
        return None
    root = data_dir(ev.data_dir if ev is not None else None)
    folders = ([root / "tasks"] if root is not None else []) + [Path(d).expanduser() for d in (ev.task_dirs if ev else [])]
    files = {str(p): file_fingerprint(p) for folder in folders if folder.is_dir()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    yamls = sorted(Path(__file__).resolve().parents[1].joinpath("tasks").glob("*.yaml")) + [
        Path(p) for p in files if p.endswith((".yaml", ".yml"))]
    files.update({str(p): file_fingerprint(p) for p in _task_data_files(yamls, root) if str(p) not in files})
    return {"lm_eval": version("lm_eval"), "data_dir": str(root) if root is not None else None, "files": files}


def finished_stages(folder: Path) -> list[str]:
    """The :data:`STAGES` stored in a progress ``folder``, in run order."""
    return [s for s in STAGES if (folder / f"{s}.json").is_file()]


def progress_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).expanduser().resolve()
    return out.parent / f".{out.name}.progress"


def fingerprint(recipe) -> dict:
    """The recipe as the stored stages depend on it: everything except the ``output`` section, a path to an
    existing file or folder as its absolute, resolved form (``../shared/data/x`` and ``/work/shared/data/x``
    name one file: its contents are fingerprinted apart, :func:`input_fingerprint`)."""
    data = recipe.model_dump(mode="json")
    data.pop("output", None)
    return _resolved(data)


def _resolved(value):
    if isinstance(value, dict):
        return {k: _resolved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    if isinstance(value, str) and ("/" in value or "." in value) and "\n" not in value:
        try:
            path = Path(value).expanduser()
            return str(path.resolve()) if path.exists() else value
        except (OSError, ValueError, RuntimeError):  # a name too long for a path, a loop of links: not a path
            return value
    return value


#: the recipe sections each stored stage was computed from (``*``: the package and library versions, which every
#: stage depends on); a changed section makes those stages stale, and the others are reused
STAGE_SECTIONS = {"scores": {"model", "calibration", "score", "*"},
                  "selection": {"model", "calibration", "score", "select", "*"},
                  "original": {"model", "evaluate", "*"}}


def stage_sections(recipe: dict, stage: str) -> set[str]:
    """:data:`STAGE_SECTIONS` of ``stage``; ``search``'s selection also reads ``evaluate`` (its proxy task)."""
    search = (recipe.get("select") or {}).get("strategy") == "search"
    return STAGE_SECTIONS[stage] | ({"evaluate"} if stage == "selection" and search else set())


def changed_sections(old: dict, new: dict) -> set[str]:
    """The sections of two stored fingerprints (recipe and ``inputs``) that differ, inputs counted in the section
    that reads them: the model's files in ``model``, calibration text in ``calibration``, evaluation text and task
    data in ``evaluate``, versions in ``*``."""
    changed = {k for k in set(old) | set(new) if k != "inputs" and old.get(k) != new.get(k)}
    oi, ni = old.get("inputs") or {}, new.get("inputs") or {}
    if oi.get("model") != ni.get("model"):
        changed.add("model")
    od, nd = oi.get("data") or {}, ni.get("data") or {}
    changed |= {k.split(".")[0] for k in set(od) | set(nd) if od.get(k) != nd.get(k)}
    if oi.get("tasks") != ni.get("tasks"):
        changed.add("evaluate")
    if (oi.get("prune"), oi.get("versions")) != (ni.get("prune"), ni.get("versions")):
        changed.add("*")
    return changed


class RunProgress:
    """The progress folder of one run. ``get(stage)`` returns a stored stage (only when resuming),
    ``put(stage, data)`` stores one atomically, ``finish()`` removes the folder."""

    def __init__(self, out_dir: str | os.PathLike, recipe, resume: bool = False):
        self.folder = progress_dir(out_dir)
        self.recipe = {**fingerprint(recipe), "inputs": input_fingerprint(recipe)}
        self.resumed: list[str] = []
        stored = self._read("recipe")
        if resume:
            if stored is None:
                raise PruneError(f"nothing to resume: no saved progress at {self.folder} (run without "
                                 f"{spelled('--resume', 'resume=True')})")
            if stored != self.recipe:
                self._keep_what_still_holds(stored)
            self.resume = True
        else:
            self.resume = False
            finished = finished_stages(self.folder)
            if finished and stored == self.recipe:  # the same run, interrupted: its stages are not thrown away unasked
                raise PruneError(f"{self.folder} holds the finished stages ({', '.join(finished)}) of an interrupted run "
                                 f"of this recipe: rerun with {spelled('--resume', 'resume=True')} to reuse them, or "
                                 "remove that folder to start over")
            if self.folder.exists():  # another recipe's stages: stale for this one
                if finished:
                    say(f"note: {self.folder} held the finished stages ({', '.join(finished)}) of an interrupted run of "
                        "another recipe: stale for this one, removed")
                shutil.rmtree(self.folder)

    def _keep_what_still_holds(self, stored: dict) -> None:
        """The recipe or its inputs changed since the interrupted run: the stages computed from what changed are
        removed (and said so), the others kept; refused when none is left to reuse."""
        changed = changed_sections(stored, self.recipe)
        finished = finished_stages(self.folder)
        stale = [s for s in finished if changed & stage_sections(self.recipe, s)]
        if stale == finished:  # nothing left to reuse: the messages name what changed
            if stored.get("inputs") != self.recipe["inputs"] and isinstance(stored.get("inputs"), dict):
                raise PruneError(f"cannot resume: {_changed_inputs(stored['inputs'], self.recipe['inputs'])} changed "
                                 "since the interrupted run, so its saved scores and evaluation are stale; run "
                                 "without --resume to start over")
            shown = sorted(k for k in set(stored) | set(self.recipe) if k != "inputs" and stored.get(k) != self.recipe.get(k))
            raise PruneError(f"cannot resume: the recipe changed since the interrupted run (sections: "
                             f"{', '.join(shown)}); restore it or run without --resume to start over")
        for name in stale:
            (self.folder / f"{name}.json").unlink()
        self._write("recipe", self.recipe)  # what the kept stages and the ones to come are computed from
        if stale:
            say(f"note: the recipe or its inputs changed since the interrupted run "
                f"({', '.join(sorted(c for c in changed if c != '*')) or 'versions'}): {', '.join(stale)} measured "
                "again, the other stages reused")

    def found(self) -> list[str]:
        """The stages a resumed run will reuse."""
        return finished_stages(self.folder) if self.resume else []

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
        """Store ``stage``; a full disk (or an unwritable folder) is one line, nothing half written."""
        from prune.io.guard import write_error

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "recipe.json").is_file():
                self._write("recipe", self.recipe)
            self._write(stage, data)
        except Exception as exc:
            if not finished_stages(self.folder):
                shutil.rmtree(self.folder, ignore_errors=True)  # nothing finished: leave nothing behind
            error = write_error(exc, self.folder, "saving the progress of the run in")
            if error is None:
                raise
            raise error from None

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _read(self, name: str):
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # ValueError: bad JSON or UTF-8
            return None  # a stage cut short is recomputed

    def _write(self, name: str, data) -> None:
        tmp = self.folder / f".{name}.json.tmp"
        try:
            tmp.write_text(json.dumps(data) + "\n")
            tmp.replace(self.folder / f"{name}.json")
        finally:
            tmp.unlink(missing_ok=True)


def _changed_inputs(old: dict, new: dict) -> str:
    """``"the model (model.safetensors)"``, ``"the data file of calibration"``, ``"the lm-eval task data
    (copa.jsonl)"``, ``"the prune version"``."""
    if old.get("model") != new.get("model"):
        om, nm = old.get("model") or {}, new.get("model") or {}
        names = sorted(k for k in set(om) | set(nm) if om.get(k) != nm.get(k))
        return f"the model ({', '.join(names[:3])})"
    if old.get("data") != new.get("data"):
        od, nd = old.get("data") or {}, new.get("data") or {}
        return f"the data file of {', '.join(sorted(k for k in set(od) | set(nd) if od.get(k) != nd.get(k)))}"
    if old.get("tasks") != new.get("tasks"):
        ot, nt = old.get("tasks") or {}, new.get("tasks") or {}
        if ot.get("lm_eval") != nt.get("lm_eval") or ot.get("data_dir") != nt.get("data_dir"):
            return "the lm-eval version or the task data folder"
        of, nf = ot.get("files") or {}, nt.get("files") or {}
        names = sorted(Path(k).name for k in set(of) | set(nf) if of.get(k) != nf.get(k))
        return f"the lm-eval task data ({', '.join(names[:3])})"
    if old.get("prune") != new.get("prune"):
        return f"the prune version ({old.get('prune')} -> {new.get('prune')})"
    ov, nv = old.get("versions") or {}, new.get("versions") or {}
    return "the library versions (" + ", ".join(f"{k} {ov.get(k)} -> {nv.get(k)}" for k in sorted(set(ov) | set(nv))
                                               if ov.get(k) != nv.get(k)) + ")"
