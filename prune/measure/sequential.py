"""Out-of-core scoring: one decoder block in memory at a time (``execution: sequential``).

``score_sequential(folder, windows)`` gives the same :class:`~prune.scoring.ScoreResult` as
``prune.score(prune.load(folder)[0], windows)`` while holding at most one block's weights:

1. The model is built on the meta device (:class:`~prune.skeleton.Skeleton`); only the
   parts outside the blocks (embeddings, final norm) are loaded.
2. *Recording pass*: the base model's own ``forward`` runs on every batch with each block's
   ``forward`` replaced by a recorder that returns its input unchanged. Block 0's input is
   ``h_0`` (embeddings, position embeddings, scaling: whatever the architecture does), and
   every block's recorder keeps the exact extra arguments the model passes it (attention
   mask of its own layer type, rotary ``position_embeddings``, ``position_ids``, ...), once
   per batch shape. Windows carry no padding, so batches of one shape get identical
   arguments. A model that changes the stream between blocks is refused here.
3. *Block passes*: block ``l`` is read from the shards, run over the activations of every
   batch with its recorded arguments, and freed; activations stay on CPU between blocks.
4. Every state ``h_0 .. h_L`` is kept as float32 (in memory, or spilled to files in a
   temporary folder) and finally folded batch by batch into the same
   :class:`~prune.scoring.ScoreAccumulator` the in-memory path uses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prune.model.capture import _hidden_from_args, _hidden_from_output, batches
from prune.core import scratch
from prune.core.errors import PruneError
from prune.core.faults import fault_point
from prune.measure.scoring import (
    BATCH_SIZE,
    BETA,
    CKA_WINDOWS,
    DEFAULT_POSITIONS,
    METRICS,
    ScoreAccumulator,
    ScoreResult,
    TAU,
    check_score_args,
    check_windows,
    embedding_rows,
    finish,
    fold_batch,
)
from prune.model.skeleton import Skeleton
from prune.model.loading import as_device, dtype_name


SPILL_MIN_BYTES = 64 << 20


def states_in_memory(n_states: int, n_tokens: int, hidden: int, largest_block: int) -> tuple[int, bool]:
    """``(bytes, spilled)`` of the float32 states between blocks (``n_states`` x ``n_tokens`` x ``hidden``):
    kept in memory up to the largest block or ``SPILL_MIN_BYTES``, else spilled to disk (``bytes`` then
    counts the bound, what a step may hold before writing)."""
    states, bound = n_states * n_tokens * hidden * 4, max(largest_block, SPILL_MIN_BYTES)
    return min(states, bound), states > bound


class StateStore:
    """The float32 states ``h_0 .. h_L`` of every window, in memory or in one file per state.

    States are written batch by batch in window order (``put``) and read back by window
    ranges inside one written batch (``get``); files are read with plain reads, so only the
    range asked for is resident.
    """

    def __init__(self, n_states: int, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: list[dict[int, torch.Tensor]] = [{} for _ in range(n_states)]
        self._written = [0] * n_states
        self._row_shape: tuple[int, ...] | None = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            scratch.register(self.folder)  # removed even by a rank the launcher stops (prune.core.scratch)

    def _file(self, state: int) -> Path:
        return self.folder / f"state_{state:04d}.f32"

    def put(self, state: int, start: int, x: torch.Tensor) -> None:
        if start != self._written[state]:
            raise RuntimeError(f"state {state}: batches must be written in order (got window {start})")
        x = x.detach().to("cpu", torch.float32, copy=True).contiguous()
        self._row_shape = tuple(x.shape[1:])
        if self.folder is None:
            self._memory[state][start] = x
        else:
            with self._file(state).open("ab") as handle:
                handle.write(memoryview(x.numpy()).cast("B"))
        self._written[state] += x.shape[0]

    def get(self, state: int, start: int, count: int) -> torch.Tensor:
        if self.folder is None:
            for first, x in self._memory[state].items():  # the written batch holding the range
                if first <= start and start + count <= first + x.shape[0]:
                    return x[start - first : start - first + count]
            raise RuntimeError(f"state {state}: windows {start}..{start + count - 1} were not written in one batch")
        out = torch.empty((count, *self._row_shape), dtype=torch.float32)
        row = out[0].numel() * 4
        with self._file(state).open("rb") as handle:
            handle.seek(start * row)
            handle.readinto(memoryview(out.numpy()).cast("B"))
        return out

    def close(self) -> None:
        self._memory = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            scratch.unregister(self.folder)


class _Recorder:
    """Replaces every block's ``forward`` for one pass: records its arguments, returns its input (as a
    one-tuple where the model's blocks return tuples: :data:`prune.model.loading.TUPLE_BLOCKS`)."""

    def __init__(self, layers, config):
        from prune.model.loading import TUPLE_BLOCKS

        self.layers = layers
        self.as_tuple = getattr(config, "model_type", None) in TUPLE_BLOCKS
        self.calls: list[tuple | None] = [None] * len(layers)
        self.h0: torch.Tensor | None = None
        self._last = None
        self.changed: list[int] = []

    def _make(self, index: int):
        def forward(*args, **kwargs):
            hidden = _hidden_from_args(args, kwargs)
            if index == 0:
                self.h0 = hidden
            elif hidden is not self._last:
                self.changed.append(index)
            as_kwarg = not (args and args[0] is hidden)
            rest = args if as_kwarg else args[1:]
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"} if as_kwarg else dict(kwargs)
            self.calls[index] = (rest, extra, as_kwarg)
            self._last = hidden
            return (hidden,) if self.as_tuple else hidden

        return forward

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            layer.forward = self._make(i)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


