"""Linear bridges across the cuts, fitted before healing (``heal.bridge: linear``): cut by cut on the pruned model
against the original's states when the original is in memory, else on the original's states alone.

Removing the contiguous run ``a..b`` leaves block ``a-1``'s output ``y`` where the original had
``h_b``, the output of block ``b``. Block ``a-1`` ends by adding its MLP output ``m`` to the
residual stream, so a matrix ``T`` applied to ``m`` can carry part of the run's work (ReplaceMe,
Shopkhoev et al. 2025). Over the calibration tokens, least squares gives

    T = argmin sum_t || m_t T - (h_b - y + m)_t ||^2 = (M^T M)^+ M^T (H_b - Y + M)

(``T = I`` is plain removal). It is folded into the MLP's output projection (``W <- T^T W`` for
``nn.Linear``, ``W <- W T`` for GPT-2's ``Conv1D``; the bias ``b <- b T``), so the checkpoint stays
a plain one with no new module. A mixture of experts adds ``sum_e g_e(x) E_e(x)``, linear in each
expert's output, so ``m T = sum_e g_e(x) (E_e(x) T)``: ``T`` folds exactly into every expert's
down projection (Mixtral's and Qwen3-MoE's stacked ``[experts, hidden, intermediate]`` weight). ``m``
is captured at the MLP module's output. ``M^T M`` and ``M^T (H_b - Y + M)`` are summed per batch in
float64 on the activations' device (no states are kept), and each forward pass stops after the
last block needed.

``heal.bridge: down`` refits the whole output projection of the block before the cut instead, on
its own inputs ``a`` (the MLP's inner activations, ``d_ff`` wide, and a constant 1 where the
projection has a bias): ``W' = argmin sum_t || a_t W' - (h_b - y + m)_t ||^2``, solved as
``(A^T A + lam I) W' = A^T Z`` with ``lam = RIDGE x mean(diag(A^T A))``. Its candidates include
every ``T``-bridge (``W T``) and plain removal (``W``), so without the ridge it fits the fit tokens
at least as well (docs/BENCHMARKS.md measures both on SmolLM2). Dense MLPs only (a mixture's
experts are routed per token).

Token weights (``heal.bridge_weight``): ``uniform`` (default) is plain least squares; ``rms``
minimises ``sum_t w_t ||...||^2`` with ``w_t = 1 / rms(h_b,t)``, the RMS over the hidden size of
the original's state after the cut (rows scaled by ``sqrt(w_t)``); ``skip_first`` gives each
window's first token weight 0. A few positions (the first above all: the attention sink) carry
states far larger than the others' (massive activations); with equal weights their squares decide
the fit. On SmolLM2 (docs/BENCHMARKS.md, "Weighing the fit's tokens") ``rms`` turns the long cut
9-18, where the uniform fit raises the held-out KL (1.92 -> 2.70) and is dropped, into a bridge
that lowers it (1.18), and matches uniform at shorter cuts, but it lets one text window whose
first state differs from the fit text's drift (KL 0.80 -> 0.96 there). ``auto`` sums the normal
equations of all three in the same forward pass (three times the sums' memory: ``d_ff^2`` float64
each for ``down``), solves each, and :func:`keep_helpful` keeps per cut the one with the lowest
held-out measure (each cut's :attr:`Bridge.checked` records the three).

Several cuts: :func:`fit_bridges` fits each on the original's states, in one pass.
:func:`cascade` fits them in order on the PRUNED model as it stands (``m``, ``y``, ``a`` from its
block before the cut, earlier bridges folded in; ``h_b`` from the original), the sequential order
of GPTQ / SparseGPT, so a later bridge corrects the input that earlier cuts changed; it needs the
original in memory beside the pruned model (docs/BENCHMARKS.md compares the two).

A run that starts at block 0 has no block before it and is left without a bridge; blocks whose
MLP output passes through a norm before the residual (Gemma 2/3), or whose MLP ends in something
else than these projections, have nowhere to fold ``T`` and are refused (:func:`check_bridge`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prune.core.config import BRIDGE_FITS, DEFAULT_BRIDGE_WEIGHT
from prune.core.errors import PruneError
from prune.model.capture import StopForward, _hidden_from_output, batches
from prune.model.arch import OUTPUT_PROJECTIONS
from prune.model.loading import decoder_layers, input_device

#: a block's MLP by name (MPT: ffn); OPT keeps its projections fc1 and fc2 on the block itself
MLP_NAMES = ("mlp", "ffn")
#: a block's norm applied to its MLP's output (Gemma2/3 and OLMo-2/3, GLM-4): a bridge folded before it is undone
NORMS_AFTER_MLP = ("post_feedforward_layernorm", "post_mlp_layernorm")


#: ``heal.bridge: down``: the ridge, relative to the mean diagonal of ``A^T A`` (1e-4 fits held-out
#: windows as well as the exact solve on SmolLM2, and keeps the solve well posed)
RIDGE = 1e-4
BRIDGE_KINDS = ("linear", "down")


@dataclass
class Bridge:
    """The fitted map for one cut: ``run`` (original indices) removed, folded into ``block``.

    By the kind of its :class:`Bridges`: ``linear``: ``T`` [d, d], the MLP's output becomes ``m T``. ``down``: ``T`` [d_ff (+1), d], the new
    output projection (its input ``a`` -> ``a T``, the last row the bias where the projection has one)."""

    run: list[int]
    block: int
    T: torch.Tensor  # float64, on the CPU
    fit_error: float  # ||X T - Z||^2 / ||M - Z||^2 on the fit tokens: the share of the cut's error left
    weight: str = "uniform"  # the token weights it was fitted with (one of BRIDGE_FITS)
    checked: dict[str, float] = field(default_factory=dict)  # bridge_weight auto: each weighting's held-out measure


@dataclass
class Bridges:
    """Every cut's bridge, and what fitting them cost. ``options``: per cut, every fit to choose from
    (one per weighting of ``weight``: three for ``auto``); ``bridges`` holds the first until
    :func:`keep_helpful` puts the chosen one in its place."""

    bridges: list[Bridge]
    skipped: list[list[int]] = field(default_factory=list)  # runs with no block before them
    tokens: int = 0
    seconds: float = 0.0
    kind: str = "linear"  # every bridge's: linear or down
    fit: str = "independent"  # independent: every cut on the original's states; cascade: on the pruned model's
    weight: str = DEFAULT_BRIDGE_WEIGHT  # each token's weight in the least squares: one of BRIDGE_WEIGHTS
    options: list[list[Bridge]] = field(default_factory=list)  # empty: each cut's bridge is its only option

    def __post_init__(self) -> None:
        self.options = self.options or [[b] for b in self.bridges]

    def record(self) -> dict:
        return {"method": self.kind, "fit": self.fit, "weight": self.weight, "tokens": self.tokens,
                "seconds": round(self.seconds, 1),
                "cuts": [{"run": b.run, "block": b.block, "fit_error": round(b.fit_error, 4), "weight": b.weight,
                          **({"checked": {w: round(v, 6) for w, v in b.checked.items()}} if b.checked else {})}
                         for b in self.bridges],
                "skipped": self.skipped}


def weightings(weight: str) -> tuple[str, ...]:
    """The fits ``heal.bridge_weight`` asks for: every one of BRIDGE_FITS for ``auto``, else itself."""
    return BRIDGE_FITS if weight == "auto" else (weight,)


def runs_of(removed: list[int]) -> list[list[int]]:
    """The maximal contiguous runs of ``removed`` (sorted)."""
    runs: list[list[int]] = []
    for i in sorted(set(removed)):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def block_mlp(block: nn.Module) -> nn.Module | None:
    """The MLP of ``block`` (see :data:`MLP_NAMES`), or None."""
    return next((m for m in (getattr(block, n, None) for n in MLP_NAMES) if isinstance(m, nn.Module)), None)


def mlp_output(block: nn.Module) -> nn.Module | None:
    """The module whose output is what ``block``'s MLP adds: a mixture of experts itself, else the dense MLP's
    output projection (MPT's MLP adds the residual inside; OPT keeps the projection on the block)."""
    mlp = block_mlp(block)
    if mlp is not None and getattr(mlp, "experts", None) is not None:
        return mlp
    return output_projection(mlp if mlp is not None else block)


def output_projection(mlp: nn.Module) -> nn.Module | None:
    """A dense MLP's last projection (``nn.Linear`` or GPT-2's ``Conv1D``), or None."""
    for name in OUTPUT_PROJECTIONS:
        proj = getattr(mlp, name, None)
        if isinstance(proj, nn.Linear) or type(proj).__name__ == "Conv1D":
            return proj
    return None


#: the parts of a mixture-of-experts MLP besides its experts that add nothing to the output themselves
MOE_ROUTING = ("experts", "gate", "router")


def fold_targets(block: nn.Module) -> list[nn.Module | nn.Parameter] | None:
    """What ``T`` folds into for ``block``: its MLP's output projection, or every expert's stacked
    down projection (``[experts, hidden, intermediate]``); None where the MLP's output does not reach
    the residual stream as a sum of those (a norm after the MLP: Gemma2/3, OLMo-2; a scaled residual:
    Granite's ``residual_multiplier``; shared experts, other layouts)."""
    mlp = mlp_output(block)
    if mlp is None or any(hasattr(block, n) for n in NORMS_AFTER_MLP) or getattr(block, "residual_multiplier", 1.0) != 1.0:
        return None
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return [mlp]  # the dense MLP's output projection
    down = getattr(experts, "down_proj", None)
    hidden = getattr(experts, "hidden_dim", None)
    # any part beside the experts and their router adds to the output unfolded: shared experts under any name
    # (Qwen2-MoE's shared_expert, DeepSeek's shared_experts, Hunyuan's shared_mlp: a bridge fitted on the whole
    # output and folded into the routed experts alone computed something else)
    others = {n for n, m in mlp.named_children() if n not in MOE_ROUTING and any(True for _ in m.parameters())}
    others |= {n for n, _ in mlp.named_parameters(recurse=False)}  # a bias or scale of the MoE's own
    if (not isinstance(down, nn.Parameter) or down.dim() != 3 or down.shape[1] != hidden or others
            or getattr(experts, "down_proj_bias", None) is not None):
        return None
    return [down]


def check_bridge(model: nn.Module, blocks: list[int] | None = None, kind: str = "linear",
                 names: list[int] | None = None) -> None:
    """One-line refusal when a block (``blocks``, default every one) has nowhere to fold a bridge; ``names``:
    each block's number as the message gives it (a pruned model's blocks by their original numbers)."""
    layers = decoder_layers(model)
    for i in range(len(layers)) if blocks is None else blocks:
        targets = fold_targets(layers[i])
        i = i if names is None else names[i]
        if targets is None:
            raise PruneError(f"heal.bridge {kind}: block {i} of {type(model).__name__} has no MLP output projection "
                             f"({', '.join(OUTPUT_PROJECTIONS)}, or experts' stacked down_proj) adding straight to the "
                             "residual stream (a norm after the MLP, a scaled residual, shared experts, or experts "
                             "with output biases): set heal.bridge: none")
        if kind == "down" and isinstance(targets[0], nn.Parameter):
            raise PruneError(f"heal.bridge down: block {i} of {type(model).__name__} is a mixture of experts (its "
                             "experts are routed per token, no single projection to refit): use heal.bridge: linear")


def check_adds_straight(model: nn.Module, blocks: list[int], windows: torch.Tensor, kind: str = "linear") -> None:
    """Refuse a block whose fold target's output does not reach the block's output unchanged, measured on one
    window: doubling that output (the dense MLP's output projection's, or a mixture's) must move the block's
    output by exactly it. :func:`fold_targets` judges by the block's parts; this catches what their names do
    not say (a norm after the MLP under another name, a scaled residual, something after the projection inside
    the MLP), where the folded map would compute something else than the fitted one. Refused when the share of
    the doubled output that moves the block is off 1, or what moves besides it is, by more than 0.1 of it beyond
    the rounding of the model's dtype (an output below that rounding cannot be told apart: not refused). One pass
    to the deepest block, then one per block."""
    if not blocks:
        return
    layers = decoder_layers(model)
    batch, training = windows[:1].to(input_device(model)), model.training
    eps = torch.finfo(next(model.parameters()).dtype).eps

    def target(i: int) -> nn.Module:
        return mlp_output(layers[i])

    def run(hooks: list, stop: int) -> None:
        handles = [module.register_forward_hook(hook) for module, hook in hooks]

        def halt(module, args, output):
            raise StopForward

        handles.append(layers[stop].register_forward_hook(halt))
        try:
            with torch.no_grad():
                model(input_ids=batch, use_cache=False)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    def keep(store: dict, key):
        def hook(module, args, output):
            store[key] = _hidden_from_output(output).detach().double()
        return hook

    def double(module, args, output):
        return (output[0] * 2, *output[1:]) if isinstance(output, tuple) else output * 2

    model.eval()
    try:
        seen: dict = {}
        run([h for i in blocks for h in ((target(i), keep(seen, ("m", i))), (layers[i], keep(seen, ("y", i))))], max(blocks))
        for i in blocks:
            run([(target(i), double), (layers[i], keep(seen, ("y2", i)))], i)
            m, y = seen["m", i].flatten(), seen["y", i].flatten()
            moved = seen["y2", i].flatten() - y
            share = float(moved @ m / (m @ m).clamp_min(1e-30))
            besides = float((moved - share * m).norm() / m.norm().clamp_min(1e-30))
            noise = 8 * eps * float(y.norm() / m.norm().clamp_min(1e-30))  # the dtype's rounding of the stream, in m's
            if abs(share - 1) > 0.1 + noise or besides > 0.1 + noise:
                raise PruneError(f"heal.bridge {kind}: block {i} of {type(model).__name__} does not add its MLP's output to "
                                 f"the residual stream unchanged (doubling it moved the block's output by {share:.2f} "
                                 "of it: a norm after the MLP, or a scaled residual): set heal.bridge: none")
    finally:
        model.train(training)


def check_bridge_anywhere(model: nn.Module, kind: str = "linear") -> None:
    """Before the cuts are known: refuse only a model none of whose blocks can hold a bridge. Which block comes
    before a cut is checked once they are (:func:`fit_bridges`): a stack of dense and mixture-of-experts blocks
    (Qwen2-MoE, DeepSeek-V3) holds one after a dense block."""
    first = None
    for i in range(len(decoder_layers(model))):
        try:
            return check_bridge(model, [i], kind)
        except PruneError as exc:
            first = first or exc
    if first is not None:
        raise first


def fit_bridges(model: nn.Module, removed: list[int], windows: torch.Tensor, batch_size: int = 8,
                kind: str = "linear", weight: str = DEFAULT_BRIDGE_WEIGHT, measured: bool = False) -> Bridges:
    """Fit one bridge (``kind``: linear or down; tokens weighted by ``weight``, :func:`token_weights`)
    per run of ``removed`` on the FULL (original) ``model`` over ``windows``."""
    started = time.time()
    layers = decoder_layers(model)
    runs = runs_of(removed)
    cuts = [r for r in runs if r[0] > 0]
    check_bridge(model, [r[0] - 1 for r in cuts], kind)
    if not measured:  # fit_cascade measured every cut's block before its first fit
        check_adds_straight(model, [r[0] - 1 for r in cuts], windows, kind)
    skipped = [r for r in runs if r[0] == 0]
    if not cuts:
        return Bridges([], skipped, 0, time.time() - started, kind, weight=weight)
    sums: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    taken: dict[str, torch.Tensor] = {}
    last = max(r[-1] for r in cuts)

    def keep(name: str):
        def hook(module, args, output):
            taken[name] = _hidden_from_output(output).detach().flatten(0, -2).double()
            if name == f"h{last}":
                raise StopForward
        return hook

    def keep_input(name: str):
        def hook(module, args, output):
            taken[name] = projection_input(module, args)
        return hook

    handles = []
    for r in cuts:
        a = r[0]
        if kind == "down":
            handles.append(fold_targets(layers[a - 1])[0].register_forward_hook(keep_input(f"a{a - 1}")))
        handles += [mlp_output(layers[a - 1]).register_forward_hook(keep(f"m{a - 1}")),
                    layers[a - 1].register_forward_hook(keep(f"y{a - 1}")),
                    layers[r[-1]].register_forward_hook(keep(f"h{r[-1]}"))]
    device, tokens, training = input_device(model), 0, model.training
    model.eval()  # dropout off: the states the pruned model will see at inference
    try:
        with torch.no_grad():
            for _, batch in batches(windows, batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except StopForward:
                    pass
                tokens += batch.numel()
                for r in cuts:
                    m, y, h = taken[f"m{r[0] - 1}"], taken[f"y{r[0] - 1}"], taken[f"h{r[-1]}"]
                    h = h.to(m.device)
                    for w in weightings(weight):
                        accumulate(sums.setdefault((r[0], w), {}), taken[f"a{r[0] - 1}"] if kind == "down" else m,
                                   h - y.to(m.device) + m, m, token_weights(h, w, batch.shape[-1]))
                taken.clear()
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    options = [[solve(r, sums[(r[0], w)], kind, w) for w in weightings(weight)] for r in cuts]
    return Bridges([o[0] for o in options], skipped, tokens, time.time() - started, kind, weight=weight,
                   options=options)


def token_weights(h: torch.Tensor, weight: str, seq_len: int) -> torch.Tensor | None:
    """Each token's weight in a bridge's least squares, from the original's state after the cut
    ``h`` [windows x seq_len tokens, d]: ``uniform``: None (every token 1); ``skip_first``: 0 for each
    window's first token, 1 elsewhere; ``rms``: ``1 / sqrt(mean_j h_tj^2)``."""
    if weight == "uniform":
        return None
    if weight == "skip_first":
        w = torch.ones(len(h), dtype=h.dtype, device=h.device)
        w.view(-1, seq_len)[:, 0] = 0.0
        return w
    if weight != "rms":
        raise ValueError(f"bridge weight {weight!r}: expected one of {', '.join(BRIDGE_FITS)}")
    return torch.rsqrt((h * h).mean(-1) + 1e-12)


def projection_input(proj: nn.Module, args: tuple) -> torch.Tensor:
    """``down``: what the output projection ``proj`` was called with, [tokens, d_ff] float64, and a
    column of 1 for its bias where it has one (the ``a`` of the module docstring)."""
    x = args[0].detach().flatten(0, -2).double()
    return torch.cat([x, x.new_ones(len(x), 1)], 1) if proj.bias is not None else x


def accumulate(s: dict, x: torch.Tensor, z: torch.Tensor, m: torch.Tensor, w: torch.Tensor | None = None) -> None:
    """Add one batch to a cut's normal equations: ``G = X^T X``, ``C = X^T Z``, ``||Z||^2`` and
    plain removal's error ``||Z - M||^2`` (float64, on the activations' device: no copy per batch);
    with token weights ``w`` [tokens], every row of ``X``, ``Z``, ``M`` scaled by ``sqrt(w)`` first."""
    if w is not None:
        r = w.sqrt()[:, None]
        x, z, m = x * r, z * r, m * r
    s["G"] = s.get("G", 0.0) + x.T @ x
    s["C"] = s.get("C", 0.0) + x.T @ z
    s["zz"] = s.get("zz", 0.0) + (z * z).sum()
    s["plain"] = s.get("plain", 0.0) + ((z - m) ** 2).sum()


def solve(run: list[int], s: dict, kind: str, weight: str = "uniform") -> Bridge:
    """The cut's map from its summed normal equations: ridge for ``down`` (``d_ff`` wide), the
    minimum-norm least-squares solution for ``linear`` (``M^T M`` may be singular: its pseudo-inverse
    by eigendecomposition, eigenvalues under ``eps x d`` of the largest dropped, as LAPACK's gelsd
    drops singular values). Solved where the sums are (a GPU's float64 rather than the CPU's)."""
    G, C, zz, plain = s["G"], s["C"], float(s["zz"]), float(s["plain"])
    if kind == "down":
        T = torch.linalg.solve(G + RIDGE * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype, device=G.device), C)
    else:
        T = torch.linalg.pinv(G, hermitian=True) @ C
    left = float((T * (G @ T)).sum() - 2 * (T * C).sum()) + zz
    return Bridge(run, run[0] - 1, T.cpu(), left / plain if plain > 0 else 0.0, weight)


def fit_cut(original: nn.Module, student: nn.Module, removed: list[int], run: list[int], windows: torch.Tensor,
            batch_size: int = 8, kind: str = "linear", weight: str = DEFAULT_BRIDGE_WEIGHT) -> tuple[list[Bridge], int]:
    """One cut's bridge fitted on the PRUNED ``student`` as it stands (its block ``run[0] - 1``, fed
    what the pruned model feeds it: earlier cuts and their bridges included) against the
    ``original``'s output of block ``run[-1]``. Returns the bridge of each of ``weight``'s weightings
    (:func:`weightings`) and the tokens seen."""
    block = decoder_layers(student)[run[0] - 1 - sum(i < run[0] - 1 for i in removed)]
    taken: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            taken[name] = _hidden_from_output(output).detach().flatten(0, -2).double()
            if name in ("y", "h"):
                raise StopForward
        return hook

    def keep_input(module, args, output):
        taken["a"] = projection_input(module, args)

    handles = [mlp_output(block).register_forward_hook(keep("m")), block.register_forward_hook(keep("y")),
               decoder_layers(original)[run[-1]].register_forward_hook(keep("h"))]
    if kind == "down":
        handles.append(fold_targets(block)[0].register_forward_hook(keep_input))
    sums: dict[str, dict] = {w: {} for w in weightings(weight)}
    tokens, modes = 0, (student.training, original.training)
    student.eval()  # dropout off: the states the pruned model will see at inference
    original.eval()
    try:
        with torch.no_grad():
            for _, batch in batches(windows, batch_size):
                for model in (student, original):
                    try:
                        model(input_ids=batch.to(input_device(model)), use_cache=False)
                    except StopForward:
                        pass
                m, y, h = taken["m"], taken["y"], taken["h"].to(taken["m"].device)
                for w, s in sums.items():
                    accumulate(s, taken["a"] if kind == "down" else m, h - y + m, m, token_weights(h, w, batch.shape[-1]))
                tokens += batch.numel()
                taken.clear()
    finally:
        student.train(modes[0])
        original.train(modes[1])
        for h in handles:
            h.remove()
    return [solve(run, s, kind, w) for w, s in sums.items()], tokens


def cascade(original: nn.Module, student: nn.Module, removed: list[int], windows: torch.Tensor,
            error: Callable[[], float] | None, start: float | None = None, batch_size: int = 8,
            kind: str = "linear", weight: str = DEFAULT_BRIDGE_WEIGHT) -> tuple[Bridges, list[bool]]:
    """Fit and fold the bridges cut by cut, in order, each on the pruned ``student`` as it stands
    (:func:`fit_cut`: the sequential order of GPTQ / SparseGPT; a first cut with nothing removed
    before it sees the original's inputs, and is fitted on the original alone), each kept only
    where it lowers ``error()`` (:func:`keep_helpful`, which asks for the next fit only once the
    previous one is decided). Returns the bridges and which were kept; the student ends with the
    kept ones folded in."""
    started = time.time()
    runs = runs_of(removed)
    cuts, skipped = [r for r in runs if r[0] > 0], [r for r in runs if r[0] == 0]
    check_bridge(original, [r[0] - 1 for r in cuts], kind)
    check_adds_straight(original, [r[0] - 1 for r in cuts], windows, kind)
    # every cut's run is known up front (apply_bridge places a bridge by them); the maps are filled in as fitted
    out = Bridges([Bridge(r, r[0] - 1, torch.empty(0), 0.0) for r in cuts], skipped, 0, 0.0, kind, fit="cascade",
                  weight=weight)

    def fitted():
        for i, run in enumerate(cuts):
            if run[0] <= min(removed):  # nothing removed before it: the pruned model feeds it as the original does
                first = fit_bridges(original, run, windows, batch_size, kind, weight, measured=True)
                out.options[i], out.tokens = first.options[0], first.tokens  # one forward pass instead of two
            else:
                out.options[i], out.tokens = fit_cut(original, student, removed, run, windows, batch_size, kind, weight)
            out.bridges[i] = out.options[i][0]
            yield out.options[i]

    kept = keep_helpful(student, out, error, start, fitted())
    out.seconds = time.time() - started
    return out, kept


def apply_bridges(model: nn.Module, bridges: Bridges) -> None:
    """Fold each bridge into the output projection of its block in ``model`` pruned by the same
    runs (the block's index there: its original index less the removed blocks before it)."""
    for b in bridges.bridges:
        apply_bridge(model, bridges, b)


def apply_bridge(model: nn.Module, bridges: Bridges, bridge: Bridge) -> Callable[[], None]:
    """Fold one ``bridge`` of ``bridges`` into ``model`` (pruned by all of ``bridges``' runs);
    returns a function that puts the weights it changed back."""
    removed = [i for r in [*(b.run for b in bridges.bridges), *bridges.skipped] for i in r]
    targets = fold_targets(decoder_layers(model)[bridge.block - sum(i < bridge.block for i in removed)])
    targets = targets[:1] if bridges.kind == "down" else targets
    changed = [p for t in targets for p in ([t] if isinstance(t, nn.Parameter) else [t.weight, t.bias]) if p is not None]
    saved = [p.detach().clone() for p in changed]
    for target in targets:
        if bridges.kind == "down":
            refit(target, bridge.T)
        else:
            fold(target, bridge.T)

    def undo() -> None:
        with torch.no_grad():
            for p, value in zip(changed, saved):
                p.copy_(value)
    return undo


def keep_helpful(model: nn.Module, bridges: Bridges, error: Callable[[], float] | None, start: float | None = None,
                 fitted: Iterable[list[Bridge]] | None = None) -> list[bool]:
    """Fold the bridges into ``model`` one cut at a time, keeping each only where it lowers ``error()``
    (a held-out measure: the KL to the teacher, or the causal-LM loss; ``start``: its value with no
    bridge, when already measured; ``error`` None keeps every one, unchecked); returns which were
    kept. Where a cut has several options (``bridge_weight: auto``), each is folded in, measured and
    taken out again, and the lowest is the cut's bridge (``bridges.bridges[i]``, its ``checked`` the
    measures). ``fitted``: each cut's options in order (default ``bridges.options``), drawn one cut
    at a time, so a generator can fit each on the model as the earlier decisions left it (:func:`cascade`).

    Least squares fits the fit tokens' squared error: across a long cut a fit that removes most
    of that error can still raise the held-out KL (docs/BENCHMARKS.md: SmolLM2, blocks 9-18). A
    tie drops the bridge."""
    best = None if error is None else (error() if start is None else start)
    kept = []
    for i, options in enumerate(bridges.options if fitted is None else fitted):
        if len(options) > 1:
            if error is None:
                raise PruneError("heal.bridge_weight auto chooses each cut's fit by a held-out measure, and there "
                                 "is none: set val_samples >= 1 (or one weighting: uniform, skip_first or rms)")
            measured = {}
            for option in options:
                undo = apply_bridge(model, bridges, option)
                measured[option.weight] = error()
                undo()
            chosen = min(options, key=lambda option: measured[option.weight])  # a tie: the first (uniform)
            chosen.checked, now = measured, measured[chosen.weight]
            undo = apply_bridge(model, bridges, chosen)
        else:
            chosen = options[0]
            undo = apply_bridge(model, bridges, chosen)
            now = None if error is None else error()
        bridges.bridges[i] = chosen
        kept.append(now is None or now < best)
        if not kept[-1]:
            undo()
        elif now is not None:
            best = now
    return kept


def refit(proj: nn.Module, T: torch.Tensor) -> None:
    """Replace a dense output projection by ``a -> a T`` (``T`` [d_ff (+1 bias row), d])."""
    with torch.no_grad():
        T = T.to(proj.weight.device)
        W, b = (T[:-1], T[-1]) if proj.bias is not None else (T, None)
        proj.weight.copy_((W.T if isinstance(proj, nn.Linear) else W).to(proj.weight.dtype))  # Conv1D: [in, out]
        if b is not None:
            proj.bias.copy_(b.to(proj.bias.dtype))


def fold(target: nn.Module | nn.Parameter, T: torch.Tensor) -> None:
    """Make ``target``'s output ``o`` come out as ``o T``: an ``nn.Linear`` or stacked experts'
    ``[..., out, in]`` weight ``W <- T^T W``; a ``Conv1D`` ``[in, out]`` weight ``W <- W T``; bias ``b <- b T``."""
    weight = target if isinstance(target, nn.Parameter) else target.weight
    bias = None if isinstance(target, nn.Parameter) else target.bias
    with torch.no_grad():
        T = T.to(weight.device)
        if isinstance(target, (nn.Parameter, nn.Linear)):  # y = x W^T + c -> y T = x (T^T W)^T + c T
            weight.copy_((T.T @ weight.double()).to(weight.dtype))
        else:  # Conv1D: y = x W + c
            weight.copy_((weight.double() @ T).to(weight.dtype))
        if bias is not None:
            bias.copy_((bias.double() @ T).to(bias.dtype))
