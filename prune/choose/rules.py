"""Choose which decoder blocks to remove, from a :class:`~prune.scoring.ScoreResult`.

All indices are 0-based positions in the model's decoder stack (block 0 is the one that
reads the embeddings); negative indices in ``protect`` count from the end (-1 = last).

Strategies that need only the scores:

* ``one_shot``: the k blocks a metric ranks most removable, in one go:
  ``bi`` (lowest Block Influence), ``angular`` (lowest ``d(l, 1)``), ``cka`` (highest
  ``CKA(h_l, h_{l+1})``), ``msrs`` (highest MSRS contribution; ties broken by the mean CKA
  of the block's output to all others, then by the lowest Block Influence);
* ``contiguous``: Gromov et al.'s block, the run ``l* .. l*+k-1`` with the smallest
  angular distance ``d(l, k)`` between its input and its output;
* ``tail``: the k blocks just before the last one; ``random``: k blocks drawn with ``seed``.

Protected blocks (default: the first and the last) are never removed. Given the model's config, a hybrid
stack's last attention block is passed over as if protected (transformers cannot generate without one;
:func:`prune.model.loading.keeps_attention`): the next block in the strategy's order is taken instead.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import asdict, dataclass, field
from typing import Any

from prune.core.config import OWN_METRIC, SelectConfig, default, metric_is_read
from prune.core.errors import PruneError
from prune.core.records import block_number, complement

ONE_SHOT_METRICS = ("bi", "angular", "cka", "msrs")
#: a recipe's defaults (``select.protect``, ``select.metric``), for the Python API's calls too
DEFAULT_PROTECT = tuple(default(SelectConfig, "protect"))
DEFAULT_METRIC = default(SelectConfig, "metric")


@dataclass
class Selection:
    """The blocks chosen for removal and why (0-based indices into the original stack)."""

    removed: list[int]
    n_layers: int
    strategy: str
    metric: str | None = None
    scores: list[float] | None = None  # the values the choice was made on: per block (contiguous: d(l, n) per start l)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return complement(self.n_layers, self.removed)

    def __repr__(self) -> str:  # short: details hold every candidate verified measured (15 kB for SmolLM2)
        by = f" by {self.metric}" if self.metric else ""
        more = f", details: {', '.join(self.details)}" if self.details else ""
        return (f"Selection(removed={self.removed} of {self.n_layers} blocks, strategy={self.strategy}{by}{more}; "
                "the full record: .to_dict())")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept"] = self.kept
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Selection:
        data = {k: v for k, v in data.items() if k != "kept"}
        return cls(**data)


def resolve_protect(protect, n_layers: int) -> list[int]:
    """Protected blocks as sorted non-negative indices (one integer: that block); out-of-range entries
    are refused."""
    import numbers

    if protect is None:
        return []
    if isinstance(protect, numbers.Integral) and not isinstance(protect, bool):
        protect = [protect]  # protect=0 protected nothing (read as "no list"), protect=-1 failed
    out = set()
    for p in protect:
        p = block_number(p, "select.protect entry")
        if not -n_layers <= p < n_layers:
            raise PruneError(f"select.protect index {p} is out of range for {n_layers} blocks (use 0..{n_layers - 1} or -1..-{n_layers})")
        out.add(p % n_layers)
    return sorted(out)


def resolve_count(n_layers: int, count: int | None = None, fraction: float | None = None,
                  protect: list[int] | None = None) -> int:
    """How many blocks to remove: ``count``, or ``round(fraction * n_layers)``; checked against what is removable."""
    if (count is None) == (fraction is None):
        raise PruneError("give exactly one of select.n_layers (a count) or select.fraction (0 < f < 1)")
    setting = "select.n_layers"
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise PruneError(f"select.fraction={fraction} must be strictly between 0 and 1")
        count = round(fraction * n_layers)
        setting = "select.fraction"
    count = block_number(count, "select.n_layers")  # numpy's integers too, stored as a Python int
    of = f"select.fraction={fraction} of {n_layers} blocks rounds to {count}: " if fraction is not None else ""
    if count < 1:
        raise PruneError(f"{of}removing {count} blocks does nothing ("
                         + ("raise select.fraction)" if fraction is not None else "select.n_layers must be at least 1)"))
    if count >= n_layers:
        raise PruneError(f"{of}cannot remove {count} of {n_layers} blocks: at least one must stay (lower {setting})")
    removable = n_layers - len(protect or [])
    if count > removable:
        raise PruneError(
            f"{of}cannot remove {count} blocks: only {removable} of {n_layers} are not protected (lower {setting} or select.protect)"
        )
    return count


def finite_first(value: float) -> tuple[bool, float]:
    """Sort key of a measured loss or KL, smallest first with NaN and inf last (``min`` with a NaN
    first never replaces it, and ``x < nan`` is always False)."""
    finite = math.isfinite(value)
    return (not finite, value if finite else 0.0)


def metric_values(scores, metric: str) -> tuple[list[float], bool]:
    """``(values, high_is_redundant)`` of a per-block metric."""
    if metric == "bi":
        return list(scores.block_influence), False
    if metric == "angular":
        return scores.angular_distance(1), False
    if metric == "cka":
        return scores.cka_in_out, True
    if metric == "msrs":
        return list(scores.msrs_contribution), True
    raise PruneError(f"unknown metric {metric!r} (choose from {', '.join(ONE_SHOT_METRICS)})")


def rank_blocks(scores, metric: str) -> list[int]:
    """All blocks ordered from most to least removable by ``metric`` (ties: by index; MSRS's: by mean CKA to the
    other blocks, then by BI)."""
    values, high = metric_values(scores, metric)
    sign = -1.0 if high else 1.0
    if metric == "msrs":  # many blocks can saturate the soft count: break ties by mean CKA
        S = scores.cka_matrix
        L = len(S)
        tie = [sum(S[i][j] for j in range(L) if j != i) / max(L - 1, 1) for i in range(L)]
        # then by BI: of interchangeable blocks (an identity's output equals its predecessor's, so their CKA rows
        # agree) the one that changes its input least goes first, as verified's families choose (by index, the
        # real block before the identities went first)
        bi = list(scores.block_influence or [0.0] * L)
        key = lambda i: (-round(values[i], 9), -round(tie[i], 9), bi[i] if bi[i] == bi[i] else math.inf, i)  # noqa: E731
    else:
        key = lambda i: (sign * values[i], i)  # noqa: E731
    finite = [i for i in range(len(values)) if values[i] == values[i]]
    nan = [i for i in range(len(values)) if values[i] != values[i]]
    return sorted(finite, key=key) + nan


def first_allowed(order: list[int], count: int, allowed=None) -> list[int]:
    """The first ``count`` blocks of ``order`` such that ``allowed(blocks so far)`` holds for each addition
    (``None``: any); fewer when the order runs out."""
    chosen: list[int] = []
    for i in order:
        if len(chosen) == count:
            break
        if allowed is None or allowed(chosen + [i]):
            chosen.append(i)
    return chosen


def attention_kept(config):
    """``allowed(removed)`` of a hybrid stack: an attention block stays (None for no config)."""
    if config is None:
        return None
    from prune.model.loading import keeps_attention

    return lambda removed: keeps_attention(config, removed)


def raise_no_attention(config) -> None:
    """The refusal when only a hybrid stack's attention blocks are left to take."""
    from prune.model.loading import cut_without_attention

    raise PruneError(cut_without_attention(config, []))


