"""Paired comparison of two models that answered the same questions.

With per-example scores ``a_i`` (model A) and ``b_i`` (model B) on the same ``n`` examples,
``d_i = b_i - a_i``:

* mean difference ``mean(d)`` (= B's score minus A's);
* paired standard error ``SE = sd(d) / sqrt(n)`` (``sd`` with ``n - 1``);
* a 95% interval of ``mean(d)``: for 0/1 scores Newcombe's hybrid score interval (below), else from
  :data:`BOOTSTRAP_MIN` examples up a percentile bootstrap (``iters`` resamples of the ``n`` examples
  with replacement, ``numpy.random.default_rng(seed)``, the 2.5th and 97.5th percentiles) and below
  that Student's interval (:func:`paired_t`);
* for 0/1 scores, the flips ``right -> wrong`` (``a = 1, b = 0``) and ``wrong -> right``
  (``a = 0, b = 1``) and McNemar's exact two-sided p-value: with ``m`` flips in all and
  ``k`` the smaller count, ``p = min(1, 2 * sum_{i <= k} C(m, i) / 2^m)`` (the test of "no
  difference"). The interval is Newcombe's (1998, his method 10) for a difference of paired
  proportions: with Wilson intervals ``[l_a, u_a]``, ``[l_b, u_b]`` of the two accuracies and
  ``phi`` the correlation of the 2x2 table (``(both * neither - flips_a * flips_b) / sqrt(margins)``, a
  positive numerator less ``n/2`` but not below 0; 0 when a margin is empty),
  ``low = diff - sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2)`` and
  ``high = diff + sqrt((u_b - p_b)^2 - 2 phi (u_b - p_b)(p_a - l_a) + (p_a - l_a)^2)``. It holds its
  level whatever the size of the difference (an interval that takes the number of flips as fixed
  covered a one-sided difference 52-73% of the time in ``tests/test_paired.py``'s simulation; a bootstrap
  over few flips is too narrow). With
  few flips, mostly one way, it can exclude 0 beside McNemar's p >= 0.05 (5 of 100 answers gained,
  none lost: p = 0.0625, interval +0.3 to +11.2 points; 4 of 10: p = 0.125): such rows are marked
  (:attr:`Paired.disagrees`) and read as not shown.

The unpaired standard error ``sqrt(SE_a^2 + SE_b^2)`` of two independent means is reported
beside it: when the models agree on most examples, the paired one is far smaller.

Samples come from lm-eval's ``samples_<task>_<date>.jsonl`` files (``log_samples``), matched by
``doc_id``; examples whose ``doc_hash`` differs are refused (not the same questions). Each metric
of each answer filter is its own row (``exact_match,strict-match`` as lm-eval names it: two filters
score the same question twice, never two examples); examples only one side has are left out and
counted (``n_a``, ``n_b``); a row with fewer than 2 examples in common is left out with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prune.core.config import BOOTSTRAP_ITERS
from prune.core.console import say
from prune.core.errors import PruneError, parse_problem


@dataclass
class Paired:
    """One task and metric, B against A."""

    task: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    se_paired: float
    se_unpaired: float
    ci_low: float
    ci_high: float
    right_to_wrong: int | None = None  # 0/1 scores: right in A, wrong in B; B pooled over seeds: examples B moved below A
    wrong_to_right: int | None = None
    mcnemar_p: float | None = None  # McNemar's exact p: the sign test on those two counts
    n_a: int | None = None  # examples A had for this row (``n`` of them in common with B)
    n_b: int | None = None
    proportion: bool | None = None  # every per-example score of both between 0 and 1 (an accuracy's, in points)
    pooled: bool | None = None  # B a mean over seeds: the flips and p are the sign test's on the questions moved
    group: str | None = None  # the lm-eval group the task is a subtask of (MMLU's subjects: mmlu), its top level
    lower_is_better: bool | None = None  # lm-eval's higher_is_better of the metric, negated (True: a Brier score)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def disagrees(self) -> bool:
        """0/1 scores whose interval and McNemar's exact test tell different stories (few flips, mostly
        one way: the interval excludes 0 beside p >= 0.05, or the other way round). For B pooled over seeds the
        sign test asks about the median question, not the mean the interval is of: only an interval that
        excludes 0 where the sign test sees no shift is marked."""
        if self.mcnemar_p is None:
            return False
        excludes = self.ci_low > 0 or self.ci_high < 0
        return excludes and self.mcnemar_p >= 0.05 if self.pooled else excludes != (self.mcnemar_p < 0.05)


#: the footnote of a table row marked with DISAGREES
DISAGREES = "†"
DISAGREES_NOTE = (f"{DISAGREES} the 95% interval and McNemar's exact test disagree (few flips, mostly one way): "
                  "read the row as not shown.")


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """McNemar's exact two-sided p-value: a binomial test of the flip counts against 1/2."""
    m = right_to_wrong + wrong_to_right
    if m == 0:
        return 1.0
    k = min(right_to_wrong, wrong_to_right)
    log_half = m * math.log(0.5)  # each term C(m, i) / 2^m in log space: fast for any m (exact integers took minutes)
    return min(1.0, 2 * sum(math.exp(math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + log_half)
                            for i in range(k + 1)))


