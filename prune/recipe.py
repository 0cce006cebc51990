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

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PruneError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """What to load: Hub id, local folder or ``.gguf`` file, and how (dtype, Accelerate placement)."""

    source: str
    gguf_file: str | None = None
    dtype: str = "auto"
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        from .models import resolve_dtype

        try:
            resolve_dtype(value)
        except PruneError as exc:
            raise ValueError(str(exc)) from None
        return value


class TextConfig(Section):
    """Text from a local ``.txt``/``.jsonl`` file or a ``datasets`` name (see :mod:`prune.data`)."""

    path: str
    field: str | list[str] = "text"
    config: str | None = None
    split: str = "train"
    rows: str | None = None
    bos: bool | None = None  # None: BOS per window when the tokenizer adds BOS

    def source(self):
        from .data import TextSource

        return TextSource(self.path, self.field, self.config, self.split, self.rows)


class CalibrationConfig(TextConfig):
    n_samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=8)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class ScoreConfig(Section):
    metrics: list[Literal["bi", "angular", "cka"]] = ["bi", "angular", "cka"]
    positions: Literal["all", "skip_first"] = "skip_first"  # prune.scoring.DEFAULT_POSITIONS
    cka_windows: int = Field(1, ge=1)
    beta: float = Field(100.0, gt=0)
    tau: float = Field(0.8, gt=0, lt=1)
    execution: Literal["auto", "in_memory", "sequential"] = "auto"


class SelectConfig(Section):
    """Which blocks to remove. ``n_layers`` or ``fraction`` says how many (for ``search``: an
    optional upper bound). Strategies: ``one_shot`` (by ``metric``), ``contiguous`` (angular),
    ``iterative`` (by ``metric``, re-scored after each removal), ``sleb`` (calibration loss),
    ``random``, ``tail``, and ``search``: the largest set keeping a utility floor
    (``max_perplexity_ratio`` on ``heldout_windows`` held-out calibration windows, or
    ``min_task_retained`` of ``proxy_task``'s score with ``proxy_limit`` examples), candidates
    ordered by ``order_by`` (default: ``metric``), at most ``budget`` proxy evaluations."""

    strategy: Literal["one_shot", "contiguous", "iterative", "sleb", "random", "tail", "search"] = "contiguous"
    metric: Literal["bi", "angular", "cka", "msrs"] = "angular"
    n_layers: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, lt=1)
    protect: list[int] = [0, -1]
    seed: int = 0
    # search only
    max_perplexity_ratio: float | None = Field(None, gt=1)
    min_task_retained: float | None = Field(None, gt=0, le=1)
    proxy_task: str | None = None
    proxy_limit: int = Field(100, ge=1)
    budget: int | None = Field(None, ge=1)
    order_by: Literal["msrs", "cka", "angular", "bi"] | None = None
    heldout_windows: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _amount(self):
        search = self.strategy == "search"
        if not search and (self.n_layers is None) == (self.fraction is None):
            raise ValueError("give exactly one of n_layers (how many blocks to remove) or fraction (0 < f < 1)")
        if search and self.n_layers is not None and self.fraction is not None:
            raise ValueError("give at most one of n_layers or fraction (for search: the most blocks it may remove)")
        if len(set(self.protect)) != len(self.protect):
            raise ValueError(f"protect lists a block twice: {self.protect}")
        defaults = {k: f.default for k, f in type(self).model_fields.items() if k in _SEARCH_KEYS}
        given = [k for k in _SEARCH_KEYS if getattr(self, k) != defaults[k]]
        if not search:
            if given:
                raise ValueError(f"{given[0]} is only used by strategy: search (remove it, or set strategy: search)")
            return self
        floors = [k for k in ("max_perplexity_ratio", "min_task_retained") if getattr(self, k) is not None]
        if not floors:
            raise ValueError("strategy search needs a utility floor: set max_perplexity_ratio (e.g. 2.0) or "
                             "min_task_retained (e.g. 0.9) with proxy_task")
        if len(floors) == 2:
            raise ValueError("give one utility floor: max_perplexity_ratio or min_task_retained, not both")
        if self.budget is None:
            raise ValueError(f"a floor ({floors[0]}) without a budget: set budget, the most proxy evaluations the "
                             "search may spend (e.g. 16)")
        if floors[0] == "min_task_retained" and not self.proxy_task:
            raise ValueError("min_task_retained needs proxy_task, the lm-eval task it is measured on (e.g. arc_easy)")
        if floors[0] == "max_perplexity_ratio":
            wrong = [k for k in ("proxy_task", "proxy_limit") if k in given]
            if wrong:
                raise ValueError(f"{wrong[0]} is only used with min_task_retained (the perplexity floor uses heldout_windows)")
        elif "heldout_windows" in given:
            raise ValueError("heldout_windows is only used with max_perplexity_ratio (the task floor uses proxy_limit)")
        return self


