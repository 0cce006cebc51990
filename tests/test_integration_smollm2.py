"""The real SmolLM2-135M-Instruct (GGUF, Llama architecture, 30 blocks) on real WikiText-2 text."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import prune
from prune.measure.perplexity import perplexity

from conftest import WIKI_RAW

pytestmark = pytest.mark.integration


def test_score_remove_seven_save_reload(smollm2_folder, tmp_path):
    model, tok, src = prune.load(smollm2_folder)
    assert src.kind == "folder" and len(prune.decoder_layers(model)) == 30
    calib = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:2000"))
    held_out = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="2000:"))
    windows = prune.calibration_windows(tok, calib, 8, 256, seed=0)
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

    eval_w = prune.eval_windows(tok, held_out, 256, max_windows=4)
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


def test_quick_recipe_end_to_end(smollm2_folder, tmp_path):
    """recipes/smollm2-quick.yaml as shipped, with small limits: chosen layers, a before/after
    table of perplexity and two lm-eval tasks on real data, and the output folder."""
    from conftest import DATA, ROOT
    from prune.pipeline.orchestrator import run

    result = run(ROOT / "recipes" / "smollm2-quick.yaml", quiet=True, overrides=[
        f"model.source={smollm2_folder}", f"output.dir={tmp_path / 'out'}", f"calibration.path={WIKI_RAW}",
        f"evaluate.perplexity.path={WIKI_RAW}", "evaluate.perplexity.max_windows=2", "evaluate.perplexity.seq_len=256",
        f"evaluate.data_dir={DATA}", "evaluate.tasks=[arc_easy, winogrande]", "evaluate.limit=10",
        "calibration.n_samples=8", "calibration.seq_len=128", "select.heldout_windows=2", "select.budget=2"])
    assert len(result.selection.removed) == 7
    # the shipped strategy, verified: the chosen set is the lowest-KL candidate it measured
    details = result.selection.details
    assert result.selection.strategy == "verified" and details["candidates"][0]["removed"] == result.selection.removed
    assert details["local_search_evaluations"] <= 2 and details["windows"] == 2
    rows = {(r["name"], r["metric"]) for r in result.evaluation["rows"]}
    assert {("perplexity", "ppl"), ("arc_easy_local", "acc"), ("winogrande_local", "acc"), ("layers", "count")} <= rows
    ppl = result.evaluation["pruned"]["perplexity"]["perplexity"]
    assert math.isfinite(ppl) and ppl > result.evaluation["original"]["perplexity"]["perplexity"]
    for name in ("config.json", "model.safetensors", "recipe.yaml", "pruning.json", "eval.json", "eval.md"):
        assert (result.out_dir / name).is_file()
