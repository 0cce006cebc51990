"""The jobs behind the CLI, one Python call each: ``run`` (a recipe end to end),
``score_model`` (redundancy scores only) and ``evaluate_model`` (utility of any model).

``run(recipe)``:
  validate the recipe and everything checkable without weights (output folder, model
  config, layer counts, task names) -> load -> calibration windows -> score -> choose
  blocks -> evaluate the original -> (heal: prepare) -> remove blocks in place -> (heal:
  train) -> score again (MSRS after)
  -> evaluate the pruned model -> save atomically with ``recipe.yaml``,
  ``pruning.json``, ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import evaluate as E
from .data import calibration_windows, eval_windows, load_text
from .errors import PruneError
from .faults import checkpoint
from .export import check_output_dir, save
from .models import load_tokenizer, check_checkpoint_files, check_device_map, check_supported, context_length, count_parameters, load_model, resolve_source
from .recipe import EvaluateConfig, Recipe, load_recipe
from .scoring import DEFAULT_POSITIONS, ScoreResult, score
from .progress import RunProgress
from .select import Selection, resolve_count, resolve_protect, select

FORMAT = "prune/1"


def versions() -> dict[str, str]:
    """Library versions recorded beside every result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("prune-layers", "torch", "transformers", "accelerate", "datasets", "lm_eval", "huggingface_hub", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def quiet_mode(quiet: bool) -> None:
    """Silence every progress bar (ours, transformers', datasets', lm-eval's) when ``quiet``."""
    if not quiet:
        return
    os.environ["TQDM_DISABLE"] = "1"
    try:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


# ---- pre-flight: everything that can fail before weights are loaded --------------------
def preflight(recipe: Recipe, overwrite: bool = False) -> dict[str, Any]:
    """Check the output folder, the model config and the evaluation tasks; returns facts found."""
    check_output_dir(recipe.output.dir, overwrite or recipe.output.overwrite)
    from transformers import AutoConfig

    src = resolve_source(recipe.model.source, recipe.model.gguf_file, recipe.model.revision)
    check_checkpoint_files(src)
    check_device_map(recipe.model.device_map, recipe.model.offload_folder)
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if src.revision:
        kwargs["revision"] = src.revision
    try:
        config = AutoConfig.from_pretrained(src.path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PruneError(f"could not read the config of {src.display}: {first}") from exc
    check_supported(config)
    n_layers = config.num_hidden_layers
    sel = recipe.select
    protect = resolve_protect(sel.protect, n_layers)
    if sel.strategy != "search":
        resolve_count(n_layers, sel.n_layers, sel.fraction, protect)
    elif len(protect) >= n_layers:
        raise PruneError(f"select.protect covers all {n_layers} blocks: nothing can be removed")
    ctx = context_length(config)
    lengths = [("calibration.seq_len", recipe.calibration.seq_len)]
    if recipe.evaluate and recipe.evaluate.perplexity:
        lengths.append(("evaluate.perplexity.seq_len", recipe.evaluate.perplexity.seq_len))
    for key, value in lengths:
        if ctx is not None and value > ctx:
            raise PruneError(f"{key}={value} is longer than the model's context ({ctx} tokens); lower it")
    tokenizer = load_tokenizer(src, recipe.model.trust_remote_code)
    c = recipe.calibration
    windows = calibration_windows(tokenizer, load_text(c.source()), c.n_samples, c.seq_len, c.seed, c.bos)
    if recipe.evaluate and recipe.evaluate.tasks:
        from .lmeval import check_tokenizer, resolve_tasks

        check_tokenizer(tokenizer)
        resolve_tasks(recipe.evaluate.tasks, data_dir_path=recipe.evaluate.data_dir, task_dirs=recipe.evaluate.task_dirs)
    # -- heal (prune.heal): settings checked against the config, before any weights are loaded --
    if recipe.heal is not None:
        from .heal import preflight as heal_preflight

        heal_preflight(recipe, config, n_layers)
    # -- end heal --
    # ---- export (prune.export): lineage of an already pruned source, push_to_hub checks ----
    from .export import preflight_export

    parent = preflight_export(recipe, src, n_layers)
    # ---- end export ----
    return {"n_layers": n_layers, "model_type": config.model_type, "source": src, "windows": windows,
            "parent": parent}


# ---- evaluation ------------------------------------------------------------------------
def evaluate_loaded(model, tokenizer, cfg: EvaluateConfig | None, *, quiet: bool = False, label: str = "") -> dict:
    """Perplexity and lm-eval tasks of an in-memory model under the settings ``cfg``."""
    if cfg is None:
        return {}
    out: dict[str, Any] = {}
    if cfg.perplexity is not None:
        p = cfg.perplexity
        windows = eval_windows(tokenizer, load_text(p.source()), p.seq_len, p.max_windows, p.bos)
        result = E.perplexity(model, windows, batch_size=p.batch_size, progress=not quiet)
        result["data"] = p.source().describe()
        out["perplexity"] = result
        say(f"{label}perplexity {result['perplexity']:.3f} ({result['windows']} windows x {result['seq_len']} tokens)", quiet)
    checkpoint("evaluating")
    if cfg.tasks:
        from .lmeval import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                                      num_fewshot=cfg.num_fewshot, seed=cfg.seed, data_dir_path=cfg.data_dir,
                                      task_dirs=cfg.task_dirs, progress=not quiet)
    return out


def comparison_rows(original: dict, pruned: dict, facts: dict) -> list[dict]:
    """Rows of the before/after table: name, metric, original, pruned, retained (pruned/original)."""
    rows = []

    def add(name, metric, a, b, stderr_a=None, stderr_b=None, lower_is_better=False):
        retained = (b / a) if (a not in (None, 0) and b is not None) else None
        rows.append({"name": name, "metric": metric, "original": a, "pruned": b, "retained": retained,
                     "stderr_original": stderr_a, "stderr_pruned": stderr_b, "lower_is_better": lower_is_better})

    if "perplexity" in pruned:
        add("perplexity", "ppl", original.get("perplexity", {}).get("perplexity"), pruned["perplexity"]["perplexity"],
            lower_is_better=True)
    for task, res in pruned.get("tasks", {}).items():
        before = original.get("tasks", {}).get(task, {})
        for metric, value in res["metrics"].items():
            add(task, metric, before.get("metrics", {}).get(metric), value,
                before.get("stderr", {}).get(metric), res["stderr"].get(metric))
    add("parameters", "count", facts["params_before"], facts["params_after"], lower_is_better=True)
    add("layers", "count", facts["layers_before"], facts["layers_after"], lower_is_better=True)
    return rows


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "count":
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def comparison_markdown(rows: list[dict]) -> str:
    """The before/after table as Markdown: retained % = pruned / original; for perplexity
    (lower is better) the ratio is shown as a factor, e.g. ``x2.80``."""
    lines = ["| task | metric | original | pruned | retained |", "|---|---|---:|---:|---:|"]
    for r in rows:
        a = _fmt(r["original"], r["metric"])
        b = _fmt(r["pruned"], r["metric"])
        if r["stderr_original"] is not None:
            a += f" ± {r['stderr_original']:.4f}"
        if r["stderr_pruned"] is not None:
            b += f" ± {r['stderr_pruned']:.4f}"
        lines.append(f"| {r['name']} | {r['metric']} | {a} | {b} | {fmt_retained(r)} |")
    return "\n".join(lines)


def fmt_retained(row: dict) -> str:
    """A row's retained value: ``x2.80`` for perplexity (a factor), ``97.5%`` otherwise, ``-`` if unknown."""
    if row["retained"] is None:
        return "-"
    if row["metric"] == "ppl":
        return f"x{row['retained']:.2f}"
    return f"{100 * row['retained']:.1f}%"


def eval_settings(recipe: Recipe) -> dict:
    ev = recipe.evaluate
    return {
        "dtype": recipe.model.dtype, "device_map": recipe.model.device_map,
        "limit": ev.limit if ev else None, "batch_size": ev.batch_size if ev else None,
        "num_fewshot": ev.num_fewshot if ev else None, "seed": ev.seed if ev else None,
        "perplexity": ev.perplexity.model_dump() if ev and ev.perplexity else None,
        "tasks": ev.tasks if ev else [], "versions": versions(),
    }


# ---- choosing blocks --------------------------------------------------------------------
def choose_blocks(model, tokenizer, windows, scores: ScoreResult, recipe: Recipe, quiet: bool = False) -> Selection:
    """Dispatch ``select.strategy``: score-only strategies use :func:`prune.select.select`;
    model-based ones (iterative, sleb, search) run forward passes on ``windows``."""
    sel = recipe.select
    if sel.strategy in ("one_shot", "contiguous", "random", "tail"):
        return select(scores, sel.n_layers, fraction=sel.fraction, strategy=sel.strategy, metric=sel.metric,
                      protect=sel.protect, seed=sel.seed)
    from . import strategies  # model-based strategies

    return strategies.choose(model, tokenizer, windows, scores, recipe, quiet=quiet)


# ---- run --------------------------------------------------------------------------------
@dataclass
class RunResult:
    out_dir: Path
    selection: Selection
    scores_before: ScoreResult
    scores_after: ScoreResult | None
    evaluation: dict = field(default_factory=dict)
    pruning: dict = field(default_factory=dict)


def run(recipe: Recipe | str | os.PathLike | dict, *, overrides: list[str] | tuple[str, ...] = (),
        overwrite: bool = False, quiet: bool = False, resume: bool = False) -> RunResult:
    """Run a pruning recipe end to end and write its output folder (see module docstring).

    Finished stages are kept in a progress folder beside the output (:mod:`prune.progress`);
    ``resume=True`` reuses them after an interruption instead of recomputing them."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    quiet_mode(quiet)
    started = time.time()
    facts = preflight(recipe, overwrite)
    progress = RunProgress(recipe.output.dir, recipe, resume=resume)
    if progress.resume:
        say(f"resuming from {progress.folder}: reusing {', '.join(progress.found()) or 'nothing yet'}", quiet)
    m = recipe.model
    # ---- execution mode (prune.execution): in memory, or one block at a time out of core ----
    from .execution import plan_execution, run_sequential

    c = recipe.calibration
    exec_plan = plan_execution(m.source, recipe.score.execution, dtype=m.dtype, device_map=m.device_map,
                          max_memory=m.max_memory, n_windows=c.n_samples, seq_len=c.seq_len, batch_size=c.batch_size,
                          revision=m.revision, gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code)
    say(exec_plan.describe(), quiet)
    if exec_plan.mode == "sequential":
        return run_sequential(recipe, facts, exec_plan, overwrite=overwrite, quiet=quiet, started=started,
                              progress=progress)
    # ---- end of execution mode -----------------------------------------------------------------
    say(f"loading {facts['source'].display} ({facts['model_type']}, {facts['n_layers']} blocks)", quiet)
    model, tokenizer, src = load_model(m.source, gguf_file=m.gguf_file, dtype=m.dtype, device_map=m.device_map,
                                       max_memory=m.max_memory, offload_folder=m.offload_folder, revision=m.revision,
                                       trust_remote_code=m.trust_remote_code)
    checkpoint("loaded")
    c = recipe.calibration
    windows = facts["windows"]  # tokenized in preflight: bad text fails before the model loads
    s = recipe.score
    say(f"scoring {facts['n_layers']} blocks on {c.n_samples} windows x {c.seq_len} tokens", quiet)
    score_kwargs = dict(batch_size=c.batch_size, positions=s.positions, metrics=tuple(s.metrics),
                        cka_windows=s.cka_windows, beta=s.beta, tau=s.tau, progress=not quiet)
    scores_before = progress.stage("scores", lambda: score(model, windows, **score_kwargs),
                                   ScoreResult.to_dict, ScoreResult.from_dict)
    checkpoint("scored")
    selection = progress.stage("selection", lambda: choose_blocks(model, tokenizer, windows, scores_before, recipe, quiet),
                               Selection.to_dict, Selection.from_dict)
    checkpoint("selected")
    say(f"removing {len(selection.removed)} of {facts['n_layers']} blocks (0-based): {selection.removed}", quiet)

    original = progress.stage("original", lambda: evaluate_loaded(model, tokenizer, recipe.evaluate, quiet=quiet,
                                                                  label="original: ")
                              if recipe.evaluate and recipe.evaluate.original else {})
    checkpoint("evaluated_original")
    params_before = count_parameters(model)
    from .surgery import remove_layers

    # -- heal (prune.heal): prepare() reads the training text and, for a replacement layer,
    #    captures the removed run's input/output on the full model; the surgery then removes
    #    plan.remove (k - 1 blocks for a replacement layer), and heal() trains after it --
    plan = None
    if recipe.heal is not None:
        from . import heal as H

        plan = H.prepare(model, tokenizer, selection, recipe, quiet=quiet)
    kept = remove_layers(model, plan.remove if plan is not None else selection.removed)
    healing = H.heal(model, tokenizer, selection, recipe, quiet=quiet, plan=plan) if plan is not None else None
    # -- end heal --
    checkpoint("pruned")
    scores_after = score(model, windows, **score_kwargs)
    pruned = evaluate_loaded(model, tokenizer, recipe.evaluate, quiet=quiet, label="pruned:   ")
    checkpoint("evaluated_pruned")
    run_facts = {"params_before": params_before, "params_after": count_parameters(model),
                 "layers_before": facts["n_layers"], "layers_after": len(kept)}
    rows = comparison_rows(original, pruned, run_facts)
    table = comparison_markdown(rows)
    evaluation = {"original": original, "pruned": pruned, "rows": rows, "settings": eval_settings(recipe), **run_facts}
    pruning = pruning_record(recipe, src, selection, kept, scores_before, scores_after,
                             {**run_facts, "model_type": facts["model_type"]}, healing, started)
    pruning["execution"] = exec_plan.to_dict()
    pruning["resumed"] = progress.resumed
    files = {"recipe.yaml": recipe.to_yaml(), "eval.json": json.dumps(evaluation, indent=1) + "\n",
             "eval.md": f"# Before / after\n\n{table}\n"}
    if healing is not None:  # -- heal: what the healing did, below the table --
        files["eval.md"] += "\n" + H.healing_markdown(healing)
    # ---- export (prune.export, prune.hub): lineage + model card, then the optional push ----
    from .export import prepare_export

    pruning, files["README.md"] = prepare_export(pruning, evaluation, recipe, src, facts["parent"])
    out = save(model, tokenizer, recipe.output.dir, pruning=pruning, files=files,
               overwrite=overwrite or recipe.output.overwrite)
    progress.finish()
    say(f"\n{table}\n\nsaved {out}", quiet)
    if recipe.output.push_to_hub is not None:
        from .hub import push_config

        push_config(out, recipe.output.push_to_hub, quiet=quiet)
    # ---- end export ----
    return RunResult(out, selection, scores_before, scores_after, evaluation, pruning)


def pruning_record(recipe: Recipe, src, selection: Selection, kept: list[int], before: ScoreResult,
                   after: ScoreResult | None, facts: dict, healing: dict | None, started: float) -> dict:
    """Everything ``pruning.json`` holds: indices, scores, MSRS before/after, calibration, versions."""
    c = recipe.calibration
    return {
        "format": FORMAT,
        "source": src.to_dict(),
        "removed": selection.removed,
        "kept": kept,
        **facts,
        "selection": selection.to_dict(),
        "msrs_before": before.msrs,
        "msrs_after": after.msrs if after else None,
        "scores_before": before.to_dict(),
        "scores_after": after.to_dict() if after else None,
        "calibration": {**c.source().describe(), "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed,
                        "bos": c.bos, "batch_size": c.batch_size, "positions": recipe.score.positions,
                        "cka_windows": recipe.score.cka_windows},
        "seed": c.seed,
        "healing": healing,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
    }


# ---- score / eval subcommands -------------------------------------------------------------
def score_model(source: str, *, data: str, field: str | list[str] = "text", rows: str | None = None,
                n_samples: int = 64, seq_len: int = 256, seed: int = 0, batch_size: int = 8,
                positions: str = DEFAULT_POSITIONS, metrics=("bi", "angular", "cka"), cka_windows: int = 1,
                beta: float = 100.0, tau: float = 0.8, dtype: str = "auto", device_map=None,
                trust_remote_code: bool = False, output: str | None = None, quiet: bool = False,
                execution: str = "auto", max_memory: dict | None = None) -> ScoreResult:
    """Redundancy scores of a model over calibration text; optionally written as JSON to ``output``.

    ``execution``: ``auto`` (from the weights' size and the memory there is), ``in_memory`` or
    ``sequential`` (one block at a time, see :mod:`prune.execution`)."""
    from .data import TextSource
    from .execution import plan_execution

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

        from .sequential import score_sequential

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
        Path(output).expanduser().parent.mkdir(parents=True, exist_ok=True)
        result.save_json(output)
    return result


def evaluate_model(source: str, cfg: EvaluateConfig, *, dtype: str = "auto", device_map=None,
                   trust_remote_code: bool = False, quiet: bool = False) -> dict:
    """Perplexity and lm-eval tasks of any model (original or pruned), loaded from ``source``."""
    quiet_mode(quiet)
    if cfg.tasks:
        from .lmeval import resolve_tasks

        resolve_tasks(cfg.tasks, data_dir_path=cfg.data_dir, task_dirs=cfg.task_dirs)  # fail before loading
    model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    result = evaluate_loaded(model, tokenizer, cfg, quiet=quiet)
    result["model"] = src.to_dict()
    result["layers"] = model.config.num_hidden_layers
    result["parameters"] = count_parameters(model)
    result["settings"] = {"dtype": dtype, "limit": cfg.limit, "batch_size": cfg.batch_size, "num_fewshot": cfg.num_fewshot,
                          "seed": cfg.seed, "versions": versions()}
    return result
