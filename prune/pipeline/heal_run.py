"""``prune heal RUN_DIR --output NEW_DIR``: heal the pruned model of a saved run folder.

The heal settings come from, in order (later wins): the ``heal:`` section of
``RUN_DIR/recipe.yaml``, a YAML file (``config``: a heal section, or a recipe holding one),
``method`` / ``data`` / ``field`` / ``rows``, and ``key=value`` overrides (``steps=200``,
``heal.rank=16``). Everything is checked before a weight is loaded.

* ``lora`` / ``partial`` train the run's pruned model itself.
* ``replace`` needs the removed run's hidden states in the ORIGINAL model, so it loads the
  source recorded in ``pruning.json``, removes ``k - 1`` of the ``k`` removed blocks and trains
  the one kept; it first checks that every other weight equals the run folder's (a run that
  was healed or edited since is refused rather than silently rebuilt from its source).

The result is a NEW complete folder, written atomically (:func:`prune.export.save`): the
checkpoint, ``pruning.json`` (the run's record, ``healing`` set, kept blocks / counts and the
scores after updated), ``recipe.yaml`` (the run's recipe with the heal section used) and,
with ``evaluate``, ``eval.json`` / ``eval.md`` (original, pruned before healing, healed).
``RUN_DIR`` is only read.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import torch
import yaml

from prune.core.errors import PruneError
from prune.heal.methods import (
    HealPlan,
    check_run,
    check_settings,
    heal_lora,
    heal_partial,
    heal_replacement,
    healing_markdown,
    plan_replacement,
    training_windows,
    _meta_model,
)
from prune.core.config import HealConfig, Section
from prune.core.config import format_validation_error
from prune.pipeline.recipe import apply_overrides, check_heal_data


class _HealOnly(Section):
    heal: HealConfig


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PruneError(f"{path}: not valid YAML ({what}): {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PruneError(f"{path}: {what} must be a mapping")
    return data


def heal_settings(recipe_data: dict | None, config: str | None = None, method: str | None = None,
                  data: str | None = None, field: list[str] | str | None = None, rows: str | None = None,
                  overrides=()) -> HealConfig:
    """Merge the heal settings (see module docstring) and validate them; one-line errors."""
    settings = dict((recipe_data or {}).get("heal") or {})
    if config:
        path = Path(config).expanduser()
        if not path.is_file():
            raise PruneError(f"heal config not found: {path}")
        extra = _read_yaml(path, "heal config")
        settings.update(extra.get("heal", extra) or {})
    if method:
        settings["method"] = method
    if data:
        settings["data"] = {"path": data}
    if field and settings.get("data") is not None:
        settings["data"]["field"] = field[0] if isinstance(field, list) and len(field) == 1 else field
    if rows and settings.get("data") is not None:
        settings["data"]["rows"] = rows
    overrides = [o.removeprefix("heal.") for o in overrides or ()]
    settings = apply_overrides(settings, overrides)
    if "method" not in settings:
        raise PruneError("no heal method: give --method lora|replace|partial (or --config with a heal section)")
    try:
        return _HealOnly.model_validate({"heal": settings}).heal
    except Exception as exc:  # pydantic ValidationError
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise PruneError(format_validation_error(exc, "heal settings", _HealOnly)) from None
        raise


def check_matches_run(model, kept: list[int], run_dir: Path, run_kept: list[int], skip: int | None = None) -> int:
    """Compare ``model`` (blocks ``kept``, original indices) with the run folder's safetensors
    (blocks ``run_kept``) tensor by tensor, block ``skip`` excepted; returns how many tensors
    were compared and raises :class:`PruneError` on the first difference."""
    from safetensors import safe_open

    from prune.model.loading import decoder_layers_path

    path = decoder_layers_path(model)
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.+)$")
    position = {orig: i for i, orig in enumerate(kept)}
    state = model.state_dict()
    compared = 0
    for file in sorted(run_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                match = pattern.match(key)
                name = key
                if match is not None:
                    orig = run_kept[int(match.group(1))]
                    if orig == skip or orig not in position:
                        continue
                    name = f"{path}.{position[orig]}.{match.group(2)}"
                if name not in state:
                    continue
                saved = handle.get_tensor(key)
                if not torch.equal(saved, state[name].detach().to("cpu", saved.dtype)):
                    raise PruneError(f"{run_dir}: weight {key} differs from the source model's: the run was healed or "
                                     "edited since it was pruned, and a replacement layer is rebuilt from the source "
                                     "(heal the original run folder, or use --method lora/partial)")
                compared += 1
    if compared == 0:
        raise PruneError(f"{run_dir}: no weight could be compared with the source model (unexpected tensor names)")
    return compared


def _healed_markdown(original: dict, before: dict, healed: dict, facts: dict) -> str:
    """Table: original | pruned (before healing) | healed | retained (healed / original)."""
    from prune.core.tables import _fmt, comparison_rows, fmt_retained

    rows_b = {(r["name"], r["metric"]): r for r in comparison_rows(original, before, facts)}
    lines = ["| task | metric | original | pruned | healed | retained (healed) |", "|---|---|---:|---:|---:|---:|"]
    for r in comparison_rows(original, healed, facts):
        b = rows_b.get((r["name"], r["metric"]), {}).get("pruned") if r["metric"] != "count" else None
        lines.append(f"| {r['name']} | {r['metric']} | {_fmt(r['original'], r['metric'])} | {_fmt(b, r['metric'])} | "
                     f"{_fmt(r['pruned'], r['metric'])} | {fmt_retained(r)} |")
    return "\n".join(lines)


def heal_run(run_dir, output, *, method: str | None = None, config: str | None = None, data: str | None = None,
             field=None, rows: str | None = None, overrides=(), evaluate: bool = False, overwrite: bool = False,
             quiet: bool = False, source: str | None = None) -> Path:
    """Heal the model of ``run_dir`` into the new folder ``output`` (see module docstring); returns it."""
    from transformers import AutoConfig

    from prune.export.save import check_output_dir, save
    from prune.model.loading import context_length, count_parameters, load_model
    from prune.io.source import resolve_source
    from prune.measure.evaluation import evaluate_loaded
    from prune.core.console import quiet_mode, say, versions
    from prune.core.config import EvaluateConfig
    from prune.pipeline.recipe import Recipe

    quiet_mode(quiet)
    run = Path(run_dir).expanduser()
    out = Path(output).expanduser()
    if not (run / "config.json").is_file() or not (run / "pruning.json").is_file():
        raise PruneError(f"{run} is not a prune run folder (it needs config.json and pruning.json, as written by prune run)")
    if out.resolve() == run.resolve() or out.resolve().is_relative_to(run.resolve()):
        raise PruneError(f"--output {out} must be a new folder outside RUN_DIR (RUN_DIR is never modified)")
    check_output_dir(out, overwrite)
    pruning = json.loads((run / "pruning.json").read_text())
    recipe_data = _read_yaml(run / "recipe.yaml", "recipe") if (run / "recipe.yaml").is_file() else None
    cfg = heal_settings(recipe_data, config, method, data, field, rows, overrides)
    from prune.pipeline.recipe import expand_env  # published recipes say ${PRUNE_DATA_DIR}/... (prune.export.public)

    recipe = Recipe.model_validate(expand_env({**recipe_data, "heal": cfg.model_dump()})) if recipe_data else None
    eval_cfg: EvaluateConfig | None = recipe.evaluate if recipe else None
    check_heal_data(cfg, eval_cfg, "heal settings")
    if evaluate and eval_cfg is None:
        raise PruneError(f"--evaluate needs an evaluate section in {run / 'recipe.yaml'} (or use prune eval on the output)")
    if evaluate and eval_cfg.tasks:
        from prune.measure.lmeval import resolve_tasks

        resolve_tasks(eval_cfg.tasks, data_dir_path=eval_cfg.data_dir, task_dirs=eval_cfg.task_dirs)
    model_cfg = recipe.model if recipe else None
    dtype = model_cfg.dtype if model_cfg else "auto"
    trust = model_cfg.trust_remote_code if model_cfg else False
    run_kept = pruning.get("kept")
    removed = pruning.get("removed")
    run_config = AutoConfig.from_pretrained(run, trust_remote_code=trust)
    n_after = run_config.num_hidden_layers + (1 if cfg.method == "replace" else 0)
    check_settings(cfg, _meta_model(run_config, trust), n_after, context_length(run_config))
    src = None
    if cfg.method == "replace":
        if not removed or run_kept is None or not pruning.get("source"):
            raise PruneError(f"{run}/pruning.json lacks removed/kept/source: a replacement layer needs the original model")
        if pruning.get("healing"):
            raise PruneError(f"{run} is already healed ({pruning['healing'].get('method')}); a replacement layer is "
                             "rebuilt from the source model (heal the unhealed run folder instead)")
        check_run(removed, len(removed) + len(run_kept))
        from prune.export.lineage import recorded_source

        src = recorded_source(pruning["source"], source)
    if not cfg.merge and cfg.method != "lora":
        raise PruneError(f"heal.merge: false keeps a LoRA adapter apart; method {cfg.method} has none (use lora)")

    started = _dt.datetime.now(_dt.timezone.utc)
    if cfg.method == "replace":
        say(f"loading the original model {src.display} (the replacement layer learns from its hidden states)", quiet)
        model, tokenizer, _ = load_model(src.path, gguf_file=src.gguf_file, dtype=dtype, revision=src.revision,
                                         trust_remote_code=trust)
        windows, val_windows = training_windows(tokenizer, cfg)
        from prune.model.surgery import remove_layers

        plan: HealPlan = plan_replacement(model, removed, cfg, windows, val_windows, quiet=quiet)
        kept = remove_layers(model, plan.remove)
        check_matches_run(model, kept, run, run_kept, skip=plan.source_block)
        record = heal_replacement(model, plan, quiet=quiet)
    else:
        model, tokenizer, _ = load_model(run, dtype=dtype, trust_remote_code=trust)
        kept = run_kept
        windows, val_windows = training_windows(tokenizer, cfg)
        if cfg.method == "lora":
            import tempfile

            adapter_tmp = tempfile.TemporaryDirectory(prefix="prune-adapter-") if not cfg.merge else None
            record = heal_lora(model, cfg, windows, val_windows, quiet=quiet,
                               adapter_dir=adapter_tmp.name if adapter_tmp else None)
        else:
            record = heal_partial(model, cfg, windows, val_windows, quiet=quiet)
    record["from_run"] = run.name
    if pruning.get("healing"):
        record["previous"] = pruning["healing"]

    new = dict(pruning)
    new.update(healing=record, kept=kept, layers_after=len(kept) if kept is not None else run_config.num_hidden_layers,
               params_after=count_parameters(model), healed=started.isoformat(timespec="seconds"), versions=versions())
    if recipe is not None:  # the scores after describe the saved model: recompute them on the same windows
        from prune.io.text import calibration_windows, load_text
        from prune.measure.scoring import score

        c, sc = recipe.calibration, recipe.score
        cal = calibration_windows(tokenizer, load_text(c.source()), c.n_samples, c.seq_len, c.seed, c.bos)
        after = score(model, cal, batch_size=c.batch_size, positions=sc.positions, metrics=tuple(sc.metrics),
                      cka_windows=sc.cka_windows, beta=sc.beta, tau=sc.tau, progress=not quiet)
        new.update(scores_after=after.to_dict(), msrs_after=after.msrs)
    else:
        new.update(scores_after=None, msrs_after=None)
    files = {}
    if recipe_data is not None:
        files["recipe.yaml"] = yaml.safe_dump({**recipe_data, "heal": cfg.model_dump(mode="json"),
                                               "output": {**recipe_data.get("output", {}), "dir": str(out)}},
                                              sort_keys=False)
    if evaluate:
        healed = evaluate_loaded(model, tokenizer, eval_cfg, quiet=quiet, label="healed:   ")
        run_eval = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
        facts = {"params_before": pruning.get("params_before"), "params_after": new["params_after"],
                 "layers_before": pruning.get("layers_before"), "layers_after": new["layers_after"]}
        original, before = run_eval.get("original", {}), run_eval.get("pruned", {})
        table = _healed_markdown(original, before, healed, facts)
        from prune.core.tables import comparison_rows
        from prune.pipeline.orchestrator import eval_settings

        files["eval.json"] = json.dumps({"original": original, "pruned_before_healing": before, "pruned": healed,
                                         "rows": comparison_rows(original, healed, facts),
                                         "settings": eval_settings(recipe), **facts}, indent=1) + "\n"
        files["eval.md"] = f"# Before / after healing\n\n{table}\n\n{healing_markdown(record)}"
        say(f"\n{table}\n", quiet)
    from prune.export.heal import heal_export, save_adapter

    new, files["README.md"] = heal_export(new, run, out, files, recipe, model, adapter=not cfg.merge)
    if not cfg.merge:
        result = save_adapter(adapter_tmp.name, out, pruning=new, files=files, overwrite=overwrite)
        adapter_tmp.cleanup()
    else:
        result = save(model, tokenizer, out, pruning=new, files=files, overwrite=overwrite,
                      dtype=recipe.output.dtype if recipe else None)
    say(f"saved {result}", quiet)
    return result
