"""Healing (prune.heal.methods): LoRA merged back, a trained replacement block, partial fine-tuning.

Each method on tiny fixture models: the loss goes down, only the intended parameters change,
the healed model saves and reloads with plain transformers to identical logits, and no
adapter is left behind; bad settings fail at validation with one line; the recipe stage and
``prune heal RUN_DIR`` write complete folders and never touch the run folder.
"""

import copy
import hashlib
import json
import os
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.heal.methods import heal_config, heal_model, healing_markdown, lora_targets_matched, mean_lm_loss
from prune.core.config import HealConfig
from prune.pipeline.orchestrator import run
from prune.model.loading import decoder_layers

from conftest import DATA, N_LAYERS, WIKI_RAW, build_model, prune_main
from prune.export.check import check_checkpoint

C4 = DATA / "c4" / "c4_web_1480.jsonl"
C4_DATA = {"path": str(C4), "field": ["prefix", "gold_completion"], "rows": "0:300"}
FAST = dict(n_samples=16, val_samples=4, seq_len=32, steps=10, batch_size=4, learning_rate=1e-2)
RUN = [3, 4, 5]  # the removed run on the 8-block fixtures


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model) -> set[str]:
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def save_reload_same_logits(model, tok, path, windows):
    out = prune.save(model, tok, path)
    assert not [f for f in os.listdir(out) if "adapter" in f]
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "peft" in k.lower() or "lora" in k.lower()]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(windows).logits, reloaded(windows).logits)
    return reloaded


def no_adapters(model):
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
    assert not [k for k in model.state_dict() if "lora" in k.lower()]


# ---- LoRA ---------------------------------------------------------------------------------------
#: the linear layers LoRA trains, by name (written out here, not derived by the check that picks them); PhiMoE's
#: experts are fused weights, not linear layers
LORA_LINEAR = {"phimoe": {"q_proj", "k_proj", "v_proj", "o_proj"},
               "llama4_text": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
               "falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}}


@pytest.mark.parametrize("arch", ["phimoe", "llama4_text", "falcon"])
def test_lora_all_linear_trains_the_plain_linear_layers_and_leaves_routers_alone(arch, tokenizers_by_bos):
    """PhiMoE's and Llama 4's routers subclass nn.Linear and return a tuple: peft's all-linear wrapped them and the
    run failed after scoring with a traceback. Falcon's projections are FalconLinear, a subclass whose forward writes
    the product out: all-linear found no layer and refused LoRA on Falcon. Every plain linear layer but the head is
    trained; the routers are left as they were."""
    from prune.heal.methods import plain_linear

    model = build_model(arch)
    prune.remove_layers(model, RUN)
    head = model.get_output_embeddings()
    linear = {f"{n}.weight" for n, m in model.named_modules() if plain_linear(m) and m is not head}
    routers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not plain_linear(m)}
    assert bool(routers) == (arch != "falcon") and {n.rsplit(".", 2)[-2] for n in linear} == LORA_LINEAR[arch]
    before = snapshot(model)
    rec = heal_model(model, tokenizers_by_bos[False], "lora", data=C4_DATA, quiet=True, rank=4, **FAST)
    no_adapters(model)
    assert rec["lora"]["merged"] and set(changed(before, model)) == linear


#: Qwen-MoE's projections by name: peft adds the fused expert weights to them (``experts.down_proj`` ...)
QWEN_MOE_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("targets", ["all-linear", QWEN_MOE_PROJECTIONS], ids=["all-linear", "projections"])
def test_lora_records_what_peft_adapted_on_a_qwen_moe(targets, tokenizers_by_bos, capsys):
    """peft converts Qwen-MoE's target names to its fused expert weights, and what it adapts moved between
    releases: 0.21 adapted the experts and lost the dense block's MLP projections, 0.22 adapts both where the
    projections are named and no expert under all-linear (the plain linear layers named one by one). The record
    said "33 modules: down_proj, gate_proj, ..." (the layers named); it lists the weights that changed, under
    whichever peft is installed, and names those left out, which stay untouched."""
    model = build_model("qwen3_moe")
    prune.remove_layers(model, [3, 4])
    before = snapshot(model)
    rec = heal_model(model, tokenizers_by_bos[False], "lora", data=C4_DATA, rank=4, target_modules=targets, **FAST)
    changed_weights = set(changed(before, model))
    experts = {n for n in changed_weights if ".experts." in n}
    assert rec["lora"]["modules"] == len({n.rsplit(".", 1)[0] for n in changed_weights - experts}) + len(experts)
    assert {t for t in rec["lora"]["targets"] if t.startswith("experts.")} == {"experts." + n.rsplit(".", 1)[-1] for n in experts}
    if targets == QWEN_MOE_PROJECTIONS:  # named, the experts are adapted under every peft that converts them
        assert {"experts.down_proj", "experts.gate_up_proj"} <= set(rec["lora"]["targets"])
    left_out = rec["lora"]["not_adapted"]
    assert not {f"{n}.weight" for n in left_out} & changed_weights  # named, and really untouched
    assert changed_weights - experts == {f"{n}.weight" for n in lora_targets_matched(model, targets)} - {f"{n}.weight" for n in left_out}
    assert (f"left out {len(left_out)} of the layers named" in capsys.readouterr().out) == bool(left_out)


def test_dora_refuses_the_fused_expert_weights_of_a_qwen_moe(tokenizers_by_bos):
    """DoRA cannot adapt the fused expert weights peft adds to the projections named: one line, not peft's
    traceback, before peft touched the model."""
    model = build_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match=r"^heal.dora: peft adapts the fused expert weights of this qwen3_moe model"):
        heal_model(model, tokenizers_by_bos[False], "lora", data=C4_DATA, rank=4, dora=True, quiet=True,
                   target_modules=QWEN_MOE_PROJECTIONS, **FAST)
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]  # refused before peft ran
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("error::FutureWarning", "error:fan_in_fan_out:UserWarning")  # peft's noise under -q
@pytest.mark.parametrize("arch, extra", [("llama", {}), ("gpt2", {}), ("llama", {"dora": True}),
                                         ("llama", {"lora_init": "olora", "lora_norms": True}),
                                         ("gpt2", {"lora_init": "pissa", "lora_norms": True})])
def test_lora_trains_only_targets_merges_and_reloads(arch, extra, tokenizers_by_bos, tmp_path):
    """LoRA (and DoRA: ``dora: true``, peft's weight-decomposed LoRA, which also trains one magnitude
    per output feature; PiSSA/OLoRA initialisation; the norm gains beside the adapters) trains
    exactly its adapters (and norms), merges into plain weights and reloads."""
    tok = tokenizers_by_bos[arch in ("llama",)]
    model = build_model(arch)
    prune.remove_layers(model, RUN)
    before = snapshot(model)
    cls = type(model)
    from prune.heal.methods import training_windows, heal_config, norm_parameters

    train_w, val_w = training_windows(tok, heal_config("lora", C4_DATA, **FAST))
    loss0 = mean_lm_loss(model, train_w)
    rec = heal_model(model, tok, "lora", data=C4_DATA, quiet=True, rank=4, **extra, **FAST)
    assert mean_lm_loss(model, train_w) < loss0
    assert rec["val_loss_after"] < rec["val_loss_before"]
    assert rec["tokens_seen"] == FAST["steps"] * FAST["batch_size"] * FAST["seq_len"]
    dora, norms = extra.get("dora", False), extra.get("lora_norms", False)
    assert rec["lora"]["merged"] and rec["lora"]["rank"] == 4 and rec["lora"]["dora"] is dora
    assert rec["lora"]["init"] == extra.get("lora_init", "default")
    # exactly the weights of the linear layers inside the blocks changed (all-linear: not the LM head),
    # and with lora_norms every norm's gain (and bias)
    assert type(model) is cls
    no_adapters(model)
    diff = changed(before, model)
    linear = {n: m for n, m in model.named_modules()
              if type(m).__name__ in ("Linear", "Conv1D") and m is not model.get_output_embeddings()}
    norm_params = norm_parameters(model) if norms else {}
    assert rec["lora"]["norms"] == len(norm_params) and (len(norm_params) > 2 * (N_LAYERS - len(RUN)) or not norms)
    assert diff == {f"{n}.weight" for n in linear} | set(norm_params)
    # per module: A (rank x in) + B (out x rank), + the magnitude (out) with DoRA; Conv1D weights are [in, out]
    shapes = [m.weight.shape[::-1] if type(m).__name__ == "Conv1D" else m.weight.shape for m in linear.values()]
    assert rec["trainable_parameters"] == (sum(4 * (i + o) + (o if dora else 0) for o, i in shapes)
                                           + sum(p.numel() for p in norm_params.values()))
    for p in model.parameters():
        assert p.requires_grad  # flags restored
    save_reload_same_logits(model, tok, tmp_path / "healed", train_w[:2])


