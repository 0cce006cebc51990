import pytest
import torch

import prune
from prune import PruneError, UnsupportedModelError
from prune.model.loading import decoder_layers_path, final_norm
from prune.io.source import resolve_source

from conftest import N_LAYERS, build_model

EXPECTED_PATHS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h",
                  "gpt_bigcode": "transformer.h", "codegen": "transformer.h", "bloom": "transformer.h",
                  "falcon": "transformer.h", "opt": "model.decoder.layers", "mpt": "transformer.blocks"}


def test_decoder_blocks_are_found_from_metadata(arch):
    model = build_model(arch)
    path = decoder_layers_path(model)
    assert path == EXPECTED_PATHS.get(arch, "model.layers")
    layers = prune.decoder_layers(model)
    assert len(layers) == N_LAYERS
    assert type(layers[0]).__name__ in model._no_split_modules
    # the norm after the blocks (partial fine-tuning trains it; the sequential teacher applies it): BLOOM's beside
    # its embeddings' norm, LFM2's named embedding_norm
    norm = final_norm(model)
    assert norm is not None and (arch != "bloom" or norm is model.transformer.ln_f)
    assert arch != "lfm2" or norm is model.model.embedding_norm


def test_unsupported_architecture_is_named():
    from transformers import AutoModelForCausalLM, BioGptConfig

    model = AutoModelForCausalLM.from_config(BioGptConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                          intermediate_size=32, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match=f"^architecture 'biogpt' is not supported for layer pruning; "
                                                    f"supported: {len(prune.SUPPORTED_MODEL_TYPES)} model types, listed in "
                                                    "the README and prune.SUPPORTED_MODEL_TYPES$"):
        prune.decoder_layers(model)  # it listed all of them: one line of 1,500 characters
    model.config.model_type = "qwen4"  # a near miss is given its nearest
    with pytest.raises(UnsupportedModelError, match=r"SUPPORTED_MODEL_TYPES; the nearest: Qwen3 \(qwen3\), Qwen2 \(qwen2\)$"):
        prune.decoder_layers(model)


def test_a_multimodal_model_is_named_and_checked_without_a_traceback(tmp_path):
    """Gemma 3 with its vision tower (model_type gemma3, the text decoder under text_config): prune check read
    config.num_hidden_layers, which only the text config has (an AttributeError traceback)."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from prune.export.check import check_checkpoint
    from prune.model.loading import check_supported

    config = Gemma3Config(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mm")
    report = check_checkpoint(tmp_path / "mm", tokenizer=False)
    found = {f.area: (f.level, f.message) for f in report.findings}
    assert found["config"][0] == "ok" and "num_hidden_layers=3" in found["config"][1]
    assert found["blocks"][0] == "warn" and "gemma3 (an architecture pruning does not support)" in found["blocks"][1]
    assert found["load"][0] == "ok", found
    with pytest.raises(UnsupportedModelError, match="'gemma3' is not supported for layer pruning \\(a model around "
                                                    "a text decoder, gemma3_text: give a text-only checkpoint"):
        check_supported(config)


def test_load_from_local_folder_with_dtype(tmp_path, tokenizers_by_bos):
    model = build_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tokenizers_by_bos[False].save_pretrained(tmp_path / "m")
    loaded, tok, src = prune.load(tmp_path / "m", dtype="bfloat16", device_map="cpu")
    assert src.kind == "folder" and loaded.dtype == torch.bfloat16 and not loaded.training
    assert tok.eos_token == "</s>"
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        a = model(x).logits
        b = loaded.float()(x).logits
    assert torch.allclose(a, b, atol=0.05, rtol=0.05)


def test_source_errors_are_one_line(tmp_path):
    with pytest.raises(PruneError, match="model path not found"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruneError, match="is a folder but not a model"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(PruneError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    (tmp_path / "empty" / "m-Q8_0.gguf").write_bytes(b"GGUF")  # a folder of GGUF files: named, with the fix
    with pytest.raises(PruneError, match=r"holds GGUF files \(m-Q8_0.gguf\) but no config.json: give the .gguf"):
        resolve_source(str(tmp_path / "empty"))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_hub_id_offline_fails_cleanly():
    with pytest.raises(PruneError, match="could not load some-org/not-a-real-model"):
        prune.load("some-org/not-a-real-model")


def test_absent_device_and_disk_without_folder_are_refused(tmp_path):
    from prune.model.loading import check_device_map

    with pytest.raises(PruneError, match="not present"):
        check_device_map({"model.layers.0": "cuda:7"} if not torch.cuda.is_available() else {"x": "cuda:99"}, None)
    with pytest.raises(PruneError, match="no offload_folder"):
        check_device_map({"model.layers.0": "disk"}, None)
