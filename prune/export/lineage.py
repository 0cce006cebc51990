"""Lineage of a pruned checkpoint: pruning an already pruned model appends to its history.

Every ``pruning.json`` written by ``prune run`` is one *step*. Its own ``removed`` /
``kept`` index the blocks of the model that step loaded; lineage adds indices into the
ORIGINAL model (the first unpruned one in the chain), so a chain reads the same however
many steps it has. With ``K_{s-1}`` the kept original indices before step ``s``
(``K_0 = 0..L0-1``) and ``r`` a block removed by step ``s`` (0-based in its input):

    removed_original[s] = [K_{s-1}[r] for r in removed[s]]
    kept_original[s]    = [K_{s-1}[k] for k in kept[s]]

Fields set on a step (:class:`~prune.core.records.PruningRecord`): ``step`` (1-based),
``removed_original``, ``removed_original_all`` (every original block gone so far),
``kept_original``, ``original`` (source, layer and parameter count, license of the first
model), ``base_model`` (the Hub parent, see :func:`extend`), and ``history``: the earlier
steps, oldest first, each a full record without its own history (plus its ``eval_rows``
when the parent folder had ``eval.json``). Every writer (``prune run``, ``prune remove``,
``prune heal``, :func:`prune.save`) goes through :func:`extend`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from prune.core.errors import PruneError
from prune.core.records import (
    OriginalModel,
    PruningRecord,
    PruningStep,
    SourceRecord,
    complement,
    original_indices,
    parse_record,
    read_record,
)
from prune.io.source import ModelSource

RECORD = "pruning.json"
HUB_TIMEOUT = 10  # seconds, for the one metadata request lineage makes to the Hub


# ---- reading the parent ------------------------------------------------------------------
def read_parent(src: ModelSource, n_layers: int) -> PruningRecord | None:
    """The ``pruning.json`` of ``src`` when it was itself pruned, normalised and checked
    against its ``n_layers`` blocks; ``None`` for an unpruned source.

    Local folders are read directly; for a Hub id the file is fetched when reachable (a
    missing file, offline mode or no network mean "no lineage", never a failure).
    Raises :class:`PruneError` when the record contradicts the checkpoint.
    """
    found = _read_record(src)
    if found is None:
        return None
    record, eval_rows = found
    step = normalize_step(record, n_layers, src.display)
    if eval_rows is not None:
        step.eval_rows = eval_rows
    return step


def is_pruned(src: ModelSource) -> bool:
    """Whether ``src`` holds a ``pruning.json`` (a Hub repo: in the cache, or when the Hub answers)."""
    return _read_record(src) is not None


def _read_record(src: ModelSource) -> tuple[PruningRecord, list | None] | None:
    if src.kind == "folder":
        folder = Path(src.path)
        if not (folder / RECORD).is_file():
            return None
        return read_record(folder / RECORD), _eval_rows(folder / "eval.json")
    if src.kind == "hub":
        file = _hub_file(src.path, RECORD, src.revision)
        if file is None:
            return None
        try:
            return read_record(file), _eval_rows(_hub_file(src.path, "eval.json", src.revision))
        except PruneError:
            return None
    return None


def _eval_rows(path) -> list | None:
    """The before/after rows of a parent's ``eval.json``; None when absent or not well formed."""
    from prune.core.tables import well_formed_rows

    try:
        return well_formed_rows(json.loads(Path(path).read_text()).get("rows")) if path else None
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


def as_record(record: PruningRecord | PruningStep | dict, where: str = RECORD) -> PruningRecord:
    """A :class:`PruningRecord` from a record or the dict of one (validated, one-line errors); always a
    copy: the writers fill in fields, and a record a caller passed in stays as it was."""
    if isinstance(record, PruningRecord):
        return record.model_copy(deep=True)
    if isinstance(record, PruningStep):
        return PruningRecord.model_validate(record.model_dump())
    return parse_record(record, where)


def normalize_step(record: PruningRecord | dict, n_layers_after: int, where: str = "") -> PruningRecord:
    """A copy of ``record`` with the lineage fields filled in (older or hand-written records
    with only ``removed`` count as one step from an original model), checked: its kept
    blocks must number ``n_layers_after`` (the checkpoint's own block count)."""
    step = as_record(record, where or RECORD).model_copy(deep=True)
    removed = sorted(step.removed)
    before = step.layers_before or n_layers_after + len(removed)
    kept = step.kept or complement(before, removed)
    step.layers_before = before
    if step.layers_after is None:
        step.layers_after = len(kept)
    step.kept = kept
    if "step" not in step.model_fields_set:
        step.step = len(step.history) + 1
    step.removed_original = step.removed_original or removed
    step.kept_original = step.kept_original or kept
    step.removed_original_all = step.removed_original_all or removed
    if step.original is None:
        step.original = OriginalModel(source=step.source, n_layers=before, params=step.params_before,
                                      model_type=step.model_type)
    if len(step.kept_original) != n_layers_after:
        raise PruneError(f"{where or 'the source'}: {RECORD} records {len(step.kept_original)} blocks after pruning "
                         f"but the model has {n_layers_after}; the record does not describe these weights "
                         f"(fix it, or move {RECORD} away to prune this model as an original)")
    return step


