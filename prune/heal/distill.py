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

Teacher sources (``heal.teacher``: ``memory``, a copy of the original beside the student; ``cache``, its
top-``k`` log-probs per token on disk; ``auto``) are :mod:`prune.heal.teacher`. With a cache the KL is over
``k + 1`` buckets: the teacher's ``k`` tokens and one for the rest of the vocabulary (the teacher's tail mass
``1 - sum_topk p_t``, the student's exact mass outside those tokens), the teacher's bucket log-masses tempered
together (:func:`_topk_chunk`). At T = 1 that is the KL of the two bucketed distributions, the measure
``prune compare`` reports (:func:`prune.measure.fidelity.token_kl`): 0 for a student equal to the teacher and
at most the full KL, equal to it when ``k = vocab`` (tests/test_distill.py states the tolerance). (0.2.0 and
before renormalised the teacher over its k tokens and the tail ignored: that adds ``-log`` of the student's
mass on them, 0.12 nats for a perfect student at k = 16, and pulls its tail mass onto the k.)

The KL to the teacher before and after healing (T = 1, mean per token over the held-out
windows; top-k estimate with a cache) and the top-1 agreement go into the healing record.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prune.core.config import HealConfig, changed
from prune.core.errors import PruneError
from prune.core.records import complement
from prune.measure.fidelity import log1mexp, tail_logmass, top1_agrees
from prune.model.capture import _hidden_from_output, measured_in_eval_mode
from prune.heal.teacher import (
    EVAL_BATCH,
    Teacher,
    TopkCache,
    block_pairs,
    build_cache,
    check_cache,
    check_teacher_model,
    check_top_k,
    free_memory,
    logit_width,
    model_bytes,
    open_cache,
    prepare_teacher,
    recorded_pairs,
    source_identity,
    teacher_fits,
    teacher_kind,
)
from prune.model.loading import decoder_layers, input_device

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
    if teacher.kind == "memory":  # a teacher in memory (teacher: auto that fit, too) read no top-k cache
        ignored = record.get("ignored") or []
        record["ignored"] = [*ignored, *(k for k in changed(cfg, ["top_k", "teacher_cache"]) if k not in ignored)]
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
        kind = teacher_kind(cfg, loaded, loaded=True, quiet=quiet)  # auto: does it stay beside the student, now it is loaded
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
