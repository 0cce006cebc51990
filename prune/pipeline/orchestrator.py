"""The one orchestrator of a recipe: ``run(recipe)``, for in-memory and sequential execution alike.

  preflight (everything checkable without weights: output folder, model config, layer
  counts, calibration windows, task names, heal settings, lineage, push target)
  -> plan the execution (:mod:`prune.pipeline.execution`) -> an engine
  (:mod:`prune.pipeline.engines`: the model in memory, or one block at a time from the shards)
  -> score -> choose blocks -> evaluate the original -> (heal: prepare) -> remove blocks
  -> (heal: evaluate the pruned model, then train) -> score again (MSRS after) -> evaluate the pruned model
  -> :func:`write_output`: ``pruning.json`` (typed record with lineage), ``recipe.yaml``,
  ``eval.json``, ``eval.md`` and the model card, saved atomically -> optional push.

Both engines go through the same steps and write the same files; ``prune heal`` ends
with the same :func:`write_output`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune.core import dist
from prune.core.errors import PruneError
from prune.export.public import public_data
from prune.io.text import reads_from_hub
from prune.io.text import calibration_windows_of, load_text
from prune.core.console import StageClock, keeps_quiet_mode, quiet_mode, say, show, versions
from prune.core.tables import UNHEALED, comparison_markdown, comparison_rows, healed_markdown
from prune.measure.evaluation import lm_eval_outputs, lm_eval_tables
from prune.measure.lmeval import n_shots
from prune.measure.paired import paired_section
from prune.core.faults import fault_point
from prune.export.saving import check_output_dir
from prune.model.loading import check_device_map, load_tokenizer
from prune.io.source import resolve_source
from prune.pipeline.recipe import Recipe, load_recipe
from prune.measure.scoring import ScoreResult
from prune.pipeline.progress import RunProgress
from prune.choose.rules import Selection, resolve_count, resolve_protect
from prune.choose.verified import margin_line
from prune.core.records import PruningRecord, utc_now
from prune.export.saving import prepare_export
from prune.heal.methods import healing_markdown
from prune.pipeline.engines import make_engine, whole_model_reason
from prune.pipeline.execution import agreed_plan, plan_execution

FORMAT = "prune/1"


# ---- pre-flight: everything that can fail before weights are loaded --------------------
def preflight(recipe: Recipe, overwrite: bool = False, recipe_file=None) -> dict[str, Any]:
    """Check the output folder, the model config and the evaluation tasks; returns facts found."""
    from prune.pipeline import inputs as I
    from prune.pipeline.recipe import check_recipe

    check_recipe(recipe)  # a Recipe built in Python has not been through load_recipe's checks
    src = resolve_source(recipe.model.source, recipe.model.gguf_file, recipe.model.revision)
    inputs = I.recipe_inputs(recipe, src, recipe_file)
    check_output_dir(recipe.output.dir, overwrite or recipe.output.overwrite, inputs)
    check_device_map(recipe.model.device_map, recipe.model.offload_folder)
    if recipe.model.offload_folder:  # transformers adds the offloaded weights there, and leaves them
        from prune.io.guard import check_outside_inputs

        check_outside_inputs(recipe.model.offload_folder, [*inputs, (recipe.output.dir, "the output folder", False)],
                             "model.offload_folder")
    lengths = [("calibration.seq_len", recipe.calibration.seq_len)]
    ev = recipe.evaluate
    if ev and ev.perplexity:
        lengths.append(("evaluate.perplexity.seq_len", ev.perplexity.seq_len))
    fidelity_text = ev.fidelity.text(ev.perplexity) if ev and ev.fidelity else None  # (text, seq_len, max_windows)
    if fidelity_text is not None:
        lengths.append(("evaluate.fidelity.seq_len", fidelity_text[1]))
    # files whole, config readable and supported, weights covering it, windows within the context
    try:
        config = I.preflight_model(src, recipe.model.trust_remote_code, lengths)
    except PruneError as exc:  # a model named by a variable's default (out-of-core.yaml's Hub id): the variable to set
        if not (hint := recipe.default_of("model.source")):
            raise
        raise PruneError(f"{exc}{hint}") from None
    n_layers = config.num_hidden_layers
    sel = recipe.select
    protect = resolve_protect(sel.protect, n_layers)
    if sel.strategy != "search":
        I.check_selection_possible(n_layers, resolve_count(n_layers, sel.n_layers, sel.fraction, protect),
                                   sel.strategy, protect)
    elif len(protect) >= n_layers:
        raise PruneError(f"select.protect covers all {n_layers} blocks: nothing can be removed")
    elif sel.n_layers is not None or sel.fraction is not None:  # search: the most it may remove
        resolve_count(n_layers, sel.n_layers, sel.fraction, protect)
    tokenizer = load_tokenizer(src, recipe.model.trust_remote_code)
    with I.text_of("calibration"):
        windows = calibration_windows_of(tokenizer, recipe.calibration)
    sel = recipe.select
    if sel.strategy == "verified" or (sel.strategy == "search" and sel.max_perplexity_ratio is not None):
        from prune.choose.strategies import heldout_windows

        c = recipe.calibration  # held-out windows beyond the calibration ones: too little text fails now
        with I.text_of("calibration"):
            heldout_windows(tokenizer, load_text(c.source()), c.n_samples, c.seq_len, c.seed, c.bos, sel.held_out())
    if recipe.evaluate and recipe.evaluate.perplexity:  # empty or too short text fails now, not after scoring
        p = recipe.evaluate.perplexity
        I.text_windows(tokenizer, "evaluate.perplexity", p, p.seq_len, p.max_windows)
    if fidelity_text is not None and ev.fidelity.path is not None:  # its own text: the same checks
        I.text_windows(tokenizer, "evaluate.fidelity", *fidelity_text)
    if recipe.evaluate and recipe.evaluate.tasks:
        from prune.measure.lmeval import check_chat_template, check_tasks, check_tokenizer

        check_tokenizer(tokenizer)
        check_chat_template(tokenizer, recipe.evaluate.apply_chat_template)
        ev = recipe.evaluate  # every task problem now, before the model loads
        if ev.model != "hf" or ev.model_args is not None:
            raise PruneError("a run evaluates the model in memory (evaluate.model hf, no model_args); evaluate the saved "
                             f"folder with another backend afterwards: prune eval OUTPUT --model {ev.model} --model-args ...")
        check_tasks(ev.tasks, data_dir_path=ev.data_dir, task_dirs=ev.task_dirs, num_fewshot=ev.num_fewshot,
                    fewshot_from_scored_split=ev.fewshot_from_scored_split, limit=ev.limit, local_alias=ev.local_alias)
    if sel.strategy == "search" and sel.proxy_task:  # the search's task floor: an unknown task fails now
        from prune.measure.lmeval import check_tasks

        check_tasks([sel.proxy_task], data_dir_path=ev.data_dir if ev else None, task_dirs=ev.task_dirs if ev else None,
                    limit=sel.proxy_limit, limit_name="select.proxy_limit")
    # -- heal (prune.heal): settings checked against the config, before any weights are loaded --
    if recipe.heal is not None:
        from prune.heal.methods import preflight as heal_preflight, training_windows

        from prune.heal.teacher import preflight_cache

        heal_preflight(recipe.heal, recipe.select, config, n_layers, recipe.model.trust_remote_code)
        heal_windows = training_windows(tokenizer, recipe.heal)  # too little training text fails now, not after scoring
        preflight_cache(recipe.heal, inputs, tokenizer, *heal_windows, output=recipe.output.dir)
    # -- end heal --
    # ---- export (prune.export): lineage of an already pruned source, push_to_hub checks ----
    from prune.export.saving import preflight_export

    parent = preflight_export(recipe, src, n_layers)
    # ---- end export ----
    return {"n_layers": n_layers, "model_type": config.model_type, "source": src, "windows": windows,
            "parent": parent, "inputs": inputs}


def eval_settings(recipe: Recipe) -> dict:
    ev = recipe.evaluate
    return {
        "dtype": recipe.model.dtype, "device_map": recipe.model.device_map,
        "limit": ev.limit if ev else None, "batch_size": ev.batch_size if ev else None,
        "num_fewshot": ev.num_fewshot if ev else None, "seed": ev.seed if ev else None,
        "perplexity": ev.perplexity.model_dump() if ev and ev.perplexity else None,
        "fidelity": ev.fidelity.model_dump() if ev and ev.fidelity else None,
        "tasks": ev.tasks if ev else [], "versions": versions(),
        "apply_chat_template": ev.apply_chat_template if ev else False,
        "fewshot_as_multiturn": ev.fewshot_as_multiturn if ev else None,
    }


# ---- run --------------------------------------------------------------------------------
@dataclass
class RunResult:
    out_dir: Path
    selection: Selection
    scores_before: ScoreResult
    scores_after: ScoreResult | None
    evaluation: dict
    pruning: PruningRecord


@keeps_quiet_mode
def run(recipe: Recipe | str | os.PathLike | dict, *, overrides: list[str] | tuple[str, ...] = (),
        overwrite: bool = False, quiet: bool = False, resume: bool = False) -> RunResult:
    """Run a pruning recipe end to end and write its output folder (see module docstring).

    Finished stages are kept in a progress folder beside the output (:mod:`prune.pipeline.progress`);
    ``resume=True`` reuses them after an interruption instead of recomputing them."""
    recipe_file = None if isinstance(recipe, (Recipe, dict)) else recipe
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:  # a Recipe and --set-style overrides: applied to its data, then validated again
        recipe = load_recipe(recipe.model_dump(mode="json", exclude_unset=True), overrides)
    dist.check_same(recipe.model_dump(mode="json"), "recipe")  # under a launcher: every rank the same recipe
    quiet = quiet or not dist.world().is_main  # one rank talks
    quiet_mode(quiet)
    clock = StageClock()
    overwrite = overwrite or recipe.output.overwrite
    facts = preflight(recipe, overwrite, recipe_file)
    progress = dist.on_main(lambda: RunProgress(recipe.output.dir, recipe, resume=resume))  # rank 0 keeps it
    if progress.resume:
        say(f"resuming from {progress.folder}: reusing {', '.join(progress.found()) or 'nothing yet'}", quiet)
    m, c = recipe.model, recipe.calibration
    def planned(requested: str):
        return plan_execution(m.source, requested, dtype=m.dtype, device_map=m.device_map, max_memory=m.max_memory,
                              n_windows=c.n_samples, seq_len=c.seq_len, batch_size=c.batch_size, revision=m.revision,
                              gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code,
                              cka_windows=recipe.score.cka_windows if "cka" in recipe.score.metrics else None,
                              whole_model=whole_model_reason(recipe), offload_ok=recipe.heal is None)

    plan = agreed_plan(planned(recipe.score.execution), planned)  # rank 0's mode on every rank
    say(plan.describe(), quiet)
    clock.lap("pre-flight")
    engine = make_engine(recipe, plan, facts, quiet)
    clock.lap("load")
    windows = facts["windows"]  # tokenized in preflight: bad text fails before the model loads
    def score_now() -> ScoreResult:  # said only when it happens (a resumed run reuses the stored scores)
        say(f"scoring {facts['n_layers']} blocks{engine.scoring_note} on {c.n_samples} windows x {c.seq_len} tokens",
            quiet)
        return engine.score(windows)

    scores_before = progress.stage("scores", score_now, ScoreResult.to_dict, ScoreResult.from_dict)
    fault_point("scored")
    clock.lap("score")
    selection = progress.stage("selection", lambda: engine.choose(windows, scores_before),
                               Selection.to_dict, Selection.from_dict)
    fault_point("selected")
    clock.lap("choose")
    say(f"removing {len(selection.removed)} of {facts['n_layers']} blocks (0-based): {selection.removed}", quiet)
    if selection.strategy == "verified":
        say(margin_line(selection.details), quiet)
    ev, name = recipe.evaluate, facts["source"].display
    reference = engine.fidelity_reference(ev)  # the original's next-token distributions (prune.measure.fidelity)
    original = progress.stage("original", lambda: engine.evaluate(ev, "original: ", name, "original", reference,
                                                                  is_reference=True)
                              if ev and ev.original else {})
    fault_point("evaluated_original")
    clock.lap("evaluate original")
    params_before = engine.parameters()
    unhealed: dict = {}  # with heal: the pruned model measured before the healing, to show what it won back

    def measure_unhealed():
        unhealed.update(engine.evaluate(ev, "unhealed: ", f"{name} (pruned, before healing)", "pruned_before_healing",
                                        reference))
    kept, healing = engine.remove(selection, measure_unhealed if ev is not None and recipe.heal is not None else None)
    fault_point("pruned")
    clock.lap("remove and heal" if healing is not None else "remove")
    scores_after = engine.score(windows, kept)
    clock.lap("score pruned")
    pruned = engine.evaluate(ev, "pruned:   ", f"{name} (pruned)", "pruned", reference)
    fault_point("evaluated_pruned")
    clock.lap("evaluate pruned")
    counts = {"params_before": params_before, "params_after": engine.parameters(kept),
              "layers_before": facts["n_layers"], "layers_after": len(kept)}
    # lm-eval's own files (eval/original, eval/pruned) and the paired comparison of their examples
    lm_eval_files, paired, healing_paired = lm_eval_outputs(original, pruned, unhealed)
    evaluation = {"original": original, "pruned": pruned, "rows": comparison_rows(original, pruned, counts),
                  "settings": {**eval_settings(recipe), "n_shot": n_shots(pruned)}, **counts,
                  "paired": [p.to_dict() for p in paired]}
    table = None
    if unhealed:  # healed in this run: the pruned model before the healing too, and the healed one paired with it
        evaluation.update(pruned_before_healing=unhealed, paired_healing=[p.to_dict() for p in healing_paired])
        table = healed_markdown(original, unhealed, pruned, counts, UNHEALED)
    record = pruning_record(recipe, facts["source"], selection, kept, scores_before, scores_after,
                            {**counts, "model_type": facts["model_type"]}, healing, clock.elapsed())
    record.execution = plan.to_dict()
    record.dtype = engine.saved_dtype()  # out of core: the shards' dtype, known before they are written (the card)
    record.resumed = progress.resumed
    record.stage_seconds = dict(clock.seconds)  # to here: writing the folder comes after the record
    extra = (paired_section(paired, b=record.label()) + paired_section(healing_paired, UNHEALED, "healed")
             + (f"\n## lm-eval's own tables\n\n{lm_eval_tables(lm_eval_files)}" if lm_eval_files else ""))
    out, record = write_output(engine.save, recipe, record, evaluation, src=facts["source"], parent=facts["parent"],
                               inputs=facts["inputs"], model=getattr(engine, "model", None), table=table,
                               overwrite=overwrite, quiet=quiet, extra_files=lm_eval_files, on_saved=progress.finish,
                               extra_markdown=extra + (healing_markdown(public_data(healing)) if healing is not None else ""))
    clock.lap("write and push" if recipe.output.push_to_hub is not None else "write")
    say(clock.summary(), quiet)
    return RunResult(out, selection, scores_before, scores_after, evaluation, record)


def write_output(save_fn, recipe: Recipe | None, record: PruningRecord, evaluation: dict, *, out_dir=None, src=None,
                 parent=None, inputs=(), model=None, new_step: bool = True, prepare=None, overwrite: bool,
                 quiet: bool, extra_markdown: str = "",
                 extra_files: dict[str, str] | None = None, title: str = "Before / after",
                 table: str | None = None, on_saved=None) -> tuple[Path, PruningRecord]:
    """The one tail of every command that writes a pruned model: the record (extended with its
    lineage when it is a ``new_step``), ``recipe.yaml``, ``eval.json``, ``eval.md`` and the model
    card, saved atomically by ``save_fn(out_dir, record, files, overwrite, inputs)`` (``inputs``: the
    paths the output must never touch, :mod:`prune.io.guard`; ``src``: the model whose license files
    are copied along, :func:`prune.export.lineage.license_files`), then the optional
    push. ``recipe`` may be ``None`` only for a folder that has none (``prune heal`` of a folder
    saved through the Python API): then there is no ``recipe.yaml``. ``on_saved()`` runs once the folder is
    in place, before the push (a run's progress folder is removed then). Returns the folder and the final record."""
    out_dir = out_dir if out_dir is not None else recipe.output.dir
    table = table if table is not None else comparison_markdown(evaluation["rows"])
    from prune.export.lineage import license_files

    # a pruned model pruned again: "original" in the table is the model this step loaded, not the lineage's first
    step_note = (f"\"original\" below is the model this step loaded, the step-{len(parent.chain())} model of the "
                 "lineage (`pruning.json` → `history`), not the lineage's first model.\n\n") if parent is not None else ""
    files = {**(license_files(src) if src is not None else {}),  # the terms travel with the weights
             "eval.json": json.dumps(evaluation, indent=1) + "\n",
             "eval.md": f"# {title}\n\n{step_note}{table}\n" + (f"\n{extra_markdown}" if extra_markdown else ""),
             **(extra_files or {})}
    if recipe is not None:
        files["recipe.yaml"] = recipe.to_yaml()
    if prepare is not None:  # a command's own record and card (prune heal: prune.export.heal.heal_export)
        record, files["README.md"] = prepare(record, files)
    else:
        record, files["README.md"] = prepare_export(record, evaluation, recipe, src, parent, new_step=new_step,
                                                    out_dir=out_dir, model=model)

    def write() -> Path:
        out = save_fn(out_dir, record, files, overwrite, inputs)
        if on_saved is not None:
            on_saved()
        show(f"\n{table}\n" + (f"\n{extra_markdown}" if extra_markdown else "") + f"\nsaved {out}", quiet)
        if recipe is not None and recipe.output.push_to_hub is not None:
            from prune.export.push import push_config

            push_config(out, recipe.output.push_to_hub, quiet=quiet)
        return out

    return dist.on_main(write), record  # under a launcher rank 0 writes; the others wait for it


def pruning_record(recipe: Recipe, src, selection: Selection, kept: list[int], before: ScoreResult,
                   after: ScoreResult | None, facts: dict, healing: dict | None, seconds: float) -> PruningRecord:
    """This step's record (``pruning.json`` before lineage): indices, scores, MSRS before/after,
    calibration, versions."""
    c = recipe.calibration
    return PruningRecord(
        source=src.to_dict(),
        removed=selection.removed,
        kept=kept,
        **facts,
        selection=selection.to_dict(),
        msrs_before=before.msrs,
        msrs_after=after.msrs if after else None,
        scores_before=before.to_dict(),
        scores_after=after.to_dict() if after else None,
        calibration={**c.source().describe(), "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed,
                     "bos": c.bos, "batch_size": c.batch_size, "positions": recipe.score.positions,
                     "cka_windows": recipe.score.cka_windows, "hub": reads_from_hub(c.source())},
        seed=c.seed,
        healing=healing,
        versions=versions(),
        created=utc_now(),
        seconds=round(seconds, 1),
    )
