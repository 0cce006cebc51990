"""The real SmolLM2-135M-Instruct (GGUF, Llama architecture, 30 blocks) on real WikiText-2 text:
the suite's one real-model module (the other modules use tiny random models)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import prune
from prune.core.tables import comparison_markdown
from prune.measure.perplexity import perplexity

from conftest import DATA, ROOT, WIKI_RAW

pytestmark = pytest.mark.integration


def test_score_remove_seven_save_reload(smollm2_folder, tmp_path):
    model, tok, src = prune.load(smollm2_folder)
    assert src.kind == "folder" and len(prune.decoder_layers(model)) == 30
    calib = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:2000"))
    held_out = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="2000:"))
    windows = prune.calibration_windows(tok, calib, 8, 128, seed=0)
    scores = prune.score(model, windows, batch_size=8, progress=False)
    assert scores.n_layers == 30 and len(scores.cka_matrix) == 30
    assert all(0.0 <= v <= 2.0 for v in scores.block_influence)
    # the attention sink forms in block 11: counting each window's first token (positions=all),
    # CKA sees block 11's output as unlike its input; without it (the default) it does not
    assert scores.positions == "skip_first" and scores.cka_in_out[11] > 0.5
    with_sink = prune.score(model, windows, batch_size=8, positions="all", metrics=("cka",), progress=False)
    assert with_sink.cka_in_out[11] < 0.2
    choice = prune.select(scores, 7, strategy="contiguous")
    assert len(choice.removed) == 7 and choice.removed == list(range(choice.removed[0], choice.removed[0] + 7))

    eval_w = prune.eval_windows(tok, held_out, 256, max_windows=2)
    dense = perplexity(model, eval_w)["perplexity"]
    prune.remove_layers(model, choice.removed)
    pruned = perplexity(model, eval_w)["perplexity"]
    assert math.isfinite(pruned) and pruned > dense

    out = prune.save(model, tok, tmp_path / "smollm2-23L", pruning={"removed": choice.removed, "scores": scores.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 23
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied, as in SmolLM2
    with torch.no_grad():
        assert torch.equal(model(eval_w[:2]).logits, reloaded(eval_w[:2]).logits)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    a = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, reloaded.generate(prompt, max_new_tokens=8, do_sample=False))


@pytest.fixture(scope="module")
def quick_run(smollm2_folder, tmp_path_factory):
    """recipes/smollm2-quick.yaml as shipped, with small limits (one run for the tests below)."""
    from prune.pipeline.orchestrator import run

    out = tmp_path_factory.mktemp("quick") / "out"
    return run(ROOT / "recipes" / "smollm2-quick.yaml", quiet=True, overrides=[
        f"model.source={smollm2_folder}", f"output.dir={out}", f"calibration.path={WIKI_RAW}",
        f"evaluate.perplexity.path={WIKI_RAW}", "evaluate.perplexity.max_windows=2", "evaluate.perplexity.seq_len=256",
        f"evaluate.data_dir={DATA}", "evaluate.tasks=[arc_easy, winogrande]", "evaluate.limit=10",
        "calibration.n_samples=8", "calibration.seq_len=64", "select.heldout_windows=2", "select.budget=2"])


def test_quick_recipe_end_to_end(quick_run):
    """The shipped recipe: chosen layers, a before/after table of perplexity and two lm-eval tasks
    on real data, and the output folder."""
    result = quick_run
    assert len(result.selection.removed) == 7
    # the shipped strategy, verified: the chosen set is the lowest-KL candidate it measured
    details = result.selection.details
    assert result.selection.strategy == "verified" and details["candidates"][0]["removed"] == result.selection.removed
    assert details["local_search_evaluations"] <= 2 and details["windows"] == 2
    rows = {(r["name"], r["metric"]) for r in result.evaluation["rows"]}
    assert {("perplexity", "ppl"), ("arc_easy_local", "acc"), ("winogrande_local", "acc"), ("layers", "count")} <= rows
    ppl = result.evaluation["pruned"]["perplexity"]["perplexity"]
    assert math.isfinite(ppl) and ppl > result.evaluation["original"]["perplexity"]["perplexity"]
    fidelity = result.evaluation["pruned"]["fidelity"]  # the recipe's evaluate.fidelity: KL to the original
    assert fidelity["kl_mean"] > 0.05 and 0.2 < fidelity["top1_agreement"] < 1
    for name in ("config.json", "model.safetensors", "recipe.yaml", "pruning.json", "eval.json", "eval.md"):
        assert (result.out_dir / name).is_file()


def test_prune_the_pruned_again_check_card_and_dry_run(quick_run, smollm2_path, tmp_path):
    """The quick run's 23 blocks pruned by 3 more: both folders pass `check` (the second's weights also against
    the GGUF file its original was made from), the second card shows the two-step lineage in original indices,
    and the dry run lists every file."""
    from export_fixtures import recipe
    from prune.export.check import check_checkpoint
    from prune.export.push import push
    from prune.pipeline.orchestrator import run

    first = quick_run
    second = run(recipe(first.out_dir, tmp_path / "smol-20L", 3, calibration={"n_samples": 8, "seq_len": 128},
                        evaluate={"perplexity": {"path": str(WIKI_RAW), "rows": "2000:", "seq_len": 128, "max_windows": 2}}),
                 quiet=True)
    for result, n in ((first, 23), (second, 20)):
        report = check_checkpoint(result.out_dir, require_export=True)
        assert report.ok, report.summary()
        assert report.facts["n_layers"] == n
    p1 = json.loads((first.out_dir / "pruning.json").read_text())
    p2 = json.loads((second.out_dir / "pruning.json").read_text())
    from conftest import prune_main

    out = prune_main("check", second.out_dir, "--original", smollm2_path, check_rc=0).stdout
    from prune.export.check import index_ranges

    assert f"each of the 20 blocks is the original's block pruning.json names ({index_ranges(p2['kept_original'])}), " \
        "unchanged" in out
    assert p2["removed_original"] == [p1["kept_original"][i] for i in p2["removed"]]
    assert sorted(p2["removed_original_all"]) == sorted(p1["removed"] + p2["removed_original"])
    assert len(p2["kept_original"]) == 20 and not set(p2["kept_original"]) & set(p2["removed_original_all"])
    text = (second.out_dir / "README.md").read_text()
    assert f"`{p2['removed']}` | `{p2['removed_original']}` |" in text
    assert comparison_markdown(json.loads((second.out_dir / "eval.json").read_text())["rows"]) in text
    assert "| decoder blocks | 30 | 20 |" in text
    plan = push(second.out_dir, "me/SmolLM2-135M-20L", dry_run=True, quiet=True)
    assert {name for name, _ in plan.files} == {p.name for p in second.out_dir.iterdir()}


def test_replacement_layer_beats_plain_removal(smollm2_folder):
    """Blocks 12-18 (the contiguous angular choice): a replacement block trained briefly on C4
    gives a lower WikiText-2 perplexity than removing the seven blocks."""
    from test_heal import C4_DATA
    from prune.heal.methods import heal_model

    held_out = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="2000:"))
    run = list(range(12, 19))
    pruned, tok, _ = prune.load(smollm2_folder)
    eval_w = prune.eval_windows(tok, held_out, 256, max_windows=2)
    prune.remove_layers(pruned, run)
    ppl_pruned = perplexity(pruned, eval_w)["perplexity"]
    del pruned
    model, tok, _ = prune.load(smollm2_folder)
    rec = heal_model(model, tok, "replace", data=C4_DATA, removed=run, quiet=True, n_samples=8, val_samples=4,
                     seq_len=128, steps=4, batch_size=4, learning_rate=1e-3, loss="mse")
    assert rec["replacement"]["val_mse_after"] < rec["replacement"]["val_mse_before"]
    assert model.config.num_hidden_layers == 24
    assert perplexity(model, eval_w)["perplexity"] < ppl_pruned


def test_sequential_and_outofcore_equal_in_memory(smollm2_folder, tmp_path):
    from test_scale import all_tensors, assert_same_scores
    from prune.export.outofcore import prune_checkpoint
    from prune.measure.sequential import score_sequential

    model, tok, _ = prune.load(smollm2_folder)
    text = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:2000"))
    w = prune.calibration_windows(tok, text, 4, 64, seed=0)
    assert_same_scores(prune.score(model, w, batch_size=2, progress=False),
                       score_sequential(smollm2_folder, w, batch_size=2, spill=True, progress=False))
    removed = list(range(12, 19))
    out = prune_checkpoint(smollm2_folder, removed, tmp_path / "ooc")
    prune.remove_layers(model, removed)
    a, b = all_tensors(prune.save(model, tok, tmp_path / "mem")), all_tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in b  # tied embeddings stay stored once


def test_report(smollm2_folder, tmp_path):
    """The sink block 11 shows as a CKA cliff, 30 x 30 heatmap, contiguous marks 7 blocks."""
    from test_report import check_png
    from prune.pipeline.commands import report_model

    out = report_model(str(smollm2_folder), tmp_path / "rep", n_layers=7, data=str(WIKI_RAW), rows="0:2000",
                       n_samples=4, seq_len=128, batch_size=4, quiet=True)
    data = json.loads((out / "report.json").read_text())
    assert len(data["cka_original"]) == 30 and len(data["removed"]) == 7 and data["k"] == 7
    md = (out / "report.md").read_text()
    assert "strategy `contiguous`, metric `angular`: would remove 7 of 30 blocks" in md and "per pair" in md
    for name in ["cka_original.png", "blocks_original.png"]:
        check_png(out / name, min_px=800)


def test_a_gguf_files_header_config_and_tokenizer_are_read_once(smollm2_path, smollm2_folder):
    """Parsing the GGUF header takes seconds: the header, config and tokenizer are kept after the
    first read (prune.io.gguf.kept_per_file), and every caller gets its own copy of the config and
    tokenizer. A load parses the header once: transformers' reads of the config, the tokenizer and
    the weights, which each parsed it again, are lent the kept reader (four parses before)."""
    from conftest import GGUF_LOAD
    from prune.export.lineage import gguf_license
    from prune.io.gguf import gguf_reader
    from prune.io.source import resolve_source
    from prune.model.loading import load_config, load_tokenizer

    assert GGUF_LOAD["parses"] == 1
    assert gguf_reader(smollm2_path) is gguf_reader(smollm2_path)
    assert gguf_license(smollm2_path) == "apache-2.0"
    src = resolve_source(smollm2_path)
    a, b = load_config(src), load_config(src)
    assert a is not b and a.to_dict() == b.to_dict() and a.num_hidden_layers == 30
    a.num_hidden_layers = 23  # as surgery does: the next caller still reads the file's
    assert load_config(src).num_hidden_layers == 30
    t1, t2 = load_tokenizer(src), load_tokenizer(src)
    assert t1 is not t2 and t1("The capital of France").input_ids == t2("The capital of France").input_ids
    t1.model_max_length = 7  # a change to one copy is not seen by the next caller
    assert load_tokenizer(src).model_max_length == t2.model_max_length != 7


def test_a_gguf_file_in_a_model_folder_brings_its_own_tokenizer(smollm2_path, tmp_path, tokenizers_by_bos):
    """llama.cpp's converter writes the .gguf into the Hugging Face folder: transformers then read the
    folder's tokenizer files, not the GGUF's (256 tokens against the config's 49,152, silently)."""
    from prune.io.source import resolve_source
    from prune.model.loading import load_config, load_tokenizer

    folder = tmp_path / "hf-folder"
    tokenizers_by_bos[True].save_pretrained(folder)  # another model's tokenizer files
    try:  # the same bytes under another path: not a kept read
        os.link(smollm2_path, folder / smollm2_path.name)
    except OSError:  # another file system
        shutil.copy(smollm2_path, folder / smollm2_path.name)
    src = resolve_source(folder, gguf_file=smollm2_path.name)
    assert len(load_tokenizer(src)) == load_config(src).vocab_size == 49152
    assert load_tokenizer(src).name_or_path == src.display  # not the temporary folder it was read from


def test_a_hub_repos_gguf_file_brings_its_own_tokenizer(smollm2_path, tmp_path, tokenizers_by_bos):
    """The same for a Hub repo holding a .gguf and tokenizer files (org/name with gguf_file): the
    GGUF's tokenizer, read from the offline Hub cache (a process of its own: the cache folder is
    read when huggingface_hub is imported)."""
    snapshot = tmp_path / "hub" / "models--org--smol" / "snapshots" / ("0" * 40)
    tokenizers_by_bos[True].save_pretrained(snapshot)  # another model's tokenizer files in the repo
    (snapshot / smollm2_path.name).symlink_to(smollm2_path.resolve())
    (tmp_path / "hub" / "models--org--smol" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--smol" / "refs" / "main").write_text("0" * 40)
    code = ("from prune.io.source import resolve_source; from prune.model.loading import load_tokenizer; "
            f"t = load_tokenizer(resolve_source('org/smol', gguf_file={smollm2_path.name!r})); "
            "print(len(t), t.name_or_path)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["49152", f"org/smol/{smollm2_path.name}"]
