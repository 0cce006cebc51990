"""Paired comparisons (prune.measure.paired) on hand-checked numbers and on real lm-eval sample files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import DATA, build_model, prune_main

from prune.core.errors import PruneError
from prune.measure.paired import (Paired, compare_folders, compare_samples, headline_rows, load_samples, mcnemar_exact,
                                  mean_samples, paired_stats, task_average)
from prune.measure.paired import average_line


def test_mcnemar_exact_by_hand():
    # 2 and 8 flips: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_mcnemar_exact_equals_the_exact_binomial_sum_for_many_flips():
    """Computed in log space (exact integers took 265 s at 41,000 flips): the exact sum to 1e-9 relative."""
    from fractions import Fraction

    for r2w, w2r in ((900, 1100), (1400, 1500), (30, 70)):
        m, k = r2w + w2r, min(r2w, w2r)
        exact = float(min(Fraction(1), 2 * Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2 ** m)))
        assert mcnemar_exact(r2w, w2r) == pytest.approx(exact, rel=1e-9)


def test_pooled_seeds_get_the_sign_test_on_the_questions_they_moved():
    """B pooled over two seeds: four questions lower, none higher, out of 100. The bootstrap interval excludes 0,
    the sign test on the four (McNemar's for one B) gives p = 0.125: the row is marked, as a 0/1 row is."""
    from prune.measure.paired import DISAGREES, paired_markdown

    a = np.ones(100)
    b1, b2 = a.copy(), a.copy()
    b1[[0, 1, 2]] = 0
    b2[[0, 1, 3]] = 0
    r = paired_stats(a, (b1 + b2) / 2, sign_test=True)
    assert r.ci_high < 0 and (r.right_to_wrong, r.wrong_to_right) == (4, 0)
    assert r.mcnemar_p == pytest.approx(2 / 16) and r.disagrees
    assert DISAGREES in paired_markdown([r])
    plain = paired_stats(a, (b1 + b2) / 2)  # not pooled: a score between 0 and 1 (an F1) has no test
    assert plain.mcnemar_p is None and not plain.disagrees
    # the sign test asks about the median question: 30 questions half a point down, 15 a whole point up (mean 0) is
    # a shift for it (p 0.036) and none for the interval: not marked the other way round
    a2, b2 = np.r_[np.ones(30), np.zeros(15), np.ones(155)], np.r_[np.full(30, 0.5), np.ones(15), np.ones(155)]
    r2 = paired_stats(a2, b2, sign_test=True)
    assert r2.diff == 0 and r2.ci_low < 0 < r2.ci_high and r2.mcnemar_p < 0.05 and not r2.disagrees


def test_paired_stats_by_hand():
    a = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    b = [1, 0, 1, 1, 0, 1, 0, 0, 1, 0]
    d = np.array(b) - np.array(a)
    r = paired_stats(a, b, iters=4000, seed=1)
    assert r.n == 10 and r.mean_a == 0.6 and r.mean_b == 0.5 and r.diff == pytest.approx(-0.1)
    assert r.se_paired == pytest.approx(d.std(ddof=1) / math.sqrt(10))
    sa, sb = np.std(a, ddof=1) / math.sqrt(10), np.std(b, ddof=1) / math.sqrt(10)
    assert r.se_unpaired == pytest.approx(math.sqrt(sa ** 2 + sb ** 2))
    assert (r.right_to_wrong, r.wrong_to_right) == (2, 1)
    assert r.mcnemar_p == pytest.approx(mcnemar_exact(2, 1))
    assert r.ci_low <= r.diff <= r.ci_high
    assert paired_stats(a, b, iters=4000, seed=1) == r  # fixed seed: the same interval
    # non-binary scores: no flips
    assert paired_stats([0.5, 0.2, 0.3], [0.4, 0.1, 0.5]).right_to_wrong is None


def test_t_quantile_against_tables():
    from prune.measure.paired import t_quantile

    # two-sided 95% and 99.9% points of printed t tables, and the normal limit
    for df, q, table in [(1, 0.975, 12.7062), (2, 0.975, 4.3027), (3, 0.975, 3.1824), (5, 0.975, 2.5706),
                         (15, 0.975, 2.1314), (30, 0.975, 2.0423), (3, 0.995, 5.8409), (10, 0.9995, 4.5869),
                         (10 ** 6, 0.975, 1.95996)]:
        assert abs(t_quantile(q, df) - table) < 1e-4, (df, q)
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4) and abs(t_quantile(0.5, 4)) < 1e-12
    with pytest.raises(PruneError, match="0 < q < 1"):
        t_quantile(1.0, 3)


def test_paired_t_by_hand():
    from prune.measure.paired import paired_t

    a, b = [0.50, 0.61, 0.47, 0.55], [0.53, 0.60, 0.52, 0.58]
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    p = paired_t(a, b, task="windows", metric="kl")
    assert p.n == 4 and abs(p.diff - mean) < 1e-15 and abs(p.se_paired - se) < 1e-15
    assert abs(p.ci_low - (mean - 3.1824 * se)) < 1e-4 * se and abs(p.ci_high - (mean + 3.1824 * se)) < 1e-4 * se
    assert p.se_unpaired > p.se_paired  # the windows move together: pairing removes that
    with pytest.raises(PruneError, match="at least 2"):
        paired_t([0.1], [0.2])


