"""Fidelity to the original (prune.measure.fidelity) against a direct computation on fixture models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, WIKI_RAW, build_model, prune_main, tiny_recipe, wiki_text

from prune.core.config import EvaluateConfig
from prune.core.errors import PruneError
from prune.io.text import eval_windows
from prune.measure.fidelity import (
    FidelityReference,
    build_reference,
    measure_fidelity,
    token_kl,
)
from prune.model.surgery import remove_layers


@pytest.fixture
def pair(tokenizers_by_bos):
    """(original, pruned copy without blocks 2 and 5, windows [5, 24])."""
    tok = tokenizers_by_bos[True]
    original = build_model("llama")
    pruned = build_model("llama")
    remove_layers(pruned, [2, 5])
    windows = eval_windows(tok, wiki_text(20_000), 24, max_windows=5)
    return original, pruned, windows


def direct(original, pruned, windows):
    """Every token's KL, agreement and NLLs from the full distributions of both models at once."""
    with torch.no_grad():
        logp = F.log_softmax(original(windows).logits[:, :-1].double(), -1)
        logq = F.log_softmax(pruned(windows).logits[:, :-1].double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).flatten().numpy()
    agree = (logp.argmax(-1) == logq.argmax(-1)).flatten().numpy()
    target = windows[:, 1:, None]
    nll_p = -logp.gather(-1, target).mean().item()
    nll_q = -logq.gather(-1, target).mean().item()
    return kl, agree, nll_p, nll_q


def test_perplexity_equals_direct_computation(pair):
    """``perplexity`` sums each window's float32 cross-entropy (uneven batches of 2): the same NLL as
    one float64 log-softmax over every window at once."""
    from prune.measure.perplexity import perplexity

    _, pruned, windows = pair
    got = perplexity(pruned, windows, batch_size=2)
    _, _, _, nll_q = direct(pruned, pruned, windows)
    assert got["tokens"] == 5 * 23 and got["windows"] == 5
    assert got["nll"] == pytest.approx(nll_q, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll_q), rel=1e-6)


