"""What the user sees on the terminal: stage lines, quiet mode, library versions."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass

__version__ = "0.2.0"  # the package version (pyproject.toml's)


def versions() -> dict[str, str]:
    """Library versions recorded beside every result."""
    import importlib.metadata as md

    # prune's own: the code running (an editable install's metadata keeps the version it was installed at)
    out = {"python": platform.python_version(), "prune-layers": __version__}
    for name in ("torch", "transformers", "accelerate", "datasets", "lm_eval", "huggingface_hub", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


_QUIET = {"on": False}
_TQDM_INIT: dict = {}
_BEFORE_QUIET: list["_Loudness"] = []  # what quiet mode changed, as it was: restored by quiet_mode(False)


def is_quiet() -> bool:
    """Whether the running command was asked to be quiet (:func:`quiet_mode`)."""
    return _QUIET["on"]


def quiet_mode(quiet: bool) -> None:
    """Silence every progress bar (ours, transformers', datasets', huggingface_hub's and lm-eval's,
    which pass ``disable=False`` themselves: tqdm is made to ignore it) and library warnings below
    errors when ``quiet``; ``quiet_mode(False)`` undoes all of it (``TQDM_DISABLE``, the libraries'
    bars and verbosity, lm-eval's log levels), so a later run in the same process shows its bars."""
    import logging

    import tqdm.std

    _QUIET["on"] = bool(quiet)
    if quiet and "init" not in _TQDM_INIT:
        original = _TQDM_INIT["init"] = tqdm.std.tqdm.__init__

        def silent_init(self, *args, **kwargs):
            kwargs["disable"] = True
            original(self, *args, **kwargs)

        tqdm.std.tqdm.__init__ = silent_init
    elif not quiet and "init" in _TQDM_INIT:
        tqdm.std.tqdm.__init__ = _TQDM_INIT.pop("init")
    if not quiet:
        _restore()
        return
    import huggingface_hub.utils
    import transformers

    if not _BEFORE_QUIET:
        _BEFORE_QUIET.append(_Loudness.now())
    os.environ["TQDM_DISABLE"] = "1"
    for name in _lm_eval_loggers():
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if (datasets := _datasets_if_imported()) is not None:
        datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _datasets_if_imported():
    """The ``datasets`` module when something already imported it, else None: quiet mode does not
    import it (0.7 s per process); one imported later is silenced by the tqdm patch and ``TQDM_DISABLE``."""
    return sys.modules.get("datasets")


def keeps_quiet_mode(fn):
    """Decorator for the entry points that call :func:`quiet_mode`: on return (or an error) the
    process is as quiet as before the call, so ``prune.run(..., quiet=True)`` in a notebook leaves
    transformers' bars and warnings as the user had them."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was = is_quiet()
        try:
            return fn(*args, **kwargs)
        finally:
            quiet_mode(was)

    return wrapper


def _lm_eval_loggers() -> list[str]:
    import logging

    return [n for n in list(logging.root.manager.loggerDict) + ["lm_eval", "lm-eval"] if n.startswith(("lm_eval", "lm-eval"))]


@dataclass
class _Loudness:
    """What :func:`quiet_mode` changes, as it was before."""

    tqdm_disable: str | None  # the TQDM_DISABLE variable
    transformers_bars: bool
    transformers_level: int
    datasets_bars: bool | None  # None: datasets was not imported then
    hub_bars: bool
    lm_eval_levels: dict[str, int]

    @classmethod
    def now(cls) -> "_Loudness":
        import logging

        import huggingface_hub.utils
        import transformers

        datasets = _datasets_if_imported()
        return cls(os.environ.get("TQDM_DISABLE"), transformers.utils.logging.is_progress_bar_enabled(),
                   transformers.utils.logging.get_verbosity(), datasets and datasets.is_progress_bar_enabled(),
                   not huggingface_hub.utils.are_progress_bars_disabled(),
                   {name: logging.getLogger(name).level for name in _lm_eval_loggers()})

    def restore(self) -> None:
        import logging

        import huggingface_hub.utils
        import transformers

        if self.tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = self.tqdm_disable
        if self.transformers_bars:
            transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity(self.transformers_level)
        if self.datasets_bars:
            _datasets_if_imported().enable_progress_bars()
        if self.hub_bars:
            huggingface_hub.utils.enable_progress_bars()
        for name, level in self.lm_eval_levels.items():
            logging.getLogger(name).setLevel(level)


def _restore() -> None:
    """Undo what :func:`quiet_mode` changed (nothing when it changed nothing)."""
    if _BEFORE_QUIET:
        _BEFORE_QUIET.pop().restore()


def set_log_level(level: str) -> None:
    """``--log-level``: Python logging, transformers, datasets and lm-eval at ``level`` (debug, info, warning, error)."""
    import logging

    value = getattr(logging, level.upper())
    logging.basicConfig(level=value, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(value)
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(value)
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity(value)
        datasets.utils.logging.set_verbosity(value)
    except ImportError:  # pragma: no cover
        pass


def say(message: str, quiet: bool | None = None) -> None:
    """A progress or stage line, on stderr (results go to stdout: :func:`show`); ``quiet`` None: :func:`is_quiet`."""
    if not (is_quiet() if quiet is None else quiet):
        print(message, file=sys.stderr, flush=True)


_ONCE_SCOPES: list[set[str]] = []  # the messages said in each open notes_once() scope


@contextlib.contextmanager
def notes_once():
    """Within it (one command), :func:`say_once` prints each message the first time only: a command's
    pre-flight and the library call it then makes both check the same settings."""
    _ONCE_SCOPES.append(set())
    try:
        yield
    finally:
        _ONCE_SCOPES.pop()


def say_once(message: str) -> None:
    """:func:`say`, but once per :func:`notes_once` scope (outside one, every time)."""
    if _ONCE_SCOPES:
        if message in _ONCE_SCOPES[-1]:
            return
        _ONCE_SCOPES[-1].add(message)
    say(message)


def show(message: str, quiet: bool | None = None) -> None:
    """A result (a table, a summary), on stdout."""
    if not (is_quiet() if quiet is None else quiet):
        print(message, flush=True)


_ANNOUNCED: set[str] = set()


def announce_remote_code(where: str) -> None:
    """Say on stderr, once per checkpoint and process (the pre-flight and the load both ask), that code
    shipped with the checkpoint ``where`` will run (asked for by ``--trust-remote-code`` or the recipe the
    user ran; never by a file inside an input folder)."""
    import sys

    if where in _ANNOUNCED:
        return
    _ANNOUNCED.add(where)
    print(f"note: trust_remote_code is ON for {where}: code from the checkpoint will run", file=sys.stderr)


def announce_code_not_run(where: str, auto_map, model_type: str) -> None:
    """Say on stderr (once per checkpoint and process; not under ``--quiet``) that the checkpoint ``where``
    ships model code of its own (``auto_map``) that does not run without ``--trust-remote-code``: transformers'
    built-in ``model_type`` classes load its weights instead, which may not be the model its code defines."""
    key = f"not run: {where}"
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    classes = (", ".join(f"{k} -> {v}" for k, v in auto_map.items() if isinstance(v, str))
               if isinstance(auto_map, dict) else "") or str(auto_map)  # a hand-edited config may hold anything
    say(f"note: {where} ships model code of its own (auto_map: {classes}), not run: transformers' built-in "
        f"'{model_type}' classes load it (pass --trust-remote-code to run the checkpoint's code)")


def duration(seconds: float) -> str:
    """``"42 s"``, ``"6 min 02 s"``, ``"1 h 05 min"``: a wall time as people read it."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 9.95 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class StageClock:
    """Wall seconds per stage of a run, in order: ``lap(stage)`` ends ``stage``, which began at the
    previous lap (or at the clock's start); a stage lapped twice adds up."""

    def __init__(self) -> None:
        self._now = time.perf_counter
        self.started = self._last = self._now()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = self._now()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 1)
        self._last = now

    def elapsed(self) -> float:
        """Wall seconds since the clock started."""
        return self._now() - self.started

    def summary(self) -> str:
        """``done in 6 min 02 s: pre-flight 3.1 s, load 21 s, score 11 s, ...``."""
        stages = ", ".join(f"{name} {duration(s)}" for name, s in self.seconds.items())
        return f"done in {duration(self.elapsed())}" + (f": {stages}" if stages else "")
