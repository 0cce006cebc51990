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

import re
from importlib import resources
from pathlib import Path

import yaml

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
    ("tail", None): "tail baseline: remove the n blocks just before the last one (no metric)",
    ("random", None): "random baseline: n unprotected blocks drawn with a fixed seed (no metric)",
}

#: License identifiers the Hub accepts in ``license:`` (hub-docs repositories-licenses.md);
#: anything else is written as ``license: other`` with ``license_name`` (the Hub refuses
#: unknown identifiers when the card is uploaded).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1
lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl
lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other
""".split())
_LICENSE_ALIASES = {"apache 2.0": "apache-2.0", "apache2": "apache-2.0", "apache-2": "apache-2.0", "apache 2": "apache-2.0",
                    "apache license 2.0": "apache-2.0", "apache license, version 2.0": "apache-2.0",
                    "apache-2.0 license": "apache-2.0", "mit license": "mit", "the mit license": "mit"}

TEMPLATE = "modelcard.md"
_LOCAL_TEXT = (".txt", ".raw", ".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PACKAGED_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas", "imagefolder", "audiofolder"}


def template_path() -> Path:
    return Path(str(resources.files("prune") / "templates" / TEMPLATE))


# ---- front matter ------------------------------------------------------------------------
def is_hub_dataset(path: str | None) -> bool:
    """True when a text source names a Hub dataset (not a local file, not a packaged builder)."""
    if not path:
        return False
    p = Path(path).expanduser()
    if p.exists() or p.suffix in _LOCAL_TEXT or path.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(path)) and path.lower() not in _PACKAGED_BUILDERS


def hub_license(original: dict) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) for the front matter: a Hub
    identifier when the carried-over value is one (common spellings mapped), otherwise
    ``other`` with the value as a slug in ``license_name``; ``{}`` when unknown."""
    value = str(original.get("license") or "").strip()
    if not value:
        return {}
    key = _LICENSE_ALIASES.get(value.lower(), value.lower())
    out = {"license": key} if key in HUB_LICENSES else {
        "license": "other", "license_name": re.sub(r"[^a-z0-9.]+", "-", value.lower()).strip("-.") or "custom"}
    for extra in ("license_name", "license_link"):
        if original.get(extra) and out["license"] == "other":
            out[extra] = str(original[extra])
    return out


def _step_datasets(step: dict) -> list[str]:
    paths = [(step.get("calibration") or {}).get("path")]
    heal = (step.get("recipe") or {}).get("heal") or {}
    paths.append((heal.get("data") or {}).get("path"))
    return [p for p in paths if is_hub_dataset(p)]


def _step_metric(step: dict) -> str | None:
    return (step.get("selection") or {}).get("metric")


def card_data(pruning: dict):
    """The ``ModelCardData`` (front matter) of a pruning record with lineage."""
    from huggingface_hub import ModelCardData

    from prune.export.lineage import chain

    steps = chain(pruning)
    tags = ["pruned", "layer-pruning"]
    for step in steps:
        tag = METRIC_TAGS.get(_step_metric(step) or "")
        if tag and tag not in tags:
            tags.append(tag)
    datasets: list[str] = []
    for step in steps:
        datasets += [d for d in _step_datasets(step) if d not in datasets]
    original = pruning.get("original") or {}
    base_model = pruning.get("base_model")
    extra = {"base_model_relation": RELATION} if base_model else {}
    return ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         datasets=datasets or None, **hub_license(original), **extra)


# ---- body pieces ----------------------------------------------------------------------------
def method_line(step: dict) -> str:
    sel = step.get("selection") or {}
    strategy, metric = sel.get("strategy", "?"), sel.get("metric")
    line = METHODS.get((strategy, metric)) or METHODS.get((strategy, None))
    if line is None:
        line = f"strategy `{strategy}`" + (f", metric `{metric}`" if metric else "") + " (details in pruning.json 'selection')"
    details = sel.get("details") or {}
    if strategy == "contiguous" and "start" in details and "distance" in details:
        line += f"; here l* = {details['start']}, n = {details['n']}, d = {details['distance']:.4f}"
    return line


