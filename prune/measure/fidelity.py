"""Fidelity to the original: how close the pruned model's next-token distribution stays.

The measures of llama.cpp's ``perplexity --kl-divergence``, per predicted token ``t`` of the
same text windows (every token of a window but its first, as for perplexity), with ``p_t`` the
original's and ``q_t`` the pruned model's next-token distribution:

* ``KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v))``: mean (with its standard error over windows,
  whose tokens are not independent), median, p99 and max over tokens;
* top-1 agreement ``mean_t [argmax p_t = argmax q_t]`` (where either has tied largest values: some
  token is largest under both, so a model agrees with itself however ``argmax`` breaks ties);
* the perplexity ratio ``ppl(pruned) / ppl(original) = exp(mean_t (NLL_q - NLL_p))`` on the
  same tokens.

The original runs once: :func:`build_reference` keeps, per token, its ``top_k`` largest
log-probs with their token ids, the log-prob of the actual next token and the log of its mass
outside those ``k``, on the CPU (``windows x (seq_len - 1) x top_k`` values and ids; :meth:`FidelityReference.save` puts them
on disk). :func:`measure_fidelity` then streams any number of models over the same windows, one
batch at a time: no ``[tokens, vocab]`` tensor of either model is held for the whole text.

With ``top_k`` below the vocabulary size the vocabulary outside the original's top ``k`` is
merged into one bucket (mass ``1 - sum_topk p`` against ``1 - sum_topk q``, each summed over the
tokens outside, not as one minus a rounded sum: a model compared with itself gives 0). Merging outcomes
never increases a KL divergence, so the value is then a lower bound of the full KL, exact when
``top_k`` covers the vocabulary; top-1 agreement and the perplexity ratio are always exact.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prune.core.errors import PruneError
from prune.model.capture import batches, measured_in_eval_mode
from prune.model.loading import input_device


@dataclass
class FidelityReference:
    """The original model's next-token distributions over ``windows [n, seq_len]``, top ``k`` per token.

    ``top_logprobs``/``top_ids`` ``[n, seq_len - 1, k]`` (sorted, largest first),
    ``target_logprobs`` ``[n, seq_len - 1]`` (log-prob of the token that follows), ``tail_logmass``
    ``[n, seq_len - 1]`` float64 (log of the mass outside the top k; None when k covers the vocabulary,
    or in a file saved before it was kept)."""

    windows: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor
    target_logprobs: torch.Tensor
    vocab_size: int
    data: dict = field(default_factory=dict)
    tail_logmass: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[-1])

    def save(self, path: str | Path) -> Path:
        """Write the reference as one safetensors file (metadata: vocabulary size, data)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"windows": self.windows, "top_logprobs": self.top_logprobs, "top_ids": self.top_ids,
                   "target_logprobs": self.target_logprobs, "tail_logmass": self.tail_logmass}
        save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(tmp), metadata={"vocab_size": str(self.vocab_size), "data": json.dumps(self.data)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FidelityReference:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(vocab_size=int(meta["vocab_size"]), data=json.loads(meta.get("data", "{}")), **tensors)


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the next-token logits at every position but the last: ``[b, s - 1, V]``
    on the CPU, taken one window at a time on the model's device (as ``perplexity.window_nll``). Float32
    logits on the CPU are overwritten with their log-probs (a view of them is returned): a second
    ``[b, s - 1, V]`` float32 tensor beside them was the fidelity passes' peak (400 MiB at 4 x 512 tokens
    of a 49k vocabulary)."""
    logits = model(input_ids=batch.to(input_device(model)), use_cache=False).logits
    in_place = logits.dtype == torch.float32 and logits.device.type == "cpu"
    out = logits[:, :-1] if in_place else \
        torch.empty((logits.shape[0], logits.shape[1] - 1, logits.shape[2]), dtype=torch.float32)
    for i, row in enumerate(logits):
        out[i] = F.log_softmax(row[:-1].float(), dim=-1)  # one window's temporary at a time
    return out


@measured_in_eval_mode
def build_reference(model, windows: torch.Tensor, *, top_k: int = 256, batch_size: int = 4,
                    progress: bool = False, data: dict | None = None,
                    after_batch: Callable[[], None] | None = None) -> FidelityReference:
    """Run the original ``model`` once over ``windows`` and keep what :func:`measure_fidelity` needs;
    ``after_batch()`` runs after each batch's forward (to collect what hooks captured in it)."""
    if windows.shape[1] < 2:
        raise PruneError("fidelity windows need at least 2 tokens")
    tops, ids, targets, tails = [], [], [], []
    vocab = None
    bar = tqdm(total=windows.shape[0], desc="fidelity reference", unit="win", disable=not progress)
    with torch.no_grad():
        for _, batch in batches(windows, batch_size):
            logp = _log_probs(model, batch)
            if after_batch is not None:
                after_batch()
            vocab = logp.shape[-1]
            values, index = logp.topk(min(top_k, vocab), dim=-1)
            tops.append(values)
            ids.append(index.to(torch.int32))
            if values.shape[-1] < vocab:
                tails.append(tail_logmass(logp, index, torch.logsumexp(values.double(), -1)))
            targets.append(logp.gather(-1, batch[:, 1:, None]).squeeze(-1))
            del logp  # not alive through the next batch's forward (it doubled the pass's peak)
            bar.update(batch.shape[0])
    bar.close()
    if any(bool(torch.isnan(t).any()) for t in (*tops, *targets)):  # a reference of NaN measures every model as NaN
        raise PruneError("the original's next-token log-probs are not finite (NaN): its activations overflow, as "
                         "float16 ones can; load it in float32 or bfloat16 (--dtype, model.dtype in a recipe)")
    return FidelityReference(windows.clone(), torch.cat(tops), torch.cat(ids), torch.cat(targets), int(vocab),
                             dict(data or {}), torch.cat(tails) if tails else None)