def _enough(chosen: list[int], count: int, config) -> list[int]:
    """``chosen``, when it holds ``count`` blocks (:func:`first_allowed` ran out of blocks only where the attention
    blocks were passed over)."""
    if len(chosen) < count:
        raise_no_attention(config)
    return chosen


def one_shot(scores, count: int, metric: str, protect: list[int], config=None) -> Selection:
    values, _ = metric_values(scores, metric)
    order = [i for i in rank_blocks(scores, metric) if i not in set(protect)]
    chosen = _enough(first_allowed(order, count, attention_kept(config)), count, config)
    return Selection(sorted(chosen), scores.n_layers, "one_shot", metric, values)


def contiguous(scores, count: int, protect: list[int], config=None) -> Selection:
    """Gromov et al.: ``l* = argmin_l d(l, count)`` over runs that avoid protected blocks."""
    dist = scores.angular_distance(count)
    prot = set(protect)
    allowed = attention_kept(config) or (lambda removed: True)
    runs = [l for l in range(len(dist)) if not prot.intersection(range(l, l + count)) and dist[l] == dist[l]]
    candidates = [l for l in runs if allowed(list(range(l, l + count)))]
    if runs and not candidates:  # every run takes the stack's last attention block
        raise_no_attention(config)
    if not candidates:
        raise PruneError(f"no run of {count} contiguous blocks avoids the protected blocks {protect} (lower select.n_layers)")
    start = min(candidates, key=lambda l: (dist[l], l))
    return Selection(list(range(start, start + count)), scores.n_layers, "contiguous", "angular", dist,
                     {"start": start, "n": count, "distance": dist[start]})


