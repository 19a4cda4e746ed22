"""Hub access, the lowest layer of ken-hf: folders or Hub ids resolved through
huggingface_hub (so its cache and ``HF_HUB_OFFLINE`` work as users expect), and publishing a
folder. Nothing here knows what the files hold.

Every reader takes ``subfolder`` (a folder inside the local folder or the Hub repository)
and ``revision`` (a branch, tag or commit of a Hub repository; local folders have none)."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from ..errors import UnsafePathError
from .confined import confined_file, confined_folder


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` can only be meant as a Hub id: ``name`` or ``owner/name``,
    not an existing path and not written like a path."""
    text = str(name_or_path)
    return not (
        Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1 or not text
    )


# A Hub repository id as huggingface_hub accepts it: ``name`` or ``owner/name``.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def is_remote_id(text: str) -> bool:
    """Whether ``text`` can only mean a Hub repository: written as a repository id, with no
    ``..``, and no file or folder of that name here (transformers would read a local one)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not os.path.lexists(text)


def _checked_subfolder(subfolder: str | os.PathLike | None) -> str:
    """``subfolder`` as a relative POSIX path ('' for none); a path that leaves the folder
    (absolute, or with ``..``) is a ``ValueError`` naming the argument."""
    if subfolder is None or str(subfolder) in ("", "."):
        return ""
    path = PurePosixPath(str(subfolder).replace(os.sep, "/"))
    if path.is_absolute() or ".." in path.parts:
        raise UnsafePathError(
            f"subfolder={str(subfolder)!r} must be a relative path inside the folder or "
            "repository (no leading '/', no '..')"
        )
    return str(path)


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    subfolder: str | os.PathLike | None = None,
    **hub_kwargs,
) -> Path:
    """A local folder (``subfolder`` inside it) as is, or the files of a Hub repository
    under ``subfolder`` that match ``allow_patterns`` (all when None), downloaded or taken
    from the Hub cache; returns the folder that holds them."""
    inside = _checked_subfolder(subfolder)
    path = Path(name_or_path)
    if path.is_dir():
        folder = confined_folder(path, inside)
        if not folder.is_dir():
            raise FileNotFoundError(f"{name_or_path} has no subfolder {inside!r} (subfolder=)")
        return folder
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such folder")
    if inside and allow_patterns is not None:
        allow_patterns = [f"{inside}/{pattern}" for pattern in allow_patterns]
    elif inside:
        allow_patterns = [f"{inside}/*"]
    where = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(
            snapshot_download(
                str(name_or_path), revision=revision, allow_patterns=allow_patterns, **hub_kwargs
            )
        )
    except Exception as error:  # offline, unknown repository, bad id: say which, and why
        raise FileNotFoundError(
            f"{name_or_path}: not a local folder, and the Hub could not provide it{where} ({error})"
        ) from error
    if not confined_folder(folder, inside).is_dir():
        raise FileNotFoundError(
            f"{name_or_path}{where}: the repository has no subfolder {inside!r} (subfolder=)"
        )
    return confined_folder(folder, inside)


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    subfolder: str | os.PathLike | None = None,
    **hub_kwargs,
) -> Path:
    """``filename`` inside a local folder (in its ``subfolder``), or downloaded from a Hub
    repository (from its ``subfolder``); ``FileNotFoundError`` when neither has it."""
    inside = _checked_subfolder(subfolder)
    shown = f"{inside}/{filename}" if inside else filename
    if Path(name_or_path).is_dir():
        path = confined_file(confined_folder(name_or_path, inside), filename)
        if path is None:
            raise FileNotFoundError(f"{name_or_path} has no {shown}")
        return path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such folder")
    try:
        return Path(
            hf_hub_download(
                str(name_or_path),
                filename,
                subfolder=inside or None,
                revision=revision,
                **hub_kwargs,
            )
        )
    except Exception as error:
        where = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"{name_or_path}: no local folder, and the Hub could not provide {shown}{where} "
            f"({error})"
        ) from error


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload KEN subnetwork",
    revision: str | None = None,
    path_in_repo: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (``private`` applies only then) and upload ``folder``
    into it, under ``path_in_repo`` (default: the root) on branch ``revision`` (default:
    the main branch; created from it when missing); returns the commit URL."""
    inside = _checked_subfolder(path_in_repo)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=inside or None,
            commit_message=commit_message,
            revision=revision,
        )
    except OSError as error:  # huggingface_hub's HTTP and offline errors are OSErrors
        where = (f" subfolder {inside!r}" if inside else "") + (
            f" revision {revision!r}" if revision else ""
        )
        raise OSError(
            f"pushing {folder} to the Hub repository {repo_id}{where} failed: {error}"
        ) from error
    return info.commit_url
