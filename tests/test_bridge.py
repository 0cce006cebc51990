"""Linear bridges across the cuts (prune.heal.bridge, ``heal.bridge: linear``).

The fitted map equals a direct least-squares solve on captured states (each token weighted by
``1 / rms`` of the original's state after the cut, each window's first token left out, or uniformly;
``auto`` fits all three and keeps per cut the one the held-out measure prefers); folded into the
output projection it reproduces ``y - m + m T`` after the cut and lowers the cut's error;
a bridge is kept only where it lowers the held-out measure (and its weights are put back
exactly otherwise); healing with it keeps the un-bridged ``*_before`` figures, saves a plain checkpoint; ``method: bridge``
trains nothing; ``prune heal`` fits the same bridges as a recipe; bad settings (replace, unsupported
blocks, no original model, a healed run, an adapter-only LoRA) are refused in one line.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.heal.bridge import (Bridges, apply_bridge, apply_bridges, cascade, check_bridge, fit_bridges, fold_targets, mlp_output,
                               keep_helpful, runs_of)
from prune.heal.methods import heal_config, heal_model, training_windows
from prune.model.loading import decoder_layers
from prune.pipeline.orchestrator import run

from conftest import BOS_ARCHS, N_LAYERS, build_model
from test_heal import C4_DATA, FAST, _recipe, tiny_folder  # noqa: F401 - a fixture

RUN = [3, 4, 5]


def weighted(h, *rows, weight="rms", seq_len=None):
    """``rows`` with each token's row scaled by ``sqrt(w)``: ``w = 1 / rms(h)`` (``heal.bridge_weight: rms``), or
    each window's first token (of ``seq_len``) dropped (``skip_first``), or as they are (``uniform``)."""
    if weight == "uniform":
        return rows
    if weight == "skip_first":
        first = torch.arange(len(h)) % seq_len == 0
        return tuple(x[~first] for x in rows)
    r = (h * h).mean(-1).rsqrt().sqrt()[:, None]
    return tuple(x * r for x in rows)


