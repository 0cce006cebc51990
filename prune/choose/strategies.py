"""Model-based selection strategies: they run the model, not only read one set of scores.

* ``iterative``: remove the block ``select.metric`` ranks most removable, re-score the
  pruned model, repeat ``k`` times (``k`` scoring passes over the calibration windows,
  ``k - 1`` when the full model's scores are given).
* ``sleb`` (Song et al., SLEB): each round, remove the block whose removal raises the
  calibration loss ``mean NLL`` least. The hidden state entering every block is cached
  once per round, so evaluating candidate ``i`` runs only the blocks after it (and the
  LM head): per round one pass to cache plus one partial pass per candidate.
* ``search``: the largest set of blocks whose removal keeps a utility floor, within an
  evaluation budget. Candidates are ordered by redundancy (``order_by``: ``msrs``,
  ``cka``, ``angular`` or ``bi``, as in :func:`prune.choose.rules.rank_blocks`); the floor is
  the perplexity on *held-out* calibration windows at most ``max_perplexity_ratio`` times
  the original's, or a proxy lm-eval task's score at least ``min_task_retained`` of the
  original's. First a binary search over prefixes of the ranking (the longest prefix
  that holds), then a greedy pass over the remaining candidates in rank order, adding
  each one whose removal still holds; it stops when the budget of proxy evaluations is
  spent or no candidate is left. A set that removes a hybrid stack's last attention block
  never holds (and costs no evaluation).

Every :class:`~prune.choose.rules.Selection` records in ``details`` what it cost
(``forward_passes``, ``full_forward_equivalents``, or ``evaluations``) and a per-round
``trace``. Strategies leave the model exactly as they found it: blocks are skipped
temporarily with :func:`skip_blocks`, restored in ``finally``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from prune.core import dist
from prune.model.capture import BlockStates, batches, measured_in_eval_mode
from prune.io.text import _assemble, _window_body, token_stream
from prune.core.config import HELDOUT_WINDOWS, CalibrationConfig, EvaluateConfig, ScoreConfig, SelectConfig
from prune.core.errors import PruneError
from prune.core.records import block_number, complement
from prune.measure.perplexity import nll_sum
from prune.model.surgery import check_no_repeats
from prune.model.loading import decoder_layers, decoder_layers_path, input_device, keeps_attention, pruned_config_updates, weights_dtype
from prune.measure.scoring import (BATCH_SIZE, BETA, CKA_WINDOWS, DEFAULT_POSITIONS, TAU, ScoreResult, check_model,
                                   check_windows, embedding_rows, score)
from prune.choose.rules import (DEFAULT_METRIC, DEFAULT_PROTECT, Selection, finite_first, metric_values, not_scores,
                                rank_blocks, resolve_count, resolve_protect)

ORDER_BY = ("msrs", "cka", "angular", "bi")
SCORE_METRICS = {"bi": ("bi",), "angular": ("angular",), "cka": ("cka",), "msrs": ("cka",)}


# ---- temporary removal ---------------------------------------------------------------------
@contextmanager
def skip_blocks(model: nn.Module, removed):
    """Run ``model`` without the 0-based blocks ``removed`` inside the ``with``; yields the kept indices.

    Does what :func:`prune.surgery.remove_layers` does (a shorter decoder ``ModuleList`` of
    the same block modules, ``layer_idx`` renumbered, config per-layer lists sliced), and
    undoes all of it on exit, so the model is left exactly as it was.
    """
    path = decoder_layers_path(model)
    layers = model.get_submodule(path)
    n = len(layers)
    removed = [block_number(i) for i in removed]
    check_no_repeats(removed)
    removed = sorted(removed)
    if any(not 0 <= i < n for i in removed):
        raise PruneError(f"block indices {removed} out of range for {n} blocks")
    if len(removed) >= n:
        raise PruneError(f"cannot skip all {n} blocks")
    kept = complement(n, removed)
    if not removed:
        yield kept
        return
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    config = model.config
    saved_idx = [(m, m.layer_idx) for block in layers for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    updates = pruned_config_updates(config, kept)
    saved_config = {key: getattr(config, key) for key in updates}
    try:
        setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
        for new_index, old in enumerate(kept):
            for m in layers[old].modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new_index
        for key, value in updates.items():
            setattr(config, key, value)
        yield kept
    finally:
        setattr(parent, attr, layers)
        for m, idx in saved_idx:
            m.layer_idx = idx
        for key, value in saved_config.items():
            setattr(config, key, value)


def calibration_loss(model, windows: torch.Tensor, removed=(), batch_size: int = 8) -> float:
    """Mean next-token NLL of ``model`` without blocks ``removed`` over ``windows``."""
    with skip_blocks(model, removed):
        total, count = nll_sum(model, windows, batch_size)
    return total / count


def _inject(block: nn.Module, states: list[torch.Tensor]):
    """Pre-hook on ``block`` replacing its input hidden state by ``states[0], states[1], ...`` in call order."""
    feed = iter(states)

    def hook(module, args, kwargs):
        hidden = next(feed)
        if args and isinstance(args[0], torch.Tensor):
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return block.register_forward_pre_hook(hook, with_kwargs=True)


# ---- iterative -----------------------------------------------------------------------------
def check_strategy_args(who: str, model, scores=None, **whole: tuple[int, int]) -> None:
    """One line, before any work, unless ``model`` is a model, ``scores`` (when given) the
    :class:`~prune.measure.scoring.ScoreResult` of a stack of its size, and each ``name=(value, least)``
    a whole number at least ``least``. (A tokenizer in the model's place, a dict for the scores, a
    batch of 0 or a top-k of 0 raised from deep inside, or chose wrong blocks.)"""
    check_model(model, f"{who}: the model")
    if scores is not None:
        if not isinstance(scores, ScoreResult):
            raise not_scores(who, scores)
        if scores.n_layers != (n := len(decoder_layers(model))):
            raise PruneError(f"{who}: the scores describe {scores.n_layers} blocks but the model has {n} (score this "
                             "model)")
    for name, (value, least) in whole.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PruneError(f"{who}: {name}={value!r} must be a whole number, at least {least}")


def check_trace(who: str, start, on_round=None) -> list:
    """``start`` (a run to resume) as the list of its rounds, each a dict with the block it ``removed``, or one line
    (``start=[3]``, a block for a round, raised TypeError from inside); likewise ``on_round`` not a function."""
    if on_round is not None and not callable(on_round):
        raise PruneError(f"{who}: on_round={on_round!r} must be a function of each round's record (or None)")
    rounds = list(start) if isinstance(start, (list, tuple)) else None
    if rounds is None or not all(isinstance(t, dict) and "removed" in t for t in rounds):
        raise PruneError(f"{who}: start={start!r} must be the trace of an earlier run to resume (its rounds, each a dict "
                         "with the block it removed: what on_round received), or [] to start afresh")
    return rounds


def check_same_settings(scores, *, metric: str, positions: str, cka_windows: int, beta: float, tau: float) -> None:
    """Refuse ``scores`` computed with other settings than a strategy that re-scores by ``metric`` uses (its later
    rounds would rank on other settings than its first): the token positions always, ``cka_windows`` for cka and
    msrs, ``beta`` and ``tau`` for msrs (BI's ranking does not depend on MSRS's settings)."""
    have, want = {"positions": scores.positions}, {"positions": positions}
    if metric in ("cka", "msrs"):
        have["cka_windows"], want["cka_windows"] = scores.cka_windows, cka_windows
    if metric == "msrs" and scores.msrs:
        have.update(beta=scores.msrs["beta"], tau=scores.msrs["tau"])
        want.update(beta=beta, tau=tau)
    differ = [f"{k} {have[k]} (scores) vs {want[k]}" for k in have if have[k] != want[k]]
    if differ:
        raise PruneError(f"the given scores were computed with other settings than this call's: {', '.join(differ)} "
                         "(pass the same settings, or scores=None to score here)")


@measured_in_eval_mode
def nothing_left(strategy: str, r: int) -> str:
    """A greedy round with no candidate: every block left but protected ones is a hybrid stack's last attention."""
    return (f"{strategy}: no block left to remove in round {r + 1}: the only ones not protected are the last attention "
            "blocks of this hybrid stack (protect fewer blocks, or remove fewer)")