def log1mexp(lse: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(lse))`` for ``lse <= 0`` (the log of the mass outside the kept entries)."""
    lse = lse.clamp(max=0.0)
    return torch.where(lse > -0.6931, torch.log(-torch.expm1(lse)), torch.log1p(-torch.exp(lse)))


#: below this share of q's mass outside p's top k, ``1 - sum_topk q`` (float32 log-probs) is mostly
#: rounding: the tail is then summed from the other entries instead
EXACT_TAIL_BELOW = 1e-3
TAIL_ROWS = 256  # positions per masked copy of their log-probs (256 x vocab floats)


def tail_logmass(logq: torch.Tensor, ids: torch.Tensor, lse_k: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_{v in ids} q(v))`` per position, float64: from ``lse_k`` (the log of the kept
    mass) where the tail is large enough for that difference, else summed over the other entries
    (``logsumexp`` with ``ids`` masked out), which does not round to 0 and then to ``-inf``."""
    tail = log1mexp(lse_k)
    small = lse_k > math.log1p(-EXACT_TAIL_BELOW)
    if bool(small.any()):
        rows = small.nonzero()  # positions, indexed in place: a reshape of a view of the logits copied them whole
        for i in range(0, len(rows), TAIL_ROWS):
            at = tuple(rows[i:i + TAIL_ROWS].T)
            masked = logq[at].scatter(-1, ids[at].long(), float("-inf"))
            tail[at] = torch.logsumexp(masked.double(), -1)
    return tail


