"""The model card (``README.md``) of a pruned checkpoint, from the template shipped in
``prune/templates/modelcard.md``, rendered by ``huggingface_hub.ModelCard.from_template``.

Front matter (``ModelCardData``): ``base_model`` (the nearest Hub id up the lineage; absent
for purely local sources), ``base_model_relation: finetune`` (see :data:`RELATION`),
``library_name: transformers``, ``pipeline_tag: text-generation``, ``tags`` (pruned,
layer-pruning, one tag per metric used), ``license`` carried over from the original
model when known, ``datasets`` (calibration / healing text that came from the Hub).

Body: removed and kept blocks in original indices, the method and its formula, blocks
and parameters before and after, calibration, MSRS before and after, the lineage table
(when pruned more than once), the before/after evaluation table, healing, how to load,
and the recipe(s).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import yaml

from prune.core.records import OriginalModel, PruningRecord, PruningStep, SourceRecord
from prune.core.metrics import msrs_text
from prune.export.lineage import as_record
from prune.io.source import HUB_ID
from prune.io.text import TEXT_SUFFIXES

#: The Hub accepts ``adapter``, ``merge``, ``quantized`` and ``finetune``. A layer-pruned
#: model is a complete set of weights derived from ONE parent (so not a merge), stored as
#: full tensors (not an adapter), at the parent's precision (not quantized): the Hub's
#: ``finetune`` class is the one for such derived full checkpoints, and it is also what
#: the Hub infers when no relation is given. Declaring it keeps the model tree right.
RELATION = "finetune"

#: selection metric -> Hub tag
METRIC_TAGS = {"bi": "block-influence", "angular": "angular-distance", "cka": "cka", "msrs": "msrs"}

#: (strategy, metric) -> one line: the method and its formula. Other strategies get a
#: generic line naming strategy and metric (extend this table when adding one).
METHODS: dict[tuple[str, str | None], str] = {
    ("contiguous", "angular"): "contiguous block (Gromov et al.): remove the run l*..l*+n-1 minimising the angular "
                               "distance d(l, n) = arccos(cos(h_l, h_{l+n})) / π between its input and output, mean over tokens",
    ("one_shot", "bi"): "Block Influence (ShortGPT): remove the n blocks with the lowest BI_i = 1 - E_tokens[cos(x_in_i, x_out_i)]",
    ("one_shot", "angular"): "angular distance: remove the n blocks with the lowest d(l, 1) = arccos(cos(h_l, h_{l+1})) / π, "
                             "mean over tokens",
    ("one_shot", "cka"): "CKA: remove the n blocks whose output is most like their input by unbiased linear CKA(h_l, h_{l+1})",
    ("one_shot", "msrs"): "MSRS contribution (RedTest): remove the n blocks with the largest "
                          "c_l = Σ_{j≠l} sigmoid(2β(S_lj - τ)), S the CKA matrix of block outputs",
    ("verified", "kl"): "verified: candidate sets from the scores (every contiguous run, one-shot BI / angular / CKA / "
                        "MSRS, RedTest's redundancy families) ranked by KL(original || pruned) of the next-token "
                        "distributions on held-out calibration windows, then a local search swapping one block",
    ("tail", None): "tail baseline: remove the n blocks just before the last one (no metric)",
    ("random", None): "random baseline: n unprotected blocks drawn with a fixed seed (no metric)",
}

#: Common spellings of license names (GGUF metadata, free-text cards) -> Hub identifiers. Any
#: other value is written as it is when it looks like an identifier (the Hub's own card
#: validation at ``prune push`` then accepts or refuses it), else as ``other`` + ``license_name``.
_LICENSE_ALIASES = {"apache 2.0": "apache-2.0", "apache2": "apache-2.0", "apache-2": "apache-2.0", "apache 2": "apache-2.0",
                    "apache license 2.0": "apache-2.0", "apache license, version 2.0": "apache-2.0",
                    "apache-2.0 license": "apache-2.0", "mit license": "mit", "the mit license": "mit"}
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
#: Hub license identifiers a spelled-out name slugs to ("CC BY-NC 4.0" -> cc-by-nc-4.0)
_HUB_LICENSES = {f"cc-{kind}-{v}" for kind in ("by", "by-sa", "by-nc", "by-nd", "by-nc-nd", "by-nc-sa")
                 for v in ("2.0", "2.5", "3.0", "4.0")} | {
    "cc0-1.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "bsd-2-clause", "bsd-3-clause", "mpl-2.0",
    "epl-2.0", "eupl-1.2", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "openrail"}

TEMPLATE = "modelcard.md"
_LOCAL_TEXT = (*TEXT_SUFFIXES, ".csv", ".parquet", ".md", ".gz")  # what load_text reads, and other files by name
_PACKAGED_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas", "imagefolder", "audiofolder"}


def template_path() -> Path:
    return Path(str(resources.files("prune") / "templates" / TEMPLATE))


# ---- front matter ------------------------------------------------------------------------
def is_hub_dataset(path: str | None) -> bool:
    """True when a text source names a Hub dataset (not a local file, not a packaged builder): a guess
    from the name, for records that predate ``CalibrationRecord.hub`` (what the run that read the
    text recorded, which wins where present) and for texts no run recorded."""
    if not path:
        return False
    p = Path(path).expanduser()
    if p.exists() or p.suffix in _LOCAL_TEXT or path.startswith((".", "/", "~", "$", "<")):
        return False
    if "/" not in path and "." in path:  # a bare file name (corpus.text) read from the working folder, not a Hub id
        return False
    return bool(HUB_ID.match(path)) and path.lower() not in _PACKAGED_BUILDERS


def hub_license(original: OriginalModel | None) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) for the front matter: the
    carried-over value as an identifier (common spellings mapped), otherwise ``other`` with
    the value as a slug in ``license_name``; ``{}`` when unknown. Whether the Hub knows the
    identifier is checked by its own card validation at ``prune push``."""
    value = str((original.license if original else None) or "").strip()
    if not value:
        return {}
    key = _LICENSE_ALIASES.get(value.lower(), value.lower())
    slug = re.sub(r"[^a-z0-9.]+", "-", value.lower()).strip("-.") or "custom"
    out = ({"license": key} if _LICENSE_ID.match(key) else {"license": slug} if slug in _HUB_LICENSES
           else {"license": "other", "license_name": slug})
    if out["license"] == "other":
        for extra in ("license_name", "license_link"):
            if getattr(original, extra, None):
                out[extra] = str(getattr(original, extra))
    return out


