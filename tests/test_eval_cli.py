"""`prune eval` / `prune compare` through the real entry point: fidelity, lm-eval formats, task problems."""

from __future__ import annotations

import json
import re

import pytest
from conftest import DATA, WIKI_RAW, prune_cli, prune_main

from prune.core.errors import PruneError


@pytest.fixture(scope="module")
def pruned_folder(tiny_folder, tmp_path_factory):
    from prune.export.outofcore import prune_checkpoint

    out = tmp_path_factory.mktemp("pruned") / "tiny-pruned"
    return prune_checkpoint(str(tiny_folder), [3, 4], out, pruning={"removed": [3, 4]})


def test_eval_fidelity_to_the_original(tmp_path, tiny_folder, pruned_folder):
    proc = prune_main("eval", pruned_folder, "--fidelity-to", tiny_folder, "--fidelity-top-k", 256,
                     "--perplexity-data", WIKI_RAW, "--perplexity-rows", "0:200", "--seq-len", 32, "--max-windows", 3,
                     "-o", tmp_path / "e.json", check_rc=0)
    assert re.search(r"^done in [\d.]+ s: pre-flight [\d.]+ s, fidelity reference \(original\) [\d.]+ s, "
                     r"load and evaluate [\d.]+ s, write [\d.]+ s$", proc.stderr, re.M)
    result = json.loads((tmp_path / "e.json").read_text())
    fid = result["fidelity"]
    assert fid["kl_exact"] and fid["windows"] == 3 and fid["original"] == str(tiny_folder)
    assert fid["perplexity_pruned"] == pytest.approx(result["perplexity"]["perplexity"], rel=1e-4)
    assert 0 < fid["kl_mean"] and 0 < fid["top1_agreement"] <= 1
    assert "kl_mean" in proc.stdout and "top1_agreement" in proc.stdout
    # every row's value ends under the header's "value" (the fidelity rows sat in other columns)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("task ", "perplexity ", "fidelity "))]
    end = lines[0].index("value") + len("value")
    assert len(lines) == 8 and all(line[:end].rstrip() == line[:end] and line[end:end + 1] in ("", " ") for line in lines), lines


def test_eval_perplexity_of_several_fields_joined(tmp_path, tiny_folder):
    """--perplexity-field takes several fields, joined, as --field and a recipe's field do (it took the comma-separated
    list as one field name, and refused a file holding both)."""
    c4 = DATA / "c4" / "c4_web_1480.jsonl"
    prune_main("eval", tiny_folder, "--perplexity-data", c4, "--perplexity-field", "prefix,gold_completion",
               "--perplexity-rows", "0:20", "--seq-len", 32, "--max-windows", 2, "--dtype", "bfloat16", "-o",
               tmp_path / "e.json", check_rc=0)
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["perplexity"]["data"]["field"] == ["prefix", "gold_completion"]
    assert (result["settings"]["dtype"], result["dtype"]) == ("bfloat16", "bfloat16")  # the dtype it ran in, recorded
    # a run's evaluate.perplexity.bos / split / config have flags too (a run with bos false could not be reproduced)
    ppl = {}
    for bos in ("--perplexity-bos", "--no-perplexity-bos"):
        prune_main("eval", tiny_folder, "--perplexity-data", WIKI_RAW, "--perplexity-rows", "0:200", "--seq-len", 32,
                   "--max-windows", 2, bos, "-o", tmp_path / f"{bos}.json", check_rc=0)
        ppl[bos] = json.loads((tmp_path / f"{bos}.json").read_text())["perplexity"]["perplexity"]
    assert ppl["--perplexity-bos"] != ppl["--no-perplexity-bos"]
    # the table first, where the time went last (as run ends), in one terminal: stdout and stderr interleaved
    import contextlib
    import io

    from prune.cli import main

    both = io.StringIO()
    with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
        assert main(["eval", str(tiny_folder), "--perplexity-data", str(WIKI_RAW), "--perplexity-rows", "0:200",
                     "--seq-len", "32", "--max-windows", "2"]) == 0
    lines = both.getvalue().splitlines()
    assert lines[-1].startswith("done in ") and any(line.startswith("perplexity ") for line in lines[:-1])
    proc = prune_main("eval", tiny_folder, "--perplexity-data", WIKI_RAW, "--perplexity-split", "test", check_rc=2)
    assert "--perplexity-split / --perplexity-config select part of a datasets dataset" in proc.stderr
    proc = prune_main("eval", tiny_folder, "--tasks", "copa", "--no-perplexity-bos", check_rc=2)
    assert "--no-perplexity-bos has no effect without --perplexity-data" in proc.stderr


