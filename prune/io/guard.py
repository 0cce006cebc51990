"""Path safety: an output can never destroy an input, and every file-system failure is one line.

:func:`check_output` is called before any work by every command that writes (``run``, ``remove``,
``heal``, ``report``, ``score -o``, ``eval -o``). It refuses an output path that

* equals an input (the source model, the run folder, the recipe, a data file, the Hugging Face
  cache), the working directory or the home folder, or is a parent folder of one (``--overwrite`` would delete it), or lies inside an
  input folder (writing into a model folder changes the input);
* exists and ``overwrite`` was not given; is a folder where a file is written or a file where a
  folder is written;
* cannot be written: a parent that is a file, a parent that is not writable, a name too long once
  the staging suffix is added, a symlink loop, a name that is not valid UTF-8.

:func:`disk_full` recognises a full disk whatever raised it (``OSError`` ENOSPC / EDQUOT,
safetensors' ``SafetensorError``, the tokenizers library's plain ``Exception``), so each writer can
turn it into one line. :func:`write_file` writes a one-file output (JSON of ``score -o`` and
``eval -o``) atomically: a temporary sibling renamed over the target.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from prune.core.errors import PruneError, overwrite_flag

#: longest file name most file systems accept (bytes)
NAME_MAX = 255
#: the longest suffix the toolkit adds to an output name: ``.<name>.incomplete-<pid>`` / ``.old-<pid>``
_SUFFIX = len(".") + len(".incomplete-") + 10

Input = tuple[str | os.PathLike, str, bool]  # (path, what it is, whether writing inside it is allowed)


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.expanduser().resolve()
    except RuntimeError as exc:  # Python 3.11: "Symlink loop from ..."
        raise PruneError(f"{what} {path}: {exc} (fix the link)") from None
    except OSError as exc:
        raise PruneError(f"{what} {path}: {exc.strerror or exc}") from None


def check_name(path: Path, what: str = "output") -> None:
    """A name that is valid UTF-8 and short enough for the staging suffix."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PruneError(f"{what} path {text!r} is not valid UTF-8 (rename it with plain characters)") from None
    name = path.name
    if len(name.encode("utf-8")) + _SUFFIX > NAME_MAX:
        raise PruneError(f"{what} name is {len(name.encode('utf-8'))} bytes long: with the staging suffix it passes "
                         f"the file-system limit of {NAME_MAX} (choose a name under {NAME_MAX - _SUFFIX} bytes)")


