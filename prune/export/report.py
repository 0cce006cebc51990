"""The redundancy report: where a model's redundancy is, as a self-contained folder.

``write_report(out_dir, before, after=None, selection=None, ...)`` writes

* ``report.md`` and ``report.html`` (the same content; the HTML embeds every image as base64);
* ``cka_original.png``: the L x L unbiased linear CKA between block outputs (what MSRS is
  computed on), 0-based blocks on both axes, pairs with ``S_ij > tau`` outlined;
* ``blocks_original.png``: per block, Block Influence, the angular distance ``d(l, 1)`` of
  block ``l``'s input to the next block's and ``d(l, k)`` to ``k`` blocks on, and each block's
  MSRS contribution, with the blocks the strategy removes (would remove) shaded;
* for a pruned run, ``cka_pruned.png`` and ``blocks_pruned.png`` beside them, and for a
  search, ``pareto.png`` (blocks removed vs proxy utility);
* ``report.json``: the numbers drawn.

``report(source_or_run_dir, ...)`` reads a run folder's ``pruning.json`` (written by
``prune run``) or scores a model on calibration text first.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from dataclasses import dataclass

from prune.choose.registry import names
from prune.core.errors import PruneError
from prune.core.records import is_block_map
from prune.core.metrics import msrs_text
from prune.io.guard import input_paths
from prune.measure.scoring import ScoreResult
from prune.choose.rules import Selection
from prune.choose.verified import margin, margin_line
from prune.core.tables import COMPARISON_HEADER, code_text, comparison_cells, fence, md_line, md_text, no_control

SCORE_ONLY = tuple(names(needs_model=False))
DPI = 110
#: why ``search`` stopped (its ``details.stopped``), in words
STOPPED = {"budget": "budget spent, candidates left untried", "candidates": "every candidate tried",
           "max_remove": "max_remove reached"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ticks(n: int) -> list[int]:
    """Tick positions for ``n`` blocks: every block up to 32, then every 2nd, 5th or 10th, and always the last."""
    step = 1 if n <= 32 else 2 if n <= 64 else 5 if n <= 128 else 10
    return sorted(set(range(0, n, step)) | ({n - 1} if n else set()))


# ---- figures -------------------------------------------------------------------------------
#: above this many blocks, or when most pairs pass tau, the cells above tau are not outlined one by one (a mesh
#: of red boxes hid the colours): the note gives their share instead
OUTLINE_MAX_BLOCKS = 24


def cka_heatmap(S: list[list[float]], tau: float, title: str, marked=(), labels: list[str] | None = None,
                marked_as: str = "removed blocks", axis: str = "block (0-based)"):
    """Heatmap of ``S`` (block x block), cells with ``S_ij > tau`` (i != j) outlined (small stacks where they are a
    minority), ``marked`` ticks in red (``marked_as`` says what they are)."""
    import numpy as np
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    plt = _plt()
    data = np.array(S, dtype=float)
    n = data.shape[0]
    size = min(4.0 + 0.22 * n, 12.0)
    fig, ax = plt.subplots(figsize=(size + 1.3, size), dpi=DPI)
    finite = data[np.isfinite(data)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    im = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=1.0, origin="upper", interpolation="nearest")
    boxes = [Rectangle((j - 0.5, i - 0.5), 1, 1) for i in range(n) for j in range(n) if i != j and data[i, j] > tau]
    share = len(boxes) / (n * (n - 1)) if n > 1 else 0.0
    outlined = bool(boxes) and n <= OUTLINE_MAX_BLOCKS and share <= 0.5
    if outlined:
        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#e8412c", linewidth=0.9))
    ticks = sorted(set(_ticks(n)) | {i for i in marked if 0 <= i < n})  # every removed block keeps its red tick
    names = labels or [str(i) for i in range(n)]
    ax.set_xticks(ticks, [names[i] for i in ticks], fontsize=8, rotation=90 if n > 20 else 0)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=8)
    for getter in (ax.get_xticklabels, ax.get_yticklabels):
        for lab in getter():
            if lab.get_text() in {names[i] for i in marked}:
                lab.set_color("#d62728")
                lab.set_fontweight("bold")
    ax.set_xlabel(f"{axis}: output of block j")
    ax.set_ylabel(f"{axis}: output of block i")
    ax.set_title(title, fontsize=11)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("unbiased linear CKA between block outputs")
    note = (f"outlined: pairs with CKA > tau = {tau:g} ({share:.0%} of pairs)" if outlined else
            f"{share:.0%} of pairs have CKA > tau = {tau:g}")
    if marked:
        note += f"; red ticks: {marked_as}"
    fig.text(0.01, 0.01, note, fontsize=8, color="#444")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


#: the per-block chart's widest figure (inches): wider, the HTML scaled an 80-block chart's labels to ~4 pt
CHART_MAX_WIDTH = 16.0


def block_chart(scores: ScoreResult, k: int, title: str, marked=(), labels: list[str] | None = None,
                marked_as: str = "removed", axis: str = "block (0-based)"):
    """Per-block Block Influence, angular ``d(l, 1)`` and ``d(l, k)``, MSRS contribution; ``marked`` shaded."""
    plt = _plt()
    L = scores.n_layers
    x = list(range(L))
    has_cka, has_angular = scores.cka is not None, scores.angular is not None  # a panel only for what was scored
    rows = 1 + has_angular + has_cka
    fig, axes = plt.subplots(rows, 1, figsize=(min(max(8.0, 0.32 * L + 3), CHART_MAX_WIDTH), 2.4 * rows + 1.0), dpi=DPI,
                             sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    ax_bi = axes[0]
    ax_bi.plot(x, scores.block_influence, "o-", color="#1f77b4", ms=4, label="Block Influence (1 - cos(in, out))")
    ax_bi.set_ylabel("Block Influence")
    if has_angular:
        ax_ang = axes[1]
        ax_ang.plot(x, scores.angular_distance(1), "o-", color="#2ca02c", ms=4, label="d(l, 1): input of l vs of l+1")
        if 1 < k < L:
            dk = scores.angular_distance(k)
            ax_ang.plot(range(len(dk)), dk, "s--", color="#9467bd", ms=3.5, label=f"d(l, {k}): input of l vs of l+{k}")
        ax_ang.set_ylabel("angular distance\n(arccos cos / pi)")
    if has_cka:
        ax_m = axes[-1]
        ax_m.bar(x, scores.msrs_contribution, color="#ff7f0e", label="MSRS contribution (row sum of soft counts)")
        ax_m.set_ylabel(f"MSRS contribution\n(max {L - 1}; sum 2 x MSRS)")
    for ax in axes:
        for i in marked:
            ax.axvspan(i - 0.5, i + 0.5, color="#d62728", alpha=0.15, lw=0)
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if marked and ax is axes[0]:
            from matplotlib.patches import Patch

            handles.append(Patch(color="#d62728", alpha=0.25))
            names.append(f"{marked_as} ({len(marked)} blocks)")
        if not handles:  # a panel with nothing scored (scores without angular distances)
            continue
        low, high = ax.get_ylim()  # headroom for a one-row legend above the data (it covered bars and points)
        ax.set_ylim(low, high + 0.25 * (high - low))
        ax.legend(handles, names, fontsize=8, loc="upper left", ncol=len(handles), framealpha=0.9)
    names = labels or [str(i) for i in x]
    ticks = sorted(set(_ticks(L)) | {i for i in marked if 0 <= i < L})
    axes[-1].set_xticks(ticks, [names[i] for i in ticks], fontsize=8, rotation=90 if L > 20 else 0)  # as the heatmap's
    for lab, i in zip(axes[-1].get_xticklabels(), ticks):
        if i in set(marked):
            lab.set_color("#d62728")
            lab.set_fontweight("bold")
    axes[-1].set_xlabel(axis)
    axes[-1].set_xlim(-0.6, L - 0.4)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def pareto_figure(details: dict, title: str):
    """Search: every evaluated set (blocks removed vs proxy ratio), the floor, the best ratio per size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=DPI)
    trace = details["trace"]
    ok = [e for e in trace if e["ok"]]
    bad = [e for e in trace if not e["ok"]]
    if ok:
        ax.scatter([e["n"] for e in ok], [e["ratio"] for e in ok], color="#2ca02c", label="holds the floor", zorder=3)
    if bad:
        ax.scatter([e["n"] for e in bad], [e["ratio"] for e in bad], color="#d62728", marker="x", label="breaks the floor",
                   zorder=3)
    from prune.choose.strategies import pareto

    front = pareto(trace, details["higher_is_better"])
    if front:
        ax.plot([0] + [p["n"] for p in front], [1.0] + [p["ratio"] for p in front], "-", color="#555", alpha=0.6,
                label="best seen per number removed")
    ax.axhline(details["floor"], color="k", ls="--", lw=1, label=f"floor {details['floor']:g} x original")
    ax.set_xlabel("blocks removed")
    ax.set_ylabel(f"proxy / original\n({details['proxy']})", fontsize=9)
    ax.set_title(title, fontsize=11)
    chosen = max((p for p in front if p["ok"]), key=lambda p: p["n"], default=None)  # the largest set holding the floor
    if chosen is not None:
        ax.scatter([chosen["n"]], [chosen["ratio"]], s=160, facecolors="none", edgecolors="k", label="chosen", zorder=4)
    ratios = [e["ratio"] for e in trace if e["ratio"] > 0] + [1.0, details["floor"]]
    if not details["higher_is_better"] and max(ratios) / min(ratios) >= 10:  # a log axis for a wide range only
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def candidates_figure(details: dict, title: str, shown: int = 40):
    """Verified: the KL of every measured candidate set, best first (the chosen one marked), coloured
    by where it came from (proposed from the scores, or local search); each held-out window's KL as a
    grey tick behind its mean (the spread the ranking has to see through)."""
    plt = _plt()
    rows = details["candidates"][:shown]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=DPI)
    per_window = [(i + 1, v) for i, r in enumerate(rows) for v in r.get("kl_windows", [])]
    if per_window:
        ax.scatter(*zip(*per_window), marker="_", s=60, color="0.6", label="one held-out window", zorder=2)
    searched = [i for i, r in enumerate(rows) if r["source"] == "local search"]
    proposed = [i for i, r in enumerate(rows) if r["source"] != "local search"]
    for idx, color, label in ((proposed, "#1f77b4", "proposed from the scores"), (searched, "#ff7f0e", "local search")):
        if idx:
            ax.scatter([i + 1 for i in idx], [rows[i]["kl_mean"] for i in idx], color=color, label=label, zorder=3)
    ax.scatter([1], [rows[0]["kl_mean"]], s=160, facecolors="none", edgecolors="k", label="chosen", zorder=4)
    ax.set_xlabel(f"candidate set, ranked (the best {len(rows)} of {len(details['candidates'])})")
    ax.set_ylabel("mean KL(original || candidate), nats\non held-out windows", fontsize=9)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def candidate_rows(details: dict, shown: int = 10) -> list[list[str]]:
    """Rank, blocks, source, KL, its difference to the chosen set paired over the windows (95%
    interval; ``-`` for the chosen set, or a record without per-window KL), agreement, perplexity ratio."""
    rows = details["candidates"]

    def versus(i: int, r: dict) -> str:
        if i == 0 or len(r.get("kl_windows", [])) < 2:
            return "-"
        m = margin(rows[0], r)
        return f"{m['difference']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"

    return [[str(i + 1), " ".join(map(str, r["removed"])), r["source"], f"{r['kl_mean']:.4f}", versus(i, r),
             f"{100 * r['top1_agreement']:.1f}%", f"{r['perplexity_ratio']:.3f}"]
            for i, r in enumerate(rows[:shown])]


