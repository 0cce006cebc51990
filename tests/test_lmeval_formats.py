"""A run's lm-eval results are lm-eval's own files: read back with lm-eval's helpers, same numbers."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, prune_main, tiny_recipe


@pytest.fixture(scope="module")
def run_with_tasks(tiny_folder, tmp_path_factory):
    from prune.pipeline.orchestrator import run

    recipe = tiny_recipe(tiny_folder, tmp_path_factory.mktemp("run") / "out")
    recipe["evaluate"].update(tasks=["arc_easy", "copa"], limit=12, data_dir=str(DATA))
    return run(recipe, quiet=True)


def test_run_writes_lm_eval_results_and_samples(run_with_tasks):
    from lm_eval.utils import (
        get_file_task_name,
        get_latest_filename,
        get_results_filenames,
        get_sample_results_filenames,
        make_table,
    )

    out = run_with_tasks.out_dir
    data = json.loads((out / "eval.json").read_text())
    files = [str(p) for p in (out / "eval").rglob("*") if p.is_file()]
    for which in ("original", "pruned"):
        mine = [f for f in files if f"/eval/{which}/" in f]
        results = json.loads(open(get_latest_filename(get_results_filenames(mine))).read())
        assert results["model_name_sanitized"] == which and results["n-shot"]["arc_easy_local"] == 0
        assert set(results["task_hashes"]) == {"arc_easy_local", "copa_local"} and results["configs"]["copa_local"]
        for task in ("arc_easy_local", "copa_local"):
            for metric, value in data[which]["tasks"][task]["metrics"].items():
                assert results["results"][task][f"{metric},none"] == pytest.approx(value)
        samples = {get_file_task_name(f.rsplit("/", 1)[1]): f for f in get_sample_results_filenames(mine)}
        assert set(samples) == {"arc_easy_local", "copa_local"}
        import datasets  # the way the Hub's lm-eval "details" datasets are read

        rows = datasets.load_dataset("json", data_files=samples["arc_easy_local"], split="train")
        assert len(rows) == 12
        assert sum(rows["acc"]) / 12 == pytest.approx(data[which]["tasks"]["arc_easy_local"]["metrics"]["acc"])
        assert "arc_easy_local" in make_table(results)
        # what each task scored, from its lm-eval config (the model-index names it for a task it does not know)
        config = results["configs"]["copa_local"]
        assert data[which]["tasks"]["copa_local"]["dataset"] == {
            "path": config["dataset_path"], "name": config.get("dataset_name"),
            "split": config.get("test_split") or config["validation_split"]}
    # the paired comparison of the same examples, in eval.json and eval.md
    paired = {(p["task"], p["metric"]): p for p in data["paired"]}
    acc = paired[("arc_easy_local", "acc")]
    assert acc["n"] == 12 and acc["mean_a"] == pytest.approx(data["original"]["tasks"]["arc_easy_local"]["metrics"]["acc"])
    assert acc["right_to_wrong"] + acc["wrong_to_right"] <= 12
    assert "## Paired: pruned against original" in (out / "eval.md").read_text()
    assert "lm_eval_files" not in data["original"] and "lm_eval_files" not in data["pruned"]


def test_compare_a_run_folder(run_with_tasks):

    proc = prune_main("compare", run_with_tasks.out_dir, "--iters", 500, check_rc=0)
    assert "| copa_local | acc | 12 |" in proc.stdout and "pruned - original" in proc.stdout


def test_lm_eval_s_direction_of_a_metric_reaches_the_table(run_with_tasks):
    """lm-eval marks each metric higher- or lower-is-better (perplexity, bits per byte: lower); the
    before/after table shows a lower-is-better row as a factor, not as "% retained" (a perplexity 4x
    worse read "400.0%"). Read from the run's own results file, one metric's direction flipped."""
    from lm_eval.utils import get_latest_filename, get_results_filenames

    from prune.core.tables import comparison_markdown, comparison_rows
    from prune.measure.lmeval import summarize

    out = run_with_tasks.out_dir
    data = json.loads((out / "eval.json").read_text())
    assert data["pruned"]["tasks"]["copa_local"]["lower_is_better"] == []  # acc: higher is better
    runs = {}
    for which in ("original", "pruned"):
        files = [str(p) for p in (out / "eval" / which).iterdir()]
        results = json.loads(open(get_latest_filename(get_results_filenames(files))).read())
        results["higher_is_better"]["copa_local"]["acc"] = False  # as lm-eval marks perplexity
        runs[which] = {"tasks": summarize(results)}
    assert runs["pruned"]["tasks"]["copa_local"]["lower_is_better"] == ["acc"]
    rows = comparison_rows(runs["original"], runs["pruned"], {"params_before": 2, "params_after": 1,
                                                               "layers_before": 8, "layers_after": 6})
    row = next(r for r in rows if r["name"] == "copa_local")
    assert row["lower_is_better"] and f"| x{row['retained']:.2f} |" in comparison_markdown([row])


def test_report_of_a_run_with_tasks_keeps_only_the_before_after_table(run_with_tasks, tmp_path):
    """eval.md holds the before/after table, then the paired and lm-eval tables (other columns): the
    report's "Utility before / after" is the first alone (it took every `|` line: pairs under "original")."""
    from prune.export.report import report_run

    out = run_with_tasks.out_dir
    assert "## Paired" in (out / "eval.md").read_text()
    md = (report_run(out, tmp_path / "rep") / "report.md").read_text()
    section = md.split("Utility before / after", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    data = json.loads((out / "eval.json").read_text())
    assert len(rows) == 2 + len(data["rows"])  # header, separator, one line per row of eval.json
    assert "| Tasks |" not in section and "right->wrong" not in section


def test_each_answer_filter_is_its_own_metric_in_the_summary(tokenizers_by_bos, tmp_path):
    """A task scored through two answer filters (gsm8k's strict-match and flexible-extract) reports each:
    ``exact_match,<filter>``, as the paired table names them (the old summary kept the last filter's under
    ``exact_match``, in eval.json, the before/after table and the card)."""
    from conftest import build_model

    from prune.measure.lmeval import evaluate_tasks

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"q": f"question {i}", "a": "yes"}) + "\n" for i in range(3)))
    filters = "".join(f"""
  - name: always-{answer}
    filter:
      - function: regex
        regex_pattern: "(ZZZZ_never)"
        fallback: "{answer}"
      - function: take_first""" for answer in ("yes", "no"))
    (tmp_path / "two_filters.yaml").write_text(f"""task: two_filters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "rows.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 2, do_sample: false}}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:{filters}
""")
    model, tok = build_model("llama"), tokenizers_by_bos[True]
    res = evaluate_tasks(model, tok, ["two_filters"], task_dirs=[str(tmp_path)], progress=False)
    metrics = res["two_filters"]["metrics"]
    assert metrics == {"exact_match,always-yes": 1.0, "exact_match,always-no": 0.0}
    assert set(res["two_filters"]["stderr"]) == set(metrics)
    from prune.choose.strategies import task_proxy  # no acc: the search's proxy reads the first filter's (it read None)

    assert task_proxy(model, tok, "two_filters", limit=2, task_dirs=[str(tmp_path)])([3]) == 1.0