_SEARCH_KEYS = ("max_perplexity_ratio", "min_task_retained", "proxy_task", "proxy_limit", "budget", "order_by",
                "heldout_windows")


class PerplexityConfig(TextConfig):
    seq_len: int = Field(512, ge=8)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)


class EvaluateConfig(Section):
    perplexity: PerplexityConfig | None = None
    tasks: list[str] = []
    task_dirs: list[str] = []
    data_dir: str | None = None  # offline task data (default: $PRUNE_DATA_DIR)
    limit: int | float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    num_fewshot: int = Field(0, ge=0)
    seed: int = 0
    original: bool = True  # also evaluate the original model, for the before/after table


class PushConfig(Section):
    """``output.push_to_hub``: push the output folder after the run (see :mod:`prune.hub`)."""

    repo_id: str
    private: bool = True  # applies when the repo is created; an existing repo keeps its visibility
    revision: str | None = None  # branch, created if missing (default main)
    commit_message: str | None = None

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError as exc:
            raise ValueError(f"not a Hub repo id: {str(exc).splitlines()[0]} (use namespace/name)") from None
        return value


class OutputConfig(Section):
    dir: str
    overwrite: bool = False
    push_to_hub: PushConfig | None = None


class HealConfig(Section):
    """Healing after pruning (see :mod:`prune.heal`): one of three methods, trained on ``data``.

    * ``lora``: LoRA adapters (``rank``, ``alpha``, ``target_modules``) on the pruned model,
      causal-LM loss, merged into the weights afterwards (the checkpoint needs no peft);
    * ``replace``: one decoder block takes the place of the removed contiguous run, initialised
      by ``init`` and trained to map the run's input hidden states to its output (``loss``);
    * ``partial``: full fine-tuning of the last ``last_blocks`` blocks (plus the final norm and,
      with ``train_lm_head``, the LM head; a tied LM head is the input embedding matrix, so
      training it changes the input embeddings too and the model stays tied).

    ``data`` is training text that must not be the evaluation text. Each optimizer step sees
    ``batch_size * gradient_accumulation`` windows of ``seq_len`` tokens drawn from
    ``n_samples`` windows (reused over epochs); ``val_samples`` more windows are held out for
    the before/after loss. Learning rate: linear warmup over 5% of the steps, then cosine to 0
    (``schedule: cosine``) or flat (``constant``).
    """

    method: Literal["lora", "replace", "partial"]
    data: TextConfig | None = None  # required in a recipe (checked in prune.recipe.check_heal)
    n_samples: int = Field(256, ge=1)
    val_samples: int = Field(8, ge=0)
    seq_len: int = Field(256, ge=8)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # lora
    rank: int = 8
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] | str = "all-linear"
    # partial fine-tuning
    last_blocks: int = Field(2, ge=0)
    train_norm: bool = True
    train_lm_head: bool = False
    # replacement layer
    # last_removed: the healing benchmark's best start (docs/BENCHMARKS.md, "Healing")
    init: Literal["first_removed", "last_removed", "mean_removed"] = "last_removed"
    loss: Literal["mse", "mse+cos"] = "mse"

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("the LoRA rank must be at least 1")
        return value

    @model_validator(mode="after")
    def _trainable(self):
        if self.method == "partial" and self.last_blocks == 0 and not self.train_norm and not self.train_lm_head:
            raise ValueError("partial fine-tuning with last_blocks=0, train_norm=false and train_lm_head=false "
                             "trains no parameters (set last_blocks >= 1)")
        if self.method == "lora" and not self.target_modules:
            raise ValueError("LoRA with an empty target_modules trains no parameters (use all-linear or name modules)")
        return self


