"""``verified``: cheap candidates from the scores, ranked by what they do to the model's outputs.

1. **Candidates** (each a set of ``k`` unprotected blocks, named by where it came from):
   every contiguous run (Gromov et al.'s family of choices); the one-shot top-k by Block
   Influence, angular distance, CKA(in, out) and MSRS contribution; and the *redundancy
   families* of RedTest's CKA matrix: blocks whose outputs are mutually more similar than
   ``tau`` (the pairs MSRS counts) form connected groups, and a candidate takes the least
   influential (lowest BI) one, then two, blocks from every family, filling up by BI. This is
   where MSRS chooses: it says which blocks are interchangeable, BI which of them to drop.
   And the mixtures of the two published shapes: the best contiguous run of ``m < k`` blocks
   (angular distance) plus the ``k - m`` lowest-BI blocks outside it, for every ``m >= k / 2``.
2. **Verification**: each candidate is measured by ``KL(original || candidate)`` of the
   next-token distributions on held-out calibration windows (not those that scored it;
   :mod:`prune.measure.fidelity`, the original's top-k log-probs computed once). The hidden
   state entering every block of the original is cached, so a candidate whose first removed
   block is ``f`` runs only the kept blocks after ``f``.
3. **Local search** (optional, ``budget`` evaluations): swap one removed block of the best set
   for an adjacent kept one, or for one of the three lowest-BI kept blocks; keep the first swap
   that lowers the KL and start again, until no swap helps or the budget is spent.

4. **Margin**: the runner-up's KL minus the chosen set's, paired over the held-out windows
   (``d_w = KL_w(runner-up) - KL_w(chosen)``, Student's 95% interval with ``n - 1`` degrees of
   freedom, :func:`prune.measure.paired.paired_t`). The windows chose the winner, so the interval
   flatters it: one that includes 0 says the windows cannot tell the two sets apart (more
   ``heldout_windows``, or a check on other text, would); one above 0 is suggestive, not proof.

Cost is counted like SLEB's: decoder-block runs over the held-out windows divided by the
number of blocks (``full_forward_equivalents``), plus the one full pass of the original that
keeps both its reference log-probs and every block's input; the LM head runs once per candidate
on top. Under a launcher the windows are split over the processes (:class:`Verifier`).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from prune.choose.rules import DEFAULT_PROTECT, Selection, contiguous, finite_first, one_shot, resolve_count, resolve_protect
from prune.choose.strategies import _inject, _keep_inputs, check_strategy_args, skip_blocks
from prune.core import dist
from prune.core.config import VERIFIED_BUDGET, FidelityConfig, default
from prune.core.errors import PruneError
from prune.core.records import complement
from prune.measure.fidelity import build_reference, fidelity_window_sums, summary_from_sums
from prune.measure.paired import paired_t
from prune.measure.scoring import BATCH_SIZE, check_windows, embedding_rows
from prune.model.capture import BlockStates, measured_in_eval_mode
from prune.model.loading import cut_without_attention, decoder_layers, input_device, keeps_attention, weights_dtype

ONE_SHOT = ("bi", "angular", "cka", "msrs")
TOP_K = default(FidelityConfig, "top_k")  # the original's log-probs kept per token, as the evaluation keeps them


def contiguous_runs(n_layers: int, count: int, protect: list[int]) -> list[list[int]]:
    """Every run ``l .. l+count-1`` that avoids the protected blocks."""
    prot = set(protect)
    return [list(range(l, l + count)) for l in range(n_layers - count + 1) if not prot & set(range(l, l + count))]


def redundancy_families(scores, tau: float) -> list[list[int]]:
    """Connected groups (size >= 2) of blocks whose outputs have linear CKA above ``tau``."""
    S = scores.cka_matrix
    L = len(S)
    parent = list(range(L))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(L):
        for j in range(i + 1, L):
            if S[i][j] == S[i][j] and S[i][j] > tau:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(L):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def family_set(scores, count: int, protect: list[int], families: list[list[int]], per_family: int) -> list[int] | None:
    """Up to ``per_family`` lowest-BI blocks from each family (rounds of one), filled up by BI."""
    bi = scores.block_influence
    prot = set(protect)
    pools = [sorted((b for b in fam if b not in prot), key=lambda b: (bi[b], b)) for fam in families]
    chosen: list[int] = []
    for round_ in range(per_family):
        for pool in sorted(pools, key=lambda p: (bi[p[0]], p[0]) if p else (float("inf"), 0)):
            if len(chosen) < count and round_ < len(pool):
                chosen.append(pool[round_])
    if not chosen:
        return None
    rest = sorted((b for b in range(scores.n_layers) if b not in prot and b not in chosen), key=lambda b: (bi[b], b))
    return sorted(chosen + rest[: count - len(chosen)])


def candidate_sets(scores, count: int, protect: list[int]) -> dict[tuple[int, ...], list[str]]:
    """Every candidate set (sorted tuple) -> the sources that proposed it, in order."""
    out: dict[tuple[int, ...], list[str]] = {}

    def add(blocks, source):
        key = tuple(sorted(blocks))
        if len(key) == count and source not in out.setdefault(key, []):
            out[key].append(source)

    if scores.angular is not None and contiguous_runs(scores.n_layers, count, protect):
        add(contiguous(scores, count, protect).removed, "contiguous angular")
    for metric in ONE_SHOT:
        if metric in ("cka", "msrs") and scores.cka is None:
            continue
        if metric == "angular" and scores.angular is None:
            continue
        add(one_shot(scores, count, metric, protect).removed, f"one_shot {metric}")
    if scores.cka is not None and scores.msrs:
        families = redundancy_families(scores, scores.msrs["tau"])
        for per in (1, 2):
            found = family_set(scores, count, protect, families, per)
            if found is not None:
                add(found, f"msrs families ({per} per family)")
    if scores.angular is not None:
        bi = scores.block_influence
        for m in range((count + 1) // 2, count):
            if not contiguous_runs(scores.n_layers, m, protect):  # every run of m crosses a protected block
                continue
            run = contiguous(scores, m, protect).removed
            rest = sorted((b for b in range(scores.n_layers) if b not in protect and b not in run),
                          key=lambda b: (bi[b], b))
            add(run + rest[: count - m], f"contiguous {m} + BI {count - m}")
    for run in contiguous_runs(scores.n_layers, count, protect):
        add(run, "contiguous run")
    return out


class Verifier:
    """KL(original || model without a set) on held-out windows, from cached block inputs.

    One pass of the original over this process's share of the windows (:func:`prune.core.dist.shard`,
    whole batches) keeps both its top-k log-probs and the state entering every block; each
    candidate's per-window sums (KL, agreement, NLLs, tokens) are all-reduced in float64 (each
    process fills its own rows), so every process ranks the same numbers and one process gives the
    same result as several. A result holds the totals' summary and each window's mean KL."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int, top_k: int, progress: bool):
        self.model, self.batch_size = model, batch_size
        layers = decoder_layers(model)
        self.L = len(layers)
        lo, hi = self.share = dist.shard(windows.shape[0], batch_size)
        self.n_windows = int(windows.shape[0])
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]  # inputs[p][b]: state entering block p
        self.reference = None
        if hi > lo:
            with BlockStates(layers, input_device(model), weights_dtype(model)) as capture:
                self.reference = build_reference(model, windows[lo:hi], top_k=top_k, batch_size=batch_size,
                                                 progress=progress, after_batch=lambda: _keep_inputs(capture, self.inputs))
        self.block_runs = 0
        self.evaluations = 0
        self.cache: dict[tuple[int, ...], dict] = {}

    def _sums(self, skip: list[int], inject_at: int | None) -> torch.Tensor:
        """``[windows, 5]``: this process's rows filled, the others zero (an empty share adds nothing)."""
        out = torch.zeros((self.n_windows, 5), dtype=torch.float64)
        if self.reference is None:
            return out
        with skip_blocks(self.model, skip):
            handle = None if inject_at is None else _inject(decoder_layers(self.model)[0], self.inputs[inject_at])
            try:
                out[self.share[0]:self.share[1]] = fidelity_window_sums(self.model, self.reference,
                                                                        batch_size=self.batch_size)
                return out
            finally:
                if handle is not None:
                    handle.remove()

    def __call__(self, removed: tuple[int, ...]) -> dict:
        if removed in self.cache:
            return self.cache[removed]
        first = removed[0]
        skip = sorted(set(range(first + 1)) | set(removed))
        if len(skip) == self.L:  # nothing kept after the first removed block: the whole pruned stack runs
            runs, sums = self.L - len(removed), self._sums(list(removed), None)
        else:
            runs, sums = self.L - len(skip), self._sums(skip, first)
        rows = dist.all_reduce_sum(sums)
        result = {**summary_from_sums(rows.sum(0)), "kl_windows": (rows[:, 0] / rows[:, 4]).tolist()}
        self.block_runs += runs
        self.evaluations += 1
        self.cache[removed] = result
        return result