def _pair(a, b, task: str, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` as float64 vectors of one length, at least 2; else one line saying what is wrong."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise PruneError(f"paired values need two equal-length lists, got {a.shape} and {b.shape}")
    if a.size < 2:
        more = ("measure more windows (prune eval --max-windows, or evaluate.fidelity's windows in a recipe)"
                if unit == "window" else f"compare more {unit}s")
        raise PruneError(f"{task or 'paired comparison'}: {a.size} {unit}(s) in common; at least 2 are needed: {more}")
    return a, b


#: below this many examples a score that is not 0/1 gets Student's interval (the percentile bootstrap's 95% interval
#: covered 80% at 3 examples and 82% at 5, Student's 94-95%: scripts/check_interval_coverage.py)
BOOTSTRAP_MIN = 30


def paired_stats(a, b, *, task: str = "", metric: str = "", iters: int = BOOTSTRAP_ITERS, seed: int = 0,
                 level: float = 0.95, sign_test: bool = False) -> Paired:
    """Paired statistics of per-example scores ``a`` and ``b`` (same examples, same order). 0/1 scores get the
    flips and McNemar's exact p; with ``sign_test`` (B pooled over seeds), scores that are not 0/1 get the same
    test on the examples B moved below and above A (McNemar's is that sign test on the flips), so a row whose
    bootstrap interval rests on a handful of moved questions is marked (:attr:`Paired.disagrees`)."""
    a, b = _pair(a, b, task, "example")
    n = a.size
    d = b - a
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    low = high = math.nan  # 0/1 scores: Newcombe's interval below
    if not binary and n < BOOTSTRAP_MIN:  # a handful of examples: the percentile bootstrap is too narrow
        t = paired_t(a, b, task=task, level=level)
        low, high = t.ci_low, t.ci_high
    elif not binary:
        rng = np.random.default_rng(seed)
        means = np.empty(iters)
        for start in range(0, iters, 1000):  # resample in blocks: memory stays ~1000 x n
            stop = min(iters, start + 1000)
            means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(means, [tail, 100 - tail])
    sd = lambda x: float(x.std(ddof=1) / math.sqrt(n))
    out = Paired(task, metric, n, float(a.mean()), float(b.mean()), float(d.mean()), sd(d),
                 math.sqrt(sd(a) ** 2 + sd(b) ** 2), float(low), float(high))
    out.proportion = bool(((a >= 0) & (a <= 1)).all() and ((b >= 0) & (b <= 1)).all())
    if binary:
        out.right_to_wrong = int(((a == 1) & (b == 0)).sum())
        out.wrong_to_right = int(((a == 0) & (b == 1)).sum())
        out.mcnemar_p = mcnemar_exact(out.right_to_wrong, out.wrong_to_right)
        both = int(((a == 1) & (b == 1)).sum())
        out.ci_low, out.ci_high = newcombe_paired(both, out.right_to_wrong, out.wrong_to_right,
                                                  n - both - out.right_to_wrong - out.wrong_to_right, level)
    elif sign_test:
        out.right_to_wrong, out.wrong_to_right = int((d < 0).sum()), int((d > 0).sum())
        out.mcnemar_p = mcnemar_exact(out.right_to_wrong, out.wrong_to_right)
        out.pooled = True
    return out


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``k / n``: ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2))
    / (1 + z^2/n)``, ``z`` the normal quantile of ``(1 + level) / 2``."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = k / n, z * z
    centre, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z2 / n)), min(1.0, (centre + half) / (1 + z2 / n))


def newcombe_paired(both: int, right_to_wrong: int, wrong_to_right: int, neither: int,
                    level: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) of ``p_b - p_a`` for paired 0/1 scores, from
    the 2x2 table: ``both`` right, A right only (``right_to_wrong``), B right only, ``neither``."""
    n = both + right_to_wrong + wrong_to_right + neither
    p_a, p_b = (both + right_to_wrong) / n, (both + wrong_to_right) / n
    (l_a, u_a), (l_b, u_b) = wilson(both + right_to_wrong, n, level), wilson(both + wrong_to_right, n, level)
    margins = ((both + right_to_wrong) * (wrong_to_right + neither) * (both + wrong_to_right)
               * (right_to_wrong + neither))
    cross = both * neither - right_to_wrong * wrong_to_right  # Newcombe's phi: a positive cross less n/2
    phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins) if margins else 0.0
    diff = p_b - p_a
    down = (p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2
    up = (u_b - p_b) ** 2 - 2 * phi * (u_b - p_b) * (p_a - l_a) + (p_a - l_a) ** 2
    return diff - math.sqrt(max(down, 0.0)), diff + math.sqrt(max(up, 0.0))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (``0 < q < 1``) of Student's t with ``df >= 1`` degrees of freedom.

    With ``t = sqrt(df) tan(theta)``, ``P(T <= t) = 1/2 + G((df+1)/2) / (sqrt(pi) G(df/2)) x
    integral_0^theta cos^(df-1)``, a bounded integrand (Simpson's rule, 2,000 intervals), inverted
    by bisection on ``theta``; within 1e-5 of tables from the median to ``q = 0.9995``."""
    if not 0 < q < 1 or df < 1:
        raise PruneError(f"t_quantile needs 0 < q < 1 and df >= 1, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)

    def cdf(theta: float) -> float:
        x = np.linspace(0.0, theta, 2001)
        f = np.cos(x) ** (df - 1)
        return 0.5 + const * (theta / 6000) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def paired_t(a, b, *, task: str = "", metric: str = "", level: float = 0.95, unit: str = "unit") -> Paired:
    """Paired statistics of a few measurements per unit (``a`` and ``b`` on the same ``n`` text windows):
    ``mean(d) +- t_{(1+level)/2, n-1} x sd(d) / sqrt(n)``, ``d = b - a``. Student's interval, not the
    bootstrap of :func:`paired_stats`, which is too narrow at a handful of units."""
    a, b = _pair(a, b, task, unit)
    n = a.size
    d = b - a
    se = lambda x: float(x.std(ddof=1) / math.sqrt(n))
    half = t_quantile((1 + level) / 2, n - 1) * se(d)
    return Paired(task, metric, n, float(a.mean()), float(b.mean()), float(d.mean()), se(d),
                  math.sqrt(se(a) ** 2 + se(b) ** 2), float(d.mean()) - half, float(d.mean()) + half)


# ---- lm-eval samples --------------------------------------------------------------------------
def read_samples(lines, file: str | Path = "samples file") -> list[dict]:
    """Records of one ``samples_*.jsonl`` (an iterable of lines), as lm-eval wrote them; a line that is not
    one such record (:func:`check_record`) is refused with one line naming ``file`` and the line number."""
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:  # damaged JSON, a number of thousands of digits, deep nesting
            why = parse_problem(exc)
            raise PruneError(f"{file}:{number}: not a JSON line ({why}): use the samples file lm-eval wrote") from None
        check_record(record, f"{file}:{number}")
        out.append(record)
    return out


def check_record(record, where: str) -> None:
    """One line (prefixed ``where``) unless ``record`` is an lm-eval sample record: an object with a whole-number
    ``doc_id``, ``filter`` and question hashes text, ``metrics`` a list of names."""
    fix = "use the samples file lm-eval wrote"
    if not isinstance(record, dict):
        raise PruneError(f"{where}: a sample record is a JSON object, got {type(record).__name__}: {fix}")
    doc_id = record.get("doc_id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, int):  # 1.0 and true would be example 1
        got = "none" if "doc_id" not in record else f"{type(doc_id).__name__} {json.dumps(doc_id)[:40]}"
        raise PruneError(f"{where}: doc_id must be a whole number (the example's index), got {got}: {fix}")
    for name in ("filter", *QUESTION_HASHES):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise PruneError(f"{where}: {name} must be text, got {type(record[name]).__name__}: {fix}")
    metrics = record.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise PruneError(f"{where}: metrics must be a list of metric names, got {json.dumps(metrics)[:60]}: {fix}")


def score(value) -> float | None:
    """A per-example value as a float (an integer too large for one: inf of its sign), None when it is not a number
    (true/false count as 1/0, as lm-eval writes them for some tasks)."""
    if not isinstance(value, (bool, int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def row_name(metric: str, filt: str) -> str:
    """A metric of one answer filter as lm-eval names it: ``acc`` (filter ``none``), ``exact_match,strict-match``."""
    return metric if filt == "none" else f"{metric},{filt}"


#: what lm-eval hashes per example: the document (dataset row), the prompt the model saw (few-shot
#: examples, chat template, the task version's wording) and the target; with the requests the model was sent
#: (``arguments``: each answer choice's continuation, or the generation settings), two runs answered the same
#: question when all four agree (a file without one of them is not checked on it). A task version that changes
#: only how answers are scored (a filter, a metric's options) is not seen here: :func:`check_same_setup` compares
#: the versions the results files record.
QUESTION_HASHES = ("doc_hash", "prompt_hash", "target_hash")
QUESTION_PARTS = QUESTION_HASHES + ("arguments",)


def question(record: dict) -> tuple:
    """The hashes of :data:`QUESTION_HASHES` of one sample record and a digest of its ``arguments`` (None where
    it has none)."""
    args = record.get("arguments")
    digest = None if args is None else hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()
    return tuple(record.get(h) for h in QUESTION_HASHES) + (digest,)


def check_same_question(task: str, doc_id, first: tuple, other: tuple, between: str) -> None:
    """One line when two records of example ``doc_id`` hold another document, prompt, target or request."""
    for name, x, y in zip(QUESTION_PARTS, first, other):
        if x is not None and y is not None and x != y:
            what = {"doc_hash": "another document", "prompt_hash": "another prompt: few-shot examples, chat template "
                    "or task version", "target_hash": "another target",
                    "arguments": "other requests: answer choices or generation settings, another task version"}[name]
            raise PruneError(f"{task}: example {doc_id} differs between {between} ({what}): "
                             "they did not answer the same questions")


def _records_by_example(task: str, records: list[dict]) -> dict[tuple, dict]:
    """``{(doc_id, filter): record}``; an example found twice (a damaged or concatenated file) is refused."""
    out: dict[tuple, dict] = {}
    for number, r in enumerate(records, 1):
        check_record(r, f"{task}: record {number}")
        key = (r["doc_id"], r.get("filter") or "none")
        if key in out:
            raise PruneError(f"{task}: example {key[0]} (filter {key[1]}) appears twice in one samples file; "
                             "use the file lm-eval wrote for one run")
        out[key] = r
    return out


def per_example(records: list[dict], task: str = "task", quiet: bool | None = None) -> dict[str, dict]:
    """``{metric (of one filter, :func:`row_name`): {doc_id: (question hashes, score)}}`` of one task's
    sample records (:func:`question`)."""
    out: dict[str, dict] = {}
    undefined: dict[str, int] = {}
    textual: dict[str, list] = {}  # a value where a number belongs: text or null (lists and objects are lm-eval's own)
    for (doc_id, filt), r in _records_by_example(task, records).items():
        for metric in r.get("metrics", []):
            value = score(r.get(metric))
            if value is None and (r.get(metric) is None or isinstance(r.get(metric), str)):
                textual.setdefault(row_name(PER_EXAMPLE_NAMES.get(metric, metric), filt), []).append(r.get(metric))
            if value is not None:
                name = row_name(PER_EXAMPLE_NAMES.get(metric, metric), filt)
                if not math.isfinite(value):  # NaN made the row's mean, interval and flips NaN
                    undefined[name] = undefined.get(name, 0) + 1
                    continue
                out.setdefault(name, {})[doc_id] = (question(r), value)
    for name, count in undefined.items():
        say(f"{task} {name}: {count} example(s) scored NaN or inf, left out of the paired comparison", quiet)
    for name, values in textual.items():
        say(f"{task} {name}: {len(values)} example(s) hold no number (e.g. {json.dumps(values[0])}), left out of the "
            "paired comparison", quiet)
    return out


#: lm-eval metrics whose per-example value is not the metric itself: its "perplexity" per example is the
#: log-likelihood (higher is better) that the task aggregates as exp(-mean); named for what the rows compare
PER_EXAMPLE_NAMES = {"perplexity": "log-likelihood (perplexity's per-example term)"}


def mean_samples(runs: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """One ``{task: sample records}`` whose every metric is the mean over ``runs`` (several models that
    answered the same questions: seeds of one recipe), for :func:`compare_samples` against a reference:
    the pooled difference is then the mean of the per-model differences, and its interval counts the
    questions' sampling, which every run shares (a spread over runs alone does not). Only the tasks,
    metrics and examples every run has; a question asked differently refuses, as in :func:`compare_samples`."""
    if not runs:
        raise PruneError("mean_samples needs at least one run")
    out: dict[str, list[dict]] = {}
    for task in sorted({t for r in runs for t in r}):
        missing = sum(task not in r for r in runs)
        if missing:
            say(f"{task}: missing from {missing} of the {len(runs)} runs pooled, left out of the paired comparison")
    for task in [t for t in runs[0] if all(t in r for r in runs)]:
        examples = [_records_by_example(task, run[task]) for run in runs]
        common = set.intersection(*(set(e) for e in examples))
        questions = lambda keys: len({k[0] for k in keys})
        if any(questions(e) > questions(common) for e in examples):  # a seed run with a lower limit, or cut short
            say(f"{task}: pooled over the {questions(common)} examples all {len(runs)} runs have ("
                + ", ".join(f"B{i} {questions(e)}" for i, e in enumerate(examples, 1)) + "): the others left out")
        records = []
        for key in sorted(common, key=str):
            first, found = examples[0][key], [e[key] for e in examples]
            for r in found:
                check_same_question(task, key[0], question(first), question(r), "the runs")
            metrics = [m for m in first.get("metrics", []) if all(score(r.get(m)) is not None for r in found)]
            records.append({"doc_id": key[0], "filter": key[1], **{h: first.get(h) for h in QUESTION_HASHES},
                            "arguments": first.get("arguments"), "metrics": metrics, **{m: sum(score(r[m]) for r in found) / len(found) for m in metrics}})
        out[task] = records
    return out


def some(names, limit: int = 10) -> str:
    """The first ``limit`` of ``names`` (sorted) and how many more: a line stays short with thousands of tasks."""
    names = sorted(names)
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def compare_samples(a: dict[str, list[dict]], b: dict[str, list[dict]], *, iters: int = BOOTSTRAP_ITERS,
                    seed: int = 0, quiet: bool | None = None, sign_test: bool = False,
                    meta: "TaskMeta | None" = None, between: str = "A and B") -> list[Paired]:
    """Paired statistics per task and metric (of each answer filter) of two ``{task: sample records}``
    (B against A), over the examples both have; ``quiet``: no notes of what is left out; ``sign_test``: B is
    pooled over seeds (:func:`paired_stats`); ``meta``: what lm-eval's results files say of the tasks
    (:func:`task_meta`: groups, metrics where lower is better), recorded on the rows for :func:`task_average`."""
    common = [t for t in a if t in b]
    if not common:
        raise PruneError(f"no task in common: A has {some(a)}, B has {some(b)}: compare evaluations of the same tasks")
    for side, tasks in (("A", [t for t in a if t not in b]), ("B", [t for t in b if t not in a])):
        if tasks:
            say(f"{some(tasks)}: only in {side}, left out of the paired comparison", quiet)
    out = []
    for task in sorted(common):
        ea, eb = per_example(a[task], task, quiet), per_example(b[task], task, quiet)
        for side, names in (("A", [m for m in ea if m not in eb]), ("B", [m for m in eb if m not in ea])):
            if names:
                say(f"{task}: {', '.join(names)} scored only in {side}, left out of the paired comparison", quiet)
        if not ea and not eb:
            say(f"{task}: no example has a number to pair (lm-eval's per-example values of this task are not "
                "scalar scores), left out of the paired comparison", quiet)
        for metric in [m for m in ea if m in eb]:
            keys = sorted(set(ea[metric]) & set(eb[metric]), key=str)
            for k in keys:
                check_same_question(task, k, ea[metric][k][0], eb[metric][k][0], between)
            if len(keys) < 2:
                say(f"{task} {metric}: {len(keys)} example(s) in common (A {len(ea[metric])}, B {len(eb[metric])}): "
                    "too few to pair, left out of the paired comparison", quiet)
                continue
            row = paired_stats([ea[metric][k][1] for k in keys], [eb[metric][k][1] for k in keys], task=task,
                               metric=metric, iters=iters, seed=seed, sign_test=sign_test)
            row.n_a, row.n_b = len(ea[metric]), len(eb[metric])
            if meta is not None:
                row.group = meta.groups.get(task)
                row.lower_is_better = (task, metric.split(",")[0]) in meta.lower or None
            out.append(row)
    return out


@dataclass
class TaskAverage:
    """B - A averaged over tasks, one headline metric per task; an lm-eval group's subtasks (MMLU's 57 subjects)
    count as one task, their examples pooled (each subtask weighted by its examples, as lm-eval's group score)."""

    tasks: list[str]  # the tasks averaged: a group's name stands for its subtasks
    diff: float  # mean over tasks of each task's mean difference: sum_t w_t diff_t
    se: float  # sqrt(sum_t w_t^2 SE_t^2): the tasks' examples are independent
    ci_low: float  # diff - sqrt(sum_t w_t^2 (diff_t - low_t)^2): each task's own interval, squared and added
    ci_high: float  # diff + sqrt(sum_t w_t^2 (high_t - diff_t)^2)
    retained: float  # mean over the tasks A scores above 0 of B's score / A's (nan when there is none)
    retained_tasks: int = 0  # how many tasks that mean is over
    subtasks: dict[str, int] | None = None  # group -> how many of its subtasks were pooled into it


#: lm-eval metrics that are a share of examples right (0/1 per example, or a share): a task's headline is one
#: of these, in this order, before any other metric whose scores happen to lie between 0 and 1
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match", "em", "mc1", "mc2", "bleu_acc", "rouge1_acc", "rougeL_acc", "f1")


def headline_rows(rows: list[Paired]) -> list[Paired]:
    """One row per task: its headline metric (``HEADLINE``: acc_norm for hellaswag, arc_challenge and
    openbookqa, else acc), else its first accuracy by name (:data:`ACCURACY_METRICS`, of any answer filter),
    else its first metric whose per-example scores are proportions (0 to 1: an average in accuracy points);
    a task with none has no headline (a BLEU of 0-100 averaged with accuracies, or a log-likelihood, would
    be read as points): see :func:`without_headline`."""
    from prune.measure.lmeval import HEADLINE, canonical_name

    by_task: dict[str, list[Paired]] = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    out = []
    for task, found in by_task.items():
        want = HEADLINE.get(canonical_name(task), "acc")
        named = [r for r in found if r.metric.split(",")[0] in ACCURACY_METRICS and r.proportion is not False]
        head = (next((r for r in found if r.metric == want), None)
                or min(named, key=lambda r: ACCURACY_METRICS.index(r.metric.split(",")[0]), default=None)
                or next((r for r in found if r.proportion and not r.lower_is_better), None))
        if head is not None:
            out.append(head)
    return out


def without_headline(rows: list[Paired]) -> list[str]:
    """The tasks of ``rows`` left out of :func:`task_average`: no headline (:func:`headline_rows`), as none of
    their metrics is an accuracy or scored 0 to 1 per example."""
    kept = {r.task for r in headline_rows(rows)}
    return sorted({r.task for r in rows} - kept)


def task_average(rows: list[Paired]) -> TaskAverage | None:
    """The average over tasks of the headline rows of ``rows`` (None without rows). The subtasks of one lm-eval
    group (:attr:`Paired.group`) are one task, pooled by size: subtask ``t`` of a task of ``N`` examples in all
    weighs ``w_t = n_t / N / T`` (``T`` tasks), a task on its own ``1 / T`` (57 subjects counted as 57 tasks
    drowned every other benchmark in MMLU's)."""
    head = headline_rows(rows)
    if not head:
        return None
    units: dict[str, list[Paired]] = {}
    for r in head:
        units.setdefault(r.group or r.task, []).append(r)
    weight = {id(r): r.n / sum(m.n for m in members) / len(units) for members in units.values() for r in members}
    w = lambda r: weight[id(r)]
    diff = sum(w(r) * r.diff for r in head)
    se = math.sqrt(sum((w(r) * r.se_paired) ** 2 for r in head))
    # each task's interval (Newcombe's for right/wrong answers), combined by squaring and adding its two arms
    # (Zou and Donner's MOVER for a weighted sum of independent estimates): diff -/+ 1.96 se was 0 wide when no
    # answer flipped, where every task's own interval is not
    low = diff - math.sqrt(sum((w(r) * (r.diff - r.ci_low)) ** 2 for r in head))
    high = diff + math.sqrt(sum((w(r) * (r.ci_high - r.diff)) ** 2 for r in head))
    means = [(sum(m.n * m.mean_a for m in members), sum(m.n * m.mean_b for m in members)) for members in units.values()]
    scored = [(ma, mb) for ma, mb in means if ma > 0]  # B's share of a score of 0 is undefined
    retained = sum(mb / ma for ma, mb in scored) / len(scored) if scored else math.nan
    pooled = {name: len(members) for name, members in units.items() if members[0].group}
    return TaskAverage(list(units), diff, se, low, high, retained, len(scored), pooled or None)


def average_line(rows: list[Paired], a: str = "A", b: str = "B") -> str:
    """One sentence: the task average of B - A with its paired SE and 95% interval, and whether the interval
    excludes 0 (a bound rounded to 0.00 does not show it; a z = difference / SE could contradict the interval,
    which combines each task's own, Newcombe's for right/wrong answers)."""
    avg = task_average(rows)
    if avg is None:
        return ""
    if avg.retained_tasks == 0:
        share = f"{b}'s share of {a}'s accuracy is undefined ({a} scores 0 on every task)"
    else:
        over = "" if avg.retained_tasks == len(avg.tasks) else f" over the {avg.retained_tasks} tasks {a} scores above 0"
        share = f"{b} keeps {100 * avg.retained:.1f}% of {a}'s accuracy (mean of the per-task ratios{over})"
    head = headline_rows(rows)
    if all(r.diff == 0 and r.se_paired == 0 for r in head):
        verdict = "no example's headline score changed"
    else:
        verdict = "it excludes 0" if avg.ci_low > 0 or avg.ci_high < 0 else "it includes 0"
    left = without_headline(rows)
    left_out = (f"; left out: {some(left)} (no metric scored 0 to 1 per example where higher is better, so none in "
                "accuracy points)"
                if left else "")
    from prune.measure.lmeval import HEADLINE, canonical_name

    swapped = [f"{r.task} by {r.metric} ({want} not scored in both)" for r in head
               if (want := HEADLINE.get(canonical_name(r.task))) and r.metric.split(",")[0] != want]
    left_out += f"; {', '.join(swapped)}" if swapped else ""
    groups = "; ".join(f"{g}: its {n} subtask{'s' * (n > 1)} pooled, weighed by their examples"
                       for g, n in (avg.subtasks or {}).items())
    tasks = f"{len(avg.tasks)} task{'s' * (len(avg.tasks) > 1)}"
    return (f"Average over {tasks} (one headline metric each{'; ' + groups if groups else ''}): "
            f"{b} - {a} = {100 * avg.diff:+.2f} points, "
            f"paired SE {100 * avg.se:.2f}, 95% interval [{100 * avg.ci_low:+.2f}, {100 * avg.ci_high:+.2f}] "
            f"({verdict}); {share}{left_out}")


def paired_count(r: Paired, a: str = "A", b: str = "B") -> str:
    """``n``, and what each side had when some examples were not in both: ``143 (A 1000, B 143)``."""
    if r.n_a in (None, r.n) and r.n_b in (None, r.n):
        return str(r.n)
    return f"{r.n} ({a} {r.n_a}, {b} {r.n_b})"


def paired_markdown(rows: list[Paired], a: str = "A", b: str = "B") -> str:
    """A Markdown table: means, difference B - A with paired SE and 95% interval, flips, McNemar p."""
    from prune.core.tables import md_text

    lines = [f"| task | metric | n | {a} | {b} | {b} - {a} | paired SE | unpaired SE | 95% CI | right->wrong | "
             "wrong->right | McNemar p |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        flips = ("-", "-", "-") if r.right_to_wrong is None else (r.right_to_wrong, r.wrong_to_right, f"{r.mcnemar_p:.3g}")
        lines.append(f"| {md_text(r.task)} | {md_text(r.metric)} | {paired_count(r, a, b)} | {r.mean_a:.4f} | {r.mean_b:.4f} | {r.diff:+.4f} | "
                     f"{r.se_paired:.4f} | {r.se_unpaired:.4f} | [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
                     f"{' ' + DISAGREES if r.disagrees else ''} | {flips[0]} | {flips[1]} | {flips[2]} |")
    if any(r.disagrees for r in rows):
        lines += ["", DISAGREES_NOTE]
    return "\n".join(lines)


def paired_section(rows: list[Paired], a: str = "original", b: str = "pruned") -> str:
    """The paired comparison of a run (``b`` against ``a``) as a Markdown section of eval.md ('' without
    lm-eval samples)."""
    if not rows:
        return ""
    return (f"\n## Paired: {b} against {a}, same examples\n\n"
            f"Per-example differences d = {b} - {a}: mean, paired SE = sd(d)/sqrt(n), 95% interval (right/wrong "
            "answers: Newcombe's score interval for paired proportions; other scores: percentile "
            f"bootstrap, {BOOTSTRAP_ITERS:,} resamples, seed 0, or Student's below {BOOTSTRAP_MIN} examples), answers "
            "that flipped each way and McNemar's exact p. "
            "The unpaired SE treats the two means as independent.\n\n" + paired_markdown(rows, a, b) + "\n")


# ---- folders -----------------------------------------------------------------------------------
@dataclass
class TaskMeta:
    """What an lm-eval results folder's ``results_*.json`` say of its tasks: each subtask's top-level aggregated
    group (MMLU's subjects: ``mmlu``, through ``mmlu_stem``; from ``group_subtasks``, for the groups lm-eval scores
    as a whole, those in ``groups``) and the ``(task, metric)`` pairs where lower is better (``higher_is_better``
    false: a Brier score is no accuracy for the average)."""

    groups: dict[str, str]
    lower: set[tuple[str, str]]


def results_texts(*folders: Path) -> list[str]:
    """The texts of the lm-eval results files (``results_<date>.json``) in ``folders``, oldest first; a file that
    does not read is passed over (what they say only shapes the comparison: groups, directions, versions)."""
    texts = []
    for path in sorted(p for folder in folders for p in folder.glob("results_*.json")):
        try:
            texts.append(read_regular_text(path, "lm-eval results file"))
        except PruneError:
            continue
    return texts


def results_data(texts) -> list[dict]:
    """Each of lm-eval's results files' ``texts`` parsed (``{}`` for one that is not a JSON object)."""
    out = []
    for text in texts:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = {}
        out.append(data if isinstance(data, dict) else {})
    return out


def task_meta(*folders: Path) -> TaskMeta:
    """:class:`TaskMeta` of the results files in ``folders``."""
    return task_meta_of(results_texts(*folders))


def task_meta_of(texts) -> TaskMeta:
    """:class:`TaskMeta` of lm-eval results files' texts (the first to name a group wins). A group lm-eval does not
    aggregate (a suite listed without ``aggregate_metric_list``: no entry in ``groups``) leaves its members tasks of
    their own."""
    parent: dict[str, str] = {}
    lower: set[tuple[str, str]] = set()
    for data in results_data(texts):
        subtasks, better, scored = data.get("group_subtasks"), data.get("higher_is_better"), data.get("groups")
        scored = set(scored) if isinstance(scored, dict) else set()
        for group, children in (subtasks.items() if isinstance(subtasks, dict) else ()):
            for child in children if isinstance(children, list) and group in scored else ():
                if isinstance(child, str) and child != group:
                    parent.setdefault(child, group)
        for task, metrics in (better.items() if isinstance(better, dict) else ()):
            lower |= {(task, m) for m, up in (metrics.items() if isinstance(metrics, dict) else ()) if up is False}

    def top(task: str) -> str:
        seen = {task}
        while parent.get(task) not in (None, *seen):
            task = parent[task]
            seen.add(task)
        return task

    return TaskMeta({task: top(task) for task in parent}, lower)


@dataclass
class TaskSetup:
    """How an lm-eval results folder ran its tasks, from its ``results_*.json`` (the newest file naming a task
    wins): each task's version and number of few-shot examples (as text), and lm-eval's version."""

    versions: dict[str, str]
    shots: dict[str, str]
    lm_eval: str | None


def task_setup(folder: Path) -> TaskSetup:
    """:class:`TaskSetup` of the results files in ``folder``."""
    return task_setup_of(results_texts(folder))


def task_setup_of(texts) -> TaskSetup:
    """:class:`TaskSetup` of lm-eval results files' texts, oldest first."""
    versions: dict[str, str] = {}
    shots: dict[str, str] = {}
    lm_eval = None
    for data in results_data(texts):
        for key, out in (("versions", versions), ("n-shot", shots)):
            found = data.get(key)
            for task, value in (found.items() if isinstance(found, dict) else ()):
                if value is not None and not isinstance(value, (dict, list)):
                    out[task] = str(value)
        if isinstance(data.get("lm_eval_version"), str):
            lm_eval = data["lm_eval_version"]
    return TaskSetup(versions, shots, lm_eval)


def check_same_setup(a: TaskSetup, b: TaskSetup, tasks, between: tuple[str, str] = ("A", "B"),
                     fix: str = "evaluate both with the same version of prune and lm-eval",
                     quiet: bool | None = None) -> None:
    """One line when a task of ``tasks`` ran as another version, or with another number of few-shot examples, on
    the two sides: the same questions can then be scored another way (a version's change of its metric or filter
    leaves the per-example hashes equal). Another lm-eval version alone is a note."""
    for task in sorted(tasks):
        for what, mine, theirs in (("task version", a.versions, b.versions), ("few-shot examples", a.shots, b.shots)):
            x, y = mine.get(task), theirs.get(task)
            if x is not None and y is not None and x != y:
                how = fix if what == "task version" else ("evaluate both with the same number of few-shot examples "
                                                         "(--num-fewshot, or the recipe's evaluate.num_fewshot)")
                raise PruneError(f"{task}: {what} {x} in {between[0]}, {y} in {between[1]}: the two did not run the same "
                                 f"task; {how}")
    if a.lm_eval and b.lm_eval and a.lm_eval != b.lm_eval:
        say(f"lm-eval {a.lm_eval} in {between[0]}, {b.lm_eval} in {between[1]}: paired on the same questions, as each "
            "version scored them", quiet)


def samples_by_task(folder: Path) -> dict[str, list[str]]:
    """``{task: its samples files}`` in an lm-eval results folder (lm-eval's file-name helper)."""
    from lm_eval.utils import get_file_task_name

    by_task: dict[str, list[str]] = {}
    for path in folder.glob("samples_*.jsonl"):
        by_task.setdefault(get_file_task_name(path.name), []).append(str(path))
    return by_task


def latest_samples(folder: Path) -> dict[str, Path]:
    """``{task: newest samples file}`` in an lm-eval results folder (lm-eval's file-name helpers)."""
    from lm_eval.utils import get_file_datetime, get_latest_filename

    return {task: Path(get_latest_filename(paths)) for task, paths in samples_by_task(folder).items()
            if get_file_datetime(Path(paths[0]).name)}


def evaluated_more_than_once(folder: Path) -> list[str]:
    """The tasks with more than one samples file in ``folder`` (``prune eval --output-path`` run again into it):
    :func:`latest_samples` reads the newest of each."""
    return sorted(t for t, paths in samples_by_task(folder).items() if len(paths) > 1)


def evaluations_mixed(folder: Path, tasks: list[str] | None = None) -> list[str]:
    """The lm-eval run times (file-name stamps) the newest samples of ``tasks`` in ``folder`` come from, when
    there is more than one: each task is read from its newest file, so one comparison can mix two evaluations."""
    from lm_eval.utils import get_file_datetime

    latest = latest_samples(folder)
    stamps = sorted({get_file_datetime(p.name) for t, p in latest.items() if tasks is None or t in tasks})
    return stamps if len(stamps) > 1 else []


def samples_folder(path: str | Path, which: str = "pruned") -> Path:
    """The folder of lm-eval samples meant by ``path``: a ``prune run`` folder (its ``eval/<which>``),
    an lm-eval output folder holding one model's subfolder, or a folder of ``samples_*.jsonl``."""
    path = Path(path).expanduser()
    check_not_one_samples_file(path)
    if path.is_file():  # prune compare takes a fidelity JSON file too: say which of the two it is not
        if fidelity_of(path) is not None:
            raise PruneError(f"{path} holds a fidelity record but no lm-eval samples: compare it with another fidelity "
                             "record (a run folder or a prune eval --output file)")
        raise PruneError(f"{path} holds no fidelity record (pruned.fidelity with kl_windows) and is not a folder of "
                         "lm-eval samples: give a prune run folder, an lm-eval results folder or prune eval's --output "
                         "file of a fidelity measure (--fidelity-to)")
    if not path.is_dir():
        raise PruneError(f"not a folder: {path} (give a prune run folder or an lm-eval results folder)")
    if (path / "eval" / which).is_dir():
        path = path / "eval" / which
    if any(path.glob("samples_*.jsonl")):
        return path
    subs = sorted({p.parent for p in path.glob("*/samples_*.jsonl")})
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        raise PruneError(f"{path} holds samples of {len(subs)} models ({', '.join(s.name for s in subs)}): give one of them")
    raise PruneError(f"no lm-eval samples (samples_*.jsonl) in {path}: evaluate with log_samples "
                     "(prune run writes them when the recipe has evaluate.tasks; prune eval --tasks ... --output-path)")


def read_regular_text(path: Path, what: str = "samples file") -> str:
    """The UTF-8 text of ``path``, read only when it is (after following links) a regular file: a FIFO, a device
    or a folder is one line, never a hang or an endless read; so is text that is not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once; fstat below refuses it
    except OSError as exc:
        raise PruneError(f"cannot read the {what} {path} ({exc.strerror or exc}): give a readable file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PruneError(f"{path} is not a regular file (a FIFO, device or folder): give the {what}")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PruneError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}): give the {what} as written, "
                         "in UTF-8") from None


def load_samples(folder: Path) -> dict[str, list[dict]]:
    """``{task: sample records}`` of the newest samples file of each task in ``folder`` (:func:`read_samples`);
    an empty file is named and its task left out."""
    out = {}
    for task, path in latest_samples(folder).items():
        records = read_samples(read_regular_text(path).splitlines(), path)
        if records:
            out[task] = records
        else:
            say(f"{path} holds no examples (an empty samples file): {task} left out of the paired comparison")
    return out


def check_distinct(a: Path, bs: list[Path]) -> None:
    """One line when A is among the B folders, or a B is given twice: a model compared with itself shows no
    difference, and a seed given twice shows no spread between seeds."""
    seen = {a.resolve(): "A"}
    for i, b in enumerate(bs, 1):
        name = "B" if len(bs) == 1 else f"B{i}"
        if b.resolve() in seen:
            raise PruneError(f"{name} ({b}) is the same evaluation as {seen[b.resolve()]}: give {'two' if len(bs) == 1 else 'distinct'} "
                             "evaluations")
        seen[b.resolve()] = name
    files = {path.resolve(): ("A", task) for task, path in latest_samples(a).items()}
    for i, b in enumerate(bs, 1):
        name = "B" if len(bs) == 1 else f"B{i}"
        for task, path in latest_samples(b).items():
            other = files.setdefault(path.resolve(), (name, task))
            if other != (name, task):
                raise PruneError(f"{name}'s samples file of {task} ({path}) is {other[0]}'s file of {other[1]}: give "
                                 f"{'two' if len(bs) == 1 else 'distinct'} evaluations")


def has_samples(path: str | Path, which: str = "pruned") -> bool:
    """Whether :func:`samples_folder` finds lm-eval samples at ``path``."""
    try:
        samples_folder(path, which)
        return True
    except PruneError:
        return False


def check_not_one_samples_file(path: Path) -> None:
    """One line when ``path`` is one of lm-eval's ``samples_<task>_<time>.jsonl``: the comparison reads a folder."""
    if path.is_file() and path.name.startswith("samples_") and path.suffix == ".jsonl":
        raise PruneError(f"{path} is one task's samples file: give the folder that holds it ({path.parent})")


def fidelity_of(path: str | Path) -> dict | None:
    """The fidelity measure, with its per-window values, of the model a run folder saved (its eval.json's
    ``pruned``: healed, if it was) or of a ``prune eval --output`` JSON file; None when there is none."""
    path = Path(path).expanduser()
    check_not_one_samples_file(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        return None
    text = read_regular_text(file, "run folder's eval.json or prune eval's --output file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # damaged, a number of thousands of digits, nested too deeply
        why = parse_problem(exc)
        raise PruneError(f"{file} is not a readable JSON file ({why}); give a run folder or prune eval's --output file") from None
    found = data.get("pruned", data) if isinstance(data, dict) else None
    fid = found.get("fidelity") if isinstance(found, dict) else None
    if not (isinstance(fid, dict) and "kl_windows" in fid):
        return None
    fix = "measure it again with prune eval --fidelity-to"
    values = [fid.get("kl_windows"), fid.get("nll_diff_windows")]
    if not all(isinstance(v, list) and len(v) == len(values[0]) for v in values) or not isinstance(fid.get("windows_sha256"), str):
        raise PruneError(f"{file}: its fidelity record is damaged (kl_windows, nll_diff_windows: lists of numbers of one "
                         f"length; windows_sha256: text): {fix}")
    for name, v in zip(("kl_windows", "nll_diff_windows"), values):
        bad = next((i for i, x in enumerate(v) if not _finite_number(x)), None)
        if bad is not None:
            raise PruneError(f"{file}: its fidelity record is damaged: {name}[{bad}] is {json.dumps(v[bad])[:40]}, not a finite number: {fix}")
    ppl, top_k = fid.get("perplexity_original"), fid.get("top_k")
    if ppl is not None and not (_finite_number(ppl) and ppl > 0):
        raise PruneError(f"{file}: its fidelity record is damaged: perplexity_original is {json.dumps(ppl)[:40]}, not a positive number: {fix}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise PruneError(f"{file}: its fidelity record is damaged: top_k is {json.dumps(top_k)[:40]}, not a whole number: {fix}")
    return fid


def check_distinct_files(paths) -> None:
    """One line when two of the compared results (run folders or ``prune eval --output`` files) are one file:
    the fidelity of a model compared with itself shows no difference."""
    seen: dict[Path, str] = {}
    for i, path in enumerate(paths):
        path = Path(path).expanduser()
        file = (path / "eval.json" if path.is_dir() else path).resolve()
        name = "A" if i == 0 else "B" if len(paths) == 2 else f"B{i}"
        if file in seen:
            raise PruneError(f"{name} ({path}) is the same evaluation as {seen[file]}: give "
                             f"{'two' if len(paths) == 2 else 'distinct'} evaluations")
        seen[file] = name


def _finite_number(x) -> bool:
    """Whether ``x`` is an int or float (not a bool) that is finite as a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond a float
        return False


#: how far apart (|log ratio|) the original's perplexity on the same windows may be in two fidelity
#: records for one original: float noise of another device, batch or dtype, not another model
ORIGINAL_TOLERANCE = 1e-3


def compare_fidelity(a: dict, b: list[dict], level: float = 0.95) -> list[Paired]:
    """KL to the original and ``log`` of the perplexity ratio of B against A, paired over the windows
    both were measured on (Student's interval, :func:`paired_t`); several B: their mean per window.
    Refused when the windows or top-k differ, or when the original's perplexity on them does (beyond
    ``ORIGINAL_TOLERANCE``): then they were measured against different originals."""
    key = lambda f: (f.get("windows_sha256"), f.get("top_k"), len(f["kl_windows"]))  # the same windows, same top-k
    for other in b:
        if key(other) != key(a):
            what = lambda f: f"{len(f['kl_windows'])} windows {f.get('windows_sha256')} top {f.get('top_k')}"
            raise PruneError(f"A and B measured fidelity on different windows or top-k ({what(a)} against {what(other)}): "
                             "evaluate both with the same evaluate.fidelity settings and original")
        ppl_a, ppl_b = a.get("perplexity_original"), other.get("perplexity_original")
        positive = lambda x: _finite_number(x) and x > 0  # fidelity_of refuses any other
        if not (positive(ppl_a) and positive(ppl_b)):
            say("a fidelity record holds no perplexity of the original: that both were measured against one original "
                "is not checked")
        elif abs(math.log(ppl_b / ppl_a)) > ORIGINAL_TOLERANCE:
            raise PruneError(f"A and B were measured against different originals (the original's perplexity on the same "
                             f"windows: {ppl_a:.4f} against {ppl_b:.4f}): compare models measured against one original")
    mean_b = lambda key: np.mean([other[key] for other in b], axis=0)
    return [paired_t(a["kl_windows"], mean_b("kl_windows"), task="fidelity", metric="kl_mean", level=level, unit="window"),
            paired_t(a["nll_diff_windows"], mean_b("nll_diff_windows"), task="fidelity", metric="log_ppl_ratio",
                     level=level, unit="window")]


def fidelity_markdown(rows: list[Paired], a: str = "A", b: str = "B") -> str:
    """The fidelity comparison as a Markdown table: KL (nats per token) is lower when closer to the original;
    the log perplexity ratio is signed (below 0: lower perplexity than the original's, not closer to it)."""
    meaning = {"kl_mean": "kl_mean (nats; lower: closer to the original)",
               "log_ppl_ratio": "log_ppl_ratio (log of perplexity / the original's; 0: equal)"}
    lines = [f"| measure | windows | {a} | {b} | {b} - {a} | paired SE | unpaired SE | "
             "95% interval (Student) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {meaning.get(r.metric, r.metric)} | {r.n} | {r.mean_a:.4f} | {r.mean_b:.4f} | {r.diff:+.4f} | {r.se_paired:.4f} | "
                     f"{r.se_unpaired:.4f} | [{r.ci_low:+.4f}, {r.ci_high:+.4f}] |")
    return "\n".join(lines)


def compare_pooled(a: str | Path, bs: list[str | Path], *, iters: int = BOOTSTRAP_ITERS,
                   seed: int = 0) -> tuple[list[Paired], list[float]]:
    """Several B (seeds of one recipe) pooled per example against A, each folder read once: the rows of B's
    per-example mean (:func:`mean_samples`), and each B's own task-average difference to A (B_i - A, NaN
    without an average) on the same examples: the spread between seeds, which the pooled interval leaves
    out (it counts the sampling of the questions, for these seeds)."""
    folders = [samples_folder(b) for b in bs]
    check_distinct(samples_folder(a), folders)
    runs = [load_samples(f) for f in folders]
    ref = load_samples(samples_folder(a))
    for i, (folder, run) in enumerate(zip(folders, runs), 1):
        check_same_setup(task_setup(samples_folder(a)), task_setup(folder), set(ref) & set(run), ("A", f"B{i}"))
    meta = task_meta(samples_folder(a), *folders)
    pooled = mean_samples(runs)  # names each task some runs lack: not named again as "only in A"
    ref_pooled = {task: recs for task, recs in ref.items() if task in pooled or not any(task in run for run in runs)}
    rows = compare_samples(ref_pooled, pooled, iters=iters, seed=seed, sign_test=True, meta=meta)
    keys = {task: set(_records_by_example(task, recs)) for task, recs in pooled.items()}
    each = []
    for run in runs:
        own = {task: [r for key, r in _records_by_example(task, run[task]).items() if key in common]
               for task, common in keys.items()}
        avg = task_average(compare_samples(ref, own, iters=min(iters, 200), seed=seed, quiet=True, meta=meta))
        each.append(math.nan if avg is None else avg.diff)
    return rows, each


def compare_folders(a: str | Path, b: str | Path | list[str | Path] | None = None, *, iters: int = BOOTSTRAP_ITERS,
                    seed: int = 0) -> list[Paired]:
    """Paired comparison of two results folders (B against A); with ``b`` None, ``a`` is a run
    folder and its original is compared with its pruned model; with a list of several folders, B is
    their per-example mean (:func:`mean_samples`: several seeds of one recipe, pooled per question)."""
    if b is None:
        fa, fb = samples_folder(a, "original"), samples_folder(a, "pruned")
        if fa.resolve() == fb.resolve():  # also eval/original linked to eval/pruned: the model against itself
            raise PruneError(f"{a} is not a run folder with eval/original and eval/pruned (two different folders): "
                             "give two folders")
        check_distinct(fa, [fb])  # a samples file of eval/pruned that leads to eval/original's
        original, pruned = load_samples(fa), load_samples(fb)
        check_same_setup(task_setup(fa), task_setup(fb), set(original) & set(pruned), ("the original", "the pruned model"))
        return compare_samples(original, pruned, iters=iters, seed=seed, meta=task_meta(fa, fb))
    if isinstance(b, list) and len(b) > 1:
        return compare_pooled(a, b, iters=iters, seed=seed)[0]
    missing = [str(p) for p in (a, b[0] if isinstance(b, list) else b) if not Path(p).expanduser().exists()]
    if len(missing) == 2:  # each named (it said "not a folder: B", and then, once B was there, A)
        raise PruneError(f"neither folder exists: {missing[0]}, {missing[1]} (give two prune run folders or lm-eval "
                         "results folders)")
    fb = samples_folder(b[0] if isinstance(b, list) else b)  # B first: its problem is named first
    fa = samples_folder(a)
    check_distinct(fa, [fb])
    other = load_samples(fb)
    mine = load_samples(fa)
    check_same_setup(task_setup(fa), task_setup(fb), set(mine) & set(other))
    return compare_samples(mine, other, iters=iters, seed=seed, meta=task_meta(fa, fb))
