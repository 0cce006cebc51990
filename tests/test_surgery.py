import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.model.loading import decoder_layers

from conftest import N_LAYERS, build_model, scores_from


def greedy(model, prompt, use_cache=True):
    return model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def test_score_select_remove_save_reload_generate(tiny, calib_text, tmp_path):
    """The whole core path on every architecture: reload gives identical logits, and
    generation with the KV cache equals generation without it (layer_idx renumbered)."""
    model, tok = tiny
    w = prune.calibration_windows(tok, calib_text, 4, 32, seed=0)
    scores = prune.score(model, w, batch_size=2, progress=False)
    choice = prune.select(scores, 3, metric="bi")
    assert len(choice.removed) == 3 and 0 not in choice.removed and N_LAYERS - 1 not in choice.removed
    layer_types = getattr(model.config, "layer_types", None)
    kept = prune.remove_layers(model, choice.removed)
    assert kept == choice.kept
    assert model.config.num_hidden_layers == N_LAYERS - 3 == len(decoder_layers(model))
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in kept]
    for new, block in enumerate(decoder_layers(model)):
        idx = [m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        assert idx and set(idx) == {new}

    out = prune.save(model, tok, tmp_path / "pruned", pruning={"removed": choice.removed, "kept": kept})
    assert (out / "model.safetensors").is_file() and (out / "pruning.json").is_file()
    assert json.loads((out / "pruning.json").read_text())["removed"] == choice.removed
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == N_LAYERS - 3
    x = w[:2, :20]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    prompt = w[:1, :8]
    g = greedy(model, prompt)
    assert torch.equal(g, greedy(model, prompt, use_cache=False))
    assert torch.equal(g, greedy(reloaded, prompt))


def test_tied_embeddings_stay_tied(tmp_path, tokenizers_by_bos):
    model = build_model("gemma2")
    assert model.config.tie_word_embeddings
    prune.remove_layers(model, [2, 3])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prune.save(model, tokenizers_by_bos[True], tmp_path / "o")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_qwen3_moe_keeps_each_blocks_dense_or_sparse_mlp(tmp_path, tokenizers_by_bos):
    model = build_model("qwen3_moe")  # step 2: blocks 1,3,5,7 sparse; 0 dense by mlp_only_layers
    before = [type(b.mlp).__name__ for b in decoder_layers(model)]
    kept = prune.remove_layers(model, [1, 2, 6])
    assert [type(b.mlp).__name__ for b in decoder_layers(model)] == [before[i] for i in kept]
    prune.save(model, tokenizers_by_bos[False], tmp_path / "o")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert [type(b.mlp).__name__ for b in decoder_layers(again)] == [before[i] for i in kept]


def block_kinds(model) -> list[tuple]:
    """Each block's parts that its position decides: MLP class (dense or MoE), attention kind, RoPE or not."""
    kinds = []
    for block in decoder_layers(model):
        mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None)
        attn = getattr(block, "self_attn", None) or getattr(block, "linear_attn", None) or getattr(block, "conv", None)
        kinds.append((type(mlp).__name__, type(attn).__name__, getattr(block, "layer_type", None),
                      getattr(attn, "use_rope", None), getattr(attn, "is_causal", None)))
    return kinds


