"""A careless or hostile user, with real files: code in a downloaded folder, outputs aimed at the
inputs, weights that do not match the config, stale progress, a full disk, hostile YAML, data and
metadata, bad flags and tokens in arguments. Each case: one ``error:`` line, exit 2, nothing lost.

The CLI runs in-process (``prune.cli.main``) except where a process must die or load code."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.cli import input_error, main

from conftest import DATA, WIKI_RAW, build_model, prune_forked, prune_main, tiny_recipe

C4 = DATA / "c4" / "c4_web_1480.jsonl"
TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"  # shaped like a token, not a real one


def cli(capsys, *args) -> tuple[int, str]:
    """``prune ARGS`` in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refused(capsys, *args, match: str) -> str:
    code, err = cli(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and match in line, err
    return line


def digest(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def model(tiny_folder, tmp_path) -> Path:
    """A private copy of the tiny model (tests may point outputs at it)."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "models" / "tiny"))


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory) -> Path:
    """A real `prune run` output folder (module-wide: tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    prune.run(tiny_recipe(tiny_folder, out), quiet=True)
    return out


# ==== 1. consent for code ========================================================================
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def plant_code(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))


def test_hub_kernels_stay_off(model):
    """transformers 5 swaps layers for kernels fetched from the Hub by default (code from the Hub, and
    offline on a GPU the load fails: seen on an H200); load_model asks for none."""
    assert AutoModelForCausalLM.from_pretrained(model).use_kernels  # the library's default: on
    loaded, _, _ = prune.load_model(model)
    assert loaded.use_kernels is False


def heal_cli(run: Path, out: Path, *extra, in_process: bool = False) -> subprocess.CompletedProcess:
    """``prune heal`` of a run folder; in a process of its own (forked: the planted code runs there, not in the
    tests' process) unless ``in_process`` (only for a call that must not run the planted code: should it run
    anyway, it writes the marker the test checks)."""
    args = ["heal", run, "-o", out, "--method", "lora", "--data", C4, "--field", "prefix", "--rows", "0:200",
            "--set", "n_samples=4", "--set", "val_samples=0", "--set", "seq_len=32", "--set", "steps=1",
            "--set", "batch_size=2", "-q", *extra]
    return prune_main(*args) if in_process else prune_forked(*args)


def test_heal_never_takes_trust_remote_code_from_the_run_folder(run_dir, tmp_path):
    evil = Path(shutil.copytree(run_dir, tmp_path / "downloaded"))
    marker = tmp_path / "pwned"
    plant_code(evil, marker)
    recipe = yaml.safe_load((evil / "recipe.yaml").read_text())
    recipe["model"]["trust_remote_code"] = True  # the folder tries to grant itself consent
    (evil / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    done = heal_cli(evil, tmp_path / "healed", in_process=True)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert "ignored for an input folder" in done.stderr
    # control: the planted code is real and runs when the user asks, and the run says so on stderr
    done = heal_cli(evil, tmp_path / "healed2", "--trust-remote-code")
    assert marker.exists()
    assert done.stderr.count("trust_remote_code is ON") == 1  # the pre-flight and the load said it twice


def test_heal_never_reads_task_folders_from_the_run_folders_recipe(run_dir, tmp_path):
    """lm-eval's ``!function`` imports Python beside a task YAML: a downloaded run folder whose recipe named its
    own task folder had that code run by `prune heal --evaluate`, no flag asked."""
    evil = Path(shutil.copytree(run_dir, tmp_path / "downloaded"))
    marker = tmp_path / "pwned"
    (evil / "tasks").mkdir()
    (evil / "tasks" / "data.jsonl").write_text(json.dumps({"q": "pick"}) + "\n")
    (evil / "tasks" / "utils.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                             "def process_docs(ds):\n    return ds\n")
    (evil / "tasks" / "evil.yaml").write_text(
        "task: evil_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {str(evil / 'tasks' / 'data.jsonl')!r}\ntest_split: test\noutput_type: multiple_choice\n"
        "process_docs: !function utils.process_docs\ndoc_to_text: '{{q}}'\ndoc_to_choice: \"{{['a', 'b']}}\"\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    recipe = yaml.safe_load((evil / "recipe.yaml").read_text())
    recipe["evaluate"].update(tasks=["evil_task"], task_dirs=[str(evil / "tasks")], limit=1)
    (evil / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    done = heal_cli(evil, tmp_path / "healed", "--evaluate", in_process=True)
    assert done.returncode == 2 and "whose YAML files can import Python" in done.stderr, done.stderr
    assert f"--task-dir {evil / 'tasks'}" in done.stderr and not marker.exists()
    # control: the planted code is real, and runs when the user names the folder
    done = heal_cli(evil, tmp_path / "healed2", "--evaluate", "--task-dir", evil / "tasks")
    assert done.returncode == 0, done.stderr
    assert marker.exists()
    assert done.stdout.splitlines()[-1] == f"saved {(tmp_path / 'healed2').resolve()}"  # -q: where, not how


def test_a_records_strings_cannot_add_markup_to_the_card_or_report(run_dir, tmp_path, capsys):
    """A selection strategy holding a backtick, line breaks and HTML broke out of its code span and table cell:
    a raw <script> line and a new heading in the card of the next step, and in report.md."""
    evil = Path(shutil.copytree(run_dir, tmp_path / "downloaded"))
    record = json.loads((evil / "pruning.json").read_text())
    record["selection"]["strategy"] = "x`\n\n<script>alert(1)</script>\n# H"
    (evil / "pruning.json").write_text(json.dumps(record))
    assert cli(capsys, "remove", evil, "--blocks", "2", "-o", tmp_path / "out")[0] == 0
    assert cli(capsys, "report", evil, "-o", tmp_path / "rep")[0] == 0
    for text in ((tmp_path / "out" / "README.md").read_text(), (tmp_path / "rep" / "report.md").read_text()):
        lines = text.splitlines()
        assert not [line for line in lines if line.startswith(("<script>", "# H"))]
        assert not [line for line in lines if "<script>" in line and "`" not in line]  # only shown inside code spans



def outside_fences(text: str) -> list[str]:
    """The lines of Markdown ``text`` outside its fenced code blocks (CommonMark: a fence closes on a line of at
    least as many backticks)."""
    out, fence = [], None
    for line in text.splitlines():
        if fence is None and (m := re.match(r"(`{3,})", line)):
            fence = m.group(1)
        elif fence is not None and re.fullmatch(r"`{%d,} *" % len(fence), line):
            fence = None
        elif fence is None:
            out.append(line)
    return out


def test_no_string_of_a_downloaded_run_folder_adds_markup_or_terminal_codes(run_dir, tmp_path, capsys):
    """The healing record's keys and values, the saved dtype (closing its code span), the evaluation's rows and
    dtype, the source's name (report.md's title) and a recipe line of three backticks (closing the card's fence)
    put raw HTML and headings into the card `prune push` publishes and into report.md."""
    from prune.export.push import card_for_repo

    evil = Path(shutil.copytree(run_dir, tmp_path / "downloaded"))
    bad = "x`\n\n<script>alert(1)</script>\n# H \x1b]0;title\x07"
    record = json.loads((evil / "pruning.json").read_text())
    record["healing"] = {"method": "lora", "settings": {"method": "lora", bad: bad}, bad: bad, "data": {bad: bad}}
    record["dtype"] = bad
    record["source"]["path"] = "/x/" + bad
    record["scores_before"]["positions"] = record["selection"]["metric"] = bad  # report.md's prose
    (evil / "pruning.json").write_text(json.dumps(record))
    evaluation = json.loads((evil / "eval.json").read_text())
    evaluation["settings"]["perplexity"]["rows"] = evaluation["settings"]["dtype"] = bad
    (evil / "eval.json").write_text(json.dumps(evaluation))
    with (evil / "recipe.yaml").open("a") as recipe:
        recipe.write("\n# ```\n```\n\n<script>alert(2)</script>\n\n# H\n\n```yaml\n")
    assert cli(capsys, "report", evil, "-o", tmp_path / "rep")[0] == 0
    card = card_for_repo(evil, "me/model")["README.md"]
    assert "<script>alert(2)</script>" in card  # the recipe's planted lines are there, inside its fence
    for text in (card, (tmp_path / "rep" / "report.md").read_text()):
        lines = outside_fences(text)
        assert "alert(1)" in text and "\x1b" not in text
        assert not [line for line in lines if line.startswith(("<script>", "# H"))]
        assert not [line for line in lines if "<script>" in re.sub(r"`[^`]+`", "", line)]  # in code spans only


def test_heal_evaluate_reads_only_the_run_folders_own_lm_eval_files_and_checks_them_first(run_dir, tmp_path, capsys):
    """A heal copies the run's lm-eval files into its output: a link to a file outside (a private key) was copied
    as a plain file, ready to push; a damaged samples file or eval.json failed after training (a traceback)."""
    secret = tmp_path / "id_rsa"
    secret.write_text("a private key")
    name = "samples_arc_easy_2026-01-01T00-00-00.000000.jsonl"
    cases = [("link", lambda e: (e / name).symlink_to(secret), "leads to .*outside the run folder"),
             ("truncated", lambda e: (e / name).write_text('{"doc_id": 0, "doc_ha\n'), r"\.jsonl: .*(JSON|lm-eval)"),
             ("eval_json", None, "is not the evaluation prune writes")]
    for case, plant, match in cases:
        evil = Path(shutil.copytree(run_dir, tmp_path / case))
        (evil / "eval" / "original").mkdir(parents=True)
        if plant is None:
            evaluation = json.loads((evil / "eval.json").read_text())
            evaluation["original"]["perplexity"] = "x"
            (evil / "eval.json").write_text(json.dumps(evaluation))
        else:
            plant(evil / "eval" / "original")
        done = heal_cli(evil, tmp_path / f"healed-{case}", "--evaluate", in_process=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert re.search(match, done.stderr) and "healing" not in done.stdout, done.stderr
        assert not (tmp_path / f"healed-{case}").exists()


def test_heal_without_training_text_names_its_flag(run_dir, tmp_path, capsys):
    """It named the recipe key (heal.data.path: ...), which prune heal takes only through --config."""
    refused(capsys, "heal", run_dir, "-o", tmp_path / "h", "--method", "lora",
            match="'heal.data' is missing: give training text that is not the evaluation text (e.g. --data ")


def test_heal_reads_no_secret_of_the_environment_through_the_run_folders_recipe(run_dir, tmp_path, capsys, monkeypatch):
    """A downloaded run folder's recipe.yaml naming ${HF_TOKEN} had it filled from the environment, and the token
    was then written into the healed folder's recipe.yaml and card (and pushed with them)."""
    evil = Path(shutil.copytree(run_dir, tmp_path / "downloaded"))
    recipe = yaml.safe_load((evil / "recipe.yaml").read_text())
    recipe["calibration"]["split"] = "${HF_TOKEN}"
    (evil / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("HF_TOKEN", "hf_CCCCCCCCCCCCCCCCCCCCCCCCCCCC")
    args = ["--method", "lora", "--data", C4, "--field", "prefix", "--rows", "0:200", "--set", "steps=1", "-q"]
    refused(capsys, "heal", evil, "-o", tmp_path / "h", *args, match="uses ${HF_TOKEN}: a recipe read from an input folder")
    assert not (tmp_path / "h").exists()
    # the user's own settings may read the environment, but a token in them is refused too (they are published)
    refused(capsys, "heal", run_dir, "-o", tmp_path / "h", *args, "--set", "data.split=${HF_TOKEN}",
            match="holds an access token")
    # a default that names another variable is not expanded by a second pass (it was: the token reached the card)
    recipe["calibration"]["split"] = "train"
    recipe["model"]["revision"] = "${PRUNE_DATA_DIR:-${HF_TOKEN}}"
    (evil / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("PRUNE_DATA_DIR", "")  # empty: the default stands in
    refused(capsys, "heal", evil, "-o", tmp_path / "h", *args, match="uses ${HF_TOKEN}: a recipe read from an input folder")
    assert not (tmp_path / "h").exists()


def test_heal_reads_a_saved_recipe_with_settings_nothing_reads(run_dir, tmp_path):
    """A run folder of an older version may hold settings the checks of user recipes now refuse (an lm-eval limit
    without tasks, a metric its strategy ignores): prune heal cannot change them, and reads the folder."""
    old = Path(shutil.copytree(run_dir, tmp_path / "old"))
    recipe = yaml.safe_load((old / "recipe.yaml").read_text())
    recipe["evaluate"]["limit"] = 100
    recipe["select"].update(strategy="contiguous", metric="bi", heldout_windows=8)  # 8: every dump before 2026-12-02
    (old / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # and a --config recipe whose other sections name a variable that is not set: only its heal section is read
    config = tmp_path / "heal.yaml"
    config.write_text("model:\n  source: ${PRUNE_TEST_UNSET_MODEL}\nheal:\n  steps: 1\n")
    done = heal_cli(old, tmp_path / "healed", "--config", config, in_process=True)
    assert done.returncode == 0, done.stderr


# ==== 2. inputs are sacred ========================================================================
@pytest.mark.parametrize("where, match", [
    ("source", "is the source model"),
    ("source_parent", "contains the source model"),
    ("cwd", "is the working directory"),
    ("cwd_parent", "contains the working directory"),
    ("recipe", "is the recipe file"),
    ("inside_source", "is inside the source model"),
    ("data_parent", "contains a data file"),
])
def test_run_refuses_an_output_that_would_destroy_an_input(where, match, model, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data" / "calib.txt"
    data.parent.mkdir()
    shutil.copy(WIKI_RAW, data)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (model.parent / "sibling.txt").write_text("an unrelated file")
    recipe_file = tmp_path / "r.yaml"
    out = {"source": model, "source_parent": model.parent, "cwd": ".", "cwd_parent": "..", "recipe": recipe_file,
           "inside_source": model / "pruned", "data_parent": data.parent}[where]
    recipe = tiny_recipe(model, out)
    recipe["calibration"]["path"] = str(data)
    recipe["output"]["overwrite"] = True
    write_recipe(recipe_file, recipe)
    before = digest(tmp_path)
    refused(capsys, "run", recipe_file, "--overwrite", match=match)
    assert digest(tmp_path) == before


def test_remove_and_heal_refuse_outputs_over_their_inputs(model, run_dir, tmp_path, capsys):
    before = digest(model.parent)
    refused(capsys, "remove", model, "--blocks", "3", "-o", model, "--overwrite", match="is the source model")
    refused(capsys, "remove", model, "--blocks", "3", "-o", model.parent, "--overwrite", match="contains the source")
    assert digest(model.parent) == before
    # a --slices file inside an earlier output given again (it was deleted with the folder it sat in)
    step = Path(prune.prune_checkpoint(model, [2], tmp_path / "step1"))
    (step / "my_slices.yaml").write_text("[[0, 3], [5, 8]]\n")
    refused(capsys, "remove", model, "--slices", step / "my_slices.yaml", "-o", step, "--overwrite",
            match="the --slices file")
    assert (step / "my_slices.yaml").is_file()
    run = Path(shutil.copytree(run_dir, tmp_path / "p" / "run"))
    for out, match in [(run, "is the run folder"), (run.parent, "contains the run folder"),
                       (run / "healed", "is inside the run folder")]:
        refused(capsys, "heal", run, "-o", out, "--overwrite", "--method", "lora", "--data", C4, "--field", "prefix",
                match=match)
    refused(capsys, "report", run, "-o", run, "--overwrite", match="is the run folder")
    refused(capsys, "report", run, "-o", run.parent, "--overwrite", match="contains the run folder")
    assert (run / "model.safetensors").is_file()
    # what the healing reads beyond its flags' files: the original (--source) and the run recipe's texts
    before = digest(model.parent)
    refused(capsys, "heal", run, "-o", model, "--overwrite", "--method", "replace", "--source", model, "--data", C4,
            "--field", "prefix", match="is the source model")
    assert digest(model.parent) == before
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(WIKI_RAW, texts / WIKI_RAW.name)
    refused(capsys, "heal", run, "-o", texts, "--overwrite", "--method", "lora", "--data", C4, "--field", "prefix",
            "--calibration-data", texts / WIKI_RAW.name, match="contains a data file")
    assert (texts / WIKI_RAW.name).is_file()


def test_the_home_folder_is_never_an_output(model, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    refused(capsys, "remove", model, "--blocks", "3", "-o", "~", "--overwrite", match="is the home folder")
    assert (home / "work").is_dir()


def test_an_unfinished_output_is_not_an_input(model, tmp_path, capsys):
    """A killed run's staging folder (it holds INCOMPLETE, its last file may be cut short) was scored, evaluated and
    pruned like a model; prune remove then wrote a folder prune check called complete."""
    staging = Path(shutil.copytree(model, tmp_path / ".out.incomplete-123"))
    (staging / "INCOMPLETE").write_text("written by prune; a killed run leaves this folder\n")
    for args in (("score", staging, "--data", WIKI_RAW), ("remove", staging, "--blocks", "3", "-o", tmp_path / "o"),
                 ("eval", staging, "--perplexity-data", WIKI_RAW)):
        refused(capsys, *args, match="is an unfinished output (it holds INCOMPLETE")
    assert not (tmp_path / "o").exists()


def test_score_and_eval_never_write_over_an_input_or_an_existing_file(model, tmp_path, capsys):
    weights = model / "model.safetensors"
    before = weights.read_bytes()
    refused(capsys, "score", model, "--data", WIKI_RAW, "-o", weights, match="is inside the source model")
    refused(capsys, "eval", model, "--perplexity-data", WIKI_RAW, "-o", weights, "--overwrite", match="is inside")
    refused(capsys, "score", model, "--data", WIKI_RAW, "-o", WIKI_RAW, "--overwrite", match="is a data file")
    original = Path(shutil.copytree(model, tmp_path / "original"))
    refused(capsys, "eval", model, "--perplexity-data", WIKI_RAW, "--fidelity-to", original, "-o",
            original / "model.safetensors", "--overwrite", match="is inside the original model (--fidelity-to)")
    assert (original / "model.safetensors").read_bytes() == before
    assert weights.read_bytes() == before
    # another model's files (not an input of this command): --overwrite replaced its weights and config too
    other = Path(shutil.copytree(model, tmp_path / "other"))
    for name in ("model.safetensors", "config.json"):
        refused(capsys, "score", model, "--data", WIKI_RAW, "-o", other / name, "--overwrite", match=f"is a file of a model ({name})")
        assert (other / name).read_bytes() == (model / name).read_bytes()
    existing = tmp_path / "scores.json"
    existing.write_text("keep me")
    refused(capsys, "score", model, "--data", WIKI_RAW, "-o", existing, match="already exists")
    (tmp_path / "dir").mkdir()
    refused(capsys, "score", model, "--data", WIKI_RAW, "-o", tmp_path / "dir", match="is a folder")
    assert existing.read_text() == "keep me"
    code, err = cli(capsys, "score", model, "--data", WIKI_RAW, "--rows", "0:300", "--n-samples", "2", "--seq-len", "32",
                    "-o", existing, "--overwrite", "-q")
    assert code == 0, err
    assert json.loads(existing.read_text())["n_layers"] == 8
    assert not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]


def test_compare_and_lm_eval_outputs_never_land_on_an_input(model, tmp_path, capsys, monkeypatch):
    """prune compare -o is refused on one of the compared results (and on an existing file without
    --overwrite); prune eval --output-path is refused where lm-eval's folder would sit in the model."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("keep me")
    b.write_text("{}")
    refused(capsys, "compare", a, b, "-o", a, "--overwrite", match="is a compared result")
    refused(capsys, "compare", a, b, "-o", b, match="is a compared result")
    refused(capsys, "compare", a, b, "-o", WIKI_RAW.parent, match="is a folder")
    assert a.read_text() == "keep me"
    before = digest(model)
    monkeypatch.chdir(model.parent)
    refused(capsys, "eval", model.name, "--tasks", "copa_local", "--limit", "2", "--output-path", model.name,
            match="is inside the source model")
    refused(capsys, "eval", model, "--tasks", "copa_local", "--limit", "2", "--output-path", a, match="is a file")
    assert digest(model) == before
    # nor inside the task data (a resume fingerprints it), nor the same path as -o (it failed after evaluating)
    data = tmp_path / "data"
    (data / "tasks").mkdir(parents=True)
    refused(capsys, "eval", model, "--tasks", "copa_local", "--limit", "2", "--data-dir", data, "--output-path",
            data / "tasks", match="is inside the task data folder")
    refused(capsys, "eval", model, "--tasks", "copa_local", "--limit", "2", "-o", tmp_path / "same", "--output-path",
            tmp_path / "same", match="--output and --output-path both name")
    assert not (tmp_path / "same").exists() and list((data / "tasks").iterdir()) == []


def test_flag_values_that_failed_late_or_named_the_wrong_flag(model, tmp_path, capsys):
    """Refused in one line naming the flag, before any scoring: a report asked to mark more blocks
    than there are, none, or by a score it is not given; an infinite --limit; --fidelity-top-k 0; an
    original of another vocabulary (before either model loads)."""
    report = ("report", model, "--data", WIKI_RAW, "--rows", "0:300", "--n-samples", "2", "--seq-len", "32")
    refused(capsys, *report, "--n-layers", "20", "-o", tmp_path / "r1", match="cannot remove 20 of 8 blocks: at least one "
            "must stay (lower --n-layers)")
    refused(capsys, *report, "--n-layers", "0", "-o", tmp_path / "r2", match="--n-layers must be at least 1")
    refused(capsys, *report, "--n-layers", "2", "--protect", "0,1,2,3,4,5,6", "-o", tmp_path / "r2",
            match="only 1 of 8 are not protected (lower --n-layers or --protect)")
    refused(capsys, *report, "--metrics", "bi", "-o", tmp_path / "r3", match="--strategy contiguous reads the angular scores")
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))
    refused(capsys, "eval", model, "--tasks", "copa_local", "--limit", "inf", match="--limit: give a whole number")
    refused(capsys, "eval", model, "--perplexity-data", WIKI_RAW, "--fidelity-to", model, "--fidelity-top-k", "0",
            match="--fidelity-top-k:")
    other = prune.save(build_model("llama", vocab_size=json.loads((model / "config.json").read_text())["vocab_size"] + 8),
                       None, tmp_path / "other-vocab")
    refused(capsys, "eval", model, "--perplexity-data", WIKI_RAW, "--fidelity-to", other, match="its vocabulary has")
    # a config edited to another vocabulary than its weights: the shapes, named before loading
    edited = Path(shutil.copytree(model, tmp_path / "edited-vocab"))
    (edited / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()), "vocab_size": 512}))
    refused(capsys, "remove", edited, "--blocks", "3", "-o", tmp_path / "never", match="embed_tokens.weight is [256, ")
    (edited / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()),
                                                    "tie_word_embeddings": False}))
    refused(capsys, "remove", edited, "--blocks", "3", "-o", tmp_path / "never", match="unties the output head (lm_head")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("case", ["parent_is_file", "long_name", "symlink_loop", "non_utf8", "dangling_link"])
def test_unwritable_output_paths_are_refused_before_work(case, model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    loop = tmp_path / "loop"
    if case == "symlink_loop":
        os.symlink(loop, loop)
    if case == "dangling_link":
        os.symlink(tmp_path / "nowhere" / "x", tmp_path / "dangling")
    out = {"parent_is_file": tmp_path / "file" / "out", "long_name": tmp_path / ("n" * 250),
           "symlink_loop": loop / "out", "non_utf8": Path(os.fsdecode(str(tmp_path).encode() + b"/out\xff")),
           "dangling_link": tmp_path / "dangling" / "out"}[case]
    match = {"parent_is_file": "is a file, not a folder", "long_name": "file-system limit", "symlink_loop": "loop",
             "non_utf8": "not valid UTF-8", "dangling_link": "broken symbolic link"}[case]
    refused(capsys, "remove", model, "--blocks", "3", "-o", out, match=match)


@pytest.fixture
def mount(tmp_path):
    """Mount a small tmpfs (``mount(size, ro=False)``); skips where mounting is not allowed."""
    mounted = []

    def make(size: str, ro: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}; needs root)")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_parent_is_refused(model, mount, capsys):
    ro = mount("100k", ro=True)
    refused(capsys, "remove", model, "--blocks", "3", "-o", ro / "out", match="not writable")


# ---- the overwrite swap survives SIGKILL -----------------------------------------------------------
@pytest.mark.parametrize("portable", [False, True], ids=["rename_exchange", "two_renames"])
def test_overwrite_killed_mid_swap_keeps_a_complete_output(portable, model, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, "remove", model, "--blocks", "3", "-o", out)
    assert code == 0, err
    old = digest(out)
    env = {"PRUNE_FAULT": "swapped:kill" if not portable else "swapping:kill"}
    if portable:
        env["PRUNE_NO_RENAME_EXCHANGE"] = "1"
    done = prune_forked("remove", model, "--blocks", "3,4", "-o", out, "--overwrite", env_extra=env)  # a process to kill
    assert done.returncode == -9, done.stderr
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    if portable:  # between the renames: the old output waits in .out.old-PID, the new one is staged, complete
        assert not out.exists() and any(".old-" in h for h in hidden)
    else:  # exchanged in one step: the new output is in place
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    # the next command on that output finishes the swap, and deletes nothing complete
    code, err = cli(capsys, "remove", model, "--blocks", "3", "-o", out)
    assert code == 2 and "already exists" in err
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    assert digest(out) != old and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_error_between_the_two_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    """Without an atomic exchange, the old output is moved aside before the new one moves in: an
    exception or Ctrl-C between the two left no output at all (the old one hidden, the new one removed)."""
    from prune.io.staging import staged

    monkeypatch.setenv("PRUNE_NO_RENAME_EXCHANGE", "1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    for fault in ("swapping:interrupt", "swapping:enospc"):
        monkeypatch.setenv("PRUNE_FAULT", fault)
        with pytest.raises((KeyboardInterrupt, PruneError)) as err:
            with staged(out, overwrite=True) as stage:
                (stage / "config.json").write_text("new")
        assert (out / "config.json").read_text() == "old", fault
        assert [p.name for p in tmp_path.iterdir()] == ["out"], fault  # nothing hidden, no staging folder
        if err.type is PruneError:
            assert "disk full" in str(err.value) and "the existing folder is untouched" in str(err.value)


@pytest.mark.parametrize("portable", [False, True], ids=["rename_noreplace", "check_then_rename"])
def test_an_output_that_appears_while_writing_is_not_replaced_without_overwrite(portable, tmp_path, monkeypatch):
    """Two runs with one output folder, neither with --overwrite: both pass the check at the start;
    the one that finishes second leaves the first one's folder alone and keeps its own beside it."""
    from prune.io.staging import staged

    if portable:
        monkeypatch.setenv("PRUNE_NO_RENAME_EXCHANGE", "1")
    out = tmp_path / "out"
    with pytest.raises(PruneError, match="appeared while this run was writing it") as err:
        with staged(out) as stage:
            (stage / "mine.txt").write_text("this run")
            out.mkdir()  # the other run finished first
            (out / "theirs.txt").write_text("the other run")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = tmp_path / f"out.{os.getpid()}"
    assert str(kept) in str(err.value) and (kept / "mine.txt").read_text() == "this run"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left


# ==== 3. weights must match the config ===========================================================
def test_a_config_naming_a_billion_blocks_is_refused_without_building_them(model, capsys):
    """The check built the model on the meta device first, every block object of it: memory without bound."""
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    refused(capsys, "score", model, "--data", WIKI_RAW, match="num_hidden_layers=1000000000 but the weights hold at most 8")
    code, out = cli(capsys, "check", model)
    assert code == 2 and "at most 8 blocks" in out


def test_config_naming_more_blocks_than_the_weights_hold_is_refused_before_loading(model, tmp_path, capsys,
                                                                                  no_model_loading):
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 10
    (model / "config.json").write_text(json.dumps(config))
    refused(capsys, "score", model, "--data", WIKI_RAW, match="weights hold blocks 0..7")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    refused(capsys, "run", recipe, match="would fill the missing blocks with random values")
    refused(capsys, "remove", model, "--blocks", "3", "-o", tmp_path / "o", match="would fill the missing blocks with random")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
    # fewer blocks in the config than in the weights: the blocks past it are dropped, not random (it said "the
    # missing weights would be random")
    config["num_hidden_layers"] = 7
    (model / "config.json").write_text(json.dumps(config))
    said = refused(capsys, "remove", model, "--blocks", "3", "-o", tmp_path / "o",
                   match="weights hold blocks 0..7 (8): transformers would not load block 7 (re-download")
    assert "random" not in said


def test_a_missing_relative_folder_is_named_as_missing(tmp_path, capsys):
    """org/name-shaped paths are Hub ids when no such folder exists: the message said only that the Hub was
    unreachable, not that the folder the user meant is not there."""
    refused(capsys, "score", "runs/not-here", "--data", WIKI_RAW, match="no local folder runs/not-here here either")


def test_a_config_without_blocks_names_the_config(model, tmp_path, capsys):
    """num_hidden_layers <= 0 reached the protect check, which blamed select.protect."""
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = -3
    (model / "config.json").write_text(json.dumps(config))
    refused(capsys, "score", model, "--data", WIKI_RAW, match="num_hidden_layers = -3: a decoder has at least one block")


def test_missing_block_tensors_are_refused(model, tmp_path, capsys):
    tensors = load_file(model / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.7." not in k}, model / "model.safetensors",
              metadata={"format": "pt"})
    refused(capsys, "eval", model, "--perplexity-data", WIKI_RAW, match="weights hold blocks 0..6")
    with pytest.raises(PruneError, match="would be random"):  # the library path refuses it too
        prune.load(model)


# ==== 4. resume fingerprints the inputs ===========================================================
def test_resume_refuses_a_replaced_model(model, tmp_path, monkeypatch):
    from conftest import build_model

    data = tmp_path / "calib.txt"
    shutil.copy(WIKI_RAW, data)
    recipe = tiny_recipe(model, tmp_path / "out")
    recipe["calibration"]["path"] = str(data)
    monkeypatch.setenv("PRUNE_FAULT", "selected:interrupt")
    with pytest.raises(KeyboardInterrupt):
        prune.run(recipe, quiet=True)
    monkeypatch.delenv("PRUNE_FAULT")
    build_model("llama", seed=7).save_pretrained(model)  # another model at the same path
    with pytest.raises(PruneError, match=r"cannot resume: the model \(.*model.safetensors.*\) changed"):
        prune.run(recipe, quiet=True, resume=True)


def test_resume_refuses_a_model_replaced_after_its_evaluation(model, tmp_path, monkeypatch):
    """Interrupted once the original's evaluation is stored: a replaced model makes it stale with the scores and the
    selection (nothing is left to reuse), not only them (the old model's evaluation would be reused, silently)."""
    from conftest import build_model
    from prune.pipeline.progress import progress_dir

    recipe = tiny_recipe(model, tmp_path / "out")
    monkeypatch.setenv("PRUNE_FAULT", "evaluated_original:interrupt")
    with pytest.raises(KeyboardInterrupt):
        prune.run(recipe, quiet=True)
    monkeypatch.delenv("PRUNE_FAULT")
    assert (progress_dir(tmp_path / "out") / "original.json").is_file()
    build_model("llama", seed=7).save_pretrained(model)
    with pytest.raises(PruneError, match=r"cannot resume: the model \(.*model.safetensors.*\) changed"):
        prune.run(recipe, quiet=True, resume=True)


def test_resume_refuses_changed_data(model, tmp_path, monkeypatch):
    data = tmp_path / "calib.txt"
    shutil.copy(WIKI_RAW, data)
    recipe = tiny_recipe(model, tmp_path / "out")
    recipe["calibration"]["path"] = str(data)
    monkeypatch.setenv("PRUNE_FAULT", "selected:interrupt")
    with pytest.raises(KeyboardInterrupt):
        prune.run(recipe, quiet=True)
    monkeypatch.delenv("PRUNE_FAULT")
    data.write_text(data.read_text().replace("the", "teh"))
    with pytest.raises(PruneError, match="the data file of calibration changed"):
        prune.run(recipe, quiet=True, resume=True)
    data.write_text(WIKI_RAW.read_text())  # restored (same bytes, new mtime): still refused, the mtime is recorded
    with pytest.raises(PruneError, match="cannot resume"):
        prune.run(recipe, quiet=True, resume=True)


# ==== 5. disk full is one line, on a real small file system ======================================
def fill(folder: Path) -> None:
    """Write until the file system is full."""
    handle = (folder / "filler").open("wb", buffering=0)
    try:
        while True:
            handle.write(b"\0" * 4096)
    except OSError:
        pass
    finally:
        handle.close()


def test_full_disk_while_saving_weights_is_one_line(model, mount, capsys, tmp_path):
    disk = mount("400k")  # the tiny model's weights are ~800 kB
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, disk / "out"))
    line = refused(capsys, "run", recipe, "-q", match="disk full while writing")
    assert "no output was written" in line
    assert [p.name for p in disk.iterdir()] == [".out.progress"]  # scores kept for --resume
    refused(capsys, "remove", model, "--blocks", "3", "-o", disk / "o2", match="disk full")
    assert not (disk / "o2").exists()


def test_full_disk_for_progress_score_and_eval_files_is_one_line(model, mount, capsys, tmp_path):
    disk = mount("64k")
    fill(disk)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, disk / "out"))
    refused(capsys, "run", recipe, "-q", match="disk full while saving the progress")
    common = ["--seq-len", "32", "-q"]
    refused(capsys, "score", model, "--data", WIKI_RAW, "--rows", "0:300", "--n-samples", "2", "-o",
            disk / "s.json", *common, match="disk full")
    refused(capsys, "eval", model, "--perplexity-data", WIKI_RAW, "--max-windows", "2", "-o", disk / "e.json",
            *common, match="disk full")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# ==== 6. safe YAML ===============================================================================
LAUGHS = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, match", [
    (LAUGHS.encode(), "aliases expand to more than"),
    (b"a: &a [*a]\n", "an alias refers to itself"),
    (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
    (b"model: {source: caf\xe9}\n", "not UTF-8 text"),
    (b"select: {n_layers: 2}\nselect: {n_layers: 5}\n", "appears twice"),
    # one key written two ways (the last value won, silently): compared by value, as the mapping holds it
    (b"model: {max_memory: {0: 1GiB, 00: 90GiB}}\n", "key '00' (the same key as '0') appears twice"),
    # a traceback each: the reader's error came before the guarded parse, an integer past Python's digit limit
    (b"output: {dir: \"a\x00b\"}\n", "unacceptable character #x0000"),
    (b"select: {n_layers: " + b"9" * 5000 + b"}\n", "a value YAML cannot build"),
])
def test_hostile_yaml_is_one_line(text, match, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text)
    refused(capsys, "run", recipe, match=match)


def test_aliases_of_mappings_and_merge_keys_are_read(tmp_path, tiny_folder):
    """Every alias of a mapping was refused as "an alias refers to itself" (the walk lost the mapping's id)."""
    from prune.core.yamlsafe import load_yaml

    assert load_yaml("a: &x {k: 1}\nb: *x\nc: {<<: *x, j: 2}\n") == {"a": {"k": 1}, "b": {"k": 1}, "c": {"k": 1, "j": 2}}
    text = (f"model: {{source: {tiny_folder}}}\nselect: {{strategy: one_shot, metric: bi, n_layers: 2}}\n"
            f"output: {{dir: {tmp_path / 'out'}}}\n"
            f"calibration: &text {{path: {WIKI_RAW}, rows: '0:300', seq_len: 32, batch_size: 2}}\n"
            "evaluate: {perplexity: {<<: *text, rows: '300:600', max_windows: 4}}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    from prune.pipeline.recipe import load_recipe

    loaded = load_recipe(recipe)
    assert loaded.evaluate.perplexity.path == loaded.calibration.path and loaded.evaluate.perplexity.rows == "300:600"


@pytest.mark.parametrize("override, match", [
    ("select.n_layers=true", "expects a number, not true/false"),
    ("score.beta=.nan", "finite number"),
    ("score.beta=.inf", "finite number"),
    ("evaluate.limit=.inf", "finite number"),
    ("score.tau=5", "less than 1"),
    ("score.metrics=[]", "at least 1"),
    ("score.cka_windows=3", "score.cka_windows 3 does not divide the 4 windows"),
    ("calibration.seed=1.0e+20", "'calibration.seed'"),
    ("calibration.seed=4294967296", "less than or equal to 4294967295"),
    ("select.protect=[true, -1]", "not true/false"),
    ("select.n_layers=&a [*a]", "refers to itself"),
    # the fidelity's own text settings without its own text: dropped silently, recorded in eval.json as used
    ("evaluate.fidelity={bos: false, rows: '100:200'}", "rows, bos describe the fidelity's own text, but it has no path"),
    # settings a strategy, the scores or the missing tasks never read: refused, not dropped
    ("select.strategy=contiguous", "metric is read only by strategies one_shot, iterative, search; contiguous ranks "
                                   "by angular alone (remove it, set it to angular (--set select.metric=angular), or"),
    ("select={strategy: contiguous, metric: angular, n_layers: 2}", None),  # what contiguous reads: accepted
    ("select.seed=3", "seed is read only by strategies random, search"),
    ("score={metrics: [bi, angular], tau: 0.5}", "tau shape the CKA matrix and MSRS, but metrics has no cka"),
    ("evaluate.limit=10", "limit apply to lm-eval tasks, but there are none"),
    ("evaluate.batch_size=4", "evaluate.batch_size is read by lm-eval tasks (evaluate.tasks) and search's"),
    ("evaluate={tasks: [copa], limit: 10, batch_size: 4}", None),  # control: with tasks these settings pass
    ("evaluate={tasks: [copa], limit: 2.5}", "limit is a whole number of examples or a fraction below 1 (got 2.5)"),
    ("evaluate={tasks: [copa], fewshot_as_multiturn: true}", "it needs apply_chat_template"),
    ("evaluate={tasks: [copa], model_args: foo}", "'foo' has no '='"),
    ("calibration.rows=1:30", "rows must be a quoted slice such as '0:2000' (YAML read the unquoted value as 90)"),
    ("calibration.split=test", "'calibration.split' selects part of a datasets dataset, but"),
    ("model.offload_folder=/tmp/off", "without a device_map nothing goes there"),
    ("evaluate={original: false}", "evaluate measures nothing: give perplexity, fidelity or tasks"),
    ("select.protect[0]=1", "a list is set whole, not item by item"),  # it said "unknown key 'select'"
    ("evaluate.tasks.0=copa", "a list is set whole, not item by item"),  # it said "should be a valid list (got {'0': ..."
    ("evaluate.tasks=copa", "'evaluate.tasks': a list is expected, got 'copa' (write [copa])"),  # "valid list"
    # one file for both texts: the line did not say which section's rows select nothing
    ("evaluate.perplexity.rows='99999:'", "error: evaluate.perplexity: rows='99999:' selects none of the"),
    ("calibration.rows='99999:'", "error: calibration: rows='99999:' selects none of the"),
    ("output=foo", "'output' is a section of keys (dir, overwrite, push_to_hub, dtype), not the value 'foo' (set one "
                   "key: output.KEY=VALUE)"),  # "valid dictionary or instance of OutputConfig": a class of the code
    # a value the --set gave is blamed on the --set, not on the recipe file that never held it
    ("select.n_layers=-1", "error: --set select.n_layers=-1: 'select.n_layers': Input should be greater than or equal to 1"),
    ("select={n_layers: 0}", "error: --set select={n_layers: 0}: 'select.n_layers': Input should be greater than"),
    ("heal={method: lora, learning_rate: 1000.0}", "'heal.learning_rate': Input should be less than or equal to 1"),
    # a rule across keys the --set broke: the file as the --set changed it (it blamed the file alone, which holds
    # no key 'foo', a fraction, or other metrics)
    ("foo.bar=1", "r.yaml with --set foo.bar=1: unknown key 'foo'"),
    ("select.fraction=0.25", "r.yaml with --set select.fraction=0.25: 'select': give exactly one of n_layers"),
])
def test_strict_settings(override, match, model, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    if match is None:
        from prune.pipeline.recipe import load_recipe

        load_recipe(recipe, overrides=[override])
        return
    refused(capsys, "run", recipe, "--set", override, match=match)


def test_an_empty_recipe_is_called_empty_and_a_files_own_value_is_blamed_on_the_file(model, tmp_path, capsys):
    """An empty file said "missing required key 'model' (add it to the recipe or pass --set model=...) (and 3 more)"."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    refused(capsys, "run", empty, match=f"error: {empty} holds no settings: a recipe is a mapping of sections (model, ")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out", select={"n_layers": 0}))
    refused(capsys, "run", recipe, "--set", "select.strategy=contiguous",
            match=f"error: {recipe}: 'select.n_layers': Input should be greater than or equal to 1")
    # a rule across sections the --sets broke together: the file as they changed it (it blamed the file alone)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    refused(capsys, "run", recipe, "--set", "score.metrics=[bi]", "--set", "select.metric=angular",
            match=f"error: {recipe} with --set score.metrics=[bi], --set select.metric=angular: select.metric angular "
                  "reads the angular scores")


def test_a_mapping_that_replaces_a_section_says_what_goes_back_to_its_default(model, tmp_path, capsys):
    """--set 'select={n_layers: 3}' replaced the whole section (YAML's meaning, kept): the strategy and protected
    blocks went back to their defaults without a word."""
    from prune.pipeline.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out", select={"strategy": "contiguous",
                                                                                          "n_layers": 2, "protect": [0]}))
    capsys.readouterr()
    assert load_recipe(recipe, ["select={n_layers: 3}"]).select.strategy != "contiguous"
    err = capsys.readouterr().err
    assert "override 'select'={...} replaces the whole section: protect, strategy go back to their defaults (to " \
           "change one key: 'select.n_layers=VALUE')" in err, err
    load_recipe(recipe, ["select.n_layers=3"])
    assert "replaces the whole section" not in capsys.readouterr().err


def test_the_offload_folder_is_never_an_input_or_the_output(model, tmp_path, capsys):
    """transformers writes the offloaded weights into model.offload_folder and leaves them: with the source model's
    folder it wrote 226 files into it; with output.dir the whole run went by and then failed, files left behind."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    before = digest(model)
    for folder, said in ((model, "is the source model"), (tmp_path / "out", "is the output folder"),
                         (tmp_path / "out" / "offload", "is inside the output folder")):
        line = refused(capsys, "run", recipe, "--set", "model.device_map=auto", "--set", f"model.offload_folder={folder}",
                       match=f"model.offload_folder {folder}")
        assert said in line, line
    assert digest(model) == before and not (tmp_path / "out").exists()
    # a folder of its own anywhere else is fine, one holding the inputs too (transformers only adds files to it)
    from prune.pipeline.orchestrator import preflight
    from prune.pipeline.recipe import load_recipe

    for folder in (tmp_path, tmp_path / "offload", Path.cwd()):
        preflight(load_recipe(recipe, ["model.device_map=auto", f"model.offload_folder={folder}"]))


def test_heal_config_goes_through_the_safe_loader(run_dir, tmp_path, capsys):
    config = tmp_path / "heal.yaml"
    config.write_bytes(b"heal: {method: lora, steps: 3, steps: 4}\n")
    refused(capsys, "heal", run_dir, "-o", tmp_path / "h", "--config", config, match="appears twice")
    # a whole recipe with no heal section was read as heal settings ("unknown key 'heal.calibration'", and 4 more)
    config.write_text((run_dir / "recipe.yaml").read_text())
    refused(capsys, "heal", run_dir, "-o", tmp_path / "h", "--config", config, match="is a recipe without a heal section")


# ==== 7. flags, data, metadata: one line before loading ==========================================
@pytest.mark.parametrize("args, match", [
    (["score", "{m}", "--data", WIKI_RAW, "--seq-len", "4"], "--seq-len"),
    (["score", "{m}", "--data", WIKI_RAW, "--batch-size", "0"], "--batch-size"),
    (["score", "{m}", "--data", WIKI_RAW, "--n-samples", "0"], "--n-samples"),
    (["score", "{m}", "--data", WIKI_RAW, "--beta", "nan"], "--beta"),
    (["score", "{m}", "--data", WIKI_RAW, "--tau", "5"], "--tau"),
    (["score", "{m}", "--data", WIKI_RAW, "--metrics", ","], "--metrics"),
    (["score", "{m}", "--data", WIKI_RAW, "--seq-len", "1024"], "longer than the model's context (512"),
    (["eval", "{m}", "--tasks", "arc_easy", "--limit", "0"], "--limit"),
    (["eval", "{m}", "--tasks", "arc_easy", "--num-fewshot", "-1"], "--num-fewshot"),
    (["eval", "{m}", "--perplexity-data", WIKI_RAW, "--max-windows", "0"], "--max-windows"),
    (["eval", "{m}", "--perplexity-data", WIKI_RAW, "--batch-size", "0"], "--batch-size"),
    (["eval", "{m}", "--perplexity-data", WIKI_RAW, "--seq-len", "4096"], "longer than the model's context"),
])
def test_bad_flags_are_one_line_before_loading(args, match, model, capsys, monkeypatch):
    import prune.pipeline.commands as C

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(C, "load_model", no_loading)
    refused(capsys, *[str(model) if a == "{m}" else a for a in args], match=match)


@pytest.mark.parametrize("name, content, match", [
    ("latin1.txt", "caf\u00e9 cr\u00e8me ".encode("latin-1") * 200, "not UTF-8 text"),
    ("binary.txt", bytes(range(256)) * 20, "binary file"),
    ("text.txt", gzip.compress(WIKI_RAW.read_bytes()[:20000]), "gzip-compressed"),
    ("rows.jsonl", b'{"text": "a"}\n5\n', "is int"),
    ("rows.jsonl", b'["a", "b"]\n', "is list"),
    ("rows.jsonl", b'{"text": null}\n', "is null, not text"),
    ("rows.json", b'[{"text": "a"}, 7]', "item 1"),
])
def test_hostile_data_files_are_one_line_before_loading(name, content, match, model, tmp_path, capsys, no_model_loading):
    data = tmp_path / name
    data.write_bytes(content)
    refused(capsys, "score", model, "--data", data, match=match)


def test_a_device_or_a_pipe_as_text_is_named_as_such(model, tmp_path, capsys):
    """--data /dev/zero and a pipe were "not found"."""
    os.mkfifo(tmp_path / "pipe.txt")
    for data in ("/dev/zero", tmp_path / "pipe.txt"):
        refused(capsys, "score", model, "--data", data, match=f"{data} is not a regular file (a device, a pipe")


def test_a_json_array_of_objects_is_read():
    from prune.core.config import TextSource
    from prune.io.text import load_text

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rows-{os.getpid()}.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    try:
        assert load_text(TextSource(str(path))) == "one\n\ntwo"
    finally:
        path.unlink()


def _header_file(path: Path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)


@pytest.mark.parametrize("case, match", [
    ("header_list", "model.safetensors is truncated or corrupt"),  # safetensors' own reader refuses it
    ("header_entry", "model.safetensors is truncated or corrupt"),
    ("index_list", "weight_map"),
    ("weight_map_list", "weight_map"),
    ("weight_map_int", "weight_map"),
    ("index_not_utf8", "weight_map"),
    ("index_outside", "points outside its folder"),
    ("index_deep", "weight_map"),  # a RecursionError traceback
    ("pruning_removed_int", "'removed'"),
    ("pruning_not_utf8", "not UTF-8"),
    ("pruning_deep", "nested too deeply to be a pruning record"),  # tracebacks: RecursionError, ValueError
    ("pruning_huge_int", "holds a value JSON cannot build"),
    ("auto_map_unknown_type", "could not read the config"),
    # transformers' message announces its reason on a second line: it ended at "for field 'num_hidden_layers':"
    ("config_layers_text", "num_hidden_layers': TypeError: Field 'num_hidden_layers' expected int, got str (value: '8') "
                           "(fix "),
])
def test_checkpoint_metadata_of_the_wrong_shape(case, match, model, tmp_path, capsys):
    index = model / "model.safetensors.index.json"
    if case == "header_list":
        _header_file(model / "model.safetensors", [])
    elif case == "header_entry":
        _header_file(model / "model.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}})
    elif case.startswith(("index", "weight_map")):
        body = {"index_list": b"[]", "weight_map_list": b'{"weight_map": ["a"]}', "weight_map_int": b'{"weight_map": 3}',
                "index_not_utf8": b'{"weight_map": {"a": "\xff.safetensors"}}',
                "index_outside": json.dumps({"weight_map": {"lm_head.weight": "../../secret/model.safetensors"}}).encode(),
                "index_deep": b'{"weight_map": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"}
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
        index.write_bytes(body[case])
    elif case == "pruning_removed_int":
        (model / "pruning.json").write_text(json.dumps({"removed": 5, "kept": [0]}))
    elif case == "pruning_not_utf8":
        (model / "pruning.json").write_bytes(b'{"removed": [1], "note": "\xff"}')
    elif case == "pruning_deep":
        (model / "pruning.json").write_text('{"removed": [1], "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    elif case == "pruning_huge_int":
        (model / "pruning.json").write_text('{"removed": [1], "layers_before": ' + "9" * 5000 + "}")
    elif case == "config_layers_text":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "8"}))
    elif case == "auto_map_unknown_type":
        config = json.loads((model / "config.json").read_text())
        config.update(model_type="totally_new", auto_map={"AutoConfig": "x.Y", "AutoModelForCausalLM": "x.Z"})
        (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    refused(capsys, "run", recipe, match=match)
    if not case.startswith("pruning"):
        refused(capsys, "score", model, "--data", WIKI_RAW, match=match)
        refused(capsys, "remove", model, "--blocks", "3", "-o", tmp_path / "o", match=match)
        refused(capsys, "remove", model, "--slices", "[[0, 3], [4, 8]]", "-o", tmp_path / "o", match=match)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_config_or_tokenizer_file_cut_short_is_named_with_where(name, model, capsys):
    """It said transformers' "It looks like the config file at ... is not a valid JSON file." (no place, no fix) or
    "could not load the tokenizer of M: JSONDecodeError: Expecting value: line 2 column 1" (no file)."""
    text = (model / name).read_text()
    (model / name).write_text(text[:text.index(",") + 1])
    line = refused(capsys, "score", model, "--data", WIKI_RAW, "--rows", "0:200", "--n-samples", "2", "--seq-len", "16",
                   match=f"{model / name} is not valid JSON (")
    assert re.search(r"at line \d+ column \d+\): fix or replace it$", line), line


@pytest.mark.parametrize("body, said", [('{"num_hidden_layers": ' + "9" * 5000 + "}", "a number of thousands of digits"),
                                         ('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply")])
def test_prune_check_of_a_config_json_no_reader_can_build(body, said, model, capsys):
    """A config.json of a number of 5,000 digits, or nested 200,000 deep: tracebacks from `prune check` and push."""
    (model / "config.json").write_text(body)
    capsys.readouterr()
    code = main(["check", str(model)])
    out, err = capsys.readouterr()
    assert code != 0 and f"config.json is not valid JSON: {said}" in out + err and "Traceback" not in out + err


def test_impossible_selection_and_short_perplexity_text_fail_before_loading(model, tmp_path, capsys, monkeypatch):
    import prune.pipeline.engines as P

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(P, "load_model", no_loading)
    recipe = tiny_recipe(model, tmp_path / "out", select={"strategy": "contiguous", "n_layers": 3, "protect": [0, 3, 6, -1]})
    refused(capsys, "run", write_recipe(tmp_path / "r.yaml", recipe), match="no run of 3 contiguous blocks")
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    recipe = tiny_recipe(model, tmp_path / "out")
    recipe["evaluate"]["perplexity"].update(path=str(short), rows=None)
    refused(capsys, "run", write_recipe(tmp_path / "r.yaml", recipe), match="evaluation text too short")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no progress left behind


def test_cli_guard_turns_input_errors_into_one_line_and_keeps_bugs_loud():
    from pydantic import ValidationError
    from safetensors import SafetensorError

    from prune.core.config import ScoreConfig

    assert input_error(SafetensorError("Error while deserializing header: HeaderTooLarge")).startswith("a safetensors")
    assert "cannot access /x" in input_error(PermissionError(13, "Permission denied", "/x"))
    assert "not valid UTF-8" in input_error(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    with pytest.raises(ValidationError) as exc:
        ScoreConfig(tau=5)
    assert "'tau'" in input_error(exc.value)
    assert input_error(Exception("safetensors_rust: No space left on device (os error 28)")).startswith("disk full")
    assert input_error(ZeroDivisionError("a bug")) is None and input_error(KeyError("x")) is None


# ==== 8. tokens never echoed =====================================================================
def test_tokens_are_never_echoed(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, err = cli(capsys, "push", run_dir, "me/model", "--token", TOKEN)  # not a flag: argparse echoes args
    assert code == 2 and TOKEN not in err and "--token ***" in err
    code, err = cli(capsys, "push", run_dir, TOKEN, "--dry-run")  # pasted as the repo id
    assert code == 2 and TOKEN not in err and "looks like a Hugging Face token" in err
    code, err = cli(capsys, "push", run_dir, f"me/{TOKEN}", "--dry-run")
    assert code == 2 and TOKEN not in err
    for flag in ("--revision", "--commit-message", "--exclude"):  # printed by --dry-run, published by a push
        code, err = cli(capsys, "push", run_dir, "me/model", "--dry-run", flag, TOKEN)
        assert code == 2 and TOKEN not in err and f"{flag} looks like a Hugging Face token" in err
    recipe = tiny_recipe(run_dir, tmp_path / "out", output={"dir": str(tmp_path / "o"), "push_to_hub": {"repo_id": TOKEN}})
    code, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and TOKEN not in err


def test_a_token_never_enters_a_saved_recipe(model, tmp_path, capsys, monkeypatch):
    """A recipe value holding a token (from ${VAR}, --set or written in) is refused before anything
    is written: the recipe is saved in recipe.yaml, pruning.json and the card, and pushed with them."""
    monkeypatch.setenv("SPLIT", TOKEN)
    recipe = tiny_recipe(model, tmp_path / "out")
    recipe["calibration"]["split"] = "${SPLIT}"
    code, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "'calibration.split' holds an access token" in err and TOKEN not in err
    recipe["calibration"]["split"] = "train"
    code, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml", recipe), "--set", f"model.revision={TOKEN}")
    assert code == 2 and "holds an access token" in err and TOKEN not in err
    assert not (tmp_path / "out").exists()


def test_set_refuses_a_value_yaml_would_cut_at_a_comment(model, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    refused(capsys, "run", recipe, "--set", f"output.dir={tmp_path}/exp #2", match="quote the value")
    assert not (tmp_path / "exp").exists()


def test_set_refuses_one_key_given_two_values(model, tmp_path, capsys):
    """``--set select.n_layers=2 --set select.n_layers=3`` kept the last without a word; so did ``prune heal``'s
    ``--set steps=1 --set heal.steps=2`` (one key there)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path / "out"))
    refused(capsys, "run", recipe, "--set", "select.n_layers=2", "--set", "select.n_layers= 3",
            match="--set select.n_layers is given twice ('2', then '3'): give it once")
    assert not (tmp_path / "out").exists()
    with pytest.raises(PruneError, match=r"override 'select.n_layers' is given twice"):
        prune.run(recipe, overrides=["select.n_layers=2", "select.n_layers=3"], quiet=True)
    from prune.pipeline.heal_run import heal_settings

    with pytest.raises(PruneError, match=r"override 'steps' is given twice \('1', then '2'\)"):
        heal_settings({"heal": {"method": "lora"}}, overrides=["steps=1", "heal.steps=2"])
    code, err = cli(capsys, "run", recipe, "--set", "select.n_layers=2", "--set", "select.n_layers=2", "-q")
    assert code == 0, err  # the same value twice is one
    assert len(json.loads((tmp_path / "out" / "pruning.json").read_text())["removed"]) == 2


def test_push_plan_refuses_links_leading_outside_the_folder(run_dir, tmp_path, capsys, monkeypatch):
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "token").write_text(TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    os.symlink(home / "token", run / "notes.txt")
    code, err = cli(capsys, "push", run, "me/model", "--dry-run", "-q")
    assert code == 2 and "symbolic link" in err and "outside" in err
    assert TOKEN not in err + capsys.readouterr().out
    (run / "notes.txt").unlink()
    os.symlink(run / "eval.md", run / "eval-copy.md")  # a link inside the folder is fine
    code, out = cli(capsys, "push", run, "me/model", "--dry-run", "-q")
    assert code == 0, out


@pytest.mark.parametrize("tied", [True, False])
def test_the_shape_check_passes_every_supported_architecture(tmp_path, tied):
    """The pre-flight's shape and head checks on a checkpoint of each fixture architecture, tied and untied:
    GPT-NeoX stores its head as embed_out (transformers renames it on load), which was refused."""
    from conftest import ARCHS

    from prune.io.source import resolve_source
    from prune.pipeline.inputs import preflight_model

    for arch in ARCHS:
        folder = tmp_path / arch
        build_model(arch, tie_word_embeddings=tied).save_pretrained(folder)
        preflight_model(resolve_source(str(folder)))


def test_a_model_folder_without_a_tokenizer_is_named_so(model, tmp_path, capsys):
    """A folder without tokenizer files: the run failed on half of transformers' sentence ("Couldn't instantiate the
    backend tokenizer from one of: (1) a `tokenizers` library serialization file,"), before loading; `prune remove`
    wrote an output without a word that then failed `prune check`."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json"):
        (model / name).unlink(missing_ok=True)
    line = refused(capsys, "score", model, "--data", WIKI_RAW, match=f"{model} has no tokenizer (tokenizer.json, ")
    assert line.endswith("(tokenizer.save_pretrained(folder))")
    code, err = cli(capsys, "remove", model, "--blocks", "3", "--output", tmp_path / "out")
    assert code == 0 and f"note: {model} has no tokenizer files" in err and f"neither has {tmp_path / 'out'}" in err


def test_remove_says_before_writing_that_the_sources_generation_config_fails_check(model, tmp_path, capsys):
    """A source whose generation_config.json names a token past the embedding (GPT-2's 50256 over a small
    vocabulary): `prune remove` wrote the copy without a word, and `prune check` / `prune push` then refused it."""
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 50256}))
    code, err = cli(capsys, "remove", model, "--blocks", "3", "-o", tmp_path / "o")
    assert code == 0
    assert (f"note: {model}: generation_config.json's eos_token_id 50256 is not a token id of the 256-row embedding; "
            f"{tmp_path / 'o'} carries it as it is, so `prune check` and `prune push` refuse the output") in err
    code, _ = cli(capsys, "check", tmp_path / "o")
    assert code == 2


def test_a_shard_that_is_a_device_is_not_called_missing(model, capsys):
    """An index naming a shard that is a link to /dev/zero: `prune check` said the shard "is missing"."""
    shard = model / "model-00001-of-00001.safetensors"
    (model / "model.safetensors").rename(model / "kept.bin.bak")
    shard.symlink_to("/dev/zero")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard.name}}))
    code, out = cli(capsys, "check", model)
    assert code == 2 and f"weight shard {shard.name} listed in model.safetensors.index.json is not a file" in out
