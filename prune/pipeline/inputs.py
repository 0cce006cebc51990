"""Checks on a command's inputs that run before any weights are loaded.

* :func:`recipe_inputs` / :func:`command_inputs`: the local paths a command reads (model,
  recipe, data files, task folders), which an output must never equal, contain or lie in
  (:func:`prune.io.guard.check_output`).
* :func:`check_weights_cover_config`: every block the config names has its tensors in the
  checkpoint (the header-only check of ``prune check``), so missing weights are never
  silently initialised at random.
* :func:`check_context`: window lengths within the model's context.
* :func:`check_selection_possible`: a block count that the strategy can find outside the
  protected blocks (contiguous runs, the tail).
* :func:`preflight_model`: all of the above for one model, for the one-shot commands.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prune.core.errors import PruneError, first_line, spelled
from prune.io.guard import Input, input_paths
from prune.io.source import ModelSource


def source_inputs(src: ModelSource | None) -> list[Input]:
    """The local files of a model source (a folder, or a GGUF file) as inputs."""
    if src is None or src.kind == "hub":
        return []
    if src.kind == "gguf":
        return input_paths(os.path.join(src.path, src.gguf_file), label="the source model")
    return input_paths(src.path, label="the source model")


def recipe_inputs(recipe, src: ModelSource | None = None, recipe_file: str | os.PathLike | None = None) -> list[Input]:
    """Every local path a recipe reads."""
    out = source_inputs(src)
    out += input_paths(recipe_file, label="the recipe file")
    texts = [recipe.calibration]
    if recipe.evaluate is not None:
        texts += [recipe.evaluate.perplexity, recipe.evaluate.fidelity]  # fidelity: its own text, when it has one
        out += input_paths(*recipe.evaluate.task_dirs, recipe.evaluate.data_dir, label="a task data folder")
    if recipe.heal is not None:
        texts.append(recipe.heal.data)
    out += input_paths(*(t.path for t in texts if t is not None), label="a data file")
    return out


def original_inputs(recorded, given: str | None = None) -> list[Input]:
    """The local files of a run's original model, as far as they are known before loading it: the
    ``--source`` given, and a local path an older ``pruning.json`` recorded (``recorded``: its
    :class:`~prune.core.records.SourceRecord`); nothing is hashed or checked here."""
    from prune.export.public import is_local_path
    from prune.io.source import resolve_source

    out = source_inputs(resolve_source(given)) if given is not None else []
    if recorded is not None and recorded.kind != "hub" and is_local_path(recorded.path):  # as lineage resolves it
        file = os.path.join(recorded.path, recorded.gguf_file) if recorded.gguf_file else recorded.path
        out += input_paths(file, label="the original model")
    return out


def run_inputs(run: str | os.PathLike) -> list[Input]:
    """What a saved run folder read, as far as its ``recipe.yaml`` and ``pruning.json`` still name it
    here: its source model, data files and task folders, its original model (a writer given that run,
    such as ``prune report``, must not replace them). Unreadable files name nothing."""
    import json

    from prune.core.records import SourceRecord
    from prune.core.yamlsafe import load_yaml
    from prune.io.source import resolve_source
    from prune.pipeline.recipe import saved_recipe

    run = Path(run).expanduser()
    out: list[Input] = []
    try:
        recipe = saved_recipe(load_yaml((run / "recipe.yaml").read_text()), str(run / "recipe.yaml"))
        out += recipe_inputs(recipe)
        out += source_inputs(resolve_source(recipe.model.source, recipe.model.gguf_file))
    except Exception:  # noqa: BLE001 - no recipe, or one naming what is not here: nothing known to protect
        pass
    try:
        out += original_inputs(SourceRecord.model_validate(json.loads((run / "pruning.json").read_text())["source"]))
    except Exception:  # noqa: BLE001
        pass
    return out


def command_inputs(model: str | None = None, data: list[str | None] | tuple = (), run_dir: str | None = None,
                   run_inside_ok: bool = False) -> list[Input]:
    """The inputs of a one-shot command (``score``, ``eval``, ``report``, ``remove``, ``heal``)."""
    out: list[Input] = []
    if model is not None:
        out += input_paths(model, label="the source model")
    out += input_paths(*data, label="a data file")
    if run_dir is not None:
        out += input_paths(run_dir, label="the run folder", inside_ok=run_inside_ok)
    return out


# ---- weights against the config ---------------------------------------------------------
def check_weights_cover_config(src: ModelSource, config) -> None:
    """Refuse a local safetensors checkpoint whose weights lack blocks its config names
    (``num_hidden_layers: 8`` over weights of 6 blocks): transformers would fill them with
    random values. Reuses ``prune check``'s header reading and block numbering."""
    if src.kind != "folder":
        return
    folder = Path(src.path)
    from prune.export.check import CheckReport, _check_blocks, _check_weight_files, _meta_skeleton

    if not any(folder.glob("*.safetensors")):
        return  # other formats: refused or loaded elsewhere (weights_only pickles)
    report = CheckReport(folder)
    headers = _check_weight_files(folder, report)
    skeleton = _meta_skeleton(config, report, headers) if headers is not None else None
    if skeleton is not None:
        _check_blocks(config, skeleton, headers, report)
    problems = [f for f in report.problems if f.area in ("weights", "blocks")]
    if problems:
        fix = "re-download or re-save the model" + (", or fix config.json" if problems[0].area == "blocks" else "")
        raise PruneError(f"{folder}: {problems[0].message} ({fix})")
    if skeleton is not None:
        check_shapes(folder, config, skeleton, headers)