def states(model, windows, block_before: int, last: int):
    """(m, y, h) of ``model``: block_before's MLP output and output, block last's output, [tokens, d] float64."""
    layers, got = decoder_layers(model), {}
    hooks = [mlp_output(layers[block_before]).register_forward_hook(lambda m, a, o: got.__setitem__("m", o)),
             layers[block_before].register_forward_hook(lambda m, a, o: got.__setitem__("y", o[0] if isinstance(o, tuple) else o)),
             layers[last].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in hooks:
        h.remove()
    return tuple(got[k].flatten(0, -2).double() for k in "myh")


#: Mixtral and Qwen3-MoE: T folds into every expert's stacked down projection (in the fixture's Qwen3-MoE
#: every other block is a mixture; block 3, before the run 4-6, is one)
@pytest.mark.parametrize("arch,run", [("llama", RUN), ("gpt2", RUN), ("gpt_neox", RUN), ("phi3", RUN),
                                      ("mixtral", RUN), ("qwen3_moe", [4, 5, 6]), ("cohere", RUN), ("phi", RUN),
                                      ("gptj", RUN), ("opt", RUN), ("mpt", RUN)])  # fc_out; fc2 on the block; ffn
def test_fit_equals_least_squares_and_folds_into_the_projection(arch, run, tokenizers_by_bos):
    """Plain (``uniform``, the default), first tokens left out (``skip_first``) and weighted (``rms``)
    least squares, each against a direct solve; ``auto`` fits the same three in one pass."""
    tok = tokenizers_by_bos[arch in BOS_ARCHS]
    full = build_model(arch)
    windows, _ = training_windows(tok, heal_config("lora", C4_DATA, **{**FAST, "n_samples": 24}))
    m, y, h = states(full, windows, run[0] - 1, run[-1])
    fits = {}
    for weight in ("uniform", "skip_first", "rms"):
        bridges = fit_bridges(full, run, windows, batch_size=5, weight=weight)  # batches of 5: sums over uneven batches
        assert [b.run for b in bridges.bridges] == [run] and bridges.tokens == windows.numel()
        assert bridges.record()["weight"] == bridges.record()["cuts"][0]["weight"] == weight
        mw, zw, dw = weighted(h, m, h - y + m, h - y, weight=weight, seq_len=windows.shape[1])
        direct = torch.linalg.lstsq(mw, zw, driver="gelsd").solution
        (bridge,) = bridges.bridges
        assert torch.allclose(bridge.T, direct, atol=1e-6 * direct.abs().max())
        assert bridge.fit_error == pytest.approx(float(((mw @ direct - zw) ** 2).sum() / (dw ** 2).sum()), rel=1e-6)
        assert 0 <= bridge.fit_error < 1  # T = I (plain removal) is a candidate, and it is beaten
        fits[weight] = bridge
    size = (h * h).mean(-1)
    assert size.max() > 2 * size.min()  # tokens of unequal size (3.8-8x in these fixtures): the fits differ
    for a, b in (("uniform", "rms"), ("uniform", "skip_first"), ("skip_first", "rms")):
        assert not torch.allclose(fits[a].T, fits[b].T, atol=1e-4 * fits[a].T.abs().max())
    auto = fit_bridges(full, run, windows, batch_size=5, weight="auto")
    assert [[o.weight for o in options] for options in auto.options] == [["uniform", "skip_first", "rms"]]
    for option in auto.options[0]:
        assert torch.allclose(option.T, fits[option.weight].T, atol=1e-9 * option.T.abs().max())

    pruned = build_model(arch)
    prune.remove_layers(pruned, run)
    apply_bridges(pruned, bridges)
    if arch in ("mixtral", "qwen3_moe"):
        assert fold_targets(decoder_layers(pruned)[run[0] - 1])[0].dim() == 3  # the experts' stacked weights
    m2, y2, _ = states(pruned, windows, run[0] - 1, run[0] - 1)
    torch.testing.assert_close(y2, y - m + m @ direct, rtol=1e-4, atol=1e-4)
    plain_error, bridged_error = float(((y - h) ** 2).sum()), float(((y2 - h) ** 2).sum())
    assert bridged_error < plain_error


@pytest.mark.parametrize("kind", ["linear", "down"])
def test_cascade_fits_each_cut_on_the_pruned_model_as_it_stands(kind, tokenizers_by_bos):
    """Two cuts (2 into block 1; 5-6 into block 4, block 3 of the pruned model): the second bridge is
    the least-squares map on the PRUNED model's states with the first bridge folded in, against the
    original's block 6 output, not the map fitted on the original's states."""
    tok = tokenizers_by_bos[True]
    full = build_model("llama")
    windows, _ = training_windows(tok, heal_config("lora", C4_DATA, **FAST))
    removed = [2, 5, 6]
    student = build_model("llama")
    prune.remove_layers(student, removed)
    bridges, kept = cascade(full, student, removed, windows, error=None, batch_size=5, kind=kind, weight="rms")
    assert kept == [True, True] and bridges.record()["fit"] == "cascade" and bridges.tokens == windows.numel()
    by_hand = build_model("llama")
    prune.remove_layers(by_hand, removed)
    layout = Bridges(bridges.bridges, [], kind=kind)
    apply_bridge(by_hand, layout, bridges.bridges[0])
    _, _, h = states(full, windows, 6, 6)
    if kind == "linear":
        m, y, _ = states(by_hand, windows, 3, 3)
        x = m
    else:  # the down projection's inputs
        got = {}
        hook = decoder_layers(by_hand)[3].mlp.down_proj.register_forward_hook(lambda mod, a, o: got.__setitem__("a", a[0]))
        m, y, _ = states(by_hand, windows, 3, 3)
        hook.remove()
        x = got["a"].flatten(0, -2).double()
    x, z = weighted(h, x, h - y + m)  # weight rms
    G, C = x.T @ x, x.T @ z
    if kind == "linear":
        direct = torch.linalg.lstsq(G, C, driver="gelsd").solution
    else:
        from prune.heal.bridge import RIDGE

        direct = torch.linalg.solve(G + RIDGE * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype), C)
    assert torch.allclose(bridges.bridges[1].T, direct, atol=1e-6 * direct.abs().max())
    independent = fit_bridges(full, removed, windows, kind=kind, weight="rms").bridges
    # the first cut sees the original's inputs either way (other batches: the same sums in another order)
    assert torch.allclose(independent[0].T, bridges.bridges[0].T, atol=1e-9 * direct.abs().max())
    from prune.heal.bridge import fit_cut

    on_student = build_model("llama")  # fitted on the pruned model, that first cut is the same map
    prune.remove_layers(on_student, removed)
    assert torch.allclose(fit_cut(full, on_student, removed, [2], windows, 5, kind, "rms")[0][0].T, bridges.bridges[0].T,
                          atol=1e-9 * direct.abs().max())
    assert not torch.allclose(independent[1].T, direct, atol=1e-3 * direct.abs().max())
    apply_bridge(by_hand, layout, bridges.bridges[1])
    with torch.no_grad():
        assert torch.equal(student(windows).logits, by_hand(windows).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3", "opt", "mpt"])  # no bias; Conv1D + bias; Linear + bias
def test_down_bridge_refits_the_projection_by_ridge_least_squares(arch, tokenizers_by_bos):
    tok = tokenizers_by_bos[arch in BOS_ARCHS]
    full = build_model(arch)
    windows, _ = training_windows(tok, heal_config("lora", C4_DATA, **{**FAST, "n_samples": 24}))
    bridges = fit_bridges(full, RUN, windows, batch_size=5, kind="down", weight="rms")
    (bridge,) = bridges.bridges
    assert bridges.record()["method"] == "down" and bridges.kind == "down"
    proj = fold_targets(decoder_layers(full)[RUN[0] - 1])[0]
    got = {}
    hook = proj.register_forward_hook(lambda mod, args, out: got.__setitem__("a", args[0].flatten(0, -2).double()))
    m, y, h = states(full, windows, RUN[0] - 1, RUN[-1])
    hook.remove()
    a = torch.cat([got["a"], torch.ones(len(got["a"]), 1, dtype=torch.float64)], 1) if proj.bias is not None else got["a"]
    aw, zw, dw = weighted(h, a, h - y + m, h - y)  # weight rms
    G = aw.T @ aw
    direct = torch.linalg.solve(G + 1e-4 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype), aw.T @ zw)
    assert torch.allclose(bridge.T, direct, atol=1e-6 * direct.abs().max())
    assert bridge.fit_error == pytest.approx(float(((aw @ direct - zw) ** 2).sum() / (dw ** 2).sum()), rel=1e-6)
    linear = fit_bridges(full, RUN, windows, batch_size=5).bridges[0]
    assert bridge.fit_error < linear.fit_error  # a wider map than T: it fits the same tokens better

    pruned = build_model(arch)
    prune.remove_layers(pruned, RUN)
    apply_bridges(pruned, bridges)
    _, y2, _ = states(pruned, windows, RUN[0] - 1, RUN[0] - 1)
    torch.testing.assert_close(y2, y - m + a @ direct, rtol=1e-4, atol=1e-4)