@pytest.mark.parametrize("arch, removed", [
    ("llama4_text", [1, 2, 6]),     # MoE at 1 3 5 7 (moe_layers), RoPE-less every 3rd, chunked attention
    ("lfm2", [1, 2, 5]),            # attention at 1 4 6 (full_attn_idxs), convolutions elsewhere
    ("ernie4_5_moe", [0, 1, 7]),    # MoE from block 1 to 6: now 0 to 4
    ("ernie4_5_moe", [6, 7]),       # MoE to the last kept block
    ("glm4_moe", [0, 3]),           # dense below first_k_dense_replace 2: one dense block left
    ("deepseek_v2", [0, 1]),        # no dense block left
    ("qwen3_5_text", [2, 3]),       # full attention every 2nd, linear attention elsewhere
    ("glm4_moe_lite", [0, 3]),      # mlp_layer_types: dense, dense, then sparse
    ("exaone_moe", [0, 3]),         # first_k_dense_replace 1 and mlp_layer_types; sliding every 4th
    ("afmoe", [0, 3]),              # dense below num_dense_layers 2; sliding and full attention by layer_types
])
def test_position_dependent_layouts_survive_a_cut(arch, removed, tmp_path, tokenizers_by_bos):
    """A block whose MLP (dense or MoE) or attention kind its position decides keeps it after a cut, in memory
    and reloaded from the saved config, and the reloaded model computes the same logits."""
    model = build_model(arch)
    before = block_kinds(model)
    kept = prune.remove_layers(model, removed)
    assert block_kinds(model) == [before[i] for i in kept]
    prune.save(model, tokenizers_by_bos[False], tmp_path / "o")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    assert block_kinds(again) == [before[i] for i in kept]
    if arch == "lfm2":  # its index list follows the kept blocks (transformers reads layer_types; a reader may not)
        assert again.config.full_attn_idxs == [i for i, t in enumerate(again.config.layer_types) if t == "full_attention"]
    x = torch.arange(3, 23).view(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, again(x).logits, rtol=0, atol=0)


