"""prune.run end to end on a fixture model, with lm-eval on local task copies."""

import json

import pytest

import prune
from prune.core.tables import comparison_markdown
from prune.pipeline.orchestrator import run

from conftest import DATA, tiny_recipe


def test_run_evaluates_before_and_after_with_lm_eval(tmp_path, tiny_folder):
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["evaluate"].update({"tasks": ["copa", "piqa"], "data_dir": str(DATA), "limit": 8, "batch_size": 4})
    result = run(recipe, quiet=True)
    assert result.selection.removed == [3, 4]  # the planted near-identity blocks
    ev = result.evaluation
    # local copies are reported under their own names
    assert set(ev["original"]["tasks"]) == set(ev["pruned"]["tasks"]) == {"copa_local", "piqa_local"}
    for task in ("copa_local", "piqa_local"):
        assert ev["pruned"]["tasks"][task]["n"] == 8
    rows = {(r["name"], r["metric"]): r for r in ev["rows"]}
    piqa = rows[("piqa_local", "acc")]
    if piqa["original"]:
        assert piqa["retained"] == pytest.approx(piqa["pruned"] / piqa["original"])
    assert rows[("layers", "count")]["original"] == 8 and rows[("layers", "count")]["pruned"] == 6
    assert ev["settings"]["limit"] == 8 and ev["settings"]["batch_size"] == 4 and "lm_eval" in ev["settings"]["versions"]
    md = (result.out_dir / "eval.md").read_text()
    assert "| copa_local | acc |" in md and "| parameters | count |" in md
    saved = json.loads((result.out_dir / "eval.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(ev["rows"]))
    # the card carries the paired comparison too (it showed "retained" alone, with no interval): each task's
    # headline difference with its interval, from eval.json's paired rows, and their average
    card = (result.out_dir / "README.md").read_text()
    acc = [r for r in saved["paired"] if r["metric"] == "acc"]
    assert len(acc) == 2  # copa and piqa
    for row in acc:
        assert (f"- {row['task']} (acc): {100 * row['diff']:+.2f} points, 95% interval [{100 * row['ci_low']:+.2f}, "
                f"{100 * row['ci_high']:+.2f}] over 8 examples") in card
    assert "Paired over the same questions" in card and "Average over 2 tasks (one headline metric each): pruned - " \
        "original" in card and "± is a\nstandard error" in card


def test_scores_in_pruning_json_reproduce_the_choice(tmp_path, tiny_folder):
    result = run(tiny_recipe(tiny_folder, tmp_path / "o", evaluate=None), quiet=True)
    pruning = json.loads((result.out_dir / "pruning.json").read_text())
    scores = prune.ScoreResult.from_dict(pruning["scores_before"])
    again = prune.select(scores, 2, metric="bi")
    assert again.removed == pruning["removed"]
    assert pruning["scores_after"]["n_layers"] == 6


def test_comparison_table_format():
    rows = [{"name": "perplexity", "metric": "ppl", "original": 20.0, "pruned": 50.0, "retained": 2.5,
             "stderr_original": None, "stderr_pruned": None, "lower_is_better": True},
            {"name": "piqa", "metric": "acc", "original": 0.6, "pruned": 0.57, "retained": 0.95,
             "stderr_original": 0.01, "stderr_pruned": 0.01, "lower_is_better": False}]
    md = comparison_markdown(rows)
    assert "| perplexity | ppl | 20.00 | 50.00 | x2.50 |" in md
    assert "| piqa | acc | 0.6000 ± 0.0100 | 0.5700 ± 0.0100 | 95.0% |" in md


def test_a_run_without_tasks_never_imports_lm_eval(tmp_path, tiny_folder):
    """Perplexity only: lm-eval is not imported (a GPU image without it ran such recipes into
    ModuleNotFoundError), and the output is complete."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = tmp_path / "recipe.json"  # YAML is a superset of JSON
    recipe.write_text(json.dumps(tiny_recipe(tiny_folder, tmp_path / "out")))
    code = ("import sys, prune; prune.run(sys.argv[1], quiet=True); "
            "print('lm_eval' in sys.modules, 'lm_eval.utils' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
    assert (tmp_path / "out" / "pruning.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()


def test_eval_md_of_a_second_step_says_what_original_means(tmp_path, tiny_folder):
    """A pruned model pruned again: eval.md's "original" column (and its "KL to original" row) is the model this step
    loaded; the card said so, eval.md did not."""
    first = run(tiny_recipe(tiny_folder, tmp_path / "one"), quiet=True).out_dir
    assert "step-1 model" not in (first / "eval.md").read_text()
    second = run(tiny_recipe(first, tmp_path / "two", select={"strategy": "one_shot", "metric": "bi", "n_layers": 1}),
                 quiet=True).out_dir
    assert ('"original" below is the model this step loaded, the step-1 model of the lineage'
            in (second / "eval.md").read_text())
