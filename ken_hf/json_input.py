"""JSON read from files ken-hf did not write: bounded in size and nesting before anything
uses it, refused with an error of ken-hf's family that names where it came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import KENError

# Deeper than any document ken-hf or transformers writes (config.json nests 3-4 levels).
MAX_DEPTH = 32
# Larger than any config or index file of a real model (a 100k-tensor index is ~10 MB).
MAX_FILE_BYTES = 64 * 2**20


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(
    text: str | bytes,
    source: str,
    *,
    error: type[KENError] = KENError,
    max_depth: int = MAX_DEPTH,
    finite: bool = True,
) -> object:
    """``text`` parsed as JSON, or ``error`` naming ``source``: not JSON, nested deeper than
    ``max_depth``, or (with ``finite``) holding NaN or Infinity."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant if finite else None)
    except RecursionError:
        raise error(f"{source}: JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as problem:
        raise error(f"{source}: not valid JSON ({problem})") from None
    # Measured without recursion: a list of (value, depth) still to visit.
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > max_depth:
            raise error(f"{source}: JSON nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return value


def read_json_object(
    path: str | os.PathLike,
    *,
    error: type[KENError] = KENError,
    finite: bool = True,
) -> dict:
    """The JSON object in file ``path`` (at most ``MAX_FILE_BYTES``), or ``error`` naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as problem:
        raise error(f"{path}: cannot be read ({problem.strerror or problem})") from None
    if len(data) > MAX_FILE_BYTES:
        raise error(
            f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB, not a JSON file ken-hf reads"
        )
    value = parse_json(data, str(path), error=error, finite=finite)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
