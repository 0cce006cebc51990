"""How long the Llama-3.1-8B recipes take on one GPU: their stages timed on their own settings.

The GPU machines this project borrows reach no network, so the model is Llama-3.1-8B's
architecture (the values of its public config.json, ``LLAMA_31_8B`` below) with random
weights: time and memory depend on shapes, not on values. Every stage runs the toolkit's own
code with the settings read from the recipes (recipes/llama3.1-8b-distill.yaml and
recipes/llama3.1-8b-angular-25pct.yaml):

* scoring: ``prune.score`` over the recipe's calibration windows (128 x 1024 tokens) and the
  recipe's selection (contiguous angular, a quarter of the blocks);
* healing, one variant at a time, each on a fresh copy of the full model: ``prepare`` (the
  teacher: a copy in memory, or the top-k cache built), the surgery, then ``--steps``
  optimizer steps of the recipe's batch (2 x 4 windows of 1024 tokens) through the same
  functions the recipe calls, timed per step. Variants: distillation with the teacher in
  memory (what ``teacher: auto`` picks on this GPU), distillation from the top-64 cache, and
  the next-token LoRA recipe;
* the before/after perplexity pass (``prune.measure.perplexity.nll_sum``) over as many 2048-token
  windows as WikiText-2's test split gives Llama-3's tokenizer (``EVAL_WINDOWS``), side by side
  with the pass as it was (one float32 cross-entropy over the whole batch, ``whole_batch_nll``);
* the least-squares bridges (``bridge: linear`` / ``down``, commented out in the distill recipe)
  fitted on the original over ``BRIDGE_WINDOWS`` windows, two sizes: a fixed part (the solve)
  and a time per token.

The expected time of a whole recipe is then the measured parts scaled to the recipe's sizes:
the median step (steps 3 onward) x the recipe's steps, the teacher cache's time per token x
its tokens. lm-eval's tasks are not timed here (lm-eval is not installed on those machines).
The training text is random token ids (the recipes' WikiText-103 is not on the machine).

    bash scripts/device_wheels.sh                                     # here: the wheels the GPU image lacks, in .whl
    source scripts/device_env.sh && python3 scripts/bench_gpu_recipe.py --out $OUT/bench_gpu.json --steps 12   # there
    python scripts/bench_gpu_recipe.py --tiny --out /tmp/tiny.json    # the same path on CPU, tiny shapes

Peak memory is ``torch.cuda.max_memory_allocated`` during the stage less the bench's own
copy of the full model (a recipe run does not hold one), so it is what the recipe would need.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_env import ROOT  # first: the offline environment and sys.path

import torch  # noqa: E402

from prune.choose.registry import choose  # noqa: E402
from prune.heal import distill as D  # noqa: E402
from prune.heal.teacher import model_bytes  # noqa: E402
from prune.heal.methods import HealPlan, heal_lora  # noqa: E402
from prune.heal.bridge import fit_bridges  # noqa: E402
from prune.measure.perplexity import nll_sum  # noqa: E402
from prune.measure.scoring import score  # noqa: E402
from prune.model.loading import decoder_layers  # noqa: E402
from prune.model.surgery import remove_layers  # noqa: E402
from prune.pipeline.engines import score_options  # noqa: E402
from prune.pipeline.recipe import load_recipe  # noqa: E402

DISTILL_RECIPE = ROOT / "recipes" / "llama3.1-8b-distill.yaml"
LORA_RECIPE = ROOT / "recipes" / "llama3.1-8b-angular-25pct.yaml"
#: meta-llama/Llama-3.1-8B's config.json (the architecture values)
LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, attention_bias=False, mlp_bias=False)
#: the same path on CPU in a minute (``--tiny``): a 6-block Llama with a small vocabulary
TINY = dict(LLAMA_31_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2)
#: WikiText-2's test split in Llama-3's tokenizer is about 290k tokens: 141 windows of 2048
EVAL_WINDOWS = 141
WARMUP_STEPS = 2
#: windows of the recipe's heal length over which the least-squares bridges are fitted: two sizes
#: give the time per token and the fixed part (the solve)
BRIDGE_WINDOWS = (16, 48)


def word_tokenizer(vocab_size: int):
    """A real fast tokenizer with ``vocab_size`` entries (the teacher cache records its fingerprint)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")