def test_full_vocabulary_equals_direct_computation(pair):
    original, pruned, windows = pair
    ref = build_reference(original, windows, top_k=VOCAB, batch_size=2)
    got = measure_fidelity(pruned, ref, batch_size=3)
    kl, agree, nll_p, nll_q = direct(original, pruned, windows)
    assert got["kl_exact"] and got["tokens"] == kl.size == 5 * 23
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert got["kl_median"] == pytest.approx(np.median(kl), rel=1e-4)
    assert got["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-4)
    assert got["kl_max"] == pytest.approx(kl.max(), rel=1e-4)
    per_window = kl.reshape(5, 23).mean(1)  # the standard error over windows, whose tokens move together
    assert got["kl_mean_stderr"] == pytest.approx(per_window.std(ddof=1) / math.sqrt(5), rel=1e-3)
    assert got["top1_agreement"] == pytest.approx(agree.mean())
    assert got["perplexity_ratio"] == pytest.approx(math.exp(nll_q - nll_p), rel=1e-5)
    assert got["perplexity_original"] == pytest.approx(math.exp(nll_p), rel=1e-5)
    assert got["kl_mean"] > 0.01 and got["top1_agreement"] < 1  # removing two blocks changes the model


def test_per_window_values_equal_direct_computation(pair):
    """``per_window``: each window's mean KL and NLL difference, as the full distributions give them;
    ``fidelity_window_sums`` holds the same per-window sums, and adds up to the summary."""
    from prune.measure.fidelity import fidelity_window_sums, summary_from_sums

    original, pruned, windows = pair
    ref = build_reference(original, windows, top_k=VOCAB, batch_size=2)
    got = measure_fidelity(pruned, ref, batch_size=3, per_window=True)
    for w in range(windows.shape[0]):
        kl, _, nll_p, nll_q = direct(original, pruned, windows[w:w + 1])
        assert got["kl_windows"][w] == pytest.approx(kl.mean(), rel=1e-4)
        assert got["nll_diff_windows"][w] == pytest.approx(nll_q - nll_p, rel=1e-4, abs=1e-9)
    assert np.mean(got["kl_windows"]) == pytest.approx(got["kl_mean"], rel=1e-12)
    assert math.exp(np.mean(got["nll_diff_windows"])) == pytest.approx(got["perplexity_ratio"], rel=1e-12)
    rows = fidelity_window_sums(pruned, ref, batch_size=2)
    assert rows.shape == (5, 5) and rows.dtype == torch.float64
    assert (rows[:, 0] / rows[:, 4]).tolist() == pytest.approx(got["kl_windows"], rel=1e-12)
    summary = summary_from_sums(rows.sum(0))
    assert summary["kl_mean"] == pytest.approx(got["kl_mean"], rel=1e-12) and summary["tokens"] == 5 * 23
    assert summary["perplexity_ratio"] == pytest.approx(got["perplexity_ratio"], rel=1e-12)
    assert summary["top1_agreement"] == got["top1_agreement"]
    assert "kl_windows" not in measure_fidelity(pruned, ref, batch_size=3)  # only when asked
    one = measure_fidelity(pruned, build_reference(original, windows[:1], top_k=VOCAB), per_window=True)
    assert one["kl_mean_stderr"] is None and one["kl_windows"] == [pytest.approx(one["kl_mean"])]  # no spread of one window


def test_top_k_is_a_lower_bound_and_the_rest_is_exact(pair):
    original, pruned, windows = pair
    exact = measure_fidelity(pruned, build_reference(original, windows, top_k=VOCAB))
    kl, *_ = direct(original, pruned, windows)
    ref = build_reference(original, windows, top_k=16)
    assert ref.top_logprobs.shape == (5, 23, 16)
    got = measure_fidelity(pruned, ref)
    assert not got["kl_exact"] and got["top_k"] == 16
    assert 0 < got["kl_mean"] <= exact["kl_mean"] + 1e-6
    with torch.no_grad():  # the bound holds token by token (merging outcomes never raises a KL)
        logq = F.log_softmax(pruned(windows).logits[:, :-1].float(), -1)
    bounded = token_kl(ref.top_logprobs, ref.top_ids, logq).flatten().numpy()
    assert (bounded <= kl + 1e-6).all() and (bounded > 0).all()
    for key in ("top1_agreement", "perplexity_ratio", "perplexity_pruned"):
        assert got[key] == pytest.approx(exact[key], rel=1e-6)


def test_the_rest_bucket_is_exact_when_the_model_puts_almost_nothing_there():
    """A pruned model sure of one token leaves under 1e-7 of its mass outside the original's top k:
    ``1 - sum_topk q`` from float32 log-probs rounds to 0 (or below), which made the bucket's term
    ``p_rest * (log p_rest + 700)`` and the "lower bound" 40 times the full KL. The bucket is the
    exact mass of the other tokens, so the value is the merged KL and stays below the full one."""
    vocab, k = 1000, 16
    zp, zq = torch.zeros(2, vocab), torch.zeros(2, vocab)
    zp[:, 0], zq[0, 0], zq[1, 3] = 12.0, 30.0, 25.0  # the second token: sure of a token outside p's top k
    top, ids = F.log_softmax(zp, -1).topk(k)
    got = token_kl(top, ids.to(torch.int32), F.log_softmax(zq, -1))
    lp, lq = F.log_softmax(zp.double(), -1), F.log_softmax(zq.double(), -1)
    full = (lp.exp() * (lp - lq)).sum(-1)
    rest = torch.ones_like(lp, dtype=torch.bool).scatter(-1, ids, False)
    p_rest, q_rest = (lp.exp() * rest).sum(-1), (lq.exp() * rest).sum(-1)
    merged = (lp.exp() * (lp - lq) * ~rest).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    # to the float32 precision of the log-probs (p's normalisation rounds by ~7e-6 here, 1e-3 of its rest)
    assert torch.allclose(got, merged, rtol=2e-3) and (got <= full * (1 + 2e-3)).all()


def test_tokens_both_models_rule_out_add_nothing_to_the_kl():
    """An exact top-k (the whole vocabulary) of a model that masks logits to -inf: 0 * (-inf - -inf) made the KL
    NaN; a token p rules out adds 0, one q alone rules out makes it infinite, as KL(p || q) is."""
    inf = float("inf")
    logits = torch.tensor([[0.0, -1.0, -inf, -inf]])
    top, ids = F.log_softmax(logits, -1).topk(4)
    assert token_kl(top, ids, F.log_softmax(logits, -1)).item() == 0.0
    other = F.log_softmax(torch.tensor([[-1.0, 0.0, -inf, -inf]]), -1)
    lp = F.log_softmax(logits.double(), -1)[:, :2]
    assert token_kl(top, ids, other).item() == pytest.approx((lp.exp() * (lp - other[:, :2].double())).sum().item())
    assert token_kl(top, ids, F.log_softmax(torch.tensor([[0.0, -inf, 0.0, 0.0]]), -1)).item() == inf
    # an overflow (NaN) on either side stays NaN: verified tells such a candidate apart by it
    nan = torch.full((1, 4), float("nan"))
    assert token_kl(top, ids, nan).isnan().all() and token_kl(nan, ids, other).isnan().all()


def test_same_model_is_perfectly_faithful_and_reference_round_trips(pair, tmp_path):
    original, _, windows = pair
    ref = build_reference(original, windows, top_k=32, data={"path": "wiki"})
    same = measure_fidelity(original, ref)
    assert same["kl_max"] < 1e-5 and same["top1_agreement"] == 1.0
    assert same["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
    loaded = FidelityReference.load(ref.save(tmp_path / "ref.safetensors"))
    assert loaded.data == {"path": "wiki"} and loaded.vocab_size == VOCAB
    assert torch.equal(loaded.top_ids, ref.top_ids) and torch.equal(loaded.windows, windows)
    assert measure_fidelity(original, loaded) == same


def test_perplexity_on_the_fidelity_windows_takes_no_pass_of_its_own(pair, tokenizers_by_bos, tmp_path):
    """With ``evaluate.fidelity`` on the perplexity text (the usual recipe), the pruned model's perplexity
    comes from its fidelity pass and the original's from the reference: the same values as a pass of
    their own, without running either model over the same windows again."""
    from prune.measure.evaluation import evaluate_loaded, fidelity_reference
    from prune.measure.perplexity import perplexity

    original, pruned, _ = pair
    tok = tokenizers_by_bos[True]
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text(20_000))
    cfg = EvaluateConfig(perplexity={"path": str(text), "seq_len": 24, "max_windows": 5, "batch_size": 2},
                         fidelity={"top_k": 16, "batch_size": 2})
    reference = fidelity_reference(original, tok, cfg, quiet=True)
    calls = []
    for model in (original, pruned):
        model.register_forward_hook(lambda module, args, out: calls.append(module))
    own = evaluate_loaded(original, tok, cfg, quiet=True, reference=reference, is_reference=True)
    other = evaluate_loaded(pruned, tok, cfg, quiet=True, reference=reference)
    assert calls.count(original) == 0 and calls.count(pruned) == 3  # 5 windows in batches of 2: the fidelity pass only
    assert "fidelity" not in own and other["fidelity"]["kl_mean"] > 0
    for model, result in ((original, own), (pruned, other)):
        alone = perplexity(model, reference.windows, batch_size=2)
        assert result["perplexity"]["tokens"] == alone["tokens"] == 5 * 23 and result["perplexity"]["windows"] == 5
        assert result["perplexity"]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
        assert result["perplexity"]["nll"] == pytest.approx(alone["nll"], rel=1e-6)
    # other windows than the reference's (here: fewer) are measured by a pass of their own
    fewer = cfg.model_copy(update={"perplexity": cfg.perplexity.model_copy(update={"max_windows": 3})})
    calls.clear()
    assert evaluate_loaded(pruned, tok, fewer, quiet=True, reference=reference)["perplexity"]["windows"] == 3
    assert calls.count(pruned) == 3 + 2


def test_top1_agreement_counts_a_tie_of_the_originals_largest_tokens_whichever_the_other_model_prefers():
    """The original's two largest log-probs are equal (bf16 logits tie): the pruned model agrees when its own largest
    is either of them, whatever order topk stored them in, and disagrees on any other token."""
    from prune.measure.fidelity import top1_agrees

    ref_top = torch.tensor([[-0.5, -0.5, -2.0]])  # tokens 3 and 7 tie for the largest, token 1 next
    ref_ids = torch.tensor([[3, 7, 1]])

    def prefers(token: int) -> torch.Tensor:
        logq = torch.full((1, 10), -9.0)
        logq[0, token] = -0.1
        return torch.log_softmax(logq, -1)

    assert [bool(top1_agrees(ref_top, ref_ids, prefers(t))) for t in (3, 7, 1, 0)] == [True, True, False, False]


def test_a_model_against_itself_is_exactly_faithful_with_ties_and_peaked_rows(tokenizers_by_bos, tmp_path):
    """bf16 logits tie often (the reviewer's tiny model: 0.9906 agreement with itself, topk and argmax break
    ties differently); peaked rows left p's rest bucket as 1 - sum_topk p, float32 noise against q's exact
    sum (KL ~1e-7 for a model against itself). Both tails are now summed one way, agreement counts ties."""
    model = build_model("llama")
    with torch.no_grad():
        model.model.norm.weight.mul_(200.0)  # large logits, as a trained model's: peaked, and ties at bf16 spacing
    model = model.to(torch.bfloat16)
    windows = eval_windows(tokenizers_by_bos[True], wiki_text(20_000), 64, max_windows=8)
    for top_k in (VOCAB, 16):
        ref = build_reference(model, windows, top_k=top_k)
        same = measure_fidelity(model, ref)
        assert same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0, (top_k, same["kl_max"], same["top1_agreement"])
        assert (ref.tail_logmass is None) == (top_k == VOCAB)
    loaded = FidelityReference.load(ref.save(tmp_path / "ref.safetensors"))
    assert torch.equal(loaded.tail_logmass, ref.tail_logmass) and measure_fidelity(model, loaded)["kl_max"] == 0.0
    with torch.no_grad():
        logp = F.log_softmax(model(windows).logits[:, :-1].double(), -1)
    rest = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ref.top_ids.long(), False)
    exact = torch.logsumexp(logp.masked_fill(~rest, float("-inf")), -1)
    assert torch.allclose(ref.tail_logmass, exact, atol=1e-5, rtol=1e-5)