def _step_datasets(step: PruningStep) -> list[str]:
    c = step.calibration
    found = [c.path] if c and c.path and (c.hub if c.hub is not None else is_hub_dataset(c.path)) else []
    heal = (step.recipe or {}).get("heal") or {}
    return found + [p for p in [(heal.get("data") or {}).get("path")] if is_hub_dataset(p)]


def relation(record: PruningStep) -> str:
    """``base_model_relation`` of an output: ``adapter`` for a LoRA adapter folder, else
    :data:`RELATION` (pruned, healed or not: full weights derived from one parent)."""
    return "adapter" if getattr(record, "adapter", None) else RELATION


def card_data(pruning: PruningRecord | dict, eval_results=None, model_name: str | None = None):
    """The ``ModelCardData`` (front matter) of a pruning record with lineage; ``eval_results``
    (:func:`prune.export.modelindex.eval_results`) become the ``model-index``."""
    from huggingface_hub import ModelCardData

    record = as_record(pruning)
    steps = record.chain()
    tags = ["pruned", "layer-pruning"]
    for step in steps:
        tag = METRIC_TAGS.get(step.metric or "")
        if tag and tag not in tags:
            tags.append(tag)
    if any(step.healing for step in steps) and "healed" not in tags:  # a healed model pruned again: still trained
        tags.append("healed")
    if getattr(record, "adapter", None):
        tags += ["lora", "peft"]
    datasets: list[str] = []
    for step in steps:
        datasets += [d for d in _step_datasets(step) if d not in datasets]
    extra = {"base_model_relation": relation(record)} if record.base_model else {}
    results = {"eval_results": eval_results, "model_name": model_name} if eval_results else {}
    return ModelCardData(base_model=record.base_model, library_name="peft" if getattr(record, "adapter", None)
                         else "transformers", pipeline_tag="text-generation", tags=tags, datasets=datasets or None,
                         **hub_license(record.original), **extra, **results)


