"""How a model is scored: in memory (whole, or dispatched by Accelerate) or one block at a time.

:func:`plan_execution` decides from the weights' size (read from the safetensors headers,
at the dtype they will be loaded in) and the memory there is (``psutil``'s available
memory, or ``torch.cuda.mem_get_info`` on a GPU, capped by ``max_memory``):

* ``in_memory``  when asked, when a ``device_map`` is given (Accelerate places the model),
  when the source is not a safetensors folder (GGUF, ``.bin``), or when the weights plus
  the scoring working set fit in 90% of the memory;
* ``sequential`` otherwise (or when asked): :func:`prune.sequential.score_sequential`,
  and the pruned checkpoint is written by :func:`prune.outofcore.prune_checkpoint`.

A sequential plan is refused, with one line and before any weight is read, when even the
largest block (or the embeddings) plus the calibration activations exceed the memory.
The engines that carry a plan out are in :mod:`prune.pipeline.engines`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from prune.core.errors import PruneError

MODES = ("auto", "in_memory", "sequential")
FIT_FRACTION = 0.9  # in memory only when the estimate fits in this share of the memory
GIB = float(1 << 30)


@dataclass
class ExecutionPlan:
    """The chosen mode and the figures it was chosen from (bytes)."""

    mode: str  # "in_memory" or "sequential"
    requested: str
    reason: str
    device: str = "cpu"  # where sequential blocks run
    weight_bytes: int | None = None
    block_bytes: int | None = None  # largest block (or the non-block weights, if larger)
    activation_bytes: int | None = None  # activations, working memory and the float32 states kept in memory
    memory_bytes: int | None = None  # what the estimate was compared with
    folder: str | None = None  # the local safetensors folder (sequential)

    def describe(self) -> str:
        return f"execution: {self.mode} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gib(n: int | float | None) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (``1.25 GiB``, ``300.0 KiB``)."""
    if n is None:
        return "?"
    for unit, size in (("GiB", GIB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def sequential_device(device_map) -> torch.device:
    """Where blocks run sequentially: the GPU a ``device_map`` names (``"cuda:1"``, ``0``,
    ``"auto"`` when CUDA exists; under a launcher with GPUs, unset or ``"auto"`` is this rank's own GPU,
    as for a model held whole: ranks did not all run on GPU 0), else the CPU."""
    from prune.model.loading import rank_device_map

    device_map = rank_device_map(device_map)
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, dict):
        gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
        return sequential_device(gpus[0]) if gpus else torch.device("cpu")
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, str) and device_map != "cpu":
        return torch.device(device_map)
    return torch.device("cpu")


def memory_limit(device: torch.device, max_memory: dict | None) -> int:
    """Bytes usable on ``device``: free memory there (Accelerate's ``get_max_memory``), capped by
    its ``max_memory`` entry."""
    from accelerate.utils import get_max_memory

    key = (device.index or 0) if device.type == "cuda" else "cpu"
    free = get_max_memory().get(key, 0)
    options = (key, str(key), f"cuda:{key}") if device.type == "cuda" else ("cpu",)
    for option in options:
        if max_memory and option in max_memory:
            try:
                return min(free, get_max_memory({key: max_memory[option]})[key])
            except (ValueError, TypeError):
                raise PruneError(f"max_memory[{option!r}]={max_memory[option]!r} is not a size (use e.g. '20GiB' or "
                                 "bytes)") from None
    return free


def working_set(config, n_states: int, n_windows: int, seq_len: int, batch_size: int, act_bytes: int,
                cka_windows: int | None = 1) -> tuple[int, int]:
    """``(running activations, per-batch working memory)`` of scoring, in bytes (an estimate):
    activations of all windows between blocks, plus float32 states of one batch, float64
    metric work, the widest intermediate of a block and CKA's float64 Gram matrices, one per state of
    ``cka_windows * seq_len`` tokens squared (None: no CKA; 1.1 GB for 33 states of 2,048 tokens)."""
    cfg = config.get_text_config()
    d = cfg.hidden_size
    inter = max(getattr(cfg, "intermediate_size", 0) or 0, 4 * d)
    tokens = batch_size * seq_len
    acts = n_windows * seq_len * d * act_bytes
    work = n_states * tokens * d * 4 + 2 * n_states * min(tokens, 1024) * d * 8 + 4 * tokens * inter * 4
    if cka_windows:
        work += n_states * (cka_windows * seq_len) ** 2 * 8
    return acts, work


def agreed_plan(plan: ExecutionPlan, replan) -> ExecutionPlan:
    """Under a launcher every rank runs rank 0's mode (each plans from its own free memory; ranks that
    chose differently would run different collectives and hang): ``replan(mode)`` gives this rank's
    plan in that mode. One process: ``plan``."""
    from prune.core import dist

    mode = dist.broadcast(plan.mode)
    return plan if mode == plan.mode else replan(mode)


