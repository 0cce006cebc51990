"""Atomic output folders: written in a hidden sibling, swapped in only when complete.

``with staged(out, overwrite, inputs) as stage:`` yields ``.<name>.incomplete-<pid>/`` beside
``out`` (with an ``INCOMPLETE`` marker file inside); on success the marker is removed and the
folder becomes ``out``; on any error it is removed and a full disk becomes one line.

Replacing an existing ``out`` (``--overwrite``) is crash-safe: on Linux the two folders are
exchanged in one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is first
renamed ``.<name>.old-<pid>``, then the new one takes its place. At every instant the old or the
new output is complete and findable, and :func:`recover` (run first by every later write to the
same output) puts back whichever a killed process left: a complete staged folder (no marker)
becomes ``out``, else ``.old-<pid>`` is renamed back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from prune.core.errors import PruneError, overwrite_flag
from prune.core.faults import fault_point
from prune.io.guard import Input, check_output, write_error

INCOMPLETE_TAG = ".incomplete-"
OLD_TAG = ".old-"
INCOMPLETE_MARKER = "INCOMPLETE"  # file inside a staging folder, for anyone who finds one


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[Input | None] = (),
                     flag: str = "output.dir", written: tuple[str, ...] | None = None) -> Path:
    """Refuse an unsafe or existing output folder (unless ``overwrite``) before any work starts
    (:func:`prune.io.guard.check_output`); recovers a swap a killed run left half done."""
    out = Path(out_dir).expanduser()
    remove_stale_staging(out)  # first finishes a swap a killed run left half done
    checked = check_output(out, inputs, overwrite=overwrite, kind="folder", flag=flag)
    if overwrite:
        check_replaceable(out, flag, written or WRITTEN_BY_PRUNE)
    return checked


#: what a folder of prune's checkpoint writers holds (a report folder: ``report.json``)
WRITTEN_BY_PRUNE = ("config.json", "pruning.json", "adapter_config.json")
#: prune's own records: a folder holding one was written by prune (``pruning.json``, a report's ``report.json``)
OWN_RECORDS = ("pruning.json", "report.json")
#: the subfolders prune writes into an output folder (lm-eval's files of a run; `prune report RUN_DIR`'s report)
OWN_SUBFOLDERS = ("eval", "report")
#: the files of a plain checkpoint (``save_pretrained`` of a model and its tokenizer, or a PEFT adapter)
CHECKPOINT_FILE = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                             r"model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                             r"vocab\..*|merges\.txt|chat_template\..*|.*\.model|README\.md|adapter_.*)$")


def foreign_entries(out: Path, written: tuple[str, ...] = WRITTEN_BY_PRUNE) -> list[str] | None:
    """The entries of the folder ``out`` that say prune's writers did not write it, ``[]`` when they could have
    (empty; or one of ``written`` and prune's own record with no hidden entry or other subfolder; or a plain
    checkpoint's files only), ``None`` when it cannot be read."""
    try:
        entries = {p.name: p.is_dir() and not p.is_symlink() for p in out.iterdir()} if out.is_dir() else {}
    except OSError:
        return None
    if not entries:
        return []
    if not any(name in entries for name in written):
        return sorted(entries)
    own = any(name in entries for name in OWN_RECORDS)  # else only a plain checkpoint's files
    return sorted(name for name, is_dir in entries.items()
                  if name.startswith(".") or (is_dir and name not in OWN_SUBFOLDERS)
                  or not (own or is_dir or CHECKPOINT_FILE.match(name)))


def check_replaceable(out: Path, flag: str = "output.dir", written: tuple[str, ...] = WRITTEN_BY_PRUNE) -> None:
    """``--overwrite`` replaces an empty folder or one this writer could have written (:func:`foreign_entries`),
    never another folder given by mistake (a data folder, a project holding a config.json; a model folder for a
    report)."""
    foreign = foreign_entries(out, written)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PruneError(f"output folder {out} was not written by this command (it holds {shown}; this command writes "
                         f"{' or '.join(written)}): {overwrite_flag()} replaces only such a folder or an empty one (choose "
                         f"another {flag}, or empty it first)")


def staging_dir(out: Path) -> Path:
    return out.resolve().parent / f".{out.name}{INCOMPLETE_TAG}{os.getpid()}"


@contextlib.contextmanager
def staged(out_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[Input | None] = (),
           written: tuple[str, ...] | None = None, flag: str = "output.dir") -> Iterator[Path]:
    """Yield a hidden staging folder beside ``out_dir``; on success it is renamed to ``out_dir``
    (replacing an existing one only then), on any error it is removed. A disk that fills up
    becomes one :class:`PruneError` line; staging folders of killed runs are cleared first."""
    out = check_output_dir(out_dir, overwrite, inputs, flag=flag, written=written)
    remove_stale_staging(out)  # includes a leftover of this very process
    stage = staging_dir(out)
    try:
        stage.mkdir(parents=True)
        (stage / INCOMPLETE_MARKER).write_text("This folder is being written and is not a finished checkpoint.\n")
        yield stage
        fault_point("before_rename")
        (stage / INCOMPLETE_MARKER).unlink()
        replace_folder(stage, out, overwrite)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        error = write_error(exc, out.resolve())
        if error is not None:
            kept = "the existing folder is untouched" if out.exists() else "no output was written"
            if "disk full" in str(error):
                raise PruneError(f"disk full while writing {out.resolve()} (No space left on device): the partial files "
                                 f"were removed and {kept}; free some space or write to another folder (a `prune "
                                 "run` rerun with --resume reuses the stages it finished)") from None
            raise PruneError(f"{error}; the partial files were removed and {kept}") from None
        raise


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 4_194_304  # Linux's largest


def pid_in(text: str) -> int | None:
    """``text`` as a process id of this machine (digits, within ``pid_max``), else None."""
    return int(text) if text.isdigit() and 0 < int(text) <= _pid_max() else None


def _pid_of(path: Path) -> int | None:
    """The process id in a staging or old folder's name (``.<name>.incomplete-<pid>``); ``None`` for a name that
    only looks like one (``-backup``, ``-20240101``): such folders are the user's, never removed."""
    return pid_in(path.name.rsplit("-", 1)[-1])


def _ours(folder: Path) -> bool:
    """Whether a staging or old folder holds what prune writes: the ``INCOMPLETE`` marker, or an output's files."""
    return (folder / INCOMPLETE_MARKER).is_file() or foreign_entries(folder, (*WRITTEN_BY_PRUNE, "report.json")) == []


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove ``.<name>.incomplete-<pid>`` folders beside ``out`` whose process is gone (a run
    killed while saving); a folder of a process still alive is left alone."""
    recover(out)
    removed = []
    try:
        leftovers = list(out.resolve().parent.glob(f".{glob_escape(out.name)}{INCOMPLETE_TAG}*"))
    except (OSError, RuntimeError, ValueError):  # a bad path: check_output says why
        return removed
    for old in leftovers:
        pid = _pid_of(old)
        if pid is None or (pid != os.getpid() and process_alive(pid)) or not old.is_dir() or not _ours(old):
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def existing(path: str | os.PathLike) -> Path:
    """``path`` expanded, after finishing an overwrite of it that a killed writer left half done (every
    command that reads an output calls this first)."""
    path = Path(path).expanduser()
    if not path.exists():
        recover(path)
    return path


def recover(out: Path) -> Path | None:
    """Finish the swap of a killed process: when ``out`` is missing, a complete staged folder
    (no ``INCOMPLETE`` marker) of a dead process becomes ``out``, else its ``.old-<pid>`` folder
    is renamed back. Old folders beside an existing ``out`` are removed. Returns what was restored."""
    try:
        parent = out.expanduser().resolve().parent
        if not parent.is_dir():
            return None
        out = parent / out.name
        olds = [p for p in parent.glob(f".{glob_escape(out.name)}{OLD_TAG}*")
                if _pid_of(p) is not None and (_pid_of(p) == os.getpid() or not process_alive(_pid_of(p)))
                and p.is_dir() and _ours(p)]
    except (OSError, RuntimeError, ValueError):
        return None
    restored = None
    for old in olds:
        if not out.exists():
            new = parent / f".{out.name}{INCOMPLETE_TAG}{_pid_of(old)}"
            complete = new.is_dir() and not (new / INCOMPLETE_MARKER).exists()
            try:
                (new if complete else old).rename(out)  # finish the swap, or put the old output back
            except OSError:  # the ranks of a launch recover together: another process did it first
                if not out.exists():
                    raise
            restored = out
            if not complete:
                continue
        shutil.rmtree(old, ignore_errors=True)
    return restored


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)  # PermissionError: alive, owned by someone else
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(a: Path, b: Path, flag: int) -> bool | None:
    """Linux ``renameat2(a, b, flag)``: True when done, None where the system or file system cannot
    (then the caller falls back); another failure is raised (``FileExistsError`` for NOREPLACE)."""
    if os.environ.get("PRUNE_NO_RENAME_EXCHANGE"):  # tests of the portable path
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot do it
        return None
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` (Linux ``renameat2``); False where it is not available."""
    return bool(_renameat2(a, b, _RENAME_EXCHANGE))


def _move_new(stage: Path, out: Path) -> bool:
    """Rename ``stage`` to ``out`` only if ``out`` does not exist (atomically where Linux can):
    False, with nothing moved, when it does."""
    try:
        if _renameat2(stage, out, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    if out.exists():
        return False
    stage.rename(out)
    return True


def replace_folder(stage: Path, out: Path, overwrite: bool = True) -> None:
    """Move the finished ``stage`` folder to ``out``, replacing an existing one last (see module
    docstring: at every instant the old or the new folder is complete). Without ``overwrite`` an
    ``out`` that appeared while ``stage`` was written (another run with the same output) is left
    alone, and ``stage`` is kept beside it under a name of its own, said in the error."""
    out = out.resolve()
    if (not overwrite or not out.exists()) and _move_new(stage, out):
        return
    if not overwrite:
        kept = out.parent / f"{out.name}.{os.getpid()}"
        stage.rename(kept)
        raise PruneError(f"{out} appeared while this run was writing it (another run with the same output?): it is left "
                         f"as it is, and this run's result is in {kept} (rename it, or rerun with {overwrite_flag()})")
    if _exchange(stage, out):
        fault_point("swapped")  # stage now holds the old folder
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}"
    out.rename(old)
    try:
        fault_point("swapping")  # killed here: recover() finishes the swap
        stage.rename(out)
    except BaseException:  # an error or Ctrl-C between the renames: the old folder goes back (staged() drops stage)
        if not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


_replace = replace_folder  # the name report.py and older code import


def unwritable(out: Path, exc: BaseException) -> PruneError:
    """One line for a write that failed for a reason of the file system."""
    return write_error(exc, out) or PruneError(f"cannot write {out}: {exc}")
