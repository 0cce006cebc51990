"""Healing: win back part of the utility that pruning costs, and still ship a plain checkpoint.

Four methods (settings: :class:`prune.HealConfig`), all fitted on text that is not
the evaluation text, all leaving a standard ``AutoModelForCausalLM`` checkpoint:

* ``lora``: LoRA adapters (peft) on the pruned model's linear projections, trained with the
  causal-LM loss, then merged into the weights (``merge_and_unload``): no adapter module
  and no peft dependency remains.
* ``replace`` (LLM-Streamline): the removed contiguous run ``r..r+k-1`` becomes ONE block,
  initialised from a removed block (``init``) and trained so that
  ``block(h_r) ~ h_{r+k}``, with ``h_r`` / ``h_{r+k}`` the hidden states entering / leaving the
  run in the ORIGINAL model on the training windows; loss ``MSE(out, target)`` (``mse``) or
  ``MSE + mean(1 - cos(out, target))`` over tokens (``mse+cos``). The model keeps ``L - k + 1``
  blocks: the surgery removes the other ``k - 1`` (renumbering ``layer_idx``, config lists).
  Since the targets need the full model, :func:`prepare` captures them before the surgery.
* ``bridge``: nothing is trained; the least-squares bridge at each cut (:mod:`prune.heal.bridge`,
  ``heal.bridge``, ``down`` by default) is the whole repair (ReplaceMe's training-free setting).
* ``partial``: the last ``last_blocks`` blocks (and the final norm; with ``train_lm_head``
  the LM head) are fine-tuned with the causal-LM loss, everything else frozen. A tied LM head
  IS the input embedding matrix: training it changes the input embeddings too, and the model
  stays tied (no untying, which would add ``vocab x hidden`` parameters).

Entry points:

* :func:`heal_model`: the Python API, no recipe needed;
* :func:`preflight`, :func:`prepare` and :func:`heal`: the ``heal:`` stage of a recipe in
  :func:`prune.pipeline.run` (checks before loading; capture before surgery; training after);
* :func:`heal_run`: ``prune heal RUN_DIR --output NEW_DIR`` on a saved run folder.

Every method returns a record (stored as ``pruning.json["healing"]``): method, settings, data,
seeds, steps, tokens seen, seconds, device, trained parameters, per-step losses and the
causal-LM loss on held-out windows of the training text before and after.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prune.model.capture import StopForward, _hidden_from_args, _hidden_from_output, batches, measured_in_eval_mode
from prune.core.config import TextSource
from prune.io.text import calibration_windows, load_text
from prune.core.errors import PruneError
from prune.core.records import complement, is_block_map
from prune.core.tables import healing_lines
from prune.model.arch import meta_model
from prune.model.loading import context_length, decoder_layers, final_norm, input_device, text_config
from prune.measure.scoring import check_model
from prune.core.config import HEAL_METHODS, HealConfig, SelectConfig, TextConfig, changed

METHODS = HEAL_METHODS


# ---- settings -------------------------------------------------------------------------------
def heal_config(method: str | HealConfig, data=None, **settings) -> HealConfig:
    """A validated :class:`HealConfig` from keyword settings; bad values raise one-line :class:`PruneError`."""
    from pydantic import ValidationError

    from prune.core.config import format_validation_error

    if isinstance(method, HealConfig):  # its settings, with the keywords (and data) given here, validated again
        settings = {**method.model_dump(), **settings}
        method, data = settings.pop("method"), data if data is not None else settings.get("data")
        settings.pop("data", None)
    if isinstance(data, (str, os.PathLike)):
        data = {"path": str(data)}
    elif isinstance(data, TextSource):
        data = {k: v for k, v in data.describe().items() if v is not None}
    elif isinstance(data, TextConfig):
        data = data.model_dump()
    try:
        return HealConfig.model_validate({"method": method, "data": data, **settings})
    except ValidationError as exc:
        raise PruneError(format_validation_error(exc, "heal settings")) from None


def training_windows(tokenizer, cfg: HealConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [n_samples, seq_len], held_out [val_samples, seq_len])`` token windows of ``cfg.data``:
    non-overlapping windows drawn with ``cfg.seed`` (see :func:`prune.io.text.calibration_windows`),
    then split at random (seed ``cfg.seed + 1``) so the held-out windows are disjoint from training."""
    if cfg.data is None:
        raise PruneError("no training text: set heal data (e.g. ../shared/data/c4/c4_web_1480.jsonl)")
    d = cfg.data
    all_windows = calibration_windows(tokenizer, load_text(d.source()), cfg.n_samples + cfg.val_samples,
                                      cfg.seq_len, cfg.seed, d.bos, section="heal")
    order = torch.randperm(all_windows.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 1))
    return all_windows[order[cfg.val_samples:]], all_windows[order[: cfg.val_samples]]


#: nn.Linear subclasses whose own forward is still x W^T + b (Falcon's: the product written out)
LINEAR_AS_IS = ("FalconLinear",)


def plain_linear(module: nn.Module) -> bool:
    """A layer computing ``x W^T + b`` (``nn.Linear``, GPT-2's ``Conv1D``); not a subclass with a forward of its
    own (Llama 4's and PhiMoE's routers subclass ``nn.Linear`` and return a tuple: LoRA on them failed mid-run)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D) or (isinstance(module, nn.Linear) and (type(module).forward is nn.Linear.forward
                                                                          or type(module).__name__ in LINEAR_AS_IS))


#: the layers besides linear ones that peft's LoRA adapts
LORA_OTHER_LAYERS = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def linear_names(model: nn.Module) -> str:
    """The last names of ``model``'s linear layers but the LM head (``q_proj, k_proj, ...``), for a message."""
    output = model.get_output_embeddings()
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if plain_linear(m) and m is not output}))


