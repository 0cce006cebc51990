"""Healing by distillation (prune.heal.distill) on tiny fixture models.

The loss is checked against a direct, per-token KL computation; the top-k cache against the
in-memory teacher (exact at k = vocab; within a stated tolerance for a peaked teacher at
k < vocab); distillation with LoRA, partial fine-tuning and the replacement block brings the
student closer to the teacher and leaves a checkpoint plain transformers reloads; a teacher
or cache that does not match the student is refused with one line, before any training.
"""

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.heal.distill import kl_loss, make_loss, topk_kl_loss
from prune.heal.teacher import (
    Teacher,
    TopkCache,
    block_pairs,
    build_cache,
    free_memory,
    model_bytes,
    recorded_pairs,
    teacher_kind,
    teacher_need,
    tokenizer_fingerprint,
)
from prune.heal.methods import heal_config, heal_model, training_windows
from prune.measure.fidelity import token_kl
from prune.model.loading import decoder_layers
from prune.pipeline.orchestrator import run

from conftest import N_LAYERS, VOCAB, WIKI_RAW, build_model, prune_main
from test_heal import C4_DATA, FAST, RUN, save_reload_same_logits

KEPT = [i for i in range(N_LAYERS) if i not in RUN]


def float64_grad(student, loss_of):
    """``(loss, d loss / d student)`` of ``loss_of(z)``, a direct formula, by autograd in float64."""
    z = student.double().requires_grad_(True)
    loss = loss_of(z)
    loss.backward()
    return float(loss), z.grad


def direct_kl(student_logits, teacher_logits, T):
    """T^2 * mean over tokens of sum_v p_t(v) * (log p_t(v) - log p_s(v)), one token at a time in float64."""
    s = student_logits.double().reshape(-1, student_logits.shape[-1]) / T
    t = teacher_logits.double().reshape(-1, teacher_logits.shape[-1]) / T
    total = 0.0
    for zs, zt in zip(s, t):
        log_ps = zs - torch.logsumexp(zs, 0)
        log_pt = zt - torch.logsumexp(zt, 0)
        total += float((log_pt.exp() * (log_pt - log_ps)).sum())
    return T * T * total / s.shape[0]


def pruned_pair(peak: float = 1.0):
    """(teacher = full fixture Llama, student = the same with RUN removed); ``peak`` scales the final
    norm, i.e. the logits, to make the teacher's distributions peaked like a trained LM's."""
    teacher = build_model("llama")
    with torch.no_grad():
        teacher.model.norm.weight.mul_(peak)
    student = copy.deepcopy(teacher)
    prune.remove_layers(student, RUN)
    return teacher, student


def windows_of(tok, **settings):
    return training_windows(tok, heal_config("lora", C4_DATA, **{**FAST, **settings}))


# ---- the loss ----------------------------------------------------------------------------------------------
def test_fp16_gradient_survives_a_loss_scale():
    """Under fp16 mixed precision GradScaler multiplies the loss by 65536 (more than fp16 holds) and the
    gradient of a mean over 1024 positions is (q - p) / 1024 (below fp16's range for most tokens):
    neither is rounded to fp16 on its own, so the scaled gradient is finite and close to float32's."""
    torch.manual_seed(0)
    zs, zt = torch.randn(1, 1024, 256) * 3, torch.randn(1, 1024, 256) * 3
    scale = torch.tensor(65536.0)
    full = zs.clone().requires_grad_(True)
    kl_loss(full, zt).backward(scale)
    half = zs.half().requires_grad_(True)
    kl_loss(half, zt.half()).backward(scale)
    assert half.grad.dtype == torch.float16 and torch.isfinite(half.grad).all()
    torch.testing.assert_close(half.grad.float(), full.grad, rtol=2e-2, atol=1e-3 * float(full.grad.abs().max()))
    assert (half.grad == 0).float().mean() < 0.01  # no mass underflow to 0


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_loss_equals_a_direct_kl_computation(T, tokenizers_by_bos):
    torch.manual_seed(0)
    zs, zt = torch.randn(2, 5, VOCAB) * 3, torch.randn(2, 5, VOCAB) * 3
    assert float(kl_loss(zs, zt, T)) == pytest.approx(direct_kl(zs, zt, T), rel=1e-5, abs=1e-7)
    assert float(kl_loss(zt, zt, T)) == pytest.approx(0.0, abs=1e-6)
    # its gradient (written chunk by chunk in the forward pass, 3 positions at a time: uneven chunks)
    # equals autograd's through the direct float64 formula, for float32 logits and (to bf16's
    # precision) bf16 ones
    def direct_grad(student, teacher):
        t = F.log_softmax(teacher.double() / T, -1)
        return float64_grad(student, lambda z: T ** 2 * (t.exp() * (t - F.log_softmax(z / T, -1))).sum(-1).mean())[1]

    want = direct_grad(zs, zt)
    for rows in (3, None):
        z = zs.clone().requires_grad_(True)
        kl_loss(z, zt, T, rows=rows).backward()
        torch.testing.assert_close(z.grad.double(), want, rtol=1e-4, atol=1e-7)
    half = zs.bfloat16().requires_grad_(True)
    kl_loss(half, zt.bfloat16(), T, rows=4).backward()
    assert half.grad.dtype == torch.bfloat16
    want = direct_grad(zs.bfloat16(), zt.bfloat16())
    torch.testing.assert_close(half.grad.double(), want, rtol=1e-2, atol=1e-3 * float(want.abs().max()))
    # the training loss on a real batch: the student's and teacher's own logits
    teacher, student = pruned_pair()
    train_w, _ = windows_of(tokenizers_by_bos[True])
    ids = train_w[:2]
    cfg = heal_config("distill", C4_DATA, temperature=T, **FAST)
    loss = make_loss(cfg, Teacher("memory", "t", teacher, pairs=block_pairs(KEPT)), decoder_layers(student))
    got = float(loss(student, [ids, torch.arange(2)]))
    with torch.no_grad():
        want = direct_kl(student(ids).logits, teacher(ids).logits, T)
    assert got == pytest.approx(want, rel=1e-5)
    # the hidden-state and next-token terms add with their weights
    cfg2 = cfg.model_copy(update={"hidden_weight": 0.5, "lm_weight": 0.25})
    loss2 = make_loss(cfg2, Teacher("memory", "t", teacher, pairs=block_pairs(KEPT)), decoder_layers(student))
    with torch.no_grad():
        s_out = student(ids, labels=ids, output_hidden_states=True)
        t_out = teacher(ids, output_hidden_states=True)
    # hidden_states[j + 1] is block j's output for every block but the last (normed there): compare the others
    mse = [torch.nn.functional.mse_loss(s_out.hidden_states[j + 1], t_out.hidden_states[o + 1])
           for j, o in enumerate(KEPT[:-1])]
    last = None

    def hook(_m, _a, out):
        nonlocal last
        last = out[0] if isinstance(out, tuple) else out

    handles = [decoder_layers(m)[-1].register_forward_hook(hook) for m in (student, teacher)]
    outs = []
    with torch.no_grad():
        for m in (student, teacher):
            m(ids)
            outs.append(last)
    for h in handles:
        h.remove()
    mse.append(torch.nn.functional.mse_loss(outs[0], outs[1]))
    want2 = want + 0.5 * float(torch.stack(mse).mean()) + 0.25 * float(s_out.loss)
    assert float(loss2(student, [ids, torch.arange(2)])) == pytest.approx(want2, rel=1e-5)
    # hidden_loss relative: each token's squared error over the original state's squared norm, averaged
    pairs = [(s_out.hidden_states[j + 1], t_out.hidden_states[o + 1]) for j, o in enumerate(KEPT[:-1])] + [tuple(outs)]
    rel = [float(((a - b) ** 2).sum(-1).div((b ** 2).sum(-1)).mean()) for a, b in pairs]
    cfg3 = cfg2.model_copy(update={"hidden_loss": "relative"})
    loss3 = make_loss(cfg3, Teacher("memory", "t", teacher, pairs=block_pairs(KEPT)), decoder_layers(student))
    want3 = want + 0.5 * sum(rel) / len(rel) + 0.25 * float(s_out.loss)
    assert float(loss3(student, [ids, torch.arange(2)])) == pytest.approx(want3, rel=1e-5)
    assert abs(want3 - want2) > 1e-3  # the two hidden terms differ here


