"""Recipes: YAML validated by a pydantic schema whose keys map one to one onto :func:`prune.run`.

A recipe has the sections ``model``, ``calibration``, ``score``, ``select``, ``evaluate``,
``heal`` and ``output``. Unknown keys, wrong types, impossible values and missing files
fail in :func:`load_recipe` with one line naming the key and the fix, before any model
is loaded. String values may use ``${VAR}`` or ``${VAR:-default}`` (environment
variables); relative paths are relative to the working directory.

``overrides`` are ``dotted.key=value`` strings (the CLI's ``--set``); the value is parsed
as YAML (``select.n_layers=8``, ``evaluate.tasks=[arc_easy,piqa]``, ``model.device_map=null``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import PrivateAttr, ValidationError

from prune.choose.registry import STRATEGIES
from prune.measure.scoring import short_cka_group
from prune.core.errors import PruneError, spelled
from prune.core.yamlsafe import load_yaml, read_yaml
from prune.core.config import (
    CalibrationConfig,
    EvaluateConfig,
    HealConfig,
    ModelConfig,
    OutputConfig,
    ScoreConfig,
    Section,
    SelectConfig,
    TextConfig,
    format_validation_error,
    validation_error_key,
)


class Recipe(Section):
    model: ModelConfig
    calibration: CalibrationConfig
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig
    evaluate: EvaluateConfig | None = None
    heal: HealConfig | None = None
    output: OutputConfig
    #: ``{dotted key: VAR}`` of the values that took a ``${VAR:-default}``'s default (set by :func:`load_recipe`):
    #: a failure on such a value names the variable to set
    _defaults: dict[str, str] = PrivateAttr(default_factory=dict)

    def default_of(self, key: str) -> str:
        """``"; that is ${VAR}'s default ..."`` when ``key`` took a variable's default, else ``""``."""
        var = self._defaults.get(key)
        return f"; that is ${{{var}}}'s default, as {var} is unset or empty (export {var}=...)" if var else ""

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading -------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


#: the one variable a recipe read from an input folder (a run's recipe.yaml) may use: what prune writes there
INPUT_RECIPE_VARIABLES = ("PRUNE_DATA_DIR",)


def expand_env(value: Any, only: tuple[str, ...] | None = None, where: str = "recipe",
               defaults: dict[str, str] | None = None, key: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a nested structure, as a shell does:
    the default stands in for a variable that is unset or empty. ``only``: the variables ``where`` may read
    (a recipe of an input folder, which could otherwise copy a secret of the environment into a published file);
    ``defaults`` collects ``{dotted key: VAR}`` for each value that took a variable's default (a list's items
    under the list's key)."""
    if isinstance(value, str):
        def sub(match):
            name, default = match.group(1), match.group(2)
            if only is not None and name not in only:
                raise PruneError(f"{where} uses ${{{name}}}: a recipe read from an input folder may only use "
                                 f"{', '.join('${' + v + '}' for v in only)} (write the value into it, or give --config)")
            if default is not None and not os.environ.get(name):
                if defaults is not None:
                    defaults.setdefault(key, name)
                return default
            if name in os.environ:
                return os.environ[name]
            raise PruneError(f"{where} uses ${{{name}}} but it is not set (export {name}=... or write ${{{name}:-default}})")
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, only, where, defaults, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, only, where, defaults, key) for v in value]
    return value


def saved_recipe(data: dict, where: str) -> Recipe:
    """A recipe a run folder saved (``recipe.yaml``, a full dump, perhaps of an older version) read back: only
    ``${PRUNE_DATA_DIR}`` is expanded (:data:`INPUT_RECIPE_VARIABLES`; the folder may come from anyone), once,
    and the checks of settings nothing reads are skipped (``prune heal`` cannot change them)."""
    if "${PRUNE_DATA_DIR}" in json.dumps(data) and not os.environ.get("PRUNE_DATA_DIR"):
        raise PruneError(f"{where} records its data paths under ${{PRUNE_DATA_DIR}} (the run had it set), which is not "
                         "set here: export PRUNE_DATA_DIR=... (the data folder, e.g. ../shared/data), as for the run")
    return Recipe.model_validate(expand_env(data, INPUT_RECIPE_VARIABLES, where), context={"saved": True})


