import json
import re
import math

import numpy as np
import pytest
import torch

import prune
from prune.core import metrics as M
from prune import PruneError
from prune.model.capture import BlockStates
from prune.model.loading import decoder_layers

from conftest import build_model


def reference_states(model, windows):
    """h_0..h_L from output_hidden_states (inputs of blocks 0..L-1) plus the final norm's input."""
    seen = {}
    norm = model.base_model.norm if hasattr(model.base_model, "norm") else model.base_model.ln_f
    handle = norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("pre_norm", args[0].detach()))
    with torch.no_grad():
        out = model(windows, output_hidden_states=True)
    handle.remove()
    hs = list(out.hidden_states)
    return torch.stack(hs[:-1] + [seen["pre_norm"]]).float(), hs[-1]


def test_hooks_capture_pre_norm_output_not_output_hidden_states(llama, calib_text):
    model, tok = llama
    w = prune.calibration_windows(tok, calib_text, 3, 24)
    ref, last_hidden = reference_states(model, w)
    with torch.no_grad(), BlockStates(decoder_layers(model), "cpu") as cap:
        model.base_model(input_ids=w)
        states, inputs = cap.pop()
    assert len(states) == model.config.num_hidden_layers + 1
    assert all(x is None for x in inputs)  # the stream is passed on unchanged: stored once
    for i, s in enumerate(states):
        assert torch.allclose(s, ref[i], atol=1e-6)
    # pitfall: output_hidden_states' last entry is after the final norm, not the block output
    assert not torch.allclose(states[-1], last_hidden.float(), atol=1e-3)


@pytest.mark.parametrize("positions", ["all", "skip_first"])
def test_streamed_scores_equal_direct_computation(positions, tokenizers_by_bos, calib_text):
    model = build_model("qwen3")
    w = prune.calibration_windows(tokenizers_by_bos[False], calib_text, 5, 20, seed=1)
    result = prune.score(model, w, batch_size=2, positions=positions, progress=False)
    states, _ = reference_states(model, w)
    first = 1 if positions == "skip_first" else 0
    states = states[:, :, first:].double()  # [L+1, n, S, d]
    L = model.config.num_hidden_layers
    flat = states.flatten(1, 2)
    for l in range(L):
        assert result.block_influence[l] == pytest.approx(M.block_influence(flat[l], flat[l + 1]).item(), abs=1e-6)
    for l in range(L):
        for n in range(1, L - l + 1):
            assert result.angular_distance(n)[l] == pytest.approx(M.angular_distance(flat[l], flat[l + n]).item(), abs=1e-6)
    for i in range(L + 1):
        for j in range(L + 1):
            per_window = [M.linear_cka(states[i, b], states[j, b]).item() for b in range(w.shape[0])]
            assert result.cka[i][j] == pytest.approx(sum(per_window) / len(per_window), abs=1e-6)
    expected = M.msrs(torch.tensor(result.cka, dtype=torch.float64)[1:, 1:])
    assert result.msrs["total"] == pytest.approx(expected.total)
    assert result.positions == positions
    assert result.n_tokens == w.shape[0] * (w.shape[1] - first)


def test_scores_do_not_depend_on_batch_size(tokenizers_by_bos, calib_text):
    model = build_model("gemma3_text")
    w = prune.calibration_windows(tokenizers_by_bos[True], calib_text, 6, 24, seed=0)
    a = prune.score(model, w, batch_size=1, progress=False)
    b = prune.score(model, w, batch_size=4, progress=False)
    assert a.block_influence == pytest.approx(b.block_influence, abs=1e-6)
    for ra, rb in zip(a.cka, b.cka):
        assert ra == pytest.approx(rb, abs=1e-6)
    for ra, rb in zip(a.angular, b.angular):
        assert ra == pytest.approx(rb, abs=1e-6)


