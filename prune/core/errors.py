"""The one exception type users see: a one-line message naming the problem and the fix."""

import contextvars
from contextlib import contextmanager

#: whether the running code was called by the ``prune`` command (its messages name flags) or from Python
#: (they name parameters): :func:`spelled`
_FROM_CLI = contextvars.ContextVar("prune_from_cli", default=False)


class PruneError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    The CLI prints ``error: <message>`` and exits with status 2; nothing is written.
    """


class UnsupportedModelError(PruneError):
    """The model's architecture has no decoder stack this toolkit knows how to prune."""


def parse_problem(exc: BaseException) -> str:
    """What a JSON or YAML reader found wrong, in a few words: nesting too deep, a number past Python's digit
    limit (whose own message ends in advice to change ``sys`` settings), or the reader's first line."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = first_line(exc)
    return "a number of thousands of digits" if "integer string conversion" in text else text


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), with the next
    line when the first only announces it ("Validation error for field 'x':" says nothing by itself)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def spelled(cli: str, api: str) -> str:
    """A setting as the caller wrote it: ``cli`` (``--overwrite``) under the ``prune`` command, ``api``
    (``overwrite=True``) when Python called the function."""
    return cli if _FROM_CLI.get() else api


def overwrite_flag() -> str:
    """How the caller asks to replace an existing output: ``--overwrite`` or ``overwrite=True``."""
    return spelled("--overwrite", "overwrite=True")


@contextmanager
def called_from_cli():
    """Messages raised inside name the ``prune`` command's flags (:func:`spelled`)."""
    token = _FROM_CLI.set(True)
    try:
        yield
    finally:
        _FROM_CLI.reset(token)
