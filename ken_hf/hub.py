"""Folders or Hub ids, resolved through huggingface_hub (so its cache and HF_HUB_OFFLINE work
as users expect), and publishing a folder to the Hub."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError

from .checkpoints import match_names, read_header
from .config import CONFIG_NAME
from .serialization import SUBNETWORK_NAME

SUBNETWORK_FILES = [CONFIG_NAME, SUBNETWORK_NAME, "config.json", "README.md"]


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_patterns: list[str] = SUBNETWORK_FILES,
    **hub_kwargs,
) -> Path:
    """A local folder as is, or the files of a Hub repository that match
    ``allow_patterns`` (default: a subnetwork's), downloaded or from the Hub cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    # A Hub id is "name" or "owner/name"; anything else is meant as a local path.
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{text}: no such folder")
    try:
        folder = snapshot_download(
            text, revision=revision, allow_patterns=allow_patterns, **hub_kwargs
        )
    except Exception as error:  # offline, unknown repository, bad id: say which, and why
        raise FileNotFoundError(
            f"{text}: not a local folder, and the Hub could not provide it ({error})"
        ) from error
    return Path(folder)


def resolve_file(
    name_or_path: str | os.PathLike, filename: str, *, revision: str | None = None, **hub_kwargs
) -> Path:
    """``filename`` inside a local folder, or downloaded from a Hub repository."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{name_or_path} has no {filename}")
        return path
    return Path(hf_hub_download(str(name_or_path), filename, revision=revision, **hub_kwargs))


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


def checkpoint_tensor_names(
    name_or_path: str | os.PathLike, *, revision: str | None = None
) -> set[str]:
    """Names of the tensors stored in a transformers checkpoint (safetensors, sharded or not),
    read from the file headers only."""
    try:
        index = resolve_file(name_or_path, "model.safetensors.index.json", revision=revision)
    except (FileNotFoundError, EntryNotFoundError):  # no index: a single-file checkpoint
        return set(read_header(resolve_file(name_or_path, "model.safetensors", revision=revision)))
    return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])


def new_parameters(
    model: torch.nn.Module, base_name_or_path: str | os.PathLike, *, revision: str | None = None
) -> set[str]:
    """Parameters of ``model`` that its base checkpoint does not hold (newly initialised, such
    as a classification head). Names match as ``from_pretrained`` matches them: with or
    without the model's ``base_model_prefix``. A checkpoint whose tensor names cannot be
    read (no safetensors file, or offline and not cached) gives an empty set and a warning:
    nothing is known to be new."""
    try:
        stored = checkpoint_tensor_names(base_name_or_path, revision=revision)
    except (OSError, ValueError, EntryNotFoundError) as error:
        warnings.warn(
            f"cannot read the tensor names of {str(base_name_or_path)!r} ({error}); no "
            "parameter is known to be newly initialised: list new heads in modules_to_save",
            stacklevel=2,
        )
        return set()
    names = [name for name, _ in model.named_parameters()]
    found = match_names(names, stored, getattr(model, "base_model_prefix", None))
    return {name for name in names if name not in found}
