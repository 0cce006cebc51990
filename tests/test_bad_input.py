"""Bad input of every kind: one clear line naming the problem and the fix, before expensive work."""

import json
import re
import shutil

import pytest
import torch

import prune
from prune import PruneError
from prune.model.loading import check_checkpoint_files
from prune.io.source import resolve_source

from conftest import WIKI_RAW, build_model, smollm2_gguf, tiny_recipe


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_refused_before_loading(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PruneError, match="model.safetensors is truncated or corrupt"):
        prune.load(folder)
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(PruneError, match="model.safetensors is truncated or corrupt"):
        check_checkpoint_files(resolve_source(str(folder)))


def test_missing_shard_listed_in_index(tmp_path, tokenizers_by_bos):
    model = build_model("qwen3")
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(PruneError, match=f"weight shard {shard} listed in model.safetensors.index.json is missing"):
        prune.load(tmp_path / "m")


def test_truncated_gguf_is_refused(tmp_path):
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        pytest.skip("SmolLM2 GGUF not installed")
    with gguf_path.open("rb") as handle:
        (tmp_path / "half.gguf").write_bytes(handle.read(20_000_000))
    with pytest.raises(PruneError, match="half.gguf is truncated or corrupt"):
        prune.load(tmp_path / "half.gguf")


def test_a_gguf_header_declaring_more_than_the_file_holds_is_refused_before_parsing(tmp_path):
    """gguf's reader reads past the end as empty arrays: a 51-byte file declaring an array of 2**40 items ran it
    until memory ran out. Every count and length is checked against the file's bytes first."""
    import struct

    from prune.io.gguf import check_header

    key = struct.pack("<Q", 3) + b"abc"
    cases = {
        "array": (struct.pack("<IQQ", 3, 0, 1) + key + struct.pack("<IIQ", 9, 0, 2**40),
                  "its header declares 1099511627776 bytes at byte 51, past the end of the file (51 bytes)"),
        "strings": (struct.pack("<IQQ", 3, 0, 1) + key + struct.pack("<IIQ", 9, 8, 2**40),
                    "declares an array of 1099511627776 items at byte 51, more than the file holds"),
        "keys": (struct.pack("<IQQ", 3, 0, 2**63), "declares 9223372036854775808 keys and 0 tensors"),
        "type": (struct.pack("<IQQ", 3, 0, 1) + key + struct.pack("<I", 77) + bytes(8), "an unknown value type 77"),
        # a tensor's offset off the alignment: the reader read it from other bytes (garbage embeddings, no error)
        "offset": (struct.pack("<IQQ", 3, 1, 0) + key + struct.pack("<IQIQ", 1, 4, 0, 1),
                   "tensor 'abc' starts at offset 1, not a multiple of the alignment 32"),
        "alignment": (struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 3),
                      "general.alignment 3 is not a power of two"),
    }
    for name, (header, said) in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF" + header)
        with pytest.raises(PruneError, match=re.escape(said)):
            prune.load(tmp_path / f"{name}.gguf")
    gguf_path = smollm2_gguf()
    if gguf_path is not None:  # a real file passes, and its header cut short does not
        check_header(gguf_path)
        with gguf_path.open("rb") as handle:
            (tmp_path / "head.gguf").write_bytes(handle.read(100_000))
        with pytest.raises(PruneError, match="head.gguf: its header declares .* more than the file holds"):
            check_header(tmp_path / "head.gguf")


def test_a_block_count_the_weights_do_not_hold_is_refused_before_building(tiny_folder, tmp_path):
    """A GGUF whose llama.block_count says 10**6 (a 4-byte change) passed the header check and built the model until
    memory ran out; so did a folder's config.json through prune.load, and prune.prune_checkpoint failed with a raw
    RuntimeError. Both are one line before anything is built."""
    import numpy as np

    from prune.io.gguf import gguf_reader

    folder = copy_model(tiny_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    said = "config.num_hidden_layers=1000000 but the weights hold at most 8 blocks"
    for call in (lambda: prune.load(folder), lambda: prune.prune_checkpoint(folder, [1], tmp_path / "out")):
        with pytest.raises(PruneError, match=re.escape(said)):
            call()
    assert not (tmp_path / "out").exists()
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        pytest.skip("SmolLM2 GGUF not installed")
    reader = gguf_reader(gguf_path)
    field = reader.fields["llama.block_count"]
    value = field.parts[field.data[0]]
    at = value.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]
    data = bytearray(gguf_path.read_bytes())
    assert int(np.frombuffer(data, np.uint32, 1, at)[0]) == 30
    data[at:at + 4] = np.uint32(10**6).tobytes()
    (tmp_path / "edited.gguf").write_bytes(bytes(data))
    with pytest.raises(PruneError, match=r"edited.gguf: its metadata says 1000000 blocks \(block_count\) but it holds "
                                         r"tensors of 30 \(blk.0 .. blk.29\)"):
        prune.load(tmp_path / "edited.gguf")


