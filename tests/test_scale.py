"""Scale: dispatched (CPU + disk offload, GPU) scoring, out-of-core (sequential) scoring and pruning,
and the automatic choice between them. Every equivalence is against the plain in-memory path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import prune
from prune import PruneError
from prune.io.safetensors import Checkpoint, byte_ranges
from prune.pipeline.execution import plan_execution
from prune.model.loading import decoder_layers_path
from prune.export.outofcore import prune_checkpoint
from prune.measure.sequential import score_sequential

from conftest import ARCHS, BOS_ARCHS, N_LAYERS, WIKI_RAW, build_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
FIELDS = ("n_layers", "positions", "cka_windows", "n_windows", "seq_len", "n_tokens", "excluded_windows", "cka_dropped")


# ---- helpers -----------------------------------------------------------------------------------
def saved(tmp_path, arch, tokenizers, name="src", max_shard_size="5GB", **overrides):
    """(model, tokenizer, folder): a tiny random model saved as a safetensors folder."""
    model = build_model(arch, **overrides)
    tok = tokenizers[arch in BOS_ARCHS]
    folder = prune.save(model, tok, tmp_path / name, max_shard_size=max_shard_size)
    return model, tok, folder


def windows_for(tok, calib_text, n=5, seq_len=24, seed=0):
    return prune.calibration_windows(tok, calib_text, n, seq_len, seed=seed)


def assert_same_scores(a: prune.ScoreResult, b: prune.ScoreResult, atol=1e-5):
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    assert a.block_influence == pytest.approx(b.block_influence, abs=atol)
    for name in ("angular", "cka"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None)
        if ma is not None:
            assert torch.allclose(torch.tensor(ma), torch.tensor(mb), atol=atol, rtol=0, equal_nan=True), name
    if a.msrs is not None:
        assert a.msrs["total"] == pytest.approx(b.msrs["total"], abs=atol * 10)
        assert a.msrs["contributions"] == pytest.approx(b.msrs["contributions"], abs=atol * 10)


def split_map(model, devices=("cpu", "disk"), rest="cpu", embed=None):
    """A device map putting the first half of the blocks on devices[0], the rest on devices[1],
    every other leaf module on ``rest`` (embeddings and LM head on ``embed`` when given)."""
    path = decoder_layers_path(model)
    n = model.config.num_hidden_layers
    device_map = {f"{path}.{i}": devices[0] if i < n // 2 else devices[1] for i in range(n)}
    emb = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    for name, module in model.named_modules():
        if name and not name.startswith(path) and not list(module.children()):
            device_map[name] = embed if (embed and id(module) in emb) else rest
    return device_map


def all_tensors(folder) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {k: ckpt.read(k) for k in ckpt.entries}


# ---- 0. the streamed metric kernels used by both paths ---------------------------------------------
@pytest.mark.parametrize("as_list", [False, True])
def test_cosine_sums_match_direct_computation(as_list):
    from prune.core import metrics as M

    gen = torch.Generator().manual_seed(0)
    states = torch.randn(6, 50, 16, generator=gen)
    states[3] = states[2] * 3.0 + 1e-3 * torch.randn(50, 16, generator=gen)  # nearly parallel: cos ~ 1
    states[4, 7] = 0.0  # a zero vector
    given = list(states) if as_list else states
    bi, ang = M.cosine_sums(given, chunk=7)  # chunking must not change the sums
    for l in range(5):
        assert bi[l].item() == pytest.approx(50 * M.block_influence(states[l], states[l + 1]).item(), abs=1e-9)
    for i in range(6):
        for j in range(6):
            assert ang[i, j].item() == pytest.approx(50 * M.angular_distance(states[i], states[j]).item(), abs=1e-6)
    bi_only, none = M.cosine_sums(given, pairs=False, chunk=64)
    assert none is None and torch.allclose(bi_only, bi, atol=1e-9)
    cka_list = M.cka_matrix([x[:20] for x in states])
    assert torch.allclose(cka_list, M.cka_matrix(states[:, :20]), atol=1e-12)


def test_cosine_chunk_is_small_on_the_cpu_and_fills_its_budget_elsewhere():
    """On a CPU the chunk stays in cache; on a GPU one chunk holds DEVICE_CHUNK_BYTES of float64
    states and Grams (a 1.2B Llama's 25 states of 2,048: 647 tokens), never fewer than the CPU's."""
    from prune.core import metrics as M

    assert M.cosine_chunk(torch.device("cpu"), 25, 2048) == M.CPU_CHUNK
    gpu = M.cosine_chunk(torch.device("cuda"), 25, 2048)
    assert 8 * gpu * (25 * 2048 + 25**2) <= M.DEVICE_CHUNK_BYTES < 8 * (gpu + 1) * (25 * 2048 + 25**2)
    assert M.cosine_chunk(torch.device("cuda"), 10**4, 10**6) == M.CPU_CHUNK


# ---- 1. dispatched models (Accelerate device_map with CPU and disk offload) --------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen3_moe"])
def test_cpu_disk_dispatched_scores_equal_single_device(arch, tokenizers_by_bos, calib_text, tmp_path):
    model, tok, folder = saved(tmp_path, arch, tokenizers_by_bos)
    device_map = split_map(model, embed="disk")
    dispatched, _, _ = prune.load(folder, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(dispatched.hf_device_map.values())
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # really offloaded
    w = windows_for(tok, calib_text)
    assert_same_scores(prune.score(model, w, batch_size=2, progress=False),
                       prune.score(dispatched, w, batch_size=2, progress=False), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_remove_and_save_of_offloaded_model_equals_in_memory(arch, tokenizers_by_bos, calib_text, tmp_path):
    """After a forward through disk-offloaded tied embeddings (Accelerate unties them), remove
    blocks and save: a complete checkpoint equal to in-memory pruning, tied weights stored once."""
    model, tok, folder = saved(tmp_path, arch, tokenizers_by_bos)
    dispatched, _, _ = prune.load(folder, device_map=split_map(model, embed="disk"),
                                  offload_folder=str(tmp_path / "offload"))
    w = windows_for(tok, calib_text, n=2)
    prune.score(dispatched, w, progress=False)  # a forward pass through the offloaded blocks
    removed = [2, 5]
    prune.remove_layers(model, removed)
    prune.remove_layers(dispatched, removed)
    path = decoder_layers_path(model)
    assert {k for k in dispatched.hf_device_map if k.startswith(path + ".")} == {f"{path}.{i}" for i in range(6)}
    a = all_tensors(prune.save(model, tok, tmp_path / "in_memory"))
    b = all_tensors(prune.save(dispatched, tok, tmp_path / "dispatched"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dispatched").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(w).logits, model(w).logits)
    # saved in another dtype: the weights offloaded to disk too (transformers reads them back as stored)
    half = all_tensors(prune.save(dispatched, tok, tmp_path / "half", dtype="float16", max_shard_size="200KB"))
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(half[k], a[k].half()) for k in a)
    index = json.loads((tmp_path / "half" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in half.values())


# ---- 2. sequential (out-of-core) scoring -----------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_scores_equal_in_memory(arch, tokenizers_by_bos, calib_text, tmp_path):
    _, tok, folder = saved(tmp_path, arch, tokenizers_by_bos, max_shard_size="100KB")
    assert len(Checkpoint(folder).files) > 1  # several shards
    model, _, _ = prune.load(folder)
    w = windows_for(tok, calib_text)  # 5 windows in batches of 2: a last batch of another shape
    expected = prune.score(model, w, batch_size=2, progress=False)
    got = score_sequential(folder, w, batch_size=2, progress=False, spill=ARCHS.index(arch) % 2 == 0,
                           spill_dir=tmp_path)
    assert_same_scores(expected, got)
    assert not list(tmp_path.glob("prune-states-*"))  # spilled states are cleaned up


def test_tied_embeddings_stored_under_the_heads_name_only(tokenizers_by_bos, calib_text, tmp_path):
    """A tied pair saved as ``lm_head.weight`` alone: from_pretrained loads it (the embeddings tied to it);
    sequential scoring said the checkpoint had no weights for the embeddings."""
    from safetensors.torch import load_file, save_file

    _, tok, folder = saved(tmp_path, "gpt2", tokenizers_by_bos)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = prune.load(folder)
    w = windows_for(tok, calib_text)
    assert_same_scores(prune.score(model, w, batch_size=2, progress=False),
                       score_sequential(folder, w, batch_size=2, progress=False))
    out = prune_checkpoint(folder, [2, 3], tmp_path / "out")  # out of core: the stored pair goes along as it was
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(pruned.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_sequential_options_equal_in_memory(tokenizers_by_bos, calib_text, tmp_path):
    """positions=skip_first, pooled CKA groups, a metric subset and bfloat16 weights."""
    _, tok, folder = saved(tmp_path, "qwen2", tokenizers_by_bos)
    w = windows_for(tok, calib_text, n=6)
    model, _, _ = prune.load(folder)
    opts = dict(batch_size=3, positions="skip_first", cka_windows=2, progress=False)
    assert_same_scores(prune.score(model, w, **opts), score_sequential(folder, w, **opts))
    opts = dict(batch_size=4, metrics=("bi", "angular"), progress=False)
    assert_same_scores(prune.score(model, w, **opts), score_sequential(folder, w, **opts))
    bf16, _, _ = prune.load(folder, dtype="bfloat16")
    in_memory, sequential = (prune.score(bf16, w, batch_size=2, progress=False),
                             score_sequential(folder, w, batch_size=2, dtype="bfloat16", progress=False))
    assert_same_scores(in_memory, sequential)
    assert in_memory.metadata["dtype"] == sequential.metadata["dtype"] == "bfloat16"  # the dtype the states were in


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_moe"])
def test_sequential_subset_of_blocks_scores_the_pruned_model(arch, tokenizers_by_bos, calib_text, tmp_path):
    """Scoring only the kept blocks equals scoring the pruned model (per-layer masks and
    dense/sparse layouts follow each block, not its position)."""
    model, tok, folder = saved(tmp_path, arch, tokenizers_by_bos)
    w = windows_for(tok, calib_text, n=4)
    kept = prune.remove_layers(model, [1, 2, 6])
    assert_same_scores(prune.score(model, w, batch_size=2, progress=False),
                       score_sequential(folder, w, batch_size=2, blocks=kept, progress=False))


def test_sequential_holds_one_block_at_a_time(tokenizers_by_bos, calib_text, tmp_path, monkeypatch):
    """While block l runs, no other block and no embedding holds real weights."""
    from prune.measure import sequential
    from prune.model.skeleton import Skeleton

    _, tok, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    seen = []
    original = sequential.run_block

    def spy(block, hidden, call):
        sk_layers = block_owner["layers"]
        real = [i for i, layer in enumerate(sk_layers) if any(p.device.type != "meta" for p in layer.parameters())]
        emb = block_owner["model"].get_input_embeddings().weight.device.type
        seen.append((tuple(real), emb))
        return original(block, hidden, call)

    block_owner = {}
    init = Skeleton.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        block_owner.update(layers=self.layers, model=self.model)

    monkeypatch.setattr(Skeleton, "__init__", remember)
    monkeypatch.setattr(sequential, "run_block", spy)
    score_sequential(folder, windows_for(tok, calib_text, n=2), batch_size=2, progress=False)
    assert [s[0] for s in seen] == [(i,) for i in range(8)]
    assert {s[1] for s in seen} == {"meta"}


def test_non_safetensors_checkpoint_is_scored_in_memory_or_refused(tmp_path):
    model = build_model("llama")
    folder = tmp_path / "bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    plan = plan_execution(folder)
    assert plan.mode == "in_memory" and "not a local safetensors" in plan.reason
    with pytest.raises(PruneError, match="no safetensors weights .*pytorch_model.bin: re-save it"):
        plan_execution(folder, "sequential")


def test_a_hub_repos_gguf_file_is_never_read_from_the_repos_safetensors(tmp_path):
    """A Hub id with gguf_file passed the GGUF tests (they asked for a local GGUF): sequential execution and
    prune remove took the repo's safetensors snapshot, another model than the file named (a traceback, or the
    wrong model pruned without an error). Refused as a local GGUF is, before anything is fetched."""
    from prune.io.safetensors import local_folder
    from prune.io.source import resolve_source

    assert plan_execution("org/tiny", "auto", gguf_file="smol.gguf").mode == "in_memory"
    for attempt in (lambda: plan_execution("org/tiny", "sequential", gguf_file="smol.gguf"),
                    lambda: local_folder(resolve_source("org/tiny", "smol.gguf")),
                    lambda: prune_checkpoint(resolve_source("org/tiny", "smol.gguf"), [1], tmp_path / "out")):
        with pytest.raises(PruneError, match="org/tiny/smol.gguf is a GGUF file"):
            attempt()
    assert not (tmp_path / "out").exists()


def test_checkpoint_headers_sizes_and_broken_files(tokenizers_by_bos, tmp_path):
    model, _, folder = saved(tmp_path, "gpt2", tokenizers_by_bos, max_shard_size="150KB")
    ckpt = Checkpoint(folder)
    state = model.state_dict()
    assert ckpt.total_bytes == sum(state[k].numel() * 4 for k in ckpt.entries)
    assert ckpt.largest_file_bytes == max(f.stat().st_size for f in ckpt.files)
    key = "transformer.h.3.mlp.c_fc.weight"
    assert torch.equal(ckpt.read(key), state[key])
    assert ckpt.bytes_at([key], torch.bfloat16) == state[key].numel() * 2
    shard = ckpt.entries[key].file
    data = shard.read_bytes()
    shard.write_bytes(data[: byte_ranges(shard)[key][0] + 10])  # a download cut inside this tensor
    with pytest.raises(PruneError, match="truncated or corrupt"):
        Checkpoint(folder)
    shard.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PruneError, match="truncated or corrupt"):
        Checkpoint(folder)
    shard.unlink()
    with pytest.raises(PruneError, match="weight shard .* is missing"):
        Checkpoint(folder)


# ---- 3. out-of-core pruning --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_outofcore_pruning_equals_in_memory_pruning(arch, tokenizers_by_bos, tmp_path):
    model, tok, folder = saved(tmp_path, arch, tokenizers_by_bos, max_shard_size="150KB")
    n_src_shards = len(Checkpoint(folder).files)
    removed = [1, 4, 5]
    out = prune_checkpoint(folder, removed, tmp_path / "ooc", pruning={"removed": removed})
    prune.remove_layers(model, removed)
    ref = prune.save(model, tok, tmp_path / "mem")
    a, b = all_tensors(ref), all_tensors(out)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (ref / "config.json").read_text() == (out / "config.json").read_text()  # as save_pretrained writes it
    assert not re.search(r'"_name_or_path": "[^"]', (out / "config.json").read_text())  # MPT's sub-config: ""
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "pruning.json"} <= files
    assert len(Checkpoint(out).files) <= n_src_shards
    assert (len(Checkpoint(out).files) > 1) == ("model.safetensors.index.json" in files)
    assert not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(3, 250, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    # the record counts parameters as the loaded model does: DeepSeek-V3's stored router bias buffers counted too
    record = json.loads((out / "pruning.json").read_text())
    assert record["params_after"] == sum(p.numel() for p in reloaded.parameters())


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_a_multi_token_prediction_layer_after_the_stack_is_accepted_and_left_out(arch, tokenizers_by_bos, tmp_path):
    """DeepSeek-V3 and GLM-4.5 checkpoints store a multi-token-prediction layer after the stack
    (``model.layers.<n>``, num_nextn_predict_layers 1), which transformers does not load: such a checkpoint was
    refused as holding more blocks than its config names. It passes the check; a pruned checkpoint, out of core
    or in memory, holds none, its config says so, and its parameters are counted without it."""
    from safetensors.torch import load_file, save_file

    from prune.export.check import check_checkpoint

    model, tok, folder = saved(tmp_path, arch, tokenizers_by_bos, num_nextn_predict_layers=1)
    tensors = load_file(folder / "model.safetensors")
    last = f"model.layers.{N_LAYERS - 1}."
    tensors.update({k.replace(last, f"model.layers.{N_LAYERS}."): v.clone() for k, v in tensors.items() if k.startswith(last)})
    tensors[f"model.layers.{N_LAYERS}.eh_proj.weight"] = torch.zeros(48, 96)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    report = check_checkpoint(folder, tokenizer=False)
    assert report.ok, report.summary()
    assert any("multi-token-prediction" in f.message for f in report.findings)
    out = prune_checkpoint(folder, [2, 5], tmp_path / "ooc", pruning={"removed": [2, 5]})
    assert check_checkpoint(out).ok
    assert not [k for k in all_tensors(out) if k.startswith(f"model.layers.{N_LAYERS - 2}.")]
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    prune.remove_layers(model, [2, 5])
    assert model.config.num_nextn_predict_layers == 0
    assert (tmp_path / "ooc" / "config.json").read_text() == (prune.save(model, tok, tmp_path / "mem") / "config.json").read_text()


def test_gpt2_scaled_by_its_layer_index_computes_the_same_after_pruning_and_reload(tokenizers_by_bos, tmp_path):
    """GPT-2 with ``scale_attn_by_inverse_layer_idx`` scales each block's scores by 1 / (index + 1), fixed
    when the block is built: a kept block that moves gets its query rescaled, so the pruned model (in
    memory, reloaded, and written out of core) equals the original with the removed blocks skipped."""
    model, tok, folder = saved(tmp_path, "gpt2", tokenizers_by_bos, scale_attn_by_inverse_layer_idx=True)
    removed = [1, 4, 5]
    x = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    layers = model.transformer.h
    skip = [layers[i].register_forward_hook(lambda m, a, k, o: (k["hidden_states"] if "hidden_states" in k else a[0]),
                                            with_kwargs=True) for i in removed]
    with torch.no_grad():
        want = model(x).logits
    for handle in skip:
        handle.remove()
    prune.remove_layers(model, removed)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)
        reloaded = AutoModelForCausalLM.from_pretrained(prune.save(model, tok, tmp_path / "mem")).eval()
        torch.testing.assert_close(reloaded(x).logits, want, rtol=0, atol=1e-5)
    out = prune_checkpoint(folder, removed, tmp_path / "ooc", pruning={"removed": removed})
    a, b = all_tensors(tmp_path / "mem"), all_tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # stored in bfloat16, written as float32: rescaled after the conversion, like the in-memory surgery
    half = prune.save(build_model("gpt2", scale_attn_by_inverse_layer_idx=True).to(torch.bfloat16), tok,
                      tmp_path / "bf16")
    wide = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32)
    prune.remove_layers(wide, removed)
    a = all_tensors(prune.save(wide, tok, tmp_path / "bf16-mem"))
    b = all_tensors(prune_checkpoint(half, removed, tmp_path / "bf16-ooc", pruning={"removed": removed}, dtype="float32"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from prune.export.mergekit import export_mergekit  # a passthrough merge would copy the unscaled queries

    with pytest.raises(PruneError, match="rescaled query"):
        export_mergekit(out)
    # stored in float64 (the writer had no name for it: KeyError)
    wide = prune.save(build_model("gpt2", scale_attn_by_inverse_layer_idx=True).double(), tok, tmp_path / "f64")
    double = AutoModelForCausalLM.from_pretrained(wide, dtype="auto")
    prune.remove_layers(double, removed)
    a = all_tensors(prune.save(double, tok, tmp_path / "f64-mem"))
    b = all_tensors(prune_checkpoint(wide, removed, tmp_path / "f64-ooc", pruning={"removed": removed}))
    assert a["transformer.h.1.attn.c_attn.weight"].dtype == torch.float64 and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_surgery_it_cannot_do_is_refused_before_the_model_changes(tokenizers_by_bos, tmp_path):
    """Refusals of remove_layers come before anything is changed: a GPT-2 scaled by its layer index whose
    queries are offloaded to disk (the old code moved the blocks, rescaled some and raised half way: the
    model computed something else), or with cross-attention (whose scaling is not rewritten)."""
    model, _, folder = saved(tmp_path, "gpt2", tokenizers_by_bos, scale_attn_by_inverse_layer_idx=True)
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.ln_f": "cpu",
                  "lm_head": "cpu", **{f"transformer.h.{i}": "cpu" if i < 4 else "disk" for i in range(N_LAYERS)}}
    dispatched, _, _ = prune.load(folder, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    x = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = dispatched(x).logits
    with pytest.raises(PruneError, match="offloaded"):
        prune.remove_layers(dispatched, [2])
    assert len(dispatched.transformer.h) == N_LAYERS and dispatched.config.num_hidden_layers == N_LAYERS
    with torch.no_grad():
        assert torch.equal(dispatched(x).logits, before)
    cross = build_model("gpt2", scale_attn_by_inverse_layer_idx=True, add_cross_attention=True)
    with pytest.raises(PruneError, match="add_cross_attention"):
        prune.remove_layers(cross, [2])
    assert len(cross.transformer.h) == N_LAYERS
    prune.remove_layers(cross, [N_LAYERS - 1])  # no kept block moves: nothing to rewrite


def test_outofcore_counts_a_stored_tied_head_once_and_leaves_a_stale_mergekit_config(tokenizers_by_bos, tmp_path):
    """A tied LM head stored beside the embeddings is one parameter, as the loaded model counts it; a
    pruned source's mergekit.yaml describes the source's blocks, not the output's, so it stays behind;
    the card names no recipe or evaluation files the folder does not hold."""
    from safetensors.torch import load_file, save_file

    from prune.model.loading import count_parameters

    model, tok, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "mergekit.yaml").write_text("merge_method: passthrough\n")
    out = prune_checkpoint(folder, [1, 4, 5], tmp_path / "ooc", pruning={})
    record = json.loads((out / "pruning.json").read_text())
    before = count_parameters(model)
    prune.remove_layers(model, [1, 4, 5])
    assert (record["params_before"], record["params_after"]) == (before, count_parameters(model))
    assert not (out / "mergekit.yaml").exists()
    card = (out / "README.md").read_text()  # no recipe and no evaluation here: the card names none
    assert "## Recipe" not in card and "eval.json" not in card and "recipe.yaml" not in card
    assert "made without a recipe" in card
    # the copy is left out as prune.save leaves it out (it was written: the two paths gave different checkpoints),
    # and prune check passes the source and the output (the meta load leaves a stored copy untied: it failed both)
    from prune.export.check import check_checkpoint

    in_memory = prune.save(model, tok, tmp_path / "mem")
    assert set(load_file(out / "model.safetensors")) == set(load_file(in_memory / "model.safetensors"))
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    for folder_checked in (folder, out):
        report = check_checkpoint(folder_checked)
        assert report.ok and any(f.area == "tied" and f.level == "ok" for f in report.findings), report.summary()
    # a copy of OTHER values is no tie (transformers loads it as its own weight): kept, and check says the config lies
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    other = prune_checkpoint(folder, [1], tmp_path / "ooc2", pruning={})
    assert "lm_head.weight" in load_file(other / "model.safetensors")
    assert not check_checkpoint(other).ok


def test_outofcore_pruning_refuses_bad_input_before_writing(tokenizers_by_bos, tmp_path):
    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    for bad, message in (([], "no blocks"), ([8], "out of range"), (list(range(8)), "cannot remove all")):
        with pytest.raises(PruneError, match=message):
            prune_checkpoint(folder, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(PruneError, match="already exists"):
        prune_checkpoint(folder, [3], tmp_path / "exists")
    # a Hub model: the existing output is refused before any shard is downloaded (offline here:
    # a download would fail with another message)
    with pytest.raises(PruneError, match="already exists"):
        prune_checkpoint("some-org/not-downloaded", [3], tmp_path / "exists")
    # a record that contradicts removed= (it was overwritten by it without a word)
    with pytest.raises(PruneError, match=re.escape("pruning= records removed [1], but removing [3, 4] from the 8 blocks")):
        prune_checkpoint(folder, [3, 4], tmp_path / "out", pruning={"removed": [1]})
    with pytest.raises(PruneError, match=re.escape("records layers_before 9, but removing [3] from the 8 blocks of")):
        prune_checkpoint(folder, [3], tmp_path / "out", pruning={"removed": [3], "layers_before": 9})
    assert not (tmp_path / "out").exists()


def test_cli_remove_writes_the_pruned_checkpoint(tokenizers_by_bos, tmp_path, capsys):
    from prune.cli import main

    from prune.cli import parse_blocks

    assert parse_blocks(["5", "1-3", "7 - 7"]) == [1, 2, 3, 5, 7]  # indices and inclusive ranges
    with pytest.raises(PruneError, match=r"--blocks names block\(s\) \[2, 3\] more than once"):
        parse_blocks(["1-3", "2", "3"])  # a typo (3,3 for 3,4) removed fewer blocks than meant, silently
    model, _, folder = saved(tmp_path, "phi3", tokenizers_by_bos)
    assert main(["remove", str(folder), "--blocks", "2-3,5", "-o", str(tmp_path / "out")]) == 0
    assert "without blocks [2, 3, 5]" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["removed"] == [2, 3, 5] and record["created"].startswith("20")  # dated, as a run's record (null)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config.num_hidden_layers == 5
    capsys.readouterr()  # the load's progress bar
    for bad in ("2,x", "4-3", "-1", "3..4"):
        assert main(["remove", str(folder), "--blocks", bad, "-o", str(tmp_path / "o2")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --blocks takes 0-based indices and inclusive ranges like 12-18,25; got {bad.split(',')[-1]!r}"]
    assert not (tmp_path / "o2").exists()


# ---- 4. choosing the mode -----------------------------------------------------------------------
def tight_memory(folder) -> int:
    """A memory limit that holds one block and the activations (4 windows x 32, batch 2) but
    not the whole model."""
    one_block = plan_execution(folder, "sequential", n_windows=4, seq_len=32, batch_size=2)
    return one_block.block_bytes + one_block.activation_bytes + Checkpoint(folder).total_bytes // 4


def test_the_working_set_counts_ckas_gram_matrices():
    """CKA holds one float64 Gram matrix per state of cka_windows * seq_len tokens squared: 1.1 GB for a 32-block
    model at 2,048 tokens, 71 GB with cka_windows 8, which the plan left out (a review)."""
    from transformers import LlamaConfig

    from prune.pipeline.execution import working_set

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32)
    without = working_set(config, 33, 16, 2048, 4, 2, None)[1]
    one, eight = (working_set(config, 33, 16, 2048, 4, 2, c)[1] - without for c in (1, 8))
    assert one == 33 * 2048 ** 2 * 8 and eight == 64 * one


def test_mode_choice_from_size_and_memory(tokenizers_by_bos, tmp_path):
    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    weights = Checkpoint(folder).total_bytes
    plan = plan_execution(folder, n_windows=4, seq_len=32, batch_size=2)
    assert plan.mode == "in_memory" and "fit in" in plan.reason
    # a memory limit below the whole model but above one block (+ activations): sequential
    limit = tight_memory(folder)
    assert limit < 2 * weights
    plan = plan_execution(folder, max_memory={"cpu": limit}, n_windows=4, seq_len=32, batch_size=2)
    assert plan.mode == "sequential" and "exceed" in plan.reason and plan.memory_bytes == limit
    assert plan.block_bytes < weights // 4 and plan.describe().startswith("execution: sequential")
    assert plan_execution(folder, "in_memory", max_memory={"cpu": 1}).mode == "in_memory"
    assert plan_execution(folder, device_map="cpu").mode == "in_memory"  # Accelerate places it
    assert plan_execution(folder, "sequential").mode == "sequential"
    # a batch larger than the windows is all the windows (it was costed as asked)
    huge = plan_execution(folder, "sequential", n_windows=4, seq_len=32, batch_size=10**9)
    assert huge.activation_bytes == plan_execution(folder, "sequential", n_windows=4, seq_len=32,
                                                   batch_size=4).activation_bytes


def test_a_run_that_needs_the_whole_model_is_told_memory_is_short(tokenizers_by_bos, tmp_path):
    """A healing (or evaluating) run whose model does not fit: auto planned one block at a time, then refused that
    ("lower calibration.n_samples", which changed nothing, or "healing trains the model in memory")."""
    from prune.pipeline.engines import whole_model_reason
    from prune.pipeline.orchestrator import run
    from prune.pipeline.recipe import load_recipe

    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    limit = tight_memory(folder)
    recipe = _recipe(folder, tmp_path / "out", "auto")
    assert whole_model_reason(load_recipe(recipe)) is None
    recipe["model"]["max_memory"] = {"cpu": limit}
    recipe["heal"] = {"method": "lora", "data": {"path": str(WIKI_RAW), "rows": "0:300"}, "n_samples": 4, "seq_len": 32,
                      "steps": 1, "batch_size": 2}
    assert whole_model_reason(load_recipe(recipe)) == "healing trains the model in memory"
    with pytest.raises(PruneError, match=r"^not enough memory for this run: weights .* exceed 90% of .* and healing "
                                         r"trains the model in memory, so the model cannot run one block at a time"):
        run(recipe, quiet=True)
    del recipe["heal"]
    recipe["select"] = {"strategy": "sleb", "n_layers": 2}
    assert whole_model_reason(load_recipe(recipe)) == "select.strategy sleb runs the whole model"


def test_refuses_when_memory_cannot_hold_one_block(tokenizers_by_bos, tmp_path):
    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    for requested in ("auto", "sequential"):
        with pytest.raises(PruneError, match="not enough memory for out-of-core scoring: one block needs"):
            plan_execution(folder, requested, max_memory={"cpu": "10KB"}, n_windows=4, seq_len=32)
    with pytest.raises(PruneError, match="is not a size"):
        plan_execution(folder, "sequential", max_memory={"cpu": "lots"})
    # the float32 states between blocks stay in memory below 64 MiB (9 x 64 x 256 x 48 x 4 bytes = 27 MiB here):
    # they count (a 24 MiB cap was accepted for 27 MiB of states alone)
    states = 9 * 64 * 256 * 48 * 4
    plan = plan_execution(folder, "sequential", n_windows=64, seq_len=256, batch_size=8)
    assert plan.activation_bytes > states
    with pytest.raises(PruneError, match="not enough memory for out-of-core scoring"):
        plan_execution(folder, "sequential", n_windows=64, seq_len=256, batch_size=8,
                       max_memory={"cpu": plan.block_bytes + plan.activation_bytes - states // 2})
    with pytest.raises(PruneError, match="score.execution"):
        plan_execution(folder, "fast")


def _recipe(folder, out, execution, **select):
    return {"model": {"source": str(folder)},
            "calibration": {"path": str(WIKI_RAW), "rows": "0:300", "n_samples": 4, "seq_len": 32, "batch_size": 2},
            "score": {"execution": execution},
            "select": {"strategy": "contiguous", "n_layers": 2, "metric": "angular", **select},
            "output": {"dir": str(out)}}


def test_run_sequential_equals_run_in_memory(tokenizers_by_bos, tmp_path, capsys):
    from prune.pipeline.orchestrator import run

    _, _, folder = saved(tmp_path, "gemma2", tokenizers_by_bos, max_shard_size="150KB")
    mem = run(_recipe(folder, tmp_path / "mem", "in_memory"))
    seq = run(_recipe(folder, tmp_path / "seq", "sequential"))
    said = capsys.readouterr().err
    assert "execution: in_memory (asked for in the recipe)" in said and "execution: sequential" in said
    assert seq.selection.removed == mem.selection.removed
    assert_same_scores(mem.scores_before, seq.scores_before)
    assert_same_scores(mem.scores_after, seq.scores_after)
    a, b = all_tensors(mem.out_dir), all_tensors(seq.out_dir)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((seq.out_dir / "pruning.json").read_text())
    assert record["execution"]["mode"] == "sequential" and record["removed"] == mem.selection.removed
    assert record["params_after"] == prune.count_parameters(AutoModelForCausalLM.from_pretrained(seq.out_dir))
    assert json.loads((mem.out_dir / "pruning.json").read_text())["execution"]["mode"] == "in_memory"
    assert (seq.out_dir / "recipe.yaml").is_file()
    def both_plans(source, name: str, model_dtype: str | None, output_dtype: str | None, saved: torch.dtype) -> Path:
        """The same recipe in memory and out of core: the same tensors, in ``saved``; the sequential folder."""
        outs = {}
        for mode in ("in_memory", "sequential"):
            recipe = _recipe(source, tmp_path / f"{name}-{mode}", mode)
            if model_dtype:
                recipe["model"]["dtype"] = model_dtype
            if output_dtype:
                recipe["output"]["dtype"] = output_dtype
            outs[mode] = run(recipe, quiet=True).out_dir
        a, b = all_tensors(outs["in_memory"]), all_tensors(outs["sequential"])
        assert {t.dtype for t in b.values()} == {saved} and sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        saved_name = json.loads((outs["sequential"] / "pruning.json").read_text())["dtype"]
        assert saved_name == str(saved).removeprefix("torch.")  # the card says it too, rendered before the shards
        assert f"**Saved dtype**: `{saved_name}`" in (outs["sequential"] / "README.md").read_text(), name
        return outs["sequential"]

    # loaded in bfloat16, output.dtype auto: both save what they loaded (out of core saved the stored float32)
    seq_bf16 = both_plans(folder, "bf16", "bfloat16", None, torch.bfloat16)
    assert json.loads((seq_bf16 / "pruning.json").read_text())["dtype"] == "bfloat16"
    assert "**Saved dtype**: `bfloat16`" in (seq_bf16 / "README.md").read_text()
    # loaded in bfloat16, saved in float32: both round through bfloat16 (out of core cast the stored float32 directly)
    both_plans(folder, "bf16-f32", "bfloat16", "float32", torch.float32)
    # the same with model.dtype auto over a config that names bfloat16 (stored float32): a load takes the config's
    import shutil

    named = shutil.copytree(folder, tmp_path / "named-bf16")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    both_plans(named, "auto-f32", None, "float32", torch.float32)
    both_plans(named, "auto-auto", None, None, torch.bfloat16)  # as the config names it (the card had no dtype)


def test_run_auto_chooses_sequential_when_memory_is_short(tokenizers_by_bos, tmp_path, capsys):
    from prune.pipeline.orchestrator import run

    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    recipe = _recipe(folder, tmp_path / "out", "auto")
    recipe["model"]["max_memory"] = {"cpu": tight_memory(folder)}
    result = run(recipe)
    assert "execution: sequential (weights" in capsys.readouterr().err
    assert result.pruning.execution["requested"] == "auto"
    with_eval = _recipe(folder, tmp_path / "out2", "sequential")
    with_eval["evaluate"] = {"perplexity": {"path": str(WIKI_RAW), "rows": "2000:2100", "seq_len": 32}}
    with pytest.raises(PruneError, match="cannot evaluate"):
        run(with_eval)
    with_eval["evaluate"] = {"fidelity": {"path": str(WIKI_RAW), "rows": "2000:2100", "seq_len": 32}}
    with pytest.raises(PruneError, match="cannot evaluate"):  # a fidelity section alone: it was silently dropped
        run(with_eval)
    with pytest.raises(PruneError, match="runs the model"):
        run(_recipe(folder, tmp_path / "out3", "sequential", strategy="iterative"))
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_score_model_sequential_says_so(tokenizers_by_bos, tmp_path, capsys):
    from prune.pipeline.commands import score_model

    _, _, folder = saved(tmp_path, "mistral", tokenizers_by_bos)
    kwargs = dict(data=str(WIKI_RAW), rows="0:300", n_samples=4, seq_len=32, batch_size=2)
    seq = score_model(str(folder), execution="sequential", **kwargs)
    mem = score_model(str(folder), execution="in_memory", **kwargs)
    assert seq.metadata["execution"]["mode"] == "sequential" and mem.metadata["execution"]["mode"] == "in_memory"
    assert_same_scores(mem, seq)
    assert "execution: sequential (asked for" in capsys.readouterr().err


# ---- GPU variants (run only where CUDA exists) ----------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3_moe"])
def test_gpu_cpu_dispatched_scores_equal_single_gpu(arch, tokenizers_by_bos, calib_text, tmp_path):
    model, tok, folder = saved(tmp_path, arch, tokenizers_by_bos)
    w = windows_for(tok, calib_text)
    single, _, _ = prune.load(folder, device_map="cuda:0")
    expected = prune.score(single, w, batch_size=2, progress=False)
    n_gpus = torch.cuda.device_count()
    devices = ("cuda:0", "cuda:1") if n_gpus > 1 else ("cuda:0", "cpu")
    dispatched, _, _ = prune.load(folder, device_map=split_map(model, devices=devices, rest="cuda:0"))
    got = prune.score(dispatched, w, batch_size=2, progress=False)
    assert_same_scores(expected, got, atol=1e-4)
    assert got.metadata == {} and expected.n_tokens == got.n_tokens


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_gpu_sequential_scores_equal_in_memory(arch, tokenizers_by_bos, calib_text, tmp_path):
    _, tok, folder = saved(tmp_path, arch, tokenizers_by_bos, max_shard_size="150KB")
    w = windows_for(tok, calib_text)
    model, _, _ = prune.load(folder, device_map="cuda:0")
    expected = prune.score(model, w, batch_size=2, progress=False)
    got = score_sequential(folder, w, batch_size=2, device="cuda:0", progress=False)
    assert_same_scores(expected, got, atol=1e-4)
    cpu = score_sequential(folder, w, batch_size=2, progress=False)
    assert_same_scores(cpu, got, atol=1e-3)


@needs_cuda
def test_gpu_plan_uses_gpu_memory(tokenizers_by_bos, tmp_path):
    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    plan = plan_execution(folder, "sequential", device_map="cuda:0")
    assert plan.device == "cuda:0" and plan.memory_bytes <= torch.cuda.mem_get_info(0)[0]
    with pytest.raises(PruneError, match="one block needs"):
        plan_execution(folder, "sequential", device_map="cuda:0", max_memory={0: "10KB"})


def test_out_of_core_recipe_runs(tokenizers_by_bos, tmp_path, monkeypatch):
    from prune.pipeline.orchestrator import run
    from prune.pipeline.recipe import load_recipe

    _, _, folder = saved(tmp_path, "qwen3", tokenizers_by_bos)
    monkeypatch.setenv("PRUNE_MODEL", str(folder))
    recipe = load_recipe(prune_root() / "recipes" / "out-of-core.yaml",
                         [f"output.dir={tmp_path / 'out'}", "calibration.n_samples=4", "calibration.seq_len=32"])
    result = run(recipe, quiet=True)
    assert result.pruning.execution["mode"] == "sequential" and len(result.selection.removed) == 2
    assert AutoModelForCausalLM.from_pretrained(result.out_dir).config.num_hidden_layers == 6


def prune_root():
    return Path(__file__).resolve().parents[1]


def test_a_mixed_dtype_checkpoint_is_written_out_of_core_as_in_memory(tokenizers_by_bos, tmp_path):
    """bfloat16 weights with float32 norms, ``dtype: auto``: a load gives one dtype (the config's), so
    prune.save writes bfloat16 throughout; out of core writes the same, tensor for tensor."""
    from safetensors.torch import load_file, save_file

    folder = prune.save(build_model("llama").to(torch.bfloat16), tokenizers_by_bos[True], tmp_path / "mixed")
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.float() if "norm" in k else v for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    prune.remove_layers(model, [3])
    a = all_tensors(prune.save(model, None, tmp_path / "mem"))
    b = all_tensors(prune_checkpoint(folder, [3], tmp_path / "ooc", pruning={"removed": [3]}))
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    # every tensor stored in float32 under a config that says bfloat16: a load gives bfloat16, so does out of core
    # (it copied float32 as stored, twice the size, and pruning.json said float32 beside config.json's bfloat16)
    save_file({k: v.float() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    c = all_tensors(prune_checkpoint(folder, [3], tmp_path / "ooc32", pruning={"removed": [3]}))
    assert sorted(c) == sorted(a) and all(c[k].dtype == torch.bfloat16 and torch.equal(a[k], c[k]) for k in a)
    assert json.loads((tmp_path / "ooc32" / "pruning.json").read_text())["dtype"] == "bfloat16"


def test_the_out_of_core_copy_leaves_adapters_and_load_flags_behind_and_refuses_a_source_missing_weights(
        tokenizers_by_bos, tmp_path):
    """A PEFT adapter beside a merged checkpoint: its config was carried and its weights not, so from_pretrained
    failed on the output; ``tokenizer_config.json`` kept how the source was loaded (``local_files_only``), which the
    in-memory save drops; a source lacking a kept block's weight was written, then called an internal error; and
    ``--blocks 0-999999999`` built the range until memory ran out."""
    from safetensors.torch import load_file, save_file

    from conftest import prune_main

    _, _, folder = saved(tmp_path, "llama", tokenizers_by_bos)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 8)}, str(folder / "adapter_model.safetensors"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "is_local": True, "local_files_only": True}))
    out = tmp_path / "out"
    prune_main("remove", folder, "--blocks", "1", "-o", out, "-q", check_rc=0)
    assert not [p.name for p in out.iterdir() if p.name.startswith("adapter")]
    assert not {"is_local", "local_files_only"} & set(json.loads((out / "tokenizer_config.json").read_text()))
    AutoModelForCausalLM.from_pretrained(out)  # it failed: adapter_model.safetensors not found
    # a kept block's weight missing from the source: one line before anything is written (a removed block's may be)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.2.mlp.up_proj")},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    proc = prune_main("remove", folder, "--blocks", "1", "-o", tmp_path / "out2", "-q")
    assert proc.returncode == 2 and "lacks weights for model.layers.2.mlp.up_proj.weight: it is not a complete" \
        in proc.stderr and not (tmp_path / "out2").exists()
    prune_main("remove", folder, "--blocks", "2", "-o", tmp_path / "out3", "-q", check_rc=0)
    proc = prune_main("remove", folder, "--blocks", "0-999999999", "-o", tmp_path / "out4", "-q")
    assert proc.returncode == 2 and "beyond any model's blocks" in proc.stderr
