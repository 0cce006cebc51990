"""One orchestrator: in-memory and sequential execution (and `prune heal`) write the same kind of folder."""

import json
import os
import threading
from http.server import HTTPServer

import pytest
import torch
from safetensors.torch import load_file

from prune.core.errors import PruneError
from prune.pipeline.orchestrator import run
from conftest import tiny_recipe
from test_hub import FAKE_TOKEN, _Refusing

NO_EVAL = {"evaluate": None}


def _run(folder, out, execution, **extra):
    recipe = tiny_recipe(folder, out, **NO_EVAL)
    recipe["score"] = {"execution": execution}
    recipe["output"].update(extra)
    return run(recipe, quiet=True)


def _tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_in_memory_and_sequential_runs_write_the_same_folder(tiny_folder, tmp_path):
    mem = _run(tiny_folder, tmp_path / "mem", "in_memory")
    seq = _run(tiny_folder, tmp_path / "seq", "sequential")
    assert mem.pruning.execution["mode"] == "in_memory" and seq.pruning.execution["mode"] == "sequential"
    files = {p.name for p in mem.out_dir.iterdir()}
    assert {"README.md", "recipe.yaml", "pruning.json", "eval.json", "eval.md", "config.json"} <= files
    assert files == {p.name for p in seq.out_dir.iterdir()}
    a = json.loads((mem.out_dir / "pruning.json").read_text())
    b = json.loads((seq.out_dir / "pruning.json").read_text())
    assert sorted(a) == sorted(b)
    assert a["removed"] == b["removed"] and a["kept_original"] == b["kept_original"]
    assert a["params_after"] == b["params_after"] and a["layers_after"] == b["layers_after"]
    assert b["step"] == 1 and b["original"]["n_layers"] == 8  # lineage, as in memory
    assert abs(a["msrs_after"]["total"] - b["msrs_after"]["total"]) < 1e-6
    ta, tb = _tensors(mem.out_dir), _tensors(seq.out_dir)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    card = (seq.out_dir / "README.md").read_text()
    assert "layer-pruned" in card and "| layers | count |" in (seq.out_dir / "eval.md").read_text()
    # the saved dtype is on both cards (out of core with output.dtype auto, the card was rendered before it was known)
    dtype_line = [line for line in (mem.out_dir / "README.md").read_text().splitlines() if "Saved dtype" in line]
    assert dtype_line == ["- **Saved dtype**: `float32`"] and dtype_line[0] in card and b["dtype"] == "float32"


def test_push_to_hub_is_attempted_after_a_sequential_run(tiny_folder, tmp_path, monkeypatch):
    """The push is not silently skipped: it reaches the (stand-in) Hub, which refuses the token."""
    handler = type("Handler", (_Refusing,), {"status": 401, "seen": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for key, value in {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                           "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": FAKE_TOKEN}.items():
            monkeypatch.setenv(key, value)
        import huggingface_hub.constants as C

        monkeypatch.setattr(C, "ENDPOINT", os.environ["HF_ENDPOINT"])
        monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
        with pytest.raises(PruneError, match="authentication failed"):
            _run(tiny_folder, tmp_path / "seq", "sequential", push_to_hub={"repo_id": "me/tiny-seq"})
    finally:
        server.shutdown()
    assert ("POST", "/api/repos/create", True) in handler.seen  # with the token
    assert (tmp_path / "seq" / "README.md").is_file()  # saved, complete, before the push


def test_overrides_apply_to_a_recipe_object_too(tiny_folder, tmp_path):
    """prune.run(Recipe, overrides=...) applies them, as for a file or a dict (they were ignored)."""
    from prune.pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_recipe(tiny_folder, tmp_path / "out", evaluate=None))
    result = run(recipe, overrides=["select.n_layers=3"], quiet=True)
    assert len(result.selection.removed) == 3 and recipe.select.n_layers == 2  # the caller's object is unchanged
