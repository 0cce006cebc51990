"""Several processes (``torchrun`` / ``accelerate launch``): who am I, split, reduce, gather, write once.

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is the identity or a no-op,
so single-process runs are unchanged. Under a launcher the process group is joined once through
Accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPUs) with a timeout of
``PRUNE_DIST_TIMEOUT`` seconds (default 3600), so a rank that hangs cannot block the others
forever; a rank that dies closes its sockets and the others' next collective fails at once.

* :func:`world`           rank, size, local rank;
* :func:`shard`           this rank's contiguous share of ``n`` items, in whole units of ``unit`` items;
* :func:`all_reduce_sum`  element-wise sum over ranks of a float64 tensor (returned on its device);
* :func:`all_gather`      a Python object from every rank, in rank order;
* :func:`broadcast`       rank 0's Python object on every rank;
* :func:`check_same`      refuse (``PruneError``) when ranks hold different values (e.g. recipes);
* :func:`on_main`         run a function on rank 0 only (writing files); the others wait for it (as long
                          as it takes, :func:`main_wait`) and get its result, or raise :class:`PeerFailed`
                          when it failed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from prune.core.errors import PruneError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 3600


class PeerFailed(PruneError):
    """Another rank failed; this one stops too (its own message names the failing rank)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """True under a launcher that started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> int:
    return int(os.environ.get("PRUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


#: rank 0 inside :func:`on_main`: the other ranks wait for its outcome, so it is one process for
#: whatever runs there (a collective of its own would pair with their wait, or hang)
_alone = False


def world() -> World:
    """This process's place in the launch; joins the process group on first use (under a launcher).
    Rank 0 inside :func:`on_main` is a world of one."""
    if not launched() or _alone:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=timeout_s()))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(n: int, unit: int = 1, w: World | None = None) -> tuple[int, int]:
    """``(start, stop)``: this rank's contiguous share of ``n`` items, split in whole units of
    ``unit`` items (the last unit may be short) as evenly as units allow; earlier ranks get the
    extra unit. Keeping batches whole keeps every forward batch the same as in one process."""
    w = w or world()
    units = -(-n // max(unit, 1))
    per, extra = divmod(units, w.size)
    first = w.rank * per + min(w.rank, extra)
    last = first + per + (1 if w.rank < extra else 0)
    return min(first * unit, n), min(last * unit, n)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` (float64) over ranks; ``t`` itself when there is one process."""
    w = world()
    if not w.distributed:
        return t
    import torch.distributed as dist

    buf = t.detach().to(_device(), torch.float64).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


#: how long the other ranks wait for rank 0's work in :func:`on_main` (saving, pushing, copying shards: it may
#: outlast the collectives' timeout), unless ``PRUNE_MAIN_TIMEOUT`` (seconds) says otherwise. A rank 0 that dies
#: closes its sockets, and the wait ends at once.
MAIN_WAIT_S = 7 * 24 * 3600


def main_wait() -> datetime.timedelta:
    return datetime.timedelta(seconds=int(os.environ.get("PRUNE_MAIN_TIMEOUT", MAIN_WAIT_S)))


#: purpose -> (the default group it was made under, a gloo group of every rank); made by every rank on first use,
#: and again under a new default group (one destroyed and joined again in the same process)
_GROUPS: dict[str, tuple[Any, Any]] = {}


def _gloo_group(purpose: str, timeout: datetime.timedelta):
    """A gloo group of every rank for ``purpose``, made collectively on first use."""
    import torch.distributed as dist

    default = dist.group.WORLD
    made = _GROUPS.get(purpose)
    if made is None or made[0] is not default:
        _GROUPS[purpose] = (default, dist.new_group(backend="gloo", timeout=timeout))
    return _GROUPS[purpose][1]


def _object_group():
    """The group :func:`all_gather` pickles objects over: the default one under gloo; under NCCL a gloo group of
    every rank (NCCL's object gather moves every rank's pickle to each GPU: a teacher cache of gigabytes would
    pass through GPU memory beside the model)."""
    import torch.distributed as dist

    if "nccl" not in str(dist.get_backend()):
        return None
    return _gloo_group("objects", datetime.timedelta(seconds=timeout_s()))


def all_gather(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process), gathered on the CPU."""
    w = world()
    if not w.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def broadcast(obj: T, group=None) -> T:
    """Rank 0's ``obj`` on every rank (over ``group``, default the launch's)."""
    w = world()
    if not w.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if w.is_main else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def digest(value: Any) -> str:
    """A short hash of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same(value: Any, what: str) -> None:
    """Refuse to go on when the ranks hold different ``value`` s (compared by :func:`digest`)."""
    if not world().distributed:
        return
    hashes = all_gather(digest(value))
    if len(set(hashes)) > 1:
        odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise PruneError(f"the ranks were given a different {what} (rank 0 differs from rank(s) {odd}); "
                         f"launch every process with the same {what}")


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; the other ranks wait and receive its result. When it fails on
    rank 0 every rank stops: rank 0 re-raises, the others raise :class:`PeerFailed`."""
    w = world()
    if not w.distributed:
        return fn()
    wait = _gloo_group("main", main_wait())  # before rank 0 is alone: every rank makes it
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if w.is_main:
        global _alone
        _alone = True
        try:
            outcome = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - told to the others, then re-raised
            error = exc
            outcome = (False, f"{type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            _alone = False
    try:
        outcome = broadcast(outcome, wait)  # not bounded by PRUNE_DIST_TIMEOUT: a save or a push may take hours
    except BaseException:
        if error is not None:  # the others are gone (stopped as this rank was): its own error, not theirs
            raise error from None
        raise
    if error is not None:
        raise error
    if not outcome[0]:
        raise PeerFailed(f"rank 0 failed ({outcome[1]}); rank {w.rank} stopped too")
    return outcome[1]


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank died or timed out (gloo/NCCL errors)."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if k)
    text = str(exc)
    return isinstance(exc, kinds) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Gloo", "NCCL")))