# ---- body pieces ----------------------------------------------------------------------------
def method_line(step: PruningStep) -> str:
    sel = step.selection or {}
    strategy, metric = sel.get("strategy", step.command or "?"), sel.get("metric")
    line = METHODS.get((strategy, metric)) or METHODS.get((strategy, None))
    if line is None and not sel and step.command == "remove":
        return "blocks chosen by hand (`prune remove`)"
    if line is None:
        from prune.core.tables import code_text  # a record's strings may hold anything: one line, no code span ends

        line = (f"strategy `{code_text(strategy)}`" + (f", metric `{code_text(metric)}`" if metric else "")
                + " (details in pruning.json 'selection')")
    details = sel.get("details") or {}
    if strategy == "contiguous" and "start" in details and "distance" in details:
        line += f"; here l* = {details['start']}, n = {details['n']}, d = {details['distance']:.4f}"
    margin = details.get("runner_up") if strategy == "verified" else None
    if margin:  # how clearly the chosen set won (prune.choose.verified.margin)
        line += (f"; the runner-up ({' '.join(map(str, margin['removed']))}) had a mean KL higher by "
                 f"{margin['difference']:+.4f}, 95% interval [{margin['ci_low']:+.4f}, {margin['ci_high']:+.4f}] over "
                 f"{margin['windows']} held-out windows")
    return line


def short_method(step: PruningStep) -> str:
    if not step.selection:
        by = "by hand (prune remove)" if step.command == "remove" else "?"
        return by + (f", then healed ({step.healing.get('method', '?')})" if step.healing else "")
    from prune.core.tables import md_text  # a table cell: a record's strings may hold anything

    healed = f", then healed ({step.healing.get('method', '?')})" if step.healing else ""
    return md_text(f"{step.strategy or '?'}" + (f" / {step.metric}" if step.metric else "") + healed)


def source_name(source: SourceRecord | None, repo_id: str | None = None) -> str:
    """A Hub id as a link, a local source by its file or folder name (no local paths on the Hub);
    ``repo_id``: where that local folder was pushed (then linked)."""
    from prune.core.tables import code_text
    from prune.export.public import hub_id

    if hub_id(repo_id):
        return f"[{repo_id}](https://huggingface.co/{repo_id})"
    if source is None:
        return "an unknown model"
    if source.kind == "hub" and hub_id(source.path):
        return f"[{source.path}](https://huggingface.co/{source.path})"
    if source.gguf_file:
        return f"`{code_text(Path(source.gguf_file).name)}` (local GGUF file)"
    return f"`{code_text(Path(source.path).name)}` ({'Hub model' if source.kind == 'hub' else 'local folder'})"


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _change(before, after) -> str:
    if isinstance(before, int) and isinstance(after, int) and before:
        return f" ({100 * (after - before) / before:+.1f}%)"
    return ""


def msrs_line(step: PruningStep) -> str | None:
    a, b = step.msrs_before, step.msrs_after
    if not a:
        return None
    line = f"{msrs_text(a, step.layers_before)} before"
    if b:
        line += f" → {msrs_text(b, step.layers_after)} after"
    return line + f"; beta = {a['beta']:g}, tau = {a['tau']:g}"


def calibration_line(step: PruningStep) -> str:
    c = step.calibration
    if c is None:
        return "none (blocks chosen by hand)" if step.command == "remove" else "not recorded"
    name = c.path or "?"
    from prune.core.tables import code_text, md_text

    name = code_text(name if (c.hub if c.hub is not None else is_hub_dataset(name)) else Path(str(name)).name)
    rows = f" (rows {md_text(c.rows)})" if c.rows else ""
    return (f"{c.n_samples or '?'} windows × {c.seq_len or '?'} tokens of `{name}`{rows}, seed {c.seed}, "
            f"token positions: {c.positions or 'all'}")


