"""Untrusted checkpoints: pickles are never executed, remote code never runs unless asked."""

import json
import pickle
import shutil
from pathlib import Path

import pytest

import prune
from prune import PruneError

from conftest import prune_main


class Payload:
    """Unpickling this runs code: it would create the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_checkpoint_is_loaded_weights_only(tiny_folder, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny_folder / "config.json", folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_folder / name, folder / name)
    marker = tmp_path / "pwned"
    with (folder / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": Payload(marker)}, handle)
    with pytest.raises(PruneError, match="could not load"):
        prune.load(folder)
    assert not marker.exists()


def test_remote_code_is_not_run_unless_asked(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _, _ = prune.load(folder)  # plain Llama class: the shipped code is ignored
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    prune.load(folder)
    # said once (it was silent: scores and evaluations of the built-in class, not the model the code defines)
    err = capsys.readouterr().err
    assert err.count("ships model code of its own (auto_map: AutoModelForCausalLM -> modeling_custom.CustomModel), "
                     "not run: transformers' built-in 'llama' classes load it (pass --trust-remote-code") == 1, err


def test_trust_remote_code_is_announced(tiny_folder, tmp_path, capsys):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")  # a checkpoint no other test announced in this process
    prune.load(folder, trust_remote_code=True)
    prune.load(folder, trust_remote_code=True)
    assert capsys.readouterr().err.count("trust_remote_code is ON") == 1  # once per checkpoint, not per load


def test_files_cannot_be_written_outside_the_output_folder(tiny_folder, tmp_path):
    model, tok, _ = prune.load(tiny_folder)
    with pytest.raises(PruneError, match="outside the output folder"):
        prune.save(model, tok, tmp_path / "out", files={"../escape.txt": "x"})
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def test_a_link_out_of_the_source_folder_is_not_copied_into_an_output(tiny_folder, tmp_path):
    """A downloaded model folder with ``LICENSE -> ~/.cache/huggingface/token`` had the token copied into the
    pruned folder as a plain file (push's guard against links then saw none), in-memory runs and prune remove."""
    from prune.export.lineage import license_files
    from prune.io.source import resolve_source

    secret = tmp_path / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text("hf_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
    source = Path(shutil.copytree(tiny_folder, tmp_path / "downloaded"))
    (source / "LICENSE").symlink_to(secret)
    (source / "notes.txt").symlink_to(secret)
    (source / "NOTICE").write_text("the model's own terms\n")
    inside = source / "sub"
    inside.mkdir()
    (inside / "terms.txt").write_text("kept\n")
    (source / "COPYING").symlink_to(inside / "terms.txt")  # a link inside the folder is the folder's own
    store = tmp_path / "repo" / ".git" / "annex" / "objects" / "ab"  # tokenizer files in git-annex's store
    store.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).rename(store / name)
        (source / name).symlink_to(store / name)
    assert license_files(resolve_source(source)) == {"COPYING": "kept\n", "NOTICE": "the model's own terms\n"}
    proc = prune_main("remove", source, "--blocks", "2", "-o", tmp_path / "out", "-q", check_rc=0)
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"NOTICE", "COPYING", "tokenizer.json", "tokenizer_config.json"} <= written
    assert not {"LICENSE", "notes.txt"} & written
    assert "LICENSE of" in proc.stderr and "links out of the model folder: not copied" in proc.stderr
    assert not any(b"hf_AAAA" in p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    # a file the checkpoint needs, linked out of the folder to anywhere but a store (a key under a tokenizer
    # name was copied and pushed): refused before anything is written
    (source / "tokenizer.model").symlink_to(secret)
    proc = prune_main("remove", source, "--blocks", "2", "-o", tmp_path / "out2", "-q", check_rc=2)
    assert "tokenizer.model links out of the model folder" in proc.stderr and not (tmp_path / "out2").exists()
