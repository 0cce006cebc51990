"""Model card and lineage of `prune run` outputs, on a tiny real model pruned twice."""

from __future__ import annotations

import json
from pathlib import Path
import os
import re
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open

import prune
from prune.export.card import RELATION, card_data, is_hub_dataset, render_card
from prune.core.errors import PruneError
from prune.export.lineage import chain, extend, normalize_step, source_license
from prune.io.source import ModelSource
from prune.core.records import read_record
from prune.core.tables import comparison_markdown
from prune.export.public import public_path
from prune.pipeline.orchestrator import run
from prune.pipeline.recipe import load_recipe

from conftest import ROOT, scores_from
from export_fixtures import recipe, save_source


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Source (8 blocks, 2 and 3 planted redundant) -> step 1: contiguous, 2 blocks -> step 2:
    tail, 2 more blocks, run on the step-1 folder."""
    root = tmp_path_factory.mktemp("lineage")
    source = save_source(root / "source")
    (source / "LICENSE").write_text("MIT License\n\nthe tiny source's terms\n")
    first = run(recipe(source, root / "step1", 2, "contiguous"), quiet=True)
    second = run(recipe(first.out_dir, root / "step2", 2, "tail"), quiet=True)
    return source, first, second


def load_card(folder):
    return ModelCard.load(folder / "README.md")


def read_json(path):
    return json.loads(path.read_text())


# ---- the card of one pruning ---------------------------------------------------------------
def test_card_front_matter_parsed_back(two_steps):
    _, first, _ = two_steps
    data = load_card(first.out_dir).data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["pruned", "layer-pruning", "angular-distance"]
    assert data["license"] == "mit"  # carried over from the source folder's card
    # local source and local calibration text: no Hub lineage to declare
    for key in ("base_model", "base_model_relation", "datasets"):
        assert key not in data


def test_card_body_renders_table_recipe_and_facts(two_steps):
    _, first, _ = two_steps
    out = first.out_dir
    text = load_card(out).text
    pruning = read_json(out / "pruning.json")
    evaluation = read_json(out / "eval.json")
    assert pruning["removed"] == [2, 3]  # the planted redundant blocks
    assert "- **Removed blocks** (0-based, indices of the original model): `[2, 3]`" in text
    assert "- **Kept blocks** (original indices, in order): `[0, 1, 4, 5, 6, 7]`" in text
    assert "arccos(cos(h_l, h_{l+n})) / π" in text and "here l* = 2, n = 2" in text
    assert "| decoder blocks | 8 | 6 |" in text
    p0, p1 = pruning["params_before"], pruning["params_after"]
    assert f"| parameters | {p0:,} | {p1:,} ({100 * (p1 - p0) / p0:+.1f}%) |" in text
    # the before/after table is the pipeline's own, verbatim
    assert comparison_markdown(evaluation["rows"]) in text
    assert "| perplexity | ppl |" in text
    m0, m1 = pruning["msrs_before"], pruning["msrs_after"]
    assert f"{m0['total']:.2f} over 28 pairs" in text and f"{m1['total']:.2f} over 15 pairs" in text
    # the recipe is embedded verbatim and is the one saved beside it
    recipe_yaml = (out / "recipe.yaml").read_text().strip()
    assert f"```yaml\n{recipe_yaml}\n```" in text
    assert yaml.safe_load(recipe_yaml)["select"]["strategy"] == "contiguous"
    assert f'AutoModelForCausalLM.from_pretrained("path/to/{out.name}")' in text  # no local path until pushed
    assert "## Lineage" not in text and "## Healing" not in text


def test_card_rendering_matches_pruning_json(two_steps):
    """The card is a pure function of what the folder records: rendering it again from
    pruning.json, eval.json and recipe.yaml gives the same text."""
    _, first, _ = two_steps
    out = first.out_dir
    evaluation = read_json(out / "eval.json")
    again = render_card(read_record(out / "pruning.json"), rows=evaluation["rows"], recipe_yaml=(out / "recipe.yaml").read_text(),
                        settings=evaluation["settings"], model_name=out.name, load_id=f"path/to/{out.name}")
    assert again == (out / "README.md").read_text()
    # the parameter and layer counts alone are no evaluation: the card said "measured side by side in one run"
    counts = [r for r in evaluation["rows"] if r["metric"] == "count"]
    bare = render_card(read_record(out / "pruning.json"), rows=counts, recipe_yaml=(out / "recipe.yaml").read_text())
    assert counts and "No evaluation of this checkpoint was run (its recipe's `evaluate` section was not run on it" in bare
    assert "measured side by side" not in bare and "the recipe has no `evaluate` section" not in bare


def test_save_of_a_model_loaded_from_a_pruned_folder_extends_its_lineage(two_steps, tmp_path):
    """``prune.save(pruning={"removed": [1]})`` of a model loaded from a pruned folder, without ``source=``, recorded
    a first step from an unknown 6-block original; the model knows the folder it was loaded from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, first, _ = two_steps
    parent = read_record(first.out_dir / "pruning.json")
    model = AutoModelForCausalLM.from_pretrained(first.out_dir)
    prune.remove_layers(model, [1])
    out = prune.save(model, AutoTokenizer.from_pretrained(first.out_dir), tmp_path / "again", pruning={"removed": [1]})
    record = read_record(out / "pruning.json")
    assert record.step == 2 and record.removed_original == [parent.kept_original[1]]
    assert record.original.n_layers == parent.original.n_layers and record.created


