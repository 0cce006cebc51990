"""Does the first optimizer step's learning rate matter? Two commits' healing side by side.

transformers' linear warmup (the schedule until 2026-12-05) gives the first optimizer step rate 0;
the toolkit's own schedule (``prune.heal.training.lr_factor``) starts it at 1 / (warmup + 1). The
difference is largest at a small budget, so each case heals the same saved k = 7 run
(``bench_cache/eval_passes/out-after``: SmolLM2-135M-Instruct minus blocks 12-18, written by
``scripts/bench_eval_passes.py``) with ``recipes/smollm2-distill.yaml`` cut to 8,192 training
tokens, at two step counts (32 steps of 1 window, the recipe's batch; 8 steps of 4 windows), for
each seed, with ``prune heal --evaluate`` in a fresh process of each commit (the two commits
alternate which goes first). Reported: WikiText-2 perplexity (rows 2000:, 16 x 512) and the mean
KL to the original on the same windows, and the healed minus the other commit's, paired by case.

    python scripts/bench_schedule.py --before 0aa8f1d --rounds 2 --docs

Each finished case is cached under ``bench_cache/schedule/`` (a rerun resumes).
"""
from __future__ import annotations

import statistics

from bench_env import DATA, ROOT, log, measure_round, side_by_side_args, smollm2_folder, worktree

CACHE = ROOT / "bench_cache" / "schedule"
RUN = ROOT / "bench_cache" / "eval_passes" / "out-after"
CASES = {"32 steps x 1 window": dict(batch_size=1, steps=32), "8 steps x 4 windows": dict(batch_size=4, steps=8)}
TOKENS = 8192

CHILD = r"""
import json, sys
from pathlib import Path
from prune.cli import main
run, out, batch, steps, seed, source = sys.argv[1:7]
sys.argv = ["prune", "heal", run, "-o", out, "--overwrite", "--quiet", "--evaluate", "--source", source,
            "--config", "recipes/smollm2-distill.yaml", "--set", "n_samples=32", "--set", f"batch_size={batch}",
            "--set", f"steps={steps}", "--set", f"seed={seed}"]
if main():
    sys.exit(1)
ev = json.loads((Path(out) / "eval.json").read_text())
fid = ev["pruned"]["fidelity"]  # the healed model; "pruned_before_healing" the un-healed one
rec = json.loads((Path(out) / "pruning.json").read_text())["healing"]
print(json.dumps({"perplexity": fid["perplexity_pruned"], "kl": fid["kl_mean"], "top1": fid["top1_agreement"],
                  "kl_pruned": ev["pruned_before_healing"]["fidelity"]["kl_mean"], "losses": rec["losses"][:3],
                  "seconds": rec["seconds"]}))
"""


def main() -> None:
    args = side_by_side_args(__doc__, rounds=2)
    CACHE.mkdir(parents=True, exist_ok=True)
    trees = {"before": worktree(args.before, CACHE), "after": ROOT}
    env = {"PRUNE_DATA_DIR": str(DATA)}
    results: dict[str, dict[tuple[str, int], dict]] = {"before": {}, "after": {}}
    for name, case in CASES.items():
        tag = f"s{case['steps']}b{case['batch_size']}"
        for seed in range(args.rounds):
            for label in ("before", "after") if seed % 2 == 0 else ("after", "before"):
                out = CACHE / f"out-{label}-{tag}-{seed}"
                results[label][name, seed] = measure_round(
                    CACHE, trees[label], f"{label}-{tag}", seed, CHILD,
                    [RUN, out, case["batch_size"], case["steps"], seed, smollm2_folder()], env=env)
    lines = ["| case | seed | perplexity before -> after | KL before -> after | after - before: KL |",
             "|---|---:|---:|---:|---:|"]
    for (name, seed), b in results["before"].items():
        a = results["after"][name, seed]
        lines.append(f"| {name} | {seed} | {b['perplexity']:.2f} -> {a['perplexity']:.2f} | {b['kl']:.4f} -> {a['kl']:.4f} "
                     f"| {a['kl'] - b['kl']:+.4f} |")
    for name in CASES:
        diffs = [results["after"][name, s]["kl"] - results["before"][name, s]["kl"] for s in range(args.rounds)]
        lines.append(f"\n{name}: KL after - before, mean over seeds {statistics.mean(diffs):+.4f} "
                     f"(un-healed {results['after'][name, 0]['kl_pruned']:.4f})")
    table = "\n".join(lines)
    print(table)
    if args.docs:
        from docs_block import replace_block

        replace_block("bench_schedule", table, f"python scripts/bench_schedule.py --before {args.before} "
                      f"--rounds {args.rounds} --docs", "bench_cache/schedule/")
    log("done")


if __name__ == "__main__":
    main()