def test_per_layer_lists_not_named_layer_are_sliced(tokenizers_by_bos, tmp_path):
    """Hunyuan-MoE reads moe_topk (and expert sizes) per block from lists whose names do not say "layer": they were
    not sliced (the rebuild check then failed as an internal error; out of core the wrong top-k was saved)."""
    from prune.export.outofcore import prune_checkpoint

    topk, sizes = [1, 2] * (N_LAYERS // 2), [32, 16] * (N_LAYERS // 2)
    model = build_model("hunyuan_v1_moe", moe_topk=topk, moe_intermediate_size=sizes)
    folder = prune.save(model, tokenizers_by_bos[False], tmp_path / "src")
    kept = prune.remove_layers(model, [0, 3])
    assert model.config.moe_topk == [topk[i] for i in kept] and model.config.moe_intermediate_size == [sizes[i] for i in kept]
    out = prune_checkpoint(folder, [0, 3], tmp_path / "ooc")
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert again.config.moe_topk == model.config.moe_topk
    x = torch.arange(3, 23).view(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, again(x).logits, rtol=0, atol=0)


def test_a_hybrid_stack_keeps_an_attention_block(tokenizers_by_bos, tmp_path):
    """LFM2 with its attention blocks 1, 4 and 6 removed (only convolutions left) was saved and passed the check, and
    generate() with a cache failed in transformers: the cut is refused before anything changes, in memory, out of
    core; verified proposes no such set, SLEB's and iterative's rounds never take the last attention block, nor search."""
    from prune.choose.verified import verified
    from prune.export.outofcore import prune_checkpoint

    model = build_model("lfm2")  # attention at 1 4 6
    with pytest.raises(PruneError, match=r"the cut removes every attention block of this hybrid stack \(1, 4, 6; the "
                                         r"rest are conv\).*protect one of them"):
        prune.remove_layers(model, [1, 4, 6])
    assert len(decoder_layers(model)) == N_LAYERS
    folder = prune.save(model, tokenizers_by_bos[False], tmp_path / "src")
    with pytest.raises(PruneError, match="removes every attention block"):
        prune_checkpoint(folder, [1, 4, 6], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    windows = torch.arange(3, 35).view(2, 16)
    scores = prune.score(model, windows, progress=False)
    with pytest.raises(PruneError, match="removes every attention block"):  # 1-6 is the only set of 6: refused
        verified(model, scores, windows, 6, progress=False)
    chosen = verified(model, scores, windows, 4, progress=False, budget=4)
    assert {1, 4, 6} - set(chosen.removed)
    assert all({1, 4, 6} - set(c["removed"]) for c in chosen.details["candidates"])
    # the greedy model-based strategies leave the last attention block out of their rounds too
    from prune.choose.strategies import iterative, sleb

    for strategy in (sleb, iterative):
        assert {1, 4, 6} - set(strategy(model, windows, 5, progress=False).removed), strategy.__name__
        with pytest.raises(PruneError, match="no block left to remove in round 6: the only ones not protected are the "
                                             "last attention blocks"):
            strategy(model, windows, 6, progress=False)
    # search with a floor every set holds: the largest set that keeps an attention block (it removed 1-6, and the run
    # failed at the removal, after the search's budget was spent)
    from prune.choose.strategies import perplexity_proxy, search

    found = search(model, scores, perplexity_proxy(model, windows, 2), floor=1e9, higher_is_better=False, budget=10,
                   order_by="bi", progress=False)
    assert len(found.removed) == 5 and {1, 4, 6} - set(found.removed)
    assert all({1, 4, 6} - set(e["removed"]) for e in found.details["trace"])  # no evaluation spent on such a set
    # the score-only strategies too, given the model's config (a run passes it): the next block in their order
    low = scores_from([0.9, 0.01, 0.5, 0.6, 0.02, 0.7, 0.03, 0.9])
    assert prune.select(low, 3, metric="bi").removed == [1, 4, 6]  # without the config: refused at removal
    assert prune.select(low, 3, metric="bi", config=model.config).removed == [1, 2, 4]
    seed = next(s for s in range(200) if prune.select(low, 3, strategy="random", seed=s).removed == [1, 4, 6])
    drawn = prune.select(low, 3, strategy="random", seed=seed, config=model.config).removed
    assert len(drawn) == 3 and {1, 4, 6} - set(drawn)
    for call in (lambda: prune.select(low, 3, strategy="tail", protect=[0, 2, 3, 5, -1], config=model.config),
                 lambda: prune.select(scores, 6, strategy="contiguous", config=model.config)):
        with pytest.raises(PruneError, match="removes every attention block"):
            call()


def test_a_moe_layout_the_config_cannot_describe_is_refused_before_any_change():
    """ERNIE-4.5-MoE's sparse blocks are one start, end and interval: a cut leaving them at 1 2 4 is refused, and
    the model is left as it was."""
    model = build_model("ernie4_5_moe", moe_layer_interval=2)  # sparse at 1 3 5
    with pytest.raises(PruneError, match=r"ernie4_5_moe: the kept blocks would leave sparse \(MoE\) blocks at "
                                         r"positions \[1, 2, 4\], which its config cannot describe"):
        prune.remove_layers(model, [2])
    assert len(decoder_layers(model)) == N_LAYERS and model.config.num_hidden_layers == N_LAYERS
    kept = prune.remove_layers(model, [2, 3])  # sparse at 1 and 3 (old 1 and 5): start 1, interval 2
    assert kept == [0, 1, 4, 5, 6, 7]
    assert (model.config.moe_layer_start_index, model.config.moe_layer_end_index, model.config.moe_layer_interval) == (1, 3, 2)


def test_qwen2_sliding_window_threshold_is_remapped():
    model = build_model("qwen2")  # max_window_layers=4: blocks 4.. slide
    types = list(model.config.layer_types)
    kept = prune.remove_layers(model, [1, 5])
    assert model.config.layer_types == [types[i] for i in kept]
    assert model.config.max_window_layers == 3


def test_gemma3_sliding_pattern_describes_the_kept_blocks(tmp_path, tokenizers_by_bos):
    """Gemma3's sliding_window_pattern (read by whatever builds the layout without layer_types) was saved
    unchanged: 3 after removing blocks 1 and 4 described S S F S S F, not the kept S F S F S S."""
    model = build_model("gemma3_text")  # pattern 3: S S F S S F S S
    prune.remove_layers(model, [6, 7])
    assert model.config.sliding_window_pattern == 3  # S S F S S F: still period 3
    model = build_model("gemma3_text")
    prune.remove_layers(model, [1, 4])
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                                        "sliding_attention", "sliding_attention"]
    assert model.config.sliding_window_pattern is None  # no period gives it
    prune.save(model, tokenizers_by_bos[False], tmp_path / "o")
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["layer_types"] == model.config.layer_types and saved.get("sliding_window_pattern") is None
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert [b.self_attn.layer_type for b in decoder_layers(again)] == model.config.layer_types
    # SmolLM3's RoPE-less layer every 3rd: its interval is the kept list's period; typed int, it stays when none fits
    model = build_model("smollm3")  # no_rope_layers 1 1 0 1 1 0 1 1
    prune.remove_layers(model, [2, 5])  # every RoPE-less layer removed: no layer's (i + 1) % 7 is 0
    assert (model.config.no_rope_layers, model.config.no_rope_layer_interval) == ([1] * 6, 7)
    # EXAONE-4's attention keeps its own copy of the period: it follows the config, as a reloaded block's does
    model = build_model("exaone4")  # sliding_window_pattern 3
    prune.remove_layers(model, [2, 5])  # both full-attention layers removed: six sliding, no (i + 1) % 7 is 0
    assert model.config.sliding_window_pattern == 7
    assert {b.self_attn.sliding_window_pattern for b in decoder_layers(model)} == {7}
    model = build_model("smollm3")
    prune.remove_layers(model, [1])
    assert model.config.no_rope_layers == [1, 0, 1, 1, 0, 1, 1] and model.config.no_rope_layer_interval == 3


def test_rebuild_check_compares_layer_types_not_only_numbers():
    """A kept block whose attention type the saved config would change is refused (only numbers were compared)."""
    from prune.model.surgery import check_rebuild

    model = build_model("gemma2")
    prune.remove_layers(model, [1, 2])
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    with pytest.raises(PruneError, match=r"model.layers.0.self_attn.layer_type is sliding_attention in the pruned model "
                                         "but full_attention when its config is loaded again"):
        check_rebuild(model)


@pytest.mark.parametrize("bad, message", [
    ([], "no blocks to remove"),
    (list(range(N_LAYERS)), "cannot remove all"),
    ([8], "out of range"),
    ([-1], "out of range"),
    ([2, 2], "repeated"),
])
def test_bad_indices_are_refused_and_model_untouched(bad, message):
    model = build_model("llama")
    with pytest.raises(PruneError, match=message):
        prune.remove_layers(model, bad)
    assert len(decoder_layers(model)) == N_LAYERS and model.config.num_hidden_layers == N_LAYERS


def test_stale_device_map_entries_are_renamed():
    model = build_model("llama")
    model.hf_device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(N_LAYERS)},
                           "model.layers.7.mlp": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    prune.remove_layers(model, [1, 2])
    layer_keys = sorted(k for k in model.hf_device_map if k.startswith("model.layers."))
    assert layer_keys == sorted([f"model.layers.{i}" for i in range(6)] + ["model.layers.5.mlp"])


def test_save_is_atomic_and_refuses_existing_folder(tmp_path, tokenizers_by_bos):
    model = build_model("llama")
    tok = tokenizers_by_bos[True]
    out = prune.save(model, tok, tmp_path / "o")
    with pytest.raises(PruneError, match="already exists"):
        prune.save(model, tok, tmp_path / "o")
    prune.remove_layers(model, [3])
    prune.save(model, tok, tmp_path / "o", overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == N_LAYERS - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging or old folders left

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("disk gone")

    tok_save = tok.save_pretrained
    tok.save_pretrained = explode
    try:
        with pytest.raises(Boom):
            prune.save(model, tok, tmp_path / "half")
    finally:
        tok.save_pretrained = tok_save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