def test_other_vocabulary_is_refused(pair):
    original, _, windows = pair
    ref = build_reference(original, windows, top_k=8)
    other = build_model("llama", vocab_size=300)
    with pytest.raises(PruneError, match="vocabulary"):
        measure_fidelity(other, ref)


def test_fidelity_without_text_needs_perplexity():
    with pytest.raises(ValueError, match="reuses the perplexity text"):
        EvaluateConfig(fidelity={})
    cfg = EvaluateConfig(perplexity={"path": "a.txt", "seq_len": 64, "max_windows": 3}, fidelity={"top_k": 8})
    text, seq_len, max_windows = cfg.fidelity.text(cfg.perplexity)
    assert (text.path, seq_len, max_windows) == ("a.txt", 64, 3)


def test_run_reports_fidelity_in_eval_json_table_and_card(tiny_folder, tmp_path):
    from prune.pipeline.orchestrator import run

    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["evaluate"]["fidelity"] = {"top_k": 64}
    result = run(recipe, quiet=True)
    data = json.loads((result.out_dir / "eval.json").read_text())
    fid = data["pruned"]["fidelity"]
    assert fid["windows"] == 4 and fid["seq_len"] == 32 and fid["top_k"] == 64 and fid["kl_mean"] > 0
    assert data["settings"]["fidelity"]["top_k"] == 64
    # (the run's perplexities come from these same passes: checked against passes of their own in
    # test_perplexity_on_the_fidelity_windows_takes_no_pass_of_its_own)
    table = (result.out_dir / "eval.md").read_text()
    assert "| KL to original (top-64) | mean | 0 |" in table and "| top-1 agreement |" in table
    card = (result.out_dir / "README.md").read_text()
    assert "KL to original" in card and "KL(original ‖ pruned)" in card
    assert str(WIKI_RAW.name) in json.dumps(fid["data"])


