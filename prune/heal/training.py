"""A small training loop for healing, on Accelerate: one optimizer, one loss, a fixed number of steps.

``train(module, params, dataset, loss_fn, cfg)`` runs ``cfg.steps`` optimizer steps of AdamW over
``params``; each step accumulates ``cfg.gradient_accumulation`` micro-batches of ``cfg.batch_size``
items drawn from ``dataset`` (shuffled with ``cfg.seed``, reused over epochs; when its size is not a multiple
of ``cfg.batch_size`` each epoch ends in a shorter micro-batch, weighted as a full one: the record's
``windows_seen`` counts what ran). Learning rate: linear
warmup over the first 5% of the steps (at least one; the first step already moves, at 1 / (warmup +
1) of the rate), then cosine decay towards 0 (``schedule="cosine"``) or flat (``"constant"``).
Gradients are clipped to norm 1. Parameters held in bfloat16 / float16 are trained through float32
copies (:class:`MasterWeights`), rounded back after each step. With ``cfg.average`` = a > 0 the result is not the last step's
weights but the uniform average of the trained parameters after each of the last ``ceil(a * steps)``
steps (stochastic weight averaging, Izmailov et al. 2018; for LoRA the factors A and B are averaged,
which is the average of the products to first order). Accelerate places the module on its device (a
GPU when there is one), applies ``mixed_precision`` (autocast) and the accumulation; the module is
unwrapped afterwards, so nothing of Accelerate stays attached to it. A tqdm bar shows the loss.

Under a launcher (``torchrun`` / ``accelerate launch``, N processes) the module is wrapped in
DDP and every loader batch of ``cfg.batch_size`` items is split over the N ranks
(Accelerate's ``split_batches``), so the global batch, the data order and hence the loss
curve are those of one process (equal up to float reduction order); the reported loss is
the mean over ranks. ``cfg.fsdp`` shards parameters, gradients and optimizer state over the
ranks instead (Accelerate's FSDP plugin), for models whose training does not fit one device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from prune.core import dist
from prune.core.errors import PruneError

MAX_GRAD_NORM = 1.0
WARMUP_FRACTION = 0.05


def averaged_steps(steps: int, share: float) -> int:
    """How many of the last optimizer steps ``heal.average`` = ``share`` averages: ``ceil(share * steps)``
    (0 for 0: the last step's weights)."""
    return math.ceil(share * steps) if share > 0 else 0


def device_name(device: torch.device) -> str:
    """A device as the records name it: ``cpu`` (Accelerate's ``cpu:0`` under a launch: one name for one device,
    so one process's files equal a launch's), ``cuda:0``."""
    return "cpu" if device.type == "cpu" else str(device)


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of the peak: linear warmup
    ``(step + 1) / (warmup + 1)`` over the first ``warmup`` steps, then flat (``constant``) or
    ``0.5 (1 + cos(pi (step - warmup) / (steps - warmup)))`` (``cosine``). No step gets rate 0:
    transformers' warmup (``step / warmup``) spends the first step at 0, which is 1 of 8 steps at a
    small budget and the whole of ``steps: 1``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def warmup_steps(steps: int) -> int:
    """The warmup of ``steps`` optimizer steps: ``ceil(WARMUP_FRACTION * steps)``, at least one."""
    return max(1, math.ceil(WARMUP_FRACTION * steps))


def make_scheduler(optimizer, steps: int, schedule: str):
    """A ``LambdaLR`` of ``lr_factor``: warmup over :func:`warmup_steps`, then cosine towards 0
    (``cosine``) or flat (``constant``)."""
    warmup = warmup_steps(steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, schedule))