def margin(chosen: dict, other: dict, level: float = 0.95) -> dict:
    """``other``'s KL minus ``chosen``'s, paired over the held-out windows (two candidate-table rows)."""
    p = paired_t(chosen["kl_windows"], other["kl_windows"], level=level)
    return {"removed": other["removed"], "kl_mean": other["kl_mean"], "difference": p.diff, "ci_low": p.ci_low,
            "ci_high": p.ci_high, "level": level, "windows": p.n,
            "windows_lower": sum(o < c for c, o in zip(chosen["kl_windows"], other["kl_windows"])),
            "separated": p.ci_low > 0}


def margin_line(details: dict) -> str:
    """One line on how far the runner-up is behind, and whether the held-out windows can tell."""
    m = details.get("runner_up")
    if m is None:
        return "verified: no runner-up to compare (one candidate, one held-out window, or a KL that is not finite)"
    verdict = ("lies above 0 (the same windows chose the winner: suggestive, not proof)" if m["separated"] else
               "includes 0: the held-out windows cannot tell the two sets apart (raise select.heldout_windows, "
               "or check both on other text)")
    return (f"verified: runner-up {' '.join(map(str, m['removed']))} has KL {m['kl_mean']:.4f}, "
            f"{m['difference']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}] against the chosen set over "
            f"{m['windows']} held-out windows (the runner-up lower on {m['windows_lower']} of them); its {100 * m['level']:g}% interval {verdict}")


