"""The `prune` command: through its real entry point (a subprocess) where what a process shows is
the point, in-process (``prune.cli.main``) where only what the command decides is."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from prune.measure.scoring import ScoreResult

from conftest import DATA, WIKI_RAW, prune_cli, prune_main, tiny_recipe


def test_console_script_is_installed():
    exe = shutil.which("prune", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout and "score" in out.stdout and "eval" in out.stdout


def test_help_of_every_subcommand_is_complete():
    from prune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"prune {name} {action.option_strings} has no help"
                assert action.option_strings[-1] in text


def test_run_writes_a_complete_output_folder(tmp_path, tiny_folder):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_folder, tmp_path / "out")))
    proc = prune_cli("run", recipe, "--set", "select.n_layers=2", check_rc=0)
    assert "removing 2 of 8 blocks (0-based): [3, 4]" in proc.stderr  # stage lines on stderr, results on stdout
    assert "| perplexity | ppl |" in proc.stdout and "| layers | count | 8 | 6 |" in proc.stdout
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "pruning.json", "eval.json",
            "eval.md"} <= names
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["removed"] == [3, 4] and pruning["kept"] == [0, 1, 2, 5, 6, 7]
    assert pruning["msrs_before"]["total"] > pruning["msrs_after"]["total"]
    assert pruning["calibration"]["seed"] == 0 and "transformers" in pruning["versions"]
    # where the time went: each stage of the run, in order, on stderr and in pruning.json
    stages = pruning["stage_seconds"]
    assert list(stages) == ["pre-flight", "load", "score", "choose", "evaluate original", "remove", "score pruned",
                            "evaluate pruned"]
    assert all(s >= 0 for s in stages.values()) and sum(stages.values()) <= pruning["seconds"] + 0.5
    assert re.search(r"^done in [\d.]+ s: pre-flight [\d.]+ s, load .*, write [\d.]+ s$", proc.stderr, re.M)
    evaluation = json.loads((out / "eval.json").read_text())
    ppl = next(r for r in evaluation["rows"] if r["name"] == "perplexity")
    assert ppl["pruned"] == pytest.approx(evaluation["pruned"]["perplexity"]["perplexity"])
    assert yaml.safe_load((out / "recipe.yaml").read_text())["select"]["n_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6

    again = prune_main("run", recipe, check_rc=2)
    assert again.stderr.startswith("error: output folder") and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    quiet = prune_cli("run", recipe, "--overwrite", "--quiet", check_rc=0)  # no progress, no table: where it went
    assert quiet.stdout == f"saved {out.resolve()}\n" and "%|" not in quiet.stderr and "scoring" not in quiet.stderr


def test_bad_recipe_exits_2_with_one_line(tmp_path, tiny_folder):
    recipe = tmp_path / "r.yaml"
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["select"]["stratgy"] = "tail"
    recipe.write_text(yaml.safe_dump(data))
    proc = prune_main("run", recipe, check_rc=2)
    assert proc.stderr.count("\n") == 1 and "unknown key 'select.stratgy'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_score_prints_table_and_writes_json(tmp_path, tiny_folder):
    proc = prune_main("score", tiny_folder, "--data", WIKI_RAW, "--rows", "0:300", "--n-samples", 4, "--seq-len", 32,
                     "--positions", "skip_first", "-o", tmp_path / "s.json", check_rc=0)
    assert "MSRS =" in proc.stdout and "positions=skip_first" in proc.stdout
    assert re.search(r"^done in [\d.]+ s: pre-flight [\d.]+ s, load and score [\d.]+ s, write [\d.]+ s$", proc.stderr, re.M)
    result = ScoreResult.load_json(tmp_path / "s.json")
    assert result.n_layers == 8 and result.positions == "skip_first" and result.n_windows == 4
    assert result.metadata["model_type"] == "llama"


def test_eval_runs_local_lm_eval_tasks_and_perplexity(tmp_path, tiny_folder):
    proc = prune_main("eval", tiny_folder, "--tasks", "arc_easy,winogrande", "--limit", 6, "--data-dir", DATA,
                     "--perplexity-data", WIKI_RAW, "--perplexity-rows", "0:200", "--seq-len", 32, "--max-windows", 2,
                     "-o", tmp_path / "e.json", "--quiet", check_rc=0)
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["tasks"]) == {"arc_easy_local", "winogrande_local"}  # local copies, named as such
    assert result["tasks"]["arc_easy_local"]["n"] == 6 and 0 <= result["tasks"]["arc_easy_local"]["metrics"]["acc"] <= 1
    assert result["perplexity"]["windows"] == 2 and result["layers"] == 8
    assert "arc_easy" in proc.stdout and "winogrande" in proc.stdout


def test_quiet_mode_is_undone_for_the_next_run_in_the_process(tmp_path, tiny_folder):
    """``quiet_mode(False)`` restores what ``quiet_mode(True)`` changed: ``TQDM_DISABLE`` (which tqdm
    reads for every bar, and child processes inherit), the libraries' bars and verbosity; and
    ``prune.run(..., quiet=True)`` leaves the process as quiet as it found it."""
    import os

    import datasets
    import huggingface_hub.utils as hub
    import transformers
    from tqdm import tqdm

    from prune.core.console import quiet_mode

    def state():
        log = transformers.utils.logging
        return (os.environ.get("TQDM_DISABLE"), log.get_verbosity(), log.is_progress_bar_enabled(),
                datasets.is_progress_bar_enabled(), hub.are_progress_bars_disabled())

    quiet_mode(False)  # whatever an earlier test in this process left
    before = state()
    quiet_mode(True)
    assert os.environ["TQDM_DISABLE"] == "1" and tqdm(range(1)).disable
    quiet_mode(True)  # twice: the first snapshot is kept
    quiet_mode(False)
    assert state() == before
    if before[0] is None:
        assert not tqdm(range(1)).disable  # a bar shows again
    from prune.pipeline.orchestrator import run

    run(tiny_recipe(tiny_folder, tmp_path / "out"), quiet=True)
    assert state() == before


@pytest.mark.parametrize("seconds, shown", [(0.04, "0.0 s"), (3.14, "3.1 s"), (9.96, "10 s"), (42.4, "42 s"), (59.6, "1 min 00 s"),
                                            (362.0, "6 min 02 s"), (3725, "1 h 02 min")])
def test_durations_read_as_people_write_them(seconds, shown):
    from prune.core.console import duration

    assert duration(seconds) == shown


def test_score_reads_a_datasets_configuration_split_and_bos_flag(tmp_path, tiny_folder):
    """prune score / report had no --data-config, --split or --bos (a recipe could say them): a local
    dataset folder with two configurations and two splits is read as asked, the same as the files."""
    lines = [line for line in WIKI_RAW.read_text(encoding="utf-8").split("\n") if line.strip()]
    folder = tmp_path / "corpus"
    parts = {"alpha/train": lines[:150], "beta/train": lines[150:300], "beta/validation": lines[300:450]}
    for name, rows in parts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: alpha\n  data_files:\n  - {split: train, path: alpha/train.jsonl}\n"
        "- config_name: beta\n  data_files:\n  - {split: train, path: beta/train.jsonl}\n"
        "  - {split: validation, path: beta/validation.jsonl}\n---\n")
    common = ["--n-samples", 4, "--seq-len", 32, "-q"]

    def scores(*args):
        out = tmp_path / f"s{len(list(tmp_path.glob('s*.json')))}.json"
        prune_main("score", tiny_folder, *args, *common, "-o", out, check_rc=0)
        return ScoreResult.load_json(out)

    from_folder = scores("--data", folder, "--data-config", "beta", "--split", "validation")
    from_file = scores("--data", folder / "beta" / "validation.jsonl")
    assert from_folder.block_influence == from_file.block_influence
    assert from_folder.metadata["data"]["config"] == "beta" and from_folder.metadata["data"]["split"] == "validation"
    assert scores("--data", folder, "--data-config", "alpha").block_influence != from_folder.block_influence
    no_bos = scores("--data", folder / "beta" / "validation.jsonl", "--no-bos")
    assert no_bos.block_influence != from_file.block_influence and no_bos.metadata["data"]["bos"] is False
    bad = prune_main("score", tiny_folder, "--data", folder, "--data-config", "gamma", *common)
    assert bad.returncode == 2 and "could not load dataset" in bad.stderr and "config 'gamma'" in bad.stderr


def test_remove_shows_a_progress_bar_of_the_bytes_written_unless_quiet(tmp_path, tiny_folder):
    """``prune remove`` copies every kept tensor (minutes for a large model): a tqdm bar in bytes, none with -q."""
    shown = prune_main("remove", tiny_folder, "--blocks", "2", "-o", tmp_path / "a", check_rc=0)
    assert "writing shards" in shown.stderr and "100%" in shown.stderr, shown.stderr
    quiet = prune_main("remove", tiny_folder, "--blocks", "2", "-o", tmp_path / "b", "-q", check_rc=0)
    assert "writing shards" not in quiet.stderr and f"wrote {tmp_path / 'b'}" in quiet.stdout


@pytest.mark.parametrize("args, message", [
    (["compare", "a", "b", "--iters", "0"], "argument --iters: '0' is not a whole number of at least 1"),
    # numpy was asked for 7 TiB: a traceback after reading both folders
    (["compare", "a", "b", "--iters", "1000000000000"], "argument --iters: 1000000000000 resamples is more than 1,000,000"),
    (["compare", "a", "b", "--seed", "-1"], "argument --seed: '-1' is not a whole number of at least 0"),
    (["export-mergekit", "run", "--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
    (["remove", "org/model", "--blocks", "1", "-o", "x", "--base-model", "other/base"],
     "--base-model is only for a local MODEL: org/model is a Hub id"),
    (["report", "/nonexistent/run"], "/nonexistent/run not found"),
    (["report", "org/model"], "org/model not found here (give a 'prune run' output folder; as a Hub model it needs --data"),
    (["score", "org/model", "--data", WIKI_RAW, "--split", "test"], "--split / --data-config select part of a datasets"),
    (["remove", "org/model", "--slices", "missing.yaml", "-o", "x"], "--slices file not found: missing.yaml"),
    (["compare", "a", "b", "--overwrite"], "--overwrite has no effect without --output"),
    (["compare", "nope1", "nope2"], "neither folder exists: nope1, nope2"),  # it named B, then A once B was there
    # read as a device's name: "names a device that is not present"
    (["score", "m", "--data", "d.txt", "--device-map", "[1,2]"], "argument --device-map: '[1,2]' is a list: give auto"),
    # argparse reads "-10:" as a flag: it said "expected one argument", and nothing of how to give the value
    (["score", "m", "--data", "d.txt", "--rows", "-10:"],
     "argument --rows: expected one argument (a value that starts with '-' is given as --rows=VALUE) (see prune score --help)"),
    # a check across flags names the flags typed (it said "flags: tau shape ..." with the whole settings dict)
    (["score", "m", "--data", "d.txt", "--metrics", "bi,angular", "--tau", "0.5"],
     "error: --tau shape the CKA matrix and MSRS, but --metrics has no cka: add cka to --metrics, or drop them"),
    (["score", "m", "--data", "d.txt", "--overwrite"], "--overwrite has no effect without --output"),
])
def test_flags_a_command_cannot_use_are_one_line(args, message, tmp_path, monkeypatch):
    """A traceback (--iters 0: IndexError; --seed -1: ValueError), a value written unchecked (mergekit's dtype), a
    flag ignored (--base-model of a Hub model), a folder that does not exist called 'not a run folder'."""
    monkeypatch.chdir(tmp_path)
    proc = prune_main(*args, check_rc=2)
    assert [message in line for line in proc.stderr.strip().splitlines()] == [True], proc.stderr  # no usage above it


@pytest.mark.parametrize("command, example", [(["compare", "a", "b"], "compare.json"),
                                              (["eval", "m", "--perplexity-data", "d.txt"], "eval.json"),
                                              (["score", "m", "--data", "d.txt"], "scores.json")])
def test_a_folder_given_for_an_output_file_is_told_the_commands_own_file_name(command, example, tmp_path, monkeypatch):
    """Each said "give a file name (e.g. DIR/scores.json)", the score command's file, whatever wrote it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    proc = prune_main(*command, "--output", "adir", check_rc=2)
    assert proc.stderr == f"error: --output file adir is a folder; give a file name (e.g. adir/{example})\n"


def test_report_refuses_a_metric_its_strategy_does_not_read_and_an_impossible_run_before_scoring(tiny_folder, tmp_path):
    common = ["report", tiny_folder, "--data", WIKI_RAW, "--rows", "0:300", "--n-samples", "2", "--seq-len", "16",
              "-o", tmp_path / "r"]
    proc = prune_main(*common, "--metric", "bi", check_rc=2)  # default strategy contiguous: angular distances only
    assert "--metric has no effect with --strategy contiguous (only one_shot reads it; contiguous ranks by angular" \
        in proc.stderr
    # --metric angular names what contiguous reads: accepted, as by the recipe and prune.select
    proc = prune_main(*common, "--strategy", "contiguous", "--metric", "angular", "--n-layers", "4", "--protect",
                      "0,3,-1", check_rc=2)
    assert "no run of 4 contiguous blocks" in proc.stderr and "--n-layers" in proc.stderr
    assert "scoring" not in proc.stderr and "execution" not in proc.stderr  # refused before loading or scoring
    # a last CKA batch of fewer windows: refused before loading, in the flags typed
    proc = prune_main("score", tiny_folder, "--data", WIKI_RAW, "--n-samples", "10", "--cka-windows", "4", "--seq-len",
                      "16", check_rc=2)
    assert "--cka-windows 4 does not divide the 10 windows" in proc.stderr and "set --n-samples to a multiple: 8 or 12; " \
        "or change --cka-windows" in proc.stderr and "scoring" not in proc.stderr, proc.stderr
    # too little text for the windows asked: the flags typed, not the recipe keys
    proc = prune_main("score", tiny_folder, "--data", WIKI_RAW, "--rows", "0:10", "--n-samples", "1000", "--seq-len",
                      "16", check_rc=2)
    assert "lower --n-samples / --seq-len" in proc.stderr, proc.stderr
