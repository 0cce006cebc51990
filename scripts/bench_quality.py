"""Quality of the selection strategies on SmolLM2-135M-Instruct (docs/BENCHMARKS.md, "Quality of the strategies").

For every strategy and every k (blocks removed), the chosen blocks, the WikiText-2 perplexity and the
mean per-token KL(dense || pruned) of the pruned model on text disjoint from the calibration windows
(one pass, ``prune.measure.fidelity``, with each window's values for paired comparisons), what choosing
cost, and 0-shot lm-eval accuracy with every answer kept, compared paired. The strategies: every
score-based choice, iterative, SLEB, the redundancy-aware search and ``verified`` (the default), so the
tables answer issue 15 (verified against PruneMe's contiguous run, ShortGPT's one-shot BI, one-shot
angular distance and SLEB). The shared evaluation protocol (docs/BENCHMARKS.md):

* calibration: wiki.test.raw rows 0:2000, 32 windows x 256 tokens, seed 0; verified ranks on the next
  4 windows of the same rows (disjoint from the scoring windows);
* perplexity and KL: wiki.test.raw rows 2000:, seq_len 512, 64 windows;
* lm-eval: arc_easy, piqa, hellaswag (acc_norm), winogrande [+ arc_challenge, boolq], 0-shot,
  limit 500, batch_size 16, seed 0, local task copies.

Every finished piece is cached as JSON under ``bench_cache/quality/`` (scores per scoring setting,
selections per (strategy, k), measures and lm-eval per *removed set*, so two strategies that pick
the same blocks are evaluated once), with a lock per case (lm-eval: per task of a set), so several workers share
the queue and a rerun resumes. Greedy strategies (iterative, sleb) are run once to the largest k; their choice for a
smaller k is the prefix of the same greedy trace (each round depends only on the blocks removed before it).

    nohup nice -n 5 python scripts/bench_quality.py --part ppl-worker --threads 1 > ppl.log 2>&1 &
    nohup nice -n 5 python scripts/bench_quality.py --part lmeval-worker --threads 1 --lmeval-ks 10,7 \
          --only "verified,contiguous angular,one_shot bi,one_shot angular,sleb" > lm.log 2>&1 &
    python scripts/bench_quality.py --part docs      # the tables into docs/BENCHMARKS.md, plots into docs/img/
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
from prune.choose.rules import Selection, select
from prune.choose.strategies import heldout_windows
from prune.choose.verified import verified
from prune.measure.fidelity import FidelityReference, build_reference, measure_fidelity

CACHE = ROOT / "bench_cache" / "quality"
IMG = ROOT / "docs" / "img"
KS = (3, 5, 7, 10)
TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
EXTRA_TASKS = ["arc_challenge", "boolq"]
#: the protocol's lm-eval questions per task; the report's tables and plots read this limit's files
LIMIT = 500
PROTECT = (0, -1)
#: the protocol's calibration: CALIB_WINDOWS windows of WINDOW_TOKENS tokens (rows 0:2000, seed 0); verified's
#: held-out windows and SLEB's are of the same length
CALIB_WINDOWS, WINDOW_TOKENS = 32, 256
SCORING_TOKENS = CALIB_WINDOWS * WINDOW_TOKENS  # one scoring pass, in tokens through the model
SLEB_WINDOWS = 4  # SLEB's loss is measured on the first 4 calibration windows (CPU time; see docs)
SEARCH = dict(max_perplexity_ratio=4.0, budget=16, order_by="bi", heldout_windows=8)
#: verified: the toolkit's defaults (scores with skip_first, local-search budget 16) ranking on 4 held-out windows
VERIFIED = dict(positions="skip_first", budget=16, heldout=4)

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
    "verified": ("verified", dict(strategy="verified", **VERIFIED)),
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
        self.windows = prune.calibration_windows(self.tok, prune.load_text(self.calib_source), CALIB_WINDOWS,
                                                 WINDOW_TOKENS, seed=0)
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

    def heldout(self, n: int) -> torch.Tensor:
        """``n`` held-out windows from the calibration rows, disjoint from the scoring windows."""
        return heldout_windows(self.tok, prune.load_text(self.calib_source), CALIB_WINDOWS, WINDOW_TOKENS, 0, None, n)

    def reference(self) -> FidelityReference:
        """The dense model's top-256 log-probs over the evaluation windows, built once (cached on disk)."""
        path = CACHE / "reference.safetensors"
        with claim(path) as mine:
            if mine:
                reference_at(path, self.model, self.eval_windows)
        while not path.is_file():  # another worker is building it
            time.sleep(10)
        return FidelityReference.load(path)

    def pruned(self, removed):
        return without(self.model, removed)


def without(model, removed):
    """A copy of ``model`` without the blocks ``removed`` (``model`` is left whole)."""
    pruned = copy.deepcopy(model)
    if removed:
        prune.remove_layers(pruned, list(removed))
    return pruned


