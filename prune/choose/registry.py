"""Every selection strategy in one registry: name -> what it needs and the function that runs it.

Recipe validation, the CLI's choices, the report and the execution plan all read
:data:`STRATEGIES`; :func:`choose` is the one dispatch from a recipe's ``select`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prune.choose import strategies as S
from prune.choose.rules import Selection, resolve_count, resolve_protect, select
from prune.core import config
from prune.core.config import CalibrationConfig, EvaluateConfig, ScoreConfig, SelectConfig
from prune.core.errors import PruneError


@dataclass(frozen=True)
class Strategy:
    name: str
    needs_model: bool  # runs forward passes (so needs the model in memory), or only reads the scores
    contiguous: bool  # always removes one contiguous run (what a replacement block needs)
    summary: str
    run: Callable[..., Selection]  # run(ctx: Choice) -> Selection


@dataclass
class Choice:
    """Everything a strategy may use; score-only strategies read ``select`` and ``scores`` only."""

    select: SelectConfig
    scores: object  # prune.measure.scoring.ScoreResult
    model: object = None
    tokenizer: object = None
    windows: object = None
    calibration: CalibrationConfig | None = None
    score: ScoreConfig | None = None
    evaluate: EvaluateConfig | None = None
    quiet: bool = False
    config: object = None  # the model's config where no model is in memory (sequential execution)


def _rule(ctx: Choice) -> Selection:
    s = ctx.select
    metric = s.metric if s.strategy == "one_shot" else None  # the recipe refuses a metric its strategy does not read
    config = ctx.config if ctx.config is not None else getattr(ctx.model, "config", None)  # a hybrid keeps attention
    return select(ctx.scores, s.n_layers, fraction=s.fraction, strategy=s.strategy, metric=metric, protect=s.protect,
                  seed=s.seed, config=config)


def _iterative(ctx: Choice) -> Selection:
    return S.choose_iterative(ctx.model, ctx.windows, ctx.scores, ctx.select, ctx.calibration, ctx.score, ctx.quiet)


def _sleb(ctx: Choice) -> Selection:
    return S.choose_sleb(ctx.model, ctx.windows, ctx.select, ctx.calibration, ctx.quiet)


def _verified(ctx: Choice) -> Selection:
    from prune.choose.strategies import heldout_windows
    from prune.choose.verified import verified
    from prune.io.text import load_text

    s, c = ctx.select, ctx.calibration
    held = heldout_windows(ctx.tokenizer, load_text(c.source()), c.n_samples, c.seq_len, c.seed, c.bos,
                           s.held_out())
    count = resolve_count(ctx.scores.n_layers, s.n_layers, s.fraction, resolve_protect(s.protect, ctx.scores.n_layers))
    return verified(ctx.model, ctx.scores, held, count, protect=s.protect, batch_size=c.batch_size,
                    budget=s.verified_budget(), progress=not ctx.quiet)


def _search(ctx: Choice) -> Selection:
    return S.choose_search(ctx.model, ctx.tokenizer, ctx.scores, ctx.select, ctx.calibration, ctx.evaluate, ctx.quiet)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("one_shot", False, False, "the k blocks `metric` ranks most removable, in one go (ShortGPT with bi)", _rule),
    Strategy("contiguous", False, True, "the run of k blocks with the smallest angular distance (Gromov et al.)", _rule),
    Strategy("tail", False, True, "the k blocks just before the last one", _rule),
    Strategy("random", False, False, "k blocks drawn with `seed` (a baseline)", _rule),
    Strategy("iterative", True, False, "remove the best block by `metric`, re-score, repeat", _iterative),
    Strategy("sleb", True, False, "remove the block whose removal raises the calibration loss least, repeat (SLEB)",
             _sleb),
    Strategy("verified", True, False, "candidate sets from the scores (contiguous runs, one-shot, MSRS families) "
             "ranked by KL to the original on held-out windows, then a local search", _verified),
    Strategy("search", True, False, "the largest set that keeps a utility floor, under a budget of proxy evaluations",
             _search),
)}


config.KNOWN_STRATEGIES[:] = list(STRATEGIES)  # recipe validation reads the registry


def get(name: str) -> Strategy:
    """The strategy called ``name``; one line listing the valid names otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PruneError(f"unknown strategy {name!r} (one of: {', '.join(STRATEGIES)})") from None


def names(needs_model: bool | None = None) -> list[str]:
    """Strategy names, optionally only those that do (or do not) need the model."""
    return [n for n, s in STRATEGIES.items() if needs_model is None or s.needs_model == needs_model]


def choose(select_cfg: SelectConfig, scores, *, model=None, tokenizer=None, windows=None,
           calibration: CalibrationConfig | None = None, score: ScoreConfig | None = None,
           evaluate: EvaluateConfig | None = None, quiet: bool = False, config=None) -> Selection:
    """Run ``select_cfg.strategy``; a model-based strategy without a model is refused."""
    strategy = get(select_cfg.strategy)
    if strategy.needs_model and model is None:
        raise PruneError(f"select.strategy={strategy.name!r} runs the model; it cannot run without one "
                         f"(score-only strategies: {', '.join(names(False))})")
    return strategy.run(Choice(select_cfg, scores, model, tokenizer, windows, calibration, score, evaluate, quiet,
                               config))