def iterative(model, windows: torch.Tensor, count: int, *, metric: str = DEFAULT_METRIC, protect=DEFAULT_PROTECT,
              scores=None, batch_size: int = BATCH_SIZE, positions: str = DEFAULT_POSITIONS,
              cka_windows: int = CKA_WINDOWS, beta: float = BETA, tau: float = TAU, progress: bool = True, start=(), on_round: Callable[[dict], None] | None = None) -> Selection:
    """Remove ``count`` blocks one at a time: the one ``metric`` ranks most removable in the
    current (pruned) model, re-scored after every removal. ``scores`` of the full model, when
    given, serve for the first round. Cost: ``count`` scoring passes (``count - 1`` with ``scores``),
    each of the blocks still kept: ``full_forward_equivalents`` = sum of kept blocks per pass / L
    (SLEB's and ``verified``'s unit). ``scores`` must have been computed with this call's settings that
    ``metric`` reads (:func:`check_same_settings`: every round ranks on the same settings).

    ``start`` (trace records of an earlier run) resumes a greedy run; ``on_round(record)`` is
    called after every round (e.g. to save progress)."""
    if metric not in SCORE_METRICS:
        raise PruneError(f"unknown metric {metric!r} for iterative (choose from {', '.join(SCORE_METRICS)})")
    check_strategy_args("iterative", model, scores, batch_size=(batch_size, 1))
    L = len(decoder_layers(model))
    prot = resolve_protect(protect, L)
    count = resolve_count(L, count, None, prot)
    trace = [dict(t) for t in check_trace("iterative", start, on_round)][:count]
    removed = [t["removed"] for t in trace]
    if scores is not None:
        check_same_settings(scores, metric=metric, positions=positions, cka_windows=cka_windows, beta=beta, tau=tau)
    current = scores if scores is not None and not trace else None
    for r in tqdm(range(len(trace), count), desc="iterative", unit="round", disable=not progress):
        kept = complement(L, removed)
        passes = 0
        if current is None:
            with skip_blocks(model, removed):
                current = score(model, windows, batch_size=batch_size, positions=positions, metrics=SCORE_METRICS[metric],
                                cka_windows=cka_windows, beta=beta, tau=tau, progress=False)
            passes = 1
        values, _ = metric_values(current, metric)
        order = [kept[p] for p in rank_blocks(current, metric)
                 if kept[p] not in prot and keeps_attention(model.config, removed + [kept[p]])]
        if not order:
            raise PruneError(nothing_left("iterative", r))
        pick = order[0]
        trace.append({"round": r, "removed": pick, "value": values[kept.index(pick)], "forward_passes": passes,
                      "block_runs": passes * len(kept), "values": {str(kept[p]): v for p, v in enumerate(values)}})
        removed.append(pick)
        current = None
        if on_round is not None:
            on_round(trace[-1])
    passes = sum(t["forward_passes"] for t in trace)
    block_runs = sum(t.get("block_runs", t["forward_passes"] * (L - t["round"])) for t in trace)  # resumed traces may lack it
    return Selection(sorted(removed), L, "iterative", metric,
                     details={"order": removed, "trace": trace, "forward_passes": passes,
                              "full_forward_equivalents": round(block_runs / L, 2),
                              "positions": positions, "cka_windows": cka_windows})


