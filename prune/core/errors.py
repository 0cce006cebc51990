"""The one exception type users see: a one-line message naming the problem and the fix."""


class PruneError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    The CLI prints ``error: <message>`` and exits with status 2; nothing is written.
    """


class UnsupportedModelError(PruneError):
    """The model's architecture has no decoder stack this toolkit knows how to prune."""
