"""Write a pruned model as a standard Hugging Face checkpoint, atomically.

``save(model, tokenizer, out_dir, pruning=...)`` writes ``config.json``, safetensors
weights, tokenizer files, ``pruning.json`` and any extra text files into a hidden
sibling folder ``.<name>.incomplete-<pid>`` and renames it to ``out_dir`` only when
everything is written: an interrupted save never leaves a folder that looks complete.
An existing ``out_dir`` is refused unless ``overwrite=True`` (then it is replaced only
after the new folder is complete).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prune.core.records import PruningRecord, parse_record, write_record
from prune.core.faults import fault_point
from prune.model.loading import is_dispatched, plain_config_dict

from prune.io.guard import check_output, input_paths, safe_join  # noqa: F401  (re-exported)
from prune.io.staging import (  # noqa: F401  (re-exported: the atomic-folder code lives in prune.io.staging)
    INCOMPLETE_MARKER,
    INCOMPLETE_TAG,
    _replace,
    check_output_dir,
    recover,
    remove_stale_staging,
    staged,
    staging_dir,
)


def save(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    pruning: dict | None = None,
    files: dict[str, str] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    inputs=(),
) -> Path:
    """Save ``model`` and ``tokenizer`` as a plain checkpoint (safetensors) plus metadata.

    ``pruning`` is written as ``pruning.json``; ``files`` maps relative file names to text
    contents written beside it (``recipe.yaml``, ``eval.md``, ``README.md`` ...). Returns the
    final folder. The GGUF loader's ``quantization_config`` is dropped: weights are saved
    dequantized, so the folder loads with ``AutoModelForCausalLM.from_pretrained`` alone.
    """
    with staged(out_dir, overwrite, inputs) as stage:
        if is_dispatched(model):  # Accelerate's offload hooks untie tied weights after a forward:
            model.tie_weights()  # re-tie, or the tied copy (lm_head) would be saved twice
        fault_point("saving")
        model.save_pretrained(stage, max_shard_size=max_shard_size)
        fault_point("saved_weights")
        (stage / "config.json").write_text(json.dumps(plain_config_dict(model.config), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        write_extras(stage, pruning, files)
    return Path(out_dir).expanduser()


def write_extras(stage: Path, pruning: PruningRecord | dict | None, files: dict[str, str] | None) -> None:
    """``pruning.json`` (a :class:`~prune.core.records.PruningRecord`, or a dict validated as one)
    and the extra text files of a checkpoint folder."""
    if pruning is not None:
        write_record(stage, pruning if isinstance(pruning, PruningRecord) else parse_record(pruning))
    for name, text in (files or {}).items():
        target = safe_join(stage, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


# ---- lineage, model card, push: what `prune run` adds around `save` ---------------------
def preflight_export(recipe, src, n_layers: int) -> dict | None:
    """Checks before any weights are loaded: the source's own ``pruning.json`` (when it was
    itself pruned) agrees with its ``n_layers`` blocks, and ``output.push_to_hub`` can be
    attempted (valid repo id, a token, not offline). Returns the parent record or ``None``."""
    from prune.export.lineage import read_parent

    parent = read_parent(src, n_layers)
    if recipe.output.push_to_hub is not None:
        from prune.export.push import check_can_push

        check_can_push(recipe.output.push_to_hub.repo_id)
    return parent


def prepare_export(pruning: dict, evaluation: dict, recipe, src, parent: dict | None, *,
                   new_step: bool = True, out_dir=None) -> tuple[dict, str]:
    """``(pruning, card)``: the record with the recipe (so each step of a chain keeps its own),
    extended with its lineage when it is a ``new_step`` (``prune heal`` keeps the step it heals),
    and the model card text written as ``README.md``."""
    from prune.export.card import render_card
    from prune.export.lineage import extend

    out_dir = str(out_dir if out_dir is not None else recipe.output.dir)
    record = {**pruning, "recipe": recipe.model_dump(mode="json")} if recipe is not None else dict(pruning)
    if new_step:
        record = extend(record, parent, src)
    push = recipe.output.push_to_hub if recipe is not None else None
    card = render_card(record, rows=evaluation.get("rows"), recipe_yaml=recipe.to_yaml() if recipe else None,
                       settings=evaluation.get("settings") if recipe is not None and recipe.evaluate else None,
                       model_name=Path(out_dir).name, load_id=push.repo_id if push else out_dir)
    return record, card