# ---- SLEB ----------------------------------------------------------------------------------
def _block_inputs(model, windows: torch.Tensor, batch_size: int) -> list[list[torch.Tensor]]:
    """``inputs[p][b]``: the hidden state entering the p-th block of the (current) stack for batch b
    of this rank's share of the windows (the share :func:`prune.measure.perplexity.nll_sum` runs;
    all of them in one process)."""
    layers = decoder_layers(model)
    device, dtype = input_device(model), weights_dtype(model)
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    lo, hi = dist.shard(windows.shape[0], batch_size)
    with torch.no_grad(), BlockStates(layers, device, dtype) as capture:
        for _, batch in batches(windows[lo:hi], batch_size):
            model.base_model(input_ids=batch.to(device), use_cache=False)
            _keep_inputs(capture, out)
    return out


def _keep_inputs(capture: BlockStates, out: list[list[torch.Tensor]]) -> None:
    """Append what entered each block in the last forward pass to ``out[p]``."""
    states, inputs = capture.pop()
    for p in range(len(out)):
        out[p].append(states[p] if inputs[p] is None else inputs[p])


@measured_in_eval_mode
def sleb(model, windows: torch.Tensor, count: int, *, protect=DEFAULT_PROTECT, batch_size: int = BATCH_SIZE,
         progress: bool = True, start=(), on_round: Callable[[dict], None] | None = None) -> Selection:
    """SLEB: ``count`` rounds; each removes the block whose removal gives the lowest calibration loss.

    Candidate ``i`` is evaluated from the cached input of block ``i``, running only the kept
    blocks after it, so its loss equals that of the model without blocks ``removed + [i]``.
    ``full_forward_equivalents`` counts decoder-block passes over ``windows`` divided by the
    number of blocks (the LM head runs once per candidate on top of that). ``start`` and
    ``on_round`` resume and follow a run as in :func:`iterative`.
    """
    check_strategy_args("sleb", model, batch_size=(batch_size, 1))
    layers = decoder_layers(model)
    check_windows(windows, embedding_rows(model))  # a ZeroDivisionError, ...
    L = len(layers)
    prot = set(resolve_protect(protect, L))
    count = resolve_count(L, count, None, sorted(prot))
    trace = [dict(t) for t in check_trace("sleb", start, on_round)][:count]
    removed = [t["removed"] for t in trace]
    bar = tqdm(total=count, initial=len(trace), desc="sleb", unit="round", disable=not progress)
    for r in range(len(trace), count):
        kept = complement(L, removed)
        with skip_blocks(model, removed):
            cached = _block_inputs(model, windows, batch_size)
        passes = 1
        block_runs = len(kept)
        losses: dict[int, float] = {}
        for p, i in enumerate(kept):
            if i in prot or not keeps_attention(model.config, removed + [i]):
                continue  # protected, or the last attention block of a hybrid stack (transformers needs one)
            if p + 1 < len(kept):
                with skip_blocks(model, kept[: p + 1] + removed):
                    handle = _inject(decoder_layers(model)[0], cached[p])
                    try:
                        total, n_tok = nll_sum(model, windows, batch_size)
                    finally:
                        handle.remove()
                block_runs += len(kept) - p - 1
            else:  # the last block: nothing runs after it, evaluate the whole pruned stack
                with skip_blocks(model, removed + [i]):
                    total, n_tok = nll_sum(model, windows, batch_size)
                block_runs += len(kept) - 1
            passes += 1
            losses[i] = total / n_tok
        del cached
        if not losses:
            raise PruneError(nothing_left("sleb", r))
        pick = min(losses, key=lambda i: (finite_first(losses[i]), i))  # NaN / inf (an overflow) last
        if not math.isfinite(losses[pick]):
            raise PruneError(f"sleb: every candidate's loss is {losses[pick]} in round {r + 1} (the model overflows "
                             "in its dtype: load it in float32, model.dtype: float32)")
        trace.append({"round": r, "removed": pick, "loss": losses[pick], "perplexity": math.exp(losses[pick]),
                      "forward_passes": passes, "block_runs": block_runs,
                      "candidates": {str(i): v for i, v in losses.items()}})
        removed.append(pick)
        if on_round is not None:
            on_round(trace[-1])
        bar.update(1)
        bar.set_postfix(removed=pick, ppl=f"{math.exp(losses[pick]):.2f}")
    bar.close()
    passes = sum(t["forward_passes"] for t in trace)
    block_runs = sum(t["block_runs"] for t in trace)
    return Selection(sorted(removed), L, "sleb", "calibration_loss",
                     details={"order": removed, "trace": trace, "forward_passes": passes,
                              "full_forward_equivalents": round(block_runs / L, 2), "windows": int(windows.shape[0]),
                              "seq_len": int(windows.shape[1])})


