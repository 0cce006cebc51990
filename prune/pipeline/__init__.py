"""The one orchestrator of a recipe (:func:`run`), its progress folder, execution planning, the recipe
schema and the commands behind the CLI.

``from prune.pipeline import run, score_model, evaluate_model`` works as in 0.1.0.
"""

from __future__ import annotations


def __getattr__(name: str):
    from prune._compat import lookup

    return lookup(__name__, ("pipeline.orchestrator", "pipeline.commands", "core.console", "core.tables", "measure.evaluation"), name)
