"""Atomic writes: an interrupted save leaves what was there intact, and a save into a folder
touches only the files it names.

``FolderWriter`` saves the way transformers and PEFT do: the folder is created when missing,
files that ken-hf does not write are never touched, and each file ken-hf writes is staged
beside its final name and moved into place with ``os.replace``. One file is the commit
point and goes last; until it is replaced, the previous version of every other file stays
reachable under ``.<name>.previous``, so a reader that finds the commit file and a data file
from different saves can still read the previous version (``previous_version``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UnsafePathError
from .confined import check_name

_PREVIOUS = ".{name}.previous"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_file(path: Path) -> Path:
    """A new empty file beside ``path`` (same filesystem, so ``os.replace`` is atomic), with
    the permissions an ordinary new file gets (``mkstemp`` makes it private)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as ``write_bytes_atomic`` does."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename
    (a symbolic link at ``path`` is replaced, never written through)."""
    path = Path(path)
    temporary = staging_file(path)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def previous_version(path: str | os.PathLike) -> Path:
    """Where ``FolderWriter`` keeps the previous version of ``path`` while a save is under
    way (it exists only if that save was interrupted before its commit)."""
    path = Path(path)
    return path.parent / _PREVIOUS.format(name=path.name)


class FolderWriter:
    """Writes named files into ``folder``; use as a context manager.

    ``staged(name)`` gives a path to write file ``name`` to; ``write_text`` and ``copy`` are
    shortcuts. Leaving the block without an error publishes the files: every file but
    ``commit`` is moved into place first (the version it replaces kept as
    ``.<name>.previous``), then ``commit``, then the previous versions and the files named
    by ``remove_stale`` are deleted. An error removes the staged files and, when this writer
    created the folder, the folder; nothing that was there before is changed.
    """

    def __init__(self, folder: str | os.PathLike, *, commit: str) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder}: exists and is not a folder")
        self.commit = commit
        self._created: list[Path] = []
        self._staged: dict[str, Path] = {}
        self._stale: set[str] = set()

    def __enter__(self) -> FolderWriter:
        missing = []
        for folder in [self.folder, *self.folder.parents]:
            if folder.exists():
                break
            missing.append(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first: removed in this order on failure
        return self

    def staged(self, name: str) -> Path:
        """A fresh staging path for file ``name`` (a plain name inside the folder)."""
        if check_name(name).startswith("."):
            raise UnsafePathError(f"{name!r}: ken-hf keeps hidden names for its own use")
        if name in self._staged:
            raise ValueError(f"file {name!r} is written twice")
        self._staged[name] = staging_file(self.folder / name)
        return self._staged[name]

    def rename_staged(self, name: str, new_name: str) -> None:
        """File ``name``, staged already, is published as ``new_name`` instead."""
        if new_name in self._staged:
            raise ValueError(f"file {new_name!r} is written twice")
        self._staged[new_name] = self._staged.pop(name)

    def write_text(self, name: str, text: str) -> None:
        # Not synced here: publishing syncs every staged file before moving any into place.
        self.staged(name).write_text(text, encoding="utf-8")

    def copy(self, source: Path, name: str) -> None:
        shutil.copyfile(source, self.staged(name))

    def remove_stale(self, names: Iterable[str]) -> None:
        """Files of an earlier save by ken-hf to delete once this save is committed (those
        this save writes again are kept)."""
        self._stale.update(names)

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            try:
                self._publish()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _publish(self) -> None:
        if self.commit not in self._staged:
            raise ValueError(f"the save wrote no {self.commit!r}")
        for path in self._staged.values():
            with open(path, "rb+") as stream:
                os.fsync(stream.fileno())
        written = set(self._staged)
        kept_aside = []
        for name, path in self._staged.items():
            if name == self.commit:
                continue
            final = self.folder / name
            if final.is_file() and not final.is_symlink():
                aside = previous_version(final)
                aside.unlink(missing_ok=True)
                os.link(final, aside)
                kept_aside.append(aside)
            os.replace(path, final)
        os.replace(self._staged.pop(self.commit), self.folder / self.commit)
        self._staged.clear()
        _fsync_folder(self.folder)
        for aside in kept_aside:
            aside.unlink(missing_ok=True)
        for name in self._stale - written:
            stale = self.folder / name
            if stale.is_file() and not stale.is_symlink():  # only files a save wrote
                stale.unlink()

    def _discard(self) -> None:
        for path in self._staged.values():
            path.unlink(missing_ok=True)
        self._staged.clear()
        for folder in self._created:
            try:
                folder.rmdir()  # only if still empty: never removes anything else
            except OSError:
                break


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """For a folder that ken-hf owns entirely (a cache entry): yield a fresh temporary
    folder beside ``path`` that replaces ``path`` on success (two renames, then the old
    folder is removed); on any error ``path`` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
    try:
        yield staging
        if path.exists():
            retired = Path(
                tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
            )
            os.rename(path, retired / "folder")
            os.rename(staging, path)
            shutil.rmtree(retired)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
