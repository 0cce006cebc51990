"""Healing benchmark: SmolLM2-135M-Instruct with 7 blocks removed, dense vs pruned vs each healing method.

Protocol (docs/BENCHMARKS.md, "Healing"; the shared protocol of notes/COMMON.md):
  * blocks: contiguous angular distance on WikiText-2 test rows 0:2000 (32 windows x 256
    tokens, seed 0) -> blocks 12-18 of 30;
  * training text: C4 web excerpts (prefix + gold_completion), never WikiText-2; every method
    sees the same BUDGET of training tokens (TRAIN_WINDOWS windows x 256 tokens, one epoch);
  * perplexity: WikiText-2 test rows 2000: (disjoint from calibration), 64 windows x 512;
  * lm-eval: arc_easy, piqa, hellaswag, winogrande, 0-shot, limit 500, batch 16, seed 0,
    local task copies.

Parts (each case is cached as JSON under bench_cache/heal/ as soon as it finishes, so a rerun
resumes; healed checkpoints are kept in bench_cache/heal/models/ for the lm-eval part):
  python scripts/bench_heal.py --part train    # dense, pruned, replace, lora, partial: perplexity
  python scripts/bench_heal.py --part curve    # the best method at 1/4 .. 4x the budget
  python scripts/bench_heal.py --part lmeval   # the multiple-choice tasks of every case
  python scripts/bench_heal.py --part report   # table + docs/img/heal_curve.png + Markdown
  python scripts/bench_heal.py --part distill [--budgets 8192,32768]   # distill vs next-token, LoRA and partial
  python scripts/bench_heal.py --part distill_lmeval   # the multiple-choice tasks of the 32k-token distill cases
  python scripts/bench_heal.py --part distill_report   # its table into docs/BENCHMARKS.md
  python scripts/bench_heal.py --part distill_paired   # lm-eval with samples: dense, un-healed, saved LoRA cases
  python scripts/bench_heal.py --part distill_paired_report   # paired tables (prune.measure.paired) into docs
  python scripts/bench_heal.py --part distill_matrix   # every evaluated case in one table: fidelity + paired MC
  python scripts/bench_heal.py --part distill --variant lr2e-3 --only distill-lora   # a VARIANTS setting
  python scripts/bench_heal.py --part distill_variants   # each variant beside its plain case
  python scripts/bench_heal.py --part bridge_cuts   # when a bridge alone helps: k = 7 and 10 cuts, both kinds
  python scripts/bench_heal.py --part lastword   # the exact last word of each TinyStories story, paired
  python scripts/bench_heal.py --part lastword_report   # its table into docs/BENCHMARKS.md
  python scripts/bench_heal.py --part mc_curve   # multiple choice against training tokens (--variant: the setting)
Run it niced in the background: nohup nice -n 10 python scripts/bench_heal.py --part all > bench_heal.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench_env import DATA, ROOT, WIKI, log, revision, smollm2_folder  # first: the offline environment and sys.path


import torch  # noqa: E402

# the 2 cores are shared with other jobs: one thread each is faster than two fighting (measured)
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

import prune  # noqa: E402
from prune.core.records import complement  # noqa: E402
from prune.measure.perplexity import perplexity
from prune.heal.methods import (
    heal_config,
    heal_model,
    heal_replacement,
    plan_replacement,
    replacement_init,
    training_windows,
)

C4 = {"path": str(DATA / "c4" / "c4_web_1480.jsonl"), "field": ["prefix", "gold_completion"]}
CACHE = ROOT / "bench_cache" / "heal"
#: text the original model wrote itself (``--part teacher_text``): each sequence a C4 excerpt's first
#: TEACHER_PREFIX tokens continued by sampling at temperature 1 (the teacher's own distribution, no top-k / top-p)
TEACHER_TEXT = CACHE / "teacher_text.jsonl"
TEACHER_DATA = {"path": str(TEACHER_TEXT), "field": "text"}
TEACHER_PREFIX, TEACHER_LENGTH, TEACHER_SEQUENCES = 32, 256, 600
#: half and half: TEACHER_TEXT's rows, then as many C4 tokens (whole rows, their text as C4 joins it, in the same seed-0
#: order as the prefixes: mostly the excerpts whose first tokens started the original's sequences, their own continuations)
TEACHER_MIX = CACHE / "teacher_mix.jsonl"
TEACHER_MIX_DATA = {"path": str(TEACHER_MIX), "field": "text"}
IMG = ROOT / "docs" / "img" / "heal_curve.png"
K = 7
TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
LIMIT = 500
SEQ = 256
TRAIN_WINDOWS = 128  # the budget: 128 windows x 256 tokens = 32,768 training tokens per method
BUDGET = TRAIN_WINDOWS * SEQ
COMMON = dict(data=C4, n_samples=TRAIN_WINDOWS, val_samples=8, seq_len=SEQ, seed=0)
#: each method at the budget: batch 4 x 256 tokens, 32 optimizer steps, one epoch
METHODS = {
    "replace": dict(COMMON, method="replace", steps=32, batch_size=4, learning_rate=3e-3, init="first_removed", loss="mse"),
    "partial": dict(COMMON, method="partial", steps=32, batch_size=4, learning_rate=3e-4, last_blocks=4, train_norm=True),
    "lora": dict(COMMON, method="lora", steps=32, batch_size=4, learning_rate=1e-3, rank=16, alpha=32.0),
}
CURVE_FACTORS = [0.25, 0.5, 1, 2, 4]


def stamp() -> dict:
    return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads, "
                       + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "revision": revision(ROOT)}


def changed_settings(name: str, settings: dict) -> list[str]:
    """The settings of case ``name`` that differ from those its cached result was healed with (a case
    is keyed by its name: a changed setting under an unchanged name must not reuse the old result)."""
    old = ((cached(name) or {}).get("healing") or {}).get("settings") or {}
    return [f"{k}: {old[k]!r} -> {v!r}" for k, v in settings.items() if k in old and not same_setting(old[k], v)]


def same_setting(stored, given) -> bool:
    """Whether a stored setting (the record's full dump: every field of a section filled in, lists for
    tuples) is the one given (only the fields the bench sets; numbers to rounding)."""
    if isinstance(given, dict):
        return isinstance(stored, dict) and all(k in stored and same_setting(stored[k], v) for k, v in given.items())
    if isinstance(given, (list, tuple)):
        return (isinstance(stored, (list, tuple)) and len(stored) == len(given)
                and all(same_setting(a, b) for a, b in zip(stored, given)))
    if isinstance(given, (int, float)) and isinstance(stored, (int, float)) and not isinstance(given, bool):
        return math.isclose(stored, given)
    return stored == given


def cached(name: str):
    path = CACHE / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def store(name: str, data: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{name}.json.tmp"
    tmp.write_text(json.dumps({**data, **stamp()}, indent=1))
    tmp.rename(CACHE / f"{name}.json")


# ---- shared setup ---------------------------------------------------------------------------------
def load_dense():
    model, tok, _ = prune.load(smollm2_folder(), dtype="float32")
    return model, tok


def removed_blocks(model, tok) -> list[int]:
    """Contiguous angular choice of K blocks under the shared calibration protocol (cached)."""
    hit = cached("selection")
    if hit:
        return hit["removed"]
    text = prune.load_text(prune.TextSource(str(WIKI), rows="0:2000"))
    windows = prune.calibration_windows(tok, text, 32, 256, seed=0)
    scores = prune.score(model, windows, batch_size=8, metrics=("bi", "angular"), progress=False)
    choice = prune.select(scores, K, strategy="contiguous", metric="angular")
    store("selection", {"removed": choice.removed, "selection": choice.to_dict()})
    return choice.removed


_EVAL = {}


def eval_windows(tok) -> torch.Tensor:
    if "w" not in _EVAL:
        text = prune.load_text(prune.TextSource(str(WIKI), rows="2000:"))
        _EVAL["w"] = prune.eval_windows(tok, text, 512, max_windows=64)
    return _EVAL["w"]


def ppl(model, tok) -> dict:
    return perplexity(model, eval_windows(tok), batch_size=4, progress=False)


# ---- part: train (perplexity at the budget) ----------------------------------------------------------
def part_train() -> None:
    base, tok = load_dense()
    run = removed_blocks(base, tok)
    log(f"removed blocks {run}; budget {BUDGET:,} training tokens per method")
    if not cached("dense"):
        t = time.time()
        store("dense", {"case": "dense", "perplexity": ppl(base, tok), "layers": 30,
                        "params": prune.count_parameters(base), "seconds": round(time.time() - t, 1)})
    log(f"dense ppl {cached('dense')['perplexity']['perplexity']:.2f}")
    if not cached("pruned"):
        model = copy.deepcopy(base)
        prune.remove_layers(model, run)
        store("pruned", {"case": "pruned", "perplexity": ppl(model, tok), "layers": 30 - K,
                         "params": prune.count_parameters(model), "removed": run})
    log(f"pruned ppl {cached('pruned')['perplexity']['perplexity']:.2f}")
    for name, settings in METHODS.items():
        if cached(name):
            log(f"{name} ppl {cached(name)['perplexity']['perplexity']:.2f} (cached)")
            continue
        model = copy.deepcopy(base)
        if name != "replace":
            prune.remove_layers(model, run)
        log(f"healing: {name} {settings}")
        rec = heal_model(model, tok, removed=run if name == "replace" else None, **settings)
        result = ppl(model, tok)
        prune.save(model, tok, CACHE / "models" / name, pruning={"removed": run, "healing": rec}, overwrite=True)
        store(name, {"case": name, "perplexity": result, "healing": rec, "layers": model.config.num_hidden_layers,
                     "params": prune.count_parameters(model), "removed": run})
        log(f"{name} ppl {result['perplexity']:.2f} ({rec['seconds']:.0f} s of healing)")
        del model


# ---- part: distill (distillation from the original vs next-token loss) ------------------------------------
#: training-token budgets: 32, 128, 512 windows x 256 tokens (one epoch, batch 4, steps = windows / 4)
DISTILL_BUDGETS = [8_192, 32_768, 131_072]
DISTILL_PARAMS = {"lora": METHODS["lora"], "partial": METHODS["partial"]}
DISTILL_SETTINGS = dict(temperature=1.0, kl_weight=1.0, hidden_weight=0.0, lm_weight=0.0, teacher="memory")
#: settings tried beside the matrix (``--variant NAME``; the case name gets ``+NAME``): the hidden-state
#: MSE at every kept block (SmolLM2's residual stream has massive activations: the raw MSE starts near
#: 40 against a KL near 0.8, ``--part hidden_scale``, so 0.01 makes the two terms comparable), a higher LoRA learning rate,
#: and more, smaller optimizer steps
R64 = dict(batch_size=1, rank=64, alpha=128.0)  # one window per step at rank 64: the base of the later variants
R128 = dict(batch_size=1, rank=128, alpha=128.0)  # rank 128 at alpha = rank (scale 1)
VARIANTS = {"hidden": dict(hidden_weight=0.01), "lr2e-3": dict(learning_rate=2e-3),
            "batch1": dict(batch_size=1),  # one window per step: 4x the optimizer steps for the same tokens
            "batch1-lr2e-3": dict(batch_size=1, learning_rate=2e-3),  # the two that helped, together
            "batch1-r64": R64,  # one window per step, 4x the LoRA rank
            "batch1-r128": dict(batch_size=1, rank=128, alpha=256.0),  # 8x
            "batch1-r256": dict(batch_size=1, rank=256, alpha=512.0),  # 16x: near full rank (hidden size 576)
            "batch1-r64-lr5e-4": dict(R64, learning_rate=5e-4),  # r64, half the rate
            "batch1-r64-lr1.5e-3": dict(R64, learning_rate=1.5e-3),  # between 1e-3 and 2e-3
            # windows as long as the fidelity windows (512): the same tokens in half as many, longer steps
            "batch1-r64-seq512": dict(R64, seq_len=512),
            # DoRA (magnitude and direction trained apart) in place of LoRA, same rank
            "batch1-r64-dora": dict(R64, dora=True),
            "batch1-r64-seq512-dora": dict(R64, seq_len=512, dora=True),
            # another seed (other training windows, other initial adapters): the run-to-run spread
            "batch1-r64-dora-seed1": dict(R64, dora=True, seed=1),
            "batch1-r64-seed1": dict(R64, seed=1),
            # adapters started at each weight's principal singular directions (PiSSA), and the norm gains
            # trained beside the adapters (the residual stream's scale changes where blocks were cut)
            "batch1-r64-pissa": dict(R64, lora_init="pissa"),
            "batch1-r64-norms": dict(R64, lora_norms=True),
            # LoRA+: the B matrices (zero at the start) learn 4x faster than A
            "batch1-r64-loraplus4": dict(R64, loraplus_ratio=4.0),
            "batch1-r64-loraplus4-lr5e-4": dict(R64, loraplus_ratio=4.0, learning_rate=5e-4),
            # rank 128 with half batch1-r128's scale (alpha = rank): the rank without the larger steps
            "batch1-r128-a128": R128,
            "batch1-r128-a128-lr7e-4": dict(R128, learning_rate=7e-4),
            "batch1-r128-a128-lr5e-4": dict(R128, learning_rate=5e-4),
            "batch1-r128-a128-lr7e-4-seed1": dict(R128, learning_rate=7e-4, seed=1),
            # the teacher and student softened at temperature 2 (the loss scaled by T^2, Hinton et al.)
            "batch1-r128-a128-lr7e-4-t2": dict(R128, learning_rate=7e-4, temperature=2.0),
            # a least-squares linear map at the cut folded into block 11's down projection first
            # (heal.bridge: linear, ReplaceMe), then the recipe's rank-64 distillation from there
            "batch1-r64-bridge": dict(R64, bridge="linear"),
            "batch1-r64-bridge-seed1": dict(R64, bridge="linear", seed=1),
            "batch1-r64-bridge-seed2": dict(R64, bridge="linear", seed=2),
            # the whole down projection of block 11 refitted by least squares instead of T (heal.bridge: down)
            "batch1-r64-bridgedown": dict(R64, bridge="down"),
            "batch1-r64-bridgedown-seed1": dict(R64, bridge="down", seed=1),
            "batch1-r64-bridgedown-seed2": dict(R64, bridge="down", seed=2),
            "batch1-r64-bridgedown-lm0.2": dict(R64, bridge="down", lm_weight=0.2),
            "batch1-r64-bridgedown-lm0.3": dict(R64, bridge="down", lm_weight=0.3),
            "batch1-r64-bridgedown-lm0.4": dict(R64, bridge="down", lm_weight=0.4),
            "batch1-r64-bridgedown-lm0.4-seed1": dict(R64, bridge="down", lm_weight=0.4, seed=1),
            "batch1-r64-bridgedown-lm0.5": dict(R64, bridge="down", lm_weight=0.5),
            "batch1-r64-bridgedown-lm0.5-seed1": dict(R64, bridge="down", lm_weight=0.5, seed=1),
            "batch1-r64-bridgedown-lm0.4-seed2": dict(R64, bridge="down", lm_weight=0.4, seed=2),
            "batch1-r64-bridgedown-lm0.5-seed2": dict(R64, bridge="down", lm_weight=0.5, seed=2),
            "batch1-r64-bridgedown-lm0.4-seed3": dict(R64, bridge="down", lm_weight=0.4, seed=3),
            "batch1-r64-bridgedown-lm0.4-seed4": dict(R64, bridge="down", lm_weight=0.4, seed=4),
            # after LoRA's init began following heal.seed (2026-12-04 18:20; before, it came from the
            # process's random state, probably the same for every seed here): two more seeds
            "batch1-r64-bridgedown-lm0.4-seed5": dict(R64, bridge="down", lm_weight=0.4, seed=5),
            "batch1-r64-bridgedown-lm0.4-seed6": dict(R64, bridge="down", lm_weight=0.4, seed=6),
            # the recipe's setting with its weights averaged over the last half of the steps (heal.average)
            **{f"batch1-r64-bridgedown-lm0.4-avg0.5-seed{s}": dict(R64, bridge="down", lm_weight=0.4, average=0.5, seed=s)
               for s in range(2, 7)},
            # ... and SWA's usual form: a constant rate, the weights averaged over the last half
            **{f"batch1-r64-bridgedown-lm0.4-const-avg0.5-seed{s}": dict(R64, bridge="down", lm_weight=0.4, schedule="constant",
                                                                          average=0.5, seed=s) for s in range(2, 7)},
            # more seeds of the recipe's setting, for soups of runs at half the budget (--part soup --seeds)
            **{f"batch1-r64-bridgedown-lm0.4-seed{s}": dict(R64, bridge="down", lm_weight=0.4, seed=s) for s in range(7, 15)},
            # the recipe's setting trained on text the original wrote (TEACHER_DATA, --part teacher_text) in place of C4
            **{f"batch1-r64-bridgedown-lm0.4-teachertext-seed{s}": dict(R64, bridge="down", lm_weight=0.4, data=TEACHER_DATA,
                                                                         seed=s) for s in range(0, 7)},
            **{f"batch1-r64-bridgedown-lm0.4-teachermix-seed{s}": dict(R64, bridge="down", lm_weight=0.4, data=TEACHER_MIX_DATA,
                                                                        seed=s) for s in range(0, 7)},
            # the recipe's setting with the bridge's tokens weighted by 1 / rms (heal.bridge_weight: rms; the
            # variants above fitted it uniformly)
            **{f"batch1-r64-bridgedown-lm0.4-rms-seed{s}": dict(R64, bridge="down", bridge_weight="rms", lm_weight=0.4,
                                                                 seed=s) for s in range(0, 7)},
            # the recipe's setting (bridge fitted uniformly) with the hidden-state error at every kept block, relative
            # to the original state's size per token (heal.hidden_loss: relative; its mean over the kept blocks starts
            # near 0.10 against a KL of 0.76 on the un-healed model, --part hidden_scale's windows)
            **{f"batch1-r64-bridgedown-lm0.4-hrel2-seed{s}": dict(R64, bridge="down", lm_weight=0.4, hidden_weight=2.0,
                                                                   hidden_loss="relative", seed=s) for s in range(0, 7)},
            # the recipe's setting with the bridge's token weights chosen per cut by the held-out KL (heal.bridge_weight:
            # auto: uniform, skip_first or rms)
            **{f"batch1-r64-bridgedown-lm0.4-auto-seed{s}": dict(R64, bridge="down", bridge_weight="auto", lm_weight=0.4,
                                                                  seed=s) for s in range(0, 7)},
            # ... and with each window's first token left out of the bridge's fit (heal.bridge_weight: skip_first)
            **{f"batch1-r64-bridgedown-lm0.4-skipfirst-seed{s}": dict(R64, bridge="down", bridge_weight="skip_first",
                                                                       lm_weight=0.4, seed=s) for s in range(0, 7)},
            # with the next-token loss on the C4 text beside the KL (for the perplexity goal)
            "batch1-r64-bridge-lm0.2": dict(R64, bridge="linear", lm_weight=0.2),
            # full fine-tuning of every kept block (``--only distill-partial``: partial with all 23 blocks
            # + the final norm) at one window per step: every weight moves, not a low-rank update
            **{f"batch1-full-lr{lr}": dict(batch_size=1, last_blocks=30 - K, learning_rate=float(lr))
               for lr in ("3e-5", "1e-4", "2e-4", "4e-4")}}
FIDELITY_WINDOWS = 16  # the first 16 of the WikiText-2 perplexity windows (16 x 512 = 8,192 tokens)


def distill_cases(budgets=DISTILL_BUDGETS) -> list[tuple[str, str, int]]:
    """(objective, params, tokens), cheapest budgets first so the small ones finish first."""
    return [(o, m, t) for t in budgets for m in DISTILL_PARAMS for o in ("distill", "lm")]


def case_name(objective: str, params: str, tokens: int, variant: str | None = None) -> str:
    return f"d-{objective}-{params}-{tokens // 1024}k" + (f"+{variant}" if variant else "")


def seed_variant(setting: str, seed: int) -> str:
    """The variant name of ``setting``'s run with ``seed``: ``SETTING-seedN``, except seed 0 of a setting whose
    seed-0 run carries no suffix (the recipe's own, ``...lm0.4``; the seed tables looked for ``-seed0`` and lost it)."""
    name = f"{setting}-seed{seed}"
    return name if seed or name in VARIANTS else setting


def parse_case_name(name: str) -> tuple[str, str, int, str | None] | None:
    """``(objective, params, tokens, variant)``: the inverse of :func:`case_name` (None for other names)."""
    m = re.fullmatch(r"d-(\w+)-(\w+)-(\d+)k(?:\+(.+))?", name)
    return (m[1], m[2], int(m[3]) * 1024, m[4]) if m else None


_DENSE_LP: list[torch.Tensor] = []


def fidelity_to(model, dense, tok, batch: int = 2) -> dict:
    """One pass over the first FIDELITY_WINDOWS WikiText-2 evaluation windows: perplexity, the mean
    per-token KL(dense || model) at T = 1 over the full vocabulary (and per window), and the top-1 agreement with
    the dense model (whose log-probs, 16 x 512 x 49,152 float32 = 1.6 GB, are computed once per process)."""
    windows = eval_windows(tok)[:FIDELITY_WINDOWS]
    with torch.no_grad():
        if not _DENSE_LP:
            _DENSE_LP.extend(torch.log_softmax(dense(windows[i:i + batch], use_cache=False).logits.float(), -1)
                             for i in range(0, len(windows), batch))
        kl = nll = 0.0
        agree = tokens = predicted = 0
        per_window = []
        for i, lp_t in zip(range(0, len(windows), batch), _DENSE_LP):
            ids = windows[i:i + batch]
            lp_s = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
            terms = lp_t.exp() * (lp_t - lp_s)
            kl += float(terms.sum())
            per_window += terms.sum(-1).mean(-1).tolist()
            del terms
            agree += int((lp_s.argmax(-1) == lp_t.argmax(-1)).sum())
            tokens += ids.numel()
            nll -= float(lp_s[:, :-1].gather(-1, ids[:, 1:, None]).sum())
            predicted += ids[:, 1:].numel()
            del lp_s
    return {"kl": kl / tokens, "top1": agree / tokens, "perplexity": math.exp(nll / predicted), "tokens": tokens,
            "kl_windows": per_window}


def distill_settings(objective: str, params: str, tokens: int, variant: str | None = None) -> dict:
    """``heal_model`` settings of a case: the params' method, the objective (with DISTILL_SETTINGS),
    the variant's changes, and the budget as one epoch of ``tokens // seq_len`` windows."""
    settings = {**DISTILL_PARAMS[params], "objective": objective}
    if objective == "distill":
        settings.update(DISTILL_SETTINGS)
    settings.update(VARIANTS.get(variant, {}))
    if settings.get("bridge", "none") != "none":
        settings.setdefault("bridge_weight", "uniform")  # every bridge variant before the rms weights (2026-12-05)
    n = settings["n_samples"] = tokens // settings["seq_len"]  # the budget in windows of the case's length
    settings["steps"] = max(1, n // settings["batch_size"])  # one epoch of the budget's windows
    return settings


def part_distill(budgets=DISTILL_BUDGETS, only: str | None = None, variant: str | None = None, keep: bool = False) -> None:
    base, tok = load_dense()
    run = removed_blocks(base, tok)
    kept = complement(30, run)
    if not cached("fidelity-dense"):
        store("fidelity-dense", {"case": "dense", "fidelity": fidelity_to(base, base, tok)})
    if not cached("fidelity-pruned"):
        model = copy.deepcopy(base)
        prune.remove_layers(model, run)
        t = time.time()
        store("fidelity-pruned", {"case": "pruned", "fidelity": fidelity_to(model, base, tok),
                                  "seconds": round(time.time() - t, 1)})
        del model
    log(f"pruned: {cached('fidelity-pruned')['fidelity']}")
    for objective, params, tokens in distill_cases(budgets):
        name = case_name(objective, params, tokens, variant)
        if variant and objective != "distill" and set(VARIANTS[variant]) & set(DISTILL_SETTINGS):
            continue  # a distillation-only setting
        if only and only not in name:
            continue
        settings = distill_settings(objective, params, tokens, variant)
        if cached(name):
            if changed := changed_settings(name, settings):
                raise SystemExit(f"{CACHE / name}.json was healed with other settings ({'; '.join(changed)}): give the "
                                 f"case a new variant name, or delete it and {CACHE / 'models' / name} to heal it again")
            log(f"{name}: cached")
            continue
        model = copy.deepcopy(base)
        prune.remove_layers(model, run)
        log(f"healing {name}: {settings}")
        rec = heal_model(model, tok, teacher_model=base, kept=kept, quiet=True, **settings)
        result = {"case": name, "objective": objective, "params": params, "tokens": rec["tokens_seen"],
                  "fidelity": fidelity_to(model, base, tok), "healing": rec,
                  "layers": model.config.num_hidden_layers, "params_count": prune.count_parameters(model)}
        if not variant or tokens >= 131_072 or keep:  # kept for the paired lm-eval (variant screens: the largest budget, or --keep)
            prune.save(model, tok, CACHE / "models" / name, pruning={"removed": run, "healing": rec}, overwrite=True)
        store(name, result)
        log(f"{name}: ppl {result['fidelity']['perplexity']:.2f}, KL {result['fidelity']['kl']:.4f}, "
            f"top-1 {result['fidelity']['top1']:.3f} ({rec['seconds']:.0f} s of healing)")
        del model


def part_distill_lmeval() -> None:
    """The four multiple-choice tasks of the 33k-token distill / next-token cases (checkpoints from --part distill)."""
    from prune.measure.lmeval import evaluate_tasks

    for objective, params, tokens in distill_cases([32_768]):
        name = case_name(objective, params, tokens)
        if cached(f"{name}.lmeval") or not (CACHE / "models" / name).is_dir():
            continue
        model, tok, _ = prune.load(CACHE / "models" / name, dtype="float32")
        log(f"lm-eval {name}")
        t = time.time()
        res = evaluate_tasks(model, tok, TASKS, limit=LIMIT, batch_size=16, seed=0, data_dir_path=DATA, progress=False)
        store(f"{name}.lmeval", {"case": name, "tasks": res, "seconds": round(time.time() - t, 1)})


# ---- part: distill_paired (lm-eval's own files, paired against the dense and the un-healed model) -----------
#: the dense and the un-healed (blocks 12-18) models' lm-eval files under the same protocol, written by
#: scripts/bench_fidelity.py --part paired [--limit N] (dense, contiguous angular at k = 7); run here when missing
BASELINES = {"dense": [], "pruned": list(range(12, 19))}


def lmeval_folder(name: str, limit: int = LIMIT) -> Path:
    """Where case ``name``'s lm-eval files are, with ``limit`` questions per task (more than LIMIT: every
    question of the tasks that have fewer): a baseline's are bench_fidelity's where it wrote them, else
    ``lmeval`` (LIMIT) or ``lmeval-n<limit>`` here."""
    if name in BASELINES:
        key = "-".join(map(str, BASELINES[name])) or "dense"
        shared = ROOT / "bench_cache" / "fidelity" / ("lmeval_k7" if limit == LIMIT else f"lmeval_k7_n{limit}") / key
        if has_samples(shared):
            return shared
    return CACHE / ("lmeval" if limit == LIMIT else f"lmeval-n{limit}") / name


def has_samples(folder: Path) -> bool:
    """Whether ``folder`` holds lm-eval samples; samples older than the checkpoint they evaluated (a case
    healed again since, under its name) are refused, not paired with the new case's fidelity."""
    samples = list(folder.glob("samples_*.jsonl"))
    checkpoint = CACHE / "models" / folder.name / "config.json"
    if samples and checkpoint.is_file() and min(f.stat().st_mtime for f in samples) < checkpoint.stat().st_mtime:
        raise SystemExit(f"{folder}'s lm-eval samples predate {checkpoint.parent} (healed again since): "
                         "delete the folder to evaluate the new checkpoint")
    return bool(samples)


def evaluated(name: str, folder_of: Callable[[str], Path] = lmeval_folder) -> bool:
    """Whether case ``name`` has its lm-eval samples (the paired comparisons need them): the four
    tasks', or with ``folder_of=lastword_folder`` the last word's."""
    return has_samples(folder_of(name))


def paired_cases() -> list[str]:
    """The saved distill / next-token checkpoints (LoRA, partial; variants after their case),
    largest budget first."""
    budgets = set(DISTILL_BUDGETS) | {parsed[2] for p in (CACHE / "models").glob("d-*")
                                      if (parsed := parse_case_name(p.name))}  # --budgets beyond the three
    names = [case_name(o, m, t, v) for t in sorted(budgets, reverse=True) for m in DISTILL_PARAMS
             for o in ("distill", "lm") for v in (None, *VARIANTS)]
    return [n for n in names if (CACHE / "models" / n / "config.json").is_file()]


def case_model(name: str, dense: list):
    """``(model, tokenizer)`` of case ``name``: a baseline cut from the dense model (loaded into ``dense``
    on first use, so a loop over cases loads it once), else the saved checkpoint."""
    if name not in BASELINES:
        model, tok, _ = prune.load(CACHE / "models" / name, dtype="float32")
        return model, tok
    if not dense:
        dense.extend(load_dense())
    model = copy.deepcopy(dense[0])
    if BASELINES[name]:
        prune.remove_layers(model, BASELINES[name])
    return model, dense[1]


def part_distill_paired(only: str | None = None, limit: int = LIMIT) -> None:
    """lm-eval (four tasks, ``limit`` questions each, samples kept) of the baselines and every saved case
    (``only``: the cases whose name contains it, or one of its comma-separated parts)."""
    from prune.measure.lmeval import run_lm_eval

    dense: list = []
    for name in [*BASELINES, *paired_cases()]:
        folder = lmeval_folder(name, limit)
        if has_samples(folder) or (only and not any(o in name for o in only.split(","))):
            continue
        model, tok = case_model(name, dense)
        log(f"lm-eval (samples) {name}")
        t = time.time()
        run = run_lm_eval(model, tok, TASKS, limit=limit, batch_size=16, seed=0, data_dir_path=DATA, progress=False)
        run.write(folder, f"SmolLM2-135M-Instruct {name}")
        log(f"lm-eval {name}: {({k: r['metrics'] for k, r in run.summary.items()})} ({time.time() - t:.0f} s)")
        del model


def part_distill_paired_report(block: str = "bench_heal_paired") -> None:
    """Paired tables of every evaluated case against the dense and the un-healed model, into ``block``
    of the docs (only cases whose lm-eval samples are on this machine)."""
    from prune.measure.paired import average_line, compare_folders, headline_rows, paired_markdown

    have = [n for n in [*BASELINES, *paired_cases()] if evaluated(n)]
    if "dense" not in have or len(have) < 2:
        raise SystemExit("run --part distill_paired first")
    lines = []
    for name in [n for n in have if n != "dense"]:
        for ref in [r for r in ("dense", "pruned") if r in have and r != name]:
            head = headline_rows(compare_folders(lmeval_folder(ref), lmeval_folder(name)))
            lines += [f"**{name}** against **{ref}** (acc; hellaswag acc_norm). {average_line(head, ref, name)}.", "",
                      paired_markdown(head, ref, name), ""]
    for tokens, params in [(t, m) for t in sorted(DISTILL_BUDGETS, reverse=True) for m in DISTILL_PARAMS]:
        a, b = case_name("lm", params, tokens), case_name("distill", params, tokens)  # the two objectives, same budget
        if a in have and b in have:
            head = headline_rows(compare_folders(lmeval_folder(a), lmeval_folder(b)))
            lines += [f"**{b}** against **{a}** (the two objectives, same budget). {average_line(head, a, b)}.", "",
                      paired_markdown(head, a, b), ""]
    publish(lines, block)


def part_distill_matrix(block: str = "bench_heal_matrix", goals: bool = False) -> None:
    """One row per healed case on this machine: fidelity (ppl, KL share, top-1) beside the paired
    multiple-choice comparison against the dense and the un-healed model (average of the four
    tasks' headline metrics, paired SE, 95% interval), into ``block`` of the docs; with ``goals``
    the issue's goals table after it (:func:`variant_goals`)."""
    pr, dense = cached("fidelity-pruned"), cached("fidelity-dense")
    have = [n for n in [*BASELINES, *paired_cases()] if evaluated(n)]
    if not pr or not dense or "dense" not in have:
        raise SystemExit("run --part distill and --part distill_paired first")

    def average(ref: str, name: str):
        """The paired four-task average of ``name`` against ``ref`` (None where ``ref`` has no lm-eval)."""
        return None if ref not in have or ref == name else paired_average(ref, name)

    def cells(avg) -> tuple[str, str]:
        """``(difference cell, retained cell)``."""
        if avg is None:
            return "-", "-"
        return marked(avg), f"{100 * avg.retained:.1f}%"

    to_dense = {name: average("dense", name) for name in have if name != "dense"}  # one comparison per case
    d_ppl = dense["fidelity"]["perplexity"]
    diff, kept = cells(to_dense.get("pruned"))
    lines = ["| case | objective | params | training tokens | healing time | ppl x dense | KL / pruned's | top-1 agreement | "
             "MC retained | MC vs dense (points, 95% CI) | MC vs un-healed |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
             f"| pruned (blocks 12-18) | - | - | 0 | - | x{pr['fidelity']['perplexity'] / d_ppl:.2f} | 100% | "
             f"{pr['fidelity']['top1']:.1%} | {kept} | {diff} | - |"]
    for name in sorted(paired_cases(), key=lambda n: (cached(n) or {}).get("tokens", 0)):
        r = cached(name)
        if not r or name not in have:
            continue
        f, h = r["fidelity"], r["healing"]
        diff, kept = cells(to_dense[name])
        lines.append(f"| {name} | {r['objective']} | {r['params']} | {h['tokens_seen']:,} | {h['seconds'] / 60:.1f} min | "
                     f"x{f['perplexity'] / d_ppl:.2f} | {100 * f['kl'] / pr['fidelity']['kl']:.1f}% | {f['top1']:.1%} | "
                     f"{kept} | {diff} | {cells(average('pruned', name))[0]} |")
    lines += ["", "MC: ARC-Easy, PIQA, HellaSwag (acc_norm), WinoGrande, 0-shot, 500 questions each, the same questions "
              "for every model; the average of the four per-task paired differences, its SE from the per-task "
              "paired SEs, * where the 95% interval excludes 0 (`prune.measure.paired.task_average`)."]
    if goals:
        lines += ["", *variant_goals(to_dense, d_ppl, pr["fidelity"]["kl"])]
    publish(lines, block)


GOAL_TOKENS = 131_072  # the issue's budget: every goal at <= this many training tokens
MC_GOAL = 0.98  # issue 16: multiple-choice accuracy retained, with the paired difference to dense not significant
PPL_GOAL = 1.5  # issue 16: perplexity at most this many times the dense model's
KL_GOAL = 0.5  # issue 16: KL to the dense model at most this share of the un-healed model's


def interval(avg) -> str:
    """A paired average's (or one task row's) difference and 95% interval, in points."""
    return f"{100 * avg.diff:+.2f} [{100 * avg.ci_low:+.2f}, {100 * avg.ci_high:+.2f}]"


def significant(avg) -> bool:
    return avg.ci_high < 0 or avg.ci_low > 0


def marked(avg) -> str:
    """:func:`interval`, with `` *`` where the 95% interval excludes 0."""
    return interval(avg) + (" *" if significant(avg) else "")


def mc_met(avg) -> bool:
    """Issue 16's multiple-choice goal: at least MC_GOAL retained, the paired difference not significant."""
    return avg.retained >= MC_GOAL and not significant(avg)


def recorded_variant_rows() -> dict[str, tuple[float, float]]:
    """``{case: (ppl / dense, KL / pruned's)}`` from the ``bench_heal_variants`` table of
    docs/BENCHMARKS.md (budgets whose cache is not on this machine still count for a trend)."""
    return {c[0]: (float(c[6][1:]), float(c[7].rstrip("%")) / 100) for c in docs_table_rows("bench_heal_variants")
            if len(c) == 9 and c[0].startswith("d-") and c[6].startswith("x")}


def series_key(parsed: tuple[str, str, int, str | None]) -> str:
    """The settings series of a parsed case name: its variant (LoRA) or variant and params (partial)."""
    variant = parsed[3] or "(plain)"
    return variant if parsed[1] == "lora" else f"{variant} ({parsed[1]})"


def variant_goals(to_dense: dict, d_ppl: float, pruned_kl: float) -> list[str]:
    """The issue's three goals for every distillation case on this machine (LoRA or partial), met or not (MC where its paired
    lm-eval ran), with the KL on the healing's own held-out C4 windows; and for each settings series
    with two or more budgets where each goal is reached (:func:`goal_budget`)."""
    lines = [f"Goals at <= {GOAL_TOKENS:,} training tokens (ppl <= 1.5x dense, KL <= 50% of the un-healed model's, "
             "MC >= 98% retained with the paired difference to dense not significant):", "",
             "| case | training tokens | trained parameters | healing time | KL on held-out C4 (of un-healed) | top-1 agreement | "
             "ppl <= 1.5x | KL <= 50% | MC >= 98%, not significant |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    series: dict[str, dict[int, tuple[float, float]]] = {}
    saved = paired_cases()
    screens = [p.stem for p in CACHE.glob("d-*.json") if parse_case_name(p.stem) and p.stem not in saved]
    # the saved cases, then the variants' smaller-budget screens (no checkpoint kept): largest budget first
    for name in sorted(saved + sorted(screens), key=lambda n: -parse_case_name(n)[2]):
        parsed, r = parse_case_name(name), cached(name)
        if not r or parsed[0] != "distill":
            continue
        tokens, f, c4 = r["healing"]["tokens_seen"], r["fidelity"], r["healing"]["distill"]
        ratio, share = f["perplexity"] / d_ppl, f["kl"] / pruned_kl
        series.setdefault(series_key(parsed), {})[tokens] = (ratio, share)
        avg = to_dense.get(name)
        mc = "not measured" if avg is None else (
            f"{'met' if mc_met(avg) else 'not met'} "
            f"({100 * avg.retained:.3f}%, {interval(avg)})")  # 3 decimals: 97.999% is not 98%
        beyond = " (beyond the budget)" if tokens > GOAL_TOKENS else ""
        lines.append(f"| {name}{beyond} | {tokens:,} | {r['healing']['trainable_parameters'] / 1e6:.1f}M | "
                     f"{r['healing']['seconds'] / 60:.1f} min | {c4['kl_after']:.4f} ({100 * c4['kl_after'] / c4['kl_before']:.1f}% "
                     f"of {c4['kl_before']:.4f}) | {100 * f['top1']:.1f}% | {'met' if ratio <= PPL_GOAL else 'not met'} (x{ratio:.3f}) | "
                     f"{'met' if share <= KL_GOAL else 'not met'} ({100 * share:.1f}%) | {mc} |")
    for case, value in recorded_variant_rows().items():  # the 32k screen of the same settings
        parsed = parse_case_name(case)
        if parsed and parsed[0] == "distill" and series_key(parsed) in series:
            series[series_key(parsed)].setdefault(parsed[2], value)
    trend = []
    for variant, points in series.items():
        if len(points) < 2:
            continue
        budgets = sorted(points)
        for label, goal, idx in ((f"ppl <= {PPL_GOAL}x", PPL_GOAL, 0), (f"KL <= {KL_GOAL:.0%}", KL_GOAL, 1)):
            pts = [(t, points[t][idx]) for t in budgets]
            met = [i for i, (_, y) in enumerate(pts) if y <= goal]
            cross = (f"; ~{extrapolate(pts[met[0] - 1:met[0] + 1], goal):,.0f} interpolated from {pts[met[0] - 1][0]:,}"
                     if met and met[0] else "")  # where the line from the budget before crosses
            trend.append(f"- {variant} ({', '.join(f'{t:,}' for t in budgets)} tokens): {label} "
                         f"{goal_budget(pts, goal)}{cross}")
    if trend:
        lines += ["", "Where each goal is reached, measured or on a straight line in log2(training tokens) through "
                  "each setting's measured budgets (an extrapolation, not a measurement):", "", *trend]
    return lines


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}  # Student's t, 97.5%, by df (8: for more)


def t_interval(xs: list[float]) -> tuple[float, float]:
    """``(mean, half width)`` of the 95% Student-t interval of the mean of ``xs`` (half 0 for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, T975[min(len(xs) - 1, max(T975))] * (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def part_mc_curve(variant: str = "batch1-r64-bridgedown", block: str = "bench_heal_mc_curve") -> None:
    """Multiple choice against training tokens for one setting (the recipe's by default): every budget
    whose checkpoint has its paired lm-eval, beside the un-healed model; then the least-squares line of
    the retained share on log2(tokens) through the healed budgets, its slope per doubling with a 95%
    t-interval, and where that line would reach :data:`MC_GOAL` (an extrapolation, not a measurement)."""
    have = [n for n in [*BASELINES, *paired_cases()] if evaluated(n)]
    if "dense" not in have or "pruned" not in have:
        raise SystemExit("run --part distill_paired first (the dense and un-healed models' lm-eval)")
    d_ppl, pr = cached("fidelity-dense")["fidelity"]["perplexity"], cached("fidelity-pruned")["fidelity"]
    cases = sorted((parsed[2], n) for n in have if (parsed := parse_case_name(n))
                   and parsed[:2] == ("distill", "lora") and parsed[3] == variant)
    if not cases:
        raise SystemExit(f"no lm-evaluated distill-lora case of variant {variant}: run --part distill --variant {variant} "
                         "--keep, then --part distill_paired")
    base = paired_average("dense", "pruned")
    lines = ["| training tokens | healing time | ppl x dense | KL / un-healed's | MC retained | MC vs dense (points, 95% CI) "
             "| MC vs un-healed | goal: >= 98%, not significant |", "|---:|---:|---:|---:|---:|---|---|---|",
             f"| 0 (un-healed) | - | x{pr['perplexity'] / d_ppl:.2f} | 100% | {100 * base.retained:.2f}% | "
             f"{marked(base)} | - | not met |"]
    points = []
    for tokens, name in cases:
        r, avg, gain = cached(name), paired_average("dense", name), paired_average("pruned", name)
        f = r["fidelity"]
        met = mc_met(avg)
        beyond = " (beyond the budget)" if tokens > GOAL_TOKENS else ""
        lines.append(f"| {tokens:,}{beyond} | {r['healing']['seconds'] / 60:.1f} min | x{f['perplexity'] / d_ppl:.2f} | "
                     f"{100 * f['kl'] / pr['kl']:.1f}% | {100 * avg.retained:.2f}% | {marked(avg)} | {marked(gain)} | "
                     f"{'met' if met else 'not met'} |")
        points.append((tokens, avg.retained))
    lines += ["", f"Setting `{variant}` (the recipe's: rank-64 LoRA, one window per step, block 11's down projection "
              "refitted first, KL to the original), seed 0; MC: ARC-Easy, PIQA, HellaSwag (acc_norm), WinoGrande, "
              f"0-shot, {LIMIT} questions each, the same questions for every model; * where the 95% interval excludes 0."]
    if len(points) >= 3:
        mx, my, slope, se = log2_line([(t, 100 * y) for t, y in points])
        half = T975[min(len(points) - 2, max(T975))] * se
        at = 2 ** (mx + (100 * MC_GOAL - my) / slope) if slope > 0 else None
        lines += ["", f"Least-squares line of the retained share on log2(training tokens) through the {len(points)} healed "
                  f"budgets: **{slope:+.2f} points per doubling** (95% interval {slope - half:+.2f} to {slope + half:+.2f}, "
                  f"t with {len(points) - 2} degrees of freedom)"
                  + (f"; it would reach {100 * MC_GOAL:.0f}% near **{at:,.0f} tokens** (an extrapolation of a slope "
                     f"{'that the data cannot tell from zero' if slope - half <= 0 else 'that excludes zero'})."
                     if at else "; it does not rise, so no budget can be read from it.")]
    publish(lines, block)


def part_seeds(setting: str = "batch1-r64-bridgedown-lm0.4", block: str = "bench_heal_seeds") -> None:
    """One setting over its seeds at the issue's budget (the recipe's by default): every
    ``d-distill-lora-128k+SETTING[-seedN]`` case lm-evaluated here, with issue 16's three goals per
    seed, how many seeds meet each, and each figure's mean and range over the seeds."""
    have = [n for n in [*BASELINES, *paired_cases()] if evaluated(n)]
    if "dense" not in have:
        raise SystemExit("run --part distill_paired first (the dense model's lm-eval)")
    d_ppl, pr = cached("fidelity-dense")["fidelity"]["perplexity"], cached("fidelity-pruned")["fidelity"]
    rows = []
    for name in have:
        parsed = parse_case_name(name)
        if not parsed or parsed[:3] != ("distill", "lora", GOAL_TOKENS):
            continue
        seed = re.fullmatch(re.escape(setting) + r"(?:-seed(\d+))?", parsed[3] or "")
        if seed:
            case = cached(name)
            rows.append((int(seed.group(1) or 0), case["healing"]["seconds"], case["fidelity"]["perplexity"] / d_ppl,
                         case["fidelity"]["kl"] / pr["kl"], paired_average("dense", name)))
    if not rows:
        raise SystemExit(f"no lm-evaluated 128k case of {setting}: run --part distill --variant {setting}[-seedN], "
                         "then --part distill_paired")
    goals = [lambda r: r[2] <= PPL_GOAL, lambda r: r[3] <= KL_GOAL, lambda r: mc_met(r[4])]
    yes = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines = ["| seed | healing time | ppl x dense (<= 1.5) | KL / un-healed's (<= 50%) | MC retained (>= 98%) "
             "| MC vs dense (points, 95% CI) | goals met |", "|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: r[0]):
        met = [g(r) for g in goals]
        lines.append(f"| {r[0]} | {r[1] / 60:.1f} min | x{r[2]:.3f} ({yes(met[0])}) | {100 * r[3]:.1f}% ({yes(met[1])}) | "
                     f"{100 * r[4].retained:.2f}% ({yes(met[2])}) | {marked(r[4])} | "
                     f"{'all three' if all(met) else f'{sum(met)} of 3'} |")
    n = len(rows)
    spread = lambda xs, fmt: f"mean {fmt(sum(xs) / n)}, {fmt(min(xs))}-{fmt(max(xs))}"  # noqa: E731
    counts = [sum(g(r) for r in rows) for g in goals]
    lines += ["", f"Setting `{setting}`, {GOAL_TOKENS:,} training tokens, {n} seeds lm-evaluated here: perplexity goal met by "
              f"{counts[0]} of {n} ({spread([r[2] for r in rows], lambda v: f'x{v:.3f}')}), KL goal by {counts[1]} of {n} "
              f"({spread([100 * r[3] for r in rows], lambda v: f'{v:.1f}%')}), multiple-choice goal by {counts[2]} of {n} "
              f"({spread([100 * r[4].retained for r in rows], lambda v: f'{v:.2f}%')}); all three by "
              f"{sum(all(g(r) for g in goals) for r in rows)} of {n}. MC: ARC-Easy, PIQA, HellaSwag (acc_norm), WinoGrande, "
              f"0-shot, {LIMIT} questions each, the same for every model; * where the 95% interval excludes 0."]
    publish(lines, block)


def part_questions(setting: str = "batch1-r64-bridgedown-lm0.4", limit: int = 2400,
                   block: str = "bench_heal_questions") -> None:
    """Issue 16's multiple-choice goal on more questions: every seed of ``setting`` at the issue's budget
    lm-evaluated with ``limit`` questions per task (``--part distill_paired --limit``) beside its figures
    on LIMIT, each paired against the dense model on the same questions, per task and on average; then
    the seeds pooled per question (``compare_folders`` with several B: the recipe's expected
    model, with an interval that counts the questions' sampling, which every seed shares)."""
    from prune.measure.paired import compare_folders, headline_rows, task_average

    ref = lmeval_folder("dense", limit)
    if not has_samples(ref):
        raise SystemExit(f"run --part distill_paired --limit {limit} --only dense first")
    seeds = [(seed, name) for seed in range(0, 15)  # VARIANTS' seed families run 0-14
             if has_samples(lmeval_folder(name := case_name("distill", "lora", GOAL_TOKENS, seed_variant(setting, seed)), limit))]
    if not seeds:
        raise SystemExit(f"no seed of {setting} evaluated on {limit} questions per task: run --part distill_paired --limit {limit}")
    cells = lambda avg: f"{100 * avg.retained:.2f}% | {marked(avg)}"  # noqa: E731
    by_task = lambda rows: {r.task.removesuffix("_local"): r for r in rows}  # noqa: E731
    heads = {}
    lines = [f"| model | MC retained, {LIMIT} per task | vs dense ({LIMIT}) | MC retained, up to {limit} per task | "
             f"vs dense (up to {limit}, points, 95% CI) | ARC-Easy | PIQA | HellaSwag | WinoGrande | MC goal (up to {limit}) |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for label, name in [("un-healed", "pruned"), *((f"seed {s}", n) for s, n in seeds)]:
        if not has_samples(lmeval_folder(name, limit)):
            continue
        head = headline_rows(compare_folders(ref, lmeval_folder(name, limit)))
        heads[name] = head
        big = task_average(head)
        small_rows = headline_rows(compare_folders(lmeval_folder("dense"), lmeval_folder(name))) if evaluated(name) else []
        small = cells(task_average(small_rows)) if small_rows else "- | -"
        tasks, small_tasks = by_task(head), by_task(small_rows)
        per_task = " | ".join(f"{100 * tasks[t].diff:+.2f}" + (f" ({100 * small_tasks[t].diff:+.2f})" if t in small_tasks else "")
                              for t in TASKS)
        lines.append(f"| {label} | {small} | {cells(big)} | {per_task} | {'met' if mc_met(big) else 'not met'} |")
    names = [n for _, n in seeds]

    def pooled(ref_name: str, n: int):
        """The seeds pooled per question against ``ref_name``, with ``n`` questions per task: headline rows."""
        return headline_rows(compare_folders(lmeval_folder(ref_name, n), [lmeval_folder(name, n) for name in names]))

    def per_task(rows) -> str:
        return ", ".join(f"{r.task.removesuffix('_local')} {marked(r)}" for r in rows)

    to_dense = pooled("dense", limit)
    avg = task_average(to_dense)
    n_questions = ", ".join(f"{r.task.removesuffix('_local')} {r.n:,}" for r in next(iter(heads.values())))
    lines += ["", f"Seeds {', '.join(str(s) for s, _ in seeds)} pooled per question (each question's score the mean over "
              f"the seeds): **{100 * avg.retained:.2f}%** of the dense model's accuracy retained, {marked(avg)} points "
              f"against it (MC goal: {'met' if mc_met(avg) else 'not met'}); per task {per_task(to_dense)}."]
    if "pruned" in heads:  # what healing won back: the pooled seeds against the un-healed model, same questions
        gain = pooled("pruned", limit)
        lines[-1] += f" Against the un-healed model: {marked(task_average(gain))} points; per task {per_task(gain)}."
    if all(evaluated(n) for n in names):
        small = task_average(pooled("dense", LIMIT))
        lines[-1] += f" The same seeds on {LIMIT} questions per task: {100 * small.retained:.2f}%, {marked(small)}"
        if evaluated("pruned"):
            lines[-1] += f"; against the un-healed model {marked(task_average(pooled('pruned', LIMIT)))}"
        lines[-1] += "."
    lines += ["", f"Setting `{setting}` (the recipe's), {GOAL_TOKENS:,} training tokens. Questions: {n_questions} "
              f"(every question of the tasks with fewer than {limit}, the first {limit} of the others), 0-shot, the same "
              f"for every model; the per-task columns are the difference to dense in points on up to {limit} questions "
              f"(in brackets on {LIMIT}; HellaSwag: acc_norm); "
              "* where the 95% interval excludes 0; MC goal: >= 98% retained and the difference not significant."]
    publish(lines, block)


def mc_cells(name: str) -> tuple[str, str] | None:
    """``(retained share, difference to dense with its 95% interval)`` of case ``name``, paired on
    the same questions; None where it has no lm-eval samples."""
    if not evaluated(name):
        return None
    avg = paired_average("dense", name)
    return f"{100 * avg.retained:.2f}%", marked(avg)


def part_soup(setting: str = "batch1-r64-bridgedown-lm0.4", seeds: tuple[int, ...] = (2, 3, 4, 5, 6),
              tokens: int = GOAL_TOKENS) -> None:
    """The uniform average of the weights of one setting's healed seeds at ``tokens`` (a "model soup";
    every seed starts from the same cut model, so their weights are comparable), its fidelity and
    paired multiple choice beside the seeds' own. Its training tokens are the members' together:
    five seeds at 131k are a diagnostic (can averaging buy multiple choice at all?), two at 64k a
    run within the 131k budget."""
    members = [case_name("distill", "lora", tokens, seed_variant(setting, s)) for s in seeds]
    missing = [m for m in members if not (CACHE / "models" / m / "config.json").is_file()]
    if missing:
        raise SystemExit(f"no checkpoint of {', '.join(missing)}: run --part distill --variant ... --keep first")
    name = f"soup-{tokens // 1024}k-{setting}-seeds{'-'.join(map(str, seeds))}"
    model = None
    if not cached(name):
        base, tok = load_dense()
        model, _, _ = prune.load(CACHE / "models" / members[0], dtype="float32")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for m in members[1:]:
            other, _, _ = prune.load(CACHE / "models" / m, dtype="float32")
            for k, v in other.state_dict().items():
                state[k] += v
            del other
        model.load_state_dict({k: v / len(members) for k, v in state.items()})
        store(name, {"case": name, "members": members, "tokens": sum(cached(m)["tokens"] for m in members),
                     "fidelity": fidelity_to(model, base, tok)})
        prune.save(model, tok, CACHE / "models" / name, pruning={"removed": removed_blocks(base, tok), "soup": members},
                   overwrite=True)
        del base
    if not evaluated(name):
        from prune.measure.lmeval import run_lm_eval

        if model is None:
            model, tok, _ = prune.load(CACHE / "models" / name, dtype="float32")
        log(f"lm-eval (samples) {name}")
        run_lm_eval(model, tok, TASKS, limit=LIMIT, batch_size=16, seed=0, data_dir_path=DATA,
                    progress=False).write(lmeval_folder(name), f"SmolLM2-135M-Instruct {name}")
    d_ppl, pr = cached("fidelity-dense")["fidelity"]["perplexity"], cached("fidelity-pruned")["fidelity"]
    for n in [*members, name]:
        f, mc = cached(n)["fidelity"], mc_cells(n)
        print(f"{n}: ppl x{f['perplexity'] / d_ppl:.3f}, KL {100 * f['kl'] / pr['kl']:.1f}% of the un-healed model's, "
              f"top-1 {f['top1']:.1%}, " + (f"MC {mc[0]} retained, vs dense {mc[1]}" if mc else "MC not measured"))
    for m in filter(evaluated, members):
        avg = paired_average(m, name)
        print(f"soup against {m}: {marked(avg)}")


def averaging(case: dict) -> str:
    """How a cached case's weights were averaged: a soup of runs, the last steps of one run, or not."""
    if len(case.get("members", [])) > 1:
        return "the runs' final weights (soup)"
    h = case["healing"]
    if not h.get("averaged_steps"):
        return "no"
    return f"last {h['averaged_steps']} of {h['steps']} steps" + (" (constant rate)" if h["settings"]["schedule"] == "constant" else "")


def part_averages(setting: str = "batch1-r64-bridgedown-lm0.4", block: str = "bench_heal_averages") -> None:
    """Weight averaging against single runs of one setting (the recipe's by default): every single
    run of it on this machine (any budget, any seed), every ``-avg*`` run (``heal.average``) and every
    soup of its seeds (``--part soup``), each with fidelity and, where lm-evaluated, paired multiple choice."""
    d_ppl, pr = cached("fidelity-dense")["fidelity"]["perplexity"], cached("fidelity-pruned")["fidelity"]
    names = [p.stem for p in CACHE.glob("d-distill-lora-*.json")
             if re.fullmatch(r"d-distill-lora-\d+k\+" + re.escape(setting) + r"(?:-const)?(?:-avg[\d.]+)?-seed\d+", p.stem)]
    soups = [p.stem for p in CACHE.glob(f"soup-*-{setting}-seeds*.json")]
    if not soups and not any("-avg" in n for n in names):
        raise SystemExit(f"no soup or averaged run of {setting}: run --part soup or --variant {setting}-avg0.5-seedN first")
    lines = ["| model | runs | training tokens (all runs) | weights averaged | ppl x dense | KL / un-healed's | top-1 agreement "
             "| MC retained | MC vs dense (points, 95% CI) |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    cases = {n: cached(n) for n in names + soups}
    order = lambda n: (cases[n]["tokens"], n.startswith("soup"), "-avg" in n, int(re.search(r"seeds?(\d+)", n)[1]))  # noqa: E731
    for n in sorted(cases, key=order):
        case, f = cases[n], cases[n]["fidelity"]
        runs = len(case.get("members", [n]))
        how = averaging(case)
        mc = mc_cells(n) or ("-", "-")
        lines.append(f"| {n} | {runs} | {case['tokens']:,} | {how} | x{f['perplexity'] / d_ppl:.3f} | {100 * f['kl'] / pr['kl']:.1f}% | "
                     f"{f['top1']:.1%} | {mc[0]} | {mc[1]} |")
    lines += ["", f"Setting `{setting}` (the recipe's), block 12-18 removed; fidelity on the 16 WikiText-2 windows; MC: ARC-Easy, "
              f"PIQA, HellaSwag (acc_norm), WinoGrande, 0-shot, {LIMIT} questions each, the same for every model; "
              "* where the 95% interval excludes 0. A soup's training tokens are its runs' together."]
    publish(lines, block)


def seed_table(setting: str, variants: dict[str, str], column: str, ref: str, only_varied: bool = False,
               heldout: bool = False) -> list[str]:
    """Markdown rows of ``setting`` at the issue's budget and its variants (``variants``: case-name suffix ->
    label; ``""`` the setting itself), seed by seed: fidelity, paired multiple choice against the original and
    against the setting's run of the same seed, the exact last word likewise. ``only_varied``: only the seeds
    with a variant; ``heldout``: a column with the healing's own held-out C4 KL after it."""
    from prune.measure.paired import compare_folders, headline_rows, load_samples, per_example

    d_ppl, pr = cached("fidelity-dense")["fidelity"]["perplexity"], cached("fidelity-pruned")["fidelity"]
    rows = []
    for suffix in variants:
        for p in CACHE.glob(case_name("distill", "lora", GOAL_TOKENS, f"{setting}{suffix}-seed*") + ".json"):
            if re.fullmatch(re.escape(f"{setting}{suffix}") + r"-seed\d+", parse_case_name(p.stem)[3]):
                rows.append((suffix, int(p.stem.rsplit("seed", 1)[1]), p.stem))
    if only_varied:
        rows = [r for r in rows if r[0] or any(o[0] and o[1] == r[1] for o in rows)]
    lines = [f"| {column} | seed | healing time | ppl x dense | KL / un-healed's | top-1 agreement | "
             + ("held-out C4 KL | " if heldout else "") + f"MC retained | MC vs dense (points, 95% CI) | MC vs {ref} of "
             f"the seed | last word | last word vs {ref} |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if heldout else "") + "---:|---|---|---:|---|"]
    for suffix, seed, name in sorted(rows, key=lambda r: (r[1], list(variants).index(r[0]))):
        case, own = cached(name), case_name("distill", "lora", GOAL_TOKENS, seed_variant(setting, seed))
        f = case["fidelity"]
        mc = mc_cells(name) or ("-", "-")
        vs = marked(paired_average(own, name)) if suffix and evaluated(name) and evaluated(own) else "-"
        word = None
        if evaluated(name, lastword_folder):
            scores = per_example(load_samples(lastword_folder(name))[LASTWORD])["acc"].values()
            word = f"{sum(v for _, v in scores) / len(scores):.1%}"
        word_vs = "-"
        if suffix and word and evaluated(own, lastword_folder):
            word_vs = marked(headline_rows(compare_folders(lastword_folder(own), lastword_folder(name)))[0])
        held = f"{case['healing']['distill']['kl_after']:.4f} | " if heldout else ""
        lines.append(f"| {variants[suffix]} | {seed} | {case['healing']['seconds'] / 60:.1f} min | x{f['perplexity'] / d_ppl:.3f} | "
                     f"{100 * f['kl'] / pr['kl']:.1f}% | {f['top1']:.1%} | {held}{mc[0]} | {mc[1]} | {vs} | "
                     f"{word or '-'} | {word_vs} |")
    return lines


def mc_note() -> str:
    """The footnote of :func:`seed_table`'s accuracy columns."""
    return (f"MC: ARC-Easy, PIQA, HellaSwag (acc_norm), WinoGrande, 0-shot, {LIMIT} questions each, the same for every "
            f"model; last word: the exact last word of {LASTWORD_LIMIT} TinyStories stories (`--part lastword`); * where "
            "the 95% interval excludes 0.")


def part_teacher(setting: str = "batch1-r64-bridgedown-lm0.4", block: str = "bench_heal_teacher") -> None:
    """The recipe's setting trained on C4, on text the original wrote (TEACHER_TEXT) and on the two half
    and half (TEACHER_MIX), at the issue's budget: fidelity, paired multiple choice against the original
    and against the C4 run of the same seed (the same adapter init and draw of window positions, over other text)."""
    texts = {"": "C4", "-teachertext": "the original's own", "-teachermix": "half C4, half the original's"}
    if not any(CACHE.glob(case_name("distill", "lora", GOAL_TOKENS, f"{setting}-teacher*-seed*") + ".json")):
        raise SystemExit(f"no run on the original's text: --part teacher_text, then --variant {setting}-teachertext-seedN")
    lines = seed_table(setting, texts, "training text", "the C4 run")
    gen = cached("teacher_text")
    lines += ["", f"Setting `{setting}` (the recipe's), {GOAL_TOKENS:,} training tokens, block 12-18 removed; the original's text: "
              f"{gen['sequences']} sequences of {gen['tokens']} tokens, each a C4 excerpt's first {gen['prefix_tokens']} tokens "
              f"sampled on at temperature 1, written in {gen['seconds'] / 60:.0f} min (1 thread; not in the healing time). "
              f"Fidelity on the 16 WikiText-2 windows; {mc_note()}"]
    publish(lines, block)


def part_recipe_variants(setting: str = "batch1-r64-bridgedown-lm0.4", block: str = "bench_heal_recipe_variants") -> None:
    """The recipe's setting beside one-change variants of it on the same seeds (same data, same LoRA init):
    the bridge's token weights (``rms``, ``skip_first``, ``auto``), and the relative hidden-state term
    (weight 2); then :func:`seed_summary`."""
    variants = {"": "none (the recipe)", "-rms": "bridge_weight: rms", "-auto": "bridge_weight: auto",
                "-skipfirst": "bridge_weight: skip_first",
                "-hrel2": "hidden_loss: relative, hidden_weight: 2"}
    lines = seed_table(setting, variants, "change", "the recipe's run", only_varied=True, heldout=True)
    lines += ["", f"Setting `{setting}` (the recipe's), {GOAL_TOKENS:,} training tokens, block 12-18 removed; fidelity on the "
              "16 WikiText-2 windows; held-out C4 KL: the healing's own 8 validation windows after it; healing times "
              f"with three to six jobs on 2 CPU cores for the variants (upper bounds); {mc_note()}"]
    lines += ["", *seed_summary(setting, {k: v for k, v in variants.items() if k})]
    for p in sorted(CACHE.glob(case_name("distill", "lora", GOAL_TOKENS, f"{setting}-auto-seed*") + ".json")):
        cut = cached(p.stem)["healing"]["bridge"]["cuts"][0]  # bridge_weight auto: what each seed's check kept
        lines += ["", f"`bridge_weight: auto`, seed {p.stem.rsplit('seed', 1)[1]}: kept {cut['weight']} (held-out KL "
                  + ", ".join(f"{w} {v:.4f}" for w, v in cut["checked"].items()) + ")."]
    publish(lines, block)


def seed_summary(setting: str, variants: dict[str, str]) -> list[str]:
    """Each variant against ``setting`` over the seeds where both ran (and both were lm-evaluated for
    multiple choice): the mean per-seed difference of perplexity (x dense), KL (% of the un-healed
    model's) and the paired MC average, with a 95% t interval over the seeds (the seed is the unit:
    the same questions and windows on every seed)."""
    d_ppl, pr = cached("fidelity-dense")["fidelity"]["perplexity"], cached("fidelity-pruned")["fidelity"]
    lines = ["| change | seeds | ppl x dense, difference | KL / un-healed's, difference (points) | seeds with MC | "
             "MC vs the recipe's run, mean difference (points) |", "|---|---|---|---|---|---|"]

    def mean_ci(xs: list[float], scale: float, fmt: str) -> str:
        m, half = t_interval(xs)
        if len(xs) < 2:
            return f"{scale * m:{fmt}}"
        return f"{scale * m:{fmt}} [{scale * (m - half):{fmt}}, {scale * (m + half):{fmt}}]"

    for suffix, label in variants.items():
        pairs = []  # (seed, the setting's case, the variant's case, their fidelity records)
        for seed in range(0, 15):  # VARIANTS' seed families run 0-14
            own, name = (case_name("distill", "lora", GOAL_TOKENS, seed_variant(f"{setting}{x}", seed)) for x in ("", suffix))
            a, b = cached(own), cached(name)
            if a and b:
                pairs.append((seed, own, name, a["fidelity"], b["fidelity"]))
        if not pairs:
            continue
        ppl = [(b["perplexity"] - a["perplexity"]) / d_ppl for *_, a, b in pairs]
        kl = [(b["kl"] - a["kl"]) / pr["kl"] for *_, a, b in pairs]
        mc = [paired_average(o, n).diff for _, o, n, _, _ in pairs if evaluated(o) and evaluated(n)]
        lines.append(f"| {label} | {', '.join(str(p[0]) for p in pairs)} | {mean_ci(ppl, 1, '+.3f')} | "
                     f"{mean_ci(kl, 100, '+.1f')} | {len(mc)} | {mean_ci(mc, 100, '+.2f') if mc else '-'} |")
    return lines + ["", "Mean over the seeds of (variant - the recipe's run of the same seed), 95% t interval over the seeds "
                    "(df = seeds - 1)."]


def part_teacher_text(batch: int = 20) -> None:
    """Write TEACHER_TEXT: TEACHER_SEQUENCES sequences of TEACHER_LENGTH tokens, the first TEACHER_PREFIX
    from a C4 row (rows drawn with seed 0), the rest sampled from the dense model (each batch seeded by
    its first row's index, so a resumed run writes the same text); then TEACHER_MIX. Resumes from the
    rows already written; the generation time is kept in ``teacher_text.json``."""
    base, tok = load_dense()
    c4 = [json.loads(line) for line in Path(C4["path"]).read_text().splitlines() if line.strip()]
    order = torch.randperm(len(c4), generator=torch.Generator().manual_seed(0)).tolist()
    prefixes = [ids[:TEACHER_PREFIX] for i in order
                if len(ids := tok(c4[i]["prefix"], add_special_tokens=False)["input_ids"]) >= TEACHER_PREFIX][:TEACHER_SEQUENCES]
    done = TEACHER_TEXT.read_text().splitlines() if TEACHER_TEXT.is_file() else []
    spent = (cached("teacher_text") or {}).get("seconds", 0.0)
    new = TEACHER_LENGTH - TEACHER_PREFIX
    for start in range(len(done), len(prefixes), batch):
        torch.manual_seed(start)
        t = time.time()
        with torch.no_grad():
            ids = torch.tensor(prefixes[start:start + batch])  # no padding: every prefix has TEACHER_PREFIX tokens
            out = base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                top_p=1.0, min_new_tokens=new, max_new_tokens=new, pad_token_id=tok.eos_token_id)
        spent += time.time() - t
        with TEACHER_TEXT.open("a") as f:
            for ids in out.tolist():
                f.write(json.dumps({"text": tok.decode(ids, skip_special_tokens=True)}) + "\n")
        store("teacher_text", {"sequences": start + out.shape[0], "seconds": round(spent, 1),
                               "prefix_tokens": TEACHER_PREFIX, "tokens": TEACHER_LENGTH, **stamp()})
        log(f"teacher text: {start + out.shape[0]} / {len(prefixes)} sequences, {spent / 60:.1f} min")
    if not TEACHER_MIX.is_file():
        mix, tokens = TEACHER_TEXT.read_text().splitlines(), 0
        for i in order:
            if tokens >= len(prefixes) * TEACHER_LENGTH:
                break
            text = "".join(c4[i][f] for f in C4["field"])
            tokens += len(tok(text, add_special_tokens=False)["input_ids"])
            mix.append(json.dumps({"text": text}))
        TEACHER_MIX.write_text("\n".join(mix) + "\n")
        log(f"teacher mix: {len(prefixes)} teacher sequences and {tokens} C4 tokens")


def part_hidden_scale() -> None:
    """Why ``hidden_weight 0.01`` (VARIANTS): the un-healed model's KL to the original and the raw MSE
    between each kept block's output and the original's, on 2 of the WikiText-2 windows (256 tokens);
    and the relative error (``heal.hidden_loss: relative``) per kept block."""
    from prune.heal.distill import _block_outputs, hidden_error, kl_loss

    base, tok = load_dense()
    run = removed_blocks(base, tok)
    kept = complement(30, run)
    model = copy.deepcopy(base)
    prune.remove_layers(model, run)
    ids = eval_windows(tok)[:2, :256]
    s_out, t_out = {}, {}
    handles = _block_outputs(prune.decoder_layers(model), list(range(len(kept))), s_out) + \
        _block_outputs(prune.decoder_layers(base), kept, t_out)
    with torch.no_grad():
        kl = float(kl_loss(model(ids).logits, base(ids).logits))
    for h in handles:
        h.remove()
    mse = [float(hidden_error(s_out[j], t_out[o])) for j, o in enumerate(kept)]
    print(f"KL(original || pruned) per token: {kl:.3f}; hidden MSE, mean over the {len(kept)} kept blocks: "
          f"{sum(mse) / len(mse):.1f}")
    print("original block outputs, mean square:", " ".join(f"{o}:{float(t_out[o].pow(2).mean()):.0f}" for o in kept))
    rel = [float(hidden_error(s_out[j], t_out[o], "relative")) for j, o in enumerate(kept)]
    print(f"relative hidden error, mean over the kept blocks: {sum(rel) / len(rel):.3f}; per kept block:",
          " ".join(f"{o}:{r:.3f}" for o, r in zip(kept, rel)))


def goal_windows(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows of the 131k case: the text every bridge here is fitted on."""
    return training_windows(tok, heal_config("lora", **{**COMMON, "n_samples": GOAL_TOKENS // SEQ}))


def bridged(base, removed: list[int], windows: torch.Tensor, kind: str, weight: str = "uniform"):
    """A copy of ``base`` without the ``removed`` blocks and, unless ``kind`` is ``none``, with the
    bridges of that kind fitted on ``windows`` (tokens weighted by ``weight``: uniform, as every
    cached bridge before 2026-12-05, skip_first or rms) folded in, unchecked: ``(model, bridges or None)``."""
    from prune.heal.bridge import apply_bridges, fit_bridges

    bridges = fit_bridges(base, removed, windows, batch_size=8, kind=kind, weight=weight) if kind != "none" else None
    model = copy.deepcopy(base)
    prune.remove_layers(model, removed)
    if bridges:
        apply_bridges(model, bridges)
    return model, bridges


BRIDGE_ONLY = {"linear": "bridge-only-128k", "down": "bridgedown-only-128k"}  # heal.bridge kind -> cached case


def part_bridge() -> None:
    """Each bridge alone (``heal.bridge: linear`` and ``down`` with no training): fitted on the 131k
    case's training windows (seed 0, as ``batch1-r64-bridge`` fits it), then the fidelity on the
    WikiText-2 windows; cached as ``bridge-only-128k`` and ``bridgedown-only-128k``."""
    pr, dense = cached("fidelity-pruned"), cached("fidelity-dense")
    if not pr or not dense:
        raise SystemExit("run --part distill first (the dense and un-healed fidelity)")
    loaded = []  # (dense model, tokenizer, removed run, training windows): loaded once, if a kind is uncached
    for kind, name in BRIDGE_ONLY.items():
        if not cached(name):
            if not loaded:
                base, tok = load_dense()
                loaded += [base, tok, removed_blocks(base, tok), goal_windows(tok)[0]]
            base, tok, run, windows = loaded
            model, bridges = bridged(base, run, windows, kind)
            store(name, {"case": f"bridge only ({kind})", "bridge": bridges.record(),
                         "fidelity": fidelity_to(model, base, tok)})
        r = cached(name)
        f = r["fidelity"]
        print(f"bridge {kind} only ({r['bridge']['tokens']:,} fit tokens, {r['bridge']['seconds']:.0f} s, fit error "
              f"{r['bridge']['cuts'][0]['fit_error']:.3f}): ppl x{f['perplexity'] / dense['fidelity']['perplexity']:.2f} "
              f"(un-bridged x{pr['fidelity']['perplexity'] / dense['fidelity']['perplexity']:.2f}), KL "
              f"{100 * f['kl'] / pr['fidelity']['kl']:.1f}% of the un-healed model's, top-1 {f['top1']:.1%} "
              f"(un-bridged {pr['fidelity']['top1']:.1%})")
    for name in paired_cases():  # the healed cases that started from a bridge: its fit inside their healing time
        h = (cached(name) or {}).get("healing", {})
        if "bridge" in h:
            print(f"{name}: {h['bridge']['method']} bridge fit {h['bridge']['seconds'] / 60:.1f} of "
                  f"{h['seconds'] / 60:.1f} min of healing")


def bridge_cut_sets() -> dict[str, list[int]]:
    """The block sets ``--part bridge_cuts`` bridges: this benchmark's k = 7 run, and k = 10 by
    contiguous angular and SLEB as the quality benchmark recorded them (docs/BENCHMARKS.md)."""
    from bench_verified import baseline_sets  # scripts/ is this script's folder, on the path

    recorded = baseline_sets()
    return {"k=7 contiguous angular": cached("selection")["removed"],
            "k=10 contiguous angular": recorded["contiguous angular"][10], "k=10 SLEB": recorded["sleb"][10]}


#: ``--part bridge_cuts``' fits: (kind, token weights); the uniform ones were measured first (2026-12-04)
BRIDGE_CUT_FITS = [("none", None), ("linear", "uniform"), ("down", "uniform"), ("linear", "rms"), ("down", "rms")]


def set_slug(label: str) -> str:
    """A block set's label as it goes into cached case names (``k=7 contiguous angular`` -> ``k-7-contiguous-angular``)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower())


def bridge_cut_name(label: str, kind: str, weight: str | None = None) -> str:
    """The cached case of ``--part bridge_cuts`` for a set ``label``, bridge ``kind`` and token ``weight``."""
    return f"bridgecut-{set_slug(label)}-{kind}" + ("-rms" if weight == "rms" else "")


def kl_cells(r: dict) -> str:
    """A bridged case's table cells: held-out C4 KL | WikiText-2 KL | WikiText-2 perplexity."""
    return f"{r['heldout']['kl']:.3f} | {r['fidelity']['kl']:.3f} | {r['fidelity']['perplexity']:.1f}"


def part_bridge_cuts() -> None:
    """When a bridge helps: for each block set of :func:`bridge_cut_sets`, each fit of
    BRIDGE_CUT_FITS on the 131k case's training windows, then (no training) the KL to the original
    on the healing's 8 held-out C4 windows (what ``heal`` judges a bridge by,
    :func:`prune.heal.bridge.keep_helpful`) and on the WikiText-2 fidelity windows; cached as
    ``bridgecut-<set>-<kind>`` (``-rms`` appended for the rms weights)."""
    from prune.heal.distill import fidelity
    from prune.heal.teacher import Teacher

    loaded = []
    rows = ["| blocks removed | bridge | token weights | cuts (fit error) | held-out C4 KL | WikiText-2 KL | WikiText-2 ppl | "
            "held-out KL below no bridge |",
            "|---|---|---|---|---:|---:|---:|---|"]
    for label, removed in bridge_cut_sets().items():
        plain = None
        for kind, weight in BRIDGE_CUT_FITS:
            name = bridge_cut_name(label, kind, weight)
            if not cached(name):
                if not loaded:
                    base, tok = load_dense()
                    loaded += [base, tok, *goal_windows(tok)]
                base, tok, windows, val = loaded
                model, bridges = bridged(base, removed, windows, kind, weight or "uniform")
                held = fidelity(model, Teacher("memory", "the original model", base.eval()), val)
                store(name, {"case": f"{label}, bridge {kind}", "removed": removed,
                             "bridge": bridges.record() if bridges else None, "heldout": held,
                             "fidelity": fidelity_to(model, base, tok)})
                log(f"{name}: held-out KL {held['kl']:.4f}")
            r = cached(name)
            plain = plain or r
            cuts = ", ".join(f"{c['run'][0]}-{c['run'][-1]} ({c['fit_error']:.3f})" for c in r["bridge"]["cuts"]) if r["bridge"] else "-"
            kept = "-" if kind == "none" else ("yes" if r["heldout"]["kl"] < plain["heldout"]["kl"] else "**no**")
            rows.append(f"| {' '.join(map(str, removed))} | {kind} | {weight or '-'} | {cuts} | {kl_cells(r)} | {kept} |")
    rows += ["", "Fitted on 131,072 C4 training tokens (512 windows x 256, seed 0), no training after it; token weights: "
             "uniform (plain least squares) or rms (each token's squared error / the RMS of the original's state after the "
             "cut, heal.bridge_weight; the fit error is then the weighted share); held-out C4: the healing's 8 validation "
             "windows; WikiText-2: the fidelity windows (16 x 512). The last column: all of a set's cuts together; heal "
             "judges them cut by cut (prune.heal.bridge.keep_helpful)."]
    publish(rows, "bench_heal_bridge_cuts")


#: ``--part bridge_sets``: how many of verified's best k = 7 candidates are bridged and measured
BRIDGE_SET_COUNT = 5


def verified_candidates(base, tok) -> list[dict]:
    """verified's candidates at k = 7 under recipes/smollm2-quick.yaml's protocol (its scores, held-out
    windows and local search), best first: ``[{removed, kl_mean, ...}]`` (cached as ``bridgesets-selection``)."""
    hit = cached("bridgesets-selection")
    if hit:
        return hit["candidates"]
    from prune.choose.registry import choose
    from prune.io.text import calibration_windows_of
    from prune.pipeline.engines import score_options
    from prune.pipeline.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "smollm2-quick.yaml", [f"model.source={smollm2_folder()}",
                                                                    f"calibration.path={WIKI}", f"evaluate.perplexity.path={WIKI}",
                                                                    f"evaluate.data_dir={DATA}"])
    windows = calibration_windows_of(tok, recipe.calibration)
    scores = prune.score(base, windows, **score_options(recipe, True))
    selection = choose(recipe.select, scores, model=base, tokenizer=tok, windows=windows, calibration=recipe.calibration,
                       score=recipe.score, evaluate=recipe.evaluate, quiet=True)
    store("bridgesets-selection", {"candidates": selection.details["candidates"]})
    return selection.details["candidates"]


def part_bridge_sets(only: str | None = None) -> None:
    """Does the set verified ranks first stay first once repaired? verified's BRIDGE_SET_COUNT best k = 7
    candidates (held-out calibration KL, un-healed), each without and with the recipe's bridge
    (``down``, uniform weights, fitted on the 131k case's training windows, every cut kept), measured by
    the KL to the original on the healing's 8 held-out C4 windows and on the WikiText-2 fidelity windows;
    cached as ``bridgeset-<blocks>-<kind>``. ``only``: the comma-separated ranks to measure (1-based;
    two processes can share the sets), the table from whatever is cached."""
    from prune.heal.distill import fidelity
    from prune.heal.teacher import Teacher

    base, tok = load_dense()
    candidates = verified_candidates(base, tok)[:BRIDGE_SET_COUNT]
    ranks = {int(r) for r in only.split(",")} if only else set(range(1, len(candidates) + 1))
    windows, val = goal_windows(tok)
    rows = ["| rank by verified (held-out calibration KL) | blocks removed | held-out calibration KL (verified's) | "
            "un-bridged: held-out C4 KL | WikiText-2 KL | bridged: held-out C4 KL | WikiText-2 KL | WikiText-2 ppl |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rank, cand in enumerate(candidates, 1):
        removed = cand["removed"]
        cells = []
        for kind in ("none", "down"):
            name = f"bridgeset-{'-'.join(map(str, removed))}-{kind}"
            if not cached(name) and rank in ranks:
                model, bridges = bridged(base, removed, windows, kind)
                held = fidelity(model, Teacher("memory", "the original model", base.eval()), val)
                store(name, {"removed": removed, "bridge": bridges.record() if bridges else None, "heldout": held,
                             "fidelity": fidelity_to(model, base, tok)})
                log(f"{name}: held-out C4 KL {held['kl']:.4f}")
            cells.append(cached(name))
        if None in cells:
            continue
        (none, down) = cells
        rows.append(f"| {rank} | {' '.join(map(str, removed))} | {cand['kl_mean']:.4f} | {none['heldout']['kl']:.3f} | "
                    f"{none['fidelity']['kl']:.3f} | {down['heldout']['kl']:.3f} | {down['fidelity']['kl']:.3f} | "
                    f"{down['fidelity']['perplexity']:.1f} |")
    rows += ["", "SmolLM2-135M-Instruct, k = 7; verified as recipes/smollm2-quick.yaml runs it (32 x 256 calibration tokens, "
             "4 held-out windows, skip_first); bridge: heal.bridge down (the recipe's), uniform token weights, fitted on "
             "131,072 C4 tokens (512 x 256, seed 0), every cut kept (heal would judge each cut on the held-out C4 windows), "
             "no training; held-out C4: the healing's 8 validation windows; WikiText-2: the fidelity windows (16 x 512)."]
    publish(rows, "bench_heal_bridge_sets")


#: ``--part bridge_weights``: other token weightings than bridge_cuts' two (uniform, rms): a function of the
#: original's state after the cut ``h`` [windows x SEQ tokens, d] (in prune.heal.bridge.token_weights' place),
#: or the name of one of the toolkit's own weightings
OTHER_BRIDGE_WEIGHTS = {
    "1 / rms^2": lambda h: 1 / (h * h).mean(-1),  # the error as the next block's RMSNorm sees it
    "1 / rms^2, at most the median token's": lambda h: (lambda w: (w / w.median()).clamp(max=1.0))(1 / (h * h).mean(-1)),
    "uniform, first position left out (skip_first)": "skip_first",
}


def part_bridge_weights() -> None:
    """Which token weights for a bridge: the ``down`` refit at k = 7 and at k = 10's contiguous run with
    each weighting of OTHER_BRIDGE_WEIGHTS (a function in place of :func:`prune.heal.bridge.token_weights`), beside the
    uniform and rms rows of ``--part bridge_cuts`` (same windows, same measures); cached as
    ``bridgeweight-<set>-<n>``."""
    import prune.heal.bridge as bridge_module
    from prune.heal.distill import fidelity
    from prune.heal.teacher import Teacher

    sets = {k: v for k, v in bridge_cut_sets().items() if k in ("k=7 contiguous angular", "k=10 contiguous angular")}
    rows = ["| blocks removed | token weights | fit error | held-out C4 KL | WikiText-2 KL | WikiText-2 ppl |",
            "|---|---|---:|---:|---:|---:|"]
    loaded, toolkit = [], bridge_module.token_weights
    for label, removed in sets.items():
        measured = [("none (plain cut)", bridge_cut_name(label, "none")), ("uniform", bridge_cut_name(label, "down")),
                    ("1 / rms (rms)", bridge_cut_name(label, "down", "rms"))]
        others = [(form, f"bridgeweight-{set_slug(label)}-{i}") for i, form in enumerate(OTHER_BRIDGE_WEIGHTS, start=3)]
        for form, name in measured + others:
            how = OTHER_BRIDGE_WEIGHTS.get(form)
            if how is not None and not cached(name):
                if not loaded:
                    base, tok = load_dense()
                    loaded += [base, tok, *goal_windows(tok)]
                base, tok, windows, val = loaded
                if callable(how):
                    bridge_module.token_weights = lambda h, weight, seq_len, fn=how: fn(h)
                try:
                    model, bridges = bridged(base, removed, windows, "down", "rms" if callable(how) else how)
                finally:
                    bridge_module.token_weights = toolkit
                held = fidelity(model, Teacher("memory", "the original model", base.eval()), val)
                store(name, {"case": f"{label}, down, {form}", "removed": removed, "bridge": bridges.record(),
                             "heldout": held, "fidelity": fidelity_to(model, base, tok)})
                log(f"{name}: held-out KL {held['kl']:.4f}")
            r = cached(name)
            if r is None:
                raise SystemExit(f"run --part bridge_cuts first ({name} is missing)")
            fit = f"{r['bridge']['cuts'][0]['fit_error']:.3f}" if r["bridge"] else "-"
            rows.append(f"| {' '.join(map(str, removed))} | {form} | {fit} | {kl_cells(r)} |")
    rows += ["", "The down projection of the block before the cut refitted on the 131,072 C4 training tokens (512 x 256, "
             "seed 0), no training; rms^2 = the mean square of the original's state after the cut, per token; the fit "
             "error is the weighted share of the cut's error left; held-out C4: the healing's 8 validation windows; "
             "WikiText-2: the fidelity windows (16 x 512)."]
    publish(rows, "bench_heal_bridge_weights")


def part_bridge_auto() -> None:
    """``heal.bridge_weight: auto`` against the default ``uniform``, both through the toolkit's own path
    (``method: bridge``: the down refit, cut by cut on the pruned model, each cut kept only where it
    lowers the held-out KL to the original) on each block set of :func:`bridge_cut_sets`, fitted on the
    131k case's windows; the KL on its held-out C4 windows as the healing record measured it after the
    bridges, then on the WikiText-2 fidelity windows. Cached as ``bridgeauto-<set>-<weight>``."""
    rows = ["| blocks removed | token weights | each cut: weights kept (held-out KL of uniform / skip_first / rms), or "
            "dropped | fit + checks | held-out C4 KL | WikiText-2 KL | WikiText-2 ppl |", "|---|---|---|---:|---:|---:|---:|"]
    loaded = []
    for label, removed in bridge_cut_sets().items():
        for weight in ("uniform", "auto"):
            name = f"bridgeauto-{set_slug(label)}-{weight}"
            if not cached(name):
                if not loaded:
                    loaded += load_dense()
                base, tok = loaded
                model = copy.deepcopy(base)
                kept = prune.remove_layers(model, removed)
                rec = heal_model(model, tok, "bridge", teacher_model=base, kept=kept, quiet=True, bridge_weight=weight,
                                 **{**COMMON, "n_samples": GOAL_TOKENS // SEQ})
                b = rec["bridge"]  # its held-out figures after the bridges: goal_windows' 8 held-out windows
                store(name, {"case": f"{label}, method bridge, bridge_weight {weight}", "removed": removed, "bridge": b,
                             "heldout": {"kl": b["kl_after"], "top1": b["top1_after"], "tokens": rec["distill"]["kl_tokens"]},
                             "fidelity": fidelity_to(model, base, tok)})
                log(f"{name}: held-out KL {cached(name)['heldout']['kl']:.4f}")
                del model
            r = cached(name)
            cuts = []
            for c in r["bridge"]["cuts"]:
                tried = f" ({' / '.join(f'{v:.3f}' for v in c['checked'].values())})" if "checked" in c else ""
                cuts.append(f"{c['run'][0]}-{c['run'][-1]}: " + (c["weight"] if c["kept"] else "dropped") + tried)
            rows.append(f"| {' '.join(map(str, removed))} | {weight} | {', '.join(cuts)} | "
                        f"{r['bridge']['seconds'] / 60:.1f} min | {kl_cells(r)} |")
    rows += ["", "`method: bridge` (the down projection of the block before each cut refitted, no training) on 131,072 C4 "
             "training tokens (512 windows x 256, seed 0), cut by cut on the pruned model, each cut checked on the 8 "
             "held-out C4 windows (the KL there with each weighting's fit folded in, in brackets for auto); held-out C4 KL: "
             "those windows, after all cuts; WikiText-2: the fidelity windows (16 x 512), never seen by the choice; fit + "
             "checks: wall time beside three to five other jobs on 2 CPU cores (not comparable between rows)."]
    publish(rows, "bench_heal_bridge_auto")


def part_heldout_windows(seeds: tuple[int, ...] = (0, 5, 6)) -> None:
    """Are ``bridge_weight: auto``'s choices noise? For each seed's 131k case windows and each one-cut set of
    :func:`bridge_cut_sets`, the three weightings' down fits (one pass, as ``auto`` fits them), each folded
    into the cut model alone, and the KL to the original on each of the seed's 8 held-out C4 windows (the
    windows ``auto`` checks on); then each weighting against uniform paired by window: mean difference,
    95% t interval over the windows, and on how many windows it is lower. Cached as ``heldoutwin-<seed>-<set>``."""
    from prune.heal.bridge import apply_bridge, fit_bridges, runs_of
    from prune.heal.distill import kl_loss

    sets = {label: removed for label, removed in bridge_cut_sets().items() if len(runs_of(removed)) == 1}
    loaded: list = []
    rows = ["| seed | blocks removed | held-out KL, uniform | skip_first - uniform | windows lower | rms - uniform | "
            "windows lower | auto keeps |", "|---:|---|---:|---|---:|---|---:|---|"]
    for seed in seeds:
        for label, removed in sets.items():
            name = f"heldoutwin-{seed}-{set_slug(label)}"
            if not cached(name):
                if not loaded:
                    loaded += load_dense()
                base, tok = loaded
                windows, val = training_windows(tok, heal_config("lora", **{**COMMON, "seed": seed,
                                                                             "n_samples": GOAL_TOKENS // SEQ}))
                with torch.no_grad():
                    teacher = [base(input_ids=val[i:i + 1], use_cache=False).logits for i in range(val.shape[0])]
                bridges = fit_bridges(base, removed, windows, batch_size=8, kind="down", weight="auto")
                model = copy.deepcopy(base)
                prune.remove_layers(model, removed)
                per_window = {}
                for option in bridges.options[0]:
                    undo = apply_bridge(model, bridges, option)
                    with torch.no_grad():
                        per_window[option.weight] = [float(kl_loss(model(input_ids=val[i:i + 1], use_cache=False).logits,
                                                                   teacher[i])) for i in range(val.shape[0])]
                    undo()
                store(name, {"case": f"seed {seed}, {label}, down fits", "removed": removed, "kl_windows": per_window})
                del model
            kl = cached(name)["kl_windows"]
            cells = []
            for weight in ("skip_first", "rms"):
                d = [b - a for a, b in zip(kl["uniform"], kl[weight])]
                m, half = t_interval(d)
                cells.append(f"{m:+.4f} [{m - half:+.4f}, {m + half:+.4f}] | {sum(x < 0 for x in d)} of {len(d)}")
            mean = {w: sum(v) / len(v) for w, v in kl.items()}
            rows.append(f"| {seed} | {' '.join(map(str, removed))} | {mean['uniform']:.4f} | {' | '.join(cells)} | "
                        f"{min(mean, key=mean.get)} |")
    rows += ["", "Each weighting's `down` fit (131,072 C4 training tokens of the seed's case) folded into the cut model "
             "alone, no training; KL(original || model) on each of the seed's 8 held-out C4 windows (256 tokens), the "
             "check `auto` chooses by; differences paired by window, 95% t interval over the 8 windows."]
    publish(rows, "bench_heal_heldout_windows")


def part_window_kl(names: list[str]) -> None:
    """Per-window KL(original || model) on the FIDELITY_WINDOWS WikiText-2 windows (where a mean hides
    one window), by :func:`fidelity_to`: each name a saved case (bench_cache/heal/models/NAME) or
    ``bridge-<down|linear>-<uniform|skip_first|rms>``, the k = 7 run cut and that bridge folded into block 11
    (no training), fitted on the 131k case's windows."""
    base, tok = load_dense()
    windows = None
    for name in names:
        m = re.fullmatch(r"bridge-(down|linear)-(uniform|skip_first|rms)", name)
        if m:
            windows = goal_windows(tok)[0] if windows is None else windows
            model, _ = bridged(base, removed_blocks(base, tok), windows, m[1], m[2])
        else:
            model, _, _ = prune.load(CACHE / "models" / name, dtype="float32")
        f = fidelity_to(model, base, tok)
        print(f"{name}: mean {f['kl']:.4f}; per window " + " ".join(f"{x:.2f}" for x in f["kl_windows"]), flush=True)
        del model


def paired_average(ref: str, name: str):
    """The paired four-task average of case ``name`` against case ``ref`` (both lm-evaluated)."""
    from prune.measure.paired import compare_folders, task_average

    return task_average(compare_folders(lmeval_folder(ref), lmeval_folder(name)))


def part_distill_pair(pair: list[str]) -> None:
    """The paired four-task comparison of case ``pair[1]`` against case ``pair[0]`` (both lm-evaluated)."""
    a, b = pair
    avg = paired_average(a, b)
    print(f"{b} against {a}: {interval(avg)} points{' (significant)' if significant(avg) else ''}, "
          f"{100 * avg.retained:.1f}% retained")


# ---- part: lastword (the exact next word: tinystories_lastword_local, every story, paired) ---------------------
LASTWORD = "tinystories_lastword_local"
LASTWORD_LIMIT = 1000  # the first 1,000 of its 2,311 stories: about 7.5 min per model on 1 thread here
LASTWORD_CACHE = CACHE / "lmeval-lastword"
#: the dense and un-healed models' files are the ones scripts/bench_fidelity.py --part paired --limit 1000
#: --tasks tinystories_lastword_local writes (k = 7), run here when missing
FIDELITY_LASTWORD = ROOT / "bench_cache" / "fidelity" / f"lmeval_k7_n{LASTWORD_LIMIT}_{LASTWORD}"
#: the pairs the report compares head to head (B against A), where both are evaluated
LASTWORD_PAIRS = [("d-lm-lora-128k+batch1-r64", "d-distill-lora-128k+batch1-r64"),  # the two objectives
                  ("d-distill-lora-128k+batch1-r64", "d-distill-lora-128k+batch1-r64-bridge"),  # the bridge
                  ("d-distill-lora-128k+batch1-r64-bridge", "d-distill-lora-128k+batch1-r64-bridgedown")]  # its kind


def lastword_folder(name: str) -> Path:
    """Where the last-word lm-eval files of case ``name`` are (the baselines' shared with bench_fidelity)."""
    if name in BASELINES:
        return FIDELITY_LASTWORD / ("-".join(map(str, BASELINES[name])) or "dense")
    return LASTWORD_CACHE / name


def part_lastword(only: str | None = None) -> None:
    """lm-eval of the exact last word of the first LASTWORD_LIMIT TinyStories stories (samples kept) for
    the dense and the un-healed model and every saved case at the goal budget or above (``only``: a
    comma-separated list of case names, in the order to run, the baselines among them only if named)."""
    from prune.measure.lmeval import run_lm_eval

    dense: list = []
    cases = [n for n in paired_cases() if (parse_case_name(n) or (0, 0, 0))[2] >= GOAL_TOKENS]
    if only:
        cases = [n for n in only.split(",") if n in cases]
    baselines = [n for n in BASELINES if not only or n in only.split(",")]
    for name in [*baselines, *cases]:
        folder = lastword_folder(name)
        if has_samples(folder):
            continue
        model, tok = case_model(name, dense)
        t = time.time()
        run = run_lm_eval(model, tok, [LASTWORD], limit=LASTWORD_LIMIT, batch_size=16, seed=0, data_dir_path=DATA,
                          progress=False)
        run.write(folder, f"SmolLM2-135M-Instruct {name}")
        log(f"{LASTWORD} {name}: {run.summary[LASTWORD]['metrics']} ({time.time() - t:.0f} s)")
        del model


def part_lastword_report(block: str = "bench_heal_lastword") -> None:
    """One row per evaluated model: last-word accuracy, its share of the dense model's, the paired
    difference to the dense and to the un-healed model, beside the fidelity (KL share, top-1); then
    LASTWORD_PAIRS head to head; into ``block`` of the docs."""
    from prune.measure.paired import compare_folders, headline_rows

    have = [n for n in [*BASELINES, *paired_cases()] if evaluated(n, lastword_folder)]
    if "dense" not in have or "pruned" not in have:
        raise SystemExit("run --part lastword first")
    pr = cached("fidelity-pruned")

    def pair(a: str, b: str):
        return headline_rows(compare_folders(lastword_folder(a), lastword_folder(b)))[0]

    dense_acc = pair("dense", "pruned").mean_a
    lines = ["| model | KL / pruned's | top-1 agreement | last-word acc | of dense's | vs dense (points, 95% CI) | "
             "vs un-healed | right -> wrong / wrong -> right (vs dense) |", "|---|---:|---:|---:|---:|---|---|---|",
             f"| dense | 0% | 100% | {dense_acc:.4f} | 100% | - | - | - |"]
    for name in [n for n in have if n != "dense"]:
        r = cached(name) if name != "pruned" else pr
        f = r["fidelity"] if r else None
        to_dense = pair("dense", name)
        fid = (f"{100 * f['kl'] / pr['fidelity']['kl']:.1f}% | {f['top1']:.1%}") if f else "- | -"
        lines.append(f"| {name} | {fid} | {to_dense.mean_b:.4f} | {100 * to_dense.mean_b / dense_acc:.1f}% | "
                     f"{marked(to_dense)} | {'-' if name == 'pruned' else marked(pair('pruned', name))} | "
                     f"{to_dense.right_to_wrong} / {to_dense.wrong_to_right} |")
    lines += ["", f"n = {to_dense.n} stories (the first of `tinystories/tinystories_sample_2MiB.txt` whose last word "
              "follows a space), the same for every model; acc: greedy decoding gives the last word exactly; * where the paired 95% interval "
              "(Newcombe's) excludes 0; KL and top-1 on the WikiText-2 fidelity windows (the tables above).", ""]
    for a, b in LASTWORD_PAIRS:
        if a in have and b in have:
            row = pair(a, b)
            lines.append(f"- **{b}** against **{a}**: {marked(row)} points ({row.mean_a:.4f} -> {row.mean_b:.4f}; "
                         f"{row.right_to_wrong} right -> wrong, {row.wrong_to_right} wrong -> right, "
                         f"McNemar p = {row.mcnemar_p:.3g})")
    publish(lines, block)


def part_distill_variants(block: str = "bench_heal_variants") -> None:
    """Each VARIANTS case beside its plain case (same objective, params, budget): the KL to the
    original on the healing's own held-out C4 windows (what a variant is chosen by) and the
    fidelity figures on the WikiText-2 windows, into ``block`` of the docs."""
    pr, dense = cached("fidelity-pruned"), cached("fidelity-dense")
    if not pr or not dense:
        raise SystemExit("run --part distill first")
    d_ppl = dense["fidelity"]["perplexity"]
    lines = ["| case | changed settings | training tokens | steps | healing time | KL to dense, held-out C4 | "
             "ppl (WikiText) x dense | KL / pruned's (WikiText) | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for objective, params, tokens in sorted(distill_cases(), key=lambda c: (c[2], c[1], c[0])):
        for variant in (None, *VARIANTS):
            r = cached(case_name(objective, params, tokens, variant))
            if not r or (variant is None and not any(cached(case_name(objective, params, tokens, v)) for v in VARIANTS)):
                continue
            f, h = r["fidelity"], r["healing"]
            c4 = f"{h['distill']['kl_after']:.4f}" if "distill" in h else "- (not measured by the next-token loss)"
            changed = ", ".join(f"{k} {v}" for k, v in VARIANTS[variant].items()) if variant else "(plain)"
            lines.append(f"| {r['case']} | {changed} | {h['tokens_seen']:,} | {h['steps']} | {h['seconds'] / 60:.1f} min | "
                         f"{c4} | x{f['perplexity'] / d_ppl:.2f} | {100 * f['kl'] / pr['fidelity']['kl']:.1f}% | "
                         f"{f['top1']:.1%} |")
    publish(lines, block)


def distill_report() -> list[str]:
    """The distill-vs-next-token table (Markdown lines) from the cached cases."""
    pr, dense = cached("fidelity-pruned"), cached("fidelity-dense")
    if not pr or not dense:
        return []
    d_ppl = dense["fidelity"]["perplexity"]
    d_lm = cached("dense.lmeval")
    lines = ["| objective | params | training tokens | steps | healing time | ppl (16 x 512) | x dense | "
             "KL to dense | KL / pruned's | top-1 agreement | MC retained |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| (dense) | - | - | - | - | {d_ppl:.2f} | x1.00 | 0 | 0% | 100% | 100% |",
             f"| (none: pruned) | - | 0 | 0 | - | {pr['fidelity']['perplexity']:.2f} | "
             f"x{pr['fidelity']['perplexity'] / d_ppl:.2f} | {pr['fidelity']['kl']:.4f} | 100% | "
             f"{pr['fidelity']['top1']:.1%} | - |"]
    for objective, params, tokens in sorted(distill_cases(), key=lambda c: (c[2], c[1], c[0])):
        r = cached(case_name(objective, params, tokens))
        if not r:
            continue
        h, f = r["healing"], r["fidelity"]
        p = f["perplexity"]
        lm = cached(f"{case_name(objective, params, tokens)}.lmeval")
        retained = "-"
        if lm and d_lm:
            ratios = [lm["tasks"][t]["metrics"][metric_name(t)] / d_lm["tasks"][t]["metrics"][metric_name(t)] for t in TASKS]
            retained = f"{100 * sum(ratios) / len(ratios):.1f}%"
        lines.append(f"| {objective} | {params} | {h['tokens_seen']:,} | {h['steps']} | {h['seconds'] / 60:.1f} min | "
                     f"{p:.2f} | x{p / d_ppl:.2f} | {f['kl']:.4f} | {100 * f['kl'] / pr['fidelity']['kl']:.0f}% | "
                     f"{f['top1']:.1%} | {retained} |")
    return lines


def extrapolate(points: list[tuple[int, float]], goal: float) -> float | None:
    """Tokens at which ``y`` reaches ``goal``, from a least-squares line ``y = a + b * log2(tokens)``
    through ``points`` (None with fewer than 2 points or a flat / rising line)."""
    if len(points) < 2:
        return None
    mx, my, b, _ = log2_line(points)
    if b >= 0:
        return None
    return 2 ** (mx + (goal - my) / b)


def log2_line(points: list[tuple[int, float]]) -> tuple[float, float, float, float]:
    """The least-squares line ``y = my + b * (log2(tokens) - mx)`` through ``(tokens, y)`` points:
    ``(mx, my, b, se of b)`` (the se from the residuals; nan with two points)."""
    xs, ys = [math.log2(t) for t, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return mx, my, b, math.sqrt(resid / (len(xs) - 2) / sxx) if len(xs) > 2 else math.nan


def docs_table_rows(block: str) -> list[list[str]]:
    """The cells of every table row inside the generated blocks of docs/BENCHMARKS.md whose name
    matches the regex ``block``."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    bodies = re.findall(rf"<!-- ({block}):begin -->(.*?)<!-- \1:end -->", text, flags=re.S)
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for _, body in bodies for line in body.splitlines() if line.strip().startswith("|")]


def recorded_distill_rows() -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """``{(objective, params): {tokens: (ppl / dense, KL / pruned's)}}`` from the tables of every
    ``bench_heal_distill*`` block in docs/BENCHMARKS.md: budgets whose cache is not on this machine
    still count for the trend (the same protocol, dense and pruned figures reproduced)."""
    out: dict = {}
    for cells in docs_table_rows(r"bench_heal_distill\w*"):
        if len(cells) == 11 and cells[0] in ("distill", "lm") and cells[6].startswith("x"):
            out.setdefault((cells[0], cells[1]), {})[int(cells[2].replace(",", ""))] = (
                float(cells[6][1:]), float(cells[8].rstrip("%")) / 100)
    return out


def goal_budget(points: list[tuple[int, float]], goal: float) -> str:
    """Where ``y <= goal`` is reached on ``(tokens, y)`` points (sorted by tokens): the first measured
    budget that meets it, or the least-squares line's crossing in log2(tokens) (and the line through
    the last two budgets, as the curve flattens)."""
    if any(y <= goal for _, y in points):
        return f"met at {min(t for t, y in points if y <= goal):,} (measured)"
    if len(points) < 2:
        return "not met; one budget, no trend"
    x = extrapolate(points, goal)
    if x and x > 100 * max(DISTILL_BUDGETS):
        return "not met; beyond 100x the largest budget on this trend"
    text = f"not met; ~{x:,.0f} (extrapolated)" if x else "not met; no improvement with tokens"
    if x and len(points) > 2:
        last = extrapolate(points[-2:], goal)
        text += f", ~{last:,.0f} through the last two" if last else ", none through the last two"
    return text


def distill_goals() -> list[str]:
    """Per (objective, params): the tokens at which perplexity <= 1.5x dense and KL <= half the pruned
    model's would be reached, extrapolated linearly in log2(tokens) from the measured budgets."""
    pr, dense = cached("fidelity-pruned"), cached("fidelity-dense")
    if not pr or not dense:
        return []
    lines = ["| objective | params | budgets measured | ppl <= 1.5x dense at | KL <= 50% of pruned's at |", "|---|---|---|---:|---:|"]
    for objective in ("distill", "lm"):
        for params in DISTILL_PARAMS:
            rows = [(t, cached(case_name(objective, params, t))) for t in DISTILL_BUDGETS]
            rows = [(t, r["fidelity"]) for t, r in rows if r]
            ratio = [(t, f["perplexity"] / dense["fidelity"]["perplexity"]) for t, f in rows]
            share = [(t, f["kl"] / pr["fidelity"]["kl"]) for t, f in rows]
            earlier = recorded_distill_rows().get((objective, params), {})
            ratio += [(t, v[0]) for t, v in earlier.items() if t not in dict(ratio)]
            share += [(t, v[1]) for t, v in earlier.items() if t not in dict(share)]
            ratio, share = sorted(ratio), sorted(share)
            if not ratio:
                continue
            lines.append(f"| {objective} | {params} | {', '.join(f'{t:,}' for t, _ in ratio)} | {goal_budget(ratio, PPL_GOAL)} | "
                         f"{goal_budget(share, KL_GOAL)} |")
    return lines


def part_distill_report(block: str = "bench_heal_distill") -> None:
    """Print the distill table and write it into ``block`` of docs/BENCHMARKS.md (the goals table
    also counts the budgets recorded in the ``bench_heal_distill`` block, see recorded_distill_rows)."""
    lines = distill_report()
    if not lines:
        raise SystemExit("run --part distill first")
    lines += ["", "Budget at which each goal is met, or would be on a straight line in log2(training tokens) "
              "through the measured budgets (least squares over all of them, and through the last two; "
              "an extrapolation, not a measurement):", "", *distill_goals()]
    publish(lines, block)


# ---- part: curve (what more budget buys) ----------------------------------------------------------------
def best_method() -> str:
    done = {m: cached(m) for m in METHODS}
    done = {m: r for m, r in done.items() if r}
    if not done:
        raise SystemExit("run --part train first")
    return min(done, key=lambda m: done[m]["perplexity"]["perplexity"])


def part_curve() -> None:
    base, tok = load_dense()
    run = removed_blocks(base, tok)
    method = best_method()
    settings = METHODS[method]
    log(f"curve for {method}: budgets {[int(f * BUDGET) for f in CURVE_FACTORS]}")
    stored = cached("curve") or {}
    points = stored.get("points", []) if stored.get("method") == method else []  # another method's points: redone
    have = {p["tokens"] for p in points}
    todo = [f for f in CURVE_FACTORS if int(f * BUDGET) not in have]
    if method == "replace" and todo:
        # one capture of the largest budget's windows; each budget trains a fresh block on its first windows
        most = int(max(CURVE_FACTORS) * TRAIN_WINDOWS)
        cfg = heal_config(**{**settings, "n_samples": most})
        windows, val_windows = training_windows(tok, cfg)
        full = copy.deepcopy(base)
        plan = plan_replacement(full, run, cfg, windows, val_windows)
        del full
        for f in todo:
            n = int(f * TRAIN_WINDOWS)
            model = copy.deepcopy(base)
            prune.remove_layers(model, plan.remove)
            sub = copy.copy(plan)
            sub.cfg = cfg.model_copy(update={"n_samples": n, "steps": max(1, int(f * settings["steps"]))})
            sub.windows, sub.inputs, sub.targets = windows[:n], plan.inputs[:n], plan.targets[:n]
            rec = heal_replacement(model, sub)
            points.append({"tokens": rec["tokens_seen"], "steps": sub.cfg.steps, "perplexity": ppl(model, tok)["perplexity"],
                           "val_loss": rec["val_loss_after"], "seconds": rec["seconds"]})
            store("curve", {"method": method, "points": sorted(points, key=lambda p: p["tokens"]), "mode": "separate runs"})
            log(f"curve {method} {points[-1]}")
    else:
        # a separate run per budget (its own schedule), so each point is what that budget buys
        for f in todo:
            hit = cached(method) if f == 1 else None
            if hit:
                rec, result = hit["healing"], hit["perplexity"]
            else:
                model = copy.deepcopy(base)
                prune.remove_layers(model, run)
                rec = heal_model(model, tok, **{**settings, "n_samples": int(f * TRAIN_WINDOWS),
                                                "steps": max(1, int(f * settings["steps"]))})
                result = ppl(model, tok)
                del model
            points.append({"tokens": rec["tokens_seen"], "steps": rec["steps"], "perplexity": result["perplexity"],
                           "val_loss": rec["val_loss_after"], "seconds": rec["seconds"]})
            store("curve", {"method": method, "points": sorted(points, key=lambda p: p["tokens"]), "mode": "separate runs"})
            log(f"curve {method} {points[-1]}")


# ---- part: init (which block the replacement layer starts from) ------------------------------------------
INITS = ["first_removed", "last_removed", "mean_removed"]


def part_init() -> None:
    """The replacement layer at the budget with each ``init`` rule, from one capture of the run."""
    base, tok = load_dense()
    run = removed_blocks(base, tok)
    settings = METHODS["replace"]
    todo = [i for i in INITS if not cached(f"init-{i}")]
    if not todo:
        return
    cfg = heal_config(**settings)
    windows, val_windows = training_windows(tok, cfg)
    full = copy.deepcopy(base)
    plan = plan_replacement(full, run, cfg, windows, val_windows)
    for init in todo:
        sub = copy.copy(plan)
        sub.cfg = cfg.model_copy(update={"init": init})
        sub.source_block, sub.init_state = replacement_init(prune.decoder_layers(full), run, init)
        sub.remove = [i for i in run if i != sub.source_block]
        model = copy.deepcopy(base)
        prune.remove_layers(model, sub.remove)
        if sub.init_state is not None:
            prune.decoder_layers(model)[run[0]].load_state_dict(sub.init_state)
        untrained = ppl(model, tok)["perplexity"]
        rec = heal_replacement(model, sub)
        store(f"init-{init}", {"init": init, "perplexity": ppl(model, tok), "untrained_perplexity": untrained,
                               "healing": rec})
        log(f"init {init}: ppl {cached(f'init-{init}')['perplexity']['perplexity']:.2f} (untrained {untrained})")
        del model


# ---- part: lm-eval ---------------------------------------------------------------------------------------
def part_lmeval() -> None:
    from prune.measure.lmeval import evaluate_tasks

    base, tok = load_dense()
    run = removed_blocks(base, tok)
    for case in ["dense", *METHODS, "pruned"]:
        if cached(f"{case}.lmeval"):
            continue
        if case == "pruned" and reuse_quality_lmeval(run):
            continue
        if case == "dense":
            model = base
        elif case == "pruned":
            model = copy.deepcopy(base)
            prune.remove_layers(model, run)
        else:
            if not (CACHE / "models" / case).is_dir():
                log(f"skip {case}: no healed checkpoint yet (run --part train)")
                continue
            model, tok, _ = prune.load(CACHE / "models" / case, dtype="float32")
        log(f"lm-eval {case}")
        t = time.time()
        res = evaluate_tasks(model, tok, TASKS, limit=LIMIT, batch_size=16, seed=0, data_dir_path=DATA, progress=False,
                             local_alias=True)
        store(f"{case}.lmeval", {"case": case, "tasks": res, "seconds": round(time.time() - t, 1)})
        log(f"lm-eval {case}: " + ", ".join(f"{k} {headline(v):.3f}" for k, v in res.items()))


def reuse_quality_lmeval(run) -> bool:
    """The pruned model is the quality benchmark's `contiguous angular` k = 7 case, evaluated with the same
    tasks, limit, batch size and seed: reuse its cached result instead of computing it twice."""
    other = ROOT / "bench_cache" / "quality" / "lmeval" / ("-".join(str(i) for i in sorted(run)) + ".json")
    data = json.loads(other.read_text()) if other.is_file() else None
    if not data or data.get("limit") != LIMIT or not all(t in data["tasks"] for t in TASKS):
        return False
    tasks = {t: {k: v for k, v in data["tasks"][t].items() if k in ("metrics", "stderr", "n")} for t in TASKS}
    store("pruned.lmeval", {"case": "pruned", "tasks": tasks, "from": str(other.relative_to(ROOT)),
                            "seconds": round(sum(data["tasks"][t].get("seconds", 0) for t in TASKS), 1)})
    log(f"lm-eval pruned: reused {other.relative_to(ROOT)}")
    return True


def headline(task_result: dict) -> float:
    m = task_result["metrics"]
    return m.get("acc_norm", m["acc"]) if "acc_norm" in m else m["acc"]


def metric_name(task: str) -> str:
    return "acc_norm" if task == "hellaswag" else "acc"


# ---- part: report ------------------------------------------------------------------------------------------
def part_report() -> None:
    dense = cached("dense")
    cases = [c for c in ["dense", "pruned", *METHODS] if cached(c)]
    d_ppl = dense["perplexity"]["perplexity"]
    d_lm = cached("dense.lmeval")
    lines = ["| model | blocks | params | trained params | healing time | WikiText-2 ppl | x dense | "
             + " | ".join(f"{t} ({metric_name(t)})" for t in TASKS) + " | MC retained |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(TASKS) + "---:|"]
    for c in cases:
        r = cached(c)
        heal = r.get("healing") or {}
        p = r["perplexity"]["perplexity"]
        lm = cached(f"{c}.lmeval")
        cells, ratios = [], []
        for t in TASKS:
            if lm and t in lm["tasks"]:
                res = lm["tasks"][t]
                metric = metric_name(t)
                err = res["stderr"].get(metric)
                cells.append(f"{res['metrics'][metric]:.3f} ± {err:.3f}" if err is not None else f"{res['metrics'][metric]:.3f}")
                if d_lm:
                    ratios.append(res["metrics"][metric] / d_lm["tasks"][t]["metrics"][metric])
            else:
                cells.append("-")
        retained = f"{100 * sum(ratios) / len(ratios):.1f}%" if len(ratios) == len(TASKS) else "-"
        trained = f"{heal['trainable_parameters']:,}" if heal else "-"
        secs = f"{heal['seconds'] / 60:.1f} min" if heal else "-"
        lines.append(f"| {c} | {r['layers']} | {r['params'] / 1e6:.1f}M | {trained} | {secs} | {p:.2f} | x{p / d_ppl:.2f} | "
                     + " | ".join(cells) + f" | {retained} |")
    table = "\n".join(lines)
    print(table)
    docs = [table]
    curve = cached("curve")
    if curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = curve["points"]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot([p["tokens"] for p in pts], [p["perplexity"] for p in pts], "o-", label=f"{curve['method']} (healed)")
        ax.axhline(d_ppl, color="k", ls="--", lw=1, label=f"dense ({d_ppl:.1f})")
        ax.axhline(2 * d_ppl, color="g", ls=":", lw=1, label=f"target 2x dense ({2 * d_ppl:.1f})")
        pr = cached("pruned")["perplexity"]["perplexity"]
        ax.axhline(pr, color="r", ls="--", lw=1, label=f"pruned, not healed ({pr:.1f})")
        ax.axvline(BUDGET, color="grey", lw=0.8, label=f"the fixed budget ({BUDGET:,} tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens (C4)")
        ax.set_ylabel("WikiText-2 perplexity (64 x 512 tokens)")
        ax.set_title(f"SmolLM2-135M-Instruct, blocks 12-18 removed: {curve['method']}")
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        IMG.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(IMG, dpi=110)
        print(f"curve: {IMG}")
        for p in pts:
            print(f"  {p['tokens']:>7} tokens: ppl {p['perplexity']:.2f} (x{p['perplexity'] / d_ppl:.2f} dense)")
        docs += ["", f"Perplexity against training tokens, `{curve['method']}` (each point a separate run from the "
                 "pruned model, same settings, steps scaled with the tokens):", "",
                 "| training tokens | steps | WikiText-2 ppl | x dense | healing time |", "|---:|---:|---:|---:|---:|"]
        docs += [f"| {p['tokens']:,} | {p['steps']} | {p['perplexity']:.2f} | x{p['perplexity'] / d_ppl:.2f} | "
                 f"{p['seconds'] / 60:.1f} min |" for p in pts]
        docs += ["", "![perplexity vs training tokens](img/heal_curve.png)"]
    inits = [cached(f"init-{i}") for i in INITS]
    if all(inits):
        rows = ["| init | ppl before training | ppl after | val MSE before -> after |", "|---|---:|---:|---:|"]
        for r in inits:
            rep = r["healing"]["replacement"]
            rows.append(f"| {r['init']} | {r['untrained_perplexity']:.2f} | {r['perplexity']['perplexity']:.2f} | "
                        f"{rep['val_mse_before']:.2f} -> {rep['val_mse_after']:.2f} |")
        print("\n".join(rows))
        table += "\n\n" + "\n".join(rows)
        docs += ["", "Replacement block: which removed block to start from (same budget):", "", *rows]
    (CACHE / "table.md").write_text(table + "\n")
    write_docs("\n".join(docs))


PART_OF_BLOCK = {"bench_heal": "report", "bench_heal_distill": "distill_report",
                 "bench_heal_distill_more": "distill_report --block bench_heal_distill_more",
                 "bench_heal_distill_partial": "distill_report --block bench_heal_distill_partial",
                 "bench_heal_paired": "distill_paired_report",
                 "bench_heal_matrix": "distill_matrix",
                 "bench_heal_matrix_131k": "distill_matrix --block bench_heal_matrix_131k --goals",
                 "bench_heal_full_131k": "distill_matrix --block bench_heal_full_131k --goals",
                 "bench_heal_bridge_131k": "distill_matrix --block bench_heal_bridge_131k --goals",
                 "bench_heal_bridgedown_131k": "distill_matrix --block bench_heal_bridgedown_131k --goals",
                 "bench_heal_bridge_cuts": "bridge_cuts", "bench_heal_bridge_weights": "bridge_weights",
                 "bench_heal_bridge_sets": "bridge_sets",
                 "bench_heal_bridge_auto": "bridge_auto",
                 "bench_heal_mc_curve": "mc_curve", "bench_heal_seeds": "seeds",
                 "bench_heal_questions": "questions", "bench_heal_heldout_windows": "heldout_windows",
                 "bench_heal_averages": "averages", "bench_heal_teacher": "teacher",
                 "bench_heal_recipe_variants": "recipe_variants",
                 "bench_heal_variants": "distill_variants", "bench_heal_lastword": "lastword_report",
                 "bench_heal_paired_partial": "distill_paired_report --block bench_heal_paired_partial"}


def publish(lines: list[str], block: str) -> None:
    """Print a part's table and write it into docs/BENCHMARKS.md's ``block``."""
    print("\n".join(lines))
    write_docs("\n".join(lines), block)


def write_docs(body: str, block: str = "bench_heal") -> None:
    """Replace the generated ``block`` of docs/BENCHMARKS.md ("Healing") with ``body``."""
    from docs_block import DOCS, replace_block

    if not replace_block(block, body, f"python scripts/bench_heal.py --part {PART_OF_BLOCK[block]}", "bench_cache/heal/"):
        log(f"{DOCS} has no <!-- {block}:begin --> ... <!-- {block}:end --> block: tables not written there")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["train", "curve", "init", "lmeval", "distill", "distill_lmeval", "distill_report",
                                       "distill_paired", "distill_paired_report", "distill_matrix", "distill_variants", "distill_pair", "hidden_scale", "bridge", "bridge_cuts", "bridge_sets", "bridge_weights", "bridge_auto", "window_kl", "lastword", "lastword_report", "mc_curve", "seeds", "questions", "heldout_windows", "soup", "averages", "teacher_text", "teacher", "recipe_variants", "report", "all"],
                    default="all")
    ap.add_argument("--budgets", default=None, help="--part distill: comma-separated token budgets (default 8192,32768,131072)")
    ap.add_argument("--only", default=None, help="--part distill / distill_paired: only the cases whose name contains this (e.g. lm-partial; "
                    "distill_paired: or any of its comma-separated parts, e.g. dense,lm0.4-seed2); --part window_kl: the "
                    "comma-separated cases")
    ap.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                    help="--part distill: change these settings (VARIANTS) and add +NAME to the case names")
    ap.add_argument("--keep", action="store_true", help="--part distill --variant: keep the checkpoint at every budget "
                    "(for the paired lm-eval; by default a variant keeps only its 131k-token one)")
    ap.add_argument("--block", default=None, help="--part distill_report / distill_paired_report: the docs block to write")
    ap.add_argument("--goals", action="store_true", help="--part distill_matrix: add the goals table after the matrix")
    ap.add_argument("--seeds", default=None, help="--part soup: comma-separated seeds of --variant to average (default 2,3,4,5,6)")
    ap.add_argument("--limit", type=int, default=None, help="--part distill_paired / questions: questions per task "
                    f"(distill_paired: default {LIMIT}, more go to bench_cache/heal/lmeval-n<limit>; questions: default "
                    "2400, every question of ARC-Easy, PIQA and WinoGrande, the first 2,400 of HellaSwag)")
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="--part distill_pair: compare case B against case A")
    args = ap.parse_args()
    started = time.time()
    parts = ["train", "curve", "init", "report", "lmeval", "report"] if args.part == "all" else [args.part]
    for part in parts:
        log(f"part {part}")
        if part == "distill_report":
            part_distill_report(args.block or "bench_heal_distill")
        elif part == "distill_variants":
            part_distill_variants(args.block or "bench_heal_variants")
        elif part == "distill_matrix":
            part_distill_matrix(args.block or "bench_heal_matrix", args.goals)
        elif part == "distill_paired_report":
            part_distill_paired_report(args.block or "bench_heal_paired")
        elif part == "heldout_windows":
            part_heldout_windows()
        elif part == "questions":
            part_questions(args.variant or "batch1-r64-bridgedown-lm0.4", args.limit or 2400)
        elif part == "distill_paired":
            part_distill_paired(args.only, args.limit or LIMIT)
        elif part == "lastword":
            part_lastword(args.only)
        elif part == "mc_curve":
            part_mc_curve(args.variant or "batch1-r64-bridgedown")
        elif part == "lastword_report":
            part_lastword_report(args.block or "bench_heal_lastword")
        elif part == "window_kl":
            if not args.only:
                raise SystemExit("--part window_kl needs --only NAME[,NAME...] (saved cases, or bridge-<down|linear>-<uniform|rms>)")
            part_window_kl(args.only.split(","))
        elif part == "bridge_sets":
            part_bridge_sets(args.only)
        elif part == "distill_pair":
            if not args.pair:
                raise SystemExit("--part distill_pair needs --pair A B (two case names, both lm-evaluated)")
            part_distill_pair(args.pair)
        elif part == "soup":
            part_soup(args.variant or "batch1-r64-bridgedown-lm0.4",
                      tuple(int(x) for x in args.seeds.split(",")) if args.seeds else (2, 3, 4, 5, 6),
                      int(args.budgets) if args.budgets else GOAL_TOKENS)
        elif part == "distill":
            part_distill([int(b) for b in args.budgets.split(",")] if args.budgets else DISTILL_BUDGETS, args.only,
                         args.variant, args.keep)
        else:
            globals()[f"part_{part}"]()
    log(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