def test_right_wrong_interval_holds_its_level_for_a_large_difference():
    """0/1 scores: Newcombe's interval (1998, method 10). The interval it replaced took the number of
    flips as fixed and covered a one-sided difference (a pruned model against the original on the exact
    next word: a third of the answers lost; or 5%) 52-73% of the time; it covers ~95% now."""
    from prune.measure.paired import newcombe_paired, wilson

    # Wilson's interval and Newcombe's by hand: 36 both right, 12 only A, 2 only B, 0 neither (n = 50)
    assert wilson(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)  # printed tables
    assert wilson(3, 10) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    low, high = newcombe_paired(36, 12, 2, 0)
    (la, ua), (lb, ub) = wilson(48, 50), wilson(38, 50)
    assert low == pytest.approx(-0.2 - math.sqrt((0.76 - lb) ** 2 + 2 * 12 * 2 / math.sqrt(48 * 2 * 38 * 12) * (0.76 - lb) * (ua - 0.96) + (ua - 0.96) ** 2))
    assert high == pytest.approx(-0.2 + math.sqrt((ub - 0.76) ** 2 + 2 * 12 * 2 / math.sqrt(48 * 2 * 38 * 12) * (ub - 0.76) * (0.96 - la) + (0.96 - la) ** 2))
    # a positive cross term (both * neither > the flips' product): Newcombe's phi takes n/2 off it (his continuity
    # correction); 40 both right, 5 only A, 3 only B, 12 neither (n = 60)
    low, high = newcombe_paired(40, 5, 3, 12)
    (la, ua), (lb, ub), d = wilson(45, 60), wilson(43, 60), 43 / 60 - 45 / 60
    phi = (40 * 12 - 5 * 3 - 60 / 2) / math.sqrt(45 * 15 * 43 * 17)
    assert low == pytest.approx(d - math.sqrt((43 / 60 - lb) ** 2 - 2 * phi * (43 / 60 - lb) * (ua - 45 / 60) + (ua - 45 / 60) ** 2))
    assert high == pytest.approx(d + math.sqrt((ub - 43 / 60) ** 2 - 2 * phi * (ub - 43 / 60) * (45 / 60 - la) + (45 / 60 - la) ** 2))
    assert (round(low, 4), round(high, 4)) == (-0.1321, 0.0653)  # without the correction: -0.1271, +0.0600
    rng = np.random.default_rng(0)
    for lost, won, n in [(0.32, 0.02, 300), (0.05, 0.0, 100), (0.08, 0.08, 200)]:
        covered = 0
        for _ in range(400):
            u = rng.random(n)
            a = np.where(u < lost, 1.0, np.where(u < lost + won, 0.0, (u < 0.7).astype(float)))
            b = np.where(u < lost, 0.0, np.where(u < lost + won, 1.0, a))
            r = paired_stats(a, b)
            assert r.ci_low <= r.diff <= r.ci_high and r.right_to_wrong + r.wrong_to_right == int((a != b).sum())
            covered += r.ci_low <= won - lost <= r.ci_high
        assert covered / 400 >= 0.92, (lost, won, n, covered)
    # few flips, all one way: the interval excludes 0 beside McNemar's p = 0.0625; the table says so
    few = paired_stats([0.0] * 5 + [1.0] * 95, [1.0] * 100, task="t", metric="acc")
    agree = paired_stats([0.0] * 30 + [1.0] * 15 + [1.0] * 455, [1.0] * 30 + [0.0] * 15 + [1.0] * 455)
    assert few.ci_low > 0 and few.mcnemar_p > 0.05 and few.disagrees and not agree.disagrees
    from prune.measure.paired import DISAGREES_NOTE, paired_markdown

    table = paired_markdown([few])
    assert "] † |" in table and table.endswith(DISAGREES_NOTE) and DISAGREES_NOTE not in paired_markdown([agree])
    # no flips at all: the difference is 0, and the interval still says how large it could be
    r = paired_stats([1.0] * 40, [1.0] * 40)
    assert r.diff == 0 and r.ci_low < 0 < r.ci_high and r.mcnemar_p == 1.0


def test_interval_matches_normal_theory_for_large_n():
    rng = np.random.default_rng(5)
    a = (rng.random(2000) < 0.6).astype(float)
    b = a.copy()
    flip = rng.random(2000) < 0.1
    b[flip] = 1 - b[flip]
    r = paired_stats(a, b, iters=5000, seed=0)
    assert r.ci_high - r.ci_low == pytest.approx(2 * 1.96 * r.se_paired, rel=0.1)
    assert r.se_paired < r.se_unpaired / 2  # most answers agree: pairing is much tighter


@pytest.fixture(scope="module")
def lm_eval_folders(tmp_path_factory, tokenizers_by_bos):
    """Real lm-eval results folders (results_*.json + samples_*.jsonl, written by lm-eval's
    EvaluationTracker) of two tiny models on local ARC-Easy and COPA copies, 16 examples each."""
    from prune.measure.lmeval import run_lm_eval

    root = tmp_path_factory.mktemp("lm_eval")
    tok = tokenizers_by_bos[True]
    runs = {}
    for name, seed in (("model-a", 0), ("model-b", 1)):
        run = run_lm_eval(build_model("llama", seed=seed), tok, ["arc_easy", "copa"], limit=16, batch_size=8,
                          data_dir_path=DATA, progress=False)
        run.write(root / name, f"tiny-{name}")
        runs[name] = run
    return root, runs


