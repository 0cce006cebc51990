"""Old module names (0.1.0's flat layout) kept importable for one release, with a DeprecationWarning.

``import prune.models`` (or ``from prune.models import load_model``) still works: the old
name becomes a module whose attributes are looked up in the new modules that took its code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: old module -> the new modules that hold its names, the main one first
MOVED: dict[str, tuple[str, ...]] = {
    "errors": ("core.errors",),
    "metrics": ("core.metrics",),
    "faults": ("core.faults",),
    "data": ("io.text", "core.config"),
    "checkpoint": ("io.safetensors",),
    "models": ("model.loading", "model.arch", "io.source", "core.config"),
    "skeleton": ("model.skeleton",),
    "surgery": ("model.surgery",),
    "capture": ("model.capture",),
    "scoring": ("measure.scoring",),
    "sequential": ("measure.sequential",),
    "evaluate": ("measure.perplexity",),
    "lmeval": ("measure.lmeval",),
    "select": ("choose.rules",),
    "strategies": ("choose.strategies", "choose.registry"),
    "training": ("heal.training",),
    "lineage": ("export.lineage",),
    "card": ("export.card",),
    "check": ("export.check", "io.safetensors"),
    "hub": ("export.push",),
    "outofcore": ("export.outofcore",),
    "report": ("export.report", "pipeline.commands"),
    "execution": ("pipeline.execution", "pipeline.engines"),
    "progress": ("pipeline.progress",),
    "heal_run": ("pipeline.heal_run",),
    "recipe": ("pipeline.recipe", "core.config"),
}


def lookup(name: str, targets: tuple[str, ...], attr: str):
    """``attr`` from the first of the modules ``prune.<target>`` that has it."""
    if not attr.startswith("__"):
        for t in targets:
            module = importlib.import_module(f"prune.{t}")
            if hasattr(module, attr):
                return getattr(module, attr)
    raise AttributeError(f"module {name!r} has no attribute {attr!r}")


class _Alias(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Deprecated alias of {', '.join('prune.' + t for t in targets)}.")
        self._targets = targets

    def _modules(self):
        return [importlib.import_module(f"prune.{t}") for t in self._targets]

    def __getattr__(self, attr: str):
        return lookup(self.__name__, self._targets, attr)

    def __call__(self, *args, **kwargs):
        """``import prune.select`` binds the old module over the function ``prune.select`` (the
        import system sets the package attribute); calling the alias calls that function."""
        return lookup(self.__name__, self._targets, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)

    def __dir__(self):
        return sorted({n for m in self._modules() for n in dir(m)})


def _importer_level() -> int:
    """The ``stacklevel`` of the code that wrote the import (past the import machinery and this module):
    Python shows a DeprecationWarning by default only when it points into ``__main__`` (a script, a
    notebook cell); pointing into the import system, it was never shown."""
    frame, level = sys._getframe(1), 1  # warnings.warn does not count the import system's frames
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
        if frame is not None and not frame.f_code.co_filename.startswith("<frozen importlib"):
            level += 1
    return level


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.partition(".")
        if head == "prune" and old in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name.split(".", 1)[1]
        warnings.warn(f"{spec.name} is deprecated and will be removed in 0.3; import from "
                      f"prune.{MOVED[old][0]} instead", DeprecationWarning, stacklevel=_importer_level())
        return _Alias(spec.name, MOVED[old])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