# ---- text ------------------------------------------------------------------------------------
def msrs_lines(scores: ScoreResult, original: list[int] | None = None) -> list[str]:
    """The MSRS summary; ``original``: each block's index in the original model (a later step's report,
    whose plots are labelled so), used for the blocks named."""
    if scores.msrs is None:
        return ["no CKA matrix in these scores (score with metrics including cka)"]
    m = scores.msrs
    L = scores.n_layers
    top = sorted(range(L), key=lambda i: -m["contributions"][i])[:5]
    name = (lambda i: f"block {original[i]}") if original is not None else (lambda i: f"block {i}")
    where = " (blocks numbered as in the original model)" if original is not None else ""
    return [f"MSRS = {msrs_text(m, L, 3)}; beta = {m['beta']:g}, tau = {m['tau']:g}",
            f"largest contributions{where}: " + ", ".join(f"{name(i)} ({m['contributions'][i]:.2f})" for i in top)]


def selection_lines(sel: Selection, hypothetical: bool = False) -> list[str]:
    """The selection's lines; ``hypothetical``: a model's report, where nothing was removed ("would remove")."""
    d = sel.details or {}
    verb = "would remove" if hypothetical else "removes"
    lines = [f"strategy `{code_text(sel.strategy)}`" + (f", metric `{code_text(sel.metric)}`" if sel.metric else "") +
             f": {verb} {len(sel.removed)} of {sel.n_layers} blocks (0-based) {sel.removed}"]
    if "forward_passes" in d:
        lines.append(f"cost: {d['forward_passes']} forward passes over the calibration windows "
                     f"({d.get('full_forward_equivalents')} full-model equivalents)")
    if sel.strategy == "verified":
        lines.append(f"cost: {d['evaluations']} candidate sets measured by KL(original || candidate) on {d['windows']} "
                     f"held-out windows x {d['seq_len']} tokens ({d['local_search_evaluations']} by local search, budget "
                     f"{d['budget']}): {d['full_forward_equivalents']} full-model passes over those windows, "
                     f"{d['seconds']} s; chosen from: {d['source']}")
    elif "evaluations" in d:
        lines.append(f"cost: {d['evaluations']} proxy evaluations ({d['candidate_evaluations']} candidate sets, budget "
                     f"{d['budget']}, + the original); stopped: {STOPPED.get(d['stopped'], d['stopped'])}")
    return lines


