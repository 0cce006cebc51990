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
