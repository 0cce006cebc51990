"""Recompute every paired table in docs/BENCHMARKS.md from the counts it prints.

A paired table row gives n, A's accuracy and the flips each way: that is the whole 2x2 table, so
the difference, both standard errors, McNemar's p and the 95% interval can be computed again with
today's :func:`prune.measure.paired.paired_stats`. Rows that disagree beyond rounding are listed;
for the interval, the largest difference per table is printed (tables generated before 2026-12-06
show percentile-bootstrap intervals, the code now prints Newcombe's), and every row where the
printed interval and McNemar's p < 0.05 tell different stories is named. The "Average over N tasks"
line above a table is recomputed from its rows too (:func:`prune.measure.paired.task_average`).

    python scripts/check_paired_tables.py [docs/BENCHMARKS.md]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prune.measure.paired import DISAGREES, paired_stats, task_average  # noqa: E402

HEADER = "| right->wrong | wrong->right | McNemar p |"
LASTWORD = "| vs dense (points, 95% CI) |"
ROUNDING = 6e-5  # the tables print 4 decimals


def answers(n: int, acc_a: float, right_to_wrong: int, wrong_to_right: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-question 0/1 scores of A and B rebuilt from the 2x2 table a row prints."""
    both = round(acc_a * n) - right_to_wrong
    neither = n - both - right_to_wrong - wrong_to_right
    a = np.array([1] * both + [1] * right_to_wrong + [0] * wrong_to_right + [0] * neither, float)
    b = np.array([1] * both + [0] * right_to_wrong + [1] * wrong_to_right + [0] * neither, float)
    return a, b


def interval(cell: str, scale: float = 1.0) -> tuple[float, float]:
    low, high = cell.split("[", 1)[1].split("]", 1)[0].split(",")
    return float(low) / scale, float(high) / scale


AVERAGE = re.compile(r"= ([+-]?[\d.]+) points, paired SE ([\d.]+).*?95% interval \[([+-]?[\d.]+), ([+-]?[\d.]+)\]")


def check_average(line: str, rows: list, where: str, problems: list, widest: list) -> None:
    """The "Average over N tasks" line above a table against :func:`task_average` of its rows."""
    match = AVERAGE.search(line)
    if not match or not rows:
        return
    diff, se, low, high = (float(x) / 100 for x in match.groups())
    avg = task_average(rows)
    if abs(avg.diff - diff) > 6e-5 or abs(avg.se - se) > 6e-5:
        problems.append(f"{where}: average {100 * avg.diff:+.2f} (SE {100 * avg.se:.2f}), printed {100 * diff:+.2f} "
                        f"(SE {100 * se:.2f})")
    widest.append((max(abs(avg.ci_low - low), abs(avg.ci_high - high)), where))


def check_row(where: str, a, b, printed: dict, problems: list, widest: list) -> list:
    s = paired_stats(a, b, task=printed.get("task", ""), metric=printed.get("metric", ""))
    for key, got in (("diff", s.diff), ("se_paired", s.se_paired), ("se_unpaired", s.se_unpaired)):
        if key in printed and abs(got - printed[key]) > ROUNDING:
            problems.append(f"{where}: {key} {got:+.4f}, printed {printed[key]:+.4f}")
    if "p" in printed and f"{s.mcnemar_p:.3g}" != printed["p"]:
        problems.append(f"{where}: McNemar p {s.mcnemar_p:.3g}, printed {printed['p']}")
    low, high = printed["ci"]
    widest.append((max(abs(s.ci_low - low), abs(s.ci_high - high)), where))
    if printed.get("marked") and (low > 0 or high < 0) == (s.mcnemar_p < 0.05):
        problems.append(f"{where}: marked {DISAGREES}, but its interval and McNemar p = {s.mcnemar_p:.3g} agree")
    if (low > 0 or high < 0) != (s.mcnemar_p < 0.05) and not printed.get("marked"):  # marked: the table says so
        problems.append(f"{where}: printed interval [{low:+.4f}, {high:+.4f}] and McNemar p = {s.mcnemar_p:.3g} "
                        f"disagree (today's interval: [{s.ci_low:+.4f}, {s.ci_high:+.4f}])")
    return [s]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def main(path: str = "docs/BENCHMARKS.md") -> int:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    problems: list[str] = []
    tables = 0
    rows = 0
    worst = 0.0
    averages: list = []
    for i, line in enumerate(lines):
        if not (line.rstrip().endswith(HEADER) or LASTWORD in line):
            continue
        tables += 1
        widest: list = []
        table: list = []
        j = i + 2
        dense = None
        while j < len(lines) and lines[j].strip().startswith("|"):
            c, where = cells(lines[j]), f"line {j + 1}"
            if line.rstrip().endswith(HEADER):  # task | metric | n | A | B | B - A | SE | SE | CI | flips | flips | p
                n = int(c[2].split()[0].replace(",", ""))
                a, b = answers(n, float(c[3]), int(c[9]), int(c[10]))
                table += check_row(where, a, b, {"diff": float(c[5]), "se_paired": float(c[6]), "se_unpaired": float(c[7]),
                                                 "ci": interval(c[8]), "p": c[11], "task": c[0], "metric": c[1],
                                                 "marked": DISAGREES in c[8]},
                                   problems, widest)
            elif c[0] == "dense":  # the last-word table: the dense model's accuracy, then one row per model
                dense = float(c[3])
            elif dense is not None and "/" in c[-1]:
                rw, wr = (int(x) for x in c[-1].split("/"))
                n = 1000  # the table's caption: n = 1000 stories
                a, b = answers(n, dense, rw, wr)
                check_row(where, a, b, {"diff": float(c[5].split()[0]) / 100, "ci": interval(c[5], 100)}, problems,
                          widest)
            j += 1
        above = next((lines[k] for k in range(i - 1, max(i - 4, 0), -1) if "Average over" in lines[k]), "")
        check_average(above, table, f"average above line {i + 1}", problems, averages)
        if widest:
            rows += len(widest)
            top, at = max(widest)
            worst = max(worst, top)
            print(f"table at line {i + 1}: {len(widest)} rows, printed interval within {100 * top:.2f} points of "
                  f"today's ({at})")
    print(f"{tables} tables, {rows} rows: every printed interval within {100 * worst:.2f} points of today's")
    if averages:
        top, at = max(averages)
        print(f"{len(averages)} task averages: every printed interval within {100 * top:.2f} points of today's ({at})")
    for p in problems:
        print("  " + p)
    return 1 if any("disagree" not in p for p in problems) else 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
