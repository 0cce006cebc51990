"""Fidelity (KL to the original) of every selection strategy on SmolLM2-135M-Instruct, and a
paired lm-eval comparison at k = 7 (docs/BENCHMARKS.md, "Fidelity and paired comparisons").

The blocks each strategy removes are the quality benchmark's recorded selections (the table
"Blocks removed (0-based)" in docs/BENCHMARKS.md, made by scripts/bench_quality.py); they are
read from there, not recomputed. Protocol:

* fidelity: WikiText-2 ``wiki.test.raw`` rows ``2000:`` (the quality benchmark's perplexity text,
  disjoint from its calibration rows 0:2000), ``--windows`` windows x 512 tokens, the original's
  top-256 log-probs per token kept (prune.measure.fidelity);
* cost: seconds of one fidelity pass against one perplexity pass (``nll_sum``) of the same pruned
  model on the same windows, and of building the reference;
* top-k check: the mean KL with top-256 against the exact KL (the full vocabulary) on 2 windows;
* paired (``--part paired``): lm-eval 0-shot, limit 500, batch 16, seed 0, local copies, for the
  dense model and the strategies named in ``--paired``, each written in lm-eval's own format
  (results + samples); then ``prune compare`` of every pair.

Every case is cached under ``bench_cache/fidelity/`` as it finishes; a rerun resumes.

    nohup nice -n 10 python scripts/bench_fidelity.py --part kl > bench_cache/fidelity_kl.log 2>&1 &
    nohup nice -n 10 python scripts/bench_fidelity.py --part paired > bench_cache/fidelity_paired.log 2>&1 &
    python scripts/bench_fidelity.py --part report
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import re
import sys
import time
from pathlib import Path

from bench_env import DATA, ROOT, WIKI, log, read, set_key, smollm2_folder, write  # first: the offline environment and sys.path


import torch

import prune
from prune.measure.fidelity import FidelityReference, build_reference, measure_fidelity
from prune.measure.perplexity import nll_sum

CACHE = ROOT / "bench_cache" / "fidelity"
KS = (3, 5, 7, 10)
TOP_K = 256
TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
PAIRED = ["contiguous angular", "sleb", "one_shot bi", "dense"]


def recorded_selections() -> dict[str, dict[int, list[int]]]:
    """``{strategy: {k: removed blocks}}`` from docs/BENCHMARKS.md's "Blocks removed (0-based)" table."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    section = text.split("### Blocks removed (0-based)", 1)[1].split("###", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 1 + len(KS) or cells[0] in ("strategy", "---") or set(cells[1]) <= {"-"}:
            continue
        out[cells[0]] = {k: [int(b) for b in cell.split()] for k, cell in zip(KS, cells[1:])}
    verified = {}  # the verified strategy's choices (issue 15): "What verified chose and what it cost"
    for line in text.split("#### What verified chose", 1)[-1].split("####", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0].isdigit() and int(cells[0]) in KS:
            verified[int(cells[0])] = [int(b) for b in cells[1].split()]
    if set(verified) == set(KS):
        out["verified"] = verified
    return out


def recorded_perplexity() -> dict[str, dict[int, float]]:
    """``{strategy: {k: perplexity}}`` from docs/BENCHMARKS.md's quality table (64 x 512 tokens)."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    section = text.split("### Perplexity (WikiText-2 rows 2000:, 64 x 512 tokens) vs k", 1)[1].split("###", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(KS) and cells[0] not in ("strategy", "---") and "mean of" not in cells[0]:
            try:
                out[cells[0]] = {k: float(c.split()[0]) for k, c in zip(KS, cells[1:])}
            except ValueError:
                continue
    return out


def recorded_lmeval_k7() -> dict[str, float]:
    """``{strategy: average retained %}`` at k = 7 from docs/BENCHMARKS.md (the unpaired table)."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    section = text.split("### 0-shot lm-eval at k = 7", 1)[1].split("###", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*([^|]+?)\s*\|.*\|\s*([\d.]+)%", line)
        if m and "mean of 3" not in m.group(1):
            out[m.group(1)] = float(m.group(2))
    return out