def test_topk_cache_reproduces_the_in_memory_teacher_loss(tokenizers_by_bos, tmp_path):
    """k = vocab: equal to 1e-5. k = 32 of 256 with a peaked teacher (logits x 12, top-32 mass >= 99.5% at every token):
    within 1% + 1e-3 at T = 1 and 2 (the stated tolerance; measured -0.004% at T = 1, +0.34% at T = 2, where the
    renormalised teacher measured +0.002% and +0.7%: the tail is one bucket, whose tempering a higher T lifts).
    A teacher that is not peaked: at T = 1 the cache's KL is at most the full KL (a lower bound)."""
    tok = tokenizers_by_bos[True]
    train_w, val_w = windows_of(tok)
    for peak, k, rel, abs_ in [(1.0, VOCAB, 1e-5, 1e-6), (12.0, 32, 1e-2, 1e-3)]:
        teacher, student = pruned_pair(peak)
        cache = build_cache(teacher, tok, train_w, val_w, k, tmp_path / f"top{k}.safetensors", "t", quiet=True)
        cache = TopkCache.load(cache.path)  # what a later run reads
        assert cache.k == k and cache.bytes == (tmp_path / f"top{k}.safetensors").stat().st_size
        if k < VOCAB:
            mass = cache.tensors["logprobs"].exp().sum(-1)
            assert float(mass.min()) > 0.995
        for T in (1.0, 2.0):
            cfg = heal_config("distill", C4_DATA, temperature=T, **FAST)
            rows = torch.arange(4)
            mem = make_loss(cfg, Teacher("memory", "t", teacher), decoder_layers(student))(student, [train_w[:4], rows])
            top = make_loss(cfg, Teacher("cache", "t", cache=cache), decoder_layers(student))(student, [train_w[:4], rows])
            assert float(top) == pytest.approx(float(mem), rel=rel, abs=abs_), (peak, k, T)
    # a teacher that is not peaked (its top 32 of 256 hold far less than all): at T = 1 a lower bound of the KL
    teacher, student = pruned_pair()
    cache = build_cache(teacher, tok, train_w, val_w, 32, tmp_path / "flat.safetensors", "t", quiet=True)
    cfg = heal_config("distill", C4_DATA, **FAST)
    mem = make_loss(cfg, Teacher("memory", "t", teacher), decoder_layers(student))(student, [train_w[:4], torch.arange(4)])
    top = make_loss(cfg, Teacher("cache", "t", cache=cache), decoder_layers(student))(student, [train_w[:4], torch.arange(4)])
    assert float(cache.tensors["logprobs"].exp().sum(-1).mean()) < 0.5
    assert 0 < float(top) <= float(mem)  # 0.10 against 0.24 (the renormalised teacher measured 1.74, 7x the KL)
    # the KL a healing record reports against that cache: prune compare's measure, 0 for the teacher itself
    from prune.heal.distill import fidelity

    itself = fidelity(copy.deepcopy(teacher), Teacher("cache", "t", cache=cache), val_w)
    assert itself["kl"] < 1e-6 and itself["top1"] == 1.0  # renormalised over the top 32 it recorded 0.03 nats
    measured = fidelity(student, Teacher("cache", "t", cache=cache), val_w)
    with torch.no_grad():
        logq = torch.log_softmax(student(val_w).logits.float(), -1)
    lp, ix = cache.tensors["val_logprobs"], cache.tensors["val_indices"]
    assert measured["kl"] == pytest.approx(float(token_kl(lp, ix, logq).mean()), rel=1e-4)
    # the top-k formula itself at k = vocab is the full KL
    zs, zt = torch.randn(3, VOCAB), torch.randn(3, VOCAB)
    lp, ix = torch.log_softmax(zt, -1).topk(VOCAB, -1)
    assert float(topk_kl_loss(zs, lp, ix, 2.0)) == pytest.approx(float(kl_loss(zs, zt, 2.0)), rel=1e-5)
    # k < vocab: the KL over the k tokens and one bucket for the rest. A student equal to the teacher scores 0 with
    # no gradient (renormalising the teacher over its k scored 0.12 nats here and pulled the tail onto them); at
    # T = 1 it is at most the full KL and equals prune compare's measure (token_kl)
    zs, zt = torch.randn(2, 3, VOCAB) * 3, torch.randn(2, 3, VOCAB) * 3
    lp, ix = torch.log_softmax(zt, -1).topk(8, -1)
    same = zt.clone().requires_grad_(True)
    assert float(topk_kl_loss(same, lp, ix)) == pytest.approx(0.0, abs=1e-6)
    topk_kl_loss(same, lp, ix).backward()
    assert float(same.grad.abs().max()) < 1e-6
    bucketed = float(topk_kl_loss(zs, lp, ix))
    assert bucketed < float(kl_loss(zs, zt))
    assert bucketed == pytest.approx(float(token_kl(lp, ix, torch.log_softmax(zs, -1)).mean()), rel=1e-5)
    # and its gradient (k = 8 of the vocabulary, 2 positions per chunk) is autograd's through the bucket formula
    for T in (1.0, 2.0):
        tail = torch.log1p(-torch.logsumexp(lp.double(), -1, keepdim=True).exp())
        b = torch.log_softmax(torch.cat([lp.double(), tail], -1) / T, -1)

        def formula(z):
            s_k = torch.log_softmax(z / T, -1).gather(-1, ix)
            buckets = torch.cat([s_k, torch.log1p(-s_k.exp().sum(-1, keepdim=True))], -1)
            return T ** 2 * (b.exp() * (b - buckets)).sum(-1).mean()

        want, want_grad = float64_grad(zs, formula)
        z2 = zs.clone().requires_grad_(True)
        got = topk_kl_loss(z2, lp, ix, T, rows=2)
        got.backward()
        assert float(got) == pytest.approx(want, rel=1e-5)
        torch.testing.assert_close(z2.grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_sequential_topk_equals_the_loaded_model(tokenizers_by_bos, tmp_path):
    """The out-of-core teacher (one block in memory at a time, 3 windows per pass) gives the top-k of the loaded model,
    on every architecture whose output tail scales or caps the logits (Granite's logits_scaling and Cohere's
    logit_scale were left out: the cache 2x and 16x too sharp; Gemma2/3's final softcap was refused) and on one of
    each block layout (the blocks run one at a time as sequential scoring runs them, tested on every architecture)."""
    from transformers import AutoConfig

    from conftest import ARCH_CONFIGS, ARCHS, BOS_ARCHS

    from prune.heal.teacher import topk_logprobs, topk_logprobs_sequential

    tails = ("logits_scaling", "logit_scale", "final_logit_softcapping")
    scaled = [a for a in ARCHS if any(getattr(AutoConfig.for_model(a, **ARCH_CONFIGS[a]), k, None) not in (None, 1, 1.0)
                                      for k in tails)]
    layouts = ["llama", "gpt2", "gpt_neox", "phi", "qwen3_next", "lfm2", "deepseek_v3", "gpt_oss", "llama4_text"]
    assert {"granite", "cohere", "gemma2"} <= set(scaled)
    for arch in dict.fromkeys(scaled + layouts):
        tok = tokenizers_by_bos[arch in BOS_ARCHS]
        overrides = {"logits_scaling": 4.0} if arch == "granite" else {"final_logit_softcapping": 0.5} if arch == "gemma2" else {}
        folder = prune.save(build_model(arch, **overrides), tok, tmp_path / arch)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        train_w, _ = windows_of(tok, n_samples=5)
        lp, ix = topk_logprobs(model, train_w, 8)
        slp, six = topk_logprobs_sequential(folder, train_w, 8, batch_size=2, windows_per_pass=3)
        assert torch.allclose(lp, slp, atol=1e-5), arch
        assert (ix == six).float().mean() > 0.999, arch
    # a bfloat16 checkpoint, healed in float32: the cache is computed in the student's dtype, like a loaded teacher
    tok = tokenizers_by_bos[True]
    train_w, _ = windows_of(tok, n_samples=7)
    half = prune.save(build_model("llama").to(torch.bfloat16), tok, tmp_path / "teacher-bf16")
    student = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32).eval()
    cache = build_cache(str(half), tok, train_w, None, 8, tmp_path / "c.safetensors", "bf16", quiet=True, like=student)
    assert torch.allclose(cache.tensors["logprobs"], topk_logprobs(student, train_w, 8)[0], atol=1e-5)


