#!/usr/bin/env python
"""Does the calibration text change which blocks `verified` removes, and what they cost? (docs/BENCHMARKS.md,
"Which calibration text").

SmolLM2-135M-Instruct, the verified benchmark's protocol (scripts/bench_verified.py: 32 scoring windows
x 256 tokens, seed 0, skip_first, 4 held-out windows from the same text, local-search budget 16, blocks
0 and 29 protected) with the calibration text swapped:

* ``wikitext``: WikiText-2 rows 0:2000 (the benchmarks' calibration text);
* ``c4``: the C4 web excerpts (healing's training text);
* ``tinystories``: simple children's stories, lines 0:8000 (a narrow, plain register);
* ``arc_challenge_qa``: every ARC-Challenge question followed by its correct answer, a knowledge probe
  (written to bench_cache/calibration/ from ../shared/data; it is the ARC-Challenge *test* set, so a
  model calibrated on it must not be evaluated on ARC-Challenge: diagnostic only).

Each chosen set is measured on three evaluation texts, one pass each: WikiText-2 rows 2000: (64 x 512,
the quality benchmark's cached reference and sets), the C4 realnewslike excerpts (a text none of the sources
is) and TinyStories lines 8000: (32 x 512 each): perplexity and KL(original || pruned) from the
original's top-256 log-probs.
``--lmeval SOURCES --ks K`` runs the four tasks on up to 2,400 questions each (bench_heal's protocol: batch
16, seed 0) for those sources' sets and pairs them with the original and with WikiText's set at the same k
(a set bench_heal or bench_fidelity evaluated on the same protocol is read from their files, not run again).

    nohup nice -n 5 python scripts/bench_calibration.py > bench_cache/calibration.log 2>&1 &
    python scripts/bench_calibration.py --lmeval wikitext,tinystories,arc_challenge_qa --ks 10
    python scripts/bench_calibration.py --sources wikitext,tinystories,arc_challenge_qa --heldout 16
    python scripts/bench_calibration.py --lmeval tinystories --ks 7 --heldout 16
    python scripts/bench_calibration.py --report [--docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_heal  # noqa: E402  (sets the offline environment and sys.path first)
import bench_verified  # noqa: E402
from bench_quality import cached_measure, reference_at  # noqa: E402
from bench_verified import PROTECT, Bench, cached_selection  # noqa: E402
from bench_env import DATA, WIKI, log, read, set_key  # noqa: E402
from bench_quality import TASKS  # noqa: E402

import prune  # noqa: E402

CACHE = ROOT / "bench_cache" / "calibration"
STORIES = DATA / "tinystories" / "tinystories_sample_2MiB.txt"
QA = CACHE / "arc_challenge_qa.jsonl"
SOURCES = {
    "wikitext": prune.TextSource(str(WIKI), rows="0:2000"),
    "c4": prune.TextSource(str(DATA / "c4" / "c4_web_1480.jsonl"), field=["prefix", "gold_completion"]),
    "tinystories": prune.TextSource(str(STORIES), rows="0:8000"),
    "arc_challenge_qa": prune.TextSource(str(QA)),
}
#: evaluation texts beside WikiText-2 rows 2000: (bench_verified's), 32 x 512 tokens each
EVALS = {"news": prune.TextSource(str(DATA / "c4" / "c4_realnewslike_validation_200.jsonl"), field=["prompt", "response"]),
         "stories": prune.TextSource(str(STORIES), rows="8000:")}
KS = (7, 10)
HELDOUT, BUDGET = 4, 16  # verified's held-out windows and local-search budget (bench_verified's protocol)
LIMIT = 2400  # bench_heal --part questions: every question of ARC-Easy, PIQA, WinoGrande and 2,400 of HellaSwag
FIDELITY = ROOT / "bench_cache" / "fidelity"  # scripts/bench_fidelity.py's lm-eval files, the same protocol


def write_qa() -> None:
    """ARC-Challenge's questions, each with its correct answer (lm-eval's arc prompt and target)."""
    if QA.is_file():
        return
    rows = [json.loads(line) for line in (DATA / "tasks" / "arc_challenge.jsonl").read_text().splitlines() if line]
    QA.parent.mkdir(parents=True, exist_ok=True)
    QA.write_text("".join(json.dumps({"text": f"{r['query']}\nAnswer: {r['choices'][r['gold']]}"}) + "\n" for r in rows))


def selection_path(source: str, k: int, heldout: int = HELDOUT) -> Path:
    return CACHE / (f"{source}_k{k}.json" if heldout == HELDOUT else f"{source}_k{k}_h{heldout}.json")


def set_path(text: str, removed: list[int]) -> Path:
    """Where the measurement of the set ``removed`` on evaluation text ``text`` is kept (WikiText-2's: the
    quality benchmark's)."""
    folder = bench_verified.SETS if text == "wikitext" else CACHE / f"{text}_sets"
    return folder / f"{set_key(removed)}.json"


class Calibrations:
    def __init__(self, threads: int):
        self.bench = Bench(threads, HELDOUT, BUDGET)  # the model; WikiText's measures: the quality benchmark's
        self.ctx = self.bench.ctx
        self.references = {}  # the other evaluation texts' references

    def selection(self, source: str, k: int, heldout: int = HELDOUT) -> dict:
        return cached_selection(selection_path(source, k, heldout), CACHE / f"{source}_scores.json", self.ctx.model,
                                self.ctx.tok, prune.load_text(SOURCES[source]), k, heldout, BUDGET)

    def measure(self, text: str, removed: list[int]) -> dict:
        """Perplexity and KL to the original of the model without ``removed`` on evaluation text ``text``."""
        if text == "wikitext":  # the quality benchmark's text: its cache, under its lock
            return self.bench.measure(removed)
        if text not in self.references:  # the original's top-256 log-probs over 32 x 512 tokens of it
            windows = prune.eval_windows(self.ctx.tok, prune.load_text(EVALS[text]), 512, max_windows=32)
            self.references[text] = reference_at(CACHE / f"{text}_reference.safetensors", self.ctx.model, windows)
        return cached_measure(set_path(text, removed), self.ctx.model, removed, self.references[text])


def lmeval_folder(removed: list[int]) -> Path:
    """Where the set ``removed``'s lm-eval files (LIMIT questions per task) are: the original's and 12-18's
    where bench_heal finds them (bench_fidelity's or its own), any other set's where bench_fidelity wrote it,
    else here."""
    for name, blocks in bench_heal.BASELINES.items():
        if sorted(removed) == blocks:
            return bench_heal.lmeval_folder(name, LIMIT)
    shared = FIDELITY / f"lmeval_k{len(removed)}_n{LIMIT}" / set_key(removed)
    return shared if bench_heal.has_samples(shared) else CACHE / f"lmeval-n{LIMIT}" / set_key(removed)


def evaluated(removed: list[int]) -> bool:
    return bench_heal.has_samples(lmeval_folder(removed))


def run_lmeval(cal: Calibrations, removed: list[int]) -> None:
    from prune.measure.lmeval import run_lm_eval

    if evaluated(removed):
        return
    started = time.time()
    run = run_lm_eval(cal.ctx.pruned(removed), cal.ctx.tok, list(TASKS), limit=LIMIT, batch_size=16, seed=0,
                      data_dir_path=DATA, progress=False)
    run.write(lmeval_folder(removed), f"SmolLM2-135M-Instruct without {set_key(removed)}")
    log(f"lm-eval {set_key(removed)}: {({t: r['metrics'] for t, r in run.summary.items()})} "
        f"({time.time() - started:.0f} s)")


def report() -> str:
    from prune.choose.rules import select
    from prune.measure.paired import average_line, compare_folders, headline_rows

    texts = {"wikitext": "WikiText-2", "news": "C4 news", "stories": "TinyStories"}
    rows = ["| k | calibration text | verified removes | its held-out KL (own text) | runner-up (KL above) | "
            + " | ".join(f"{t} ppl | {t} KL" for t in texts.values()) + " | contiguous angular | one-shot BI |",
            "|---:|---|---|---:|---|" + "---:|---:|" * len(texts) + "---|---|"]

    def measured(text: str, removed: list[int]) -> dict:
        return read(set_path(text, removed)) or {}

    for k in KS:
        for source in SOURCES:
            sel = read(selection_path(source, k))
            if sel is None:
                continue
            cells = []
            for text in texts:
                m = measured(text, sel["removed"])
                cells += [f"{m['perplexity_pruned']:.1f}", f"{m['kl_mean']:.3f}"] if m else ["-", "-"]
            scores = prune.ScoreResult.load_json(CACHE / f"{source}_scores.json")
            picks = [" ".join(map(str, select(scores, k, strategy=st, metric=me, protect=PROTECT).removed))
                     for st, me in (("contiguous", "angular"), ("one_shot", "bi"))]
            best, second = sel["details"]["candidates"][:2]  # verified ranks its candidate table by KL
            runner_up = f"{' '.join(map(str, second['removed']))} (+{100 * (second['kl_mean'] / best['kl_mean'] - 1):.1f}%)"
            rows.append(f"| {k} | {source} | {' '.join(map(str, sel['removed']))} | {sel['details']['kl_mean']:.4f} | "
                        f"{runner_up} | " + " | ".join(cells) + f" | {picks[0]} | {picks[1]} |")
    out = ["\n".join(rows)]
    if all(measured(t, []) for t in texts):
        out.append("\nThe original's perplexity on the same tokens: "
                   + ", ".join(f"{name} {measured(t, [])['perplexity_pruned']:.2f}" for t, name in texts.items()) + ".")
    more = [(k, source, sel, big) for k in KS for source in SOURCES
            if (sel := read(selection_path(source, k))) and (big := read(selection_path(source, k, 4 * HELDOUT)))]
    if more:
        out += ["", f"verified with {4 * HELDOUT} held-out windows instead of {HELDOUT} (the same scores and text; "
                    "perplexity of its set on each evaluation text):", "",
                f"| k | calibration text | {HELDOUT} windows | {4 * HELDOUT} windows | "
                + " | ".join(f"{t} ppl" for t in texts.values()) + " |", "|---:|---|---|---|" + "---:|" * len(texts)]
        for k, source, sel, big in more:
            ppls = [f"{m['perplexity_pruned']:.1f}" if (m := measured(t, big["removed"])) else "-" for t in texts]
            out.append(f"| {k} | {source} | {' '.join(map(str, sel['removed']))} | {' '.join(map(str, big['removed']))} | "
                       + " | ".join(ppls) + " |")
    for k in KS:
        chosen: dict[tuple[int, ...], str] = {}  # each set once, named by the first (text, windows) that chose it
        for heldout in (HELDOUT, 4 * HELDOUT):
            for source in SOURCES:
                if sel := read(selection_path(source, k, heldout)):
                    chosen.setdefault(tuple(sel["removed"]), source if heldout == HELDOUT else f"{source} ({heldout} windows)")
        base = next((list(r) for r, name in chosen.items() if name == "wikitext"), None)
        for removed, source in ((list(r), name) for r, name in chosen.items()):
            if not evaluated(removed):
                continue
            pairs = [([], "the original")]
            if removed != base and base and evaluated(base):
                pairs.append((base, f"wikitext's set ({set_key(base)})"))
            for ref, ref_name in pairs:
                head = headline_rows(compare_folders(lmeval_folder(ref), lmeval_folder(removed)))
                per_task = "; ".join(f"{r.task.replace('_local', '')} {100 * r.diff:+.2f} "
                                     f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]" for r in head)
                out.append(f"\n**{source}'s set at k = {k}** ({set_key(removed)}) against **{ref_name}**: "
                           f"{average_line(head, ref_name, source)}. Per task: {per_task}.")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default=",".join(SOURCES), help="comma-separated calibration texts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=HELDOUT, help="verified's held-out windows (another number than "
                                                                   f"{HELDOUT}: a table of its own)")
    ap.add_argument("--lmeval", default=None, help="comma-separated sources whose sets (at --ks) are lm-evaluated "
                                                   "(2,400 questions per task)")
    ap.add_argument("--ks", default="7", help="with --lmeval: comma-separated block counts")
    ap.add_argument("--report", action="store_true", help="the tables, from the cache")
    ap.add_argument("--docs", action="store_true", help="with --report: into docs/BENCHMARKS.md's bench_calibration block")
    args = ap.parse_args()
    if args.report:
        tables = report()
        print(tables)
        if args.docs:
            from docs_block import replace_block

            if not replace_block("bench_calibration", tables, "python scripts/bench_calibration.py --report --docs",
                                 "bench_cache/calibration/"):
                sys.exit("docs/BENCHMARKS.md has no <!-- bench_calibration:begin --> block")
        return
    write_qa()
    cal = Calibrations(args.threads)
    if args.lmeval:
        for k in map(int, args.ks.split(",")):
            for source in args.lmeval.split(","):
                run_lmeval(cal, cal.selection(source, k, args.heldout)["removed"])
        return
    for text in ["wikitext", *EVALS]:
        cal.measure(text, [])
    for k in KS:
        for source in args.sources.split(","):
            removed = cal.selection(source, k, args.heldout)["removed"]
            for text in ["wikitext", *EVALS]:
                m = cal.measure(text, removed)
                log(f"{source} k={k} {removed}: {text} ppl {m['perplexity_pruned']:.1f} KL {m['kl_mean']:.3f}")


if __name__ == "__main__":
    main()
