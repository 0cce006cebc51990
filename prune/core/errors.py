"""The one exception type users see: a one-line message naming the problem and the fix."""


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