# ---- extending ---------------------------------------------------------------------------
def extend(record: PruningRecord | dict, parent: PruningRecord | None, src: ModelSource,
           base_model: str | None = None) -> PruningRecord:
    """``record`` (this step, indices local to the model it loaded) with its lineage fields.

    ``base_model``: the Hub parent declared for a local source (``model.base_model``); the
    Hub parent is, in order, a Hub source itself, ``base_model``, the repo the parent folder
    was pushed to, the parent's own ``base_model``."""
    from prune.export.public import hub_id, public_source

    out = as_record(record).model_copy(deep=True)
    removed, kept = list(out.removed), list(out.kept)
    out.source = public_source(src)
    if parent is None:
        before = list(range(out.layers_before))
        history: list[PruningStep] = []
        previously_removed: list[int] = []
        original = OriginalModel(source=out.source, n_layers=out.layers_before, params=out.params_before,
                                 model_type=out.model_type, **source_license(src))
        inherited = None
    else:
        before = list(parent.kept_original)
        if len(before) != out.layers_before:
            raise PruneError(f"internal error: the parent record keeps {len(before)} blocks but the model had "
                             f"{out.layers_before}; please report this")
        history = [*parent.history, parent.as_step()]
        previously_removed = list(parent.removed_original_all)
        license_now = {k: v for k, v in source_license(src).items() if v}
        original = parent.original.model_copy(update=license_now) if parent.original else None
        inherited = hub_id(parent.repo_id) or hub_id(parent.base_model)  # a parent's file may have been edited
    out.step = len(history) + 1
    if out.created is None:  # prune run dates its record at the start; prune remove and prune.save now
        from prune.core.records import utc_now

        out.created = utc_now()
    out.kept_original, out.removed_original, out.removed_original_all = original_indices(
        before, kept, removed, previously_removed)
    out.original = original
    out.base_model = src.path if src.kind == "hub" else (base_model or inherited)
    out.history = history
    return out


def recorded_source(recorded: SourceRecord | dict, given: str | None = None) -> ModelSource:
    """The model a record names as its source, to load it again (``prune heal --method replace``).

    A Hub source resolves as recorded; a local one is recorded by name and sha256 only (no
    local paths are published), so it is ``given`` (``--source``) and checked against the
    sha256; records of older versions with an absolute path still resolve by that path."""
    from prune.export.public import is_local_path, matches_source
    from prune.io.source import resolve_source

    rec = recorded if isinstance(recorded, SourceRecord) else SourceRecord.model_validate(recorded)
    if given is not None:
        src = resolve_source(given)
        if not matches_source(rec, src):
            raise PruneError(f"--source {given} is not the model pruning.json records ({rec.gguf_file or rec.path}, "
                             f"sha256 {str(rec.sha256)[:12]}...): give the original model this run was pruned from")
        return src
    if rec.kind == "hub" or is_local_path(rec.path):
        try:
            return resolve_source(rec.path, rec.gguf_file, rec.revision)
        except PruneError as exc:
            raise PruneError(f"the original model {rec.path} is needed: {exc}") from None
    raise PruneError(f"pruning.json records the original model by name only ({rec.gguf_file or rec.path}, local, "
                     "no path is stored): give it with --source PATH (checked against its sha256)")


def chain(record: PruningRecord | dict) -> list[PruningStep]:
    """Every step of ``record``'s lineage, oldest first, ending with ``record`` itself."""
    return as_record(record).chain()


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


#: the files that carry a model's terms, copied into every pruned folder (the card's license_link may name one)
LICENSE_FILES = re.compile(r"^(LICEN[CS]E|NOTICE|USE_POLICY|COPYING)(\.(md|txt))?$", re.IGNORECASE)
_HUB_LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "NOTICE.md", "USE_POLICY.md")


def license_files(src: ModelSource) -> dict[str, str]:
    """``{name: text}`` of a source's license files (:data:`LICENSE_FILES`): a folder's own, a Hub model's
    from the cache (never the network); ``{}`` for a GGUF file or when none is there. Never raises."""
    found: dict[str, str] = {}
    try:
        if src.kind == "folder":  # not a link out of the folder (its target is not the model's to publish)
            from prune.io.guard import inside_folder

            paths = [p for p in sorted(Path(src.path).iterdir())
                     if p.is_file() and LICENSE_FILES.match(p.name) and inside_folder(p, Path(src.path))]
        elif src.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            cached = [(n, try_to_load_from_cache(src.path, n, revision=src.revision)) for n in _HUB_LICENSE_NAMES]
            paths = [Path(p) for _, p in cached if isinstance(p, str)]
        else:
            return {}
        for path in paths:
            if path.stat().st_size <= 2**20:
                found[path.name] = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return found
    return found


def _card_license(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


def gguf_license(path: Path) -> str | None:
    """``general.license`` from a GGUF file's metadata (header only, memory-mapped, parsed once per process)."""
    from prune.io.gguf import gguf_reader

    reader = gguf_reader(path)
    field = reader.fields.get("general.license")
    if field is None:
        return None
    value = field.contents() if hasattr(field, "contents") else bytes(field.parts[field.data[0]]).decode("utf-8")
    return str(value).strip() or None
