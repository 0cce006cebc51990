"""Push a checked output folder to the Hugging Face Hub.

``push(folder, repo_id)``:
  1. refuses a folder that is not a complete checkpoint (:func:`prune.check.check_checkpoint`
     with the card and ``pruning.json`` required) before anything is sent;
  2. lists the files to upload (every regular file; hidden names, Python caches and ``exclude``
     glob patterns left out; a file holding something shaped like a token, or an exclude
     leaving out a file the model needs, refused) and re-renders the card for the repo
     (:func:`card_for_repo`: the load snippet names ``repo_id``, ``pruning.json`` records
     ``repo_id``); a card that is not as prune wrote it is refused, or sent as it is
     (``keep_card``), or replaced (``replace_card``). With
     ``dry_run=True`` it prints this plan and stops: no network, no token needed;
  3. ``HfApi.create_repo(repo_id, private=..., exist_ok=True)``, ``create_branch`` for a
     revision other than ``main``, then one ``create_commit`` of exactly the listed files
     (``create_pr=True``: as a pull request). ``create_commit`` has the Hub validate the
     card's metadata first (``/api/validate-yaml``: licenses, ``model-index``, relations),
     so a card the Hub would refuse fails before any file is sent.
  4. after a successful push (not a pull request), the re-rendered ``README.md`` and
     ``pruning.json`` are written back into the folder, so a later ``prune run`` on it knows
     its Hub parent. A failed push leaves the folder untouched.

The token comes from ``token_file`` or the usual ``huggingface_hub`` sources (``HF_TOKEN``,
``hf auth login``); it is never printed, logged or written anywhere, and is scrubbed from
error messages. Network, offline and authentication failures raise one :class:`PruneError`
line. An existing repo keeps its visibility (``private`` applies on creation).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from prune.core.config import branch_name_problem
from prune.core.errors import PruneError, first_line
from prune.core.records import RECORD_FILE, read_record, record_json
from prune.export.check import check_checkpoint, human_size

DEFAULT_BRANCH = "main"


@dataclass
class UploadPlan:
    """What a push sends: the files (relative path, bytes) of ``folder`` to ``repo_id``@``revision``."""

    folder: Path
    repo_id: str
    revision: str
    private: bool
    commit_message: str
    files: list[tuple[str, int]] = field(default_factory=list)
    rendered: dict[str, str] = field(default_factory=dict)  # file name -> new text (card and record for the repo)
    create_pr: bool = False
    excluded: list[str] = field(default_factory=list)

    @property
    def sends_weights(self) -> bool:
        """Whether this push sends transformers' weight files (then the repo's stale ones are deleted)."""
        return any(any(fnmatch.fnmatch(f, p) for p in WEIGHT_FILES) for f, _ in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self, token_found: bool | None = None) -> str:
        lines = [
            f"repo      {self.repo_id} (model; created {'private' if self.private else 'public'} if missing, "
            "an existing repo keeps its visibility)",
            f"revision  {self.revision}" + (" (as a pull request)" if self.create_pr else ""),
            f"message   {self.commit_message}",
        ]
        if self.rendered:
            lines.append(f"card      {', '.join(sorted(self.rendered))} re-rendered for {self.repo_id} (load snippet, "
                         "lineage links; sizes below are of the new files)")
        if self.excluded:
            lines.append(f"excluded  {', '.join(self.excluded)}")
        if token_found is not None:
            lines.append("token     " + ("found (not shown)" if token_found else
                                         "NOT found: a real push needs `hf auth login` or HF_TOKEN"))
        lines.append(f"files     {len(self.files)} files, {human_size(self.total_bytes)} ({self.total_bytes:,} bytes) "
                     f"from {self.folder}")
        width = max(len(f"{size:,}") for _, size in self.files) if self.files else 1
        for name, size in self.files:
            lines.append(f"  {size:>{width},} B  {human_size(size):>9}  {name}")
        if self.sends_weights:
            lines.append("files already in the repo and not listed here are left as they are, except the model weight "
                         "files (model*.safetensors, pytorch_model*.bin, their indexes) this folder does not have: those "
                         "are deleted, so the repo loads these weights")
        else:
            lines.append("files already in the repo and not listed here are left as they are")
        return "\n".join(lines)


#: never uploaded: Python's caches (a folder someone ran code in)
NEVER_SENT = ("__pycache__", "*.pyc")
#: files a token is not looked for in (weights: large, binary, and written by prune)
UNSCANNED = ("*.safetensors", "*.gguf")
SCAN_LIMIT = 64 * 2**20  # bytes: larger files are read in pieces


def needed_files(folder: Path) -> list[str]:
    """The files loading ``folder`` needs: config and weights (an index and its shards) and the tokenizer's files
    it has (the card loads the tokenizer from the repo), or an adapter's."""
    from prune.model.loading import TOKENIZER_FILES
    from prune.io.safetensors import INDEX_NAME, read_index

    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return ["adapter_config.json", "adapter_model.safetensors"]
    weight_map, shards = read_index(folder)
    tokenizer = [f for f in (*TOKENIZER_FILES, "merges.txt") if (folder / f).is_file()]
    return ["config.json", *([INDEX_NAME] if weight_map is not None else []), *shards, *tokenizer]


