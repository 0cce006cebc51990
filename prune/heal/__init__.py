"""Healing a pruned model: LoRA, replacement block, partial fine-tuning (``methods``), the
training loop (``training``), and distillation from the original as the objective (``distill``).

``from prune.heal import heal_model`` works as in 0.1.0.
"""

from __future__ import annotations


def __getattr__(name: str):
    from prune._compat import lookup

    return lookup(__name__, ("heal.methods",), name)
