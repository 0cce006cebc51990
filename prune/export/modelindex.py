"""The card's ``model-index``: the evaluation results as ``huggingface_hub.EvalResult`` objects.

One result per (task, metric) for the pruned model (``metric_name`` = the lm-eval metric,
e.g. ``acc``) and one for the model it was compared with in the same run (``metric_name``
``"<metric> (original model, before pruning)"``, or from the second pruning step on ``"<metric>
(step-1 model, before this step)"``, same ``metric_type``), so the Hub page shows both side by
side. lm-eval tasks name the Hub dataset they read where it is known (:data:`TASK_DATASETS`, else
the Hub dataset and split the task's lm-eval config scored, as the run recorded it; else the task's
name), under the task's own name (the table's marks, such as few-shot from the scored split, stay in
the table); perplexity names its text (a Hub dataset id, or the local file's name with
``dataset_type: text``). Parameter and layer counts are not results and are left out, and so
are the fidelity rows (KL to the original, top-1 agreement: a comparison of the two models,
whose "original" values hold by definition, not a benchmark result; and the perplexity of the
fidelity text measured beside them). Shipped local task copies (``arc_easy_local``) are reported
under lm-eval's task name and dataset (``arc_easy``), except a copy whose prompts are not lm-eval's
(``boolq_local``: its own name, the Hub dataset its examples come from). Values keep 6 significant digits (a KL of
1.389e-06 stays that).
"""

from __future__ import annotations

import math
from pathlib import Path

#: lm-eval task -> (Hub dataset, config, split) it evaluates on (lm-eval's task YAMLs)
TASK_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "piqa": ("baber/piqa", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "boolq": ("aps/super_glue", "boolq", "validation"),
    "boolq_local": ("aps/super_glue", "boolq", "validation"),  # its examples, without the passages' titles
    "copa": ("aps/super_glue", "copa", "validation"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
    # the shipped exact-last-word task reads the first 2 MiB of TinyStories' train split (the shared data folder)
    "tinystories_lastword_local": ("roneneldan/TinyStories", None, "train"),
}
TASK_TYPE = "text-generation"
ORIGINAL = " (original model, before pruning)"



def before_label(steps: int) -> str:
    """What the "original" column of a step's evaluation measured: the original model, or from the
    second pruning step on the model that step loaded (as the card's table says)."""
    return ORIGINAL if steps <= 1 else f" (step-{steps - 1} model, before this step)"


def published_name(task: str, dataset: dict | None = None) -> str:
    """The name the card publishes a result under: lm-eval's registry name for a shipped copy that builds
    that task's prompts (``arc_easy_local`` -> ``arc_easy``), the copy's own name for one that does not
    (``DIFFERS_FROM_LM_EVAL``: ``boolq_local``), also when ``--local-alias`` reported it as ``boolq`` (its
    recorded ``dataset`` then reads local files, not lm-eval's Hub dataset)."""
    from prune.export.card import is_hub_dataset
    from prune.measure.lmeval import DIFFERS_FROM_LM_EVAL, LOCAL_TASKS, canonical_name

    name = canonical_name(task)
    if name not in DIFFERS_FROM_LM_EVAL:
        return name
    path = dataset.get("path") if isinstance(dataset, dict) else None
    local = task.endswith("_local") or (isinstance(path, str) and not is_hub_dataset(path))
    return LOCAL_TASKS[name] if local else name


def _task_dataset(dataset) -> tuple[str, str | None, str | None] | None:
    """``(Hub dataset, config, split)`` a task's row recorded from lm-eval's task config (``dataset_path``,
    ``dataset_name``, the split scored), when the path is a Hub dataset (not a packaged builder such as
    ``json`` reading local files): a task the table above does not know."""
    from prune.export.card import is_hub_dataset

    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str) or not is_hub_dataset(dataset["path"]):
        return None
    pick = lambda key: dataset.get(key) if isinstance(dataset.get(key), str) else None  # noqa: E731 - a hand-edited file
    return dataset["path"], pick("name"), pick("split")


def eval_results(rows: list[dict] | None, settings: dict | None = None, steps: int = 1) -> list:
    """``EvalResult`` objects for the before/after ``rows`` of ``eval.json`` (see module docstring);
    ``steps``: the pruning steps of the lineage (:func:`before_label`)."""
    from huggingface_hub import EvalResult

    from prune.core.tables import AGREEMENT_ROW, FIDELITY_PPL_ROW, KL_ROW
    from prune.export.card import is_hub_dataset

    out = []
    fewshot = (settings or {}).get("num_fewshot")
    limit = (settings or {}).get("limit")  # examples per task (or a fraction of each): not the whole split
    for row in rows or []:
        if row.get("metric") == "count" or row["name"].startswith((KL_ROW, AGREEMENT_ROW, FIDELITY_PPL_ROW)):
            continue
        name, metric = published_name(row.get("task") or row["name"], row.get("dataset")), row["metric"]
        if name == "perplexity":
            ppl = (settings or {}).get("perplexity") or {}
            path = str(ppl.get("path") or "text")
            hub = is_hub_dataset(path)
            split = ppl.get("split") if hub else None
            if split and ppl.get("rows"):  # the rows measured, in datasets' slice syntax (not the whole split)
                split = f"{split}[{ppl['rows']}]"
            dataset = dict(dataset_type=path if hub else "text", dataset_name=path if hub else Path(path).name,
                           dataset_split=split, dataset_config=ppl.get("config") if hub else None)
            metric_type = "perplexity"
            args = {k: ppl[k] for k in ("seq_len", "max_windows") if ppl.get(k) is not None} or None  # its windows
        else:
            hub_id, config, split = TASK_DATASETS.get(name) or _task_dataset(row.get("dataset")) or (
                name, None, None)
            if split and limit:  # lm-eval scored the first examples only: say which, in datasets' slice syntax
                percent = round(100 * limit, 6)  # 0.07 * 100 is 7.000000000000001
                if limit >= 1:
                    split = f"{split}[:{int(limit)}]"
                elif percent.is_integer():  # datasets' percent slices are whole percents
                    split = f"{split}[:{int(percent)}%]"
                else:  # no slice names it (metric_args has the limit): not the whole split either
                    split = None
            dataset = dict(dataset_type=hub_id, dataset_name=name, dataset_config=config, dataset_split=split)
            metric_type = metric
            shots = ((settings or {}).get("n_shot") or {}).get(row.get("task") or row["name"], fewshot)  # lm-eval's
            args = {k: v for k, v in (("num_fewshot", shots), ("limit", limit)) if v is not None} or None
        for value, label in ((row.get("pruned"), metric), (row.get("original"), metric + before_label(steps))):
            if isinstance(value, (int, float)) and math.isfinite(value):  # a NaN or inf result is no claim
                out.append(EvalResult(task_type=TASK_TYPE, task_name=name, metric_type=metric_type,
                                      metric_value=float(f"{float(value):.6g}"), metric_name=label, metric_args=args,
                                      **dataset))
    return out
