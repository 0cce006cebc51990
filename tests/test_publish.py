"""Hub-ready outputs (issue 14) on a tiny real model, no network: the Hub is a local stub HTTP
server answering the endpoints huggingface_hub's create_repo / create_commit use
(``/api/repos/create``, ``/api/validate-yaml``, ``/preupload``, ``/commit``).

The chain: source (8 blocks) -> step1 `prune run` (contiguous, 2 blocks, model.base_model
declared) -> step2 `prune remove --slices` (1 more block) -> pushed to the stub -> step3
`prune heal` (LoRA merged) and an adapter folder (LoRA, merge: false) -> push --dry-run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch
import yaml
from conftest import DATA, ROOT, build_model, build_tokenizer, prune_cli
from export_fixtures import recipe, save_source
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index
from safetensors import safe_open

import prune
from prune.cli import main as prune_main
from prune.core.errors import PruneError
from prune.core.records import read_record
from prune.core.tables import comparison_rows
from prune.export.check import check_checkpoint
from prune.export.mergekit import blocks_from_slices, kept_ranges, mergekit_config
from prune.export.modelindex import eval_results
from prune.export.push import push
from prune.pipeline.heal_run import heal_run
from prune.pipeline.orchestrator import run
from prune.pipeline.recipe import load_recipe

C4 = {"path": str(DATA / "c4" / "c4_web_1480.jsonl"), "field": "prefix,gold_completion", "rows": "0:300"}
HEAL = ["n_samples=8", "val_samples=2", "seq_len=32", "steps=4", "batch_size=2", "learning_rate=1e-2", "seed=0"]
TOKEN = "hf_publishTESTtokenNEVERshown"


# ---- a local stand-in for the Hub -----------------------------------------------------------------
class StubHub(BaseHTTPRequestHandler):
    """Answers create_repo, validate-yaml, preupload (every file 'regular': sent inline) and
    commit; keeps what it was sent in ``log`` (method, path, query, authorized, body)."""

    log: list = []

    def do_POST(self):
        url = urlparse(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        type(self).log.append((url.path, parse_qs(url.query), auth, raw))
        if not auth:
            return self._json(401, {"error": "Invalid credentials"})
        if url.path == "/api/repos/create":
            body = json.loads(raw)
            return self._json(200, {"url": f"http://{self.headers['Host']}/{body.get('organization') or 'me'}/{body['name']}"})
        if url.path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if "/preupload/" in url.path:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(raw)["files"]]
            return self._json(200, {"files": files, "commitOid": "0" * 40})
        if "/commit/" in url.path:
            pr = parse_qs(url.query).get("create_pr") == ["1"]
            host = f"http://{self.headers['Host']}"
            return self._json(200, {"commitUrl": f"{host}/me/x/commit/{'1' * 40}", "commitOid": "1" * 40,
                                    "pullRequestUrl": f"{host}/me/x/discussions/1" if pr else None})
        return self._json(404, {"error": f"not stubbed: {url.path}"})

    repo_files: list = []  # what the repo holds (the tree listing a push reads for stale weight files)

    def do_GET(self):
        url = urlparse(self.path)
        type(self).log.append((url.path, parse_qs(url.query), None, b""))
        if "/tree/" in url.path:
            return self._json(200, [{"type": "file", "path": f, "size": 1, "oid": "0" * 40} for f in type(self).repo_files])
        return self._json(404, {"error": f"not stubbed: {url.path}"})

    def _json(self, status, data):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def committed(log) -> tuple[dict, dict[str, bytes]]:
    """(query, {path: content}) of the last commit the stub received."""
    path, query, _, raw = [entry for entry in log if "/commit/" in entry[0]][-1]
    files = {}
    for line in raw.splitlines():
        item = json.loads(line)
        if item["key"] == "file":
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return query, files


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    handler = type("Hub", (StubHub,), {"log": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token_file = tmp_path_factory.mktemp("token") / "token.txt"
    token_file.write_text(TOKEN + "\n")
    yield f"http://127.0.0.1:{server.server_port}", handler, token_file
    server.shutdown()


def cli_push(endpoint: str, *args, home: Path) -> subprocess.CompletedProcess:
    return prune_cli("push", *args, unset=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), timeout=180,
                     env_extra=dict(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, hub):
    endpoint, _, token_file = hub
    root = tmp_path_factory.mktemp("publish")
    source = save_source(root / "source")
    step1 = run(recipe(source, root / "step1", 2, "contiguous", model={"base_model": "org/tiny-base"}), quiet=True).out_dir
    assert prune_main(["remove", str(step1), "--slices", "[[0, 3], [4, 6]]", "-o", str(root / "step2")]) == 0
    step2 = root / "step2"
    done = cli_push(endpoint, step2, "me/tiny-step2", "--token-file", token_file, "-q", home=root / "hf")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # -q silences progress, not where the model went
    assert len(lines) == 1 and lines[0].startswith(f"pushed: {endpoint}/"), done.stdout
    step3 = heal_run(step2, root / "step3", method="lora", data=C4["path"], field=C4["field"].split(","),
                     rows=C4["rows"], overrides=HEAL, quiet=True)
    adapter = heal_run(step2, root / "adapter", method="lora", data=C4["path"], field=C4["field"].split(","),
                       rows=C4["rows"], overrides=HEAL + ["merge=false"], quiet=True)
    return {"root": root, "source": source, "step1": step1, "step2": step2, "step3": step3, "adapter": adapter}


# ---- 1. clean files ---------------------------------------------------------------------------------
def test_no_local_path_in_any_output_file(chain):
    """Every byte of every output folder is free of this machine's paths: the test folders,
    the repository, the data folder and $HOME."""
    local = {str(chain["root"]), str(chain["root"].resolve()), str(ROOT), str(DATA), str(DATA.resolve()),
             os.path.expanduser("~"), "/tmp/"}
    for name in ("step1", "step2", "step3", "adapter"):
        for file in chain[name].rglob("*"):
            if file.is_file():
                data = file.read_bytes()
                for path in local:
                    assert path.encode() not in data, f"{file.relative_to(chain['root'])} holds {path}"


def test_local_sources_are_recorded_by_name_and_sha256(chain):
    from prune.export.public import folder_sha256

    record = read_record(chain["step1"] / "pruning.json")
    assert record.source.path == "source" and record.source.sha256 == folder_sha256(chain["source"])
    assert record.original.source == record.source
    saved = yaml.safe_load((chain["step1"] / "recipe.yaml").read_text())
    assert saved["model"]["source"] == "<local>/source"  # outside the working folder: redacted, name kept
    assert saved["calibration"]["path"] == "${PRUNE_DATA_DIR}/wikitext2_raw/wiki.test.raw"  # portable again


def test_config_is_what_save_pretrained_writes(chain):
    from transformers import AutoModelForCausalLM

    for name in ("step1", "step2", "step3"):
        text = (chain[name] / "config.json").read_text()
        assert "_name_or_path" not in text
        model = AutoModelForCausalLM.from_pretrained(chain[name])
        model.save_pretrained(chain["root"] / f"resaved-{name}")
        assert (chain["root"] / f"resaved-{name}" / "config.json").read_text() == text
        # transformers writes how the tokenizer was loaded (offline, from a folder) into its config: not published
        tokenizer_config = json.loads((chain[name] / "tokenizer_config.json").read_text())
        assert not {"is_local", "local_files_only"} & set(tokenizer_config) and "tokenizer_class" in tokenizer_config


# ---- 2. metadata ---------------------------------------------------------------------------------------
def test_declared_base_model_and_relation(chain):
    card = ModelCard.load(chain["step1"] / "README.md").data.to_dict()
    assert card["base_model"] == "org/tiny-base" and card["base_model_relation"] == "finetune"
    with pytest.raises(PruneError, match="model.base_model.*not a Hub repo id"):
        load_recipe(recipe(chain["source"], chain["root"] / "x"), ["model.base_model=not a repo!"])
    with pytest.raises(PruneError, match="a local path, not a Hub repo id"):
        load_recipe(recipe(chain["source"], chain["root"] / "x"), ["model.base_model=tests"])  # a folder here


def test_model_index_is_valid_for_huggingface_hub(chain, tmp_path):
    """The run's card: huggingface_hub parses its model-index into EvalResults (original and
    pruned perplexity); a card with lm-eval rows names tasks, metrics and Hub datasets."""
    card = ModelCard.load(chain["step1"] / "README.md")
    results = card.data.eval_results
    rows = json.loads((chain["step1"] / "eval.json").read_text())["rows"]
    ppl = next(r for r in rows if r["name"] == "perplexity")
    assert {(r.metric_name, r.metric_value) for r in results} == {
        ("ppl", float(f"{ppl['pruned']:.6g}")), ("ppl (original model, before pruning)", float(f"{ppl['original']:.6g}"))}
    assert eval_results_to_model_index("step1", results) == card.data.to_dict()["model-index"]
    # lm-eval rows as the pipeline builds them
    original = {"tasks": {"arc_easy": {"metrics": {"acc": 0.5, "acc_norm": 0.45}, "stderr": {"acc": 0.02}}}}
    pruned = {"tasks": {"arc_easy": {"metrics": {"acc": 0.4, "acc_norm": 0.41}, "stderr": {"acc": 0.02}}}}
    lm_rows = comparison_rows(original, pruned, {"params_before": 10, "params_after": 8, "layers_before": 8,
                                                 "layers_after": 6})
    made = eval_results(lm_rows, {"num_fewshot": 0})
    assert all(isinstance(r, EvalResult) for r in made) and len(made) == 4
    # a shipped local copy reports as lm-eval's task; KL / agreement rows compare two models: left out
    local = comparison_rows({"tasks": {"arc_easy_local": original["tasks"]["arc_easy"]}},
                            {"tasks": {"arc_easy_local": pruned["tasks"]["arc_easy"]},
                             "fidelity": {"kl_mean": 1.389e-06, "kl_p99": 2e-6, "top1_agreement": 0.99}},
                            {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6})
    assert [(r.task_name, r.dataset_type) for r in eval_results(local)][0] == ("arc_easy", "allenai/ai2_arc")
    assert len(eval_results(local)) == 4
    # BoolQ's copy lacks the passages' titles, so it is not lm-eval's boolq: published under its own name, also when
    # --local-alias reported it as boolq (its dataset reads local files); lm-eval's own boolq stays boolq
    facts = {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6}
    for task, dataset, shown in (("boolq_local", None, "boolq_local"), ("boolq", {"path": "json"}, "boolq_local"),
                                 ("boolq", {"path": "aps/super_glue", "name": "boolq"}, "boolq")):
        res = {"metrics": {"acc": 0.6}, "stderr": {}, **({"dataset": dataset} if dataset else {})}
        [r] = eval_results(comparison_rows({}, {"tasks": {task: res}}, facts))
        assert (r.task_name, r.dataset_type, r.dataset_config) == (shown, "aps/super_glue", "boolq")
    # the shipped exact-last-word task names TinyStories, whose train split its stories come from (it named itself)
    words = comparison_rows({}, {"tasks": {"tinystories_lastword_local": {"metrics": {"acc": 0.3}, "stderr": {},
                                                                         "dataset": {"path": "text", "split": "test"}}}},
                            {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6})
    assert [(r.task_name, r.dataset_type, r.dataset_split) for r in eval_results(words)] == [
        ("tinystories_lastword_local", "roneneldan/TinyStories", "train")]
    # a task the table does not know names the Hub dataset and split its lm-eval config scored (it named the task
    # as a dataset); one reading local files through a packaged builder (json) keeps the task's name
    for path, shown_as, split in (("someorg/my_bench", "someorg/my_bench", "test"), ("json", "my_task", None)):
        mine = comparison_rows({}, {"tasks": {"my_task": {"metrics": {"acc": 0.4}, "stderr": {},
                                                          "dataset": {"path": path, "name": "hard", "split": "test"}}}},
                               {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6})
        [r] = eval_results(mine)
        assert (r.dataset_type, r.dataset_split) == (shown_as, split)
        assert r.dataset_config == ("hard" if split else None)
    # a result lm-eval could not compute (NaN, inf) is no claim: left out of the model-index, the other value kept
    broken = comparison_rows(original, {"tasks": {"arc_easy": {"metrics": {"acc": float("nan"), "acc_norm": float("inf")},
                                                               "stderr": {}}}},
                             {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6})
    assert sorted(r.metric_value for r in eval_results(broken) if r.task_name == "arc_easy") == [0.45, 0.5]
    # a task's row carries its marks in the table's name, not in the model-index (it published the name with
    # them, under no known dataset); the fidelity text's own perplexity is a fidelity row; a later step's
    # "original" is the model that step loaded
    marked = comparison_rows({"tasks": {"arc_easy_local": original["tasks"]["arc_easy"]}},
                             {"tasks": {"arc_easy_local": {**pruned["tasks"]["arc_easy"], "fewshot_from_scored_split": True}},
                              "perplexity": {"perplexity": 9.0, "data": {"path": "a"}},
                              "fidelity": {"kl_mean": 0.1, "kl_p99": 0.2, "top1_agreement": 0.9, "data": {"path": "b"},
                                           "perplexity_original": 8.0, "perplexity_pruned": 9.5}},
                             {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6})
    assert any(r["name"] == "arc_easy_local (few-shot from the scored split)" for r in marked)
    shown = eval_results(marked, {"num_fewshot": 2, "n_shot": {"arc_easy_local": 2}}, steps=2)
    assert {(r.task_name, r.dataset_type, r.dataset_split) for r in shown} == {
        ("arc_easy", "allenai/ai2_arc", "test"), ("perplexity", "text", None)}
    assert {r.metric_args["num_fewshot"] for r in shown if r.task_name == "arc_easy"} == {2}
    # a limit scored the first examples only: the split says which, and the args the limit (it read as the whole split)
    limited = (eval_results(marked, {"num_fewshot": 0, "limit": 4}) + eval_results(marked, {"limit": 0.25})
               + eval_results(marked, {"limit": 0.025}) + eval_results(marked, {"limit": 0.07}))
    # datasets' percent slices are whole (0.07 is one, in spite of 0.07 * 100 = 7.000000000000001); 2.5% is none:
    # no split then (it said the whole split)
    assert {(r.dataset_split, str(r.metric_args)) for r in limited if r.task_name == "arc_easy"} == {
        ("test[:4]", "{'num_fewshot': 0, 'limit': 4}"), ("test[:25%]", "{'limit': 0.25}"), (None, "{'limit': 0.025}"),
        ("test[:7%]", "{'limit': 0.07}")}
    # perplexity on a slice of a Hub dataset's split, in windows: the slice and the windows, not the whole split
    hub_ppl = [{"name": "perplexity", "metric": "ppl", "original": 20.0, "pruned": 25.0}]
    [ppl] = [r for r in eval_results(hub_ppl, {"perplexity": {"path": "Salesforce/wikitext", "config": "wikitext-2-raw-v1",
                                                              "split": "test", "rows": "0:200", "seq_len": 64,
                                                              "max_windows": 4}}) if r.metric_value == 25.0]
    assert (ppl.dataset_split, ppl.metric_args) == ("test[0:200]", {"seq_len": 64, "max_windows": 4})
    assert "acc (step-1 model, before this step)" in {r.metric_name for r in shown}
    acc = next(r for r in made if r.metric_name == "acc")
    assert (acc.task_name, acc.dataset_type, acc.dataset_config, acc.metric_value) == ("arc_easy", "allenai/ai2_arc",
                                                                                         "ARC-Easy", 0.4)
    from prune.export.card import render_card

    (tmp_path / "README.md").write_text(render_card(read_record(chain["step1"] / "pruning.json"), rows=lm_rows,
                                                    settings={"num_fewshot": 0, "tasks": ["arc_easy"]}, model_name="m"))
    again = ModelCard.load(tmp_path / "README.md")  # huggingface_hub validates the model-index on load
    assert sorted((r.metric_name, r.metric_value) for r in again.data.eval_results) == sorted(
        (r.metric_name, r.metric_value) for r in made)


def test_a_hostile_folder_name_stays_text_in_the_card(chain):
    """The output folder's name is the card's title and its load line: a name holding HTML, a quote, a line break
    and a code fence rendered as page content (the fence closed the code block, a quote broke the string)."""
    import ast

    from prune.export.card import render_card

    name = 'out|`x`<script>alert(2)"q\n```\n<img src=x onerror=alert(3)>\n---\n# H'
    card = render_card(read_record(chain["step1"] / "pruning.json"), model_name=name, load_id=f"path/to/{name}",
                       revision='main"\n```')
    body = card.split("---", 2)[2]
    prose = re.sub(r"```python\n.*?\n```", "", body, flags=re.S)  # in the code block the name is text anyway
    assert "<script>" not in prose and "<img" not in prose and "\n# H" not in prose
    assert next(x for x in body.splitlines() if x.startswith("# ")).startswith("# out\\|'x'&lt;script&gt;")
    [line] = [x for x in body.splitlines() if x.startswith("model = AutoModelForCausalLM.from_pretrained(")]
    call = ast.parse(line).body[0].value  # one line of Python, the name as one string
    assert call.args[0].value == f"path/to/{name}" and call.keywords[0].value.value == 'main"\n```'
    assert yaml.safe_load(card.split("---")[1]) is not None


# ---- 5. lineage through remove and heal ----------------------------------------------------------------
def test_remove_on_a_pruned_folder_maps_indices_and_drops_stale_files(chain):
    step1, step2 = read_record(chain["step1"] / "pruning.json"), read_record(chain["step2"] / "pruning.json")
    assert step1.kept_original == [0, 1, 4, 5, 6, 7]
    assert step2.command == "remove" and step2.step == 2 and step2.removed == [3]
    assert step2.removed_original == [5] and step2.removed_original_all == [2, 3, 5]
    assert step2.kept_original == [0, 1, 4, 6, 7] and step2.history[0].kept_original == step1.kept_original
    assert not any((chain["step2"] / f).exists() for f in ("eval.json", "eval.md", "recipe.yaml"))
    assert check_checkpoint(chain["step2"], require_export=True).ok
    # block k of step2 holds original block kept_original[k]
    with safe_open(chain["source"] / "model.safetensors", "pt") as a, safe_open(chain["step2"] / "model.safetensors", "pt") as b:
        for k, orig in enumerate(step2.kept_original):
            name = f"model.layers.{k}.mlp.down_proj.weight"
            assert b.get_tensor(name).equal(a.get_tensor(name.replace(f".{k}.", f".{orig}.", 1)))
    text = (chain["step2"] / "README.md").read_text()
    assert "| 2 | `step1` (local folder) | by hand (prune remove) | 6 → 5 | `[3]` | `[5]` |" in text


def test_heal_keeps_the_lineage_and_writes_a_card(chain):
    step3 = read_record(chain["step3"] / "pruning.json")
    assert step3.command == "remove" and step3.healing["method"] == "lora" and step3.healing["from_run"] == "step2"
    assert step3.healing["from_repo"] == "me/tiny-step2"
    assert step3.kept_original == [0, 1, 4, 6, 7] and step3.removed_original_all == [2, 3, 5]
    assert step3.base_model == "me/tiny-step2" and step3.repo_id is None  # its parent is the pushed run
    card = ModelCard.load(chain["step3"] / "README.md")
    assert card.data.base_model == "me/tiny-step2" and card.data.base_model_relation == "finetune"
    assert "healed" in card.data.tags and "## Healing" in card.text
    assert "The pruned model ([me/tiny-step2](https://huggingface.co/me/tiny-step2)) was then healed" in card.text
    assert "| 2 | `step1` (local folder) | by hand (prune remove), then healed (lora) | 6 → 5 | `[3]` | `[5]` |" in card.text
    assert check_checkpoint(chain["step3"], require_export=True).ok


# ---- 3 + 9. push: card re-rendered for the repo, options, the Hub's own card validation ----------------
def test_push_rerenders_the_card_and_records_the_repo(chain, hub):
    _, handler, _ = hub
    query, files = committed(handler.log)  # the fixture pushed step2
    card = files["README.md"].decode()
    assert 'from_pretrained("me/tiny-step2")' in card and "path/to/" not in card.split("## How to load")[1].split("##")[0]
    assert json.loads(files["pruning.json"])["repo_id"] == "me/tiny-step2"
    validated = [json.loads(raw)["content"] for path, _, _, raw in handler.log if path == "/api/validate-yaml"]
    assert card in validated  # huggingface_hub had the Hub validate the card before the commit
    # the folder now knows its repo (written back after the push)
    assert read_record(chain["step2"] / "pruning.json").repo_id == "me/tiny-step2"
    assert check_checkpoint(chain["step2"], require_export=True).ok


def test_push_create_pr_exclude_and_token_file(chain, hub, tmp_path):
    endpoint, handler, token_file = hub
    import shutil

    folder = Path(shutil.copytree(chain["step1"], tmp_path / "step1"))
    shutil.copy(token_file, folder / "hf-token")  # a token file inside the pushed folder is never sent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # the repo holds an earlier push's shards: transformers would load them, not this single file
    handler.repo_files = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "model.safetensors",
                          "eval.json", "old/model.safetensors", "notes.md"]
    try:
        done = cli_push(endpoint, folder, "me/tiny-step1", "--token-file", folder / "hf-token", "--create-pr",
                        "--exclude", "eval.*", home=tmp_path / "hf")
    finally:
        handler.repo_files = []
    assert done.returncode == 0, done.stderr
    assert f"pull request opened: {endpoint}/me/x/discussions/1" in done.stdout and TOKEN not in done.stdout + done.stderr
    query, files = committed(handler.log)
    assert query.get("create_pr") == ["1"]
    assert "eval.json" not in files and "eval.md" not in files and "recipe.yaml" in files and "hf-token" not in files
    raw = [entry for entry in handler.log if "/commit/" in entry[0]][-1][3]
    deleted = [json.loads(line)["value"]["path"] for line in raw.splitlines() if json.loads(line)["key"] == "deletedFile"]
    assert deleted == ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # a pull request leaves the folder as it was
    # a token file that is missing, or --exclude of the card: one line, before anything is sent
    n = len(handler.log)
    done = cli_push(endpoint, folder, "me/x", "--token-file", tmp_path / "nope", home=tmp_path / "hf")
    assert done.returncode == 2 and "--token-file" in done.stderr and "not found" in done.stderr
    done = cli_push(endpoint, folder, "me/x", "--token-file", token_file, "--exclude", "README.md", "-q", home=tmp_path / "hf")
    assert done.returncode == 2 and "leaves out README.md" in done.stderr
    assert len(handler.log) == n


def test_only_a_full_checkpoint_push_deletes_stale_weights():
    """A push that sends model weights deletes the repo's other transformers weight files (not nested
    ones, not excluded ones, not other files); an adapter folder's push deletes nothing."""
    from prune.export.push import UploadPlan, stale_weights

    repo = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "teacher.safetensors", "adapter_model.safetensors", "sub/model.safetensors", "README.md"]
    sharded = UploadPlan(Path("."), "me/x", "main", True, "m", [("model-00001-of-00001.safetensors", 1),
                                                                 ("model.safetensors.index.json", 1), ("config.json", 1)],
                         excluded=["pytorch_model.*"])
    assert stale_weights(repo, sharded) == ["model-00001-of-00002.safetensors", "model.safetensors"]
    adapter = UploadPlan(Path("."), "me/x", "main", True, "m", [("adapter_model.safetensors", 1), ("README.md", 1)])
    assert stale_weights(repo, adapter) == []
    assert "are deleted" in sharded.describe() and "are deleted" not in adapter.describe()  # --dry-run said so for both