def test_runs_and_a_cut_at_block_zero_is_skipped(tokenizers_by_bos):
    assert runs_of([6, 1, 0, 3, 4]) == [[0, 1], [3, 4], [6]]
    full = build_model("llama")
    windows, _ = training_windows(tokenizers_by_bos[True], heal_config("lora", C4_DATA, **FAST))
    bridges = fit_bridges(full, [0, 1, 4, 6], windows)
    assert [b.run for b in bridges.bridges] == [[4], [6]] and bridges.skipped == [[0, 1]]
    assert [c["block"] for c in bridges.record()["cuts"]] == [3, 5]


@pytest.mark.parametrize("objective,arch,kind", [("distill", "llama", "linear"), ("lm", "llama", "linear"),
                                               ("distill", "mixtral", "linear"), ("distill", "gpt2", "down")])
def test_heal_with_a_bridge_keeps_unbridged_before_figures_and_reloads(objective, arch, kind, tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[arch in BOS_ARCHS]
    full = build_model(arch)
    model = build_model(arch)
    kept = prune.remove_layers(model, RUN)
    from prune.heal.methods import mean_lm_loss

    train_w, val_w = training_windows(tok, heal_config("lora", C4_DATA, **FAST))
    loss0 = mean_lm_loss(model, val_w)
    rec = heal_model(model, tok, "lora", data=C4_DATA, quiet=True, rank=4, objective=objective, bridge=kind,
                     teacher_model=full, kept=kept, **FAST)
    b = rec["bridge"]
    assert b["method"] == kind and b["cuts"][0]["run"] == RUN and b["tokens"] == train_w.numel()
    assert rec["settings"]["bridge"] == kind
    assert rec["val_loss_before"] == pytest.approx(loss0) == pytest.approx(b["val_loss_before"])
    assert b["checked_by"] == ("kl" if objective == "distill" else "loss")
    if objective == "distill":
        assert rec["distill"]["kl_before"] == b["kl_before"]
        measure = (b["kl_before"], b["kl_after"])
    else:
        measure = (loss0, b["val_loss_after"])
    if b["cuts"][0]["kept"]:  # kept: it moved the model before training, and lowered the held-out measure
        assert b["val_loss_after"] != pytest.approx(loss0) and measure[1] < measure[0]
    else:  # dropped: training started from the plain pruned model
        assert b["val_loss_after"] == pytest.approx(loss0) and measure[1] == pytest.approx(measure[0])
    out = prune.save(model, tok, tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(val_w).logits, reloaded(val_w).logits)


def test_a_bridge_is_kept_only_where_it_lowers_the_measure(tokenizers_by_bos):
    """By construction: least squares minimises the squared error after the cut on its fit tokens
    (plain removal a candidate), so it is kept by that measure; the same map scaled by 50 (the error,
    a quadratic in the map, grows with 49^2 times its curvature) is dropped and the projection's
    weights are back bit for bit."""
    tok = tokenizers_by_bos[True]
    full = build_model("llama")
    windows, _ = training_windows(tok, heal_config("lora", C4_DATA, **FAST))
    bridges = fit_bridges(full, [4], windows)
    with torch.no_grad():
        h = full(windows, output_hidden_states=True).hidden_states[5]  # the original's block 4 output

    def cut_error(model) -> float:
        with torch.no_grad():
            return float(((model(windows, output_hidden_states=True).hidden_states[4] - h) ** 2).sum())

    pruned = build_model("llama")
    prune.remove_layers(pruned, [4])
    plain = cut_error(pruned)
    assert keep_helpful(pruned, bridges, lambda: cut_error(pruned)) == [True]
    assert cut_error(pruned) < plain

    pruned = build_model("llama")
    prune.remove_layers(pruned, [4])
    before = {n: p.clone() for n, p in pruned.named_parameters()}
    bridges.bridges[0].T = bridges.bridges[0].T * 50
    assert keep_helpful(pruned, bridges, lambda: cut_error(pruned)) == [False]
    assert all(torch.equal(p, before[n]) for n, p in pruned.named_parameters())
    assert cut_error(pruned) == plain


def test_a_later_cut_is_measured_against_the_model_as_the_earlier_cuts_left_it(tokenizers_by_bos):
    """Two cuts: the second bridge lowers the measure against the un-bridged model (1.0 -> 0.6) but raises it against
    the model with the first bridge kept (0.5 -> 0.6): dropped, and its weights put back. (Compared with the start
    each time, it was kept.) The measures are scripted; the folding is the real one."""
    full = build_model("llama")
    windows, _ = training_windows(tokenizers_by_bos[True], heal_config("lora", C4_DATA, **FAST))
    bridges = fit_bridges(full, [2, 5], windows)
    assert len(bridges.bridges) == 2
    pruned = build_model("llama")
    prune.remove_layers(pruned, [2, 5])
    measures = iter([1.0, 0.5, 0.6])  # with no bridge, with the first, with both
    after_first = {}

    def measure() -> float:
        value = next(measures)
        if value == 0.5:
            after_first.update({n: p.clone() for n, p in pruned.named_parameters()})
        return value

    assert keep_helpful(pruned, bridges, measure) == [True, False]
    assert all(torch.equal(p, after_first[n]) for n, p in pruned.named_parameters())


def test_auto_keeps_each_cut_s_option_with_the_lowest_held_out_measure(tokenizers_by_bos):
    """``bridge_weight: auto``: every option is folded in, measured and taken out; the lowest stays
    (its ``checked`` the three measures, each the measure of that option folded in by hand), and the
    model's weights are exactly those of the chosen fit folded into the plain pruned model."""
    tok = tokenizers_by_bos[True]
    full = build_model("llama")
    windows, val = training_windows(tok, heal_config("lora", C4_DATA, **FAST))
    with torch.no_grad():
        target = full(val, output_hidden_states=True).hidden_states[RUN[-1] + 1]

    def measure(model) -> float:  # the held-out squared error after the cut
        with torch.no_grad():
            return float(((model(val, output_hidden_states=True).hidden_states[RUN[0]] - target) ** 2).sum())

    def pruned_with(bridge=None):
        model = build_model("llama")
        prune.remove_layers(model, RUN)
        if bridge is not None:
            apply_bridge(model, Bridges([bridge], [], kind="down"), bridge)
        return model

    bridges = fit_bridges(full, RUN, windows, kind="down", weight="auto")
    by_hand = {o.weight: measure(pruned_with(o)) for o in bridges.options[0]}
    assert len(set(by_hand.values())) == 3  # three different fits: the choice is not a tie
    model = pruned_with()
    plain = measure(model)
    kept = keep_helpful(model, bridges, lambda: measure(model))
    (chosen,) = bridges.bridges
    assert chosen.weight == min(by_hand, key=by_hand.get) and chosen.checked == pytest.approx(by_hand)
    assert kept == [by_hand[chosen.weight] < plain]
    assert bridges.record()["cuts"][0]["weight"] == chosen.weight and set(bridges.record()["cuts"][0]["checked"]) == set(by_hand)
    expected = pruned_with(chosen) if kept[0] else pruned_with()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters()))
    with pytest.raises(PruneError, match="bridge_weight auto chooses each cut's fit by a held-out measure"):
        keep_helpful(pruned_with(), fit_bridges(full, RUN, windows, kind="down", weight="auto"), None)
    with pytest.raises(PruneError, match="bridge_weight auto .* val_samples is 0: set val_samples >= 1"):
        heal_config("bridge", C4_DATA, bridge_weight="auto", val_samples=0)