def check_no_token(value: Any, where: str, key: str = "") -> None:
    """Refuse a recipe value that holds an access token (written in, or from ``${VAR}`` or ``--set``):
    the recipe is saved beside the model (recipe.yaml, pruning.json, the card) and pushed with it."""
    from prune.core.secrets import looks_like_token

    if isinstance(value, dict):
        for k, v in value.items():
            check_no_token(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for v in value:
            check_no_token(v, where, key)
    elif isinstance(value, str) and looks_like_token(value):
        raise PruneError(f"{where}: '{key}' holds an access token; a recipe is saved and published with the model, so "
                         "tokens never go in it (the Hub token is read from HF_TOKEN or hf auth login)")


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], example: str = "select.n_layers=8") -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw recipe dict. One key given two values
    is refused (which one was meant?); the same value twice is one. ``example``: a key=value of the
    settings overridden, for the message that refuses an item without '='."""
    given: dict[str, str] = {}  # key -> the value it was first given
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PruneError(spelled(f"--set {item!r} is not key=value (e.g. --set {example})",
                                     f"override {item!r} is not key=value (e.g. '{example}')"))
        if (first := given.setdefault(key.strip(), raw.strip())) != raw.strip():
            twice = f"is given twice ({first!r}, then {raw.strip()!r}): give it once"
            raise PruneError(spelled(f"--set {key.strip()} {twice}", f"override {key.strip()!r} {twice}"))
        try:
            value = load_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
        except PruneError as exc:
            if ": not valid YAML" not in str(exc):
                raise  # aliases, nesting, duplicates: refused as in a recipe
            value = raw  # not YAML: the plain string
        if "#" in raw and not raw.lstrip().startswith(("'", '"')) and value != raw.strip():
            raise PruneError(f"--set {key.strip()}: YAML reads ' #' as the start of a comment, so {raw!r} would become "
                             f"{value!r}; quote the value (--set '{key.strip()}=\"{raw.strip()}\"')")
        node = data
        parts = key.strip().split(".")
        if any("[" in part or part.isdigit() for part in parts):  # protect[0]=1, evaluate.tasks.0=copa
            raise PruneError(f"--set {key.strip()}: a list is set whole, not item by item (e.g. --set 'select.protect=[0, -1]')")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise PruneError(f"--set {key}: {part!r} is not a section")
            node = node[part]
        old = node.get(parts[-1])
        if isinstance(old, dict) and isinstance(value, dict) and (dropped := [k for k in old if k not in value]):
            from prune.core.console import say  # YAML's meaning, kept: a mapping replaces the section whole

            k, one = key.strip(), f"{key.strip()}.{next(iter(value), 'KEY')}=VALUE"
            say(f"note: {spelled(f'--set {k}', f'override {k!r}')}={{...}} replaces the whole section: "
                f"{', '.join(map(str, dropped))} go back to their defaults (to change one key: "
                f"{spelled(f'--set {one}', repr(one))})")
        node[parts[-1]] = value
    return data


def blamed(exc: ValidationError, where: str, overrides) -> str:
    """Where a refused value came from: the ``--set`` that gave the key (or a section above it); for a rule of a
    section a ``--set`` changed a key of (an unknown section, n_layers and fraction both given) ``where`` with
    that ``--set``; else ``where``."""
    key = validation_error_key(exc)
    inside = []
    for item in reversed(list(overrides or ())):
        given = item.partition("=")[0].strip()
        if key == given or key.startswith(given + "."):
            return set_words([item])
        if given.startswith(key + ".") or not key:
            inside.append(item)
    return f"{where} with {set_words(inside[::-1])}" if inside else where


def set_words(overrides) -> str:
    """``--set a=1, --set b=2`` (from Python: ``override 'a=1', override 'b=2'``)."""
    return ", ".join(spelled(f"--set {item.strip()}", f"override {item.strip()!r}") for item in overrides)


def load_recipe(path: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and check a recipe; raises :class:`PruneError` with one line."""
    if isinstance(path, dict):
        data, where = dict(path), "recipe"
    else:
        file = Path(path).expanduser()
        where = str(file)
        if file.is_dir():
            raise PruneError(f"{file} is a folder, not a recipe: give a recipe's YAML file (examples are in recipes/)")
        if not file.is_file():
            raise PruneError(f"recipe not found: {file} (check the path; examples are in recipes/)")
        data = read_yaml(file, where)
        if data is None and not overrides:  # it said "missing required key 'model' ... (and 3 more)"
            raise PruneError(f"{where} holds no settings: a recipe is a mapping of sections (model, calibration, select, "
                             "output, ...); examples are in recipes/")
        data = data or {}
        if not isinstance(data, dict):
            raise PruneError(f"{where}: a recipe is a mapping of sections (model, calibration, select, ...)")
    # the overrides first, then ${VAR} everywhere: a --set value may use ${VAR} as the file's values do, and a
    # --set replaces a value whose variable is unset here (expanding first refused it)
    for item in overrides or ():  # a --set's own ${VAR} problem names that --set (expanded once, with the rest, below)
        key, _, raw = item.partition("=")
        expand_env(raw, where=f"--set {key.strip()}")
    defaults: dict[str, str] = {}
    data = expand_env(apply_overrides(copy.deepcopy(data), overrides), where=where, defaults=defaults)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise PruneError(format_validation_error(exc, blamed(exc, where, overrides), Recipe)) from None
    recipe._defaults = defaults
    try:
        check_recipe(recipe, where)
    except PruneError as exc:  # a missing file or folder named by a variable's default: name the variable to set
        said = str(exc).removeprefix(f"{where}: ")
        unset = [key for key in defaults if said.startswith(f"'{key}'")]
        if unset and "not found" in said:
            raise PruneError(f"{exc}{recipe.default_of(unset[0])}") from None
        if overrides and str(exc).startswith(f"{where}: "):  # a rule across keys: the file as the --set changed it
            raise PruneError(f"{where} with {set_words(overrides)}: {said}") from None
        raise
    return recipe