def shots_text(settings: dict) -> str:
    """``0-shot``, or each task's few-shot number where they differ: what lm-eval gave (``n_shot``), else
    what was asked (``num_fewshot``; None: each task's own)."""
    given = {t: n for t, n in (settings.get("n_shot") or {}).items() if n is not None}
    if len(set(given.values())) > 1:
        return ", ".join(f"{t} {n}-shot" for t, n in given.items())
    if given:
        return f"{next(iter(given.values()))}-shot"
    shots = settings.get("num_fewshot")
    return f"{shots}-shot" if shots is not None else "each task's own number of few-shot examples"


def eval_settings_line(settings: dict | None) -> str:
    from prune.core.tables import code_text, md_text

    if not settings:
        return ""
    parts = []
    ppl = settings.get("perplexity")
    if ppl:
        rows = f" rows {md_text(ppl['rows'])}" if ppl.get("rows") else ""
        windows = f"at most {md_text(ppl['max_windows'])} windows" if ppl.get("max_windows") else "all windows"
        parts.append(f"perplexity on `{code_text(Path(str(ppl.get('path'))).name)}`{rows}, {windows} × "
                     f"{md_text(ppl.get('seq_len'))} tokens")
    fid = settings.get("fidelity")
    if fid:
        where = f"`{code_text(Path(str(fid['path'])).name)}`" if fid.get("path") else "the perplexity text"
        parts.append(f"KL(original ‖ pruned) per token on {where}, top-{md_text(fid.get('top_k'))} of the original kept")
    if settings.get("tasks"):
        limit = settings.get("limit")
        parts.append(f"lm-eval {md_text(', '.join(map(str, settings['tasks'])))}: {md_text(shots_text(settings))}, "
                     f"{'all examples' if limit is None else f'limit {md_text(limit)}'}, seed "
                     f"{md_text(settings.get('seed'))}, batch size {md_text(settings.get('batch_size'))} (± is the "
                     "standard error)")
    if settings.get("dtype"):
        parts.append(f"dtype {md_text(settings['dtype'])}")
    return "Settings: " + "; ".join(parts) + "." if parts else ""


def chosen_heal_settings(settings: dict, ignored=()) -> dict:
    """The heal settings that differ from :class:`prune.core.config.HealConfig`'s defaults (and the
    method): the ones that say what was done; a method's unused defaults (a learning rate where
    nothing is trained) and the ``ignored`` keys (set, and never read by the method: the healing record's
    ``ignored``) are left out."""
    from prune.core.config import HealConfig

    fields = HealConfig.model_fields
    ignored = set(ignored) if isinstance(ignored, list) else set()
    return {k: v for k, v in settings.items() if k != "data" and v is not None and k not in ignored
            and (k == "method" or k not in fields or fields[k].default != v)}


