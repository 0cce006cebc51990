"""The redundancy report (prune report) on a tiny real model and on a run folder."""

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import prune
from prune.export.report import cka_heatmap, report_run
from prune.pipeline.commands import report_scores
from prune.measure.scoring import ScoreResult

from conftest import WIKI_RAW, build_model, prune_main, scores_from

PNGS_RUN = ["cka_original.png", "cka_pruned.png", "blocks_original.png", "blocks_pruned.png", "pareto.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizers_by_bos):
    """A real ``prune run`` output folder: tiny Llama with planted redundancy, search strategy."""
    from prune.pipeline.orchestrator import run

    tmp = tmp_path_factory.mktemp("report")
    folder = prune.save(build_model("llama", redundant=(2, 5)), tokenizers_by_bos[True], tmp / "tiny")
    recipe = {
        "model": {"source": str(folder)},
        "calibration": {"path": str(WIKI_RAW), "rows": "0:400", "n_samples": 6, "seq_len": 48, "batch_size": 4},
        "select": {"strategy": "search", "max_perplexity_ratio": 1.2, "budget": 6, "order_by": "msrs"},
        "output": {"dir": str(tmp / "run")},
    }
    return run(recipe, quiet=True).out_dir


@pytest.mark.parametrize("flags, named", [
    (["--n-layers", "3"], "--n-layers has no effect on a run folder"),
    (["--strategy", "one_shot", "--metric", "bi", "--seq-len", "16"], "--strategy, --metric, --seq-len have no effect"),
])
def test_report_of_a_run_folder_refuses_model_report_flags(run_dir, tmp_path, flags, named):
    """A run folder's report shows what its run chose: the flags of a model's report would be ignored."""
    proc = prune_main("report", run_dir, "-o", tmp_path / "rep", *flags, check_rc=2)
    assert proc.stderr.count("\n") == 1 and named in proc.stderr and "give --data" in proc.stderr, proc.stderr
    assert not (tmp_path / "rep").exists()


def test_report_of_a_folder_near_a_run_names_the_run(run_dir, tmp_path):
    """prune report on the folder of runs, or a folder inside a run: it said only 'give --data to score it'."""
    proc = prune_main("report", run_dir.parent, "-o", tmp_path / "r1", check_rc=2)
    assert f"is not a run folder (no pruning.json); run folders in it: {run_dir.name}: give --data" in proc.stderr
    inner = tmp_path / "copy" / "eval"
    inner.mkdir(parents=True)
    (tmp_path / "copy" / "pruning.json").write_text((run_dir / "pruning.json").read_text())
    proc = prune_main("report", inner, "-o", tmp_path / "r2", check_rc=2)
    assert f"; the run folder above it: {tmp_path / 'copy'}: give --data" in proc.stderr, proc.stderr


def check_png(path, min_px=300, max_px=3000):
    with Image.open(path) as im:
        im.load()
        w, h = im.size
    assert min_px <= w <= max_px and min_px <= h <= max_px, (path.name, im.size)


def test_report_of_a_run_folder(run_dir, tmp_path):
    out = report_run(run_dir, tmp_path / "rep")
    record = json.loads((run_dir / "pruning.json").read_text())
    for name in ["report.md", "report.html", "report.json", *PNGS_RUN]:
        assert (out / name).is_file() and (out / name).stat().st_size > 200, name
    for name in PNGS_RUN:
        check_png(out / name)
    # the HTML is self-contained: every image embedded, and each decodes to a PNG
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(PNGS_RUN) and "src=\"http" not in page
    for data in embedded:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    md = (out / "report.md").read_text()
    for name in PNGS_RUN:
        assert f"]({name})" in md
    before = ScoreResult.from_dict(record["scores_before"])
    after = ScoreResult.from_dict(record["scores_after"])
    assert f"{before.msrs['total']:.3f}" in md and f"{after.msrs['total']:.3f}" in md and "beta" in md
    assert str(record["removed"]) in md
    # the pruned model's plots name its blocks by their original index (they were renumbered 0..n-1)
    assert "![pruned model (blocks by original index)](cka_pruned.png)" in md
    from prune.export.report import block_chart

    kept = [str(i) for i in record["kept"]]
    fig = block_chart(ScoreResult.from_dict(record["scores_after"]), 2, "t", labels=kept, axis="block (original index)")
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == kept
    assert fig.axes[-1].get_xlabel() == "block (original index)"
    # the heatmaps show exactly the CKA matrices recorded in pruning.json
    data = json.loads((out / "report.json").read_text())
    assert data["cka_original"] == before.cka_matrix and data["cka_pruned"] == after.cka_matrix
    assert data["removed"] == record["removed"]
    assert [int(row[0]) for row in data["pareto"]] == [p["n"] for p in record["selection"]["details"]["pareto"]]
    fig = cka_heatmap(before.cka_matrix, before.msrs["tau"], "t", record["removed"])
    shown = fig.axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(shown), np.array(before.cka_matrix))
    n_above = sum(1 for i, row in enumerate(before.cka_matrix) for j, v in enumerate(row) if i != j and v > before.msrs["tau"])
    outlined = sum(len(c.get_paths()) for c in fig.axes[0].collections)
    n = before.n_layers
    # most pairs above tau (this tiny model's 61%): no mesh of boxes over the colours, their share said instead
    assert n_above / (n * (n - 1)) > 0.5 and outlined == 0
    assert f"{n_above / (n * (n - 1)):.0%} of pairs" in " ".join(t.get_text() for t in fig.texts)


