"""Healing by distillation from the original model (``heal.objective: distill``).

The objective is separate from WHICH parameters train: the same LoRA (merged), partial
fine-tuning and replacement block as :mod:`prune.heal.methods`, trained to match the original
model (the teacher) instead of the corpus's next tokens. Per batch of windows:

    loss = kl_weight * T^2 * mean_tokens KL(softmax(z_t / T) || softmax(z_s / T))
         + hidden_weight * mean_blocks MSE(h_s[j], h_t[kept[j]])
         + lm_weight * causal-LM loss

with ``z_t`` / ``z_s`` the teacher's / student's logits at every position of the window,
``T = heal.temperature`` (Hinton et al.; the ``T^2`` keeps gradient sizes comparable across
temperatures) and ``h_s[j]`` the output of the pruned model's block ``j``, matched with the
output of the ORIGINAL block it came from (``kept[j]``; a replacement block is matched with
the last block of the run it replaces). ``heal.hidden_loss: relative`` puts
``mean_tokens ||h_s - h_t||^2 / ||h_t||^2`` in place of the MSE: the few positions with massive
activations (mean square ~4,000 on SmolLM2 against ~1-10 elsewhere) then weigh like the rest, and
the term has no scale to tune per model.

Teacher sources (``heal.teacher``):

* ``memory``: a full copy of the original beside the student (exact KL over the whole
  vocabulary; needed for ``hidden_weight``). In a recipe the copy is taken before the surgery.
* ``cache``: the original's top-``k`` log-probs per token (``heal.top_k``), computed ONCE
  before the surgery (or from the source model by ``prune heal``) and written to a safetensors
  file (``heal.teacher_cache``; size reported). The KL is then over ``k + 1`` buckets: the
  teacher's ``k`` tokens and one for the rest of the vocabulary (the teacher's tail mass
  ``1 - sum_topk p_t``, the student's exact mass outside those tokens), the teacher's bucket
  log-masses tempered together (:func:`_topk_chunk`). At T = 1 that is the KL of the two bucketed
  distributions, the measure ``prune compare`` reports (:func:`prune.measure.fidelity.token_kl`):
  0 for a student equal to the teacher and at most the full KL, equal to it when ``k = vocab``
  (tests/test_distill.py states the tolerance). (0.2.0 and before renormalised the teacher over its k
  tokens and the tail ignored: that adds ``-log`` of the student's mass on them, 0.12 nats for a
  perfect student at k = 16, and pulls its tail mass onto the k.) The file also holds the windows it was computed on and the tokenizer's
  fingerprint, so a run that reads it is refused when either differs, or when its tensors do not hold what the
  run reads (:func:`check_tensors`); a file named in ``heal.teacher_cache`` is never replaced (another
  ``k`` than ``heal.top_k``: refused). ``prune heal`` computes
  it from a source safetensors folder ONE BLOCK AT A TIME (:func:`topk_logprobs_sequential`)
  when a copy of the original would not fit beside the student (or with ``teacher: cache``).
* ``auto``: ``memory`` when the free memory of the model's device holds a copy of it with a 25%
  margin (``MARGIN``) and what the in-memory teacher's loss adds over the cache's:
  ``TEACHER_LOGITS`` float32 ``[batch_size, seq_len, vocab]`` tensors (:func:`teacher_need`),
  otherwise ``cache``.

The KL to the teacher before and after healing (T = 1, mean per token over the held-out
windows; top-k estimate with a cache) and the top-1 agreement go into the healing record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prune.core import dist
from prune.core.config import HealConfig
from prune.core.errors import PruneError
from prune.core.records import complement
from prune.measure.fidelity import log1mexp, tail_logmass, top1_agrees
from prune.model.capture import _hidden_from_output, measured_in_eval_mode
from prune.model.loading import decoder_layers, input_device

FORMAT = "prune-teacher-topk/1"
MARGIN = 1.25  # auto: keep a teacher copy when free memory >= MARGIN x its size (+ the logits below)
#: float32 [batch, seq_len, vocab] tensors the in-memory teacher's loss holds beyond the cache's: 0.7
#: measured with the chunked loss on the Llama-3.1-8B recipe on an H200 (bf16, docs/BENCHMARKS.md "The
#: Llama-3.1-8B recipes on a GPU"; 7.1 with the plain loss); 2 covers a float32 teacher's logits too
TEACHER_LOGITS = 2
EVAL_BATCH = 4
TIES = 8  # an in-memory teacher's largest logits checked for ties, as a cache's top k are (top-1 agreement)
#: float32 elements per chunk of :func:`kl_loss` (64 MiB: 512 positions of a 32k vocabulary)
KL_CHUNK = 2 ** 24


# ---- losses --------------------------------------------------------------------------------------
class _ChunkedKL(torch.autograd.Function):
    """``T^2 * mean_t KL(p_t || q_t)``, ``q = softmax(z_s/T)``, in float32 ``rows`` token positions at a
    time. The teacher is its logits (``p = softmax(z_t/T)``) or, with ``indices``, its top-k
    log-probs (k tokens and a tail bucket: :func:`_topk_chunk`). The forward pass
    also writes ``T (q - p)`` (``p`` scattered over the vocabulary; it sums to 1) in the logits' dtype,
    all the backward pass needs (``dL/dz_s = T (q - p) / N`` times the incoming gradient, a loss scale
    under fp16, applied in one float32 product): no float32 ``[tokens, vocab]`` tensor outlives its
    chunk (docs/BENCHMARKS.md: 0.2-0.7x the memory of the plain formula), and neither ``1/N`` nor a
    scale of 65536 is rounded to fp16 on its own (the first underflows, the second overflows)."""

    @staticmethod
    def forward(ctx, student, teacher, indices, temperature: float, rows: int):
        vocab = student.shape[-1]
        s_all, t_all = student.reshape(-1, vocab), teacher.reshape(-1, teacher.shape[-1])
        ix_all = indices.reshape(-1, indices.shape[-1]).long() if indices is not None else None
        n = len(s_all)
        grad = torch.empty_like(s_all) if ctx.needs_input_grad[0] else None
        total = student.new_zeros((), dtype=torch.float64)
        for i in range(0, n, rows):
            s = F.log_softmax(s_all[i:i + rows].float() / temperature, dim=-1)
            if ix_all is None:
                t = F.log_softmax(t_all[i:i + rows].float() / temperature, dim=-1)
                p = t.exp()
                total += t.sub_(s).mul_(p).sum().double()  # p (log p - log q), in place
                q_minus_p = s.exp_().sub_(p) if grad is not None else None
            else:
                total_k, q_minus_p = _topk_chunk(s, t_all[i:i + rows], ix_all[i:i + rows], temperature, grad is not None)
                total += total_k
            if grad is not None:
                grad[i:i + rows] = q_minus_p.mul_(temperature)
        ctx.save_for_backward(grad.view_as(student) if grad is not None else None)
        ctx.positions = n
        return (temperature ** 2 * total / n).float()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * (float(grad_out) / ctx.positions), None, None, None, None


def _topk_chunk(s: torch.Tensor, logp: torch.Tensor, ix: torch.Tensor, temperature: float, with_grad: bool):
    """One chunk of the top-k loss: ``(sum of KL over its rows, q - r or None)``. The buckets are the
    teacher's k tokens and one for the rest; the teacher's bucket log-masses (its log-probs ``logp`` at
    T = 1, the tail ``log(1 - sum exp(logp))``) tempered together, ``b = log_softmax([logp, tail] / T)``,
    against the student's ``q = softmax(z_s / T)`` at the k tokens and its exact mass outside them. At
    T = 1 this is the KL of the two distributions over the k + 1 buckets: 0 for a student equal to
    the teacher, at most the full KL. The gradient is ``T (q - r)``: ``r`` is the teacher's mass at the
    k tokens and its tail mass spread over the other tokens as the student spreads its own."""
    logp = logp.double()
    q_k = s.gather(-1, ix).double()
    if ix.shape[-1] < s.shape[-1]:
        tail_p = log1mexp(torch.logsumexp(logp, -1, keepdim=True))  # -inf where the k hold all the mass
        b = torch.log_softmax(torch.cat([logp, tail_p], -1) / temperature, -1)
        t_k, t_tail = b[:, :-1], b[:, -1]
        q_tail = tail_logmass(s, ix, torch.logsumexp(q_k, -1)).clamp(min=-700.0)
    else:  # the whole vocabulary: no tail bucket
        t_k, t_tail, q_tail = torch.log_softmax(logp / temperature, -1), None, None
    p_k = t_k.exp()
    total = torch.where(torch.isneginf(t_k), torch.zeros_like(t_k), p_k * (t_k - q_k)).sum()
    if t_tail is not None:
        total = total + torch.where(torch.isneginf(t_tail), torch.zeros_like(t_tail), t_tail.exp() * (t_tail - q_tail)).sum()
    if not with_grad:
        return total, None
    q = s.exp()
    if t_tail is None:
        r = s.zero_()  # s is not read again: r in its memory (one [rows, vocab] tensor beside q, as before)
    else:  # the student's tail tokens, scaled to the teacher's tail mass: exp(log q_j + log p_tail - log q_tail)
        r = s.add_((t_tail - q_tail).float().unsqueeze(-1)).exp_()
    r.scatter_(-1, ix, p_k.to(r.dtype))
    return total, q.sub_(r)


def _rows(student_logits: torch.Tensor, rows: int | None) -> int:
    return rows or max(1, KL_CHUNK // student_logits.shape[-1])


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            rows: int | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` averaged over every token position (full
    vocabulary), ``rows`` positions at a time (default: ``KL_CHUNK`` elements): see :class:`_ChunkedKL`."""
    return _ChunkedKL.apply(student_logits, teacher_logits.detach(), None, float(temperature), _rows(student_logits, rows))


