"""Where a distillation's teacher outputs come from (``heal.teacher``), for :mod:`prune.heal.distill`.

* ``memory``: a full copy of the original beside the student (exact KL over the whole
  vocabulary; needed for ``hidden_weight``). In a recipe the copy is taken before the surgery.
* ``cache``: the original's top-``k`` log-probs per token (``heal.top_k``), computed ONCE
  before the surgery (or from the source model by ``prune heal``) and written to a safetensors
  file (``heal.teacher_cache``; size reported); the loss reads it as k + 1 buckets
  (:func:`prune.heal.distill._topk_chunk`). The file also holds the windows it was computed on and the
  tokenizer's fingerprint, so a run that reads it is refused when either differs, or when its tensors do
  not hold what the run reads (:func:`check_tensors`); a file named in ``heal.teacher_cache`` is never
  replaced (another ``k`` than ``heal.top_k``: refused). ``prune heal`` computes it from a source
  safetensors folder ONE BLOCK AT A TIME (:func:`topk_logprobs_sequential`) when a copy of the original
  would not fit beside the student (or with ``teacher: cache``).
* ``auto``: ``memory`` when the free memory of the model's device holds a copy of it with a 25%
  margin (``MARGIN``) and what the in-memory teacher's loss adds over the cache's:
  ``TEACHER_LOGITS`` float32 ``[batch_size, seq_len, vocab]`` tensors (:func:`teacher_need`),
  otherwise ``cache``.
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
from torch import nn

from prune.core import dist
from prune.core.config import HealConfig, changed
from prune.core.errors import PruneError
from prune.model.capture import measured_in_eval_mode
from prune.model.loading import input_device

FORMAT = "prune-teacher-topk/1"
MARGIN = 1.25  # auto: keep a teacher copy when free memory >= MARGIN x its size (+ the logits below)
#: float32 [batch, seq_len, vocab] tensors the in-memory teacher's loss holds beyond the cache's: 0.7
#: measured with the chunked loss on the Llama-3.1-8B recipe on an H200 (bf16, docs/BENCHMARKS.md "The
#: Llama-3.1-8B recipes on a GPU"; 7.1 with the plain loss); 2 covers a float32 teacher's logits too
TEACHER_LOGITS = 2
EVAL_BATCH = 4  # windows per forward pass of the teacher (and of the fidelity passes of prune.heal.distill)


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
        from prune.io.staging import pid_in, process_alive

        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # left by a killed process (gigabytes)
            pid = pid_in(stale.name.rsplit(".", 2)[-2])
            if pid is not None and not process_alive(pid):
                stale.unlink(missing_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # each rank of a launch writes its own
        try:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                      metadata={k: str(v) for k, v in self.meta.items()})
            os.replace(tmp, self.path)
        finally:  # interrupted, or the disk full: no partial file stays (after the replace there is none)
            tmp.unlink(missing_ok=True)

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
    from prune.model.loading import as_device, final_norm
    from prune.model.skeleton import Skeleton

    device = as_device(device)
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
    from prune.model.loading import dtype_name

    return dtype_name(dtype), "float" if dtype.is_floating_point else "other" if dtype == torch.bool or dtype.is_complex else "int"


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


def teacher_kind(cfg: HealConfig, model, loaded: bool = False, quiet: bool | None = None) -> str:
    """``memory`` or ``cache`` for ``cfg.teacher`` (``auto``: :func:`teacher_need` is free, counting
    the memory ``model`` holds already when it is the teacher itself, ``loaded``, not a model to copy)."""
    if cfg.teacher != "auto":
        return cfg.teacher
    size = model_bytes(model)
    free = free_memory(next(model.parameters()).device) + (size if loaded else 0)
    if not teacher_fits(cfg, free, size, logit_width(model)):
        return "cache"
    unread = changed(cfg, ["top_k", "teacher_cache"])
    if unread:  # set for a cache that auto does not take
        from prune.core.console import say

        say(f"note: heal {', '.join(unread)} not read: the teacher fits in memory (teacher: auto); set teacher: cache "
            "to distil from a top-k cache", quiet)
    return "memory"


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
    from prune.core.records import latest_replacement

    kept = pruning.get("kept") or []
    rep = latest_replacement(pruning.get("healing"))
    if rep and rep.get("replaces") and rep["position"] < len(kept):
        return block_pairs(kept, rep["replaces"], kept[rep["position"]])
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
    kind = teacher_kind(cfg, model, quiet=quiet)
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

    check_output(path, inputs, overwrite=True, kind="file", what="heal.teacher_cache", flag="heal.teacher_cache",
                 example="teacher.safetensors")


def open_cache(cfg: HealConfig, tokenizer, windows, val_windows, width: int, pairs: list[tuple[int, int]]) -> Teacher:
    """A teacher read from an existing ``cfg.teacher_cache`` (checked against the student)."""
    cache = TopkCache.load(cfg.teacher_cache)
    check_cache(cache, tokenizer, windows, val_windows, width)
    return Teacher("cache", f"{cache.meta.get('teacher', '?')} (top-{cache.k} cache)", cache=cache, pairs=pairs)
