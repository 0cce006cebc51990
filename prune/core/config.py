"""Config sections of a recipe (pydantic), each the settings of one stage; defaults live here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from prune.core.errors import PruneError


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"auto"`` (the checkpoint's own dtype) or a torch dtype from a name like ``"bfloat16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return "auto"
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise PruneError(f"unknown dtype {dtype!r} (use one of: auto, {', '.join(sorted(set(DTYPES)))})") from None


def default(section: type[BaseModel], name: str) -> Any:
    """The default of ``section.name``: config sections are the one place defaults live."""
    return section.model_fields[name].get_default(call_default_factory=True)


def describe(section: type[BaseModel], name: str) -> str:
    """``section.name``'s description with its default, for ``--help``."""
    value = default(section, name)
    if value is None:  # nothing is set: the description says what happens then
        return section.model_fields[name].description
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f"{section.model_fields[name].description} (default {shown})"


@dataclass(frozen=True)
class TextSource:
    """Where text comes from. ``path`` is a local file or a ``datasets`` name."""

    path: str
    field: str | list[str] = "text"
    config: str | None = None
    split: str = "train"
    rows: str | None = None  # "start:stop" slice of documents

    def describe(self) -> dict:
        return {"path": self.path, "field": self.field, "config": self.config, "split": self.split, "rows": self.rows}


#: seeds are passed to torch, numpy (lm-eval) and random: numpy's bound is the tightest
SEED_MAX = 2**32 - 1


def _types(annotation) -> set:
    """Every type an annotation names (``int | list[float] | None`` -> {int, list, float, NoneType})."""
    out = {annotation}
    for arg in getattr(annotation, "__args__", ()) or ():
        out |= _types(arg)
    return out


def _has(value, kind) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has(v, kind) for v in value)
    if isinstance(value, dict):
        return any(_has(v, kind) for v in value.values())
    return kind(value)