def pareto_rows(details: dict) -> list[list[str]]:
    from prune.choose.strategies import pareto

    return [[str(p["n"]), f"{p['value']:.4g}", f"{p['ratio']:.3f}", "yes" if p["ok"] else "no", " ".join(map(str, p["removed"]))]
            for p in pareto(details["trace"], details["higher_is_better"])]


# ---- the folder ------------------------------------------------------------------------------
class _Doc:
    """Sections rendered both as Markdown and as self-contained HTML."""

    def __init__(self, title: str):
        self.title = title
        self.md = [f"# {md_line(title)}", ""]  # a record's strings (a source's name, a strategy's) may hold anything
        self.html = []

    def heading(self, text: str) -> None:
        self.md += [f"## {md_line(text)}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md += [md_line(text), ""]
        self.html.append(f"<p>{html.escape(text).replace('`', '')}</p>")

    def pre(self, text: str) -> None:
        text = no_control(text)
        self.md += [fence(text), text, fence(text), ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        self.md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
            "| " + " | ".join(md_text(c) for c in r) + " |" for r in rows] + [""]
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><tr>{cells}</tr>{body}</table>")

    def images(self, folder: Path, items: list[tuple[str, str]]) -> None:
        """Images side by side: ``(file name, caption)``."""
        self.md += [" ".join(f"![{cap}]({name})" for name, cap in items), ""]
        figs = []
        for name, cap in items:
            data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
            figs.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(cap)}">'
                        f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        self.html.append(f'<div class="row">{"".join(figs)}</div>')

    def render_html(self) -> str:
        style = ("body{font-family:sans-serif;max-width:1700px;margin:2em auto;padding:0 1em;color:#222}"
                 ".row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}figure{margin:0}"
                 "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
                 "pre{background:#f6f6f6;padding:8px;overflow-x:auto}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>\n" + "\n".join(self.html) +
                "\n</body></html>\n")