@pytest.mark.parametrize("files, message", [
    ({"config.json": "{}"}, "files names config.json, which the checkpoint writes itself"),  # a folder nothing loads
    ({"model.safetensors": "x"}, "files names model.safetensors, which the checkpoint writes itself"),
    ({"tokenizer.json": "{}"}, "files names tokenizer.json, which the checkpoint writes itself"),
    ({"pruning.json": "{}"}, "files names pruning.json, which the checkpoint writes itself (its config, weights, "
                             "tokenizer or record: pass the record as pruning=)"),
    ({"notes.txt": b"x"}, "files['notes.txt'] is a bytes: extra files are text (a str)"),  # a TypeError, deep inside
])
def test_extra_files_never_replace_the_checkpoints_own(files, message, two_steps, tmp_path):
    """``prune.save(files={"config.json": "{}"})`` wrote a folder that looked complete and that nothing loads; so did
    ``prune_checkpoint``. Refused before anything is written; a card, a recipe and notes are extra files as before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, first, _ = two_steps
    model, tok = AutoModelForCausalLM.from_pretrained(first.out_dir), AutoTokenizer.from_pretrained(first.out_dir)
    for write in (lambda: prune.save(model, tok, tmp_path / "a", files=files),
                  lambda: prune.prune_checkpoint(first.out_dir, [1], tmp_path / "b", files=files)):
        with pytest.raises(PruneError, match=f"^{re.escape(message)}"):
            write()
    assert not list(tmp_path.iterdir())
    out = prune.save(model, tok, tmp_path / "c", files={"README.md": "# card", "notes/recipe.yaml": "a: 1"})
    assert (out / "README.md").read_text() == "# card" and (out / "notes" / "recipe.yaml").is_file()


def test_save_never_writes_over_or_into_the_folder_the_model_came_from(two_steps, tmp_path):
    """prune.save replaced the model it was loaded from (overwrite=True), or wrote inside it, even with source=
    naming it; from Python the message names the parameter, not the CLI's flag."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, first, _ = two_steps
    folder = Path(shutil.copytree(first.out_dir, tmp_path / "loaded"))
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prune.remove_layers(model, [1])
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for out, message in ((folder, "is the folder the model was loaded from"), (folder / "sub", "is inside the folder")):
        with pytest.raises(PruneError, match=message):
            prune.save(model, tok, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    prune.save(model, tok, tmp_path / "out")
    with pytest.raises(PruneError, match=r"already exists \(choose another .* or pass overwrite=True\)"):
        prune.save(model, tok, tmp_path / "out")
    # a GGUF source protects its file, as a run does: its folder may hold the output (the first version refused it)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "m.Q4_1.gguf").write_bytes(b"GGUF")
    model.name_or_path = str(gguf)
    prune.save(model, tok, gguf / "pruned", source=ModelSource(kind="gguf", path=str(gguf), gguf_file="m.Q4_1.gguf"))
    assert (gguf / "pruned" / "config.json").is_file() and (gguf / "m.Q4_1.gguf").read_bytes() == b"GGUF"


# ---- lineage -------------------------------------------------------------------------------
def test_second_pruning_appends_history_with_original_indices(two_steps):
    _, first, second = two_steps
    p1 = read_json(first.out_dir / "pruning.json")
    p2 = read_json(second.out_dir / "pruning.json")
    assert p1["step"] == 1 and p1["history"] == [] and p1["kept_original"] == [0, 1, 4, 5, 6, 7]
    assert p2["step"] == 2 and len(p2["history"]) == 1
    earlier = p2["history"][0]
    assert earlier["removed"] == p1["removed"] and earlier["kept_original"] == p1["kept_original"]
    assert earlier["recipe"]["output"]["dir"] == public_path(first.out_dir)
    assert earlier["eval_rows"] == read_json(first.out_dir / "eval.json")["rows"]
    # tail on 6 blocks removes positions 3, 4 (just before the last), i.e. original blocks 5, 6
    assert p2["removed"] == [3, 4] and p2["layers_before"] == 6 and p2["layers_after"] == 4
    assert p2["removed_original"] == [p1["kept_original"][i] for i in p2["removed"]] == [5, 6]
    assert p2["removed_original_all"] == [2, 3, 5, 6]
    assert p2["kept_original"] == [0, 1, 4, 7]
    assert p2["original"]["n_layers"] == 8 and p2["original"]["license"] == "mit"
    assert p2["original"]["source"] == p1["original"]["source"]
    assert [s.step for s in chain(p2)] == [1, 2]


def test_python_api_save_of_a_pruned_source_extends_its_lineage(two_steps, tmp_path):
    """prune.load a pruned folder, remove blocks, prune.save with source=: step 2 with the original's
    indices and the loaded model's parameter count, as prune run records them (it was step 1, with
    indices local to the loaded model)."""
    _, first, second = two_steps
    model, tok, src = prune.load(first.out_dir)
    prune.remove_layers(model, [3, 4])
    saved = read_json(prune.save(model, tok, tmp_path / "api", pruning={"removed": [3, 4]}, source=src) / "pruning.json")
    want = read_json(second.out_dir / "pruning.json")
    for key in ("step", "removed", "removed_original", "removed_original_all", "kept_original", "params_before",
                "params_after", "layers_before", "layers_after"):
        assert saved[key] == want[key], key
    assert saved["original"]["n_layers"] == 8


def test_lineage_indices_match_the_weights(two_steps):
    """Block k of the twice-pruned checkpoint holds exactly the weights of original block
    kept_original[k]: the recorded mapping is checked against the tensors themselves."""
    source, _, second = two_steps
    kept = read_json(second.out_dir / "pruning.json")["kept_original"]
    with safe_open(source / "model.safetensors", "pt") as orig, safe_open(second.out_dir / "model.safetensors", "pt") as pruned:
        names = [n for n in pruned.keys() if n.startswith("model.layers.")]
        assert {int(n.split(".")[2]) for n in names} == set(range(len(kept)))
        for name in names:
            k = int(name.split(".")[2])
            original_name = name.replace(f"model.layers.{k}.", f"model.layers.{kept[k]}.", 1)
            assert pruned.get_tensor(name).equal(orig.get_tensor(original_name)), name


def test_card_shows_the_whole_chain(two_steps):
    _, first, second = two_steps
    card = load_card(second.out_dir)
    text = card.text
    assert "pruned 2 times" in text and "in 2 pruning steps" in text
    rows = re.findall(r"^\| (\d) \| (.+?) \| (.+?) \| (\d+) → (\d+) \| `(\[.*?\])` \| `(\[.*?\])` \|$", text, re.M)
    assert [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("1", "contiguous / angular", "8", "6", "[2, 3]", "[2, 3]"),
        ("2", "tail", "6", "4", "[3, 4]", "[5, 6]"),
    ]
    assert "`source` (local folder)" in rows[0][1] and f"`{first.out_dir.name}` (local folder)" in rows[1][1]
    assert "- **Removed blocks** (0-based, indices of the original model): `[2, 3, 5, 6]`" in text
    assert "| decoder blocks | 8 | 4 |" in text
    # step 1's table and recipe are kept, folded
    step1_rows = read_json(first.out_dir / "eval.json")["rows"]
    assert "<summary>Step 1 evaluation" in text and comparison_markdown(step1_rows) in text
    assert "<summary>Recipe of step 1</summary>" in text
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["tags"] == ["pruned", "layer-pruning", "angular-distance"]


def test_corrupt_lineage_is_refused_before_loading(two_steps, tmp_path, no_model_loading):
    """A pruning.json that does not describe the folder's weights stops the run in pre-flight."""
    import shutil

    _, first, _ = two_steps
    folder = shutil.copytree(first.out_dir, tmp_path / "edited")
    record = read_json(folder / "pruning.json")
    record["kept_original"] = record["kept_original"][:-1]
    (folder / "pruning.json").write_text(json.dumps(record))
    # the record's own lists no longer split the original's blocks: refused when it is read
    with pytest.raises(PruneError, match=r"'kept_original' and 'removed_original_all' leave out \[7\] of the 8"):
        run(recipe(folder, tmp_path / "out", 1), quiet=True)
    assert not (tmp_path / "out").exists()
    # lists that split the blocks but count another number of them than the weights hold: against the config
    record = read_json(first.out_dir / "pruning.json")
    last = record["kept_original"][-1]
    record["kept_original"], record["removed_original_all"] = record["kept_original"][:-1], [
        *record["removed_original_all"], last]
    record["removed_original"] = [*record["removed_original"], last]
    record["kept"], record["removed"] = record["kept"][:-1], [*record["removed"], record["kept"][-1]]
    record["layers_after"] = len(record["kept"])
    record["selection"]["removed"] = record["removed"]  # the selection says what was removed too
    (folder / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(PruneError, match="records 5 blocks after pruning but the model has 6"):
        run(recipe(folder, tmp_path / "out", 1), quiet=True)
    assert not (tmp_path / "out").exists()
    from prune.export.mergekit import export_mergekit

    with pytest.raises(PruneError, match="records 5 kept blocks but config.json has 6"):  # it wrote a config for 5
        export_mergekit(folder, tmp_path / "mk.yaml", model="org/base")
    # a later step whose original indices contradict the step before it (each list fine on its own): it was taken,
    # and the card, mergekit config and every later step named the wrong blocks
    _, _, second = two_steps
    chained = shutil.copytree(second.out_dir, tmp_path / "chained")
    record = read_json(chained / "pruning.json")
    earlier = record["history"][-1]["kept_original"]
    kept = [i for i in range(len(earlier)) if i not in record["kept"][:1]]  # another block than the weights hold
    record["kept_original"] = [earlier[i] for i in kept][: len(record["kept"])]
    record["removed_original_all"] = sorted(set(range(8)) - set(record["kept_original"]))
    record["removed_original"] = sorted(set(record["removed_original_all"]) - set(record["history"][-1]["removed_original_all"]))
    (chained / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(PruneError, match="'kept_original' is .* the step before kept them"):
        read_record(chained / "pruning.json")


def test_python_api_save_refuses_a_removal_that_did_not_happen_and_takes_a_selection(two_steps, tmp_path):
    """A removal recorded for a model saved before remove_layers wrote "2 of its 10 blocks removed" of an 8-block
    original, ready to push; blocks outside the stack named the block counts instead. A Selection is taken as it
    comes from prune.select, and a source given by its path."""
    original, first, _ = two_steps
    model, tok, src = prune.load(first.out_dir)  # 6 blocks, pruned from 8
    for kwargs, said in (
            (dict(pruning={"removed": [3, 4]}, source=src), "the model still has all 6 blocks: remove them first "
                                                            "(prune.remove_layers(model, [3, 4])), then save"),
            (dict(pruning={"removed": [30, 31]}), "pruning= removes blocks [30, 31], outside the 8 blocks before"),
            (dict(pruning={"removed": [1], "layers_before": 9}), "removes 1 of 9 blocks, leaving 8, but the model has 6")):
        with pytest.raises(PruneError, match=re.escape(said)):
            prune.save(model, tok, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
    scores = scores_from([0.9, 0.1, 0.2, 0.8, 0.7, 0.9])
    choice = prune.select(scores, 2, metric="bi")
    with pytest.raises(PruneError, match=re.escape("the model still has all 6 blocks")):
        prune.save(model, tok, tmp_path / "x", pruning=choice, source=str(first.out_dir))
    prune.remove_layers(model, choice.removed)
    saved = read_json(prune.save(model, tok, tmp_path / "sel", pruning=choice, source=str(first.out_dir)) / "pruning.json")
    assert saved["removed"] == [1, 2] and saved["layers_before"] == 6 and saved["step"] == 2
    assert saved["selection"]["strategy"] == "one_shot" and len(saved["kept_original"]) == 4
    with pytest.raises(PruneError, match=re.escape(f"a removal from 6 blocks, but the source {original} has 8")):
        prune.save(model, tok, tmp_path / "y", pruning=choice, source=original)


def test_python_api_save_checks_a_bare_record_against_the_folder_the_model_came_from(two_steps, tmp_path, capsys):
    """``pruning={"removed": [1]}`` for a model loaded from an 8-block folder that lost blocks 3 and 4 wrote a
    removal from a 7-block original (no source= given, the folder holds no record): the folder's block count is
    the check's source; the record of the removal made is saved. A save without a tokenizer says the folder has
    none (it wrote a checkpoint pipeline() and prune check refuse, without a word)."""
    original, _, _ = two_steps
    model, tok, _ = prune.load(original)
    prune.remove_layers(model, [3, 4])
    with pytest.raises(PruneError, match=re.escape("pruning= records blocks [1] of 8 removed, but prune.remove_layers "
                                                   "cut blocks [3, 4] of the 8 this model had when loaded")):
        prune.save(model, tok, tmp_path / "x", pruning={"removed": [1]})
    assert not (tmp_path / "x").exists()
    saved = read_json(prune.save(model, tok, tmp_path / "ok", pruning={"removed": [3, 4]}) / "pruning.json")
    assert saved["removed"] == [3, 4] and saved["layers_before"] == 8 and saved["layers_after"] == 6
    assert "no tokenizer given" not in capsys.readouterr().err
    bare = prune.save(model, None, tmp_path / "bare")
    assert f"note: no tokenizer given: {tmp_path / 'bare'} has no tokenizer files" in capsys.readouterr().err
    assert not list(bare.glob("tokenizer*"))



def test_python_api_save_checks_the_record_against_the_cut_remove_layers_made(two_steps, tmp_path):
    """A record of other blocks than prune.remove_layers cut (blocks 2 and 3 recorded where 4 and 6 went) wrote a
    lineage, card and mergekit slices of blocks the weights do not hold, and prune check passed it. A first step
    saved from Python recorded no parameter count of its original, so each later card showed its parent's count as
    the original's (-30% where -47% was cut). Two calls of remove_layers are one removal from the model as loaded."""
    original, _, _ = two_steps
    model, tok, src = prune.load(original)
    params = model.num_parameters()
    prune.remove_layers(model, [6])
    prune.remove_layers(model, [4])
    with pytest.raises(PruneError, match=re.escape("pruning= records blocks [2, 3] of 8 removed, but "
                                                   "prune.remove_layers cut blocks [4, 6] of the 8 this model had when "
                                                   "loaded: give pruning={'removed': [4, 6]}")):
        prune.save(model, tok, tmp_path / "x", pruning={"removed": [2, 3]}, source=src)
    assert not (tmp_path / "x").exists()
    first = read_json(prune.save(model, tok, tmp_path / "s1", pruning={"removed": [4, 6]}, source=src) / "pruning.json")
    assert first["kept_original"] == [0, 1, 2, 3, 5, 7]
    assert first["params_before"] == params and first["original"]["params"] == params
    model, tok, src = prune.load(tmp_path / "s1")
    prune.remove_layers(model, [3, 4])
    step2 = prune.save(model, tok, tmp_path / "s2", pruning={"removed": [3, 4]}, source=src)
    second = read_json(step2 / "pruning.json")
    assert second["kept_original"] == [0, 1, 2, 7] and second["original"]["params"] == params
    assert f"| parameters | {params:,} | {second['params_after']:,} (" in (step2 / "README.md").read_text()


def test_a_card_without_the_originals_parameter_count_shows_none_rather_than_the_parents():
    """A lineage whose first record has no parameter count (written before the fix above) showed the parent's count
    in the original's column: now a dash."""
    first = normalize_step({"removed": [1, 5]}, n_layers_after=6)
    current = {"removed": [0, 2], "kept": [1, 3, 4, 5], "layers_before": 6, "layers_after": 4, "params_before": 6000,
               "params_after": 4000}
    card = render_card(extend(current, first, ModelSource("folder", "/x")), model_name="x", load_id="path/to/x")
    row = next(line for line in card.splitlines() if line.startswith("| parameters |"))
    assert "6,000" not in row and row.startswith("| parameters | - | 4,000")

def test_hand_written_record_counts_as_one_step():
    """`prune.save(..., pruning={"removed": [...]})` records only the removed blocks."""
    step = normalize_step({"removed": [1, 5]}, n_layers_after=6)
    assert step.layers_before == 8 and step.kept_original == [0, 2, 3, 4, 6, 7]
    current = {"removed": [0, 2], "kept": [1, 3, 4, 5], "layers_before": 6, "layers_after": 4}
    out = extend(current, step, ModelSource("folder", "/x"))
    assert out.removed_original == [0, 3] and out.removed_original_all == [0, 1, 3, 5]
    assert out.kept_original == [2, 4, 6, 7] and out.step == 2 and out.source.path == "x"


# ---- front matter for Hub sources, Hub datasets, licenses ---------------------------------------
def _record(source: dict, calibration_path: str, license: str | None = None) -> dict:
    rec = {"removed": [1], "kept": [0, 2], "layers_before": 3, "layers_after": 2, "params_before": 30, "params_after": 20,
           "selection": {"strategy": "one_shot", "metric": "bi"}, "calibration": {"path": calibration_path}}
    src = ModelSource(**source)
    out = extend(rec, None, src)
    if license:
        out.original.license = license
    return out


def test_base_model_only_for_hub_sources():
    hub = card_data(_record({"kind": "hub", "path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "Salesforce/wikitext",
                            "apache-2.0")).to_dict()
    assert hub["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub["base_model_relation"] == RELATION == "finetune"
    assert hub["datasets"] == ["Salesforce/wikitext"]
    assert hub["license"] == "apache-2.0" and hub["tags"] == ["pruned", "layer-pruning", "block-influence"]
    for kind in ({"kind": "folder", "path": "/models/x"}, {"kind": "gguf", "path": "/m", "gguf_file": "x.gguf"}):
        data = card_data(_record(kind, str(ROOT / "README.md"))).to_dict()
        assert "base_model" not in data and "base_model_relation" not in data and "datasets" not in data


def test_a_healed_model_pruned_again_still_says_its_weights_were_trained():
    """After ``prune heal`` then ``prune remove``, the card lost the healed tag, the sentence and the Healing
    section (only the latest step's healing was read): it described trained weights as the original's."""
    first = _record({"kind": "hub", "path": "org/model"}, "allenai/c4")
    first.healing = {"method": "lora", "settings": {"method": "lora", "steps": 64}, "kl_after": 0.25}
    second = extend({"removed": [0], "kept": [1], "layers_before": 2, "layers_after": 1, "params_before": 20,
                     "params_after": 10, "command": "remove"}, first, ModelSource(kind="folder", path="/runs/healed"))
    assert second.healing is None and second.history[-1].healing
    text = render_card(second, model_name="m")
    assert "healed" in card_data(second).to_dict()["tags"]
    assert "The step-1 model was healed (trained briefly) before this step's pruning" in text
    assert "## Healing" in text and "The step-1 model was healed before a later step removed more blocks" in text
    assert "method = lora, steps = 64" in text and "step 1 → `healing`" in text
    assert "one_shot / bi, then healed (lora)" in text  # the lineage table's step 1
    assert "then healed" not in render_card(_record({"kind": "hub", "path": "org/model"}, "allenai/c4"), model_name="m")


def test_rendered_card_front_matter_for_hub_source_round_trips(tmp_path):
    record = _record({"kind": "hub", "path": "org/model"}, "allenai/c4", "llama3.2")
    (tmp_path / "README.md").write_text(render_card(record, model_name="m"))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "org/model" and data["base_model_relation"] == "finetune"
    assert data["license"] == "llama3.2" and data["datasets"] == ["allenai/c4"]
    assert "[org/model](https://huggingface.co/org/model)" in ModelCard.load(tmp_path / "README.md").text


def test_license_files_travel_with_the_weights(two_steps):
    """A license link in the card points at a file the folder holds: the source's LICENSE is copied by
    the in-memory writer too (only the out-of-core copy carried it), and on to the next step."""
    source, first, second = two_steps
    for out in (first.out_dir, second.out_dir):
        assert (out / "LICENSE").read_text() == (source / "LICENSE").read_text()


def test_is_hub_dataset():
    assert is_hub_dataset("Salesforce/wikitext") and is_hub_dataset("wikitext")
    assert not is_hub_dataset(str(ROOT / "README.md"))  # an existing local file
    assert not is_hub_dataset("data/wiki.test.raw") and not is_hub_dataset("./x") and not is_hub_dataset("json")
    # a bare file name read from the working folder stays local when the card is re-rendered elsewhere (prune push),
    # and so do the forms a run folder records local paths in
    assert not is_hub_dataset("corpus.text") and not is_hub_dataset("<local>/corpus.text")
    assert not is_hub_dataset("${PRUNE_DATA_DIR}/wikitext2_raw/wiki.test.raw")
    # a text file's suffix says file wherever the card is rendered; a Hub id may hold a dot
    assert not is_hub_dataset("data/corpus.md") and not is_hub_dataset("data/rows.jsonl.gz")
    assert is_hub_dataset("allenai/c4") and is_hub_dataset("user/wiki.en")


def test_a_run_records_whether_its_calibration_text_came_from_the_hub(two_steps, tmp_path):
    """The card's datasets come from what the run decided where it read the text (a file under its working
    folder, recorded relative to it, was listed as a Hub dataset when a card was rendered elsewhere)."""
    from prune.export.card import _step_datasets

    _, first, _ = two_steps
    record = read_record(first.out_dir / "pruning.json")
    assert record.calibration.hub is False
    moved = record.model_copy(update={"calibration": record.calibration.model_copy(update={"path": "data/corpus"})})
    assert _step_datasets(moved) == []
    from prune.core.config import TextSource
    from prune.io.text import reads_from_hub

    assert reads_from_hub(TextSource("user/wiki.en")) and not reads_from_hub(TextSource(str(ROOT / "tests")))
    hub = record.model_copy(update={"calibration": record.calibration.model_copy(update={"path": "allenai/c4", "hub": True})})
    assert _step_datasets(hub) == ["allenai/c4"]


@pytest.mark.integration
def test_license_read_from_gguf_metadata(smollm2_path):
    assert source_license(ModelSource("gguf", str(smollm2_path.parent), smollm2_path.name)) == {"license": "apache-2.0"}


def test_hub_license_lookup_never_fails_offline_or_unreachable(tmp_path):
    """Offline mode, and an online Hub that cannot be reached (HF_ENDPOINT on a closed local
    port), both give an unknown license, quickly, instead of an error."""
    code = ("from prune.export.lineage import source_license, read_parent; from prune.model.loading import ModelSource; "
            "s = ModelSource('hub', 'HuggingFaceTB/SmolLM2-135M-Instruct'); print(source_license(s), read_parent(s, 30))")
    for offline in ("1", "0"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline,
               "HF_ENDPOINT": "http://127.0.0.1:9"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "{} None"


def test_push_to_hub_in_recipe_is_checked_before_loading(two_steps, tmp_path):
    source, _, _ = two_steps
    with pytest.raises(PruneError, match="push_to_hub.repo_id.*not a Hub repo id"):
        load_recipe(recipe(source, tmp_path / "o", output={"push_to_hub": {"repo_id": "not a repo!"}}))
    # conftest sets HF_HUB_OFFLINE=1: the push cannot happen, so the run stops before any work
    with pytest.raises(PruneError, match="HF_HUB_OFFLINE is set"):
        run(recipe(source, tmp_path / "o", output={"push_to_hub": {"repo_id": "me/tiny-pruned"}}), quiet=True)
    assert not (tmp_path / "o").exists()


def test_template_is_shipped_as_package_data():
    from prune.export.card import template_path

    assert template_path().is_file() and "{{ card_data }}" in template_path().read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"templates/*.md"' in pyproject


def test_local_names_in_code_spans_are_shown_as_they_are():
    """A name with & < > went through HTML escaping into a code span, which shows entities literally
    (`R&amp;D_llama`); a | still may not break the table cell it sits in, nor a backtick the span."""
    from prune.core.records import SourceRecord
    from prune.export.card import source_name

    assert source_name(SourceRecord(kind="folder", path="/models/R&D_<llama>")) == "`R&D_<llama>` (local folder)"
    assert source_name(SourceRecord(kind="folder", path="/models/a|b`c")) == "`a\\|b'c` (local folder)"


def test_named_chat_templates_survive_both_save_paths(tmp_path):
    """transformers 5 saves each named chat template but the default under additional_chat_templates/: the
    out-of-core copy (prune remove, a sequential run) carried only the folder's files, so the copy's tokenizer
    had no tool_use template and rendered the literal name 'tool_use', without an error."""
    from transformers import AutoTokenizer

    from conftest import build_model, build_tokenizer
    from prune.model.loading import load_model

    tok = build_tokenizer(True)
    tok.chat_template = {"default": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
                         "tool_use": "{% for m in messages %}TOOL<{{ m['content'] }}>{% endfor %}"}
    src = tmp_path / "src"
    build_model("llama").save_pretrained(src)
    tok.save_pretrained(src)
    assert (src / "additional_chat_templates" / "tool_use.jinja").is_file()
    model, loaded, _ = load_model(src)
    prune.remove_layers(model, [1])
    in_memory = prune.save(model, loaded, tmp_path / "a")
    copied = prune.prune_checkpoint(src, [1], tmp_path / "b")
    messages = [{"role": "user", "content": "hi"}]
    for folder in (in_memory, copied):
        again = AutoTokenizer.from_pretrained(folder)
        assert again.apply_chat_template(messages, chat_template="tool_use", tokenize=False) == "TOOL<hi>", folder
        assert again.apply_chat_template(messages, tokenize=False) == "[hi]"
