"""`prune check` on good and corrupted folders, and `prune push`: refusal of incomplete
folders, --dry-run, and network / authentication failures. Nothing leaves this machine:
the Hub endpoint is a closed local port or a local HTTP server that refuses the token."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

import prune
from prune.export.check import check_checkpoint
from prune.io.safetensors import byte_ranges
from prune.core.config import branch_name_problem
from prune.core.errors import PruneError
from prune.export.push import card_for_repo, commit_operations, push, upload_files
from prune.pipeline.orchestrator import run
from prune.pipeline.recipe import load_recipe

from conftest import prune_cli, prune_main
from export_fixtures import folder_digest, recipe, save_source

FAKE_TOKEN = "hf_prunetestTOKENthatmustneverbeprinted"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A `prune run` output (8 -> 6 blocks), and the same checkpoint re-saved in 4 shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("hub")
    out = run(recipe(save_source(root / "source"), root / "pruned", 2), quiet=True).out_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    extras = {name: (out / name).read_text() for name in ("README.md", "recipe.yaml", "eval.json", "eval.md")}
    sharded = prune.save(model, AutoTokenizer.from_pretrained(out), root / "sharded", max_shard_size="200KB",
                         pruning=json.loads((out / "pruning.json").read_text()), files=extras)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return out, sharded


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def cli(*args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The console command in a real process without the caller's Hub token (``online`` gives one)."""
    return prune_cli(*args, env_extra=env_extra, unset=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), timeout=180)


def online(tmp_path: Path, endpoint: str, token: str | None = FAKE_TOKEN) -> dict:
    """Environment of a CLI run that may use the network, pointed at ``endpoint``, with an
    empty HF_HOME (no token file, no cache) and ``token`` in HF_TOKEN."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    return env


CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


# ---- check: good folders --------------------------------------------------------------------
def test_check_passes_on_pruned_outputs(pruned):
    for folder in pruned:
        report = check_checkpoint(folder, require_export=True)
        assert report.ok, report.summary()
        areas = [f.area for f in report.findings]
        assert areas == ["config", "weights", "blocks", "load", "tied", "tokenizer", "generation", "card", "pruning"]
        assert report.facts["n_layers"] == 6 and report.facts["model_type"] == "llama"
        assert report.facts["n_params"] == json.loads((folder / "pruning.json").read_text())["params_after"]
    sharded = check_checkpoint(pruned[1]).summary()
    shards = len(set(json.loads((pruned[1] / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert f"{shards} files" in sharded and "model.layers.0 .. model.layers.5: 6 blocks" in sharded


def test_check_cli_prints_one_screen_and_exits_zero(pruned):
    done = prune_main("check", pruned[1], "--require-export")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"checkpoint {pruned[1]}  (llama, 6 blocks,") and lines[-1] == "OK: complete and consistent"
    assert len(lines) <= 24 and all(len(line) <= 160 for line in lines)


def test_check_passes_on_every_architecture(tiny, tmp_path):
    """No false alarm on any supported architecture, pruned or not (tied or not, MoE,
    per-layer config lists)."""
    model, tok = tiny
    before = check_checkpoint(prune.save(model, tok, tmp_path / "dense"))
    assert before.ok, before.summary()
    prune.remove_layers(model, [2, 5])
    after = check_checkpoint(prune.save(model, tok, tmp_path / "pruned"))
    assert after.ok, after.summary()
    assert after.facts["n_layers"] == 6


# ---- check: corrupted folders ---------------------------------------------------------------------
def _shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def missing_shard(f):
    (f / _shards(f)[1]).unlink()


def stale_single_file_beside_the_shards(f):  # an earlier save or push left it: transformers would load it
    import shutil

    shutil.copy(f / _shards(f)[0], f / "model.safetensors")


def truncated_shard(f):
    path = f / _shards(f)[-1]
    path.write_bytes(path.read_bytes()[:-100])


def more_layers_in_config(f):
    _edit_json(f / "config.json", num_hidden_layers=7)


def fewer_layers_in_config(f):
    _edit_json(f / "config.json", num_hidden_layers=5)


def per_layer_list_too_short(f):
    _edit_json(f / "config.json", layer_types=["full_attention"] * 5)


def index_points_to_wrong_shard(f):
    index = json.loads((f / "model.safetensors.index.json").read_text())
    name = next(n for n, s in index["weight_map"].items() if s == _shards(f)[0])
    index["weight_map"][name] = _shards(f)[1]
    (f / "model.safetensors.index.json").write_text(json.dumps(index))


def untied_without_lm_head(f):
    _edit_json(f / "config.json", tie_word_embeddings=False)


def no_tokenizer(f):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (f / name).unlink()


def interrupted_save(f):
    (f / "INCOMPLETE").write_text("being written")


def pruning_json_disagrees(f):
    """A record consistent in itself (one block fewer removed) that the folder's 6 blocks contradict."""
    data = json.loads((f / "pruning.json").read_text())
    back = data["removed"][-1]
    changes = dict(removed=data["removed"][:-1], kept=sorted([*data["kept"], back]), layers_after=7)
    if data.get("selection"):  # the selection says what was removed too
        changes["selection"] = {**data["selection"], "removed": data["removed"][:-1]}
    if data.get("kept_original"):
        back_original = data["removed_original_all"][-1]
        changes.update(kept_original=sorted([*data["kept_original"], back_original]),
                       removed_original_all=data["removed_original_all"][:-1],
                       removed_original=[i for i in data["removed_original"] if i != back_original])
    _edit_json(f / "pruning.json", **changes)