def test_chain_push_dry_run(chain, capsys):
    plan = push(chain["step3"], "me/tiny-step3", dry_run=True, quiet=True)
    assert 'from_pretrained("me/tiny-step3")' in plan.rendered["README.md"]
    on_branch = push(chain["step3"], "me/tiny-step3", revision="v2", dry_run=True, quiet=True)
    assert 'from_pretrained("me/tiny-step3", revision="v2")' in on_branch.rendered["README.md"]
    published = json.loads(plan.rendered["pruning.json"])
    assert published["repo_id"] == "me/tiny-step3" and published["base_model"] == "me/tiny-step2"
    assert [s["kept_original"] for s in published["history"]] == [[0, 1, 4, 5, 6, 7]]
    assert {n for n, _ in plan.files} == {p.name for p in chain["step3"].iterdir()}


# ---- 4. prune.save writes the card and the lineage -------------------------------------------------------
def test_python_api_save_writes_card_and_lineage(tmp_path):
    model, tok = build_model("llama"), build_tokenizer(True)
    prune.remove_layers(model, [2, 5])
    out = prune.save(model, tok, tmp_path / "api", pruning={"removed": [2, 5]})
    record = read_record(out / "pruning.json")
    assert record.kept_original == [0, 1, 3, 4, 6, 7] and record.layers_before == 8 and record.command == "save"
    assert record.params_after == prune.count_parameters(model) and record.dtype == "float32"
    assert check_checkpoint(out, require_export=True).ok
    assert push(out, "me/api", dry_run=True, quiet=True).files