class Context:
    def __init__(self, windows: int):
        self.model, self.tok, _ = prune.load(smollm2_folder(), dtype="float32")
        held = prune.load_text(prune.TextSource(str(WIKI), rows="2000:"))
        self.windows = prune.eval_windows(self.tok, held, 512, max_windows=windows)

    def pruned(self, removed):
        model = copy.deepcopy(self.model)
        if removed:
            prune.remove_layers(model, list(removed))
        return model

    def reference(self) -> FidelityReference:
        path = CACHE / f"reference_w{self.windows.shape[0]}_top{TOP_K}.safetensors"
        if path.is_file():
            return FidelityReference.load(path)
        started = time.time()
        ref = build_reference(self.model, self.windows, top_k=TOP_K, batch_size=4,
                              data={"path": str(WIKI), "rows": "2000:"})
        write(CACHE / "reference_seconds.json", {"seconds": round(time.time() - started, 1),
                                                 "windows": int(self.windows.shape[0])})
        ref.save(path)
        log(f"reference built in {time.time() - started:.0f}s")
        return ref


def stage_kl(ctx: Context, names: list[str], ks=(7, 3, 5, 10)) -> None:
    ref = ctx.reference()
    sels = recorded_selections()
    cases = [(k, name) for k in ks for name in names if name in sels]
    for k, name in cases:
        removed = sels[name][k]
        path = CACHE / f"w{ctx.windows.shape[0]}" / f"{set_key(removed)}.json"
        if path.is_file():
            continue
        model = ctx.pruned(removed)
        started = time.time()
        fid = measure_fidelity(model, ref, batch_size=4)
        fid["seconds"] = round(time.time() - started, 1)
        fid["removed"] = removed
        write(path, fid)
        log(f"{name} k={k}: KL mean {fid['kl_mean']:.4f} p99 {fid['kl_p99']:.3f} top-1 {fid['top1_agreement']:.3f} "
            f"ppl ratio {fid['perplexity_ratio']:.2f} ({fid['seconds']}s)")
        del model


def stage_cost(ctx: Context) -> None:
    """One fidelity pass against one perplexity pass of the same model (contiguous angular, k = 7)."""
    path = CACHE / f"cost_w{ctx.windows.shape[0]}.json"
    if path.is_file():
        return
    ref = ctx.reference()
    model = ctx.pruned(recorded_selections()["contiguous angular"][7])
    times = {"perplexity": [], "fidelity": []}
    for _ in range(2):
        started = time.time()
        nll_sum(model, ctx.windows, batch_size=4)
        times["perplexity"].append(time.time() - started)
        started = time.time()
        measure_fidelity(model, ref, batch_size=4)
        times["fidelity"].append(time.time() - started)
    data = {k: round(min(v), 1) for k, v in times.items()}
    data["ratio"] = round(data["fidelity"] / data["perplexity"], 2)
    write(path, data)
    log(f"cost: {data}")


def stage_topk(ctx: Context) -> None:
    """Mean KL with the top-256 kept against the exact KL (the full vocabulary) on 2 windows."""
    path = CACHE / "topk_check.json"
    if path.is_file():
        return
    windows = ctx.windows[:2]
    model = ctx.pruned(recorded_selections()["contiguous angular"][7])
    out = {}
    for top_k in (TOP_K, ctx.model.config.vocab_size):
        ref = build_reference(ctx.model, windows, top_k=top_k, batch_size=1)
        fid = measure_fidelity(model, ref, batch_size=1)
        out[str(top_k)] = {k: fid[k] for k in ("kl_mean", "kl_median", "kl_p99", "kl_max", "kl_exact")}
        del ref
    write(path, out)
    log(f"top-k check: {out}")


def lmeval_folder(sels: dict, name: str, k: int, limit: int = 500, tasks: list[str] = TASKS) -> Path:
    """lm-eval's files of ``name`` at ``k`` (the dense model's are shared by every k); another
    ``limit`` than the default 500 questions per task, or other tasks than the four, have folders of their own."""
    root = CACHE / (("lmeval_k{}" if limit == 500 else "lmeval_k{}_n" + str(limit))
                    + ("" if list(tasks) == TASKS else "_" + "-".join(tasks)))
    return Path(str(root).format(7)) / "dense" if name == "dense" else Path(str(root).format(k)) / set_key(sels[name][k])