@measured_in_eval_mode
def verified(model, scores, windows: torch.Tensor, count: int, *, protect=DEFAULT_PROTECT, batch_size: int = BATCH_SIZE,
             top_k: int = TOP_K, budget: int = VERIFIED_BUDGET, progress: bool = True) -> Selection:
    """Choose ``count`` blocks by measured fidelity (see module docstring); ``windows`` are held-out
    calibration windows, ``scores`` the full model's scores, ``budget`` the local-search evaluations,
    ``top_k`` the original's log-probs kept per token (as ``evaluate.fidelity.top_k``)."""
    started = time.time()
    if scores is None:
        raise PruneError("verified builds its candidates from the full model's scores: give prune.score's result")
    check_strategy_args("verified", model, scores, batch_size=(batch_size, 1), top_k=(top_k, 1), budget=(budget, 0))
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] == 0:
        raise PruneError("verified ranks its candidates on held-out windows: give a tensor [n_windows, seq_len] of at "
                         "least one window (prune.heldout_windows), disjoint from the scoring windows")
    check_windows(windows, embedding_rows(model))
    L = len(decoder_layers(model))
    prot = resolve_protect(protect, L)
    count = resolve_count(L, count, None, prot)
    # a hybrid stack keeps one attention block (transformers cannot generate without): such sets are not candidates
    proposed = candidate_sets(scores, count, prot)
    candidates = {b: s for b, s in proposed.items() if keeps_attention(model.config, b)}
    if not candidates:
        raise PruneError(cut_without_attention(model.config, complement(L, next(iter(proposed)))))
    verify = Verifier(model, windows, batch_size, top_k, progress)
    results: dict[tuple[int, ...], dict] = {}
    for blocks in tqdm(list(candidates), desc="verified", unit="set", disable=not progress):
        results[blocks] = verify(blocks)
    kl = lambda b: finite_first(results[b]["kl_mean"])  # noqa: E731  NaN / inf (an overflow) last, never chosen
    best = min(results, key=lambda b: (kl(b), b))
    if kl(best)[0]:
        raise PruneError(f"verified: every candidate's KL is {results[best]['kl_mean']} (the model overflows in its "
                         "dtype: load it in float32, model.dtype: float32)")
    searched = 0
    improved = True
    bar = tqdm(total=budget, desc="verified: local search", unit="set", disable=not progress or not budget)
    while improved and searched < budget:
        improved = False
        neighbours = []
        kept_by_bi = sorted((n for n in range(L) if n not in best and n not in prot),
                            key=lambda n: (scores.block_influence[n], n))[:3]
        for b in best:
            for n in (b - 1, b + 1, *kept_by_bi):
                if 0 <= n < L and n not in best and n not in prot and keeps_attention(model.config, (set(best) - {b}) | {n}):
                    neighbours.append(tuple(sorted((set(best) - {b}) | {n})))
        for cand in dict.fromkeys(neighbours):
            if searched >= budget:
                break
            if cand in results:
                continue
            results[cand] = verify(cand)
            candidates.setdefault(cand, ["local search"])
            searched += 1
            bar.update()
            if kl(cand) < kl(best):
                best, improved = cand, True
                break
    bar.close()  # at a local optimum before the budget: the bar stops short, saying how many it took
    ranked = sorted(results, key=lambda b: (kl(b), b))
    table = [{"removed": list(b), "source": ", ".join(candidates[b]), "kl_mean": results[b]["kl_mean"],
              "top1_agreement": results[b]["top1_agreement"], "perplexity_ratio": results[b]["perplexity_ratio"],
              "kl_windows": results[b]["kl_windows"]}
             for b in ranked]
    passes = round(verify.block_runs / L + 1, 2)  # + the original's one pass (reference and block inputs)
    return Selection(sorted(best), L, "verified", "kl", None, {
        "source": ", ".join(candidates[best]), "kl_mean": results[best]["kl_mean"], "candidates": table,
        "runner_up": margin(table[0], table[1]) if len(table) > 1 and len(table[0]["kl_windows"]) > 1 and all(
            math.isfinite(x) for row in table[:2] for x in row["kl_windows"]) else None,  # a NaN KL: no margin
        "evaluations": verify.evaluations, "local_search_evaluations": searched, "budget": budget,
        "full_forward_equivalents": passes, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
        "top_k": top_k, "seconds": round(time.time() - started, 1)})