def broken_card_front_matter(f):
    (f / "README.md").write_text("---\nlicense: [mit\n---\n# card\n")


CORRUPTIONS = {
    missing_shard: ("weights", "weight shard model-00002-of-"),
    truncated_shard: ("weights", "is truncated or corrupt"),
    stale_single_file_beside_the_shards: ("weights", "transformers loads model.safetensors and ignores the index"),
    more_layers_in_config: ("blocks", "config.num_hidden_layers=7 but the weights hold blocks 0..5 (6)"),
    fewer_layers_in_config: ("blocks", "config.num_hidden_layers=5 but the weights hold blocks 0..5 (6)"),
    per_layer_list_too_short: ("config", "config.layer_types has 5 entries but num_hidden_layers is 6"),
    index_points_to_wrong_shard: ("weights", "model.safetensors.index.json and the shard headers disagree"),
    untied_without_lm_head: ("load", "from_pretrained reports 1 missing (e.g. lm_head.weight)"),
    no_tokenizer: ("tokenizer", "no tokenizer files"),
    interrupted_save: ("folder", "an interrupted save"),
    pruning_json_disagrees: ("pruning", "pruning.json records 7 blocks after pruning but the config has 6"),
    broken_card_front_matter: ("card", "README.md front matter does not parse"),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=lambda f: f.__name__)
def test_check_and_push_refuse_corrupted_folders(pruned, tmp_path, corrupt):
    folder = copy(pruned[1], tmp_path)
    corrupt(folder)
    area, message = CORRUPTIONS[corrupt]
    report = check_checkpoint(folder, require_export=True)
    assert not report.ok
    assert any(f.area == area and message in f.message for f in report.problems), report.summary()
    with pytest.raises(PruneError, match="refusing to push") as err:
        push(folder, "me/tiny-pruned", dry_run=True, quiet=True)
    assert message in str(err.value)


def test_fine_grained_block_gap_is_named(pruned, tmp_path):
    """Tensors renumbered with a hole (blocks 0, 2..6): the gap is named."""
    from safetensors.torch import load_file, save_file

    folder = copy(pruned[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    moved = {}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            name = name.replace(f"model.layers.{i}.", f"model.layers.{i + 1 if i >= 1 else i}.", 1)
        moved[name] = t
    save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})
    report = check_checkpoint(folder)
    assert [f.message for f in report.problems] == [
        "config.num_hidden_layers=6 but the weights hold blocks 0, 2..6 (6), gaps at 1: transformers would fill the "
        "missing blocks with random values"]


