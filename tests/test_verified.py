"""The `verified` strategy: candidates from the scores, ranked by KL to the original on held-out windows."""

import pytest
import torch

import prune
from prune import PruneError
from prune.choose.strategies import perplexity_proxy, skip_blocks
from prune.choose.verified import candidate_sets, contiguous_runs, margin_line, redundancy_families, verified
from prune.measure.fidelity import build_reference, measure_fidelity
from prune.model.loading import decoder_layers
from conftest import build_model, tiny_recipe, WIKI_RAW


@pytest.fixture(scope="module")
def setup(tokenizers_by_bos):
    model = build_model("llama", redundant=(3, 4))
    tok = tokenizers_by_bos[True]
    text = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:400"))
    windows = prune.calibration_windows(tok, text, 6, 32, seed=0)
    scores = prune.score(model, windows[:4], progress=False)
    return model, scores, windows[4:]


def test_candidates_cover_runs_one_shot_and_families(setup):
    model, scores, _ = setup
    cands = candidate_sets(scores, 2, [0, 7])
    assert all(len(c) == 2 and 0 not in c and 7 not in c for c in cands)
    assert set(map(tuple, contiguous_runs(8, 2, [0, 7]))) <= set(cands)
    sources = {src for found in cands.values() for src in found}
    assert {"contiguous angular", "one_shot bi", "one_shot angular", "contiguous run"} <= sources
    fams = redundancy_families(scores, 0.0)  # tau 0: every pair similar -> one family of all blocks
    assert fams == [list(range(8))]
    # protected blocks that cut every run of 4 (0, 4, 7 of 8): the non-contiguous candidates remain
    spread = candidate_sets(scores, 4, [0, 4, 7])
    assert spread and all(len(c) == 4 and not {0, 4, 7} & set(c) for c in spread)
    assert "contiguous angular" not in {src for found in spread.values() for src in found}


