#!/usr/bin/env python
"""Quality against selection cost at k = 10 for every strategy (docs/img/selection_cost.png), from the tables
docs/BENCHMARKS.md records: "Perplexity (WikiText-2 rows 2000:, 64 x 512 tokens) vs k" and "What the
model-based strategies cost" (scripts/bench_quality.py), and "What verified chose and what it cost"
(scripts/bench_verified.py). Nothing is measured here: the figures are those tables'.

Cost is counted in tokens passed through the whole model while choosing (calibration tokens x
full-model-equivalent passes), so strategies that use different windows compare:

* score-only strategies (one_shot, contiguous): one scoring pass over the 32 x 256 calibration
  tokens (8,192);
* iterative: that pass plus one per later round over the same 8,192 tokens, each of the blocks
  still kept (the cost table's "full-model equivalents": sum of kept blocks / 30);
* SLEB: its full-model equivalents over its 4 x 256 windows (1,024 tokens); no scoring pass;
* verified: the scoring pass plus its full-model equivalents over its 4 x 256 held-out windows.

    python scripts/plot_selection_cost.py
"""

from __future__ import annotations

import sys

from bench_env import ROOT, no_flags
DOC = ROOT / "docs" / "BENCHMARKS.md"
OUT = ROOT / "docs" / "img" / "selection_cost.png"
KS = (3, 5, 7, 10)
SCORING_TOKENS = 32 * 256
WINDOW_TOKENS = 4 * 256  # SLEB's and verified's windows
SHOWN = ("one_shot bi", "one_shot angular", "contiguous angular", "one_shot cka (skip_first)",
         "one_shot msrs (skip_first)", "iterative bi", "iterative angular", "sleb")


def section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n#", 1)[0]


def rows(block: str) -> list[list[str]]:
    out = []
    for line in block.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out[1:]  # without the header


def recorded() -> dict[str, dict]:
    """``{strategy: {"cost": tokens, "ppl": {k: perplexity}}}`` from the tables (see module docstring)."""
    text = DOC.read_text()
    ppl = {r[0]: {k: float(c) for k, c in zip(KS, r[1:])}
           for r in rows(section(text, "### Perplexity (WikiText-2 rows 2000:, 64 x 512 tokens) vs k"))
           if r[0] in SHOWN}
    cost = {name: SCORING_TOKENS for name in ppl}
    for r in rows(section(text, "### What the model-based strategies cost")):
        if r[0].startswith("iterative"):
            cost[r[0]] = SCORING_TOKENS * (1 + float(r[3]))
        elif r[0] == "sleb":
            cost[r[0]] = WINDOW_TOKENS * float(r[3])
    verified_ppl = {}
    for r in rows(section(text, "### Verified selection")):
        if r[0] == "verified":
            verified_ppl = {k: float(r[1 + 2 * i]) for i, k in enumerate(KS)}
    verified_cost = {int(r[0]): SCORING_TOKENS + WINDOW_TOKENS * float(r[5])
                     for r in rows(section(text, "#### What verified chose and what it cost")) if r[0].isdigit()}
    out = {name: {"cost": {k: cost[name] for k in KS}, "ppl": ppl[name]} for name in ppl}
    if verified_ppl and verified_cost:
        out["verified"] = {"cost": verified_cost, "ppl": verified_ppl}
    return out


def main() -> int:
    no_flags(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = recorded()
    if "verified" not in data or "sleb" not in data:
        sys.exit(f"{DOC} lacks the quality or verified tables")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for k in (10,):  # the k whose costs the tables record for every strategy (greedy runs went to k = 10)
        points: dict[tuple[float, float], list[str]] = {}  # strategies that land on the same point share a label
        for name, d in sorted(data.items()):
            points.setdefault((d["cost"][k], d["ppl"][k]), []).append(name)
        for (x, y), names in points.items():
            star = "verified" in names
            ax.scatter(x, y, s=90 if star else 36, zorder=3, marker="*" if star else "o")
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("selection cost: tokens through the whole model while choosing")
        ax.set_ylabel(f"WikiText-2 perplexity at k = {k}")
        ax.set_title(f"SmolLM2-135M, {k} of 30 blocks removed: quality against selection cost "
                     "(lower left is better)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print("| strategy | selection cost at k = 10 (tokens through the model) | vs SLEB | perplexity at k = 10 |")
    print("|---|---:|---:|---:|")
    for name, d in sorted(data.items(), key=lambda kv: kv[1]["cost"][10]):
        print(f"| {name} | {d['cost'][10]:,.0f} | {d['cost'][10] / data['sleb']['cost'][10]:.2f}x | {d['ppl'][10]:.1f} |")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