def test_byte_ranges_hold_exactly_the_tensors_safe_open_reads(pruned):
    """The byte-copy writer's offsets (the one thing safe_open does not expose) address each tensor."""
    from safetensors import safe_open

    file = pruned[1] / sorted(p.name for p in pruned[1].glob("*.safetensors"))[0]
    ranges = byte_ranges(file)
    raw = file.read_bytes()
    with safe_open(file, "pt") as f:
        assert set(ranges) == set(f.keys())
        for name in f.keys():
            tensor = f.get_tensor(name)
            begin, end = ranges[name]
            assert raw[begin:end] == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_check_cli_fails_with_one_error_line(pruned, tmp_path):
    folder = copy(pruned[1], tmp_path)
    fewer_layers_in_config(folder)
    done = prune_main("check", folder)
    assert done.returncode == 2
    assert "FAIL blocks" in done.stdout and "FAIL pruning" in done.stdout
    assert done.stdout.strip().endswith("FAILED: 2 problems")
    assert done.stderr.strip().splitlines() == [
        f"error: {folder} is not a complete checkpoint: blocks: config.num_hidden_layers=5 but the weights hold "
        "blocks 0..5 (6): transformers would not load block 5 (and 1 more: listed above)"]


def test_check_warns_without_card_but_push_requires_it(pruned, tmp_path):
    folder = copy(pruned[0], tmp_path)
    (folder / "README.md").unlink()
    report = check_checkpoint(folder)
    assert report.ok and [f.area for f in report.findings if f.level == "warn"] == ["card"]
    with pytest.raises(PruneError, match="card: README.md \\(model card\\) is missing"):
        push(folder, "me/tiny-pruned", dry_run=True, quiet=True)


@pytest.mark.parametrize("revision, problem", [
    ("bad..rev", "'..'"), ("my branch", "' '"), ("-main", "starts with '-'"), ("v1.lock", "ends with '.lock'"),
    ("feat/", "ends with '/'"), ("a@{b", "'@{'"), ("x~1", "'~'"), ("", "empty")])
def test_push_refuses_a_revision_git_would_refuse_before_any_work(pruned, revision, problem):
    """``--revision bad..rev --dry-run`` listed the files and exited 0: the real push would fail at the Hub, after
    the repo was created. git's own rules for a branch name, in one line, before the folder is read; a branch
    git accepts (a pull request's ref too) goes through."""
    with pytest.raises(PruneError, match=rf"^--revision {re.escape(repr(revision))} is not a branch name the Hub "
                                         rf"accepts: .*{re.escape(problem)}.*\(e\.g\. --revision pruned-k7\)$"):
        push(pruned[0], "me/tiny-pruned", revision=revision, dry_run=True, quiet=True)
    with pytest.raises(PruneError, match=re.escape(f"push_to_hub.revision': {revision!r} is not a branch name")):
        load_recipe({"model": {"source": str(pruned[0])}, "calibration": {"path": "x.txt"},
                     "select": {"n_layers": 1}, "output": {"dir": "o", "push_to_hub": {"repo_id": "me/x",
                                                                                     "revision": revision}}})
    for fine in ("pruned-k7", "feature/x.y", "refs/pr/3", "v1.0"):
        assert branch_name_problem(fine) is None, fine


def test_a_token_file_that_is_a_folder_is_called_a_folder(tmp_path):
    """It said "--token-file DIR not found" of a folder that is there."""
    from prune.export.push import read_token_file

    with pytest.raises(PruneError, match=rf"^--token-file {re.escape(str(tmp_path))} is a folder \(give the file"):
        read_token_file(tmp_path)


