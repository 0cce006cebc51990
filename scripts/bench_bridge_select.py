#!/usr/bin/env python
"""Does ranking block sets by their KL AFTER the training-free repair choose better sets for the
bridged pipeline (`heal.method: bridge`) than ranking them before it? SmolLM2-135M-Instruct, k = 10.

Protocol: `verified`'s (scripts/bench_verified.py: calibration wiki.test.raw rows 0:2000, 32 x 256
scoring windows, 4 held-out windows x 256, blocks 0 and 29 protected, budget 16). Every candidate set
verified measured is repaired as the recipe smollm2-bridge repairs it, with independent fits (each
cut's down projection refitted on the ORIGINAL's states of --fit C4 windows x 256 tokens, ridge as in
prune.heal.bridge), each cut's refit kept only where it lowers the held-out KL (keep_helpful), and
ranked by that KL (verified's 4 held-out windows). The best set before repair and the best after are
then measured on the evaluation text (rows 2000:, 16 x 512 tokens), bridged and plain: KL to the
original and perplexity. One pass of the original over the fit windows keeps every block's states,
so a cut costs a solve, not a forward pass. Cached under bench_cache/bridge_select/.

    OMP_NUM_THREADS=1 nice python scripts/bench_bridge_select.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from bench_env import DATA, ROOT, log, read, set_key, write  # first: the offline environment and sys.path

import torch  # noqa: E402

import prune  # noqa: E402
from prune.choose.strategies import heldout_windows  # noqa: E402
from prune.choose.verified import verified  # noqa: E402
from prune.core.config import TextSource  # noqa: E402
from prune.heal.bridge import Bridges, fold_targets, keep_helpful, projection_input, runs_of, solve  # noqa: E402
from prune.measure.fidelity import build_reference, measure_fidelity  # noqa: E402
from bench_quality import Context  # noqa: E402

CACHE = ROOT / "bench_cache" / "bridge_select"
PROTECT = (0, -1)


class States:
    """The original's states over the fit windows, every block: the down projection's input ``a``,
    the MLP's output ``m`` and the block's output ``y`` (float32, [tokens, width])."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 8):
        layers = prune.decoder_layers(model)
        self.a = [[] for _ in layers]
        self.m = [[] for _ in layers]
        self.y = [[] for _ in layers]
        handles = []
        for i, layer in enumerate(layers):
            handles.append(fold_targets(layer)[0].register_forward_hook(
                lambda mod, args, out, i=i: self.a[i].append(projection_input(mod, args).float())))
            handles.append(layer.mlp.register_forward_hook(
                lambda mod, args, out, i=i: self.m[i].append(out.detach().flatten(0, -2).float())))
            handles.append(layer.register_forward_hook(
                lambda mod, args, out, i=i: self.y[i].append((out[0] if isinstance(out, tuple) else out).detach().flatten(0, -2).float())))
        try:
            with torch.no_grad():
                for s in range(0, windows.shape[0], batch_size):
                    model(input_ids=windows[s:s + batch_size], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.a = [torch.cat(x) for x in self.a]
        self.m = [torch.cat(x) for x in self.m]
        self.y = [torch.cat(x) for x in self.y]
        self.tokens = int(windows.numel())
        self.grams: dict[int, torch.Tensor] = {}
        self.cuts: dict[tuple[int, int], object] = {}

    def bridge(self, run: list[int]):
        """The cut's independent ``down`` fit (prune.heal.bridge.fit_bridges' normal equations, every token
        weighted alike: ``heal.bridge_weight: uniform``, the only fit when this was measured)."""
        key = (run[0], run[-1])
        if key not in self.cuts:
            p = run[0] - 1
            x = self.a[p].double()
            if p not in self.grams:
                self.grams[p] = x.T @ x
            m = self.m[p].double()
            z = self.y[run[-1]].double() - self.y[p].double() + m
            s = {"G": self.grams[p], "C": x.T @ z, "zz": (z * z).sum(), "plain": ((z - m) ** 2).sum()}
            self.cuts[key] = solve(run, s, "down")
        return self.cuts[key]


def repaired(model, removed: list[int], states: States, reference) -> tuple[object, dict]:
    """The pruned model with each cut's refit kept where it lowers the KL on ``reference``'s windows."""
    student = copy.deepcopy(model)
    prune.remove_layers(student, list(removed))
    runs = runs_of(removed)
    bridges = Bridges([states.bridge(r) for r in runs if r[0] > 0], [r for r in runs if r[0] == 0],
                      states.tokens, 0.0, "down")
    seen = [measure_fidelity(student, reference, batch_size=4)["kl_mean"]]  # plain, then after each fold

    def kl() -> float:
        seen.append(measure_fidelity(student, reference, batch_size=4)["kl_mean"])
        return seen[-1]

    kept = keep_helpful(student, bridges, kl, seen[0])
    after = min(seen)  # keep_helpful keeps a fold only where it lowers the KL: the model ends at the lowest seen
    return student, {"removed": list(removed), "plain_kl": seen[0], "bridged_kl": after,
                     "cuts": [b.run for b in bridges.bridges], "kept": kept}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--fit", type=int, default=64, help="C4 fit windows x 256 tokens")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx = Context()
    model = ctx.model
    scores_path = ROOT / "bench_cache" / "verified" / "scores_skip_first.json"
    scores = (prune.ScoreResult.load_json(scores_path) if scores_path.is_file()
              else prune.score(model, ctx.windows, batch_size=8, progress=False))
    held = heldout_windows(ctx.tok, prune.load_text(ctx.calib_source), 32, 256, 0, None, 4)
    sel_path = CACHE / f"verified_k{args.k}.json"
    sel = read(sel_path)
    if sel is None:
        s = verified(model, scores, held, args.k, protect=PROTECT, batch_size=4, budget=16, progress=False)
        sel = {"removed": s.removed, "candidates": s.details["candidates"]}
        write(sel_path, sel)
    log(f"verified k={args.k}: {sel['removed']}; {len(sel['candidates'])} candidates")

    res_path = CACHE / f"ranked_k{args.k}_fit{args.fit}.json"
    ranked = read(res_path) or {}
    started = time.time()
    c4 = TextSource(str(DATA / "c4" / "c4_web_1480.jsonl"), field=["prefix", "gold_completion"])
    fit = prune.calibration_windows(ctx.tok, prune.load_text(c4), args.fit, 256, seed=0)
    states = States(model, fit)
    log(f"states over {states.tokens} fit tokens: {time.time() - started:.0f} s")
    ref_held = build_reference(model, held, top_k=256, batch_size=4)
    for c in sel["candidates"]:
        key = set_key(c["removed"])
        if key in ranked:
            continue
        t0 = time.time()
        _, r = repaired(model, c["removed"], states, ref_held)
        r["verified_kl"], r["seconds"] = c["kl_mean"], round(time.time() - t0, 1)
        ranked[key] = r
        write(res_path, ranked)
        log(f"{c['removed']}: held-out KL {r['plain_kl']:.4f} -> {r['bridged_kl']:.4f} (kept {r['kept']}, {r['seconds']} s)")

    rows = sorted(ranked.values(), key=lambda r: r["bridged_kl"])
    before = min(ranked.values(), key=lambda r: r["plain_kl"])
    after = rows[0]
    eval_ref = build_reference(model, ctx.eval_windows[:16], top_k=256, batch_size=4)
    out = {}
    for name, r in (("best before repair (verified)", before), ("best after repair", after)):
        student, _ = repaired(model, r["removed"], states, ref_held)
        bridged = measure_fidelity(student, eval_ref, batch_size=4)
        plain_model = copy.deepcopy(model)
        prune.remove_layers(plain_model, list(r["removed"]))
        plain = measure_fidelity(plain_model, eval_ref, batch_size=4)
        out[name] = {"removed": r["removed"], "held_plain": r["plain_kl"], "held_bridged": r["bridged_kl"],
                     "eval_plain_kl": plain["kl_mean"], "eval_bridged_kl": bridged["kl_mean"],
                     "eval_plain_ppl": plain["perplexity_pruned"], "eval_bridged_ppl": bridged["perplexity_pruned"]}
        print(json.dumps({name: out[name]}))
    write(CACHE / f"summary_k{args.k}_fit{args.fit}.json", out)
    print("rank by held-out KL after repair (top 10):")
    for r in rows[:10]:
        print(f"  {r['removed']}: {r['plain_kl']:.4f} -> {r['bridged_kl']:.4f} kept {r['kept']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