def stage_paired(ctx: Context, names: list[str], limit: int, tasks: list[str], k: int = 7) -> None:
    from prune.measure.lmeval import run_lm_eval

    sels = recorded_selections()
    for name in names:  # "dense" is the unpruned model
        removed = [] if name == "dense" else sels[name][k]
        folder = lmeval_folder(sels, name, k, limit, tasks)
        if list(folder.glob("results_*.json")):
            continue
        started = time.time()
        run = run_lm_eval(ctx.pruned(removed), ctx.tok, tasks, limit=limit, batch_size=16, seed=0, data_dir_path=DATA,
                          progress=False)
        run.write(folder, f"SmolLM2-135M-Instruct {name} k={k}")
        log(f"lm-eval {name}: {({t: r['metrics'] for t, r in run.summary.items()})} ({time.time() - started:.0f}s)")


def paired_report(k: int, limit: int, names: list[str], tasks: list[str] = TASKS) -> str:
    """Only the paired comparisons at ``k`` with ``limit`` questions per task, every pair of ``names``
    whose lm-eval files are here (``--part paired_report``)."""
    from prune.measure.paired import average_line, compare_folders, headline_rows, paired_markdown

    sels = recorded_selections()
    have = [n for n in names if list(lmeval_folder(sels, n, k, limit, tasks).glob("samples_*.jsonl"))]
    lines = [f"_Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `python scripts/bench_fidelity.py "
             f"--part paired_report --k {k} --limit {limit} --paired {','.join(names)}"
             + ("" if list(tasks) == TASKS else f" --tasks {','.join(tasks)}") + "`._", ""]
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            rows = headline_rows(compare_folders(lmeval_folder(sels, a, k, limit, tasks),
                                                 lmeval_folder(sels, b, k, limit, tasks)))
            lines += [f"A = {a}, B = {b}. {average_line(rows)}.", "", paired_markdown(rows), ""]
    return "\n".join(lines)


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def report(windows: int) -> str:
    sels = recorded_selections()
    lines = [f"_Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `python scripts/bench_fidelity.py "
             f"--part report` from bench_cache/fidelity/._", "",
             f"#### KL(original ‖ pruned) per token, mean (top-1 agreement), WikiText-2 rows 2000:, {windows} x 512 tokens", "",
             "| strategy | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|" + "---:|" * len(KS)]
    kl7 = {}
    for name, by_k in sels.items():
        cells = []
        for k in KS:
            fid = read(CACHE / f"w{windows}" / f"{set_key(by_k[k])}.json")
            cells.append("-" if fid is None else f"{fid['kl_mean']:.3f} ({100 * fid['top1_agreement']:.0f}%)")
            if fid is not None and k == 7:
                kl7[name] = fid
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lm = recorded_lmeval_k7()
    common = [n for n in kl7 if n in lm]
    if len(common) >= 3:
        rho_kl = spearman([-kl7[n]["kl_mean"] for n in common], [lm[n] for n in common])
        rho_top1 = spearman([kl7[n]["top1_agreement"] for n in common], [lm[n] for n in common])
        rho_ppl = spearman([-kl7[n]["perplexity_ratio"] for n in common], [lm[n] for n in common])
        distinct = len({set_key(kl7[n]["removed"]) for n in common})
        lines += ["", f"Rank correlation (Spearman) at k = 7 with the lm-eval average retained accuracy over "
                      f"{len(common)} strategies ({distinct} distinct block sets): mean KL {rho_kl:.2f}, top-1 "
                      f"agreement {rho_top1:.2f}, perplexity ratio on the same windows {rho_ppl:.2f}."]
    ppl = recorded_perplexity()
    cells = []
    for k in KS:
        kl_k = {n: read(CACHE / f"w{windows}" / f"{set_key(by_k[k])}.json") for n, by_k in sels.items()}
        both = [n for n in kl_k if kl_k[n] is not None and n in ppl]
        if len(both) >= 3:
            rho = spearman([kl_k[n]["kl_mean"] for n in both], [ppl[n][k] for n in both])
            cells.append(f"k = {k}: {rho:.2f} ({len(both)} strategies)")
    if cells:
        lines += ["", "Rank correlation (Spearman) of the mean KL on these 16 windows with the quality benchmark's "
                      "perplexity on all 64 windows of the same text: " + "; ".join(cells) + "."]
    cost = read(CACHE / f"cost_w{windows}.json")
    ref_s = read(CACHE / "reference_seconds.json")
    if cost:
        lines += ["", f"Cost: one fidelity pass {cost['fidelity']} s against one perplexity pass {cost['perplexity']} s "
                      f"on the same windows and model (x{cost['ratio']}); the reference (the original, once) "
                      f"{ref_s['seconds'] if ref_s else '?'} s."]
    topk = read(CACHE / "topk_check.json")
    if topk:
        (ka, a), (kb, b) = sorted(topk.items(), key=lambda kv: int(kv[0]))
        lines += ["", f"Top-{ka} against the exact KL (all {kb} tokens of the vocabulary) on 2 windows, contiguous "
                      f"angular k = 7: mean {a['kl_mean']:.4f} vs {b['kl_mean']:.4f}, p99 {a['kl_p99']:.3f} vs "
                      f"{b['kl_p99']:.3f}, max {a['kl_max']:.3f} vs {b['kl_max']:.3f} (the top-{ka} mean is "
                      f"{100 * a['kl_mean'] / b['kl_mean']:.0f}% of the exact one: a lower bound, as documented)."]
    from prune.measure.paired import average_line, compare_folders, headline_rows, paired_markdown

    for k in (7, 10):
        seen: dict[str, str] = {}  # block set -> the first strategy evaluated with it
        same = []
        for n in dict.fromkeys(["dense", *PAIRED, "verified"]):
            if n != "dense" and n not in sels:
                continue
            key = "dense" if n == "dense" else set_key(sels[n][k])
            if key in seen:
                same.append(f"{n} removes the same blocks as {seen[key]} at k = {k}: its figures are that row's.")
            elif list(lmeval_folder(sels, n, k).glob("samples_*.jsonl")):
                seen[key] = n
        names = list(seen.values())
        if len(names) < 2:
            continue
        lines += ["", f"#### Paired lm-eval at k = {k} (0-shot, limit 500, the same examples, local task copies)", "",
                  "One headline metric per task (acc; hellaswag acc_norm). The average's SE is "
                  "sqrt(sum of the tasks' squared paired SEs) / 4 (the tasks' examples are independent); its 95% interval "
                  "adds the tasks' own intervals in squares (MOVER).", *same, ""]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                rows = headline_rows(compare_folders(lmeval_folder(sels, a, k), lmeval_folder(sels, b, k)))
                lines += [f"A = {a}, B = {b}. {average_line(rows)}.", "", paired_markdown(rows), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["kl", "paired", "paired_report", "report"], required=True)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ks", default="3,5,10", help="the k after k = 7 (default 3,5,10)")
    p.add_argument("--only", default=None, help="comma-separated strategy names (default all recorded)")
    p.add_argument("--paired", default=",".join(PAIRED))
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, default=7, help="--part paired: blocks removed (7 or 10)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "report":
        print(report(args.windows))
        return 0
    if args.part == "paired_report":
        print(paired_report(args.k, args.limit, args.paired.split(","), args.tasks.split(",")))
        return 0
    ctx = Context(args.windows)
    if args.part == "kl":
        names = args.only.split(",") if args.only else list(recorded_selections())
        stage_kl(ctx, names, [7])  # k = 7 first (the lm-eval comparison), then the costs, then the other k
        stage_cost(ctx)
        stage_topk(ctx)
        stage_kl(ctx, names, [int(k) for k in args.ks.split(",")])
    else:
        stage_paired(ctx, args.paired.split(","), args.limit, args.tasks.split(","), args.k)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