class Section(BaseModel):
    """A recipe section: unknown keys refused; ``true``/``false`` never taken as a number
    (``n_layers: true`` is not 1); NaN and infinity never taken as a setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        field = cls.model_fields.get(info.field_name)
        if field is not None:
            types = _types(field.annotation)
            nested = any(isinstance(t, type) and issubclass(t, BaseModel) for t in types)  # checks itself
            if not nested and bool not in types and Any not in types and _has(value, lambda v: isinstance(v, bool)):
                what = "a number" if types & {int, float} else "text"
                raise ValueError(f"expects {what}, not true/false")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value):
        if _has(value, lambda v: isinstance(v, float) and not math.isfinite(v)):
            raise ValueError("must be a finite number (not nan or inf)")
        return value

    @classmethod
    def check_value(cls, name: str, value) -> None:
        """Check one setting as a recipe's section checks it (the Python API's arguments, which no recipe
        reads): raise :class:`PruneError` ``"NAME=VALUE: what is wrong (its description)"``."""
        try:
            cls.__pydantic_validator__.validate_assignment(cls.model_construct(), name, value, strict=True)
        except ValidationError as err:
            problem = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise PruneError(f"{name}={value!r}: {problem[:1].lower()}{problem[1:]} "
                             f"({cls.model_fields[name].description})") from None


class ModelConfig(Section):
    """What to load: Hub id, local folder or ``.gguf`` file, and how (dtype, Accelerate placement)."""

    source: str
    gguf_file: str | None = None
    dtype: str = Field("auto", description="model dtype: auto (the checkpoint's), float32, bfloat16, float16")
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    base_model: str | None = None  # the Hub parent of a local (file/folder) source, for the model card

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        try:
            resolve_dtype(value)
        except PruneError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str | None) -> str | None:
        return None if value is None else _hub_repo_id(value)

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, value: dict | None) -> dict | None:
        """Accelerate's form: devices (``cpu``, ``disk``, ``mps``, a GPU index; ``"0"`` and ``"cuda:0"`` are
        read as the index 0, which is what Accelerate takes) to sizes (bytes or ``'20GiB'``); a misspelt
        device was read as no cap at all."""
        from accelerate.utils import convert_file_size_to_int

        if value is None:
            return None
        out: dict = {}
        for key, size in value.items():
            match = re.fullmatch(r"(?:cuda:)?(\d+)", key) if isinstance(key, str) else None
            if match:
                key = int(match.group(1))
            if not (isinstance(key, int) and key >= 0 or key in ("cpu", "disk", "mps")):
                raise ValueError(f"key {key!r} is not a device (cpu, disk, mps, or a GPU index such as 0)")
            try:
                if convert_file_size_to_int(size) < 0:
                    raise ValueError
            except (ValueError, TypeError):
                raise ValueError(f"max_memory[{key!r}]={size!r} is not a size (bytes, or e.g. '20GiB')") from None
            out[key] = size
        return out


def saved(info: ValidationInfo | None) -> bool:
    """Whether a recipe a run folder saved is being read back (``context={"saved": True}``): the checks of
    settings nothing reads hold for what a user writes, not for an older version's saved recipe, which
    ``prune heal`` cannot change."""
    return bool(info is not None and info.context and info.context.get("saved"))


def changed(section: BaseModel, keys, info: ValidationInfo | None = None) -> list[str]:
    """The ``keys`` of ``section`` set away from their default, in order: what a "nothing reads it" check
    refuses; ``[]`` for a saved recipe read back (:func:`saved`)."""
    if saved(info):
        return []
    fields = type(section).model_fields
    return [k for k in keys if getattr(section, k) != fields[k].default]


def check_rows(rows: str | None) -> str | None:
    """``rows`` is ``"start:stop"`` with whole numbers (either may be empty, negative counts from the end)."""
    if rows is None:
        return rows
    if not isinstance(rows, str):  # YAML 1.1 reads an unquoted 1:30 as 90 (base 60) and 300: as {300: None}
        raise ValueError(f"rows must be a quoted slice such as '0:2000' (YAML read the unquoted value as {rows!r}); "
                         "quote it: rows: '0:2000' in a recipe, the value inside the quotes of a --set "
                         "(--set \"SECTION.rows='0:2000'\")")
    parts = rows.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        for p in parts:
            if p.strip():
                int(p)  # what the slice is read with (prune.io.text)
    except ValueError:
        raise ValueError(f"rows={rows!r} is not a 'start:stop' slice of whole numbers (e.g. '0:2000' or '2000:')") from None
    return rows


def check_fields(field: str | list[str]) -> str | list[str]:
    """A field name, or a non-empty list of them."""
    if isinstance(field, list) and not field:
        raise ValueError("field is an empty list: name at least one field")
    return field


class TextConfig(Section):
    """Text from a local ``.txt``/``.jsonl`` file or a ``datasets`` name (see :mod:`prune.io.text`)."""

    path: str
    field: str | list[str] = "text"
    config: str | None = None
    split: str = "train"
    rows: str | None = None
    bos: bool | None = None  # None: BOS per window when the tokenizer adds BOS

    _rows = field_validator("rows", mode="before")(lambda v: check_rows(v))
    _field = field_validator("field")(lambda v: check_fields(v))

    def source(self):
        return TextSource(self.path, self.field, self.config, self.split, self.rows)


class CalibrationConfig(TextConfig):
    n_samples: int = Field(64, ge=1, description="number of calibration windows")
    seq_len: int = Field(256, ge=8, description="tokens per window")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for drawing the windows")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")


class ScoreConfig(Section):
    """How blocks are scored. These are the defaults of :func:`prune.score`, :func:`prune.score_sequential`
    and the CLI's flags too (read with :func:`default`)."""

    metrics: list[Literal["bi", "angular", "cka"]] = Field(["bi", "angular", "cka"], min_length=1,
                                                           description="metrics to compute")
    # skip_first: the quality benchmark's evidence (docs/BENCHMARKS.md); the attention-sink token dominates CKA
    positions: Literal["all", "skip_first"] = Field(
        "skip_first", description="token positions that count: skip_first (leave out each window's first token, "
                                  "whose attention-sink activations dominate CKA) or all")
    cka_windows: int = Field(1, ge=1, description="windows pooled into one CKA batch")
    beta: float = Field(100.0, gt=0, description="MSRS steepness beta")
    tau: float = Field(0.8, gt=0, lt=1, description="MSRS similarity threshold tau")
    execution: Literal["auto", "in_memory", "sequential"] = Field(
        "auto", description="auto (from the model size and free memory), in_memory, or sequential (one block at a "
                            "time from the safetensors shards, for models larger than memory)")

    @model_validator(mode="after")
    def _cka_settings_need_cka(self, info: ValidationInfo):
        """``cka_windows``, ``beta`` and ``tau`` shape the CKA matrix and MSRS: without ``cka`` in ``metrics``
        nothing reads them."""
        unread = changed(self, ("cka_windows", "beta", "tau"), info) if "cka" not in self.metrics else []
        if unread:
            raise ValueError(f"{', '.join(unread)} shape the CKA matrix and MSRS, but metrics has no cka: add cka to "
                             "metrics, or drop them")
        return self


#: the strategies that read ``select.metric`` (search: through ``order_by``'s default) and ``select.seed``
METRIC_STRATEGIES = ("one_shot", "iterative", "search")
SEED_STRATEGIES = ("random", "search")
#: strategies that rank by one metric of their own: ``metric`` naming it is what they read, any other is refused
OWN_METRIC = {"contiguous": "angular"}


def metric_is_read(strategy: str, metric: str, readers: tuple[str, ...] = METRIC_STRATEGIES) -> bool:
    """Whether ``strategy`` reads ``metric``: one of ``readers``, or a strategy whose own metric it names."""
    return strategy in readers or OWN_METRIC.get(strategy) == metric

#: the strategy names of prune.choose.registry, which fills this in when it is imported (the core
#: layer cannot import it); recipe validation reads the registry through it
KNOWN_STRATEGIES: list[str] = []


