"""Writing outputs: atomic checkpoint folders, lineage, model card, checks, Hub push, report.

``from prune.export import save`` works as in 0.1.0.
"""

from __future__ import annotations


def __getattr__(name: str):
    from prune._compat import lookup

    return lookup(__name__, ("export.saving", "io.staging"), name)
