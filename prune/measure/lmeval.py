"""lm-eval on the in-memory model, with offline copies of the standard tasks.

``run_lm_eval(model, tokenizer, ["arc_easy", "piqa"], ...)`` wraps the model in lm-eval's
``HFLM`` (no save and reload) and runs ``lm_eval.simple_evaluate`` with an
``EvaluationTracker``, so lm-eval's own files can be written (:meth:`LmEvalRun.write`).
Task, group and tag names go straight to lm-eval, so users with Hub access get the registry's
tasks. For offline use the package ships task YAMLs (``prune/tasks/*_local.yaml``, tag
``prune_local``) that read local JSONL copies from a data folder given by ``data_dir=`` or
the ``PRUNE_DATA_DIR`` environment variable: when a data folder is set, the standard names
below run those local tasks (``arc_easy`` -> ``arc_easy_local``), said once on the terminal
and reported under the local name (``arc_easy_local``); ``local_alias=True`` reports them
under the registry name instead. Folders of the user's own task YAMLs are added with
``task_dirs=`` (lm-eval's ``include_path``).

:func:`check_tasks` finds every task problem before a model is loaded: an unknown name, a
task whose data cannot be loaded (offline and not cached), a group or tag with no task in it,
and few-shot examples that would come from the split being scored (refused unless
``fewshot_from_scored_split=True``; then the task is marked in the results).

Prompts follow lm-eval's own tasks: ``Question: ...\\nAnswer:`` for ARC, HellaSwag's context
as lm-eval cleans it (``prune/tasks/hellaswag_context.py``) reported as ``acc_norm``, WinoGrande with
partial scoring (the continuation scored after each filled-in option). BoolQ's passages lack
the title SuperGLUE's begin with (the copy has none): its figures are not lm-eval's ``boolq``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prune.core.errors import PruneError, first_line

#: standard task name -> offline task shipped in prune/tasks
LOCAL_TASKS = {
    "arc_easy": "arc_easy_local",
    "arc_challenge": "arc_challenge_local",
    "piqa": "piqa_local",
    "hellaswag": "hellaswag_local",
    "winogrande": "winogrande_local",
    "boolq": "boolq_local",
    "openbookqa": "openbookqa_local",
    "copa": "copa_local",
}
#: shipped copies whose prompts are not lm-eval's task's (BoolQ's passages lack their titles): their figures
#: are published under the copy's own name (``prune.export.modelindex.published_name``), never as lm-eval's task
DIFFERS_FROM_LM_EVAL = frozenset({"boolq"})
#: the metric reported first for each task (lm-eval's usual headline metric)
HEADLINE = {"hellaswag": "acc_norm", "openbookqa": "acc_norm", "arc_challenge": "acc_norm", "arc_easy": "acc",
            "piqa": "acc", "winogrande": "acc", "boolq": "acc", "copa": "acc"}


def git_commit_quietly() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (the results' ``git_hash``: ``git describe --always`` in the working
    folder, else the commit a ``.git`` folder above names) without git's "fatal: not a git repository" on the
    terminal when the folder is not in a checkout."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()  # noqa: S607
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: ``explicit``, else ``$PRUNE_DATA_DIR``, else None."""
    value = explicit or os.environ.get("PRUNE_DATA_DIR")
    return Path(value).expanduser().resolve() if value else None


def local_task_dir(folder: Path) -> Path:
    """Materialise the shipped task YAMLs for ``folder`` (cached per folder) and return their dir."""
    if not (folder / "tasks").is_dir():
        raise PruneError(f"task data folder {folder} has no tasks/ subfolder (point --data-dir, evaluate.data_dir in a recipe, or PRUNE_DATA_DIR to the shared data folder)")
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("PRUNE_CACHE", Path.home() / ".cache" / "prune")) / "tasks" / digest
    cache.mkdir(parents=True, exist_ok=True)
    for item in resources.files("prune.tasks").iterdir():
        if item.name.endswith((".yaml", ".py")):  # a task's !function helpers sit beside its YAML
            # inside YAML's double quotes: escaped as JSON escapes a string (a folder named with '"' broke the YAML,
            # and lm-eval then called the task unknown; a newline could have added keys)
            text = item.read_text().replace("{data_dir}", json.dumps(str(folder))[1:-1])
            target = cache / item.name
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
    return cache