def share_y(*figures) -> None:
    """One y range per panel across ``figures`` drawn by the same function, so the original's and the pruned
    model's charts compare by eye (each had its own range: a smaller bar could look as tall)."""
    for panels in zip(*(fig.axes for fig in figures)):
        low = min(ax.get_ylim()[0] for ax in panels)
        high = max(ax.get_ylim()[1] for ax in panels)
        for ax in panels:
            ax.set_ylim(low, high)


def _save(fig, path: Path) -> None:
    fig.savefig(path)
    _plt().close(fig)


def write_report(out_dir: str | Path, before: ScoreResult, *, after: ScoreResult | None = None,
                 selection: Selection | None = None, kept: list[int] | None = None, k: int | None = None,
                 title: str = "Redundancy report", source: str = "", evaluation: list[dict] | None = None,
                 overwrite: bool = False, inputs=(), lineage: Lineage | None = None, healed: str | None = None,
                 hypothetical: bool = False) -> Path:
    """Write the report folder (see module docstring) atomically; returns its path.

    ``selection`` marks the blocks removed (``k`` defaults to how many); ``after`` are the scores
    of the pruned model whose blocks are the original ``kept`` ones; ``evaluation`` are the rows of
    a before/after table (a run's ``eval.json`` ``rows``, :func:`prune.core.tables.comparison_rows`);
    ``lineage``: the step and original index of each scored block when the model was pruned before;
    ``healed``: how the pruned model was healed (its scores are the healed model's); ``hypothetical``: nothing
    was removed (a model's report: the selection marks what the strategy would remove).
    """
    from prune.io.staging import staged

    if not isinstance(before, ScoreResult):
        raise PruneError(f"write_report needs the ScoreResult of prune.score, got {type(before).__name__}")
    n = before.n_layers
    if selection is not None and (selection.n_layers != n or not all(0 <= b < n for b in selection.removed)):
        raise PruneError(f"the selection is of {selection.n_layers} blocks ({selection.removed}) but the scores of {n}: "
                         "give the selection made from these scores")
    if kept is not None and not is_block_map(kept, n):
        raise PruneError(f"kept={list(kept)} must give the index, among these scores' {n} blocks, of each block the "
                         "pruned model kept, increasing (the record's kept)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n):
        raise PruneError(f"k={k!r}: the report marks runs of 1 to {n - 1} blocks of these {n}")
    with staged(out_dir, overwrite, inputs, written=("report.json",), flag="--output") as stage:
        _write(stage, before, after, selection, kept, k, title, source, evaluation, lineage, healed, hypothetical)
    return Path(out_dir).expanduser()


@dataclass
class Lineage:
    """A later pruning step: ``step`` (2, 3, ...) and ``original[i]``, the original model's index of
    block ``i`` of the model this step scored."""

    step: int
    original: list[int]

    @classmethod
    def of(cls, record: dict, n_layers: int) -> "Lineage | None":
        """From a ``pruning.json``: None for a first step (or a record without the original indices)."""
        step = record.get("step") or 1
        pairs = [*zip(record.get("kept") or [], record.get("kept_original") or []),
                 *zip(record.get("removed") or [], record.get("removed_original") or [])]
        where = dict(pairs)
        if not isinstance(step, int) or step < 2 or sorted(where) != list(range(n_layers)):
            return None
        return cls(step, [int(where[i]) for i in range(n_layers)])


def _write(folder: Path, before, after, selection, kept, k, title, source, evaluation, lineage=None, healed=None,
           hypothetical=False) -> None:
    marked = list(selection.removed) if selection else []
    marked_as = "marked" if hypothetical else "removed"  # a model's report removed nothing
    labels = [str(o) for o in lineage.original] if lineage else None
    first = "Original" if lineage is None else f"Before step {lineage.step} (original indices)"
    k = k or (len(marked) if marked else max(1, round(before.n_layers / 4)))
    tau = before.msrs["tau"] if before.msrs else 0.8
    doc = _Doc(title)
    if source:
        doc.para(f"model: `{code_text(source)}`")
    doc.para(f"{before.n_layers} decoder blocks, 0-based; calibration: {before.n_windows} windows x {before.seq_len} tokens, "
             f"positions = {before.positions}, cka_windows = {before.cka_windows}, {before.n_tokens} tokens counted"
             + (f", {len(before.excluded_windows)} windows excluded (non-finite)" if before.excluded_windows else ""))
    if selection:
        doc.heading("Selection")
        for line in selection_lines(selection, hypothetical):
            doc.para(line)
        if healed:
            doc.para(f"healed after the removal ({healed}): the pruned model's scores below are the healed model's")
        if lineage is not None:
            doc.para(f"step {lineage.step} of a model pruned before: these are indices of the model this step scored; "
                     f"in the original model the removed blocks are {[lineage.original[i] for i in marked]}")
    if evaluation:
        doc.heading("Utility before / after")
        if lineage is not None:  # the "original" column is the model this step loaded
            doc.para(f"'original' is the model step {lineage.step} pruned (the step-{lineage.step - 1} model), not "
                     "the first original")
        doc.table(COMPARISON_HEADER, comparison_cells(evaluation))
    doc.heading("MSRS")
    rows = [["original" if lineage is None else f"before step {lineage.step}", *_msrs_cells(before)]]
    if after is not None:
        rows.append(["pruned", *_msrs_cells(after)])
    doc.table(["model", "blocks", "MSRS (raw)", "per pair", "beta", "tau"], rows)
    for line in msrs_lines(before, lineage.original if lineage is not None else None):
        doc.para(line)

    data = {"cka_original": before.cka_matrix if before.cka else None, "removed": marked, "k": k, "tau": tau}
    if lineage is not None:
        data.update(step=lineage.step, removed_original=[lineage.original[i] for i in marked])
    doc.heading("CKA between block outputs")
    images = []
    if before.cka is not None:
        _save(cka_heatmap(before.cka_matrix, tau, f"{first}: CKA between block outputs ({before.n_layers} blocks)", marked,
                          labels, f"blocks {selection.strategy} would remove" if hypothetical and selection else
                          "removed blocks"), folder / "cka_original.png")
        images.append(("cka_original.png", "original model" if lineage is None else f"before step {lineage.step}"))
    # the pruned model's blocks named by their original index (kept_original under a lineage), as the reader compares
    kept_names = ([str(lineage.original[i]) for i in kept] if lineage is not None else [str(i) for i in kept]) if (
        kept and after is not None and len(kept) == after.n_layers) else None
    kept_axis = "block (original index)" if kept_names else "block (0-based)"
    if after is not None and after.cka is not None:
        _save(cka_heatmap(after.cka_matrix, after.msrs["tau"], f"Pruned: CKA between block outputs ({after.n_layers} blocks)",
                          labels=kept_names, axis=kept_axis), folder / "cka_pruned.png")
        images.append(("cka_pruned.png", "pruned model (blocks by original index)" if kept_names else
                       "pruned model (blocks renumbered)"))
        data["cka_pruned"] = after.cka_matrix
    if images:
        doc.images(folder, images)
    else:
        doc.para("no CKA matrix in these scores (score with metrics including cka)")

    doc.heading("Per-block scores")
    what = (f"{'would be removed' if hypothetical else 'removed'} by {selection.strategy}" if selection else
            "none marked")
    chart = block_chart(before, k, f"{first}: per-block redundancy (shaded: {what})", marked, labels, marked_as)
    images = [("blocks_original.png", "original model" if lineage is None else f"before step {lineage.step}")]
    if after is not None:
        pruned_chart = block_chart(after, min(k, after.n_layers - 1) if after.n_layers > 1 else 1,
                                   "Pruned: per-block redundancy" + ("" if kept_names else " (blocks renumbered)"),
                                   labels=kept_names, axis=kept_axis)
        share_y(chart, pruned_chart)
        _save(pruned_chart, folder / "blocks_pruned.png")
        images.append(("blocks_pruned.png", "pruned model"))
    _save(chart, folder / "blocks_original.png")
    doc.images(folder, images)
    if after is not None and kept and lineage is not None:
        doc.para(f"pruned block n is original block kept_original[n]; kept_original = {[lineage.original[i] for i in kept]} "
                 f"(of the model this step scored: kept = {kept})")
    elif after is not None and kept:
        doc.para("pruned block n is original block kept[n]; kept = " + str(kept))
    doc.pre(before.table())
    if after is not None:
        doc.pre(after.table())

    if selection is not None and selection.strategy == "search":
        d = selection.details
        doc.heading("Search: blocks removed vs proxy utility")
        doc.para(f"proxy: {d['proxy']}; floor {'>=' if d['higher_is_better'] else '<='} {d['floor']:g} x the original "
                 f"({d['original']:.4g}); ordered by {selection.metric}")
        doc.table(["blocks removed", "best proxy seen", "ratio to original", "holds the floor", "blocks (0-based)"],
                  pareto_rows(d))
        _save(pareto_figure(d, "Search: the largest removable set under the floor"), folder / "pareto.png")
        doc.images(folder, [("pareto.png", "search: every evaluated set")])
        data["pareto"] = pareto_rows(d)

    if selection is not None and selection.strategy == "verified":
        d = selection.details
        doc.heading("Verified: candidate sets ranked by KL to the original")
        doc.para(f"{len(d['candidates'])} sets measured on {d['windows']} held-out windows x {d['seq_len']} tokens "
                 f"(top {d['top_k']} log-probs of the original per token); the best {min(10, len(d['candidates']))} "
                 "(KL in nats):")
        doc.table(["rank", "blocks removed (0-based)", "from", "mean KL", "- chosen's, paired over windows (95%)",
                   "top-1 agreement", "perplexity ratio"], candidate_rows(d))
        doc.para(margin_line(d))
        _save(candidates_figure(d, f"Verified: {len(selection.removed)} blocks, every candidate measured"),
              folder / "candidates.png")
        doc.images(folder, [("candidates.png", "verified: every measured candidate set")])
        data["candidates"] = d["candidates"]

    (folder / "report.md").write_text("\n".join(doc.md))
    (folder / "report.html").write_text(doc.render_html())
    (folder / "report.json").write_text(json.dumps(data, indent=1) + "\n")


def _msrs_cells(scores: ScoreResult) -> list[str]:
    if scores.msrs is None:
        return [str(scores.n_layers), "-", "-", "-", "-"]
    m = scores.msrs
    cell = lambda key, spec: "-" if m.get(key) is None else format(m[key], spec)  # noqa: E731 - one block: no pair
    return [str(scores.n_layers), cell("total", ".3f"), cell("per_pair", ".4f"), cell("beta", "g"), cell("tau", "g")]


# ---- entry points ----------------------------------------------------------------------------
def is_run_dir(path: str | Path) -> bool:
    from prune.io.staging import existing

    return (existing(path) / "pruning.json").is_file()


def report_run(run_dir: str | Path, out_dir: str | Path | None = None, *, overwrite: bool = False, inputs=()) -> Path:
    """Report of a ``prune run`` output folder, from its ``pruning.json`` (no model is loaded); ``inputs``:
    what else the output must not replace (what the run read: :func:`prune.pipeline.inputs.run_inputs`)."""
    from prune.core.records import read_record

    run = Path(run_dir).expanduser()
    read_record(run / "pruning.json")  # one line for a record that contradicts itself, as prune check says it
    try:
        record = json.loads((run / "pruning.json").read_text())
        if isinstance(record, dict) and "scores_before" in record and record["scores_before"] is None:
            raise PruneError(f"{run}: its blocks were removed as given ({record.get('command') or 'prune remove'}), "
                             f"so pruning.json holds no scores; score it as a model: prune report {run} --data TEXT")
        before = ScoreResult.from_dict(record["scores_before"])
        after = ScoreResult.from_dict(record["scores_after"]) if record.get("scores_after") else None
        selection = Selection.from_dict(record["selection"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # ValueError: bad JSON
        raise PruneError(f"{run / 'pruning.json'} is not a prune run record ({type(exc).__name__}: {exc}); "
                         "give a folder written by prune run, or a model") from None
    src = record.get("source", {})
    name = src.get("gguf_file") or src.get("path") or str(run)
    evaluation = None
    if (run / "eval.json").is_file():  # the before/after rows, as the run's eval.md shows them
        from prune.core.tables import well_formed_rows

        try:
            evaluation = json.loads((run / "eval.json").read_text())["rows"]
            if evaluation is not None and (evaluation := well_formed_rows(evaluation)) is None:
                raise ValueError("its rows are not the before/after table prune writes")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PruneError(f"{run / 'eval.json'} is not a prune evaluation ({type(exc).__name__}: {exc}); "
                             "remove it, or report a folder written by prune run") from None
    try:
        return write_report(out_dir or run / "report", before, after=after, selection=selection, kept=record.get("kept"),
                            title=f"Redundancy report: {Path(str(name)).name} → {run.name}", source=str(name),
                            evaluation=evaluation, overwrite=overwrite,
                            inputs=[*input_paths(run, label="the run folder", inside_ok=True), *inputs],
                            lineage=Lineage.of(record, before.n_layers), healed=healed_by(record))
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # a hand-edited record: nothing is written
        raise PruneError(f"{run / 'pruning.json'} does not hold what prune run writes ({type(exc).__name__}: {exc}); "
                         "report a folder written by prune run, or score the model: prune report MODEL --data TEXT") from None


def healed_by(record: dict) -> str | None:
    """``lora``, ``distill (lora)``, ...: the healing a ``pruning.json`` records, None without one."""
    healing = record.get("healing")
    if not isinstance(healing, dict) or not healing.get("method"):
        return None
    params = (healing.get("settings") or {}).get("params") if isinstance(healing.get("settings"), dict) else None
    return f"{healing['method']} ({params})" if params and params != healing["method"] else str(healing["method"])


def default_output(source: str, as_model: bool = False) -> Path:
    """``RUN_DIR/report`` for a run's report, else ``report-<name>`` (a model, a scores file; ``as_model``: a
    folder scored again)."""
    if is_run_dir(source) and not as_model:
        return Path(source).expanduser() / "report"
    return Path(f"report-{Path(str(source).rstrip('/')).name.removesuffix('.gguf').removesuffix('.json')}")
