"""Utility of an in-memory model under an ``evaluate:`` section: perplexity, fidelity to the
original (with a :class:`~prune.measure.fidelity.FidelityReference` built from it) and lm-eval tasks."""

from __future__ import annotations

from typing import Any

from prune.core.config import EvaluateConfig
from prune.core.console import say
from prune.core.faults import checkpoint
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
                    reference=None) -> dict:
    """Perplexity, fidelity (against ``reference``, the original's) and lm-eval tasks of an
    in-memory model under the settings ``cfg``."""
    if cfg is None:
        return {}
    out: dict[str, Any] = {}
    if reference is not None:
        from prune.measure.fidelity import measure_fidelity

        fid = measure_fidelity(model, reference, batch_size=cfg.fidelity.batch_size if cfg.fidelity else 4,
                               progress=not quiet)
        out["fidelity"] = fid
        say(f"{label}KL to the original: mean {fid['kl_mean']:.4f}, median {fid['kl_median']:.4f}, p99 "
            f"{fid['kl_p99']:.4f}, max {fid['kl_max']:.3f}; top-1 agreement {100 * fid['top1_agreement']:.1f}%; "
            f"perplexity ratio {fid['perplexity_ratio']:.3f}", quiet)
    if cfg.perplexity is not None:
        p = cfg.perplexity
        windows = eval_windows(tokenizer, load_text(p.source()), p.seq_len, p.max_windows, p.bos)
        result = E.perplexity(model, windows, batch_size=p.batch_size, progress=not quiet)
        result["data"] = p.source().describe()
        out["perplexity"] = result
        say(f"{label}perplexity {result['perplexity']:.3f} ({result['windows']} windows x {result['seq_len']} tokens)", quiet)
    checkpoint("evaluating")
    if cfg.tasks:
        from prune.measure.lmeval import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                                      num_fewshot=cfg.num_fewshot, seed=cfg.seed, data_dir_path=cfg.data_dir,
                                      task_dirs=cfg.task_dirs, progress=not quiet)
    return out
