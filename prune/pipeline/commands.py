"""The one-shot commands behind ``prune score`` and ``prune eval``."""

from __future__ import annotations

from pathlib import Path

from prune.core import dist
from prune.core.config import CalibrationConfig, EvaluateConfig, ScoreConfig, default
from prune.core.console import quiet_mode, say, versions
from prune.io.text import calibration_windows, load_text
from prune.io.source import resolve_source
from prune.measure.scoring import ScoreResult, score
from prune.measure.evaluation import evaluate_loaded
from prune.model.loading import count_parameters, load_model
from prune.core.errors import PruneError
from prune.choose.rules import select
from prune.export.report import SCORE_ONLY, write_report


# ---- score / eval subcommands -------------------------------------------------------------
_C, _S = CalibrationConfig, ScoreConfig


def score_model(source: str, *, data: str, field: str | list[str] = "text", rows: str | None = None,
                n_samples: int = default(_C, "n_samples"), seq_len: int = default(_C, "seq_len"),
                seed: int = default(_C, "seed"), batch_size: int = default(_C, "batch_size"),
                positions: str = default(_S, "positions"), metrics=tuple(default(_S, "metrics")),
                cka_windows: int = default(_S, "cka_windows"), beta: float = default(_S, "beta"),
                tau: float = default(_S, "tau"), dtype: str = "auto", device_map=None,
                trust_remote_code: bool = False, output: str | None = None, quiet: bool = False,
                execution: str = default(_S, "execution"), max_memory: dict | None = None) -> ScoreResult:
    """Redundancy scores of a model over calibration text; optionally written as JSON to ``output``.

    ``execution``: ``auto`` (from the weights' size and the memory there is), ``in_memory`` or
    ``sequential`` (one block at a time, see :mod:`prune.execution`)."""
    from prune.core.config import TextSource
    from prune.pipeline.execution import plan_execution

    quiet_mode(quiet)
    plan = plan_execution(source, execution, dtype=dtype, device_map=device_map, max_memory=max_memory,
                          n_windows=n_samples, seq_len=seq_len, batch_size=batch_size,
                          trust_remote_code=trust_remote_code)
    say(plan.describe(), quiet)
    text = load_text(TextSource(data, field, rows=rows))
    kwargs = dict(batch_size=batch_size, positions=positions, metrics=tuple(metrics), cka_windows=cka_windows,
                  beta=beta, tau=tau, progress=not quiet)
    meta = {"data": {"path": data, "field": field, "rows": rows}, "seed": seed, "versions": versions(),
            "execution": plan.to_dict()}
    if plan.mode == "sequential":
        from transformers import AutoConfig, AutoTokenizer

        from prune.measure.sequential import score_sequential

        tokenizer = AutoTokenizer.from_pretrained(plan.folder, trust_remote_code=trust_remote_code)
        windows = calibration_windows(tokenizer, text, n_samples, seq_len, seed)
        config = AutoConfig.from_pretrained(plan.folder, trust_remote_code=trust_remote_code)
        meta.update(source=resolve_source(source).to_dict(), model_type=config.model_type)
        result = score_sequential(plan.folder, windows, dtype=dtype, device=plan.device,
                                  trust_remote_code=trust_remote_code, metadata=meta, **kwargs)
    else:
        model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                           trust_remote_code=trust_remote_code)
        windows = calibration_windows(tokenizer, text, n_samples, seq_len, seed)
        meta.update(source=src.to_dict(), model_type=model.config.model_type)
        result = score(model, windows, metadata=meta, **kwargs)
    if output:
        def write() -> None:
            Path(output).expanduser().parent.mkdir(parents=True, exist_ok=True)
            result.save_json(output)

        dist.on_main(write)  # under a launcher only rank 0 writes
    return result


def evaluate_model(source: str, cfg: EvaluateConfig, *, dtype: str = "auto", device_map=None,
                   trust_remote_code: bool = False, quiet: bool = False) -> dict:
    """Perplexity and lm-eval tasks of any model (original or pruned), loaded from ``source``."""
    quiet_mode(quiet)
    if cfg.tasks:
        from prune.measure.lmeval import resolve_tasks

        resolve_tasks(cfg.tasks, data_dir_path=cfg.data_dir, task_dirs=cfg.task_dirs)  # fail before loading
    model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    result = evaluate_loaded(model, tokenizer, cfg, quiet=quiet)
    result["model"] = src.to_dict()
    result["layers"] = model.config.num_hidden_layers
    result["parameters"] = count_parameters(model)
    result["settings"] = {"dtype": dtype, "limit": cfg.limit, "batch_size": cfg.batch_size, "num_fewshot": cfg.num_fewshot,
                          "seed": cfg.seed, "versions": versions()}
    return result


def report_model(source: str, out_dir: str | Path, *, strategy: str = "contiguous", metric: str = "angular",
                 n_layers: int | None = None, protect=(0, -1), overwrite: bool = False, **score_kwargs) -> Path:
    """Score ``source`` (see :func:`prune.pipeline.score_model` for ``score_kwargs``) and report it,
    marking the ``n_layers`` blocks a score-only ``strategy`` would remove (default: a quarter)."""
    from prune.export.saving import check_output_dir
    from prune.pipeline.commands import score_model

    if strategy not in SCORE_ONLY:
        raise PruneError(f"a model report marks blocks with a score-only strategy ({', '.join(SCORE_ONLY)}); for "
                         f"{strategy} run a recipe and report its output folder")
    check_output_dir(out_dir, overwrite)  # before the expensive scoring
    scores = score_model(source, **score_kwargs)
    k = n_layers or max(1, round(scores.n_layers / 4))
    sel = select(scores, k, strategy=strategy, metric=metric, protect=protect, seed=score_kwargs.get("seed", 0))
    return write_report(out_dir, scores, selection=sel, k=k, title=f"Redundancy report: {Path(str(source)).name}",
                        source=str(source), overwrite=overwrite)