def check_recipe(recipe: Recipe, where: str = "recipe") -> None:
    """The checks across sections and files that a valid ``Recipe`` may still fail (a recipe built
    in Python passes them in :func:`prune.pipeline.orchestrator.preflight`)."""
    check_no_token(recipe.model_dump(mode="json"), where)
    check_files(recipe, where)
    check_select(recipe, where)
    check_heal(recipe, where)
    check_placement(recipe, where)
    check_task_settings(recipe, where)


def check_task_settings(recipe: Recipe, where: str = "recipe") -> None:
    """``evaluate.task_dirs`` / ``data_dir`` / ``batch_size`` are read by lm-eval's tasks and by search's proxy
    task: with neither they have no effect (the other lm-eval keys: :class:`EvaluateConfig`)."""
    from prune.core.config import PROXY_TASK_KEYS, changed

    ev, sel = recipe.evaluate, recipe.select
    if ev is None or ev.tasks or (sel.strategy == "search" and sel.proxy_task):
        return
    unread = changed(ev, PROXY_TASK_KEYS)
    if unread:
        raise PruneError(f"{where}: evaluate.{unread[0]} is read by lm-eval tasks (evaluate.tasks) and search's "
                         "select.proxy_task, and there are none: add them, or drop it")


def check_placement(recipe: Recipe, where: str = "recipe") -> None:
    """``model.max_memory`` caps Accelerate's placement (``model.device_map``) and the execution plan;
    with ``score.execution: in_memory`` and no device map nothing reads it (the whole model loaded anyway)."""
    m = recipe.model
    if m.offload_folder and m.device_map is None:
        raise PruneError(f"{where}: model.offload_folder holds what Accelerate's placement (model.device_map) puts on "
                         "disk; without a device_map nothing goes there (set model.device_map, or drop "
                         "model.offload_folder)")
    if m.max_memory and m.device_map is None and recipe.score.execution == "in_memory":
        raise PruneError(f"{where}: model.max_memory is read by Accelerate's placement (model.device_map) and by "
                         "score.execution auto / sequential; with score.execution: in_memory and no device_map nothing "
                         "would cap the load (set model.device_map: auto, or drop model.max_memory)")


#: the score a per-block selection metric is read from (BI is always computed)
METRIC_SCORE = {"angular": "angular", "cka": "cka", "msrs": "cka"}