def token_kl(ref_top: torch.Tensor, ref_ids: torch.Tensor, logq: torch.Tensor,
             ref_tail: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(p || q) in float64 over the top-k of ``p`` plus one bucket for the rest.

    ``ref_top``/``ref_ids`` ``[..., k]``: log p of the original's top k tokens and their ids;
    ``logq`` ``[..., V]``: the other model's full log-probs; ``ref_tail``: log p's mass outside the
    ids (:attr:`FidelityReference.tail_logmass`). Each bucket is the exact mass outside those ids
    (:func:`tail_logmass`, one rule for both: a model against itself gives 0), so the value stays a
    lower bound of the full KL when either puts almost everything on them (without ``ref_tail``, p's
    is ``1 - sum_topk p``: float32 rounding, ~1e-7)."""
    logp = ref_top.double()
    logq_k = logq.gather(-1, ref_ids.long()).double()
    # a token both rule out (log-probs -inf: a masked logit in an exact top-k) adds 0, not 0 * (-inf + inf) = NaN
    kl = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp.exp() * (logp - logq_k)).sum(-1)  # NaN stays NaN
    if ref_ids.shape[-1] < logq.shape[-1]:
        logp_tail = ref_tail.double() if ref_tail is not None else log1mexp(torch.logsumexp(logp, -1))
        logq_tail = tail_logmass(logq, ref_ids, torch.logsumexp(logq_k, -1)).clamp(min=-700.0)
        p_tail = logp_tail.exp()
        kl = kl + torch.where(p_tail > 0, p_tail * (logp_tail - logq_tail), torch.zeros_like(kl))
    return kl.clamp(min=0.0)  # rounding can leave -1e-12 for identical distributions


def top1_agrees(ref_top: torch.Tensor, ref_ids: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per position: is some token largest under both p (among its stored top k, ``ref_top``/``ref_ids``)
    and q (``logq``)? With no ties that is ``argmax p == argmax q``; with tied largest values (bf16 logits)
    it does not depend on how ``topk`` and ``argmax`` break them."""
    p_largest = ref_top == ref_top[..., :1]
    q_at = logq.gather(-1, ref_ids.long())
    return ((q_at == logq.amax(-1, keepdim=True)) & p_largest).any(-1)


def _per_batch(model, reference: FidelityReference, batch_size: int, progress: bool, desc: str):
    """Per batch of the reference's windows, per window and token: ``(KL_t [b, s-1], agree_t [b, s-1],
    NLL_p [b], NLL_q [b])`` (float64 NLLs summed over each window's tokens)."""
    bar = tqdm(total=reference.windows.shape[0], desc=desc, unit="win", disable=not progress)
    with torch.no_grad():
        for start, batch in batches(reference.windows, batch_size):
            stop = start + batch.shape[0]
            logq = _log_probs(model, batch)
            if logq.shape[-1] != reference.vocab_size:
                raise PruneError(f"the model's vocabulary ({logq.shape[-1]}) differs from the original's "
                                 f"({reference.vocab_size}): fidelity compares models with one tokenizer")
            tail = reference.tail_logmass[start:stop] if reference.tail_logmass is not None else None
            yield (token_kl(reference.top_logprobs[start:stop], reference.top_ids[start:stop], logq, tail),
                   top1_agrees(reference.top_logprobs[start:stop], reference.top_ids[start:stop], logq),
                   -reference.target_logprobs[start:stop].double().sum(-1),
                   -logq.gather(-1, batch[:, 1:, None]).squeeze(-1).double().sum(-1))
            del logq  # not alive through the next batch's forward (it doubled the pass's peak)
            bar.update(batch.shape[0])
    bar.close()


@measured_in_eval_mode
def measure_fidelity(model, reference: FidelityReference, *, batch_size: int = 4, progress: bool = False,
                     desc: str = "fidelity", per_window: bool = False) -> dict:
    """KL(original || ``model``) statistics, top-1 agreement and perplexity ratio (module docstring);
    ``per_window``: also each window's mean KL and NLL difference (``kl_windows``, ``nll_diff_windows``:
    mean over its tokens of ``NLL_q - NLL_p``), for paired comparisons of two models over the windows."""
    kls, agree, nll_p, nll_q = [], [], [], []
    for kl, same, p, q in _per_batch(model, reference, batch_size, progress, desc):
        kls.append(kl)
        agree.append(same)
        nll_p.append(p)
        nll_q.append(q)
    kl, p, q = torch.cat(kls), torch.cat(nll_p), torch.cat(nll_q)
    out = fidelity_summary(kl.numpy(), torch.cat(agree).flatten().numpy(), float(p.sum()), float(q.sum()), reference)
    if per_window:
        out.update(kl_windows=kl.mean(-1).tolist(), nll_diff_windows=((q - p) / kl.shape[-1]).tolist())
    return out


@measured_in_eval_mode
def fidelity_window_sums(model, reference: FidelityReference, *, batch_size: int = 4) -> torch.Tensor:
    """float64 ``[windows, 5]``, per window ``[sum_t KL_t, sum_t agree_t, sum_t NLL_p, sum_t NLL_q, tokens]``:
    what adds up over shares of the windows (several processes all-reduce it, each having filled its
    own rows). ``.sum(0)`` is what :func:`summary_from_sums` reads; ``[:, 0] / [:, 4]`` each window's mean KL."""
    rows = [torch.stack([kl.sum(-1), same.double().sum(-1), p, q, torch.full_like(p, kl.shape[-1])], dim=1)
            for kl, same, p, q in _per_batch(model, reference, batch_size, False, "")]
    return torch.cat(rows) if rows else torch.zeros((0, 5), dtype=torch.float64)


def summary_from_sums(sums: torch.Tensor) -> dict:
    """``kl_mean``, ``top1_agreement`` and ``perplexity_ratio`` from the five sums of
    :func:`fidelity_window_sums` added over windows (and ranks)."""
    kl, agree, nll_p, nll_q, n = (float(v) for v in sums)
    return {"kl_mean": kl / n, "top1_agreement": agree / n if not math.isnan(kl) else math.nan,  # as fidelity_summary
            "perplexity_ratio": math.exp((nll_q - nll_p) / n),
            "tokens": int(n)}


def windows_fingerprint(windows: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of the token ids (int64): two measures paired over windows
    must have measured the same ones."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def fidelity_summary(kl: np.ndarray, agree: np.ndarray, nll_p: float, nll_q: float, reference: FidelityReference) -> dict:
    """The statistics of :func:`measure_fidelity` from ``kl`` ``[windows, tokens]``. The mean's standard
    error is taken over windows, ``sd(window means) / sqrt(windows)`` (None for one window): a window's
    tokens share their context and move together, so treating them as independent would understate it."""
    n = kl.size
    per_window = kl.mean(-1)
    return {
        "kl_mean": float(kl.mean()),
        "kl_mean_stderr": float(per_window.std(ddof=1) / math.sqrt(per_window.size)) if per_window.size > 1 else None,
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(agree.mean()) if not np.isnan(kl).any() else math.nan,  # NaN log-probs: unknown, not 0
        "perplexity_original": math.exp(nll_p / n),
        "perplexity_pruned": math.exp(nll_q / n),
        "perplexity_ratio": math.exp((nll_q - nll_p) / n),
        "tokens": int(n),
        "windows": int(reference.windows.shape[0]),
        "seq_len": int(reference.windows.shape[1]),
        "windows_sha256": windows_fingerprint(reference.windows),
        "top_k": reference.top_k,
        "vocab_size": reference.vocab_size,
        "kl_exact": reference.top_k >= reference.vocab_size,
        "data": reference.data,
    }
