"""Utility of an in-memory model under an ``evaluate:`` section: perplexity and lm-eval tasks."""

from __future__ import annotations

from typing import Any

from prune.core.config import EvaluateConfig
from prune.core.console import say
from prune.core.faults import fault_point
from prune.io.text import eval_windows, load_text
from prune.measure import perplexity as E


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
    fault_point("evaluating")
    if cfg.tasks:
        from prune.measure.lmeval import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                                      num_fewshot=cfg.num_fewshot, seed=cfg.seed, data_dir_path=cfg.data_dir,
                                      task_dirs=cfg.task_dirs, progress=not quiet)
    return out
