"""``prune heal RUN_DIR --output NEW_DIR``: heal the pruned model of a saved run folder.

The heal settings come from, in order (later wins): the ``heal:`` section of
``RUN_DIR/recipe.yaml`` (without its ``objective`` and ``bridge`` when a method is named, by
``method``, the config or an override: they belonged to the run's method), a YAML file (``config``: a heal section, or a recipe
holding one), ``method`` / ``data`` / ``field`` / ``rows``, and ``key=value`` overrides
(``steps=200``, ``heal.rank=16``). Everything is checked before a weight is loaded.

* ``lora`` / ``partial`` train the run's pruned model itself.
* ``distill`` (``objective: distill``, :mod:`prune.heal.distill`) trains the same parameters to
  match the original model: the source in ``pruning.json`` (in memory, or as a top-k cache)
  or an existing ``heal.teacher_cache`` file.
* ``replace`` needs the removed run's hidden states in the ORIGINAL model, so it loads the
  source recorded in ``pruning.json``, removes ``k - 1`` of the ``k`` removed blocks and trains
  the one kept; it first checks that every other weight equals the run folder's (a run that
  was healed or edited since is refused rather than silently rebuilt from its source).
* ``heal.bridge`` (and ``method: bridge``, the bridges alone) fits its least-squares maps to the
  ORIGINAL model's hidden states, cut by cut on the run's model, so it loads the source recorded
  in ``pruning.json`` beside the run's model (both in memory; with ``objective: distill`` the original is also the teacher). A
  run that was healed since is refused: the bridges are fitted to the original's blocks.

The result is a NEW complete folder, written atomically (:func:`prune.export.saving`): the
checkpoint, ``pruning.json`` (the run's record, ``healing`` set, kept blocks / counts and the
scores after updated), ``recipe.yaml`` (the run's recipe with the heal section used) and,
with ``evaluate``, ``eval.json`` / ``eval.md`` (original, pruned before healing, healed; with
``evaluate.fidelity`` the healed model's KL to the run's original, whose reference is built first;
with lm-eval tasks, the healed model paired per example against the run's original and against the
run's pruned model (their samples read from the run folder, kept under ``eval/``);
the original is then released, or handed to the healing that needs it: loaded once,
:class:`prune.heal.original.OriginalModel`).
``RUN_DIR`` is only read.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from prune.core.errors import PruneError, first_line, parse_problem
from prune.core.tables import UNHEALED, comparison_rows, healed_markdown
from prune.export.public import public_data
from prune.model.arch import block_index, meta_model
from prune.core.console import keeps_quiet_mode, notes_once
from prune.heal.original import OriginalModel
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
)
from prune.core.config import HEAL_METHODS, HealConfig, Section
from prune.core.config import format_validation_error
from prune.pipeline.recipe import Recipe, apply_overrides, check_heal_data, check_text_path


class _HealOnly(Section):
    heal: HealConfig


def _read_yaml(path: Path, what: str) -> dict:
    from prune.core.yamlsafe import read_yaml

    data = read_yaml(path, f"{path} ({what})") or {}
    if not isinstance(data, dict):
        raise PruneError(f"{path}: {what} must be a mapping")
    return data


#: heal settings of the run's recipe that describe its method, dropped when the user names one (--method, a
#: --config's method, --set method=...)
INHERITED_WITH_THE_METHOD = ("objective", "bridge")


def heal_settings(recipe_data: dict | None, config: str | None = None, method: str | None = None,
                  data: str | None = None, field: list[str] | str | None = None, rows: str | None = None,
                  overrides=()) -> HealConfig:
    """Merge the heal settings (see module docstring) and validate them; one-line errors. ``recipe_data`` is
    expanded already (a run folder's: ``${PRUNE_DATA_DIR}`` alone); ``${VAR}`` in ``config`` and ``overrides``
    is expanded here, once."""
    from prune.pipeline.recipe import expand_env

    settings = (recipe_data or {}).get("heal") or {}
    if not isinstance(settings, dict):
        raise PruneError("the run's recipe.yaml has a heal section that is not a mapping (fix it or give --config)")
    settings = dict(settings)
    cache = settings.get("teacher_cache")  # written relative to where the run ran, or by name only (<local>/name)
    if isinstance(cache, str) and not Path(cache).expanduser().is_file():
        settings.pop("teacher_cache")  # not found here: the default beside the output, never a file at that path
    extra = {}
    if config:
        path = Path(config).expanduser()
        if not path.is_file():
            raise PruneError(f"heal config {'is a folder' if path.is_dir() else 'not found'}: {path} (check the path: "
                             "--config takes a recipe with a heal section, or a YAML file of heal's keys)")
        extra = _read_yaml(path, "heal config")
        recipe_keys = set(Recipe.model_fields) - {"heal"}  # a whole recipe's sections, not a heal section's keys
        if isinstance(extra, dict) and not extra.get("heal") and recipe_keys & set(extra):
            raise PruneError(f"{path} is a recipe without a heal section: give one with heal: (method, steps, ...), "
                             "or a file holding the heal settings alone")
        extra = expand_env(extra.get("heal", extra) or {}, where=str(path))  # the heal section: ${VAR} as in a recipe
        if not isinstance(extra, dict):
            raise PruneError(f"{path}: the heal section must be a mapping (method: lora, steps: 100, ...)")
    overrides = [expand_env(o.removeprefix("heal.")) for o in overrides or ()]  # the user's: ${VAR} as in a recipe
    if method or "method" in extra or any(o.partition("=")[0].strip() == "method" for o in overrides):
        for key in INHERITED_WITH_THE_METHOD:  # a method named: what the run's recipe says of its own method's
            settings.pop(key, None)  # objective and bridge goes (the user's --config and --set may give them again)
    settings.update(extra)
    if method:
        settings["method"] = method
    if data:
        settings["data"] = {"path": data}
    if isinstance(settings.get("data"), str):  # a config's data: PATH, as --data PATH (the flags' field and rows apply)
        settings["data"] = {"path": settings["data"]}
    if field and settings.get("data") is not None:
        settings["data"]["field"] = field[0] if isinstance(field, list) and len(field) == 1 else field
    if rows and settings.get("data") is not None:
        settings["data"]["rows"] = rows
    settings = apply_overrides(settings, overrides, example="steps=200")
    if "method" not in settings:
        raise PruneError(f"no heal method: give --method {'|'.join([*HEAL_METHODS, 'distill'])} (or --config with a "
                         "heal section)")
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
    from prune.io.safetensors import open_file, read_index
    from prune.model.loading import decoder_layers_path

    path = decoder_layers_path(model)
    position = {orig: i for i, orig in enumerate(kept)}
    state = model.state_dict()
    compared = 0
    for file in read_index(run_dir)[1]:  # the checkpoint's own files (not an adapter beside them)
        with open_file(run_dir / file) as handle:
            for key in handle.keys():
                found = block_index(key, path)
                name = key
                if found is not None:
                    orig = run_kept[found[0]]
                    if orig == skip or orig not in position:
                        continue
                    name = f"{path}.{position[orig]}{found[1]}"
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


def with_local_texts(recipe, run: Path, calibration: str | None, evaluate: bool):
    """``recipe`` (read from ``run``) with its calibration file replaced by ``calibration`` when given (the
    same file, found elsewhere: its name must be the recorded one), checked before any model is loaded: a text file the run recorded by name only (``<local>/name``)
    or that is missing here is one line naming the fix."""

    if calibration is not None:
        recorded = recipe.calibration.path
        if Path(calibration).name != Path(recorded).name:  # the scores after must be on the run's text, not another
            raise PruneError(f"--calibration-data {calibration}: the run was scored on {Path(recorded).name} "
                             f"({run / 'recipe.yaml'}); the flag says where that file is here, not another text "
                             "(give the same file)")
        recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"path": calibration})})
    where = str(run / "recipe.yaml")
    check_text_path(recipe.calibration, "calibration", where, "give the file with --calibration-data PATH")
    if evaluate and recipe.evaluate is not None:
        check_text_path(recipe.evaluate.perplexity, "evaluate.perplexity", where,
                        "evaluate the output with prune eval and a recipe naming the file")
    return recipe


def _vouched_task_dirs(eval_cfg, task_dirs: list[str] | None, run: Path, evaluate: bool):
    """``eval_cfg`` with the task folders the user named (``--task-dir``) in place of those RUN_DIR's recipe
    names: a task YAML can import Python (lm-eval's ``!function``), and an input folder cannot run code unasked."""
    named = list(task_dirs or [])
    if named and not (evaluate and eval_cfg is not None and eval_cfg.tasks):
        raise PruneError("--task-dir is read with --evaluate, when RUN_DIR's recipe evaluates lm-eval tasks (remove it)")
    if eval_cfg is None or not evaluate or not eval_cfg.task_dirs or named:
        return eval_cfg.model_copy(update={"task_dirs": named}) if named else eval_cfg
    listed = " ".join(f"--task-dir {d}" for d in eval_cfg.task_dirs)
    raise PruneError(f"{run / 'recipe.yaml'} names lm-eval task folders (evaluate.task_dirs: "
                     f"{', '.join(eval_cfg.task_dirs)}), whose YAML files can import Python: a run folder cannot run "
                     f"code unasked; read them, then name them yourself: {listed}")


def _heal_with_bridges(run: Path, original: OriginalModel, kept: list[int], cfg: HealConfig, dtype, trust: bool,
                       quiet: bool):
    """``heal.bridge`` on a saved run: the ``original`` is loaded beside the run's model and the
    bridges are fitted on it (:func:`prune.heal.methods.heal_model`, the original as ``teacher_model``).
    Returns ``(model, tokenizer, kept, record)``."""
    from prune.heal.teacher import check_teacher_model
    from prune.heal.methods import heal_model
    from prune.model.loading import load_model

    teacher, t_tok = original.take("the bridges are fitted on its hidden states")
    model, tokenizer, _ = load_model(run, dtype=dtype, trust_remote_code=trust)
    check_teacher_model(teacher, model, t_tok, tokenizer)
    windows, val_windows = training_windows(tokenizer, cfg)
    record = heal_model(model, tokenizer, cfg, windows=windows, val_windows=val_windows, teacher_model=teacher,
                        teacher_tokenizer=t_tok, kept=kept, quiet=quiet)
    return model, tokenizer, kept, record


def check_texts(run: Path, cfg: HealConfig, recipe, evaluate: bool, trust: bool) -> None:
    """Cut every window the heal will read, with the run's tokenizer, before any model loads: training
    text too short or a slice that selects nothing failed after loading (the training text) or after
    training (the calibration and evaluation text). An existing teacher cache that distillation will
    read is checked against the training windows (it was, after the original and the student loaded).
    With ``--evaluate`` and lm-eval tasks, the tokenizer's padding token and chat template are checked
    too (lm-eval failed on them after training)."""
    from prune.io.source import ModelSource
    from prune.io.text import calibration_windows_of
    from prune.model.loading import load_tokenizer
    from prune.pipeline.inputs import text_of, text_windows

    tokenizer = load_tokenizer(ModelSource("folder", str(run)), trust)
    windows, val_windows = training_windows(tokenizer, cfg)
    if cfg.objective == "distill" and cfg.hidden_weight == 0:  # an existing teacher cache is taken (teacher auto
        from prune.heal.teacher import preflight_cache  # too): computed on these windows, with this tokenizer

        preflight_cache(cfg.model_copy(update={"teacher": "cache"}) if cfg.teacher == "auto" else cfg, (), tokenizer,
                        windows, val_windows)
    if recipe is None:
        return
    with text_of("calibration"):
        calibration_windows_of(tokenizer, recipe.calibration)
    ev = recipe.evaluate
    if evaluate and ev is not None:
        if ev.perplexity is not None:
            text_windows(tokenizer, "evaluate.perplexity", ev.perplexity, ev.perplexity.seq_len, ev.perplexity.max_windows)
        if ev.fidelity is not None:
            text_windows(tokenizer, "evaluate.fidelity", *ev.fidelity.text(ev.perplexity))
        if ev.tasks:
            from prune.measure.lmeval import check_chat_template, check_tokenizer

            check_tokenizer(tokenizer)
            check_chat_template(tokenizer, ev.apply_chat_template)


def read_run_eval(run: Path) -> dict:
    """The run's ``eval.json`` (``{}`` without one); one line when it is not the object prune writes."""
    path = run / "eval.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8, a 5,000-digit number
        raise PruneError(f"{path}: not readable JSON ({parse_problem(exc)}); remove it or restore the run's own") from None
    wrong = f"{path} is not the evaluation prune writes (an object with original / pruned results)"
    if not isinstance(data, dict) or not all(isinstance(data.get(k) or {}, dict) for k in ("original", "pruned")):
        raise PruneError(f"{wrong}; remove it or restore the run's own")
    try:  # the table the healed folder shows is built from them: a value of another shape fails now, not after training
        comparison_rows(data.get("original") or {}, data.get("pruned") or {},
                        dict.fromkeys(("params_before", "params_after", "layers_before", "layers_after")))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PruneError(f"{wrong}: {type(exc).__name__} {first_line(exc)}; remove it or restore the run's own") from None
    return data


LM_EVAL_FILES = (("results_", ".json"), ("samples_", ".jsonl"))  # what lm-eval writes, and all a heal carries over


def run_lm_eval_files(run: Path, which: str) -> dict[str, str]:
    """lm-eval's files a run folder keeps for its ``which`` model (``eval/original``), ``{name: text}``: only
    :data:`LM_EVAL_FILES`, regular files inside the run folder (a link leading out of it is refused: its target
    would be copied into the output), each parsed (a damaged one is one line, before any training)."""
    from prune.measure.evaluation import samples_of
    from prune.measure.paired import per_example

    folder, root = run / "eval" / which, run.resolve()
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.iterdir()):
        if not any(path.name.startswith(head) and path.name.endswith(tail) for head, tail in LM_EVAL_FILES):
            continue
        real = path.resolve()
        problem = (f"leads to {real}, outside the run folder" if not real.is_relative_to(root)
                   else None if real.is_file() else "is not a regular file")
        if problem:
            raise PruneError(f"{path} {problem}: a heal copies the run's lm-eval files into its output (remove it)")
        try:
            text = real.read_text(encoding="utf-8")
            if path.name.startswith("results_"):
                if not isinstance(json.loads(text), dict):
                    raise ValueError("not a JSON object")
            else:
                for task, records in samples_of({path.name: text}).items():
                    per_example(records, task)
        except PruneError as exc:
            raise PruneError(f"{path}: {exc}") from None
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
            raise PruneError(f"{path}: not the file lm-eval writes ({type(exc).__name__}: {first_line(exc)}); remove "
                             "it or restore the run's own") from None
        out[path.name] = text
    return out


def check_run_tasks_unchanged(files: dict[str, str], setup: dict, quiet: bool | None = None) -> None:
    """Before any training: the run's original was evaluated on the tasks ``--evaluate`` will run on the healed
    model in the same version and with as many few-shot examples (``setup``: :func:`prune.measure.lmeval.check_tasks`'s),
    or the two would not pair (a task copy updated since the run: its questions are scored another way)."""
    from importlib.metadata import version

    from prune.measure.paired import TaskSetup, check_same_setup, task_setup_of

    recorded = task_setup_of([text for name, text in sorted(files.items()) if name.startswith("results_")])
    now = TaskSetup({t: v for t, (v, _) in setup.items() if v is not None}, {t: s for t, (_, s) in setup.items()},
                    version("lm_eval"))
    check_same_setup(recorded, now, set(setup), ("the run's original (eval/original)", "this version of prune"),
                     fix="heal without --evaluate, then evaluate the original and the healed model with prune eval and "
                         "pair them with prune compare",
                     quiet=quiet)


@keeps_quiet_mode
@notes_once()  # the pre-flight's settings note is not said again by the library call it makes
def heal_run(run_dir, output, *, method: str | None = None, config: str | None = None, data: str | None = None,
             field=None, rows: str | None = None, overrides=(), evaluate: bool = False, overwrite: bool = False,
             quiet: bool = False, trust_remote_code: bool = False, source: str | None = None,
             calibration: str | None = None, task_dirs: list[str] | None = None) -> Path:
    """Heal the model of ``run_dir`` into the new folder ``output`` (see module docstring); returns it.

    Code shipped with a checkpoint runs only when ``trust_remote_code`` is given here (the CLI's
    ``--trust-remote-code``): RUN_DIR's own ``recipe.yaml`` is an input and never grants it.
    ``calibration`` replaces the calibration text file of RUN_DIR's recipe (needed when the run
    recorded it by name only, ``<local>/name``: see :mod:`prune.export.public`). Likewise the lm-eval task
    folders of RUN_DIR's recipe (``evaluate.task_dirs``: their YAML files can import Python, ``!function``)
    are read only when the user names them, ``task_dirs`` (the CLI's ``--task-dir``), which replace them."""

    from prune.core.config import EvaluateConfig
    from prune.core.console import StageClock, quiet_mode, say, versions
    from prune.core.records import read_record
    from prune.export.saving import check_output_dir, save
    from prune.measure.evaluation import evaluate_loaded, lm_eval_outputs
    from prune.measure.paired import paired_section
    from prune.measure.scoring import score
    from prune.model.loading import context_length, count_parameters, load_model
    from prune.pipeline.engines import score_options
    from prune.pipeline.orchestrator import write_output
    from prune.io.text import calibration_windows_of

    quiet_mode(quiet)
    clock = StageClock()
    from prune.io.staging import existing

    run = existing(run_dir).resolve()  # a killed writer's half-done overwrite finished first; "." has a name
    out = Path(output).expanduser()
    if not (run / "config.json").is_file() or not (run / "pruning.json").is_file():
        raise PruneError(f"{run} is not a prune run folder (it needs config.json and pruning.json, as written by prune run)")
    from prune.pipeline.inputs import command_inputs, original_inputs, recipe_inputs

    pruning = read_record(run / "pruning.json")  # a record of the wrong shape is one line, here
    recipe_data = _read_yaml(run / "recipe.yaml", "recipe") if (run / "recipe.yaml").is_file() else None
    from prune.pipeline.recipe import INPUT_RECIPE_VARIABLES, check_no_token, expand_env, saved_recipe

    if recipe_data is not None:  # an input folder's recipe reads no other variable of this environment (a token),
        recipe_data = expand_env(recipe_data, INPUT_RECIPE_VARIABLES, str(run / "recipe.yaml"))  # and is expanded once
    cfg = heal_settings(recipe_data, config, method, data, field, rows, overrides)
    check_no_token(cfg.model_dump(mode="json"), "heal settings")  # written into recipe.yaml and the card
    inputs = command_inputs(None, [config, cfg.data.path if cfg.data else None], run_dir=str(run))
    inputs += original_inputs(pruning.source, source)  # loaded by bridges, a replacement block, a teacher, fidelity
    recipe = None
    if recipe_data is not None:
        # the healed folder's recipe names it as output, never with overwrite: a `prune run` of it would replace
        # the healed folder unasked (--overwrite is this command's, as prune run's is its own)
        output_section = {**(recipe_data.get("output") or {}), "dir": str(out), "overwrite": False}
        output_section.pop("push_to_hub", None)  # a heal pushes nothing unless asked (prune push)
        recipe = saved_recipe({**recipe_data, "heal": cfg.model_dump(), "output": output_section}, str(run / "recipe.yaml"))
        check_no_token(recipe.model_dump(mode="json"), str(run / "recipe.yaml"))  # written into the healed folder
        recipe = with_local_texts(recipe, run, calibration, evaluate)
    elif calibration is not None:
        raise PruneError(f"--calibration-data needs {run / 'recipe.yaml'} (the run folder has no recipe to calibrate with)")
    if recipe is not None or task_dirs:
        vouched = _vouched_task_dirs(recipe.evaluate if recipe else None, task_dirs, run, evaluate)
        recipe = recipe.model_copy(update={"evaluate": vouched})
        inputs += recipe_inputs(recipe)  # its calibration, evaluation and healing texts, task folders
    check_output_dir(out, overwrite, inputs, flag="--output")
    run_eval = read_run_eval(run)  # read now: a damaged file fails before the training, not after it
    run_files = {which: run_lm_eval_files(run, which) if evaluate else {} for which in ("original", "pruned")}
    eval_cfg: EvaluateConfig | None = recipe.evaluate if recipe else None
    check_heal_data(cfg, eval_cfg, "heal settings",
                    "--data ../shared/data/c4/c4_web_1480.jsonl --field prefix,gold_completion")
    check_text_path(cfg.data, "heal.data", "heal settings", "give the file with --data PATH")
    if evaluate and eval_cfg is None:
        raise PruneError(f"--evaluate needs an evaluate section in {run / 'recipe.yaml'} (or use prune eval on the output)")
    if evaluate and eval_cfg.tasks:  # as the run's pre-flight (under a launcher too: examples for every process)
        from prune.measure.lmeval import check_tasks

        setup: dict = {}
        check_tasks(eval_cfg.tasks, data_dir_path=eval_cfg.data_dir, task_dirs=eval_cfg.task_dirs,
                    num_fewshot=eval_cfg.num_fewshot, fewshot_from_scored_split=eval_cfg.fewshot_from_scored_split,
                    limit=eval_cfg.limit, quiet=quiet, local_alias=eval_cfg.local_alias, setup=setup)
        check_run_tasks_unchanged(run_files["original"], setup, quiet)
    model_cfg = recipe.model if recipe else None
    dtype = model_cfg.dtype if model_cfg else "auto"
    trust = trust_remote_code  # never from RUN_DIR/recipe.yaml: a downloaded folder cannot grant itself code
    if model_cfg is not None and model_cfg.trust_remote_code and not trust:
        import sys

        print(f"note: {run / 'recipe.yaml'} sets trust_remote_code, which is ignored for an input folder "
              "(pass --trust-remote-code to run the checkpoint's code)", file=sys.stderr)
    from prune.io.source import ModelSource
    from prune.pipeline.inputs import preflight_model

    run_config = preflight_model(ModelSource("folder", str(run)), trust)
    n_after = run_config.num_hidden_layers + (1 if cfg.method == "replace" else 0)
    from prune.model.loading import decoder_layers

    meta = meta_model(run_config, trust_remote_code=trust)
    check_settings(cfg, meta, n_after, context_length(run_config))
    if cfg.bridge != "none" and pruning.kept and len(pruning.kept) == len(decoder_layers(meta)):  # the cuts are known
        from prune.heal.bridge import check_bridge, runs_of

        before = [r[0] - 1 for r in runs_of(pruning.removed) if r[0] > 0 and r[0] - 1 in pruning.kept]
        check_bridge(meta, [pruning.kept.index(b) for b in before], cfg.bridge, names=pruning.kept)
    if cfg.objective == "distill":
        from prune.heal.distill import REPLACE_IN_A_RECIPE
        from prune.heal.teacher import preflight_cache

        if cfg.method == "replace":
            raise PruneError(REPLACE_IN_A_RECIPE)
        if cfg.bridge != "none" and cfg.teacher == "cache":  # the bridges need the original in memory: it teaches too
            raise PruneError(f"heal.teacher cache: the {cfg.bridge} bridge is fitted on the original loaded beside the "
                             "run, which then teaches from memory (no cache is read or written); drop teacher: cache")
        preflight_cache(cfg, inputs, output=out)
    original = None  # the run's original, loaded at most once (the fidelity reference and the healing share it)
    # built from the original's blocks: the source must be known, the run not healed since
    from_original = ("a replacement layer is rebuilt from the source model" if cfg.method == "replace" and cfg.objective == "lm"
                     else "heal.bridge is fitted to the original's blocks" if cfg.bridge != "none" else None)
    if source is not None and not (from_original or cfg.objective == "distill"
                                   or (evaluate and eval_cfg is not None and eval_cfg.fidelity is not None)):
        raise PruneError(f"--source names the original model, which this healing never reads ({cfg.method} on the "
                         "next-token loss, no bridge, no fidelity to measure): drop --source")
    if from_original:
        if not pruning.removed or not pruning.kept or pruning.source is None:
            raise PruneError(f"{run}/pruning.json lacks removed/kept/source: {from_original}")
        if pruning.healing:
            raise PruneError(f"{run} is already healed ({pruning.healing.get('method')}); {from_original} "
                             "(heal the unhealed run folder instead)")
        if cfg.method == "replace":
            check_run(pruning.removed, len(pruning.removed) + len(pruning.kept))
        from prune.export.lineage import recorded_source

        original = OriginalModel(recorded_source(pruning.source, source), dtype, trust, quiet)
    if not cfg.merge and cfg.method != "lora":
        raise PruneError(f"heal.merge: false keeps a LoRA adapter apart; method {cfg.method} has none (use lora)")
    check_texts(run, cfg, recipe, evaluate, trust)

    clock.lap("pre-flight")
    reference = None
    if evaluate and eval_cfg.fidelity is not None:  # the healed model's KL to the run's original, as the run measured it
        from prune.export.lineage import recorded_source
        from prune.measure.evaluation import fidelity_reference

        if pruning.source is None:
            raise PruneError(f"{run}/pruning.json records no source model, and evaluate.fidelity measures against it: "
                             "drop fidelity from the recipe's evaluate section, or use prune eval --fidelity-to")
        if original is None:
            original = OriginalModel(recorded_source(pruning.source, source), dtype, trust, quiet)
        reference_model, reference_tok = original.take("the reference of evaluate.fidelity")
        reference = fidelity_reference(reference_model, reference_tok, eval_cfg, quiet=quiet)
        if from_original or cfg.objective == "distill":  # the healing below builds on it: not loaded again
            original.hold(reference_model, reference_tok)
        del reference_model, reference_tok  # otherwise released before healing loads its own models
        clock.lap("fidelity reference")

    started = _dt.datetime.now(_dt.timezone.utc)
    adapter_tmp = None  # heal.merge: false (LoRA, next-token loss): the adapter is saved apart
    if cfg.bridge != "none":
        model, tokenizer, kept, record = _heal_with_bridges(run, original, pruning.kept, cfg, dtype, trust, quiet)
    elif cfg.objective == "distill":  # -- distill (prune.heal.distill): teacher = the source model or a top-k cache --
        from prune.export.lineage import recorded_source
        from prune.heal.distill import heal_saved_run

        model, tokenizer, kept, record = heal_saved_run(run, out, pruning.model_dump(mode="json"), cfg, dtype, trust,
                                                        quiet, resolve=lambda s: recorded_source(s, source),
                                                        original=original)
    elif cfg.method == "replace":
        model, tokenizer = original.take("the replacement layer learns from its hidden states")
        windows, val_windows = training_windows(tokenizer, cfg)
        from prune.model.surgery import remove_layers

        plan: HealPlan = plan_replacement(model, pruning.removed, cfg, windows, val_windows, quiet=quiet)
        kept = remove_layers(model, plan.remove)
        check_matches_run(model, kept, run, pruning.kept, skip=plan.source_block)
        record = heal_replacement(model, plan, quiet=quiet)
    else:
        model, tokenizer, _ = load_model(run, dtype=dtype, trust_remote_code=trust)
        kept = pruning.kept
        windows, val_windows = training_windows(tokenizer, cfg)
        if cfg.method == "lora":
            import tempfile

            adapter_tmp = tempfile.TemporaryDirectory(prefix="prune-adapter-") if not cfg.merge else None
            record = heal_lora(model, cfg, windows, val_windows, quiet=quiet,
                               adapter_dir=adapter_tmp.name if adapter_tmp else None)
        else:
            record = heal_partial(model, cfg, windows, val_windows, quiet=quiet)
    if adapter_tmp is not None:  # the healed model is the pruned one plus the adapter: score and evaluate that
        from peft import PeftModel

        from prune.heal.methods import peft_quiet

        with peft_quiet():
            model = PeftModel.from_pretrained(model, adapter_tmp.name).merge_and_unload()
    clock.lap("heal")
    record["from_run"] = run.name
    if pruning.healing:
        record["previous"] = pruning.healing

    new = pruning.model_copy(deep=True)
    new.healing = record
    new.kept = kept or []
    new.layers_after = len(kept) if kept else run_config.num_hidden_layers
    new.params_after = count_parameters(model)
    new.healed = started.isoformat(timespec="seconds")
    new.versions = versions()
    new.scores_after = new.msrs_after = None
    if recipe is not None:  # the scores after describe the saved model: recompute them on the same windows
        after = score(model, calibration_windows_of(tokenizer, recipe.calibration), **score_options(recipe, quiet))
        new.scores_after, new.msrs_after = after.to_dict(), after.msrs
        clock.lap("score")
    counts = {"params_before": pruning.params_before, "params_after": new.params_after,
              "layers_before": pruning.layers_before, "layers_after": new.layers_after}
    original, before = run_eval.get("original") or {}, run_eval.get("pruned") or {}
    # the model this healing starts from: the run's pruned model, or (a healed folder healed again) its healed one
    before_label = "before this healing (healed once)" if pruning.healing else UNHEALED
    healed = evaluate_loaded(model, tokenizer, eval_cfg, quiet=quiet, label="healed:   ", reference=reference,
                             lm_eval_name=f"{run.name} (healed)", lm_eval_folder="pruned") if evaluate else {}
    if not evaluate:
        original, before = {}, {}  # the run's figures describe the unhealed model: not carried over
    # lm-eval's files: the run's original's (read back) and the healed model's, paired per example
    # and the healed model against the run's pruned one on the same examples: what the healing won back
    lm_eval_files, paired, healing_paired = lm_eval_outputs(
        {**original, "lm_eval_files": run_files["original"]}, healed, {"lm_eval_files": run_files["pruned"]})
    evaluation = {"original": original, "pruned_before_healing": before, "pruned": healed,
                  "rows": comparison_rows(original, healed, counts), **counts, "paired": [p.to_dict() for p in paired],
                  "paired_healing": [p.to_dict() for p in healing_paired]}
    if recipe is not None and evaluate:
        evaluation["settings"] = run_eval.get("settings")
    if evaluate:
        clock.lap("evaluate")
    new.stage_seconds = dict(clock.seconds)  # this healing's, not the run's

    from prune.export.heal import heal_export, save_adapter

    def save_fn(out_dir, rec, files, ow, inputs):
        if adapter_tmp is not None:
            folder = save_adapter(adapter_tmp.name, out_dir, pruning=rec, files=files, overwrite=ow)
            adapter_tmp.cleanup()
            return folder
        return save(model, tokenizer, out_dir, pruning=rec, files=files, overwrite=ow, inputs=inputs,
                    dtype=recipe.output.dtype if recipe else None)

    result, _ = write_output(save_fn, recipe, new, evaluation, out_dir=out, src=ModelSource("folder", str(run)),
                             inputs=inputs, overwrite=overwrite, quiet=quiet, title="Before / after healing",
                             table=healed_markdown(original, before, healed, counts, before_label),
                             extra_markdown=healing_markdown(public_data(record)) + paired_section(paired, b="healed")
                             + paired_section(healing_paired, before_label, "healed"),
                             extra_files=lm_eval_files,
                             prepare=lambda rec, files: heal_export(rec, run, out, files, recipe, model,
                                                                    adapter=adapter_tmp.name if adapter_tmp else False))
    clock.lap("write")
    say(clock.summary(), quiet)
    return result