def test_heal_with_auto_weights_records_each_cut_s_choice(tokenizers_by_bos):
    """Two cuts fitted in order on the pruned model (``method: bridge``, the original in memory): each
    cut's record names the weighting kept and the held-out KL of all three; the bridged model's KL is
    the last kept cut's lowest."""
    tok = tokenizers_by_bos[True]
    full = build_model("llama")
    model = build_model("llama")
    removed = [2, 5, 6]
    kept = prune.remove_layers(model, removed)
    rec = heal_model(model, tok, "bridge", data=C4_DATA, quiet=True, teacher_model=full, kept=kept,
                     bridge_weight="auto", **FAST)
    b = rec["bridge"]
    assert b["weight"] == "auto" and b["fit"] == "cascade" and [c["run"] for c in b["cuts"]] == [[2], [5, 6]]
    for cut in b["cuts"]:
        assert set(cut["checked"]) == {"uniform", "skip_first", "rms"}
        assert cut["weight"] == min(cut["checked"], key=cut["checked"].get)
    last = [c for c in b["cuts"] if c["kept"]]
    assert b["kl_after"] == pytest.approx(last[-1]["checked"][last[-1]["weight"]] if last else b["kl_before"], rel=1e-5)
    from prune.core.tables import _bridge_lines

    (line,) = _bridge_lines(rec)  # the card names each cut's choice and what it was chosen over
    assert f"{b['cuts'][0]['weight']} token weights, the lowest held-out of uniform " in line