# ---- healing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ["lora", "partial"])
def test_distill_brings_the_student_closer_and_reloads(params, tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[True]
    teacher, student = pruned_pair()
    teacher.train()
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    rec = heal_model(student, tok, "distill", params=params, data=C4_DATA, teacher_model=teacher, teacher_tokenizer=tok,
                     kept=KEPT, hidden_weight=0.1, temperature=2.0, quiet=True, **FAST)
    d = rec["distill"]
    assert rec["method"] == params and rec["objective"] == "distill" and rec["settings"]["objective"] == "distill"
    assert d["kl_after"] < d["kl_before"] and d["teacher_source"] == "memory" and d["kl_tokens"] == 4 * FAST["seq_len"]
    assert (d["temperature"], d["hidden_weight"], d["kl_weight"], d["lm_weight"]) == (2.0, 0.1, 1.0, 0.0)
    assert rec["tokens_seen"] == FAST["steps"] * FAST["batch_size"] * FAST["seq_len"] and rec["steps"] == FAST["steps"]
    assert not [n for n, m in student.named_modules() if type(m).__module__.startswith("peft")]
    assert teacher_weights.keys() == teacher.state_dict().keys()  # the teacher is never trained, and left as it was
    assert all(torch.equal(v, teacher_weights[k]) for k, v in teacher.state_dict().items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # eval, no grad: left so before
    save_reload_same_logits(student, tok, tmp_path / "healed", torch.arange(24)[None])
    md = prune.heal.methods.healing_markdown(rec)
    assert "KL to the teacher" in md and "distillation from" in md


def test_recipe_replace_block_distilled_from_a_topk_cache(tmp_path, tiny_folder_heal):
    """The recipe stage: the top-k cache is computed before the surgery, beside the output folder,
    and a rerun reuses it; pruning.json and the card record the objective, weights and KL."""
    recipe = _recipe(tmp_path, method="distill", params="replace", teacher="cache", top_k=16, temperature=2.0)
    out = run(recipe, quiet=True).out_dir
    cache_file = out.with_name("out.teacher-top16.safetensors")
    assert cache_file.is_file()
    rec = json.loads((out / "pruning.json").read_text())["healing"]
    assert rec["objective"] == "distill" and rec["method"] == "replace"
    d = rec["distill"]
    assert d["teacher_source"] == "cache" and d["top_k"] == 16 and d["teacher_cache_bytes"] == cache_file.stat().st_size
    assert d["kl_after"] < d["kl_before"]
    card = (out / "README.md").read_text()
    assert "kl_before" in card and "teacher_cache" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == N_LAYERS - 2
    # rerun with the cache: reused (same windows and tokenizer), same result
    mtime = cache_file.stat().st_mtime_ns
    out2 = run({**recipe, "output": {"dir": str(tmp_path / "out2")}, "heal": {**recipe["heal"], "teacher_cache": str(cache_file)}},
               quiet=True).out_dir
    assert cache_file.stat().st_mtime_ns == mtime
    assert json.loads((out2 / "pruning.json").read_text())["healing"]["distill"]["kl_after"] == pytest.approx(d["kl_after"])


def test_prune_heal_run_dir_with_distill(tmp_path, tiny_folder_heal, capsys):
    from prune.pipeline.heal_run import heal_run

    plain = _recipe(tmp_path)
    del plain["heal"]
    plain["evaluate"]["fidelity"] = {"top_k": 64}
    run_dir = run(plain, quiet=True).out_dir
    fast = [f"{k}={v}" for k, v in FAST.items()]
    source = plain["model"]["source"]  # a local source is published by name and sha256: given again (--source)
    capsys.readouterr()
    healed = heal_run(run_dir, tmp_path / "healed", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                      rows=C4_DATA["rows"], overrides=[*fast, "hidden_weight=0.1", "teacher=memory"], quiet=False,
                      source=source, evaluate=True)
    rec = json.loads((healed / "pruning.json").read_text())["healing"]
    assert rec["objective"] == "distill" and rec["distill"]["kl_after"] < rec["distill"]["kl_before"]
    # the original is loaded once: the fidelity reference's copy is the teacher
    err = capsys.readouterr().err
    assert err.count("loading the original model") == 1 and "the copy loaded for the fidelity reference" in err
    assert "loading the teacher" not in err and rec["distill"]["teacher_source"] == "memory"
    fid = json.loads((healed / "eval.json").read_text())["pruned"]["fidelity"]
    assert fid["kl_mean"] < json.loads((run_dir / "eval.json").read_text())["pruned"]["fidelity"]["kl_mean"]
    AutoModelForCausalLM.from_pretrained(healed)
    # through a cache built from the source model, then read alone
    cache = tmp_path / "teacher.safetensors"
    heal_run(run_dir, tmp_path / "healed2", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
             rows=C4_DATA["rows"], overrides=[*fast, "teacher=cache", "top_k=8", f"teacher_cache={cache}"], quiet=True,
             source=source)
    assert cache.is_file()
    rec2 = json.loads((tmp_path / "healed2" / "pruning.json").read_text())["healing"]["distill"]
    assert "sequential" in rec2["teacher"] and rec2["top_k"] == 8  # read one block at a time, never loaded whole
    # the cache is stamped with the original it came from: a run pruned from another original does not take it
    # (it did: only the tokenizer and windows were checked)
    other = Path(shutil.copytree(run_dir, tmp_path / "other_run"))
    record = json.loads((other / "pruning.json").read_text())
    record["source"]["sha256"] = "0" * 64
    (other / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(PruneError, match="holds the log-probs of another original model"):
        heal_run(other, tmp_path / "other_healed", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows=C4_DATA["rows"], overrides=[*fast, "teacher=cache", "top_k=8", f"teacher_cache={cache}"], quiet=True)
    assert not (tmp_path / "other_healed").exists()
    # a cache of another k than heal.top_k is refused, never recomputed over the user's file (it was replaced)
    kept_bytes = cache.read_bytes()
    with pytest.raises(PruneError, match="holds top-8 log-probs, heal.top_k is 16: set heal.top_k=8") as err:
        heal_run(run_dir, tmp_path / "healed_k", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows=C4_DATA["rows"], overrides=[*fast, "teacher=cache", "top_k=16", f"teacher_cache={cache}"],
                 quiet=True, source=source)
    assert "\n" not in str(err.value) and cache.read_bytes() == kept_bytes and not (tmp_path / "healed_k").exists()
    from prune.heal.distill import heal_saved_run  # and by heal_saved_run itself, before anything loads

    k16 = heal_config("distill", C4_DATA, **{**FAST, "teacher": "cache", "top_k": 16, "teacher_cache": str(cache)})
    with pytest.raises(PruneError, match="holds top-8 log-probs"):
        heal_saved_run(run_dir, tmp_path / "healed_k", json.loads((run_dir / "pruning.json").read_text()), k16, "auto",
                       False, quiet=True, resolve=lambda s: pytest.fail("the source was resolved"))
    assert cache.read_bytes() == kept_bytes
    # an unreadable cache is said to be so (it was said to record no source model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(kept_bytes[: len(kept_bytes) // 2])
    with pytest.raises(PruneError, match="is corrupt or unreadable"):
        heal_run(run_dir, tmp_path / "healed_b", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows=C4_DATA["rows"], overrides=[*fast, "teacher=cache", "top_k=8", f"teacher_cache={broken}"],
                 quiet=True, source=source)
    with pytest.raises(PruneError, match="is corrupt or unreadable"):
        heal_saved_run(run_dir, tmp_path / "healed_b", json.loads((run_dir / "pruning.json").read_text()),
                       k16.model_copy(update={"top_k": 8, "teacher_cache": str(broken)}), "auto", False, quiet=True,
                       resolve=lambda s: pytest.fail("the source was resolved"))
    # teacher memory is honoured beside an existing cache (the hidden-state term needs it)
    heal_run(run_dir, tmp_path / "healed_mem", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
             rows=C4_DATA["rows"], overrides=[*fast, "teacher=memory", "hidden_weight=0.1", f"teacher_cache={cache}"],
             quiet=True, source=source)
    assert json.loads((tmp_path / "healed_mem" / "pruning.json").read_text())["healing"]["distill"]["teacher_source"] == "memory"
    # and by teacher auto, which took the file, did all the work and then refused it (the hidden term needs the blocks)
    heal_run(run_dir, tmp_path / "healed_auto", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
             rows=C4_DATA["rows"], overrides=[*fast, "hidden_weight=0.1", f"teacher_cache={cache}"], quiet=True,
             source=source)
    assert json.loads((tmp_path / "healed_auto" / "pruning.json").read_text())["healing"]["distill"]["teacher_source"] == "memory"
    # refused before any work: a cache to write inside the source model or inside the output folder (it was written
    # there, and the save then refused the folder it had made), a replacement block (recipes only)
    for override, message in ((f"teacher_cache={source}/teacher.safetensors", "is inside the source model"),
                              (f"teacher_cache={tmp_path / 'refused' / 't.safetensors'}", "is inside the output folder"),
                              ("params=replace", "replace with objective distill needs the original model's blocks")):
        with pytest.raises(PruneError, match=message):
            heal_run(run_dir, tmp_path / "refused", method="distill", data=C4_DATA["path"], overrides=[*fast, "teacher=cache",
                     override], quiet=True, source=source, evaluate=True)
        assert not (tmp_path / "refused").exists() and not (Path(source) / "teacher.safetensors").exists()
    pruning = json.loads((run_dir / "pruning.json").read_text())
    (run_dir / "pruning.json").write_text(json.dumps({**pruning, "source": None}))  # the source is gone: the cache suffices
    heal_run(run_dir, tmp_path / "healed3", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
             rows=C4_DATA["rows"], overrides=[*fast, "teacher=cache", "top_k=8", f"teacher_cache={cache}"], quiet=True)
    with pytest.raises(PruneError, match="records no source model to load"):  # before loading anything
        heal_run(run_dir, tmp_path / "healed_h", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows=C4_DATA["rows"], overrides=[*fast, "hidden_weight=0.1", f"teacher_cache={cache}"], quiet=True)
    with pytest.raises(PruneError, match="no teacher source") as err:
        heal_run(run_dir, tmp_path / "healed4", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows=C4_DATA["rows"], overrides=fast, quiet=True)
    assert "\n" not in str(err.value) and not (tmp_path / "healed4").exists()
    # the console script: --method distill, a bad temperature is one line and exit 2
    bad = prune_main("heal", run_dir, "-o", tmp_path / "bad", "--method", "distill", "--data", C4_DATA["path"],
                     "--set", "temperature=0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "temperature must be between 0.1 and 100" in bad.stderr
    assert not (tmp_path / "bad").exists()


# ---- refusals: one line, before training ------------------------------------------------------------------------
def test_auto_keeps_the_teacher_in_memory_only_when_its_loss_fits_too():
    """``teacher: auto`` counts the in-memory loss's float32 logits (batch x seq_len x vocab) beside
    the copy: the same tiny model, whose batches' logits would need terabytes, distils from the cache."""
    model = build_model("llama")
    small = heal_config("distill", C4_DATA, **FAST)
    huge = heal_config("distill", C4_DATA, **{**FAST, "batch_size": 2**16, "n_samples": 2**16, "seq_len": 2**12})
    assert small.teacher == huge.teacher == "auto"
    assert teacher_kind(small, model) == "memory"
    assert teacher_need(huge, model_bytes(model), VOCAB) > free_memory(torch.device("cpu")) > model_bytes(model) * 2
    assert teacher_kind(huge, model) == "cache"


def test_auto_says_when_the_cache_it_was_given_is_not_read(capsys, tmp_path):
    """``teacher: auto`` with a ``teacher_cache`` (or ``top_k``) set, and room for the teacher: the cache was neither
    read nor written, without a word."""
    model = build_model("llama")
    capsys.readouterr()
    cfg = heal_config("distill", C4_DATA, top_k=8, teacher_cache=str(tmp_path / "c.safetensors"), **FAST)
    assert teacher_kind(cfg, model) == "memory"
    assert capsys.readouterr().err == ("note: heal top_k, teacher_cache not read: the teacher fits in memory (teacher: "
                                       "auto); set teacher: cache to distil from a top-k cache\n")
    assert teacher_kind(heal_config("distill", C4_DATA, **FAST), model) == "memory"
    assert capsys.readouterr().err == ""
    assert teacher_kind(cfg, model, quiet=True) == "memory" and capsys.readouterr().err == ""  # quiet: no note


def test_a_teacher_in_memory_records_the_cache_settings_it_never_read(tokenizers_by_bos):
    """The card listed top_k and teacher_cache among the settings that say what was done, where the teacher sat in
    memory and read no cache (teacher: auto that fit)."""
    tok = tokenizers_by_bos[True]
    teacher, student = pruned_pair()
    rec = heal_model(student, tok, "distill", data=C4_DATA, teacher_model=teacher, teacher_tokenizer=tok, top_k=8,
                     quiet=True, **FAST)
    assert rec["ignored"] == ["top_k"] and rec["distill"]["teacher_source"] == "memory"


def test_auto_counts_a_teacher_already_loaded_as_memory_it_holds(monkeypatch):
    """``prune heal`` loads the teacher before deciding: the memory it holds counts as free for it
    (asking for a second copy's room loaded the teacher whole, then distilled from a cache anyway)."""
    import prune.heal.teacher as T

    model = build_model("llama")
    cfg = heal_config("distill", C4_DATA, **FAST)
    need = teacher_need(cfg, model_bytes(model), VOCAB)
    monkeypatch.setattr(T, "free_memory", lambda device: need - model_bytes(model) // 2)
    assert teacher_kind(cfg, model) == "cache" and teacher_kind(cfg, model, loaded=True) == "memory"


def test_a_mismatched_teacher_is_refused(tokenizers_by_bos, tmp_path):
    tok = tokenizers_by_bos[True]
    _, student = pruned_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    other_vocab = build_model("llama", vocab_size=VOCAB + 64)
    with pytest.raises(PruneError, match="logits per token") as err:
        heal_model(student, tok, "distill", data=C4_DATA, teacher_model=other_vocab, quiet=True, **FAST)
    assert "\n" not in str(err.value)
    # same size, other tokens: a tokenizer with one token renamed
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["<extra-token>"])
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(tok)
    with pytest.raises(PruneError, match="tokenizer differs"):
        heal_model(student, tok, "distill", data=C4_DATA, teacher_model=build_model("llama"), teacher_tokenizer=other_tok,
                   quiet=True, **FAST)
    # a cache computed with another tokenizer, or on other windows
    train_w, val_w = windows_of(tok)
    cache = build_cache(build_model("llama"), other_tok, train_w, val_w, 8, tmp_path / "other.safetensors", "o", quiet=True)
    with pytest.raises(PruneError, match="tokenizer differs"):
        heal_model(student, tok, "distill", data=C4_DATA, teacher_model=str(cache.path), quiet=True, **FAST)
    same_tok = build_cache(build_model("llama"), tok, train_w, val_w, 8, tmp_path / "same.safetensors", "s", quiet=True)
    with pytest.raises(PruneError, match="other training windows"):
        heal_model(student, tok, "distill", data=C4_DATA, teacher_cache=str(same_tok.path), quiet=True, **{**FAST, "seed": 1})
    with pytest.raises(PruneError, match="no teacher source for distillation: pass teacher_model= "):
        heal_model(student, tok, "distill", data=C4_DATA, quiet=True, **FAST)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_a_cache_of_another_model_is_not_taken_for_this_ones(tokenizers_by_bos, tmp_path):
    """Same tokenizer, same windows, another model (here: other weights), or a cache with no
    fingerprint: the cache beside the output is computed again, and one named in heal.teacher_cache
    is refused."""
    from prune.heal.teacher import prepare_teacher, weights_fingerprint

    tok = tokenizers_by_bos[True]
    cfg = heal_config("lora", C4_DATA, **{**FAST, "objective": "distill", "teacher": "cache", "top_k": 8})
    train_w, val_w = windows_of(tok)
    first, second = build_model("llama", seed=0), build_model("llama", seed=1)
    assert weights_fingerprint(first) != weights_fingerprint(second)
    path = tmp_path / "beside.safetensors"
    kept = list(range(N_LAYERS))
    made = prepare_teacher(first, tok, cfg, train_w, val_w, kept, name="first", default_cache=path, quiet=True)
    assert made.cache.meta["model"] == weights_fingerprint(first)
    again = prepare_teacher(first, tok, cfg, train_w, val_w, kept, name="first", default_cache=path, quiet=True)
    assert "reused" in again.description  # the same model: reused
    other = prepare_teacher(second, tok, cfg, train_w, val_w, kept, name="second", default_cache=path, quiet=True)
    assert "reused" not in other.description and TopkCache.load(path).meta["model"] == weights_fingerprint(second)
    named = cfg.model_copy(update={"teacher_cache": str(path)})
    with pytest.raises(PruneError, match="another model"):
        prepare_teacher(first, tok, named, train_w, val_w, kept, name="first", default_cache=None, quiet=True)
    old = TopkCache.load(path)  # a cache written before the fingerprint existed: cannot be checked
    del old.meta["model"]
    old.save()
    with pytest.raises(PruneError, match="records no fingerprint"):
        prepare_teacher(second, tok, named, train_w, val_w, kept, name="second", default_cache=None, quiet=True)
    again = prepare_teacher(second, tok, cfg, train_w, val_w, kept, name="second", default_cache=path, quiet=True)
    assert "reused" not in again.description and TopkCache.load(path).meta["model"] == weights_fingerprint(second)


def _damaged(T: dict, meta: dict) -> dict:
    """name -> (tensors, metadata) of a cache broken one way (as a reviewer's hostile files), and what its refusal says."""
    lp, ix = T["logprobs"], T["indices"]
    return {
        "idx_oob": ({"indices": ix + 100000}, {}, "outside the vocabulary [0, 256)"),
        "idx_neg": ({"indices": -ix - 1}, {}, "outside the vocabulary"),
        "short": ({"logprobs": lp[:2], "indices": ix[:2]}, {}, "logprobs has shape [2, 32, 8], this run reads [16, 32, 8]"),
        "seq_len": ({"logprobs": lp[:, :16], "indices": ix[:, :16]}, {}, "has shape [16, 16, 8]"),
        "k_tensor": ({"logprobs": lp[..., :4], "indices": ix[..., :4]}, {}, "has shape [16, 32, 4], this run reads [16, 32, 8]"),
        "lp_1d": ({"logprobs": lp.flatten()}, {}, "logprobs has shape [4096]"),
        "int_lp": ({"logprobs": lp.long()}, {}, "logprobs is int64, not floating-point"),
        "float_idx": ({"indices": ix.float()}, {}, "indices is float32, not integer"),
        "bf16_idx": ({"indices": ix.to(torch.bfloat16)}, {}, "indices is bfloat16, not integer"),
        "positive": ({"logprobs": torch.full_like(lp, 50.0)}, {}, "logprobs holds 50, and log-probabilities are <= 0"),
        "nan": ({"logprobs": torch.full_like(lp, float("nan"))}, {}, "non-finite"),
        "val_inf": ({"val_logprobs": torch.full_like(T["val_logprobs"], -math.inf)}, {}, "val_logprobs holds non-finite"),
        "no_idx": ({"indices": None}, {}, "lacks the tensor indices"),
        "no_val": ({"val_logprobs": None}, {}, "lacks the tensor val_logprobs"),
        "ids": ({"input_ids": T["input_ids"].flip(0)}, {}, "input_ids differ from this run's 16 windows"),
        "k_abc": ({}, {"k": "abc"}, "metadata k is 'abc', not a positive whole number"),
        "k_zero": ({}, {"k": "0"}, "metadata k is '0'"),
        "k_huge": ({}, {"k": "1000000"}, "k=1000000 exceeds its vocabulary (256 tokens)"),
        "vocab_abc": ({}, {"vocab": "abc"}, "metadata vocab is 'abc'"),
        "no_tokenizer": ({}, {"tokenizer": ""}, "records no tokenizer fingerprint"),
    }


def test_a_damaged_cache_is_refused_in_one_line_before_training(tokenizers_by_bos, tmp_path):
    """Tensors of another shape (fewer windows, another seq_len or k), dtype (integer log-probs, float
    indices), range (token ids outside the vocabulary, log-probs > 0 or not finite), missing tensors and
    damaged metadata are one line naming the problem and the fix, when the cache is checked: from its
    header before any model loads (preflight_cache) and when it is opened (open_cache, heal_model),
    never at the first training step (an IndexError or a RuntimeError) or silently (misaligned targets)."""
    from safetensors.torch import save_file

    from prune.heal.teacher import open_cache, preflight_cache

    tok = tokenizers_by_bos[True]
    train_w, val_w = windows_of(tok)
    good = build_cache(build_model("llama"), tok, train_w, val_w, 8, tmp_path / "good.safetensors", "t", quiet=True)
    T, meta = dict(good.tensors), {k: str(v) for k, v in good.meta.items()}
    cfg = heal_config("distill", C4_DATA, **{**FAST, "teacher": "cache", "top_k": 8})

    def write(name, tensors, extra):
        path = tmp_path / f"{name}.safetensors"
        merged = {k: v for k, v in {**T, **tensors}.items() if v is not None}
        save_file({k: v.contiguous() for k, v in merged.items()}, str(path), metadata={**meta, **extra})
        return path

    def checks(path):
        named = cfg.model_copy(update={"teacher_cache": str(path)})
        yield lambda: preflight_cache(named, (), tok, train_w, val_w)  # the header, before any model loads
        yield lambda: open_cache(named, tok, train_w, val_w, VOCAB, [])  # the loaded tensors

    tiny = write("tiny_positive", {"logprobs": T["logprobs"].clamp_max(-1e-3) + 2e-3}, {})  # rounding above 0: taken
    for path in (good.path, tiny):
        for check in checks(path):
            check()
    for name, (tensors, extra, message) in _damaged(T, meta).items():
        path = write(name, tensors, extra)
        for check in checks(path):
            with pytest.raises(PruneError) as err:
                check()
            assert message in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
            assert "heal.teacher_cache" in str(err.value) and ("delete it" in str(err.value) or "recompute" in str(err.value))
    # unreadable files (truncated; a header claiming more data than the file holds): corrupt, said so
    raw = good.path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    for check in checks(tmp_path / "trunc.safetensors"):
        with pytest.raises(PruneError, match="is corrupt or unreadable"):
            check()
    # through the Python API: refused before the student trains
    _, student = pruned_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(PruneError, match="this run reads"):
        heal_model(student, tok, "distill", data=C4_DATA, teacher_cache=str(tmp_path / "seq_len.safetensors"), quiet=True,
                   **FAST)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


@pytest.fixture
def tiny_folder_heal(tmp_path, tokenizers_by_bos):
    return prune.save(build_model("llama"), tokenizers_by_bos[True], tmp_path / "tiny")


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


@pytest.mark.parametrize("heal,message", [
    ({"method": "distill", "temperature": 0}, "temperature must be between 0.1 and 100"),
    ({"method": "distill", "temperature": -1.5}, "temperature must be between 0.1 and 100"),
    ({"method": "distill", "top_k": VOCAB + 1}, f"top_k={VOCAB + 1} is larger than the vocabulary ({VOCAB} tokens)"),
    ({"method": "distill", "teacher": "cache", "hidden_weight": 1.0}, "hidden_weight needs the teacher in memory"),
    ({"method": "distill", "kl_weight": 0}, "has no loss"),
    ({"method": "lora", "objective": "teach"}, "heal.objective"),
])
def test_bad_distill_settings_fail_before_loading(tmp_path, tiny_folder_heal, heal, message):
    with pytest.raises(PruneError) as err:
        run(_recipe(tmp_path, **heal), quiet=True)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.safetensors"))


def test_a_named_cache_of_other_windows_or_inside_an_input_fails_before_loading(tmp_path, tiny_folder_heal, monkeypatch,
                                                                                tokenizers_by_bos):
    import prune.pipeline.engines as E

    tok = tokenizers_by_bos[True]
    cache = tmp_path / "other.safetensors"
    other = heal_config("distill", C4_DATA, **{**FAST, "seed": 5})  # other windows than the recipe's
    build_cache(build_model("llama"), tok, *training_windows(tok, other), 8, cache, "the original", quiet=True)
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    for path, message in ((cache, "was computed on other training windows"),
                          (tmp_path / "tiny" / "teacher.safetensors", "is inside the source model")):
        with pytest.raises(PruneError, match=message):
            run(_recipe(tmp_path, method="distill", teacher="cache", top_k=8, teacher_cache=str(path)), quiet=True)
    assert not (tmp_path / "tiny" / "teacher.safetensors").exists()
    # prune heal takes an existing cache under teacher auto too: checked before the original or the student loads
    # (it was, after both, and after the fidelity reference of --evaluate)
    from prune.pipeline.heal_run import heal_run

    monkeypatch.undo()
    plain = _recipe(tmp_path)
    del plain["heal"]
    run_dir = run(plain, quiet=True).out_dir
    import prune.model.loading as L

    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(PruneError, match="was computed on other training windows"):
        heal_run(run_dir, tmp_path / "healed", method="distill", data=C4_DATA["path"], field=C4_DATA["field"],
                 rows=C4_DATA["rows"], overrides=[f"{k}={v}" for k, v in FAST.items()] + ["top_k=8",
                 f"teacher_cache={cache}"], quiet=True, source=str(tmp_path / "tiny"), evaluate=True)


def test_method_distill_is_shorthand_and_old_recipes_are_unchanged():
    cfg = heal_config("distill", C4_DATA, params="partial")
    assert (cfg.method, cfg.objective) == ("partial", "distill")
    assert heal_config("distill", C4_DATA).method == "lora"
    old = heal_config("lora", C4_DATA)
    assert old.objective == "lm" and old.model_dump()["method"] == "lora"
    # a dumped distill config validates again to itself (recipe.yaml round trip)
    assert heal_config(**cfg.model_dump()) == cfg
    assert math.isclose(cfg.temperature, 1.0)


def test_heal_model_replace_by_distillation(tokenizers_by_bos):
    """``heal_model`` on the FULL model with a replacement block trained by distillation: the run
    is cut to one block, and the record says replace + distill."""
    model = build_model("llama")
    checkpointing = []  # the loss backpropagates through every later block: gradient_checkpointing applies
    rec = heal_model(model, tokenizers_by_bos[True], "distill", params="replace", data=C4_DATA, removed=RUN,
                     teacher="memory", quiet=True, gradient_checkpointing=True,
                     callback=lambda *_: checkpointing.append(model.is_gradient_checkpointing), **FAST)
    assert rec["method"] == "replace" and rec["objective"] == "distill"
    assert len(decoder_layers(model)) == N_LAYERS - len(RUN) + 1 == len(rec["kept"])
    assert rec["distill"]["kl_after"] < rec["distill"]["kl_before"]
    assert checkpointing == [True] * FAST["steps"] and not model.is_gradient_checkpointing


def test_replace_kl_before_is_the_model_training_starts_from(tokenizers_by_bos):
    """init mean_removed: the record's KL before healing is measured with the averaged block in
    place (a step at rate ~0 leaves the KL where it was)."""
    rec = heal_model(build_model("llama"), tokenizers_by_bos[True], "distill", params="replace", data=C4_DATA,
                     removed=RUN, teacher="memory", init="mean_removed", quiet=True,
                     **{**FAST, "steps": 1, "learning_rate": 1e-12})
    assert rec["distill"]["kl_after"] == pytest.approx(rec["distill"]["kl_before"], rel=1e-6)


def test_recorded_pairs_match_a_replacement_block_with_the_end_of_its_run():
    """``prune heal`` of a run healed with a replacement block (standing for blocks 4-6, started from
    block 4): the hidden-state term matches it with block 6, through later healings too."""
    rep = {"replacement": {"replaces": [4, 5, 6], "position": 4, "init": "first_removed"}}
    pruning = {"kept": [0, 1, 2, 3, 4, 7], "healing": rep}
    assert recorded_pairs(pruning) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 6), (5, 7)]
    assert recorded_pairs({**pruning, "healing": {"method": "lora", "previous": rep}})[4] == (4, 6)
    assert recorded_pairs({"kept": [0, 2, 3]}) == [(0, 0), (1, 2), (2, 3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("teacher", ["memory", "cache"])
def test_gpu_run_distils_like_the_cpu(tmp_path, tiny_folder_heal, teacher):
    """`prune run` with the model on a GPU (``device_map: cuda:0``), distilling from the teacher in
    memory or from its top-k cache: the same blocks and KL before healing as on the CPU, healing
    that wins back at least half the KL the CPU's does (float kernels differ over the steps), and a
    checkpoint that reloads on the CPU with plain transformers."""
    recipe = _recipe(tmp_path, method="distill", teacher=teacher, top_k=16)
    cpu = run(recipe, quiet=True)
    gpu = run({**recipe, "model": {**recipe["model"], "device_map": "cuda:0"}, "output": {"dir": str(tmp_path / "gpu")}},
              quiet=True)
    a, b = (r.pruning.healing["distill"] for r in (cpu, gpu))
    assert gpu.pruning.removed == cpu.pruning.removed
    assert b["kl_before"] == pytest.approx(a["kl_before"], rel=1e-4)
    assert a["kl_after"] < a["kl_before"] and b["kl_before"] - b["kl_after"] >= 0.5 * (a["kl_before"] - a["kl_after"])
    assert gpu.evaluation["original"]["perplexity"]["perplexity"] == \
        pytest.approx(cpu.evaluation["original"]["perplexity"]["perplexity"], rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(gpu.out_dir)
    assert model.config.num_hidden_layers == N_LAYERS - 3


def _save_in_step(path: str, tensors: dict, barrier, rounds: int, errors) -> None:
    """One of two processes writing the same teacher cache at the same moment (every rank of a launch does)."""
    from prune.heal.teacher import FORMAT, TopkCache

    for _ in range(rounds):
        barrier.wait()
        try:
            TopkCache(Path(path), tensors, {"format": FORMAT, "k": 4}).save()
            TopkCache.load(path)
        except (OSError, PruneError) as exc:
            errors.put(repr(exc))
        barrier.wait()


def test_ranks_writing_the_same_teacher_cache_at_once_never_fail(tmp_path):
    """Each rank of a launch computes the same top-k cache and writes it to the same file: each through a
    temporary file of its own, then an atomic rename (with one shared temporary name, a rename found its
    source moved by the other process, or a rank read a file the other was still writing)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    g = torch.Generator().manual_seed(0)
    tensors = {"input_ids": torch.randint(0, 100, (16, 128), generator=g, dtype=torch.int32),
               "logprobs": torch.randn(16, 128, 4, generator=g), "indices": torch.zeros(16, 128, 4, dtype=torch.int32)}
    path, rounds = tmp_path / "teacher.safetensors", 300
    barrier, errors = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_save_in_step, args=(str(path), tensors, barrier, rounds, errors)) for _ in range(2)]
    for w in workers:
        w.start()
    for _ in range(rounds):
        path.unlink(missing_ok=True)
        barrier.wait()
        barrier.wait()
        assert torch.equal(TopkCache.load(path).tensors["logprobs"], tensors["logprobs"])
    for w in workers:
        w.join(timeout=60)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.safetensors"]
    assert failures == [] and all(w.exitcode == 0 for w in workers)


def test_an_interrupted_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A teacher cache (gigabytes on a real model) is written to a temporary file, then renamed: an interruption
    in the write left the temporary file for good, and a resumed run wrote a new one beside it. Interrupted: it is
    removed; one left by a killed process is removed by the next write."""
    import subprocess
    import sys

    import safetensors.torch

    tensors = {"input_ids": torch.zeros(2, 4, dtype=torch.int32), "logprobs": torch.zeros(2, 4, 2),
               "indices": torch.zeros(2, 4, 2, dtype=torch.int32)}
    cache = TopkCache(tmp_path / "t.safetensors", tensors, {"format": "prune-teacher-topk/1", "k": 2})

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache.save()
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".t.safetensors.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"left by a killed process")
    (tmp_path / f".t.safetensors.{os.getppid()}.tmp").write_bytes(b"another rank's")  # a live pid: left alone
    cache.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".t.safetensors.{os.getppid()}.tmp", "t.safetensors"]


def test_healing_measures_with_dropout_off_whatever_mode_the_model_is_in(tokenizers_by_bos):
    """A model handed in in training mode (GPT-2: dropout 0.1) measured its KL before healing, the teacher's top-k
    and the replacement block's targets with dropout on (kl_before 0.167 where the model's is 0.101): each
    measurement runs in eval mode, and the model's own mode is restored."""
    from prune.heal.distill import fidelity
    from prune.heal.teacher import Teacher, topk_logprobs
    from prune.heal.methods import capture_run

    teacher = build_model("gpt2").eval()
    student = copy.deepcopy(teacher)
    prune.remove_layers(student, [3, 4])
    windows = torch.randint(3, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = Teacher("memory", "the original", teacher)
    measured = {}
    for mode in ("eval", "train"):
        student.train(mode == "train")
        measured[mode] = (fidelity(student, ref, windows), topk_logprobs(student, windows, 4),
                          capture_run(student, windows, 1, 2))
        assert student.training == (mode == "train")  # its mode restored
    (f_eval, t_eval, c_eval), (f_train, t_train, c_train) = measured["eval"], measured["train"]
    assert f_train == f_eval and f_eval["kl"] > 0
    assert all(torch.equal(a, b) for a, b in zip(t_train, t_eval)) and all(torch.equal(a, b) for a, b in zip(c_train, c_eval))
