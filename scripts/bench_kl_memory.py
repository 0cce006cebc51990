"""Memory and time of the distillation loss with the teacher in memory: the chunked KL against the plain formula.

``prune.heal.distill.kl_loss`` computes ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` a chunk of
token positions at a time and writes its gradient in the same pass; the plain formula
(``plain_kl`` below, the loss as it was before 2026-12-04) builds float32 ``[tokens, vocab]``
log-softmaxes of both sides and keeps two of them for the backward pass. Each case runs in a fresh
process (forward + backward of the loss alone, on random logits of the recipes' shapes); the peak
is the process's resident high-water mark (VmHWM, reset once the logits exist) less its resident size then,
with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed blocks leave the
process, as the CUDA allocator frees them to its cache. The time (the best of ``REPEATS``) comes
from a second process under glibc's default allocator (the fixed threshold makes every
allocation fault its pages in anew).

    python scripts/bench_kl_memory.py          # a table on stdout (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_env import no_flags  # first: the offline environment and sys.path
#: (label, batch, seq_len, vocab, dtype): the SmolLM2 distill recipe's batch on CPU, and the
#: Llama-3.1-8B distill recipe's micro-batch (bf16 logits under mixed precision)
SHAPES = [("SmolLM2 recipe: 1 x 2048 x 49,152, float32", 1, 2048, 49152, "float32"),
          ("Llama-3.1-8B recipe: 2 x 1024 x 128,256, bf16", 2, 1024, 128256, "bfloat16")]
REPEATS = 3
TOP_K = 64  # the recipes' heal.top_k
KINDS = [("plain", "chunked"), ("plain-top64", "chunked-top64")]  # teacher in memory; top-k cache


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def plain_kl(student, teacher, temperature: float = 1.0):
    """The loss before 2026-12-04: whole-tensor float32 log-softmaxes, autograd keeps what it needs."""
    import torch.nn.functional as F

    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature ** 2 * (t.exp() * (t - s)).sum(-1).mean()


def plain_topk_kl(student, logprobs, indices, temperature: float = 1.0):
    """The top-k loss before 2026-12-04 (the cache teacher): the student's whole float32 log-softmax."""
    import torch.nn.functional as F

    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, indices.long())
    t = F.log_softmax(logprobs.float() / temperature, dim=-1)
    return temperature ** 2 * (t.exp() * (t - s)).sum(-1).mean()


def one_case(kind: str, batch: int, seq: int, vocab: int, dtype: str) -> dict:
    import torch

    from prune.heal.distill import kl_loss, topk_kl_loss

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    student = (torch.randn(batch, seq, vocab) * 3).to(dt).requires_grad_(True)
    teacher = (torch.randn(batch, seq, vocab) * 3).to(dt)
    if kind.endswith("top64"):  # the cache holds float32 log-probs and int32 ids
        lp, ix = torch.log_softmax(teacher.float(), -1).topk(TOP_K, -1)
        fn, teacher_args = (topk_kl_loss if kind.startswith("chunked") else plain_topk_kl), (lp, ix.to(torch.int32))
        del teacher, lp, ix
    else:
        fn, teacher_args = (kl_loss if kind == "chunked" else plain_kl), (teacher,)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here (after the setup)
    base = rss("VmRSS")
    times = []
    for _ in range(REPEATS):
        student.grad = None
        started = time.perf_counter()
        loss = fn(student, *teacher_args, 1.0)
        loss.backward()
        times.append(time.perf_counter() - started)
    return {"peak_mib": (rss("VmHWM") - base) / 2**20, "seconds": min(times), "loss": float(loss),
            "grad_sum": float(student.grad.double().abs().sum())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(one_case(sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6])))
        return
    no_flags(__doc__)
    plain_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env = dict(plain_env, MALLOC_MMAP_THRESHOLD_="65536")
    print("| logits (one micro-batch) | loss | peak beyond the logits | forward + backward | loss, gradient agree |")
    print("|---|---|---|---|---|")
    for label, b, s, v, dt in SHAPES:
        logits_mib = 2 * b * s * v * (4 if dt == "float32" else 2) / 2**20
        for pair in KINDS:
            rows = {}
            for kind in pair:
                args = [sys.executable, __file__, "--case", kind, str(b), str(s), str(v), dt]
                run = [json.loads(subprocess.run(args, env=e, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                       for e in (env, plain_env)]
                rows[kind] = dict(run[0], seconds=run[1]["seconds"])  # the peak with the fixed threshold, the time without
            p, c = (rows[k] for k in pair)
            agree = (abs(p["loss"] - c["loss"]) <= 1e-4 * abs(p["loss"]) and
                     abs(p["grad_sum"] - c["grad_sum"]) <= 1e-2 * abs(p["grad_sum"]))
            for kind, r in rows.items():
                print(f"| {label} ({logits_mib:,.0f} MiB: student + teacher logits) | {kind} | {r['peak_mib']:,.0f} MiB "
                      f"| {r['seconds']:.2f} s | {'yes' if agree else 'NO'} |")
            print(f"| | {pair[1]} / {pair[0]} | {c['peak_mib'] / p['peak_mib']:.2f}x | {c['seconds'] / p['seconds']:.2f}x | |")


if __name__ == "__main__":
    main()