class SelectConfig(Section):
    """Which blocks to remove. ``n_layers`` or ``fraction`` says how many (for ``search``: an
    optional upper bound). Strategies: ``one_shot`` (by ``metric``), ``contiguous`` (angular),
    ``iterative`` (by ``metric``, re-scored after each removal), ``sleb`` (calibration loss),
    ``random``, ``tail``, and ``search``: the largest set keeping a utility floor
    (``max_perplexity_ratio`` on ``heldout_windows`` held-out calibration windows, or
    ``min_task_retained`` of ``proxy_task``'s score with ``proxy_limit`` examples), candidates
    ordered by ``order_by`` (default: ``metric``), at most ``budget`` proxy evaluations; and
    ``verified`` (the default): candidate sets from the scores ranked by KL to the original on
    ``heldout_windows`` held-out windows (default 4), then at most ``budget`` local-search
    evaluations (default 16; see :mod:`prune.choose.verified`). Why it is the default, and what
    each strategy costs: docs/BENCHMARKS.md, "Verified selection"."""

    # a name in prune.choose.registry.STRATEGIES (see KNOWN_STRATEGIES)
    strategy: str = "verified"
    metric: Literal["bi", "angular", "cka", "msrs"] = "angular"
    n_layers: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, lt=1)
    protect: list[int] = [0, -1]
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # search only
    max_perplexity_ratio: float | None = Field(None, gt=1)
    min_task_retained: float | None = Field(None, gt=0, le=1)
    proxy_task: str | None = None
    proxy_limit: int = Field(100, ge=1)
    budget: int | None = Field(None, ge=0)  # verified: 0 skips its local search; search: at least 1
    order_by: Literal["msrs", "cka", "angular", "bi"] | None = None
    heldout_windows: int | None = Field(None, ge=1)  # default: HELDOUT_WINDOWS[strategy]

    def held_out(self) -> int:
        """Held-out calibration windows of ``search`` (perplexity floor) or ``verified``."""
        return self.heldout_windows if self.heldout_windows is not None else HELDOUT_WINDOWS[self.strategy]

    def verified_budget(self) -> int:
        """Local-search evaluations of ``verified``."""
        return self.budget if self.budget is not None else VERIFIED_BUDGET

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        if KNOWN_STRATEGIES and value not in KNOWN_STRATEGIES:
            raise ValueError(f"unknown strategy {value!r} (one of: {', '.join(KNOWN_STRATEGIES)})")
        return value

    @model_validator(mode="after")
    def _amount(self, info: ValidationInfo):
        search = self.strategy == "search"
        if not search and (self.n_layers is None) == (self.fraction is None):
            raise ValueError("give exactly one of n_layers (how many blocks to remove) or fraction (0 < f < 1)")
        if search and self.n_layers is not None and self.fraction is not None:
            raise ValueError("give at most one of n_layers or fraction (for search: the most blocks it may remove)")
        if len(set(self.protect)) != len(self.protect):
            raise ValueError(f"protect lists a block twice: {self.protect}")
        if changed(self, ("metric",), info) and not metric_is_read(self.strategy, self.metric):
            own = OWN_METRIC.get(self.strategy)
            reads = f"ranks by {own} alone" if own else "does not read it"
            instead = f", set it to {own} (--set select.metric={own})," if own else ""
            raise ValueError(f"metric is read only by strategies {', '.join(METRIC_STRATEGIES)}; {self.strategy} {reads} "
                             f"(remove it{instead} or choose one of those strategies)")
        if changed(self, ("seed",), info) and self.strategy not in SEED_STRATEGIES:
            raise ValueError(f"seed is read only by strategies {', '.join(SEED_STRATEGIES)}; {self.strategy} does not "
                             "read it (remove it, or choose one of those strategies)")
        # a saved recipe of an older version dumped heldout_windows: 8 for every strategy: read back as it was
        given = changed(self, _SEARCH_KEYS, info)
        if self.strategy == "verified":
            wrong = [k for k in given if k not in ("budget", "heldout_windows")]
            if wrong:
                raise ValueError(f"{wrong[0]} is only used by strategy: search (verified uses budget and heldout_windows)")
            return self
        if not search:
            if given:
                raise ValueError(f"{given[0]} is only used by strategy: search (remove it, or set strategy: search)")
            return self
        floors = [k for k in ("max_perplexity_ratio", "min_task_retained") if getattr(self, k) is not None]
        if not floors:  # with the budget it also needs: both named at once, not one per attempt
            budget = " and a budget (the most proxy evaluations it may spend, e.g. 16)" if self.budget is None else ""
            raise ValueError("strategy search needs a utility floor: set max_perplexity_ratio (e.g. 2.0) or "
                             f"min_task_retained (e.g. 0.9) with proxy_task{budget}")
        if len(floors) == 2:
            raise ValueError("give one utility floor: max_perplexity_ratio or min_task_retained, not both")
        if self.order_by is not None and changed(self, ("metric",), info):
            raise ValueError(f"search orders its candidates by order_by ({self.order_by}); metric ({self.metric}) is read "
                             "only without it: give one of them")
        if self.budget is None:
            raise ValueError(f"a floor ({floors[0]}) without a budget: set budget, the most proxy evaluations the "
                             "search may spend (e.g. 16)")
        if self.budget == 0:
            raise ValueError("search with budget 0 evaluates no set: set budget, the most proxy evaluations it may "
                             "spend (e.g. 16)")
        if floors[0] == "min_task_retained" and not self.proxy_task:
            raise ValueError("min_task_retained needs proxy_task, the lm-eval task it is measured on (e.g. arc_easy)")
        if floors[0] == "max_perplexity_ratio":
            wrong = [k for k in ("proxy_task", "proxy_limit") if k in given] + changed(self, ("seed",), info)
            if wrong:
                raise ValueError(f"{wrong[0]} is only used with min_task_retained (the perplexity floor uses heldout_windows"
                                 ", drawn with calibration.seed)")
        elif "heldout_windows" in given:
            raise ValueError("heldout_windows is only used with max_perplexity_ratio (the task floor uses proxy_limit)")
        return self


