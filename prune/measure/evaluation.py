"""Utility of an in-memory model under an ``evaluate:`` section: perplexity, fidelity to the
original (with a :class:`~prune.measure.fidelity.FidelityReference` built from it) and lm-eval tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from prune.core import dist
from prune.core.config import EvaluateConfig
from prune.core.console import say
from prune.core.faults import fault_point
from prune.core.errors import PruneError
from prune.model.loading import model_dtype
from prune.io.text import eval_windows, load_text
from prune.measure import perplexity as E


# ---- evaluation ------------------------------------------------------------------------
def fidelity_reference(model, tokenizer, cfg: EvaluateConfig | None, *, quiet: bool = False):
    """The original ``model``'s reference for ``evaluate.fidelity`` (None when not asked for)."""
    if cfg is None or cfg.fidelity is None:
        return None
    from prune.measure.fidelity import build_reference

    f = cfg.fidelity
    text, seq_len, max_windows = f.text(cfg.perplexity)
    windows = eval_windows(tokenizer, load_text(text.source()), seq_len, max_windows, text.bos)
    return build_reference(model, windows, top_k=f.top_k, batch_size=f.batch_size, progress=not quiet,
                           data=text.source().describe())


def evaluate_loaded(model, tokenizer, cfg: EvaluateConfig | None, *, quiet: bool = False, label: str = "",
                    reference=None, is_reference: bool = False, lm_eval_name: str | None = None,
                    lm_eval_folder: str = "model", refuse_not_finite: str | None = None) -> dict:
    """Perplexity, fidelity (against ``reference``, the original's) and lm-eval tasks of an
    in-memory model under the settings ``cfg``. ``is_reference``: ``model`` is the original that
    ``reference`` was built from (no fidelity to itself). When the perplexity windows are the
    reference's (``evaluate.fidelity`` without text of its own), perplexity is read from the
    fidelity pass (the original's: from the reference) instead of another pass over the same windows.
    With ``lm_eval_name`` (the model name lm-eval records; ``lm_eval_folder`` its folder name) lm-eval
    logs every example and its own files are returned as ``lm_eval_files``
    (``{file name: text}``: ``results_<date>.json``, ``samples_<task>_<date>.jsonl``). A perplexity or KL that
    is not finite is said in a note (a run goes on), or with ``refuse_not_finite`` (the model's name) refused
    before any lm-eval task runs."""
    if cfg is None:
        return {}
    out: dict[str, Any] = {}
    fid = None
    if reference is not None and not is_reference:
        from prune.measure.fidelity import measure_fidelity

        fid = measure_fidelity(model, reference, batch_size=cfg.fidelity.batch_size if cfg.fidelity else 4,
                               progress=not quiet, per_window=True)  # per window: prune compare pairs two models
        out["fidelity"] = fid
        say(f"{label}KL to the original: mean {fid['kl_mean']:.4g}, median {fid['kl_median']:.4g}, p99 "  # 1e-6 shows
            f"{fid['kl_p99']:.4g}, max {fid['kl_max']:.4g}; top-1 agreement {100 * fid['top1_agreement']:.1f}%; "
            f"perplexity ratio {fid['perplexity_ratio']:.3f}", quiet)
    if cfg.perplexity is not None:
        p = cfg.perplexity
        windows = eval_windows(tokenizer, load_text(p.source()), p.seq_len, p.max_windows, p.bos)
        if reference is not None and torch.equal(windows, reference.windows):  # in the passes already made
            nll = (-float(reference.target_logprobs.double().mean()) if is_reference
                   else math.log(fid["perplexity_pruned"]))
            result = E.perplexity_record(nll, reference.target_logprobs.numel(), windows)
        else:
            result = E.perplexity(model, windows, batch_size=p.batch_size, progress=not quiet)
        result["data"] = p.source().describe()
        out["perplexity"] = result
        say(f"{label}perplexity {result['perplexity']:.3f} ({result['windows']} windows x {result['seq_len']} tokens)", quiet)
    if bad := not_finite(out):  # a pruned model can overflow where the original did not: said, the run goes on
        dtype = model_dtype(model)
        why = (f"{', '.join(bad)} not finite: the model's float16 activations overflow; measure it in float32 or "
               "bfloat16 (--dtype)" if dtype == "float16" else
               f"{', '.join(bad)} not finite in {dtype} (a NaN, or a next token it gives no probability)")
        if refuse_not_finite is not None:
            raise PruneError(f"{refuse_not_finite}: {why}")
        say(f"{label}note: {why}", quiet)
    fault_point("evaluating")
    if cfg.tasks:
        from prune.measure.lmeval import run_lm_eval

        run = run_lm_eval(model, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                          num_fewshot=cfg.num_fewshot, seed=cfg.seed, data_dir_path=cfg.data_dir,
                          task_dirs=cfg.task_dirs, progress=not quiet, log_samples=lm_eval_name is not None,
                          apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=cfg.fewshot_as_multiturn,
                          local_alias=cfg.local_alias)
        out["tasks"] = run.summary
        if lm_eval_name is not None and dist.world().is_main:  # lm-eval's samples live on rank 0 (which writes)
            out["lm_eval_files"] = run.files(lm_eval_name, lm_eval_folder)
    return out


