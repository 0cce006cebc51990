"""The before/after comparison table: rows, Markdown, retained values."""

from __future__ import annotations

import re

#: the rows that compare the pruned model with the original (not results of one model)
KL_ROW, AGREEMENT_ROW, FIDELITY_PPL_ROW = "KL to original", "top-1 agreement", "fidelity perplexity"


def comparison_rows(original: dict, pruned: dict, facts: dict) -> list[dict]:
    """Rows of the before/after table: name, metric, original, pruned, retained (pruned/original)."""
    rows = []

    def add(name, metric, a, b, stderr_a=None, stderr_b=None, lower_is_better=False, task=None, dataset=None):
        retained = (b / a) if (a not in (None, 0) and b is not None) else None
        rows.append({"name": name, "metric": metric, "original": a, "pruned": b, "retained": retained,
                     "stderr_original": stderr_a, "stderr_pruned": stderr_b, "lower_is_better": lower_is_better,
                     **({"task": task} if task else {}), **({"dataset": dataset} if dataset else {})})

    if "perplexity" in pruned:
        add("perplexity", "ppl", original.get("perplexity", {}).get("perplexity"), pruned["perplexity"]["perplexity"],
            lower_is_better=True)
    if "fidelity" in pruned:  # against the original: KL 0 and agreement 1 by definition
        f = pruned["fidelity"]
        kl = KL_ROW + ("" if f.get("kl_exact", True) else f" (top-{f['top_k']})")
        add(kl, "mean", 0.0, f["kl_mean"], None, f.get("kl_mean_stderr"), lower_is_better=True)
        add(kl, "p99", 0.0, f["kl_p99"], lower_is_better=True)
        add(AGREEMENT_ROW, "fraction", 1.0, f["top1_agreement"])
        if f.get("data") != pruned.get("perplexity", {}).get("data"):  # own text: its perplexity too
            add(FIDELITY_PPL_ROW, "ppl", f["perplexity_original"], f["perplexity_pruned"], lower_is_better=True)
    for task, res in pruned.get("tasks", {}).items():
        before = original.get("tasks", {}).get(task, {})
        name = task + (" (group)" if res.get("group") else "") + (
            " (few-shot from the scored split)" if res.get("fewshot_from_scored_split") else "")
        lower = set(res.get("lower_is_better", ()))  # perplexity-like metrics (absent in older results)
        for metric, value in res["metrics"].items():
            add(name, metric, before.get("metrics", {}).get(metric), value,
                before.get("stderr", {}).get(metric), res["stderr"].get(metric), lower_is_better=metric in lower, task=task,
                dataset=res.get("dataset"))
    add("parameters", "count", facts["params_before"], facts["params_after"], lower_is_better=True)
    add("layers", "count", facts["layers_before"], facts["layers_after"], lower_is_better=True)
    return rows


def well_formed_rows(rows) -> list[dict] | None:
    """``rows`` (an ``eval.json``'s, read back) with every optional key filled, or None when they are not
    a list of rows as :func:`comparison_rows` writes them: ``name`` and ``metric`` strings, numbers or
    None for the values (a hand-edited or damaged file: its table is left out, not a traceback)."""
    def number(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    if not isinstance(rows, list):
        return None
    out = []
    for r in rows:
        if not (isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("metric"), str)
                and all(number(r.get(k)) for k in ("original", "pruned", "retained", "stderr_original", "stderr_pruned"))):
            return None
        a, b = r.get("original"), r.get("pruned")
        out.append({**r, "original": a, "pruned": b, "retained": (b / a) if (a not in (None, 0) and b is not None) else None,
                    "stderr_original": r.get("stderr_original"), "stderr_pruned": r.get("stderr_pruned"),
                    "lower_is_better": bool(r.get("lower_is_better", False))})
    return out


