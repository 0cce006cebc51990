"""lm-eval on an in-memory model under a launcher: every rank answers a share of the examples.

lm-eval's evaluator already splits each task's documents over ``lm.rank`` / ``lm.world_size``
(document ``i`` goes to rank ``i mod world_size``), pads the request lists so every rank runs
the same number of batches, and gathers the per-example metrics to rank 0, which aggregates.
``HFLM`` turns that on only when it loads the model itself; for a model passed in memory it
stays at one rank. :func:`spread_over_ranks` sets the rank, the world size and the two
collectives HFLM calls (``gather`` and ``wait_for_everyone``, from Accelerate; ``unwrap_model``
is the identity);
:func:`results_on_every_rank` hands rank 0's aggregated results to the others, so every rank
returns the same table as one process. Without a launcher both are the identity.

A saved folder can instead use lm-eval's own data-parallel path:
``accelerate launch -m lm_eval --model hf --model_args pretrained=FOLDER ...``.
"""

from __future__ import annotations

from prune.core import dist


class _RankOps:
    """The part of an ``Accelerator`` that HFLM uses for data parallelism."""

    @staticmethod
    def gather(tensor):
        from accelerate.utils import gather

        return gather(tensor)

    @staticmethod
    def wait_for_everyone():
        dist.barrier()

    @staticmethod
    def unwrap_model(model):
        return model  # the model was never wrapped (no DDP for inference)


def spread_over_ranks(lm):
    """Make ``lm`` (an HFLM around an in-memory model) one rank of the launch."""
    w = dist.world()
    if not w.distributed:
        return lm
    lm._rank, lm._world_size = w.rank, w.size  # noqa: SLF001 - what HFLM sets itself for a loaded path
    lm.accelerator = _RankOps()
    return lm


def results_on_every_rank(out: dict | None) -> dict:
    """Rank 0's ``simple_evaluate`` output (the others get ``None`` from lm-eval) on every rank:
    rank 0 keeps all of it (samples and configs for lm-eval's own files), the others get the parts
    read from it (``results``, ``n-samples``, ``configs``, ``versions``, ``n-shot``), in the JSON form
    lm-eval writes them (a config's functions as their names: functions do not pickle)."""
    w = dist.world()
    if not w.distributed:
        return out
    keys = ("results", "n-samples", "configs", "versions", "n-shot", "groups", "group_subtasks", "higher_is_better")
    part = {k: out[k] for k in keys if k in out} if out is not None else None
    if part is not None:  # a task config may hold functions (`!function` helpers): as lm-eval writes it to JSON
        import json

        from lm_eval.utils import handle_non_serializable

        part = json.loads(json.dumps(part, default=handle_non_serializable))
    received = dist.broadcast(part)
    return out if w.rank == 0 else received