def test_compare_two_runs_window_by_window(tiny_folder, tmp_path):
    """prune compare pairs two pruned models' fidelity over the windows both measured (no lm-eval
    samples needed); a measure on other windows, or against another original, is refused."""
    from prune.pipeline.orchestrator import run

    fids = {}
    for name, n in (("a", 2), ("b", 3)):
        recipe = tiny_recipe(tiny_folder, tmp_path / name, select={"strategy": "one_shot", "metric": "bi", "n_layers": n})
        recipe["evaluate"]["fidelity"] = {"top_k": 64}
        fids[name] = json.loads((run(recipe, quiet=True).out_dir / "eval.json").read_text())["pruned"]["fidelity"]
    a, b = fids["a"], fids["b"]
    assert len(a["kl_windows"]) == 4 and a["windows_sha256"] == b["windows_sha256"]
    proc = prune_main("compare", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "c.json", check_rc=0)
    assert "Fidelity to the original, paired over the 4 windows" in proc.stdout and "| kl_mean (nats; lower: closer to the original) | 4 |" in proc.stdout
    assert "| log_ppl_ratio (log of perplexity / the original's; 0: equal) | 4 |" in proc.stdout  # signed: not "lower: closer"
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["rows"] == []  # no lm-eval samples in these runs: fidelity alone
    assert "lm-eval samples left out" not in proc.stderr
    with_samples = Path(shutil.copytree(tmp_path / "b", tmp_path / "b-samples"))  # samples on one side only: said so
    (with_samples / "eval" / "pruned").mkdir(parents=True)
    (with_samples / "eval" / "pruned" / "samples_copa_2026-01-01T00-00-00.000000.jsonl").write_text(
        json.dumps({"doc_id": 0, "metrics": ["acc"], "acc": 1.0}) + "\n")
    proc = prune_main("compare", tmp_path / "a", with_samples, check_rc=0)
    assert "note: lm-eval samples left out: only some of the compared results have them" in proc.stderr
    kl, ratio = out["fidelity_rows"]
    assert kl["diff"] == pytest.approx(b["kl_mean"] - a["kl_mean"], rel=1e-9) and kl["diff"] > 0  # one more block out
    assert ratio["diff"] == pytest.approx(math.log(b["perplexity_ratio"]) - math.log(a["perplexity_ratio"]), rel=1e-9)
    assert kl["ci_low"] < kl["diff"] < kl["ci_high"]
    other = {**b, "windows_sha256": "0" * 16}  # as prune eval --output writes it, measured on other windows
    (tmp_path / "other.json").write_text(json.dumps({"fidelity": other}))
    proc = prune_main("compare", tmp_path / "a", tmp_path / "other.json", check_rc=2)
    assert "different windows" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    another = {**b, "perplexity_original": b["perplexity_original"] * 1.01}  # the same windows, another original
    (tmp_path / "another.json").write_text(json.dumps({"fidelity": another}))
    proc = prune_main("compare", tmp_path / "a", tmp_path / "another.json", check_rc=2)
    assert "against different originals" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "damaged.json").write_text(json.dumps({"fidelity": {**b, "kl_windows": ["x"] * 4}}))
    proc = prune_main("compare", tmp_path / "a", tmp_path / "damaged.json", check_rc=2)
    assert "fidelity record is damaged" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_fidelity_text_fails_before_loading(tiny_folder, tmp_path):
    from prune.pipeline.recipe import load_recipe

    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["evaluate"]["fidelity"] = {"path": str(tmp_path / "nope.txt")}
    with pytest.raises(PruneError, match="'evaluate.fidelity.path' file not found"):
        load_recipe(recipe)