#: control characters but tab and line breaks: a terminal obeys them (colours, its title), a page shows junk
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def md_text(text) -> str:
    """``text`` as one Markdown table cell or inline run: ``|`` escaped, line breaks as spaces, HTML's
    ``<``, ``>`` and ``&`` as entities, backticks as quotes (names from task YAMLs, folders and
    records, which may hold anything); control characters dropped."""
    out = _CONTROL.sub("", str(text)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")
    return " ".join(out.replace("|", "\\|").splitlines())


def no_control(text) -> str:
    """``text`` without control characters (but tab and line breaks): for a code block's lines."""
    return _CONTROL.sub("", str(text))


_CODE_SPAN = re.compile(r"(`[^`]+`)")


def md_line(text) -> str:
    """``text`` as one line of Markdown prose: its code spans (values passed through :func:`code_text`) as they
    are, HTML's ``<``, ``>`` and ``&`` as entities outside them, line breaks as spaces, control characters
    dropped (a record's strings may hold anything: a new heading, raw HTML)."""
    parts = _CODE_SPAN.split(" ".join(_CONTROL.sub("", str(text)).splitlines()))
    return "".join(p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                   for i, p in enumerate(parts))


def fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text`` (CommonMark): a line of three backticks in the
    text closed a fixed fence, and what followed rendered as Markdown and HTML of the page's own."""
    return "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))


def code_text(text) -> str:
    """``text`` for inside a Markdown code span (`` `name` ``): one line, ``|`` escaped (a table cell), backticks
    as quotes. No HTML entities: a code span shows them literally (``R&amp;D``)."""
    return " ".join(_CONTROL.sub("", str(text)).replace("`", "'").replace("|", "\\|").splitlines())


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    if value != value:  # a metric lm-eval could not compute
        return "NaN"
    if metric == "count":
        return f"{value:,}"
    if metric in ("mean", "p99"):  # KL values span orders of magnitude
        return f"{value:.4g}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


COMPARISON_HEADER = ["task", "metric", "original", "pruned", "retained"]


def comparison_cells(rows: list[dict]) -> list[list[str]]:
    """The before/after table's cells, one list per row (:data:`COMPARISON_HEADER`): retained % =
    pruned / original; lower-is-better measures as a factor, e.g. ``x2.80``."""
    cells = []
    for r in rows:
        a = _fmt(r["original"], r["metric"])
        b = _fmt(r["pruned"], r["metric"])
        if r["stderr_original"] is not None and a != "NaN":
            a += f" ± {r['stderr_original']:.4f}"
        if r["stderr_pruned"] is not None and b != "NaN":
            b += f" ± {r['stderr_pruned']:.2g}" if r["metric"] == "mean" else f" ± {r['stderr_pruned']:.4f}"
        cells.append([r["name"], r["metric"], a, b, fmt_retained(r)])
    return cells


def comparison_markdown(rows: list[dict]) -> str:
    """The before/after table (:func:`comparison_cells`) as Markdown."""
    lines = ["| " + " | ".join(COMPARISON_HEADER) + " |", "|---|---|---:|---:|---:|"]
    return "\n".join(lines + ["| " + " | ".join(map(md_text, cells)) + " |" for cells in comparison_cells(rows)])


def fmt_retained(row: dict) -> str:
    """A row's retained value: ``x2.80`` for perplexity and every other lower-is-better measure (a
    factor), ``97.5%`` otherwise (counts too), ``-`` if unknown."""
    if row["retained"] is None or row["retained"] != row["retained"]:
        return "-"
    if row.get("lower_is_better") and row["metric"] != "count":  # perplexity's rows are marked so too
        return f"x{row['retained']:.2f}"
    return f"{100 * row['retained']:.1f}%"


#: the name of the model a healing started from, in tables and paired sections (eval.json: pruned_before_healing)
UNHEALED = "pruned before healing"


def healed_markdown(original: dict, before: dict, healed: dict, facts: dict, before_label: str = "pruned") -> str:
    """Table: original | the model this healing started from (``before_label``: the pruned one, or an earlier
    healing's) | healed | retained (healed / original)."""
    rows_b = {(r["name"], r["metric"]): r for r in comparison_rows(original, before, facts)}
    lines = [f"| task | metric | original | {before_label} | healed | retained (healed) |", "|---|---|---:|---:|---:|---:|"]
    for r in comparison_rows(original, healed, facts):
        b = rows_b.get((r["name"], r["metric"]), {}).get("pruned") if r["metric"] != "count" else None
        lines.append(f"| {md_text(r['name'])} | {md_text(r['metric'])} | {_fmt(r['original'], r['metric'])} | "
                     f"{_fmt(b, r['metric'])} | {_fmt(r['pruned'], r['metric'])} | {fmt_retained(r)} |")
    return "\n".join(lines)


def _prose(line: str) -> str:
    """A line made of a record's strings as Markdown prose: no code spans (a record's backticks became quotes: an
    escaped or unmatched backtick made md_line leave raw HTML in what CommonMark reads as text), HTML escaped."""
    return md_line(line.replace("`", "'"))


def healing_lines(record: dict) -> list[str]:
    """What a healing record did, as Markdown bullets (eval.md's Healing section and the card's): what was
    trained, on which text, for how long; the held-out loss, the KL to the teacher, the bridges. A record's
    strings may hold anything: each line passes through :func:`_prose`. KeyError: a record without one of
    the fields read (written before it was recorded, or edited)."""
    s = record["settings"]
    if record["method"] == "bridge":  # nothing trained: the bridge line below is the whole story
        lines = [f"- data: {record['data']['path']} (rows {record['data'].get('rows') or 'all'}), "
                 f"{record['data']['train_windows']} windows of {record['data']['seq_len']} tokens"]
        return [_prose(line) for line in lines + _bridge_lines(record)]
    lines = [f"- trained: {', '.join(record['trained'])} ({record['trainable_parameters']:,} parameters)",
             f"- data: {record['data']['path']} (rows {record['data'].get('rows') or 'all'}), "
             f"{record['tokens_seen']:,} tokens seen in {record['steps']} steps ({record['epochs']} epochs), seed {record['seed']}",
             f"- learning rate {s['learning_rate']} ({s['schedule']}), batch {s['batch_size']} x {s['gradient_accumulation']} "
             f"x {s['seq_len']} tokens, mixed precision {record['mixed_precision']}, on {record['device']}, "
             f"{record['seconds']:.0f} s"]
    if record.get("averaged_steps"):
        lines.append(f"- weights averaged over the last {record['averaged_steps']} of {record['steps']} steps")
    if record.get("val_loss_after") is not None:
        lines.append(f"- held-out loss on the training text: {record['val_loss_before']:.4f} → {record['val_loss_after']:.4f}")
    if "replacement" in record:
        r = record["replacement"]
        start = (f"the mean of blocks {r['replaces']}" if r.get("init") == "mean_removed" else
                 f"block {r['init_block']}")  # mean_removed keeps block init_block's place, not its weights
        lines.append(f"- blocks {r['replaces']} replaced by one block at position {r['position']} "
                     f"(initialised as {start}, loss {r['loss']})")
    if "distill" in record:
        d = record["distill"]
        lines.append(f"- objective: distillation from {d['teacher']}, T = {d['temperature']}, weights KL {d['kl_weight']} / "
                     f"hidden {'relative error' if d.get('hidden_loss') == 'relative' else 'MSE'} {d['hidden_weight']} / "
                     f"next-token {d['lm_weight']}"
                     + (f", top-{d['top_k']} cache ({d['teacher_cache_bytes'] / 2**20:.1f} MiB)" if d.get("top_k") else ""))
        if d.get("kl_after") is not None:
            over = f" (its top {d['top_k']} tokens and one bucket for the rest)" if d.get("top_k") else ""
            lines.append(f"- KL to the teacher{over} on {d['kl_tokens']:,} held-out tokens: {d['kl_before']:.4f} → "
                         f"{d['kl_after']:.4f}; top-1 agreement {d['top1_before']:.1%} → {d['top1_after']:.1%}")
    lines += _bridge_lines(record)
    if record.get("partial", {}).get("note"):
        lines.append(f"- note: {record['partial']['note']}")
    return [_prose(line) for line in lines]


def _weight_note(cut: dict) -> str:
    """A cut's token weights on the card: nothing for uniform; with ``bridge_weight: auto`` the held-out
    measure of each weighting tried."""
    weight = cut.get("weight", "uniform")  # records before heal.bridge_weight: uniform
    if "checked" in cut:
        tried = ", ".join(f"{w} {v:.4f}" for w, v in cut["checked"].items())
        return f"; {weight} token weights, the lowest held-out of {tried}"
    return "" if weight == "uniform" else f"; {weight} token weights"


def _bridge_lines(record: dict) -> list[str]:
    """The card's line for a record's bridges (none without one)."""
    if "bridge" not in record:
        return []
    b = record["bridge"]
    cuts = ", ".join(f"blocks {c['run'][0]}-{c['run'][-1]} into block {c['block']} (fit error {c['fit_error']:.3f}"
                     + _weight_note(c) + ("" if c.get("kept", True) else "; dropped: it did not lower the held-out "
                                          + ("KL" if b.get("checked_by") == "kl" else "loss")) + ")"
                     for c in b["cuts"]) or "none"
    after = (f"; KL to the teacher {b['kl_before']:.4f} → {b['kl_after']:.4f}" if b.get("kl_after") is not None
             else "")
    when = "no training" if record["method"] == "bridge" else "before training"
    order = "cut by cut on the pruned model" if b.get("fit") == "cascade" else "on the original's states"
    held_out = (f"; held-out loss {b['val_loss_before']:.4f} → {b['val_loss_after']:.4f}"
                if b.get("val_loss_before") is not None and b.get("val_loss_after") is not None else "")  # val_samples: 0
    return [f"- {b['method']} bridge, {when} (least squares on {b['tokens']:,} tokens, {order}, {b['seconds']:.0f} s): "
            f"{cuts}{held_out}{after}"]