def test_folder_without_weights(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(PruneError, match="has a config but no weights"):
        prune.load(folder)


def test_loading_reads_what_transformers_reads(tiny_folder, tmp_path):
    """A truncated PEFT adapter beside model.safetensors blocked the model ("adapter_model.safetensors is
    truncated"), though transformers never reads it; a tensor stored in two shards is refused by the
    out-of-core reader (it took the copy of the first shard the index listed, transformers the last by name)."""
    from safetensors.torch import load_file, save_file

    from prune.io.safetensors import Checkpoint

    folder = copy_model(tiny_folder, tmp_path / "m")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    model, _, _ = prune.load(folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    (folder / "adapter_model.safetensors").unlink()
    save_file(tensors, folder / "a.safetensors", metadata={"format": "pt"})
    save_file({"model.norm.weight": torch.full_like(tensors["model.norm.weight"], 7.0)}, folder / "b.safetensors",
              metadata={"format": "pt"})
    weight_map = {k: "a.safetensors" for k in tensors} | {"model.norm.weight": "b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(PruneError, match="tensor model.norm.weight is stored in both a.safetensors and b.safetensors"):
        Checkpoint(folder)  # which copy a reader takes is its own rule: refused, not guessed
    with pytest.raises(PruneError, match="names a GPU that is not present"):
        prune.load(folder, device_map=3)  # was AttributeError: 'int' object has no attribute 'items'


def test_dtype_auto_without_a_config_dtype_is_transformers_choice(tiny_folder, tmp_path):
    """No dtype in config.json: transformers takes the index's metadata.dtype, else the first floating
    tensor of the first shard by name; the sequential path took the first shard the index listed."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from prune.io.safetensors import Checkpoint

    folder = copy_model(tiny_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    first, rest = [k for k in tensors if "layers.0." in k], [k for k in tensors if "layers.0." not in k]
    save_file({k: tensors[k].to(torch.bfloat16) for k in first}, folder / "a.safetensors", metadata={"format": "pt"})
    save_file({k: tensors[k] for k in rest}, folder / "b.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "b.safetensors" for k in rest} | {k: "a.safetensors" for k in first}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype
    assert Checkpoint(folder).float_dtype() == loaded == torch.bfloat16  # a.safetensors, listed second
    index["metadata"]["dtype"] = "float16"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert Checkpoint(folder).float_dtype() == AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype


def test_a_revision_of_a_local_folder_is_refused_and_a_gguf_named_folder_is_a_folder(tiny_folder, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_model(tiny_folder, tmp_path / "org" / "name")  # a folder named like a Hub id shadows the repo
    with pytest.raises(PruneError, match="revision 'v2' is for a Hub repo, but org/name is a local folder here"):
        resolve_source("org/name", revision="v2")
    assert resolve_source("org/name").kind == "folder"
    copy_model(tiny_folder, tmp_path / "model.gguf")
    assert resolve_source("model.gguf").kind == "folder"  # it said "GGUF file not found: model.gguf"


def test_a_file_read_once_per_process_is_read_again_after_an_edit_that_keeps_its_size_and_mtime(tmp_path):
    import os

    from prune.io.gguf import kept_per_file

    path = tmp_path / "f.txt"
    path.write_text("first")
    stamp = path.stat()
    assert kept_per_file("test", path, path.read_text) == "first"
    path.write_text("again")  # same size, and the mtime restored as cp -p or rsync -t do
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert kept_per_file("test", path, path.read_text) == "again"


def test_tokenizer_without_pad_unk_eos_is_refused_before_lm_eval(tiny_folder, tmp_path):
    from prune.measure.lmeval import check_tokenizer

    folder = copy_model(tiny_folder, tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("pad_token", "unk_token", "eos_token"):
        cfg.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok, _ = prune.load(folder)
    with pytest.raises(PruneError, match="no pad, unk or eos token"):
        check_tokenizer(tok)


def test_lm_eval_does_not_change_the_tokenizer_that_is_saved(tiny_folder, tmp_path):
    from conftest import DATA

    folder = copy_model(tiny_folder, tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe = tiny_recipe(folder, tmp_path / "out")
    recipe["evaluate"].update({"tasks": ["copa"], "data_dir": str(DATA), "limit": 4})
    result = prune.run(recipe, quiet=True)
    saved = json.loads((result.out_dir / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the model fails the test: every check under test must come before it."""
    import prune.pipeline.engines as E

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(E, "load_model", no_loading)


def test_calibration_problems_fail_before_the_model_loads(tiny_folder, tmp_path, no_model_loading):
    import prune.pipeline.orchestrator as P

    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["calibration"]["path"] = str(short)
    with pytest.raises(PruneError, match="calibration text too short"):
        P.run(recipe, quiet=True)
    short.write_text("\n\n")
    with pytest.raises(PruneError, match="text is empty"):
        P.run(recipe, quiet=True)
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["model"]["device_map"] = {"": "cuda:3"} if not torch.cuda.is_available() else {"": "cuda:99"}
    with pytest.raises(PruneError, match="not present on this machine"):
        P.run(recipe, quiet=True)
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["calibration"]["bos"] = True
    folder = copy_model(tiny_folder, tmp_path / "nobos")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("bos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe["model"]["source"] = str(folder)
    with pytest.raises(PruneError, match="no BOS token"):
        P.run(recipe, quiet=True)


@pytest.mark.parametrize("case, match", [
    ("python_recipe_heals_on_evaluation_text", "overlaps the perplexity text"),
    ("metric_not_scored", "select.metric cka reads the cka scores, but score.metrics is ['bi']"),
    ("contiguous_without_angular", "select.strategy contiguous reads the angular scores"),
    ("verified_without_its_candidate_scores", "select.strategy verified builds its candidates from the angular and cka"),
    ("search_removes_more_than_there_are", "cannot remove 20 of 8 blocks"),
    ("search_proxy_task_without_its_data", "has no tasks/ subfolder"),
    ("fidelity_text_too_short", "evaluation text too short"),
    ("fidelity_windows_beyond_the_context", "evaluate.fidelity.seq_len"),
    ("heal_text_too_short", "heal text too short"),
])
def test_settings_that_fail_late_fail_before_loading(case, match, tiny_folder, tmp_path, no_model_loading):
    """Each of these used to pass the pre-flight and fail after loading and scoring (or, for a recipe
    built in Python, to heal on the evaluation text): now one line, before the model loads."""
    import prune.pipeline.orchestrator as P
    from prune.pipeline.recipe import Recipe

    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    heal = {"method": "lora", "data": {"path": str(WIKI_RAW), "rows": "600:900"}, "n_samples": 4, "val_samples": 2,
            "seq_len": 32, "steps": 1, "batch_size": 2}
    if case == "python_recipe_heals_on_evaluation_text":
        recipe["heal"] = {**heal, "data": {"path": str(WIKI_RAW), "rows": "300:600"}}
        recipe = Recipe.model_validate(recipe)  # not through load_recipe
    elif case == "metric_not_scored":
        recipe.update(score={"metrics": ["bi"]}, select={"strategy": "one_shot", "metric": "cka", "n_layers": 2})
    elif case == "contiguous_without_angular":
        recipe.update(score={"metrics": ["bi", "cka"]}, select={"strategy": "contiguous", "n_layers": 2})
    elif case == "verified_without_its_candidate_scores":
        recipe.update(score={"metrics": ["bi", "angular"]}, select={"strategy": "verified", "n_layers": 2})
    elif case == "search_removes_more_than_there_are":
        recipe["select"] = {"strategy": "search", "n_layers": 20, "metric": "bi", "max_perplexity_ratio": 2.0, "budget": 4}
    elif case == "search_proxy_task_without_its_data":  # the proxy task's data is checked now (fast: no registry)
        (tmp_path / "empty").mkdir()
        recipe["evaluate"]["data_dir"] = str(tmp_path / "empty")
        recipe["select"] = {"strategy": "search", "metric": "bi", "min_task_retained": 0.9, "proxy_task": "copa",
                            "budget": 4}
    elif case == "fidelity_text_too_short":
        recipe["evaluate"]["fidelity"] = {"path": str(short)}
    elif case == "fidelity_windows_beyond_the_context":
        recipe["evaluate"]["fidelity"] = {"seq_len": 600}
    elif case == "heal_text_too_short":
        recipe["heal"] = {**heal, "data": {"path": str(short)}}
    with pytest.raises(PruneError, match=re.escape(match)):
        P.run(recipe, quiet=True)


def test_default_strategy_needs_held_out_text_and_says_so_before_loading(tiny_folder, tmp_path, no_model_loading):
    """The default strategy (verified) ranks candidates on windows beyond the calibration ones: text
    enough for the calibration windows but not for those is refused in one line, before the model loads."""
    import prune.pipeline.orchestrator as P
    from prune.choose.strategies import heldout_windows
    from prune.core.config import HELDOUT_WINDOWS, SelectConfig
    from prune.model.loading import load_tokenizer

    assert SelectConfig(n_layers=2).strategy == "verified" and SelectConfig(n_layers=2).held_out() == 4

    recipe = tiny_recipe(tiny_folder, tmp_path / "out", select={"n_layers": 2})
    text = prune.load_text(prune.TextSource(str(WIKI_RAW), rows="0:300"))
    tok = load_tokenizer(resolve_source(str(tiny_folder)))
    lo, hi = 1, 4096  # the most windows the text holds: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _windows_fit(heldout_windows, tok, text, mid) else (lo, mid)
    recipe["calibration"]["n_samples"] = lo - 1  # the calibration windows fit, 4 more do not
    with pytest.raises(PruneError, match=f"too short for {HELDOUT_WINDOWS['verified']} held-out windows") as err:
        P.run(recipe, quiet=True)
    assert "\n" not in str(err.value) and "select.heldout_windows" in str(err.value)


def _windows_fit(heldout_windows, tok, text, n) -> bool:
    try:
        heldout_windows(tok, text, n - 1, 32, 0, None, 1)  # n windows in all (none held out is refused)
        return True
    except PruneError:
        return False


def test_python_api_arguments_of_the_wrong_type_are_one_line(tokenizers_by_bos, calib_text, tmp_path):
    """Arguments of the wrong type to the Python API raised Python's own errors from inside prune (a tokenizer of
    None: AttributeError in the BOS check; n_samples=2.5: TypeError from torch; device="bogus": torch's list of
    every device type; sleb start=[3]: TypeError; callback=5: TypeError after the first step; save(None, ...):
    AttributeError; load_text(None): AttributeError): each is one PruneError naming the argument, before any work."""
    tok = tokenizers_by_bos[True]
    model = build_model("llama")
    windows = prune.calibration_windows(tok, calib_text, n_samples=4, seq_len=16)
    for call, said in (
            (lambda: prune.calibration_windows(None, calib_text, n_samples=4, seq_len=16),
             "the tokenizer is a NoneType, not a tokenizer: give the loaded tokenizer"),
            (lambda: prune.eval_windows(model, calib_text, seq_len=16), "the tokenizer is a LlamaForCausalLM"),
            (lambda: prune.calibration_windows(tok, calib_text, n_samples=2.5, seq_len=16),
             "n_samples=2.5 must be a whole number"),
            (lambda: prune.calibration_windows(tok, calib_text, n_samples=2, seq_len=16, seed="a"),
             "seed='a' must be a whole number"),
            (lambda: prune.eval_windows(tok, calib_text, seq_len="16"), "seq_len='16' must be a whole number"),
            (lambda: prune.score(model, windows, device="bogus", progress=False),
             "device 'bogus' is not a device torch knows: give cpu, cuda, cuda:1 or mps"),
            (lambda: prune.sleb(model, windows, 2, start=[3], progress=False),
             "sleb: start=[3] must be the trace of an earlier run to resume"),
            (lambda: prune.iterative(model, windows, 2, on_round=5, progress=False),
             "iterative: on_round=5 must be a function"),
            (lambda: prune.heal_model(model, None, "lora", windows=windows, steps=1, batch_size=2, callback=5, quiet=True),
             "heal_model: callback=5 must be a function of (step, tokens_seen)"),
            (lambda: prune.heal_model(tok, None, "lora", windows=windows, steps=1), "heal_model: the model is a"),
            (lambda: prune.save(None, tok, tmp_path / "out"), "the model to save is a NoneType, not a model"),
            (lambda: prune.load_text(None), "load_text takes a path, a dataset name or a prune.TextSource, got NoneType")):
        with pytest.raises(PruneError, match=re.escape(said)):
            call()
    assert not (tmp_path / "out").exists()