def healing_text(healing: dict | None, step: int | None = None) -> str | None:
    """Healing in words: what was trained, on what, for how long and what it changed (eval.md's bullets,
    :func:`prune.core.tables.healing_lines`), the heal settings other than the defaults, then every field the
    healing step recorded, folded (``<details>``); a record that lacks the summary's fields (an older one) is
    listed field by field. ``step``: the earlier step it healed, when this checkpoint was pruned again after it."""
    from prune.core.tables import healing_lines, md_text

    if not healing:
        return None
    try:
        summary = healing_lines(healing)
    except (KeyError, TypeError, ValueError, AttributeError):  # a record from disk: older, or edited by hand
        summary = []
    pair = lambda k, v: f"{md_text(k)} = {md_text(v)}"  # noqa: E731  a record's keys and values may hold anything
    settings = ["Settings other than the defaults: "
                + ", ".join(pair(k, v) for k, v in chosen_heal_settings(healing.get("settings") or {}, healing.get("ignored")).items())]
    if isinstance(healing.get("ignored"), list) and healing["ignored"]:
        settings.append("Set, and not read by this method and objective (no effect): "
                        + ", ".join(md_text(_scalar(v)) for v in healing["ignored"]))
    fields = []
    for key, value in healing.items():
        if key in ("settings", "ignored"):
            continue
        if isinstance(value, dict):  # short lists of plain values too (a text's fields, the blocks a block replaces)
            inner = ", ".join(pair(k, _scalar(v) if _is_scalar(v) else [_scalar(x) for x in v]) for k, v in value.items()
                              if _is_scalar(v) or (isinstance(v, list) and len(v) <= 16 and all(_is_scalar(x) for x in v)))
            if inner:
                fields.append(f"{md_text(key)}: {inner}")
        elif _is_scalar(value):
            fields.append(f"{md_text(key)}: {md_text(_scalar(value))}")
        elif isinstance(value, list) and len(value) <= 16 and all(_is_scalar(v) for v in value):
            fields.append(f"{md_text(key)}: {md_text([_scalar(v) for v in value])}")
    bullets = lambda lines: "\n".join(f"- {line}" for line in lines)  # noqa: E731
    if summary:
        body = ("\n".join(summary) + "\n" + bullets(settings) + "\n\n<details><summary>Every field of the healing "
                "record</summary>\n\n" + bullets(fields) + "\n\n</details>")
    else:
        body = bullets(settings + fields)
    how = (("not changed by the healing: no bridge was kept (none lowered the held-out measure, or no cut could "
             "take one)" if bridges_kept(healing) == 0 else "refitted by least squares after pruning, with no training")
           if healing["method"] == "bridge" else "trained after pruning")
    if step is not None:
        return (f"The step-{step} model was healed before a later step removed more blocks:\n\n" + body + "\n\n"
                + ("No bridge was kept: the healing left the weights as pruning left them" if
                   healing["method"] == "bridge" and bridges_kept(healing) == 0 else
                   f"The kept blocks carry the weights the healing {'refitted' if healing['method'] == 'bridge' else 'trained'}")
                + f" (details in `pruning.json` → `history`, step {step} → `healing`).")
    return body + f"\n\nWeights of this checkpoint were {how} (details in `pruning.json` → `healing`)."


def bridges_kept(healing: dict) -> int | None:
    """How many cuts of a healing record kept their bridge (None: the record does not say)."""
    cuts = (healing.get("bridge") or {}).get("cuts") if isinstance(healing.get("bridge"), dict) else None
    if not isinstance(cuts, list):
        return None
    return sum(1 for c in cuts if isinstance(c, dict) and c.get("kept"))


def bridge_words(healing: dict) -> str:
    """What the bridges of ``method: bridge`` did, in words for the card."""
    kept, cuts = bridges_kept(healing), (healing.get("bridge") or {}).get("cuts")
    if kept is None:
        return "a least-squares bridge folded into the block before each cut, nothing trained"
    if kept == 0:
        return ("no bridge kept: none lowered the held-out measure, or no cut could take one; nothing trained, the "
                "weights are the pruned model's")
    return (f"a least-squares bridge folded into the block before {'each cut' if kept == len(cuts) else f'{kept} of the {len(cuts)} cuts'}"
            ", nothing trained")


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _scalar(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def versions_line(versions: dict | None) -> str:
    from prune.core.tables import md_text

    v = versions or {}
    names = [("prune-layers", "prune"), ("transformers", "transformers"), ("torch", "torch")]
    inner = ", ".join(f"{label} {md_text(v[key])}" for key, label in names if key in v)
    return f"({inner})" if inner else ""


# ---- the card ----------------------------------------------------------------------------------
def paired_text(paired, model: str = "pruned") -> str | None:
    """The card's paired comparison (``eval.json``'s ``paired``: per-example differences, ``model`` - original, the
    model ``pruned`` or ``healed``): each task's headline metric with its 95% interval, and their average; None
    without (or with damaged) rows."""
    from prune.core.tables import md_text
    from prune.measure.paired import DISAGREES, DISAGREES_NOTE, Paired, average_line, headline_rows

    if not isinstance(paired, list) or not paired:
        return None
    try:
        rows = [Paired(**r) for r in paired]
        head = headline_rows(rows)
        lines = [f"- {md_text(r.task)} ({md_text(r.metric)}): {100 * r.diff:+.2f} points, 95% interval "
                 f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]{' ' + DISAGREES if r.disagrees else ''} over {r.n} "
                 "examples" for r in head]
        if len({r.group or r.task for r in head}) > 1:
            lines.append(md_text(average_line(rows, "original", model)))
        if any(r.disagrees for r in head):
            lines += ["", DISAGREES_NOTE]
    except Exception:  # noqa: BLE001 - a hand-edited eval.json (any shape): no paired lines, not a failed card
        return None
    return "\n".join(lines) or None