def run_block(block, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """Run ``block`` on ``hidden`` with the arguments the model passed it (recorded ``call``)."""
    rest, extra, as_kwarg = call
    out = block(*rest, hidden_states=hidden, **extra) if as_kwarg else block(hidden, *rest, **extra)
    return _hidden_from_output(out)


def score_sequential(
    folder: str | os.PathLike,
    windows: torch.Tensor,
    *,
    batch_size: int = BATCH_SIZE,
    positions: str = DEFAULT_POSITIONS,
    metrics: tuple[str, ...] | list[str] = METRICS,
    cka_windows: int = CKA_WINDOWS,
    beta: float = BETA,
    tau: float = TAU,
    dtype="auto",
    device: torch.device | str = "cpu",
    blocks: list[int] | None = None,
    spill: bool | None = None,
    spill_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> ScoreResult:
    """Score the blocks of the safetensors model in ``folder`` one block at a time (see module docstring).

    Arguments as in :func:`prune.score`, plus

    * ``dtype`` as in :func:`prune.load`; ``device``: where each block runs and statistics
      are gathered;
    * ``blocks``: score only these blocks (0-based); the others are skipped, which scores
      the model pruned to ``blocks`` without writing it;
    * ``spill``: keep the float32 states of all blocks in files under ``spill_dir`` (default:
      a temporary folder, removed afterwards) instead of memory; ``None`` spills when they
      would take more than one block (and more than 64 MiB).

    States are folded one CKA group (``cka_windows`` windows) at a time.
    """
    metrics, batch_size, first = check_score_args(windows, positions, metrics, cka_windows, batch_size, beta, tau)
    device = as_device(device)
    started = time.perf_counter()
    sk = Skeleton(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    check_windows(windows, embedding_rows(sk.model))  # ids: the model is known
    layers = sk.layers
    run = list(range(len(layers))) if blocks is None else sorted(blocks)
    if not run or run[0] < 0 or run[-1] >= len(layers) or len(set(run)) != len(run):
        raise PruneError(f"blocks must be distinct indices in 0..{len(layers) - 1}, got {blocks}")
    n_layers = len(run)
    parts = list(batches(windows, batch_size))
    hidden = sk.model.config.get_text_config().hidden_size
    if spill is None:  # keep the promise "one block in memory": spill states larger than a block
        spill = states_in_memory(n_layers + 1, windows.numel(), hidden, max(sk.block_bytes(i) for i in run))[1]
    tmp = None
    if spill:
        tmp = Path(tempfile.mkdtemp(prefix="prune-states-", dir=spill_dir))
    store = StateStore(n_layers + 1, tmp)
    bar = tqdm(total=n_layers + 2, desc="scoring (sequential)", unit="step", disable=not progress)
    try:
        with torch.no_grad():
            # 1-2. embeddings and every block's arguments, from the model's own forward
            sk.load_rest()
            acts: list[torch.Tensor] = []
            calls: dict[tuple, list[tuple]] = {}
            for start, batch in parts:
                with _Recorder(layers, sk.model.config) as rec:
                    sk.model.base_model(input_ids=batch.to(device), use_cache=False)
                if rec.changed:
                    raise PruneError(f"{sk.model.config.model_type}: the model changes the hidden state between blocks "
                                     f"(before block {rec.changed[0]}); use execution: in_memory")
                if any(c is None for c in rec.calls):
                    raise PruneError("the model's forward did not call every decoder block; use execution: in_memory")
                calls.setdefault(tuple(batch.shape), rec.calls)
                store.put(0, start, rec.h0)
                acts.append(rec.h0.to("cpu"))
                del rec
            sk.free_rest()
            bar.update(1)
            # 3. one block at a time over all activations
            for step, index in enumerate(run):
                block = sk.load_block(index)
                for b, (start, batch) in enumerate(parts):
                    out = run_block(block, acts[b].to(device), calls[tuple(batch.shape)][index])
                    store.put(step + 1, start, out)
                    acts[b] = out.to("cpu")
                sk.free_block(index)
                bar.update(1)
                fault_point("scoring")  # fault-injection hook (prune.core.faults), as in prune.score
            del acts, calls
            # 4. the same accumulator and batch folding as prune.score
            acc = ScoreAccumulator(n_layers, device, metrics, cka_windows)
            excluded: list[int] = []
            for start, batch in parts:  # fold one CKA group at a time: the float64 work stays small
                for g in range(start, start + batch.shape[0], cka_windows):
                    count = min(cka_windows, start + batch.shape[0] - g)
                    states = [store.get(l, g, count).to(device) for l in range(n_layers + 1)]
                    excluded += fold_batch(acc, states, [None] * n_layers, first, g)
            bar.update(1)
    finally:
        bar.close()
        store.close()
    meta = {"execution": "sequential", "spilled": bool(spill), "dtype": dtype_name(sk.dtype),
            **dict(metadata or {})}
    return finish(acc, windows, positions=positions, metrics=metrics, cka_windows=cka_windows, beta=beta, tau=tau,
                  excluded=excluded, started=started, progress=progress, metadata=meta)