@pytest.mark.parametrize("extra", [{}, {"lora_init": "pissa", "lora_norms": True}])
def test_interrupted_lora_leaves_the_weights_as_they_were(extra, tokenizers_by_bos):
    """A run stopped mid-training leaves no adapter and the pruned weights: PiSSA moved the top
    singular directions out of each base weight at the start, so merely dropping the adapters
    would leave the residual; the initial adapters are merged back instead (equal up to rounding)."""
    model = build_model("llama")
    prune.remove_layers(model, RUN)
    before = snapshot(model)

    def stop(step, tokens):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal_model(model, tokenizers_by_bos[True], "lora", data=C4_DATA, quiet=True, rank=4, callback=stop,
                   **extra, **FAST)
    no_adapters(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-5, msg=k)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "partial"])
def test_a_healed_model_is_freed_when_dropped(method, tokenizers_by_bos):
    """Under bf16 mixed precision Accelerate's unwrap leaves an instance ``forward`` bound to the model
    (past transformers' own decorators): a reference cycle. Training restores the class's forward, so
    the healed model is plain and a model the caller drops is freed at once (automatic gc off here)."""
    import gc
    import weakref

    model = build_model("llama")
    prune.remove_layers(model, RUN)
    gc.collect()
    gc.disable()
    try:
        heal_model(model, tokenizers_by_bos[True], method, data=C4_DATA, quiet=True, mixed_precision="bf16",
                   **({"rank": 4} if method == "lora" else {}), **{**FAST, "steps": 2})
        assert "forward" not in vars(model)
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_heal_model_refuses_settings_it_would_not_read(tokenizers_by_bos):
    """With windows= the data settings were recorded as used and never read (data= a missing file included); a
    teacher for the next-token loss was dropped."""
    model = build_model("llama")
    prune.remove_layers(model, RUN)
    windows = torch.randint(0, 100, (6, 16))
    before = snapshot(model)
    for kwargs, said in ((dict(data="/nonexistent.txt"), "data describe the training text read from data"),
                         (dict(n_samples=999, seq_len=512), "n_samples, seq_len describe the training text"),
                         (dict(teacher_model=build_model("llama")), "teacher_model is read by objective='distill'")):
        with pytest.raises(PruneError, match=said):
            heal_model(model, None, "lora", windows=windows, quiet=True, rank=4, steps=1, **kwargs)
    assert not changed(before, model)


def test_settings_a_bridge_or_an_in_memory_teacher_never_reads_are_named():
    from prune.heal.methods import ignored_settings

    assert ignored_settings(heal_config("bridge", steps=50, learning_rate=0.5)) == ["steps", "learning_rate"]
    assert ignored_settings(heal_config("distill", teacher="memory", top_k=8, teacher_cache="c.safetensors")) == \
        ["top_k", "teacher_cache"]
    assert ignored_settings(heal_config("distill", teacher="cache", top_k=8)) == []


def test_heal_model_checks_its_block_map_windows_and_context(tokenizers_by_bos):
    """A block map of the wrong length fitted a bridge at a cut that does not exist; ids beyond the vocabulary and
    windows longer than the context were IndexErrors from inside the model; removed= beside lora was dropped."""
    full = build_model("llama")
    model = build_model("llama")
    prune.remove_layers(model, [3, 4])
    windows = torch.randint(0, 100, (6, 16))
    gpt2 = build_model("gpt2", n_positions=16)
    for call, said in (
            (lambda: heal_model(model, None, "bridge", windows=windows, teacher_model=full, kept=[0, 1, 2, 5, 6], quiet=True),
             r"kept=\[0, 1, 2, 5, 6\] must give the original index of each of the model's 6 blocks, increasing, below the original's 8"),
            (lambda: heal_model(model, None, "bridge", windows=windows, teacher_model=full, kept=[0, 1, 2, 5, 6, 9], quiet=True),
             "below the original's 8"),
            (lambda: heal_model(model, None, "lora", windows=windows + 10**6, steps=1, quiet=True), "outside the model's vocabulary"),
            (lambda: heal_model(gpt2, None, "lora", windows=torch.randint(0, 100, (6, 32)), steps=1, quiet=True),
             "windows of 32 tokens are longer than the model's context \\(16 tokens\\)"),
            (lambda: heal_model(model, None, "lora", windows=windows, batch_size=8, steps=1, quiet=True),
             "heal.batch_size 8 is more than the 6 training windows: lower batch_size$"),
            (lambda: heal_model(model, None, "lora", windows=windows, removed=[3, 4], steps=1, quiet=True),
             "removed= is the run method replace takes the place of; lora heals the pruned model as it is"),
            (lambda: heal_model(model, None, "distill", windows=windows, teacher_model=full, teacher="cache", quiet=True),
             "teacher='cache', but teacher_model is the original in memory"),
            (lambda: heal_model(model, None, "distill", windows=windows, teacher_model="/x.safetensors", teacher="memory",
                                quiet=True), "teacher='memory', but the teacher given is a top-k cache file")):
        with pytest.raises(PruneError, match=said):
            call()


def test_olora_on_conv1d_is_refused_before_training(tokenizers_by_bos):
    model = build_model("gpt2")
    before = snapshot(model)
    with pytest.raises(PruneError, match="olora does not support Conv1D"):
        heal_model(model, tokenizers_by_bos[False], "lora", data=C4_DATA, quiet=True, lora_init="olora", **FAST)
    assert not changed(before, model)
    no_adapters(model)


def test_olora_on_conv1d_is_refused_by_the_settings_check():
    """The pre-flight's check (a meta-device model, nothing loaded) refuses it too, not only training."""
    from prune.heal.methods import check_settings, heal_config
    from prune.model.arch import meta_model

    with pytest.raises(PruneError, match="olora does not support Conv1D"):
        check_settings(heal_config("lora", C4_DATA, lora_init="olora"), meta_model(build_model("gpt2").config), 5)


def test_settings_this_healing_never_reads_are_named(capsys):
    """Keys set away from their default that the objective or bridge never reads: one note line."""
    from prune.heal.methods import check_settings, heal_config, ignored_settings
    from prune.model.arch import meta_model

    assert ignored_settings(heal_config("lora", C4_DATA, temperature=2.0, lm_weight=0.5)) == ["temperature", "lm_weight"]
    assert ignored_settings(heal_config("replace", C4_DATA, gradient_checkpointing=True)) == ["gradient_checkpointing"]
    assert ignored_settings(heal_config("distill", C4_DATA, params="replace", loss="mse+cos")) == ["loss"]
    assert ignored_settings(heal_config("lora", C4_DATA, bridge_weight="rms")) == ["bridge_weight"]
    # nothing trained: the bridges are checked by the KL at T = 1, whatever the distillation weights say
    assert ignored_settings(heal_config("bridge", C4_DATA, objective="distill", temperature=4.0, lm_weight=1.0)) == [
        "temperature", "lm_weight"]
    assert ignored_settings(heal_config("distill", C4_DATA, temperature=2.0, rank=4, bridge="down", bridge_weight="rms")) == []
    # not named before: a bridge checked by the loss trains nothing either; no KL term tempers nothing; no hidden
    # term reads its kind
    assert ignored_settings(heal_config("bridge", C4_DATA, objective="lm", steps=500, learning_rate=0.01)) == [
        "steps", "learning_rate"]
    assert ignored_settings(heal_config("distill", C4_DATA, kl_weight=0.0, lm_weight=1.0, temperature=2.0)) == ["temperature"]
    assert ignored_settings(heal_config("distill", C4_DATA, hidden_loss="relative")) == ["hidden_loss"]
    # the card lists them as not read, not among the settings that say what was done
    from prune.export.card import healing_text

    cfg = heal_config("bridge", C4_DATA, objective="lm", steps=500)
    text = healing_text({"method": "bridge", "settings": cfg.model_dump(mode="json"), "ignored": ignored_settings(cfg)})
    assert "steps = 500" not in text and "Set, and not read by this method and objective (no effect): steps" in text
    check_settings(heal_config("partial", C4_DATA, top_k=8), meta_model(build_model("llama").config), 5)
    assert capsys.readouterr().err == "note: heal top_k has no effect with method partial, objective lm, bridge none (ignored)\n"


