"""What ``prune heal`` writes around the healed model: its lineage record and card, and the
PEFT adapter folder of ``heal.merge: false``.

A healed folder keeps the pruning step of the run it healed (``removed`` / ``kept`` local to
that step's input, mapped to the original model again since ``replace`` changes ``kept``),
with ``healing`` set; its Hub parent is the run's repo when the run was pushed, else the run's
own parent (``healing.from_repo``). An adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors``
(loadable with ``PeftModel.from_pretrained`` on the pruned run's model), its own card
(``library_name: peft``, ``base_model_relation: adapter``) and ``pruning.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prune.core.records import PruningRecord
from prune.export.lineage import as_record


def heal_export(pruning: dict | PruningRecord, run: Path, out: Path, files: dict[str, str], recipe, model,
                adapter: bool | str | Path = False) -> tuple[PruningRecord, str]:
    """``(record, card)`` of a healed folder (or adapter folder, ``adapter``: true, or the folder peft saved the
    adapter in, whose tensors' dtype the record then gives) written from ``run``."""
    from prune.export.card import render_card
    from prune.export.public import public_data, public_yaml
    from prune.export.saving import saved_dtype
    from prune.model.loading import dtype_name

    record = as_record(pruning).model_copy(deep=True)
    if recipe is not None:  # the recipe.yaml written beside it, with its heal section (it kept the run's)
        record.recipe = public_data(recipe.model_dump(mode="json"))
    before = record.history[-1].kept_original if record.history else list(range(record.layers_before or 0))
    if record.kept and before:
        record.kept_original = [before[i] for i in record.kept]
    pushed_run = record.repo_id
    if pushed_run:  # the run's repo, once pushed, is the parent
        record.base_model = pushed_run
        record.healing = {**(record.healing or {}), "from_repo": pushed_run}
    record.repo_id = None  # this new folder is not pushed yet
    record.command = record.command or "run"  # the command that pruned this step; `healing` says it was healed
    if adapter:  # its base is the PRUNED run's model: never the original (the adapter fits the kept blocks only)
        if not pushed_run:
            record.base_model = None  # no Hub id holds the pruned base yet
        record.adapter = {"format": "peft", "base": pushed_run or f"path/to/{run.name}"}
        record.dtype = None if isinstance(adapter, bool) else adapter_dtype(adapter)  # not the run's base model's
    else:
        record.dtype = dtype_name(saved_dtype(model, recipe.output.dtype if recipe else None))
    evaluation = json.loads(files["eval.json"]) if "eval.json" in files else {}
    recipe_yaml = public_yaml(files["recipe.yaml"]) if "recipe.yaml" in files else None
    card = render_card(record, rows=evaluation.get("rows"), settings=public_data(evaluation.get("settings")),
                       recipe_yaml=recipe_yaml, model_name=out.name, load_id=f"path/to/{out.name}",
                       paired=evaluation.get("paired"))
    return record, card


def adapter_dtype(folder: str | Path) -> str | None:
    """The dtype(s) of the tensors peft saved in ``folder`` (``float32``; several joined by ``, ``), from the
    safetensors headers; None without any."""
    from safetensors import safe_open

    from prune.io.safetensors import DTYPES
    from prune.model.loading import dtype_name

    found = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                code = handle.get_slice(key).get_dtype()
                found.add(dtype_name(DTYPES[code]) if code in DTYPES else code.lower())
    return ", ".join(sorted(found)) or None


def save_adapter(adapter_dir: str | Path, out: str | Path, *, pruning: PruningRecord, files: dict[str, str],
                 overwrite: bool = False) -> Path:
    """Write the PEFT adapter saved in ``adapter_dir`` as the folder ``out`` (atomically), its
    ``adapter_config.json`` naming the pruned base by Hub id or ``path/to/<run>``, no local path."""
    from prune.export.saving import staged, write_extras

    with staged(out, overwrite) as stage:
        for item in Path(adapter_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, stage / item.name)
        config_file = stage / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = pruning.adapter["base"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_extras(stage, pruning, files)
    return Path(out).expanduser()
