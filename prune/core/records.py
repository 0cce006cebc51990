"""``pruning.json``, the toolkit's central output, as a typed record (pydantic).

One step of a pruning chain is a :class:`PruningStep`; the file holds a :class:`PruningRecord`
(the latest step plus ``history``, the earlier steps oldest first). It is written by
:func:`write_record` and read by :func:`read_record` only; everything else reads attributes.

Schema versions: ``1`` is what 0.1.0 wrote (``"format": "prune/1"``, no ``schema_version``);
``2`` adds ``schema_version``. Version-1 files read unchanged (every field they have is
declared here); unknown keys from newer writers are kept, never dropped.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prune.core.errors import PruneError, parse_problem

SCHEMA_VERSION = 2
FORMAT = "prune/1"
RECORD_FILE = "pruning.json"


def block_number(value, what: str = "block index") -> int:
    """``value`` as a Python int: any integer type (numpy's too), never a bool, a float or a tensor."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PruneError(f"{what} {value!r} is not an integer")
    return int(value)


def is_block_map(kept, total: int | None = None) -> bool:
    """``kept`` is a block map: whole numbers (never bools), strictly increasing, from 0 and below ``total`` (when known)."""
    kept = list(kept)
    return (all(isinstance(i, int) and not isinstance(i, bool) for i in kept) and kept == sorted(set(kept))
            and (not kept or kept[0] >= 0) and (total is None or not kept or kept[-1] < total))


def complement(n_layers: int, indices) -> list[int]:
    """The block indices ``0 .. n_layers - 1`` not in ``indices``, in order: the kept blocks of a cut
    (``complement(n, removed)``), or the removed ones of a list of kept blocks."""
    gone = set(indices)
    return [i for i in range(n_layers) if i not in gone]


class Record(BaseModel):
    """Base of the records: unknown keys are kept (forward compatible), assignment is validated."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class SourceRecord(Record):
    """Where a model came from: ``kind`` is ``hub``, ``folder`` or ``gguf``."""

    kind: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None
    sha256: str | None = None  # local sources: of the GGUF file, or of a folder's config + weights (prune.export.public)


class OriginalModel(Record):
    """The first, unpruned model of a chain."""

    source: SourceRecord | None = None
    n_layers: int
    params: int | None = None
    model_type: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None


class CalibrationRecord(Record):
    """The calibration text and windows the scores were computed on."""

    path: str | None = None
    field: str | list[str] | None = None
    config: str | None = None
    split: str | None = None
    rows: str | None = None
    n_samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    bos: bool | None = None
    batch_size: int | None = None
    positions: str | None = None
    cka_windows: int | None = None
    hub: bool | None = None  # the text came from a Hub dataset (decided where the run read it; None: older records)


class PruningStep(Record):
    """One pruning step. ``removed`` / ``kept`` index the blocks of the model this step loaded;
    the ``*_original`` lists index the original model (see :mod:`prune.export.lineage`)."""

    schema_version: int = 1  # absent in 0.1.0's files; write_record stamps SCHEMA_VERSION
    format: str = FORMAT
    source: SourceRecord | None = None
    removed: list[int]
    kept: list[int] = []
    layers_before: int | None = None
    layers_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    model_type: str | None = None
    selection: dict[str, Any] | None = None  # prune.choose.rules.Selection.to_dict()
    msrs_before: dict[str, Any] | None = None
    msrs_after: dict[str, Any] | None = None
    scores_before: dict[str, Any] | None = None  # prune.measure.scoring.ScoreResult.to_dict()
    scores_after: dict[str, Any] | None = None
    calibration: CalibrationRecord | None = None
    seed: int | None = None
    # prune.heal: method, objective (lm | distill), settings, tokens_seen, steps, losses, val_loss_before/after;
    # with objective distill also distill = {temperature, kl_weight, hidden_weight, lm_weight, teacher,
    # teacher_source (memory | cache), top_k, teacher_cache, teacher_cache_bytes, kl_before, kl_after,
    # top1_before, top1_after, kl_tokens} (prune.heal.distill.heal_distill)
    healing: dict[str, Any] | None = None
    healed: str | None = None  # when `prune heal` healed this step's model (ISO time)
    versions: dict[str, str] = {}
    created: str | None = None
    seconds: float | None = None
    stage_seconds: dict[str, float] = {}  # wall seconds per stage of `prune run`, in order (core.console.StageClock)
    execution: dict[str, Any] | None = None
    resumed: list[str] = []
    recipe: dict[str, Any] | None = None
    # lineage (prune.export.lineage)
    step: int = 1
    removed_original: list[int] = []
    removed_original_all: list[int] = []
    kept_original: list[int] = []
    original: OriginalModel | None = None
    base_model: str | None = None
    repo_id: str | None = None  # the Hub repo this step's folder was pushed to (prune push)
    dtype: str | None = None  # dtype of the saved weights
    command: str | None = None  # what wrote this step: run, remove, save (a heal keeps it and adds healing)
    adapter: dict[str, Any] | None = None  # a PEFT adapter folder (heal.merge: false): {"format", "base"}
    eval_rows: list[dict[str, Any]] | None = None  # history entries: the parent folder's before/after rows

    @field_validator("healing")
    @classmethod
    def _healing_names_its_method(cls, healing: dict[str, Any] | None) -> dict[str, Any] | None:
        """A healing record names its method (the card, the report and ``prune check --original`` read it), and
        its settings, where given, are a mapping."""
        if healing is not None and (not isinstance(healing.get("method"), str)
                                    or not isinstance(healing.get("settings", {}), dict)):
            raise ValueError("a healing record names its method (a string), and its settings are a mapping")
        return healing

    @property
    def strategy(self) -> str | None:
        return (self.selection or {}).get("strategy")

    @property
    def metric(self) -> str | None:
        return (self.selection or {}).get("metric")


class PruningRecord(PruningStep):
    """What ``pruning.json`` holds: the latest step and its ``history`` (earlier steps, oldest first)."""

    history: list[PruningStep] = Field(default_factory=list)

    def chain(self) -> list[PruningStep]:
        """Every step of the lineage, oldest first, ending with this one."""
        return [*self.history, self]

    def label(self) -> str:
        """What this step's model is called beside its original (eval.md, the card, ``prune compare``): ``healed``
        once a healing trained it, else ``pruned``."""
        return "healed" if self.healing else "pruned"

    def kept_replacement(self) -> tuple[int, list[int]] | None:
        """``(original index, the original blocks it replaces)`` of a replacement block (``heal.method: replace``)
        this checkpoint still holds: it carries its source block's index among ``kept_original`` (that block is also
        among the removed ones); None when no healing replaced a run, or a later step removed the block. A healing
        of a healed folder keeps the one before it under ``previous``: the replacement may be recorded there."""
        steps = self.chain()
        for i, step in reversed(list(enumerate(steps))):
            rep = latest_replacement(step.healing)
            if rep is None:
                continue
            kept = step.kept_original or step.kept
            if not 0 <= rep["position"] < len(kept):
                return None
            index, positions = kept[rep["position"]], rep["position"]
            for later in steps[i + 1:]:  # each later step keeps it at the position its kept list says, or drops it
                if positions not in later.kept:
                    return None
                positions = later.kept.index(positions)
            return index, sorted(step.removed_original or rep.get("replaces") or [])
        return None

    def as_step(self) -> PruningStep:
        """This record without its history (how it is kept in a child's history)."""
        return PruningStep.model_validate(self.model_dump(exclude={"history"}))


def latest_replacement(healing) -> dict | None:
    """The ``replacement`` record (``replaces``, ``position``, ...) of the latest healing that replaced a run with one
    trained block: ``healing`` itself or one it healed again (``previous``); None when none did."""
    while isinstance(healing, dict):  # the latest healing first, then the ones before it
        rep = healing.get("replacement")
        if isinstance(rep, dict) and isinstance(rep.get("position"), int):
            return rep
        healing = healing.get("previous")
    return None


def utc_now() -> str:
    """The time a record is dated with (``created``): UTC, to the second, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_record(data: Any, where: str = RECORD_FILE) -> PruningRecord:
    """Validate a decoded ``pruning.json``; one :class:`PruneError` line when it is not a record."""
    if not isinstance(data, dict) or "removed" not in data:
        raise PruneError(f"{where} is not a pruning record (no 'removed'); move it away to use the folder as an "
                         "original model")
    try:
        record = PruningRecord.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise PruneError(f"{where}: '{key}': {err['msg']} (got {err.get('input')!r}); fix the file or move it "
                         "away") from None
    chain = record.chain()
    replaced = any((step.healing or {}).get("method") == "replace" for step in chain)
    for i, step in enumerate(chain):
        problem = index_problem(step, replaced) or (None if replaced else lineage_problem(chain[i - 1] if i else None, step))
        if problem:
            raise PruneError(f"{where}: step {step.step}: {problem}; fix the file or move it away")
    return record


def original_indices(earlier: list[int], kept: list[int], removed: list[int],
                     earlier_removed: list[int]) -> tuple[list[int], list[int], list[int]]:
    """``(kept_original, removed_original, removed_original_all)`` of a step keeping ``kept`` and removing
    ``removed`` of the blocks the step before kept (``earlier``: their original indices; ``earlier_removed``: the
    original's blocks removed before). A set for the last: a replacement block keeps its source block's index,
    so a later step may remove that index again."""
    return ([earlier[i] for i in kept], [earlier[i] for i in removed],
            sorted(set(earlier_removed) | {earlier[i] for i in removed}))


def lineage_problem(before: PruningStep | None, step: PruningStep) -> str | None:
    """What is wrong with a step's indices in the original's numbering given the step before it (``None``: the
    first, whose blocks are the original's): ``kept_original`` / ``removed_original`` are the earlier kept
    blocks at ``kept`` / ``removed``, and ``removed_original_all`` adds ``removed_original`` to the earlier ones.
    Lists a record does not hold (0.1.0's files) are not checked."""
    if not (step.kept and step.kept_original):
        return None
    blocks = step.kept + step.removed  # they split this step's blocks (index_problem)
    earlier = before.kept_original if before is not None else list(range(len(blocks)))
    if not earlier:
        return None
    if max(blocks) >= len(earlier):
        return f"its blocks ({len(blocks)}) are not the {len(earlier)} the step before kept"
    kept_o, removed_o, all_o = original_indices(earlier, step.kept, step.removed,
                                                before.removed_original_all if before is not None else [])
    for name, local, want in (("kept_original", step.kept, kept_o), ("removed_original", step.removed, removed_o)):
        if getattr(step, name) and sorted(getattr(step, name)) != sorted(want):
            return (f"'{name}' is {getattr(step, name)}, but the blocks it names ({local}) are {want} of the original "
                    "(as the step before kept them)")
    if before is not None and before.removed_original_all and step.removed_original_all and \
            sorted(step.removed_original_all) != all_o:
        return f"'removed_original_all' is {step.removed_original_all}, not the earlier steps' removals with this one's"
    return None


def index_problem(step: PruningStep, replaced: bool = False) -> str | None:
    """What is wrong with a step's block indices, or None: each list without repeats (the kept ones in
    increasing order: the checkpoint's), within the blocks it counts (``layers_before`` for ``removed`` /
    ``kept``, the original's for the ``*_original`` lists); what a step keeps and removes split its blocks
    (no block in both, none in neither), and ``layers_after`` counts the kept ones. ``replaced``: a
    replacement block stands in for removed ones somewhere in the chain, so only the first checks hold."""
    n_original = step.original.n_layers if step.original else None
    for name, n in (("removed", step.layers_before), ("kept", step.layers_before), ("removed_original", n_original),
                    ("kept_original", n_original), ("removed_original_all", n_original)):
        values = getattr(step, name)
        if len(set(values)) != len(values):
            return f"'{name}' repeats a block ({values})"
        bad = [i for i in values if i < 0 or (n is not None and i >= n)]
        if bad:
            return f"'{name}' holds {bad}, outside the {n if n is not None else 'non-negative'} blocks it counts"
        if name.startswith("kept") and values != sorted(values):  # the checkpoint's order: pruning never reorders
            return f"'{name}' is {values}, not in increasing order (the blocks are stacked in the original's order)"
    chosen = (step.selection or {}).get("removed")  # what the report and the card's method line read
    if chosen is not None and step.removed and (not isinstance(chosen, list) or sorted(map(str, chosen)) != sorted(
            map(str, step.removed))):
        return f"'selection.removed' is {chosen}, but 'removed' is {step.removed}"
    if replaced:
        return None
    for kept, removed, n in (("kept", "removed", step.layers_before),
                             ("kept_original", "removed_original_all", n_original)):
        a, b = set(getattr(step, kept)), set(getattr(step, removed))
        if not a:  # not recorded (0.1.0's files)
            continue
        if a & b:
            return f"'{kept}' and '{removed}' both hold {sorted(a & b)}"
        if n is not None and a | b != set(range(n)):
            return f"'{kept}' and '{removed}' leave out {sorted(set(range(n)) - a - b)} of the {n} blocks they split"
    if step.kept and step.layers_after is not None and step.layers_after != len(step.kept):
        return f"'layers_after' is {step.layers_after} but 'kept' holds {len(step.kept)} blocks"
    return None  # counts against the checkpoint's own config: prune.export.check


def read_record(path: str | Path) -> PruningRecord:
    """Read and validate ``pruning.json`` (any schema version); one-line errors."""
    file = Path(path)
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise PruneError(f"{file} is not UTF-8 text; fix it or move it away") from None
    except json.JSONDecodeError as exc:
        raise PruneError(f"{file} is not valid JSON ({exc}); fix it or move it away") from None
    except RecursionError:
        raise PruneError(f"{file} is nested too deeply to be a pruning record; fix it or move it away") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise PruneError(f"{file} holds a value JSON cannot build ({parse_problem(exc)}); fix it or move it "
                         "away") from None
    return parse_record(data, str(file))


def record_json(record: PruningRecord) -> str:
    """The text of ``pruning.json`` (the only serialisation of a record)."""
    data = record.model_dump(mode="json")
    data["schema_version"] = SCHEMA_VERSION
    return json.dumps(data, indent=1) + "\n"


def write_record(folder: str | Path, record: PruningRecord) -> Path:
    """Write ``record`` as ``folder/pruning.json``; returns the file."""
    file = Path(folder) / RECORD_FILE
    file.write_text(record_json(record))
    return file
