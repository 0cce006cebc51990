#!/usr/bin/env python
"""What a run's evaluation costs with ``evaluate.fidelity`` on the perplexity text, at two commits side by side.

    nice -n 5 .venv/bin/python scripts/bench_eval_passes.py --before 225adc3 --rounds 2 --docs

Each round runs, in one fresh child process per tree (alternating), ``prune.run`` of
recipes/smollm2-quick.yaml on SmolLM2-135M-Instruct (the float32 folder of bench_env) with its
perplexity (16 x 512 WikiText-2 tokens) and ``evaluate.fidelity`` on the same windows, no lm-eval
tasks, and a cheap selection (contiguous, 4 x 64 calibration tokens), so the evaluation is most
of the run. It counts the forward passes of the whole model over the evaluation windows (a
wrapper around ``LlamaForCausalLM.forward`` counting the windows it is given at the evaluation
length) and records the perplexities and the KL, which must not change. ``--before REV`` is
checked out as a git worktree under bench_cache/eval_passes/; results are cached per case with
the commit measured; ``--docs`` writes the table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

from bench_env import DATA, ROOT, WIKI, side_by_side, smollm2_folder, tree_rows

CACHE = ROOT / "bench_cache" / "eval_passes"
SEQ_LEN = 512

CHILD = r'''
import collections, json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["HF_DATASETS_OFFLINE"] = "1"
from transformers.models.llama import modeling_llama
real = modeling_llama.LlamaForCausalLM.forward
count = collections.Counter()
def counting(self, input_ids=None, **kwargs):
    if input_ids is not None and input_ids.shape[-1] == int(sys.argv[4]):
        count["windows"] += input_ids.shape[0]
    return real(self, input_ids=input_ids, **kwargs)
modeling_llama.LlamaForCausalLM.forward = counting
from prune.pipeline.orchestrator import run
model, wiki, out = sys.argv[1:4]
start = time.perf_counter()
result = run("recipes/smollm2-quick.yaml", quiet=True, overrides=[f"model.source={model}", f"output.dir={out}",
    "output.overwrite=true", f"calibration.path={wiki}", f"evaluate.perplexity.path={wiki}", "evaluate.tasks=[]", "evaluate.data_dir=null", "evaluate.limit=null", "evaluate.batch_size=8",
    "calibration.n_samples=4", "calibration.seq_len=64", "select.strategy=contiguous", "evaluate.fidelity={}"])
ev = result.evaluation
print(json.dumps({"wall_s": time.perf_counter() - start, "eval_windows": count["windows"],
                  "ppl_original": ev["original"]["perplexity"]["perplexity"],
                  "ppl_pruned": ev["pruned"]["perplexity"]["perplexity"], "kl": ev["pruned"]["fidelity"]["kl_mean"]}))
'''


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| tree | model passes over the evaluation windows | run (s, median) | run vs before | perplexity original / pruned | KL |",
            "|---|---:|---:|---:|---|---:|"]
    for tree, wall, ratio, rounds in tree_rows(results):
        r = rounds[0]
        rows.append(f"| {tree} | {r['eval_windows'] / 16:g} | {wall:.1f} | x{ratio:.2f} | "
                    f"{r['ppl_original']:.4f} / {r['ppl_pruned']:.4f} | {r['kl']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    side_by_side(__doc__, "bench_eval_passes", CACHE, CHILD,
                 lambda label: [smollm2_folder(), WIKI, CACHE / f"out-{label}", SEQ_LEN],
                 table, env={"PRUNE_DATA_DIR": str(DATA)},  # the recipe's ${PRUNE_DATA_DIR:-../shared/data}, from any tree
                 note=f"; 16 windows x {SEQ_LEN} tokens (a pass: every window once)")


if __name__ == "__main__":
    main()
