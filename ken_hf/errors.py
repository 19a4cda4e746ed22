"""The error family of ken-hf: every refusal of an input (a setting, a file, a folder, a Hub
repository) is a ``KENError``.

``KENError`` subclasses ``ValueError``, so code written for earlier versions that catches
``ValueError`` keeps working. Each message names the file and the tensor or field at fault
and says what is wrong with it. Anything else that escapes ken-hf is a bug in ken-hf.
"""

from __future__ import annotations


class KENError(ValueError):
    """Base of every error ken-hf raises for an input it refuses."""


class KENConfigError(KENError):
    """A setting that cannot be used: a ``KENConfig`` field, a ``ken_config.json`` entry, a
    model ``config.json`` entry or an argument."""


class UnsafePathError(KENError):
    """A name that would lead out of its folder: a path instead of a plain file name, a
    symbolic link whose target lies outside, or a base location a file may not choose."""


class MissingExtraError(KENError, ImportError):
    """A feature whose optional dependencies are not installed; the message names the extra
    that installs them (``pip install "ken-hf[viz]"``). Also an ``ImportError``."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for an error message about a value read
    from a file, which can be anything."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
