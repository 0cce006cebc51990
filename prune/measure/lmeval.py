"""lm-eval on the in-memory model, with offline copies of the standard tasks.

``evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], ...)`` wraps the model in lm-eval's
``HFLM`` (no save and reload; the batch size is set on ``HFLM``) and runs
``lm_eval.simple_evaluate``. Task names go straight to lm-eval, so users with Hub access
get the registry's tasks. For offline use the package ships task YAMLs
(``prune/tasks/*_local.yaml``) that read local JSONL copies from a data folder given by
``data_dir=`` or the ``PRUNE_DATA_DIR`` environment variable: when a data folder is set,
the standard names below resolve to those local tasks (``arc_easy`` -> ``arc_easy_local``).
Folders of the user's own task YAMLs are added with ``task_dirs=``.

Prompts follow lm-eval's own tasks: ``Question: ...\\nAnswer:`` for ARC and BoolQ,
HellaSwag reported as ``acc_norm``, WinoGrande with partial scoring (the continuation
scored after each filled-in option).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from importlib import resources
from pathlib import Path

from prune.core.errors import PruneError

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
#: the metric reported first for each task (lm-eval's usual headline metric)
HEADLINE = {"hellaswag": "acc_norm", "openbookqa": "acc_norm", "arc_challenge": "acc_norm", "arc_easy": "acc",
            "piqa": "acc", "winogrande": "acc", "boolq": "acc", "copa": "acc"}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: ``explicit``, else ``$PRUNE_DATA_DIR``, else None."""
    value = explicit or os.environ.get("PRUNE_DATA_DIR")
    return Path(value).expanduser().resolve() if value else None


def local_task_dir(folder: Path) -> Path:
    """Materialise the shipped task YAMLs for ``folder`` (cached per folder) and return their dir."""
    if not (folder / "tasks").is_dir():
        raise PruneError(f"task data folder {folder} has no tasks/ subfolder (set --data-dir or PRUNE_DATA_DIR to the shared data folder)")
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("PRUNE_CACHE", Path.home() / ".cache" / "prune")) / "tasks" / digest
    cache.mkdir(parents=True, exist_ok=True)
    for item in resources.files("prune.tasks").iterdir():
        if item.name.endswith(".yaml"):
            text = item.read_text().replace("{data_dir}", str(folder))
            target = cache / item.name
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
    return cache


def canonical_name(task: str) -> str:
    """``arc_easy_local`` -> ``arc_easy`` (how results are reported)."""
    return task[: -len("_local")] if task.endswith("_local") and task[: -len("_local")] in LOCAL_TASKS else task


def resolve_tasks(tasks: list[str], *, data_dir_path: str | os.PathLike | None = None,
                  task_dirs: list[str] | None = None):
    """``(lm-eval task names, TaskManager)``; unknown names fail here, before any model work."""
    from lm_eval.tasks import TaskManager

    folder = data_dir(data_dir_path)
    include = [str(Path(d).expanduser().resolve()) for d in task_dirs or []]
    for d in include:
        if not Path(d).is_dir():
            raise PruneError(f"task folder not found: {d} (check evaluate.task_dirs)")
    names = []
    for task in tasks:
        if task.endswith("_local") and folder is None:
            raise PruneError(f"task {task!r} reads local data: set evaluate.data_dir or PRUNE_DATA_DIR")
        names.append(LOCAL_TASKS.get(task, task) if folder is not None else task)
    if folder is not None:
        include.insert(0, str(local_task_dir(folder)))
    manager = TaskManager(include_path=include or None, verbosity="ERROR")
    known = set(manager.all_tasks)
    for task, name in zip(tasks, names):
        if name not in known:
            import difflib

            close = difflib.get_close_matches(task, sorted(known | set(LOCAL_TASKS)), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PruneError(f"unknown lm-eval task {task!r}{hint}; offline, set PRUNE_DATA_DIR to use local copies of "
                             f"{', '.join(LOCAL_TASKS)}")
    return names, manager


def check_tokenizer(tokenizer) -> None:
    """lm-eval pads batches with the pad token (else unk, else eos); refuse a tokenizer with none."""
    if all(getattr(tokenizer, name, None) is None for name in ("pad_token", "unk_token", "eos_token")):
        raise PruneError("the tokenizer has no pad, unk or eos token, which lm-eval needs to pad batches "
                         "(add one: tokenizer.add_special_tokens({'pad_token': ...}) with an id inside the vocabulary)")


def evaluate_tasks(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int = 8,
                   num_fewshot: int = 0, seed: int = 0, data_dir_path=None, task_dirs=None,
                   progress: bool = True) -> dict:
    """Run lm-eval ``tasks`` on the in-memory ``model``.

    Returns ``{task: {"metrics": {metric: value}, "stderr": {metric: value}, "n": examples}}``
    keyed by the standard task name (``arc_easy``, not ``arc_easy_local``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from prune.measure.lmeval_dist import results_on_every_rank, spread_over_ranks

    names, manager = resolve_tasks(tasks, data_dir_path=data_dir_path, task_dirs=task_dirs)
    # lm-eval warns that an in-memory model was passed and that num_fewshot was set: both intended
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("lm_eval")]
    previous = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        check_tokenizer(tokenizer)
        # a copy: HFLM sets pad_token on the tokenizer it gets, which must not leak into the saved one
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        lm = spread_over_ranks(lm)  # under a launcher: a share of the examples per rank (prune.measure.lmeval_dist)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=False, verbosity="ERROR" if not progress else "WARNING",
        )
        out = results_on_every_rank(out)
    finally:
        for lg, level in previous:
            lg.setLevel(level)
    results = {}
    for name in names:
        raw = out["results"][name]
        metrics, stderr = {}, {}
        for key, value in raw.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _filter = key.split(",", 1)
            if metric.endswith("_stderr"):
                stderr[metric[: -len("_stderr")]] = float(value) if value == value else None
            else:
                metrics[metric] = float(value)
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        results[canonical_name(name)] = {"metrics": metrics, "stderr": stderr, "n": n}
    return results