def needed_score(strategy: str, metric: str, order_by: str | None = None) -> tuple[str | None, str]:
    """``(score, setting)``: the score (``score.metrics`` entry) a selection reads beyond BI, and the
    setting that makes it read it (None: BI alone, or a strategy that needs none)."""
    if strategy == "contiguous":
        return "angular", "select.strategy contiguous"
    if strategy in ("one_shot", "iterative"):
        return METRIC_SCORE.get(metric), f"select.metric {metric}"
    if strategy == "search":
        return METRIC_SCORE.get(order_by or metric), f"select.{'order_by' if order_by else 'metric'} {order_by or metric}"
    return None, ""


def check_select(recipe: Recipe, where: str = "recipe") -> None:
    """A selection that reads a score the ``score`` section does not compute: refused now, not after scoring."""
    sel = recipe.select
    if sel.strategy == "verified" and (missing := [m for m in ("angular", "cka") if m not in recipe.score.metrics]):
        raise PruneError(f"{where}: select.strategy verified builds its candidates from the angular and cka scores too "
                         "(contiguous runs, one-shot angular / CKA / MSRS sets, the CKA families), but score.metrics is "
                         f"{recipe.score.metrics} (add {', '.join(missing)})")
    score, n = recipe.score, recipe.calibration.n_samples
    if "cka" in score.metrics and n % score.cka_windows:  # checked again by prune.score, once the model is loaded
        raise PruneError(f"{where}: {short_cka_group(score.cka_windows, n, 'calibration.n_samples', 'score.cka_windows')}")
    need, why = needed_score(sel.strategy, sel.metric, sel.order_by)
    if need is not None and need not in recipe.score.metrics:
        raise PruneError(f"{where}: {why} reads the {need} scores, but score.metrics is {recipe.score.metrics} "
                         f"(add {need} to score.metrics)")


def check_text_path(cfg: TextConfig | None, key: str, where: str, fix: str | None = None) -> None:
    """A local text file named by ``cfg`` exists (a Hub dataset name, or a folder ``datasets`` reads, is not
    checked here). A path a
    run folder recorded by name only (``<local>/name``, see :mod:`prune.export.public`) is named as
    such, with ``fix`` (default: ``--set <key>.path=PATH``)."""
    from prune.export.public import REDACTED

    if cfg is None:
        return
    if cfg.path.startswith(REDACTED + "/"):
        raise PruneError(f"{where} records '{key}.path' by file name only ({cfg.path}: a path outside $PRUNE_DATA_DIR "
                         f"and the working folder is not written to a run folder); "
                         f"{fix or f'give the file with --set {key}.path=PATH'}")
    path = Path(cfg.path).expanduser()
    from prune.io.text import TEXT_SUFFIXES

    local = path.suffix in TEXT_SUFFIXES or cfg.path.startswith((".", "/", "~"))
    if local and not path.is_file() and not (path.is_dir() and path.suffix not in TEXT_SUFFIXES):
        raise PruneError(f"{where}: '{key}.path' {cfg.path} is not a regular file (a device, a pipe: give a text file)"
                         if path.exists() else
                         f"{where}: '{key}.path' file not found: {cfg.path} (check the path or set PRUNE_DATA_DIR)")
    from prune.core.config import changed

    unread = changed(cfg, ("config", "split"))  # the datasets configuration and split: a file has neither
    if local and path.is_file() and unread:  # a datasets configuration / split: a file has neither
        raise PruneError(f"{where}: '{key}.{unread[0]}' selects part of a datasets dataset, but {cfg.path} is a local "
                         f"file, read whole (drop it; 'rows' takes a slice of the file)")


def check_files(recipe: Recipe, where: str = "recipe") -> None:
    """Missing local files fail here, before anything is loaded."""
    from prune.io.source import resolve_source

    try:
        resolve_source(recipe.model.source, recipe.model.gguf_file, recipe.model.revision)
    except PruneError as exc:
        raise PruneError(f"{where}: 'model.source': {exc}") from None
    check_text_path(recipe.calibration, "calibration", where)
    if recipe.evaluate is not None:
        check_text_path(recipe.evaluate.perplexity, "evaluate.perplexity", where)
        if recipe.evaluate.fidelity is not None and recipe.evaluate.fidelity.path is not None:
            check_text_path(recipe.evaluate.fidelity, "evaluate.fidelity", where)
        for d in recipe.evaluate.task_dirs:
            if not Path(d).expanduser().is_dir():
                raise PruneError(f"{where}: 'evaluate.task_dirs' folder not found: {d}")
        if recipe.evaluate.data_dir and not Path(recipe.evaluate.data_dir).expanduser().is_dir():
            raise PruneError(f"{where}: 'evaluate.data_dir' folder not found: {recipe.evaluate.data_dir}")
    if recipe.heal is not None and recipe.heal.data is not None:
        check_text_path(recipe.heal.data, "heal.data", where)


