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

from prune.measure import perplexity as E
from prune.io.text import calibration_windows, eval_windows, load_text
from prune.core.errors import PruneError
from prune.core.console import quiet_mode, say, versions
from prune.core.tables import comparison_markdown, comparison_rows
from prune.measure.evaluation import evaluate_loaded
from prune.core.faults import checkpoint
from prune.export.save import check_output_dir, save
from prune.model.loading import (
    load_tokenizer,
    check_checkpoint_files,
    check_device_map,
    check_supported,
    context_length,
    count_parameters,
    load_model,
)
from prune.io.source import resolve_source
from prune.core.config import EvaluateConfig
from prune.pipeline.recipe import Recipe, load_recipe
from prune.measure.scoring import DEFAULT_POSITIONS, ScoreResult, score
from prune.pipeline.progress import RunProgress
from prune.choose.rules import Selection, resolve_count, resolve_protect, select

FORMAT = "prune/1"


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
        from prune.measure.lmeval import check_tokenizer, resolve_tasks

        check_tokenizer(tokenizer)
        resolve_tasks(recipe.evaluate.tasks, data_dir_path=recipe.evaluate.data_dir, task_dirs=recipe.evaluate.task_dirs)
    # -- heal (prune.heal): settings checked against the config, before any weights are loaded --
    if recipe.heal is not None:
        from prune.heal.methods import preflight as heal_preflight

        heal_preflight(recipe, config, n_layers)
    # -- end heal --
    # ---- export (prune.export): lineage of an already pruned source, push_to_hub checks ----
    from prune.export.save import preflight_export

    parent = preflight_export(recipe, src, n_layers)
    # ---- end export ----
    return {"n_layers": n_layers, "model_type": config.model_type, "source": src, "windows": windows,
            "parent": parent}


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
    from prune.choose import strategies

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
    from prune.pipeline.execution import plan_execution, run_sequential

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
    from prune.model.surgery import remove_layers

    # -- heal (prune.heal): prepare() reads the training text and, for a replacement layer,
    #    captures the removed run's input/output on the full model; the surgery then removes
    #    plan.remove (k - 1 blocks for a replacement layer), and heal() trains after it --
    plan = None
    if recipe.heal is not None:
        from prune.heal import methods as H

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
    from prune.export.save import prepare_export

    pruning, files["README.md"] = prepare_export(pruning, evaluation, recipe, src, facts["parent"], model=model)
    out = save(model, tokenizer, recipe.output.dir, pruning=pruning, files=files,
               overwrite=overwrite or recipe.output.overwrite, dtype=recipe.output.dtype)
    progress.finish()
    say(f"\n{table}\n\nsaved {out}", quiet)
    if recipe.output.push_to_hub is not None:
        from prune.export.push import push_config

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