def test_pooled_cka_batches_are_fixed_groups_of_windows(tokenizers_by_bos, calib_text):
    model = build_model("phi3")
    w = prune.calibration_windows(tokenizers_by_bos[False], calib_text, 6, 16, seed=2)
    a = prune.score(model, w, batch_size=1, cka_windows=2, positions="all", progress=False)
    b = prune.score(model, w, batch_size=5, cka_windows=2, positions="all", progress=False)  # rounded up to 6
    states, _ = reference_states(model, w)
    L1 = model.config.num_hidden_layers + 1
    for i in range(L1):
        for j in range(L1):
            per_group = [M.linear_cka(states[i, g:g + 2].flatten(0, 1), states[j, g:g + 2].flatten(0, 1)).item()
                         for g in (0, 2, 4)]
            assert a.cka[i][j] == pytest.approx(sum(per_group) / 3, abs=1e-6)
            assert b.cka[i][j] == pytest.approx(a.cka[i][j], abs=1e-6)
    assert a.cka_windows == 2
    # a last group of fewer windows (5 windows, groups of 2) counted as a whole one: CKA over fewer tokens is
    # another measure (a review: one leftover window moved the mean by 0.044); refused, with the counts that fit
    with pytest.raises(PruneError, match="cka_windows 2 does not divide the 5 windows: the last CKA batch would pool "
                                         "1, .*set the number of windows to a multiple: 4 or 6"):
        prune.score(model, w[:5], cka_windows=2, positions="all", progress=False)
    # unbiased HSIC needs more than 3 tokens per CKA batch, not per window: two windows of 2 tokens pool 4
    assert prune.score(model, w[:2, :2], cka_windows=2, positions="all", progress=False).cka is not None
    with pytest.raises(PruneError, match=r"CKA needs more than 3 counted tokens per CKA batch \(1 window\(s\) of 2\)"):
        prune.score(model, w[:2, :2], positions="all", progress=False)


def test_planted_redundancy_is_found_by_every_metric(tokenizers_by_bos, calib_text):
    model = build_model("mistral", redundant=(3, 4))
    w = prune.calibration_windows(tokenizers_by_bos[False], calib_text, 4, 32)
    r = prune.score(model, w, progress=False)
    for metric in ("bi", "angular", "cka", "msrs"):
        assert prune.select(r, 2, metric=metric).removed == [3, 4], metric
    assert prune.select(r, 2, strategy="contiguous").removed == [3, 4]


def test_non_finite_windows_are_excluded_and_counted(tokenizers_by_bos, calib_text):
    model = build_model("llama")
    w = prune.calibration_windows(tokenizers_by_bos[True], calib_text, 5, 16)
    clean = prune.score(model, w[[0, 1, 3, 4]], batch_size=2, progress=False)
    calls = {"n": 0}

    def poison(module, args, output):  # overflow in window 2 (second batch, first row)
        calls["n"] += 1
        if calls["n"] == 2:
            output[0, 3, 0] = float("inf")
        return output

    handle = decoder_layers(model)[2].register_forward_hook(poison)
    dirty = prune.score(model, w, batch_size=2, progress=False)
    handle.remove()
    assert dirty.excluded_windows == [2]
    assert dirty.block_influence == pytest.approx(clean.block_influence, abs=1e-9)
    assert all(math.isfinite(v) for row in dirty.cka for v in row)


def test_an_excluded_window_leaves_the_cka_groups_fixed(tmp_path):
    """With ``cka_windows`` = 2 and a non-finite window, CKA and MSRS do not depend on the batch size
    and equal the sequential path's (each fixed group keeps its other window)."""
    from prune.measure.sequential import score_sequential

    model = build_model("llama")
    w = torch.randint(3, 199, (8, 16), generator=torch.Generator().manual_seed(1))
    w[1, 5] = 200
    with torch.no_grad():
        model.model.embed_tokens.weight[200] = float("nan")
    opts = dict(positions="all", metrics=("bi", "angular", "cka"), cka_windows=2, progress=False)
    runs = [prune.score(model, w, batch_size=b, **opts) for b in (2, 4, 8)]
    model.save_pretrained(tmp_path)
    runs.append(score_sequential(tmp_path, w, batch_size=4, **opts))
    for r in runs:
        assert r.excluded_windows == [1]
        assert np.allclose(r.cka, runs[0].cka, rtol=0, atol=1e-12) and r.msrs["total"] == pytest.approx(runs[0].msrs["total"], abs=1e-9)


def test_every_window_non_finite_is_refused(tokenizers_by_bos, calib_text):
    model = build_model("llama")
    w = prune.calibration_windows(tokenizers_by_bos[True], calib_text, 4, 16)

    def overflow(module, args, output):
        output[:, 2, 0] = float("inf")
        return output

    handle = decoder_layers(model)[1].register_forward_hook(overflow)
    with pytest.raises(PruneError, match=r"every calibration window had non-finite activations \(try dtype float32"):
        prune.score(model, w, batch_size=2, progress=False)
    handle.remove()


