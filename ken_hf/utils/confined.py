"""Names inside a folder, confined to it: the one place where ken-hf turns a file name it was
given, or read in a file, into a path.

A name is a plain file name (no separator, not ``.`` or ``..``). A file that is a symbolic
link is followed only when its target stays inside the folder, or, for a folder of the
Hugging Face Hub cache (``.../models--owner--name/snapshots/<commit>/``), inside that cache
entry's ``blobs/`` folder, where the cache keeps the files its snapshots link to. Everything
else is refused with ``UnsafePathError`` naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UnsafePathError

_CACHE_ENTRY = re.compile(r"(models|datasets|spaces)--.+")


def check_name(name: str, what: str = "file name") -> str:
    """``name`` if it is a plain file name, else ``UnsafePathError`` naming it."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise UnsafePathError(f"{name!r} is not a plain {what} (no folders, no '..')")
    return name


def _hub_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hub cache entry that ``folder`` is a snapshot (or a
    folder inside a snapshot) of, or None."""
    parts = folder.absolute().parts
    for index in range(len(parts) - 2, 0, -1):
        if parts[index] == "snapshots" and _CACHE_ENTRY.fullmatch(parts[index - 1]):
            return Path(*parts[:index]) / "blobs"
    return None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confined_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` for a plain ``name``; when that exists and is a symbolic link (or
    several), the link must end inside ``folder`` or in its Hub cache entry's blobs.
    Returns the path in ``folder`` (which may not exist)."""
    folder = Path(folder)
    path = folder / check_name(name)
    if not os.path.islink(path):
        return path
    target = os.path.realpath(path)
    roots = [os.path.realpath(folder)]
    blobs = _hub_blobs(folder)
    if blobs is not None:
        roots.append(os.path.realpath(blobs))
    if not any(_within(target, root) for root in roots):
        raise UnsafePathError(
            f"{path} is a symbolic link to {target}, outside the folder: ken-hf reads only "
            "files inside a folder (copy the file in instead of linking it)"
        )
    return path


def confined_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``confined_path`` of a regular file (followed links allowed), or None if there is no
    such file."""
    path = confined_path(folder, name)
    return path if path.is_file() else None


def confined_folder(folder: str | os.PathLike, relative: str) -> Path:
    """The folder ``relative`` (a relative path of plain names, ``/``-separated) inside
    ``folder``; ``UnsafePathError`` if any step leaves it."""
    current = Path(folder)
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        current = confined_path(current, part)
    return current