# ---- 6. save dtype ----------------------------------------------------------------------------------------
def test_output_dtype_in_memory_and_out_of_core(chain, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run(recipe(chain["source"], tmp_path / "bf16", 2, "contiguous", output={"dtype": "bfloat16"}), quiet=True).out_dir
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "- **Saved dtype**: `bfloat16`" in (out / "README.md").read_text()
    assert read_record(out / "pruning.json").dtype == "bfloat16"
    # out of core: converted tensor by tensor, equal to converting in memory
    ooc = prune.prune_checkpoint(chain["source"], [2, 3], tmp_path / "ooc", pruning={}, dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(chain["source"])
    prune.remove_layers(ref, [2, 3])
    mem = prune.save(ref, None, tmp_path / "mem", dtype="bfloat16")
    assert next(ref.parameters()).dtype == torch.float32  # the model in memory is untouched
    with safe_open(ooc / "model.safetensors", "pt") as a, safe_open(mem / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert a.get_tensor(k).dtype == torch.bfloat16 and a.get_tensor(k).equal(b.get_tensor(k)), k
    assert json.loads((ooc / "config.json").read_text())["dtype"] == "bfloat16"
    assert check_checkpoint(ooc, require_export=True).ok


# ---- 7. adapter output ------------------------------------------------------------------------------------
def test_adapter_folder_loads_on_the_pruned_base(chain):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = chain["adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "pruning.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()
    card = ModelCard.load(folder / "README.md").data
    assert card.base_model == "me/tiny-step2" and card.base_model_relation == "adapter" and card.library_name == "peft"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny-step2"
    assert check_checkpoint(folder, require_export=True).ok
    # the adapter on the pruned base is the model the healing measured: same held-out loss
    from transformers import AutoTokenizer

    from prune.heal.methods import mean_lm_loss, training_windows
    from prune.pipeline.heal_run import heal_settings

    healing = read_record(folder / "pruning.json").healing
    assert healing["lora"]["merged"] is False
    cfg = heal_settings(None, method="lora", data=C4["path"], field=C4["field"].split(","), rows=C4["rows"],
                        overrides=HEAL + ["merge=false"])
    _, val = training_windows(AutoTokenizer.from_pretrained(chain["step2"]), cfg)
    base = AutoModelForCausalLM.from_pretrained(chain["step2"])
    with torch.no_grad():
        plain = mean_lm_loss(base, val)
        adapted = mean_lm_loss(PeftModel.from_pretrained(base, folder), val)
    assert plain == pytest.approx(healing["val_loss_before"], rel=1e-5)
    assert adapted == pytest.approx(healing["val_loss_after"], rel=1e-5) and adapted != pytest.approx(plain, rel=1e-4)


def test_an_unpushed_runs_adapter_never_names_the_original_as_its_base(chain, tmp_path):
    """The adapter fits the pruned run's kept blocks: with the run not pushed, its base is the run
    folder, not the run's Hub parent (the unpruned original, onto which peft loads it without error)."""
    from prune.export.heal import heal_export

    record = read_record(chain["step1"] / "pruning.json").model_copy(update={"repo_id": None,
                                                                               "base_model": "org/original"})
    healed, card = heal_export(record, tmp_path / "run", tmp_path / "adapter", {}, None, None, adapter=True)
    assert healed.adapter["base"] == "path/to/run" and healed.base_model is None
    assert "base_model:" not in card.split("---")[1] and 'AutoModelForCausalLM.from_pretrained("path/to/run")' in card
    # the card's saved dtype is the adapter's tensors', not the run's model's (it said bfloat16 over float32 adapters)
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({"a.lora_A.weight": torch.zeros(2, 3, dtype=torch.bfloat16)}, str(folder / "adapter_model.safetensors"))
    healed, card = heal_export(record.model_copy(update={"dtype": "float32"}), tmp_path / "run", tmp_path / "adapter",
                               {}, None, None, adapter=folder)
    assert healed.dtype == "bfloat16" and "**Saved dtype**: `bfloat16`" in card
    assert heal_export(record.model_copy(update={"dtype": "float32"}), tmp_path / "run", tmp_path / "adapter", {}, None,
                       None, adapter=True)[0].dtype is None


# ---- 8. mergekit --------------------------------------------------------------------------------------------
def test_mergekit_slices_cover_exactly_the_kept_blocks(chain, tmp_path, capsys):
    record = read_record(chain["step2"] / "pruning.json")
    config = mergekit_config(record, model="org/tiny-base")
    ranges = [tuple(s["sources"][0]["layer_range"]) for s in config["slices"]]
    assert ranges == [(0, 2), (4, 5), (6, 8)] and config["merge_method"] == "passthrough"
    assert [i for a, b in ranges for i in range(a, b)] == record.kept_original
    assert kept_ranges([3]) == [(3, 4)] and kept_ranges([0, 1, 2]) == [(0, 3)]
    # the CLI file, read back by `prune remove --slices`, removes exactly what the chain removed
    capsys.readouterr()
    assert prune_main(["export-mergekit", str(chain["step2"]), "-o", str(tmp_path / "mk.yaml")]) == 0
    assert blocks_from_slices(str(tmp_path / "mk.yaml"), 8) == record.removed_original_all
    # the original was a local folder: said on the terminal too, not only in a comment inside the file
    assert "note: the original was the local folder" in capsys.readouterr().err
    # a healed folder's weights are not the original's blocks: no passthrough config rebuilds them
    capsys.readouterr()
    assert prune_main(["export-mergekit", str(chain["step3"]), "-o", str(tmp_path / "healed.yaml")]) == 2
    assert "step 2 of this folder was healed" in capsys.readouterr().err  # heal keeps the step it heals
    assert not (tmp_path / "healed.yaml").exists()
    for bad, message in (("[[0, 3], [2, 5]]", "overlaps"), ("[[0, 9]]", "not inside"), ("[[0, 8]]", "nothing to remove"),
                         ("{slices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]}]}",
                          "exactly one source"),
                         ("{merge_method: linear, slices: [{sources: [{model: a, layer_range: [0, 2]}]}]}",
                          "merge_method is 'linear'"),
                         # what mergekit reads and a pruning does not: refused, not dropped (a review: the same YAML
                         # built other weights with prune remove than with mergekit-yaml)
                         ("{slices: [{sources: [{model: a, layer_range: [0, 2], parameters: {scale: [{filter: o_proj, "
                          "value: 0.0}]}}]}]}", "a source's key 'parameters' is not read by a pruning, which keeps "
                          "blocks as they are \\(mergekit's parameters change the weights"),
                         ("{slices: [{sources: [{model: a, layer_range: [0, 2]}], parameters: {x: 1}}]}",
                          "a slice's key 'parameters'"),
                         ("{tokenizer_source: union, slices: [{sources: [{model: a, layer_range: [0, 2]}]}]}",
                          "the config's key 'tokenizer_source' is not read by a pruning"),
                         ("{dtype: float8, slices: [{sources: [{model: a, layer_range: [0, 2]}]}]}",
                          "dtype 'float8' is not one of")):
        with pytest.raises(PruneError, match=message):
            blocks_from_slices(bad, 8)
    # per-layer config lists (sliced by prune, copied unsliced by mergekit), a GGUF original on the Hub: refused
    with pytest.raises(PruneError, match=r"per-layer settings \(layer_types\)"):
        n = len(record.kept_original)
        mergekit_config(record, model="x", config={"model_type": "qwen2", "num_hidden_layers": n, "layer_types": ["a"] * n})
    hub_gguf = record.model_copy(update={"source": record.source.model_copy(update={"kind": "hub", "path": "org/X-GGUF",
                                                                                    "gguf_file": "x.gguf"})})
    with pytest.raises(PruneError, match="mergekit cannot read"):
        mergekit_config(hub_gguf.model_copy(update={"original": None}))
    # a local GGUF original too: the Hub base model it declares holds other weights than the quantized file
    local_gguf = record.model_copy(update={"original": None, "base_model": "org/X", "source": record.source.model_copy(
        update={"kind": "gguf", "path": "/models", "gguf_file": "x.Q4_1.gguf"})})
    with pytest.raises(PruneError, match="GGUF file x.Q4_1.gguf, which mergekit cannot read"):
        mergekit_config(local_gguf)
    assert mergekit_config(local_gguf, model="org/X")["slices"][0]["sources"][0]["model"] == "org/X"
    # -o is a file like any other output: never a file of the run (pruning.json was overwritten), an existing one
    # only with --overwrite, written atomically; a damaged config.json is one line; --slices takes numbers, not booleans
    capsys.readouterr()
    record_bytes = (chain["step2"] / "pruning.json").read_bytes()
    assert prune_main(["export-mergekit", str(chain["step2"]), "-o", str(chain["step2"] / "pruning.json")]) == 2
    assert "is a file of the run folder" in capsys.readouterr().err
    assert (chain["step2"] / "pruning.json").read_bytes() == record_bytes
    copy = Path(shutil.copytree(chain["step2"], tmp_path / "step2"))  # the default file: replaced only with --overwrite
    assert prune_main(["export-mergekit", str(copy)]) == 0 and (copy / "mergekit.yaml").is_file()
    capsys.readouterr()
    assert prune_main(["export-mergekit", str(copy), "--model", "org/other"]) == 2
    assert "mergekit.yaml already exists (pass --overwrite" in capsys.readouterr().err
    assert prune_main(["export-mergekit", str(copy), "--model", "org/other", "--overwrite"]) == 0
    assert "org/other" in (copy / "mergekit.yaml").read_text()
    config_bytes = (chain["source"] / "config.json").read_bytes()  # nor a file of --model (it replaced config.json)
    assert prune_main(["export-mergekit", str(chain["step2"]), "--model", str(chain["source"]), "-o",
                       str(chain["source"] / "config.json"), "--overwrite"]) == 2
    assert "is inside the --model" in capsys.readouterr().err
    assert (chain["source"] / "config.json").read_bytes() == config_bytes
    assert prune_main(["export-mergekit", str(chain["step2"]), "-o", str(tmp_path / "mk.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert prune_main(["export-mergekit", str(chain["step2"]), "-o", str(tmp_path / "mk.yaml"), "--overwrite"]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(chain["step2"], broken)
    (broken / "config.json").write_text("{not json")
    capsys.readouterr()
    assert prune_main(["export-mergekit", str(broken), "-o", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config.json: not readable JSON" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(PruneError, match="two integers"):
        blocks_from_slices("[[true, 3], [5, 8]]", 8)
    with pytest.raises(PruneError, match="appears twice"):
        blocks_from_slices("{slices: [], slices: []}", 8)


def test_mergekit_files_and_slices_name_the_right_model(chain, tmp_path, capsys):
    """A mergekit.yaml written into the run folder (which prune push uploads) held --model's absolute path; slices
    written for the original (its block numbers) were applied to an already pruned folder, removing other blocks."""
    copy = Path(shutil.copytree(chain["step2"], tmp_path / "step2"))
    assert prune_main(["export-mergekit", str(copy), "--model", str(chain["source"])]) == 0
    text = (copy / "mergekit.yaml").read_text()
    assert str(chain["source"]) not in text and f"model: <local>/{chain['source'].name}" in text
    assert "set `model` to its path before running" in text
    assert prune_main(["export-mergekit", str(copy), "--model", str(chain["source"]), "-o", str(tmp_path / "mine.yaml")]) == 0
    assert str(chain["source"]) in (tmp_path / "mine.yaml").read_text()  # a file of one's own keeps the path
    capsys.readouterr()
    # the slices name the original: applied to the step-1 folder (pruned, its own numbering) they are refused
    assert prune_main(["remove", str(chain["step1"]), "--slices", str(tmp_path / "mine.yaml"), "-o", str(tmp_path / "wrong")]) == 2
    assert f"--slices name the model {chain['source']}, but {chain['step1']} is a pruned model" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()
    # the same pruned folder as a Hub repo (read from the offline cache): its pruning.json is read there too
    snapshot = tmp_path / "hub" / "models--org--step1" / "snapshots" / ("0" * 40)
    shutil.copytree(chain["step1"], snapshot)
    (tmp_path / "hub" / "models--org--step1" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--step1" / "refs" / "main").write_text("0" * 40)
    hub = prune_cli("remove", "org/step1", "--slices", tmp_path / "mine.yaml", "-o", tmp_path / "wrong",
                    env_extra={"HF_HUB_CACHE": str(tmp_path / "hub")}, check_rc=2)
    assert f"--slices name the model {chain['source']}, but org/step1 is a pruned model" in hub.stderr, hub.stderr
    assert not (tmp_path / "wrong").exists()
    assert prune_main(["remove", str(chain["source"]), "--slices", str(tmp_path / "mine.yaml"), "-o", str(tmp_path / "right")]) == 0
    assert read_record(tmp_path / "right" / "pruning.json").removed == read_record(chain["step2"] / "pruning.json").removed_original_all
    # the config's dtype is the one written, as mergekit writes it (it was dropped: float32 for a bfloat16 config);
    # a --dtype saying otherwise is refused
    half = tmp_path / "half.yaml"
    half.write_text(re.sub(r"(?m)^dtype: .*$", "dtype: bfloat16", (tmp_path / "mine.yaml").read_text()))
    assert prune_main(["remove", str(chain["source"]), "--slices", str(half), "-o", str(tmp_path / "h"), "--dtype",
                       "float16"]) == 2
    assert "--dtype float16, but the --slices config writes bfloat16 (its dtype): drop one" in capsys.readouterr().err
    assert prune_main(["remove", str(chain["source"]), "--slices", str(half), "-o", str(tmp_path / "h")]) == 0
    with safe_open(tmp_path / "h" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    said = capsys.readouterr().err  # the config's choices are said (they were applied without a word)
    assert "note: writing bfloat16, the --slices config's dtype" in said and "names the model" not in said
    other = tmp_path / "other.yaml"  # a config written for another model: applied, and said
    other.write_text(re.sub(r"(?m)^( *)(- )?model: .*$", r"\1\2model: org/another-model", half.read_text()))
    assert prune_main(["remove", str(chain["source"]), "--slices", str(other), "-o", str(tmp_path / "o")]) == 0
    assert (f"note: the --slices config names the model org/another-model; its layer ranges are applied to "
            f"{chain['source']}") in capsys.readouterr().err
    # --model is checked: a missing path, a file, an empty folder, a pruned model (its block count) were written down
    (tmp_path / "empty").mkdir()
    for bad, message in ((tmp_path / "nowhere", "is not a model folder"), (chain["source"] / "config.json", "is not a model folder"),
                         (tmp_path / "empty", "is not a model folder"), (chain["step1"], "has 6 blocks, but the original"),
                         ("", "--model is empty: give the original model's folder")):  # it fell back without a word
        capsys.readouterr()
        assert prune_main(["export-mergekit", str(copy), "--model", str(bad), "-o", str(tmp_path / "bad.yaml")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.yaml").exists()


def test_mergekit_export_of_a_position_dependent_moe_layout(tmp_path, capsys):
    """Qwen3-MoE decides dense or sparse by the block's position: a passthrough merge keeps the original's config
    (num_hidden_layers alone changed), so it rebuilds the kept blocks only where that gives each its kind. The
    original's config decides; without it the export is refused (it was accepted, and the merge built dense MLPs
    where the kept blocks are sparse)."""
    from prune.export.outofcore import prune_checkpoint

    def pruned(name, removed, **layout):
        source = tmp_path / name
        build_model("qwen3_moe", **layout).save_pretrained(source)
        return source, prune_checkpoint(source, removed, tmp_path / f"{name}-out", pruning={})

    # every other block sparse, the sparse ones kept: positions 0..3 of the merge would alternate again
    source, out = pruned("alternating", [0, 2, 4, 6], decoder_sparse_step=2, mlp_only_layers=[])
    assert prune_main(["export-mergekit", str(out), "-o", str(tmp_path / "a.yaml"), "--model", str(source)]) == 2
    assert "dense/sparse layout depends on the block position" in capsys.readouterr().err
    # the original not readable here (a local folder's record names it alone; a Hub id with nothing cached): refused
    for model in ([], ["--model", "org/not-cached"]):
        assert prune_main(["export-mergekit", str(out), "-o", str(tmp_path / "a.yaml"), *model]) == 2
        assert "config.json is not readable here" in capsys.readouterr().err
    assert not (tmp_path / "a.yaml").exists()
    # every block sparse: any kept set keeps its kind at any position
    source, out = pruned("sparse", [2, 5], decoder_sparse_step=1, mlp_only_layers=[])
    assert prune_main(["export-mergekit", str(out), "-o", str(tmp_path / "b.yaml"), "--model", str(source)]) == 0
    assert blocks_from_slices(str(tmp_path / "b.yaml"), 8) == [2, 5]


MERGEKIT_LIB = os.environ.get("PRUNE_MERGEKIT_PATH", "/tmp/mergekit-lib")


@pytest.mark.skipif(not (Path(MERGEKIT_LIB) / "mergekit").is_dir() and not os.environ.get("PRUNE_REQUIRE_MERGEKIT"),
                    reason="mergekit not installed (pip install --no-deps --target /tmp/mergekit-lib mergekit immutables; "
                           ".ci/run installs it and sets PRUNE_REQUIRE_MERGEKIT, so there it runs)")
def test_mergekit_rebuilds_the_same_tensors(chain, tmp_path):
    """mergekit's own passthrough merge of the exported config gives step2's tensors exactly."""
    config = tmp_path / "mk.yaml"
    assert prune_main(["export-mergekit", str(chain["step2"]), "-o", str(config), "--model", str(chain["source"])]) == 0
    code = ("import sys; from mergekit.config import MergeConfiguration; from mergekit.merge import run_merge; "
            "from mergekit.options import MergeOptions; import yaml; "
            "c = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]))); "
            "run_merge(c, sys.argv[2], options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([MERGEKIT_LIB, str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code, str(config), str(tmp_path / "merged")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = {}
    for file in (tmp_path / "merged").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    with safe_open(chain["step2"] / "model.safetensors", "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    assert set(ours) <= set(merged) | {"lm_head.weight"}
    for k, v in ours.items():
        if k in merged:
            assert merged[k].equal(v), k


def test_public_path_rules(tmp_path, monkeypatch):
    from prune.export.public import public_data, public_path

    monkeypatch.setenv("PRUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path / "..")
    assert public_path(tmp_path / "data" / "c4" / "x.jsonl") == "${PRUNE_DATA_DIR}/c4/x.jsonl"
    assert public_path(tmp_path / "runs" / "a") == f"{tmp_path.name}/runs/a"  # under the working folder: relative
    assert public_path("/somewhere/else/model.gguf") == "<local>/model.gguf"
    assert public_path("~/models/m") == "<local>/m" and public_path("runs/a") == "runs/a"
    assert public_data({"a": ["/x/y", "org/model", 3], "b": "https://huggingface.co/x"}) == {
        "a": ["<local>/y", "org/model", 3], "b": "https://huggingface.co/x"}


# ---- 5. what a push must not send, and what check must not pass ----------------------------------------
def test_push_refuses_tokens_needed_excludes_and_edited_cards(chain, tmp_path):
    """From a review: a file holding a token, Python caches, an --exclude of config.json or the weights
    and a hand-edited card (rendered anew, the edits dropped) all went up."""
    from prune.export.card import card_edited

    folder = Path(shutil.copytree(chain["step1"], tmp_path / "step1"))
    (folder / "notes.txt").write_text("export HF_TOKEN=" + TOKEN + "\n")
    with pytest.raises(PruneError, match=r"notes.txt holds what looks like a Hugging Face token \(not shown\).*"
                                         r"--exclude notes.txt") as err:
        push(folder, "me/x", dry_run=True, quiet=True)
    assert TOKEN not in str(err.value)
    (folder / "notes.txt").unlink()
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "card.cpython-311.pyc").write_bytes(b"\0")
    assert not [n for n, _ in push(folder, "me/x", dry_run=True, quiet=True).files if "pycache" in n]
    (folder / "notes" / "deep").mkdir(parents=True)
    for name in ("notes/a.md", "notes/deep/b.md"):
        (folder / name).write_text("mine\n")
    for pattern in ("notes", "notes/", "notes/*", "note?"):  # a folder's name left it out only as 'notes/*'
        sent = [n for n, _ in push(folder, "me/x", dry_run=True, quiet=True, exclude=[pattern]).files]
        assert not [n for n in sent if n.startswith("notes/")] and "config.json" in sent, pattern
    assert {"notes/a.md", "notes/deep/b.md"} <= {n for n, _ in push(folder, "me/x", dry_run=True, quiet=True,
                                                                     exclude=["deep/x"]).files}
    shutil.rmtree(folder / "notes")
    tokenizer = [f for f in ("tokenizer.json", "tokenizer_config.json") if (folder / f).is_file()]
    assert tokenizer  # the card's snippet loads the tokenizer from the repo: --exclude 'tokenizer*' was sent
    for needed in ("config.json", "model.safetensors", *tokenizer):
        with pytest.raises(PruneError, match=f"--exclude leaves out {needed}, which a pushed model needs"):
            push(folder, "me/x", dry_run=True, quiet=True, exclude=[needed])
    card = (folder / "README.md").read_text()
    assert card_edited(card) is False and card_edited(card + "\n") is False
    for edited in (card.replace("## How to load", "## Intended use\n\nMine.\n\n## How to load"),  # in the body,
                   card + "\n## Intended use\n\nMine.\n",  # after the stamp, the stamp gone, or no stamp at all
                   card.replace("<!-- prune", "<!-- x"), "# My own card\n"):
        assert card_edited(edited)
        (folder / "README.md").write_text(edited)
        with pytest.raises(PruneError, match="README.md is not the card prune wrote.*--keep-card.*--replace-card"):
            push(folder, "me/x", dry_run=True, quiet=True)
    plan = push(folder, "me/x", dry_run=True, quiet=True, keep_card=True)
    assert "README.md" not in plan.rendered and "pruning.json" in plan.rendered
    assert dict(plan.files)["README.md"] == (folder / "README.md").stat().st_size  # sent as it is
    assert "README.md" in push(folder, "me/x", dry_run=True, quiet=True, replace_card=True).rendered


def test_check_compares_the_record_and_the_card_files_with_the_folder(chain, tmp_path):
    """pruning.json's parameter count, dtype and model type (the card repeats them), a damaged eval.json
    (the card then said nothing was evaluated) and weights of another shape than config.json builds (the
    message named no tensor)."""
    good = check_checkpoint(chain["step1"], require_export=True)
    assert good.ok, good.summary()
    record = json.loads((chain["step1"] / "pruning.json").read_text())
    for change, expected in ((dict(params_after=999), "records 999 parameters after pruning but the weights hold"),
                             (dict(dtype="bfloat16"), "records the weights saved as bfloat16 but they are stored as F32"),
                             (dict(model_type="mistral"), "records model_type 'mistral' but config.json says 'llama'")):
        folder = Path(shutil.copytree(chain["step1"], tmp_path / next(iter(change))))
        (folder / "pruning.json").write_text(json.dumps({**record, **change}))
        found = check_checkpoint(folder, require_export=True)
        assert [f.message for f in found.problems] == [f"pruning.json {expected} {record['params_after']:,}"
                                                       if "parameters" in expected else f"pruning.json {expected}"]
    # the steps of a lineage join up: each edit below passed the check, and push published it on the card
    two = json.loads((chain["step2"] / "pruning.json").read_text())
    assert check_checkpoint(chain["step2"], require_export=True).ok
    for change, expected in ((dict(step=7), "records step 7 but holds 1 earlier step(s) in its history"),
                             (dict(params_before=999999), "records 999,999 parameters before step 2 but step 1 left"),
                             (dict(original={**two["original"], "params": 1}),
                              "records the original's parameters as 1 but its first step started from")):
        folder = Path(shutil.copytree(chain["step2"], tmp_path / f"chain-{next(iter(change))}"))
        (folder / "pruning.json").write_text(json.dumps({**two, **change}))
        [problem] = check_checkpoint(folder, require_export=True).problems
        assert problem.message.startswith(f"pruning.json {expected}"), problem.message
    # free-form sections in shapes prune never writes: push --dry-run raised KeyError / ValueError (exit 1)
    for change in (dict(msrs_before={"foo": 1}),
                   dict(selection={**record["selection"], "strategy": "contiguous",
                                   "details": {"start": 3, "n": 2, "distance": "x"}})):
        folder = Path(shutil.copytree(chain["step1"], tmp_path / f"card-{next(iter(change))}"))
        (folder / "pruning.json").write_text(json.dumps({**record, **change}))
        with pytest.raises(PruneError, match=r"pruning.json does not render as a model card \((KeyError|ValueError)"):
            push(folder, "me/x", dry_run=True, quiet=True)
    # a healing with its method alone (no settings): the card lists it field by field (it was a KeyError)
    folder = Path(shutil.copytree(chain["step1"], tmp_path / "card-healing"))
    (folder / "pruning.json").write_text(json.dumps({**record, "healing": {"method": "lora"}}))
    push(folder, "me/x", dry_run=True, quiet=True)
    folder = Path(shutil.copytree(chain["step1"], tmp_path / "eval"))
    for damaged in (b"{not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000):  # the last: a RecursionError
        (folder / "eval.json").write_bytes(damaged)
        problems = check_checkpoint(folder, require_export=True).problems
        assert len(problems) == 1 and problems[0].message.startswith("eval.json does not read as JSON")
    with pytest.raises(PruneError, match="eval.json does not read as JSON"):
        push(folder, "me/x", dry_run=True, quiet=True)
    folder = Path(shutil.copytree(chain["step1"], tmp_path / "shape"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))
    message = " ".join(f.message for f in check_checkpoint(folder).problems)
    assert "mismatched (e.g. model.layers.0.mlp." in message and "in the weights" in message, message


def test_check_fails_other_weights_and_a_damaged_generation_config_and_remove_drops_params_json(chain, tmp_path):
    """From a review: a leftover pytorch_model.bin (here the unpruned original) passed prune check and push sent it;
    a damaged generation_config.json passed, and from_pretrained silently used transformers' defaults; prune remove
    carried Mistral's params.json, which names the original depth, into the pruned copy."""
    for i, (name, content, expected) in enumerate((
            ("pytorch_model.bin", (chain["source"] / "model.safetensors").read_bytes(),
             "weights in another format beside the safetensors checkpoint: pytorch_model.bin"),
            ("params.json", b'{"dim": 48, "n_layers": 8}', "params.json (Mistral's format) describes other weights"),
            ("generation_config.json", b'{"eos_token_id": [2,', "generation_config.json does not load"),
            ("generation_config.json", b'{"eos_token_id": [2, 99999]}', "generation_config.json's eos_token_id 99999 "
                                                                        "is not a token id of the 256-row embedding"))):
        folder = Path(shutil.copytree(chain["step1"], tmp_path / f"bad{i}"))
        (folder / name).write_bytes(content)
        problems = [f.message for f in check_checkpoint(folder, require_export=True).problems]
        assert len(problems) == 1 and problems[0].startswith(expected), problems
        with pytest.raises(PruneError, match="not a complete checkpoint|" + re.escape(expected[:30])):
            push(folder, "me/x", dry_run=True, quiet=True)
    good = check_checkpoint(chain["step1"], require_export=True)
    assert good.ok and any(f.area == "generation" and f.level == "ok" for f in good.findings)
    source = Path(shutil.copytree(chain["source"], tmp_path / "mistral-format"))
    (source / "params.json").write_text('{"dim": 48, "n_layers": 8}')
    assert prune_main(["remove", str(source), "--blocks", "2", "-o", str(tmp_path / "cut"), "-q"]) == 0
    assert not (tmp_path / "cut" / "params.json").exists() and check_checkpoint(tmp_path / "cut").ok


def test_the_cards_paired_lines_survive_a_hand_edited_eval_json(chain, tmp_path):
    """eval.json's paired rows in shapes prune never writes (a text count, a number for a metric, no task): the card
    leaves the paired lines out; prune check and push blamed pruning.json ('does not render as a model card')."""
    from prune.export.card import paired_text

    good = {"task": "arc_easy", "metric": "acc", "n": 40, "mean_a": 0.5, "mean_b": 0.45, "diff": -0.05,
            "se_paired": 0.02, "se_unpaired": 0.1, "ci_low": -0.1, "ci_high": 0.0}
    assert paired_text([good]) == "- arc_easy (acc): -5.00 points, 95% interval [-10.00, +0.00] over 40 examples"
    # an interval that excludes 0 beside McNemar's p >= 0.05 (few flips, one way) is marked, as eval.md marks it
    few = {**good, "diff": 0.05, "ci_low": 0.0033, "ci_high": 0.1118, "right_to_wrong": 0, "wrong_to_right": 4,
           "mcnemar_p": 0.125}
    assert paired_text([few]) == ("- arc_easy (acc): +5.00 points, 95% interval [+0.33, +11.18] † over 40 examples\n\n"
                                  "† the 95% interval and McNemar's exact test disagree (few flips, mostly one way): "
                                  "read the row as not shown.")
    piqa = {**good, "task": "piqa"}
    for bad in ({**piqa, "n": "40"}, {**piqa, "metric": 1}, {**good, "task": None}, {**piqa, "n": 0}, "row", {"x": 1}):
        assert paired_text([good, bad]) is None
        folder = Path(shutil.copytree(chain["step1"], tmp_path / f"paired-{len(list(tmp_path.iterdir()))}"))
        evaluation = json.loads((folder / "eval.json").read_text())
        (folder / "eval.json").write_text(json.dumps({**evaluation, "paired": [good, bad]}))
        report = check_checkpoint(folder, require_export=True)
        assert report.ok, report.summary()


def test_card_table_license_and_version_details():
    from prune.core.console import versions
    from prune.core.records import OriginalModel
    from prune.core.tables import comparison_markdown
    from prune.export.card import hub_license

    row = {"name": "arc_easy", "metric": "acc", "original": 0.2, "pruned": float("nan"), "stderr_original": 0.09,
           "stderr_pruned": 0.09, "retained": float("nan")}
    assert comparison_markdown([row]).splitlines()[-1] == "| arc_easy | acc | 0.2000 ± 0.0900 | NaN | - |"
    assert hub_license(OriginalModel(n_layers=8, license="CC BY-NC 4.0")) == {"license": "cc-by-nc-4.0"}
    assert hub_license(OriginalModel(n_layers=8, license="My Own Terms")) == {"license": "other", "license_name": "my-own-terms"}
    assert versions()["prune-layers"] == prune.__version__  # an editable install's metadata said 0.1.0


def test_check_reads_every_index_list_of_blocks():
    """An index list whose key does not name "layer" (LFM2's full_attn_idxs) was never checked: a 7-block folder
    listing block 40 passed prune check."""
    from prune.export.check import per_layer_list_problems

    assert per_layer_list_problems({"full_attn_idxs": [3, 5, 40]}, 7) == ["config.full_attn_idxs lists blocks [40] outside 0..6"]
    assert per_layer_list_problems({"full_attn_idxs": [3, 5], "mlp_only_layers": [1]}, 7) == []