# ---- heal: checks across sections (prune.heal) ----------------------------------------------

def _rows_overlap(a: str | None, b: str | None, n: int | None = None) -> bool:
    """Whether two ``rows`` slices ``"start:stop"`` (None: all rows) of ``n`` rows share a row; a
    negative bound counts from the end (without ``n``: assumed to overlap)."""
    def bounds(rows):
        start, _, stop = (rows or ":").partition(":")
        lo, hi = int(start) if start.strip() else None, int(stop) if stop.strip() else None
        if n is not None:
            return slice(lo, hi).indices(n)[:2]
        if (lo or 0) < 0 or (hi or 0) < 0:
            raise ValueError("counted from the end")
        return lo or 0, float("inf") if hi is None else hi

    try:
        (a0, a1), (b0, b1) = bounds(a), bounds(b)
    except ValueError:
        return True  # rows counted from an end not known here: assume the worst
    return max(a0, b0) < min(a1, b1)


def _same_text(a: TextConfig, b: TextConfig) -> bool:
    """One file or dataset whose rows share text as read: the same config and split, and a field in common (rows
    read as ``prefix`` + ``gold_completion`` hold the ``prefix`` text); a plain-text file has no field, config
    or split."""
    if Path(a.path).expanduser().resolve() != Path(b.path).expanduser().resolve():
        return False
    if Path(a.path).suffix in (".txt", ".raw"):
        return True
    fields = lambda f: {f} if isinstance(f, str) else set(f)  # noqa: E731
    return bool(fields(a.field) & fields(b.field)) and a.config == b.config and a.split == b.split


def check_heal_data(heal: HealConfig, evaluate: EvaluateConfig | None, where: str = "recipe",
                    how: str = "heal.data.path: ../shared/data/c4/c4_web_1480.jsonl with field [prefix, gold_completion]") -> None:
    """Training text given, and not the evaluation text: the perplexity text or the fidelity's own
    (the same file or dataset read the same way, with rows in common). ``how``: how to give it, as the
    caller takes it (a recipe key, or ``prune heal``'s flags)."""
    from prune.io.text import row_count

    if heal.data is None:
        raise PruneError(f"{where}: 'heal.data' is missing: give training text that is not the evaluation text "
                         f"(e.g. {how})")
    texts = [("perplexity", evaluate.perplexity if evaluate else None)]
    if evaluate is not None and evaluate.fidelity is not None and evaluate.fidelity.path is not None:
        texts.append(("fidelity", evaluate.fidelity.text(evaluate.perplexity)[0]))
    for name, text in texts:
        if text is None or not _same_text(heal.data, text):
            continue
        negative = any(r and "-" in r for r in (heal.data.rows, text.rows))
        if _rows_overlap(heal.data.rows, text.rows, row_count(text.source()) if negative else None):
            raise PruneError(f"{where}: 'heal.data' overlaps the {name} text ({text.path} rows {text.rows or 'all'}): "
                             "healing on evaluation text inflates the result (use other text or disjoint heal.data.rows)")


def check_heal(recipe: Recipe, where: str = "recipe") -> None:
    """Heal settings that depend on other sections: training text given and disjoint from the
    perplexity text, and a replacement layer only for a removal that is one contiguous run."""
    heal = recipe.heal
    if heal is None:
        return
    check_heal_data(heal, recipe.evaluate, where)
    if heal.method == "replace":
        sel = recipe.select
        if sel.n_layers == 1:
            raise PruneError(f"{where}: 'heal.method' replace with select.n_layers=1 would swap one block for one "
                             "block (remove at least 2, or use heal.method lora/partial)")
        if not STRATEGIES[sel.strategy].contiguous:
            raise PruneError(f"{where}: 'heal.method' replace needs the removed blocks to be one contiguous run, but "
                             f"select.strategy {sel.strategy!r} can remove scattered blocks "
                             f"(use select.strategy {' or '.join(n for n, s in STRATEGIES.items() if s.contiguous)}, or "
                             "heal.method lora/partial)")