def lora_targets_matched(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the modules peft's ``target_modules`` matching would pick (``all-linear``: every
    linear layer but the LM head; a string: a regex matched against full names; a list:
    name suffixes). Raises :class:`PruneError` when a target matches nothing."""
    output = model.get_output_embeddings()
    names = [(n, m) for n, m in model.named_modules() if n]
    if targets == "all-linear":
        found = [n for n, m in names if plain_linear(m) and m is not output]
        if not found:
            raise PruneError("heal.target_modules all-linear: the model has no linear layer besides the LM head")
        return found
    if isinstance(targets, str):
        found = [n for n, _ in names if re.fullmatch(targets, n)]
        if not found:
            raise PruneError(f"heal.target_modules regex {targets!r} matches no module name of this model")
        return found
    found = []
    for t in targets:
        hits = [n for n, _ in names if n == t or n.endswith("." + t)]
        if not hits:
            raise PruneError(f"heal.target_modules: {t!r} matches no module of this model "
                             f"(its linear layers: {linear_names(model)}; or use all-linear)")
        found += hits
    return sorted(set(found))


#: the keys only training reads (not a bridge's least-squares fit)
_TRAINING_KEYS = ("steps", "learning_rate", "schedule", "average", "weight_decay", "gradient_accumulation",
                  "mixed_precision", "gradient_checkpointing")

#: the keys only distillation reads
_DISTILL_KEYS = ("temperature", "kl_weight", "hidden_weight", "hidden_loss", "lm_weight", "teacher", "top_k", "teacher_cache")


def ignored_settings(cfg: HealConfig) -> list[str]:
    """The heal keys set away from their default that this objective / bridge never reads (e.g.
    ``temperature`` with ``objective: lm``). The method's own knobs (``rank``, ``last_blocks``, ...)
    are not listed: recipes carry them to switch methods with ``--set heal.method=...``."""
    unused = set()
    if cfg.method == "bridge":  # nothing trained: the bridges are checked by the KL at T = 1 (or the loss) alone
        unused.update(("temperature", "kl_weight", "hidden_weight", "hidden_loss", "lm_weight", *_TRAINING_KEYS))
    if cfg.objective == "lm":
        unused.update(_DISTILL_KEYS)
    elif cfg.method == "replace":
        unused.add("loss")  # the whole model's distillation loss, not the block's hidden-state loss
    if cfg.objective == "distill" and cfg.teacher == "memory":  # the original in memory: no top-k cache
        unused.update(("top_k", "teacher_cache"))
    if cfg.kl_weight == 0:  # no KL term: nothing is tempered
        unused.add("temperature")
    if cfg.hidden_weight == 0:
        unused.add("hidden_loss")
    if cfg.method == "replace" and cfg.objective == "lm":
        unused.add("gradient_checkpointing")
    if cfg.bridge == "none":
        unused.add("bridge_weight")
    return changed(cfg, [k for k in type(cfg).model_fields if k in unused])


def check_settings(cfg: HealConfig, model: nn.Module, n_blocks: int, context: int | None = None,
                   n_windows: int | None = None) -> None:
    """Checks of ``cfg`` against a model (a meta-device copy is enough) that keeps ``n_blocks``
    blocks after pruning, and ``n_windows`` training windows (default ``n_samples``); one-line
    :class:`PruneError` naming the key and the fix."""
    from prune.heal.training import check_parallel

    check_parallel(cfg)  # batch split over the launch's ranks, FSDP only under a launcher
    windows = cfg.n_samples if n_windows is None else n_windows
    per_step = cfg.batch_size * cfg.gradient_accumulation  # a step would see the windows there are, not the batch;
    if per_step > windows and cfg.method != "bridge":  # accumulation 10**9: a step that never ended, cycling them
        accumulated = cfg.gradient_accumulation > 1
        what = (f"heal.batch_size x heal.gradient_accumulation ({per_step} windows a step)" if accumulated
                else f"heal.batch_size {cfg.batch_size}")
        raise PruneError(f"{what} is more than the {windows} training windows{' (n_samples)' if n_windows is None else ''}"
                         f": lower {'gradient_accumulation' if accumulated else 'batch_size'}"
                         f"{', or raise n_samples' if n_windows is None else ''}")
    width = getattr(text_config(model.config), "hidden_size", None) if hasattr(model, "config") else None
    if cfg.method == "lora" and isinstance(width, int) and cfg.rank > width:  # 100000 on a 48-wide model: 460M weights
        raise PruneError(f"heal.rank {cfg.rank} is more than the model's hidden size {width}: a LoRA update of a layer "
                         f"that wide has rank at most {width}; lower it (8 to 64 is usual)")
    if context is not None and cfg.seq_len > context:
        raise PruneError(f"heal.seq_len={cfg.seq_len} is longer than the model's context ({context} tokens); lower it")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PruneError("heal.mixed_precision fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    replace_alone = cfg.method == "replace" and cfg.objective == "lm"  # the block trains alone on its cached inputs
    if cfg.gradient_checkpointing and not replace_alone and not getattr(model, "supports_gradient_checkpointing", False):
        raise PruneError(f"heal.gradient_checkpointing: {type(model).__name__} does not support it (set it to false)")
    if ignored := ignored_settings(cfg):
        from prune.core.console import say_once

        say_once(f"note: heal {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with method "
            f"{cfg.method}, objective {cfg.objective}{', bridge none' if cfg.bridge == 'none' else ''} (ignored)")
    if cfg.objective == "distill":  # -- distill (prune.heal.distill): checks that need the vocabulary --
        from prune.heal.teacher import logit_width

        width = logit_width(model)
        if cfg.top_k > width:
            raise PruneError(f"heal.top_k={cfg.top_k} is larger than the vocabulary ({width} tokens); lower it")
    if cfg.bridge != "none":  # the blocks before the cuts are checked when the cuts are known
        from prune.heal.bridge import check_bridge_anywhere

        check_bridge_anywhere(model, kind=cfg.bridge)
    if cfg.method == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise PruneError("heal.method lora needs peft (pip install peft)") from None
        targets = lora_targets_matched(model, cfg.target_modules)
        if cfg.lora_init == "olora" and any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in targets):
            raise PruneError("heal.lora_init olora does not support Conv1D layers (GPT-2 style; peft multiplies the "
                             "transposed weight): use lora_init pissa or default")
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and embed is not None and (head.weight is embed.weight
                                                          or getattr(model.config, "tie_word_embeddings", False))
        for name in targets:
            module = model.get_submodule(name)
            if tied and module in (head, embed):
                part = "output head" if module is head else "input embedding"
                raise PruneError(f"heal.target_modules includes the {part} ({name}), which shares its weight with the "
                                 f"{'input embeddings' if module is head else 'output head'}: merging its LoRA would "
                                 "change both (the merged model would not be the trained one); leave it out of "
                                 "target_modules")
            if not (plain_linear(module) or isinstance(module, LORA_OTHER_LAYERS)):
                raise PruneError(f"heal.target_modules matches {name}, a {type(module).__name__}, which LoRA cannot "
                                 f"adapt (linear layers, embeddings and convolutions only; this model's linear layers: "
                                 f"{linear_names(model)})")
    if cfg.method == "partial":
        if cfg.last_blocks > n_blocks:
            raise PruneError(f"heal.last_blocks={cfg.last_blocks} but the pruned model has {n_blocks} blocks (lower it)")
        if cfg.train_norm and final_norm(model) is None:
            raise PruneError(f"heal.train_norm: no final norm found in {type(model).__name__} (set train_norm: false)")
        if cfg.train_lm_head and model.get_output_embeddings() is None:
            raise PruneError(f"heal.train_lm_head: {type(model).__name__} has no LM head (set train_lm_head: false)")


def check_run(removed: list[int], n_layers: int) -> list[int]:
    """The removed blocks as one sorted contiguous run of at least 2 (what ``replace`` needs)."""
    run = sorted(removed)
    if len(run) < 2:
        raise PruneError(f"heal.method replace needs at least 2 removed blocks, got {run} (use lora or partial)")
    if run != list(range(run[0], run[0] + len(run))):
        raise PruneError(f"heal.method replace needs one contiguous run of removed blocks, got {run} "
                         "(select with strategy contiguous, or use heal.method lora/partial)")
    if run[-1] >= n_layers:
        raise PruneError(f"removed blocks {run} do not fit a model of {n_layers} blocks")
    return run


# ---- loss helpers -----------------------------------------------------------------------------
def _lm_loss(model, batch) -> torch.Tensor:
    ids = batch[0]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def mean_lm_loss(model, windows: torch.Tensor, batch_size: int = 4) -> float | None:
    """Mean causal-LM loss (nats per predicted token) of ``model`` on ``windows``; None when empty."""
    if windows is None or windows.shape[0] == 0:
        return None
    from prune.measure.perplexity import nll_sum

    total, count = nll_sum(model, windows, batch_size)
    return total / count


def _trainable_state(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _restore_trainable(model: nn.Module, state: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(state.get(n, True))


def _record(cfg: HealConfig, log: dict, trained: list[str], n_params: int, windows, val_windows,
            before: float | None, after: float | None, started: float) -> dict:
    losses = log["losses"]
    return {
        "method": cfg.method,
        "settings": cfg.model_dump(mode="json"),
        "ignored": ignored_settings(cfg),  # set, and never read by this method and objective
        "data": {**(cfg.data.source().describe() if cfg.data else {"path": None}),
                 "train_windows": int(windows.shape[0]), "val_windows": int(val_windows.shape[0]) if val_windows is not None else 0,
                 "seq_len": int(windows.shape[1])},
        "seed": cfg.seed,
        "steps": cfg.steps,
        "averaged_steps": log["averaged_steps"],
        "warmup_steps": log["warmup_steps"],  # at rates (s + 1) / (warmup + 1) of heal.learning_rate
        "tokens_seen": log["tokens_seen"],
        "windows_seen": log["items_seen"],
        "epochs": round(log["epochs"], 3),
        "trained": trained,
        "trainable_parameters": n_params,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": [round(x, 5) for x in losses],
        "val_loss_before": before,
        "val_loss_after": after,
        "val_perplexity_before": math.exp(before) if before is not None else None,
        "val_perplexity_after": math.exp(after) if after is not None else None,
        "device": log["device"],
        "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "train_seconds": log["seconds"],
        "seconds": round(time.time() - started, 1),
    }


def _gradient_checkpointing(model, on: bool) -> None:
    """Turn activation checkpointing on (non-reentrant: frozen inputs need no grad hook) or off."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def check_in_memory(model: nn.Module) -> None:
    """Refuse a model Accelerate offloaded in part: its offloaded weights sit on the meta device, where training
    (or folding a bridge) cannot change them."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PruneError("healing changes weights, but part of this model is offloaded by Accelerate (to disk or CPU) "
                         "(load it without offload: more max_memory, or a smaller model)")


# ---- LoRA ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def peft_quiet():
    """Around peft's wrapping of a model: it reads transformers' deprecated ``is_gradient_checkpointing``, whose
    FutureWarning (printed under ``-q`` too) nothing a user does can silence."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def heal_lora(model, cfg: HealConfig, windows: torch.Tensor, val_windows: torch.Tensor | None = None, *,
              quiet: bool = False, callback=None, train_fn=None, adapter_dir: str | None = None) -> dict:
    """LoRA on the pruned ``model`` (in place), causal-LM loss (or ``train_fn(module, params)``,
    e.g. distillation), merged back into the weights. ``adapter_dir``: also save the trained
    adapter there (PEFT format); with ``cfg.merge`` false the adapter is only saved, and
    ``model`` keeps its pruned weights."""
    from peft import LoraConfig, get_peft_model

    started = time.time()
    check_in_memory(model)
    targets = lora_targets_matched(model, cfg.target_modules)  # olora on Conv1D: refused by check_settings
    before = mean_lm_loss(model, val_windows)
    flags = _trainable_state(model)
    if cfg.gradient_checkpointing:
        _gradient_checkpointing(model, True)
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())  # GPT-2's Conv1D stores (in, out): peft sets fan_in_fan_out, with a warning
    conv1d = all(isinstance(modules[n], Conv1D) for n in targets)
    # all-linear as peft reads it takes every nn.Linear subclass, routers too: the layers matched, by name
    target_modules = targets if cfg.target_modules == "all-linear" else cfg.target_modules
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=target_modules, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", use_dora=cfg.dora, fan_in_fan_out=conv1d,
                      init_lora_weights=True if cfg.lora_init == "default" else cfg.lora_init)
    norms = norm_parameters(model) if cfg.lora_norms else {}
    norms_before = {n: p.detach().clone() for n, p in norms.items()}
    if cfg.dora and expert_weights_added(model, lcfg):  # before peft injects anything into the caller's model
        raise PruneError(f"heal.dora: peft adapts the fused expert weights of this {model.config.model_type} model "
                         "beside the projections named, and DoRA cannot adapt those: set dora=false, or "
                         "target_modules naming the attention projections only (q_proj,k_proj,v_proj,o_proj)")
    torch.manual_seed(cfg.seed)  # the adapters' random init follows heal.seed, not what ran before in the process
    try:
        with peft_quiet():
            peft_model = get_peft_model(model, lcfg)  # pissa/olora: the base weights become the residual W - s*B0A0
    except ValueError as exc:  # a peft whose conversion the check above could not run: its adapters may be left
        if cfg.dora and "ParamWrapper" in str(exc):
            raise PruneError(f"heal.dora: peft cannot adapt this {model.config.model_type} model's fused expert weights "
                             "with DoRA: set dora=false") from None
        raise
    adapted = adapted_weights(peft_model)  # what peft really adapts (an MoE's fused experts too), for the record
    skipped = sorted(set(targets) - set(adapted))  # peft's MoE conversion renames the targets: a dense MLP's are lost
    if skipped and not quiet:
        print(f"note: peft adapted {len(adapted)} weights and left out {len(skipped)} of the layers named "
              f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}): the record lists what was trained",
              flush=True)
    initial = ({n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
               if cfg.lora_moves_base_weights else {})
    merged = False
    try:
        for p in norms.values():
            p.requires_grad_(True)
        groups = lora_param_groups(peft_model, cfg)
        n_params = sum(p.numel() for g in groups for p in g["params"])
        log = (train_fn or _train_lm)(peft_model, groups, windows, cfg, quiet, callback)
        if adapter_dir is not None:
            peft_model.save_pretrained(adapter_dir)
        if cfg.merge:
            peft_model.merge_and_unload()
            merged = True
        else:
            with_adapter = mean_lm_loss(model, val_windows)  # adapters are injected into `model`: still active
    finally:
        if not merged:  # failed or interrupted: take the adapters out, leave the weights as they were
            _restore_pruned_weights(peft_model, initial, norms, norms_before)
        if cfg.gradient_checkpointing:
            _gradient_checkpointing(model, False)
        _restore_trainable(model, flags)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(model):
                delattr(model, attr)
    leftover = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
    if leftover:
        raise PruneError(f"internal error: adapter modules left after merging LoRA: {leftover[:3]}; please report this")
    after = mean_lm_loss(model, val_windows) if cfg.merge else with_adapter
    suffixes = sorted({n.rsplit(".", 1)[-1] if "experts." not in n else "experts." + n.rsplit(".", 1)[-1]
                       for n in adapted})
    trained = [f"{'dora' if cfg.dora else 'lora'} r={cfg.rank} on {len(adapted)} weights: {', '.join(suffixes)}"]
    if norms:
        trained.append(f"{len(norms)} norm weights")
    record = _record(cfg, log, trained, n_params, windows, val_windows, before, after, started)
    record["lora"] = {"rank": cfg.rank, "alpha": cfg.alpha, "dora": cfg.dora, "init": cfg.lora_init, "modules": len(adapted),
                      "targets": suffixes, "not_adapted": skipped, "norms": len(norms), "loraplus_ratio": cfg.loraplus_ratio, "adapter_parameters": n_params, "merged": cfg.merge}
    return record


def expert_weights_added(model: nn.Module, lcfg) -> bool:
    """Whether peft will turn some of ``lcfg``'s target names into an MoE's fused expert weights (its conversion
    of transformers 4 adapter configs, run on a copy here as ``get_peft_model`` runs it)."""
    import copy

    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a peft without the conversion adds none
        return False
    probe = copy.deepcopy(lcfg)
    with peft_quiet():
        convert_peft_config_for_transformers(probe, model=model, conversions=get_model_conversion_mapping(model))
    return bool(getattr(probe, "target_parameters", None))


def adapted_weights(peft_model) -> list[str]:
    """The weights peft put an adapter on, by their names in the model: a linear layer's module name, or
    ``<experts module>.<parameter>`` for the stacked expert weights of an MoE, which peft adds to the
    targets itself where the projections named match an architecture it converts (Qwen-MoE's ``down_proj``)."""
    names = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or not isinstance(getattr(module, "lora_A"), nn.ModuleDict):
            continue
        base = re.sub(r"(^base_model\.model\.|\.base_layer)", "", name)
        parameter = getattr(module, "parameter_name", None)
        names.append(f"{base}.{parameter}" if parameter else base)
    return sorted(set(names))


def lora_param_groups(peft_model, cfg: HealConfig) -> list[dict]:
    """The trainable parameters as optimizer groups: with ``cfg.loraplus_ratio`` r > 1 the LoRA B
    matrices in their own group at ``r * learning_rate`` (LoRA+), everything else at the base rate."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if cfg.loraplus_ratio == 1:
        return [{"params": [p for _, p in named]}]
    b = [p for n, p in named if ".lora_B." in n]
    return [{"params": [p for n, p in named if ".lora_B." not in n]},
            {"params": b, "lr": cfg.learning_rate * cfg.loraplus_ratio}]


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The gain (and bias) of every normalisation module (``*Norm*`` class or ``nn.LayerNorm``), by name."""
    return {f"{name}.{p_name}" if name else p_name: p for name, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
            for p_name, p in m.named_parameters(recurse=False)}


@torch.no_grad()
def _restore_pruned_weights(peft_model, initial: dict, norms: dict, norms_before: dict) -> None:
    """Undo an unfinished LoRA run: the norm gains back; with pissa/olora (whose init moved
    ``s*B0A0`` out of each base weight) the initial adapters back and merged, so each weight is
    ``W - s*B0A0 + s*B0A0 = W`` up to rounding; otherwise the adapters simply taken out."""
    for name, p in norms.items():
        p.copy_(norms_before[name])
    if not initial:
        peft_model.unload()
        return
    for name, p in peft_model.named_parameters():
        if name in initial:
            p.copy_(initial[name])
    peft_model.merge_and_unload()


def _train_lm(model, params, windows, cfg, quiet, callback) -> dict:
    from prune.heal.training import train

    return train(model, params, TensorDataset(windows), _lm_loss, cfg, tokens_per_item=int(windows.shape[1]),
                 desc=f"heal {cfg.method}", quiet=quiet, callback=callback)


# ---- partial fine-tuning --------------------------------------------------------------------------
def partial_parameters(model, cfg: HealConfig) -> tuple[list[str], list[nn.Parameter], bool]:
    """``(module names, parameters, tied_head_trained)`` that partial fine-tuning trains."""
    from prune.model.loading import decoder_layers_path

    path = decoder_layers_path(model)
    layers = model.get_submodule(path)
    n = len(layers)
    if cfg.last_blocks > n:
        raise PruneError(f"heal.last_blocks={cfg.last_blocks} but the model has {n} blocks (lower it)")
    names, params = [], []
    for i in range(n - cfg.last_blocks, n):
        names.append(f"{path}.{i}")
        params += list(layers[i].parameters())
    module_names = {id(m): name for name, m in model.named_modules()}
    if cfg.train_norm:
        norm = final_norm(model)
        if norm is None:
            raise PruneError(f"heal.train_norm: no final norm found in {type(model).__name__} (set train_norm: false)")
        names.append(module_names[id(norm)])
        params += list(norm.parameters())
    tied = False
    if cfg.train_lm_head:
        head = model.get_output_embeddings()
        tied = head.weight is model.get_input_embeddings().weight
        names.append(module_names[id(head)] + (f" (tied: also {module_names[id(model.get_input_embeddings())]})" if tied else ""))
        params += list(head.parameters())
    unique = list({id(p): p for p in params}.values())
    return names, unique, tied


def heal_partial(model, cfg: HealConfig, windows: torch.Tensor, val_windows: torch.Tensor | None = None, *,
                 quiet: bool = False, callback=None, train_fn=None) -> dict:
    """Fine-tune the last ``cfg.last_blocks`` blocks (+ final norm, + LM head) of ``model`` in place."""
    started = time.time()
    check_in_memory(model)
    names, params, tied = partial_parameters(model, cfg)
    before = mean_lm_loss(model, val_windows)
    flags = _trainable_state(model)
    try:
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            _gradient_checkpointing(model, True)
        log = (train_fn or _train_lm)(model, params, windows, cfg, quiet, callback)
    finally:
        if cfg.gradient_checkpointing:
            _gradient_checkpointing(model, False)
        _restore_trainable(model, flags)
    after = mean_lm_loss(model, val_windows)
    record = _record(cfg, log, names, sum(p.numel() for p in params), windows, val_windows, before, after, started)
    record["partial"] = {"last_blocks": cfg.last_blocks, "train_norm": cfg.train_norm, "train_lm_head": cfg.train_lm_head,
                         **({"lm_head_tied": tied} if cfg.train_lm_head else {})}  # of a head not trained: unsaid
    if tied:
        record["partial"]["note"] = ("the LM head is tied to the input embeddings: training it changed the input "
                                     "embeddings too (the model stays tied)")
    return record


# ---- replacement layer -------------------------------------------------------------------------------
@measured_in_eval_mode
def capture_run(model, windows: torch.Tensor, first: int, last: int, batch_size: int = 8,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_in, h_out)``: the hidden states entering block ``first`` and leaving block ``last``
    of ``model`` for every window, ``[n, seq_len, d]`` on the CPU in the block's dtype. Each
    forward pass stops after block ``last`` (the rest of the model is not run)."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    dtype = next(layers[first].parameters()).dtype
    ins, outs = [], []

    def pre(module, args, kwargs):
        ins.append(_hidden_from_args(args, kwargs).detach().to("cpu", dtype, copy=True))

    def post(module, args, kwargs, output):
        outs.append(_hidden_from_output(output).detach().to("cpu", dtype, copy=True))
        raise StopForward

    handles = [layers[first].register_forward_pre_hook(pre, with_kwargs=True),
               layers[last].register_forward_hook(post, with_kwargs=True)]
    device = input_device(model)
    try:
        with torch.no_grad():
            for _, batch in tqdm(list(batches(windows, batch_size)), desc="capture run", unit="batch", disable=not progress):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(ins), torch.cat(outs)


@measured_in_eval_mode
def block_call_args(model, index: int, input_ids: torch.Tensor) -> tuple[tuple, dict]:
    """``(extra positional args, keyword args)`` the model passes to block ``index`` for
    ``input_ids`` (attention mask, positions, rotary embeddings, ...), so the block can be
    called alone on stored hidden states; the forward stops before the block runs."""
    got: dict[str, Any] = {}

    def pre(module, args, kwargs):
        got["args"] = tuple(args[1:])
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    handle = decoder_layers(model)[index].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(input_device(model)), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return got["args"], got["kwargs"]


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


@dataclass
class HealPlan:
    """What healing needs from the full model, taken before the surgery (see :func:`prepare`)."""

    cfg: HealConfig
    remove: list[int]  # blocks the surgery removes: the k selected, or k - 1 for a replacement layer
    windows: torch.Tensor
    val_windows: torch.Tensor
    run: list[int] | None = None  # replace: the removed run (original indices)
    source_block: int | None = None  # replace: the original block kept as the replacement
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    val_inputs: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None
    init_state: dict[str, torch.Tensor] | None = None  # mean_removed: the averaged weights
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def replacement_init(layers: nn.ModuleList, run: list[int], init: str) -> tuple[int, dict | None]:
    """``(block kept as the replacement, weights to load into it or None)`` for an ``init`` rule:
    ``first_removed`` / ``last_removed`` keep that block as it is; ``mean_removed`` keeps the
    first and loads the element-wise mean of the run's weights."""
    if init != "mean_removed":
        return (run[-1] if init == "last_removed" else run[0]), None
    states = [layers[i].state_dict() for i in run]
    if any(s.keys() != states[0].keys() or any(s[k].shape != states[0][k].shape for k in s) for s in states):
        raise PruneError(f"heal.init mean_removed: blocks {run} differ in shape (use first_removed)")
    return run[0], {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def plan_replacement(model, run: list[int], cfg: HealConfig, windows, val_windows, quiet: bool = False) -> HealPlan:
    """Capture the run's input/output states on the full ``model`` and decide which blocks to cut."""
    started = time.time()
    check_in_memory(model)
    layers = decoder_layers(model)
    run = check_run(run, len(layers))
    source, init_state = replacement_init(layers, run, cfg.init)
    h_in, h_out = capture_run(model, windows, run[0], run[-1], cfg.batch_size, progress=not quiet)
    v_in = v_out = None
    if val_windows is not None and val_windows.shape[0]:
        v_in, v_out = capture_run(model, val_windows, run[0], run[-1], cfg.batch_size)
    return HealPlan(cfg, [i for i in run if i != source], windows, val_windows, run, source, h_in, h_out, v_in, v_out,
                    init_state, time.time() - started)


def _replacement_loss(kind: str) -> Callable:
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, target = out.float(), target.float()
        value = F.mse_loss(out, target)
        if kind == "mse+cos":
            value = value + (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()
        return value

    return loss


def heal_replacement(model, plan: HealPlan, *, quiet: bool = False, callback=None) -> dict:
    """Train the replacement block of a model pruned by ``plan.remove`` (see :func:`plan_replacement`)."""
    from prune.heal.training import train

    cfg, run = plan.cfg, plan.run
    started = time.time() - plan.seconds
    layers = decoder_layers(model)
    position = run[0]
    block = layers[position]
    if plan.init_state is not None:
        block.load_state_dict(plan.init_state)
    home = next(block.parameters()).device
    loss_of = _replacement_loss(cfg.loss)
    call_cache: dict[int, tuple] = {}

    def call(module, hidden):
        b = hidden.shape[0]
        if b not in call_cache:
            args, kwargs = block_call_args(model, position, plan.windows[:b])
            call_cache[b] = (args, kwargs)
        args, kwargs = call_cache[b]
        return _hidden_from_output(module(hidden, *_to(args, hidden.device), **_to(kwargs, hidden.device)))

    def step_loss(module, batch):
        x, y = batch
        return loss_of(call(module, x), y)

    @measured_in_eval_mode
    def block_mse(module) -> float:
        dev = next(module.parameters()).device
        with torch.no_grad():
            outs = [call(module, x.to(dev)).float().cpu() for _, x in batches(plan.val_inputs, cfg.batch_size)]
        return float(F.mse_loss(torch.cat(outs), plan.val_targets.float()))

    def val_mse() -> float | None:
        return None if plan.val_inputs is None else block_mse(block)

    flags = _trainable_state(model)
    mse_before = val_mse()
    before = mean_lm_loss(model, plan.val_windows)
    try:
        model.requires_grad_(False)
        block.requires_grad_(True)
        params = list(block.parameters())
        log = train(block, params, TensorDataset(plan.inputs, plan.targets), step_loss, cfg,
                    tokens_per_item=int(plan.inputs.shape[1]), desc="heal replace", quiet=quiet, callback=callback)
    finally:
        block.to(home)
        _restore_trainable(model, flags)
    after = mean_lm_loss(model, plan.val_windows)
    from prune.model.loading import decoder_layers_path

    record = _record(cfg, log, [f"{decoder_layers_path(model)}.{position}"], sum(p.numel() for p in params),
                     plan.windows, plan.val_windows, before, after, started)
    record["replacement"] = {"replaces": run, "position": position, "init": cfg.init, "init_block": plan.source_block,
                             "loss": cfg.loss, "val_mse_before": mse_before, "val_mse_after": val_mse(),
                             "capture_seconds": round(plan.seconds, 1)}
    return record


# ---- linear bridges (prune.heal.bridge) ------------------------------------------------------------------
def with_bridges(model, fit: Callable, val_windows, train: Callable[[], dict], teacher=None, quiet: bool = False) -> dict:
    """Fold the bridges that help into the pruned ``model``, then ``train()``.

    ``fit(error, start) -> (bridges, kept)`` folds them: cut by cut on the pruned model
    (:func:`prune.heal.bridge.cascade`, when the original is in memory) or, fitted before the
    surgery on the original's states, one after another (:func:`prune.heal.bridge.keep_helpful`).
    Either way a bridge is kept only where it lowers ``error()``, the held-out measure of the
    training objective on ``val_windows``: the KL to the ``teacher`` when distilling, else the
    causal-LM loss (``start``: its value before; with no held-out windows ``error`` is None and
    every bridge is kept, unchecked). The record's ``*_before`` figures stay the un-bridged
    model's; ``record["bridge"]`` holds the bridged ones (``val_loss_after``, with a teacher the
    KL and top-1 agreement) and each cut's ``kept``."""
    check_in_memory(model)  # a bridge folded into offloaded weights changes nothing
    loss = mean_lm_loss(model, val_windows)
    kl = None
    if teacher is not None:
        from prune.heal.distill import fidelity

        kl = fidelity(model, teacher, val_windows)
    if loss is None:  # no held-out windows: every bridge kept, unchecked
        measure, start = None, None
    elif teacher is not None:
        measure, start = (lambda: fidelity(model, teacher, val_windows)["kl"]), kl["kl"]
    else:
        measure, start = (lambda: mean_lm_loss(model, val_windows)), loss
    bridges, kept = fit(measure, start)
    record = train()
    info = {**bridges.record(), "checked_by": None if loss is None else ("kl" if teacher is not None else "loss"),
            "val_loss_before": loss, "val_loss_after": record["val_loss_before"]}
    for cut, k in zip(info["cuts"], kept):
        cut["kept"] = k
    dropped = [c["run"] for c in info["cuts"] if not c["kept"]]
    if dropped and not quiet:
        print(f"heal.bridge {bridges.kind}: dropped the bridge at blocks "
              f"{', '.join(f'{r[0]}-{r[-1]}' for r in dropped)}: it did not lower the held-out "
              f"{'KL to the teacher' if teacher is not None else 'loss'}", flush=True)
    record["val_loss_before"] = loss
    record["val_perplexity_before"] = math.exp(loss) if loss is not None else None
    if kl is not None and "distill" in record:
        d = record["distill"]
        info.update(kl_before=kl["kl"], kl_after=d["kl_before"], top1_before=kl["top1"], top1_after=d["top1_before"])
        d["kl_before"], d["top1_before"] = kl["kl"], kl["top1"]
    record["bridge"] = info
    return record


def cascade_fit(original, model, removed: list[int], windows, cfg: HealConfig) -> Callable:
    """``with_bridges``' fit: cut by cut on the pruned ``model``, against the ``original`` in memory."""
    from prune.heal.bridge import cascade

    return lambda error, start: cascade(original, model, removed, windows, error, start, cfg.batch_size, cfg.bridge,
                                             cfg.bridge_weight)


def prefitted(model, bridges) -> Callable:
    """``with_bridges``' fit: ``bridges`` fitted before the surgery, folded one after another."""
    from prune.heal.bridge import keep_helpful

    return lambda error, start: (bridges, keep_helpful(model, bridges, error, start))


def bridged_record(model, cfg: HealConfig, windows, val_windows, teacher=None) -> dict:
    """``method: bridge``: nothing to train; the record of the (already bridged) ``model``, with the
    held-out loss (and, with a ``teacher``, the KL to it) as both the before and the after figure:
    :func:`with_bridges` then puts the un-bridged figures in the ``*_before`` fields."""
    started = time.time()
    loss = mean_lm_loss(model, val_windows)
    log = {"losses": [], "tokens_seen": 0, "items_seen": 0, "averaged_steps": 0, "warmup_steps": 0, "epochs": 0.0,
           "seconds": 0.0, "device": str(input_device(model))}
    record = _record(cfg, log, [], 0, windows, val_windows, loss, loss, started)
    record["steps"] = 0
    if teacher is not None:
        from prune.heal.distill import fidelity

        kl = fidelity(model, teacher, val_windows)
        record["objective"] = "distill"
        record["distill"] = {**teacher.record(), "kl_before": kl and kl["kl"], "kl_after": kl and kl["kl"],
                             "top1_before": kl and kl["top1"], "top1_after": kl and kl["top1"],
                             "kl_tokens": kl["tokens"] if kl else 0}
    return record


# ---- the Python API ------------------------------------------------------------------------------------
def heal_model(model, tokenizer=None, method: str | HealConfig = "lora", *, data=None, windows: torch.Tensor | None = None,
               val_windows: torch.Tensor | None = None, removed: list[int] | None = None, quiet: bool = False,
               callback: Callable[[int, int], None] | None = None, teacher_model=None, teacher_tokenizer=None,
               kept: list[int] | None = None, **settings) -> dict:
    """Heal ``model`` in place and return the record (see the module docstring).

    * ``lora`` / ``partial``: ``model`` is the pruned model.
    * ``replace``: ``model`` is the FULL model and ``removed`` the contiguous run of blocks to
      replace: the run's input/output states are captured, ``len(removed) - 1`` blocks are
      removed with :func:`prune.remove_layers` and the one kept is trained in their place
      (``record["kept"]`` lists the original indices of the blocks that stay).

    Training text: ``data`` (a path, :class:`prune.TextSource` or ``{"path", "field", "rows"}``)
    tokenized with ``tokenizer``, or token windows ``windows`` [n, seq_len] (and optionally
    ``val_windows``) directly. ``settings`` are :class:`prune.HealConfig` fields
    (``steps=50, learning_rate=1e-3, rank=16, last_blocks=4, ...``).
    ``callback(step, tokens_seen)`` runs after every optimizer step.

    ``objective="distill"`` (or ``method="distill", params=...``): the teacher is ``teacher_model``
    (the original model, checked against ``teacher_tokenizer``; ``kept``: the original index of
    each block of ``model``, for ``hidden_weight``) or ``teacher_cache`` (a top-k file); for
    ``replace`` the full ``model`` itself (a copy or its top-k cache, per ``teacher``).
    """
    check_model(model, "heal_model: the model")
    if callback is not None and not callable(callback):
        raise PruneError(f"heal_model: callback={callback!r} must be a function of (step, tokens_seen) (or None)")
    cfg = heal_config(method, data, **settings)
    if not cfg.merge:  # the adapter would be trained, then dropped: nothing here saves it apart
        raise PruneError("heal_model: merge=False keeps the LoRA adapter apart, which only `prune heal RUN_DIR --set "
                         "merge=false` saves; here the adapter is merged into the weights (drop merge=False)")
    given_windows = windows is not None
    if windows is None:
        if tokenizer is None:
            raise PruneError("heal_model needs a tokenizer to read data (or pass windows=)")
        windows, val_windows = training_windows(tokenizer, cfg)
    elif unread := ["data"] * (data is not None) + [k for k in ("n_samples", "val_samples", "seq_len") if k in settings]:
        raise PruneError(f"heal_model: {', '.join(unread)} describe the training text read from data, but windows= "
                         "gives the windows themselves (drop them, or pass data= without windows=)")
    if teacher_model is not None and cfg.objective != "distill" and cfg.bridge == "none" and cfg.method != "bridge":
        raise PruneError(f"heal_model: teacher_model is read by objective='distill' and by a bridge; {cfg.method} on the "
                         "next-token loss trains without it (drop it, or set objective='distill')")
    n = len(decoder_layers(model))
    check_api_arguments(cfg, n, removed, kept, teacher_model)
    check_windows_fit(model, windows, val_windows)
    # windows given: their own length and count are checked, not seq_len and n_samples
    check_settings(cfg, model, n, None if given_windows else context_length(model.config),
                   windows.shape[0] if given_windows else None)
    if cfg.method != "replace" or cfg.objective == "distill":
        def train() -> dict:
            if cfg.method == "bridge":  # trains nothing: the bridges below are the repair
                return bridged_record(model, cfg, windows, val_windows, teacher)
            if cfg.objective == "distill":  # -- distill (prune.heal.distill) --
                from prune.heal import distill as D

                return D.heal_model_distill(model, tokenizer, cfg, windows, val_windows, teacher_model=teacher_model,
                                            teacher_tokenizer=teacher_tokenizer, removed=removed, kept=kept,
                                            quiet=quiet, callback=callback)
            heal_fn = heal_lora if cfg.method == "lora" else heal_partial
            return heal_fn(model, cfg, windows, val_windows, quiet=quiet, callback=callback)

        teacher = None
        if cfg.bridge == "none":
            return train()
        if not isinstance(teacher_model, nn.Module) or kept is None:
            raise PruneError(f"heal bridge {cfg.bridge} is fitted on the original model: pass teacher_model= (the "
                             "original, in memory) and kept= (the original index of each block of model)")
        from prune.heal.teacher import Teacher

        teacher = Teacher("memory", "the original model", teacher_model.eval()) if cfg.objective == "distill" else None
        return with_bridges(model, cascade_fit(teacher_model, model, complement(len(decoder_layers(teacher_model)), kept),
                                               windows, cfg), val_windows, train, teacher, quiet)
    if removed is None:
        raise PruneError("heal method replace needs removed= (the contiguous run of blocks to replace)")
    from prune.model.surgery import remove_layers

    plan = plan_replacement(model, list(removed), cfg, windows, val_windows, quiet=quiet)
    kept = remove_layers(model, plan.remove)
    record = heal_replacement(model, plan, quiet=quiet, callback=callback)
    record["kept"] = kept
    return record


def check_api_arguments(cfg: HealConfig, n: int, removed, kept, teacher_model) -> None:
    """``removed`` and ``teacher_model`` of :func:`heal_model` read by what ``cfg`` does (they were accepted and
    dropped), and ``kept``, where a bridge or the hidden-state loss reads it, a block map of the model: increasing
    original indices, one per block (it mapped blocks to cuts that do not exist)."""
    distill, bridged = cfg.objective == "distill", cfg.bridge != "none" or cfg.method == "bridge"
    if removed is not None and cfg.method != "replace":
        raise PruneError(f"heal_model: removed= is the run method replace takes the place of; {cfg.method} heals the "
                         "pruned model as it is (drop removed)")
    if cfg.method == "replace" and distill and teacher_model is not None:
        raise PruneError("heal_model: replace distils from the full model it is given (a copy or its top-k cache); "
                         "drop teacher_model")
    if distill and cfg.method not in ("replace", "bridge"):  # the teacher the caller passed is the one used
        in_memory = isinstance(teacher_model, nn.Module)
        if cfg.teacher == "cache" and in_memory:
            raise PruneError("heal_model: teacher='cache', but teacher_model is the original in memory, which teaches "
                             "from memory (no cache is written here): drop teacher='cache', or pass a cache file")
        if cfg.teacher == "memory" and not in_memory and (teacher_model is not None or cfg.teacher_cache):
            raise PruneError("heal_model: teacher='memory', but the teacher given is a top-k cache file: pass the "
                             "original model as teacher_model, or drop teacher='memory'")
    if kept is None or cfg.method == "replace" or not ((distill and cfg.hidden_weight > 0) or bridged):
        return  # not read (a script may pass the block map to every method)
    total = len(decoder_layers(teacher_model)) if isinstance(teacher_model, nn.Module) else None
    if len(kept) != n or not is_block_map(kept, total):
        raise PruneError(f"heal_model: kept={list(kept)} must give the original index of each of the model's {n} "
                         "blocks, increasing" + (f", below the original's {total}" if total is not None else ""))


def check_windows_fit(model: nn.Module, *windows) -> None:
    """Token windows given to :func:`heal_model`: ids the embedding holds, and no longer than the model's
    context (an IndexError from inside the model)."""
    from prune.measure.scoring import check_windows, embedding_rows

    rows, context = embedding_rows(model), context_length(model.config)
    for w in windows:
        if w is None or (isinstance(w, torch.Tensor) and w.shape[0] == 0):  # no held-out windows
            continue
        check_windows(w, rows)
        if context is not None and w.shape[1] > context:
            raise PruneError(f"heal_model: windows of {w.shape[1]} tokens are longer than the model's context "
                             f"({context} tokens)")


# ---- the recipe stage (prune.pipeline.orchestrator) -------------------------------------------------
def preflight(cfg: HealConfig, select: SelectConfig, config, n_layers: int, trust_remote_code: bool = False) -> None:
    """Heal settings checked against the model config, before any weights are loaded."""
    from prune.choose.rules import resolve_count, resolve_protect

    n_after = n_layers
    if select.strategy != "search":
        k = resolve_count(n_layers, select.n_layers, select.fraction, resolve_protect(select.protect, n_layers))
        if cfg.method == "replace" and k < 2:
            raise PruneError(f"heal.method replace needs at least 2 removed blocks, but select removes {k} (use lora or partial)")
        if cfg.method == "replace" and select.strategy == "tail":  # known now: the blocks before the last, protect skipped
            from prune.choose.rules import tail

            removed = tail(n_layers, k, resolve_protect(select.protect, n_layers)).removed
            if removed != list(range(removed[0], removed[0] + k)):
                raise PruneError(f"heal.method replace needs one contiguous run, but select.strategy tail with protect "
                                 f"{select.protect} removes {removed} (change select.protect, or use lora or partial)")
        n_after = n_layers - k + (1 if cfg.method == "replace" else 0)
    elif select.n_layers is not None or select.fraction is not None:  # search removes at most this many
        most = resolve_count(n_layers, select.n_layers, select.fraction, resolve_protect(select.protect, n_layers))
        if cfg.method == "partial" and cfg.last_blocks > n_layers - most:
            raise PruneError(f"heal.last_blocks={cfg.last_blocks} is more than the {n_layers - most} blocks left should "
                             f"select.strategy search remove the {most} of {n_layers} it may (it stops earlier only at "
                             f"its floor): lower last_blocks to at most {n_layers - most}, or the most search may remove "
                             f"(select.n_layers) to at most {n_layers - cfg.last_blocks}")
    check_settings(cfg, meta_model(config, trust_remote_code=trust_remote_code), n_after, context_length(config))


def prepare(model, tokenizer, removed: list[int], cfg: HealConfig, quiet: bool = False, *, out_dir=None,
            source_name: str = "", source_id: str | None = None) -> HealPlan:
    """Before the surgery: read the training windows, and for ``replace`` capture the removed
    run's input/output states on the full model. ``plan.remove`` is what the surgery removes.
    For ``objective: distill`` the teacher is prepared too (a copy of the full model, or its
    top-k cache beside ``out_dir``; ``source_name`` names the teacher in the record, ``source_id`` is stamped
    on a cache: :func:`prune.heal.teacher.source_identity`)."""
    windows, val_windows = training_windows(tokenizer, cfg)
    if cfg.objective == "distill":  # the teacher: a copy of the full model, or its top-k cache
        from prune.heal import distill as D

        plan = D.prepare(model, tokenizer, removed, cfg, windows, val_windows, out_dir=out_dir,
                         source_name=source_name, quiet=quiet, source_id=source_id)
    elif cfg.method != "replace":
        plan = HealPlan(cfg, list(removed), windows, val_windows)
    else:
        return plan_replacement(model, list(removed), cfg, windows, val_windows, quiet=quiet)
    if cfg.bridge != "none":
        teacher = plan.extra.get("teacher")
        if teacher is not None and teacher.model is not None:  # the original stays in memory: fit cut by cut after the surgery
            plan.extra["original"] = teacher.model
        else:  # nothing of the original after the surgery: fit every cut on its states now
            from prune.heal.bridge import fit_bridges

            plan.extra["bridges"] = fit_bridges(model, plan.remove, windows, cfg.batch_size, cfg.bridge,
                                                     cfg.bridge_weight)
    return plan


def heal(model, cfg: HealConfig, plan: HealPlan, quiet: bool = False) -> dict:
    """After the surgery: heal the pruned ``model`` in place as ``cfg`` says; returns the record."""
    if not quiet and cfg.method == "bridge":
        print(f"healing (bridge {cfg.bridge}, nothing trained): least squares on {plan.windows.numel():,} tokens "
              f"of {cfg.data.path}", flush=True)
    elif not quiet:
        print(f"healing ({cfg.method}{', distill' if cfg.objective == 'distill' else ''}): {cfg.steps} steps x {cfg.batch_size * cfg.gradient_accumulation} windows x "
              f"{cfg.seq_len} tokens of {cfg.data.path}", flush=True)
    def train() -> dict:
        if cfg.method == "bridge":
            return bridged_record(model, cfg, plan.windows, plan.val_windows, plan.extra.get("teacher"))
        if cfg.objective == "distill":
            from prune.heal import distill as D

            return D.heal(model, plan, quiet=quiet)
        if cfg.method == "replace":
            return heal_replacement(model, plan, quiet=quiet)
        if cfg.method == "lora":
            return heal_lora(model, cfg, plan.windows, plan.val_windows, quiet=quiet)
        return heal_partial(model, cfg, plan.windows, plan.val_windows, quiet=quiet)

    if cfg.bridge == "none":
        record = train()
    else:
        fit = (cascade_fit(plan.extra["original"], model, plan.remove, plan.windows, cfg) if "original" in plan.extra
               else prefitted(model, plan.extra["bridges"]))
        record = with_bridges(model, fit, plan.val_windows, train, plan.extra.get("teacher"), quiet)
    plan.extra["teacher"] = plan.extra["original"] = None  # free the original's copy before evaluation
    if not quiet and record["val_loss_after"] is not None:
        cost = (f"fitted on {record['bridge']['tokens']:,} tokens in {record['bridge']['seconds']:.0f} s"
                if cfg.method == "bridge" else f"{record['tokens_seen']:,} tokens, {record['seconds']:.0f} s")
        print(f"{'bridged' if cfg.method == 'bridge' else 'healed'}: held-out loss {record['val_loss_before']:.4f} -> "
              f"{record['val_loss_after']:.4f} ({cost})", flush=True)
    return record


def healing_markdown(record: dict) -> str:
    """A short Markdown section describing a healing record (eval.md's; the card's: :func:`prune.export.card.healing_text`)."""
    if not record:
        return ""
    head = "## Healing: bridge (training-free)" if record["method"] == "bridge" else f"## Healing: {record['method']}"
    return "\n".join([head, "", *healing_lines(record)]) + "\n"