# ---- push --dry-run ----------------------------------------------------------------------------------
def test_push_dry_run_lists_exactly_what_upload_folder_sends(pruned, tmp_path):
    folder = copy(pruned[1], tmp_path)
    (folder / ".hidden").write_text("not uploaded")
    before = folder_digest(folder)
    # an online configuration pointing at a closed port: any network access would fail the run
    done = cli("push", folder, "me/tiny-pruned", "--dry-run", "--revision", "v2", "--commit-message", "first try",
               env_extra=online(tmp_path, CLOSED_PORT, token=None))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "dry run: nothing is sent" in out
    assert "repo      me/tiny-pruned (model; created private if missing" in out
    assert "revision  v2" in out and "message   first try" in out
    assert "token     NOT found" in out
    listed = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1] == "B" and parts[0].replace(",", "").isdigit():
            listed[parts[4]] = int(parts[0].replace(",", ""))
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if not p.name.startswith(".")}
    rendered = card_for_repo(folder, "me/tiny-pruned", "v2")  # the card and record as published to the repo
    assert set(rendered) == {"README.md", "pruning.json"}
    on_disk.update({name: len(text.encode()) for name, text in rendered.items()})
    assert listed == on_disk and ".hidden" not in listed
    assert f"files     {len(on_disk)} files" in out and f"({sum(on_disk.values()):,} bytes)" in out
    assert "card      README.md, pruning.json re-rendered for me/tiny-pruned" in out
    # the commit sends exactly the listed files, the re-rendered ones from memory
    plan = push(folder, "me/tiny-pruned", dry_run=True, quiet=True)
    ops = commit_operations(plan)
    assert [op.path_in_repo for op in ops] == [n for n, _ in plan.files] == sorted(listed)
    card = next(op for op in ops if op.path_in_repo == "README.md")
    assert 'from_pretrained("me/tiny-pruned")' in card.path_or_fileobj.decode()
    assert folder_digest(folder) == before


def test_upload_files_skip_hidden_and_keep_subfolders(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c").write_text("c")
    assert upload_files(tmp_path) == [("a.txt", 1), ("sub/b.json", 2)]


# ---- push: failures end with one line, nothing changes locally, the token is never shown ----------
def assert_one_error_line(done, *fragments):
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert FAKE_TOKEN not in done.stdout + done.stderr


def test_push_unreachable_hub(pruned, tmp_path):
    folder = copy(pruned[0], tmp_path)
    before = folder_digest(folder)
    done = cli("push", folder, "me/tiny-pruned", "-q", env_extra=online(tmp_path, CLOSED_PORT))
    assert_one_error_line(done, "push to me/tiny-pruned@main failed before any file was sent",
                          f"cannot reach the Hub at {CLOSED_PORT}", "Connection refused")
    assert folder_digest(folder) == before


def test_push_refuses_offline_and_without_token(pruned, tmp_path):
    folder = pruned[0]
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    with pytest.raises(PruneError, match="HF_HUB_OFFLINE is set: the Hub cannot be reached"):
        push(folder, "me/tiny-pruned", quiet=True)
    done = cli("push", folder, "me/tiny-pruned", env_extra=online(tmp_path, CLOSED_PORT, token=None))
    assert_one_error_line(done, "no Hugging Face token found: run `hf auth login`, set HF_TOKEN or give --token-file")
    assert done.stdout == ""  # refused before the folder is even read
    # a folder that is no model at all is named first (it asked for a token for a report folder)
    (tmp_path / "report").mkdir()
    for where in (tmp_path / "report", tmp_path / "nowhere"):
        with pytest.raises(PruneError, match="is not a model folder"):
            push(where, "me/tiny-pruned", quiet=True)


class _Refusing(BaseHTTPRequestHandler):
    """A local stand-in for the Hub that answers every request with one HTTP status."""

    status = 401
    seen: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization") == f"Bearer {FAKE_TOKEN}"))
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,fragment", [
    (401, "authentication failed (401): the token was rejected; log in again with `hf auth login` or set HF_TOKEN"),
    (403, "permission denied (403): the token cannot write to me/tiny-pruned"),
])
def test_push_rejected_token(pruned, tmp_path, status, fragment):
    handler = type("Handler", (_Refusing,), {"status": status, "seen": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    folder = copy(pruned[0], tmp_path)
    before = folder_digest(folder)
    try:
        done = cli("push", folder, "me/tiny-pruned", "--public", "-q",
                   env_extra=online(tmp_path, f"http://127.0.0.1:{server.server_port}"))
    finally:
        server.shutdown()
    assert_one_error_line(done, "failed before any file was sent", fragment)
    assert handler.seen and handler.seen[0][:2] == ("POST", "/api/repos/create") and handler.seen[0][2]
    assert folder_digest(folder) == before
    # the token was sent only in the Authorization header: nothing on disk holds it
    for path in list(folder.rglob("*")) + list((tmp_path / "hf_home").rglob("*")):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