def _holds_token(folder: Path, name: str, rendered: dict[str, str]) -> bool:
    from prune.core.secrets import holds_token

    if name in rendered:
        return holds_token(rendered[name].encode())
    if any(fnmatch.fnmatch(Path(name).name, p) for p in UNSCANNED):
        return False
    with open(folder / name, "rb") as f:
        tail = b""
        while chunk := f.read(SCAN_LIMIT):
            if holds_token(tail + chunk):
                return True
            tail = chunk[-200:]  # a token across two pieces
    return False


def excludes(rel: Path, pattern: str) -> bool:
    """Whether the glob ``pattern`` leaves out the file at ``rel`` (relative to the folder pushed): it matches the
    relative path, the file's name, or a folder the file is in (``eval``, ``eval/``, ``eval/*``: that whole folder,
    as huggingface_hub reads a trailing slash)."""
    folder = pattern.rstrip("/")
    return (fnmatch.fnmatch(rel.as_posix(), pattern) or fnmatch.fnmatch(rel.name, pattern)
            or any(fnmatch.fnmatch(parent.as_posix(), folder) for parent in rel.parents if parent.parts))


def upload_files(folder: Path, exclude: list[str] | tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """Every regular file under ``folder`` (sorted, POSIX relative paths), hidden names, Python's caches
    (:data:`NEVER_SENT`) and the files an ``exclude`` glob pattern leaves out (:func:`excludes`) left out.
    Symbolic links are resolved: one that leads outside ``folder`` (a planted link to
    ``$HF_HOME/token``, to ``~/.ssh``) is refused, so nothing outside the folder is ever sent."""
    out = []
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or any(fnmatch.fnmatch(part, p) for p in NEVER_SENT) for part in rel.parts):
            continue
        if any(excludes(rel, p) for p in exclude):
            continue
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise PruneError(f"refusing to push: {rel.as_posix()} is a broken or looping symbolic link (remove it)") from None
        if not real.is_relative_to(root):
            raise PruneError(f"refusing to push: {rel.as_posix()} is a symbolic link to {real}, outside {folder} "
                             "(remove it; only the folder's own files are uploaded)")
        if not real.is_file():
            continue
        out.append((rel.as_posix(), real.stat().st_size))
    return out


def default_commit_message(folder: Path) -> str:
    from prune.core.console import __version__

    try:
        record = read_record(folder / RECORD_FILE)
    except (OSError, PruneError):
        return f"Upload layer-pruned model (prune {__version__})"
    n0 = (record.original.n_layers if record.original else None) or record.layers_before
    return f"Upload layer-pruned model: {n0} -> {record.layers_after} decoder blocks (prune {__version__})"