def plan_execution(source, requested: str = "auto", *, dtype="auto", device_map=None, max_memory: dict | None = None,
                   n_windows: int = 64, seq_len: int = 256, batch_size: int = 8, revision: str | None = None,
                   gguf_file: str | None = None, trust_remote_code: bool = False,
                   cka_windows: int | None = 1, whole_model: str | None = None, offload_ok: bool = True) -> ExecutionPlan:
    """Choose ``in_memory`` or ``sequential`` for scoring ``source`` (see module docstring); ``cka_windows``:
    the windows of one CKA batch (None: no CKA scores); ``whole_model``: why the run needs the whole model in
    memory (it heals, evaluates, or its strategy runs the model): ``auto`` then never chooses sequential, and a
    model that does not fit is refused in one line saying so (``offload_ok``: Accelerate's offload is a way out,
    not for a healing, which cannot train offloaded weights)."""
    from prune.io.safetensors import local_folder
    from prune.io.source import resolve_source

    if requested not in MODES:
        raise PruneError(f"score.execution={requested!r} is not one of {', '.join(MODES)}")
    if isinstance(device_map, str):  # an absent device, named as such (not "only 0 B is available on cuda:0")
        from prune.model.loading import check_device_map

        check_device_map(device_map, None)
    if requested == "in_memory":
        return ExecutionPlan("in_memory", requested, "asked for in the recipe")
    src = resolve_source(source, gguf_file, revision)
    if requested == "auto" and device_map is not None:
        return ExecutionPlan("in_memory", requested, f"device_map={device_map!r} given: Accelerate places the weights")
    if src.gguf_file:  # a local GGUF file, or one of a Hub repo (whose safetensors, if any, are another model)
        if requested == "sequential":
            local_folder(src)  # raises the GGUF refusal
        return ExecutionPlan("in_memory", requested, "a GGUF file is dequantized whole; sequential execution reads safetensors")
    try:
        folder = local_folder(src)
        from prune.io.safetensors import Checkpoint

        checkpoint = Checkpoint(folder)
    except PruneError:
        if requested == "sequential":
            raise
        return ExecutionPlan("in_memory", requested, "not a local safetensors checkpoint")
    from transformers import AutoConfig

    from prune.model.skeleton import resolve_load_dtype

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    load_dtype = resolve_load_dtype(dtype, config, checkpoint)
    weights = checkpoint.bytes_at(checkpoint.entries, load_dtype)
    n_states = config.get_text_config().num_hidden_layers + 1
    batch_size = max(1, min(batch_size, n_windows))  # a batch holds at most every window (scoring's own rule)
    acts, work = working_set(config, n_states, n_windows, seq_len, batch_size, load_dtype.itemsize, cka_windows)
    device = sequential_device(device_map)  # auto's sequential runs where an asked-for one would: ranks agree
    in_memory_need = weights + work
    cpu_limit = memory_limit(torch.device("cpu"), max_memory)
    if requested == "auto" and in_memory_need <= FIT_FRACTION * cpu_limit:
        return ExecutionPlan("in_memory", requested, f"weights {_gib(weights)} + working set {_gib(work)} fit in "
                             f"{_gib(cpu_limit)} of memory", str(device), weights, None, acts + work, cpu_limit)
    if requested == "auto" and whole_model:  # one block at a time would be refused for it: say what is short
        raise PruneError(f"not enough memory for this run: weights {_gib(weights)} + working set {_gib(work)} exceed "
                         f"{FIT_FRACTION:.0%} of {_gib(cpu_limit)} of memory, and {whole_model}, so the model cannot "
                         "run one block at a time; free memory or raise model.max_memory"
                         + (", or let Accelerate place the weights (model.device_map: auto)" if offload_ok else
                            " (Accelerate's offload leaves weights healing cannot train)"))
    from prune.measure.sequential import states_in_memory
    from prune.model.skeleton import Skeleton

    sk = Skeleton(folder, dtype=load_dtype, trust_remote_code=trust_remote_code)
    block = max(sk.block_bytes(i) for i in range(len(sk.layers)))
    largest = max(block, checkpoint.bytes_at(sk.rest_keys(), load_dtype))
    limit = memory_limit(device, max_memory)
    # the float32 states between blocks, in (CPU) memory up to sequential scoring's spill bound
    states = states_in_memory(n_states, n_windows * seq_len, config.get_text_config().hidden_size, block)[0]
    need = largest + acts + work + (states if device.type == "cpu" else 0)
    if device.type != "cpu" and states > cpu_limit:  # the states live in CPU memory wherever the blocks run
        raise PruneError(f"not enough CPU memory for out-of-core scoring: the float32 states between blocks need "
                         f"{_gib(states)} but {_gib(cpu_limit)} is free; lower calibration.n_samples or seq_len")
    if need > limit:
        raise PruneError(
            f"not enough memory for out-of-core scoring: one block needs {_gib(largest)} plus {_gib(need - largest)} of "
            f"activations and states ({n_windows} windows x {seq_len} tokens, batch {batch_size}), but only {_gib(limit)} is "
            f"available on {device} (max_memory / free memory); lower calibration.n_samples or batch_size, use a "
            "smaller dtype, or raise max_memory")
    why = ("asked for in the recipe" if requested == "sequential" else
           f"weights {_gib(weights)} + working set {_gib(work)} exceed {FIT_FRACTION:.0%} of {_gib(cpu_limit)} of memory")
    return ExecutionPlan("sequential", requested, f"{why}; one block at a time needs {_gib(need)}", str(device),
                         weights, largest, need - largest, limit, str(folder))
