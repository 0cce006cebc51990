"""What the user sees on the terminal: stage lines, quiet mode, library versions."""

from __future__ import annotations

import os
import platform

__version__ = "0.1.0"  # the package version (pyproject.toml's)


def versions() -> dict[str, str]:
    """Library versions recorded beside every result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("prune-layers", "torch", "transformers", "accelerate", "datasets", "lm_eval", "huggingface_hub", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def quiet_mode(quiet: bool) -> None:
    """Silence every progress bar (ours, transformers', datasets', lm-eval's) when ``quiet``."""
    if not quiet:
        return
    os.environ["TQDM_DISABLE"] = "1"
    try:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


def announce_remote_code(where: str) -> None:
    """Say on stderr that code shipped with the checkpoint ``where`` will run (asked for by
    ``--trust-remote-code`` or the recipe the user ran; never by a file inside an input folder)."""
    import sys

    print(f"note: trust_remote_code is ON for {where}: code from the checkpoint will run", file=sys.stderr)