def test_eval_fidelity_to_an_original_without_a_tokenizer_fails_before_loading(tmp_path, tiny_folder, pruned_folder):
    """The original's tokenizer cuts the fidelity windows: a folder without one is refused in the pre-flight (after
    the original's weights had loaded)."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_folder / name, bare / name)
    proc = prune_main("eval", pruned_folder, "--fidelity-to", bare, "--perplexity-data", WIKI_RAW,
                      "--perplexity-rows", "0:200", "--seq-len", 32, "--max-windows", 3)
    assert proc.returncode == 2 and "pre-flight" not in proc.stderr and "Loading weights" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "tokenizer" in proc.stderr


def test_eval_fidelity_needs_text(tiny_folder, pruned_folder):
    proc = prune_main("eval", pruned_folder, "--fidelity-to", tiny_folder, check_rc=2)
    assert proc.stderr.strip().splitlines() == ["error: --fidelity-to measures on the perplexity text: give --perplexity-data too"]


@pytest.mark.parametrize("flags, named", [
    (["--perplexity-data", WIKI_RAW, "--limit", "20"], "--limit has no effect without --tasks"),
    (["--perplexity-data", WIKI_RAW, "--num-fewshot", "2", "--apply-chat-template"],
     "--num-fewshot, --apply-chat-template have no effect without --tasks"),
    (["--tasks", "copa", "--seq-len", "64"], "--seq-len has no effect without --perplexity-data"),
    (["--perplexity-data", WIKI_RAW, "--fidelity-top-k", "8"], "--fidelity-top-k has no effect without --fidelity-to"),
])
def test_eval_refuses_flags_it_would_ignore(tiny_folder, flags, named):
    """A flag that only counts with another one (lm-eval settings without tasks, ...) is refused, not dropped."""
    proc = prune_main("eval", tiny_folder, *flags, check_rc=2)
    assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def chat_folder(tiny_folder, tmp_path_factory):
    """The tiny model with a chat template on its tokenizer (a plain copy of the folder)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_folder, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(folder)
    return folder


def test_eval_writes_lm_eval_files_with_lm_eval_flags(tmp_path, chat_folder):
    from lm_eval.utils import (
        get_latest_filename,
        get_results_filenames,
        get_sample_results_filenames,
        sanitize_model_name,
    )

    proc = prune_main("eval", chat_folder, "--tasks", "copa", "--limit", 6, "--data-dir", DATA, "--batch-size", "auto",
                     "--apply-chat-template", "--num-fewshot", 1, "--fewshot-from-scored-split", "--output-path", tmp_path / "results",
                     "-o", tmp_path / "e.json", "--quiet", check_rc=0)
    mine = json.loads((tmp_path / "e.json").read_text())
    folder = tmp_path / "results" / sanitize_model_name(str(chat_folder))
    files = [str(p) for p in folder.iterdir()]
    results = json.loads(open(get_latest_filename(get_results_filenames(files))).read())
    assert results["results"]["copa_local"]["acc,none"] == pytest.approx(mine["tasks"]["copa_local"]["metrics"]["acc"])
    assert results["chat_template"] and results["fewshot_as_multiturn"] is True
    assert results["config"]["batch_size"] == "auto" and results["n-shot"]["copa_local"] == 1
    [samples] = get_sample_results_filenames(files)
    first = json.loads(open(samples).readline())
    assert "<|user|>" in first["arguments"]["gen_args_0"]["arg_0"]  # the chat template formatted the prompt
    assert "|copa_local|" in proc.stdout.replace(" ", "")  # lm-eval's make_table
    assert "lm_eval_files" not in mine and mine["tasks"]["copa_local"]["fewshot_from_scored_split"] is True
    assert "copa_local*" in proc.stdout and "* few-shot examples drawn from the split being scored" in proc.stdout


def test_eval_bad_batch_size_is_one_line(tiny_folder):
    proc = prune_main("eval", tiny_folder, "--tasks", "copa", "--batch-size", "big", check_rc=2)
    assert proc.stderr.count("\n") == 1 and "batch_size is a number, auto or auto:N" in proc.stderr


def test_evaluate_model_refuses_an_output_path_without_tasks(tiny_folder, tmp_path):
    """From Python, output_path without tasks was dropped silently (the CLI refused --output-path)."""
    from prune.core.config import EvaluateConfig, PerplexityConfig
    from prune.core.errors import PruneError
    from prune.pipeline.commands import evaluate_model

    cfg = EvaluateConfig(perplexity=PerplexityConfig(path=str(WIKI_RAW), rows="0:50", seq_len=16, max_windows=1))
    with pytest.raises(PruneError, match="output_path is where lm-eval writes its files, and cfg has no tasks"):
        evaluate_model(tiny_folder, cfg, output_path=str(tmp_path / "lm"))
    with pytest.raises(PruneError, match="cfg must be a prune.EvaluateConfig, got a dict"):
        evaluate_model(tiny_folder, {"perplexity": None})
    assert not (tmp_path / "lm").exists()


def test_a_token_in_model_args_is_refused_before_it_is_printed_or_saved(tiny_folder, tmp_path):
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"
    proc = prune_main("eval", tiny_folder, "--tasks", "copa", "--model-args", f"token={token}", "-o", tmp_path / "e.json",
                      check_rc=2)
    assert "model_args holds what looks like a Hugging Face token" in proc.stderr and token not in proc.stderr + proc.stdout
    assert not (tmp_path / "e.json").exists()


