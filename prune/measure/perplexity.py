"""Utility of a model: perplexity over text windows (lm-eval tasks live in ``prune.lmeval``).

Perplexity follows the standard setup: the evaluation text is joined, cut into
consecutive non-overlapping windows of ``seq_len`` tokens (BOS first where the
tokenizer uses it, see :mod:`prune.io.text`), and
``ppl = exp( sum NLL(predicted tokens) / number of predicted tokens )``, where every
token of a window but its first is predicted from the tokens before it in that window.
The same windows are used for the original and the pruned model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prune.core import dist
from prune.core.errors import PruneError
from prune.model.capture import batches, measured_in_eval_mode
from prune.model.loading import input_device


def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``-log p(target)`` over a batch, in float32 one window at a time: a whole batch's
    float32 logits would be ``batch x seq_len x vocab x 4`` bytes (16 x 2048 x 128,256: 16 GiB)."""
    return sum(float(F.cross_entropy(row[:-1].float(), t, reduction="sum")) for row, t in zip(logits, targets))


@measured_in_eval_mode
def nll_sum(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> tuple[float, int]:
    """``(sum of token NLLs, number of predicted tokens)`` over ``windows [n, seq_len]``.

    Under a launcher (:mod:`prune.core.dist`) each rank runs a contiguous share of whole
    batches; the per-batch sums are gathered and added in window order, so the total is
    bit-for-bit the one-process total."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise PruneError(f"perplexity windows need at least 2 tokens each (a token and the next to predict), got "
                         f"shape {tuple(windows.shape)}")
    device = input_device(model)
    lo, hi = dist.shard(windows.shape[0], batch_size)
    sums: list[tuple[float, int]] = []
    bar = tqdm(total=hi - lo, desc=desc, unit="win", disable=not progress)
    with torch.no_grad():
        for _, batch in batches(windows[lo:hi], batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            targets = batch[:, 1:].to(logits.device, torch.long)  # cross_entropy takes int64 ids (int32 raised)
            sums.append((window_nll(logits, targets), targets.numel()))
            bar.update(batch.shape[0])
    bar.close()
    total, count = 0.0, 0
    for part in dist.all_gather(sums):  # rank order = window order
        for loss, n in part:
            total += loss
            count += n
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> dict:
    """``{"perplexity", "nll", "tokens", "windows", "seq_len"}`` of ``model`` on ``windows``."""
    total, count = nll_sum(model, windows, batch_size, progress)
    return perplexity_record(total / count, count, windows)


def perplexity_record(nll: float, tokens: int, windows: torch.Tensor) -> dict:
    """What :func:`perplexity` returns, from the mean NLL of the ``tokens`` predicted in ``windows``
    (however it was measured: a pass of its own, or the fidelity pass over the same windows)."""
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": int(tokens),
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}
