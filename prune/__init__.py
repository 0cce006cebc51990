"""prune: measure and remove redundant decoder layers of large language models.

The Python API, one call per step (0-based block indices everywhere)::

    import prune
    model, tok, src = prune.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    text = prune.load_text(prune.TextSource("wiki.test.raw"))
    windows = prune.calibration_windows(tok, text, n_samples=32, seq_len=256, seed=0)
    scores = prune.score(model, windows)                 # BI, angular, CKA, MSRS
    choice = prune.select(scores, 7, strategy="contiguous")    # or prune.sleb / prune.iterative / prune.search
    held = prune.heldout_windows(tok, text, n_samples=32, seq_len=256, seed=0, n_heldout=4)
    choice = prune.verified(model, scores, held, 7)      # the recipes' default: candidates ranked by KL
    prune.write_report("report/", scores, selection=choice)  # report.md + report.html with plots
    prune.remove_layers(model, choice.removed)
    prune.save(model, tok, "out/smollm2-23L", pruning={"removed": choice.removed})
    # healing (LoRA merged back, a replacement block, or the last blocks): prune.heal_model

Models larger than memory, one block at a time, straight from the safetensors shards::

    scores = prune.score_sequential("path/to/model", windows)      # same ScoreResult
    prune.prune_checkpoint("path/to/model", [12, 13, 14], "out/pruned")
"""

from prune.core.config import EvaluateConfig, HealConfig, TextSource
from prune.io.text import calibration_windows, eval_windows, load_text
from prune.core.errors import PruneError, UnsupportedModelError
from prune.export.saving import save
from prune.heal.methods import heal_model
from prune.model.loading import SUPPORTED_MODEL_TYPES, count_parameters, decoder_layers, load_model
from prune.export.outofcore import prune_checkpoint
from prune.export.report import write_report
from prune.measure.scoring import ScoreResult, score
from prune.choose.rules import Selection, select
from prune.measure.sequential import score_sequential
from prune.choose.strategies import heldout_windows, iterative, search, skip_blocks, sleb
from prune.choose.verified import verified
from prune.model.surgery import remove_layers
from prune.pipeline.commands import evaluate_model, score_model
from prune.pipeline.orchestrator import run
from prune.pipeline.recipe import Recipe
from prune.core.console import __version__

load = load_model

__all__ = [
    "EvaluateConfig",
    "HealConfig",
    "PruneError",
    "Recipe",
    "ScoreResult",
    "Selection",
    "SUPPORTED_MODEL_TYPES",
    "TextSource",
    "UnsupportedModelError",
    "calibration_windows",
    "count_parameters",
    "decoder_layers",
    "eval_windows",
    "evaluate_model",
    "heal_model",
    "load",
    "load_model",
    "load_text",
    "prune_checkpoint",
    "remove_layers",
    "run",
    "save",
    "heldout_windows",
    "iterative",
    "score",
    "score_model",
    "score_sequential",
    "search",
    "select",
    "skip_blocks",
    "sleb",
    "verified",
    "write_report",
]


from prune import _compat  # noqa: E402  (old module names, deprecated)

_compat.install()