def short_method(step: dict) -> str:
    sel = step.get("selection") or {}
    metric = sel.get("metric")
    return f"{sel.get('strategy', '?')}" + (f" / {metric}" if metric else "")


def source_name(source: dict | None) -> str:
    """A Hub id as a link, a local source by its file or folder name (no local paths on the Hub)."""
    if not source:
        return "an unknown model"
    if source.get("kind") == "hub":
        return f"[{source['path']}](https://huggingface.co/{source['path']})"
    if source.get("gguf_file"):
        return f"`{source['gguf_file']}` (local GGUF file)"
    return f"`{Path(str(source.get('path', '?'))).name}` (local folder)"


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _change(before, after) -> str:
    if isinstance(before, int) and isinstance(after, int) and before:
        return f" ({100 * (after - before) / before:+.1f}%)"
    return ""


def msrs_line(step: dict) -> str | None:
    a, b = step.get("msrs_before"), step.get("msrs_after")
    if not a:
        return None
    line = f"{a['total']:.2f} over {_pairs(step.get('layers_before'))} pairs ({a['per_pair']:.4f} per pair) before"
    if b:
        line += f" → {b['total']:.2f} over {_pairs(step.get('layers_after'))} pairs ({b['per_pair']:.4f} per pair) after"
    return line + f"; beta = {a['beta']:g}, tau = {a['tau']:g}"


def _pairs(n) -> str:
    return f"{n * (n - 1) // 2:,}" if isinstance(n, int) else "?"


def calibration_line(step: dict) -> str:
    c = step.get("calibration") or {}
    if not c:
        return "not recorded"
    name = c.get("path", "?")
    name = name if is_hub_dataset(name) else Path(str(name)).name
    rows = f" (rows {c['rows']})" if c.get("rows") else ""
    return (f"{c.get('n_samples', '?')} windows × {c.get('seq_len', '?')} tokens of `{name}`{rows}, seed {c.get('seed', '?')}, "
            f"token positions: {c.get('positions', 'all')}")


def eval_settings_line(settings: dict | None) -> str:
    if not settings:
        return ""
    parts = []
    ppl = settings.get("perplexity")
    if ppl:
        rows = f" rows {ppl['rows']}" if ppl.get("rows") else ""
        windows = f"at most {ppl['max_windows']} windows" if ppl.get("max_windows") else "all windows"
        parts.append(f"perplexity on `{Path(str(ppl.get('path'))).name}`{rows}, {windows} × {ppl.get('seq_len')} tokens")
    fid = settings.get("fidelity")
    if fid:
        where = f"`{Path(str(fid['path'])).name}`" if fid.get("path") else "the perplexity text"
        parts.append(f"KL(original ‖ pruned) per token on {where}, top-{fid.get('top_k')} of the original kept")
    if settings.get("tasks"):
        limit = settings.get("limit")
        parts.append(f"lm-eval {', '.join(settings['tasks'])}: {settings.get('num_fewshot', 0)}-shot, "
                     f"{'all examples' if limit is None else f'limit {limit}'}, seed {settings.get('seed')}, "
                     f"batch size {settings.get('batch_size')} (± is the standard error)")
    if settings.get("dtype"):
        parts.append(f"dtype {settings['dtype']}")
    return "Settings: " + "; ".join(parts) + "." if parts else ""