#: held-out windows by strategy; verified's 4 x 256 tokens are the protocol of its benchmark (and SLEB's)
HELDOUT_WINDOWS = {"search": 8, "verified": 4}
VERIFIED_BUDGET = 16
#: percentile-bootstrap resamples of a paired row of scores that are not right/wrong (prune compare --iters)
BOOTSTRAP_ITERS = 10_000
#: the most resamples ``prune compare --iters`` takes (8 bytes each per row: 8 MB; 100x the default's precision)
MAX_BOOTSTRAP_ITERS = 1_000_000
_SEARCH_KEYS = ("max_perplexity_ratio", "min_task_retained", "proxy_task", "proxy_limit", "budget", "order_by",
                "heldout_windows")


class PerplexityConfig(TextConfig):
    seq_len: int = Field(512, ge=8, description="perplexity window length")
    max_windows: int | None = Field(None, ge=1,
                                    description="at most this many perplexity windows (unset: every window of the text)")
    batch_size: int = Field(4, ge=1, description="perplexity windows per forward pass")


class FidelityConfig(Section):
    """``evaluate.fidelity``: KL(original || pruned) per predicted token (see :mod:`prune.measure.fidelity`).

    Without ``path`` it reuses the perplexity text and windows (``evaluate.perplexity``; its
    ``seq_len`` and ``max_windows`` unless given here). The original's top-``top_k`` log-probs
    per token are kept (``windows x (seq_len - 1) x (8 top_k + 12)`` bytes); the rest of the vocabulary
    is one bucket, so the KL is exact when ``top_k`` covers the vocabulary and a lower bound otherwise.
    """

    path: str | None = None
    field: str | list[str] = "text"
    config: str | None = None
    split: str = "train"
    rows: str | None = None
    bos: bool | None = None
    seq_len: int | None = Field(None, ge=8)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    top_k: int = Field(256, ge=1, description="original log-probs kept per token (the vocabulary size: exact KL)")

    _rows = field_validator("rows", mode="before")(lambda v: check_rows(v))
    _field = field_validator("field")(lambda v: check_fields(v))

    @model_validator(mode="after")
    def _own_text_needs_a_path(self, info: ValidationInfo):
        """``field``, ``config``, ``split``, ``rows`` and ``bos`` describe the fidelity's own text: without ``path``
        the perplexity text is reused as it is, and they were dropped silently (eval.json recorded them)."""
        dropped = changed(self, ("field", "config", "split", "rows", "bos"), info) if self.path is None else []
        if dropped:
            raise ValueError(f"{', '.join(dropped)} describe the fidelity's own text, but it has no path (it reuses "
                             "evaluate.perplexity's text and windows): set them there, or give evaluate.fidelity.path")
        return self

    def text(self, perplexity: "PerplexityConfig | None") -> tuple[TextConfig, int, int | None]:
        """``(text, seq_len, max_windows)`` the fidelity windows are cut from."""
        if self.path is not None:
            own = TextConfig(path=self.path, field=self.field, config=self.config, split=self.split, rows=self.rows,
                             bos=self.bos)
            return own, self.seq_len or 512, self.max_windows or 16
        if perplexity is None:
            raise PruneError("evaluate.fidelity has no path and there is no evaluate.perplexity to reuse: "
                             "give evaluate.fidelity.path (held-out text, not the calibration text)")
        return (TextConfig(**perplexity.model_dump(include=set(TextConfig.model_fields))),
                self.seq_len or perplexity.seq_len, self.max_windows or perplexity.max_windows)


#: the evaluate settings only lm-eval's tasks read (and those search's proxy task reads too, checked with the recipe)
LM_EVAL_KEYS = ("limit", "num_fewshot", "seed", "apply_chat_template", "fewshot_as_multiturn", "local_alias", "model",
                "model_args", "fewshot_from_scored_split")
PROXY_TASK_KEYS = ("task_dirs", "data_dir", "batch_size")