# ---- search --------------------------------------------------------------------------------
def heldout_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0, bos: bool | None = None,
                    n_heldout: int = HELDOUT_WINDOWS["search"]) -> torch.Tensor:
    """``n_heldout`` windows of the calibration text disjoint from :func:`prune.io.text.calibration_windows`'
    ``n_samples`` (the next windows of the same seeded permutation), in stream order. The default is
    search's; a recipe gives verified ``HELDOUT_WINDOWS["verified"]`` (4)."""
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or n_heldout < 1:
        raise PruneError(f"n_heldout={n_heldout!r}: held-out windows are a whole number, at least 1")
    body, bos_id = _window_body(tokenizer, seq_len, bos)
    stream = token_stream(tokenizer, text)
    available = stream.numel() // body
    if available < n_samples + n_heldout:
        raise PruneError(f"calibration text too short for {n_heldout} held-out windows: {available} windows of {body} "
                         f"tokens, {n_samples} used for calibration (add text, or lower select.heldout_windows)")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=gen)[n_samples : n_samples + n_heldout].sort().values
    return _assemble(stream[: available * body].view(available, body)[picks], bos_id)


def perplexity_proxy(model, windows: torch.Tensor, batch_size: int = 8) -> Callable[[list[int]], float]:
    """``removed -> perplexity`` of the model without those blocks on ``windows``."""
    return lambda removed: math.exp(calibration_loss(model, windows, removed, batch_size))