def test_half_precision_model_scores_in_float32(tokenizers_by_bos, calib_text):
    model = build_model("qwen2")
    w = prune.calibration_windows(tokenizers_by_bos[False], calib_text, 4, 24)
    full = prune.score(model, w, progress=False)
    half = prune.score(model.to(torch.bfloat16), w, progress=False)
    assert half.block_influence == pytest.approx(full.block_influence, abs=0.02)
    assert half.msrs["total"] == pytest.approx(full.msrs["total"], abs=1.0)


def test_metric_subset_and_bad_arguments(llama, calib_text):
    model, tok = llama
    w = prune.calibration_windows(tok, calib_text, 2, 16)
    r = prune.score(model, w, metrics=("bi", "angular"), progress=False)
    assert r.cka is None and r.msrs is None
    with pytest.raises(PruneError, match="no CKA matrix"):
        prune.select(r, 2, metric="msrs")
    with pytest.raises(PruneError, match=r"metrics=\['bogus'\]: input should be 'bi', 'angular' or 'cka'"):
        prune.score(model, w, metrics=("bogus",), progress=False)
    with pytest.raises(PruneError, match="positions="):
        prune.score(model, w, positions="middle", progress=False)
    # windows leaving no counted position: said so (it blamed non-finite activations, or an IndexError)
    with pytest.raises(PruneError, match="windows of 1 token.* leave no position to score with positions=skip_first"):
        prune.score(model, w[:, :1], metrics=("bi",), progress=False)
    with pytest.raises(PruneError, match="windows of 0 token.* leave no position to score with positions=all"):
        prune.score(model, w[:, :0], metrics=("bi",), positions="all", progress=False)
    # the API checks what a recipe's ScoreConfig checks (a NaN beta gave MSRS 0, tau 2 a number, silently)
    # (with a recipe's own limits: ScoreConfig.check_value)
    for kwargs, message in ((dict(beta=float("nan")), r"beta=nan: input should be a finite number \(MSRS steepness"),
                            (dict(beta="5"), r"beta='5': input should be a valid number"),  # no text for a number
                            (dict(tau=2.0), r"tau=2.0: input should be less than 1 \(MSRS similarity threshold"),
                            (dict(cka_windows=1.5), r"cka_windows=1.5: input should be a valid integer"),
                            (dict(batch_size=0), "batch_size=0 must be a whole number"),
                            (dict(metrics="cka"), r"metrics='cka': give a list of metric names")):
        with pytest.raises(PruneError, match=message):
            prune.score(model, w, progress=False, **kwargs)
    with pytest.raises(PruneError, match=r"token ids from .* outside the model's vocabulary \[0, "):
        prune.score(model, w + model.get_input_embeddings().num_embeddings, progress=False)  # an IndexError