def test_half_precision_weights_train_through_float32_copies(tokenizers_by_bos):
    """A bfloat16 model's trained weights move as far as a float32 model's: updated in place, most
    AdamW steps of lr 1e-4 round away in bfloat16 (0.44x the float32 movement before the fix)."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("llama").to(dtype)
        prune.remove_layers(model, RUN)
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        heal_model(model, tokenizers_by_bos[True], "partial", data=C4_DATA, quiet=True,
                   **{**FAST, "steps": 6, "learning_rate": 1e-4})
        assert all(p.dtype == dtype for p in model.parameters())  # rounded back into the model's dtype
        moved[dtype] = sum(float((p.detach().float() - before[n]).norm() ** 2) for n, p in model.named_parameters()) ** 0.5
    assert 0.85 < moved[torch.bfloat16] / moved[torch.float32] < 1.15


# ---- partial fine-tuning --------------------------------------------------------------------------------
def test_partial_trains_last_blocks_and_norm_only(tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[True]
    model = build_model("llama")
    prune.remove_layers(model, RUN)
    before = snapshot(model)
    rec = heal_model(model, tok, "partial", data=C4_DATA, quiet=True, last_blocks=2, **FAST)
    assert rec["val_loss_after"] < rec["val_loss_before"]
    assert rec["losses"][-1] < rec["losses"][0]
    n = len(decoder_layers(model))
    assert rec["trained"] == [f"model.layers.{n - 2}", f"model.layers.{n - 1}", "model.norm"]
    want = {k for k in before if k.startswith((f"model.layers.{n - 2}.", f"model.layers.{n - 1}.", "model.norm."))}
    assert changed(before, model) == want
    assert "lm_head_tied" not in rec["partial"]  # the fixture's head is tied, and was not trained: it said False
    save_reload_same_logits(model, tok, tmp_path / "healed", torch.arange(20)[None])


@pytest.mark.parametrize("method", ["partial", "lora"])
def test_same_seed_same_result(method, tokenizers_by_bos):
    """The same settings give the same model, whatever drew random numbers before (the LoRA
    adapters' random init follows heal.seed, not the process's random state)."""
    results = []
    for draws in (0, 3):
        model = build_model("llama")
        prune.remove_layers(model, RUN)
        torch.rand(draws)  # something else in the process drew random numbers first
        rec = heal_model(model, tokenizers_by_bos[True], method, data=C4_DATA, quiet=True, **{**FAST, "steps": 4})
        results.append((rec["losses"], snapshot(model)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


def test_partial_tied_lm_head_trains_the_embeddings_and_stays_tied(tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[True]
    model = build_model("llama")
    assert model.config.tie_word_embeddings
    prune.remove_layers(model, RUN)
    before = snapshot(model)
    rec = heal_model(model, tok, "partial", data=C4_DATA, quiet=True, last_blocks=1, train_norm=False,
                     train_lm_head=True, **FAST)
    n = len(decoder_layers(model))
    diff = changed(before, model)
    assert "model.embed_tokens.weight" in diff and "lm_head.weight" in diff  # one tensor, two names
    assert diff == {k for k in before if k.startswith(f"model.layers.{n - 1}.")} | {"model.embed_tokens.weight", "lm_head.weight"}
    assert rec["partial"]["lm_head_tied"] and "input embeddings" in rec["partial"]["note"]
    assert "tied" in rec["trained"][-1]
    reloaded = save_reload_same_logits(model, tok, tmp_path / "healed", torch.arange(24)[None])
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


# ---- replacement layer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,init", [("llama", "first_removed"), ("llama", "last_removed"), ("llama", "mean_removed"),
                                       ("gpt2", "first_removed"), ("gemma3_text", "first_removed"), ("qwen2", "first_removed")])
def test_replace_trains_one_block_in_place_of_the_run(arch, init, tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[arch in ("llama", "gemma3_text")]
    model = build_model(arch)
    original = copy.deepcopy(model)
    layer_types = getattr(model.config, "layer_types", None)
    rec = heal_model(model, tok, "replace", data=C4_DATA, removed=RUN, init=init, quiet=True, **FAST)
    source = RUN[-1] if init == "last_removed" else RUN[0]
    kept = [0, 1, 2, source, 6, 7]
    assert rec["kept"] == kept and model.config.num_hidden_layers == N_LAYERS - len(RUN) + 1
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in kept]
    r = rec["replacement"]
    assert r["replaces"] == RUN and r["position"] == RUN[0] and r["init_block"] == source
    start = f"the mean of blocks {RUN}" if init == "mean_removed" else f"block {source}"  # it said block 3 for the mean
    assert f"(initialised as {start}, loss mse)" in healing_markdown(rec)
    assert r["val_mse_after"] < r["val_mse_before"]
    assert rec["losses"][-1] < rec["losses"][0]
    # every weight but the replacement block's equals the original model's
    new_layers, old_layers = decoder_layers(model), decoder_layers(original)
    for pos, orig in enumerate(kept):
        same = all(torch.equal(a, b) for a, b in zip(new_layers[pos].state_dict().values(), old_layers[orig].state_dict().values()))
        assert same == (pos != RUN[0]), (pos, orig)
    for idx in [m.layer_idx for m in new_layers[RUN[0]].modules() if isinstance(getattr(m, "layer_idx", None), int)]:
        assert idx == RUN[0]
    others = {k: v for k, v in original.state_dict().items() if ".h." not in k and ".layers." not in k}
    for k, v in others.items():
        assert torch.equal(model.state_dict()[k], v), k
    w = torch.arange(3, 27)[None]
    reloaded = save_reload_same_logits(model, tok, tmp_path / "healed", w)
    prompt = w[:, :6]
    a = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, reloaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_replace_with_cosine_loss_and_accumulation(tokenizers_by_bos):
    model = build_model("llama")
    rec = heal_model(model, tokenizers_by_bos[True], "replace", data=C4_DATA, removed=RUN, loss="mse+cos",
                     quiet=True, **{**FAST, "gradient_accumulation": 2, "steps": 5})
    assert rec["windows_seen"] == 5 * 2 * FAST["batch_size"] and rec["replacement"]["loss"] == "mse+cos"
    assert rec["replacement"]["val_mse_after"] < rec["replacement"]["val_mse_before"]


def test_callback_and_gradient_checkpointing(tokenizers_by_bos):
    model = build_model("llama")
    prune.remove_layers(model, RUN)
    seen = []
    rec = heal_model(model, tokenizers_by_bos[True], "partial", data=C4_DATA, quiet=True, gradient_checkpointing=True,
                     callback=lambda step, tokens: seen.append((step, tokens, model.training)), **{**FAST, "steps": 3})
    assert seen == [(s, s * FAST["batch_size"] * FAST["seq_len"], False) for s in (1, 2, 3)]
    assert rec["gradient_checkpointing"]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())



def test_a_replacement_saved_from_python_is_recorded_as_the_cli_records_it(tokenizers_by_bos, tmp_path):
    """``prune.save(model, tok, out, pruning={"removed": [3, 4, 5], "healing": rec})`` after ``heal_model(...,
    "replace")`` was refused as "a removal from 9 blocks" of the 8-block model, and ``removed=[3, 4]`` (the blocks
    remove_layers cut) was taken, writing a card of 2 removed blocks whose Healing section said the trained block
    replaces [3, 4, 5]. Now the first is the record ``prune heal --method replace`` writes; the second is refused."""
    model = build_model("llama")
    rec = heal_model(model, tokenizers_by_bos[True], "replace", data=C4_DATA, removed=RUN, quiet=True,
                     **{**FAST, "steps": 2})
    with pytest.raises(PruneError, match=re.escape("pruning= removes blocks [3, 4], but its healing record's trained "
                                                   "block stands in for the run [3, 4, 5]: give pruning={'removed': "
                                                   "[3, 4, 5], 'healing': ...}")):
        prune.save(model, tokenizers_by_bos[True], tmp_path / "x", pruning={"removed": [3, 4], "healing": rec})
    assert not (tmp_path / "x").exists()
    out = prune.save(model, tokenizers_by_bos[True], tmp_path / "healed", pruning={"removed": RUN, "healing": rec})
    saved = json.loads((out / "pruning.json").read_text())
    assert (saved["removed"], saved["kept"], saved["kept_original"]) == (RUN, [0, 1, 2, 5, 6, 7], [0, 1, 2, 5, 6, 7])
    assert (saved["layers_before"], saved["layers_after"]) == (N_LAYERS, 6)
    card = (out / "README.md").read_text()
    assert "3 of its 8 decoder blocks removed (6 blocks now, one a trained block in place of the removed run)" in card
    assert check_checkpoint(out).ok

# ---- bad settings: one line, before any training ------------------------------------------------------------
def _recipe(tmp_path, **heal):
    return {
        "model": {"source": str(tmp_path / "tiny")},
        "calibration": {"path": str(WIKI_RAW), "rows": "0:300", "n_samples": 4, "seq_len": 32, "batch_size": 4},
        "score": {"metrics": ["bi", "angular"]},
        "select": {"strategy": "contiguous", "metric": "angular", "n_layers": 3},
        "evaluate": {"perplexity": {"path": str(WIKI_RAW), "rows": "2000:", "seq_len": 32, "max_windows": 4}},
        "heal": {"data": C4_DATA, **FAST, **heal},
        "output": {"dir": str(tmp_path / "out")},
    }


@pytest.fixture
def tiny_folder(tmp_path, tokenizers_by_bos):
    return prune.save(build_model("llama"), tokenizers_by_bos[True], tmp_path / "tiny")


@pytest.mark.parametrize("heal,select,message", [
    ({"method": "lora", "rank": 0}, {}, "rank must be at least 1"),
    ({"method": "partial", "last_blocks": 0, "train_norm": False}, {}, "trains no parameters"),
    ({"method": "lora", "target_modules": []}, {}, "trains no parameters"),
    ({"method": "lora", "target_modules": ["lm_head", "q_proj"]}, {}, "shares its weight with the input embeddings"),
    # merging LoRA on the tied input embedding changed the head too: held-out loss 5.7 trained, 10.6 saved
    ({"method": "lora", "target_modules": ["embed_tokens"]}, {}, "input embedding (model.embed_tokens), which shares"),
    # peft refused a norm after the scoring, the removal and the unhealed evaluation, with a traceback
    ({"method": "lora", "target_modules": ["input_layernorm"]}, {}, "a LlamaRMSNorm, which LoRA cannot adapt"),
    ({"method": "lora", "target_modules": ".*norm"}, {}, "which LoRA cannot adapt"),
    ({"method": "lora", "fsdp": True}, {}, "heal.fsdp shards the model over several processes"),
    ({"method": "partial", "lora_norms": True, "loraplus_ratio": 4}, {}, "lora_norms, loraplus_ratio only apply to LoRA"),
    ({"method": "lora", "merge": False, "lora_init": "pissa"}, {}, "also change base weights"),
    ({"method": "lora", "merge": False, "objective": "distill"}, {}, "distillation merges its adapter"),
    ({"method": "lora", "dora": True, "lora_init": "olora"}, {}, "DoRA with lora_init olora"),
    ({"method": "replace"}, {"strategy": "one_shot"}, "one contiguous run"),
    ({"method": "replace"}, {"n_layers": 1}, "at least 2"),
    ({"method": "replace"}, {"strategy": "tail", "protect": [0, -1, -3]}, "tail with protect [0, -1, -3] removes [3, 4, 6]"),
    ({"method": "lora", "data": {"path": str(WIKI_RAW), "rows": "1000:3000"}}, {}, "overlaps the perplexity text"),
    ({"method": "lora", "data": None}, {}, "'heal.data' is missing"),
    ({"method": "lora", "steps": 0}, {}, "heal.steps"),
    ({"method": "prune"}, {}, "heal.method"),
    # an explicit objective: lm beside method: distill was turned into distillation without a word
    ({"method": "distill", "objective": "lm"}, {}, "method distill is objective distill, and objective is 'lm'"),
    # params left from method distill once the method changed: "unknown key", and the list of keys lacked it
    ({"method": "lora", "params": "partial"}, {}, "params names what method distill trains; with method 'lora' remove it"),
    # accepted, and they trained nothing or wrecked the model: a weight decay of 1e9 (perplexity the vocabulary size),
    # temperatures that make both distributions one-hot or uniform, a top-1 cache (the KL always 0)
    ({"method": "lora", "weight_decay": 1e9}, {}, "'heal.weight_decay': Input should be less than or equal to 1"),
    ({"method": "distill", "temperature": 1e-30}, {}, "the distillation temperature must be between 0.1 and 100"),
    ({"method": "distill", "temperature": 1e30}, {}, "the distillation temperature must be between 0.1 and 100"),
    ({"method": "distill", "teacher": "cache", "top_k": 1}, {}, "'heal.top_k': Input should be greater than or equal to 2"),
])
def test_bad_heal_settings_fail_at_validation(tmp_path, tiny_folder, heal, select, message):
    recipe = _recipe(tmp_path, **heal)
    recipe["select"].update(select)
    with pytest.raises(PruneError) as err:
        run(recipe, quiet=True)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("heal,message", [
    ({"method": "lora", "target_modules": ["qproj"]}, "'qproj' matches no module"),
    ({"method": "partial", "last_blocks": 7}, "last_blocks=7 but the pruned model has 5 blocks"),
    ({"method": "replace", "seq_len": 1024}, "longer than the model's context"),
    # the card said "batch 64", and each step saw the 4 windows there were
    ({"method": "lora", "n_samples": 4, "batch_size": 8}, "heal.batch_size 8 is more than the 4 training windows (n_samples)"),
    # 10**9: the step never ended, cycling the 4 windows
    ({"method": "lora", "n_samples": 4, "batch_size": 2, "gradient_accumulation": 10**9},
     "heal.batch_size x heal.gradient_accumulation (2000000000 windows a step) is more than the 4 training windows"),
    # 100000 on a 48-wide model: 460M adapter weights trained without a word (10**9: a 192 GB allocation's traceback)
    ({"method": "lora", "rank": 100000}, "heal.rank 100000 is more than the model's hidden size"),
])
def test_bad_heal_settings_fail_at_preflight(tmp_path, tiny_folder, heal, message):
    from prune.pipeline.orchestrator import preflight
    from prune.pipeline.recipe import load_recipe

    with pytest.raises(PruneError) as err:
        preflight(load_recipe(_recipe(tmp_path, **heal)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_search_with_more_last_blocks_than_it_may_leave_fails_at_preflight(tmp_path, tiny_folder):
    """search names the most blocks it may remove: partial training more blocks than would be left failed after
    scoring, the search, both evaluations and the surgery."""
    from prune.pipeline.orchestrator import preflight
    from prune.pipeline.recipe import load_recipe

    recipe = _recipe(tmp_path, method="partial", last_blocks=7)
    recipe["select"] = {"strategy": "search", "n_layers": 3, "max_perplexity_ratio": 100, "budget": 3}
    with pytest.raises(PruneError, match=r"^heal.last_blocks=7 is more than the 5 blocks left should select.strategy "
                                         r"search remove the 3 of 8 it may .*: lower last_blocks to at most 5, or the "
                                         r"most search may remove \(select.n_layers\) to at most 1"):
        preflight(load_recipe(recipe))
    recipe["heal"]["last_blocks"] = 5
    preflight(load_recipe(recipe))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_gpu_is_refused(tmp_path, tiny_folder):
    from prune.pipeline.orchestrator import preflight
    from prune.pipeline.recipe import load_recipe

    with pytest.raises(PruneError, match="fp16 needs a CUDA GPU"):
        preflight(load_recipe(_recipe(tmp_path, method="lora", mixed_precision="fp16")))


def test_replace_refuses_a_scattered_run(tokenizers_by_bos):
    model = build_model("llama")
    before = snapshot(model)
    with pytest.raises(PruneError, match="one contiguous run"):
        heal_model(model, tokenizers_by_bos[True], "replace", data=C4_DATA, removed=[2, 4], quiet=True, **FAST)
    assert not changed(before, model) and len(decoder_layers(model)) == N_LAYERS


# ---- the recipe stage and prune heal RUN_DIR ---------------------------------------------------------------------
def folder_digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_recipe_with_replace_and_prune_heal_run_dir(tmp_path, tiny_folder, capsys):
    from prune.pipeline.heal_run import heal_run

    result = run(_recipe(tmp_path, method="replace"), quiet=True)
    out = result.out_dir
    record = json.loads((out / "pruning.json").read_text())
    removed = record["removed"]
    assert len(removed) == 3 and record["healing"]["method"] == "replace"
    assert record["layers_after"] == N_LAYERS - 2 == len(record["kept"])
    assert record["healing"]["tokens_seen"] == FAST["steps"] * FAST["batch_size"] * FAST["seq_len"]
    assert "## Healing: replace" in (out / "eval.md").read_text()
    assert "pruned_before_healing" not in json.loads((out / "eval.json").read_text())  # its surgery keeps a block
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == N_LAYERS - 2

    # a plain pruned run (no heal), then healed afterwards: the run folder is only read
    plain = _recipe(tmp_path)
    del plain["heal"]
    plain["output"]["dir"] = str(tmp_path / "plain")
    plain["evaluate"]["fidelity"] = {"top_k": 64}
    run_dir = run(plain, quiet=True).out_dir
    digest = folder_digest(run_dir)
    kwargs = dict(method="replace", data=C4_DATA["path"], field=C4_DATA["field"], rows="0:300",
                  overrides=[f"{k}={v}" for k, v in FAST.items()], quiet=True)
    # pruning.json names a local source by name and sha256 only: it is given again, and checked
    with pytest.raises(PruneError, match="by name only .*--source"):
        heal_run(run_dir, tmp_path / "healed", **kwargs)
    with pytest.raises(PruneError, match=r"^no teacher source: pruning.json records the original model by name only") \
            as err:  # distill says the fix once (it repeated "give it with --source", parentheses doubled)
        heal_run(run_dir, tmp_path / "healed", **{**kwargs, "method": "distill"})
    assert str(err.value).count("--source") == 1 and "))" not in str(err.value)
    with pytest.raises(PruneError, match="is not the model pruning.json records"):
        heal_run(run_dir, tmp_path / "healed", source=str(run_dir), **kwargs)
    capsys.readouterr()
    healed = heal_run(run_dir, tmp_path / "healed", evaluate=True, source=str(tmp_path / "tiny"), **{**kwargs, "quiet": False})
    assert folder_digest(run_dir) == digest
    # a --source the healing never reads (LoRA on the next-token loss, no fidelity) was accepted, unchecked
    with pytest.raises(PruneError, match="which this healing never reads .* drop --source"):
        heal_run(run_dir, tmp_path / "lora", source=str(tmp_path / "tiny"), **{**kwargs, "method": "lora"})
    # the original is loaded once: for the fidelity reference, then rebuilt into the replacement
    assert capsys.readouterr().err.count("loading the original model") == 1
    rec = json.loads((healed / "pruning.json").read_text())
    # the folder name only: an absolute path would publish the machine's layout
    assert rec["healing"]["method"] == "replace" and rec["healing"]["from_run"] == run_dir.name
    # the default init (last_removed) keeps the run's last block as the replacement
    assert rec["kept"] == sorted(set(range(N_LAYERS)) - set(removed[:-1])) and rec["layers_after"] == N_LAYERS - 2
    assert rec["scores_after"]["n_layers"] == N_LAYERS - 2
    ev = json.loads((healed / "eval.json").read_text())
    assert ev["pruned"]["perplexity"]["perplexity"] > 0 and ev["pruned_before_healing"]["perplexity"]
    assert "| perplexity | ppl |" in (healed / "eval.md").read_text()
    # the healed model's fidelity is measured against the run's original, on the run's windows
    fid, before = ev["pruned"]["fidelity"], ev["pruned_before_healing"]["fidelity"]
    assert fid["windows_sha256"] == before["windows_sha256"] and fid["top_k"] == 64 and fid["kl_mean"] > 0
    assert fid["kl_mean"] != before["kl_mean"]  # another model: trained, one block more
    # the reference is the original's, as the run's was (the run folder's model would give another perplexity)
    assert fid["perplexity_original"] == pytest.approx(before["perplexity_original"], rel=1e-5)
    assert "| KL to original (top-64) | mean |" in (healed / "eval.md").read_text()
    assert "method: replace" in (healed / "recipe.yaml").read_text()
    # the healed folder cannot be rebuilt from its source again
    with pytest.raises(PruneError, match="already healed"):
        heal_run(healed, tmp_path / "again", quiet=True)
    # the replacement keeps its source block's index: a later step removing it again records each block once
    assert "one a trained block in place of the removed run" in (healed / "README.md").read_text()
    child = tmp_path / "child"
    assert prune_main("remove", healed, "--blocks", rec["kept"].index(removed[-1]), "-o", child).returncode == 0
    child_rec = json.loads((child / "pruning.json").read_text())
    assert child_rec["removed_original_all"] == sorted(removed) and check_checkpoint(child).ok
    # the card says which kept index is the trained block (it was listed among both removed and kept, unexplained);
    # once a later step removed it, no card says a trained block stands in for the run
    run_words = " ".join(map(str, sorted(removed)))
    assert (f"(block {removed[-1]} here is one trained block in place of the removed run {run_words})"
            in (healed / "README.md").read_text())
    assert "trained block" not in (child / "README.md").read_text().split("## ")[0]
    # a damaged eval.json fails before the training (it failed with a traceback after it)
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "eval.json").write_text("[1]")
    with pytest.raises(PruneError, match="is not the evaluation prune writes"):
        heal_run(damaged, tmp_path / "damaged-healed", source=str(tmp_path / "tiny"), **kwargs)
    assert not (tmp_path / "damaged-healed").exists()
    # the same run edited since pruning: refused, nothing written
    edited = tmp_path / "edited"
    m = AutoModelForCausalLM.from_pretrained(run_dir)
    with torch.no_grad():
        decoder_layers(m)[0].mlp.up_proj.weight.add_(1.0)
    import shutil

    shutil.copytree(run_dir, edited)
    m.save_pretrained(edited)
    with pytest.raises(PruneError, match="differs from the source"):
        heal_run(edited, tmp_path / "bad", quiet=True, method="replace", data=str(C4), field=C4_DATA["field"],
                 source=str(tmp_path / "tiny"))
    assert not (tmp_path / "bad").exists()


def test_an_adapter_heal_is_evaluated_with_its_adapter(tmp_path, tiny_folder):
    """heal.merge: false writes the adapter apart; --evaluate measures the pruned model WITH it (it
    measured the bare pruned model: the run's figures again, reported as healed), and keeps lm-eval's
    files of the run's original and of the healed model, paired (it kept none)."""
    from peft import PeftModel

    from prune.core.config import EvaluateConfig
    from prune.measure.evaluation import evaluate_loaded
    from prune.pipeline.heal_run import heal_run

    plain = _recipe(tmp_path)
    del plain["heal"]
    plain["evaluate"].update(tasks=["copa"], limit=6, data_dir=str(DATA))
    run_dir = run(plain, quiet=True).out_dir
    (tmp_path / "adapter").mkdir()  # an empty folder: --overwrite may replace it
    healed = heal_run(run_dir, tmp_path / "adapter", method="lora", data=C4_DATA["path"], field=C4_DATA["field"],
                      rows="0:300", overrides=[f"{k}={v}" for k, v in FAST.items()] + ["merge=false"], evaluate=True,
                      quiet=True, overwrite=True)
    # this command's --overwrite is not the healed recipe's: a prune run of it would replace the folder unasked
    saved = yaml.safe_load((healed / "recipe.yaml").read_text())
    assert saved["output"]["overwrite"] is False
    # pruning.json's recipe is the one written beside it (it kept the run's: no heal section, the run's folder)
    record = json.loads((healed / "pruning.json").read_text())
    assert record["recipe"]["heal"]["method"] == saved["heal"]["method"] == "lora"
    assert record["recipe"]["output"]["dir"] == saved["output"]["dir"]
    ev = json.loads((healed / "eval.json").read_text())
    base, tok, _ = prune.load(run_dir)
    with_adapter = PeftModel.from_pretrained(base, healed).merge_and_unload()
    want = evaluate_loaded(with_adapter, tok, EvaluateConfig(perplexity=plain["evaluate"]["perplexity"]),
                           quiet=True)["perplexity"]["perplexity"]
    assert ev["pruned"]["perplexity"]["perplexity"] == pytest.approx(want, rel=1e-6)
    assert ev["pruned"]["perplexity"]["perplexity"] != pytest.approx(ev["pruned_before_healing"]["perplexity"]["perplexity"])
    # lm-eval's files of the run's original and of the healed model: paired in eval.md and by prune compare
    assert list((healed / "eval" / "original").glob("samples_copa_local_*.jsonl"))
    assert list((healed / "eval" / "pruned").glob("samples_copa_local_*.jsonl"))
    assert ev["paired"] and ev["paired"][0]["n"] == 6 and "Paired: healed against original" in (healed / "eval.md").read_text()
    assert "each example's score, healed - original;" in (healed / "README.md").read_text()  # both said "pruned"
    # and against the run's pruned model, on the same examples: what the healing won back
    assert list((healed / "eval" / "pruned_before_healing").glob("samples_copa_local_*.jsonl"))
    assert ev["paired_healing"] and ev["paired_healing"][0]["n"] == 6
    assert ev["paired_healing"][0]["mean_a"] == ev["pruned_before_healing"]["tasks"]["copa_local"]["metrics"]["acc"]
    assert "Paired: healed against pruned before healing" in (healed / "eval.md").read_text()
    assert prune_main("compare", healed, check_rc=0).stdout.count("copa_local") >= 1
    # the card tells how to re-make the adapter (prune run refuses merge: false), from the recipe beside it
    card = (healed / "README.md").read_text()
    assert "prune heal PRUNED_RUN --config recipe.yaml" in card and "Re-run with `prune run" not in card
    assert yaml.safe_load((healed / "recipe.yaml").read_text())["heal"]["merge"] is False


def test_cli_heal_partial(tmp_path, tiny_folder):
    plain = _recipe(tmp_path)
    del plain["heal"]
    run_dir = run(plain, quiet=True).out_dir
    digest = folder_digest(run_dir)
    prune_main("heal", run_dir, "--output", tmp_path / "healed", "--method", "partial", "--data", C4, "--field",
               "prefix,gold_completion", "--rows", "0:300", "-q", "--set", "steps=3", "--set", "n_samples=8",
               "--set", "seq_len=32", "--set", "heal.last_blocks=1", check_rc=0)
    assert folder_digest(run_dir) == digest
    rec = json.loads((tmp_path / "healed" / "pruning.json").read_text())
    assert rec["healing"]["method"] == "partial" and rec["healing"]["settings"]["last_blocks"] == 1
    assert rec["healing"]["steps"] == 3 and rec["removed"] == json.loads((run_dir / "pruning.json").read_text())["removed"]
    assert list(rec["stage_seconds"]) == ["pre-flight", "heal", "score"]  # this healing's stages, not the run's
    AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    # bad input: one error line, exit 2, nothing written
    bad = prune_main("heal", run_dir, "--output", tmp_path / "bad", "--method", "lora", "--set", "rank=0", "--data", C4)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "rank must be at least 1" in bad.stderr
    # heal's --set takes heal's keys: its example is one (it said "e.g. --set select.n_layers=8", a recipe key)
    bad = prune_main("heal", run_dir, "--output", tmp_path / "bad", "--method", "lora", "--set", "steps", "--data", C4)
    assert bad.stderr == "error: --set 'steps' is not key=value (e.g. --set steps=200)\n"
    bad = prune_main("heal", run_dir, "--output", tmp_path / "bad", "--config", tmp_path / "nope.yaml", "--data", C4)
    assert bad.stderr == (f"error: heal config not found: {tmp_path / 'nope.yaml'} (check the path: --config takes a "
                          "recipe with a heal section, or a YAML file of heal's keys)\n")
    same = prune_main("heal", run_dir, "--output", run_dir, "--method", "lora", "--data", C4)
    assert same.returncode == 2 and "is the run folder" in same.stderr
    assert not (tmp_path / "bad").exists()


def test_heal_run_dir_whose_calibration_file_was_recorded_by_name(tmp_path, tiny_folder, monkeypatch):
    """Without $PRUNE_DATA_DIR a data file outside the working folder is written as <local>/name:
    healing that run folder asks for the file (one line, before loading), then takes it."""
    from prune.core.errors import PruneError
    from prune.pipeline.heal_run import heal_run

    monkeypatch.delenv("PRUNE_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    plain = _recipe(tmp_path)
    del plain["heal"]
    run_dir = run(plain, quiet=True).out_dir
    assert f"<local>/{WIKI_RAW.name}" in (run_dir / "recipe.yaml").read_text()
    options = dict(method="partial", data=C4_DATA["path"], field=C4_DATA["field"], rows=C4_DATA["rows"], quiet=True,
                   overrides=["steps=2", "n_samples=8", "seq_len=32", "heal.last_blocks=1"])
    with pytest.raises(PruneError, match="--calibration-data PATH") as err:
        heal_run(run_dir, tmp_path / "healed", **options)
    assert "\n" not in str(err.value) and not (tmp_path / "healed").exists()
    with pytest.raises(PruneError, match="file not found"):
        heal_run(run_dir, tmp_path / "healed", calibration=str(tmp_path / "elsewhere" / WIKI_RAW.name), **options)
    # another text was taken silently: the scores after on it, the record naming the run's
    with pytest.raises(PruneError, match=f"the run was scored on {WIKI_RAW.name}"):
        heal_run(run_dir, tmp_path / "healed", calibration=str(C4_DATA["path"]), **options)
    healed = heal_run(run_dir, tmp_path / "healed", calibration=str(WIKI_RAW), **options)
    rec = json.loads((healed / "pruning.json").read_text())
    assert rec["healing"]["method"] == "partial" and rec["layers_after"] == N_LAYERS - 3 == rec["scores_after"]["n_layers"]
    assert rec["healing"]["warmup_steps"] == 1  # ceil(5% of its steps): recorded with the schedule it ran


def test_learning_rate_schedule_never_spends_a_step_at_rate_zero():
    """Warmup (step + 1) / (warmup + 1) over ceil(5% of the steps), then cosine towards 0 or flat: no
    optimizer step at rate 0, so ``steps: 1`` trains (transformers' warmup gave that step rate 0)."""
    from torch.utils.data import TensorDataset

    from prune.heal.methods import heal_config
    from prune.heal.training import make_scheduler, train

    def factors(schedule, steps=40):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer, steps, schedule)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    cosine = factors("cosine")
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warmup over ceil(5% of 40) = 2 steps
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and 0 < cosine[-1] < 0.01
    assert factors("constant")[2:] == [1.0] * 38
    assert factors("cosine", steps=1) == [0.5]

    module = torch.nn.Linear(3, 1)
    weight = module.weight.detach().clone()
    train(module, list(module.parameters()), TensorDataset(torch.randn(4, 3)),
          lambda m, batch: (m(batch[0]) - 5).pow(2).mean(),
          heal_config("lora", steps=1, batch_size=2, learning_rate=0.1), tokens_per_item=1, quiet=True)
    assert not torch.equal(module.weight, weight)


def test_loraplus_puts_b_in_its_own_faster_group_and_train_honours_group_rates():
    """LoRA+ (``loraplus_ratio``): exactly the B matrices learn at ratio x the rate; ``train`` keeps
    each group's own rate (a group at rate 0 does not move while the other does)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import TensorDataset

    from prune.heal.methods import heal_config, lora_param_groups
    from prune.heal.training import train

    peft_model = get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules="all-linear"))
    cfg = heal_config("lora", learning_rate=1e-3, loraplus_ratio=8.0)
    base, fast = lora_param_groups(peft_model, cfg)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert fast["lr"] == pytest.approx(8e-3) and "lr" not in base
    assert fast["params"] and all(".lora_B." in names[id(p)] for p in fast["params"])
    assert all(".lora_A." in names[id(p)] for p in base["params"])
    trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
    assert {id(p) for p in base["params"] + fast["params"]} == trainable
    assert len(lora_param_groups(peft_model, heal_config("lora"))) == 1

    module = torch.nn.Linear(3, 1)
    weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
    train(module, [{"params": [module.weight], "lr": 0.0}, {"params": [module.bias]}],
          TensorDataset(torch.randn(8, 3)), lambda m, batch: (m(batch[0]) - 5).pow(2).mean(),
          heal_config("lora", steps=4, batch_size=2, learning_rate=0.1), tokens_per_item=1, quiet=True)
    assert torch.equal(module.weight, weight) and not torch.equal(module.bias, bias)


@pytest.mark.parametrize("share, n_avg", [(0.0, 0), (0.5, 5), (0.25, 3)])
def test_weight_averaging_returns_the_mean_of_the_last_steps(share, n_avg):
    """``heal.average``: the trained parameters end as the mean of their values after each of the last
    ceil(share x steps) optimizer steps (the callback sees every step's weights); 0 keeps the last step's."""
    from torch.utils.data import TensorDataset

    from prune.heal.methods import heal_config
    from prune.heal.training import train

    module = torch.nn.Linear(3, 1)
    seen = []
    log = train(module, list(module.parameters()), TensorDataset(torch.randn(8, 3)),
                lambda m, batch: (m(batch[0]) - 5).pow(2).mean(),
                heal_config("lora", steps=10, batch_size=2, learning_rate=0.1, average=share), tokens_per_item=1,
                quiet=True, callback=lambda step, tokens: seen.append([p.detach().clone() for p in module.parameters()]))
    assert log["averaged_steps"] == n_avg and len(seen) == 10
    tail = seen[-n_avg:] if n_avg else seen[-1:]
    for i, p in enumerate(module.parameters()):
        want = torch.stack([s[i] for s in tail]).mean(0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-6)
    assert n_avg < 2 or not torch.equal(module.weight, seen[-1][0])  # the average is not the last step


def test_weight_averaging_with_fsdp_is_refused():
    from prune.heal.methods import heal_config
    from prune.heal.training import check_parallel

    with pytest.raises(PruneError, match="heal.average is not supported with heal.fsdp"):
        check_parallel(heal_config("lora", fsdp=True, average=0.5))


def test_averaged_healing_is_recorded_on_the_card(tokenizers_by_bos):
    from prune.heal.methods import healing_markdown

    model = build_model("llama")
    prune.remove_layers(model, RUN)
    rec = heal_model(model, tokenizers_by_bos[True], "lora", data=C4_DATA, quiet=True, average=0.5, **FAST)
    assert rec["averaged_steps"] == 5 and rec["settings"]["average"] == 0.5
    assert "- weights averaged over the last 5 of 10 steps" in healing_markdown(rec)
    # the card names the text's fields (lists of plain values were left out of its bullets)
    from prune.export.card import healing_text

    text = healing_text(rec)
    assert "field = ['prefix', 'gold_completion']" in text
    # the card says what the healing did in words first (eval.md's lines; it listed the record's fields, losses and
    # all), the record's fields folded below; a record's strings escaped (a path may hold anything)
    summary, fields = text.split("<details>")
    assert "- weights averaged over the last 5 of 10 steps" in summary and "averaged_steps: 5" not in summary
    assert "- averaged_steps: 5" in fields and fields.rstrip().endswith("(details in `pruning.json` → `healing`).")
    hostile = {**rec, "data": {**rec["data"], "path": "</details><script>x</script>"}}
    assert "<script>" not in healing_text(hostile) and "&lt;script&gt;" in healing_text(hostile)
    for odd in ("cpu\\`<img src=x onerror=alert(1)>\\`", "``<b>bold</b>`"):  # backticks CommonMark reads as text
        text = healing_text({**rec, "device": odd, "data": {**rec["data"], "path": odd}})
        assert "<img" not in text and "<b>" not in text, text
    # a record without the summary's fields (an older one, or edited) is listed field by field, nothing folded
    older = {k: v for k, v in rec.items() if k != "trained"}
    assert "<details>" not in healing_text(older) and "- averaged_steps: 5" in healing_text(older)


def test_prune_heal_cuts_every_text_before_loading_a_model(tmp_path, tiny_folder, monkeypatch):
    """Too little training text failed after the run's model (and the original) loaded, and a perplexity slice
    that selects nothing after the training: every window the heal reads is cut in its pre-flight."""
    import yaml

    import prune.model.loading as loading
    from prune.pipeline.heal_run import heal_run

    plain = _recipe(tmp_path)
    del plain["heal"]
    run_dir = run(plain, quiet=True).out_dir

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the texts were checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "a few words"}\n')
    kwargs = dict(method="lora", overrides=[f"{k}={v}" for k, v in FAST.items()], quiet=True)
    with pytest.raises(PruneError, match="heal text too short"):
        heal_run(run_dir, tmp_path / "a", data=str(short), **kwargs)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["evaluate"]["perplexity"]["rows"] = "9000:"
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(PruneError, match="rows='9000:' selects none"):
        heal_run(run_dir, tmp_path / "b", data=C4_DATA["path"], field=C4_DATA["field"], rows=C4_DATA["rows"],
                 evaluate=True, **kwargs)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_heal_config_of_a_config_validates_the_keywords_and_takes_data():
    """A HealConfig passed with keywords was copied without validation (a bad value failed deep in training)
    and data= was dropped; prune.save left the caller's PruningRecord changed."""
    from prune.core.records import PruningRecord
    from prune.export.lineage import as_record

    cfg = HealConfig(method="lora", steps=2)
    with pytest.raises(PruneError, match="steps"):
        heal_config(cfg, steps="x")
    given = heal_config(cfg, data=C4_DATA["path"], rank=4)
    assert given.data.path == C4_DATA["path"] and given.rank == 4 and given.steps == 2 and cfg.rank != 4
    assert heal_config(HealConfig(method="partial", data={"path": "a.txt"})).data.path == "a.txt"
    record = PruningRecord(removed=[1])
    copy = as_record(record)
    copy.command = "save"
    assert record.command is None


def test_heal_evaluate_checks_the_chat_template_before_training(tmp_path, tiny_folder, monkeypatch):
    """``prune heal --evaluate`` with lm-eval tasks and ``apply_chat_template`` on a tokenizer without a
    template is refused before any training (lm-eval failed with a traceback after it)."""
    from prune.pipeline.heal_run import heal_run

    plain = _recipe(tmp_path)
    del plain["heal"]
    run_dir = run(plain, quiet=True).out_dir
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["evaluate"].update(tasks=["copa"], limit=4, data_dir=str(DATA), apply_chat_template=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr("prune.pipeline.heal_run.heal_lora", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(PruneError, match="the tokenizer has no chat template"):
        heal_run(run_dir, tmp_path / "healed", method="lora", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows="0:300", overrides=[f"{k}={v}" for k, v in FAST.items()], evaluate=True, quiet=True)
    assert not (tmp_path / "healed").exists()


@pytest.mark.parametrize("method", ["bridge", "lora"])
def test_a_model_offloaded_to_disk_is_refused_before_scoring_when_it_heals(tmp_path, tiny_folder, method, monkeypatch):
    """Weights offloaded to disk sit on the meta device: a bridge folded into them changed nothing (the run kept
    the unhealed weights and its card said a bridge was folded in), and LoRA was refused after scoring, selection
    and both evaluations."""
    import prune.pipeline.engines as E

    recipe = _recipe(tmp_path, method=method, objective="lm")
    recipe["model"].update(device_map="auto", max_memory={"cpu": "300KiB"}, offload_folder=str(tmp_path / "offload"))
    monkeypatch.setattr(E, "score", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(PruneError, match="^healing changes weights, but part of this model is offloaded by Accelerate \(to disk or CPU\)"):
        run(recipe, quiet=True)
    assert not (tmp_path / "out").exists()


def test_heal_evaluate_refuses_a_task_version_the_run_did_not_use_and_keeps_a_model_it_cannot_pair(
        tmp_path, tiny_folder, monkeypatch, capsys):
    """The run's original was evaluated on COPA; ``prune heal --evaluate`` evaluates the healed model on this
    version's task copy. Another task version is refused before training (it was refused after training and
    evaluation, the healed model lost); prompts that differ beyond the version (a changed chat template) leave
    the paired comparison out with a note, and the healed model is saved."""
    import json

    from prune.pipeline.heal_run import heal_run

    plain = _recipe(tmp_path)
    del plain["heal"]
    plain["evaluate"].update(tasks=["copa"], limit=4, data_dir=str(DATA))
    run_dir = run(plain, quiet=True).out_dir
    [results] = (run_dir / "eval" / "original").glob("results_*.json")
    data = json.loads(results.read_text())
    now = str(data["versions"]["copa_local"])
    data["versions"]["copa_local"] = "0.5"
    results.write_text(json.dumps(data))
    heal = dict(method="lora", data=C4_DATA["path"], field=C4_DATA["field"], rows="0:300",
                overrides=[f"{k}={v}" for k, v in FAST.items()], evaluate=True, quiet=True)
    with monkeypatch.context() as m:
        m.setattr("prune.pipeline.heal_run.heal_lora", lambda *a, **k: pytest.fail("trained before the check"))
        with pytest.raises(PruneError, match=rf"^copa_local: task version 0.5 in the run's original \(eval/original\), "
                                             rf"{now} in this version of prune: .* heal without --evaluate"):
            heal_run(run_dir, tmp_path / "healed", **heal)
    data["versions"]["copa_local"] = now
    results.write_text(json.dumps(data))
    [samples] = (run_dir / "eval" / "original").glob("samples_copa_local_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps({**r, "prompt_hash": "0" * 64}) + "\n" for r in records))
    capsys.readouterr()
    healed = heal_run(run_dir, tmp_path / "healed", **heal)
    err = capsys.readouterr().err
    assert "note: the paired comparison of the healed model with the original is left out: copa_local: example 0 " \
           "differs between the original and the healed model (another prompt" in err
    saved = json.loads((healed / "eval.json").read_text())
    assert saved["paired"] == [] and saved["paired_healing"] and (healed / "model.safetensors").is_file()


def test_a_new_method_does_not_inherit_the_runs_objective_and_bridge(tmp_path):
    """The run's recipe.yaml holds its whole heal section (objective: distill, bridge: down, ...): `prune heal
    --method lora` kept them, and so distilled (or refused for want of a teacher) where plain LoRA was asked."""
    from prune.pipeline.heal_run import heal_settings

    data = {"path": str(C4), "field": "prefix"}
    recipe = {"heal": {"method": "lora", "objective": "distill", "bridge": "down", "rank": 4,
                       "data": data}}
    cfg = heal_settings(recipe, method="lora")
    assert (cfg.method, cfg.objective, cfg.bridge, cfg.rank) == ("lora", "lm", "none", 4)  # the rest is kept
    assert heal_settings(recipe).objective == "distill"  # no --method: the run's settings stand
    assert heal_settings(recipe, method="lora", overrides=["objective=distill"]).objective == "distill"
    # the method named in a --config or by --set, as by --method (they kept the run's distillation and bridge)
    config = tmp_path / "partial.yaml"
    config.write_text("method: partial\n")
    cfg = heal_settings(recipe, config=str(config))
    assert (cfg.method, cfg.objective, cfg.bridge) == ("partial", "lm", "none")
    cfg = heal_settings(recipe, overrides=["heal.method=partial"])
    assert (cfg.method, cfg.objective, cfg.bridge) == ("partial", "lm", "none")



def test_a_runs_teacher_cache_is_reused_where_it_is_and_never_written_at_its_recorded_path(tmp_path, monkeypatch):
    """A run's recipe.yaml records its teacher cache relative to where the run ran: `prune heal` from another
    folder computed and wrote a new cache there, in the working folder."""
    from prune.pipeline.heal_run import heal_settings

    recipe = {"heal": {"method": "distill", "teacher": "cache", "teacher_cache": "c5.safetensors",
                       "data": {"path": str(C4), "field": "prefix"}}}
    monkeypatch.chdir(tmp_path)
    assert heal_settings(recipe).teacher_cache is None  # not here: the default beside the output
    (tmp_path / "c5.safetensors").write_bytes(b"")
    assert heal_settings(recipe).teacher_cache == "c5.safetensors"  # here: reused (checked when it is read)
    assert heal_settings({"heal": {**recipe["heal"], "teacher_cache": "<local>/c5.safetensors"}}).teacher_cache is None
    assert heal_settings(recipe, overrides=["teacher_cache=new.safetensors"]).teacher_cache == "new.safetensors"


def test_heal_model_refuses_an_adapter_it_would_drop(tokenizers_by_bos, monkeypatch):
    """``heal_model(..., merge=False)`` trained the adapter and dropped it: the weights were unchanged, and the
    record reported the trained adapter's held-out loss. Refused before any training (every method trains
    through ``prune.heal.training.train``, imported where it is called)."""
    import prune.heal.training

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the refusal")

    monkeypatch.setattr(prune.heal.training, "train", no_training)
    model = build_model("llama")
    before = snapshot(model)
    with pytest.raises(PruneError, match="merge=False keeps the LoRA adapter apart"):
        heal_model(model, tokenizers_by_bos[True], "lora", data=C4_DATA, merge=False, **FAST)
    assert not changed(before, model)


def test_the_healed_table_escapes_names_and_names_the_model_healing_started_from():
    """A task name with | or a newline split the eval.md row (the run's table escaped it, this one did not); a
    folder healed a second time showed its first healing's figures under 'pruned'."""
    from prune.core.tables import healed_markdown

    def result(value):
        return {"tasks": {"my|task\nx": {"metrics": {"acc": value}, "stderr": {}}}}

    counts = {"params_before": 10, "params_after": 8, "layers_before": 8, "layers_after": 6}
    table = healed_markdown(result(0.5), result(0.3), result(0.4), counts, "before this healing (healed once)")
    header, _, row = table.splitlines()[:3]
    assert "| original | before this healing (healed once) | healed |" in header
    assert row.startswith("| my\\|task x | acc | 0.5000 | 0.3000 | 0.4000 |"), row


def test_a_run_that_heals_measures_the_pruned_model_before_healing(tmp_path, tiny_folder):
    """A run with heal: measured the original and the healed model only, so what the healing won back was not shown:
    the pruned model is measured between the surgery and the healing, as a run without heal measures it. Its paired
    comparison with the original names the healed model so (eval.md and the card said "pruned")."""
    recipe = _recipe(tmp_path, method="lora")
    recipe["evaluate"].update(tasks=["copa"], limit=6, data_dir=str(DATA))
    healed = run(recipe, quiet=True)
    assert "## Paired: healed against original" in (healed.out_dir / "eval.md").read_text()
    assert "each example's score, healed - original;" in (healed.out_dir / "README.md").read_text()
    plain = _recipe(tmp_path)
    del plain["heal"]
    plain["output"]["dir"] = str(tmp_path / "plain")
    unhealed = run(plain, quiet=True)
    ev = json.loads((healed.out_dir / "eval.json").read_text())
    want = json.loads((unhealed.out_dir / "eval.json").read_text())["pruned"]["perplexity"]["perplexity"]
    assert ev["pruned_before_healing"]["perplexity"]["perplexity"] == pytest.approx(want, rel=1e-6)
    assert ev["pruned"]["perplexity"]["perplexity"] != pytest.approx(want, rel=1e-6)
    assert "| original | pruned before healing | healed |" in (healed.out_dir / "eval.md").read_text()



def test_the_record_names_the_cpu_as_one_process_does_under_a_launch():
    """Accelerate's device is ``cpu:0`` under a launch and ``cpu`` in one process: the healing records (and the
    card, eval.md) of the two differed."""
    from prune.heal.training import device_name

    assert device_name(torch.device("cpu:0")) == device_name(torch.device("cpu")) == "cpu"
    assert device_name(torch.device("cuda:1")) == "cuda:1"


def test_heal_evaluate_says_when_the_runs_original_ran_another_lm_eval(capsys):
    """The pre-flight compared task versions and few-shot counts, and named another lm-eval version to nobody (the
    note was silenced, and this version's side had none)."""
    import json

    from prune.pipeline.heal_run import check_run_tasks_unchanged

    results = json.dumps({"versions": {"copa_local": 2.0}, "n-shot": {"copa_local": 0}, "lm_eval_version": "0.4.0"})
    check_run_tasks_unchanged({"results_2026-01-01T00-00-00.json": results}, {"copa_local": ("2.0", "0")})
    assert "lm-eval 0.4.0 in the run's original (eval/original)" in capsys.readouterr().err
    check_run_tasks_unchanged({"results_2026-01-01T00-00-00.json": results}, {"copa_local": ("2.0", "0")}, quiet=True)
    assert capsys.readouterr().err == ""