def task_proxy(model, tokenizer, task: str, *, limit: int = 100, batch_size: int = 8, seed: int = 0,
               data_dir=None, task_dirs=None) -> Callable[[list[int]], float]:
    """``removed -> score`` of one lm-eval task (its headline metric) without those blocks."""
    from prune.measure.lmeval import HEADLINE, canonical_name, evaluate_tasks, resolve_tasks

    resolve_tasks([task], data_dir_path=data_dir, task_dirs=task_dirs)  # unknown task: fail now

    def run(removed):
        with skip_blocks(model, removed):
            res = evaluate_tasks(model, tokenizer, [task], limit=limit, batch_size=batch_size, seed=seed,
                                 data_dir_path=data_dir, task_dirs=task_dirs, progress=False)
        name, result = next(iter(res.items()))  # hellaswag, or its local copy hellaswag_local: acc_norm for both
        metrics = result["metrics"]
        for metric in (HEADLINE.get(canonical_name(name), "acc"), "acc", *metrics):  # else lm-eval's first (filter)
            if metrics.get(metric) is not None:
                if metric in result.get("lower_is_better", ()):
                    raise PruneError(f"search proxy task {task!r} reports {metric}, where lower is better: "
                                     "select.min_task_retained needs a task scored like accuracy (or use "
                                     "select.max_perplexity_ratio)")
                return metrics[metric]
        raise PruneError(f"search proxy task {task!r} reports no metric; choose a task with one (acc, exact_match, ...)")

    return run


def pareto(evaluations: list[dict], higher_is_better: bool) -> list[dict]:
    """The best proxy ratio seen for each number of blocks removed (whether or not it holds the floor)."""
    sign = 1.0 if higher_is_better else -1.0
    best: dict[int, dict] = {}
    for e in evaluations:
        if e["n"] not in best or sign * e["ratio"] > sign * best[e["n"]]["ratio"]:
            best[e["n"]] = e
    return [{k: best[n][k] for k in ("n", "value", "ratio", "ok", "removed")} for n in sorted(best)]