def test_result_round_trips_through_json(llama, calib_text, tmp_path):
    model, tok = llama
    w = prune.calibration_windows(tok, calib_text, 2, 16)
    r = prune.score(model, w, progress=False, metadata={"seed": 0})
    r.save_json(tmp_path / "s.json")
    back = prune.ScoreResult.load_json(tmp_path / "s.json")
    assert back == r
    assert "MSRS =" in back.table()
    (tmp_path / "pruning.json").write_text('{"schema_version": 1, "removed": [1]}')  # a TypeError from Python
    with pytest.raises(prune.PruneError, match="pruning.json is not a scores file written by `prune score -o`"):
        prune.ScoreResult.load_json(tmp_path / "pruning.json")
    # a value that is no number (prune report failed on it with a traceback, in the table's format)
    for where in ("block_influence", "cka"):
        data = json.loads((tmp_path / "s.json").read_text())
        if where == "cka":
            data["cka"][1][2] = "x"
        else:
            data["block_influence"][2] = True
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(prune.PruneError, match=r"bad.json: scores of the wrong shape \(a score is ('x'|True), not a "):
            prune.ScoreResult.load_json(tmp_path / "bad.json")
    # a NaN influence (json writes NaN): a choice skipped that block without a word
    data = json.loads((tmp_path / "s.json").read_text())
    data["block_influence"][2] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(data))
    with pytest.raises(prune.PruneError, match=r"nan.json: scores of the wrong shape \(a block influence or angular "
                                               r"distance is nan, which scoring never writes\)"):
        prune.ScoreResult.load_json(tmp_path / "nan.json")
    # n_layers 8.5: loaded, then a table or a choice failed with a TypeError deep inside
    data = json.loads((tmp_path / "s.json").read_text())
    for odd in (len(data["block_influence"]) + 0.5, True, 0):
        (tmp_path / "odd.json").write_text(json.dumps({**data, "n_layers": odd}))
        with pytest.raises(prune.PruneError, match=rf"odd.json: scores of the wrong shape \(n_layers is {odd!r}, not a "
                                                   r"block count\)"):
            prune.ScoreResult.load_json(tmp_path / "odd.json")
    # a damaged MSRS record (prune report failed with a TypeError, KeyError or format error) or one that contradicts
    # the CKA matrix it is computed from (printed as measured), counts that are not counts: one line each
    data = json.loads((tmp_path / "s.json").read_text())
    short = {**data, "msrs": {**data["msrs"], "contributions": [1.0]}}  # recomputed from the matrix: no matter
    (tmp_path / "m.json").write_text(json.dumps(short))
    assert prune.ScoreResult.load_json(tmp_path / "m.json").msrs == r.msrs
    for change, said in ((dict(msrs=None), "msrs is not a record of a total, beta and tau"),
                         (dict(msrs={**data["msrs"], "total": "lots"}), "msrs is not a record of a total, beta and tau"),
                         (dict(msrs={k: v for k, v in data["msrs"].items() if k != "beta"}), "msrs is not a record"),
                         (dict(msrs={**data["msrs"], "total": 999.0}), "msrs.total is 999, but the cka matrix gives "),
                         (dict(n_windows=-1), "n_windows is -1, not a count"),
                         (dict(positions="<b>"), "positions is '<b>', not one of all, skip_first")):
        (tmp_path / "m.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(prune.PruneError, match=r"m.json: scores of the wrong shape \(" + re.escape(said)):
            prune.ScoreResult.load_json(tmp_path / "m.json")


def test_measurements_run_in_eval_mode_and_leave_the_mode_as_it_was(tokenizers_by_bos, calib_text):
    """A model in training mode (from_config, or mid-training) measured with dropout on: two calls of score or
    sleb gave two answers (GPT-2's resid_pdrop 0.1). Each measurement runs in eval mode and restores the mode."""
    import prune

    model = build_model("gpt2").train()
    windows = prune.calibration_windows(tokenizers_by_bos[False], calib_text, n_samples=4, seq_len=32, seed=0)
    a, b = prune.score(model, windows, progress=False), prune.score(model, windows, progress=False)
    assert a.block_influence == b.block_influence and model.training and all(m.training for m in model.modules())
    assert prune.sleb(model, windows, 2, progress=False).removed == prune.sleb(model, windows, 2, progress=False).removed
    model.transformer.h[0].eval()  # a mixed state comes back as it was
    prune.score(model, windows, progress=False)
    assert not model.transformer.h[0].training and model.transformer.h[1].training
    # perplexity and fidelity too (they ran with dropout on: two answers, and a KL of the model to itself above 0)
    from prune.measure.fidelity import build_reference, measure_fidelity
    from prune.measure.perplexity import perplexity

    model.train()
    assert perplexity(model, windows)["perplexity"] == perplexity(model, windows)["perplexity"]
    reference = build_reference(model, windows, top_k=8)
    assert measure_fidelity(model, reference)["kl_mean"] == 0 and model.training


def test_the_python_api_names_a_wrong_argument_in_one_line(tokenizers_by_bos, calib_text):
    """Windows as a list, as floats or none at all, a module that is no transformers model, a path where a
    TextSource belongs, max_windows of 0: AttributeErrors and RuntimeErrors from deep inside before."""
    from torch import nn

    from prune.core.errors import UnsupportedModelError

    model = build_model("llama")
    windows = prune.calibration_windows(tokenizers_by_bos[True], calib_text, n_samples=2, seq_len=16, seed=0)
    for bad, message in ((windows.tolist(), "got list"), (windows.float(), "torch.float32"), (windows[:0], "no windows")):
        with pytest.raises(PruneError, match=message):
            prune.score(model, bad, progress=False)
    with pytest.raises(UnsupportedModelError, match="not a transformers causal LM"):
        prune.score(nn.Linear(2, 2), windows, progress=False)
    from conftest import WIKI_RAW

    assert prune.load_text(str(WIKI_RAW)) == prune.load_text(prune.TextSource(str(WIKI_RAW)))
    with pytest.raises(PruneError, match="max_windows=0"):
        prune.eval_windows(tokenizers_by_bos[True], calib_text, 16, max_windows=0)
    import numpy as np

    assert prune.eval_windows(tokenizers_by_bos[True], calib_text, 16, max_windows=np.int64(2)).shape == (2, 16)
