"""``prune check OUT --original MODEL``: the checkpoint's blocks against the original's weights
(:mod:`prune.export.verify`), on tiny real models saved to folders."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

import prune
from conftest import DATA, build_model, prune_main


def _edit_record(folder, **fields) -> None:
    path = folder / "pruning.json"
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


def test_check_original_confirms_a_cut_and_names_the_blocks_a_wrong_record_hides(tmp_path, tiny_folder):
    """A cut (two steps, then saved in bfloat16 from the float32 original) passes: every block equal to the
    original's block the record names. A record that names other blocks than the weights hold (its counts
    consistent, so `prune check` alone passes it), a model that is not the original, and weights changed with no
    healing recorded each fail with the block and the reason."""
    step1, step2 = tmp_path / "step1", tmp_path / "step2"
    prune_main("remove", tiny_folder, "--blocks", "3-4", "-o", step1, "-q", check_rc=0)
    prune_main("remove", step1, "--blocks", "0", "-o", step2, "-q", check_rc=0)
    out = prune_main("check", step2, "--original", tiny_folder, check_rc=0).stdout
    assert "each of the 5 blocks is the original's block pruning.json names (1..2, 5..7), unchanged" in out

    model, tok, _ = prune.load(tiny_folder)
    prune.remove_layers(model, [3, 4])
    half = tmp_path / "bf16"
    prune.save(model.to(torch.bfloat16), tok, half, pruning={"removed": [3, 4]})
    prune_main("check", half, "--original", tiny_folder, check_rc=0)

    wrong = tmp_path / "wrong"
    prune_main("remove", tiny_folder, "--blocks", "3-4", "-o", wrong, "-q", check_rc=0)
    _edit_record(wrong, removed=[4, 5], removed_original=[4, 5], removed_original_all=[4, 5],
                 kept=[0, 1, 2, 3, 6, 7], kept_original=[0, 1, 2, 3, 6, 7])
    prune_main("check", wrong, check_rc=0)  # the shapes and counts agree with the record
    proc = prune_main("check", wrong, "--original", tiny_folder, check_rc=2)
    assert ("block 3 of the checkpoint is the original's block 5 (relative difference 0), not block 3 as pruning.json "
            "records") in proc.stdout
    assert proc.stderr.splitlines()[-1].startswith(f"error: {wrong} does not match its original: original: block 3")

    other = tmp_path / "other"
    build_model("llama", seed=7).save_pretrained(other)
    proc = prune_main("check", step1, "--original", other, check_rc=2)
    assert "no block of the checkpoint is near a block of the model given" in proc.stdout
    assert "not the model this checkpoint was pruned from" in proc.stdout

    model, tok, _ = prune.load(step1)  # weights changed after the cut, the record kept as it was
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(step1, safe_serialization=True)
    proc = prune_main("check", step1, "--original", tiny_folder, check_rc=2)
    assert "block 2 differs from the original's block 2 (relative difference" in proc.stdout
    assert "but pruning.json records no healing that trained it" in proc.stdout


def test_check_original_accepts_recorded_healing_and_gpt2_rescaled_queries(tmp_path, tiny_folder, tokenizers_by_bos):
    """Healed blocks differ from the original's but stay nearest the block the record names: accepted when the
    record says a healing trained them. GPT-2 with scale_attn_by_inverse_layer_idx: a moved block's query columns
    are rescaled by the cut (prune.model.surgery.query_rescale), which is the original's block at its new place."""
    model, tok, _ = prune.load(tiny_folder)
    prune.remove_layers(model, [3, 4])
    windows = torch.randint(3, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    record = prune.heal_model(model, tok, "lora", windows=windows, quiet=True, steps=4, batch_size=4, rank=4,
                              learning_rate=1e-2)
    healed = tmp_path / "healed"
    prune.save(model, tok, healed, pruning={"removed": [3, 4], "healing": record})
    out = prune_main("check", healed, "--original", tiny_folder, check_rc=0).stdout
    assert "0 unchanged, 6 trained by the recorded healing" in out and "each nearest the block recorded" in out

    model, tok, _ = prune.load(tiny_folder)  # one block trained in place of three: the others unchanged
    record = prune.heal_model(model, tok, "replace", removed=[3, 4, 5], windows=windows, quiet=True, steps=2,
                              batch_size=4)
    replaced = tmp_path / "replaced"
    prune.save(model, tok, replaced, pruning={"removed": [3, 4, 5], "healing": record})
    out = prune_main("check", replaced, "--original", tiny_folder, check_rc=0).stdout
    assert ("each of the 5 blocks besides the replacement is the original's block pruning.json names (0..2, 6..7), "
            "unchanged; block 3 is the trained replacement of blocks [3, 4, 5]") in out

    gpt2 = tmp_path / "gpt2"
    original = build_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    original.save_pretrained(gpt2)
    tokenizers_by_bos[True].save_pretrained(gpt2)
    model, tok, _ = prune.load(gpt2)
    prune.remove_layers(model, [1])
    prune.remove_layers(model, [2])  # two moves of the blocks after: the factors composed
    cut = tmp_path / "gpt2-cut"
    prune.save(model, tok, cut, pruning={"removed": [1, 3]})
    out = prune_main("check", cut, "--original", gpt2, check_rc=0).stdout
    assert "each of the 6 blocks is the original's block pruning.json names (0, 2, 4..7), unchanged" in out


def test_check_original_reads_bridges_mixed_layouts_dtypes_and_the_model_type(tmp_path, tiny_folder, tokenizers_by_bos):
    """A bridge refits the MLP output projection of the block before a cut by least squares (far from the original's
    values by design): named, not compared (it failed as "far from every block"). A mixture-of-experts model whose
    dense and sparse blocks differ in layout: a changed block is compared with the blocks of its own layout (a
    KeyError). In bfloat16 a whole projection scaled by 1.03 is a change (the tolerance over the block let it pass).
    An original of another model type is named as such."""
    step = tmp_path / "step"
    prune_main("remove", tiny_folder, "--blocks", "3-4", "-o", step, "-q", check_rc=0)
    bridged = tmp_path / "bridged"
    prune_main("heal", step, "-o", bridged, "--method", "bridge", "--data", DATA / "c4" / "c4_web_1480.jsonl",
               "--field", "prefix,gold_completion", "--source", tiny_folder, "--set", "n_samples=8", "--set", "seq_len=32", "--set", "val_samples=4", "-q",
               check_rc=0)
    out = prune_main("check", bridged, "--original", tiny_folder, check_rc=0).stdout
    assert "unchanged; the MLP output projection of block 2 refitted by the recorded bridge (not compared)" in out

    moe = tmp_path / "moe"
    build_model("qwen2_moe").save_pretrained(moe)  # blocks 1, 3, 5, 7 are mixtures
    tokenizers_by_bos[True].save_pretrained(moe)
    cut = tmp_path / "moe-cut"
    prune_main("remove", moe, "--blocks", "4-5", "-o", cut, "-q", check_rc=0)
    model = AutoModelForCausalLM.from_pretrained(cut)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.mul_(1.01)
    model.save_pretrained(cut)
    proc = prune_main("check", cut, "--original", moe, check_rc=2)
    assert "block 1 differs from the original's block 1 (relative difference" in proc.stdout

    half = tmp_path / "half"
    prune_main("remove", tiny_folder, "--blocks", "3", "-o", half, "--dtype", "bfloat16", "-q", check_rc=0)
    prune_main("check", half, "--original", tiny_folder, check_rc=0)
    model = AutoModelForCausalLM.from_pretrained(half, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[4].mlp.down_proj.weight.mul_(1.03)
    model.save_pretrained(half)
    proc = prune_main("check", half, "--original", tiny_folder, check_rc=2)
    assert "block 4 differs from the original's block 5" in proc.stdout

    other = tmp_path / "mistral"
    config = json.loads((tiny_folder / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    MistralForCausalLM(MistralConfig(**{k: config[k] for k in keys if k in config})).save_pretrained(other)
    proc = prune_main("check", step, "--original", other, check_rc=2)
    assert "the model given is mistral, but pruning.json says the original was llama" in proc.stdout
