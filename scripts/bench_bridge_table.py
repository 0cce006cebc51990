"""The table of scripts/bench_bridge_run.sh: training-free repair (heal.method: bridge) against the
plain cut, from the finished runs in bench_cache/bridge_run/.

    .venv/bin/python scripts/bench_bridge_table.py            # print the table
    .venv/bin/python scripts/bench_bridge_table.py --docs     # also write it into docs/BENCHMARKS.md

Per k: WikiText-2 perplexity (text disjoint from calibration and fit text), KL(original || model)
and top-1 agreement on that text, the four multiple-choice tasks' average and the exact next word
(tinystories_lastword_local), each pruned model paired with the original and the bridged model
paired with the plain cut, example by example (prune.measure.paired).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prune.measure.paired import compare_folders, headline_rows, task_average  # noqa: E402

RUNS = ROOT / "bench_cache" / "bridge_run"
MC = ("arc_easy", "piqa", "hellaswag", "winogrande")
LASTWORD = "tinystories_lastword"
BLOCK = "bench_bridge_run"


def paired(rows) -> tuple[str, str]:
    """(MC average B - A [95% CI], last word B - A [95% CI]) in points, from paired rows (compare_folders)."""
    rows = headline_rows(rows)
    mc = task_average([r for r in rows if r.task.removesuffix("_local") in MC])
    last = [r for r in rows if r.task.startswith(LASTWORD)]
    mc_s = f"{100 * mc.diff:+.2f} [{100 * mc.ci_low:+.2f}, {100 * mc.ci_high:+.2f}]" if mc else "-"
    last_s = (f"{100 * last[0].diff:+.1f} [{100 * last[0].ci_low:+.1f}, {100 * last[0].ci_high:+.1f}]"
              if last else "-")
    return mc_s, last_s


def accuracy(rows, which: str) -> tuple[float, float]:
    """(MC average, last word) of side ``which`` (a or b) of paired rows, in %: each task's headline
    metric, as in the paired average (prune.measure.paired.headline_rows)."""
    rows = headline_rows(rows)
    mc = [getattr(r, f"mean_{which}") for r in rows if r.task.removesuffix("_local") in MC]
    last = [getattr(r, f"mean_{which}") for r in rows if r.task.startswith(LASTWORD)]
    return 100 * sum(mc) / len(mc), 100 * last[0] if last else float("nan")


def table() -> str:
    lines = ["| k | model | blocks removed | perplexity | KL to original | top-1 agreement | MC avg (4 tasks) | "
             "MC vs original | last word | last word vs original | MC vs plain cut | last word vs plain cut | "
             "bridge fit |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in sorted(int(p.name[1:].split("-")[0]) for p in RUNS.glob("k*-plain") if (p / "pruning.json").is_file()):
        plain, bridged = RUNS / f"k{k}-plain", RUNS / f"k{k}-bridge"
        ev = json.loads((plain / "eval.json").read_text())
        orig_rows = compare_folders(plain)
        mc0, last0 = accuracy(orig_rows, "a")
        lines.append(f"| {k} | original | - | {ev['original']['perplexity']['perplexity']:.2f} | 0 | 100% | "
                     f"{mc0:.2f}% | | {last0:.1f}% | | | | |")
        independent = RUNS / f"k{k}-bridge-independent"  # an earlier run: every cut fitted on the original's states
        for name, run in (("plain cut", plain), ("bridged, independent fit", independent),
                          ("bridged (method: bridge)", bridged)):
            if not (run / "pruning.json").is_file():
                continue
            record = json.loads((run / "pruning.json").read_text())
            pruned = json.loads((run / "eval.json").read_text())["pruned"]
            fid = pruned["fidelity"]
            vs_original = compare_folders(plain / "eval" / "original", run)
            (mc_o, last_o), (mc, last) = paired(vs_original), accuracy(vs_original, "b")
            vs_plain = paired(compare_folders(plain, run)) if run != plain else ("", "")
            fit = ""
            if record.get("healing"):
                b = record["healing"]["bridge"]
                fit = "; ".join(f"{c['run'][0]}-{c['run'][-1]} -> {c['block']}: {'kept' if c['kept'] else 'dropped'}"
                                for c in b["cuts"]) + f" ({b.get('fit', 'independent')}, {b['tokens']:,} tokens, {b['seconds']:.0f} s)"
            lines.append(f"| {k} | {name} | {record['removed']} | {pruned['perplexity']['perplexity']:.2f} | "
                         f"{fid['kl_mean']:.3f} | {100 * fid['top1_agreement']:.1f}% | {mc:.2f}% | {mc_o} | {last:.1f}% | "
                         f"{last_o} | {vs_plain[0]} | {vs_plain[1]} | {fit} |")
    for k in sorted(int(p.name[1:].split("-")[0]) for p in RUNS.glob("k*-bridge-independent")):
        a, b = RUNS / f"k{k}-bridge-independent", RUNS / f"k{k}-bridge"
        if (a / "pruning.json").is_file() and (b / "pruning.json").is_file():
            mc, last = paired(compare_folders(a, b))
            lines.append(f"\nk = {k}, cascaded fit (method: bridge) against the independent fit, paired on the same "
                         f"examples: MC average {mc} points, last word {last}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = ap.parse_args()
    body = table()
    print(body)
    if args.docs:
        from docs_block import DOCS, replace_block

        if not replace_block(BLOCK, body, "python scripts/bench_bridge_table.py --docs",
                             "the runs of `bash scripts/bench_bridge_run.sh 7 10`"):
            sys.exit(f"{DOCS} has no <!-- {BLOCK}:begin --> ... <!-- {BLOCK}:end --> block")


if __name__ == "__main__":
    main()