def not_finite(result: dict) -> list[str]:
    """The measures of an evaluation (:func:`evaluate_loaded`) that are NaN or infinite: perplexity, KL, ratio."""
    found = [("perplexity", (result.get("perplexity") or {}).get("perplexity")),
             ("KL to the original", (result.get("fidelity") or {}).get("kl_mean")),
             ("perplexity ratio", (result.get("fidelity") or {}).get("perplexity_ratio"))]
    return [name for name, value in found if isinstance(value, float) and not math.isfinite(value)]


def lm_eval_outputs(original: dict, pruned: dict, unhealed: dict | None = None, *,
                    seed: int = 0) -> tuple[dict[str, str], list, list]:
    """Take lm-eval's files out of the evaluations (``lm_eval_files``, see :func:`evaluate_loaded`):
    ``({"eval/original/<file>": text, "eval/pruned/<file>": text, ...}, pruned against original,
    pruned against unhealed)``, each paired over the examples. ``unhealed``: the model before a healing
    (``pruned`` is then the healed one), its files under ``eval/pruned_before_healing/``."""
    texts_of = {which: (result or {}).pop("lm_eval_files", None) or {}
                for which, result in (("original", original), ("pruned", pruned), ("pruned_before_healing", unhealed))}
    if not any(texts_of.values()):
        return {}, [], []  # no tasks ran: nothing of lm-eval's (a perplexity-only run needs no lm-eval)
    from prune.measure.paired import check_same_setup, task_meta_of, task_setup_of

    files = {f"eval/{which}/{name}": text for which, texts in texts_of.items() for name, text in texts.items()}
    samples = {which: samples_of(texts) for which, texts in texts_of.items()}  # each file parsed once
    results = {which: [text for name, text in sorted(texts.items()) if name.startswith("results_")]
               for which, texts in texts_of.items()}
    # groups and lower-is-better metrics, as prune compare reads them from the same results files
    meta = task_meta_of([text for texts in results.values() for text in texts])
    setups = {which: task_setup_of(texts) for which, texts in results.items()}
    b_name = "the healed model" if unhealed is not None else "the pruned model"
    pairs = []
    for a, a_name in (("original", "the original"), ("pruned_before_healing", "the model before healing")):
        try:
            if samples[a] and samples["pruned"]:
                check_same_setup(setups[a], setups["pruned"], set(samples[a]) & set(samples["pruned"]), (a_name, b_name),
                                 fix="evaluate both with one version of prune and lm-eval (prune eval), then pair them "
                                     "with prune compare")
            pairs.append(paired_rows(samples[a], samples["pruned"], seed, meta, f"{a_name} and {b_name}"))
        except PruneError as exc:  # both models are evaluated and saved all the same: only the pairing is left out
            say(f"note: the paired comparison of {b_name} with {a_name} is left out: {exc}", quiet=False)
            pairs.append([])
    return files, pairs[0], pairs[1]


def samples_of(texts: dict[str, str]) -> dict[str, list[dict]]:
    """``{task: sample records}`` of a model's lm-eval files (``{file name: text}``, as lm-eval writes them)."""
    from lm_eval.utils import get_file_task_name

    from prune.measure.paired import read_samples

    return {get_file_task_name(name): read_samples(text.splitlines(), name)
            for name, text in texts.items() if name.startswith("samples_")}


def paired_rows(a: dict[str, list[dict]], b: dict[str, list[dict]], seed: int = 0, meta=None,
                between: str = "A and B") -> list:
    """The paired comparison (B against A) of two models' samples (:func:`samples_of`; ``meta``: their results
    files' :class:`~prune.measure.paired.TaskMeta`; ``between``: the two, named in a refusal); ``[]`` when either has
    none."""
    from prune.measure.paired import compare_samples

    return compare_samples(a, b, seed=seed, meta=meta, between=between) if a and b else []


def lm_eval_tables(files: dict[str, str]) -> str:
    """lm-eval's own ``make_table`` of each results file in ``files`` (``{"eval/<which>/results_*.json": text}``)."""
    from lm_eval.utils import make_table

    parts = []
    for name, text in sorted(files.items()):
        if Path(name).name.startswith("results_"):
            results = json.loads(text)
            table = make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
            parts.append(f"### lm-eval: {Path(name).parent.name or Path(name).name}\n\n{table}")
    return "\n".join(parts)
