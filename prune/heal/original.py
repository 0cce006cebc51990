"""The run's original model, loaded at most once by ``prune heal``.

``prune heal --evaluate`` with ``evaluate.fidelity`` loads the original for its reference
log-probs before healing; the bridges, a replacement block and a distillation teacher load it
too. :class:`OriginalModel` lets them share that one load: the reference step ``hold``\\ s it
for the healing that follows, which ``take``\\ s it (and no one else keeps it alive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prune.io.source import ModelSource


@dataclass
class OriginalModel:
    """``src`` loaded with ``dtype`` / ``trust_remote_code``."""

    src: ModelSource
    dtype: str
    trust_remote_code: bool = False
    quiet: bool = False
    _held: tuple | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        """Whether a loaded copy waits to be taken."""
        return self._held is not None

    def hold(self, model, tokenizer) -> None:
        """Keep a loaded ``(model, tokenizer)`` for the next :meth:`take`."""
        self._held = (model, tokenizer)

    def release(self) -> None:
        """Forget the held copy (when the healing turns out not to need it)."""
        self._held = None

    def take(self, why: str):
        """``(model, tokenizer)``: the held copy, handed over, or a fresh load (``why`` is said first)."""
        held, self._held = self._held, None
        if held is not None:
            return held
        from prune.core.console import say
        from prune.model.loading import load_model

        say(f"loading the original model {self.src.display} ({why})", self.quiet)
        model, tokenizer, _ = load_model(self.src.path, gguf_file=self.src.gguf_file, dtype=self.dtype,
                                         revision=self.src.revision, trust_remote_code=self.trust_remote_code)
        return model, tokenizer
