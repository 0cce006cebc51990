#!/usr/bin/env python
"""How often a 95% interval of a paired mean difference covers the true difference, for a few examples:
the percentile bootstrap (prune.measure.paired's interval for scores that are not 0/1 from BOOTSTRAP_MIN
examples up) against Student's (below it); then the interval of seeds pooled per example (A right or wrong,
B the mean of k seeds' right/wrong answers, each seed flipping a few of A's answers), which
:func:`prune.measure.paired.paired_stats` gives the bootstrap too. docs/EVALUATION.md cites this script's output.

    python scripts/check_interval_coverage.py          # ~1 minute on one CPU core
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune.measure.paired import paired_stats, paired_t  # noqa: E402

TRUE_DIFF, SD, REPS, ITERS = 0.1, 0.2, 400, 10_000


def bootstrap(d: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """The percentile bootstrap of paired_stats: ITERS resamples of the examples, the 2.5th and 97.5th percentiles."""
    means = d[rng.integers(0, d.size, size=(ITERS, d.size))].mean(axis=1)
    return tuple(np.percentile(means, [2.5, 97.5]))


def main() -> None:
    rng = np.random.default_rng(0)
    print("| examples | percentile bootstrap covers | Student covers |")
    print("|---:|---:|---:|")
    for n in (3, 5, 8, 30):
        boot = student = 0
        for _ in range(REPS):
            a = rng.normal(0.5, SD, n)
            b = a + rng.normal(TRUE_DIFF, SD, n)
            low, high = bootstrap(b - a, rng)
            boot += low <= TRUE_DIFF <= high
            t = paired_t(a, b)
            student += t.ci_low <= TRUE_DIFF <= t.ci_high
        print(f"| {n} | {boot / REPS:.2f} | {student / REPS:.2f} |")
    print("\n| examples | seeds pooled | right->wrong, wrong->right per seed | paired_stats covers | Student covers |")
    print("|---:|---:|---|---:|---:|")
    for n, k, p_rw, p_wr in ((40, 3, 0.04, 0.02), (100, 3, 0.02, 0.01), (300, 2, 0.01, 0.005), (1000, 3, 0.01, 0.01)):
        ours = student = 0
        for rep in range(REPS):
            a = (rng.random(n) < 0.5).astype(float)
            seeds = []
            for _ in range(k):
                u = rng.random(n)
                b = a.copy()
                b[(a == 1) & (u < p_rw)] = 0
                b[(a == 0) & (u < p_wr)] = 1
                seeds.append(b)
            b = np.mean(seeds, axis=0)
            true = 0.5 * p_wr - 0.5 * p_rw  # the expected difference (A right half the time)
            r = paired_stats(a, b, iters=2000, seed=rep)
            ours += r.ci_low <= true <= r.ci_high
            t = paired_t(a, b)
            student += t.ci_low <= true <= t.ci_high
        print(f"| {n} | {k} | {p_rw}, {p_wr} | {ours / REPS:.2f} | {student / REPS:.2f} |")


if __name__ == "__main__":
    main()
