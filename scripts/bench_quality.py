"""Quality of the selection strategies on SmolLM2-135M-Instruct (docs/BENCHMARKS.md, "Quality of the strategies").

For every strategy and every k (blocks removed), the chosen blocks, the WikiText-2 perplexity of the
pruned model on text disjoint from the calibration windows, and (``--part lmeval``) 0-shot lm-eval
accuracy. The shared evaluation protocol (docs/BENCHMARKS.md, notes/COMMON.md):

* calibration: wiki.test.raw rows 0:2000, 32 windows x 256 tokens, seed 0;
* perplexity: wiki.test.raw rows 2000:, seq_len 512, 64 windows;
* lm-eval: arc_easy, piqa, hellaswag (acc_norm), winogrande [+ arc_challenge, boolq], 0-shot,
  limit 500, batch_size 16, seed 0, local task copies.

Every finished piece is cached as JSON under ``bench_cache/quality/`` (scores per scoring setting,
selections per (strategy, k), perplexity and lm-eval per *removed set*, so two strategies that pick
the same blocks are evaluated once); a rerun resumes. Greedy strategies (iterative, sleb) are run
once to the largest k; their choice for a smaller k is the prefix of the same greedy trace (each
round depends only on the blocks removed before it).

    nohup nice -n 10 python scripts/bench_quality.py --part ppl > bench_cache/quality_ppl.log 2>&1 &
    nohup nice -n 10 python scripts/bench_quality.py --part lmeval --lmeval-ks 7 > bench_cache/quality_lmeval.log 2>&1 &
    python scripts/bench_quality.py --part report      # tables (Markdown) + plots in docs/img/
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from pathlib import Path

from bench_env import DATA, ROOT, WIKI, log, read, set_key, smollm2_folder, write  # first: the offline environment and sys.path


import torch  # noqa: E402

import prune  # noqa: E402
from prune.measure.perplexity import perplexity
from prune.choose.rules import Selection, select

CACHE = ROOT / "bench_cache" / "quality"
IMG = ROOT / "docs" / "img"
KS = (3, 5, 7, 10)
TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
EXTRA_TASKS = ["arc_challenge", "boolq"]
PROTECT = (0, -1)
SLEB_WINDOWS = 4  # SLEB's loss is measured on the first 4 calibration windows (CPU time; see docs)
SEARCH = dict(max_perplexity_ratio=4.0, budget=16, order_by="bi", heldout_windows=8)

#: name -> (kind, parameters). Scores: (positions, cka_windows).
STRATEGIES: dict[str, tuple[str, dict]] = {
    "random (seed 0)": ("score", dict(strategy="random", seed=0)),
    "random (seed 1)": ("score", dict(strategy="random", seed=1)),
    "random (seed 2)": ("score", dict(strategy="random", seed=2)),
    "tail": ("score", dict(strategy="tail")),
    "one_shot bi": ("score", dict(strategy="one_shot", metric="bi")),
    "contiguous angular": ("score", dict(strategy="contiguous", metric="angular")),
    "one_shot angular": ("score", dict(strategy="one_shot", metric="angular")),
    "one_shot cka (all)": ("score", dict(strategy="one_shot", metric="cka")),
    "one_shot cka (skip_first)": ("score", dict(strategy="one_shot", metric="cka", positions="skip_first")),
    "one_shot msrs (all)": ("score", dict(strategy="one_shot", metric="msrs")),
    "one_shot msrs (skip_first)": ("score", dict(strategy="one_shot", metric="msrs", positions="skip_first")),
    "one_shot cka (all, cka_windows=8)": ("score", dict(strategy="one_shot", metric="cka", cka_windows=8)),
    "one_shot msrs (all, cka_windows=8)": ("score", dict(strategy="one_shot", metric="msrs", cka_windows=8)),
    "iterative bi": ("model", dict(strategy="iterative", metric="bi")),
    "iterative angular": ("model", dict(strategy="iterative", metric="angular")),
    "sleb": ("model", dict(strategy="sleb")),
}
SEARCH_NAME = "search (held-out ppl <= 4x, by bi)"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ---- context: model, windows ---------------------------------------------------------------
class Context:
    """The dense model, calibration windows and evaluation windows (loaded once)."""

    def __init__(self):
        self.model, self.tok, _ = prune.load(smollm2_folder(), dtype="float32")
        self.n_layers = len(prune.decoder_layers(self.model))
        self.calib_source = prune.TextSource(str(WIKI), rows="0:2000")
        self.windows = prune.calibration_windows(self.tok, prune.load_text(self.calib_source), 32, 256, seed=0)
        held = prune.load_text(prune.TextSource(str(WIKI), rows="2000:"))
        self.eval_windows = prune.eval_windows(self.tok, held, 512, max_windows=64)
        self._scores = {}

    def scores(self, positions="all", cka_windows=1) -> prune.ScoreResult:
        key = (positions, cka_windows)
        if key not in self._scores:
            path = CACHE / "scores" / f"{positions}_w{cka_windows}.json"
            if path.is_file():
                self._scores[key] = prune.ScoreResult.load_json(path)
            else:
                log(f"scoring positions={positions} cka_windows={cka_windows}")
                result = prune.score(self.model, self.windows, batch_size=8, positions=positions,
                                     cka_windows=cka_windows, progress=False)
                path.parent.mkdir(parents=True, exist_ok=True)
                result.save_json(path)
                self._scores[key] = result
        return self._scores[key]

    def pruned(self, removed):
        model = copy.deepcopy(self.model)
        if removed:
            prune.remove_layers(model, list(removed))
        return model


# ---- selections ------------------------------------------------------------------------
def greedy_trace(ctx: Context, name: str, params: dict, k: int) -> dict:
    """Run a greedy model-based strategy until its trace has ``k`` rounds.

    The trace is saved after every round (``<name>_trace.json``), so an interrupted run resumes."""
    path = CACHE / "selections" / f"{slug(name)}_trace.json"
    data = read(path) or {"trace": [], "seconds": 0.0}
    if len(data["trace"]) >= k:
        return data
    from prune.choose import strategies as ST

    with claim(path) as mine:
        if not mine:
            raise RuntimeError(f"{name}: another worker is extending this greedy run")
        log(f"{name}: greedy run from round {len(data['trace'])} to k={k}")
        started = time.time()
        seconds = data["seconds"]

        def save(record):
            data["trace"].append(record)
            data["seconds"] = round(seconds + time.time() - started, 1)
            write(path, data)
            log(f"{name}: round {record['round']} removes block {record['removed']} ({data['seconds']} s so far)")

        kwargs = dict(protect=PROTECT, progress=False, start=list(data["trace"]), on_round=save)
        if params["strategy"] == "iterative":
            # every round on the first round's settings (all positions, CKA per window: ctx.scores()'s)
            sel = ST.iterative(ctx.model, ctx.windows, k, metric=params["metric"], scores=ctx.scores(), positions="all",
                               cka_windows=1, **kwargs)
        else:
            sel = ST.sleb(ctx.model, ctx.windows[:SLEB_WINDOWS], k, **kwargs)
        assert [t["removed"] for t in data["trace"]] == sel.details["order"]
    return data


def trace_rounds(name: str) -> int:
    data = read(CACHE / "selections" / f"{slug(name)}_trace.json")
    return len(data["trace"]) if data else 0


def selection(ctx: Context, name: str, k: int) -> Selection:
    kind, params = STRATEGIES[name]
    path = CACHE / "selections" / f"{slug(name)}_k{k}.json"
    data = read(path)
    if data is not None:
        return Selection.from_dict(data)
    if kind == "score":
        scores = ctx.scores(params.get("positions", "all"), params.get("cka_windows", 1))
        sel = select(scores, k, strategy=params["strategy"], metric=params.get("metric"),
                     protect=PROTECT, seed=params.get("seed", 0))
    else:
        trace = greedy_trace(ctx, name, params, k)["trace"][:k]
        order = [t["removed"] for t in trace]
        sel = Selection(sorted(order), ctx.n_layers, params["strategy"], params.get("metric", "calibration_loss"),
                        details={"order": order, "trace": trace,
                                 "forward_passes": sum(t["forward_passes"] for t in trace),
                                 "block_runs": sum(t.get("block_runs", 0) for t in trace)})
    write(path, sel.to_dict())
    return sel


def search_selection(ctx: Context) -> dict:
    path = CACHE / "selections" / "search.json"
    data = read(path)
    if data is None:
        from prune.choose import strategies as ST

        log(f"search {SEARCH}")
        started = time.time()
        heldout = ST.heldout_windows(ctx.tok, prune.load_text(ctx.calib_source), 32, 256, seed=0,
                                     n_heldout=SEARCH["heldout_windows"])
        proxy = ST.perplexity_proxy(ctx.model, heldout, batch_size=8)
        sel = ST.search(ctx.model, ctx.scores(), proxy, floor=SEARCH["max_perplexity_ratio"], higher_is_better=False,
                        budget=SEARCH["budget"], order_by=SEARCH["order_by"], protect=PROTECT, progress=False,
                        proxy_name=f"perplexity on {SEARCH['heldout_windows']} held-out calibration windows")
        data = {"selection": sel.to_dict(), "settings": SEARCH, "seconds": round(time.time() - started, 1)}
        write(path, data)
    return data


# ---- evaluations (cached per removed set) ---------------------------------------------------
class claim:
    """Cross-process lock on one cached result (``<path>.lock`` holding the pid): several
    workers share the queue; a case another live worker is computing is skipped."""

    def __init__(self, path: Path):
        self.lock = path.with_suffix(".lock")
        self.held = False

    def __enter__(self) -> bool:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    os.kill(int(self.lock.read_text() or 0), 0)
                    return False  # a live worker has it
                except (ProcessLookupError, ValueError, FileNotFoundError):
                    self.lock.unlink(missing_ok=True)  # stale
                    continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            self.held = True
            return True
        return False

    def __exit__(self, *exc):
        if self.held:
            self.lock.unlink(missing_ok=True)


def ppl_of(ctx: Context, removed) -> dict | None:
    path = CACHE / "ppl" / f"{set_key(removed)}.json"
    data = read(path)
    if data is None:
        with claim(path) as mine:
            if not mine:
                return None
            started = time.time()
            data = perplexity(ctx.pruned(removed), ctx.eval_windows, batch_size=4)
            data["removed"] = sorted(removed)
            data["seconds"] = round(time.time() - started, 1)
            write(path, data)
            log(f"perplexity {data['perplexity']:.2f} removed={sorted(removed)} ({data['seconds']}s)")
    return data


def same_limit(data: dict | None, limit: int, path: Path) -> dict | None:
    """``data`` (a cached lm-eval file) when it was made with ``limit`` questions per task; a cache of
    another limit is refused (its tasks, samples and the report's paired rows would mix two limits)."""
    if data is not None and data.get("limit") != limit:
        raise SystemExit(f"{path} holds lm-eval results of --limit {data.get('limit')}, not {limit}: rerun with "
                         f"--limit {data.get('limit')}, or move {CACHE / 'lmeval'} and {SAMPLES} aside first")
    return data


def lmeval_done(removed, tasks, limit: int) -> bool:
    path = CACHE / "lmeval" / f"{set_key(removed)}.json"
    data = same_limit(read(path), limit, path)
    return data is not None and all(t in data["tasks"] for t in tasks)


#: lm-eval's own files (results + per-example samples) per block set, for the paired comparisons;
#: scripts/bench_fidelity.py --part paired writes the same protocol's files for k = 7 (read too)
SAMPLES = CACHE / "lmeval-samples"
FIDELITY_SAMPLES = ROOT / "bench_cache" / "fidelity" / "lmeval_k7"


def samples_of(removed, tasks) -> Path | None:
    """The folder of lm-eval samples of every task in ``tasks`` for this block set, or None."""
    for root in (SAMPLES, FIDELITY_SAMPLES):
        folder = root / set_key(removed)
        if all(list(folder.glob(f"samples_{t}_local_*.jsonl")) for t in tasks):
            return folder
    return None


def lmeval_of(ctx: Context, removed, tasks, limit) -> dict | None:
    from prune.measure.lmeval import run_lm_eval

    path = CACHE / "lmeval" / f"{set_key(removed)}.json"
    with claim(path) as mine:
        if not mine:
            return None
        data = same_limit(read(path), limit, path) or {"removed": sorted(removed), "limit": limit, "tasks": {}}
        missing = [t for t in tasks if t not in data["tasks"]]
        if missing:
            model = ctx.pruned(removed)
            for task in missing:  # one task at a time: each finished task is cached
                started = time.time()
                run = run_lm_eval(model, ctx.tok, [task], limit=limit, batch_size=16, seed=0, data_dir_path=str(DATA),
                                  progress=False, local_alias=True)  # cached results use the registry names
                run.write(SAMPLES / set_key(removed), f"SmolLM2-135M-Instruct removed={sorted(removed)}")
                res = run.summary
                res[task]["seconds"] = round(time.time() - started, 1)
                data["tasks"].update(res)
                write(path, data)
                log(f"lm-eval {task} removed={sorted(removed)}: {res[task]['metrics']} ({res[task]['seconds']}s)")
    return data


#: lm-eval order at k = 7: the baselines and the published metrics first, then the rest
LMEVAL_PRIORITY = ["contiguous angular", "one_shot bi", "tail", "random (seed 0)", "sleb", "random (seed 1)",
                   "random (seed 2)", "one_shot angular", "iterative bi", "search", "one_shot msrs (all)",
                   "one_shot cka (all)", "iterative angular", "one_shot msrs (skip_first)", "one_shot cka (skip_first)",
                   "one_shot msrs (all, cka_windows=8)", "one_shot cka (all, cka_windows=8)"]


#: lm-eval tasks, cheapest first, so every strategy gets the cheap tasks before any gets the costly one
TASK_ORDER = ["winogrande", "piqa", "arc_easy", "hellaswag", "arc_challenge", "boolq"]


def ready_selection(ctx: Context, name: str, k: int):
    """The blocks ``name`` removes at ``k``, or None while a model-based run has not got that far."""
    if name == "search":
        s = read(CACHE / "selections" / "search.json")
        return s and s["selection"]["removed"]
    if STRATEGIES[name][0] == "model" and trace_rounds(name) < k:
        return None
    sel = guarded(f"{name} k={k}", selection, ctx, name, k)
    return sel and sel.removed


def lmeval_worker(ctx: Context, k: int, tasks, limit) -> None:
    """lm-eval at ``k``: task by task (TASK_ORDER), strategy by strategy (LMEVAL_PRIORITY); shares the queue
    with other workers and waits for model-based selections that another worker is still computing."""
    order = [t for t in TASK_ORDER if t in tasks] + [t for t in tasks if t not in TASK_ORDER]
    while True:
        waiting, did = False, False
        for task in order:
            for name in ["dense"] + LMEVAL_PRIORITY:
                removed = [] if name == "dense" else ready_selection(ctx, name, k)
                if removed is None:
                    waiting = True
                    continue
                if lmeval_done(removed, [task], limit):
                    continue
                if guarded(f"lm-eval {name} k={k}", lmeval_of, ctx, removed, [task], limit) is None:
                    waiting = True  # another worker has it (or it failed: see the log)
                    continue
                did = True
                break
            if did:
                break
        if did:
            continue  # restart from the top: a higher priority case may have become ready
        if not waiting:
            return
        time.sleep(120)


#: perplexity order: k = 7 first, the baselines and published metrics before the variants
MAIN = ["random (seed 0)", "random (seed 1)", "random (seed 2)", "tail", "one_shot bi", "contiguous angular",
        "one_shot angular", "one_shot msrs (all)", "one_shot cka (all)"]
VARIANTS = ["one_shot msrs (skip_first)", "one_shot cka (skip_first)", "one_shot msrs (all, cka_windows=8)",
            "one_shot cka (all, cka_windows=8)"]


def ppl_worker(ctx: Context) -> None:
    """Perplexity of the score-only strategies in priority order (model-based ones: the model queue)."""
    ppl_of(ctx, [])
    cases = [(n, 7) for n in MAIN + VARIANTS] + [(n, k) for k in (3, 5, 10) for n in MAIN] + \
            [(n, k) for k in (3, 5, 10) for n in VARIANTS]
    for name, k in cases:
        sel = guarded(f"{name} k={k}", selection, ctx, name, k)
        if sel is not None:
            guarded(f"perplexity {name} k={k}", ppl_of, ctx, sel.removed)

def guarded(what: str, fn, *a):
    """Run one case; a failure is logged and the benchmark goes on with the next case."""
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001
        import traceback

        log(f"FAILED {what}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return None


def stage_ppl(ctx: Context, names, ks) -> None:
    ppl_of(ctx, [])
    for k in ks:
        for name in names:
            sel = guarded(f"{name} k={k}", selection, ctx, name, k)
            if sel is not None:
                guarded(f"perplexity {name} k={k}", ppl_of, ctx, sel.removed)


def stage_search(ctx: Context) -> None:
    s = guarded("search", search_selection, ctx)
    if s is not None:
        guarded("perplexity search", ppl_of, ctx, s["selection"]["removed"])


def stage_lmeval(ctx: Context, names, ks, tasks, limit, with_search: bool) -> None:
    lmeval_of(ctx, [], tasks, limit)
    for k in ks:
        for name in names:
            sel = guarded(f"{name} k={k}", selection, ctx, name, k)
            if sel is not None:
                guarded(f"lm-eval {name} k={k}", lmeval_of, ctx, sel.removed, tasks, limit)
    s = read(CACHE / "selections" / "search.json")
    if with_search and s is not None:
        guarded("lm-eval search", lmeval_of, ctx, s["selection"]["removed"], tasks, limit)


def names_for(kind_filter: str, only: str | None) -> list[str]:
    names = [n for n, (kind, _) in STRATEGIES.items() if kind_filter in ("all", kind)]
    if only:
        wanted = [w.strip() for w in only.split(",")]
        # in the order the filters are given (the first filter's strategies first)
        names = [n for w in wanted for n in names if w in n]
        names = list(dict.fromkeys(names))
    return names


# ---- report: tables and plots ----------------------------------------------------------------
def headline(task: str) -> str:
    from prune.measure.lmeval import HEADLINE

    return HEADLINE.get(task, "acc")


def collect(ks) -> dict:
    """Everything cached so far, per strategy."""
    out = {"strategies": {}, "dense": {"ppl": read(CACHE / "ppl" / "dense.json"), "lmeval": read(CACHE / "lmeval" / "dense.json")}}
    for name in STRATEGIES:
        row = {}
        for k in ks:
            sel = read(CACHE / "selections" / f"{slug(name)}_k{k}.json")
            if sel is None:
                continue
            key = set_key(sel["removed"])
            row[k] = {"removed": sel["removed"], "ppl": read(CACHE / "ppl" / f"{key}.json"),
                      "lmeval": read(CACHE / "lmeval" / f"{key}.json")}
        out["strategies"][name] = row
    s = read(CACHE / "selections" / "search.json")
    if s is not None:
        key = set_key(s["selection"]["removed"])
        out["search"] = {**s, "ppl": read(CACHE / "ppl" / f"{key}.json"), "lmeval": read(CACHE / "lmeval" / f"{key}.json")}
    return out


def retained(lm: dict | None, dense: dict | None, tasks) -> tuple[float, float] | None:
    """(mean over tasks of acc/acc_dense, its standard error) or None when a task is missing."""
    if not lm or not dense:
        return None
    ratios, var = [], 0.0
    for t in tasks:
        if t not in lm["tasks"] or t not in dense["tasks"]:
            return None
        m = headline(t)
        a, d = lm["tasks"][t]["metrics"][m], dense["tasks"][t]["metrics"][m]
        se = lm["tasks"][t]["stderr"].get(m) or 0.0
        ratios.append(a / d)
        var += (se / d) ** 2
    return sum(ratios) / len(ratios), math.sqrt(var) / len(ratios)


def mean(xs):
    return sum(xs) / len(xs)


def cached_limit(data: dict) -> int | str:
    """The ``--limit`` of the cached lm-eval results the report reads (the dense model's file)."""
    return ((data["dense"].get("lmeval") or {}).get("limit")) or "?"


def report(ks, tasks, lm_k: int) -> str:
    data = collect(ks)
    dense_ppl = data["dense"]["ppl"]["perplexity"] if data["dense"]["ppl"] else None
    lines = []
    # perplexity table
    lines.append("| strategy | " + " | ".join(f"k={k}" for k in ks) + " |")
    lines.append("|---|" + "---:|" * len(ks))
    rows = {}
    for name, row in data["strategies"].items():
        rows[name] = [row.get(k, {}).get("ppl", {}) and row[k]["ppl"]["perplexity"] for k in ks]
    randoms = [n for n in rows if n.startswith("random")]
    if randoms:
        vals = []
        for i in range(len(ks)):
            xs = [rows[n][i] for n in randoms if rows[n][i]]
            vals.append(mean(xs) if len(xs) == len(randoms) else None)
        rows = {"random (mean of 3 seeds)": vals, **{n: v for n, v in rows.items() if n not in randoms}}
    spread = {}
    if randoms:
        for i, k in enumerate(ks):
            xs = [data["strategies"][n].get(k, {}).get("ppl") for n in randoms]
            if all(xs):
                spread[i] = (min(x["perplexity"] for x in xs), max(x["perplexity"] for x in xs))

    def fmt(v):
        return f"{v:.1f}" if v < 1e4 else f"{v:.2g}"

    for name, vals in rows.items():
        cells = ["-" if not v else fmt(v) for v in vals]
        if name.startswith("random"):
            cells = [c if i not in spread else f"{c} ({fmt(spread[i][0])}-{fmt(spread[i][1])})" for i, c in enumerate(cells)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if dense_ppl:
        lines.append(f"\nDense model: perplexity {dense_ppl:.2f}.")
    table_ppl = "\n".join(lines)

    # blocks chosen
    lines = ["| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, row in data["strategies"].items():
        lines.append(f"| {name} | " + " | ".join(" ".join(map(str, row[k]["removed"])) if k in row else "-" for k in ks) + " |")
    table_blocks = "\n".join(lines)

    # lm-eval table at lm_k
    dense_lm = data["dense"]["lmeval"]
    lines = ["| strategy | " + " | ".join(f"{t} ({headline(t)})" for t in tasks) + " | avg retained |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    if dense_lm:
        cells = [f"{dense_lm['tasks'][t]['metrics'][headline(t)]:.3f} ± {dense_lm['tasks'][t]['stderr'][headline(t)]:.3f}"
                 if t in dense_lm["tasks"] else "-" for t in tasks]
        lines.append("| dense | " + " | ".join(cells) + " | 100% |")
    avg = {}
    entries = [(n, row.get(lm_k)) for n, row in data["strategies"].items()]
    # the average is over the tasks finished for the dense model and for every baseline evaluated so far
    have = {n: set(((e or {}).get("lmeval") or {}).get("tasks", {})) for n, e in entries}
    base = [n for n in ("tail", "one_shot bi", "contiguous angular", "random (seed 0)", "random (seed 1)",
                        "random (seed 2)") if have.get(n)]
    common = [t for t in tasks if dense_lm and t in dense_lm["tasks"] and all(t in have[n] for n in base)]
    lines[0] = lines[0].replace("avg retained", f"avg retained ({', '.join(common)})")
    if "search" in data:
        entries.append((SEARCH_NAME + f" (k={len(data['search']['selection']['removed'])})",
                        {"lmeval": data["search"]["lmeval"]}))
    for name, entry in entries:
        lm = entry and entry.get("lmeval")
        if not lm:
            continue
        cells = []
        for t in tasks:
            if t in lm["tasks"]:
                m = headline(t)
                cells.append(f"{lm['tasks'][t]['metrics'][m]:.3f} ± {lm['tasks'][t]['stderr'][m]:.3f}")
            else:
                cells.append("-")
        r = retained(lm, dense_lm, common) if common else None
        if r:
            avg[name] = r
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if not r else f'{100 * r[0]:.1f}% ± {100 * r[1]:.1f}'} |")
    rnd = [avg[n] for n in avg if n.startswith("random")]
    if len(rnd) == 3:
        lines.append("| random (mean of 3 seeds) |" + " |" * len(tasks) + f" {100 * mean([r[0] for r in rnd]):.1f}% "
                     f"(seeds: {', '.join(f'{100 * r[0]:.1f}' for r in rnd)}) |")
        avg = {"random (mean of 3 seeds)": (mean([r[0] for r in rnd]), mean([r[1] for r in rnd])),
               **{n: v for n, v in avg.items() if not n.startswith("random")}}
    table_lm = "\n".join(lines)

    plots(data, ks, rows, avg, lm_k, dense_ppl, common)
    cost = ["| strategy | rounds | forward passes over its windows | full-model equivalents | seconds (shared CPU) |",
            "|---|---:|---:|---:|---:|"]
    for name, (kind, _) in STRATEGIES.items():
        tr = read(CACHE / "selections" / f"{slug(name)}_trace.json")
        if kind == "model" and tr and tr["trace"]:
            t = tr["trace"]
            fwd = sum(x["forward_passes"] for x in t)
            # iterative: each re-scoring runs the blocks still kept (traces before 2026-12-06 lack block_runs)
            equiv = sum(x.get("block_runs", (30 - x["round"]) * x["forward_passes"]) for x in t) / 30
            cost.append(f"| {name} | {len(t)} | {fwd} | {equiv:.1f} | {tr['seconds']:.0f} |")
    lm_img = IMG / f"quality_lmeval_k{lm_k}.png"
    parts = [f"### Perplexity (WikiText-2 rows 2000:, 64 x 512 tokens) vs k\n\n{table_ppl}\n\n"
             f"![perplexity vs k](img/quality_ppl_vs_k.png)",
             f"### Blocks removed (0-based)\n\n{table_blocks}",
             f"### What the model-based strategies cost (to k = {max(KS)} where finished)\n\n"
             "Iterative: one scoring pass (32 windows) of the blocks still kept per round after the first. SLEB: per round one pass to cache the "
             "block inputs plus one partial pass per candidate (4 windows); full-model equivalents count decoder-block "
             "passes / 30 (plus one LM head per candidate).\n\n" + "\n".join(cost),
             f"### 0-shot lm-eval at k = {lm_k} (limit {cached_limit(data)} per task; acc, hellaswag acc_norm; ± stderr)\n\n{table_lm}"
             + (f"\n\n![average retained accuracy at k = {lm_k}](img/{lm_img.name})" if lm_img.is_file() else "")]
    chosen = {n: tuple(row[lm_k]["removed"]) for n, row in data["strategies"].items() if lm_k in row}
    parts.append(recommendation(avg, rows, ks, chosen, tasks))
    if "search" in data:
        s = data["search"]
        det = s["selection"]["details"]
        ppl = s["ppl"]["perplexity"] if s["ppl"] else None
        parts.append(f"### Search\n\nsettings {s['settings']}: removed {s['selection']['removed']} "
                     f"({len(s['selection']['removed'])} blocks), {det.get('evaluations')} proxy evaluations, "
                     f"proxy {det.get('final')}, WikiText-2 perplexity {ppl and round(ppl, 2)}, {s['seconds']} s")
    return "\n\n".join(parts)


#: the toolkit's default until 2026-12-02, when ``verified`` (measured by scripts/bench_verified.py, not here) replaced
#: it; and the published one-shot metrics it must match
DEFAULT_STRATEGY = "contiguous angular"
PUBLISHED = ("one_shot bi", "one_shot angular")


def compare(avg: dict, a: str, b: str, chosen: dict | None = None, tasks=()) -> str:
    """``a`` against ``b``. Paired when both block sets have lm-eval samples of every task (the same
    questions): the task average of a - b (one headline metric per task) with its paired SE and 95%
    interval, called a win or a loss only when the interval excludes 0, plus the tasks where the
    per-task interval does. Otherwise unpaired, on average retained accuracy: the difference with
    its standard error (errors taken as independent), called only beyond twice that error."""
    folders = [samples_of(chosen[n], tasks) if chosen and n in chosen else None for n in (a, b)]
    if all(folders):
        from prune.measure.paired import compare_folders, headline_rows, task_average

        rows = headline_rows(compare_folders(folders[1], folders[0]))  # B = a, A = b: differences a - b
        avg_d = task_average(rows)
        verdict = ("better" if avg_d.ci_low > 0 else "worse" if avg_d.ci_high < 0
                   else "the 95% interval includes 0: not a claim")
        alone = [f"{r.task.removesuffix('_local')} {100 * r.diff:+.1f} [{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}]"
                 for r in rows if r.ci_low > 0 or r.ci_high < 0]
        return (f"paired, {b}: {100 * avg_d.diff:+.2f} points on the {len(rows)}-task average, paired SE "
                f"{100 * avg_d.se:.2f}, 95% interval [{100 * avg_d.ci_low:+.2f}, {100 * avg_d.ci_high:+.2f}] ({verdict})"
                + (f"; tasks whose own interval excludes 0: {'; '.join(alone)}" if alone else ""))
    (ma, sa), (mb, sb) = avg[a], avg[b]
    diff, se = ma - mb, (sa ** 2 + sb ** 2) ** 0.5
    verdict = "better" if diff > 2 * se else "worse" if diff < -2 * se else "within two standard errors: not a claim"
    return f"{100 * ma:.1f}% vs {100 * mb:.1f}% for {b}: {100 * diff:+.1f} points ± {100 * se:.1f} ({verdict}; unpaired)"


def recommendation(avg: dict, rows: dict, ks, chosen: dict, tasks=()) -> str:
    """The evidence for the default strategy and the default token positions, from the cached results."""
    out = ["### Recommendation", "",
           f"The default before `verified` (issue 15; \"Verified selection\", scripts/bench_verified.py): `select: "
           f"{{strategy: contiguous, metric: angular}}` ({DEFAULT_STRATEGY}), `score.positions: skip_first`. The evidence at k = 7 (paired on the same questions where both block sets have lm-eval "
           "samples, else average retained accuracy ± its standard error):", ""]
    d = DEFAULT_STRATEGY
    if d not in avg:
        return "\n".join(out + ["- not measured yet"])
    for other in ["tail", "random (mean of 3 seeds)", *PUBLISHED, "sleb", "iterative bi", "iterative angular"]:
        if other in avg:
            out.append(f"- {d}: {compare(avg, d, other, chosen, tasks)}")
    same = [n for n in chosen if n != d and chosen[n] == chosen.get(d)]
    if same:
        out.append(f"- {', '.join(same)} chose the same blocks ({' '.join(map(str, chosen[d]))})")
    best = max((n for n in avg if n != d and n not in same), key=lambda n: avg[n][0], default=None)
    if best:
        out.append(f"- the best other strategy measured, {best}: {compare(avg, best, d, chosen, tasks)}")
    wins = []
    for i, k in enumerate(ks):
        vals = {n: v[i] for n, v in rows.items() if v[i]}
        if d in vals and len(vals) > 1:
            rank = sorted(vals, key=vals.get).index(d) + 1
            wins.append(f"k={k}: {vals[d]:.1f}, rank {rank} of {len(vals)}")
    if wins:
        out.append(f"- perplexity of {d} (lower is better): " + "; ".join(wins))
    pos = []
    for metric in ("cka", "msrs"):
        a, b = f"one_shot {metric} (all)", f"one_shot {metric} (skip_first)"
        ppl = [f"k={k}: {rows[a][i]:.3g} -> {rows[b][i]:.3g}" for i, k in enumerate(ks)
               if a in rows and b in rows and rows[a][i] and rows[b][i]]
        lm = f"; accuracy {compare(avg, b, a)}" if a in avg and b in avg else ""
        if ppl or lm:
            pos.append(f"- {metric.upper()} with all positions -> without the first token: perplexity "
                       + ", ".join(ppl) + lm)
    if pos:
        out += ["", "Token positions (`all` vs `skip_first`): BI and angular distance choose the same blocks either "
                "way on this model at every k; CKA and MSRS, dominated by the first token's attention-sink "
                "activations when it counts, choose very differently:", "", *pos]
    return "\n".join(out)


def plots(data, ks, rows, avg, lm_k, dense_ppl, common=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    markers = "osD^v<>phX*P+x"
    top = 5000.0  # values above are drawn at the top edge, with their value written beside them
    for i, (name, vals) in enumerate(rows.items()):
        pts = [(k, v) for k, v in zip(ks, vals) if v]
        if pts:
            line, = ax.plot([k for k, _ in pts], [min(v, top) for _, v in pts], marker=markers[i % len(markers)],
                            label=name, lw=1.4)
            for k, v in pts:
                if v > top:
                    ax.annotate(f"{v:.2g}", (k, top), textcoords="offset points", xytext=(6, -4 - 9 * (i % 4)),
                                fontsize=7, color=line.get_color())
    if "search" in data and data["search"]["ppl"]:
        ax.plot([len(data["search"]["selection"]["removed"])], [data["search"]["ppl"]["perplexity"]], "k*", ms=14,
                label=SEARCH_NAME)
    if dense_ppl:
        ax.axhline(dense_ppl, color="grey", ls=":", label=f"dense ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xticks(list(ks))
    ax.set_xlabel("blocks removed k (of 30)")
    ax.set_ylabel(f"WikiText-2 perplexity (log scale; > {top:g} drawn at the top)")
    ax.set_ylim(top=top * 1.3)
    ax.set_title("SmolLM2-135M-Instruct: perplexity after removing k blocks")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(IMG / "quality_ppl_vs_k.png")
    plt.close(fig)
    if avg:
        items = sorted(avg.items(), key=lambda kv: kv[1][0])
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(items) + 1.5), dpi=110)
        y = range(len(items))
        ax.barh(list(y), [100 * v[0] for _, v in items], xerr=[100 * v[1] for _, v in items], color="#4c72b0",
                capsize=3)
        ax.set_yticks(list(y), [n for n, _ in items], fontsize=8.5)
        for yi, (_, v) in zip(y, items):
            ax.text(100 * v[0] + 100 * v[1] + 0.5, yi, f"{100 * v[0]:.1f}%", va="center", fontsize=8)
        ax.set_xlabel("average retained accuracy vs dense (%), ± stderr")
        ax.set_title(f"0-shot lm-eval, k = {lm_k} of 30 blocks removed\n(mean over {', '.join(common)}; {cached_limit(data)} examples each)",
                     fontsize=10)
        lo = min(100 * v[0] - 100 * v[1] for _, v in items)
        ax.set_xlim(max(0, lo - 5), 105)
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(IMG / f"quality_lmeval_k{lm_k}.png")
        plt.close(fig)


def write_docs(tables: str) -> None:
    """Replace the generated block of docs/BENCHMARKS.md ("Quality of the strategies") with ``tables``."""
    from docs_block import DOCS, replace_block

    if not replace_block("bench_quality", tables, "python scripts/bench_quality.py --part docs", "bench_cache/"):
        sys.exit(f"{DOCS} has no <!-- bench_quality:begin --> ... <!-- bench_quality:end --> block in its quality section")


# ---- main ------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "ppl", "ppl-worker", "lmeval", "lmeval-worker", "search", "report", "docs"],
                   default="all")
    p.add_argument("--kind", choices=["all", "score", "model"], default="all", help="which strategies")
    p.add_argument("--only", default=None, help="comma-separated substrings of strategy names")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--lmeval-ks", default="7")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("report", "docs") and not (CACHE / "ppl" / "dense.json").is_file():
        raise SystemExit(f"no cached results under {CACHE} (the report would redraw docs/img from nothing): "
                         "run the benchmark first")
    if args.part == "report":
        print(report(KS, tasks, int(args.lmeval_ks.split(",")[0])))
        return 0
    if args.part == "docs":
        write_docs(report(KS, tasks, int(args.lmeval_ks.split(",")[0])))
        return 0
    log(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    ctx = Context()
    names = names_for(args.kind, args.only)
    lm_ks = [int(k) for k in args.lmeval_ks.split(",")]
    if args.part == "ppl":
        stage_ppl(ctx, names, ks)
    elif args.part == "search":
        stage_search(ctx)
    elif args.part == "lmeval":
        stage_lmeval(ctx, names, lm_ks, tasks, args.limit, with_search=args.only is None or "search" in args.only)
    elif args.part == "ppl-worker":
        ppl_worker(ctx)
    elif args.part == "lmeval-worker":
        for k in lm_ks:
            lmeval_worker(ctx, k, tasks, args.limit)
    elif args.part == "all":  # the whole benchmark, most informative cases first
        main_score = [n for n in names_for("score", None) if "cka" not in n and "msrs" not in n]
        other_score = [n for n in names_for("score", None) if n not in main_score]
        model = names_for("model", None)
        stage_ppl(ctx, main_score + other_score, [7])
        stage_lmeval(ctx, main_score, [7], tasks, args.limit, with_search=False)
        stage_search(ctx)
        stage_ppl(ctx, model, [7])
        stage_lmeval(ctx, model + other_score, [7], tasks, args.limit, with_search=True)
        stage_ppl(ctx, list(STRATEGIES), [k for k in KS if k != 7])
        stage_lmeval(ctx, main_score + model + other_score, [10], tasks, args.limit, with_search=False)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