def card_for_repo(folder: Path, repo_id: str, revision: str | None = None) -> dict[str, str]:
    """``README.md`` and ``pruning.json`` of ``folder`` as they are published to ``repo_id``:
    the record with ``repo_id`` set, the card rendered from it, ``eval.json`` and ``recipe.yaml``
    with the load snippet naming the repo (and ``revision``, a branch other than main). ``{}`` for
    a folder without ``pruning.json``."""
    import json

    from prune.export.card import render_card

    if not (folder / RECORD_FILE).is_file():
        return {}
    record = read_record(folder / RECORD_FILE)
    record.repo_id = repo_id
    evaluation = {}
    if (folder / "eval.json").is_file():
        try:
            evaluation = json.loads((folder / "eval.json").read_text())
        except json.JSONDecodeError:
            evaluation = {}
    recipe = (folder / "recipe.yaml").read_text() if (folder / "recipe.yaml").is_file() else None
    card = render_card(record, rows=evaluation.get("rows"), settings=evaluation.get("settings"), recipe_yaml=recipe,
                       model_name=repo_id.split("/")[-1], load_id=repo_id,
                       revision=revision if revision not in (None, DEFAULT_BRANCH) else None,
                       paired=evaluation.get("paired"))
    return {"README.md": card, RECORD_FILE: record_json(record)}


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (first line, stripped); one-line errors, the token is never shown."""
    file = Path(path).expanduser()
    try:
        token = file.read_text().strip().splitlines()[0].strip() if file.is_file() else ""
    except (OSError, UnicodeDecodeError, IndexError):
        token = ""
    if file.is_dir():
        raise PruneError(f"--token-file {file} is a folder (give the file holding a Hugging Face token)")
    if not file.is_file():
        raise PruneError(f"--token-file {file} not found (give a file holding a Hugging Face token)")
    if not token:
        raise PruneError(f"--token-file {file} is empty (put a Hugging Face token with write access in it)")
    return token


# ---- checks that need no network ------------------------------------------------------------
def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from prune.core.secrets import looks_like_token

    if looks_like_token(repo_id):
        raise PruneError("the repo id looks like a Hugging Face token (not shown): give namespace/name, and keep the "
                         "token in HF_TOKEN or `hf auth login`")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PruneError(f"invalid Hub repo id {repo_id!r}: {str(exc).splitlines()[0]} (use namespace/name)") from None
    if Path(repo_id).expanduser().exists():
        raise PruneError(f"{repo_id!r} is a local path, not a Hub repo id (give namespace/name)")


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or value in ("1", "ON", "YES", "TRUE")


def check_can_push(repo_id: str, token: str | None = None) -> None:
    """A push can be attempted: valid repo id, not offline, a token available (not shown)."""
    check_repo_id(repo_id)
    if offline():
        raise PruneError("HF_HUB_OFFLINE is set: the Hub cannot be reached (unset it to push, or use --dry-run)")
    from huggingface_hub import get_token

    if not (token or get_token()):
        raise PruneError("no Hugging Face token found: run `hf auth login`, set HF_TOKEN or give --token-file "
                         "(a token with write access)")


# ---- push -------------------------------------------------------------------------------------
def plan_push(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = True,
              commit_message: str | None = None, quiet: bool = False, exclude=(), create_pr: bool = False,
              keep_card: bool = False, replace_card: bool = False) -> UploadPlan:
    """Check the folder (refusing an incomplete one, a file holding a token, a card edited by hand unless
    ``keep_card``: then it goes as it is; ``replace_card``: rendered anew) and list what a push would send."""
    from prune.core.secrets import looks_like_token

    check_repo_id(repo_id)
    for flag, value in (("--revision", revision), ("--commit-message", commit_message),
                        *(("--exclude", pattern) for pattern in exclude)):
        if value and looks_like_token(str(value)):  # it would be printed, and published in the repo's history
            raise PruneError(f"{flag} looks like a Hugging Face token (not shown): keep the token in HF_TOKEN, "
                             "`hf auth login` or --token-file")
    problem = None if revision is None else branch_name_problem(revision)
    if problem:
        raise PruneError(f"--revision {revision!r} is not a branch name the Hub accepts: {problem} (e.g. --revision pruned-k7)")
    path = Path(folder).expanduser()
    report = check_checkpoint(path, require_export=True)
    if not quiet:
        print(report.summary(), flush=True)
    report.raise_for_problems("refusing to push", shown=not quiet)
    rendered = card_for_repo(path, repo_id, revision)
    if "README.md" in rendered and (path / "README.md").is_file():
        from prune.export.card import card_edited

        if keep_card and replace_card:
            raise PruneError("--keep-card and --replace-card ask for opposite things: give one")
        if keep_card:
            del rendered["README.md"]
        elif not replace_card and card_edited((path / "README.md").read_text(encoding="utf-8", errors="replace")):
            raise PruneError(f"{path / 'README.md'} is not the card prune wrote (edited by hand since, or written before "
                             "prune 0.2): a push renders the card anew from pruning.json; pass --keep-card to publish "
                             "README.md as it is, or --replace-card to publish the rendered card (the file is replaced)")
    files = [(name, len(rendered[name].encode()) if name in rendered else size)
             for name, size in upload_files(path, list(exclude))]
    sent = {n for n, _ in files}
    for name in [n for n in ("README.md", RECORD_FILE) if n in rendered] + needed_files(path):
        if name not in sent:
            raise PruneError(f"--exclude leaves out {name}, which a pushed model needs (remove that pattern)")
    for name, _ in files:
        if _holds_token(path, name, rendered):
            raise PruneError(f"refusing to push: {name} holds what looks like a Hugging Face token (not shown); remove "
                             f"it from the file, or leave the file out with --exclude {name}")
    return UploadPlan(path, repo_id, revision or DEFAULT_BRANCH, private, commit_message or default_commit_message(path),
                      files, rendered, create_pr, list(exclude))


def push(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = True,
         commit_message: str | None = None, dry_run: bool = False, quiet: bool = False, exclude=(),
         create_pr: bool = False, token_file: str | os.PathLike | None = None, keep_card: bool = False,
         replace_card: bool = False) -> UploadPlan | str:
    """Push ``folder`` to ``repo_id`` (see module docstring). Returns the plan for a dry
    run, otherwise the URL of the commit (or of the pull request)."""
    token = read_token_file(token_file) if token_file else None
    if create_pr and revision not in (None, DEFAULT_BRANCH):
        raise PruneError("--create-pr opens a pull request against main: leave out --revision")
    from prune.io.staging import existing

    path = existing(folder)  # what is cheap to see wrong comes first: the folder, then the token
    if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise PruneError(f"{path} is not a model folder (no config.json or adapter_config.json): give the output "
                         "folder of prune run, remove or heal")
    if not dry_run:
        check_can_push(repo_id, token)  # offline / no token: fail before reading the folder's files
    if token_file:  # the token file never goes up, wherever it lies
        exclude = [*exclude, *_inside(Path(token_file), Path(folder))]
    plan = plan_push(folder, repo_id, revision=revision, private=private, commit_message=commit_message, quiet=quiet,
                     exclude=exclude, create_pr=create_pr, keep_card=keep_card, replace_card=replace_card)
    if dry_run:
        from huggingface_hub import get_token

        print("\ndry run: nothing is sent. A push would upload:\n" + plan.describe(token_found=bool(token or get_token())))
        return plan
    if not quiet:
        print(f"\npushing to {repo_id}@{plan.revision}:\n{plan.describe()}", flush=True)
    url = _upload(plan, token, quiet)
    if not create_pr:
        for name, text in plan.rendered.items():  # the folder now says where it lives
            (plan.folder / name).write_text(text)
    print(f"{'pull request opened' if create_pr else 'pushed'}: {url}")  # the result, under -q too: where it went
    return url


def _inside(file: Path, folder: Path) -> list[str]:
    """``[file's path relative to folder]`` (glob-escaped) when ``file`` lies inside ``folder``, else ``[]``."""
    import glob

    file, folder = file.expanduser().resolve(), folder.expanduser().resolve()
    return [glob.escape(file.relative_to(folder).as_posix())] if file.is_relative_to(folder) else []


def push_config(folder, cfg, *, quiet: bool = False) -> str:
    """Push after ``prune run`` from a recipe's ``output.push_to_hub`` section."""
    return push(folder, cfg.repo_id, revision=cfg.revision, private=cfg.private, commit_message=cfg.commit_message,
                quiet=quiet)


#: the names transformers loads a checkpoint's weights from (single file, shards, index)
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def stale_weights(existing: list[str], plan: UploadPlan) -> list[str]:
    """When this push sends a full checkpoint: the repo's top-level weight files (transformers' names)
    it does not send and no ``--exclude`` pattern keeps. A single ``model.safetensors`` left by an
    earlier push would be loaded by transformers ahead of this push's sharded index, so they are
    deleted in the same commit. An adapter folder (or a push without weights) deletes nothing."""
    sending = {name for name, _ in plan.files}
    if not plan.sends_weights:
        return []
    return sorted(f for f in existing if "/" not in f and f not in sending
                  and any(fnmatch.fnmatch(f, p) for p in WEIGHT_FILES)
                  and not any(fnmatch.fnmatch(f, p) for p in plan.excluded))


def commit_operations(plan: UploadPlan, delete: list[str] = ()) -> list:
    """One ``CommitOperationAdd`` per listed file (re-rendered files from memory, the rest from
    disk), one ``CommitOperationDelete`` per stale weight file."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    return [CommitOperationAdd(name, plan.rendered[name].encode() if name in plan.rendered else str(plan.folder / name))
            for name, _ in plan.files] + [CommitOperationDelete(name) for name in delete]


def repo_files(api, plan: UploadPlan) -> list[str]:
    """The files of ``plan``'s repo at its revision; none for a repo or branch just created."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return api.list_repo_files(plan.repo_id, revision=plan.revision, repo_type="model")
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        return []


def _upload(plan: UploadPlan, token: str | None = None, quiet: bool = False) -> str:
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    api = HfApi(token=token)
    stage = "prepare"
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if plan.revision != DEFAULT_BRANCH:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model")
        delete = stale_weights(repo_files(api, plan), plan)
        if delete and not quiet:
            print(f"deleting weight files this folder no longer has: {', '.join(delete)}", flush=True)
        stage = "upload"
        info = api.create_commit(repo_id=plan.repo_id, operations=commit_operations(plan, delete), repo_type="model",
                                 revision=plan.revision, commit_message=plan.commit_message, create_pr=plan.create_pr)
    except PruneError:
        raise
    except ValueError as exc:
        if "README.md" not in str(exc):
            raise PruneError(_scrub(failure_line(exc, plan, stage), token)) from None
        # the Hub's card validation refused README.md: raised before any file is sent
        first = " ".join(str(exc).split())
        raise PruneError(_scrub(f"push to {plan.repo_id} failed before any file was sent: the Hub refuses the model "
                                f"card: {first} (fix README.md's front matter)", token)) from None
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise PruneError(_scrub(failure_line(exc, plan, stage), token)) from None
    if plan.create_pr and getattr(info, "pr_url", None):
        return info.pr_url
    return getattr(info, "commit_url", None) or str(info)


def failure_line(exc: BaseException, plan: UploadPlan, stage: str = "prepare") -> str:
    """One line for a failed push: authentication, permission, network or the Hub's answer.
    ``stage`` is ``"prepare"`` (repo/branch creation: nothing was sent) or ``"upload"``
    (the commit may not have been made)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    first = first_line(exc)
    if stage == "upload":
        where = (f"push to {plan.repo_id}@{plan.revision} did not finish (the repo may hold part of the files: run the "
                 "same push again to complete it; the local folder is unchanged)")
    else:
        where = f"push to {plan.repo_id}@{plan.revision} failed before any file was sent (the local folder is unchanged)"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return f"{where}: authentication failed (401): the token was rejected; log in again with `hf auth login` or set HF_TOKEN"
        if status == 403:
            return f"{where}: permission denied (403): the token cannot write to {plan.repo_id} (use a write token, check the namespace)"
        return f"{where}: the Hub answered {status}: {first}"
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout"} or isinstance(exc, OSError):
        return f"{where}: cannot reach the Hub at {constants.ENDPOINT}: {first} (check the network, a proxy, or HF_ENDPOINT)"
    return f"{where}: {type(exc).__name__}: {first}"


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message