def tail(n_layers: int, count: int, protect: list[int], config=None) -> Selection:
    """The ``count`` unprotected blocks just before the last block."""
    prot = set(protect) | {n_layers - 1}
    order = [i for i in range(n_layers - 1, -1, -1) if i not in prot]
    if len(order) < count:
        raise PruneError(f"tail: only {len(order)} blocks are removable before the last one")
    return Selection(sorted(_enough(first_allowed(order, count, attention_kept(config)), count, config)), n_layers, "tail")


def random_blocks(n_layers: int, count: int, protect: list[int], seed: int = 0, config=None) -> Selection:
    """``count`` unprotected blocks drawn uniformly with ``random.Random(seed)`` (a draw that would take a hybrid
    stack's last attention block: the blocks of one seeded shuffle, in order, passing it over)."""
    prot = set(protect)
    pool = [i for i in range(n_layers) if i not in prot]
    chosen = _random.Random(seed).sample(pool, count)
    allowed = attention_kept(config)
    if allowed is not None and not allowed(chosen):
        _random.Random(seed).shuffle(pool)
        chosen = _enough(first_allowed(pool, count, allowed), count, config)
    return Selection(sorted(chosen), n_layers, "random", details={"seed": seed})


def not_scores(who: str, scores) -> PruneError:
    """The refusal of ``scores`` that are not a :class:`~prune.measure.scoring.ScoreResult`."""
    return PruneError(f"{who}: scores must be what prune.score returns (or ScoreResult.load_json of a `prune score -o` "
                      f"file), got a {type(scores).__name__}")


def check_metric_read(strategy: str, metric: str | None) -> None:
    """A ``metric`` given to a score-only strategy that ranks by something else: one line, not a silent drop."""
    if metric is None or metric_is_read(strategy, metric, ("one_shot",)):
        return
    reads = f"ranks by {OWN_METRIC[strategy]} alone" if strategy in OWN_METRIC else "reads no metric"
    raise PruneError(f"metric {metric!r} is read only by strategy one_shot here; {strategy} {reads} (drop metric, or "
                     "use strategy='one_shot')")


def select(scores, n_layers: int | None = None, *, fraction: float | None = None, strategy: str = "one_shot",
           metric: str | None = None, protect=DEFAULT_PROTECT, seed: int = 0, config=None) -> Selection:
    """Choose blocks to remove from ``scores`` with a score-only strategy (see module docstring).

    ``n_layers`` is how many blocks to remove (or ``fraction`` of the stack). ``metric`` is read by
    ``one_shot`` alone (default: ``select.metric``'s); ``contiguous`` ranks runs by angular distance,
    and a metric given to a strategy that does not read it is refused, not dropped. ``config`` (the model's):
    a hybrid stack keeps an attention block (see the module docstring).
    Returns a :class:`Selection` with 0-based ``removed`` and ``kept`` indices.
    """
    check_metric_read(strategy, metric)
    if not (hasattr(scores, "n_layers") and hasattr(scores, "block_influence")):  # a dict, None: AttributeError
        raise not_scores("select", scores)
    L = scores.n_layers
    prot = resolve_protect(protect, L)
    count = resolve_count(L, n_layers, fraction, prot)
    if strategy == "one_shot":
        return one_shot(scores, count, metric or DEFAULT_METRIC, prot, config)
    if strategy == "contiguous":
        return contiguous(scores, count, prot, config)
    if strategy == "tail":
        return tail(L, count, prot, config)
    if strategy == "random":
        return random_blocks(L, count, prot, seed, config)
    raise PruneError(f"unknown strategy {strategy!r} for score-only selection (one_shot, contiguous, tail, random)")