def check_parallel(cfg) -> None:
    """Refuse, before any work, healing settings the launch cannot run: a batch that does not
    split evenly over the ranks, or FSDP without a launcher of several processes."""
    w = dist.world()
    if w.distributed and cfg.batch_size % w.size:
        raise PruneError(f"heal.batch_size={cfg.batch_size} does not split over {w.size} processes "
                         f"(use a multiple of {w.size}: each optimizer step sees the same global batch as one process)")
    n = getattr(cfg, "n_samples", None)
    if w.distributed and n is not None and n % cfg.batch_size and getattr(cfg, "method", None) != "bridge":
        raise PruneError(f"heal.n_samples={n} is not a multiple of heal.batch_size={cfg.batch_size}: under {w.size} "
                         "processes the short last batch is padded with repeated windows, so the training would differ "
                         "from one process's (use a multiple of the batch size)")
    if getattr(cfg, "fsdp", False) and getattr(cfg, "average", 0.0) > 0:
        raise PruneError("heal.average is not supported with heal.fsdp (each rank holds only a shard of the "
                         "weights to average): set heal.average: 0, or train without FSDP")
    if getattr(cfg, "fsdp", False) and not w.distributed:
        raise PruneError("heal.fsdp shards the model over several processes: launch with "
                         "`accelerate launch --num_processes N -m prune ...` or `torchrun --nproc_per_node N -m prune ...`, "
                         "or set heal.fsdp: false")