def render_card(pruning: PruningRecord | dict, *, rows: list[dict] | None = None, recipe_yaml: str | None = None,
                settings: dict | None = None, model_name: str = "Pruned model", load_id: str | None = None,
                revision: str | None = None, paired: list[dict] | None = None) -> str:
    """The model card text for a pruning record with lineage (see module docstring). ``rows``,
    ``settings`` and ``paired`` are the evaluation (``eval.json``); ``load_id`` the name readers load it by
    (the repo id once pushed)."""
    from huggingface_hub import ModelCard

    from prune.core.tables import code_text, comparison_markdown, fence, md_text, well_formed_rows
    from prune.export.modelindex import eval_results
    from prune.export.public import public_data

    record = PruningRecord.model_validate(public_data(as_record(pruning).model_dump()))  # no local path on the card
    rows = well_formed_rows(rows)  # a damaged eval.json: no table, not a traceback
    steps = record.chain()
    original = record.original
    n0 = (original.n_layers if original else None) or record.layers_before
    # a later step's params_before is its parent's, not the original's: unknown rather than another model's count
    p0 = (original.params if original else None) or (record.params_before if len(steps) == 1 else None)
    now_layers, now_params = record.layers_after, record.params_after
    removed_all = record.removed_original_all or record.removed
    origin = source_name((original.source if original else None) or record.source)
    replacement = record.kept_replacement()  # still held: a later step may have removed it
    paired_model = record.label()  # eval.json's paired rows: this folder's model
    kept_words = (f"{now_layers} blocks now, one a trained block in place of the removed run" if replacement
                  else f"{now_layers} kept")
    summary = (f"A layer-pruned version of {origin}: {len(removed_all)} of its {n0} decoder blocks removed "
               f"({kept_words}){f', in {len(steps)} pruning steps' if len(steps) > 1 else ''}, made with `prune`.")
    if original and original.source and original.source.kind == "gguf":
        summary += " The GGUF weights were dequantized on load; this checkpoint stores them unquantized (safetensors)."
    healed = [i for i, s in enumerate(steps) if s.healing]  # a healed model pruned again keeps trained weights
    if healed:
        at = steps[healed[-1]]
        repo = at.healing.get("from_repo")
        healed_from = f" ({source_name(None, repo)})" if repo else ""
        how = bridge_words(at.healing) if at.healing["method"] == "bridge" else "trained briefly"
        summary += (f" The pruned model{healed_from} was then healed ({how}; see Healing)." if at is record else
                    f" The step-{healed[-1] + 1} model was healed ({how}) before this step's pruning; its weights "
                    "are those (see Healing).")
    adapter = getattr(record, "adapter", None)
    if adapter:
        summary += (" This folder holds only the LoRA adapter of the healing: load it on top of the pruned base "
                    f"model {source_name(None, record.base_model) if record.base_model else '(the pruned checkpoint)'}.")
    rel = relation(record)
    relation_note = (f"`base_model_relation: {rel}`" + (" (the Hub's relation for a full checkpoint derived from one "
                     "parent; the Hub has no `pruned` relation)" if rel == RELATION else "")) if record.base_model else None
    lineage_rows = [{
        "step": s.step or i + 1, "source": source_name(s.source, steps[i - 1].repo_id if i else None),
        "method": short_method(s), "layers_before": s.layers_before, "layers_after": s.layers_after,
        "removed": s.removed, "removed_original": s.removed_original or s.removed,
    } for i, s in enumerate(steps)]
    earlier_tables = [{"step": s.step or i + 1, "source": source_name(s.source), "table": comparison_markdown(table)}
                      for i, s in enumerate(steps[:-1]) if (table := well_formed_rows(s.eval_rows))]
    earlier_recipes = [{"step": s.step or i + 1, "yaml": text, "fence": fence(text)}
                       for i, s in enumerate(steps[:-1]) if s.recipe
                       for text in [yaml.safe_dump(s.recipe, sort_keys=False).strip()]]
    protect = ((record.recipe or {}).get("select") or {}).get("protect")
    results = eval_results(rows, settings, len(steps))
    card = ModelCard.from_template(
        card_data(record, results, model_name), template_path=str(template_path()),
        model_name=md_text(model_name), summary=summary,
        layers_original=_count(n0), layers_now=_count(now_layers),
        params_original=_count(p0), params_now=_count(now_params), params_change=_change(p0, now_params),
        removed_all=removed_all, kept_all=record.kept_original or record.kept,
        replacement=(f"block {replacement[0]} here is one trained block in place of the removed run "
                     f"{' '.join(map(str, replacement[1]))}") if replacement else None,
        method=method_line(record), this_step=f" (step {len(steps)})" if len(steps) > 1 else "",
        protect=protect, calibration=calibration_line(record),
        msrs=msrs_line(record), relation_note=relation_note, dtype=code_text(record.dtype) if record.dtype else None,
        steps=lineage_rows, original_name=origin,
        # counts alone are no evaluation (every run has them): the card then says none was run
        table=comparison_markdown(rows) if any(r.get("metric") != "count" for r in rows or ()) else None,
        eval_settings=eval_settings_line(settings), paired=paired_text(paired, paired_model),
        paired_model=paired_model,
        earlier_tables=earlier_tables,
        healing=healing_text(steps[healed[-1]].healing, None if steps[healed[-1]] is record else healed[-1] + 1)
        if healed else None, recipe_evaluates=bool((record.recipe or {}).get("evaluate")),
        load_id=py_string(load_id or "path/to/this/folder"), revision=py_string(revision) if revision else None,
        adapter=adapter, base_id=py_string((adapter or {}).get("base") or record.base_model or "path/to/pruned/base"),
        recipe=(recipe_yaml or "").strip(), fence=fence(recipe_yaml or ""), earlier_recipes=earlier_recipes, versions=versions_line(record.versions),
        command=record.command or "save",
    )
    return stamp_card(str(card))