def build_model(shape: dict, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stage:
    """Wall time and peak memory (less ``held`` bytes the bench keeps) of one stage."""

    def __init__(self, device: torch.device, held: int = 0):
        self.device, self.held = device, held

    def __enter__(self):
        allocated_gib(self.device, self.held, reset=True)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = round(time.perf_counter() - self.started, 2)
        self.peak_gib = peak_gib(self.device, self.held)
        return False


def allocated_gib(device: torch.device, held: int, reset: bool = False) -> float | None:
    """GiB allocated now less ``held`` (after a sync); ``reset``: the peak counts from here."""
    sync(device)
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return round((torch.cuda.memory_allocated(device) - held) / 2**30, 2)


def peak_gib(device: torch.device, held: int) -> float | None:
    return round((torch.cuda.max_memory_allocated(device) - held) / 2**30, 2) if device.type == "cuda" else None


def random_windows(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def whole_batch_nll(model, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """The perplexity pass as it was before 2026-12-04: one float32 cross-entropy over the whole batch."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(model.device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
    return total, count


def heal_variant(name: str, original, tokenizer, cfg, removed: list[int], steps: int, device, held: int) -> dict:
    """``prepare`` / surgery / ``steps`` optimizer steps of ``cfg`` on a fresh copy of ``original``."""
    cfg = cfg.model_copy(update={"steps": steps, "n_samples": steps * cfg.batch_size * cfg.gradient_accumulation})
    windows = random_windows(cfg.n_samples, cfg.seq_len, original.config.vocab_size, seed=1)
    val = random_windows(cfg.val_samples, cfg.seq_len, original.config.vocab_size, seed=2)
    model = copy.deepcopy(original)
    out = {"variant": name, "objective": cfg.objective, "teacher": cfg.teacher if cfg.objective == "distill" else None,
           "steps_timed": steps, "windows_per_step": cfg.batch_size * cfg.gradient_accumulation, "seq_len": cfg.seq_len}
    with tempfile.TemporaryDirectory() as tmp, Stage(device, held) as whole:
        with Stage(device, held) as prep:
            if cfg.objective == "distill":
                plan = D.prepare(model, tokenizer, removed, cfg, windows, val, out_dir=Path(tmp) / "out",
                                 source_name="Llama-3.1-8B architecture, random weights", quiet=True)
                teacher = plan.extra["teacher"]
                out["teacher_source"] = teacher.kind
                if teacher.cache is not None:
                    out["cache_bytes"] = teacher.cache.bytes
                    out["cache_tokens"] = int(windows.numel() + val.numel())
            else:
                plan = HealPlan(cfg, list(removed), windows, val)
        out["prepare_seconds"] = prep.seconds
        remove_layers(model, plan.remove)
        out["after_surgery_gib"] = allocated_gib(device, held, reset=True)  # the pruned model (+ the teacher copy)
        stamps: list[float] = []

        def tick(step: int, tokens: int) -> None:
            sync(device)
            stamps.append(time.perf_counter())
            out["train_peak_gib"] = peak_gib(device, held)

        started = time.perf_counter()
        if cfg.objective == "distill":
            record = D.heal_distill(model, cfg, windows, val, plan.extra["teacher"], quiet=True, callback=tick)
        else:
            record = heal_lora(model, cfg, windows, val, quiet=True, callback=tick)
        plan.extra.clear()
    steps_s = [b - a for a, b in zip([started] + stamps[:-1], stamps)]
    out.update(step_seconds=[round(s, 3) for s in steps_s], step_median=round(statistics.median(steps_s[WARMUP_STEPS:] or steps_s), 3),
               heal_seconds=record["seconds"], train_seconds=record["train_seconds"], total_seconds=whole.seconds,
               peak_gib=whole.peak_gib, loss_first=record["loss_first"], loss_last=record["loss_last"],
               blocks_after=len(decoder_layers(model)), trainable_parameters=record["trainable_parameters"])
    if "distill" in record:
        out.update(kl_before=record["distill"]["kl_before"], kl_after=record["distill"]["kl_after"])
    del model, plan, record
    gc.collect()  # the distilled / healed copy, before the next variant (needed before the training loop's fix of 2026-12-04)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file written after every stage")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps timed per healing variant")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (checks the path on CPU)")
    ap.add_argument("--only", default="", help="comma-separated stages: score,distill-memory,distill-cache,lm,eval,bridge")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else LLAMA_31_8B
    only = set(filter(None, args.only.split(",")))
    distill_recipe, lora_recipe = load_recipe(DISTILL_RECIPE), load_recipe(LORA_RECIPE)
    result: dict = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "shape": "tiny" if args.tiny else "Llama-3.1-8B", "stages": {}}
    import transformers

    result["transformers"] = transformers.__version__
    out = Path(args.out)

    def write() -> None:
        out.write_text(json.dumps(result, indent=1))

    with Stage(device) as build:
        original = build_model(shape, device)
    held = model_bytes(original)
    result["stages"]["build"] = {"seconds": build.seconds, "model_gib": round(held / 2**30, 2)}
    tokenizer = word_tokenizer(shape["vocab_size"])
    write()
    c = distill_recipe.calibration
    calib = random_windows(c.n_samples, c.seq_len, shape["vocab_size"], seed=0)
    removed = list(range(3, 3 + round(shape["num_hidden_layers"] * distill_recipe.select.fraction)))
    if not only or "score" in only:
        with Stage(device, held) as st:
            scores = score(original, calib, **score_options(distill_recipe, quiet=True))
            selection = choose(distill_recipe.select, scores, model=original, tokenizer=tokenizer, windows=calib,
                               calibration=c, score=distill_recipe.score, quiet=True)
        removed = list(selection.removed)
        result["stages"]["score"] = {"seconds": st.seconds, "peak_gib": st.peak_gib, "windows": c.n_samples,
                                     "seq_len": c.seq_len, "metrics": list(distill_recipe.score.metrics), "removed": removed}
        write()
    variants = [("distill-memory", distill_recipe.heal.model_copy(update={"teacher": "auto"})),
                ("distill-cache", distill_recipe.heal.model_copy(update={"teacher": "cache"})),
                ("lm", lora_recipe.heal)]
    for name, cfg in variants:
        if only and name not in only:
            continue
        try:
            result["stages"][name] = heal_variant(name, original, tokenizer, cfg, removed, args.steps, device, held)
        except Exception as exc:  # keep the other stages' figures
            result["stages"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        write()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not only or "eval" in only:
        p = distill_recipe.evaluate.perplexity
        windows = random_windows(EVAL_WINDOWS if not args.tiny else 4, p.seq_len, shape["vocab_size"], seed=3)
        for name, fn in (("eval_perplexity", nll_sum), ("eval_perplexity_whole_batch", whole_batch_nll)):
            with Stage(device, held) as st:
                nll, _ = fn(original, windows, batch_size=p.batch_size)
            result["stages"][name] = {"seconds": st.seconds, "peak_gib": st.peak_gib, "windows": int(windows.shape[0]),
                                      "seq_len": p.seq_len, "batch_size": p.batch_size, "nll_sum": nll}
            write()
    if not only or "bridge" in only:
        h = distill_recipe.heal
        for kind in ("linear", "down"):
            for n in BRIDGE_WINDOWS if not args.tiny else (2, 4):
                windows = random_windows(n, h.seq_len, shape["vocab_size"], seed=4)
                with Stage(device, held) as st:
                    fit_bridges(original, removed, windows, h.batch_size, kind=kind)
                result["stages"][f"bridge_{kind}_{n}"] = {"seconds": st.seconds, "peak_gib": st.peak_gib,
                                                          "tokens": int(windows.numel()), "batch_size": h.batch_size}
                write()
    result["expected"] = expected(result["stages"], distill_recipe, lora_recipe)
    write()
    print(json.dumps(result, indent=1))


def expected(stages: dict, distill_recipe, lora_recipe) -> dict:
    """The recipes' heal time from the measured parts: median step x steps (+ the cache per token)."""
    out = {}
    for name, recipe in (("distill-memory", distill_recipe), ("distill-cache", distill_recipe), ("lm", lora_recipe)):
        s = stages.get(name)
        if not s or "step_median" not in s:
            continue
        h = recipe.heal
        seconds = s["step_median"] * h.steps
        row = {"steps": h.steps, "train_seconds": round(seconds), "peak_gib": s["peak_gib"],
               "train_peak_gib": s.get("train_peak_gib")}
        if s.get("cache_tokens"):
            tokens = (h.n_samples + h.val_samples) * h.seq_len
            row["cache_seconds"] = round(s["prepare_seconds"] * tokens / s["cache_tokens"])
            row["cache_gib"] = round(s["cache_bytes"] * tokens / s["cache_tokens"] / 2**30, 2)
        out[name] = row
    tokens = distill_recipe.heal.n_samples * distill_recipe.heal.seq_len
    for kind in ("linear", "down"):
        sizes = sorted((v for k, v in stages.items() if k.startswith(f"bridge_{kind}_")), key=lambda v: v["tokens"])
        if len(sizes) >= 2:
            small, large = sizes[0], sizes[-1]
            per_token = (large["seconds"] - small["seconds"]) / (large["tokens"] - small["tokens"])
            fixed = max(small["seconds"] - per_token * small["tokens"], 0.0)
            out[f"bridge_{kind}"] = {"tokens": tokens, "seconds": round(fixed + per_token * tokens), "fixed_seconds": round(fixed, 1),
                                     "peak_gib": large["peak_gib"]}
    if "distill-memory" in out and "lm" in out:
        out["distill_over_lm_step"] = round(stages["distill-memory"]["step_median"] / stages["lm"]["step_median"], 2)
    return out


if __name__ == "__main__":
    main()
