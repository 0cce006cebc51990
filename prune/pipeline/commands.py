"""The one-shot commands behind ``prune score`` and ``prune eval``."""

from __future__ import annotations

from pathlib import Path

from prune.core.config import EvaluateConfig
from prune.core.console import quiet_mode, say, versions
from prune.io.text import calibration_windows, load_text
from prune.io.source import resolve_source
from prune.measure.scoring import DEFAULT_POSITIONS, ScoreResult, score
from prune.measure.evaluation import evaluate_loaded
from prune.model.loading import count_parameters, load_model
from prune.core.errors import PruneError
from prune.choose.rules import select
from prune.export.report import SCORE_ONLY, write_report


# ---- score / eval subcommands -------------------------------------------------------------
def score_model(source: str, *, data: str, field: str | list[str] = "text", rows: str | None = None,
                n_samples: int = 64, seq_len: int = 256, seed: int = 0, batch_size: int = 8,
                positions: str = DEFAULT_POSITIONS, metrics=("bi", "angular", "cka"), cka_windows: int = 1,
                beta: float = 100.0, tau: float = 0.8, dtype: str = "auto", device_map=None,
                trust_remote_code: bool = False, output: str | None = None, quiet: bool = False,
                execution: str = "auto", max_memory: dict | None = None, overwrite: bool = False) -> ScoreResult:
    """Redundancy scores of a model over calibration text; optionally written as JSON to ``output``.

    ``execution``: ``auto`` (from the weights' size and the memory there is), ``in_memory`` or
    ``sequential`` (one block at a time, see :mod:`prune.execution`)."""
    from prune.core.config import CalibrationConfig, ScoreConfig, TextSource
    from prune.io.guard import check_output, write_file
    from prune.model.loading import load_tokenizer
    from prune.pipeline.execution import plan_execution
    from prune.pipeline.inputs import command_inputs, preflight_model, validated

    quiet_mode(quiet)
    # -- everything checkable before the weights load: flags, output file, config, text --
    validated(CalibrationConfig, path=str(data), field=field, rows=rows, n_samples=n_samples, seq_len=seq_len, seed=seed,
              batch_size=batch_size)
    validated(ScoreConfig, metrics=list(metrics), positions=positions, cka_windows=cka_windows, beta=beta, tau=tau,
              execution=execution)
    src = resolve_source(source)
    if output:
        check_output(output, command_inputs(source, [data]), overwrite=overwrite, kind="file", what="--output file",
                     flag="--output")
    preflight_model(src, trust_remote_code, [("--seq-len", seq_len)])
    text = load_text(TextSource(data, field, rows=rows))
    windows = calibration_windows(load_tokenizer(src, trust_remote_code), text, n_samples, seq_len, seed)
    plan = plan_execution(source, execution, dtype=dtype, device_map=device_map, max_memory=max_memory,
                          n_windows=n_samples, seq_len=seq_len, batch_size=batch_size,
                          trust_remote_code=trust_remote_code)
    say(plan.describe(), quiet)
    kwargs = dict(batch_size=batch_size, positions=positions, metrics=tuple(metrics), cka_windows=cka_windows,
                  beta=beta, tau=tau, progress=not quiet)
    meta = {"data": {"path": data, "field": field, "rows": rows}, "seed": seed, "versions": versions(),
            "execution": plan.to_dict()}
    if plan.mode == "sequential":
        from transformers import AutoConfig

        from prune.measure.sequential import score_sequential

        config = AutoConfig.from_pretrained(plan.folder, trust_remote_code=trust_remote_code)
        meta.update(source=resolve_source(source).to_dict(), model_type=config.model_type)
        result = score_sequential(plan.folder, windows, dtype=dtype, device=plan.device,
                                  trust_remote_code=trust_remote_code, metadata=meta, **kwargs)
    else:
        model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                           trust_remote_code=trust_remote_code)
        meta.update(source=src.to_dict(), model_type=model.config.model_type)
        result = score(model, windows, metadata=meta, **kwargs)
    if output:
        import json

        write_file(output, json.dumps(result.to_dict(), indent=1))
    return result


def evaluate_model(source: str, cfg: EvaluateConfig, *, dtype: str = "auto", device_map=None,
                   trust_remote_code: bool = False, quiet: bool = False, output: str | None = None,
                   overwrite: bool = False) -> dict:
    """Perplexity and lm-eval tasks of any model (original or pruned), loaded from ``source``;
    written as JSON to ``output`` when given (refused if it exists, unless ``overwrite``)."""
    from prune.io.guard import check_output, write_file
    from prune.io.text import eval_windows
    from prune.model.loading import load_tokenizer
    from prune.pipeline.inputs import command_inputs, preflight_model

    quiet_mode(quiet)
    ppl = cfg.perplexity
    src = resolve_source(source)
    if output:
        check_output(output, command_inputs(source, [ppl.path if ppl else None]), overwrite=overwrite, kind="file",
                     what="--output file", flag="--output")
    preflight_model(src, trust_remote_code, [("--seq-len", ppl.seq_len if ppl else None)])
    if ppl is not None or cfg.tasks:
        tokenizer = load_tokenizer(src, trust_remote_code)
        if ppl is not None:  # empty or too short text fails now, not after loading
            eval_windows(tokenizer, load_text(ppl.source()), ppl.seq_len, ppl.max_windows, ppl.bos)
    if cfg.tasks:
        from prune.measure.lmeval import check_tokenizer, resolve_tasks

        check_tokenizer(tokenizer)
        resolve_tasks(cfg.tasks, data_dir_path=cfg.data_dir, task_dirs=cfg.task_dirs)  # fail before loading
    model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    result = evaluate_loaded(model, tokenizer, cfg, quiet=quiet)
    result["model"] = src.to_dict()
    result["layers"] = model.config.num_hidden_layers
    result["parameters"] = count_parameters(model)
    result["settings"] = {"dtype": dtype, "limit": cfg.limit, "batch_size": cfg.batch_size, "num_fewshot": cfg.num_fewshot,
                          "seed": cfg.seed, "versions": versions()}
    if output:
        import json

        write_file(output, json.dumps(result, indent=1))
    return result


def report_model(source: str, out_dir: str | Path, *, strategy: str = "contiguous", metric: str = "angular",
                 n_layers: int | None = None, protect=(0, -1), overwrite: bool = False, **score_kwargs) -> Path:
    """Score ``source`` (see :func:`prune.pipeline.score_model` for ``score_kwargs``) and report it,
    marking the ``n_layers`` blocks a score-only ``strategy`` would remove (default: a quarter)."""
    from prune.export.save import check_output_dir
    from prune.pipeline.commands import score_model

    if strategy not in SCORE_ONLY:
        raise PruneError(f"a model report marks blocks with a score-only strategy ({', '.join(SCORE_ONLY)}); for "
                         f"{strategy} run a recipe and report its output folder")
    from prune.pipeline.inputs import command_inputs

    inputs = command_inputs(source, [score_kwargs.get("data")])
    check_output_dir(out_dir, overwrite, inputs, flag="--output")  # before the expensive scoring
    scores = score_model(source, **score_kwargs)
    k = n_layers or max(1, round(scores.n_layers / 4))
    sel = select(scores, k, strategy=strategy, metric=metric, protect=protect, seed=score_kwargs.get("seed", 0))
    return write_report(out_dir, scores, selection=sel, k=k, title=f"Redundancy report: {Path(str(source)).name}",
                        source=str(source), overwrite=overwrite, inputs=inputs)
