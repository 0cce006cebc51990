#!/usr/bin/env python
"""Peak memory of the fidelity passes (the original's reference, the pruned model's KL), two commits side by side.

    nice -n 5 .venv/bin/python scripts/bench_fidelity_memory.py --before 3225a57 --rounds 2 --docs

Each round runs, in one fresh child process per tree (alternating), ``build_reference`` on SmolLM2-135M-Instruct
(the float32 folder of bench_env) over 16 windows x 512 tokens of WikiText-2's evaluation rows (2000:, batch 4,
top 256, as a run's evaluation), then ``measure_fidelity`` of the same model with blocks 12-18 skipped. The peak is
the process's resident high-water mark (VmHWM, reset after the model and windows are loaded) above its resident
size then, for each pass; the reference's log-probs, the KL and the perplexity ratio must not change.
``--before REV`` is checked out as a git worktree under bench_cache/fidelity_memory/; ``--docs`` writes the table
into docs/BENCHMARKS.md.
"""

from __future__ import annotations

from bench_env import ROOT, WIKI, side_by_side, smollm2_folder, tree_rows

CACHE = ROOT / "bench_cache" / "fidelity_memory"

CHILD = r'''
import json, os, sys, time
from pathlib import Path
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from prune.io.text import TextSource, eval_windows, load_text
from prune.measure.fidelity import build_reference, measure_fidelity
from prune.choose.strategies import skip_blocks

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))

def peak(fn):
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
    base, start = rss("VmRSS"), time.perf_counter()
    out = fn()
    return out, (rss("VmHWM") - base) / 2**20, time.perf_counter() - start

model_dir, wiki = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
windows = eval_windows(AutoTokenizer.from_pretrained(model_dir), load_text(TextSource(path=wiki, rows="2000:")), 512, 16)
started = time.perf_counter()
ref, ref_mib, ref_s = peak(lambda: build_reference(model, windows, top_k=256, batch_size=4))
with skip_blocks(model, list(range(12, 19))):
    fid, fid_mib, fid_s = peak(lambda: measure_fidelity(model, ref, batch_size=4))
print(json.dumps({"wall_s": time.perf_counter() - started, "reference_mib": ref_mib, "fidelity_mib": fid_mib,
                  "reference_s": ref_s, "fidelity_s": fid_s, "top_sum": float(ref.top_logprobs.double().sum()),
                  "kl": fid["kl_mean"], "ppl_ratio": fid["perplexity_ratio"]}))
'''


def table(results: dict[str, list[dict]]) -> str:
    import statistics

    rows = ["| tree | reference pass: peak above its start (MiB) | KL pass: peak (MiB) | both passes (s, median) | "
            "vs before | reference's top-256 log-probs, summed | KL | perplexity ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tree, wall, ratio, rounds in tree_rows(results):
        r = rounds[0]
        ref = statistics.median(x["reference_mib"] for x in rounds)
        fid = statistics.median(x["fidelity_mib"] for x in rounds)
        rows.append(f"| {tree} | {ref:,.0f} | {fid:,.0f} | {wall:.1f} | x{ratio:.2f} | {r['top_sum']:.6e} | "
                    f"{r['kl']:.6f} | {r['ppl_ratio']:.6f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    side_by_side(__doc__, "bench_fidelity_memory", CACHE, CHILD, lambda label: [smollm2_folder(), WIKI], table,
                 note="; SmolLM2-135M-Instruct, 16 x 512 tokens, batch 4")
