"""Hub access, the lowest layer of ken-hf: folders or Hub ids resolved through
huggingface_hub (so its cache and ``HF_HUB_OFFLINE`` work as users expect), and publishing a
folder. Nothing here knows what the files hold."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` can only be meant as a Hub id: ``name`` or ``owner/name``,
    not an existing path and not written like a path."""
    text = str(name_or_path)
    return not (
        Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1 or not text
    )


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    **hub_kwargs,
) -> Path:
    """A local folder as is, or the files of a Hub repository that match ``allow_patterns``
    (all when None), downloaded or taken from the Hub cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such folder")
    try:
        folder = snapshot_download(
            str(name_or_path), revision=revision, allow_patterns=allow_patterns, **hub_kwargs
        )
    except Exception as error:  # offline, unknown repository, bad id: say which, and why
        raise FileNotFoundError(
            f"{name_or_path}: not a local folder, and the Hub could not provide it ({error})"
        ) from error
    return Path(folder)


def resolve_file(
    name_or_path: str | os.PathLike, filename: str, *, revision: str | None = None, **hub_kwargs
) -> Path:
    """``filename`` inside a local folder, or downloaded from a Hub repository;
    ``FileNotFoundError`` when neither has it."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{name_or_path} has no {filename}")
        return path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such folder")
    try:
        return Path(hf_hub_download(str(name_or_path), filename, revision=revision, **hub_kwargs))
    except Exception as error:
        raise FileNotFoundError(
            f"{name_or_path}: no local folder, and the Hub could not provide {filename} ({error})"
        ) from error


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload KEN subnetwork",
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )
    return info.commit_url
