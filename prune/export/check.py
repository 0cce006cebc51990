"""Check that a checkpoint folder is complete and self-consistent, without loading the model's weights.

``check_checkpoint(folder)`` reads metadata: ``config.json``, the safetensors index
and each shard's JSON header, the tokenizer, and (for pruned outputs) ``README.md`` and
``pruning.json``; the model is built by plain ``transformers`` on the meta device. The one weight it may
read is a tied copy stored beside its source (an LM head saved with the embeddings), to compare the two as
transformers' load does. It checks

* config: parses with ``AutoConfig``; every per-layer list (a list under a key naming
  "layer", e.g. ``layer_types``) has ``num_hidden_layers`` entries, index lists
  (``mlp_only_layers``) point inside the stack;
* weights: every shard named in ``model.safetensors.index.json`` is present, every shard
  header parses and its size matches the data it declares (a truncated copy fails),
  the index and the headers name the same tensors, decoder-block tensors are numbered
  contiguously ``0 .. L-1`` with ``L = num_hidden_layers``;
* transformers: ``from_pretrained(folder, device_map="meta")`` reports no missing,
  unexpected or mismatched tensors, and tied embeddings are tied as the config says;
* tokenizer: loads with ``AutoTokenizer`` and fits the embedding (``len(tok) <= vocab_size``);
* export (``require_export=True``, what ``prune push`` asks): a model card whose front
  matter parses, and a ``pruning.json`` that agrees with the weights.

The result is a :class:`CheckReport`; ``summary()`` is one screen, ``problems`` the failures.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune.core.errors import PruneError, first_line, parse_problem
from prune.core.records import RECORD_FILE, read_record
from prune.model.arch import block_index, meta_model
from prune.model.loading import BUILD_SLACK, TOKENIZER_FILES, block_count, blocks_named
from prune.io.safetensors import INDEX_NAME as INDEX_FILE, SINGLE_NAME as SINGLE_FILE, file_tensors, read_index



@dataclass
class Finding:
    area: str
    level: str  # "ok", "warn" or "fail"
    message: str


@dataclass
class CheckReport:
    """What :func:`check_checkpoint` found: findings in order, plus facts for the summary."""

    folder: Path
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, area: str, level: str, message: str) -> None:
        self.findings.append(Finding(area, level, message))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "fail"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One screen: a header line, one line per finding, and the verdict."""
        f = self.facts
        head = f"checkpoint {self.folder}"
        if "model_type" in f:
            head += f"  ({f['model_type']}, {f.get('n_layers', '?')} blocks"
            if "n_params" in f:
                head += f", {f['n_params']:,} parameters"
            if f.get("dtypes"):
                head += f", {'/'.join(f['dtypes'])}"
            head += ")"
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        lines = [head] + [f"  {mark[x.level]} {x.area:<11} {x.message}" for x in self.findings]
        n = len(self.problems)
        lines.append("OK: complete and consistent" if n == 0 else f"FAILED: {n} problem{'s' if n > 1 else ''}")
        return "\n".join(lines)

    def raise_for_problems(self, action: str = "", shown: bool = False) -> None:
        """Raise one :class:`PruneError` line naming the first problem (and how many more;
        ``shown``: the summary listing them all was already printed)."""
        if self.ok:
            return
        first = self.problems[0]
        where = "listed above" if shown else f"run `prune check {self.folder}`"
        more = f" (and {len(self.problems) - 1} more: {where})" if len(self.problems) > 1 else ""
        prefix = f"{action}: " if action else ""
        what = "does not match its original" if first.area == "original" else "is not a complete checkpoint"
        raise PruneError(f"{prefix}{self.folder} {what}: {first.area}: {first.message}{more}")


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# ---- the check ------------------------------------------------------------------------
def check_checkpoint(folder: str | os.PathLike, *, require_export: bool = False, tokenizer: bool = True) -> CheckReport:
    """Check the checkpoint in ``folder`` (see module docstring); loads no weight data but a stored tied copy.

    Raises :class:`PruneError` only when ``folder`` is not a folder; every other problem
    is a ``"fail"`` finding in the returned report.
    """
    from prune.io.staging import existing

    path = existing(folder)  # an overwrite a killed writer left half done: finished first, as every command does
    if not path.is_dir():
        raise PruneError(f"{path} is not a folder (give the output folder of `prune run`)")
    report = CheckReport(path)
    from prune.export.saving import INCOMPLETE_MARKER

    if (path / INCOMPLETE_MARKER).exists():
        report.add("folder", "fail", f"holds {INCOMPLETE_MARKER}: an interrupted save, not a finished checkpoint (run again)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        _check_adapter(path, report)
        _check_export_files(path, None, report, require_export)
        return report
    config = _check_config(path, report)
    headers = _check_weight_files(path, report)
    other = sorted(p.name for p in path.iterdir() if OTHER_WEIGHTS.match(p.name))
    if other:  # use_safetensors=False, older tools, vLLM's mistral format: they load these, not the checked weights
        report.add("weights", "fail", f"weights in another format beside the safetensors checkpoint: {', '.join(other[:3])} "
                                      "(a loader that prefers them gets other weights, and a push sends them): remove them")
    if (path / "params.json").is_file():  # Mistral's format: its config, read with the consolidated weights
        report.add("weights", "fail", "params.json (Mistral's format) describes other weights than this checkpoint's "
                                      "(vLLM's mistral format reads it: the depth it names is not this folder's): remove it")
    if config is not None:
        skeleton = _meta_skeleton(config, report, headers)
        if skeleton is not None and headers is not None:
            _check_blocks(config, skeleton, headers, report)
        if headers is not None and not _weights_failed(report):
            _check_transformers_load(path, report)
        if tokenizer:
            _check_tokenizer(path, config, report)
        check_generation_config(path, config, report)
        _check_export_files(path, config, report, require_export)
    return report


def _weights_failed(report: CheckReport) -> bool:
    return any(f.level == "fail" and f.area in ("weights", "blocks", "config") for f in report.findings)


def _check_config(path: Path, report: CheckReport):
    file = path / "config.json"
    if not file.is_file():
        report.add("config", "fail", "config.json is missing")
        return None
    try:
        raw = json.loads(file.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a number of thousands of digits, deep nesting
        from prune.core.errors import parse_problem

        report.add("config", "fail", f"config.json is not valid JSON: {parse_problem(exc)}")
        return None
    if not isinstance(raw, dict):
        report.add("config", "fail", f"config.json holds a JSON {type(raw).__name__}, not an object")
        return None
    n = next((raw[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(raw.get(k), int)), None)
    bad = per_layer_list_problems(raw, n)
    for message in bad:  # checked on the raw file first: transformers' own refusal is less clear
        report.add("config", "fail", message)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        if not bad:
            report.add("config", "fail", f"config.json does not load with transformers: {first_line(exc)}")
        return None
    n = block_count(config, n)
    report.facts.update(model_type=config.model_type, n_layers=n)
    if not bad:
        lists = [k for k, v in raw.items() if "layer" in k and isinstance(v, (list, tuple))]
        report.add("config", "ok", f"num_hidden_layers={n}; per-layer lists: {', '.join(lists) if lists else 'none'}")
    return config


def per_layer_list_problems(config: dict, n: int | None) -> list[str]:
    """Per-layer lists (a list under a key naming "layer") whose length is not the block
    count ``n``; index lists (``mlp_only_layers``) pointing outside ``0..n-1``."""
    from prune.model.loading import INDEX_LIST_KEYS

    if not isinstance(n, int):
        return []
    out = []
    for key, value in config.items():
        if ("layer" not in key and key not in INDEX_LIST_KEYS) or not isinstance(value, (list, tuple)):
            continue  # an index list need not name "layer" (LFM2's full_attn_idxs)
        if key in INDEX_LIST_KEYS:
            outside = [i for i in value if not (isinstance(i, int) and 0 <= i < n)]
            if outside:
                out.append(f"config.{key} lists blocks {outside} outside 0..{n - 1}")
        elif len(value) != n:
            out.append(f"config.{key} has {len(value)} entries but num_hidden_layers is {n}")
    return out


#: weight files of other formats than transformers' safetensors checkpoint (PyTorch, TensorFlow, Flax, Mistral's
#: consolidated files): beside it they are other weights, which some loader reads instead
OTHER_WEIGHTS = re.compile(r"^(pytorch_model.*\.bin|tf_model.*\.h5|flax_model.*\.msgpack|consolidated.*\.(pth|safetensors)"
                           r"|pytorch_model\.bin\.index\.json)$")


def _check_weight_files(path: Path, report: CheckReport) -> dict[str, dict] | None:
    """All tensors' headers (name -> ``{"dtype", "shape", "file"}``), or ``None`` when unreadable."""
    if (path / SINGLE_FILE).is_file() and (path / INDEX_FILE).is_file():
        report.add("weights", "fail", f"both {SINGLE_FILE} and {INDEX_FILE}: transformers loads {SINGLE_FILE} and "
                                      "ignores the index and its shards (one of them is stale: remove it)")
        return None
    try:
        weight_map, shards = read_index(path)
    except PruneError as exc:
        other = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {', '.join(other[:3])}: not a single {SINGLE_FILE} or an indexed set)" if other else ""
        report.add("weights", "fail", f"{exc}{hint}")
        return None
    headers: dict[str, dict] = {}
    total = 0
    for shard in shards:
        try:
            entries, _ = file_tensors(path / shard)
        except PruneError as exc:
            report.add("weights", "fail", f"{shard}: {exc}")
            return None
        total += (path / shard).stat().st_size
        for name, entry in entries.items():
            headers[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "file": shard}
    if weight_map is not None:
        wrong = [n for n, s in weight_map.items() if headers.get(n, {}).get("file") != s]
        unlisted = [n for n in headers if n not in weight_map]
        if wrong or unlisted:
            name = (wrong or unlisted)[0]
            report.add("weights", "fail", f"{INDEX_FILE} and the shard headers disagree ({len(wrong)} listed tensors not in "
                                          f"their shard, {len(unlisted)} unlisted), e.g. {name}")
            return None
    stray = sorted(p.name for p in path.glob("*.safetensors") if p.name not in shards)
    if stray:
        report.add("weights", "warn", f"safetensors files not used by the checkpoint: {', '.join(stray[:3])}")
    report.facts.update(n_params=sum(_numel(e["shape"]) for e in headers.values()),
                        dtypes=sorted({e["dtype"] for e in headers.values()}), weight_bytes=total)
    report.add("weights", "ok", f"{len(shards)} file{'s' if len(shards) > 1 else ''} ({human_size(total)}), "
                                f"{len(headers)} tensors, every shard present and whole")
    return headers



def _meta_skeleton(config, report: CheckReport, headers: dict | None = None):
    """The model built from ``config`` on the meta device (no memory), or ``None``; with ``headers``, not
    for a config naming far more blocks than any tensor name numbers (a failed finding instead)."""
    n = block_count(config)
    if headers is not None and isinstance(n, int):
        stored = blocks_named(headers)
        if n > stored + BUILD_SLACK:
            report.add("blocks", "fail", f"config.num_hidden_layers={n} but the weights hold at most {stored} blocks")
            return None
    try:
        return meta_model(config)
    except Exception as exc:  # noqa: BLE001
        report.add("config", "fail", f"transformers cannot build a causal LM from config.json: {first_line(exc)}")
        return None


def decoder_path(model) -> str | None:
    """Dotted path of the decoder-block list: :func:`prune.model.loading.decoder_layers_path`, or the
    longest ``ModuleList`` for architectures prune does not prune."""
    from torch import nn

    from prune.model.loading import decoder_layers_path

    try:
        return decoder_layers_path(model)
    except PruneError:  # an architecture pruning does not support: the longest list, one of the config's length first
        n = block_count(model.config)
        lists = [(len(m) == n, len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        return max(lists)[2] if lists else None


def _check_blocks(config, skeleton, headers: dict, report: CheckReport) -> None:
    """Decoder-block tensors numbered 0..L-1 with ``L = num_hidden_layers`` (and after them the multi-token-prediction
    layers the config names, which transformers does not load)."""
    from prune.model.loading import mtp_blocks

    n = block_count(config)
    path = decoder_path(skeleton)
    if n is None:
        report.add("blocks", "warn", "the config names no num_hidden_layers; block numbering not checked")
        return
    if path is None:
        report.add("blocks", "warn", "no decoder-block list found; block numbering not checked")
        return
    candidates = [path] + ([path.split(".", 1)[1]] if "." in path else [])
    found: set[int] = set()
    for prefix in candidates:
        found = {b[0] for name in headers if (b := block_index(name, prefix))}
        if found:
            break
    if not found:
        from prune.model.loading import SUPPORTED_MODEL_TYPES

        if config.model_type not in SUPPORTED_MODEL_TYPES:  # e.g. a multimodal model's legacy key names
            report.add("blocks", "warn", f"no tensors named {path}.<i>.*: {config.model_type} (an architecture pruning "
                                         "does not support) names its blocks otherwise; block numbering not checked")
            return
        report.add("blocks", "fail", f"no tensors named {path}.<i>.* in the weights (config has {n} blocks)")
        return
    expected = set(range(n))
    mtp = set(range(n, n + mtp_blocks(config))) & found  # stored after the stack, not loaded by transformers
    if mtp and found - mtp == expected:
        found = expected
    else:
        mtp = set()
    if found != expected:
        gaps = sorted(set(range(max(found) + 1)) - found)
        detail = f"blocks {index_ranges(sorted(found))} ({len(found)})"
        if gaps:
            detail += f", gaps at {index_ranges(gaps)}"
        extra = sorted(found - expected)
        what = (f"transformers would not load block{'s' if len(extra) > 1 else ''} {index_ranges(extra)}"
                if expected < found else "transformers would fill the missing blocks with random values")
        report.add("blocks", "fail", f"config.num_hidden_layers={n} but the weights hold {detail}: {what}")
        return
    built = len(skeleton.get_submodule(path))
    if built != n:
        report.add("blocks", "fail", f"config.num_hidden_layers={n} but transformers builds {built} blocks")
        return
    report.add("blocks", "ok", f"{path}.0 .. {path}.{n - 1}: {n} blocks, numbered contiguously"
                               + (f"; after them {path}.{index_ranges(sorted(mtp))}: multi-token-prediction layers "
                                  "(num_nextn_predict_layers), which transformers does not load" if mtp else ""))


def _not_mtp(model, keys: list[str]) -> list[str]:
    """``keys`` without the tensors of multi-token-prediction layers stored after the stack (transformers ignores
    DeepSeek-V3's ``model.layers.61`` by name, which fits its own size only)."""
    from prune.model.loading import mtp_blocks

    n, path = block_count(model.config), decoder_path(model)
    extra = range(n, n + mtp_blocks(model.config)) if n is not None else range(0)
    if not path or not extra:
        return keys
    return [k for k in keys if not ((found := block_index(k, path)) and found[0] in extra)]


def _check_transformers_load(path: Path, report: CheckReport) -> None:
    """``from_pretrained`` on the meta device: no missing/unexpected/mismatched tensors; ties."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from prune.model.loading import USE_HUB_KERNELS

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as every load (`kernels` also refuses the meta device); sizes that differ are reported below, by
            # name (the refusal of a plain load points at a report its logging level hides)
            model, info = AutoModelForCausalLM.from_pretrained(
                path, device_map="meta", output_loading_info=True, use_kernels=USE_HUB_KERNELS,
                ignore_mismatched_sizes=True)
    except Exception as exc:  # noqa: BLE001
        report.add("load", "fail", f"AutoModelForCausalLM.from_pretrained fails: {first_line(exc)}")
        return
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    report.facts["model_params"] = sum(p.numel() for p in model.parameters())  # tied weights once, as prune counts
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad["unexpected_keys"] = _not_mtp(model, bad["unexpected_keys"])
    if any(bad.values()):
        parts = [f"{len(v)} {k.replace('_keys', '')} (e.g. {_key_name(v[0])})" for k, v in bad.items() if v]
        if bad["mismatched_keys"] and isinstance(bad["mismatched_keys"][0], tuple):
            name, stored, built = bad["mismatched_keys"][0][:3]
            parts[-1] = (f"{len(bad['mismatched_keys'])} mismatched (e.g. {name}: {tuple(stored)} in the weights, "
                         f"{tuple(built)} in the model config.json builds)")
        report.add("load", "fail", "from_pretrained reports " + ", ".join(parts)
                   + ": transformers would initialise or drop these weights")
    else:
        report.add("load", "ok", "AutoModelForCausalLM.from_pretrained(device_map='meta'): no missing, unexpected "
                                 "or mismatched tensors")
    _check_ties(model, report, path)


def _key_name(key) -> str:
    return key[0] if isinstance(key, tuple) else str(key)


def _check_ties(model, report: CheckReport, path: Path) -> None:
    """The embeddings tied as the config says, after a load on the meta device. There transformers leaves a tied
    copy stored beside its source untied (it cannot compare meta tensors): the stored values decide, as a real
    load does (an equal copy is tied; another is loaded as its own weight, against the config)."""
    from prune.io.safetensors import Checkpoint
    from prune.model.skeleton import equal_tied_copies

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    from prune.model.loading import text_config

    want = bool(getattr(text_config(model.config), "tie_word_embeddings", False))
    if out is None or inp is None:
        return
    tied = out.weight is inp.weight
    if want and not tied and equal_tied_copies(model, Checkpoint(path)):
        report.add("tied", "ok", "input and output embeddings tied, as the config says (the checkpoint also stores an "
                                 "equal copy of the tied weight, which a load ties)")
    elif want and not tied:
        report.add("tied", "fail", "config.tie_word_embeddings is true but the output embedding is not tied after loading")
    elif not want and tied:
        report.add("tied", "fail", "config.tie_word_embeddings is false but the output embedding shares the input's")
    else:
        report.add("tied", "ok", "input and output embeddings tied, as the config says" if want
                   else "separate output embedding, as the config says (tie_word_embeddings false)")


def _vocab(config) -> int | None:
    """The embedding's rows the config names (of the text decoder: :func:`prune.model.loading.text_config`)."""
    from prune.model.loading import text_config

    return getattr(text_config(config), "vocab_size", None)


def _check_tokenizer(path: Path, config, report: CheckReport) -> None:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        report.add("tokenizer", "fail", f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        report.add("tokenizer", "fail", f"AutoTokenizer.from_pretrained fails: {first_line(exc)}")
        return
    vocab = _vocab(config)
    size = len(tok)
    if isinstance(vocab, int) and size > vocab:
        report.add("tokenizer", "fail", f"{size} tokens but the embedding has {vocab} rows (ids >= {vocab} would crash)")
    else:
        report.add("tokenizer", "ok", f"{type(tok).__name__}, {size:,} tokens (embedding rows: {vocab:,})"
                   if isinstance(vocab, int) else f"{type(tok).__name__}, {size:,} tokens")


def check_generation_config(path: Path, config, report: CheckReport) -> None:
    """``generation_config.json``, where there is one, loads (a damaged one is dropped by ``from_pretrained`` without
    a word: other stop tokens, other sampling) and names token ids inside the vocabulary."""
    if not (path / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        report.add("generation", "fail", f"generation_config.json does not load ({first_line(exc)}): from_pretrained "
                                         "would use transformers' defaults instead (other stop tokens): fix or remove it")
        return
    vocab = _vocab(config)
    ids = {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
           if (v := getattr(gen, k, None)) is not None}
    flat = [(k, i) for k, v in ids.items() for i in (v if isinstance(v, list) else [v])]
    outside = [(k, i) for k, i in flat if isinstance(vocab, int) and not (isinstance(i, int) and 0 <= i < vocab)]
    if outside:
        report.add("generation", "fail", f"generation_config.json's {outside[0][0]} {outside[0][1]!r} is not a token id "
                                         f"of the {vocab:,}-row embedding")
    else:
        report.add("generation", "ok", "generation_config.json loads" + (f"; {', '.join(f'{k} {v}' for k, v in ids.items())}"
                                                                         if ids else ""))


def _check_adapter(path: Path, report: CheckReport) -> None:
    """A PEFT adapter folder: ``adapter_config.json`` parses with peft, the adapter weights are whole."""
    try:
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001
        report.add("adapter", "fail", f"adapter_config.json does not load with peft: {first_line(exc)}")
        return
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        report.add("adapter", "fail", "adapter_model.safetensors is missing")
        return
    try:
        header, _ = file_tensors(weights)
    except PruneError as exc:
        report.add("adapter", "fail", f"adapter_model.safetensors: {exc}")
        return
    report.facts.update(model_type=f"{config.peft_type} adapter", n_params=sum(e.numel() for e in header.values()),
                        dtypes=sorted({e.dtype for e in header.values()}))
    report.add("adapter", "ok", f"{config.peft_type} adapter, {len(header)} tensors, base {config.base_model_name_or_path}")


def _check_export_files(path: Path, config, report: CheckReport, required: bool) -> None:
    """README.md (model card front matter) and pruning.json (agrees with the weights)."""
    missing = "fail" if required else "warn"
    card = path / "README.md"
    if not card.is_file():
        report.add("card", missing, "README.md (model card) is missing")
    else:
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(card).data.to_dict()
        except Exception as exc:  # noqa: BLE001
            report.add("card", "fail", f"README.md front matter does not parse: {first_line(exc)}")
        else:
            keys = ", ".join(f"{k}: {data[k]}" for k in ("base_model", "license") if data.get(k))
            report.add("card", "ok", f"README.md, front matter parses ({keys or 'no base_model/license'})")
    evaluation: dict = {}  # eval.json, which the card is rendered from with recipe.yaml
    for name, parse in (("eval.json", json.loads), ("recipe.yaml", None)):
        if (path / name).is_file():
            try:
                text = (path / name).read_text(encoding="utf-8")
                if parse is not None:
                    evaluation = parse(text)
                    if not isinstance(evaluation, dict):
                        evaluation = {}
                        raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                report.add("card", "fail", f"{name} does not read as {'JSON' if parse else 'UTF-8 text'} "
                                           f"({parse_problem(exc)}): the card would leave out what it holds; restore or "
                                           "remove it")
    file = path / RECORD_FILE
    if not file.is_file():
        report.add("pruning", missing, "pruning.json is missing (not an output of `prune run`)")
        return
    try:
        record = read_record(file)
    except PruneError as exc:
        report.add("pruning", "fail", str(exc).replace(str(file), "pruning.json"))
        return
    problem = _card_problem(record, evaluation)
    if problem:
        report.add("pruning", "fail", problem)
        return
    if config is None:  # an adapter folder: no blocks of its own
        report.add("pruning", "ok", f"adapter of a pruned model; removed blocks of the original: "
                                    f"{record.removed_original_all or record.removed}")
        return
    n = block_count(config)
    kept = record.kept_original or record.kept
    after = record.layers_after
    if (after is not None and after != n) or (kept and len(kept) != n):
        said = after if after is not None else len(kept)
        report.add("pruning", "fail", f"pruning.json records {said} blocks after pruning but the config has {n}")
        return
    said = _record_disagreement(record, config, report.facts)
    if said:
        report.add("pruning", "fail", f"pruning.json {said}")
        return
    steps = len(record.history) + 1
    removed = record.removed_original_all or record.removed
    report.add("pruning", "ok", f"{steps} pruning step{'s' if steps > 1 else ''}; removed blocks of the original: {removed}")


def _card_problem(record, evaluation: dict) -> str | None:
    """Why the card cannot be rendered from ``pruning.json`` (its free-form sections: scores, selection
    details, healing, in a shape prune never wrote) and ``evaluation`` (eval.json), as ``prune push``
    renders it; None when it can."""
    from prune.export.card import render_card

    try:
        render_card(record, rows=evaluation.get("rows"), settings=evaluation.get("settings"),
                    paired=evaluation.get("paired"))
    except Exception as exc:  # noqa: BLE001 - any failure of a hand-edited record: one line, not a traceback
        return (f"pruning.json does not render as a model card ({type(exc).__name__}: {first_line(exc)}), as prune "
                "push would; restore the file")
    return None


def _record_disagreement(record, config, facts: dict) -> str | None:
    """What ``pruning.json`` says of the folder that the folder contradicts (the card and a push repeat
    it): the model type, the parameter count (tied weights once) and the saved dtype."""
    if record.model_type and record.model_type != config.model_type:
        return f"records model_type {record.model_type!r} but config.json says {config.model_type!r}"
    counted = facts.get("model_params")
    if record.params_after is not None and counted is not None and record.params_after != counted:
        return f"records {record.params_after:,} parameters after pruning but the weights hold {counted:,}"
    from prune.io.safetensors import DTYPES, FLOAT_DTYPES

    floats = {d for d in facts.get("dtypes", ()) if d in FLOAT_DTYPES}
    code = next((name for name in FLOAT_DTYPES if str(DTYPES[name]) == f"torch.{record.dtype}"), None)
    if code and floats and code not in floats:
        return f"records the weights saved as {record.dtype} but they are stored as {'/'.join(sorted(floats))}"
    return _chain_disagreement(record)


def _chain_disagreement(record) -> str | None:
    """Where the steps of a lineage do not join up (the card and a push repeat them): a step number other than its
    place, a step's parameters before other than the previous step's after, the original's other than the first's."""
    steps = record.chain()
    if record.step is not None and record.step != len(steps):
        return f"records step {record.step} but holds {len(steps) - 1} earlier step(s) in its history"
    for i, (earlier, later) in enumerate(zip(steps, steps[1:]), 1):
        if None not in (earlier.params_after, later.params_before) and earlier.params_after != later.params_before:
            return f"records {later.params_before:,} parameters before step {i + 1} but step {i} left {earlier.params_after:,}"
    first, original = steps[0], record.original
    if original is not None and None not in (original.params, first.params_before) and original.params != first.params_before:
        return f"records the original's parameters as {original.params:,} but its first step started from {first.params_before:,}"
    return None


# ---- small helpers ---------------------------------------------------------------------


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def index_ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0..2, 5"``."""
    out, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}..{prev}" if prev != start else str(start))
            start = prev = v
    if start is not None:
        out.append(f"{start}..{prev}" if prev != start else str(start))
    return ", ".join(out)