@measured_in_eval_mode
def search(model, scores, proxy: Callable[[list[int]], float], *, floor: float, higher_is_better: bool, budget: int,
           order_by: str = DEFAULT_METRIC, protect=DEFAULT_PROTECT, max_remove: int | None = None, proxy_name: str = "proxy",
           progress: bool = True) -> Selection:
    """The largest set of blocks whose removal keeps ``proxy`` within ``floor`` of the original (see module docstring).

    ``floor`` is a ratio to the original proxy value: the largest allowed (``higher_is_better``
    False, e.g. perplexity) or the smallest allowed (True, e.g. accuracy). ``budget`` counts
    proxy evaluations of candidate sets; the original model's evaluation is one more.
    """
    if order_by not in ORDER_BY:
        raise PruneError(f"unknown order_by {order_by!r} (choose from {', '.join(ORDER_BY)})")
    check_strategy_args("search", model, scores, budget=(budget, 1))
    if not callable(proxy):
        raise PruneError(f"search: proxy must be a function of the removed blocks (prune.perplexity_proxy or "
                         f"prune.task_proxy), got a {type(proxy).__name__}")
    if isinstance(floor, bool) or not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
        raise PruneError(f"search floor={floor!r} must be a ratio to the original's proxy value, a finite number > 0 "
                         "(e.g. 1.2: at most 1.2x its perplexity; 0.95: at least 95% of its accuracy)")
    L = len(decoder_layers(model))
    prot = set(resolve_protect(protect, L))
    if max_remove is not None:  # as a recipe's n_layers: cannot remove 20 of 8 blocks, nor none
        max_remove = resolve_count(L, max_remove, None, sorted(prot))
    order = [i for i in rank_blocks(scores, order_by) if i not in prot][: L - 1]
    cap = len(order) if max_remove is None else min(max_remove, len(order))
    if not order:
        raise PruneError("search: every block is protected, nothing can be removed")
    base = proxy([])
    if not (math.isfinite(base) and base > 0):
        raise PruneError(f"search: the original model scores {base} on {proxy_name}, so a ratio to it means nothing "
                         "(a task it scores 0 on: choose another select.proxy_task or a larger select.proxy_limit; a "
                         "perplexity that is not finite: load the model in float32)")
    evaluations: list[dict] = []
    memo: dict[tuple, dict] = {}
    bar = tqdm(total=budget, desc="search", unit="eval", disable=not progress)

    def check(removed: list[int], phase: str) -> bool:
        if not keeps_attention(model.config, removed):  # a hybrid stack's last attention block stays: never holds
            return False
        key = tuple(sorted(removed))
        if key not in memo:
            value = proxy(sorted(removed))
            ratio = value / base
            ok = math.isfinite(ratio) and (ratio >= floor if higher_is_better else ratio <= floor)
            memo[key] = {"removed": list(key), "n": len(key), "value": value, "ratio": ratio, "ok": bool(ok), "phase": phase}
            evaluations.append(memo[key])
            bar.update(1)
            bar.set_postfix(n=len(key), ratio=f"{ratio:.3f}")
        return memo[key]["ok"]

    # phase 1: the longest prefix of the ranking that holds (binary search; the empty prefix holds)
    lo, hi = 0, cap + 1
    while hi - lo > 1 and len(evaluations) < budget:
        mid = (lo + hi) // 2
        if check(order[:mid], "prefix"):
            lo = mid
        else:
            hi = mid
    chosen = list(order[:lo])
    # phase 2: greedy, the remaining candidates in rank order; why it stopped: the budget with candidates
    # untried (also when phase 1 spent it: order[:lo + 1] is then untried), the max_remove cap, or every candidate tried
    stopped = "candidates"
    for cand in order[lo:]:
        if len(chosen) >= cap:
            stopped = "max_remove"
            break
        if not keeps_attention(model.config, chosen + [cand]):  # passed over as if protected, at no cost
            continue
        key = tuple(sorted(chosen + [cand]))
        if key not in memo and len(evaluations) >= budget:
            stopped = "budget"
            break
        if check(chosen + [cand], "greedy"):
            chosen.append(cand)
    bar.close()
    final = memo.get(tuple(sorted(chosen)))
    values, _ = metric_values(scores, order_by)
    return Selection(sorted(chosen), L, "search", order_by, values, details={
        "proxy": proxy_name, "floor": floor, "higher_is_better": higher_is_better, "budget": budget,
        "original": base, "evaluations": len(evaluations) + 1, "candidate_evaluations": len(evaluations),
        "order": order, "final": None if final is None else {k: final[k] for k in ("value", "ratio")},
        "trace": evaluations, "pareto": pareto(evaluations, higher_is_better),
        "stopped": stopped,
    })


# ---- dispatch from a recipe ------------------------------------------------------------------
def choose_iterative(model, windows: torch.Tensor, scores, select: SelectConfig, calibration: CalibrationConfig,
                     score: ScoreConfig, quiet: bool = False) -> Selection:
    """``select.strategy: iterative`` with a recipe's sections."""
    L = len(decoder_layers(model))
    prot = resolve_protect(select.protect, L)
    count = resolve_count(L, select.n_layers, select.fraction, prot)
    return iterative(model, windows, count, metric=select.metric, protect=prot, scores=scores,
                     batch_size=calibration.batch_size, positions=score.positions, cka_windows=score.cka_windows,
                     beta=score.beta, tau=score.tau, progress=not quiet)