def healing_text(healing: dict | None, recipe: dict | None) -> str | None:
    """Healing as bullets: the recipe's heal settings, then what the healing step recorded."""
    if not healing:
        return None
    lines = []
    heal_cfg = (recipe or {}).get("heal") or {}
    if heal_cfg:
        shown = {k: v for k, v in heal_cfg.items() if k != "data" and v is not None}
        lines.append("Recipe: " + ", ".join(f"{k} = {v}" for k, v in shown.items()))
    for key, value in healing.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {_scalar(v)}" for k, v in value.items() if _is_scalar(v))
            if inner:
                lines.append(f"{key}: {inner}")
        elif _is_scalar(value):
            lines.append(f"{key}: {_scalar(value)}")
        elif isinstance(value, list) and len(value) <= 16 and all(_is_scalar(v) for v in value):
            lines.append(f"{key}: {[_scalar(v) for v in value]}")
    return "\n".join(f"- {line}" for line in lines) + "\n\nWeights of this checkpoint were trained after pruning " \
        "(details in `pruning.json` → `healing`)."


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _scalar(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def versions_line(versions: dict | None) -> str:
    v = versions or {}
    names = [("prune-layers", "prune"), ("transformers", "transformers"), ("torch", "torch")]
    inner = ", ".join(f"{label} {v[key]}" for key, label in names if key in v)
    return f"({inner})" if inner else ""


# ---- the card ----------------------------------------------------------------------------------
def render_card(pruning: dict, *, rows: list[dict] | None = None, recipe_yaml: str | None = None,
                settings: dict | None = None, model_name: str = "Pruned model", load_id: str | None = None) -> str:
    """The model card text for a pruning record with lineage (see module docstring)."""
    from huggingface_hub import ModelCard

    from prune.export.lineage import chain
    from prune.core.tables import comparison_markdown

    steps = chain(pruning)
    original = pruning.get("original") or {}
    n0 = original.get("n_layers") or pruning.get("layers_before")
    p0 = original.get("params") or pruning.get("params_before")
    now_layers, now_params = pruning.get("layers_after"), pruning.get("params_after")
    removed_all = pruning.get("removed_original_all", pruning.get("removed"))
    origin = source_name(original.get("source") or pruning.get("source"))
    summary = (f"A layer-pruned version of {origin}: {len(removed_all)} of its {n0} decoder blocks removed "
               f"({now_layers} kept){f', in {len(steps)} pruning steps' if len(steps) > 1 else ''}, made with `prune`.")
    if (original.get("source") or {}).get("kind") == "gguf":
        summary += " The GGUF weights were dequantized on load; this checkpoint stores them unquantized (safetensors)."
    if pruning.get("healing"):
        summary += " The pruned model was then healed (trained briefly; see Healing)."
    base = pruning.get("base_model")
    relation_note = (f"`base_model_relation: {RELATION}` (the Hub's relation for a full checkpoint derived from one "
                     "parent; the Hub has no `pruned` relation)") if base else None
    lineage_rows = [{
        "step": s.get("step", i + 1), "source": source_name(s.get("source")), "method": short_method(s),
        "layers_before": s.get("layers_before"), "layers_after": s.get("layers_after"),
        "removed": s.get("removed"), "removed_original": s.get("removed_original", s.get("removed")),
    } for i, s in enumerate(steps)]
    earlier_tables = [{"step": s.get("step", i + 1), "source": source_name(s.get("source")),
                       "table": comparison_markdown(s["eval_rows"])}
                      for i, s in enumerate(steps[:-1]) if s.get("eval_rows")]
    earlier_recipes = [{"step": s.get("step", i + 1), "yaml": yaml.safe_dump(s["recipe"], sort_keys=False).strip()}
                       for i, s in enumerate(steps[:-1]) if s.get("recipe")]
    protect = ((pruning.get("recipe") or {}).get("select") or {}).get("protect")
    card = ModelCard.from_template(
        card_data(pruning), template_path=str(template_path()),
        model_name=model_name, summary=summary,
        layers_original=_count(n0), layers_now=_count(now_layers),
        params_original=_count(p0), params_now=_count(now_params), params_change=_change(p0, now_params),
        removed_all=removed_all, kept_all=pruning.get("kept_original", pruning.get("kept")),
        method=method_line(pruning), this_step=f" (step {len(steps)})" if len(steps) > 1 else "",
        protect=protect, calibration=calibration_line(pruning),
        msrs=msrs_line(pruning), relation_note=relation_note,
        steps=lineage_rows, original_name=origin,
        table=comparison_markdown(rows) if rows else None, eval_settings=eval_settings_line(settings),
        earlier_tables=earlier_tables, healing=healing_text(pruning.get("healing"), pruning.get("recipe")),
        load_id=load_id or "path/to/this/folder", recipe=(recipe_yaml or "").strip(),
        earlier_recipes=earlier_recipes, versions=versions_line(pruning.get("versions")),
    )
    return str(card)