class Recipe(Section):
    model: ModelConfig
    calibration: CalibrationConfig
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig
    evaluate: EvaluateConfig | None = None
    heal: HealConfig | None = None
    output: OutputConfig

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading -------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a nested structure."""
    if isinstance(value, str):
        def sub(match):
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise PruneError(f"recipe uses ${{{name}}} but it is not set (export {name}=... or write ${{{name}:-default}})")
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw recipe dict."""
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PruneError(f"--set {item!r} is not key=value (e.g. --set select.n_layers=8)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise PruneError(f"--set {key}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def _model_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the location ``loc`` (for listing its valid keys)."""
    model: Any = Recipe
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return model if isinstance(model, type) and issubclass(model, BaseModel) else None
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line: the key, what is wrong, and the fix."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "list", "dict", "function-after"))))
    key = ".".join(loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        owner = _model_for(loc[:-1])
        valid = ", ".join(owner.model_fields) if owner else "see the docs"
        return f"{where}: unknown key '{key}' (valid keys here: {valid}){more}"
    if err["type"] == "missing":
        return f"{where}: missing required key '{key}' (add it to the recipe or pass --set {key}=...){more}"
    message = err["msg"].removeprefix("Value error, ")
    shown = f"'{key}'" if key else "recipe"
    return f"{where}: {shown}: {message} (got {err.get('input')!r}){more}"


def load_recipe(path: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and check a recipe; raises :class:`PruneError` with one line."""
    if isinstance(path, dict):
        data, where = dict(path), "recipe"
    else:
        file = Path(path).expanduser()
        where = str(file)
        if not file.is_file():
            raise PruneError(f"recipe not found: {file} (check the path; examples are in recipes/)")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise PruneError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise PruneError(f"{where}: a recipe is a mapping of sections (model, calibration, select, ...)")
    data = apply_overrides(expand_env(data), overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise PruneError(format_validation_error(exc, where)) from None
    check_files(recipe, where)
    check_heal(recipe, where)
    return recipe


def _check_text_path(cfg: TextConfig | None, key: str, where: str) -> None:
    if cfg is None:
        return
    path = Path(cfg.path).expanduser()
    local = path.suffix in (".txt", ".raw", ".jsonl", ".json") or cfg.path.startswith((".", "/", "~"))
    if local and not path.is_file():
        raise PruneError(f"{where}: '{key}.path' file not found: {cfg.path} (check the path or set PRUNE_DATA_DIR)")


def check_files(recipe: Recipe, where: str = "recipe") -> None:
    """Missing local files fail here, before anything is loaded."""
    from .models import resolve_source

    try:
        resolve_source(recipe.model.source, recipe.model.gguf_file, recipe.model.revision)
    except PruneError as exc:
        raise PruneError(f"{where}: 'model.source': {exc}") from None
    _check_text_path(recipe.calibration, "calibration", where)
    if recipe.evaluate is not None:
        _check_text_path(recipe.evaluate.perplexity, "evaluate.perplexity", where)
        for d in recipe.evaluate.task_dirs:
            if not Path(d).expanduser().is_dir():
                raise PruneError(f"{where}: 'evaluate.task_dirs' folder not found: {d}")
        if recipe.evaluate.data_dir and not Path(recipe.evaluate.data_dir).expanduser().is_dir():
            raise PruneError(f"{where}: 'evaluate.data_dir' folder not found: {recipe.evaluate.data_dir}")
    if recipe.heal is not None and recipe.heal.data is not None:
        _check_text_path(recipe.heal.data, "heal.data", where)


# ---- heal: checks across sections (prune.heal) ----------------------------------------------
#: strategies whose removed blocks always form one contiguous run (what ``replace`` needs)
CONTIGUOUS_STRATEGIES = ("contiguous", "tail")


def _rows_overlap(a: str | None, b: str | None) -> bool:
    """Whether two ``rows`` slices ``"start:stop"`` (None: all rows) share a row."""
    def bounds(rows):
        if rows is None:
            return 0, float("inf")
        start, _, stop = rows.partition(":")
        return int(start or 0), (int(stop) if stop.strip() else float("inf"))

    try:
        (a0, a1), (b0, b1) = bounds(a), bounds(b)
    except ValueError:
        return True  # an unreadable slice is reported elsewhere; assume the worst here
    return max(a0, b0) < min(a1, b1)


def check_heal_data(heal: HealConfig, evaluate: EvaluateConfig | None, where: str = "recipe") -> None:
    """Training text given, and not the perplexity text (same file or dataset, config, split and
    field, and overlapping rows)."""
    if heal.data is None:
        raise PruneError(f"{where}: 'heal.data' is missing: give training text that is not the evaluation text "
                         "(e.g. heal.data.path: ../shared/data/c4/c4_web_1480.jsonl with field [prefix, gold_completion])")
    ppl = evaluate.perplexity if evaluate else None
    if ppl is not None and Path(heal.data.path).expanduser().resolve() == Path(ppl.path).expanduser().resolve() \
            and heal.data.field == ppl.field and heal.data.config == ppl.config and heal.data.split == ppl.split \
            and _rows_overlap(heal.data.rows, ppl.rows):
        raise PruneError(f"{where}: 'heal.data' overlaps the perplexity text ({ppl.path} rows {ppl.rows or 'all'}): "
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
        if sel.strategy not in CONTIGUOUS_STRATEGIES:
            raise PruneError(f"{where}: 'heal.method' replace needs the removed blocks to be one contiguous run, but "
                             f"select.strategy {sel.strategy!r} can remove scattered blocks "
                             f"(use select.strategy contiguous or tail, or heal.method lora/partial)")