def choose_sleb(model, windows: torch.Tensor, select: SelectConfig, calibration: CalibrationConfig,
                quiet: bool = False) -> Selection:
    """``select.strategy: sleb`` with a recipe's sections."""
    L = len(decoder_layers(model))
    prot = resolve_protect(select.protect, L)
    count = resolve_count(L, select.n_layers, select.fraction, prot)
    return sleb(model, windows, count, protect=prot, batch_size=calibration.batch_size, progress=not quiet)


def choose_search(model, tokenizer, scores, select: SelectConfig, calibration: CalibrationConfig,
                  evaluate: EvaluateConfig | None, quiet: bool = False) -> Selection:
    """``select.strategy: search`` with a recipe's sections: the proxy is perplexity on held-out
    calibration windows (``max_perplexity_ratio``) or an lm-eval task (``min_task_retained``)."""
    from prune.io.text import load_text

    sel, c = select, calibration
    L = len(decoder_layers(model))
    prot = resolve_protect(sel.protect, L)
    max_remove = None
    if sel.n_layers is not None or sel.fraction is not None:
        max_remove = resolve_count(L, sel.n_layers, sel.fraction, prot)
    order_by = sel.order_by or sel.metric
    if sel.max_perplexity_ratio is not None:
        held = heldout_windows(tokenizer, load_text(c.source()), c.n_samples, c.seq_len, c.seed, c.bos, sel.held_out())
        proxy = perplexity_proxy(model, held, c.batch_size)
        floor, higher, name = sel.max_perplexity_ratio, False, f"perplexity on {sel.held_out()} held-out calibration windows"
    else:
        ev = evaluate
        proxy = task_proxy(model, tokenizer, sel.proxy_task, limit=sel.proxy_limit, seed=sel.seed,
                           batch_size=ev.batch_size if ev else 8, data_dir=ev.data_dir if ev else None,
                           task_dirs=ev.task_dirs if ev else None)
        floor, higher, name = sel.min_task_retained, True, f"{sel.proxy_task} (limit {sel.proxy_limit})"
    result = search(model, scores, proxy, floor=floor, higher_is_better=higher, budget=sel.budget, order_by=order_by,
                    protect=prot, max_remove=max_remove, proxy_name=name, progress=not quiet)
    if not quiet:
        print(pareto_table(result))
    return require_removal(result, "select.max_perplexity_ratio" if sel.max_perplexity_ratio is not None
                           else "select.min_task_retained")


def require_removal(result: Selection, setting: str) -> Selection:
    """``result`` when the search found a set to remove; else one line naming the floor (``setting``) and
    the best single removal it measured, before a run evaluates the original and fails in surgery."""
    if result.removed:
        return result
    d = result.details
    single = [p for p in d["pareto"] if p["n"] == 1]
    best = f"; the best single removal measured {single[0]['ratio']:.3f} x the original" if single else ""
    raise PruneError(f"search: no block can be removed within {setting}={d['floor']:g} on {d['proxy']}{best} "
                     f"(loosen {setting}, or give select.budget more evaluations)")


def pareto_table(selection: Selection) -> str:
    """The search's Pareto curve (blocks removed vs proxy) as Markdown."""
    d = selection.details
    lines = [f"search: {d['proxy']}, floor {'>=' if d['higher_is_better'] else '<='} {d['floor']:g} x original "
             f"({d['original']:.4g}); {d['evaluations']} evaluations (budget {d['budget']}, stopped: {d['stopped']})",
             "", "| blocks removed | best proxy seen | ratio to original | holds | blocks (0-based) |", "|---:|---:|---:|---|---|"]
    for p in d["pareto"]:
        lines.append(f"| {p['n']} | {p['value']:.4g} | {p['ratio']:.3f} | {'yes' if p['ok'] else 'no'} | "
                     f"{' '.join(map(str, p['removed']))} |")
    return "\n".join(lines)