def samples_of(folder, task):
    [path] = folder.glob(f"samples_{task}_*.jsonl")
    return {r["doc_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_compare_real_lm_eval_samples(lm_eval_folders):
    root, runs = lm_eval_folders
    rows = {(r.task, r.metric): r for r in compare_folders(root / "model-a", root / "model-b", iters=2000)}
    assert set(rows) == {("arc_easy_local", "acc"), ("arc_easy_local", "acc_norm"), ("copa_local", "acc")}
    for (task, metric), r in rows.items():
        assert r.n == 16
        assert r.mean_a == pytest.approx(runs["model-a"].summary[task]["metrics"][metric])
        assert r.mean_b == pytest.approx(runs["model-b"].summary[task]["metrics"][metric])
        sa, sb = samples_of(root / "model-a", task), samples_of(root / "model-b", task)
        assert r.right_to_wrong == sum(sa[i][metric] == 1 and sb[i][metric] == 0 for i in sa)
        assert r.wrong_to_right == sum(sa[i][metric] == 0 and sb[i][metric] == 1 for i in sa)
        assert r.diff == pytest.approx(r.mean_b - r.mean_a)
    import shutil

    copy = shutil.copytree(root / "model-a", root.parent / f"{root.name}-a-copy", dirs_exist_ok=True)
    same = compare_folders(root / "model-a", copy, iters=500)
    assert len(same) == 3 and all(r.diff == 0 and r.right_to_wrong == 0 and r.wrong_to_right == 0 and r.mcnemar_p == 1 for r in same)
    # one folder as A and B, or one B twice: a model against itself, seeds without spread (they were compared)
    with pytest.raises(PruneError, match=r"B \(.*model-a\) is the same evaluation as A: give two evaluations"):
        compare_folders(root / "model-a", root / "model-a")
    with pytest.raises(PruneError, match=r"B2 \(.*model-b\) is the same evaluation as B1: give distinct evaluations"):
        compare_folders(root / "model-a", [root / "model-b", root / "model-b"])
    with pytest.raises(PruneError, match="holds samples of 2 models"):
        compare_folders(root, root / "model-b")


def test_mean_samples_pools_runs_per_question(lm_eval_folders):
    """Against A, the per-question mean of A and B differs by half of B - A on every task and metric,
    with half its paired SE (d/2 per question); one run's mean is the run itself."""
    root, _ = lm_eval_folders
    a, b = load_samples(root / "model-a"), load_samples(root / "model-b")
    direct = {(r.task, r.metric): r for r in compare_samples(a, b, iters=500)}
    pooled = {(r.task, r.metric): r for r in compare_samples(a, mean_samples([a, b]), iters=500)}
    assert set(pooled) == set(direct)
    for key, r in pooled.items():
        assert r.diff == pytest.approx(direct[key].diff / 2) and r.se_paired == pytest.approx(direct[key].se_paired / 2)
        assert r.mean_b == pytest.approx((direct[key].mean_a + direct[key].mean_b) / 2)
    assert all(r.diff == 0 for r in compare_samples(b, mean_samples([b]), iters=500))
    edited = {t: [dict(r) for r in recs] for t, recs in b.items()}
    edited["copa_local"][2]["doc_hash"] = "0" * 64
    with pytest.raises(PruneError, match="copa_local: example 2 differs between the runs"):
        mean_samples([a, edited])
    edited["copa_local"][2]["doc_hash"] = a["copa_local"][2]["doc_hash"]
    edited["copa_local"][2]["prompt_hash"] = "0" * 64
    with pytest.raises(PruneError, match="copa_local: example 2 differs between the runs .another prompt"):
        mean_samples([a, edited])


def test_each_answer_filter_is_its_own_row_and_unpaired_examples_are_counted(capsys):
    """Two filters score each question twice (gsm8k's strict-match and flexible-extract): one row per
    filter of n questions, not one of 2n; examples only one side has are counted, and a task with
    fewer than 2 in common is left out with one line instead of failing the comparison."""
    from prune.measure.paired import paired_markdown

    rng = np.random.default_rng(0)
    def records(scores, filters=("strict-match", "flexible-extract")):
        return [{"doc_id": i, "filter": f, "doc_hash": f"h{i}", "metrics": ["exact_match"], "exact_match": float(v[j])}
                for i, v in enumerate(scores) for j, f in enumerate(filters)]
    a = rng.random((40, 2)) < 0.5
    b = a.copy()
    b[:6, 0] = ~b[:6, 0]
    rows = {r.metric: r for r in compare_samples({"gsm": records(a), "one": records(a[:1])},
                                                  {"gsm": records(b[:30]), "one": records(b[:1])}, iters=200)}
    assert set(rows) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    strict = rows["exact_match,strict-match"]
    assert (strict.n, strict.n_a, strict.n_b) == (30, 40, 30)
    assert strict.mean_a == pytest.approx(a[:30, 0].mean()) and strict.diff == pytest.approx(b[:30, 0].mean() - a[:30, 0].mean())
    assert rows["exact_match,flexible-extract"].diff == 0
    assert "| 30 (A 40, B 30) |" in paired_markdown(list(rows.values()))
    assert "one exact_match,strict-match: 1 example(s) in common" in capsys.readouterr().err
    compare_samples({"gsm": records(a), "extra": records(a)}, {"gsm": records(b)}, iters=10)
    assert "extra: only in A, left out of the paired comparison" in capsys.readouterr().err


@pytest.mark.parametrize("field, message", [("doc_hash", "another document"),
                                            ("prompt_hash", "another prompt: few-shot examples"),
                                            ("target_hash", "another target"),
                                            ("arguments", "other requests: answer choices or generation settings"),
                                            (None, ".filter none. appears twice")])
def test_compare_refuses_different_questions(lm_eval_folders, tmp_path, field, message):
    """lm-eval hashes each example's document, prompt and target: a 2-shot run against a 0-shot one of
    the same rows (another prompt_hash; the old code paired them) is refused, as is a file holding an
    example twice (the old code kept the last)."""
    root, _ = lm_eval_folders
    other = tmp_path / "edited"
    other.mkdir()
    for path in (root / "model-b").iterdir():
        text = path.read_text()
        if path.name.startswith("samples_copa"):
            records = [json.loads(line) for line in text.splitlines()]
            assert all(r.get(h) for r in records for h in ("doc_hash", "prompt_hash", "target_hash", "arguments"))
            if field:
                records[3][field] = "0" * 64
            else:
                records.append(dict(records[3]))
            text = "\n".join(json.dumps(r) for r in records) + "\n"
        (other / path.name).write_text(text)
    with pytest.raises(PruneError, match=f"copa_local: example 3.*{message}"):
        compare_folders(root / "model-a", other)


def test_task_average_by_hand():
    """One headline metric per task (hellaswag: acc_norm), SE = sqrt(sum SE_t^2) / T."""
    def row(task, metric, diff, se):
        return Paired(task, metric, 100, 0.5, 0.5 + diff, diff, se, 2 * se, diff - 2 * se, diff + 2 * se)

    rows = [row("arc_easy_local", "acc", -0.04, 0.02), row("arc_easy_local", "acc_norm", 0.5, 0.5),
            row("hellaswag_local", "acc", 0.5, 0.5), row("hellaswag_local", "acc_norm", 0.02, 0.01)]
    assert [(r.task, r.metric) for r in headline_rows(rows)] == [("arc_easy_local", "acc"), ("hellaswag_local", "acc_norm")]
    avg = task_average(rows)
    assert avg.diff == pytest.approx(-0.01) and avg.se == pytest.approx(math.sqrt(0.02 ** 2 + 0.01 ** 2) / 2)
    # each task's interval (here diff -/+ 2 SE) squared and added: diff -/+ sqrt(sum (2 SE_t)^2) / T
    assert avg.ci_low == pytest.approx(avg.diff - 2 * avg.se) and avg.ci_high == pytest.approx(avg.diff + 2 * avg.se)
    assert task_average([]) is None and avg.retained == pytest.approx((0.46 / 0.5 + 0.52 / 0.5) / 2)
    # lopsided intervals: each bound from its own side (swapped or doubled bounds agreed with the symmetric ones)
    lop = [Paired("a", "acc", 100, 0.5, 0.46, -0.04, 0.02, 0.04, -0.07, -0.03),
           Paired("b", "acc", 100, 0.5, 0.52, 0.02, 0.01, 0.02, 0.0, 0.06)]
    avg = task_average(lop)
    assert avg.ci_low == pytest.approx(-0.01 - math.sqrt(0.03 ** 2 + 0.02 ** 2) / 2)
    assert avg.ci_high == pytest.approx(-0.01 + math.sqrt(0.01 ** 2 + 0.04 ** 2) / 2)
    # no answer flipped on any task: the average's interval is as wide as the tasks' say (it was [0, 0]);
    # a task the baseline scores 0 on has no share ("keeps nan%" before)
    same = [paired_stats([1.0] * 30 + [0.0] * 10, [1.0] * 30 + [0.0] * 10, task="arc_easy_local", metric="acc"),
            paired_stats([0.0] * 40, [0.0] * 40, task="piqa_local", metric="acc")]
    avg = task_average(same)
    assert avg.se == 0 and avg.ci_low < 0 < avg.ci_high and avg.retained == 1.0 and avg.retained_tasks == 1
    line = average_line(same, "original", "pruned")
    assert "nan" not in line and "no example's headline score changed" in line and "over the 1 tasks original scores above 0" in line


def test_a_groups_subtasks_count_as_one_task_pooled_by_size(tmp_path, capsys):
    """MMLU's 57 subjects, each its own samples file, counted as 57 tasks: ARC-Easy losing 10 points (100 of 1,000
    answers right -> wrong) read as -0.17 points over 58 tasks, "B keeps 99.7%". lm-eval's results file names the
    groups (group_subtasks, nested: mmlu -> mmlu_stem -> subjects); the subjects are one task now, each weighted
    by its examples as lm-eval's group score is."""
    subjects = {f"mmlu_s{i:02d}": 40 + 20 * (i % 3) for i in range(57)}  # 40, 60 or 80 questions each
    def folder(name, arc_wrong):
        path = tmp_path / name
        path.mkdir()
        arc = [{"doc_id": i, "doc_hash": f"a{i}", "metrics": ["acc"], "acc": float(i >= arc_wrong)} for i in range(1000)]
        (path / f"samples_arc_easy_{STAMP}.jsonl").write_text("\n".join(map(json.dumps, arc)) + "\n")
        for subject, n in subjects.items():
            recs = [{"doc_id": i, "doc_hash": f"{subject}{i}", "metrics": ["acc"],
                     "acc": float(i % 2 if subject != "mmlu_s00" or name == "a" else i % 4 == 0)} for i in range(n)]
            (path / f"samples_{subject}_{STAMP}.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
        stem, other = list(subjects)[:20], list(subjects)[20:]
        (path / f"results_{STAMP}.json").write_text(json.dumps({"group_subtasks": {
            "mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": stem, "mmlu_other": other, "arc_easy": [],
            "my_suite": ["arc_easy"]},  # a suite lm-eval does not aggregate (no entry in groups): no pooling
            "groups": {"mmlu": {"acc,none": 0.5}, "mmlu_stem": {"acc,none": 0.5}, "mmlu_other": {"acc,none": 0.5}}}))
        return path

    rows = compare_folders(folder("a", 300), folder("b", 400), iters=200)
    assert {r.group for r in rows if r.task.startswith("mmlu")} == {"mmlu"} and next(
        r for r in rows if r.task == "arc_easy").group is None
    avg = task_average(rows)
    assert avg.tasks == ["arc_easy", "mmlu"] and avg.subtasks == {"mmlu": 57}
    # mmlu_s00 (40 questions) drops from 1/2 to 1/4 right: -10 of 40 answers, out of mmlu's pooled questions
    pooled = sum(subjects.values())
    assert avg.diff == pytest.approx((-0.1 + -10 / pooled) / 2)
    weight = lambda r: 0.5 if r.task == "arc_easy" else subjects[r.task] / pooled / 2  # each subtask's interval too
    assert avg.ci_low == pytest.approx(avg.diff - math.sqrt(sum((weight(r) * (r.diff - r.ci_low)) ** 2 for r in rows)))
    assert avg.retained == pytest.approx((0.6 / 0.7 + (pooled / 2 - 10) / (pooled / 2)) / 2)
    line = average_line(rows)
    assert line.startswith("Average over 2 tasks (one headline metric each; mmlu: its 57 subtasks pooled, weighed by "
                           "their examples): B - A = -5.") and "it excludes 0" in line, line
    # without a results file (samples alone) each file is a task, as before
    for name in ("a", "b"):
        next((tmp_path / name).glob("results_*.json")).unlink()
    assert len(task_average(compare_folders(tmp_path / "a", tmp_path / "b", iters=200)).tasks) == 58


def test_a_metric_where_lower_is_better_is_no_accuracy_in_the_average(tmp_path):
    """The last fallback took a task's first metric scored 0 to 1 whatever its direction: a Brier score (lower is
    better) was averaged as accuracy points. lm-eval's results file says which metrics are lower-better."""
    for name, shift in (("a", 0), ("b", 1)):
        folder = tmp_path / name
        folder.mkdir()
        brier = [{"doc_id": i, "doc_hash": f"q{i}", "metrics": ["brier_score"], "brier_score": ((i + shift) % 3) / 4}
                 for i in range(40)]
        arc = [{"doc_id": i, "doc_hash": f"a{i}", "metrics": ["acc"], "acc": float((i + shift) % 2)} for i in range(40)]
        (folder / f"samples_calib_{STAMP}.jsonl").write_text("\n".join(map(json.dumps, brier)) + "\n")
        (folder / f"samples_arc_easy_{STAMP}.jsonl").write_text("\n".join(map(json.dumps, arc)) + "\n")
        (folder / f"results_{STAMP}.json").write_text(json.dumps({"higher_is_better": {
            "calib": {"brier_score": False}, "arc_easy": {"acc": True}}}))
    rows = compare_folders(tmp_path / "a", tmp_path / "b", iters=200)
    assert next(r for r in rows if r.task == "calib").lower_is_better is True
    assert [r.task for r in headline_rows(rows)] == ["arc_easy"]
    assert "left out: calib (no metric scored 0 to 1 per example where higher is better" in average_line(rows)
    # without the results file the direction is unknown: the 0-to-1 score is taken, as before
    for name in ("a", "b"):
        next((tmp_path / name).glob("results_*.json")).unlink()
    assert [r.task for r in headline_rows(compare_folders(tmp_path / "a", tmp_path / "b", iters=200))] == [
        "arc_easy", "calib"]


def test_pooled_seeds_with_other_examples_say_what_was_left_out(lm_eval_folders, capsys):
    """Seeds evaluated on different examples (one with a lower limit) were pooled over the examples all have,
    without a word: four fifths of the data could go."""
    root, _ = lm_eval_folders
    a, b = load_samples(root / "model-a"), load_samples(root / "model-b")
    short = {t: recs[:5] for t, recs in b.items()}
    capsys.readouterr()
    pooled = mean_samples([b, short, a])
    assert all(len(recs) == 5 for recs in pooled.values())
    err = capsys.readouterr().err
    assert "copa_local: pooled over the 5 examples all 3 runs have (B1 16, B2 5, B3 16): the others left out" in err
    mean_samples([a, b])
    assert "pooled over" not in capsys.readouterr().err


def test_the_average_says_when_a_task_is_not_read_by_its_usual_metric():
    """hellaswag's acc_norm in A only: the average took its acc without a word (the note of what A alone has was
    the only trace)."""
    def records(shift, norm):
        return {"hellaswag": [{"doc_id": i, "doc_hash": f"h{i}", "metrics": ["acc"] + ["acc_norm"] * norm,
                               "acc": float((i + shift) % 2), "acc_norm": float(i % 3 == 0)} for i in range(40)]}
    line = average_line(compare_samples(records(0, True), records(1, False), iters=200, quiet=True))
    assert line.endswith("; hellaswag by acc (acc_norm not scored in both)"), line
    assert "not scored in both" not in average_line(compare_samples(records(0, True), records(1, True), iters=200))


def test_average_is_over_proportions_only():
    """A task whose first metric is scored 0-100 (truthfulqa_gen's bleu_max) put -6.30 "points" of BLEU into the
    average of accuracies (-157 points over four tasks); its 0/1 metric is its headline now, and a task with no
    metric scored 0 to 1 (a log-likelihood) is left out of the average and named."""
    rng = np.random.default_rng(1)
    def records(shift):
        return {"truthfulqa_gen": [{"doc_id": i, "doc_hash": f"t{i}", "metrics": ["bleu_max", "bleu_acc"],
                                    "bleu_max": 30 + 10 * rng.random() - 5 * shift, "bleu_acc": i % 2} for i in range(40)],
                "arc_easy": [{"doc_id": i, "doc_hash": f"a{i}", "metrics": ["acc"], "acc": float((i + shift) % 2)}
                             for i in range(40)],
                "loglik_only": [{"doc_id": i, "doc_hash": f"l{i}", "metrics": ["ll"], "ll": -2.0 - rng.random() - shift}
                                for i in range(40)]}
    rows = compare_samples(records(0), records(1), iters=200)
    assert [(r.task, r.metric) for r in headline_rows(rows)] == [("arc_easy", "acc"), ("truthfulqa_gen", "bleu_acc")]
    avg = task_average(rows)
    assert avg.tasks == ["arc_easy", "truthfulqa_gen"] and avg.diff == pytest.approx(0.0)
    assert average_line(rows).endswith("; left out: loglik_only (no metric scored 0 to 1 per example where higher is "
                                       "better, so none in "
                                       "accuracy points)")
    # chosen by name before by the data: BLEU scores that happen to lie below 1 do not make bleu_max the headline
    small = [records(0), records(1)]
    for r in small[0]["truthfulqa_gen"] + small[1]["truthfulqa_gen"]:
        r["bleu_max"] /= 100
    rows = compare_samples(*small, iters=200)
    assert next(r for r in rows if r.metric == "bleu_max").proportion
    assert ("truthfulqa_gen", "bleu_acc") in [(r.task, r.metric) for r in headline_rows(rows)]
    # an accuracy by name scored 0-100 (SQuAD's f1) is no headline either: not points of accuracy
    squad = [{"squad": [{"doc_id": i, "doc_hash": f"s{i}", "metrics": ["f1"], "f1": 100.0 * ((i + shift) % 3 == 0)}
                        for i in range(40)]} for shift in (0, 1)]
    rows = compare_samples(*squad, iters=200)
    assert rows and rows[0].proportion is False and headline_rows(rows) == []


def test_what_the_rows_and_the_average_say_agrees_with_their_numbers(capsys):
    """The average line said z = +2.28 beside an interval that includes 0, and "no answer changed" when every
    answer had; a few float scores got a percentile bootstrap far too narrow; lm-eval's per-example
    "perplexity" (a log-likelihood, higher is better) was shown as perplexity; a NaN score made its row NaN."""
    from prune.measure.paired import paired_t, per_example

    gained = [paired_stats([0.0] * 5 + [1.0] * 95, [1.0] * 100, task="t1", metric="acc"),
              paired_stats([1.0] * 100, [1.0] * 100, task="t2", metric="acc")]
    line = average_line(gained)
    assert "z =" not in line and "(it includes 0)" in line and task_average(gained).ci_low < 0
    flipped = [paired_stats([0.0] * 10, [1.0] * 10, task=t, metric="acc") for t in ("t1", "t2")]
    assert "(it excludes 0)" in average_line(flipped) and "changed" not in average_line(flipped)
    few = paired_stats([0.2, 0.5], [0.3, 0.8])  # Student's interval (the bootstrap gave [0.10, 0.30])
    t = paired_t([0.2, 0.5], [0.3, 0.8])
    assert (few.ci_low, few.ci_high) == pytest.approx((t.ci_low, t.ci_high)) and few.ci_low < 0 < few.ci_high
    records = [{"doc_id": i, "metrics": ["perplexity", "acc"], "perplexity": -2.0 - i, "acc": float("nan") if i else 1.0}
               for i in range(3)]
    rows = per_example(records, "lambada")
    assert set(rows) == {"log-likelihood (perplexity's per-example term)", "acc"} and list(rows["acc"]) == [0]
    assert "lambada acc: 2 example(s) scored NaN or inf, left out" in capsys.readouterr().err
    # pooled seeds: a task one seed lacks is named as missing from that seed (it read "only in A")
    mean_samples([{"t": records, "u": records}, {"t": records}])
    assert "u: missing from 1 of the 2 runs pooled" in capsys.readouterr().err


def test_compare_cli(lm_eval_folders, tmp_path):

    root, _ = lm_eval_folders
    proc = prune_main("compare", root / "model-a", root / "model-b", "--iters", 500, "-o", tmp_path / "c.json", check_rc=0)
    assert "| arc_easy_local | acc | 16 |" in proc.stdout and "McNemar p" in proc.stdout
    assert "Average over 2 tasks (one headline metric each): B - A = " in proc.stdout
    direct = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert len(direct) == 3
    # several B (seeds of one recipe): pooled per example, here A and B -> half of B - A on every row
    import shutil

    copy = shutil.copytree(root / "model-a", tmp_path / "copies" / "model-a-copy")  # not a folder the checks below read
    proc = prune_main("compare", root / "model-a", copy, root / "model-b", "--iters", 500,
                     "-o", tmp_path / "p.json", check_rc=0)
    assert "| mean of 2 B |" in proc.stdout and "mean of 2 B - A" in proc.stdout
    pooled = json.loads((tmp_path / "p.json").read_text())
    assert pooled["b"] == [str(copy), str(root / "model-b")]
    assert [r["diff"] for r in pooled["rows"]] == pytest.approx([r["diff"] / 2 for r in direct])
    # the file holds what the text says: the task average, and each B's own beside the pooled rows
    assert pooled["task_average"]["diff"] == pytest.approx(json.loads((tmp_path / "c.json").read_text())["task_average"]["diff"] / 2)
    assert len(pooled["each_b_task_average"]) == 2 and pooled["each_b_task_average"][0] == 0
    # each B alone beside the mean: A against itself 0, then B's own average (the interval leaves that spread out)
    from prune.measure.paired import task_average

    own = 100 * task_average(compare_folders(root / "model-a", root / "model-b", iters=200)).diff
    assert f"Each B alone, on the same examples (task average, B - A, points): +0.00, {own:+.2f}. " in proc.stdout
    assert "the spread between them (another seed's training) is not in it" in proc.stdout
    proc = prune_main("compare", tmp_path, root / "model-b", check_rc=2)
    assert proc.stderr.startswith("error: no lm-eval samples") and len(proc.stderr.strip().splitlines()) == 1
    # a folder holding two evaluations: each task's newest file is read, and the comparison says it mixes them
    import re
    import shutil

    mixed = shutil.copytree(root / "model-b", tmp_path / "mixed")
    [copa] = mixed.glob("samples_copa_local_*.jsonl")
    later = re.sub(r"_(\d{4})-", lambda m: f"_{int(m[1]) + 1}-", copa.name, count=1)  # a year later
    copa.rename(mixed / later)
    proc = prune_main("compare", root / "model-a", mixed, check_rc=0)
    assert "tasks come from 2 lm-eval runs" in proc.stderr and "mixed" in proc.stderr
    assert "lm-eval runs" not in prune_main("compare", root / "model-a", root / "model-b", check_rc=0).stderr
    # every task evaluated twice into one folder (prune eval --output-path run again): the newest read, and said so
    again = shutil.copytree(root / "model-b", tmp_path / "again")
    for file in list(again.glob("samples_*.jsonl")) + list(again.glob("results_*.json")):
        shutil.copy(file, again / re.sub(r"_(\d{4})-", lambda m: f"_{int(m[1]) + 1}-", file.name, count=1))
    proc = prune_main("compare", root / "model-a", again, check_rc=0)
    assert "holds more than one evaluation of arc_easy_local, copa_local: the newest is compared" in proc.stderr
    # no metric both scored: one line (it printed nothing, exit 0, and wrote an empty comparison)
    other = shutil.copytree(root / "model-b", tmp_path / "other-metric")
    for file in other.glob("samples_*.jsonl"):
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        file.write_text("".join(json.dumps({**r, "metrics": ["zz"], "zz": 1.0}) + "\n" for r in rows))
    proc = prune_main("compare", root / "model-a", other, "-o", tmp_path / "none.json", check_rc=2)
    assert "scored only in B" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: nothing to pair")
    assert not (tmp_path / "none.json").exists()
    # fidelity measured on other windows: left out with a note, the lm-eval samples still paired (it refused both)
    fa, fb = shutil.copytree(root / "model-a", tmp_path / "fa"), shutil.copytree(root / "model-b", tmp_path / "fb")
    for folder, sha in ((fa, "aaaa"), (fb, "bbbb")):
        (folder / "eval.json").write_text(json.dumps({"fidelity": {"kl_windows": [0.1, 0.2], "nll_diff_windows": [0.0, 0.1],
                                                                   "windows_sha256": sha, "top_k": 8}}))
    proc = prune_main("compare", fa, fb, check_rc=0)
    assert "note: fidelity left out: A and B measured fidelity on different windows" in proc.stderr
    assert "| arc_easy_local | acc | 16 |" in proc.stdout
    # a run folder alone: its original against its model, named "healed" once healed (it said "pruned")
    run = tmp_path / "healed-run"
    shutil.copytree(root / "model-a", run / "eval" / "original")
    shutil.copytree(root / "model-b", run / "eval" / "pruned")
    record = {"removed": [1], "kept": [0, 2], "layers_before": 3, "layers_after": 2}
    (run / "pruning.json").write_text(json.dumps(record))
    assert "pruned - original" in prune_main("compare", run, "--iters", 200, check_rc=0).stdout
    (run / "pruning.json").write_text(json.dumps({**record, "healing": {"method": "lora"}}))
    healed = prune_main("compare", run, "--iters", 200, check_rc=0).stdout
    assert "healed" in healed and "pruned - original" not in healed and "healed - original" in healed


# ---- damaged inputs: one line naming the file (and line), never a traceback or a hang ---------------------------
STAMP = "2026-01-01T00-00-00.000000"


def write_samples(folder, lines=(), task="arc_easy", n=4):
    """A folder holding one synthetic lm-eval ``samples_<task>_<stamp>.jsonl``: ``n`` good records, then ``lines``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"doc_id": i, "doc_hash": f"d{i}", "filter": "none", "metrics": ["acc"], "acc": float(i % 2)})
            for i in range(n)]
    path = folder / f"samples_{task}_{STAMP}.jsonl"
    path.write_text("\n".join([*good, *lines]) + "\n")
    return path


def one_error_line(proc) -> str:
    """The only line of a refused command's stderr (exit 2, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("line, message", [
    ('{"doc_id": 99, "doc_ha', "not a JSON line"),
    ('{"doc_id": 98, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"doc_id": 97, "metrics": ["acc"], "acc": ' + "9" * 5000 + "}", "thousands of digits"),
    ("5", "a JSON object, got int"), ('["a", "b"]', "a JSON object, got list"),
    ('{"metrics": ["acc"], "acc": 1}', "doc_id must be a whole number"),
    ('{"doc_id": [1, 2], "metrics": ["acc"], "acc": 1}', "doc_id must be a whole number (the example's index), got list"),
    ('{"doc_id": {"a": 1}, "metrics": ["acc"], "acc": 1}', "doc_id must be a whole number (the example's index), got dict"),
    ('{"doc_id": 1.0, "metrics": ["acc"], "acc": 1}', "got float 1.0"),  # it was example 1 again
    ('{"doc_id": true, "metrics": ["acc"], "acc": 1}', "got bool true"),
    ('{"doc_id": 7, "filter": ["x"], "metrics": ["acc"], "acc": 1}', "filter must be text"),
    ('{"doc_id": 7, "metrics": 5}', "metrics must be a list of metric names"),
    ('{"doc_id": 7, "metrics": [{}]}', "metrics must be a list of metric names"),
    ('{"doc_id": 7, "metrics": "acc", "acc": 1}', "metrics must be a list"),  # it was read as "a", "c", "c"
])
def test_damaged_samples_line_is_one_line_naming_file_and_line(tmp_path, line, message):
    """Each damaged line of a samples file gave a traceback (JSONDecodeError, RecursionError, ValueError,
    TypeError, KeyError, unhashable) or was silently misread; now one line ``FILE:LINE: ...``."""
    write_samples(tmp_path / "a")
    path = write_samples(tmp_path / "b", [line], n=2)
    err = one_error_line(prune_main("compare", tmp_path / "a", tmp_path / "b"))
    assert f"{path}:3: " in err and message in err


def test_score_beyond_a_float_is_left_out_like_nan(tmp_path):
    """``"acc": 10**400`` (an integer JSON allows) raised OverflowError; it is left out with a note, as NaN is."""
    write_samples(tmp_path / "a")
    write_samples(tmp_path / "b", [json.dumps({"doc_id": 3, "metrics": ["acc"], "acc": 10 ** 400})], n=3)
    proc = prune_main("compare", tmp_path / "a", tmp_path / "b", check_rc=0)
    assert "arc_easy acc: 1 example(s) scored NaN or inf, left out" in proc.stderr and "| 3 (A 4, B 3) |" in proc.stdout


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_compare_json_is_strict_json_when_a_mean_overflows(tmp_path):
    """Scores of 1e308 overflow the means to inf: the JSON held Infinity and NaN, which strict readers refuse."""
    for side, value in (("a", 1e308), ("b", -1e308)):
        folder = tmp_path / side
        folder.mkdir()
        (folder / f"samples_arc_easy_{STAMP}.jsonl").write_text("\n".join(
            json.dumps({"doc_id": i, "doc_hash": f"d{i}", "filter": "none", "metrics": ["acc"], "acc": value})
            for i in range(4)) + "\n")
    prune_main("compare", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "c.json", check_rc=0)
    data = json.loads((tmp_path / "c.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert data["rows"][0]["mean_a"] is None


def test_text_for_a_number_an_empty_file_and_one_samples_file_are_named(tmp_path):
    """``"acc": "1.0"`` or null was left out without a word; an empty samples file was reported as a metric
    scored only in A; a samples file given for a folder said it was not JSON."""
    write_samples(tmp_path / "a")
    write_samples(tmp_path / "b", [json.dumps({"doc_id": 3, "metrics": ["acc"], "acc": "1.0"})], n=3)
    proc = prune_main("compare", tmp_path / "a", tmp_path / "b", check_rc=0)
    assert 'arc_easy acc: 1 example(s) hold no number (e.g. "1.0"), left out' in proc.stderr
    write_samples(tmp_path / "c", task="piqa")
    write_samples(tmp_path / "c", n=0)  # arc_easy's file empty
    write_samples(tmp_path / "a", task="piqa")
    proc = prune_main("compare", tmp_path / "a", tmp_path / "c", check_rc=0)
    assert "holds no examples (an empty samples file): arc_easy left out" in proc.stderr
    [path] = (tmp_path / "a").glob("samples_arc_easy_*.jsonl")
    err = one_error_line(prune_main("compare", path, tmp_path / "b"))
    assert err == f"error: {path} is one task's samples file: give the folder that holds it ({tmp_path / 'a'})"


def test_samples_file_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO named samples_*.jsonl hung the read: one line naming it."""
    import os
    import threading

    write_samples(tmp_path / "a")
    name = f"samples_arc_easy_{STAMP}.jsonl"
    fifo = tmp_path / "fifo" / name
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():  # the old code blocked opening the FIFO: a writer lets it go on (and the test fail, not hang)
        while not done.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader yet

    threading.Thread(target=unblock, daemon=True).start()
    try:
        err = one_error_line(prune_main("compare", tmp_path / "a", fifo.parent))
    finally:
        done.set()
    assert f"{fifo} is not a regular file" in err


def test_samples_link_to_a_device_a_folder_or_latin1_is_one_line(tmp_path):
    """A link to /dev/zero read until memory ran out, a folder named samples_*.jsonl gave "cannot access 3",
    a file that is not UTF-8 named no file."""
    write_samples(tmp_path / "a")
    name = f"samples_arc_easy_{STAMP}.jsonl"
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / name).symlink_to("/dev/zero")
    (tmp_path / "dir" / name).mkdir(parents=True)
    for folder in ("zero", "dir"):
        assert f"{tmp_path / folder / name} is not a regular file" in one_error_line(
            prune_main("compare", tmp_path / "a", tmp_path / folder))
    latin = write_samples(tmp_path / "latin")
    latin.write_bytes(latin.read_bytes() + b'{"doc_id": 9, "x": "\xe9"}\n')
    assert f"{latin}: not UTF-8" in one_error_line(prune_main("compare", tmp_path / "a", tmp_path / "latin"))


def fidelity_file(path, **changes):
    """A prune eval --output JSON file with a fidelity record of 3 windows (``changes`` replace its fields)."""
    fid = {"kl_windows": [0.1, 0.2, 0.3], "nll_diff_windows": [0.0, 0.1, 0.05], "windows_sha256": "abcd", "top_k": 8,
           "perplexity_original": 20.0, **changes}
    path.write_text(json.dumps({"pruned": {"fidelity": fid}}))
    return path


@pytest.mark.parametrize("text, message", [
    ('{"pruned": {"fidelity": {"kl_windows": ' + "[" * 100_000 + "]" * 100_000 + "}}}", "nested too deeply"),
    ('{"pruned": {"fidelity": {"kl_windows": [' + "9" * 5000 + "]}}}", "thousands of digits"),
    (dict(perplexity_original="abc"), "perplexity_original is \"abc\", not a positive number"),
    (dict(perplexity_original=[1]), "perplexity_original is [1]"),
    (dict(perplexity_original=-5.0), "perplexity_original is -5.0"),
    (dict(kl_windows=[10 ** 400, 0.1, 0.1]), "kl_windows[0] is 1000"),
    (dict(kl_windows=[0.1, float("nan"), 0.1]), "kl_windows[1] is NaN, not a finite number"),
    (dict(nll_diff_windows=[0.1, 0.1, float("inf")]), "nll_diff_windows[2] is Infinity"),
    (dict(kl_windows=[True, False, True]), "kl_windows[0] is true, not a finite number"),
])
def test_damaged_fidelity_record_is_one_line(tmp_path, text, message):
    """Deep nesting or a 5,000-digit number gave a traceback, a text or negative perplexity_original a
    TypeError or math domain error, a huge integer window an OverflowError; NaN, inf and true/false
    windows were taken (the table showed nan). Each is one line naming the file."""
    good = fidelity_file(tmp_path / "a.json")
    bad = tmp_path / "b.json"
    bad.write_text(text) if isinstance(text, str) else fidelity_file(bad, **text)
    err = one_error_line(prune_main("compare", good, bad))
    assert str(bad) in err and message in err


def test_fidelity_on_other_windows_names_their_counts(tmp_path):
    """Windows of another count read "windows abcd top 8 against abcd top 8"."""
    a = fidelity_file(tmp_path / "a.json")
    err = one_error_line(prune_main("compare", a, fidelity_file(tmp_path / "b.json", kl_windows=[0.1, 0.2],
                                                                  nll_diff_windows=[0.0, 0.1])))
    assert "(3 windows abcd top 8 against 2 windows abcd top 8)" in err


def test_json_file_without_fidelity_record_says_so(tmp_path):
    """A JSON file that is a list, null, NaN or holds no fidelity record was refused as "not a folder"."""
    a = fidelity_file(tmp_path / "a.json")
    for text in ("[1, 2]", "null", "NaN", '{"pruned": {"fidelity": [1]}}'):
        (tmp_path / "none.json").write_text(text)
        assert "none.json holds no fidelity record" in one_error_line(prune_main("compare", a, tmp_path / "none.json"))


def test_run_whose_original_links_to_pruned_is_refused(tmp_path):
    """A run whose eval/original links to eval/pruned compared the model with itself ("no change")."""
    run = tmp_path / "run"
    write_samples(run / "eval" / "pruned")
    (run / "eval" / "original").symlink_to("pruned")
    assert "is not a run folder with eval/original and eval/pruned" in one_error_line(prune_main("compare", run))


def test_no_task_in_common_lists_ten_tasks(tmp_path):
    """With many tasks and none in common the one line listed them all (20 kB for thousands)."""
    write_samples(tmp_path / "one")
    for i in range(40):
        write_samples(tmp_path / "many", task=f"t{i:02d}")
    err = one_error_line(prune_main("compare", tmp_path / "one", tmp_path / "many"))
    assert "B has t00, t01," in err and "t09 and 30 more" in err and "t39" not in err


def test_a_run_s_paired_rows_read_the_groups_and_directions_of_its_results_files():
    """The card's paired rows (eval.json) compared the samples without the results files' groups and metric
    directions, where prune compare read them: a group's subtasks counted as tasks there, a Brier score read as if
    higher were better. Both read the same TaskMeta now."""
    from prune.measure.evaluation import lm_eval_outputs

    def files(shift):
        sub = lambda t: "\n".join(json.dumps({"doc_id": i, "doc_hash": f"{t}{i}", "metrics": ["acc", "brier"],
                                              "acc": float((i + shift) % 2), "brier": 0.1 * ((i + shift) % 3)})
                                  for i in range(20)) + "\n"
        results = {"group_subtasks": {"grp": ["sub1", "sub2"], "sub1": [], "sub2": []}, "groups": {"grp": {"acc,none": 0.5}},
                   "higher_is_better": {"sub1": {"acc": True, "brier": False}, "sub2": {"acc": True, "brier": False}}}
        return {"lm_eval_files": {f"results_{STAMP}.json": json.dumps(results), f"samples_sub1_{STAMP}.jsonl": sub("a"),
                                  f"samples_sub2_{STAMP}.jsonl": sub("b")}}

    _, rows, unhealed = lm_eval_outputs(files(0), files(1))
    assert unhealed == [] and {(r.task, r.metric) for r in rows} >= {("sub1", "acc"), ("sub2", "brier")}
    assert {r.group for r in rows} == {"grp"}
    assert all(bool(r.lower_is_better) == (r.metric == "brier") for r in rows), [(r.task, r.metric, r.lower_is_better) for r in rows]



def test_a_task_one_pooled_run_lacks_is_named_once(lm_eval_folders, tmp_path, capsys):
    """Pooling B runs of which one lacks a task named it twice: "missing from 1 of the 2 runs pooled" and "only in A"."""
    from prune.measure.paired import compare_pooled

    root, _ = lm_eval_folders
    lacking = edited_copy(root / "model-b", tmp_path / "b2")
    for path in lacking.glob("samples_copa_*.jsonl"):
        path.unlink()
    capsys.readouterr()
    rows, _ = compare_pooled(root / "model-a", [root / "model-b", lacking], iters=200)
    err = capsys.readouterr().err
    assert {r.task for r in rows} == {"arc_easy_local"}
    assert "copa_local: missing from 1 of the 2 runs pooled" in err and "only in A" not in err

def edited_copy(src, dest, edit_results=None, link_samples=None):
    """A copy of a real lm-eval results folder: ``edit_results(data)`` changes its results file; with
    ``link_samples`` its samples files are links to that folder's."""
    dest.mkdir()
    for path in src.iterdir():
        if path.name.startswith("samples_") and link_samples is not None:
            (dest / path.name).symlink_to(link_samples / path.name)
        elif path.name.startswith("results_") and edit_results is not None:
            data = json.loads(path.read_text())
            edit_results(data)
            (dest / path.name).write_text(json.dumps(data))
        else:
            (dest / path.name).write_text(path.read_text())
    return dest


def test_another_task_version_or_few_shot_count_is_refused_another_lm_eval_is_a_note(lm_eval_folders, tmp_path, capsys):
    """A task version that changes only how answers are scored leaves every per-example hash equal: the old code
    paired two runs of copa_local 1.0 and 2.0 (or 0- and 5-shot results) without a word."""
    root, _ = lm_eval_folders
    b = root / "model-b"

    def version(data):
        data["versions"]["copa_local"] = 1.0

    def shots(data):
        data["n-shot"]["copa_local"] = 5

    def lm_eval(data):
        data["lm_eval_version"] = "0.4.0"

    with pytest.raises(PruneError, match=r"^copa_local: task version 1.0 in A, 2.0 in B: the two did not run the same "
                                         r"task; evaluate both with the same version"):
        compare_folders(edited_copy(root / "model-a", tmp_path / "v", version), b)
    with pytest.raises(PruneError, match=r"copa_local: few-shot examples 0 in A, 5 in B2: the two did not run the same "
                                         r"task; evaluate both with the same number of few-shot examples \(--num-fewshot"):
        compare_folders(root / "model-a", [b, edited_copy(b, tmp_path / "s", shots)])
    capsys.readouterr()
    rows = compare_folders(edited_copy(root / "model-a", tmp_path / "l", lm_eval), b, iters=200)
    assert rows and "lm-eval 0.4.0 in A, 0.4.13 in B: paired on the same questions" in capsys.readouterr().err


def test_samples_files_linking_to_a_s_are_the_same_evaluation(lm_eval_folders, tmp_path):
    """A folder whose samples files link to A's compared A with itself: "no example's headline score changed"."""
    root, _ = lm_eval_folders
    links = edited_copy(root / "model-a", tmp_path / "links", link_samples=root / "model-a")
    with pytest.raises(PruneError, match=r"B's samples file of (\w+) .* is A's file of \1: give two"):
        compare_folders(root / "model-a", links)


def test_one_fidelity_file_twice_is_refused_and_an_unchecked_original_is_said(tmp_path):
    """The same fidelity file (or a link to it) as A and B gave a table of zeros; a record without the original's
    perplexity was paired without a word that its original could not be checked."""
    a = fidelity_file(tmp_path / "a.json")
    (tmp_path / "link.json").symlink_to(a)
    assert "B (" in one_error_line(prune_main("compare", a, tmp_path / "link.json"))
    assert "is the same evaluation as A" in one_error_line(prune_main("compare", a, tmp_path / "link.json"))
    b = fidelity_file(tmp_path / "b.json")
    assert "B2 (" in one_error_line(prune_main("compare", a, b, b))
    proc = prune_main("compare", a, fidelity_file(tmp_path / "c.json", perplexity_original=None))
    assert proc.returncode == 0 and "holds no perplexity of the original" in proc.stderr
    one = dict(kl_windows=[0.1], nll_diff_windows=[0.0])
    err = one_error_line(prune_main("compare", fidelity_file(tmp_path / "d.json", **one), fidelity_file(tmp_path / "e.json", **one)))
    assert "1 window(s) in common; at least 2 are needed: measure more windows (prune eval --max-windows" in err