def test_a_model_whose_float16_activations_overflow_is_never_measured_as_a_number(tokenizers_by_bos, tmp_path, capsys):
    """An fp16 model whose block writes ~1e5 into the stream (finite in float32, past fp16's 65,504): prune eval wrote
    perplexity NaN and exited 0, its KL was NaN beside a top-1 agreement of 0.0, and a reference of NaN log-probs
    measured every model as NaN. Now: prune eval refuses in one line, writing nothing; the reference is refused; a
    pruned model that overflows in a run is said so, its agreement NaN, not 0."""
    from prune.measure.evaluation import evaluate_loaded

    tok = tokenizers_by_bos[True]
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[5].mlp.down_proj.weight.mul_(1e5)
    windows = eval_windows(tok, wiki_text(20_000), 32, 4)
    with torch.no_grad():
        assert torch.isfinite(model(windows).logits).all()  # float32: finite
    half = build_model("llama").half()
    with torch.no_grad():
        half.model.layers[5].mlp.down_proj.weight.copy_(model.model.layers[5].mlp.down_proj.weight.half())
    folder = tmp_path / "half"
    half.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "eval.json"
    from conftest import DATA

    line = prune_main("eval", folder, "--perplexity-data", WIKI_RAW, "--perplexity-rows", "300:600", "--seq-len", 32,
                      "--max-windows", 4, "--tasks", "copa", "--limit", 2, "--data-dir", DATA, "-q", "-o", out,
                      "--output-path", tmp_path / "lm", check_rc=2).stderr.strip()
    assert line.startswith("error: ") and "perplexity not finite: the model's float16 activations overflow" in line
    assert "float32 or bfloat16 (--dtype)" in line and "\n" not in line and not out.exists()
    assert not (tmp_path / "lm").exists()  # refused before lm-eval ran the tasks (it ran them, then refused)
    with pytest.raises(PruneError, match=r"the original's next-token log-probs are not finite \(NaN\)"):
        build_reference(half, windows, top_k=16)
    reference = build_reference(build_model("llama"), windows, top_k=16)
    fid = measure_fidelity(half, reference)
    assert math.isnan(fid["kl_mean"]) and math.isnan(fid["top1_agreement"])  # it read 0.0: "agrees nowhere"
    from prune.measure.fidelity import fidelity_summary, summary_from_sums

    infinite = fidelity_summary(np.array([[0.1, np.inf]]), np.array([[True, False]]), 1.0, 2.0, reference)
    assert infinite["kl_mean"] == math.inf and infinite["top1_agreement"] == 0.5  # a token given no probability: known
    assert math.isnan(summary_from_sums(torch.tensor([math.nan, 3.0, 1.0, 2.0, 4.0]))["top1_agreement"])
    cfg = EvaluateConfig(perplexity={"path": str(WIKI_RAW), "rows": "300:600", "seq_len": 32, "max_windows": 4})
    result = evaluate_loaded(half, tok, cfg, reference=reference, label="pruned: ")
    assert "pruned: note: perplexity, KL to the original, perplexity ratio not finite" in capsys.readouterr().err
    assert math.isnan(result["fidelity"]["kl_mean"]) and math.isnan(result["perplexity"]["perplexity"])
