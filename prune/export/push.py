"""Push a checked output folder to the Hugging Face Hub.

``push(folder, repo_id)``:
  1. refuses a folder that is not a complete checkpoint (:func:`prune.check.check_checkpoint`
     with the card and ``pruning.json`` required) before anything is sent;
  2. lists the files to upload (every regular file, hidden names excluded) - with
     ``dry_run=True`` it prints this plan (repo, revision, visibility, files, sizes) and
     stops: no network, no token needed;
  3. ``HfApi.create_repo(repo_id, private=..., exist_ok=True)``, ``create_branch`` for a
     revision other than ``main``, then ``upload_folder`` restricted to exactly the listed files.

The token comes from the usual ``huggingface_hub`` sources (``HF_TOKEN``, ``hf auth login``);
it is never printed, logged or written anywhere, and is scrubbed from error messages.
Network, offline and authentication failures raise one :class:`PruneError` line; the local
folder is only read. An existing repo keeps its visibility (``private`` applies on creation).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from prune.export.check import check_checkpoint, human_size
from prune.core.errors import PruneError, first_line

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

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self, token_found: bool | None = None) -> str:
        lines = [
            f"repo      {self.repo_id} (model; created {'private' if self.private else 'public'} if missing, "
            "an existing repo keeps its visibility)",
            f"revision  {self.revision}",
            f"message   {self.commit_message}",
        ]
        if token_found is not None:
            lines.append("token     " + ("found (not shown)" if token_found else
                                         "NOT found: a real push needs `hf auth login` or HF_TOKEN"))
        lines.append(f"files     {len(self.files)} files, {human_size(self.total_bytes)} ({self.total_bytes:,} bytes) "
                     f"from {self.folder}")
        width = max(len(f"{size:,}") for _, size in self.files) if self.files else 1
        for name, size in self.files:
            lines.append(f"  {size:>{width},} B  {human_size(size):>9}  {name}")
        lines.append("files already in the repo and not listed here are left as they are")
        return "\n".join(lines)


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """Every regular file under ``folder`` (sorted, POSIX relative paths), hidden names excluded.
    Symbolic links are resolved: one that leads outside ``folder`` (a planted link to
    ``$HF_HOME/token``, to ``~/.ssh``) is refused, so nothing outside the folder is ever sent."""
    out = []
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
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
    import json

    from prune.core.console import __version__

    try:
        record = json.loads((folder / "pruning.json").read_text())
        n0 = (record.get("original") or {}).get("n_layers") or record.get("layers_before")
        return f"Upload layer-pruned model: {n0} -> {record.get('layers_after')} decoder blocks (prune {__version__})"
    except (OSError, ValueError, AttributeError):
        return f"Upload layer-pruned model (prune {__version__})"


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


def check_can_push(repo_id: str) -> None:
    """A push can be attempted: valid repo id, not offline, a token available (not shown)."""
    check_repo_id(repo_id)
    if offline():
        raise PruneError("HF_HUB_OFFLINE is set: the Hub cannot be reached (unset it to push, or use --dry-run)")
    from huggingface_hub import get_token

    if not get_token():
        raise PruneError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN (a token with write access)")


# ---- push -------------------------------------------------------------------------------------
def plan_push(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = True,
              commit_message: str | None = None, quiet: bool = False) -> UploadPlan:
    """Check the folder (refusing an incomplete one) and list what a push would send."""
    check_repo_id(repo_id)
    path = Path(folder).expanduser()
    report = check_checkpoint(path, require_export=True)
    if not quiet:
        print(report.summary(), flush=True)
    report.raise_for_problems("refusing to push", shown=not quiet)
    return UploadPlan(path, repo_id, revision or DEFAULT_BRANCH, private,
                      commit_message or default_commit_message(path), upload_files(path))


def push(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = True,
         commit_message: str | None = None, dry_run: bool = False, quiet: bool = False) -> UploadPlan | str:
    """Push ``folder`` to ``repo_id`` (see module docstring). Returns the plan for a dry
    run, otherwise the URL of the commit."""
    if not dry_run:
        check_can_push(repo_id)  # offline / no token: fail before reading anything
    plan = plan_push(folder, repo_id, revision=revision, private=private, commit_message=commit_message, quiet=quiet)
    if dry_run:
        from huggingface_hub import get_token

        print("\ndry run: nothing is sent. A push would upload:\n" + plan.describe(token_found=bool(get_token())))
        return plan
    if not quiet:
        print(f"\npushing to {repo_id}@{plan.revision}:\n{plan.describe()}", flush=True)
    url = _upload(plan)
    if not quiet:
        print(f"pushed: {url}")
    return url


def push_config(folder, cfg, *, quiet: bool = False) -> str:
    """Push after ``prune run`` from a recipe's ``output.push_to_hub`` section."""
    return push(folder, cfg.repo_id, revision=cfg.revision, private=cfg.private, commit_message=cfg.commit_message,
                quiet=quiet)


def _upload(plan: UploadPlan) -> str:
    from huggingface_hub import HfApi, get_token

    token = get_token()
    api = HfApi(token=token)
    stage = "prepare"
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if plan.revision != DEFAULT_BRANCH:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model")
        stage = "upload"
        info = api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="model",
                                 revision=plan.revision, commit_message=plan.commit_message,
                                 allow_patterns=[glob.escape(name) for name, _ in plan.files])
    except PruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise PruneError(_scrub(failure_line(exc, plan, stage), token)) from None
    return getattr(info, "commit_url", None) or str(info)


def failure_line(exc: BaseException, plan: UploadPlan, stage: str = "prepare") -> str:
    """One line for a failed push: authentication, permission, network or the Hub's answer.
    ``stage`` is ``"prepare"`` (repo/branch creation: nothing was sent) or ``"upload"``
    (``upload_folder`` may have committed part of the files before failing)."""
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
