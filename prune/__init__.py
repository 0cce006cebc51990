"""prune: measure and remove redundant decoder layers of large language models.

The Python API, one call per step (0-based block indices everywhere)::

    import prune
    model, tok, src = prune.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    text = prune.load_text(prune.TextSource("wiki.test.raw"))
    windows = prune.calibration_windows(tok, text, n_samples=32, seq_len=256, seed=0)
    scores = prune.score(model, windows)                 # BI, angular, CKA, MSRS
    choice = prune.select(scores, 7, strategy="contiguous")
    prune.remove_layers(model, choice.removed)
    prune.save(model, tok, "out/smollm2-23L", pruning={"removed": choice.removed})
    # healing (LoRA merged back, a replacement block, or the last blocks): prune.heal_model
"""

from .data import TextSource, calibration_windows, eval_windows, load_text
from .errors import PruneError, UnsupportedModelError
from .export import save
from .heal import heal_model
from .models import SUPPORTED_MODEL_TYPES, count_parameters, decoder_layers, load_model
from .scoring import ScoreResult, score
from .select import Selection, select
from .surgery import remove_layers

load = load_model

__all__ = [
    "PruneError",
    "ScoreResult",
    "Selection",
    "SUPPORTED_MODEL_TYPES",
    "TextSource",
    "UnsupportedModelError",
    "calibration_windows",
    "count_parameters",
    "decoder_layers",
    "eval_windows",
    "heal_model",
    "load",
    "load_model",
    "load_text",
    "remove_layers",
    "save",
    "score",
    "select",
]

__version__ = "0.1.0"