def test_verified_picks_the_lowest_kl_and_is_deterministic(setup):
    model, scores, held = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = verified(model, scores, held, 2, budget=4, batch_size=1, progress=False)
    b = verified(model, scores, held, 2, budget=4, batch_size=1, progress=False)
    assert a.removed == b.removed and a.details["candidates"] == b.details["candidates"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is left as it was
    table = a.details["candidates"]
    assert table[0]["removed"] == a.removed and all(r["kl_mean"] >= table[0]["kl_mean"] for r in table)
    assert a.details["local_search_evaluations"] <= 4
    assert a.details["evaluations"] == len(table)


def test_cached_inputs_equal_recomputation(setup):
    """The KL from cached block inputs equals a full forward of the pruned model."""
    model, scores, held = setup
    sel = verified(model, scores, held, 2, budget=0, batch_size=2, progress=False)
    ref = build_reference(model, held, top_k=256, batch_size=2)
    for row in sel.details["candidates"][:4]:
        with skip_blocks(model, row["removed"]):
            direct = measure_fidelity(model, ref, batch_size=2)["kl_mean"]
        assert abs(direct - row["kl_mean"]) < 1e-5 * max(1.0, direct), row


def test_per_window_kl_and_the_runner_up_margin(setup):
    """Each candidate's per-window KL equals a direct measure on that window alone; the runner-up's
    margin is Student's paired interval over those windows."""
    model, scores, held = setup
    sel = verified(model, scores, held, 2, budget=0, batch_size=2, progress=False)
    table = sel.details["candidates"]
    refs = [build_reference(model, held[w:w + 1], top_k=256, batch_size=1) for w in range(held.shape[0])]
    for row in table[:2]:
        assert len(row["kl_windows"]) == held.shape[0]
        assert abs(sum(row["kl_windows"]) / len(row["kl_windows"]) - row["kl_mean"]) < 1e-12  # equal tokens per window
        with skip_blocks(model, row["removed"]):
            for w, ref in enumerate(refs):
                direct = measure_fidelity(model, ref, batch_size=1)["kl_mean"]
                assert abs(direct - row["kl_windows"][w]) < 1e-5 * max(1.0, direct), (row["removed"], w)
    m = sel.details["runner_up"]
    chosen, other = table[0]["kl_windows"], table[1]["kl_windows"]
    d = [o - c for c, o in zip(chosen, other)]
    n = len(d)
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    half = 12.7062 * sd / n ** 0.5  # t(0.975, 1 degree of freedom): two held-out windows
    assert m["removed"] == table[1]["removed"] and m["windows"] == n == 2
    assert abs(m["difference"] - mean) < 1e-12 and abs(m["difference"] - (table[1]["kl_mean"] - table[0]["kl_mean"])) < 1e-12
    assert abs(m["ci_low"] - (mean - half)) < 1e-4 * half and abs(m["ci_high"] - (mean + half)) < 1e-4 * half
    assert m["separated"] == (m["ci_low"] > 0) and m["windows_lower"] == sum(x < 0 for x in d)
    line = margin_line(sel.details)
    assert " ".join(map(str, m["removed"])) in line and "2 held-out windows" in line
    assert ("includes 0" in line) != m["separated"]


def test_budget_limits_local_search(setup, capsys):
    model, scores, held = setup
    sel = verified(model, scores, held, 3, budget=0, batch_size=2, progress=False)
    assert sel.details["local_search_evaluations"] == 0
    assert all(r["source"] != "local search" for r in sel.details["candidates"])
    # the local search has its own progress bar (it ran silently after the candidates' bar had finished)
    capsys.readouterr()
    sel = verified(model, scores, held, 3, budget=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    done = sel.details["local_search_evaluations"]
    # printed in a notebook, a Selection is one line (it printed every candidate's per-window KL)
    assert repr(sel) == (f"Selection(removed={sel.removed} of {sel.n_layers} blocks, strategy=verified by {sel.metric}, "
                         f"details: {', '.join(sel.details)}; the full record: .to_dict())") and len(repr(sel)) < 400
    assert 0 < done <= 2 and f"verified: local search: {100 * done // 2:3d}%" in err.replace("\r", "\n"), err[-500:]


def test_api_misuse_is_one_line(setup, tokenizers_by_bos):
    """From Python: no held-out windows (ZeroDivisionError), None (AttributeError), the tokenizer in the model's
    place (AttributeError), a CKA batch larger than the windows given (accepted, silently another measure)."""
    from prune import PruneError

    model, scores, held = setup
    for bad in (held[:0], None):
        with pytest.raises(PruneError, match="verified ranks its candidates on held-out windows"):
            verified(model, scores, bad, 2, progress=False)
    with pytest.raises(PruneError, match="n_heldout=0: held-out windows are a whole number, at least 1"):
        prune.heldout_windows(tokenizers_by_bos[True], "some text", 4, 16, n_heldout=0)
    with pytest.raises(PruneError, match="the model to score is a .*, not a model: give the loaded model"):
        prune.score(tokenizers_by_bos[True], held, progress=False)
    with pytest.raises(PruneError, match="cka_windows 100 pools more windows into one CKA batch than the 2 given"):
        prune.score(model, held, cka_windows=100, progress=False)
    # top_k=0 made every KL 0 and chose the first candidate; scores of another stack were ranked as this one's
    tok = tokenizers_by_bos[True]
    six = prune.score(build_model("llama", num_hidden_layers=6), held, progress=False)
    for call, said in (
            (lambda: verified(model, scores, held, 2, top_k=0, progress=False), "verified: top_k=0 must be a whole number, at least 1"),
            (lambda: verified(model, scores, held, 2, batch_size=0, progress=False), "verified: batch_size=0 must be"),
            (lambda: verified(model, scores, held, 2, budget=-1, progress=False), "verified: budget=-1 must be a whole number, at least 0"),
            (lambda: verified(model, scores, held + 10**6, 2, progress=False), "outside the model's vocabulary"),
            (lambda: verified(tok, scores, held, 2, progress=False), "verified: the model is a .*, not a model"),
            (lambda: verified(model, scores.to_dict(), held, 2, progress=False), "verified: scores must be what prune.score returns"),
            (lambda: verified(model, six, held, 2, progress=False), "verified: the scores describe 6 blocks but the model has 8"),
            (lambda: prune.search(model, six, perplexity_proxy(model, held), floor=1.5, higher_is_better=False,
                                  budget=4, progress=False), "search: the scores describe 6 blocks but the model has 8"),
            (lambda: prune.search(model, scores, None, floor=1.5, higher_is_better=False, budget=4, progress=False),
             "search: proxy must be a function of the removed blocks"),
            (lambda: prune.iterative(model, held, 2, scores=six, progress=False), "iterative: the scores describe 6 blocks"),
            (lambda: prune.sleb(model, held, 2, batch_size=0, progress=False), "sleb: batch_size=0 must be a whole number")):
        with pytest.raises(PruneError, match=said):
            call()


def test_verified_in_a_recipe(tiny_folder, tmp_path, capsys):
    recipe = tiny_recipe(tiny_folder, tmp_path / "out", select={"strategy": "verified", "n_layers": 2, "budget": 2,
                                                                "heldout_windows": 2})
    result = prune.run(recipe, quiet=False)
    details = result.pruning.selection["details"]
    assert margin_line(details) in capsys.readouterr().err  # the run says how far the runner-up is behind
    assert result.selection.strategy == "verified" and len(result.selection.removed) == 2
    assert result.pruning.selection["details"]["candidates"]
    assert len(decoder_layers(prune.load(result.out_dir)[0])) == 6
    # the report shows every candidate's KL (table, plot) and what the choice cost
    from prune.export.report import report_run

    folder = report_run(result.out_dir)
    text = (folder / "report.md").read_text()
    assert "Verified: candidate sets ranked by KL" in text and "full-model passes" in text
    assert (folder / "candidates.png").stat().st_size > 1000
    best = result.pruning.selection["details"]["candidates"][0]
    assert f"| 1 | {' '.join(map(str, best['removed']))} |" in text
    m = details["runner_up"]  # the runner-up's row carries its paired difference, and the margin is stated
    assert f"| {m['difference']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}] |" in text
    assert margin_line(details) in text
    card = (result.out_dir / "README.md").read_text()  # and the model card says how clearly the chosen set won
    assert f"the runner-up ({' '.join(map(str, m['removed']))}) had a mean KL higher by {m['difference']:+.4f}" in card
    # the Python API reaches the recipes' default too (prune.verified was not exported): README's lines, the same set
    model, tok, _ = prune.load(tiny_folder, dtype="float32")
    c = recipe["calibration"]
    text = prune.load_text(prune.TextSource(c["path"], rows=c["rows"]))
    windows = prune.calibration_windows(tok, text, n_samples=c["n_samples"], seq_len=c["seq_len"], seed=0)
    held = prune.heldout_windows(tok, text, n_samples=c["n_samples"], seq_len=c["seq_len"], seed=0, n_heldout=2)
    scores = prune.score(model, windows, batch_size=c["batch_size"], progress=False)
    assert prune.verified(model, scores, held, 2, budget=2, progress=False).removed == result.selection.removed


def test_a_recipe_may_skip_verifieds_local_search(tiny_folder, tmp_path):
    """``verified(..., budget=0)`` skips the local search; a recipe's ``select.budget: 0`` was refused ("greater than
    or equal to 1"). search with budget 0 would evaluate nothing: refused in one line."""
    from prune.pipeline.recipe import load_recipe

    recipe = tiny_recipe(tiny_folder, tmp_path / "out", select={"strategy": "verified", "n_layers": 2, "budget": 0,
                                                                "heldout_windows": 2})
    assert load_recipe(recipe).select.verified_budget() == 0
    details = prune.run(recipe, quiet=True).pruning.selection["details"]
    assert details["local_search_evaluations"] == 0 and all(r["source"] != "local search" for r in details["candidates"])
    recipe["select"] = {"strategy": "search", "n_layers": 2, "max_perplexity_ratio": 2.0, "budget": 0}
    with pytest.raises(PruneError, match="search with budget 0 evaluates no set"):
        load_recipe(recipe)
