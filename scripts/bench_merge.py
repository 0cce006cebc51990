"""Merging the removed blocks into a kept one instead of dropping them (LaCo), SmolLM2-135M, k = 7.

LaCo (Yang et al., 2024, "Layer Collapse") keeps block ``t`` and folds the parameters of the blocks it
removes into it: ``theta_t <- theta_t + alpha * sum_{i in removed} (theta_i - theta_t)`` (alpha = 1 in
the paper; the norms' weights are left alone here). This script asks whether that is a better start
than dropping the run, before any healing: the contiguous angular run of the healing benchmark
(blocks 12-18) is removed and merged into the block before it (11) or after it (19) at several alpha
(alpha = 0 is plain dropping), and each model is measured against the dense one on the 16 WikiText-2
fidelity windows of ``bench_heal.py`` (perplexity, KL(dense || model) per token, top-1 agreement).

    python scripts/bench_merge.py          # about 40 s a case on one thread; each case cached in bench_cache/merge/
"""
from __future__ import annotations

import copy
import time

from bench_env import ROOT, log, no_flags, read, write  # first: the offline environment and sys.path

import torch  # noqa: E402

import bench_heal  # noqa: E402  (the healing benchmark's dense model, block choice and fidelity windows)
from docs_block import replace_block  # noqa: E402
from prune.model.loading import decoder_layers  # noqa: E402
from prune.model.surgery import remove_layers  # noqa: E402

CACHE = ROOT / "bench_cache" / "merge"
CASES = [(None, 0.0)] + [(t, a) for t in ("before", "after") for a in (0.05, 0.1, 0.2, 0.35, 1.0)]
#: LaCo's own regime: a few blocks merged at a time (here two, the first two of the run, into the block before)
SMALL = [(None, 0.0), ("before", 0.5), ("before", 1.0)]


def merge_into(model, target: int, removed: list[int], alpha: float) -> None:
    """``theta_target += alpha * sum_i (theta_i - theta_target)`` over the removed blocks, every
    parameter but the norms' (their scales are not differences of comparable maps)."""
    layers = decoder_layers(model)
    kept = dict(layers[target].named_parameters())
    with torch.no_grad():
        deltas = {name: sum(dict(layers[i].named_parameters())[name] - p for i in removed)
                  for name, p in kept.items() if "norm" not in name}
        for name, delta in deltas.items():
            kept[name].add_(alpha * delta)


def measure(dense, tok, removed: list[int], where: str | None, alpha: float) -> dict:
    path = CACHE / f"{'-'.join(map(str, removed))}-{where or 'drop'}-{alpha:g}.json"
    if (hit := read(path)) is not None:
        return hit
    started = time.time()
    model = copy.deepcopy(dense)
    if where is not None:
        merge_into(model, removed[0] - 1 if where == "before" else removed[-1] + 1, removed, alpha)
    remove_layers(model, removed)
    result = {"where": where, "alpha": alpha, "removed": removed, **bench_heal.fidelity_to(model, dense, tok),
              "seconds": round(time.time() - started, 1)}
    result.pop("per_window", None)
    write(path, result)
    log(f"{removed} {where or 'drop'} alpha {alpha:g}: ppl {result['perplexity']:.2f}, KL {result['kl']:.4f}")
    return result


def big(x: float) -> str:
    return f"{x:,.2f}" if x < 1e5 else f"{x:.1e}"


def table(rows: list[dict], dense_ppl: float) -> list[str]:
    """Markdown rows, the first being the blocks dropped (alpha 0)."""
    drop, first, last = rows[0], rows[0]["removed"][0], rows[0]["removed"][-1]
    lines = ["| blocks removed | merged into | alpha | ppl (16 x 512) | x dense | KL to dense | KL / dropped's | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        into = {None: "nothing (dropped)", "before": f"block {first - 1} (before them)",
                "after": f"block {last + 1} (after them)"}[r["where"]]
        lines.append(f"| {first}-{last} | {into} | {r['alpha']:g} | {big(r['perplexity'])} | x{big(r['perplexity'] / dense_ppl)} | "
                     f"{r['kl']:.4f} | {100 * r['kl'] / drop['kl']:.0f}% | {r['top1']:.1%} |")
    return lines


def main() -> None:
    no_flags(__doc__)
    torch.set_num_threads(1)
    dense, tok = bench_heal.load_dense()
    removed = bench_heal.removed_blocks(dense, tok)
    dense_ppl = bench_heal.fidelity_to(dense, dense, tok)["perplexity"]
    lines = table([measure(dense, tok, removed, w, a) for w, a in CASES], dense_ppl)
    pair = removed[:2]
    lines += ["", f"Two blocks ({pair[0]}, {pair[1]}), LaCo's regime of merging a few at a time:", ""]
    lines += table([measure(dense, tok, pair, w, a) for w, a in SMALL], dense_ppl)
    lines += ["", f"SmolLM2-135M-Instruct (float32); dense perplexity on the same windows {dense_ppl:.2f}; no training "
              "after the merge; KL / dropped's: against the same blocks dropped."]
    print("\n".join(lines))
    if not replace_block("bench_merge", "\n".join(lines), "python scripts/bench_merge.py", "bench_cache/merge/"):
        log("docs/BENCHMARKS.md has no bench_merge block: table not written there")


if __name__ == "__main__":
    main()