def topk_kl_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                 temperature: float = 1.0, rows: int | None = None) -> torch.Tensor:
    """The same with the teacher's top-k log-probs (at T = 1) only: the KL over the k tokens and one
    bucket for the rest of the vocabulary (:func:`_topk_chunk`)."""
    return _ChunkedKL.apply(student_logits, teacher_logprobs.detach(), teacher_indices, float(temperature),
                            _rows(student_logits, rows))


# ---- teacher sources ------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), the first 16 hex digits."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def windows_fingerprint(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def logit_width(model_or_config) -> int:
    """Number of logits per token (the LM head's rows; the config's ``vocab_size`` otherwise)."""
    head = model_or_config.get_output_embeddings() if isinstance(model_or_config, nn.Module) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)


#: the largest top-k log-prob a cache may hold: log-probs are <= 0 (a float32 log-softmax rounds to at most ~1e-7)
LOGPROB_TOL = 1e-3
#: the fix every refusal of a damaged cache names
RECOMPUTE = "delete it to recompute it from the original model, or point heal.teacher_cache elsewhere"


@dataclass
class TopkCache:
    """The teacher's top-k log-probs ``[n, seq_len, k]`` (float32, sorted, largest first) and token
    ids (int32) on the training and held-out windows, as stored in one safetensors file.
    ``meta``: ``format``, ``k``, ``vocab``, ``tokenizer`` (fingerprint), ``windows`` (fingerprint), ...;
    :func:`check_cache` checks all of it, tensors included, against what a run reads."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict
    checked: tuple | None = field(default=None, compare=False, repr=False)  # what check_tensors last passed

    def _meta_int(self, key: str) -> int:
        value = self.meta.get(key)
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number < 1 or isinstance(value, float):
            raise PruneError(f"heal.teacher_cache {self.path}: its metadata {key} is {value!r}, not a positive whole "
                             f"number (a damaged or edited file); {RECOMPUTE}")
        return number

    @property
    def k(self) -> int:
        """Log-probs kept per token (the metadata's ``k``; PruneError when it is not a positive integer)."""
        return self._meta_int("k")

    @property
    def vocab(self) -> int | None:
        """The teacher's logits per token (metadata ``vocab``; None in a file that records none)."""
        return self._meta_int("vocab") if self.meta.get("vocab") not in (None, "") else None

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else sum(t.numel() * t.element_size() for t in self.tensors.values())

    def part(self, val: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = "val_" if val else ""
        return self.tensors[f"{p}input_ids"], self.tensors[f"{p}logprobs"], self.tensors[f"{p}indices"]

    def save(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # each rank of a launch writes its own
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in self.meta.items()})
        os.replace(tmp, self.path)

    @classmethod
    def header(cls, path: str | os.PathLike) -> "TopkCache":
        """The cache file at ``path`` with its metadata and no tensors (what :func:`check_cache` reads),
        from the header alone; PruneError, as :meth:`load`, when it is unreadable or not a cache."""
        return cls._open(path, tensors=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopkCache":
        """The cache file at ``path``, tensors read; PruneError when it is unreadable or not a cache."""
        return cls._open(path, tensors=True)

    @classmethod
    def _open(cls, path: str | os.PathLike, tensors: bool) -> "TopkCache":
        from safetensors import safe_open

        path = Path(path).expanduser()
        try:
            with safe_open(str(path), "pt") as handle:
                meta = dict(handle.metadata() or {})
                read = {k: handle.get_tensor(k) for k in handle.keys()} if tensors and meta.get("format") == FORMAT else {}
        except Exception as exc:  # noqa: BLE001 - a broken / foreign file
            why = " ".join(str(exc).split())[:200]
            raise PruneError(f"heal.teacher_cache {path} is corrupt or unreadable (truncated, damaged, or not a safetensors "
                             f"file: {why}); {RECOMPUTE}") from None
        if meta.get("format") != FORMAT:
            raise PruneError(f"heal.teacher_cache {path} is not a teacher top-k cache ({FORMAT}): it is another file "
                             "(a model's weights?); point heal.teacher_cache at a new path, or at a cache prune wrote")
        return cls(path, read, meta)


@measured_in_eval_mode
def topk_logprobs(model, windows: torch.Tensor, k: int, batch_size: int = EVAL_BATCH,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probs [n, seq_len, k] float32, token ids int32)``: the model's k most likely next
    tokens at every position of ``windows`` (log-softmax over the full vocabulary, T = 1)."""
    from tqdm.auto import tqdm

    values, indices = [], []
    device = input_device(model)
    with torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="teacher top-k", unit="batch", disable=not progress):
            logits = model(input_ids=windows[start:start + batch_size].to(device), use_cache=False).logits
            v, i = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
            values.append(v.cpu())
            indices.append(i.to(torch.int32).cpu())
    return torch.cat(values), torch.cat(indices)


def topk_logprobs_sequential(folder: str | os.PathLike, windows: torch.Tensor, k: int, *, batch_size: int = EVAL_BATCH,
                             windows_per_pass: int = 64, dtype="auto", device: torch.device | str = "cpu",
                             trust_remote_code: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_logprobs` of the safetensors model in ``folder`` holding ONE decoder block in
    memory at a time (the out-of-core execution of :mod:`prune.measure.sequential`): the model's own
    forward records each block's arguments, then block after block runs over the activations of
    ``windows_per_pass`` windows (kept on the CPU), then the final norm and the LM head. Weights are
    read once per pass of ``windows_per_pass`` windows."""
    from tqdm.auto import tqdm

    from prune.measure.sequential import _Recorder, run_block
    from prune.model.capture import batches
    from prune.model.loading import final_norm
    from prune.model.skeleton import Skeleton

    device = torch.device(device)
    sk = Skeleton(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    config = sk.model.config.get_text_config()
    if final_norm(sk.model) is None:
        raise PruneError(f"{folder}: {config.model_type} has no final norm after its blocks: compute its top-k in memory "
                         "(teacher: memory, or load it whole)")
    values, indices = [], []
    passes = range(0, windows.shape[0], windows_per_pass)
    bar = tqdm(total=len(passes) * (len(sk.layers) + 2), desc="teacher top-k (sequential)", unit="step", disable=not progress)
    with torch.no_grad():
        for first in passes:
            parts = list(batches(windows[first:first + windows_per_pass], batch_size))
            sk.load_rest()
            acts, calls = [], {}
            for _, batch in parts:
                with _Recorder(sk.layers, sk.model.config) as rec:
                    sk.model.base_model(input_ids=batch.to(device), use_cache=False)
                if rec.changed or any(c is None for c in rec.calls):
                    raise PruneError(f"{config.model_type}: blocks cannot be run one at a time for this model; "
                                     "compute its top-k in memory")
                calls.setdefault(tuple(batch.shape), rec.calls)
                acts.append(rec.h0.to("cpu"))
            sk.free_rest()
            bar.update(1)
            for index in range(len(sk.layers)):
                block = sk.load_block(index)
                for b, (_, batch) in enumerate(parts):
                    acts[b] = run_block(block, acts[b].to(device), calls[tuple(batch.shape)][index]).to("cpu")
                sk.free_block(index)
                bar.update(1)
            sk.load_rest()
            untied = sk.head is not None and bool(sk.head_keys)
            if untied:
                sk._load(sk.head_keys, sk._params(sk.head), "LM head")  # noqa: SLF001 - the skeleton's own loader
            for (_, batch), hidden in zip(parts, acts):
                logits = tail_logits(sk.model, batch.to(device), hidden.to(device), tied=not untied)
                v, i = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
                values.append(v.cpu())
                indices.append(i.to(torch.int32).cpu())
            sk.free_rest()
            if untied:
                sk._free(sk._params(sk.head))  # noqa: SLF001
            bar.update(1)
    bar.close()
    return torch.cat(values), torch.cat(indices)


def tail_logits(model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor, tied: bool = False) -> torch.Tensor:
    """The logits ``model`` computes from ``hidden``, the state leaving its last block: its own forward with no
    block and its final norm fed ``hidden``, so whatever follows the stack applies as in the model (a final
    softcap, Granite's ``logits_scaling``, Cohere's ``logit_scale``; a plain norm-and-head product left them
    out). ``tied``: the head reads the input embeddings (a skeleton's head may hold no weights of its own)."""
    from prune.model.loading import decoder_layers_path, final_norm

    path = decoder_layers_path(model)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers, head = getattr(parent, name), model.get_output_embeddings()
    own = head.weight
    handle = final_norm(model).register_forward_pre_hook(lambda module, args: (hidden, *args[1:]))
    try:
        setattr(parent, name, nn.ModuleList())
        if tied:
            head.weight = model.get_input_embeddings().weight
        return model(input_ids=input_ids, use_cache=False).logits
    finally:
        handle.remove()
        setattr(parent, name, layers)
        head.weight = own


def weights_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """16 hex digits of a sha256 over every parameter's name, shape and ``sample`` evenly strided values
    (float32): a cache of one model's log-probs is not taken for another's (another size, fine-tune or
    quantisation of the same tokenizer). Weights on the meta device (offloaded) count by name and shape."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        if not p.is_meta:
            flat = p.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // sample)][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def source_identity(source: dict | None) -> str | None:
    """The original model a run records (``pruning.json``'s ``source``) as a teacher cache is stamped with
    it: the sha256 of a local model, else ``kind:path[/gguf file]@revision``; None when none is recorded."""
    if not source or not source.get("path"):
        return None
    if source.get("sha256"):
        return f"sha256:{source['sha256']}"
    gguf = f"/{source['gguf_file']}" if source.get("gguf_file") else ""
    return f"{source.get('kind')}:{source['path']}{gguf}@{source.get('revision') or 'main'}"


def build_cache(model, tokenizer, windows: torch.Tensor, val_windows: torch.Tensor | None, k: int,
                path: str | os.PathLike, teacher_name: str, quiet: bool = False, *, like: nn.Module | None = None,
                trust_remote_code: bool = False, source: str | None = None) -> TopkCache:
    """Compute the teacher's top-k log-probs on ``windows`` (+ ``val_windows``) and write them to ``path``.
    ``model``: a loaded model, or a safetensors folder read one block at a time
    (:func:`topk_logprobs_sequential`) in the dtype and on the device of ``like`` (the student: the
    teacher a loaded copy would be). ``source``: the teacher's :func:`source_identity`, stamped on the file
    (``prune heal`` takes a cache only for a run of the same original)."""
    if isinstance(model, nn.Module):
        width = logit_width(model)
        topk = topk_logprobs
    else:
        from transformers import AutoConfig

        width = logit_width(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))
        folder = model
        first = next(like.parameters()) if like is not None else None
        where = {"dtype": first.dtype, "device": first.device} if first is not None else {}

        def topk(_, w, k, progress=False):
            return topk_logprobs_sequential(folder, w, k, progress=progress, trust_remote_code=trust_remote_code, **where)
    if k > width:
        raise PruneError(f"heal.top_k={k} is larger than the vocabulary ({width} tokens); lower it")
    started = time.time()
    lp, ix = _topk_over_ranks(topk, model, windows, k, progress=not quiet)  # method bridge: no windows, held-out alone
    tensors = {"input_ids": windows.to(torch.int32), "logprobs": lp, "indices": ix}
    if val_windows is not None and val_windows.shape[0]:
        vlp, vix = _topk_over_ranks(topk, model, val_windows, k)
        tensors.update(val_input_ids=val_windows.to(torch.int32), val_logprobs=vlp, val_indices=vix)
    meta = {"format": FORMAT, "k": k, "teacher": teacher_name, "vocab": width,
            "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
            "windows": windows_fingerprint(windows, val_windows), "seconds": round(time.time() - started, 1)}
    if isinstance(model, nn.Module):
        meta["model"] = weights_fingerprint(model)
    if source:
        meta["source"] = source
    cache = TopkCache(Path(path).expanduser(), tensors, meta)
    dist.on_main(cache.save)  # every rank holds the same tensors: one writes them
    if not quiet:
        print(f"teacher top-{k} log-probs of {windows.shape[0] + (val_windows.shape[0] if val_windows is not None else 0)} "
              f"windows: {cache.path} ({cache.bytes / 2**20:.1f} MiB)", flush=True)
    return cache


def _topk_over_ranks(topk, model, windows: torch.Tensor, k: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk(model, windows, k)`` with each process of a launch computing its share of the windows in whole
    batches of :data:`EVAL_BATCH` (the batches one process runs: the same numbers), gathered in window order
    on every process (each computed all of them before)."""
    lo, hi = dist.shard(windows.shape[0], EVAL_BATCH)
    if hi > lo:
        lp, ix = topk(model, windows[lo:hi], k, progress=progress)
    else:
        lp, ix = torch.zeros(0, windows.shape[1], k), torch.zeros(0, windows.shape[1], k, dtype=torch.int32)
    if not dist.world().distributed:
        return lp, ix
    parts = dist.all_gather((lp, ix))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def check_cache(cache: TopkCache, tokenizer, windows: torch.Tensor, val_windows: torch.Tensor | None,
                width: int | None = None, model: nn.Module | None = None) -> None:
    """Refuse, with one line, a cache whose metadata is damaged, computed with another tokenizer (or none
    recorded), on other windows, for another vocabulary (``width``: the student's logits per token), or
    (``model``: the teacher at hand) by another model, and one whose tensors do not hold what the run
    reads (:func:`check_tensors`; a header-only cache has its tensors read from the file)."""
    _, vocab = cache.k, cache.vocab  # damaged metadata: one line, not a ValueError (k read to check it)
    if model is not None and cache.meta.get("model") is None:
        raise PruneError(f"heal.teacher_cache {cache.path} records no fingerprint of the model that wrote it (written "
                         "by prune heal reading the teacher one block at a time, or by an older version), so it cannot "
                         "be checked against this run's original; delete it to recompute, or point heal.teacher_cache "
                         "elsewhere")
    if model is not None and cache.meta["model"] != weights_fingerprint(model):
        raise PruneError(f"heal.teacher_cache {cache.path} holds the log-probs of another model than this run's "
                         "original; delete it to recompute, or point heal.teacher_cache elsewhere")
    if tokenizer is not None and not cache.meta.get("tokenizer"):
        raise PruneError(f"heal.teacher_cache {cache.path} records no tokenizer fingerprint (written without a "
                         f"tokenizer), so it cannot be checked against this model's vocabulary; {RECOMPUTE}")
    if tokenizer is not None and cache.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise PruneError(f"heal.teacher_cache {cache.path}: the teacher's tokenizer differs from this model's "
                         "(distillation needs the same vocabulary); recompute the cache from the original model")
    if width is not None and vocab is not None and vocab != width:
        raise PruneError(f"heal.teacher_cache {cache.path}: the teacher has {vocab} logits per token, "
                         f"this model {width}; distil from the model it was pruned from")
    vocab = vocab if vocab is not None else width
    _check_k(cache, vocab)
    if cache.meta.get("windows") != windows_fingerprint(windows, val_windows):
        raise PruneError(f"heal.teacher_cache {cache.path} was computed on other training windows (heal data, "
                         "n_samples, val_samples, seq_len or seed differ); delete it to recompute, or restore the settings")
    check_tensors(cache, windows, val_windows, vocab)


def _check_k(cache: TopkCache, vocab: int | None) -> None:
    if vocab is not None and cache.k > vocab:
        raise PruneError(f"heal.teacher_cache {cache.path}: its metadata k={cache.k} exceeds its vocabulary ({vocab} "
                         f"tokens), a damaged or edited file; {RECOMPUTE}")


def _dtype_kind(dtype) -> tuple[str, str]:
    """``(name, float | int | other)`` of a torch dtype or a safetensors dtype string (``F32``, ``I32``...)."""
    from prune.io.safetensors import DTYPES

    if not isinstance(dtype, torch.dtype):
        dtype = DTYPES.get(dtype, str(dtype))
    if not isinstance(dtype, torch.dtype):
        return dtype, "other"
    name = str(dtype).replace("torch.", "")
    return name, "float" if dtype.is_floating_point else "other" if dtype == torch.bool or dtype.is_complex else "int"


def check_tensors(cache: TopkCache, windows: torch.Tensor, val_windows: torch.Tensor | None, vocab: int | None) -> None:
    """The tensors a run reads, each present with the shape it reads (``{,val_}input_ids [n, seq_len]``
    equal to the run's windows, ``{,val_}logprobs`` / ``{,val_}indices [n, seq_len, k]``), log-probs
    floating-point, finite and <= ``LOGPROB_TOL``, indices integers in ``[0, vocab)``; one pass of
    min / max over each tensor. Passed once per cache object and run shape (``cache.checked``)."""
    k = cache.k
    parts = [("", windows)] + ([("val_", val_windows)] if val_windows is not None and val_windows.shape[0] else [])
    key = (windows_fingerprint(windows, val_windows), k, vocab)
    if cache.tensors and cache.checked == key:
        return
    where = f"heal.teacher_cache {cache.path}"
    with ExitStack() as stack:
        if cache.tensors:
            specs = {n: (tuple(t.shape), t.dtype) for n, t in cache.tensors.items()}
            read = cache.tensors.__getitem__
        else:  # a header: shapes from it, values one tensor at a time
            from safetensors import safe_open

            try:
                handle = stack.enter_context(safe_open(str(cache.path), "pt"))
                specs = {n: (tuple(handle.get_slice(n).get_shape()), handle.get_slice(n).get_dtype()) for n in handle.keys()}
            except Exception as exc:  # noqa: BLE001 - changed since its header was read
                raise PruneError(f"{where} is corrupt or unreadable ({' '.join(str(exc).split())[:200]}); {RECOMPUTE}") from None
            read = handle.get_tensor
        for prefix, w in parts:
            n, seq_len = int(w.shape[0]), int(w.shape[1])
            what = f"{n} {'held-out ' if prefix else ''}windows"
            for name, shape, want in ((f"{prefix}input_ids", (n, seq_len), "int"),
                                      (f"{prefix}logprobs", (n, seq_len, k), "float"),
                                      (f"{prefix}indices", (n, seq_len, k), "int")):
                if name not in specs:
                    raise PruneError(f"{where} lacks the tensor {name} (this run reads {what}); {RECOMPUTE}")
                got, dtype = specs[name]
                if got != shape:
                    raise PruneError(f"{where}: {name} has shape {list(got)}, this run reads {list(shape)} ({what} x "
                                     f"seq_len {seq_len}{f' x top-{k}' if len(shape) == 3 else ''}); {RECOMPUTE}")
                dname, kind = _dtype_kind(dtype)
                if kind != want:
                    raise PruneError(f"{where}: {name} is {dname}, not {'floating-point' if want == 'float' else 'integer'}; "
                                     f"{RECOMPUTE}")
            try:
                ids, lp, ix = (read(f"{prefix}{t}") for t in ("input_ids", "logprobs", "indices"))
            except Exception as exc:  # noqa: BLE001 - data beyond a truncated file
                raise PruneError(f"{where} is corrupt or unreadable ({' '.join(str(exc).split())[:200]}); {RECOMPUTE}") from None
            if not torch.equal(ids.long(), w.long()):
                raise PruneError(f"{where}: its {prefix}input_ids differ from this run's {what} (its metadata says "
                                 f"otherwise: a damaged or edited file); {RECOMPUTE}")
            if lp.numel():
                lo, hi = float(lp.min()), float(lp.max())
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise PruneError(f"{where}: {prefix}logprobs holds non-finite values (NaN or inf; min {lo}, max {hi}); "
                                     f"{RECOMPUTE}")
                if hi > LOGPROB_TOL:
                    raise PruneError(f"{where}: {prefix}logprobs holds {hi:g}, and log-probabilities are <= 0; {RECOMPUTE}")
                lo, hi = int(ix.min()), int(ix.max())
                if lo < 0 or (vocab is not None and hi >= vocab):
                    raise PruneError(f"{where}: {prefix}indices holds token ids from {lo} to {hi}, outside the "
                                     f"vocabulary [0, {vocab if vocab is not None else '?'}); {RECOMPUTE}")
    if cache.tensors:
        cache.checked = key


def check_teacher_model(teacher, student, teacher_tokenizer=None, tokenizer=None) -> None:
    """Refuse a teacher whose vocabulary (logit width or tokenizer) differs from the student's."""
    tw, sw = logit_width(teacher), logit_width(student)
    if tw != sw:
        raise PruneError(f"the teacher has {tw} logits per token and the pruned model {sw}: a teacher must share "
                         "the student's tokenizer (distil from the model it was pruned from)")
    if teacher_tokenizer is not None and tokenizer is not None and \
            tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise PruneError("the teacher's tokenizer differs from the pruned model's (same size, other tokens): "
                         "distil from the model it was pruned from")


def free_memory(device: torch.device) -> int:
    """Bytes free for a teacher copy on ``device`` (CUDA: free memory; CPU: MemAvailable); under a launcher the
    least of every rank's, so the ranks take one teacher kind (each deciding from its own memory, one rank could
    distil from the exact teacher and another from a top-k cache, their gradients averaged)."""
    return min(dist.all_gather(_own_free_memory(device)))


def _own_free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def teacher_need(cfg: HealConfig, teacher_bytes: int, vocab: int) -> int:
    """Bytes free memory must hold for ``auto`` to keep the teacher in memory:
    ``MARGIN x teacher_bytes + TEACHER_LOGITS x batch_size x seq_len x vocab x 4``."""
    return int(MARGIN * teacher_bytes) + TEACHER_LOGITS * cfg.batch_size * cfg.seq_len * vocab * 4


def teacher_kind(cfg: HealConfig, model, loaded: bool = False) -> str:
    """``memory`` or ``cache`` for ``cfg.teacher`` (``auto``: :func:`teacher_need` is free, counting
    the memory ``model`` holds already when it is the teacher itself, ``loaded``, not a model to copy)."""
    if cfg.teacher != "auto":
        return cfg.teacher
    size = model_bytes(model)
    free = free_memory(next(model.parameters()).device) + (size if loaded else 0)
    return "memory" if teacher_fits(cfg, free, size, logit_width(model)) else "cache"


def teacher_fits(cfg: HealConfig, free: int, size: int, width: int) -> bool:
    """Whether a teacher of ``size`` bytes (``width`` logits) fits in ``free`` bytes (:func:`teacher_need`);
    when it does not, ``hidden_weight`` is refused at once (its term needs the teacher's blocks in memory)."""
    fits = free >= teacher_need(cfg, size, width)
    if not fits and cfg.hidden_weight > 0:
        raise PruneError("heal.hidden_weight needs the teacher in memory, but a copy of the model does not fit "
                         "(set hidden_weight: 0 to distil from the top-k cache)")
    return fits


@dataclass
class Teacher:
    """Where the teacher's outputs come from: ``model`` (in memory) or ``cache`` (top-k file)."""

    kind: str  # memory | cache
    description: str
    model: nn.Module | None = None
    cache: TopkCache | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (student block, teacher block)

    def record(self) -> dict:
        out = {"teacher": self.description, "teacher_source": self.kind}
        if self.cache is not None:
            out.update(top_k=self.cache.k, teacher_cache=str(self.cache.path), teacher_cache_bytes=self.cache.bytes,
                       teacher_cache_note="KL over the teacher's top-k tokens and one bucket for the rest (at T = 1 at most the full KL)")
        return out


def block_pairs(kept: list[int], run: list[int] | None = None, source_block: int | None = None) -> list[tuple[int, int]]:
    """(student block, original block) whose outputs should agree; a replacement block (the kept
    ``source_block`` of ``run``) stands for the whole run, so it is matched with ``run[-1]``."""
    return [(j, run[-1] if run and orig == source_block else orig) for j, orig in enumerate(kept)]


def recorded_pairs(pruning: dict) -> list[tuple[int, int]]:
    """:func:`block_pairs` of a run folder's ``pruning.json``: its ``kept`` blocks, a replacement block
    (``healing.replacement`` of this or an earlier healing: the run it replaces, at ``position``)
    matched with the run's last block."""
    kept = pruning.get("kept") or []
    healing = pruning.get("healing")
    while healing:  # the latest healing first, then the ones before it ("previous")
        rep = healing.get("replacement") or {}
        if rep.get("replaces") and rep.get("position") is not None and rep["position"] < len(kept):
            return block_pairs(kept, rep["replaces"], kept[rep["position"]])
        healing = healing.get("previous")
    return block_pairs(kept)


def check_top_k(cache: TopkCache, cfg: HealConfig) -> None:
    """Refuse a named cache of another k than ``heal.top_k``: recomputing it would replace the user's file."""
    _check_k(cache, cache.vocab)
    if cache.k != cfg.top_k:
        raise PruneError(f"heal.teacher_cache {cache.path} holds top-{cache.k} log-probs, heal.top_k is {cfg.top_k}: "
                         f"set heal.top_k={cache.k} to distil from it, or point heal.teacher_cache at another path to "
                         f"compute a top-{cfg.top_k} cache there (the file is never replaced)")


def prepare_teacher(model, tokenizer, cfg: HealConfig, windows, val_windows, kept: list[int], *, name: str,
                    default_cache: str | os.PathLike | None, run=None, source_block=None, quiet: bool = False,
                    source_id: str | None = None) -> Teacher:
    """From the FULL ``model`` before the surgery: a copy of it, or its top-k cache (see module docstring).
    An existing ``heal.teacher_cache`` is reused or refused (another k, model, windows...), never replaced;
    the ``default_cache`` (the tool's own file) is recomputed when it does not fit."""
    pairs = block_pairs(kept, run, source_block)
    width = logit_width(model)
    if cfg.top_k > width:
        raise PruneError(f"heal.top_k={cfg.top_k} is larger than the vocabulary ({width} tokens); lower it")
    kind = teacher_kind(cfg, model)
    if cfg.method == "bridge":  # nothing trained: only the held-out check reads the teacher
        windows = windows[:0]
    if kind == "memory":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        return Teacher("memory", f"{name} (in-memory copy, {model_bytes(model) / 2**20:.0f} MiB)", teacher, pairs=pairs)
    if not (cfg.teacher_cache or default_cache):
        raise PruneError("the teacher is a top-k cache here: set heal.teacher_cache to the file to write it to "
                         "(or teacher: memory)")
    path = Path(cfg.teacher_cache or default_cache).expanduser()
    if path.is_file():
        cache = TopkCache.load(path)
        try:
            check_cache(cache, tokenizer, windows, val_windows, width, model)
            if cfg.teacher_cache:
                check_top_k(cache, cfg)
            if cache.k == cfg.top_k:
                return Teacher("cache", f"{cache.meta.get('teacher', name)} (top-{cache.k} cache, reused)", cache=cache, pairs=pairs)
        except PruneError:
            if cfg.teacher_cache:
                raise
    cache = build_cache(model, tokenizer, windows, val_windows, cfg.top_k, path, name, quiet, source=source_id)
    return Teacher("cache", f"{name} (top-{cfg.top_k} cache)", cache=cache, pairs=pairs)


def preflight_cache(cfg: HealConfig, inputs=(), tokenizer=None, windows=None, val_windows=None, *,
                    output: str | os.PathLike | None = None) -> None:
    """Before any work: a ``heal.teacher_cache`` is not inside the ``output`` folder (written there, it made
    the folder exist, and the atomic save refused it after the training), and one that may be written
    is not an input or inside one (a model folder, the run folder); with ``teacher: cache`` one that
    will be reused was computed on these windows with this tokenizer (given ``windows``: the heal's
    training windows; ``auto`` may keep the teacher in memory and never read it), its tensors included, and it
    holds ``heal.top_k`` log-probs per token (an existing cache is never replaced). An unreadable file there is
    refused."""
    if cfg.objective != "distill" or not cfg.teacher_cache or cfg.teacher == "memory":
        return
    path = Path(cfg.teacher_cache).expanduser()
    if output is not None:
        out = Path(output).expanduser().resolve()
        if path.resolve() == out or path.resolve().is_relative_to(out):
            raise PruneError(f"heal.teacher_cache {path} is inside the output folder {out}, which is written whole at "
                             "the end: put the cache beside it (or anywhere else)")
    if path.is_file() and cfg.hidden_weight == 0:  # read, never written (hidden_weight: the teacher is in memory)
        head = TopkCache.header(path)  # unreadable, or not a cache: one line
        if cfg.teacher == "cache":
            if windows is not None:  # first: a damaged file is said to be damaged, not of another k
                check_cache(head, tokenizer, windows[:0] if cfg.method == "bridge" else windows, val_windows)
            check_top_k(head, cfg)
        else:  # auto: its metadata at least (prepare_teacher refuses another k if it takes the cache)
            _ = head.k, head.vocab
        return
    from prune.io.guard import check_output

    check_output(path, inputs, overwrite=True, kind="file", what="heal.teacher_cache", flag="heal.teacher_cache")


def open_cache(cfg: HealConfig, tokenizer, windows, val_windows, width: int, pairs: list[tuple[int, int]]) -> Teacher:
    """A teacher read from an existing ``cfg.teacher_cache`` (checked against the student)."""
    cache = TopkCache.load(cfg.teacher_cache)
    check_cache(cache, tokenizer, windows, val_windows, width)
    return Teacher("cache", f"{cache.meta.get('teacher', '?')} (top-{cache.k} cache)", cache=cache, pairs=pairs)


# ---- the loss on a batch -------------------------------------------------------------------------
def _block_outputs(layers, indices: list[int], store: dict):
    def hook(i):
        def fn(module, args, output):
            store[i] = _hidden_from_output(output)
        return fn

    return [layers[i].register_forward_hook(hook(i)) for i in indices]


def teacher_outputs(teacher: Teacher, ids: torch.Tensor, rows: torch.Tensor, val: bool = False,
                    hidden: bool = False) -> tuple:
    """``(full logits or None, (top-k log-probs, ids) or None, {teacher block: output})`` for a batch."""
    if teacher.model is not None:
        states: dict = {}
        handles = _block_outputs(decoder_layers(teacher.model), [t for _, t in teacher.pairs], states) if hidden else []
        try:
            with torch.no_grad():
                logits = teacher.model(input_ids=ids.to(input_device(teacher.model)), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, None, states
    _, lp, ix = teacher.cache.part(val)
    rows = rows.cpu()  # Accelerate moves the batch to the device; the cache stays on the CPU
    return None, (lp[rows], ix[rows]), {}


def hidden_error(h_s: torch.Tensor, h_t: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: ``mean (h_s - h_t)^2``; ``relative``: ``mean_tokens ||h_s - h_t||^2 / ||h_t||^2``
    (per token over the hidden size, ``[..., d]``)."""
    if kind == "mse":
        return F.mse_loss(h_s, h_t)
    return ((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def make_loss(cfg: HealConfig, teacher: Teacher, student_layers):
    """``loss_fn(module, (ids, rows))`` for :func:`prune.heal.training.train` (module docstring formula)."""
    T = cfg.temperature
    hidden = cfg.hidden_weight > 0

    def loss_fn(module, batch):
        ids, rows = batch
        states: dict = {}
        handles = _block_outputs(student_layers, [s for s, _ in teacher.pairs], states) if hidden else []
        try:
            out = module(input_ids=ids, labels=ids if cfg.lm_weight > 0 else None, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        t_logits, t_topk, t_states = teacher_outputs(teacher, ids, rows, hidden=hidden)
        dev = out.logits.device
        total = out.logits.new_zeros((), dtype=torch.float32)
        if cfg.kl_weight > 0:
            kl = kl_loss(out.logits, t_logits.to(dev), T) if t_logits is not None else \
                topk_kl_loss(out.logits, t_topk[0].to(dev), t_topk[1].to(dev), T)
            total = total + cfg.kl_weight * kl
        if hidden:
            mse = torch.stack([hidden_error(states[s].float(), t_states[t].to(states[s].device).float(), cfg.hidden_loss)
                               for s, t in teacher.pairs]).mean()
            total = total + cfg.hidden_weight * mse
        if cfg.lm_weight > 0:
            total = total + cfg.lm_weight * out.loss
        return total

    return loss_fn


@measured_in_eval_mode
def fidelity(model, teacher: Teacher, windows: torch.Tensor | None, val: bool = True) -> dict | None:
    """Mean KL(teacher || model) per token at T = 1 and the top-1 agreement on ``windows`` (the
    held-out windows when ``val``); with a cache, the KL over its top k and one bucket for the rest (at most
    the full KL; the measure of :func:`prune.measure.fidelity.token_kl`)."""
    if windows is None or windows.shape[0] == 0:
        return None
    kl_sum, agree, count = 0.0, 0, 0
    device = input_device(model)
    with torch.no_grad():
        for start in range(0, windows.shape[0], EVAL_BATCH):
            ids = windows[start:start + EVAL_BATCH]
            rows = torch.arange(start, start + ids.shape[0])
            logits = model(input_ids=ids.to(device), use_cache=False).logits
            t_logits, t_topk, _ = teacher_outputs(teacher, ids, rows, val=val)
            n = ids.numel()
            if t_logits is not None:
                t_logits = t_logits.to(logits.device)
                kl_sum += float(kl_loss(logits, t_logits)) * n
                top = t_logits.topk(TIES, -1)
            else:
                top = (t_topk[0].to(logits.device), t_topk[1].to(logits.device))
                kl_sum += float(topk_kl_loss(logits, *top)) * n
            agree += int(top1_agrees(*top, logits).sum())
            count += n
    return {"kl": kl_sum / count, "top1": agree / count, "tokens": count}


# ---- healing ------------------------------------------------------------------------------------------
def heal_distill(model, cfg: HealConfig, windows: torch.Tensor, val_windows: torch.Tensor | None, teacher: Teacher, *,
                 run: list[int] | None = None, init_state: dict | None = None, source_block: int | None = None,
                 quiet: bool = False, callback=None) -> dict:
    """Heal the pruned ``model`` in place, training ``cfg.method``'s parameters on the distillation
    loss; returns the healing record with ``objective``, the loss weights, the teacher and the
    KL / top-1 agreement to the teacher before and after (held-out windows)."""
    from prune.heal import methods as M
    from prune.heal.training import train

    if cfg.objective != "distill":
        raise PruneError("internal error: heal_distill needs heal.objective distill; please report this")
    if teacher.cache is not None:
        check_cache(teacher.cache, None, windows, val_windows, logit_width(model))
    elif teacher.model is not None:
        check_teacher_model(teacher.model, model)
    layers = decoder_layers(model)
    if cfg.hidden_weight > 0:
        if teacher.model is None:
            raise PruneError("heal.hidden_weight needs the teacher in memory (a top-k cache holds no hidden states)")
        t_layers = decoder_layers(teacher.model)
        if not teacher.pairs or any(s >= len(layers) or t >= len(t_layers) for s, t in teacher.pairs):
            raise PruneError("heal.hidden_weight: which original block each kept block came from is unknown "
                             f"(pairs {teacher.pairs[:4]}...); pass kept= or set hidden_weight: 0")
    dataset = TensorDataset(windows, torch.arange(windows.shape[0]))
    loss_fn = make_loss(cfg, teacher, layers)

    def train_fn(module, params, *_args, **_kwargs):
        return train(module, params, dataset, loss_fn, cfg, tokens_per_item=int(windows.shape[1]),
                     desc=f"heal distill ({cfg.method})", quiet=quiet, callback=callback)

    started = time.time()
    if cfg.method == "replace" and init_state is not None and run is not None:  # kl_before: the model training starts from
        layers[run[0]].load_state_dict(init_state)
    before = fidelity(model, teacher, val_windows)
    if cfg.method == "lora":
        record = M.heal_lora(model, cfg, windows, val_windows, quiet=quiet, callback=callback, train_fn=train_fn)
    elif cfg.method == "partial":
        record = M.heal_partial(model, cfg, windows, val_windows, quiet=quiet, callback=callback, train_fn=train_fn)
    else:
        record = _heal_replacement_block(model, cfg, windows, val_windows, run, train_fn, started)
        record["replacement"]["init_block"] = source_block
    after = fidelity(model, teacher, val_windows)
    record["objective"] = "distill"
    record["distill"] = {"temperature": cfg.temperature, "kl_weight": cfg.kl_weight, "hidden_weight": cfg.hidden_weight,
                         "hidden_loss": cfg.hidden_loss, "lm_weight": cfg.lm_weight, **teacher.record(),
                         "kl_before": before["kl"] if before else None, "kl_after": after["kl"] if after else None,
                         "top1_before": before["top1"] if before else None, "top1_after": after["top1"] if after else None,
                         "kl_tokens": after["tokens"] if after else 0}
    record["seconds"] = round(time.time() - started, 1)
    return record


def _heal_replacement_block(model, cfg, windows, val_windows, run, train_fn, started) -> dict:
    """The replacement block (at ``run[0]`` after the surgery, its initial state loaded) trained
    alone, on the whole model's distillation loss (backpropagated through every later block:
    ``heal.gradient_checkpointing`` applies)."""
    from prune.heal import methods as M
    from prune.model.loading import decoder_layers_path

    if run is None:
        raise PruneError("heal.method replace with objective distill needs the removed run (use a recipe or heal_model)")
    block = decoder_layers(model)[run[0]]
    flags = M._trainable_state(model)  # noqa: SLF001 - same package
    before = M.mean_lm_loss(model, val_windows)
    try:
        model.requires_grad_(False)
        block.requires_grad_(True)
        params = list(block.parameters())
        if cfg.gradient_checkpointing:
            M._gradient_checkpointing(model, True)  # noqa: SLF001
        log = train_fn(model, params)
    finally:
        if cfg.gradient_checkpointing:
            M._gradient_checkpointing(model, False)  # noqa: SLF001
        M._restore_trainable(model, flags)  # noqa: SLF001
    after = M.mean_lm_loss(model, val_windows)
    record = M._record(cfg, log, [f"{decoder_layers_path(model)}.{run[0]}"], sum(p.numel() for p in params),  # noqa: SLF001
                       windows, val_windows, before, after, started)
    record["replacement"] = {"replaces": run, "position": run[0], "init": cfg.init, "loss": "distill"}
    return record


# ---- the recipe stage (called from prune.heal.methods.prepare / heal) ------------------------------------
def prepare(model, tokenizer, removed: list[int], cfg: HealConfig, windows, val_windows, *, out_dir,
            source_name: str = "", quiet: bool = False, source_id: str | None = None):
    """Before the surgery: the blocks to remove (k, or k - 1 for a replacement block) and the
    teacher, a copy of the full ``model`` or its top-k cache beside the output folder ``out_dir``."""
    from prune.heal.methods import HealPlan, check_run, replacement_init

    n = len(decoder_layers(model))
    removed = sorted(removed)
    run = source = init_state = None
    remove = removed
    if cfg.method == "replace":
        run = check_run(removed, n)
        source, init_state = replacement_init(decoder_layers(model), run, cfg.init)
        remove = [i for i in run if i != source]
    kept = complement(n, remove)
    out = Path(out_dir)
    default_cache = out.with_name(f"{out.name}.teacher-top{cfg.top_k}.safetensors")
    teacher = prepare_teacher(model, tokenizer, cfg, windows, val_windows, kept, name=str(source_name),
                              default_cache=default_cache, run=run, source_block=source, quiet=quiet,
                              source_id=source_id)
    return HealPlan(cfg, remove, windows, val_windows, run=run, source_block=source, init_state=init_state,
                    extra={"teacher": teacher})


def heal(model, plan, quiet: bool = False) -> dict:
    """After the surgery: distil into the pruned ``model`` with the plan's teacher."""
    record = heal_distill(model, plan.cfg, plan.windows, plan.val_windows, plan.extra["teacher"], run=plan.run,
                          init_state=plan.init_state, source_block=plan.source_block, quiet=quiet)
    plan.extra["teacher"] = None  # free the teacher copy before evaluation
    return record


# ---- prune heal RUN_DIR ---------------------------------------------------------------------------------
REPLACE_IN_A_RECIPE = ("heal.method replace with objective distill needs the original model's blocks: run it in a "
                       "recipe (heal section), or use params lora/partial with prune heal")


def heal_saved_run(run_dir: Path, out: Path, pruning: dict, cfg: HealConfig, dtype, trust: bool, quiet: bool = False,
                   resolve=None, original=None):
    """``prune heal RUN_DIR --method distill``: the teacher is ``heal.teacher_cache`` when that file
    exists (holding ``heal.top_k`` log-probs per token: another k is refused, the file never replaced),
    otherwise the source model recorded in ``pruning.json`` (in memory, or turned into a
    top-k cache beside ``out`` first); ``resolve(recorded source) -> ModelSource`` finds it (a local
    source is recorded by name and sha256 only: ``prune heal --source PATH``). ``original``: a
    :class:`prune.heal.original.OriginalModel` of that source, taken when it holds a loaded copy
    (``prune heal --evaluate`` built the fidelity reference with it), released when the teacher
    is an existing cache. Returns ``(model, tokenizer, kept, record)``."""
    from prune.core.console import say
    from prune.heal.methods import training_windows
    from prune.model.loading import load_model

    if cfg.method == "replace":
        raise PruneError(REPLACE_IN_A_RECIPE)
    kept = pruning.get("kept")
    cache_file = Path(cfg.teacher_cache).expanduser() if cfg.teacher_cache else None
    # an existing cache is the teacher unless the teacher is asked in memory (or hidden_weight needs it there);
    # one of another k than heal.top_k is refused: recomputing it from the source replaced the user's file
    have_file = cache_file is not None and cache_file.is_file() and cfg.teacher != "memory" and cfg.hidden_weight == 0
    head = TopkCache.header(cache_file) if have_file else None  # the header read once: its k and source stamp
    if head is not None:
        check_top_k(head, cfg)
    recorded = bool((pruning.get("source") or {}).get("path"))
    use_file = have_file
    if cfg.hidden_weight > 0:  # the hidden-state term needs the teacher's blocks: the source in memory, never a file
        if not recorded:
            raise PruneError(f"heal.hidden_weight needs the teacher in memory, and {run_dir}/pruning.json records no "
                             "source model to load (set hidden_weight: 0 to distil from a top-k cache)")
    identity = source_identity(pruning.get("source"))
    if use_file and identity is not None:  # a cache of another original (another run's) is not this run's teacher
        stamped = head.meta.get("source")
        if stamped != identity:
            why = ("records no source model (written by an older version, or by the Python API)" if stamped is None
                   else "holds the log-probs of another original model than the one this run was pruned from")
            raise PruneError(f"heal.teacher_cache {cache_file} {why} ({run_dir}/pruning.json: {identity[:30]}); delete "
                             "it to recompute from the source, or point heal.teacher_cache elsewhere")
    src = None
    if not use_file:
        s = pruning.get("source") or {}
        if not s.get("path"):
            raise PruneError(f"no teacher source: {run_dir}/pruning.json records no source model and heal.teacher_cache "
                             "is not an existing file (set heal.teacher_cache to a top-k cache)")
        if resolve is None:
            from prune.io.source import resolve_source

            def resolve(rec):
                return resolve_source(rec["path"], rec.get("gguf_file"), rec.get("revision"))
        try:
            src = resolve(s)
        except PruneError as exc:
            if "--source" in str(exc):  # the reason names its fix already
                raise PruneError(f"no teacher source: {exc}; or set heal.teacher_cache to a top-k cache") from None
            raise PruneError(f"no teacher source: the original model {s['path']} cannot be read ({exc}); "
                             "give it with --source, or set heal.teacher_cache to a top-k cache") from None
        if cfg.hidden_weight > 0 and kept is None:
            raise PruneError(f"heal.hidden_weight: {run_dir}/pruning.json lacks kept (which original block each is)")
    held = original is not None and original.held
    if src is None and held:
        original.release()  # the teacher is the cache file
    model, tokenizer, _ = load_model(run_dir, dtype=dtype, trust_remote_code=trust)
    windows, val_windows = training_windows(tokenizer, cfg)
    if src is None:
        teacher = open_cache(cfg, tokenizer, windows, val_windows, logit_width(model), recorded_pairs(pruning))
    elif not held and _sequential_teacher(cfg, src, model, pruning):
        from transformers import AutoTokenizer

        path = cache_file or out.with_name(f"{out.name}.teacher-top{cfg.top_k}.safetensors")
        t_tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust)
        check_teacher_model(_meta_of(src.path, trust), model, t_tok, tokenizer)
        say(f"teacher {src.display}: top-{cfg.top_k} log-probs read one block at a time (it is not loaded whole)", quiet)
        cache = build_cache(str(src.path), t_tok, windows, val_windows, cfg.top_k, path, src.display, quiet, like=model,
                            trust_remote_code=trust, source=identity)
        teacher = Teacher("cache", f"{src.display} (top-{cfg.top_k} cache, sequential)", cache=cache)
    else:
        if held:
            say(f"teacher {src.display}: the copy loaded for the fidelity reference", quiet)
            loaded, t_tok = original.take("the teacher")
        else:
            say(f"loading the teacher {src.display} (the original model)", quiet)
            loaded, t_tok, _ = load_model(src.path, gguf_file=src.gguf_file, dtype=dtype, revision=src.revision,
                                          trust_remote_code=trust)
        check_teacher_model(loaded, model, t_tok, tokenizer)
        kind = teacher_kind(cfg, loaded, loaded=True)  # auto: does it stay beside the student, now it is loaded
        if kind == "memory":
            teacher = Teacher("memory", f"{src.display} (in-memory)", loaded.eval().requires_grad_(False),
                              pairs=recorded_pairs(pruning))
        else:
            path = cache_file or out.with_name(f"{out.name}.teacher-top{cfg.top_k}.safetensors")
            cache = build_cache(loaded, t_tok, windows, val_windows, cfg.top_k, path, src.display, quiet, source=identity)
            del loaded
            teacher = Teacher("cache", f"{src.display} (top-{cfg.top_k} cache)", cache=cache)
    record = heal_distill(model, cfg, windows, val_windows, teacher, quiet=quiet)
    return model, tokenizer, kept, record


def _meta_of(folder, trust: bool):
    from prune.model.arch import meta_model
    from transformers import AutoConfig

    return meta_model(AutoConfig.from_pretrained(folder, trust_remote_code=trust), trust_remote_code=trust)


def _sequential_teacher(cfg: HealConfig, src, student, pruning: dict) -> bool:
    """``prune heal`` reads the teacher one block at a time when it is a local safetensors folder and
    either ``teacher: cache`` or (``auto``) a copy of it, estimated as the student's size scaled by
    ``layers_before / layers_after``, would not fit beside the student (:func:`teacher_need`)."""
    if src.kind != "folder" or not list(Path(src.path).glob("*.safetensors")) or cfg.teacher == "memory":
        return False
    if cfg.teacher == "cache":
        return True
    before, after = pruning.get("layers_before"), pruning.get("layers_after") or len(decoder_layers(student))
    estimate = model_bytes(student) * (before / after if before else 1.0)
    # refused before a top-k cache is computed for nothing
    return not teacher_fits(cfg, free_memory(next(student.parameters()).device), int(estimate), logit_width(student))


# ---- the Python API (prune.heal.methods.heal_model with objective distill) ---------------------------------
def heal_model_distill(model, tokenizer, cfg: HealConfig, windows, val_windows, *, teacher_model=None, teacher_tokenizer=None,
                       removed: list[int] | None = None, kept: list[int] | None = None, quiet: bool = False,
                       callback=None) -> dict:
    """See :func:`prune.heal.methods.heal_model`: lora/partial distil the pruned ``model`` from
    ``teacher_model`` (a model, or a top-k cache file) or ``cfg.teacher_cache``; replace prunes the
    full ``model`` itself and takes the teacher from it (per ``cfg.teacher``)."""
    from prune.heal.methods import check_run, replacement_init
    from prune.model.surgery import remove_layers

    if cfg.method == "replace":
        if removed is None:
            raise PruneError("heal method replace needs removed= (the contiguous run of blocks to replace)")
        n = len(decoder_layers(model))
        run = check_run(list(removed), n)
        source, init_state = replacement_init(decoder_layers(model), run, cfg.init)
        remove = [i for i in run if i != source]
        t = prepare_teacher(model, tokenizer, cfg, windows, val_windows, complement(n, remove),
                            name=getattr(model.config, "_name_or_path", "") or "the original model",
                            default_cache=cfg.teacher_cache, run=run, source_block=source, quiet=quiet)
        kept_now = remove_layers(model, remove)
        record = heal_distill(model, cfg, windows, val_windows, t, run=run, init_state=init_state, source_block=source,
                              quiet=quiet, callback=callback)
        record["kept"] = kept_now
        return record
    kept = kept if kept is not None else []
    teacher = teacher_model
    if isinstance(teacher, nn.Module):
        check_teacher_model(teacher, model, teacher_tokenizer, tokenizer)
        name = getattr(teacher.config, "_name_or_path", "") or "the original model"
        training, flags = teacher.training, [p.requires_grad for p in teacher.parameters()]
        t = Teacher("memory", f"{name} (in memory)", teacher.eval().requires_grad_(False), pairs=block_pairs(kept))
        try:
            return heal_distill(model, cfg, windows, val_windows, t, quiet=quiet, callback=callback)
        finally:  # the caller's model, only read: its mode and flags as they were
            teacher.train(training)
            for p, flag in zip(teacher.parameters(), flags):
                p.requires_grad_(flag)
    elif teacher is not None or cfg.teacher_cache:
        path = Path(teacher if teacher is not None else cfg.teacher_cache)
        if not path.is_file():
            raise PruneError(f"no teacher source: the top-k cache {path} does not exist")
        t = open_cache(cfg.model_copy(update={"teacher_cache": str(path)}), tokenizer, windows, val_windows,
                       logit_width(model), block_pairs(kept))
    else:
        raise PruneError("no teacher source for distillation: pass teacher_model= (the original model) or set "
                         "teacher_cache to a top-k cache of it")
    return heal_distill(model, cfg, windows, val_windows, t, quiet=quiet, callback=callback)