def test_a_bridge_without_held_out_windows_is_described_on_the_card(tokenizers_by_bos):
    """``val_samples: 0`` leaves no held-out loss: the card's bridge line crashed on it after all the work
    (TypeError on None), so no folder was written."""
    from prune.heal.methods import healing_markdown

    tok, full, model = tokenizers_by_bos[True], build_model("llama"), build_model("llama")
    kept = prune.remove_layers(model, [2, 5, 6])
    rec = heal_model(model, tok, "bridge", data=C4_DATA, quiet=True, teacher_model=full, kept=kept,
                     **{**FAST, "val_samples": 0})
    assert rec["bridge"]["val_loss_before"] is None
    line = next(x for x in healing_markdown(rec).splitlines() if "bridge, no training" in x)
    assert "held-out loss" not in line and "blocks 2-2 into block 1" in line


@pytest.mark.parametrize("objective", ["lm", "distill"])
def test_method_bridge_trains_nothing_and_is_exactly_the_kept_bridges(objective, tokenizers_by_bos):
    """``method: bridge``: the pruned model changes only in the output projection of the block
    before each kept cut, exactly as folding the same fitted bridges by hand; the record says
    nothing was trained, and its before/after figures are the un-bridged / bridged model's."""
    tok = tokenizers_by_bos[True]
    full = build_model("llama")
    model = build_model("llama")
    kept = prune.remove_layers(model, RUN)
    from prune.heal.methods import mean_lm_loss

    train_w, val_w = training_windows(tok, heal_config("bridge", C4_DATA, **FAST))
    loss0 = mean_lm_loss(model, val_w)
    before = {n: p.clone() for n, p in model.named_parameters()}
    rec = heal_model(model, tok, "bridge", data=C4_DATA, quiet=True, objective=objective, teacher_model=full,
                     kept=kept, **FAST)
    assert rec["method"] == "bridge" and rec["steps"] == rec["tokens_seen"] == rec["trainable_parameters"] == 0
    assert rec["trained"] == [] and rec["losses"] == [] and rec["bridge"]["method"] == "down"
    assert rec["val_loss_before"] == pytest.approx(loss0) and rec["val_loss_after"] == pytest.approx(mean_lm_loss(model, val_w))
    assert rec["bridge"]["checked_by"] == ("kl" if objective == "distill" else "loss")
    by_hand = build_model("llama")
    prune.remove_layers(by_hand, RUN)
    bridges = fit_bridges(full, RUN, train_w, kind="down")
    if rec["bridge"]["cuts"][0]["kept"]:
        apply_bridges(by_hand, bridges)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == ({f"model.layers.{RUN[0] - 1}.mlp.down_proj.weight"} if rec["bridge"]["cuts"][0]["kept"] else set())
    with torch.no_grad():
        assert torch.equal(model(val_w).logits, by_hand(val_w).logits)
    if objective == "distill":
        d = rec["distill"]
        assert (d["kl_before"], d["kl_after"]) == (rec["bridge"]["kl_before"], rec["bridge"]["kl_after"])
        assert (d["kl_after"] < d["kl_before"]) == rec["bridge"]["cuts"][0]["kept"]