def canonical_name(task: str) -> str:
    """``arc_easy_local`` -> ``arc_easy`` (the registry name of a shipped local copy)."""
    return task[: -len("_local")] if task.endswith("_local") and task[: -len("_local")] in LOCAL_TASKS else task


def reported_name(task: str, local_alias: bool = False) -> str:
    """The name results are reported under: lm-eval's own, or with ``local_alias`` the registry
    name of a shipped local copy (``arc_easy_local`` -> ``arc_easy``)."""
    return canonical_name(task) if local_alias else task


def shots_of(task_default: int | None, asked: int | None) -> int:
    """The few-shot examples lm-eval gives a task (``simple_evaluate``): a task whose YAML says 0 stays
    0-shot, else ``asked`` when given, else the YAML's number, else 0."""
    if task_default == 0:
        return 0
    return asked if asked is not None else (task_default or 0)


def local_data_file(name: str, data_dir_path=None) -> Path | None:
    """The data file a shipped local task (``copa_local``) reads under the data folder, or None."""
    try:
        text = resources.files("prune.tasks").joinpath(f"{name}.yaml").read_text()
    except (FileNotFoundError, OSError):
        return None
    found = re.search(r'"\{data_dir\}/([^"]+)"', text)
    folder = data_dir(data_dir_path)
    return folder / found.group(1) if found and folder else None


def why_not_loaded(exc: BaseException) -> str:
    """The first line of ``exc``, and of the error under it when that says more (datasets' "An error occurred
    while generating the dataset" over pyarrow's "JSON parse error: ... in row 0")."""
    said, inner = first_line(exc), exc
    while (below := inner.__cause__ or inner.__context__) is not None and below is not inner:
        inner = below
    deeper = first_line(inner)
    return f"{said}: {deeper}" if inner is not exc and deeper and deeper not in said else said


