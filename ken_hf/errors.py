"""The error family of ken-hf: every refusal of an input (a setting, a file, a folder, a Hub
repository) is a ``KENError``.

``KENError`` subclasses ``ValueError``, so code written for earlier versions that catches
``ValueError`` keeps working. Each message names the file and the tensor or field at fault
and says what is wrong with it. Anything else that escapes ken-hf is a bug in ken-hf.
"""

from __future__ import annotations


class KENError(ValueError):
    """Base of every error ken-hf raises for an input it refuses.

    A ``ValueError``, so code that catches ``ValueError`` keeps working. The message names
    the file and the tensor or field at fault, and says what is wrong with it.

    Example:
        ```python
        from ken_hf import KENError, KENSubnetwork

        try:
            subnetwork = KENSubnetwork.from_pretrained("ken/")
        except KENError as error:  # a bad setting, file, folder or base
            print(f"refused: {error}")
        ```
    """


class KENConfigError(KENError):
    """A setting that cannot be used.

    Raised for a ``KENConfig`` field, a ``ken_config.json`` entry, a model ``config.json``
    entry or an argument; also when ken-hf cannot tell which checkpoint a base came from and
    the caller has not named its new tensors (the message says what to pass).

    Example:
        ```python
        from ken_hf import KENConfig, KENConfigError

        try:
            KENConfig(k=64, keep_ratio=0.5)  # exactly one of the two
        except KENConfigError as error:
            print(error)
        ```
    """


class UnsafePathError(KENError):
    """A name that would lead out of its folder.

    Raised for a path where a plain file name is expected, a ``subfolder`` with ``..`` or a
    leading ``/``, a symbolic link whose target lies outside its folder, or a base location
    that a downloaded file may not choose (a subnetwork from the Hub may name only a Hub id
    as its base).

    Example:
        ```python
        from ken_hf import KENSubnetwork, UnsafePathError

        try:
            KENSubnetwork.from_pretrained("ken/", subfolder="../elsewhere")
        except UnsafePathError as error:
            print(error)
        ```
    """


class MissingExtraError(KENError, ImportError):
    """A feature whose optional dependencies are not installed; the message names the extra
    that installs them (``pip install "ken-hf[viz]"``). Also an ``ImportError``."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for an error message about a value read
    from a file, which can be anything."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