def test_bridge_refusals(tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[True]
    with pytest.raises(PruneError, match="bridge applies to lora, partial and bridge"):
        heal_config("replace", C4_DATA, bridge="linear")
    with pytest.raises(PruneError, match="method bridge folds a least-squares bridge .* set bridge: down or linear"):
        heal_config("bridge", C4_DATA, bridge="none")
    # the method's defaults: the down bridge, checked by the KL to the original
    assert (heal_config("bridge", C4_DATA).bridge, heal_config("bridge", C4_DATA).objective) == ("down", "distill")
    # a norm after the MLP; a scaled residual; a shared expert beside the routed ones (Hunyuan's shared_mlp: the fit
    # covered it, the fold did not)
    for arch in ("gemma2", "gemma3_text", "olmo2", "olmo3", "glm4", "granite", "hunyuan_v1_moe"):
        with pytest.raises(PruneError, match="has no MLP output projection"):
            check_bridge(build_model(arch))
    # measured, not read from the parts' names: doubling the MLP's output moves the block's output by it, or refused
    # (GLM-4's post_mlp_layernorm passed the name check: its bridge was fitted and kept, computing something else)
    from prune.heal.bridge import check_adds_straight

    window = torch.arange(1, 17).view(1, 16)
    for arch in ("llama", "cohere", "phi", "mixtral", "gpt2"):
        check_adds_straight(build_model(arch), [2, 3], window)
    # in bfloat16 a block whose MLP output is small beside the stream is not refused for rounding (it was)
    check_adds_straight(build_model("llama", redundant=(3,)).to(torch.bfloat16), [3], window)
    # something after the output projection inside the MLP: the fold's target is measured, not the MLP's output
    model = build_model("llama")
    mlp = decoder_layers(model)[2].mlp
    mlp.forward = lambda x, f=mlp.forward: torch.nn.functional.rms_norm(f(x), (x.shape[-1],))
    with pytest.raises(PruneError, match="block 2 of LlamaForCausalLM does not add its MLP's output"):
        check_adds_straight(model, [2], window)
    for arch, share in (("glm4", "0.00"), ("granite", "0.50"), ("gemma2", "0.0")):
        with pytest.raises(PruneError, match=rf"block 2 of .* does not add its MLP's output to the residual stream "
                                             rf"unchanged \(doubling it moved the block's output by {share}"):
            check_adds_straight(build_model(arch), [2], window)
    with pytest.raises(PruneError, match="bridge down: block 0 of MixtralForCausalLM is a mixture of experts"):
        check_bridge(build_model("mixtral"), kind="down")
    # before the cuts are known, a stack of dense and MoE blocks is not refused (every block was checked: Qwen2-MoE
    # and DeepSeek-V3 were refused, naming a block at no cut); an all-MoE or all-norm-after stack still is
    from prune.heal.methods import check_settings

    for arch in ("qwen2_moe", "deepseek_v3"):
        check_settings(heal_config("lora", C4_DATA, bridge="down"), build_model(arch), N_LAYERS - 2)
    with pytest.raises(PruneError, match="bridge down: block 0 of MixtralForCausalLM is a mixture of experts"):
        check_settings(heal_config("lora", C4_DATA, bridge="down"), build_model("mixtral"), N_LAYERS - 2)
    with pytest.raises(PruneError, match="block 0 of GraniteForCausalLM has no MLP output projection"):
        check_settings(heal_config("lora", C4_DATA, bridge="linear"), build_model("granite"), N_LAYERS - 2)
    qwen3_moe = build_model("qwen3_moe")  # blocks 0, 2, 4, 6 are dense MLPs; 1, 3, 5, 7 mixtures
    assert fit_bridges(qwen3_moe, [3, 4], torch.ones(1, 8, dtype=torch.long), kind="down").bridges[0].block == 2
    with pytest.raises(PruneError, match="bridge down: block 3 .* mixture"):  # only the blocks before a cut count
        fit_bridges(qwen3_moe, [4, 5], torch.ones(1, 8, dtype=torch.long), kind="down")
    model = build_model("llama")
    prune.remove_layers(model, RUN)
    with pytest.raises(PruneError, match="pass teacher_model="):
        heal_model(model, tok, "lora", data=C4_DATA, quiet=True, bridge="linear", **FAST)
    with pytest.raises(PruneError, match="has no MLP output projection"):
        heal_model(build_model("gemma2"), tok, "lora", data=C4_DATA, quiet=True, bridge="linear",
                   teacher_model=build_model("gemma2"), kept=list(range(N_LAYERS)), **FAST)


def test_recipe_with_a_bridge(tmp_path, tiny_folder):
    out = run(_recipe(tmp_path, method="distill", bridge="linear", rank=4), quiet=True).out_dir
    record = json.loads((out / "pruning.json").read_text())
    healing = record["healing"]
    assert healing["bridge"]["cuts"][0]["run"] == record["removed"] and healing["settings"]["bridge"] == "linear"
    assert healing["distill"]["kl_before"] == healing["bridge"]["kl_before"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == N_LAYERS - 3
    assert "- bridge: method = linear" in (out / "README.md").read_text()  # the model card
    assert f"into block {record['removed'][0] - 1} (fit error" in (out / "eval.md").read_text()


def test_prune_heal_with_a_bridge_equals_the_recipe_and_refuses_a_healed_run(tmp_path, tiny_folder, capsys):
    """``prune heal RUN --method bridge`` loads the recorded original and fits the same bridges as
    a recipe's heal section: the same weights, bit for bit (also when ``--evaluate`` built the
    fidelity reference with the same loaded copy first). A healed run is refused (the bridges
    are fitted to the original's blocks), and so is an adapter-only LoRA with a bridge."""
    from prune.pipeline.heal_run import heal_run

    recipe = _recipe(tmp_path, method="bridge")
    recipe["output"]["dir"] = str(tmp_path / "bridged")
    bridged = run(recipe, quiet=True).out_dir
    plain = _recipe(tmp_path)
    del plain["heal"]
    plain["output"]["dir"] = str(tmp_path / "plain")
    plain["evaluate"]["fidelity"] = {"top_k": 64}
    run_dir = run(plain, quiet=True).out_dir
    import yaml

    config = tmp_path / "bridge.yaml"  # a recipe's heal section, ${VAR:-default} expanded as in a recipe
    config.write_text(yaml.safe_dump({"heal": {"method": "bridge", **FAST, "data": {
        **C4_DATA, "path": "${PRUNE_TEST_UNSET_VAR:-%s}" % C4_DATA["path"]}}}))
    missing = tmp_path / "missing.yaml"
    missing.write_text(config.read_text().replace("c4_web_1480.jsonl", "nowhere.jsonl"))
    with pytest.raises(PruneError, match="'heal.data.path' file not found: .*nowhere.jsonl"):  # before any loading
        heal_run(run_dir, tmp_path / "healed", config=str(missing), source=str(tmp_path / "tiny"), quiet=True)
    capsys.readouterr()
    healed = heal_run(run_dir, tmp_path / "healed", config=str(config), source=str(tmp_path / "tiny"), quiet=False,
                      evaluate=True)
    err = capsys.readouterr().err
    assert err.count("loading the original model") == 1  # the reference's copy is fitted on
    # FAST's steps and learning rate train nothing here: said once (the pre-flight's check, not again by heal_model's)
    assert err.count("note: heal steps, learning_rate have no effect with method bridge") == 1, err
    assert json.loads((healed / "eval.json").read_text())["pruned"]["fidelity"]["kl_mean"] > 0
    a = AutoModelForCausalLM.from_pretrained(bridged).state_dict()
    b = AutoModelForCausalLM.from_pretrained(healed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((healed / "pruning.json").read_text())["healing"]
    assert record["method"] == "bridge" and record["bridge"]["checked_by"] == "kl" and record["from_run"] == "plain"
    assert [c["kept"] for c in record["bridge"]["cuts"]] == \
        [c["kept"] for c in json.loads((bridged / "pruning.json").read_text())["healing"]["bridge"]["cuts"]] == [True]
    p = AutoModelForCausalLM.from_pretrained(run_dir).state_dict()  # the bridge moved the weights
    assert [k for k in p if not torch.equal(p[k], b[k])] == [f"model.layers.{record['bridge']['cuts'][0]['block']}.mlp.down_proj.weight"]
    with pytest.raises(PruneError, match="is already healed .* heal.bridge is fitted to the original's blocks"):
        heal_run(healed, tmp_path / "again", method="lora", data=C4_DATA["path"], field=C4_DATA["field"],
                 overrides=["bridge=down"], source=str(tmp_path / "tiny"), quiet=True)
    with pytest.raises(PruneError, match="merge: false saves only the adapter, but .* bridge"):
        heal_run(run_dir, tmp_path / "again", method="lora", data=C4_DATA["path"], field=C4_DATA["field"],
                 overrides=["bridge=down", "merge=false"], source=str(tmp_path / "tiny"), quiet=True)
    with pytest.raises(PruneError, match="heal.teacher cache: the down bridge is fitted on the original loaded beside"):
        heal_run(run_dir, tmp_path / "again", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 overrides=["bridge=down", "teacher=cache", "top_k=8"], source=str(tmp_path / "tiny"), quiet=True)
    assert not (tmp_path / "again").exists()
    # a run whose cut follows a mixture-of-experts block: the down bridge is refused before anything loads, naming
    # the block by its number in the original (it was refused after the teacher cache was built, or not at all)
    from conftest import prune_main

    build_model("qwen2_moe").save_pretrained(tmp_path / "moe")  # blocks 1, 3, 5, 7 are mixtures
    moe_run = tmp_path / "moe-run"
    prune_main("remove", tmp_path / "moe", "--blocks", "4-5", "-o", moe_run, "-q", check_rc=0)
    with pytest.raises(PruneError, match="heal.bridge down: block 3 of Qwen2MoeForCausalLM has no MLP output projection"):
        heal_run(moe_run, tmp_path / "again", method="lora", data=C4_DATA["path"], field=C4_DATA["field"],
                 overrides=["bridge=down"], source=str(tmp_path / "moe"), quiet=True)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("setting", [None, "lm", "cache"])
def test_recipe_with_method_bridge_saves_a_plain_bridged_checkpoint(setting, tmp_path, tiny_folder, capsys):
    """The default (KL check, the original in memory) fits cut by cut on the pruned model; with
    ``objective: lm`` nothing of the original is kept, so every cut is fitted before the surgery; so
    too with a top-k cache as the check's teacher, which then holds the held-out windows alone (nothing
    is trained on the others)."""
    settings = {None: {}, "lm": {"objective": "lm"}, "cache": {"teacher": "cache", "top_k": 8}}[setting]
    recipe = _recipe(tmp_path, method="bridge", **settings)
    out = run(recipe, quiet=False).out_dir
    record = json.loads((out / "pruning.json").read_text())
    healing = record["healing"]
    assert healing["method"] == "bridge" and healing["settings"]["bridge"] == "down" and healing["steps"] == 0
    if setting != "lm":
        assert healing["bridge"]["checked_by"] == "kl"
        assert healing["bridge"]["fit"] == ("cascade" if setting is None else "independent")
        assert healing["distill"]["kl_after"] == healing["bridge"]["kl_after"]
    else:
        assert healing["bridge"]["checked_by"] == "loss" and healing["bridge"]["fit"] == "independent"
    if setting == "cache":
        from safetensors import safe_open

        with safe_open(str(out.with_name(f"{out.name}.teacher-top8.safetensors")), "pt") as cache:
            assert cache.get_slice("input_ids").get_shape()[0] == 0
            assert cache.get_slice("val_input_ids").get_shape()[0] == recipe["heal"]["val_samples"]
    assert healing["bridge"]["cuts"][0]["run"] == record["removed"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == N_LAYERS - 3
    card = (out / "README.md").read_text()
    if healing["bridge"]["cuts"][0]["kept"]:
        assert "healed (a least-squares bridge folded into the block before each cut, nothing trained" in card
        assert "were refitted by least squares after pruning, with no training" in card
    else:  # the held-out check dropped it (objective lm here): the card said it was folded in all the same
        assert "healed (no bridge kept: none lowered the held-out measure" in card
        assert "were not changed by the healing: no bridge was kept" in card
    (settings_line,) = [line for line in card.splitlines() if line.startswith("- Settings other than the defaults")]
    assert "method = bridge" in settings_line and "rank" not in settings_line and "init" not in settings_line
    assert "## Healing: bridge (training-free)" in (out / "eval.md").read_text()
    assert "- down bridge, no training (least squares on" in (out / "eval.md").read_text()
    printed = capsys.readouterr().out
    assert "healing (bridge down, nothing trained)" in printed and "bridged: held-out loss" in printed


def test_the_card_says_when_no_bridge_was_kept():
    """Every cut's bridge dropped by the held-out check (or no cut able to take one): the card said a bridge was
    folded in before each cut and the weights refitted, where they were the pruned model's."""
    from prune.export.card import bridge_words, healing_text

    def record(*kept):
        return {"method": "bridge", "settings": {"method": "bridge", "bridge": "down"},
                "bridge": {"cuts": [{"run": [2 + i], "kept": k} for i, k in enumerate(kept)]}}

    assert bridge_words(record(True, True)) == "a least-squares bridge folded into the block before each cut, nothing trained"
    assert bridge_words(record(True, False)) == ("a least-squares bridge folded into the block before 1 of the 2 cuts, "
                                                 "nothing trained")
    assert bridge_words(record()).startswith("no bridge kept") and bridge_words(record(False)).startswith("no bridge kept")
    text = healing_text(record(False))
    assert "Weights of this checkpoint were not changed by the healing: no bridge was kept" in text
    assert "refitted" not in text
    earlier = healing_text(record(False), step=1)  # an earlier step's healing, this checkpoint pruned again since
    assert "No bridge was kept: the healing left the weights as pruning left them" in earlier and "refitted" not in earlier