def test_cli_report_run_folder_and_model(run_dir, tmp_path):
    res = prune_main("report", str(run_dir), "-o", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "a" / "report.html").is_file()
    assert (tmp_path / "a" / "report.md").read_text().startswith(f"# Redundancy report: tiny → {run_dir.name}\n")  # not -&gt;
    again = prune_main("report", str(run_dir), "-o", str(tmp_path / "a"))
    assert again.returncode == 2 and "already exists (choose another --output or pass --overwrite)" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    # a model: scored first, like prune score; the strategy's blocks marked
    model_dir = run_dir.parent / "tiny"
    res = prune_main("report", str(model_dir), "--data", str(WIKI_RAW), "--rows", "0:400", "--n-samples", "4", "--seq-len", "48",
              "--strategy", "one_shot", "--metric", "bi", "--n-layers", "2", "--protect", "0,2,-1", "-o",
              str(tmp_path / "m"), "-q")
    assert res.returncode == 0, res.stderr
    marked = json.loads((tmp_path / "m" / "report.json").read_text())["removed"]
    assert len(marked) == 2 and 5 in marked and not {0, 2, 7} & set(marked)  # 2 and 5 are planted: --protect kept 2
    md = (tmp_path / "m" / "report.md").read_text()
    assert "strategy `one_shot`, metric `bi`: would remove 2 of 8 blocks" in md  # a model's report removes nothing
    assert "removes" not in md
    for name in ["cka_original.png", "blocks_original.png"]:
        check_png(tmp_path / "m" / name)
    assert not (tmp_path / "m" / "cka_pruned.png").exists()
    bad = prune_main("report", str(model_dir), "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and "give --data" in bad.stderr and not (tmp_path / "x").exists()
    # the same scores from a file of prune score -o: the same report, nothing scored again (nothing read it)
    scored = ["--data", str(WIKI_RAW), "--rows", "0:400", "--n-samples", "4", "--seq-len", "48"]
    assert prune_main("score", str(model_dir), *scored, "-o", str(tmp_path / "s.json"), "-q").returncode == 0
    marking = ["--strategy", "one_shot", "--metric", "bi", "--n-layers", "2", "--protect", "0,2,-1"]
    res = prune_main("report", str(tmp_path / "s.json"), *marking, "-o", str(tmp_path / "f"))
    assert res.returncode == 0, res.stderr
    from_file = json.loads((tmp_path / "f" / "report.json").read_text())
    assert from_file == json.loads((tmp_path / "m" / "report.json").read_text()) and from_file["removed"] == marked
    refused = prune_main("report", str(tmp_path / "s.json"), "--seq-len", "64", "-o", str(tmp_path / "g"))
    assert refused.returncode == 2 and "--seq-len has no effect on a scores file" in refused.stderr
    tail = prune_main("report", str(tmp_path / "s.json"), "--strategy", "tail", "--n-layers", "2", "-o", str(tmp_path / "t"))
    assert tail.returncode == 0, tail.stderr  # the --metric default is not passed to a strategy that reads none
    assert json.loads((tmp_path / "t" / "report.json").read_text())["removed"] == [5, 6]
    with pytest.raises(prune.PruneError, match="metric 'bi' is read only by strategy one_shot here; tail reads no metric"):
        report_scores(tmp_path / "s.json", tmp_path / "u", strategy="tail", metric="bi", n_layers=2)
    assert not (tmp_path / "u").exists()
    # a metric the file lacks: the file is named (it blamed a --metrics flag nobody gave)
    assert prune_main("score", str(model_dir), *scored, "--metrics", "bi", "-o", str(tmp_path / "bi.json"), "-q").returncode == 0
    refused = prune_main("report", str(tmp_path / "bi.json"), "--strategy", "one_shot", "--metric", "cka", "-o",
                         str(tmp_path / "g"))
    assert refused.returncode == 2 and f"--metric cka reads the cka scores, but {tmp_path / 'bi.json'} holds bi (score " \
        "again with cka)" in refused.stderr, refused.stderr
    (tmp_path / "other.json").write_text('{"removed": [1]}')
    refused = prune_main("report", str(tmp_path / "other.json"), "-o", str(tmp_path / "g"))
    assert refused.returncode == 2 and "is not a scores file written by `prune score -o`" in refused.stderr


def test_report_of_a_second_step_names_original_blocks_and_a_hand_removal_says_how_to_report_it(run_dir, tmp_path):
    """A run on an already pruned folder scores that folder's blocks: the report shows the original model's
    indices beside them (it printed the step's own indices as the original's); a folder whose blocks were
    removed as given holds no scores: one line that says to score it as a model, which --data then does."""
    from prune.export.report import healed_by
    from prune.pipeline.orchestrator import run

    second = run({"model": {"source": str(run_dir)},
                  "calibration": {"path": str(WIKI_RAW), "rows": "0:400", "n_samples": 4, "seq_len": 48, "batch_size": 4},
                  "select": {"strategy": "one_shot", "metric": "bi", "n_layers": 1, "protect": []}, "output": {"dir": str(tmp_path / "two")}},
                 quiet=True).out_dir
    record = json.loads((second / "pruning.json").read_text())
    assert record["step"] == 2 and record["removed_original"] != record["removed"]
    out = report_run(second, tmp_path / "rep")
    md, data = (out / "report.md").read_text(), json.loads((out / "report.json").read_text())
    assert f"in the original model the removed blocks are {record['removed_original']}" in md
    assert f"kept_original = {record['kept_original']}" in md and "![before step 2](cka_original.png)" in md
    assert data["removed_original"] == record["removed_original"] and data["step"] == 2
    # the MSRS contributions name blocks as the plots label them: by the original model's index
    line = next(x for x in md.splitlines() if x.startswith("largest contributions"))
    first_kept = json.loads((run_dir / "pruning.json").read_text())["kept_original"]
    c = record["scores_before"]["msrs"]["contributions"]
    top = sorted(range(len(c)), key=lambda i: -c[i])[:5]
    assert "(blocks numbered as in the original model)" in line
    assert [int(b) for b in re.findall(r"block (\d+)", line)] == [first_kept[i] for i in top]
    hand = prune_main("remove", str(run_dir.parent / "tiny"), "--blocks", "0", "-o", str(tmp_path / "hand"))
    assert hand.returncode == 0, hand.stderr
    bad = prune_main("report", str(tmp_path / "hand"), "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--data TEXT" in bad.stderr
    good = prune_main("report", str(tmp_path / "hand"), "--data", str(WIKI_RAW), "--rows", "0:400", "--n-samples", "2",
                      "--seq-len", "32", "-q", "-o", str(tmp_path / "scored"))
    assert good.returncode == 0, good.stderr
    assert healed_by({"healing": {"method": "distill", "settings": {"params": "lora"}}}) == "distill (lora)"
    assert healed_by({"healing": None}) is None


def test_a_model_pruned_to_one_block_has_no_pair_and_says_so(tmp_path, tokenizers_by_bos):
    """One block left has no block pair: its MSRS per pair is None in pruning.json, the card, the report and the
    scores' summary say "no pair" (the card said "0.00 over 0 pairs (nan per pair)", and rendering it again from
    the folder's pruning.json, where NaN had become null, raised a TypeError)."""
    from prune.export.card import render_card
    from prune.core.records import read_record
    from prune.pipeline.orchestrator import run

    folder = prune.save(build_model("llama"), tokenizers_by_bos[True], tmp_path / "tiny")
    out = run({"model": {"source": str(folder)},
               "calibration": {"path": str(WIKI_RAW), "rows": "0:400", "n_samples": 2, "seq_len": 32, "batch_size": 2},
               "select": {"strategy": "one_shot", "metric": "bi", "n_layers": 7, "protect": []},
               "output": {"dir": str(tmp_path / "one")}}, quiet=True).out_dir
    record = json.loads((out / "pruning.json").read_text())
    assert record["layers_after"] == 1 and record["msrs_after"]["per_pair"] is None
    card = (out / "README.md").read_text()
    assert "(one block: no pair) after" in card and "nan" not in card.lower()
    again = render_card(read_record(out / "pruning.json"), recipe_yaml=(out / "recipe.yaml").read_text())
    assert "(one block: no pair) after" in again
    md = (report_run(out, tmp_path / "rep") / "report.md").read_text()
    assert "nan" not in md.lower() and "| pruned | 1 |" in md
    assert "MSRS = 0.000 (one block: no pair)" in ScoreResult.from_dict(record["scores_after"]).table()


def test_every_removed_block_keeps_its_red_tick_in_a_deep_model():
    """Above 32 blocks only every 2nd tick is drawn; a removed block without one had no mark at all; the last
    block keeps its label (block 39 of 40 had none)."""
    S = np.eye(40).tolist()
    fig = cka_heatmap(S, 0.8, "t", marked=[3, 7, 33])
    red = sorted(int(lab.get_text()) for lab in fig.axes[0].get_xticklabels() if lab.get_color() == "#d62728")
    assert red == [3, 7, 33] and "39" in [lab.get_text() for lab in fig.axes[0].get_xticklabels()]


def test_the_search_plot_rings_its_choice_and_reads_a_narrow_range(run_dir):
    """The proxy ratios of a search (here 0.84 to 1.25) on a log axis showed one labelled tick; the chosen set was
    not marked."""
    from prune.export.report import pareto_figure

    details = json.loads((run_dir / "pruning.json").read_text())["selection"]["details"]
    fig = pareto_figure(details, "t")
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and len([t for t in ax.get_yticklabels() if t.get_text()]) >= 3
    handles, names = ax.get_legend_handles_labels()
    ringed = handles[names.index("chosen")].get_offsets()[0]
    assert ringed[0] == len(json.loads((run_dir / "pruning.json").read_text())["removed"])  # the set the run chose
    wide = {**details, "trace": [{**e, "ratio": e["ratio"] * (50 if e["n"] > 3 else 1)} for e in details["trace"]]}
    assert pareto_figure(wide, "t").axes[0].get_yscale() == "log"


def test_deep_models_plots_stay_readable():
    """An 80-block chart was 3,146 px wide (shown at ~4 pt in the HTML), and a deep heatmap a mesh of red boxes
    (every pair above tau outlined); a few outlined cells in a small model are still drawn."""
    from prune.export.report import CHART_MAX_WIDTH, block_chart

    L = 80
    rng = np.random.default_rng(0)
    S = (0.9 + 0.1 * np.eye(L)).tolist()
    fig = cka_heatmap(S, 0.8, "t")
    assert not fig.axes[0].collections and "100% of pairs have CKA > tau = 0.8" in fig.texts[0].get_text()
    few = np.eye(L) * 0.5 + 0.4  # a deep stack where only a few pairs pass tau: no outlines either (too small to see)
    for i in range(0, L - 1, 2):
        few[i, i + 1] = few[i + 1, i] = 0.95
    fig = cka_heatmap(few.tolist(), 0.8, "t")
    assert not fig.axes[0].collections and "1% of pairs have CKA > tau = 0.8" in fig.texts[0].get_text()
    small = np.eye(8) * 0.5 + 0.4
    small[2, 3] = small[3, 2] = 0.95
    fig = cka_heatmap(small.tolist(), 0.8, "t")
    assert sum(len(c.get_paths()) for c in fig.axes[0].collections) == 2
    scores = scores_from(rng.random(L), angular=np.eye(L + 1).tolist())
    assert block_chart(scores, 4, "t").get_size_inches()[0] == CHART_MAX_WIDTH


def test_write_report_refuses_a_count_or_selection_the_scores_cannot_hold(run_dir, tmp_path):
    """k=100 of 8 blocks was accepted (the d(l, k) chart dropped without a word); a selection of another model
    raised IndexError; kept=[0, 99] labelled the pruned model's blocks with blocks the scores do not have."""
    scores = ScoreResult.from_dict(json.loads((run_dir / "pruning.json").read_text())["scores_before"])
    for kwargs, message in ((dict(k=100), r"k=100: the report marks runs of 1 to 7 blocks of these 8"),
                            (dict(k=0), "k=0"),
                            (dict(selection=prune.Selection([10, 11], 12, "x")), "the selection is of 12 blocks"),
                            (dict(kept=[0, 99]), re.escape("kept=[0, 99] must give the index, among these scores' 8")),
                            (dict(kept=[3, 1]), re.escape("kept=[3, 1] must give")), (dict(kept=[1.5]), "kept=")):
        with pytest.raises(prune.PruneError, match=message):
            prune.write_report(tmp_path / "r", scores, **kwargs)
    assert not (tmp_path / "r").exists()
    with pytest.raises(prune.PruneError, match="needs the ScoreResult of prune.score, got NoneType"):
        prune.write_report(tmp_path / "r", None)


def test_hand_edited_records_give_one_line_or_leave_the_table_out(run_dir, tmp_path):
    """A parent's eval.json rows without the optional keys (hand-written) are shown; rows that are not a
    table are left out of the card (prune remove crashed after writing the weights with KeyError); a
    tampered pruning.json is one line from prune report (KeyError / IndexError tracebacks before)."""
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(run_dir, parent)
    evaluation = json.loads((parent / "eval.json").read_text())
    evaluation["rows"] = [{"name": "perplexity", "metric": "ppl", "original": 10.0, "pruned": 12.5, "lower_is_better": True}]
    (parent / "eval.json").write_text(json.dumps(evaluation))
    done = prune_main("remove", str(parent), "--blocks", "0", "-o", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert "| perplexity | ppl | 10.00 | 12.50 | x1.25 |" in (tmp_path / "a" / "README.md").read_text()
    evaluation["rows"] = [{"name": "perplexity", "metric": "ppl", "original": "not-a-number-zz"}]
    (parent / "eval.json").write_text(json.dumps(evaluation))
    done = prune_main("remove", str(parent), "--blocks", "0", "-o", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert "not-a-number-zz" not in (tmp_path / "b" / "README.md").read_text()
    bad = prune_main("report", str(parent), "-o", str(tmp_path / "r1"))
    assert bad.returncode == 2 and "eval.json is not a prune evaluation" in bad.stderr and not (tmp_path / "r1").exists()
    (parent / "eval.json").unlink()
    record = json.loads((parent / "pruning.json").read_text())
    record["selection"]["removed"] = [99]
    (parent / "pruning.json").write_text(json.dumps(record))
    bad = prune_main("report", str(parent), "-o", str(tmp_path / "r2"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "'selection.removed' is [99], but 'removed' is [1, 2, 3, 4, 5, 6]" in bad.stderr
    assert not (tmp_path / "r2").exists()
    # a selection that agrees with 'removed' in words but not in blocks: the report marked the selection's blocks,
    # and prune check passed the folder
    record["selection"]["removed"] = [0, 2, 3, 4, 5, 6]
    (parent / "pruning.json").write_text(json.dumps(record))
    for command in ("report", "check"):
        bad = prune_main(command, str(parent), *(["-o", str(tmp_path / "r2")] if command == "report" else []))
        assert bad.returncode == 2 and "'selection.removed' is [0, 2, 3, 4, 5, 6], but 'removed' is [1, 2, 3, 4, 5, 6]" \
            in bad.stderr, bad.stderr
    assert not (tmp_path / "r2").exists()


def test_names_from_edited_files_stay_text_on_the_card_and_in_tables(run_dir, tmp_path):
    """A parent's pruning.json may have been edited: a repo_id that is no Hub id is neither inherited as
    base_model nor linked (it went raw into the front matter and the lineage table, HTML and all); names
    from task YAMLs and folders are escaped in Markdown tables (a | split the row)."""
    import shutil

    from huggingface_hub import ModelCard

    from prune.core.tables import comparison_markdown, comparison_rows

    parent = tmp_path / "parent"
    shutil.copytree(run_dir, parent)
    record = json.loads((parent / "pruning.json").read_text())
    record["repo_id"] = "x) | <img src=x onerror=alert(1)> [y"
    (parent / "pruning.json").write_text(json.dumps(record))
    done = prune_main("remove", str(parent), "--blocks", "0", "-o", str(tmp_path / "child"))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "child" / "README.md").read_text()
    assert "<img" not in text and "onerror" not in text
    assert ModelCard.load(tmp_path / "child" / "README.md").data.to_dict().get("base_model") is None
    assert json.loads((tmp_path / "child" / "pruning.json").read_text())["base_model"] is None
    rows = comparison_rows({"tasks": {"a|b<i>": {"metrics": {"acc": 0.5}, "stderr": {}}}},
                           {"tasks": {"a|b<i>": {"metrics": {"acc": 0.4}, "stderr": {}}}},
                           {"params_before": 2, "params_after": 1, "layers_before": 2, "layers_after": 1})
    line = comparison_markdown(rows).splitlines()[2]
    assert line.startswith("| a\\|b&lt;i&gt; | acc |") and line.count(" | ") == 4


def test_block_chart_legends_sit_above_the_data():
    """The legends sat at matplotlib's 'best' place, which a full row of MSRS bars (or points spread over
    the whole axis) leaves none of: they covered the data. Each now sits in headroom above it."""
    import torch

    from prune.core import metrics
    from prune.export.report import block_chart

    L = 30
    rng = np.random.default_rng(0)
    S = np.clip(0.8 + 0.15 * rng.random((L + 1, L + 1)), 0, 1)
    S = (S + S.T) / 2
    np.fill_diagonal(S, 1)
    A = rng.random((L + 1, L + 1)) * 0.3
    A = (A + A.T) / 2
    np.fill_diagonal(A, 0)
    m = metrics.msrs(torch.tensor(S[1:, 1:]), 100.0, 0.8).to_dict()
    scores = scores_from(rng.random(L) * 0.3, angular=A.tolist(), cka=S.tolist(), msrs=m)
    fig = block_chart(scores, 7, "t", marked=range(12, 19))
    fig.canvas.draw()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent()
        bottom = ax.transData.inverted().transform((legend.x0, legend.y0))[1]
        tops = [max(line.get_ydata()) for line in ax.get_lines()] + [p.get_height() for p in ax.patches
                                                                       if hasattr(p, "get_height") and p.get_width() < 1]
        assert tops and bottom > max(tops), (ax.get_ylabel(), bottom, max(tops))


def test_a_chart_of_block_influence_alone_is_drawn():
    """Scores of BI alone: the empty angular panel's legend of no entries (ncol=0) raised ValueError, and prune report
    blamed the run's pruning.json; then the chart kept an empty angular panel on a 0-1 axis, and the terminal table
    a column of NaN. Only what was scored is drawn and printed."""
    from prune.export.report import block_chart

    scores = scores_from([0.3, 0.1, 0.2, 0.4])
    fig = block_chart(scores, 2, "t", marked=[1])
    assert len(fig.axes) == 1 and fig.axes[0].get_legend() is not None
    assert "ang" not in scores.table() and "nan" not in scores.table()


def test_a_deep_models_block_labels_are_turned_as_the_heatmaps():
    """100 blocks, 30 removed: every removed block's red label, upright, ran into one string ("6465666768...")."""
    from prune.export.report import block_chart

    fig = block_chart(scores_from(list(np.linspace(0.1, 0.5, 100))), 2, "t", marked=range(60, 90))
    assert {lab.get_rotation() for lab in fig.axes[-1].get_xticklabels()} == {90.0}
    assert {lab.get_rotation() for lab in block_chart(scores_from([0.3, 0.1, 0.2]), 2, "t").axes[-1].get_xticklabels()} == {0.0}


def test_original_and_pruned_charts_share_each_panels_range():
    """Each chart had its own y range, so the pruned model's smaller scores could look as tall as the original's."""
    from prune.export.report import block_chart, share_y

    rng = np.random.default_rng(1)

    def scores(L, scale):
        A = rng.random((L + 1, L + 1)) * scale
        return scores_from(rng.random(L) * scale, angular=((A + A.T) / 2).tolist())

    big, small = block_chart(scores(8, 1.0), 2, "a"), block_chart(scores(6, 0.1), 2, "b")
    assert big.axes[0].get_ylim() != small.axes[0].get_ylim()
    share_y(big, small)
    for a, b in zip(big.axes, small.axes):
        assert a.get_ylim() == b.get_ylim() and a.get_ylim()[1] > 0.5