def check_parent(out: Path, what: str = "output") -> None:
    """The nearest existing ancestor of ``out`` is a writable folder."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link
            raise PruneError(f"{what} {out}: {parent} is a broken symbolic link (fix it or choose another path)")
        parent = parent.parent
    if not parent.is_dir():
        raise PruneError(f"{what} {out}: {parent} is a file, not a folder (choose another path)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PruneError(f"{what} {out}: the folder {parent} is not writable (choose another path or fix permissions)")


#: the files that make a folder a model or a run (weights of any name and format among them)
MODEL_FOLDER_FILES = re.compile(r".*\.(safetensors|bin|gguf|pt|pth|ckpt|msgpack|h5)|"
                                r"(config|generation_config|pruning|eval|adapter_config|special_tokens_map|"
                                r"tokenizer(_config)?|model\.safetensors\.index)\.json|recipe\.yaml|eval\.md|README\.md|"
                                r"tokenizer\.model|merges\.txt|vocab\.\w+|chat_template\.jinja")


def is_model_file(path: Path) -> bool:
    """Whether ``path`` is one of the files of a model or run folder (one with a config.json, pruning.json or
    adapter_config.json): a one-file output given such a name by mistake is never replaced, even with
    ``--overwrite`` (a file elsewhere, such as a teacher cache ``teacher.safetensors`` in a folder of its own, is)."""
    folder = path.parent
    return bool(MODEL_FOLDER_FILES.fullmatch(path.name)) and any(
        (folder / f).is_file() for f in ("config.json", "pruning.json", "adapter_config.json"))


def check_output(out: str | os.PathLike, inputs: Iterable[Input | None] = (), *, overwrite: bool = False,
                 kind: str = "folder", what: str = "output folder", flag: str = "output.dir",
                 example: str = "scores.json") -> Path:
    """Refuse an unsafe output path before any work (see module docstring); returns it, expanded.

    ``inputs`` are ``(path, label, inside_ok)``; the working directory and the home folder are
    always among them (writing inside them is fine). ``kind`` is ``"folder"`` or ``"file"``; ``example``: the file
    name a folder given for a file is told to add."""
    raw = Path(out).expanduser()
    check_name(raw, what)
    target = _resolve(raw, what)
    for link in [raw, *raw.absolute().parents]:
        if link.is_symlink() and not link.exists():
            raise PruneError(f"{what} {raw}: {link} is a broken symbolic link (remove it or choose another path)")
    always = [(Path.cwd(), "the working directory", True)]
    try:
        always.append((Path.home(), "the home folder", True))
    except (RuntimeError, KeyError):  # no home folder known: nothing to protect there
        pass
    from huggingface_hub import constants

    always.append((constants.HF_HUB_CACHE, "the Hugging Face cache", False))
    for item in [*always, *[i for i in inputs if i]]:
        path, label, inside_ok = item
        if path is None:
            continue
        src = _resolve(Path(path), label)
        if target == src:
            raise PruneError(f"{what} {raw} is {label} ({src}): it would be overwritten (choose another {flag})")
        if src.is_relative_to(target):
            raise PruneError(f"{what} {raw} contains {label} ({src}): replacing it would delete an input "
                             f"(choose another {flag})")
        if not inside_ok and src.is_dir() and target.is_relative_to(src):
            raise PruneError(f"{what} {raw} is inside {label} ({src}): inputs are never written to "
                             f"(choose a {flag} outside it)")
    if target.exists():
        if kind == "folder" and not target.is_dir():
            raise PruneError(f"{what} {raw} exists and is a file, not a folder (choose another {flag})")
        if kind == "file" and target.is_dir():
            raise PruneError(f"{what} {raw} is a folder; give a file name (e.g. {raw}/{example})")
        if not overwrite:
            raise PruneError(f"{what} {raw} already exists (choose another {flag} or pass "
                             f"{overwrite_flag()})")
        if kind == "file" and is_model_file(target):
            raise PruneError(f"{what} {raw} is a file of a model ({target.name}): "
                             f"{overwrite_flag()} replaces only a file this command could "
                             f"have written (choose another {flag})")
    check_parent(target, what)
    return raw


def check_outside_inputs(folder: str | os.PathLike, inputs: Iterable[Input | None], what: str) -> None:
    """Refuse a folder that files are only added to (an offload folder) when it is an input or lies inside one
    whose ``inside_ok`` is False: unlike an output it never replaces anything, so holding inputs is fine."""
    target = _resolve(Path(folder), what)
    for item in inputs:
        if item is None:
            continue
        path, label, inside_ok = item
        where = _resolve(Path(path), label)
        if target == where or (not inside_ok and target.is_relative_to(where)):
            raise PruneError(f"{what} {folder} {'is' if target == where else 'is inside'} {label} ({where}): files "
                             "would be written there (choose a folder of its own)")


def input_paths(*paths: str | os.PathLike | None, label: str, inside_ok: bool = False) -> list[Input]:
    """``(path, label, inside_ok)`` for each local path that exists (Hub ids and ``None`` skipped); for a
    folder also the folder of each file or folder it links to (a source whose weights are symbolic links
    into another folder: replacing that folder would replace the source's weights)."""
    out: list[Input] = []
    for p in paths:
        if p is None:
            continue
        try:
            exists = Path(p).expanduser().exists()
        except (OSError, ValueError):
            exists = False
        if exists:
            out.append((p, label, inside_ok))
            out += _linked(Path(p).expanduser(), label)
    return out


def _linked(folder: Path, label: str) -> list[Input]:
    """The folders that ``folder``'s top-level symbolic links point into (outputs may lie inside them)."""
    if not folder.is_dir():
        return []
    found = []
    try:
        for child in folder.iterdir():
            if child.is_symlink() and child.exists():
                target = child.resolve()
                found.append((target if target.is_dir() else target.parent, f"{label} (through its link {child.name})", True))
    except OSError:
        return found
    return found


# ---- failures while writing -------------------------------------------------------------
_FULL = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (from any writer: Python, safetensors, tokenizers) says the disk is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(s in text for s in _FULL)


def write_error(exc: BaseException, where: Path | str, what: str = "writing") -> PruneError | None:
    """One line for a failed write (disk full, read-only, permissions, name too long), or ``None``
    when ``exc`` is not a file-system failure."""
    if disk_full(exc):
        return PruneError(f"disk full while {what} {where} (No space left on device): free some space or choose "
                          "another output path")
    if isinstance(exc, OSError) and exc.errno is not None:
        return PruneError(f"cannot write {where}: {exc.strerror or exc} (choose another output path)")
    return None


def write_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, then rename); a failure is one
    :class:`PruneError` line and leaves any existing file unchanged."""
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.incomplete-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        error = write_error(exc, target)
        if error is None:
            raise
        raise error from None
    return target


def safe_join(root: Path, name: str) -> Path:
    """``root / name``, refusing names that would escape ``root`` (absolute paths, ``..``, links)."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise PruneError(f"refusing to write {name!r}: it points outside the output folder")
    return target


def inside_folder(path: Path, folder: Path) -> bool:
    """Whether the file ``path`` of the model folder ``folder`` resolves inside it, or, for a Hub cache
    snapshot (whose files link to ``../../blobs``), inside that repository's cache. A link out of the
    folder (a downloaded folder's ``LICENSE -> ~/.cache/huggingface/token``) is not copied into an output."""
    try:
        target, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError):
        return False
    roots = [root, root.parent.parent] if root.parent.name == "snapshots" else [root]
    return any(target.is_relative_to(r) for r in roots)
