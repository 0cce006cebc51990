"""Faults injected into real runs: kills, Ctrl-C, a full disk, non-finite activations, resume,
determinism, and a planted Hub token that must never reach any output.

Kills and interrupts go through the real entry point in a process of its own (``PRUNE_FAULT``, see
``prune.core.faults``), forked from this one (``conftest.prune_forked``): SIGKILL runs no cleanup code, like a
power cut. The planted token's commands run in fresh interpreters, where every library prints as it would for a
user."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.export.saving import INCOMPLETE_MARKER
from prune.pipeline.progress import progress_dir

import conftest
from conftest import DATA, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def prune_child(*args, fault: str | None = None) -> subprocess.CompletedProcess:
    """The console command in a process of its own (a kill must end a process), ``fault`` planted (``PRUNE_FAULT``)."""
    return conftest.prune_forked(*args, unset=("PRUNE_FAULT",), env_extra={"PRUNE_FAULT": fault} if fault else None)


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def siblings(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---- killed at any stage: no output folder, or a hidden one marked incomplete; source untouched ----
@pytest.mark.parametrize("stage, execution", [("scoring", "in_memory"), ("evaluating", "in_memory"),
                                              ("saving", "in_memory"), ("saved_weights", "in_memory"),
                                              ("before_rename", "in_memory"), ("scoring", "sequential"),
                                              ("saved_weights", "sequential")])
def test_killed_run_leaves_no_checkpoint(stage, execution, tiny_folder, tmp_path):
    before = digest(tiny_folder)
    out = tmp_path / "out"
    data = tiny_recipe(tiny_folder, out, score={"execution": execution})
    if execution == "sequential":  # out of core: written from the shards, nothing evaluated
        data["evaluate"] = None
    recipe = write_recipe(tmp_path / "r.yaml", data)
    done = prune_child("run", recipe, "--quiet", fault=f"{stage}:kill")
    assert done.returncode == -9, done.stderr  # SIGKILL: no cleanup ran
    assert not out.exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
    for leftover in siblings(out):  # the progress folder, or a half-written staging folder
        assert leftover.name.startswith(".")
        if ".incomplete-" in leftover.name:
            assert (leftover / INCOMPLETE_MARKER).is_file()
    if stage in ("saving", "saved_weights", "before_rename"):
        assert any(".incomplete-" in p.name for p in siblings(out))
    assert digest(tiny_folder) == before  # the source model files are never modified


def test_next_run_clears_a_killed_save_and_succeeds(tiny_folder, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_folder, out))
    assert prune_child("run", recipe, "--quiet", fault="saved_weights:kill").returncode == -9
    assert any(".incomplete-" in p.name for p in siblings(out))
    # the same command again, without resume: the finished stages are not thrown away unasked (a review: a rerun
    # deleted them without a word); a resume clears the killed save and finishes
    with pytest.raises(PruneError, match=r"\.out\.progress holds the finished stages \(scores, selection, original\) of an "
                                         r"interrupted run of this recipe: rerun with resume=True to reuse them, or remove"):
        prune.run(recipe, quiet=True)
    prune.run(recipe, quiet=True, resume=True)
    assert siblings(out) == []  # staging and progress folders gone
    AutoModelForCausalLM.from_pretrained(out)


def test_ctrl_c_says_how_to_resume_and_saves_nothing(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_folder, out))
    done = prune_child("run", recipe, "--quiet", fault="evaluated_original:interrupt")
    assert done.returncode == 130
    assert done.stderr.strip().splitlines()[-1] == ("interrupted; nothing was saved as a checkpoint "
                                                   "(rerun with --resume to reuse the finished stages)")
    assert not out.exists()
    assert [p.name for p in siblings(out)] == [".out.progress"]
    # SIGTERM (timeout, SLURM, docker stop) is an interruption too: the same cleanup and hint, exit 143 (it left with
    # 143 and no word)
    shutil.rmtree(tmp_path / ".out.progress")
    done = prune_child("run", recipe, "--quiet", fault="evaluated_original:term")
    assert done.returncode == 143 and done.stderr.strip().splitlines()[-1] == (
        "terminated (SIGTERM); nothing was saved as a checkpoint (rerun with --resume to reuse the finished stages)")
    assert [p.name for p in siblings(out)] == [".out.progress"]
    # interrupted before any stage finished: --resume would find nothing, so it is not suggested
    shutil.rmtree(tmp_path / ".out.progress")
    monkeypatch.setenv("PRUNE_FAULT", "scoring:interrupt")  # in this process: main() turns Ctrl-C into the line
    done = conftest.prune_main("run", recipe, "--quiet")
    assert done.returncode == 130 and done.stderr.strip().splitlines()[-1] == (
        "interrupted; nothing was saved as a checkpoint (no stage had finished: rerun it)")
    # prune remove interrupted while writing: nothing in place of the output, and it says so (it said "interrupted")
    monkeypatch.setenv("PRUNE_FAULT", "saved_weights:interrupt")
    done = conftest.prune_main("remove", tiny_folder, "--blocks", "1", "-o", tmp_path / "cut", "-q")
    assert done.returncode == 130 and done.stderr.strip().splitlines()[-1] == (
        f"interrupted; nothing was written ({tmp_path / 'cut'} does not exist)")
    # interrupted once the new output is in place (replacing an older one): it says so, not "nothing was saved"
    # and --resume (which then failed: the folder exists)
    monkeypatch.delenv("PRUNE_FAULT")
    prune.run(recipe, quiet=True)
    monkeypatch.setenv("PRUNE_FAULT", "swapped:interrupt")
    done = conftest.prune_main("run", recipe, "--quiet", "--overwrite", "--set", "select.n_layers=3")
    assert done.returncode == 130 and done.stderr.strip().splitlines()[-1] == (
        f"interrupted; the output {out} was saved complete before the interruption")
    assert len(json.loads((out / "pruning.json").read_text())["removed"]) == 3
    # ... and with a push in the recipe, the prune push command that finishes it, with the push's own settings
    monkeypatch.delenv("PRUNE_FAULT")
    args = ["--set", "output.push_to_hub={repo_id: me/tiny, revision: v2, private: false}", "--overwrite"]
    from prune import cli

    cli._STARTED = 0.0  # as if this process had started before the output was written
    assert cli._interrupted_run(cli.build_parser().parse_args(["run", str(recipe), *args])) == (
        f"; the output {out} was saved complete before the interruption; the push to me/tiny may not have finished: "
        f"prune push {out} me/tiny --revision v2 --public")


# ---- disk full while saving: one clear error, partial files removed ----------------------------
def test_disk_full_while_saving(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("PRUNE_FAULT", "saved_weights:enospc")
    with pytest.raises(PruneError) as err:
        prune.run(tiny_recipe(tiny_folder, out), quiet=True)
    msg = str(err.value)
    assert msg.startswith(f"disk full while writing {out.resolve()}")
    assert "partial files were removed and no output was written" in msg and "\n" not in msg
    assert not out.exists()
    assert not any(".incomplete-" in p.name for p in siblings(out))
    # the scores survive: after freeing space, --resume reuses them
    monkeypatch.delenv("PRUNE_FAULT")
    result = prune.run(tiny_recipe(tiny_folder, out), quiet=True, resume=True)
    assert result.pruning.resumed == ["scores", "selection", "original"]
    AutoModelForCausalLM.from_pretrained(out)


def test_disk_full_keeps_an_existing_output(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prune.run(tiny_recipe(tiny_folder, out), quiet=True)
    before = digest(out)
    monkeypatch.setenv("PRUNE_FAULT", "before_rename:enospc")
    with pytest.raises(PruneError, match="the existing folder is untouched"):
        prune.run(tiny_recipe(tiny_folder, out), quiet=True, overwrite=True)
    assert digest(out) == before


# ---- resume ------------------------------------------------------------------------------------
def test_resume_equals_an_uninterrupted_run(tiny_folder, tmp_path):
    plain = prune.run(tiny_recipe(tiny_folder, tmp_path / "plain"), quiet=True)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_folder, out))
    assert prune_child("run", recipe, "--quiet", fault="pruned:kill").returncode == -9
    stored = sorted(p.name for p in progress_dir(out).iterdir())
    assert stored == ["original.json", "recipe.json", "scores.json", "selection.json"]
    done = conftest.prune_main("run", recipe, "--resume")  # the resume in this process: the kill needed its own
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "reusing scores, selection, original" in done.stderr  # stage lines: stderr
    assert "scoring 8 blocks" not in done.stderr  # it said so, reusing the stored scores
    assert not progress_dir(out).exists()
    a = json.loads((tmp_path / "plain" / "pruning.json").read_text())
    b = json.loads((out / "pruning.json").read_text())
    assert b["resumed"] == ["scores", "selection", "original"]
    assert a["removed"] == b["removed"] == plain.selection.removed
    for key in ("block_influence", "angular", "cka"):
        assert torch.allclose(torch.tensor(a["scores_before"][key]), torch.tensor(b["scores_before"][key]), atol=1e-12)
    assert json.loads((out / "eval.json").read_text())["rows"] == json.loads((tmp_path / "plain" / "eval.json").read_text())["rows"]
    wa, wb = load_file(tmp_path / "plain" / "model.safetensors"), load_file(out / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_changed_recipe_or_nothing_to_resume(tiny_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PruneError, match=r"nothing to resume: no saved progress at .*\(run without resume=True\)"):  # Python: its parameter
        prune.run(tiny_recipe(tiny_folder, out), quiet=True, resume=True)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_folder, out))
    assert "(run without --resume)" in conftest.prune_main("run", recipe, "--resume", "--quiet", check_rc=2).stderr  # the CLI: its flag
    assert prune_child("run", recipe, "--quiet", fault="selected:kill").returncode == -9
    # the CLI without --resume names the flag
    assert "rerun with --resume to reuse them" in conftest.prune_main("run", recipe, "--quiet", check_rc=2).stderr
    # a changed heal or evaluate section leaves the scores and the selection as they were: reused (the whole run was
    # refused); a changed selection keeps the scores, and the selection is made again
    done = conftest.prune_main("run", recipe, "--resume", "--set", "select.n_layers=3", check_rc=0)
    assert "changed since the interrupted run (select): selection measured again, the other stages reused" in done.stderr
    assert "reusing scores" in done.stderr and json.loads((out / "pruning.json").read_text())["resumed"] == ["scores"]
    assert len(json.loads((out / "pruning.json").read_text())["removed"]) == 3
    # a change every stored stage reads: refused, naming it
    shutil.rmtree(out)
    assert prune_child("run", recipe, "--quiet", fault="selected:kill").returncode == -9
    with pytest.raises(PruneError, match=r"recipe changed since the interrupted run \(sections: calibration\)"):
        prune.run(recipe, overrides=["calibration.seed=5"], quiet=True, resume=True)
    assert progress_dir(out).is_dir()  # kept for a resume with the right recipe
    # another recipe's run without --resume starts over, saying what it removed
    done = conftest.prune_main("run", recipe, "--set", "select.n_layers=3", check_rc=0)
    assert "held the finished stages (scores, selection) of an interrupted run of another recipe: stale for this one, " \
           "removed" in done.stderr, done.stderr


def test_resume_refuses_changed_task_data(tiny_folder, tmp_path):
    """The stored original evaluation depends on the lm-eval task data: a task file edited (or another
    task data folder) after the interruption refuses --resume, naming the file."""
    from prune.pipeline.progress import RunProgress
    from prune.pipeline.recipe import load_recipe

    data = tmp_path / "data"
    shutil.copytree(DATA / "tasks", data / "tasks", ignore=shutil.ignore_patterns("hellaswag"))
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["evaluate"].update(tasks=["copa_local"], data_dir=str(data), limit=4)
    RunProgress(tmp_path / "out", load_recipe(recipe)).put("original", {"stored": True})
    assert RunProgress(tmp_path / "out", load_recipe(recipe), resume=True).get("original") == {"stored": True}
    copa = data / "tasks" / "copa.jsonl"
    copa.write_text(copa.read_text().replace('"gold": 0', '"gold": 1'))
    with pytest.raises(PruneError, match=r"cannot resume: the lm-eval task data \(copa.jsonl\) changed"):
        RunProgress(tmp_path / "out", load_recipe(recipe), resume=True)
    # the scores do not read the task data: stored beside the original evaluation, they are reused, it is not
    shutil.rmtree(tmp_path / ".out.progress")
    both = RunProgress(tmp_path / "out", load_recipe(recipe))
    for stage in ("scores", "original"):
        both.put(stage, {"stored": stage})
    copa.write_text(copa.read_text().replace('"gold": 1', '"gold": 0'))
    kept = RunProgress(tmp_path / "out", load_recipe(recipe), resume=True)
    assert kept.found() == ["scores"] and kept.get("scores") == {"stored": "scores"} and kept.get("original") is None
    # the shipped last-word task reads a file outside tasks/: its edits refuse too (they were reused)
    shutil.copytree(DATA / "tinystories", data / "tinystories")
    recipe["evaluate"].update(tasks=["tinystories_lastword_local"])
    shutil.rmtree(tmp_path / ".out.progress")
    RunProgress(tmp_path / "out", load_recipe(recipe)).put("original", {"stored": True})
    story = data / "tinystories" / "tinystories_sample_2MiB.txt"
    story.write_text(story.read_text()[::-1])
    with pytest.raises(PruneError, match=r"cannot resume: the lm-eval task data \(tinystories_sample_2MiB.txt\) changed"):
        RunProgress(tmp_path / "out", load_recipe(recipe), resume=True)
    # a user task naming its data by a glob or by a folder: the files they hold count (they were not fingerprinted)
    pool, folder = tmp_path / "pool", tmp_path / "mydata"
    pool.mkdir(), folder.mkdir()
    (pool / "a.jsonl").write_text('{"q": 1}\n')
    (folder / "test.jsonl").write_text('{"q": 2}\n')
    tasks = tmp_path / "mytasks"
    tasks.mkdir()
    (tasks / "globbed.yaml").write_text(f"task: globbed\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {folder}/test.jsonl\n    train: {pool}/*.jsonl\n")
    (tasks / "foldered.yaml").write_text(f"task: foldered\ndataset_path: {folder}\n")
    recipe["evaluate"].update(tasks=["globbed", "foldered"], task_dirs=[str(tasks)])
    for changed, name in ((pool / "b.jsonl", "b.jsonl"), (folder / "extra" / "more.jsonl", "more.jsonl")):
        shutil.rmtree(tmp_path / ".out.progress")
        RunProgress(tmp_path / "out", load_recipe(recipe)).put("original", {"stored": True})
        changed.parent.mkdir(exist_ok=True)
        changed.write_text('{"q": 3}\n')
        with pytest.raises(PruneError, match=rf"cannot resume: the lm-eval task data \({name}\) changed"):
            RunProgress(tmp_path / "out", load_recipe(recipe), resume=True)


def test_resume_reads_one_file_named_two_ways_as_the_same(tiny_folder, tmp_path, monkeypatch):
    """The data folder given as a relative path in one run and an absolute one in the other (PRUNE_DATA_DIR set or
    not): the recipes differ as text, name the same files, and the resume was refused ("sections: calibration")."""
    from prune.pipeline.progress import RunProgress
    from prune.pipeline.recipe import load_recipe

    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    RunProgress(tmp_path / "out", load_recipe(recipe)).put("scores", {"stored": True})
    monkeypatch.chdir(DATA.parent)
    relative = dict(recipe, calibration=dict(recipe["calibration"], path=f"{DATA.name}/wikitext2_raw/wiki.test.raw"))
    assert RunProgress(tmp_path / "out", load_recipe(relative), resume=True).get("scores") == {"stored": True}


def test_resume_refuses_a_changed_dataset_folder(tiny_folder, tmp_path):
    """Calibration text from a local folder (read by datasets) was fingerprinted by its name only: new
    rows in it gave stale scores under a record naming the new text."""
    from prune.pipeline.progress import RunProgress
    from prune.pipeline.recipe import load_recipe

    folder = tmp_path / "calib"
    folder.mkdir()
    rows = [json.dumps({"text": line}) for line in conftest.wiki_text(40_000).split("\n") if line.strip()]
    (folder / "train.jsonl").write_text("\n".join(rows[:200]) + "\n")
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["calibration"].update(path=str(folder), rows=None)
    RunProgress(tmp_path / "out", load_recipe(recipe)).put("scores", {"stored": True})
    assert RunProgress(tmp_path / "out", load_recipe(recipe), resume=True).get("scores") == {"stored": True}
    (folder / "train.jsonl").write_text("\n".join(rows[200:400]) + "\n")
    with pytest.raises(PruneError, match="cannot resume"):
        RunProgress(tmp_path / "out", load_recipe(recipe), resume=True)


# ---- non-finite activations: reported, excluded, counted in pruning.json -----------------------
def test_non_finite_activations_are_excluded_and_recorded(tiny_folder, tmp_path):
    """A checkpoint whose embedding row for one token is inf (what fp16 overflow produces): the
    windows holding that token are excluded from the scores and listed in pruning.json."""
    recipe = tiny_recipe(tiny_folder, tmp_path / "out", evaluate=None)
    tok = prune.load(tiny_folder, dtype="float32")[1]
    c = recipe["calibration"]
    text = prune.load_text(prune.TextSource(c["path"], rows=c["rows"]))
    windows = prune.calibration_windows(tok, text, c["n_samples"], c["seq_len"], seed=0)
    sets = [set(w.tolist()) for w in windows]
    only_in_1 = sorted(sets[1] - set().union(*(s for i, s in enumerate(sets) if i != 1)))
    assert only_in_1, "fixture text: window 1 needs a token of its own"
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_folder, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[name][only_in_1[0]] = float("inf")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    recipe["model"]["source"] = str(poisoned)
    result = prune.run(recipe, quiet=True)
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["scores_before"]["excluded_windows"] == [1]
    counted = c["seq_len"] - (result.scores_before.positions == "skip_first")
    assert result.scores_before.n_tokens == (c["n_samples"] - 1) * counted  # window 1 not counted
    assert all(v == v for v in result.scores_before.block_influence)  # no NaN averaged in


# ---- determinism: same recipe and seed, same blocks and scores (to 1e-6), any batch size -------
@pytest.mark.parametrize("strategy", [{"strategy": "one_shot", "metric": "bi"}, {"strategy": "random", "seed": 3}])
def test_same_recipe_same_blocks_and_scores_across_runs_and_batch_sizes(strategy, tiny_folder, tmp_path):
    runs = []
    for i, batch in enumerate([2, 2, 1, 4]):
        recipe = tiny_recipe(tiny_folder, tmp_path / f"out{i}", evaluate=None,
                             select={**strategy, "n_layers": 2})
        recipe["calibration"]["batch_size"] = batch
        prune.run(recipe, quiet=True)
        runs.append(json.loads((tmp_path / f"out{i}" / "pruning.json").read_text()))
    first = runs[0]
    assert first["seed"] == 0 and first["calibration"]["seed"] == 0
    for other in runs[1:]:
        assert other["removed"] == first["removed"]
        for key in ("block_influence", "angular", "cka"):
            a, b = torch.tensor(first["scores_before"][key]), torch.tensor(other["scores_before"][key])
            assert torch.allclose(a, b, atol=1e-6, rtol=0), key
        assert other["msrs_before"]["total"] == pytest.approx(first["msrs_before"]["total"], abs=1e-6)


# ---- a planted Hub token never reaches the terminal or any output file -------------------------
def test_planted_token_is_never_printed_or_written(tiny_folder, tmp_path):
    token = "hf_PlantedTokenThatMustNeverAppear1234567"
    env = {"HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_folder, out))
    outputs = [conftest.prune_cli(*command, unset=("PRUNE_FAULT",), env_extra=env) for command in
               (("run", recipe), ("check", out, "--require-export"), ("push", out, "me/tiny-pruned", "--dry-run"))]
    assert [d.returncode for d in outputs] == [0, 0, 0], [d.stderr for d in outputs]
    for d in outputs:
        assert token not in d.stdout and token not in d.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len([p for p in files if p.is_relative_to(out)]) >= 8
    for path in files:
        assert token.encode() not in path.read_bytes(), path


def _recover_in_step(out: str, barrier, rounds: int, errors) -> None:
    """One of two processes finishing the same half-done swaps at the same moment (ranks of a launch do)."""
    from prune.io.staging import recover

    for _ in range(rounds):
        barrier.wait()  # the parent has planted the next half-done swap
        try:
            recover(Path(out))
        except OSError as exc:
            errors.put(repr(exc))
        barrier.wait()


def test_ranks_finishing_a_killed_swap_together_never_fail(tmp_path):
    """A swap killed between its two renames leaves ``.out.old-<pid>`` (and maybe a complete staging folder);
    every rank's pre-flight finishes it. Two real processes doing so at once: one rename finds its source
    gone, which is another process's success, not an error (the old code raised FileNotFoundError)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=int)
    dead.start()
    dead.join()  # a pid that is no longer alive: the killed process
    out, rounds = tmp_path / "out", 40
    barrier, errors = ctx.Barrier(3, timeout=120), ctx.Queue()  # a failure here must not hang the workers
    workers = [ctx.Process(target=_recover_in_step, args=(str(out), barrier, rounds, errors)) for _ in range(2)]
    for w in workers:
        w.start()
    for i in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        old = tmp_path / f".out.old-{dead.pid}"
        old.mkdir()
        (old / "which").write_text("old")
        (old / "pruning.json").write_text("{}")  # what prune writes: only such folders are finished or removed
        if i % 2:  # the new output had been written completely: the swap is finished with it
            new = tmp_path / f".out.incomplete-{dead.pid}"
            new.mkdir()
            (new / "which").write_text("new")
            (new / "pruning.json").write_text("{}")
        barrier.wait()
        barrier.wait()
        assert (out / "which").read_text() == ("new" if i % 2 else "old")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    for w in workers:
        w.join(timeout=60)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and all(w.exitcode == 0 for w in workers)


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_folder_prune_did_not_write_nor_weights_the_source_links_to(tiny_folder, tmp_path):
    """--overwrite replaced whatever folder it was given: `prune report RUN -o DATA --overwrite` deleted a data
    folder (the run's own inputs were not guarded), and `prune remove SRC -o W --overwrite` replaced the
    folder SRC's weights are symbolic links into (the source then held the pruned weights)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("someone's data\n")
    run = prune.prune_checkpoint(tiny_folder, [1], tmp_path / "run")
    for args in (["remove", tiny_folder, "--blocks", "2"], ["report", run, "--data", conftest.WIKI_RAW, "--n-samples", "2",
                                                            "--seq-len", "32"]):
        res = conftest.prune_main(*args, "-o", data, "--overwrite", check_rc=2)
        assert "was not written by this command" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert _digest(data) == {"notes.txt": hashlib.sha256(b"someone's data\n").hexdigest()}
    res = conftest.prune_main("report", run, "--data", conftest.WIKI_RAW, "--n-samples", "2", "--seq-len", "32",
                             "-o", tiny_folder, "--overwrite", check_rc=2)  # a model folder is not a report's to replace
    assert "this command writes report.json" in res.stderr
    weights = tmp_path / "W"
    weights.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in Path(tiny_folder).iterdir():
        if f.suffix == ".safetensors":
            shutil.copy(f, weights / f.name)
            (linked / f.name).symlink_to(weights / f.name)
        else:
            shutil.copy(f, linked / f.name)
    before = _digest(weights)
    res = conftest.prune_main("remove", linked, "--blocks", "3", "-o", weights, "--overwrite", check_rc=2)
    assert "through its link" in res.stderr and _digest(weights) == before
    conftest.prune_main("remove", linked, "--blocks", "3", "-o", tmp_path / "fine", check_rc=0)


def test_overwrite_never_replaces_a_project_holding_a_config_json_nor_removes_folders_named_like_staging(
        tiny_folder, tmp_path):
    """A project folder with a config.json (and src/, .git, notes) passed for a checkpoint writer's folder and was
    replaced by --overwrite; folders beside the output named like prune's staging or old folders
    (.out.incomplete-backup, .out.old-20240101) were deleted, even by a command that was then refused."""
    project = tmp_path / "proj"
    for name in ("src", ".git"):
        (project / name).mkdir(parents=True)
    (project / "config.json").write_text('{"port": 8080}\n')
    (project / "notes.txt").write_text("mine\n")
    before = _digest(project)
    res = conftest.prune_main("remove", tiny_folder, "--blocks", "3", "-o", project, "--overwrite", check_rc=2)
    assert "was not written by this command (it holds .git, notes.txt, src;" in res.stderr, res.stderr
    assert _digest(project) == before and (project / ".git").is_dir()
    # a plain checkpoint folder (save_pretrained's files, no pruning.json) and prune's own outputs still are replaced
    plain = tmp_path / "plain"
    shutil.copytree(tiny_folder, plain)
    conftest.prune_main("remove", tiny_folder, "--blocks", "3", "-o", plain, "--overwrite", check_rc=0)
    (plain / "report").mkdir()  # what `prune report RUN_DIR` writes into a run folder
    (plain / "report" / "report.json").write_text("{}")
    conftest.prune_main("remove", tiny_folder, "--blocks", "2", "-o", plain, "--overwrite", check_rc=0)
    # the user's folders that only look like staging leftovers are left alone
    box = tmp_path / "box"
    import multiprocessing

    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()  # a process id no longer alive: only what the folder holds says it is not prune's
    names = [".out.incomplete-backup", ".out.old-20240101", f".out.incomplete-{dead.pid}", f".out.old-{dead.pid}"]
    for name in [*names, "out"]:
        (box / name).mkdir(parents=True)
        (box / name / "keep.txt").write_text(name)
    conftest.prune_main("remove", tiny_folder, "--blocks", "3", "-o", box / "out", check_rc=2)  # exists: refused
    assert sorted(p.name for p in box.iterdir()) == sorted([*names, "out"])
    assert all((box / name / "keep.txt").read_text() == name for name in names)


def test_a_read_command_finishes_a_killed_swap_first(tiny_folder, tmp_path):
    """A writer killed between the two renames of an overwrite leaves the old output as .out.old-<pid>; the
    next command on that output finishes the swap, a reading one too (check, eval, push said it was missing)."""
    import multiprocessing

    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    run = prune.prune_checkpoint(tiny_folder, [1], tmp_path / "run", pruning={"removed": [1]})
    for args in (["check", tmp_path / "out"], ["export-mergekit", tmp_path / "out", "-o", tmp_path / "out.yaml"],
                 ["report", tmp_path / "out", "-o", tmp_path / "rep"]):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        shutil.copytree(run, tmp_path / f".out.old-{dead.pid}")
        res = conftest.prune_main(*args)
        assert "no pruning.json" not in res.stderr and "is not a folder" not in res.stderr, (args, res.stderr)
        assert (tmp_path / "out" / "pruning.json").is_file() and not (tmp_path / f".out.old-{dead.pid}").exists()
