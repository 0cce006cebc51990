"""Score every decoder block over calibration windows: one forward pass, running statistics.

``score(model, windows)`` runs the windows through the model's decoder stack (no LM head)
in batches, captures ``h_0 .. h_L`` with :class:`~prune.model.capture.BlockStates`, and folds each
batch into running sums, so memory does not grow with the number of windows:

* ``block_influence[l]``  ShortGPT BI of block ``l`` (mean over counted tokens);
* ``angular[i][j]``       mean ``arccos(cos(h_i, h_j)) / pi``; ``d(l, n) = angular[l][l+n]``;
* ``cka[i][j]``           unbiased linear CKA between ``h_i`` and ``h_j``; one CKA batch is the
                          tokens of ``cka_windows`` consecutive windows (fixed groups, so the
                          forward batch size never changes the result), averaged over groups
                          (NaN groups dropped and counted);
* ``msrs``                RedTest's score over the L x L CKA matrix of block outputs
                          (``cka[1:, 1:]``), with each block's contribution.

``positions="skip_first"`` leaves out the first token of every window (the attention
sink, whose massive activations dominate linear CKA); ``"all"`` counts every token.
The sink dominates most when several windows are pooled into one CKA batch: the
unbiased estimator zeroes each token's self-similarity, so with ``cka_windows=1`` the
one sink of a batch weighs far less than the sink-to-sink products of a pooled batch.
Windows with non-finite activations are excluded from every statistic and listed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prune.core import dist
from prune.core import metrics as M
from prune.model.capture import BlockStates, batches, measured_in_eval_mode
from prune.core.config import CalibrationConfig, ScoreConfig, default
from prune.core.errors import PruneError, first_line, parse_problem
from prune.core.faults import fault_point
from prune.model.loading import as_device, decoder_layers, input_device, model_dtype

POSITIONS = ("all", "skip_first")
#: Defaults, from the config sections (prune.core.config: the one place they are set). Token
#: positions were decided by the quality benchmark (docs/BENCHMARKS.md, "Recommendation").
DEFAULT_POSITIONS = default(ScoreConfig, "positions")
METRICS = tuple(default(ScoreConfig, "metrics"))
CKA_WINDOWS = default(ScoreConfig, "cka_windows")
BETA = default(ScoreConfig, "beta")
TAU = default(ScoreConfig, "tau")
BATCH_SIZE = default(CalibrationConfig, "batch_size")


def checked_msrs(stored, cka: list[list[float]] | None) -> dict | None:
    """A scores file's MSRS record, recomputed from its CKA matrix with its ``beta`` and ``tau`` (a pure function of
    them): ValueError when it is not a record of numbers, or says another total than the matrix gives."""
    if cka is None:
        if stored is not None:
            raise ValueError("msrs is given without the cka matrix it is computed from")
        return None
    if not isinstance(stored, dict) or not all(isinstance(stored.get(k), (int, float)) and not isinstance(stored.get(k), bool)
                                               and math.isfinite(stored[k]) for k in ("total", "beta", "tau")):
        raise ValueError("msrs is not a record of a total, beta and tau (numbers) beside the cka matrix")
    again = M.msrs(torch.tensor(cka, dtype=torch.float64)[1:, 1:], beta=stored["beta"], tau=stored["tau"]).to_dict()
    if not math.isclose(again["total"], stored["total"], rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(f"msrs.total is {stored['total']:g}, but the cka matrix gives {again['total']:g} with beta "
                         f"{stored['beta']:g} and tau {stored['tau']:g}")
    return again


@dataclass
class ScoreResult:
    """Per-block scores of one model over one calibration set (0-based block indices)."""

    n_layers: int
    positions: str
    cka_windows: int
    n_windows: int
    seq_len: int
    n_tokens: int  # tokens counted per state (after position filtering and exclusions)
    block_influence: list[float]
    angular: list[list[float]] | None  # (L+1) x (L+1) over states h_0..h_L, or None if not computed
    cka: list[list[float]] | None  # (L+1) x (L+1) over states h_0..h_L, or None if not computed
    msrs: dict | None  # M.MSRS.to_dict() over cka[1:, 1:]
    excluded_windows: list[int] = field(default_factory=list)  # non-finite activations
    cka_dropped: int = 0  # (CKA group of cka_windows windows, pair) values that were NaN and left out
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- derived views -------------------------------------------------------------
    def angular_distance(self, n: int) -> list[float]:
        """``d(l, n)`` for ``l = 0 .. L-n``: distance between the input of block l and of block l+n."""
        if self.angular is None:
            raise PruneError("these scores have no angular distances (score with metrics including 'angular')")
        if not 1 <= n <= self.n_layers:
            raise PruneError(f"angular distance needs 1 <= n <= {self.n_layers}, got {n}")
        return [self.angular[l][l + n] for l in range(self.n_layers - n + 1)]

    @property
    def cka_matrix(self) -> list[list[float]]:
        """L x L unbiased linear CKA between block outputs (what MSRS is computed on)."""
        self._need_cka()
        return [row[1:] for row in self.cka[1:]]

    @property
    def cka_in_out(self) -> list[float]:
        """``CKA(h_l, h_{l+1})``: similarity of block l's output to its input."""
        self._need_cka()
        return [self.cka[l][l + 1] for l in range(self.n_layers)]

    @property
    def msrs_contribution(self) -> list[float]:
        """Block l's share of MSRS: ``sum_{j != l} sigmoid(2 beta (S_lj - tau))``."""
        self._need_cka()
        return self.msrs["contributions"]

    def _need_cka(self) -> None:
        if self.cka is None:
            raise PruneError("these scores have no CKA matrix (score with metrics including 'cka')")

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScoreResult:
        return cls(**data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load_json(cls, path: str | Path) -> ScoreResult:
        """The scores :meth:`save_json` (``prune score -o``) wrote; one line when the file is not such a file."""
        from dataclasses import fields

        file = Path(path).expanduser()
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PruneError(f"{file}: not a readable JSON file ({parse_problem(exc)})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"n_layers", "block_influence"} <= set(data) or set(data) - names:
            raise PruneError(f"{file} is not a scores file written by `prune score -o` or ScoreResult.save_json (give "
                             "one, a run folder, or a model with --data)")
        try:
            scores = cls.from_dict(data)
            if isinstance(scores.n_layers, bool) or not isinstance(scores.n_layers, int) or scores.n_layers < 1:
                raise ValueError(f"n_layers is {scores.n_layers!r}, not a block count")  # 8.5: a traceback later
            n = scores.n_layers
            square = [m for m in (scores.angular, scores.cka) if m is not None]
            if len(scores.block_influence) != n or any(len(m) != n + 1 or any(len(r) != n + 1 for r in m) for m in square):
                raise ValueError(f"scores of {n} blocks must hold {n} block influences and (n+1) x (n+1) matrices")
            values = [*scores.block_influence, *(v for m in square for r in m for v in r)]
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
            if bad:  # a table or a choice made of them failed later, with a traceback
                raise ValueError(f"a score is {bad[0]!r}, not a number")
            # scoring never writes a non-finite influence or angle (non-finite windows are left out); a choice
            # skipped such a block without a word (CKA may hold NaN: a pair no window could measure)
            odd = [v for v in [*scores.block_influence, *(v for r in scores.angular or [] for v in r)] if not math.isfinite(v)]
            if odd:
                raise ValueError(f"a block influence or angular distance is {odd[0]}, which scoring never writes")
            counts = {"n_windows": 1, "seq_len": 1, "cka_windows": 1, "n_tokens": 0}
            if low := [k for k, least in counts.items() if isinstance(getattr(scores, k), bool)
                       or not isinstance(getattr(scores, k), int) or getattr(scores, k) < least]:
                raise ValueError(f"{low[0]} is {getattr(scores, low[0])!r}, not a count")
            if scores.positions not in POSITIONS:
                raise ValueError(f"positions is {scores.positions!r}, not one of {', '.join(POSITIONS)}")
            scores.msrs = checked_msrs(scores.msrs, scores.cka)
        except (TypeError, ValueError) as exc:
            raise PruneError(f"{file}: scores of the wrong shape ({first_line(exc)}); write it again with "
                             "`prune score -o`") from None
        return scores

    def table(self) -> str:
        """A per-block table for the terminal."""
        ang = self.angular_distance(1) if self.angular is not None else None  # not scored: no column of NaN
        head = f"{'block':>5} {'BI':>9}" + (f" {'ang(n=1)':>9}" if ang is not None else "")
        cka = self.cka is not None
        if cka:
            head += f" {'CKA(in,out)':>11} {'MSRS contrib':>12}"
        lines = [head]
        for l in range(self.n_layers):
            line = f"{l:>5} {self.block_influence[l]:>9.5f}" + (f" {ang[l]:>9.5f}" if ang is not None else "")
            if cka:
                line += f" {self.cka_in_out[l]:>11.5f} {self.msrs_contribution[l]:>12.3f}"
            lines.append(line)
        if cka:
            m = self.msrs
            lines.append(
                f"MSRS = {M.msrs_text(m, self.n_layers, 3)}; beta={m['beta']:g}, tau={m['tau']:g}"
            )
        lines.append(f"{self.n_windows} windows x {self.seq_len} tokens, positions={self.positions}, "
                     f"{self.n_tokens} tokens counted, {len(self.excluded_windows)} windows excluded")
        return "\n".join(lines)


class ScoreAccumulator:
    """Running statistics over batches of ``h_0 .. h_L`` (see module docstring)."""

    def __init__(self, n_layers: int, device: torch.device, metrics: tuple[str, ...], cka_windows: int = 1):
        m = n_layers + 1
        self.n_layers = n_layers
        self.cka_windows = cka_windows
        self.metrics = metrics
        self.bi = M.RunningMean((n_layers,), device)
        self.angular = M.RunningMean((m, m), device) if "angular" in metrics else None
        self.cka = M.RunningMean((m, m), device) if "cka" in metrics else None
        self.tokens = 0

    def update(self, states, inputs: list[torch.Tensor | None]) -> None:
        """Fold one batch in: ``states`` are ``h_0 .. h_L``, each ``[B, S, d]`` (a list, or one tensor
        ``[L+1, B, S, d]``); ``inputs[l]`` overrides ``states[l]`` for BI. No stacked copy is made."""
        B, S, d = states[0].shape
        T = B * S
        flat = [x.reshape(T, d) for x in states]
        one_minus_cos, angular = M.cosine_sums(flat, pairs=self.angular is not None)
        for l, x in enumerate(inputs):  # the stream changed between blocks: BI compares the block's own input
            if x is not None:
                one_minus_cos[l] = T - M.cosine_per_token(x.reshape(T, d), flat[l + 1]).sum()
        self.bi.add_sum(one_minus_cos, T)
        if self.angular is not None:
            self.angular.add_sum(angular, T)
        if self.cka is not None:
            P = self.cka_windows  # the caller makes forward batches multiples of P
            for g in range(0, B, P):
                self.cka.update(M.cka_matrix([x[g : g + P].reshape(-1, d) for x in states]))
        self.tokens += T

    def all_reduce(self) -> None:
        """Sum the running statistics of every rank (one float64 all-reduce; no-op in one process).
        Every sum is additive over windows, so the result is the one-process accumulation."""
        if not dist.world().distributed:
            return
        means = [m for m in (self.bi, self.angular, self.cka) if m is not None]
        parts = [t for m in means for t in (m.sum, m.weight, m.dropped)]
        packed = torch.cat([t.reshape(-1).to(torch.float64) for t in parts]
                           + [torch.tensor([float(self.tokens)], dtype=torch.float64, device=parts[0].device)])
        packed = dist.all_reduce_sum(packed)
        at = 0
        for t in parts:
            t.copy_(packed[at : at + t.numel()].reshape(t.shape).to(t.dtype))
            at += t.numel()
        self.tokens = int(packed[at])


def check_model(model, what: str = "the model") -> None:
    """One line unless ``model`` is a model (a tokenizer in its place raised AttributeError from deep inside);
    ``what`` names it in the message."""
    if not isinstance(model, torch.nn.Module):
        raise PruneError(f"{what} is a {type(model).__name__}, not a model: give the loaded model (prune.load returns "
                         "the model first)")


def embedding_rows(model) -> int | None:
    """The token ids ``model``'s input embedding holds (None where it has no embedding to ask)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def check_windows(windows, vocab: int | None = None) -> None:
    """One line unless ``windows`` is a non-empty ``[n_windows, seq_len]`` tensor of token ids (``vocab``: each
    an index of the model's embedding)."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.dtype.is_floating_point:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise PruneError(f"windows must be a tensor of token ids [n_windows, seq_len] (prune.calibration_windows), "
                         f"got {shape}{' of ' + str(windows.dtype) if isinstance(windows, torch.Tensor) else ''}")
    if windows.shape[0] == 0:
        raise PruneError("no windows to score: give at least one window")
    if vocab is not None and windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
        raise PruneError(f"windows hold token ids from {int(windows.min())} to {int(windows.max())}, outside the model's "
                         f"vocabulary [0, {vocab}): tokenize with the model's own tokenizer")


def short_cka_group(cka_windows: int, n: int, count: str, knob: str = "cka_windows") -> str:
    """The refusal of ``n`` windows that ``cka_windows`` does not divide: the last CKA batch would pool fewer
    windows than the others, and CKA over fewer tokens is another measure (it weighed the same in the mean)."""
    if cka_windows > n:  # one CKA batch that never fills
        return (f"{knob} {cka_windows} pools more windows into one CKA batch than the {n} given: lower it, or raise "
                f"{count} (to a multiple of it)")
    lower, upper = n // cka_windows * cka_windows, -(-n // cka_windows) * cka_windows
    fix = " or ".join(str(m) for m in (lower, upper) if m)
    return (f"{knob} {cka_windows} does not divide the {n} windows: the last CKA batch would pool "
            f"{n % cka_windows}, a measure over fewer tokens than the others' (set {count} to a multiple: {fix}; or "
            f"change {knob})")


def check_score_args(windows: torch.Tensor, positions: str, metrics, cka_windows: int,
                     batch_size: int, beta: float = 1.0, tau: float = 0.5,
                     vocab: int | None = None) -> tuple[tuple[str, ...], int, int]:
    """Validate scoring arguments (the limits :class:`prune.core.config.ScoreConfig` puts on a recipe's;
    ``vocab``: the embedding's rows, which every token id must index); returns ``(metrics, batch_size,
    first)`` where the batch size is rounded up to a multiple of ``cka_windows`` and ``first`` is the first
    counted position."""
    if isinstance(metrics, str):  # "cka" would be the metrics c, k and a
        raise PruneError(f"metrics={metrics!r}: give a list of metric names, e.g. ({metrics!r},)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PruneError(f"batch_size={batch_size!r} must be a whole number of windows, at least 1")
    metrics = tuple(metrics)
    for name, value in (("metrics", list(metrics)), ("positions", positions), ("cka_windows", cka_windows),
                        ("beta", beta), ("tau", tau)):
        ScoreConfig.check_value(name, value)  # the limits a recipe's score section puts on them
    check_windows(windows, vocab)
    if "cka" in metrics and windows.shape[0] % cka_windows:  # a CKA batch that never fills: another measure
        raise PruneError(short_cka_group(cka_windows, windows.shape[0], "the number of windows"))
    batch_size = -(-batch_size // cka_windows) * cka_windows
    first = 1 if positions == "skip_first" else 0
    if windows.shape[1] - first < 1:
        raise PruneError(f"windows of {windows.shape[1]} token(s) leave no position to score with positions={positions} "
                         "(give longer windows)")
    if "cka" in metrics and cka_windows * (windows.shape[1] - first) <= 3:  # unbiased HSIC: n > 3 per CKA batch
        raise PruneError(f"CKA needs more than 3 counted tokens per CKA batch ({cka_windows} window(s) of "
                         f"{windows.shape[1] - first}); seq_len={windows.shape[1]} is too short (or pool more windows)")
    return metrics, batch_size, first


def fold_batch(acc: ScoreAccumulator, states: list[torch.Tensor], inputs: list[torch.Tensor | None],
               first: int, start: int) -> list[int]:
    """Fold the states ``h_0 .. h_L`` of the windows ``start, start+1, ...`` into ``acc``.

    Positions before ``first`` are dropped; windows with non-finite activations are left
    out of every statistic and their indices returned (a CKA group of ``cka_windows`` windows,
    fixed by position, keeps its other windows, so the batch size never moves the groups).
    """
    if first:
        states = [x[:, first:] for x in states]
        inputs = [None if x is None else x[:, first:] for x in inputs]
    finite = torch.ones(states[0].shape[0], dtype=torch.bool, device=states[0].device)  # [B]
    for x in states + [x for x in inputs if x is not None]:  # no float64 copy of any state
        finite &= torch.isfinite(x).flatten(1).all(1)
    if bool(finite.all()):
        acc.update(states, inputs)
        return []
    P = acc.cka_windows  # each fixed CKA group keeps its finite windows: the groups do not shift
    for g in range(0, finite.numel(), P):
        keep = finite[g : g + P]
        if bool(keep.any()):
            acc.update([x[g : g + P][keep] for x in states], [None if x is None else x[g : g + P][keep] for x in inputs])
    return [start + int(i) for i in torch.nonzero(~finite).flatten()]


def finish(acc: ScoreAccumulator, windows: torch.Tensor, *, positions: str, metrics: tuple[str, ...],
           cka_windows: int, beta: float, tau: float, excluded: list[int], started: float,
           progress: bool, metadata: dict | None) -> ScoreResult:
    """The :class:`ScoreResult` of a finished accumulation (MSRS over the CKA matrix of block outputs)."""
    if acc.tokens == 0:
        raise PruneError("every calibration window had non-finite activations (try dtype float32 or bfloat16)")
    if excluded and progress:
        print(f"warning: {len(excluded)} window(s) had non-finite activations and were excluded: {excluded[:10]}")
    cka = msrs = None
    cka_dropped = 0
    if acc.cka is not None:
        cka_t = acc.cka.mean
        cka = cka_t.tolist()
        msrs = M.msrs(cka_t[1:, 1:], beta=beta, tau=tau).to_dict()
        cka_dropped = int(torch.triu(acc.cka.dropped, diagonal=1).sum())
    return ScoreResult(
        n_layers=acc.n_layers,
        positions=positions,
        cka_windows=cka_windows,
        n_windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        n_tokens=acc.tokens,
        block_influence=acc.bi.mean.tolist(),
        angular=acc.angular.mean.tolist() if "angular" in metrics else None,
        cka=cka,
        msrs=msrs,
        excluded_windows=excluded,
        cka_dropped=cka_dropped,
        seconds=time.perf_counter() - started,
        metadata=dict(metadata or {}),
    )


@measured_in_eval_mode
def score(
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = BATCH_SIZE,
    positions: str = DEFAULT_POSITIONS,
    metrics: tuple[str, ...] | list[str] = METRICS,
    cka_windows: int = CKA_WINDOWS,
    beta: float = BETA,
    tau: float = TAU,
    device: torch.device | str | None = None,
    progress: bool = True,
    metadata: dict | None = None,
) -> ScoreResult:
    """Score every decoder block of ``model`` on ``windows [n, seq_len]`` (int64 token ids).

    Statistics are gathered on ``device`` (default: the device of the input embedding)
    in float32/float64 whatever the model dtype. Block Influence is always computed;
    ``metrics`` may add ``"angular"`` and ``"cka"`` (CKA also gives MSRS with ``beta``, ``tau``).
    ``cka_windows`` windows are pooled into one CKA batch (``batch_size`` is rounded up
    to a multiple of it). The model may be dispatched by Accelerate over several devices
    or offloaded to CPU/disk: the hooks copy every state to ``device``.

    Under a launcher (:mod:`prune.core.dist`) each rank scores a contiguous share of the
    windows, in whole forward batches, and the running sums are all-reduced in float64.
    """
    check_model(model, "the model to score")
    metrics, batch_size, first = check_score_args(windows, positions, metrics, cka_windows, batch_size, beta, tau,
                                                  embedding_rows(model))
    layers = decoder_layers(model)
    n_layers = len(layers)
    in_dev = input_device(model)
    stats_dev = as_device(device) if device is not None else (in_dev if in_dev.type != "meta" else torch.device("cpu"))
    acc = ScoreAccumulator(n_layers, stats_dev, metrics, cka_windows)
    excluded: list[int] = []
    base = model.base_model
    started = time.perf_counter()
    lo, hi = dist.shard(windows.shape[0], batch_size)  # (0, n) in one process
    bar = tqdm(total=hi - lo, desc="scoring", unit="win", disable=not progress)
    with torch.no_grad(), BlockStates(layers, stats_dev, first=first) as capture:  # skipped positions: never copied
        for start, batch in batches(windows[lo:hi], batch_size):
            base(input_ids=batch.to(in_dev), use_cache=False)
            states, inputs = capture.pop()
            excluded += fold_batch(acc, states, inputs, 0, lo + start)
            del states, inputs
            bar.update(batch.shape[0])
            fault_point("scoring")  # fault-injection hook (prune.faults); a no-op outside tests
    bar.close()
    acc.all_reduce()
    excluded = sorted(i for part in dist.all_gather(excluded) for i in part)
    return finish(acc, windows, positions=positions, metrics=metrics, cka_windows=cka_windows, beta=beta, tau=tau,
                  excluded=excluded, started=started, progress=progress,
                  metadata={"dtype": model_dtype(model), **(metadata or {})})  # the dtype the model ran in (its states' rounding)