class EvaluateConfig(Section):
    perplexity: PerplexityConfig | None = None
    fidelity: FidelityConfig | None = None  # KL(original || pruned); needs the original (in a run: always there)
    tasks: list[str] = []
    task_dirs: list[str] = []
    data_dir: str | None = None  # offline task data (default: $PRUNE_DATA_DIR)
    limit: int | float | None = Field(None, gt=0,
                                      description="lm-eval: examples per task, or a fraction < 1 (unset: every example)")
    batch_size: int | str = Field(8, description="lm-eval batch size: a number, auto or auto:N")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (default: each task's own, as lm-eval's; "
                                                           "0 for the shipped tasks)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="lm-eval seeds")
    original: bool = True  # also evaluate the original model, for the before/after table
    apply_chat_template: bool | str = False  # lm-eval's: True, or the name of one of the tokenizer's templates
    fewshot_as_multiturn: bool | None = None  # None: on when a chat template is applied (lm-eval's default)
    local_alias: bool = False  # report local copies under the registry name (arc_easy_local as arc_easy)
    # lm-eval's model backend for the tasks: hf in memory (default), or lm-eval loads the folder itself
    # (model hf with model_args, model vllm; see prune eval --model). A run always evaluates in memory.
    model: Literal["hf", "vllm"] = "hf"
    model_args: str | None = None
    fewshot_from_scored_split: bool = False  # allow few-shot examples from the split being scored (results marked)

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            if int(value) < 1:
                raise ValueError("batch_size must be at least 1 (or auto)")
            return int(value)
        if not re.fullmatch(r"auto(:\d+)?", value):
            raise ValueError("batch_size is a number, auto or auto:N (lm-eval's choices)")
        return value

    @field_validator("model_args")
    @classmethod
    def _key_value_pairs(cls, value: str | None) -> str | None:
        bad = [part for part in (value or "").split(",") if part.strip() and "=" not in part]
        if bad:  # lm-eval passed them on as keyword arguments of the model: a traceback after loading
            raise ValueError(f"model_args is lm-eval's comma-separated key=value list; {bad[0]!r} has no '=' "
                             "(e.g. 'dtype=bfloat16,max_length=2048')")
        from prune.core.secrets import looks_like_token

        if value and looks_like_token(value):  # printed, and written to eval.json and lm-eval's results file
            raise ValueError("model_args holds what looks like a Hugging Face token, which would be printed and saved "
                             "with the results: set HF_TOKEN (or run `hf auth login`) instead")
        return value

    @field_validator("limit")
    @classmethod
    def _whole_limit(cls, value, info: ValidationInfo):
        if value is not None and value >= 1 and value != int(value) and not saved(info):  # lm-eval truncated 2.5 to 2, recorded as 2.5
            raise ValueError(f"limit is a whole number of examples or a fraction below 1 (got {value:g})")
        return int(value) if value is not None and value >= 1 and value == int(value) else value

    @model_validator(mode="after")
    def _fidelity_text(self):
        if self.fidelity is not None and self.fidelity.path is None and self.perplexity is None:
            raise ValueError("fidelity without a path reuses the perplexity text: add evaluate.perplexity or "
                             "give evaluate.fidelity.path")
        return self

    @model_validator(mode="after")
    def _task_settings_need_tasks(self, info: ValidationInfo):
        """The lm-eval settings have no effect without ``tasks`` (and ``fewshot_as_multiturn`` none without
        a chat template): refused, not dropped."""
        if saved(info):
            return self
        if self.perplexity is None and self.fidelity is None and not self.tasks and not changed(self, PROXY_TASK_KEYS):
            # (task_dirs, data_dir and batch_size alone may serve search's proxy task: the recipe's checks judge them)
            raise ValueError("evaluate measures nothing: give perplexity, fidelity or tasks (or drop the section)")
        unread = changed(self, LM_EVAL_KEYS) if not self.tasks else []
        if unread:
            raise ValueError(f"{', '.join(unread)} apply to lm-eval tasks, but there are none: add tasks, or drop them")
        if self.fewshot_as_multiturn is not None and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn formats few-shot examples as a chat: it needs apply_chat_template")
        return self


class PushConfig(Section):
    """``output.push_to_hub``: push the output folder after the run (see :mod:`prune.export.push`)."""

    repo_id: str
    private: bool = True  # applies when the repo is created; an existing repo keeps its visibility
    revision: str | None = None  # branch, created if missing (default main)
    commit_message: str | None = None

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        return _hub_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        problem = None if value is None else branch_name_problem(value)
        if problem:
            raise ValueError(f"{value!r} is not a branch name: {problem}")
        return value


def branch_name_problem(name: str) -> str | None:
    """Why git (and so the Hub) would refuse ``name`` as a branch (``git check-ref-format --branch``'s rules),
    or None: no empty part, none starting with '.' or ending in '.lock', no '..', '@{', '//', control
    character, space or any of ``~^:?*[\\``, not '@', not starting with '-' or '/', not ending in '/' or '.'."""
    if not name:
        return "it is empty"
    bad = sorted({c for c in name if ord(c) < 32 or ord(c) == 127 or c in " ~^:?*[\\"})
    if bad:
        return f"it holds {', '.join(repr(c) for c in bad)}"
    for part, why in (("..", "'..'"), ("@{", "'@{'"), ("//", "'//'")):
        if part in name:
            return f"it holds {why}"
    if name == "@" or name.startswith(("-", "/")) or name.endswith(("/", ".")):
        return "it starts with '-' or '/', ends with '/' or '.', or is '@'"
    if any(p.startswith(".") or p.endswith(".lock") for p in name.split("/")):
        return "a part of it starts with '.' or ends with '.lock'"
    return None


def _hub_repo_id(value: str) -> str:
    """``value`` when it is a valid Hub repo id (huggingface_hub's own check), else ValueError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ValueError(f"not a Hub repo id: {str(exc).splitlines()[0]} (use namespace/name)") from None
    if value.startswith((".", "/", "~")) or Path(value).expanduser().exists():
        raise ValueError("a local path, not a Hub repo id (use namespace/name)")
    return value


class OutputConfig(Section):
    dir: str
    overwrite: bool = False
    push_to_hub: PushConfig | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # saved weights; auto = as loaded


#: ``heal.method``: what is trained (``distill`` is shorthand for ``objective: distill`` with one of these)
HEAL_METHODS = ("lora", "replace", "partial", "bridge")
#: how a bridge's least squares weighs each token (``heal.bridge_weight``, prune.heal.bridge.token_weights);
#: ``auto`` fits every one of BRIDGE_FITS and keeps, per cut, the one the held-out check prefers
BRIDGE_FITS = ("uniform", "skip_first", "rms")
BRIDGE_WEIGHTS = (*BRIDGE_FITS, "auto")
DEFAULT_BRIDGE_WEIGHT = "uniform"


class HealConfig(Section):
    """Healing after pruning (see :mod:`prune.heal`): one of four methods, fitted on ``data``.

    * ``lora``: LoRA adapters (``rank``, ``alpha``, ``target_modules``) on the pruned model,
      causal-LM loss, merged into the weights afterwards (the checkpoint needs no peft);
      ``dora: true`` trains DoRA instead (each weight's magnitude apart from its direction);
      ``lora_init: pissa`` starts the adapters at each weight's top-``rank`` singular directions
      (PiSSA; the residual stays frozen) and ``olora`` at its QR factors; ``lora_norms: true`` also
      trains every normalisation weight (RMSNorm/LayerNorm gains) beside the adapters;
      ``loraplus_ratio`` > 1 trains each B matrix at that multiple of ``learning_rate`` (LoRA+);
    * ``replace``: one decoder block takes the place of the removed contiguous run, initialised
      by ``init`` and trained to map the run's input hidden states to its output (``loss``);
    * ``bridge``: nothing is trained: only the least-squares ``bridge`` at each cut (below;
      ``down`` unless set), ReplaceMe's training-free setting, each bridge checked by the KL to
      the original (``objective: distill`` unless set; ``lm``: by the loss, with no teacher);
    * ``partial``: full fine-tuning of the last ``last_blocks`` blocks (plus the final norm and,
      with ``train_lm_head``, the LM head; a tied LM head is the input embedding matrix, so
      training it changes the input embeddings too and the model stays tied).

    The OBJECTIVE is separate from the parameters trained (``method``): ``objective: lm`` (the
    default) is the causal-LM loss on ``data``; ``objective: distill`` trains the same parameters
    to match the ORIGINAL model (the teacher) on the same text (:mod:`prune.heal.distill`):
    ``kl_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` per token, ``T = temperature``,
    ``+ hidden_weight * MSE`` between each kept block's output and the original's corresponding
    block output (``hidden_loss: relative``: each token's squared error over the original state's
    squared norm instead, scale-free), ``+ lm_weight *`` the causal-LM loss (the weights count relative to each
    other: AdamW's steps do not change when the whole loss is scaled, so ``kl_weight`` alone moves little).
    ``method: distill`` is shorthand for
    ``objective: distill`` with ``params`` (default ``lora``) as the method. The teacher is a
    copy of the original in memory (``teacher: memory``) or its top-``top_k`` log-probs per
    token precomputed to ``teacher_cache`` (``teacher: cache``); ``auto`` keeps the copy when
    it fits in free memory with what its loss adds (:func:`prune.heal.teacher.teacher_need`).

    ``data`` is training text that must not be the evaluation text. Each optimizer step sees
    ``batch_size * gradient_accumulation`` windows of ``seq_len`` tokens drawn from
    ``n_samples`` windows (reused over epochs; with ``n_samples`` not a multiple of ``batch_size``, each epoch's
    last micro-batch is shorter: ``windows_seen`` records what ran); ``val_samples`` more windows are held out for
    the before/after loss. Learning rate: linear warmup over 5% of the steps (the first step
    at 1 / (warmup + 1) of the rate, never 0), then cosine towards 0 (``schedule: cosine``) or flat
    (``constant``). ``average: a`` > 0 returns the mean of the trained
    weights over the last ``a`` share of the steps instead of the last step's (weight averaging;
    it holds one float32 copy of the trained parameters).

    ``bridge: linear`` (lora, partial and bridge) first fits, on the original model over the training
    windows, a least-squares linear map at each cut and folds it into the MLP output projection
    (every expert's, for a mixture of experts) of the block before the cut (ReplaceMe;
    :mod:`prune.heal.bridge`); training starts from there. ``bridge: down`` refits that whole
    projection on its own inputs by least squares instead (dense MLPs). With the original in
    memory (a teacher copy, ``prune heal``, the Python API) the cuts are fitted in order on the
    pruned model as it stands, earlier bridges folded in (``prune.heal.bridge.cascade``);
    otherwise all on the original's states before the surgery. Each cut's bridge is kept
    only where it lowers the held-out measure of the objective (the KL to the original when
    distilling, else the loss on ``val_samples``); the record says which were dropped.
    ``bridge_weight: rms`` divides each token's squared error by the RMS of the original's state
    after the cut, so the few positions with massive activations do not decide the fit (on
    SmolLM2 it rescues a long contiguous cut, and hurts one window of text after a short one);
    ``skip_first`` leaves each window's first token (the attention sink) out of the fit;
    ``uniform`` (default) is plain least squares; ``auto`` fits all three in the same pass and keeps,
    cut by cut, the one with the lowest held-out measure (it needs ``val_samples`` >= 1;
    docs/BENCHMARKS.md compares them).
    """

    method: Literal[HEAL_METHODS]
    data: TextConfig | None = None  # required in a recipe (checked in prune.pipeline.recipe.check_heal)
    n_samples: int = Field(256, ge=1)
    val_samples: int = Field(8, ge=0)
    seq_len: int = Field(256, ge=8)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0, le=1)  # AdamW moves a weight by about the rate a step: above 1 is a typo
    schedule: Literal["cosine", "constant"] = "cosine"
    average: float = Field(0.0, ge=0, lt=1)  # share of the last steps whose weights are averaged (0: the last step's)
    weight_decay: float = Field(0.0, ge=0, le=1)  # AdamW shrinks each weight by rate x decay a step: above 1 is a typo
    seed: int = Field(0, ge=0, le=SEED_MAX)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # several processes (torchrun / accelerate launch): DDP by default; FSDP shards the model instead
    fsdp: bool = False
    # lora
    rank: int = 8
    merge: bool = True  # false: save the LoRA adapter as a PEFT folder instead of merging it
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] | str = "all-linear"
    dora: bool = False  # weight-decomposed LoRA (DoRA, Liu et al. 2024; peft's use_dora): merges like LoRA
    lora_init: Literal["default", "pissa", "olora"] = "default"  # peft's init_lora_weights (default: B = 0)
    lora_norms: bool = False  # also train the norm gains (they are base weights: kept when merged)
    loraplus_ratio: float = Field(1.0, ge=1)  # LoRA+ (Hayou et al. 2024): B learns at ratio x learning_rate
    # partial fine-tuning
    last_blocks: int = Field(2, ge=0)
    train_norm: bool = True
    train_lm_head: bool = False
    # replacement layer
    # last_removed: the healing benchmark's best start (docs/BENCHMARKS.md, "Healing")
    init: Literal["first_removed", "last_removed", "mean_removed"] = "last_removed"
    loss: Literal["mse", "mse+cos"] = "mse"
    # objective (prune.heal.distill)
    objective: Literal["lm", "distill"] = "lm"
    temperature: float = 1.0
    kl_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    hidden_loss: Literal["mse", "relative"] = "mse"  # relative: mean_t ||h_s - h_t||^2 / ||h_t||^2 (prune.heal.distill)
    lm_weight: float = Field(0.0, ge=0)
    teacher: Literal["auto", "memory", "cache"] = "auto"
    top_k: int = Field(64, ge=2)  # one token a position: its renormalized distribution is certain, the KL always 0
    teacher_cache: str | None = None  # the top-k file; default: beside the output folder
    bridge: Literal["none", "linear", "down"] = "none"  # a least-squares map at each cut first (prune.heal.bridge)
    # each token's squared error as is (uniform), without each window's first token (skip_first), / the RMS of
    # the original's state after the cut (rms), or the held-out best of the three per cut (auto)
    bridge_weight: Literal[BRIDGE_WEIGHTS] = DEFAULT_BRIDGE_WEIGHT

    @model_validator(mode="before")
    @classmethod
    def _distill_method(cls, data):
        """``method: distill`` (+ ``params: lora|partial|replace|bridge``) -> ``objective: distill``;
        ``method: bridge`` with no ``bridge`` / ``objective`` key -> ``bridge: down``, ``objective: distill``
        (its bridges are checked by the KL to the original: fidelity is what a bridge is fitted for)."""
        if isinstance(data, dict) and data.get("method") == "distill":
            if data.get("objective") not in (None, "distill"):
                raise ValueError(f"method distill is objective distill, and objective is {data['objective']!r}: use "
                                 f"method: {data.get('params', 'lora')} with objective: {data['objective']}, or remove "
                                 "objective")
            data = dict(data)
            data["objective"], data["method"] = "distill", data.pop("params", "lora")
        if isinstance(data, dict) and "params" in data and data.get("method") != "distill":
            raise ValueError(f"params names what method distill trains; with method {data.get('method')!r} remove it "
                             f"(or use method: distill, params: {data['params']})")
        if isinstance(data, dict) and data.get("method") == "bridge":
            data = {**data, "bridge": data.get("bridge") or "down", "objective": data.get("objective") or "distill"}
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value):
        """The Literal's own message listed every method but distill (converted to a method above)."""
        if isinstance(value, str) and value not in HEAL_METHODS:
            raise ValueError(f"{value!r} is not a healing method: use one of {', '.join([*HEAL_METHODS, 'distill'])}")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not 0.1 <= value <= 100:  # 1e-30: both softmaxes one-hot, 1e30: both uniform; the loss is 0 either way
            raise ValueError(f"the distillation temperature must be between 0.1 and 100, got {value} (1 is plain KL; "
                             "2 softens)")
        return value

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("the LoRA rank must be at least 1")
        return value

    @property
    def lora_moves_base_weights(self) -> bool:
        """PiSSA / OLoRA start by moving ``s*B0A0`` out of each base weight (default LoRA leaves them)."""
        return self.lora_init != "default"

    @model_validator(mode="after")
    def _trainable(self):
        if self.method == "partial" and self.last_blocks == 0 and not self.train_norm and not self.train_lm_head:
            raise ValueError("partial fine-tuning with last_blocks=0, train_norm=false and train_lm_head=false "
                             "trains no parameters (set last_blocks >= 1)")
        lora_only = [k for k, on in (("dora", self.dora), ("lora_init", self.lora_init != "default"),
                                     ("lora_norms", self.lora_norms), ("loraplus_ratio", self.loraplus_ratio != 1))
                     if on]
        if self.method != "lora" and lora_only:
            raise ValueError(f"{', '.join(lora_only)} only apply to LoRA, not to method {self.method} "
                             "(remove them, or use method: lora)")
        if self.method == "lora" and not self.merge and (self.lora_norms or self.lora_moves_base_weights
                                                         or self.bridge != "none"):
            raise ValueError("merge: false saves only the adapter, but lora_norms, lora_init pissa/olora and bridge "
                             "also change base weights (set merge: true, or lora_norms: false, lora_init: default "
                             "and bridge: none)")
        if self.method == "lora" and not self.merge and self.objective == "distill":
            raise ValueError("merge: false keeps the LoRA adapter of the next-token loss apart; distillation merges "
                             "its adapter (set merge: true, or objective: lm)")
        if self.dora and self.lora_moves_base_weights:
            raise ValueError(f"DoRA with lora_init {self.lora_init} is not supported (use one of them)")
        if self.bridge != "none" and self.method == "replace":
            raise ValueError("bridge applies to lora, partial and bridge; the replacement block already stands in for "
                             "the removed run (remove bridge, or use method: lora)")
        if self.bridge_weight == "auto" and self.val_samples == 0 and self.bridge != "none":
            raise ValueError("bridge_weight auto chooses each cut's fit by the held-out check, and val_samples is 0: "
                             "set val_samples >= 1 (or bridge_weight: uniform, skip_first or rms)")
        if self.method == "bridge" and self.bridge == "none":
            raise ValueError("method bridge folds a least-squares bridge into each cut and trains nothing: set "
                             "bridge: down or linear (or use method: lora to train)")
        if self.method == "lora" and not self.target_modules:
            raise ValueError("LoRA with an empty target_modules trains no parameters (use all-linear or name modules)")
        if self.objective == "distill" and self.kl_weight == self.hidden_weight == self.lm_weight == 0:
            raise ValueError("distillation with kl_weight, hidden_weight and lm_weight all 0 has no loss (set kl_weight: 1)")
        if self.objective == "distill" and self.teacher == "cache" and self.hidden_weight > 0:
            raise ValueError("hidden_weight needs the teacher in memory (the top-k cache holds no hidden states): "
                             "set teacher: memory or hidden_weight: 0")
        return self


def _model_for(root: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model under ``root`` that owns the location ``loc`` (for listing its valid keys)."""
    model: Any = root
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return model if isinstance(model, type) and issubclass(model, BaseModel) else None
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _error_loc(err: dict) -> tuple[str, ...]:
    """The settings key a pydantic error is about, without pydantic's union and validator tags."""
    return tuple(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "list", "dict", "function-after"))))


def validation_error_key(exc: ValidationError) -> str:
    """The dotted key (``select.n_layers``) of the first error :func:`format_validation_error` reports."""
    return ".".join(_error_loc(exc.errors()[0]))


def format_validation_error(exc: ValidationError, where: str, root: type[BaseModel] | None = None) -> str:
    """One line: the key, what is wrong, and the fix (``root``: the model validated, to list valid keys)."""
    errors = exc.errors()
    err = errors[0]
    loc = _error_loc(err)
    key = ".".join(loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        owner = _model_for(root, loc[:-1])
        valid = ", ".join(owner.model_fields) if owner else "see the docs"
        import difflib

        close = difflib.get_close_matches(loc[-1], list(owner.model_fields), n=1) if owner and loc else []
        mean = f"; did you mean '{'.'.join((*loc[:-1], close[0]))}'?" if close else ""
        return f"{where}: unknown key '{key}'{mean} (valid keys here: {valid}){more}"
    if err["type"] == "missing":
        return f"{where}: missing required key '{key}' (add it to the recipe or pass --set {key}=...){more}"
    message = err["msg"].removeprefix("Value error, ")
    shown = f"'{key}'" if key else "recipe"
    given = err.get("input")
    if err["type"] == "list_type" and isinstance(given, (str, int, float)):  # tasks: copa, not [copa]
        return f"{where}: {shown}: a list is expected, got {given!r} (write [{given}]){more}"
    if err["type"] in ("model_type", "dict_type") and not isinstance(given, dict):  # output: foo
        owner = _model_for(root, loc) if root else None
        keys = f" ({', '.join(owner.model_fields)})" if owner else ""
        return f"{where}: {shown} is a section of keys{keys}, not the value {given!r} (set one key: {key}.KEY=VALUE){more}"
    return f"{where}: {shown}: {message} (got {given!r}){more}"
