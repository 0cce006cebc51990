"""Do the removed blocks heal better when they fade out during distillation than when cut at once?

An experiment for issue 16, not a toolkit feature. The recipe cuts blocks 12-18 of SmolLM2-135M
and then distils into LoRA adapters on the kept blocks: training starts from the cut model,
whose KL to the original is high. Here the removed blocks stay during training, each behind a
gate: ``h + alpha (block(h) - h)``, alpha going linearly from 1 to 0 over the first ``--fade``
share of the optimizer steps and 0 after; the adapters (on the kept blocks only: the gated
blocks are hidden from PEFT) learn to do without them while they fade, a continuation from the
original to the cut model (the learned masks of Sheared-LLaMA are a relative). At alpha = 0 the gated
blocks are the identity, and the surgery removes them after training: the same checkpoint
shape as the recipe's. Compared with the cut-first run at the same settings (bench_heal's
``batch1-r64`` distillation: rank 64, one 256-token window per step, no bridge), on bench_heal's
fidelity windows (KL to the original, top-1 agreement, perplexity).

    python scripts/bench_fade.py --tokens 32768 --fade 0.5     # cached per case in bench_cache/heal/
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench_heal as H  # noqa: E402  (its prologue sets the offline environment and sys.path)
import prune  # noqa: E402
from prune.core.records import complement  # noqa: E402
from prune.heal.methods import heal_model  # noqa: E402
from prune.model.loading import decoder_layers  # noqa: E402


class Fade(nn.Module):
    """``h + alpha (block(h) - h)``; the block is kept out of the module tree (no adapters, no gradient)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self._block = [block.requires_grad_(False)]
        self.alpha = 1.0

    def forward(self, hidden_states, *args, **kwargs):
        if self.alpha == 0.0:
            return hidden_states
        out = self._block[0](hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        mixed = hidden_states + self.alpha * (h - hidden_states)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


def run_case(fade: float, tokens: int) -> dict:
    name = f"fade-{fade:g}-{tokens // 1024}k"
    hit = H.cached(name)
    if hit:
        H.log(f"{name}: cached")
        return hit
    base, tok = H.load_dense()
    run = H.removed_blocks(base, tok)
    settings = H.distill_settings("distill", "lora", tokens, "batch1-r64")
    model = copy.deepcopy(base)
    callback = None
    if fade > 0:
        layers = decoder_layers(model)
        # named as the block it gates: the toolkit finds the decoder stack by its blocks' class names
        gate_type = type(type(layers[0]).__name__, (Fade,), {})
        gates = [gate_type(layers[i]) for i in run]
        for i, g in zip(run, gates):
            layers[i] = g
        fade_steps = max(1, round(fade * settings["steps"]))

        def close_gates(step: int, _tokens: int) -> None:
            for g in gates:
                g.alpha = max(0.0, 1.0 - step / fade_steps)
        callback = close_gates
        kept = list(range(len(layers)))
    else:
        prune.remove_layers(model, run)
        kept = complement(len(decoder_layers(base)), run)
    H.log(f"healing {name}: {settings}")
    rec = heal_model(model, tok, teacher_model=base, kept=kept, quiet=True, callback=callback, **settings)
    if fade > 0:
        assert all(g.alpha == 0.0 for g in gates), "the gates did not close: fade >= 1?"
        prune.remove_layers(model, run)
    result = {"case": name, "fade": fade, "tokens": rec["tokens_seen"], "fidelity": H.fidelity_to(model, base, tok),
              "healing": rec, "layers": model.config.num_hidden_layers}
    H.store(name, result)
    H.log(f"{name}: ppl {result['fidelity']['perplexity']:.2f}, KL {result['fidelity']['kl']:.4f}, "
          f"top-1 {result['fidelity']['top1']:.3f} ({rec['seconds']:.0f} s of healing)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--fade", type=float, default=0.5, help="share of the steps over which the blocks fade (0: cut first)")
    args = ap.parse_args()
    if not 0 <= args.fade < 1:
        raise SystemExit("--fade is a share of the steps in [0, 1)")
    torch.manual_seed(0)
    run_case(args.fade, args.tokens)


if __name__ == "__main__":
    main()
