"""`prune eval` / `prune compare` through the real entry point: fidelity, lm-eval formats, task problems."""

from __future__ import annotations

import json

import pytest

from conftest import DATA, WIKI_RAW
from test_cli import prune_cli


@pytest.fixture(scope="module")
def pruned_folder(tiny_folder, tmp_path_factory):
    from prune.export.outofcore import prune_checkpoint

    out = tmp_path_factory.mktemp("pruned") / "tiny-pruned"
    return prune_checkpoint(str(tiny_folder), [3, 4], out, pruning={"removed": [3, 4]})


def test_eval_fidelity_to_the_original(tmp_path, tiny_folder, pruned_folder):
    proc = prune_cli("eval", pruned_folder, "--fidelity-to", tiny_folder, "--fidelity-top-k", 256,
                     "--perplexity-data", WIKI_RAW, "--perplexity-rows", "0:200", "--seq-len", 32, "--max-windows", 3,
                     "-o", tmp_path / "e.json", "--quiet", check_rc=0)
    result = json.loads((tmp_path / "e.json").read_text())
    fid = result["fidelity"]
    assert fid["kl_exact"] and fid["windows"] == 3 and fid["original"] == str(tiny_folder)
    assert fid["perplexity_pruned"] == pytest.approx(result["perplexity"]["perplexity"], rel=1e-4)
    assert 0 < fid["kl_mean"] and 0 < fid["top1_agreement"] <= 1
    assert "kl_mean" in proc.stdout and "top1_agreement" in proc.stdout


def test_eval_fidelity_needs_text(tiny_folder, pruned_folder):
    proc = prune_cli("eval", pruned_folder, "--fidelity-to", tiny_folder, check_rc=2)
    assert proc.stderr.strip().splitlines() == ["error: --fidelity-to measures on the perplexity text: give --perplexity-data too"]


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
    from lm_eval.utils import get_latest_filename, get_results_filenames, get_sample_results_filenames, sanitize_model_name

    proc = prune_cli("eval", chat_folder, "--tasks", "copa", "--limit", 6, "--data-dir", DATA, "--batch-size", "auto",
                     "--apply-chat-template", "--num-fewshot", 1, "--output-path", tmp_path / "results",
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
    assert "lm_eval_files" not in mine


def test_eval_bad_batch_size_is_one_line(tiny_folder):
    proc = prune_cli("eval", tiny_folder, "--tasks", "copa", "--batch-size", "big", check_rc=2)
    assert proc.stderr.count("\n") == 1 and "batch_size is a number, auto or auto:N" in proc.stderr