def check_shapes(folder: Path, config, skeleton, headers: dict) -> None:
    """Each stored tensor the model builds under the same name has the shape the config gives it (a
    vocab_size or hidden_size edited in config.json failed only while loading, or wrote a checkpoint no
    one can load), and an untied output head is stored (else it would be random)."""
    params = dict(skeleton.named_parameters())
    for name, param in params.items():
        stored = headers.get(name)
        if stored is not None and list(stored["shape"]) != list(param.shape):
            raise PruneError(f"{folder}: {name} is {list(stored['shape'])} in the weights but the config builds "
                             f"{list(param.shape)} (fix config.json, e.g. vocab_size or hidden_size, or re-save the model)")
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    if head is None or head.weight is embed.weight:
        return
    # stored under any name (GPT-NeoX's embed_out, which transformers renames on load): one more tensor of the
    # head's shape than the input embeddings account for
    shape = list(head.weight.shape)
    same = sum(list(h["shape"]) == shape for h in headers.values())
    head_name = next(n for n, p in params.items() if p is head.weight)
    if same <= (list(embed.weight.shape) == shape):
        raise PruneError(f"{folder}: the config unties the output head ({head_name}) but the weights do not store it: "
                         "it would be random (set tie_word_embeddings: true in config.json, or re-save the model)")


def check_context(config, lengths: list[tuple[str, int | None]]) -> None:
    """Each ``(flag, seq_len)`` fits the model's context."""
    from prune.model.loading import context_length

    ctx = context_length(config)
    for key, value in lengths:
        if ctx is not None and value is not None and value > ctx:
            raise PruneError(f"{key}={value} is longer than the model's context ({ctx} tokens); lower it")


def check_selection_possible(n_layers: int, count: int, strategy: str, protect: list[int]) -> None:
    """The score-only strategies' structural limits, known before scoring."""
    prot = set(protect)
    if strategy == "contiguous":
        if not any(not prot.intersection(range(start, start + count)) for start in range(n_layers - count + 1)):
            raise PruneError(f"no run of {count} contiguous blocks avoids the protected blocks {sorted(prot)} of "
                             f"{n_layers} (lower select.n_layers or change select.protect)")
    if strategy == "tail":
        free = [i for i in range(n_layers - 1) if i not in prot]
        if len(free) < count:
            raise PruneError(f"tail: only {len(free)} blocks are removable before the last one, {count} asked "
                             "(lower select.n_layers or change select.protect)")


def preflight_model(src: ModelSource, trust_remote_code: bool = False,
                    lengths: list[tuple[str, int | None]] = ()):
    """Everything about a model checkable without its weights: files whole, config readable
    and supported, weights covering every block, window lengths within the context.
    Returns the config."""
    from prune.core.console import announce_remote_code
    from prune.model.loading import check_blocks_stored, check_checkpoint_files, check_supported, load_config

    check_checkpoint_files(src)
    if trust_remote_code:
        announce_remote_code(src.display)
    try:
        config = load_config(src, trust_remote_code)
    except PruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        from prune.io.source import broken_json

        broken = broken_json(src, ("config.json",))
        first = broken or first_line(exc)
        if src.kind == "hub":
            hint = f" (and there is no local folder {src.path} here either)"
        elif src.kind == "folder" and not broken:  # a field of the wrong type, no model_type: the file is at fault
            hint = f" (fix {Path(src.path) / 'config.json'}, or give the model's own)"
        else:
            hint = ""
        raise PruneError(f"could not read the config of {src.display}: {first}{hint}") from None
    check_supported(config)
    check_blocks_stored(src, config)  # a GGUF file's too, before anything is built
    check_weights_cover_config(src, config)
    check_context(config, list(lengths))
    return config


#: field names that are also plain words of the messages (not turned into flags)
PLAIN_WORDS = {"model", "original", "path", "config", "split", "field"}


def validated(cls, flags: dict[str, str] | None = None, **values):
    """``cls(**values)`` (a config section) with a validation error as one line naming the flag
    (``--seq-len``; ``flags``: the flag of a field whose name differs, ``{"rows": "--perplexity-rows"}``):
    the CLI's flags get the same checks as a recipe's keys."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "_".join(p for p in err["loc"] if isinstance(p, str))  # ("fidelity", "top_k"): --fidelity-top-k
        message = err["msg"].removeprefix("Value error, ")
        if not key:  # a check across fields: its message names them as recipe keys, the user typed flags
            import re

            names = sorted(set(cls.model_fields) - PLAIN_WORDS, key=len, reverse=True)
            message = re.sub(r"(?<![.\w-])(" + "|".join(map(re.escape, names)) + r")\b",
                             lambda m: spelled((flags or {}).get(m[1]) or f"--{m[1].replace('_', '-')}", m[1]), message)
            raise PruneError(message) from None
        flag = spelled((flags or {}).get(key) or f"--{key.replace('_', '-')}", key)
        raise PruneError(f"{flag}: {message} (got {err.get('input')!r})") from None


@contextlib.contextmanager
def text_of(section: str):
    """A text's refusal names the recipe section that gave it (``rows='9999:' selects none ...`` did not say
    whether calibration's or evaluate.perplexity's, often the same file), unless it already does."""
    try:
        yield
    except PruneError as exc:
        if str(exc).startswith(section) or f"{section}." in str(exc):
            raise
        raise PruneError(f"{section}: {exc}") from None


def text_windows(tokenizer, section: str, text, seq_len: int, max_windows: int | None):
    """``eval_windows`` of a recipe's evaluation ``text`` (its section's text settings), a refusal naming ``section``."""
    from prune.io.text import eval_windows, load_text

    with text_of(section):
        return eval_windows(tokenizer, load_text(text.source()), seq_len, max_windows, text.bos)
