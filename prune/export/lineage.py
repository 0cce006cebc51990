"""Lineage of a pruned checkpoint: pruning an already pruned model appends to its history.

Every ``pruning.json`` written by ``prune run`` is one *step*. Its own ``removed`` /
``kept`` index the blocks of the model that step loaded; lineage adds indices into the
ORIGINAL model (the first unpruned one in the chain), so a chain reads the same however
many steps it has. With ``K_{s-1}`` the kept original indices before step ``s``
(``K_0 = 0..L0-1``) and ``r`` a block removed by step ``s`` (0-based in its input):

    removed_original[s] = [K_{s-1}[r] for r in removed[s]]
    kept_original[s]    = [K_{s-1}[k] for k in kept[s]]

Keys added to a step: ``step`` (1-based), ``removed_original``, ``removed_original_all``
(every original block gone so far), ``kept_original``, ``original`` (source, layer and
parameter count, license of the first model), ``base_model`` (nearest Hub id up the
chain, or ``None``), and ``history``: the earlier steps, oldest first, each a full record
without its own history (plus its ``eval_rows`` when the parent folder had ``eval.json``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from prune.core.errors import PruneError
from prune.io.source import ModelSource

RECORD = "pruning.json"
HUB_TIMEOUT = 10  # seconds, for the one metadata request lineage makes to the Hub


# ---- reading the parent ------------------------------------------------------------------
def read_parent(src: ModelSource, n_layers: int) -> dict | None:
    """The ``pruning.json`` of ``src`` when it was itself pruned, normalised and checked
    against its ``n_layers`` blocks; ``None`` for an unpruned source.

    Local folders are read directly; for a Hub id the file is fetched when reachable (a
    missing file, offline mode or no network mean "no lineage", never a failure).
    Raises :class:`PruneError` when the record contradicts the checkpoint.
    """
    record, eval_rows = _read_record(src)
    if record is None:
        return None
    if not isinstance(record, dict) or "removed" not in record:
        raise PruneError(f"{src.display}: {RECORD} is not a pruning record (no 'removed'); move it away to prune "
                         "this folder as an original model")
    step = normalize_step(record, n_layers, src.display)
    if eval_rows is not None:
        step["eval_rows"] = eval_rows
    return step


def _read_record(src: ModelSource) -> tuple[Any, list | None]:
    if src.kind == "folder":
        folder = Path(src.path)
        file = folder / RECORD
        if not file.is_file():
            return None, None
        from prune.core.records import read_record

        read_record(file)  # not UTF-8, not JSON, or the wrong shape (removed: 5): one line, here
        record = json.loads(file.read_text(encoding="utf-8"))
        return record, _eval_rows(folder / "eval.json")
    if src.kind == "hub":
        file = _hub_file(src.path, RECORD, src.revision)
        if file is None:
            return None, None
        try:
            return json.loads(Path(file).read_text()), _eval_rows(_hub_file(src.path, "eval.json", src.revision))
        except (OSError, ValueError):
            return None, None
    return None, None


def _eval_rows(path) -> list | None:
    try:
        return json.loads(Path(path).read_text()).get("rows") if path else None
    except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or UTF-8
        return None


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    """Local path of ``filename`` from a Hub model repo, ``None`` when absent or unreachable.

    The cache answers first; otherwise one ``model_info`` request (no retries, short
    timeout) says whether the file exists before it is downloaded, so an unreachable Hub
    costs one refused connection, not minutes of retries. Never raises."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        files = _hub_files(repo_id, revision)
        if files is None or filename not in files:
            return None
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception:  # noqa: BLE001 - absent file, offline, no network: unknown
        return None


@functools.lru_cache(maxsize=32)
def _hub_files(repo_id: str, revision: str | None) -> frozenset[str] | None:
    """File names of a Hub model repo from one ``model_info`` call; ``None`` offline or on failure."""
    from prune.export.push import offline

    if offline():
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
    except Exception:  # noqa: BLE001
        return None
    return frozenset(s.rfilename for s in info.siblings or ())


