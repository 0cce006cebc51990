"""Model-based strategies (iterative, SLEB, search) on tiny real models with planted redundancy."""

import copy
import json
import math

import pytest
import torch
import yaml

import prune
from prune import PruneError
from prune.choose import strategies as ST
from prune.measure.perplexity import nll_sum
from prune.pipeline.recipe import load_recipe

from conftest import ARCHS, BOS_ARCHS, DATA, WIKI_RAW, build_model


def windows_for(tok, n=6, seq_len=48, seed=0):
    return prune.calibration_windows(tok, prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:400")), n, seq_len, seed)


def fingerprint(model):
    """Everything a strategy could leave changed: weights, config, layer_idx, module identities."""
    layers = prune.decoder_layers(model)
    idx = [(name, m.layer_idx) for name, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "config": model.config.to_dict(),
            "layer_idx": idx, "list": id(layers), "blocks": [id(b) for b in layers], "training": model.training}


def assert_unchanged(model, before):
    after = fingerprint(model)
    assert after["config"] == before["config"]
    assert after["layer_idx"] == before["layer_idx"]
    assert after["list"] == before["list"] and after["blocks"] == before["blocks"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


def brute_loss(model, windows, removed):
    """Calibration loss of a real pruned copy (surgery), the reference for SLEB."""
    pruned = copy.deepcopy(model)
    if removed:
        prune.remove_layers(pruned, list(removed))
    total, count = nll_sum(pruned, windows, batch_size=4)
    return total / count


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_blocks_equals_surgery_and_restores_everything(arch, tokenizers_by_bos):
    model, tok = build_model(arch), tokenizers_by_bos[arch in BOS_ARCHS]
    w = windows_for(tok, n=2, seq_len=32)
    before = fingerprint(model)
    removed = [1, 4, 5]
    with ST.skip_blocks(model, removed) as kept, torch.no_grad():
        assert kept == [0, 2, 3, 6, 7]
        skipped = model(w, use_cache=False).logits
    assert_unchanged(model, before)
    pruned = copy.deepcopy(model)
    prune.remove_layers(pruned, removed)
    with torch.no_grad():
        assert torch.allclose(skipped, pruned(w, use_cache=False).logits, atol=1e-5)
    # restored even when the body raises
    with pytest.raises(RuntimeError, match="boom"), ST.skip_blocks(model, [2]):
        raise RuntimeError("boom")
    assert_unchanged(model, before)
    with pytest.raises(prune.PruneError, match=r"^block indices repeated: \[3\] \(give each block once\)$"):
        with ST.skip_blocks(model, [3, 3]):  # as remove_layers refuses it (it skipped one block)
            pass
    assert_unchanged(model, before)


def test_iterative_rescores_after_each_removal(tokenizers_by_bos):
    model, tok = build_model("llama", redundant=(2, 5)), tokenizers_by_bos[True]
    w = windows_for(tok)
    before = fingerprint(model)
    scores = prune.score(model, w, progress=False)
    sel = ST.iterative(model, w, 3, metric="bi", scores=scores, progress=False)
    assert_unchanged(model, before)
    assert set(sel.details["order"][:2]) == {2, 5}  # the planted blocks go first
    assert sel.details["forward_passes"] == 2  # k - 1 re-scorings: round 0 uses the given scores
    assert sel.details["full_forward_equivalents"] == round((7 + 6) / 8, 2)  # of the 7, then 6 blocks still kept
    # each round's values are the scores of the model pruned by the rounds before it
    for r, step in enumerate(sel.details["trace"]):
        pruned = copy.deepcopy(model)
        if r:
            prune.remove_layers(pruned, sel.details["order"][:r])
        ref = prune.score(pruned, w, metrics=("bi",), progress=False).block_influence
        kept = [i for i in range(8) if i not in sel.details["order"][:r]]
        assert [step["values"][str(i)] for i in kept] == pytest.approx(ref, abs=1e-6)
        assert step["removed"] == min((i for i in kept if i not in (0, 7)), key=lambda i: (step["values"][str(i)], i))
    # greedy: a shorter run is the prefix of a longer one
    assert ST.iterative(model, w, 2, metric="bi", scores=scores, progress=False).details["order"] == sel.details["order"][:2]
    # scores of other settings would rank round 0 unlike the rounds after it
    with pytest.raises(PruneError, match="positions all \\(scores\\) vs skip_first"):
        ST.iterative(model, w, 2, metric="bi", scores=prune.score(model, w, positions="all", progress=False), progress=False)
    # ... but only the settings the metric reads: MSRS's beta does not change BI's ranking (it was refused)
    other_beta = prune.score(model, w, beta=50.0, progress=False)
    assert ST.iterative(model, w, 2, metric="bi", scores=other_beta, progress=False).details["order"] == sel.details["order"][:2]
    with pytest.raises(PruneError, match="beta 50.0 \\(scores\\) vs 100.0"):
        ST.iterative(model, w, 2, metric="msrs", scores=other_beta, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_sleb_equals_brute_force_loss(arch, tokenizers_by_bos):
    model, tok = build_model(arch), tokenizers_by_bos[arch in BOS_ARCHS]
    w = windows_for(tok, n=4, seq_len=40)
    before = fingerprint(model)
    sel = ST.sleb(model, w, 2, protect=[0], batch_size=3, progress=False)  # last block removable: exercises that path
    assert_unchanged(model, before)
    removed = []
    for step in sel.details["trace"]:
        cands = [i for i in range(8) if i not in removed and i != 0]
        ref = {i: brute_loss(model, w, removed + [i]) for i in cands}
        got = {int(i): v for i, v in step["candidates"].items()}
        assert got.keys() == ref.keys()
        assert all(got[i] == pytest.approx(ref[i], rel=1e-5) for i in ref)
        assert step["removed"] == min(ref, key=ref.get)
        removed.append(step["removed"])
    assert sel.removed == sorted(removed)
    # a greedy run resumes from an earlier trace: the next round is the brute-force choice after the first two
    rounds = []
    more = ST.sleb(model, w, 3, protect=[0], batch_size=3, progress=False, start=sel.details["trace"], on_round=rounds.append)
    assert more.details["order"][:2] == sel.details["order"] and len(rounds) == 1
    ref = {i: brute_loss(model, w, removed + [i]) for i in range(1, 8) if i not in removed}
    assert rounds[0]["removed"] == min(ref, key=ref.get)
    assert more.details["forward_passes"] == sel.details["forward_passes"] + 1 + 5  # 6 blocks left, block 0 protected
    for bad, message in ((w[:0], "no windows to score"), (w.float(), "must be a tensor of token ids"),
                         (w.tolist(), "must be a tensor of token ids"), (w + 10**6, "outside the model's vocabulary"),
                         (w[:, :1], "need at least 2 tokens each")):
        with pytest.raises(PruneError, match=message):  # ZeroDivisionError, RuntimeError, AttributeError, IndexError
            ST.sleb(model, bad, 2, progress=False)
    assert ST.sleb(model, w.int(), 2, protect=[0], batch_size=3, progress=False).removed == sel.removed  # int32 raised
    assert sel.details["forward_passes"] == 2 + 7 + 6  # one caching pass per round plus one per candidate
    assert 0 < sel.details["full_forward_equivalents"] < sel.details["forward_passes"]


def test_an_overflowing_block_is_never_chosen_for_its_nan(tokenizers_by_bos):
    """A block whose output overflows (NaN, as fp16 can) makes every set that keeps it measure NaN: SLEB
    chose the first candidate evaluated (``min`` never replaces a NaN), now the one finite removal; when
    the original itself overflows, verified says so (its reference of NaN log-probs refused) instead of choosing."""
    from prune.choose.verified import verified

    model, tok = build_model("llama"), tokenizers_by_bos[True]
    w = windows_for(tok, n=4, seq_len=40)
    scores = prune.score(model, w, progress=False)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.fill_(float("nan"))
    sel = ST.sleb(model, w, 1, protect=[0], batch_size=4, progress=False)
    assert sel.removed == [3] and math.isnan(sel.details["trace"][0]["candidates"]["1"])
    with pytest.raises(PruneError, match=r"the original's next-token log-probs are not finite \(NaN\).*float32"):
        verified(model, scores, w, 2, batch_size=4, budget=0, progress=False)


def test_search_respects_floor_and_budget(tokenizers_by_bos):
    model, tok = build_model("llama", redundant=(2, 4, 6)), tokenizers_by_bos[True]
    text = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:400"))
    held = ST.heldout_windows(tok, text, 6, 48, seed=0, n_heldout=4)
    calib = prune.calibration_windows(tok, text, 6, 48, seed=0)
    assert not any(torch.equal(h, c) for h in held for c in calib)  # held out: disjoint windows
    scores = prune.score(model, calib, progress=False)
    before = fingerprint(model)
    proxy = ST.perplexity_proxy(model, held, batch_size=4)
    base = proxy([])
    sel = ST.search(model, scores, proxy, floor=1.10, higher_is_better=False, budget=12, order_by="bi", progress=False)
    assert_unchanged(model, before)
    d = sel.details
    assert d["candidate_evaluations"] <= 12 and d["evaluations"] == d["candidate_evaluations"] + 1
    assert set(sel.removed) >= {2, 4, 6}  # the planted blocks are cheap to remove
    assert all(e["ok"] == (e["ratio"] <= 1.10) for e in d["trace"])
    # the floor holds on a really pruned copy, and adding any other candidate it tried breaks it
    pruned = copy.deepcopy(model)
    prune.remove_layers(pruned, sel.removed)
    total, count = nll_sum(pruned, held, 4)
    assert math.exp(total / count) / base <= 1.10
    assert d["final"]["ratio"] == pytest.approx(math.exp(total / count) / base, rel=1e-5)
    assert [p["n"] for p in d["pareto"]] == sorted({p["n"] for p in d["pareto"]})
    for point in d["pareto"]:  # the best (lowest perplexity) ratio measured at each size
        assert point["ratio"] == min(e["ratio"] for e in d["trace"] if e["n"] == point["n"])
    best_accuracy = ST.pareto([{"n": 1, "value": v, "ratio": v, "ok": True, "removed": [i]} for i, v in enumerate((.5, .9))],
                              higher_is_better=True)
    assert [p["ratio"] for p in best_accuracy] == [0.9]  # higher is better: the highest
    # first a binary search over prefixes of the ranking, then the greedy pass
    prefix = [e for e in d["trace"] if e["phase"] == "prefix"]
    assert d["trace"][0]["phase"] == "prefix" and len(prefix) >= 2
    assert all(e["removed"] == sorted(d["order"][:e["n"]]) for e in prefix)
    # floors and counts a recipe refuses (they returned an empty selection, silently, and surgery failed later)
    for kwargs, message in ((dict(floor=float("nan")), "floor=nan must be a ratio to the original's proxy value"),
                            (dict(floor=-1), "floor=-1 must be a ratio"), (dict(floor=0), "floor=0 must be a ratio"),
                            (dict(max_remove=100), "cannot remove 100 of 8 blocks"),
                            (dict(budget=2.5), "budget=2.5 must be a whole number")):
        with pytest.raises(PruneError, match=message):
            ST.search(model, scores, proxy, **{"floor": 1.10, "higher_is_better": False, "budget": 12, **kwargs},
                      progress=False)
    # a tiny budget stops early; a floor nothing meets removes nothing
    small = ST.search(model, scores, proxy, floor=1.10, higher_is_better=False, budget=2, order_by="bi", progress=False)
    assert small.details["candidate_evaluations"] == 2 and small.details["stopped"] == "budget"
    none = ST.search(model, scores, proxy, floor=0.5, higher_is_better=False, budget=3, order_by="bi", progress=False)
    assert none.removed == [] and all(not e["ok"] for e in none.details["trace"])
    with pytest.raises(prune.PruneError, match=r"no block can be removed within select.max_perplexity_ratio=0.5 on "
                       r"proxy; the best single removal measured \d\.\d{3} x the original \(loosen"):
        ST.require_removal(none, "select.max_perplexity_ratio")  # a run said "no blocks to remove" after evaluating
    with pytest.raises(prune.PruneError, match="the original model scores 0.0 on proxy, so a ratio to it means nothing"):
        ST.search(model, scores, lambda removed: 0.0, floor=0.9, higher_is_better=True, budget=2, progress=False)
    capped = ST.search(model, scores, proxy, floor=1.10, higher_is_better=False, budget=12, order_by="bi", max_remove=2,
                       progress=False)
    assert len(capped.removed) == 2 and all(e["n"] <= 2 for e in capped.details["trace"])
    assert capped.details["stopped"] == "max_remove"
    # every candidate tried within the budget: 'candidates', even when the last one used the budget up
    exact = ST.search(model, scores, proxy, floor=1.10, higher_is_better=False, budget=d["candidate_evaluations"],
                      order_by="bi", progress=False)
    assert exact.removed == sel.removed and d["stopped"] == exact.details["stopped"] == "candidates"
    assert_unchanged(model, before)


SEARCH_RECIPE = {
    "model": {"source": "MODEL"},
    "calibration": {"path": str(WIKI_RAW), "rows": "0:400", "n_samples": 6, "seq_len": 48, "batch_size": 4},
    "select": {"strategy": "search", "max_perplexity_ratio": 1.2, "budget": 8, "order_by": "msrs"},
    "output": {"dir": "OUT"},
}


def recipe_with(**select):
    data = copy.deepcopy(SEARCH_RECIPE)
    data["select"] = select
    return data


@pytest.mark.parametrize("select, message", [
    (dict(strategy="search", max_perplexity_ratio=2.0), "without a budget"),
    (dict(strategy="search", budget=5), "needs a utility floor"),
    (dict(strategy="search"), r"with proxy_task and a budget \(the most proxy evaluations"),  # both at once
    (dict(strategy="search", budget=5, max_perplexity_ratio=2.0, min_task_retained=0.9, proxy_task="piqa"), "not both"),
    (dict(strategy="search", budget=5, min_task_retained=0.9), "needs proxy_task"),
    (dict(strategy="search", budget=5, max_perplexity_ratio=2.0, proxy_task="piqa"), "only used with min_task_retained"),
    (dict(strategy="search", budget=5, min_task_retained=0.9, proxy_task="piqa", heldout_windows=4), "only used with max_perplexity_ratio"),
    (dict(strategy="search", budget=5, max_perplexity_ratio=0.5), "greater than 1"),
    (dict(strategy="contiguous", n_layers=2, budget=5), "budget is only used by strategy: search"),
    (dict(strategy="sleb", n_layers=2, order_by="bi"), "order_by is only used by strategy: search"),
    (dict(strategy="search", budget=5, max_perplexity_ratio=2.0, order_by="loss"), "order_by"),
    # settings the search accepted and never read: the perplexity floor's windows follow calibration.seed, and
    # order_by wins over metric
    (dict(strategy="search", budget=5, max_perplexity_ratio=2.0, seed=7), "seed is only used with min_task_retained"),
    (dict(strategy="search", budget=5, max_perplexity_ratio=2.0, metric="bi", order_by="cka"), "give one of them"),
])
def test_recipe_refuses_bad_search_settings_in_one_line(select, message, tmp_path):
    data = recipe_with(**select)
    data["model"]["source"] = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(prune.PruneError, match=message) as info:
        load_recipe(data)
    assert "\n" not in str(info.value)


def test_an_evaluate_section_for_the_proxy_task_alone_is_accepted(tmp_path):
    """evaluate.task_dirs / data_dir / batch_size alone serve search's proxy task (its own task folder): not
    "evaluate measures nothing"; without a proxy task that reads them they are refused as before."""
    data = recipe_with(strategy="search", budget=4, min_task_retained=0.9, proxy_task="copa")
    data["model"]["source"] = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    data["evaluate"] = {"data_dir": str(DATA)}
    assert load_recipe(data).evaluate.data_dir == str(DATA)
    data["select"] = {"strategy": "one_shot", "n_layers": 2}
    with pytest.raises(PruneError, match="evaluate.data_dir is read by lm-eval tasks"):
        load_recipe(data)


def test_recipe_round_trip_keeps_search_defaults_valid(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    data = recipe_with(strategy="contiguous", n_layers=2)
    data["model"]["source"] = str(tmp_path)
    recipe = load_recipe(data)
    import yaml

    assert load_recipe(yaml.safe_load(recipe.to_yaml())).select.strategy == "contiguous"  # saved defaults are not "given"


def test_run_recipe_with_search_end_to_end(tmp_path, tokenizers_by_bos):
    model = build_model("llama", redundant=(2, 5))
    folder = prune.save(model, tokenizers_by_bos[True], tmp_path / "tiny")
    data = copy.deepcopy(SEARCH_RECIPE)
    data["model"]["source"] = str(folder)
    data["output"]["dir"] = str(tmp_path / "out")
    from prune.pipeline.orchestrator import run

    result = run(data, quiet=True)
    sel = result.selection
    assert sel.strategy == "search" and {2, 5} <= set(sel.removed)
    assert sel.details["candidate_evaluations"] <= 8 and sel.details["final"]["ratio"] <= 1.2
    import json

    record = json.loads((result.out_dir / "pruning.json").read_text())
    assert record["selection"]["details"]["pareto"] and record["removed"] == sel.removed


def test_search_with_task_floor(tokenizers_by_bos):
    model, tok = build_model("llama", redundant=(3,)), tokenizers_by_bos[True]
    from conftest import DATA

    scores = prune.score(model, windows_for(tok), progress=False)
    before = fingerprint(model)
    proxy = ST.task_proxy(model, tok, "piqa", limit=16, batch_size=8, data_dir=str(DATA))
    sel = ST.search(model, scores, proxy, floor=0.5, higher_is_better=True, budget=2, order_by="bi", progress=False)
    assert_unchanged(model, before)
    assert sel.details["candidate_evaluations"] <= 2
    assert all(e["ok"] == (e["ratio"] >= 0.5) for e in sel.details["trace"])
    assert 0.0 <= sel.details["original"] <= 1.0
    # the proxy scores the model without those blocks: as lm-eval scores a copy with them removed
    from prune.measure.lmeval import evaluate_tasks

    pruned = copy.deepcopy(model)
    prune.remove_layers(pruned, [2, 3, 4])
    direct = evaluate_tasks(pruned, tok, ["piqa"], limit=16, batch_size=8, data_dir_path=str(DATA), progress=False)
    assert proxy([2, 3, 4]) == next(iter(direct.values()))["metrics"]["acc"]
    assert proxy([]) == sel.details["original"]


def test_run_recipe_with_a_task_floor(tmp_path, tokenizers_by_bos):
    """select.min_task_retained from a recipe: the task proxy built from the evaluate section's task data."""
    from conftest import DATA

    folder = prune.save(build_model("llama", redundant=(3,)), tokenizers_by_bos[True], tmp_path / "tiny")
    data = recipe_with(strategy="search", min_task_retained=0.01, proxy_task="piqa", proxy_limit=8, budget=2,
                       order_by="bi")
    data["model"]["source"], data["output"]["dir"] = str(folder), str(tmp_path / "out")
    data["evaluate"] = {"data_dir": str(DATA)}
    from prune.pipeline.orchestrator import run

    details = run(data, quiet=True).selection.details
    assert details["proxy"] == "piqa (limit 8)" and details["higher_is_better"] and details["floor"] == 0.01
    assert 1 <= details["candidate_evaluations"] <= 2 and details["trace"]


def test_resume_makes_a_search_selection_again_when_evaluate_changes(tmp_path, tokenizers_by_bos, monkeypatch):
    """search's proxy task reads the evaluate section's task data: a changed evaluate section makes its stored
    selection stale (the scores are kept), where a score-only strategy's selection is reused."""
    import json

    from conftest import DATA, WIKI_RAW
    from prune.pipeline.orchestrator import run

    folder = prune.save(build_model("llama", redundant=(3,)), tokenizers_by_bos[True], tmp_path / "tiny")
    data = recipe_with(strategy="search", min_task_retained=0.01, proxy_task="piqa", proxy_limit=8, budget=2,
                       order_by="bi")
    data["model"]["source"], data["output"]["dir"] = str(folder), str(tmp_path / "out")
    data["evaluate"] = {"data_dir": str(DATA)}
    monkeypatch.setenv("PRUNE_FAULT", "selected:interrupt")
    with pytest.raises(KeyboardInterrupt):
        run(data, quiet=True)
    monkeypatch.delenv("PRUNE_FAULT")
    data["evaluate"]["perplexity"] = {"path": str(WIKI_RAW), "rows": "300:600", "seq_len": 32, "max_windows": 2}
    run(data, quiet=True, resume=True)
    assert json.loads((tmp_path / "out" / "pruning.json").read_text())["resumed"] == ["scores"]


def test_a_proxy_task_scored_like_perplexity_is_refused(tokenizers_by_bos, tmp_path):
    """min_task_retained reads a task's headline as "higher is better": a task that reports only a
    perplexity (lm-eval marks it lower-is-better) let any removal that raised it pass the floor."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"page": t}) + "\n" for t in
                                                 ["the cat sat on the mat", "a dog ran in the park"]))
    (tmp_path / "tiny_ppl.yaml").write_text(yaml.safe_dump({
        "task": "tiny_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "docs.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{page}}",
        "metric_list": [{"metric": "word_perplexity"}], "metadata": {"version": 1.0}}))
    model, tok = build_model("llama"), tokenizers_by_bos[True]
    proxy = ST.task_proxy(model, tok, "tiny_ppl", limit=2, batch_size=2, task_dirs=[str(tmp_path)])
    with pytest.raises(PruneError, match="reports word_perplexity, where lower is better: select.min_task_retained"):
        proxy([])


def test_shipped_search_recipe_is_valid(smollm2_path, monkeypatch):
    from conftest import DATA, ROOT

    monkeypatch.setenv("SMOLLM2_GGUF", str(smollm2_path))
    monkeypatch.setenv("PRUNE_DATA_DIR", str(DATA))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-search.yaml")
    s = recipe.select
    assert s.strategy == "search" and s.max_perplexity_ratio > 1 and s.budget >= 1 and s.order_by


def test_task_proxy_reads_the_headline_metric_of_a_local_copy(tokenizers_by_bos):
    """hellaswag_local is scored by acc_norm, as hellaswag and every report: not by acc."""
    from conftest import DATA

    from prune.measure.lmeval import evaluate_tasks

    model, tok = build_model("llama"), tokenizers_by_bos[True]
    metrics = evaluate_tasks(model, tok, ["hellaswag_local"], limit=24, batch_size=8, data_dir_path=str(DATA),
                             progress=False)["hellaswag_local"]["metrics"]
    assert metrics["acc_norm"] != metrics["acc"]  # otherwise this could not tell them apart
    proxy = ST.task_proxy(model, tok, "hellaswag_local", limit=24, batch_size=8, data_dir=str(DATA))
    assert proxy([]) == metrics["acc_norm"]