def make_accelerator(mixed_precision: str, gradient_accumulation: int, fsdp: bool = False):
    """An ``Accelerator`` for one healing run. Accelerate keeps its settings in process-wide
    singletons that refuse a second, different ``mixed_precision``; a state left by an
    earlier run is reset first (only the training settings, not the process group).
    Several processes: loader batches are split over them (``split_batches``); ``fsdp``
    adds Accelerate's FSDP plugin (full sharding)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PruneError("heal.mixed_precision fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    dist.world()  # joins the process group under a launcher, with prune's timeout
    if AcceleratorState._shared_state:  # noqa: SLF001 - see docstring
        AcceleratorState._reset_state(reset_partial_state=False)  # noqa: SLF001
        GradientState._reset_state()  # noqa: SLF001
    plugin = GradientAccumulationPlugin(num_steps=gradient_accumulation, sync_with_dataloader=False)
    extra = {}
    if fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        extra["fsdp_plugin"] = FullyShardedDataParallelPlugin(use_orig_params=True)
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_plugin=plugin,
                       dataloader_config=DataLoaderConfiguration(split_batches=dist.world().distributed), **extra)


def _forever(loader) -> Iterator:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _accumulate(average: list[torch.Tensor], params: list[torch.nn.Parameter], n: int) -> None:
    """Fold the ``n``-th sample of ``params`` into their running means ``average`` (filled at ``n = 1``):
    ``a += (p - a) / n``, in float32."""
    with torch.no_grad():
        if n == 1:
            average[:] = [p.detach().float().clone() for p in params]
        else:
            for a, p in zip(average, params):
                a.lerp_(p.detach().float(), 1.0 / n)


HALF = (torch.bfloat16, torch.float16)


class MasterWeights:
    """Float32 copies of the trained parameters held in bfloat16 / float16 (a model loaded in half
    precision): the optimizer updates the copies and each step rounds them back into the model.
    Updated in place, a half-precision weight loses every change below half its last digit (a
    learning rate of 1e-4 leaves most bfloat16 weights unchanged); the copies keep them. Each
    micro-batch's gradient is computed in the model's precision and moved to the copies at
    the optimizer step."""

    def __init__(self, groups: list[dict], device: torch.device | None = None):
        """``device``: where the training runs (Accelerate moves the model there after this)."""
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self.groups = []
        for group in groups:
            copies = []
            for p in group["params"]:
                master = (torch.nn.Parameter(p.detach().to(device or p.device, torch.float32, copy=True))
                          if p.dtype in HALF else p)
                self.pairs.append((p, master))
                copies.append(master)
            self.groups.append({**group, "params": copies})
        self.params = [m for _, m in self.pairs]

    @staticmethod
    def needed(params: list[torch.nn.Parameter], fsdp: bool) -> bool:
        return not fsdp and any(p.dtype in HALF for p in params)  # FSDP keeps its own (sharded) copies

    def take_grads(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.to(m.device, torch.float32)
                p.grad = None

    def write_back(self) -> None:
        with torch.no_grad():
            for p, m in self.pairs:
                if m is not p:
                    p.copy_(m)



def train(module: torch.nn.Module, params: list[torch.nn.Parameter] | list[dict], dataset: Dataset,
          loss_fn: Callable[[torch.nn.Module, list[torch.Tensor]], torch.Tensor], cfg, *,
          tokens_per_item: int, desc: str = "heal", quiet: bool = False,
          callback: Callable[[int, int], None] | None = None) -> dict:
    """Train ``params`` of ``module`` to minimise ``loss_fn(module, batch)`` (see module docstring).
    ``params`` may be torch parameter groups (dicts whose ``lr`` overrides ``cfg.learning_rate``;
    the schedule scales every group alike).

    ``cfg`` has ``steps, batch_size, gradient_accumulation, learning_rate, weight_decay,
    schedule, seed, mixed_precision``. ``callback(step, tokens_seen)`` runs after every
    optimizer step with the module in eval mode (for learning curves). Returns
    ``{"losses": per-step mean loss, "tokens_seen", "items_seen", "averaged_steps", "warmup_steps", "epochs", "seconds",
    "device"}`` (the callback sees each step's weights, not the running average);
    the trained module (back in eval mode) is the same object as ``module``.
    """
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise PruneError("nothing to train: no parameter requires a gradient (check the heal settings)")
    check_parallel(cfg)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation, getattr(cfg, "fsdp", False))
    masters = (MasterWeights(groups, accelerator.device) if MasterWeights.needed(params, getattr(cfg, "fsdp", False))
               else None)
    optimizer = torch.optim.AdamW(masters.groups if masters else groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.schedule)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    started = time.time()
    had_forward = "forward" in vars(module)  # an instance forward set before training stays
    wrapped, optimizer, scheduler, loader = accelerator.prepare(module, optimizer, scheduler, loader)
    losses: list[float] = []
    items = 0
    n_avg = averaged_steps(cfg.steps, getattr(cfg, "average", 0.0))
    average: list[torch.Tensor] = []  # the running mean of params over the last n_avg steps
    batches = _forever(loader)
    bar = tqdm(total=cfg.steps, desc=desc, unit="step", disable=quiet)
    try:
        wrapped.train()
        for step in range(cfg.steps):
            total, lr = 0.0, scheduler.get_last_lr()[0]  # the rate this step uses (the first group's)
            for _ in range(cfg.gradient_accumulation):
                batch = next(batches)
                with accelerator.accumulate(wrapped):
                    loss = loss_fn(wrapped, batch)
                    if not torch.isfinite(loss):
                        raise PruneError(f"healing diverged: the loss is {loss.item()} at step {step + 1} "
                                         "(lower heal.learning_rate, or use mixed_precision no)")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if masters:
                            masters.take_grads()
                        accelerator.clip_grad_norm_(masters.params if masters else params, MAX_GRAD_NORM)
                    optimizer.step()
                    if masters and accelerator.sync_gradients:
                        masters.write_back()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                total += float(accelerator.reduce(loss.detach(), "mean"))  # mean over ranks (= loss itself in one)
                items += int(batch[0].shape[0]) * accelerator.num_processes
            losses.append(total / cfg.gradient_accumulation)
            if (n := step + 1 - (cfg.steps - n_avg)) > 0:  # the n-th of the last n_avg steps
                _accumulate(average, masters.params if masters else params, n)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            if callback is not None:
                wrapped.eval()
                callback(step + 1, items * tokens_per_item)
                wrapped.train()
        with torch.no_grad():
            for a, p in zip(average, params):
                p.copy_(a)
    finally:
        bar.close()
        wrapped.eval()
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        accelerator.free_memory()
        for m in (module, wrapped):
            if "_is_accelerate_prepared" in vars(m):
                del m._is_accelerate_prepared
            # unwrap_model leaves an instance `forward` bound to m (with mixed precision: the innermost
            # function, past transformers' own decorators): a reference cycle that keeps m alive until
            # the next gc, and not the class's forward. Back to the class's, as before prepare.
            if not had_forward and "forward" in vars(m):
                del m.forward
    return {"losses": losses, "tokens_seen": items * tokens_per_item, "items_seen": items, "averaged_steps": n_avg,
            "warmup_steps": warmup_steps(cfg.steps),
            "epochs": items / len(dataset), "seconds": round(time.time() - started, 1),
            "device": device_name(accelerator.device)}
