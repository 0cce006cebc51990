"""The one YAML loader for user files (recipes, heal configs, ``--set`` values): safe and bounded.

On top of ``yaml.SafeLoader`` (no Python objects, no code), :func:`load_yaml` refuses, with one
line each:

* text that is not UTF-8, or a file larger than :data:`MAX_BYTES`;
* an alias that refers to itself (``a: &a [*a]``), which would never end;
* aliases that expand past :data:`MAX_NODES` values ("billion laughs": a few hundred bytes that
  would take gigabytes);
* nesting deeper than :data:`MAX_DEPTH` (``[[[[...]]]]``);
* a key given twice in one mapping (YAML would silently keep the last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prune.core.errors import PruneError, parse_problem

MAX_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_NODES = 100_000  # values after expanding every alias
MAX_DEPTH = 64


class _Loader(yaml.SafeLoader):
    pass


def _mark(node) -> str:
    mark = getattr(node, "start_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


def _key(node: yaml.ScalarNode) -> Any:
    """A mapping key's value as the safe loader builds it (its text when it cannot be built: that fails later)."""
    try:
        value = _Loader("").construct_object(node)
        hash(value)
        return value
    except Exception:  # noqa: BLE001 - an unbuildable key is reported by the load itself
        return (node.tag, node.value)


def _check(root, where: str) -> None:
    """Walk the composed node graph once (aliases are shared nodes): cycles, size, depth, duplicates."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def walk(node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise PruneError(f"{where}: an alias refers to itself{_mark(node)} (a recursive structure; write the "
                             "value out)")
        if depth > MAX_DEPTH:
            raise PruneError(f"{where}: nested more than {MAX_DEPTH} levels deep{_mark(node)} (flatten it)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, str] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    value = _key(k)  # by value, as the mapping will hold it: 0 and 00, 16 and 0x10 are one key
                    if value in seen:
                        same = repr(k.value) if seen[value] == k.value else f"{k.value!r} (the same key as {seen[value]!r})"
                        raise PruneError(f"{where}: key {same} appears twice in one mapping{_mark(k)} "
                                         "(YAML would keep only the last; remove one)")
                    seen[value] = k.value
                total += walk(k, depth + 1) + walk(v, depth + 1)
                if total > MAX_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += walk(v, depth + 1)
                if total > MAX_NODES:
                    break
        active.discard(key)
        if total > MAX_NODES:
            raise PruneError(f"{where}: aliases expand to more than {MAX_NODES:,} values{_mark(node)} (a 'billion "
                             "laughs' document? write the values out)")
        sizes[key] = total
        return total

    walk(root, 0)


def load_yaml(text: str | bytes, where: str = "YAML") -> Any:
    """Parse one YAML document safely (see module docstring); errors are one :class:`PruneError` line."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise PruneError(f"{where}: {len(text):,} bytes is too large for a settings file (at most {MAX_BYTES:,})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PruneError(f"{where}: not UTF-8 text (byte {exc.start}: {text[exc.start:exc.start + 1]!r}); save it "
                             "as UTF-8") from None
    loader = None
    try:
        loader = _Loader(text)  # reads the first characters: a control character fails here
        node = loader.get_single_node()
        if node is None:
            return None
        _check(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PruneError(f"{where}: not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise PruneError(f"{where}: nested too deeply to read (more than {MAX_DEPTH} levels; flatten it)") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4,300)
        raise PruneError(f"{where}: a value YAML cannot build ({parse_problem(exc)}); write it as a "
                         "shorter value") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, where: str | None = None) -> Any:
    """:func:`load_yaml` of a file's bytes."""
    file = Path(path).expanduser()
    where = where or str(file)
    try:
        size = file.stat().st_size
        if size > MAX_BYTES:
            raise PruneError(f"{where}: {size:,} bytes is too large for a settings file (at most {MAX_BYTES:,})")
        data = file.read_bytes()
    except OSError as exc:
        raise PruneError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    return load_yaml(data, where)