def normalize_step(record: dict, n_layers_after: int, where: str = "") -> dict:
    """A copy of ``record`` with the lineage keys filled in (older or hand-written records
    with only ``removed`` count as one step from an original model), checked: its kept
    blocks must number ``n_layers_after`` (the checkpoint's own block count)."""
    step = dict(record)
    removed = sorted(step["removed"])
    before = step.get("layers_before") or n_layers_after + len(removed)
    kept = step.get("kept") or [i for i in range(before) if i not in set(removed)]
    step.setdefault("layers_before", before)
    step.setdefault("layers_after", len(kept))
    step.setdefault("kept", kept)
    step.setdefault("step", len(step.get("history") or []) + 1)
    step.setdefault("removed_original", removed)
    step.setdefault("kept_original", kept)
    step.setdefault("removed_original_all", removed)
    step.setdefault("history", [])
    step.setdefault("original", {"source": step.get("source"), "n_layers": before,
                                 "params": step.get("params_before"), "model_type": step.get("model_type")})
    if len(step["kept_original"]) != n_layers_after:
        raise PruneError(f"{where or 'the source'}: {RECORD} records {len(step['kept_original'])} blocks after pruning "
                         f"but the model has {n_layers_after}; the record does not describe these weights "
                         f"(fix it, or move {RECORD} away to prune this model as an original)")
    return step


# ---- extending ---------------------------------------------------------------------------
def extend(record: dict, parent: dict | None, src: ModelSource) -> dict:
    """``record`` (this step, indices local to the model it loaded) with its lineage keys."""
    out = dict(record)
    removed = list(record["removed"])
    kept = list(record["kept"])
    if parent is None:
        before = list(range(record["layers_before"]))
        history: list[dict] = []
        previously_removed: list[int] = []
        original = {"source": src.to_dict(), "n_layers": record["layers_before"], "params": record.get("params_before"),
                    "model_type": record.get("model_type"), **source_license(src)}
        base_model = src.path if src.kind == "hub" else None
    else:
        before = list(parent["kept_original"])
        if len(before) != record["layers_before"]:
            raise PruneError(f"internal error: the parent record keeps {len(before)} blocks but the model had "
                             f"{record['layers_before']}; please report this")
        history = list(parent.get("history") or []) + [{k: v for k, v in parent.items() if k != "history"}]
        previously_removed = list(parent["removed_original_all"])
        license_now = source_license(src)
        original = {**parent["original"], **{k: v for k, v in license_now.items() if v}}
        base_model = src.path if src.kind == "hub" else parent.get("base_model")
    out.update(
        step=len(history) + 1,
        removed_original=[before[i] for i in removed],
        removed_original_all=sorted(previously_removed + [before[i] for i in removed]),
        kept_original=[before[i] for i in kept],
        original=original,
        base_model=base_model,
        history=history,
    )
    return out


def chain(record: dict) -> list[dict]:
    """Every step of ``record``'s lineage, oldest first, ending with ``record`` itself."""
    return list(record.get("history") or []) + [record]


# ---- license of the source -----------------------------------------------------------------
def source_license(src: ModelSource) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link`` for ``other``) of a model source,
    from a folder's README front matter, a GGUF file's ``general.license``, or the Hub card
    (cache or network); ``{}`` when unknown. Never raises, never needs the network."""
    try:
        if src.kind == "gguf":
            value = gguf_license(Path(src.path) / src.gguf_file)
            return {"license": value} if value else {}
        if src.kind == "folder":
            return _card_license(Path(src.path) / "README.md")
        if src.kind == "hub":
            file = _hub_file(src.path, "README.md", src.revision)
            return _card_license(Path(file)) if file else {}
    except Exception:  # noqa: BLE001 - a license we cannot read is simply unknown
        return {}
    return {}


def _card_license(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


def gguf_license(path: Path) -> str | None:
    """``general.license`` from a GGUF file's metadata (header only, memory-mapped)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    field = reader.fields.get("general.license")
    if field is None:
        return None
    value = field.contents() if hasattr(field, "contents") else bytes(field.parts[field.data[0]]).decode("utf-8")
    return str(value).strip() or None