def py_string(text) -> str:
    """``text`` as a Python string literal on one line, for the card's code: quotes, backslashes and line breaks
    escaped (a folder named ``a")\n```...`` broke the string and closed the code block)."""
    return json.dumps(str(text), ensure_ascii=False)


_STAMP = re.compile(r"\n\n<!-- prune: generated card, sha256 ([0-9a-f]{16}) -->")


def _card_digest(body: str) -> str:
    import hashlib

    return hashlib.sha256(body.encode()).hexdigest()[:16]


def stamp_card(text: str) -> str:
    """``text`` ending in a comment (hidden on the Hub) with the digest of what precedes it: a later push
    tells a card as prune wrote it, which it may render anew, from one edited by hand (:func:`card_edited`)."""
    body = text.rstrip("\n")
    return f"{body}\n\n<!-- prune: generated card, sha256 {_card_digest(body)} -->\n"


def card_edited(text: str) -> bool:
    """Whether ``text`` differs from a card as ``prune`` wrote it: no stamp (written by hand, or by prune before
    0.2), text before the last stamp that is not what it digested, or anything but blank space after it."""
    found = list(_STAMP.finditer(text))
    if not found:
        return True
    last = found[-1]
    return _card_digest(text[:last.start()]) != last.group(1) or bool(text[last.end():].strip())
