"""Config sections of a recipe (pydantic), each the settings of one stage; defaults live here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
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


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
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
        return TextSource(self.path, self.field, self.config, self.split, self.rows)


class CalibrationConfig(TextConfig):
    n_samples: int = Field(64, ge=1, description="number of calibration windows")
    seq_len: int = Field(256, ge=8, description="tokens per window")
    seed: int = Field(0, description="seed for drawing the windows")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")


class ScoreConfig(Section):
    """How blocks are scored. These are the defaults of :func:`prune.score`, :func:`prune.score_sequential`
    and the CLI's flags too (read with :func:`default`)."""

    metrics: list[Literal["bi", "angular", "cka"]] = Field(["bi", "angular", "cka"], description="metrics to compute")
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


class SelectConfig(Section):
    """Which blocks to remove. ``n_layers`` or ``fraction`` says how many (for ``search``: an
    optional upper bound). Strategies: ``one_shot`` (by ``metric``), ``contiguous`` (angular),
    ``iterative`` (by ``metric``, re-scored after each removal), ``sleb`` (calibration loss),
    ``random``, ``tail``, and ``search``: the largest set keeping a utility floor
    (``max_perplexity_ratio`` on ``heldout_windows`` held-out calibration windows, or
    ``min_task_retained`` of ``proxy_task``'s score with ``proxy_limit`` examples), candidates
    ordered by ``order_by`` (default: ``metric``), at most ``budget`` proxy evaluations."""

    strategy: str = "contiguous"  # a name in prune.choose.registry.STRATEGIES (checked by the Recipe)
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
    seq_len: int = Field(512, ge=8, description="perplexity window length")
    max_windows: int | None = Field(None, ge=1, description="at most this many perplexity windows")
    batch_size: int = Field(4, ge=1, description="perplexity windows per forward pass")


class EvaluateConfig(Section):
    perplexity: PerplexityConfig | None = None
    tasks: list[str] = []
    task_dirs: list[str] = []
    data_dir: str | None = None  # offline task data (default: $PRUNE_DATA_DIR)
    limit: int | float | None = Field(None, gt=0, description="lm-eval: examples per task (or a fraction < 1)")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    num_fewshot: int = Field(0, ge=0, description="few-shot examples")
    seed: int = Field(0, description="lm-eval seeds")
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
    # several processes (torchrun / accelerate launch): DDP by default; FSDP shards the model instead
    fsdp: bool = False
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


def format_validation_error(exc: ValidationError, where: str, root: type[BaseModel] | None = None) -> str:
    """One line: the key, what is wrong, and the fix (``root``: the model validated, to list valid keys)."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "list", "dict", "function-after"))))
    key = ".".join(loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        owner = _model_for(root, loc[:-1])
        valid = ", ".join(owner.model_fields) if owner else "see the docs"
        return f"{where}: unknown key '{key}' (valid keys here: {valid}){more}"
    if err["type"] == "missing":
        return f"{where}: missing required key '{key}' (add it to the recipe or pass --set {key}=...){more}"
    message = err["msg"].removeprefix("Value error, ")
    shown = f"'{key}'" if key else "recipe"
    return f"{where}: {shown}: {message} (got {err.get('input')!r}){more}"
