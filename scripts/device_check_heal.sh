#!/usr/bin/env bash
# GPU check of healing (prune.heal), for a machine with a CUDA GPU; about 1-2 minutes.
#   bash scripts/device_check_heal.sh            (from the repository root)
# On the GPU, with Accelerate placing the model: each method (lora, replace, partial) on a tiny
# Llama with bf16 mixed precision, gradient accumulation 2 and gradient checkpointing; then
# lora and replace on SmolLM2-135M (if its GGUF is installed) in fp16. Checks: the loss goes
# down, training ran on cuda, the healed model saves and reloads with plain transformers to
# the same logits, no adapter modules remain. Prints one line per case and "ALL OK".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, "tests")
assert torch.cuda.is_available(), "no CUDA GPU here"
from transformers import AutoModelForCausalLM
import prune
from prune.heal import heal_model
from conftest import DATA, build_model, build_tokenizer, smollm2_gguf

C4 = {"path": str(DATA / "c4" / "c4_web_1480.jsonl"), "field": ["prefix", "gold_completion"], "rows": "0:400"}
tmp = Path(tempfile.mkdtemp())


def check(name, model, tok, rec, windows):
    assert rec["device"].startswith("cuda"), rec["device"]
    assert rec["val_loss_after"] < rec["val_loss_before"] or rec.get("replacement", {}).get("val_mse_after", 1) < rec.get("replacement", {}).get("val_mse_before", 0), rec
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
    out = prune.save(model, tok, tmp / name)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(next(model.parameters()).device).eval()
    model.eval()
    x = windows.to(next(model.parameters()).device)
    with torch.no_grad():
        diff = (model(x).logits - again(x).logits).abs().max().item()
    assert diff < 1e-4, diff  # same weights; GPU kernels may differ in the last bits
    print(f"OK {name}: {rec['device']}, {rec['mixed_precision']}, loss {rec['losses'][0]:.3f} -> {rec['losses'][-1]:.3f}, "
          f"held-out {rec['val_loss_before']:.3f} -> {rec['val_loss_after']:.3f}, {rec['seconds']:.1f} s", flush=True)


tok = build_tokenizer(True)
fast = dict(n_samples=32, val_samples=8, seq_len=64, steps=20, batch_size=8, gradient_accumulation=2, learning_rate=5e-3,
            mixed_precision="bf16", gradient_checkpointing=True, quiet=True)
for method in ["lora", "partial", "replace"]:
    model = build_model("llama")
    if method != "replace":
        prune.remove_layers(model, [3, 4, 5])
    rec = heal_model(model, tok, method, data=C4, removed=[3, 4, 5] if method == "replace" else None, **fast)
    check(f"tiny-{method}", model, tok, rec, torch.arange(30)[None])

gguf = smollm2_gguf()
if gguf is None:
    print("SmolLM2 GGUF not installed: skipped the real-model cases")
else:
    for method in ["lora", "replace"]:
        model, stok, _ = prune.load(gguf)
        if method != "replace":
            prune.remove_layers(model, list(range(12, 19)))
        rec = heal_model(model, stok, method, data=C4, removed=list(range(12, 19)) if method == "replace" else None,
                         n_samples=64, val_samples=8,
                         seq_len=256, steps=16, batch_size=4, learning_rate=1e-3, mixed_precision="fp16", quiet=True)
        check(f"smollm2-{method}", model, stok, rec, stok("The capital of France is", return_tensors="pt").input_ids)
print("ALL OK")
EOF
