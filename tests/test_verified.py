"""The `verified` strategy: candidates from the scores, ranked by KL to the original on held-out windows."""

import pytest
import torch

import prune
from prune.choose.strategies import skip_blocks
from prune.choose.verified import candidate_sets, contiguous_runs, redundancy_families, verified
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


def test_budget_limits_local_search(setup):
    model, scores, held = setup
    sel = verified(model, scores, held, 3, budget=0, batch_size=2, progress=False)
    assert sel.details["local_search_evaluations"] == 0
    assert all(r["source"] != "local search" for r in sel.details["candidates"])


def test_verified_in_a_recipe(tiny_folder, tmp_path):
    recipe = tiny_recipe(tiny_folder, tmp_path / "out", select={"strategy": "verified", "n_layers": 2, "budget": 2,
                                                                "heldout_windows": 2})
    result = prune.run(recipe, quiet=True)
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