def reference_at(path: Path, model, windows: torch.Tensor) -> FidelityReference:
    """The original's top-256 log-probs over ``windows`` (``prune.measure.fidelity``), built once and kept at
    ``path`` (with the seconds it took beside it, ``.json``)."""
    if path.is_file():
        return FidelityReference.load(path)
    log(f"reference: the original's top-256 log-probs over {windows.shape[0]} windows ({path.name})")
    started = time.time()
    reference = build_reference(model, windows, top_k=256, batch_size=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    reference.save(path)
    write(path.with_suffix(".json"), {"seconds": round(time.time() - started, 1)})
    return reference


def measure_set(model, removed, reference: FidelityReference) -> dict:
    """Perplexity and KL(original || pruned) of ``model`` without ``removed`` over ``reference``'s windows in one
    pass, with each window's KL and NLL difference (for the paired comparisons); ``model`` is left whole."""
    pruned = without(model, removed)
    started = time.time()
    data = measure_fidelity(pruned, reference, batch_size=4, per_window=True)
    data.pop("data", None)
    data.update(perplexity=data["perplexity_pruned"], removed=sorted(removed), seconds=round(time.time() - started, 1))
    return data


# ---- selections ------------------------------------------------------------------------
class Busy(RuntimeError):
    """Another worker is computing this case (it is done later, or by that worker)."""


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
            raise Busy(f"{name}: another worker is extending this greedy run")
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
    elif kind == "verified":
        with claim(path) as mine:
            if not mine:
                raise Busy(f"{name} k={k}: another worker is choosing it")
            started = time.time()
            sel = verified(ctx.model, ctx.scores(params["positions"], 1), ctx.heldout(params["heldout"]), k,
                           protect=PROTECT, batch_size=4, budget=params["budget"], progress=False)
            sel.details["seconds"] = round(time.time() - started, 1)
            log(f"verified k={k}: {sel.removed} from {sel.details['source']} ({sel.details['seconds']} s)")
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
        proxy = ST.perplexity_proxy(ctx.model, ctx.heldout(SEARCH["heldout_windows"]), batch_size=8)
        sel = ST.search(ctx.model, ctx.scores(), proxy, floor=SEARCH["max_perplexity_ratio"], higher_is_better=False,
                        budget=SEARCH["budget"], order_by=SEARCH["order_by"], protect=PROTECT, progress=False,
                        proxy_name=f"perplexity on {SEARCH['heldout_windows']} held-out calibration windows")
        data = {"selection": sel.to_dict(), "settings": SEARCH, "seconds": round(time.time() - started, 1)}
        write(path, data)
    return data


# ---- evaluations (cached per removed set) ---------------------------------------------------
class claim:
    """Cross-process lock on one cached result (``<path>.lock`` holding the pid): several
    workers share the queue; a case another live worker is computing is skipped (``wait``: waited for, for
    the brief read-and-write of a file several workers add to)."""

    def __init__(self, path: Path, wait: bool = False):
        self.lock = path.with_suffix(".lock")
        self.wait = wait
        self.held = False

    def __enter__(self) -> bool:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            for _ in range(2):
                try:
                    fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    try:
                        os.kill(int(self.lock.read_text() or 0), 0)
                        break  # a live worker has it
                    except (ProcessLookupError, ValueError, FileNotFoundError):
                        self.lock.unlink(missing_ok=True)  # stale
                        continue
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                self.held = True
                return True
            if not self.wait:
                return False
            time.sleep(0.5)

    def __exit__(self, *exc):
        if self.held:
            self.lock.unlink(missing_ok=True)


def ppl_of(ctx: Context, removed) -> dict | None:
    """Perplexity and KL(dense || pruned) of the model without ``removed`` over the evaluation windows, in one
    pass against the dense model's top-256 log-probs (``prune.measure.fidelity``), with each window's KL and
    NLL difference for the paired comparisons; cached per removed set (None while another worker has it)."""
    path = CACHE / "ppl" / f"{set_key(removed)}.json"
    data = read(path)
    if data is None or "kl_windows" not in data:
        with claim(path) as mine:
            if not mine:
                return None
            data = cached_measure(path, ctx.model, removed, ctx.reference())
    return data


def cached_measure(path: Path, model, removed, reference: FidelityReference) -> dict:
    """:func:`measure_set`, kept at ``path`` (a file without each window's values is measured again)."""
    data = read(path)
    if data is None or "kl_windows" not in data:
        data = measure_set(model, removed, reference)
        write(path, data)
        log(f"perplexity {data['perplexity']:.2f}, KL {data['kl_mean']:.4f} removed={sorted(removed)} "
            f"({data['seconds']}s, {path.parent.name})")
    return data


def same_limit(data: dict | None, limit: int, path: Path) -> dict | None:
    """``data`` (a cached lm-eval file) when it was made with ``limit`` questions per task; a cache of
    another limit is refused (its tasks, samples and the report's paired rows would mix two limits)."""
    if data is not None and data.get("limit") != limit:
        raise SystemExit(f"{path} holds lm-eval results of --limit {data.get('limit')}, not {limit}: rerun with "
                         f"--limit {data.get('limit')}, or move {lmeval_dir(limit)} and {samples_dir(limit)} aside first")
    return data


def lmeval_dir(limit: int) -> Path:
    """Where lm-eval results of ``limit`` questions per task are cached (beyond the protocol's LIMIT: their own folder)."""
    return CACHE / ("lmeval" if limit == LIMIT else f"lmeval-n{limit}")


def samples_dir(limit: int) -> Path:
    """lm-eval's own files (results + per-example samples) per block set, for the paired comparisons."""
    return CACHE / ("lmeval-samples" if limit == LIMIT else f"lmeval-samples-n{limit}")


def lmeval_done(removed, tasks, limit: int) -> bool:
    path = lmeval_dir(limit) / f"{set_key(removed)}.json"
    data = same_limit(read(path), limit, path)
    return data is not None and all(t in data["tasks"] for t in tasks)


#: scripts/bench_fidelity.py --part paired writes the protocol's lm-eval files for k = 7 (read too)
FIDELITY_SAMPLES = ROOT / "bench_cache" / "fidelity" / "lmeval_k7"


def samples_of(removed, tasks, limit: int = LIMIT) -> Path | None:
    """The folder of lm-eval samples of every task in ``tasks`` for this block set, or None."""
    for root in (samples_dir(limit), FIDELITY_SAMPLES) if limit == LIMIT else (samples_dir(limit),):
        folder = root / set_key(removed)
        if all(list(folder.glob(f"samples_{t}_local_*.jsonl")) for t in tasks):
            return folder
    return None


def lmeval_of(ctx: Context, removed, tasks, limit) -> dict | None:
    """lm-eval of the model without ``removed`` on ``tasks``, cached per block set (one file, every task's
    results). Each task is claimed on its own, so several workers can share one set's tasks; a finished task is
    merged into the file under the file's own brief lock. None while another worker has one of the tasks."""
    from prune.measure.lmeval import run_lm_eval

    path = lmeval_dir(limit) / f"{set_key(removed)}.json"
    for task in tasks:
        with claim(path.with_name(f"{path.stem}.{task}.json")) as mine:
            if not mine:
                return None
            data = same_limit(read(path), limit, path)
            if data is not None and task in data["tasks"]:
                continue  # another worker finished it meanwhile
            started = time.time()
            run = run_lm_eval(ctx.pruned(removed), ctx.tok, [task], limit=limit, batch_size=16, seed=0,
                              data_dir_path=str(DATA), progress=False, local_alias=True)  # cached under registry names
            run.write(samples_dir(limit) / set_key(removed), f"SmolLM2-135M-Instruct removed={sorted(removed)}")
            res = run.summary
            res[task]["seconds"] = round(time.time() - started, 1)
            with claim(path, wait=True):  # read again: another worker may have added a task meanwhile
                data = same_limit(read(path), limit, path) or {"removed": sorted(removed), "limit": limit, "tasks": {}}
                data["tasks"].update(res)
                write(path, data)
            log(f"lm-eval {task} removed={sorted(removed)}: {res[task]['metrics']} ({res[task]['seconds']}s)")
    return same_limit(read(path), limit, path)


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


def lmeval_worker(ctx: Context, k: int, tasks, limit, names=None, dense: bool = True) -> None:
    """lm-eval at ``k``: task by task (TASK_ORDER), strategy by strategy (LMEVAL_PRIORITY), the dense model
    first unless ``dense`` is False; shares the queue with other workers and waits for model-based
    selections that another worker is still computing."""
    order = [t for t in TASK_ORDER if t in tasks] + [t for t in tasks if t not in TASK_ORDER]
    while True:
        waiting, did = False, False
        for task in order:
            for name in ["dense"] * dense + [n for n in dict.fromkeys(KEY + LMEVAL_PRIORITY) if names is None or n in names]:
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


#: the strategies issue 15 compares: verified against PruneMe's contiguous run, ShortGPT's one-shot BI, one-shot
#: angular distance and SLEB (measured first, at every k, by both workers)
KEY = ["verified", "contiguous angular", "one_shot bi", "one_shot angular", "sleb"]


def ppl_worker(ctx: Context, names=None) -> None:
    """Perplexity and KL in priority order: the key strategies at k = 10, 7, 5, 3, then the score-only rest at
    k = 7, then at the other k, then the iterative strategies, then the search (``names``: only these strategies).
    A case another worker holds is tried again once the rest are done."""
    ppl_of(ctx, [])
    rest = [n for n in MAIN + VARIANTS if n not in KEY]
    cases = [(n, k) for k in (10, 7, 5, 3) for n in KEY] + [(n, 7) for n in rest] + \
            [(n, k) for k in (3, 5, 10) for n in rest] + [(n, k) for n in ("iterative bi", "iterative angular")
                                                            for k in (10, 7, 5, 3)]
    pending = [(n, k) for n, k in cases if names is None or n in names]
    while pending:
        busy = []
        for name, k in pending:
            try:
                if ppl_of(ctx, selection(ctx, name, k).removed) is None:
                    busy.append((name, k))  # another worker is measuring this set: check again later
            except Busy:
                busy.append((name, k))
            except Exception as exc:  # noqa: BLE001  (logged; the benchmark goes on with the next case)
                failed(f"{name} k={k}", exc)
        if busy == pending:
            time.sleep(60)
        pending = busy
    if names is None:
        stage_search(ctx)


def guarded(what: str, fn, *a):
    """Run one case; a failure is logged and the benchmark goes on with the next case."""
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001
        failed(what, exc)
        return None


def failed(what: str, exc: Exception) -> None:
    import traceback

    log(f"FAILED {what}: {type(exc).__name__}: {exc}")
    traceback.print_exception(exc)


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
    out = {"strategies": {}, "dense": {"ppl": read(CACHE / "ppl" / "dense.json"), "lmeval": read(lmeval_dir(LIMIT) / "dense.json")}}
    for name in STRATEGIES:
        row = {}
        for k in ks:
            sel = read(CACHE / "selections" / f"{slug(name)}_k{k}.json")
            if sel is None:
                continue
            key = set_key(sel["removed"])
            row[k] = {"removed": sel["removed"], "ppl": read(CACHE / "ppl" / f"{key}.json"),
                      "lmeval": read(lmeval_dir(LIMIT) / f"{key}.json")}
        out["strategies"][name] = row
    s = read(CACHE / "selections" / "search.json")
    if s is not None:
        key = set_key(s["selection"]["removed"])
        out["search"] = {**s, "ppl": read(CACHE / "ppl" / f"{key}.json"), "lmeval": read(lmeval_dir(LIMIT) / f"{key}.json")}
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


def fmt(v: float) -> str:
    return f"{v:.1f}" if v < 1e4 else f"{v:.2g}"


def measure_rows(data: dict, ks, field: str) -> dict[str, list]:
    """``{strategy: [value at each k or None]}`` of a cached measure (``perplexity``, ``kl_mean``)."""
    return {name: [(row.get(k) or {}).get("ppl") and row[k]["ppl"][field] for k in ks]
            for name, row in data["strategies"].items()}


def with_random_mean(data: dict, ks, rows: dict, field: str) -> tuple[dict, dict]:
    """The three random seeds as one row (their mean; None until all three are measured) and their range."""
    randoms = [n for n in rows if n.startswith("random")]
    if not randoms:
        return rows, {}
    vals, spread = [], {}
    for i, k in enumerate(ks):
        xs = [rows[n][i] for n in randoms if rows[n][i] is not None]
        vals.append(mean(xs) if len(xs) == len(randoms) else None)
        if len(xs) == len(randoms):
            spread[i] = (min(xs), max(xs))
    return {"random (mean of 3 seeds)": vals, **{n: v for n, v in rows.items() if n not in randoms}}, spread


def measure_table(data: dict, ks, field: str, form) -> tuple[str, dict]:
    rows, spread = with_random_mean(data, ks, measure_rows(data, ks, field), field)
    rows = {name: vals for name, vals in rows.items() if any(v is not None for v in vals)}  # measured at some k
    lines = ["| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for name, vals in rows.items():
        cells = ["-" if v is None else form(v) for v in vals]
        if name.startswith("random"):
            cells = [c if i not in spread else f"{c} ({form(spread[i][0])}-{form(spread[i][1])})"
                     for i, c in enumerate(cells)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def rounds_ffe(name: str, k: int) -> float | None:
    """A greedy strategy's full-model equivalents over its windows for its first ``k`` rounds."""
    tr = read(CACHE / "selections" / f"{slug(name)}_trace.json")
    if not tr or len(tr["trace"]) < k:
        return None
    return sum(x.get("block_runs", (30 - x["round"]) * x["forward_passes"]) for x in tr["trace"][:k]) / 30


def selection_tokens(name: str, k: int) -> float | None:
    """What choosing cost, in tokens passed through the whole model (calibration tokens x full-model
    equivalents): one scoring pass over the 32 x 256 calibration tokens for a score-only strategy; that
    plus one pass of the blocks still kept per later round for iterative; SLEB's equivalents over its
    4 x 256 windows (no scoring pass); the scoring pass plus verified's equivalents over its held-out windows."""
    kind, params = STRATEGIES[name]
    if kind == "score":
        return SCORING_TOKENS
    if kind == "verified":
        sel = read(CACHE / "selections" / f"{slug(name)}_k{k}.json")
        return sel and SCORING_TOKENS + params["heldout"] * WINDOW_TOKENS * sel["details"]["full_forward_equivalents"]
    ffe = rounds_ffe(name, k)
    if ffe is None:
        return None
    return SLEB_WINDOWS * WINDOW_TOKENS * ffe if params["strategy"] == "sleb" else SCORING_TOKENS * (1 + ffe)


def goals(data: dict, ks) -> str:
    """Issue 15's goals: verified at or below the best other strategy in perplexity and KL at every k; at the
    largest k, 10% below SLEB's perplexity for at most a quarter of SLEB's selection compute."""
    ppl, kl = measure_rows(data, ks, "perplexity"), measure_rows(data, ks, "kl_mean")
    out = []
    for i, k in enumerate(ks):
        others = [n for n in ppl if n != "verified" and ppl[n][i] is not None]
        if ppl.get("verified", [None] * len(ks))[i] is None or not others:
            continue
        bp, bk = min(ppl[n][i] for n in others), min(kl[n][i] for n in others)
        v, vk = ppl["verified"][i], kl["verified"][i]
        out.append(f"- k = {k}: perplexity {v:.1f} vs best other {bp:.1f} ({'met' if v <= bp * 1.0005 else 'NOT met'}); "
                   f"KL {vk:.3f} vs {bk:.3f} ({'met' if vk <= bk * 1.0005 else 'NOT met'}) ({len(others)} others measured)")
    k = max(ks)
    i = list(ks).index(k)
    v, sl = ppl.get("verified", [None] * len(ks))[i], ppl.get("sleb", [None] * len(ks))[i]
    cv, cs = selection_tokens("verified", k), selection_tokens("sleb", k)
    if v and sl and cv and cs:
        below = 1 - v / sl
        out.append(f"- k = {k} against SLEB: perplexity {100 * below:.1f}% below SLEB's (goal: at least 10%: "
                   f"{'met' if below >= 0.10 else 'NOT met'}); selection compute {cv / cs:.2f}x SLEB's ({cv:,.0f} against "
                   f"{cs:,.0f} tokens through the model; goal at most 0.25x: {'met' if cv <= cs / 4 else 'NOT met'})")
    return "\n".join(out)


def interval_cell(m: dict) -> str:
    """A :func:`prune.choose.verified.margin` as ``+d [lo, hi] (windows where the other set is lower)``."""
    return f"{m['difference']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}] ({m['windows_lower']} of {m['windows']})"


def window_row(removed: list[int], measured: dict) -> dict:
    """A set measured per window, in the shape :func:`margin` reads."""
    return {"removed": removed, "kl_mean": measured["kl_mean"], "kl_windows": measured["kl_windows"]}


def paired_windows(data: dict, ks) -> str:
    """verified against each key baseline at every k, paired over the evaluation windows: the baseline's
    KL minus verified's, and its perplexity over verified's (exp of the mean per-window NLL difference)."""
    from prune.choose.verified import margin
    from prune.measure.paired import paired_t

    lines = ["| k | baseline | its set | KL: baseline - verified, 95% (baseline lower on) | "
             "perplexity: baseline / verified, 95% |", "|---:|---|---|---|---|"]
    for k in ks:
        v = (data["strategies"]["verified"].get(k) or {}).get("ppl")
        for name in KEY[1:]:
            b = (data["strategies"][name].get(k) or {}).get("ppl")
            if not (v and b):
                continue
            if b["removed"] == v["removed"]:
                lines.append(f"| {k} | {name} | {' '.join(map(str, b['removed']))} | the same set | - |")
                continue
            m = margin(window_row(v["removed"], v), window_row(b["removed"], b))
            r = paired_t(v["nll_diff_windows"], b["nll_diff_windows"])
            lines.append(f"| {k} | {name} | {' '.join(map(str, b['removed']))} | {interval_cell(m)} | "
                         f"x{math.exp(r.diff):.4f} [x{math.exp(r.ci_low):.4f}, x{math.exp(r.ci_high):.4f}] |")
    return "\n".join(lines)


def cost_table(data: dict, ks) -> str:
    k = max(ks)
    lines = ["| strategy | rounds or evaluations | full-model equivalents over its windows | selection cost at k = "
             f"{k} (tokens through the model) | vs SLEB | seconds (shared CPU) | perplexity at k = {k} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    sleb = selection_tokens("sleb", k)
    for name, (kind, _) in STRATEGIES.items():
        tokens = selection_tokens(name, k)
        row = data["strategies"][name].get(k) or {}
        ppl = row.get("ppl") and fmt(row["ppl"]["perplexity"]) or "-"
        if tokens is None or (kind == "score" and not row):
            continue
        if kind == "score":
            work, ffe, secs = "1 scoring pass", "1 (32 windows)", "-"
        elif kind == "verified":
            d = read(CACHE / "selections" / f"{slug(name)}_k{k}.json")["details"]
            work, ffe, secs = (f"{d['evaluations']} ({d['local_search_evaluations']} in the local search)",
                               f"{d['full_forward_equivalents']} ({VERIFIED['heldout']} windows)", f"{d['seconds']:.0f}")
        else:
            tr = read(CACHE / "selections" / f"{slug(name)}_trace.json")
            n = SLEB_WINDOWS if STRATEGIES[name][1]["strategy"] == "sleb" else 32
            work, ffe = f"{k} rounds", f"{rounds_ffe(name, k):.1f} ({n} windows)"
            secs = f"{tr['seconds']:.0f}" if len(tr["trace"]) == k else "-"
        vs = f"{tokens / sleb:.2f}x" if sleb else "-"
        lines.append(f"| {name} | {work} | {ffe} | {tokens:,.0f} | {vs} | {secs} | {ppl} |")
    return "\n".join(lines)


def lmeval_table(data: dict, lm_k: int, tasks) -> tuple[str, dict, dict, list]:
    """The lm-eval table at ``lm_k``: (Markdown, average retained per strategy, blocks per strategy, tasks averaged)."""
    dense_lm = data["dense"]["lmeval"]
    lines = ["| strategy | " + " | ".join(f"{t} ({headline(t)})" for t in tasks) + " | avg retained |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    if dense_lm:
        cells = [f"{dense_lm['tasks'][t]['metrics'][headline(t)]:.3f} ± {dense_lm['tasks'][t]['stderr'][headline(t)]:.3f}"
                 if t in dense_lm["tasks"] else "-" for t in tasks]
        lines.append("| dense | " + " | ".join(cells) + " | 100% |")
    avg = {}
    entries = [(n, row.get(lm_k)) for n, row in data["strategies"].items()]
    # the average is over the tasks finished for the dense model and for every strategy evaluated at this k
    have = {n: set(((e or {}).get("lmeval") or {}).get("tasks", {})) for n, e in entries}
    common = [t for t in tasks if dense_lm and t in dense_lm["tasks"] and all(t in h for h in have.values() if h)]
    lines[0] = lines[0].replace("avg retained", f"avg retained ({', '.join(common)})")
    if "search" in data and len(data["search"]["selection"]["removed"]) == lm_k:
        entries.append((SEARCH_NAME, {"lmeval": data["search"]["lmeval"]}))
    for name, entry in entries:
        lm = entry and entry.get("lmeval")
        if not lm:
            continue
        cells = [f"{lm['tasks'][t]['metrics'][headline(t)]:.3f} ± {lm['tasks'][t]['stderr'][headline(t)]:.3f}"
                 if t in lm["tasks"] else "-" for t in tasks]
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
    chosen = {n: tuple(row[lm_k]["removed"]) for n, row in data["strategies"].items() if lm_k in row}
    return "\n".join(lines), avg, chosen, common


def report(ks, tasks, lm_ks) -> str:
    data = collect(ks)
    dense = data["dense"]["ppl"]
    table_ppl, rows = measure_table(data, ks, "perplexity", fmt)
    table_kl, _ = measure_table(data, ks, "kl_mean", lambda v: f"{v:.3f}")
    lines = ["| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, row in data["strategies"].items():
        if any((row.get(k) or {}).get("ppl") for k in ks):
            lines.append(f"| {name} | " + " | ".join(" ".join(map(str, row[k]["removed"])) if k in row else "-"
                                                    for k in ks) + " |")
    table_blocks = "\n".join(lines)
    plot_ppl(data, ks, rows, dense and dense["perplexity"])
    plot_cost(data, max(ks))
    parts = [f"### Perplexity (WikiText-2 rows 2000:, 64 x 512 tokens) vs k\n\n{table_ppl}"
             + (f"\n\nDense model: perplexity {dense['perplexity']:.2f}." if dense else "")
             + "\n\n![perplexity vs k](img/quality_ppl_vs_k.png)",
             "### KL(dense ‖ pruned) per token, mean, on the same tokens (the dense model's top 256 log-probs)\n\n"
             + table_kl,
             f"### Blocks removed (0-based)\n\n{table_blocks}",
             "### Issue 15's goals for `verified`\n\n" + (goals(data, ks) or "- not measured yet"),
             "### verified against the published choices, paired over the 64 evaluation windows (Student's 95% "
             "interval)\n\n" + paired_windows(data, ks),
             f"### What choosing cost, and quality against it (k = {max(ks)})\n\n"
             "Cost in tokens passed through the whole model while choosing (calibration tokens x full-model "
             "equivalents; a full-model equivalent counts decoder-block passes / 30): one scoring pass over the 32 x 256 "
             "calibration tokens for the score-only strategies; iterative adds one pass of the blocks still kept per "
             f"later round; SLEB runs on {SLEB_WINDOWS} x 256 windows (one pass to cache the block inputs plus one partial "
             f"pass per candidate, per round); verified adds its evaluations on {VERIFIED['heldout']} held-out x 256 "
             "windows to the scoring pass.\n\n" + cost_table(data, ks)
             + "\n\n![quality against selection cost](img/selection_cost.png)"]
    for lm_k in lm_ks:
        table_lm, avg, chosen, common = lmeval_table(data, lm_k, tasks)
        if not avg:
            continue
        plot_lmeval(data, avg, lm_k, common)
        parts.append(f"### 0-shot lm-eval at k = {lm_k} (limit {cached_limit(data)} per task; acc, hellaswag acc_norm; "
                     f"± stderr)\n\n{table_lm}\n\n![average retained accuracy at k = {lm_k}](img/quality_lmeval_k{lm_k}.png)")
        parts.append(recommendation(avg, rows, ks, chosen, common, lm_k))  # paired over the tasks every set finished
    parts.append(positions_note(data, ks, rows, tasks, lm_ks))
    if "search" in data:
        s = data["search"]
        det = s["selection"]["details"]
        ppl = s["ppl"]["perplexity"] if s["ppl"] else None
        parts.append(f"### Search\n\nsettings {s['settings']}: removed {s['selection']['removed']} "
                     f"({len(s['selection']['removed'])} blocks), {det.get('evaluations')} proxy evaluations, "
                     f"proxy {det.get('final')}, WikiText-2 perplexity {ppl and round(ppl, 2)}, {s['seconds']} s")
    return "\n\n".join(parts)


#: the toolkit's default strategy (since 2026-12-02), and the published choices it must match or beat
DEFAULT_STRATEGY = "verified"
PUBLISHED = ("contiguous angular", "one_shot bi", "one_shot angular", "sleb")


def compare(avg: dict, a: str, b: str, chosen: dict | None = None, tasks=()) -> str:
    """``a`` against ``b``. Paired when both block sets have lm-eval samples of every task (the same
    questions): the task average of a - b (one headline metric per task) with its paired SE and 95%
    interval, called a win or a loss only when the interval excludes 0, plus the tasks where the
    per-task interval does. Otherwise unpaired, on average retained accuracy: the difference with
    its standard error (errors taken as independent), called only beyond twice that error."""
    if chosen and a in chosen and chosen.get(a) == chosen.get(b):
        return f"{b} chose the same blocks"
    folders = [samples_of(chosen[n], tasks) if chosen and n in chosen else None for n in (a, b)]
    if all(folders):
        from prune.measure.paired import compare_folders, headline_rows, task_average

        rows = [r for r in headline_rows(compare_folders(folders[1], folders[0]))  # B = a, A = b: differences a - b
                if r.task.removesuffix("_local") in tasks]  # the tasks every set in the table finished
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


def recommendation(avg: dict, rows: dict, ks, chosen: dict, tasks, lm_k: int) -> str:
    """The evidence at ``lm_k`` for the default strategy against the others, from the cached results."""
    d = DEFAULT_STRATEGY
    out = [f"#### The default, `{d}`, at k = {lm_k}", "",
           "Paired on the same questions (over the tasks the table's average covers) where both block sets have "
           "lm-eval samples, else average retained accuracy ± its standard error:", ""]
    if d not in avg:
        return "\n".join(out + ["- not measured yet"])
    for other in [*PUBLISHED, "tail", "random (mean of 3 seeds)", "iterative bi", "iterative angular"]:
        if other in avg:
            out.append(f"- {d}: {compare(avg, d, other, chosen, tasks)}")
    wins = []
    for i, k in enumerate(ks):
        vals = {n: v[i] for n, v in rows.items() if v[i]}
        if d in vals and len(vals) > 1:
            rank = 1 + sum(v < vals[d] for v in vals.values())  # ties share the better rank
            wins.append(f"k={k}: {vals[d]:.1f}, rank {rank} of {len(vals)}")
    if wins and lm_k == max(ks):
        out.append(f"- perplexity of {d} (lower is better): " + "; ".join(wins))
    return "\n".join(out)


def positions_note(data: dict, ks, rows: dict, tasks, lm_ks) -> str:
    """How leaving out the first token changes what CKA and MSRS choose."""
    pos = []
    for lm_k in lm_ks:
        avg = lmeval_table(data, lm_k, tasks)[1]
        for metric in ("cka", "msrs"):
            a, b = f"one_shot {metric} (all)", f"one_shot {metric} (skip_first)"
            if a in avg and b in avg:
                pos.append(f"- {metric.upper()} at k = {lm_k}, accuracy without the first token: {compare(avg, b, a)}")
    for metric in ("cka", "msrs"):
        a, b = f"one_shot {metric} (all)", f"one_shot {metric} (skip_first)"
        ppl = [f"k={k}: {rows[a][i]:.3g} -> {rows[b][i]:.3g}" for i, k in enumerate(ks)
               if a in rows and b in rows and rows[a][i] and rows[b][i]]
        if ppl:
            pos.append(f"- {metric.upper()} perplexity with all positions -> without the first token: " + ", ".join(ppl))
    if not pos:
        return ""
    return "\n".join(["### Token positions (`all` against `skip_first`)", "",
                      "BI and angular distance choose the same blocks either way on this model at every k; CKA and MSRS, "
                      "dominated by the first token's attention-sink activations when it counts, choose very differently:",
                      "", *pos])


def plot_ppl(data, ks, rows, dense_ppl) -> None:
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
            star = name == DEFAULT_STRATEGY
            line, = ax.plot([k for k, _ in pts], [min(v, top) for _, v in pts], marker="*" if star else markers[i % len(markers)],
                            label=name, lw=2.4 if star else 1.4, ms=12 if star else 6)
            for k, v in pts:
                if v > top:
                    ax.annotate(f"{v:.2g}", (k, top), textcoords="offset points", xytext=(6, -4 - 9 * (i % 4)),
                                fontsize=7, color=line.get_color())
    if "search" in data and data["search"]["ppl"]:
        ax.plot([len(data["search"]["selection"]["removed"])], [data["search"]["ppl"]["perplexity"]], "kP", ms=10,
                label=SEARCH_NAME)
    if dense_ppl:
        ax.axhline(dense_ppl, color="grey", ls=":", label=f"dense ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xticks(list(ks))
    ax.set_xlabel("blocks removed k (of 30)")
    ax.set_ylabel(f"WikiText-2 perplexity (log scale; > {top:g} drawn at the top)")
    highest = max((v for vals in rows.values() for v in vals if v), default=top)
    ax.set_ylim(top=min(top, highest) * 1.3)  # the strategies drawn, not an empty band above them
    ax.set_title("SmolLM2-135M-Instruct: perplexity after removing k blocks")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(IMG / "quality_ppl_vs_k.png")
    plt.close(fig)


def plot_cost(data, k: int) -> None:
    """Perplexity at ``k`` against selection cost (tokens through the model), one point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[float, float], list[str]] = {}  # strategies on the same point share a label
    for name in STRATEGIES:
        row, tokens = data["strategies"][name].get(k) or {}, selection_tokens(name, k)
        if tokens and row.get("ppl") and not name.startswith("random") and name != "tail":
            points.setdefault((tokens, row["ppl"]["perplexity"]), []).append(name)
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for (x, y), names in points.items():
        star = DEFAULT_STRATEGY in names
        ax.scatter(x, y, s=90 if star else 36, zorder=3, marker="*" if star else "o")
        ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("selection cost: tokens through the whole model while choosing")
    ax.set_ylabel(f"WikiText-2 perplexity at k = {k}")
    ax.set_title(f"SmolLM2-135M, {k} of 30 blocks removed: quality against selection cost (lower left is better)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(IMG / "selection_cost.png")
    plt.close(fig)


def plot_lmeval(data, avg, lm_k, common) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(avg.items(), key=lambda kv: kv[1][0])
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(items) + 1.5), dpi=110)
    y = range(len(items))
    ax.barh(list(y), [100 * v[0] for _, v in items], xerr=[100 * v[1] for _, v in items], color="#4c72b0", capsize=3)
    ax.set_yticks(list(y), [n for n, _ in items], fontsize=8.5)
    for yi, (_, v) in zip(y, items):
        ax.text(100 * v[0] + 100 * v[1] + 0.5, yi, f"{100 * v[0]:.1f}%", va="center", fontsize=8)
    ax.set_xlabel("average retained accuracy vs dense (%), ± stderr")
    ax.set_title(f"0-shot lm-eval, k = {lm_k} of 30 blocks removed\n(mean over {', '.join(common)}; "
                 f"{cached_limit(data)} examples each)", fontsize=10)
    lo = min(100 * v[0] - 100 * v[1] for _, v in items)
    ax.set_xlim(max(0, lo - 5), 105)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(IMG / f"quality_lmeval_k{lm_k}.png")
    plt.close(fig)


def published_sets(k: int) -> dict[str, list[int]]:
    """The blocks the default strategy and each published choice removed at ``k`` (those selected so far)."""
    return {name: sel["removed"] for name in (DEFAULT_STRATEGY, *PUBLISHED)
            if (sel := read(CACHE / "selections" / f"{slug(name)}_k{k}.json")) is not None}


def headline_pairs(folder_a: Path, folder_b: Path, tasks) -> list:
    """B against A per question (:func:`prune.measure.paired.compare_folders`), each task's headline metric, over
    ``tasks`` only."""
    from prune.measure.paired import compare_folders, headline_rows

    return [r for r in headline_rows(compare_folders(folder_a, folder_b)) if r.task.removesuffix("_local") in tasks]


def questions_report(lm_ks, tasks, limit: int) -> str:
    """The default strategy against the published choices, paired on ``limit`` questions per task (more
    than the protocol's LIMIT: ``--part lmeval-worker --limit``), beside the same comparison on LIMIT."""
    from prune.measure.paired import task_average

    def paired(removed_a, removed_b, n: int):
        """(the task average of a - b on ``n`` questions per task, the per-task rows), or None if not evaluated."""
        folders = [samples_of(removed, tasks, n) for removed in (removed_b, removed_a)]
        if not all(folders):
            return None
        rows = headline_pairs(*folders, tasks)
        return task_average(rows), rows

    def cell(res) -> str:
        if res is None:
            return "not evaluated"
        avg = res[0]
        mark = " *" if avg.ci_low > 0 or avg.ci_high < 0 else ""
        return f"{100 * avg.diff:+.2f} [{100 * avg.ci_low:+.2f}, {100 * avg.ci_high:+.2f}]{mark}"

    d = DEFAULT_STRATEGY
    lines = [f"| k | `{d}` removes | against | its blocks | on {LIMIT} questions per task | on up to {limit:,} | "
             f"per task on up to {limit:,} (points) |", "|---:|---|---|---|---:|---:|---|"]
    counts = ""
    for k in lm_ks:
        chosen = published_sets(k)
        if d not in chosen:
            continue
        for other in PUBLISHED:
            if other not in chosen:
                continue
            if chosen[other] == chosen[d]:
                lines.append(f"| {k} | {' '.join(map(str, chosen[d]))} | {other} | the same blocks | - | - | - |")
                continue
            small, big = paired(chosen[d], chosen[other], LIMIT), paired(chosen[d], chosen[other], limit)
            per_task = "-" if big is None else ", ".join(
                f"{r.task.removesuffix('_local')} {100 * r.diff:+.1f}{' *' if r.ci_low > 0 or r.ci_high < 0 else ''}"
                for r in big[1])
            if big is not None and not counts:
                counts = ", ".join(f"{r.task.removesuffix('_local')} {r.n:,}" for r in big[1])
            lines.append(f"| {k} | {' '.join(map(str, chosen[d]))} | {other} | {' '.join(map(str, chosen[other]))} | "
                         f"{cell(small)} | {cell(big)} | {per_task} |")
    shares = retained_shares(lm_ks, tasks, limit)
    if shares:
        lines += ["", shares]
    lines += ["", f"Points: the {len(tasks)}-task average of `{d}` minus the other (acc; hellaswag acc_norm), 0-shot, the same "
              "questions for both, with its paired 95% interval; * where the interval excludes 0 (a win above 0, a "
              f"loss below). Questions on up to {limit:,}: {counts or 'none evaluated yet'} (every question of a task "
              f"with fewer, the first {limit:,} of the others)."]
    return "\n".join(lines)


def retained_shares(lm_ks, tasks, limit: int) -> str:
    """Each block set's accuracy as a share of the dense model's on ``limit`` questions per task (the mean over
    tasks of set / dense, and the set's paired difference to dense), when the dense model was evaluated there."""
    from prune.measure.paired import task_average

    dense = samples_of([], tasks, limit)
    if dense is None:
        return ""
    parts = []
    for k in lm_ks:
        distinct = {}
        for name, removed in published_sets(k).items():
            if removed not in distinct.values() and samples_of(removed, tasks, limit):
                distinct[name] = removed
        for name, removed in distinct.items():
            rows = headline_pairs(dense, samples_of(removed, tasks, limit), tasks)
            avg = task_average(rows)
            share = mean([r.mean_b / r.mean_a for r in rows])
            parts.append(f"{name} (k = {k}) {100 * share:.1f}% ({100 * avg.diff:+.2f} [{100 * avg.ci_low:+.2f}, "
                         f"{100 * avg.ci_high:+.2f}])")
    return (f"Retained on these questions (the mean over tasks of the set's accuracy over the dense model's; in "
            f"brackets the set minus dense in points, paired, 95%): {'; '.join(parts)}.") if parts else ""


def write_docs(tables: str) -> None:
    """Replace the generated block of docs/BENCHMARKS.md ("Quality of the strategies") with ``tables``."""
    from docs_block import DOCS, replace_block

    if not replace_block("bench_quality", tables, "python scripts/bench_quality.py --part docs", "bench_cache/"):
        sys.exit(f"{DOCS} has no <!-- bench_quality:begin --> ... <!-- bench_quality:end --> block in its quality section")


# ---- main ------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "ppl", "ppl-worker", "lmeval", "lmeval-worker", "search", "report", "docs",
                                       "questions"],
                   default="all")
    p.add_argument("--kind", choices=["all", "score", "model"], default="all", help="which strategies")
    p.add_argument("--only", default=None, help="comma-separated substrings of strategy names")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--lmeval-ks", default="7,10")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=LIMIT)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-dense", action="store_true", help="lmeval-worker: leave the dense model out (the paired "
                   "comparisons between strategies do not need it)")
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("report", "docs") and not (CACHE / "ppl" / "dense.json").is_file():
        raise SystemExit(f"no cached results under {CACHE} (the report would redraw docs/img from nothing): "
                         "run the benchmark first")
    lm_ks = [int(k) for k in args.lmeval_ks.split(",")]
    if args.part == "report":
        print(report(KS, tasks, lm_ks))
        return 0
    if args.part == "docs":
        write_docs(report(KS, tasks, lm_ks))
        return 0
    if args.part == "questions":  # the paired rows on --limit questions per task, into docs/BENCHMARKS.md
        from docs_block import replace_block

        body = questions_report(lm_ks, tasks, args.limit)
        print(body)
        if not replace_block("bench_quality_questions", body, f"python scripts/bench_quality.py --part questions "
                             f"--lmeval-ks {args.lmeval_ks} --limit {args.limit}", "bench_cache/quality/"):
            print("(docs/BENCHMARKS.md has no bench_quality_questions block: printed only)")
        return 0
    log(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    ctx = Context()
    names = names_for(args.kind, args.only)
    if args.part == "ppl":
        stage_ppl(ctx, names, ks)
    elif args.part == "search":
        stage_search(ctx)
    elif args.part == "lmeval":
        stage_lmeval(ctx, names, lm_ks, tasks, args.limit, with_search=args.only is None or "search" in args.only)
    elif args.part == "ppl-worker":
        ppl_worker(ctx, names if args.only else None)
    elif args.part == "lmeval-worker":
        for k in lm_ks:
            lmeval_worker(ctx, k, tasks, args.limit, names if args.only else None, dense=not args.skip_dense)
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