def test_backend_model_args_plumbing():
    from prune.core.errors import PruneError
    from prune.measure.lmeval import backend_model_args

    assert backend_model_args("/m", None) == "pretrained=/m,use_kernels=False"
    assert backend_model_args("/m", "tensor_parallel_size=2,gpu_memory_utilization=0.8", backend="vllm",
                              dtype="bfloat16") == \
        "pretrained=/m,tensor_parallel_size=2,gpu_memory_utilization=0.8,dtype=bfloat16"
    assert backend_model_args("/m", "dtype=float16,use_kernels=True", dtype="bfloat16", trust_remote_code=True) == \
        "pretrained=/m,dtype=float16,use_kernels=True,trust_remote_code=True"  # the user's model_args win
    assert backend_model_args("/d", None, gguf_file="m.gguf") == "pretrained=/d,gguf_file=m.gguf,use_kernels=False"
    with pytest.raises(PruneError, match="must not set pretrained"):
        backend_model_args("/m", "pretrained=/other")
    # lm-eval reads getattr(torch, dtype): the toolkit's short and upper-case names go as torch's own
    assert backend_model_args("/m", None, dtype="BF16") == "pretrained=/m,dtype=bfloat16,use_kernels=False"
    assert backend_model_args("/m", None, dtype="Auto") == "pretrained=/m,use_kernels=False"


def test_vllm_not_installed_is_one_line_before_loading(tiny_folder):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: scripts/device_check_eval.sh runs it")
    proc = prune_main("eval", tiny_folder, "--tasks", "copa", "--model", "vllm", "--data-dir", DATA, check_rc=2)
    assert proc.stderr.strip().splitlines() == [
        "error: --model vllm needs vLLM, which is not installed (pip install vllm, on a machine with a GPU); or use --model hf"]


def test_hf_backend_loads_the_saved_folder_itself(tmp_path, tiny_folder):
    from lm_eval.utils import get_results_filenames

    prune_main("eval", tiny_folder, "--tasks", "copa", "--limit", 4, "--data-dir", DATA, "--model", "hf",
              "--model-args", "max_length=256", "--dtype", "float32", "--output-path", tmp_path, "-o",
              tmp_path / "e.json", "--quiet", check_rc=0)
    result = json.loads((tmp_path / "e.json").read_text())
    [path] = get_results_filenames([str(p) for p in tmp_path.rglob("*.json")])
    lm = json.loads(open(path).read())
    assert lm["config"]["model"] == "hf"
    assert lm["config"]["model_args"] == f"pretrained={tiny_folder},max_length=256,dtype=float32,use_kernels=False"
    assert lm["results"]["copa_local"]["acc,none"] == pytest.approx(result["tasks"]["copa_local"]["metrics"]["acc"])
    # lm-eval loaded the model itself: its parameters counted on the meta device, as a loaded model's are (None before)
    from prune.model.loading import load_model

    assert result["parameters"] == sum(p.numel() for p in load_model(tiny_folder)[0].parameters())  # tied ones once
    assert result["layers"] == 8 and result["settings"]["model"] == "hf"
    # a key the model's class does not take: one line (it was a TypeError traceback)
    bad = prune_main("eval", tiny_folder, "--tasks", "copa", "--limit", 2, "--data-dir", DATA, "--model", "hf",
                     "--model-args", "no_such_setting=1", "--quiet", check_rc=2)
    assert bad.stderr.count("\n") == 1 and "lm-eval's hf backend refused it" in bad.stderr, bad.stderr


def test_run_refuses_another_backend(tiny_folder, tmp_path):
    from conftest import tiny_recipe

    import prune

    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["evaluate"].update(tasks=["copa"], data_dir=str(DATA), model="vllm")
    with pytest.raises(PruneError, match="a run evaluates the model in memory"):
        prune.run(recipe, quiet=True)


def test_quiet_means_quiet_and_results_go_to_stdout(tmp_path, tiny_folder):
    """--quiet: nothing on stderr at all (no bar of ours, lm-eval's, datasets' or transformers'), the table on stdout."""
    proc = prune_cli("eval", tiny_folder, "--tasks", "copa", "--limit", 4, "--data-dir", DATA, "--quiet",
                     "--perplexity-data", WIKI_RAW, "--perplexity-rows", "0:200", "--seq-len", 32, "--max-windows", 2,
                     check_rc=0)
    assert proc.stderr == "", proc.stderr
    assert "copa_local" in proc.stdout and "perplexity" in proc.stdout
    loud = prune_cli("--log-level", "info", "eval", tiny_folder, "--tasks", "copa", "--limit", 4, "--data-dir", DATA,
                     check_rc=0)
    assert "runs the local copy copa_local" in loud.stderr and "Running loglikelihood requests" in loud.stderr
    assert "INFO" in loud.stderr and "runs the local copy" not in loud.stdout
