#!/usr/bin/env python
"""How often a run tokenizes its texts, and what that costs, at two commits side by side.

    nice -n 5 .venv/bin/python scripts/bench_token_cache.py --before 11a51ba --rounds 2 --docs

Each round runs, in one fresh child process per tree (alternating), ``prune.run`` of
recipes/smollm2-quick.yaml on SmolLM2-135M-Instruct (the float32 folder of bench_env): its
``verified`` selection (held-out calibration windows), perplexity and fidelity on WikiText-2's
evaluation rows, no lm-eval tasks, a small calibration (8 x 64 tokens) and local-search budget, so
text handling is a visible part of the run. A wrapper around the tokenizer's ``__call__`` counts the
calls on long texts (over 10,000 characters: whole calibration or evaluation texts) and their
seconds; the perplexities and the KL must not change. ``--before REV`` is checked out as a git
worktree under bench_cache/token_cache/; ``--docs`` writes the table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

from bench_env import DATA, ROOT, WIKI, side_by_side, smollm2_folder, tree_rows

CACHE = ROOT / "bench_cache" / "token_cache"

CHILD = r'''
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["HF_DATASETS_OFFLINE"] = "1"
from transformers import PreTrainedTokenizerBase
real = PreTrainedTokenizerBase.__call__
stats = {"calls": 0, "seconds": 0.0}
def timed(self, text=None, *args, **kwargs):
    start = time.perf_counter()
    out = real(self, text, *args, **kwargs)
    if isinstance(text, str) and len(text) > 10_000:
        stats["calls"] += 1
        stats["seconds"] += time.perf_counter() - start
    return out
PreTrainedTokenizerBase.__call__ = timed
from prune.pipeline.orchestrator import run
model, wiki, out = sys.argv[1:4]
start = time.perf_counter()
result = run("recipes/smollm2-quick.yaml", quiet=True, overrides=[f"model.source={model}", f"output.dir={out}",
    "output.overwrite=true", f"calibration.path={wiki}", f"evaluate.perplexity.path={wiki}", "evaluate.tasks=[]", "evaluate.data_dir=null", "evaluate.limit=null", "evaluate.batch_size=8",
    "calibration.n_samples=8", "calibration.seq_len=64", "select.heldout_windows=2", "select.budget=2",
    "evaluate.fidelity={}"])
ev = result.evaluation
print(json.dumps({"wall_s": time.perf_counter() - start, "tokenize_calls": stats["calls"],
                  "tokenize_s": stats["seconds"], "ppl_original": ev["original"]["perplexity"]["perplexity"],
                  "ppl_pruned": ev["pruned"]["perplexity"]["perplexity"], "kl": ev["pruned"]["fidelity"]["kl_mean"]}))
'''


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| tree | tokenizer calls on whole texts | their seconds | run (s, median) | run vs before | "
            "perplexity original / pruned | KL |", "|---|---:|---:|---:|---:|---|---:|"]
    for tree, wall, ratio, rounds in tree_rows(results):
        r = rounds[0]
        seconds = sorted(x["tokenize_s"] for x in rounds)[len(rounds) // 2]
        rows.append(f"| {tree} | {r['tokenize_calls']} | {seconds:.1f} | {wall:.1f} | x{ratio:.2f} | "
                    f"{r['ppl_original']:.4f} / {r['ppl_pruned']:.4f} | {r['kl']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    side_by_side(__doc__, "bench_token_cache", CACHE, CHILD,
                 lambda label: [smollm2_folder(), WIKI, CACHE / f"out-{label}"], table,
                 env={"PRUNE_DATA_DIR": str(DATA)})  # the recipe's ${PRUNE_DATA_DIR:-../shared/data}, from any tree


if __name__ == "__main__":
    main()
