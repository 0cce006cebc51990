#!/usr/bin/env python
"""The `verified` strategy's own studies on SmolLM2-135M-Instruct (docs/BENCHMARKS.md, "Verified selection"):
what it chose and what that cost, the local-search budget, the runner-up's margin, and wider searches
(the full swap neighbourhood, two-block swaps, beam search). Verified against the published methods
(perplexity, KL, paired windows, goals, lm-eval) is the quality benchmark's (scripts/bench_quality.py).

Protocol: the quality benchmark's (calibration wiki.test.raw rows 0:2000, 32 windows x 256 tokens, seed 0,
protected blocks 0 and 29; evaluation text rows 2000:, 64 windows x 512 tokens). ``verified`` scores with
the default positions (skip_first), draws its held-out windows (``--heldout`` of them, 256 tokens) from
the calibration rows, disjoint from the scoring windows, and spends at most ``--budget`` local-search
evaluations. A set is measured as the quality benchmark measures it (``bench_quality.measure_set``: perplexity
and KL(original || pruned) per token in one pass against the original's top-256 log-probs). Its own cases
are cached under bench_cache/verified/, what it shares with the quality benchmark (every set's measures, the
reference, verified's choices at that benchmark's settings) under bench_cache/quality/; a rerun resumes.

    nohup nice -n 10 python scripts/bench_verified.py > bench_cache/verified.log 2>&1 &
    python scripts/bench_verified.py --report --budgets 16,200   # the tables, from the cache
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import re
import sys
import time
from pathlib import Path

from bench_env import ROOT, log, read, set_key, write  # first: the offline environment and sys.path

import torch  # noqa: E402

import prune  # noqa: E402
from prune.choose.strategies import heldout_windows  # noqa: E402
from prune.choose.rules import resolve_protect  # noqa: E402
from prune.choose.verified import Verifier, margin, verified  # noqa: E402
import bench_quality  # noqa: E402  (the same protocol, measures and caches)
from bench_quality import (CALIB_WINDOWS, SCORING_TOKENS, VERIFIED, WINDOW_TOKENS, Context, interval_cell,  # noqa: E402
                           selection_tokens, window_row)

CACHE = ROOT / "bench_cache" / "verified"
#: every set's measures on the evaluation text: the quality benchmark's (the same windows and reference)
SETS = bench_quality.CACHE / "ppl"
PROTECT = (0, -1)  # the protocol's protected blocks (first and last)
KS = (3, 5, 7, 10)
BASELINES = ("contiguous angular", "one_shot bi", "one_shot angular", "sleb")


def baseline_sets() -> dict[str, dict[int, list[int]]]:
    """The quality benchmark's recorded selections, from docs/BENCHMARKS.md."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    table = text[text.index("### Blocks removed (0-based)"):]
    out: dict[str, dict[int, list[int]]] = {}
    for line in table.splitlines()[4:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in BASELINES:
            out[cells[0]] = {k: [int(b) for b in cells[i + 1].split()] for i, k in enumerate(KS)}
    return out


def cached_selection(path: Path, scores_path: Path, model, tok, text: str, k: int, heldout: int, budget: int) -> dict:
    """verified at ``k`` on calibration ``text`` (the protocol's 32 scoring windows x 256 tokens, seed 0, and
    ``heldout`` windows disjoint from them), kept at ``path``; the scores are kept at ``scores_path``."""
    data = read(path)
    if data is None:
        if scores_path.is_file():
            scores = prune.ScoreResult.load_json(scores_path)
        else:
            windows = prune.calibration_windows(tok, text, CALIB_WINDOWS, WINDOW_TOKENS, seed=0)
            scores = prune.score(model, windows, batch_size=8, progress=False)
            scores.save_json(scores_path)
        started = time.time()
        held = heldout_windows(tok, text, CALIB_WINDOWS, WINDOW_TOKENS, 0, None, heldout)
        sel = verified(model, scores, held, k, protect=PROTECT,
                       batch_size=4, budget=budget, progress=False)
        data = {"removed": sel.removed, "details": sel.details, "seconds": round(time.time() - started, 1)}
        write(path, data)
        log(f"verified k={k} ({heldout} held-out windows, {path.name}): {sel.removed} from {sel.details['source']} "
            f"({sel.details['full_forward_equivalents']} FFE, {data['seconds']} s)")
    return data


def quality_settings(heldout: int, budget: int) -> bool:
    """Whether these are the quality benchmark's settings for verified (its choices are then reused)."""
    return (heldout, budget) == (VERIFIED["heldout"], VERIFIED["budget"])


def choice_path(k: int, heldout: int, budget: int) -> Path:
    """Where verified's choice at ``k`` with ``heldout`` windows and local-search ``budget`` is kept."""
    if quality_settings(heldout, budget):
        return bench_quality.CACHE / "selections" / f"{bench_quality.slug('verified')}_k{k}.json"
    return CACHE / f"verified2_k{k}_h{heldout}_b{budget}.json"


def read_choice(k: int, heldout: int, budget: int) -> dict | None:
    """The kept choice as ``{"removed", "details", "seconds"}`` (None when not made yet)."""
    data = read(choice_path(k, heldout, budget))
    return data and {"removed": data["removed"], "details": data["details"],
                     "seconds": data.get("seconds", data["details"].get("seconds"))}


class Bench:
    def __init__(self, threads: int, heldout: int, budget: int):
        torch.set_num_threads(threads)
        self.ctx = Context()
        self.heldout, self.budget = heldout, budget

    def selection(self, k: int) -> dict:
        """verified's choice at ``k`` with this bench's settings (the quality benchmark's own at its settings)."""
        ctx = self.ctx
        if quality_settings(self.heldout, self.budget):
            bench_quality.selection(ctx, "verified", k)
            return read_choice(k, self.heldout, self.budget)
        ctx.scores("skip_first", 1)  # the quality benchmark's scores, kept where cached_selection reads them
        return cached_selection(choice_path(k, self.heldout, self.budget),
                                bench_quality.CACHE / "scores" / "skip_first_w1.json", ctx.model, ctx.tok,
                                prune.load_text(ctx.calib_source), k, self.heldout, self.budget)

    def heldout_windows(self) -> torch.Tensor:
        """verified's held-out windows: from the calibration rows, disjoint from the 32 x 256 scoring windows."""
        return self.ctx.heldout(self.heldout)

    def measure(self, removed: list[int]) -> dict:
        """The set's measures in the quality benchmark's cache (made there, under its lock, when missing)."""
        while (data := bench_quality.ppl_of(self.ctx, removed)) is None:  # another worker is measuring this set
            time.sleep(10)
        return data


def selection_cost(details: dict, heldout: int) -> float:
    """verified's selection compute in tokens through the whole model, as the quality benchmark counts it: the
    32 x 256-token scoring pass plus its full-model equivalents over its ``heldout`` x 256-token windows."""
    return SCORING_TOKENS + heldout * WINDOW_TOKENS * details["full_forward_equivalents"]


def chosen_table(heldout: int, budget: int) -> str:
    """What verified chose at every k, where the winner came from, and what choosing cost."""
    lines = ["| k | removed | from | KL on held-out windows | evaluations (local search) | full-model equivalents | "
             "seconds | perplexity | KL |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in KS:
        sel = read_choice(k, heldout, budget)
        if sel is None:
            continue
        d = sel["details"]
        m = read(SETS / f"{set_key(sel['removed'])}.json")
        measured = f"{m['perplexity_pruned']:.1f} | {m['kl_mean']:.3f}" if m else "- | -"
        lines.append(f"| {k} | {' '.join(map(str, sel['removed']))} | {d['source']} | {d['kl_mean']:.4f} | "
                     f"{d['evaluations']} ({d['local_search_evaluations']}) | {d['full_forward_equivalents']} | "
                     f"{sel['seconds']} | {measured} |")
    return "\n".join(lines)


def margin_table(heldouts: list[int], budget: int, bench: Bench | None = None) -> str:
    """How sure was each choice? The runner-up's KL minus the chosen set's, paired per window, on
    verified's held-out windows (what it ranked on) and on the evaluation text (64 x 512 tokens it never
    saw); ``bench``: measure what is missing for its own held-out count first."""
    lines = ["| held-out windows | k | chosen | runner-up | held-out: runner-up - chosen KL, 95% (runner-up lower on) | "
             "evaluation text: runner-up - chosen KL, 95% (runner-up lower on) | perplexity: chosen, runner-up | "
             "selection time |", "|---:|---:|---|---|---|---|---|---:|"]
    for heldout in heldouts:
        for k in KS:
            if bench is not None and bench.heldout == heldout:
                made = bench.selection(k)  # made once and kept; read back below like the other held-out counts
                if made["details"]["runner_up"]:
                    for removed in (made["removed"], made["details"]["runner_up"]["removed"]):
                        bench.measure(removed)
            sel = read_choice(k, heldout, budget)
            m = sel and sel["details"].get("runner_up")
            a = m and read(SETS / f"{set_key(sel['removed'])}.json")
            b = a and read(SETS / f"{set_key(m['removed'])}.json")
            if not (b and "kl_windows" in a and "kl_windows" in b):
                continue
            ev = margin(window_row(sel["removed"], a), window_row(m["removed"], b))
            lines.append(f"| {heldout} | {k} | {' '.join(map(str, sel['removed']))} | {' '.join(map(str, m['removed']))} | "
                         f"{interval_cell(m)} | {interval_cell(ev)} | {a['perplexity_pruned']:.1f}, {b['perplexity_pruned']:.1f} | "
                         f"{sel['seconds']:.0f} s |")
    return "\n".join(lines)


def budget_table(heldout: int, budgets: list[int], k: int = 10) -> str:
    """verified at ``k`` with each local-search budget: what it found, what it cost, how far below SLEB."""
    sleb = baseline_sets().get("sleb", {}).get(k)
    s = read(SETS / f"{set_key(sleb)}.json") if sleb else None
    sleb_cost = selection_tokens("sleb", k)  # from the quality benchmark's SLEB trace
    lines = [f"| budget | removed (k = {k}) | KL on held-out windows | evaluations (local search) | full-model "
             "equivalents | selection cost vs SLEB | perplexity | below SLEB's |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for budget in budgets:
        sel = read_choice(k, heldout, budget)
        m = read(SETS / f"{set_key(sel['removed'])}.json") if sel else None
        if not (sel and m and s and sleb_cost):
            continue
        d = sel["details"]
        cost = selection_cost(d, heldout) / sleb_cost
        lines.append(f"| {budget} | {' '.join(map(str, sel['removed']))} | {d['kl_mean']:.4f} | {d['evaluations']} "
                     f"({d['local_search_evaluations']}) | {d['full_forward_equivalents']} | {cost:.2f}x | "
                     f"{m['perplexity_pruned']:.1f} | {100 * (1 - m['perplexity_pruned'] / s['perplexity_pruned']):.1f}% |")
    return "\n".join(lines)


def wide_search(bench: Bench, k: int, starts: dict[str, list[int]], cap: int, objective: str = "kl_mean",
                pair_radius: int = 0) -> dict:
    """How far can block selection alone go? First-improvement hill climbing over the FULL swap
    neighbourhood (every removed block against every kept, unprotected block; verified's own local
    search tries only the neighbours +-1 and the three lowest-BI kept blocks), by the same held-out
    KL (``objective`` perplexity_ratio: by the held-out perplexity instead, SLEB's criterion), from each
    start until no swap helps or ``cap`` new evaluations are spent. ``pair_radius`` r > 0: after the single
    swaps, also every TWO-block swap in which each of two removed blocks moves to a kept block at most r
    positions away (nearest first). Every evaluated set's value is cached (a rerun resumes; climbs by the same
    objective on the same held-out windows share their values); ``evaluations`` counts the sets not already
    cached."""
    suffix = ("" if objective == "kl_mean" else "_ppl") + (f"_pairs{pair_radius}" if pair_radius else "")
    path = CACHE / f"wide_k{k}_h{bench.heldout}{suffix}.json"
    data = read(path) or {"evaluated": {}, "runs": {}}
    tag = "" if objective == "kl_mean" else "_ppl"
    for sibling in CACHE.glob(f"wide_k*_h{bench.heldout}{tag}*.json"):  # a set's value depends only on the held-out
        if re.fullmatch(rf"wide_k\d+_h{bench.heldout}{tag}(_pairs\d+)?", sibling.stem):  # windows and the objective:
            data["evaluated"] = {**read(sibling)["evaluated"], **data["evaluated"]}  # reuse other climbs' values
    verify = Verifier(bench.ctx.model, bench.heldout_windows(), 4, 256, False)  # verified's batch and top-k
    L = bench.ctx.n_layers
    movable = [n for n in range(L) if n not in resolve_protect(PROTECT, L)]

    def neighbours(cur: tuple[int, ...]):
        """Every single swap of ``cur``, each removed block's nearest kept blocks first."""
        for b in cur:
            for n in sorted((n for n in movable if n not in cur), key=lambda n: (abs(n - b), n)):
                yield tuple(sorted((set(cur) - {b}) | {n}))
        if pair_radius:
            kept = [n for n in movable if n not in cur]
            pairs = [(abs(na - a) + abs(nb - b), a, na, b, nb) for i, a in enumerate(cur) for b in cur[i + 1:]
                     for na in kept if abs(na - a) <= pair_radius for nb in kept
                     if nb != na and abs(nb - b) <= pair_radius]
            for _, a, na, b, nb in sorted(pairs):
                yield tuple(sorted((set(cur) - {a, b}) | {na, nb}))

    evals = 0

    def kl(blocks: tuple[int, ...]) -> float:
        nonlocal evals
        if set_key(blocks) not in data["evaluated"]:
            data["evaluated"][set_key(blocks)] = verify(blocks)[objective]
            evals += 1
            if evals % 10 == 0:  # a stopped climb keeps what it measured (a rerun resumes from the cache)
                write(path, data)
        return data["evaluated"][set_key(blocks)]

    for name, start in starts.items():
        done = data["runs"].get(name)  # reused only for the same start (verified's depends on --budget), and when it
        if done and done["start"] == sorted(start) and (done["converged"] or done.get("cap", 0) >= cap):  # converged or
            continue                                                                 # had at least this cap
        cur, moves, converged = tuple(sorted(start)), [], False
        best, evals = kl(cur), 0  # the start is not counted
        while evals < cap and not converged:
            for cand in neighbours(cur):
                if (value := kl(cand)) < best:
                    cur, best = cand, value
                    moves.append([list(cur), best])
                    write(path, data)
                    log(f"wide {name}: {list(cur)} {objective} {best:.4f} ({evals} evaluations)")
                    break
                if evals >= cap:
                    break
            else:
                converged = True  # no neighbour is lower
        data["runs"][name] = {"start": sorted(start), "final": list(cur), "kl": best, "evaluations": evals,
                              "converged": converged, "moves": moves, "cap": cap}
        write(path, data)
    return data


def beam_search(bench: Bench, k: int, width: int) -> dict:
    """Another basin? Beam search (a wider SLEB): grow sets one block at a time from the empty set, keeping
    at each size the ``width`` sets of lowest held-out KL among every one-block extension of the previous
    size's kept sets (SLEB is ``width`` 1 by perplexity; ``wide_search`` climbs from a set instead of
    building one). Every evaluated set's value is cached (``beam_h{heldout}.json``, shared by every width, and
    the k-block sets of the --wide climbs are read from their caches); ``evaluations`` counts new ones."""
    path = CACHE / f"beam_h{bench.heldout}.json"
    data = read(path) or {"evaluated": {}, "runs": {}}
    known = dict(data["evaluated"])
    for sibling in CACHE.glob(f"wide_k{k}_h{bench.heldout}*.json"):
        if re.fullmatch(rf"wide_k{k}_h{bench.heldout}(_pairs\d+)?", sibling.stem):
            known = {**read(sibling)["evaluated"], **known}
    verify = Verifier(bench.ctx.model, bench.heldout_windows(), 4, 256, False)
    L = bench.ctx.n_layers
    movable = [n for n in range(L) if n not in resolve_protect(PROTECT, L)]
    evals = 0

    def kl(blocks: tuple[int, ...]) -> float:
        nonlocal evals
        key = set_key(blocks)
        if key not in known:
            known[key] = data["evaluated"][key] = verify(blocks)["kl_mean"]
            evals += 1
            if evals % 10 == 0:
                write(path, data)
        return known[key]

    beam: list[tuple[int, ...]] = [()]
    levels = []
    for size in range(1, k + 1):
        cands = sorted({tuple(sorted((*b, n))) for b in beam for n in movable if n not in b})
        ranked = sorted(cands, key=lambda c: (kl(c), c))
        beam = ranked[:width]
        levels.append([[list(b), kl(b)] for b in beam])
        write(path, data)
        log(f"beam {width} size {size}: best {list(beam[0])} KL {kl(beam[0]):.4f} ({evals} new evaluations)")
    data["runs"][str(width)] = {"k": k, "levels": levels, "evaluations": evals}
    write(path, data)
    return data["runs"][str(width)]


LOCAL_OPTIMUM_K10 = [4, 5, 12, 13, 14, 15, 16, 17, 18, 26]  # where --wide ends from verified's and SLEB's sets


def other_starts(n_layers: int, k: int, n: int) -> dict[str, list[int]]:
    """Starts away from the two of --wide (seeded): one uniform random set of ``k`` unprotected blocks
    (seed 0), then kicks of the known local optimum (three random swaps; iterated local search). From a
    random set the climb is slow: 400 evaluations did not converge (docs/BENCHMARKS.md)."""
    movable = [b for b in range(n_layers) if b not in resolve_protect(PROTECT, n_layers)]
    starts = {}
    for i in range(n):
        rng = random.Random(i)
        if i == 0:
            starts[f"random-s{i}"] = sorted(rng.sample(movable, k))
        else:
            cur = set(LOCAL_OPTIMUM_K10)
            for b in rng.sample(sorted(cur), 3):
                cur = (cur - {b}) | {rng.choice([m for m in movable if m not in cur])}
            starts[f"kick-s{i}"] = sorted(cur)
    return starts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only print the tables from the cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=4, help="held-out calibration windows verified ranks on")
    ap.add_argument("--budget", type=int, default=16, help="local-search evaluations")
    ap.add_argument("--ks", default="7,10,3,5")
    ap.add_argument("--margins", default=None, metavar="HELDOUTS",
                    help="the runner-up's paired margin at each k, on the held-out and the evaluation windows, for these "
                         "held-out counts (e.g. 4,16); measures what is missing for --heldout unless --report")
    ap.add_argument("--docs", action="store_true", help="with --margins: also write the table into docs/BENCHMARKS.md")
    ap.add_argument("--budgets", default=None, help="--report: also tabulate k = 10 for these budgets (e.g. 16,200)")
    ap.add_argument("--wide", type=int, default=0, metavar="CAP",
                    help="k = 10: hill-climb the full swap neighbourhood from verified's and SLEB's sets (CAP evaluations each)")
    ap.add_argument("--restarts", type=int, default=0, metavar="N",
                    help="with --wide: instead, N starts far from those: uniform random sets and kicks (three random "
                         "swaps) of the local optimum the two starts reach")
    ap.add_argument("--pairs", type=int, default=0, metavar="RADIUS",
                    help="with --wide: from the local optimum the single swaps reach, climb over single swaps and every "
                         "two-block swap moving each of two removed blocks at most RADIUS positions")
    ap.add_argument("--by-perplexity", action="store_true",
                    help="with --wide: climb by the held-out perplexity (SLEB's criterion) instead of the KL")
    ap.add_argument("--beam", type=int, default=0, metavar="WIDTH",
                    help="k = 10: beam search by held-out KL from the empty set, keeping WIDTH sets at each size")
    args = ap.parse_args()
    if args.beam:
        bench = Bench(args.threads, args.heldout, args.budget)
        run = beam_search(bench, 10, args.beam)
        sleb = bench.measure(baseline_sets()["sleb"][10])["perplexity_pruned"]
        for rank, (blocks, value) in enumerate(run["levels"][-1][:3]):
            m = bench.measure(blocks)
            print(f"beam {args.beam} #{rank + 1}: {blocks} held-out KL {value:.4f}; perplexity "
                  f"{m['perplexity_pruned']:.1f}, {100 * (1 - m['perplexity_pruned'] / sleb):.1f}% below SLEB's {sleb:.1f}")
        print(f"{run['evaluations']} new evaluations; the local optimum of --wide: held-out KL 1.7039")
        return 0
    if args.wide:
        bench = Bench(args.threads, args.heldout, args.budget)
        if args.restarts:
            starts = other_starts(bench.ctx.n_layers, 10, args.restarts)
        elif args.pairs:
            starts = {"local optimum": LOCAL_OPTIMUM_K10}
        else:
            starts = {"verified": bench.selection(10)["removed"], "sleb": baseline_sets()["sleb"][10]}
        data = wide_search(bench, 10, starts, args.wide, "perplexity_ratio" if args.by_perplexity else "kl_mean",
                           args.pairs)
        sleb = bench.measure(baseline_sets()["sleb"][10])["perplexity_pruned"]
        for name, r in data["runs"].items():
            m = bench.measure(r["final"])
            sets = [r["start"], *(moved for moved, _ in r["moves"])]  # each swap: "newly removed for put back"
            swaps = ", ".join(f"{data['evaluated'][set_key(b)]:.4f} ({' '.join(map(str, sorted(set(b) - set(a))))} for {' '.join(map(str, sorted(set(a) - set(b))))})"
                              for a, b in zip(sets, sets[1:]))
            print(f"{name}: {r['start']} {'held-out perplexity ratio' if args.by_perplexity else 'KL'} {data['evaluated'][set_key(r['start'])]:.4f} -> {swaps or 'no move'}; "
                  f"final {r['final']} after {r['evaluations']} new evaluations (converged {r['converged']}); "
                  f"perplexity {m['perplexity_pruned']:.1f}, {100 * (1 - m['perplexity_pruned'] / sleb):.1f}% below "
                  f"SLEB's {sleb:.1f}")
        print(f"{len(data['evaluated'])} distinct sets evaluated")
        return 0
    if args.margins:
        bench = None if args.report else Bench(args.threads, args.heldout, args.budget)
        table, block = margin_table([int(h) for h in args.margins.split(",")], args.budget, bench), "bench_verified_margins"
        command = f"python scripts/bench_verified.py --report --margins {args.margins}"
        print(f"_Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}` from "
              f"bench_cache/verified/._\n\n{table}")
        if args.docs:
            from docs_block import replace_block

            if not replace_block(block, table, command + " --docs", "bench_cache/verified/"):
                print(f"docs/BENCHMARKS.md has no {block} block: nothing written", file=sys.stderr)
                return 1
        return 0
    if not args.report:
        bench = Bench(args.threads, args.heldout, args.budget)
        for k in [int(x) for x in args.ks.split(",")]:
            bench.measure(bench.selection(k)["removed"])
    print(f"_Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `python scripts/bench_verified.py "
          f"--report` (heldout {args.heldout}, budget {args.budget})._\n")
    print("### What verified chose and what it cost\n\n" + chosen_table(args.heldout, args.budget))
    if args.budgets:
        print("\n### verified at k = 10 by local-search budget\n\n" + budget_table(args.heldout, [int(b) for b in args.budgets.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