def check_tasks(tasks: list[str], *, data_dir_path=None, task_dirs=None, num_fewshot: int | None = None,
                fewshot_from_scored_split: bool = False, quiet: bool | None = None, limit: int | float | None = None,
                limit_name: str = "evaluate.limit", local_alias: bool = False, setup: dict | None = None) -> list[str]:
    """Every task problem as one ``PruneError`` line, before any model is loaded (module docstring);
    loads each task's data once (lm-eval's ``TaskManager.load``). Under a launcher, a task whose examples
    (after ``limit``, named ``limit_name``) are fewer than the processes is refused: a process left without
    one fails. Returns lm-eval's names; ``setup``, a dict given, receives ``{task: (version, few-shot examples)}``
    of every task that will run, as lm-eval's results file will record them (text)."""
    import warnings

    check_limit_over_ranks(limit, limit_name)  # before any task data loads
    names, manager = resolve_tasks(tasks, data_dir_path=data_dir_path, task_dirs=task_dirs)
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    notes = [f"lm-eval: {asked} runs the local copy {name} (from {data_dir(data_dir_path)}/tasks), reported as "
             f"{reported_name(name, local_alias)}"
             for asked, name in zip(tasks, names) if asked != name]
    for asked, name in zip(tasks, names):
        # lm-eval's and datasets' own logs of a failed load ("Failed to load JSON from file ..."): the error line says it
        loggers = [logging.getLogger(n) for n in {"datasets", *logging.root.manager.loggerDict}
                   if n.startswith(("lm_eval", "datasets"))]
        previous = [(lg, lg.level) for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = manager.load(name)
        except Exception as exc:
            local = LOCAL_TASKS.get(name)
            file = local_data_file(name, data_dir_path)
            hint = (f"check its data file {file}" if file else "check its data files" if name.endswith("_local") else
                    "offline and not in the datasets cache: run once online to cache it" if offline else
                    "check the network and the task's dataset_path")
            if local:
                hint += f", or use the local copy {local} (--data-dir, evaluate.data_dir in a recipe, or PRUNE_DATA_DIR)"
            raise PruneError(f"lm-eval task {asked!r}: its data could not be loaded ({why_not_loaded(exc)}); {hint}") from None
        finally:
            for lg, level in previous:
                lg.setLevel(level)
        leaves = loaded.get("tasks", {})
        if not leaves:
            raise PruneError(f"lm-eval group or tag {asked!r} has no task in it (check its YAML's task list)")
        for leaf, task in leaves.items():
            _check_examples_over_ranks(leaf, task, limit, limit_name)
            cfg = task.config
            shots = shots_of(cfg.num_fewshot, num_fewshot)
            if setup is not None:
                setup[leaf] = (None if task.VERSION is None else str(task.VERSION), str(shots))
            get = lambda key: getattr(cfg, key, None)  # noqa: E731 - a TaskConfig read as fewshot_splits reads it
            source, scored = fewshot_splits(get)
            if shots <= 0 or source is None:
                continue
            if source == scored and not fewshot_from_scored_split:
                raise PruneError(f"lm-eval task {leaf!r}: {shots}-shot examples would be drawn from its {scored!r} split, "
                                 f"the split it scores; use num_fewshot 0, a task with a training or validation split, "
                                 f"or allow it: --fewshot-from-scored-split (evaluate.fewshot_from_scored_split in a recipe; the results are "
                                 f"then marked)")
            pool = _fewshot_pool_size(task)
            # lm-eval draws one more (then drops the question itself) when the named few-shot split, None included,
            # equals test_split (None included: a task scoring its validation split and naming no few-shot split)
            extra = int(named_fewshot_split(get) == get("test_split"))
            need = shots + extra
            if pool is not None and pool < need:
                raise PruneError(f"lm-eval task {leaf!r}: {shots}-shot examples are drawn from its {source!r} split, "
                                 f"which holds {pool} example(s) (lm-eval would fail after the model is loaded): lower "
                                 f"num_fewshot to at most {max(pool - extra, 0)}, or give the task more "
                                 "few-shot examples")
    from prune.core.console import say

    for note in notes:  # once every check passed: an error stays the only line
        say(note, quiet)
    return names


def _check_examples_over_ranks(name: str, task, limit: int | float | None, limit_name: str) -> None:
    """Under a launcher lm-eval scores ``limit`` examples of a task (a fraction below 1: ``ceil(n x limit)``), a share
    on each process: fewer than the processes leaves one without any, which fails (a traceback after loading)."""
    from prune.core import dist

    w = dist.world()
    if not w.distributed:
        return
    try:
        n = len(task.eval_docs)
    except Exception:  # noqa: BLE001 - unknown here: lm-eval's run says what is wrong
        return
    scored = n if limit is None else min(n, int(limit)) if limit >= 1 else math.ceil(n * limit)
    if scored < w.size:
        given = f" with {limit_name}={limit}" if limit is not None else ""
        raise PruneError(f"lm-eval task {name!r} scores {scored} example(s){given}, fewer than the processes ({w.size}): "
                         "each process scores a share and one without any fails (raise the limit, or launch fewer "
                         "processes)")


def _fewshot_pool_size(task) -> int | None:
    """How many examples a loaded lm-eval task draws its few-shot examples from; None when unknown."""
    try:
        docs = task.fewshot_docs()
        return None if docs is None else len(docs)
    except Exception:  # noqa: BLE001 - a task of its own making: lm-eval's run says what is wrong
        return None


def task_manager(include: list[str], defaults: bool):
    """lm-eval's ``TaskManager`` over the ``include`` folders, with its own ~10,000 task YAMLs when
    ``defaults`` (indexing them costs ~9 s of CPU, so the full index is built only when a task is
    not in ``include``: local copies alone index in ~0.1 s). Kept per process while the folders'
    YAML files (names and modification times) stay the same; the full indexes apart from the cheap
    ones, so that many folders of local tasks never push a full index out."""
    stamp = tuple((d, tuple(sorted((str(f), f.stat().st_mtime_ns) for f in Path(d).rglob("*.yaml")))) for d in include)
    return (_full_task_manager if defaults else _local_task_manager)(stamp)


def _new_task_manager(stamp: tuple, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[d for d, _ in stamp] or None, include_defaults=defaults, verbosity="ERROR")


@functools.lru_cache(maxsize=4)
def _full_task_manager(stamp: tuple):
    return _new_task_manager(stamp, defaults=True)


@functools.lru_cache(maxsize=16)
def _local_task_manager(stamp: tuple):
    return _new_task_manager(stamp, defaults=False)


def resolve_tasks(tasks: list[str], *, data_dir_path: str | os.PathLike | None = None,
                  task_dirs: list[str] | None = None):
    """``(lm-eval task names, TaskManager)``; unknown names fail here, before any model work."""
    folder = data_dir(data_dir_path)
    include = [str(Path(d).expanduser().resolve()) for d in task_dirs or []]
    for d in include:
        if not Path(d).is_dir():
            raise PruneError(f"task folder not found: {d} (check --include-path, or evaluate.task_dirs in a recipe)")
    names = []
    for task in tasks:
        if task.endswith("_local") and folder is None:
            raise PruneError(f"task {task!r} reads local data: give --data-dir (evaluate.data_dir in a recipe) or set "
                             "PRUNE_DATA_DIR")
        names.append(LOCAL_TASKS.get(task, task) if folder is not None else task)
    if folder is not None:
        include.insert(0, str(local_task_dir(folder)))
    manager = task_manager(include, defaults=False) if include else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = task_manager(include, defaults=True)
    known = set(manager.all_tasks)
    for task, name in zip(tasks, names):
        if name not in known:
            import difflib

            close = difflib.get_close_matches(task, sorted(known | set(LOCAL_TASKS)), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = ("" if folder is not None else "; offline, give --data-dir (evaluate.data_dir in a recipe) or set "
                     f"PRUNE_DATA_DIR to use the local copies of {', '.join(LOCAL_TASKS)}")
            raise PruneError(f"unknown lm-eval task {task!r}{hint}{where}")
    return names, manager


def check_tokenizer(tokenizer) -> None:
    """lm-eval pads batches with the pad token (else unk, else eos); refuse a tokenizer with none."""
    if all(getattr(tokenizer, name, None) is None for name in ("pad_token", "unk_token", "eos_token")):
        raise PruneError("the tokenizer has no pad, unk or eos token, which lm-eval needs to pad batches "
                         "(add one: tokenizer.add_special_tokens({'pad_token': ...}) with an id inside the vocabulary)")


def check_chat_template(tokenizer, apply: bool | str, flag: str = "evaluate.apply_chat_template") -> None:
    """``apply`` (lm-eval's ``apply_chat_template``: True, or a template's name) needs the tokenizer to have
    that template; without one lm-eval failed with a traceback after the model was loaded and scored."""
    if not apply:
        return
    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        raise PruneError(f"{flag}: the tokenizer has no chat template (drop {flag}, or evaluate a model whose "
                         "tokenizer has one, such as an instruct model)")
    if not isinstance(templates, dict):
        return  # one template: lm-eval uses it, whatever name was asked for
    wanted = apply if isinstance(apply, str) else "default"
    if wanted not in templates:
        raise PruneError(f"{flag}={apply!r}: the tokenizer's templates are {', '.join(templates)} and none is "
                         f"{wanted!r} (name one of them)")


@dataclass
class LmEvalRun:
    """One ``lm_eval.simple_evaluate`` call: its output (``results``, without the samples), the
    per-example ``samples`` per task, our ``summary`` (see :func:`evaluate_tasks`) and the
    ``tracker`` (lm-eval's ``EvaluationTracker``) that writes lm-eval's own files."""

    results: dict
    samples: dict
    summary: dict
    tracker: Any

    def write(self, folder: str | os.PathLike, model_name: str | None = None) -> Path:
        """lm-eval's files, as its CLI writes them with ``--output_path DIR --log_samples``:
        ``DIR/<model>/results_<date>.json`` (configs, versions, n-shot, task hashes) and
        ``DIR/<model>/samples_<task>_<date>.jsonl``; returns ``DIR/<model>``. ``folder`` is ``DIR/<model>``."""
        from lm_eval.utils import sanitize_model_name

        folder = Path(folder)
        general = self.tracker.general_config_tracker
        if model_name:
            general.model_name = model_name
        general.model_name_sanitized = sanitize_model_name(folder.name)
        self.tracker.output_path = str(folder.parent)
        results = copy.deepcopy(self.results)
        samples = copy.deepcopy(self.samples)  # the tracker rewrites them as it saves
        for records in samples.values():  # in document order (lm-eval's int doc_id), as one process writes them:
            records.sort(key=lambda r: r["doc_id"])  # a launch gathers them rank by rank
        self.tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            self.tracker.save_results_samples(task_name=task, samples=samples[task])
        if not list(folder.glob("results_*.json")):
            raise PruneError(f"lm-eval could not write its results to {folder} (is it writable?)")
        return folder

    def files(self, model_name: str | None = None, folder: str = "model") -> dict[str, str]:
        """The files :meth:`write` puts in ``DIR/<folder>``, as ``{file name: text}`` (for a folder saved atomically)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.write(Path(tmp) / folder, model_name)
            return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}

    def table(self) -> str:
        """lm-eval's own ``make_table`` (and its groups table, when there are groups)."""
        from lm_eval.utils import make_table

        out = make_table(self.results)
        if self.results.get("groups"):
            out += "\n" + make_table(self.results, "groups")
        return out


def summarize(out: dict, *, local_alias: bool = False) -> dict:
    """``{name: {"metrics", "stderr", "n", "lower_is_better"}}`` of every task and group in lm-eval's
    output (metrics of an answer filter other than ``none`` named ``metric,filter``, as
    :func:`prune.measure.paired.row_name`; ``lower_is_better``: the metrics lm-eval marks so, e.g. perplexity), keyed by
    :func:`reported_name`; groups get ``"group": True`` (their aggregate) and few-shot examples drawn
    from the scored split ``"fewshot_from_scored_split": True``."""
    from prune.measure.paired import row_name

    results = {}
    groups = set(out.get("groups", {}))
    for name, raw in out["results"].items():
        metrics, stderr = {}, {}
        for key, value in raw.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)  # each answer filter its own metric, named as the paired table does
            if metric.endswith("_stderr"):
                stderr[row_name(metric[: -len("_stderr")], filt)] = float(value) if value == value else None
            else:
                metrics[row_name(metric, filt)] = float(value)
        better = out.get("higher_is_better", {}).get(name, {})  # lm-eval's own direction of each metric
        entry: dict[str, Any] = {"metrics": metrics, "stderr": stderr,
                                 "n": out.get("n-samples", {}).get(name, {}).get("effective"),
                                 "n_shot": out.get("n-shot", {}).get(name),
                                 "lower_is_better": sorted(m for m in metrics if better.get(m.split(",")[0]) is False)}
        if name in groups:
            entry["group"] = True
        cfg = out.get("configs", {}).get(name)
        if cfg and out.get("n-shot", {}).get(name):
            source, scored = fewshot_splits(cfg.get)
            if source is not None and source == scored:
                entry["fewshot_from_scored_split"] = True
        if cfg and isinstance(cfg.get("dataset_path"), str):  # what the task scored: the model-index names it
            entry["dataset"] = {"path": cfg["dataset_path"], "name": cfg.get("dataset_name"),
                                "split": fewshot_splits(cfg.get)[1]}
        results[reported_name(name, local_alias)] = entry
    return results


def fewshot_splits(get) -> tuple[str | None, str | None]:
    """``(split the few-shot examples are drawn from, split scored)`` of a task config (``get(key)``: an
    attribute of lm-eval's ``TaskConfig``, or a key of a results file's ``configs``), by lm-eval's rule
    (``ConfigurableTask.fewshot_docs``): ``fewshot_config.split``, else the few-shot split, else train, else
    validation, else test; ``None`` when, with no few-shot split named, ``fewshot_config.samples`` fixes the
    examples (a named split takes precedence over samples, as lm-eval warns)."""
    scored = get("test_split") or get("validation_split")
    named = named_fewshot_split(get)
    if named is None and _fewshot_config(get).get("samples") is not None:
        return None, scored
    return named or get("training_split") or get("validation_split") or get("test_split"), scored


def _fewshot_config(get) -> dict:
    fewshot = get("fewshot_config")
    return fewshot if isinstance(fewshot, dict) else vars(fewshot) if fewshot is not None else {}


def named_fewshot_split(get) -> str | None:
    """The split a task config names for its few-shot examples (``fewshot_config.split``, else ``fewshot_split``)."""
    return _fewshot_config(get).get("split") or get("fewshot_split")


def n_shots(result: dict | None) -> dict[str, int]:
    """``{task: few-shot examples lm-eval gave it}`` of an evaluation result's ``tasks`` (:func:`summarize`)."""
    return {t: e["n_shot"] for t, e in ((result or {}).get("tasks") or {}).items() if e.get("n_shot") is not None}


def check_limit_over_ranks(limit: int | float | None, limit_name: str = "evaluate.limit") -> None:
    """Under a launcher lm-eval gives each process a share of a task's examples, and a process left
    without one fails: a ``limit`` below the number of processes is refused in one line (a fractional one, or
    a task with fewer examples, by :func:`check_tasks` once the task is loaded)."""
    from prune.core import dist

    w = dist.world()
    if w.distributed and limit is not None and limit >= 1 and int(limit) < w.size:
        raise PruneError(f"{limit_name}={limit} is below the number of processes ({w.size}): each process scores a "
                         f"share of a task's examples and one without any fails (raise the limit to at least {w.size}, "
                         "or launch fewer processes)")


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int | str = 8,
                num_fewshot: int | None = None, seed: int = 0, data_dir_path=None, task_dirs=None, progress: bool = True,
                log_samples: bool = True, apply_chat_template: bool | str = False,
                fewshot_as_multiturn: bool | None = None, local_alias: bool = False,
                model_args: str | None = None) -> LmEvalRun | None:
    """Run lm-eval ``tasks`` with an ``EvaluationTracker`` on ``model``: an in-memory model (wrapped
    in ``HFLM``; ``tokenizer`` is its tokenizer) or the name of one of lm-eval's backends (``"hf"``,
    ``"vllm"``), which then loads the model itself from ``model_args`` (see :func:`backend_model_args`).
    Returns None on the processes of a data-parallel run other than the first (lm-eval gathers there)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from prune.measure.lmeval_dist import results_on_every_rank, spread_over_ranks

    check_limit_over_ranks(limit)
    names, manager = resolve_tasks(tasks, data_dir_path=data_dir_path, task_dirs=task_dirs)
    # lm-eval warns that an in-memory model was passed and that num_fewshot was set: both intended
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("lm_eval")]
    previous = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        device = None
        if isinstance(model, str):
            lm = model
            if "device=" not in (model_args or ""):  # lm-eval's hf default is cuda, even where there is none
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            from lm_eval.models.huggingface import HFLM

            check_tokenizer(tokenizer)
            # a copy: HFLM sets pad_token on the tokenizer it gets, which must not leak into the saved one
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            lm = spread_over_ranks(lm)  # under a launcher: a share of the examples per rank (prune.measure.lmeval_dist)
        tracker = EvaluationTracker()
        import lm_eval.evaluator

        git_hash, lm_eval.evaluator.get_git_commit_hash = lm_eval.evaluator.get_git_commit_hash, git_commit_quietly
        try:
            out = lm_eval.simple_evaluate(
                model=lm, model_args=model_args if isinstance(model, str) else None, tasks=names, task_manager=manager,
                num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                log_samples=log_samples, evaluation_tracker=tracker, verbosity="ERROR" if not progress else "WARNING",
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=bool(apply_chat_template) if fewshot_as_multiturn is None else fewshot_as_multiturn,
            )
        except TypeError as exc:  # a model_args key the backend or the model's class does not take: one line
            if not (isinstance(model, str) and model_args and "unexpected keyword argument" in str(exc)):
                raise
            raise PruneError(f"--model-args {model_args!r}: lm-eval's {model} backend refused it "
                             f"({first_line(exc)}); give the keys it takes (e.g. dtype=bfloat16,max_length=2048)") from None
        finally:
            lm_eval.evaluator.get_git_commit_hash = git_hash
        if not isinstance(model, str):  # an in-memory model spread by us: every rank gets the results
            out = results_on_every_rank(out)
    finally:
        for lg, level in previous:
            lg.setLevel(level)
    if out is None:  # a data-parallel process other than the first
        return None
    samples = out.pop("samples", {})
    return LmEvalRun(out, samples, summarize(out, local_alias=local_alias), tracker)


#: lm-eval backends ``prune eval --model`` passes through (lm-eval loads the model itself)
BACKENDS = ("hf", "vllm")


def world_size() -> int:
    """Processes of a data-parallel launch (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_backend(backend: str) -> None:
    """One line when ``backend`` is unknown or its package is missing (before any model work)."""
    import importlib.util

    if backend not in BACKENDS:
        raise PruneError(f"unknown lm-eval model backend {backend!r} (use one of: {', '.join(BACKENDS)})")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise PruneError("--model vllm needs vLLM, which is not installed (pip install vllm, on a machine with a GPU); "
                         "or use --model hf")


def backend_model_args(source: str, model_args: str | None = None, *, backend: str = "hf", dtype: str = "auto",
                       gguf_file: str | None = None, trust_remote_code: bool = False) -> str:
    """lm-eval's ``model_args`` string for ``source``: ``pretrained=SOURCE`` first, then the user's
    ``model_args`` unchanged, then ``dtype`` / ``gguf_file`` / ``trust_remote_code`` and, for the ``hf``
    backend, ``use_kernels`` as every load of the toolkit (``prune.model.loading.USE_HUB_KERNELS``)
    unless given there."""
    from prune.core.config import resolve_dtype
    from prune.model.loading import USE_HUB_KERNELS, dtype_name

    given = {part.split("=", 1)[0].strip() for part in (model_args or "").split(",") if "=" in part}
    if "pretrained" in given:
        raise PruneError("--model-args must not set pretrained: the model is the MODEL argument")
    parts = [f"pretrained={source}"] + ([model_args.strip(",")] if model_args else [])
    resolved = resolve_dtype(dtype)  # lm-eval reads torch's own names (getattr(torch, dtype)): bf16 -> bfloat16
    extra = {"dtype": None if resolved == "auto" else dtype_name(resolved), "gguf_file": gguf_file,
             "trust_remote_code": True if trust_remote_code else None, "use_kernels": USE_HUB_KERNELS if backend == "hf" else None}
    parts += [f"{k}={v}" for k, v in extra.items() if v is not None and k not in given]
    return ",".join(parts)


def evaluate_tasks(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int | str = 8,
                   num_fewshot: int | None = None, seed: int = 0, data_dir_path=None, task_dirs=None,
                   progress: bool = True, local_alias: bool = False) -> dict:
    """Run lm-eval ``tasks`` on the in-memory ``model``.

    Returns ``{task: {"metrics": {metric: value}, "stderr": {metric: value}, "n": examples}}``
    keyed by :func:`reported_name` (``local_alias``: ``arc_easy`` for ``arc_easy_local``).
    """
    return run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, seed=seed,
                       data_dir_path=data_dir_path, task_dirs=task_dirs, progress=progress, log_samples=False,
                       local_alias=local_alias).summary
