#!/usr/bin/env python
"""GPU checks of the scale work (issue 4); run through scripts/device_check_scale.sh.

    python3 scripts/device_check_scale.py text DIR     # a text corpus for the tests if WikiText-2 is absent
    python3 scripts/device_check_scale.py timing OUT   # GPU timing, written to OUT/gpu_scale.json

``timing`` builds a random Llama-shaped model (24 blocks, hidden 2048, 1.1B parameters,
bfloat16) on the GPU and times, in one process with CUDA synchronisation, a bare forward
(full model and ``model.base_model``), ``prune.score`` with BI + angular and with the full
CKA matrix + MSRS, and the ``output_hidden_states=True`` approach, over 64 windows x 256
random tokens, batch 8 (best of 3 interleaved rounds; peak GPU memory above the model per
method). Then it saves the model as safetensors shards and compares sequential scoring on
the GPU (``execution: sequential``) with in-memory scoring: time and largest score difference.
Needs only torch, transformers, accelerate (no datasets, lm-eval, gguf, pydantic).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def make_text(folder: str) -> None:
    """Write ``wikitext2_raw/wiki.test.raw`` under ``folder`` from the docstrings of Python's
    standard library (real English text, ~500k characters) for the tokenizer of the tests, and
    ``c4/c4_web_1480.jsonl`` (the healing tests' training text) from the same docstrings, each
    split in two as ``{"prefix", "gold_completion"}``."""
    import sysconfig

    target = Path(folder) / "wikitext2_raw" / "wiki.test.raw"
    target.parent.mkdir(parents=True, exist_ok=True)
    lines, docs, size = [], [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    lines += [" " + line.strip() for line in doc.splitlines() if line.strip()] + [""]
                    docs.append(" ".join(line.strip() for line in doc.splitlines() if line.strip()))
                    size += len(doc)
        if size > 600_000:
            break
    target.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {target} ({size:,} characters from stdlib docstrings)")
    records = [{"prefix": d[: len(d) // 2].strip(), "gold_completion": d[len(d) // 2:].strip()} for d in docs]
    c4 = Path(folder) / "c4" / "c4_web_1480.jsonl"
    c4.parent.mkdir(parents=True, exist_ok=True)
    c4.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {c4} ({len(records):,} records)")


def timing(out: str) -> None:
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0

    def allocated() -> int:
        return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    def reset() -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
    from transformers import LlamaConfig, LlamaForCausalLM

    import prune
    from bench_scale import method_fns
    from prune.measure.sequential import score_sequential

    small = os.environ.get("DEVICE_CHECK_SMALL") == "1"  # a CPU dry run of this script, not a result
    assert small or torch.cuda.is_available(), "no CUDA GPU"
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cuda = dev.type == "cuda"
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2) if small else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                         initializer_range=0.02, **size)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()  # rotary buffers stay float32
    params = sum(p.numel() for p in model.parameters())
    windows = torch.randint(3, config.vocab_size, (64, 256), generator=torch.Generator().manual_seed(0)).to(dev)
    fns = method_fns(model, windows)
    from prune.core import metrics as M

    def cpu_chunk(fn):  # the same method with the CPU's 32-token cosine chunks (the default before)
        def run():
            budget, M.DEVICE_CHUNK_BYTES = M.DEVICE_CHUNK_BYTES, 0
            try:
                fn()
            finally:
                M.DEVICE_CHUNK_BYTES = budget
        return run
    fns.update({f"{k}_chunk32": cpu_chunk(fns[k]) for k in ("score_bi_angular", "score_full")})
    fns["forward_base"]()
    sync()
    times = {k: [] for k in fns}
    memory = {}
    for r in range(3):
        for name, fn in fns.items():
            sync()
            reset()
            before = allocated()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
            memory[name] = max(memory.get(name, 0), peak() - before)
    best = {k: min(v) for k, v in times.items()}
    result = {"gpu": torch.cuda.get_device_name(dev) if cuda else "cpu (dry run)", "torch": torch.__version__, "parameters": params,
              "dtype": "bfloat16", "windows": 64, "seq_len": 256, "batch_size": 8, "times": times,
              "peak_memory_above_model": memory,
              "ratios_vs_base_forward": {k: v / best["forward_base"] for k, v in best.items()},
              "ratios_vs_full_forward": {k: v / best["forward_full"] for k, v in best.items()}}
    print(f"{params / 1e9:.2f}B parameters, bf16, {result['gpu']}")
    for k, v in best.items():
        print(f"  {k:26s} {v * 1000:8.1f} ms   x{v / best['forward_base']:.2f} of base forward   "
              f"x{v / best['forward_full']:.2f} of full forward   peak +{memory[k] / 2**20:,.0f} MiB")

    folder = Path(tempfile.mkdtemp(prefix="prune-gpu-llama-"))
    try:
        model.save_pretrained(folder, max_shard_size="1GB")
        w = windows[:16].cpu()
        sync()
        started = time.perf_counter()
        a = prune.score(model, w, batch_size=8, progress=False)
        sync()
        t_mem = time.perf_counter() - started
        del model, fns
        reset()
        started = time.perf_counter()
        b = score_sequential(folder, w, batch_size=8, device=dev, progress=False)
        sync()
        t_seq = time.perf_counter() - started
        diff = max(max(abs(x - y) for x, y in zip(a.block_influence, b.block_influence)),
                   max(abs(x - y) for ra, rb in zip(a.cka, b.cka) for x, y in zip(ra, rb)),
                   max(abs(x - y) for ra, rb in zip(a.angular, b.angular) for x, y in zip(ra, rb)))
        result["sequential"] = {"windows": 16, "in_memory_seconds": t_mem, "sequential_seconds": t_seq,
                                "peak_gpu_memory": peak(), "max_score_diff": diff}
        print(f"sequential on GPU: {t_seq:.1f} s vs in-memory {t_mem:.2f} s (16 windows; includes reading "
              f"{sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**30:.1f} GiB of shards); peak GPU "
              f"memory {result['sequential']['peak_gpu_memory'] / 2**30:.2f} GiB; largest score difference {diff:.1e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_scale.json").write_text(json.dumps(result, indent=1))


def multi(out: str) -> None:
    """Scoring and perplexity of a random 1.1B Llama (float32, seed 0) on one GPU per process:
    run alone and under ``accelerate launch --multi_gpu --num_processes N``; rank 0 writes
    ``$OUT/multi_gpu_<N>.json`` (scores, perplexity, seconds) for the shell script to compare."""
    import json
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import prune
    from prune.core import dist
    from prune.measure.perplexity import perplexity

    w = dist.world()
    small = os.environ.get("DEVICE_CHECK_SMALL") == "1"
    dev = torch.device("cuda", w.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2) if small else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                         initializer_range=0.02, **size)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()
    windows = torch.randint(3, config.vocab_size, (64, 256), generator=torch.Generator().manual_seed(0))
    prune.score(model, windows[:8], batch_size=8, progress=False)  # warm-up
    dist.barrier()
    t = time.perf_counter()
    scores = prune.score(model, windows, batch_size=8, progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    score_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=8)
    dist.barrier()
    ppl_s = time.perf_counter() - t
    if w.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"multi_gpu_{w.size}.json").write_text(json.dumps({
            "processes": w.size, "scoring_seconds": score_s, "perplexity_seconds": ppl_s,
            "perplexity": ppl["perplexity"], "block_influence": scores.block_influence, "angular": scores.angular,
            "cka": scores.cka, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}))


if __name__ == "__main__":
    {"text": make_text, "timing": timing, "multi": multi}[sys.argv[1]](sys.argv[2])
