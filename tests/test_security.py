"""Untrusted checkpoints: pickles are never executed, remote code never runs unless asked."""

import json
import pickle
import shutil

import pytest

import prune
from prune import PruneError


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


def test_remote_code_is_not_run_unless_asked(tiny_folder, tmp_path):
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


def test_trust_remote_code_is_announced(tiny_folder, capsys):
    prune.load(tiny_folder, trust_remote_code=True)
    assert "trust_remote_code is ON" in capsys.readouterr().err


def test_files_cannot_be_written_outside_the_output_folder(tiny_folder, tmp_path):
    model, tok, _ = prune.load(tiny_folder)
    with pytest.raises(PruneError, match="outside the output folder"):
        prune.save(model, tok, tmp_path / "out", files={"../escape.txt": "x"})
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()
