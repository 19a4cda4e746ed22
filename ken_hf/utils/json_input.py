"""JSON read from files ken-hf did not write: bounded in size and nesting before anything
uses it, refused with an error of ken-hf's family that names where it came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import KENError

# Deeper than any document ken-hf or transformers writes (config.json nests 3-4 levels).
MAX_DEPTH = 32
# Larger than any config or index file of a real model (a 100k-tensor index is ~10 MB).
MAX_FILE_BYTES = 64 * 2**20


def is_integer(value: object) -> bool:
    """Whether a JSON value is an integer (``true`` and ``false`` are not, though Python's
    bools are ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's dict; a key given twice is an error (a reader would see only one)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {twice[:80]!r} appears twice in one object")
    return value


def parse_json(
    text: str | bytes,
    source: str,
    *,
    error: type[KENError] = KENError,
    max_depth: int = MAX_DEPTH,
) -> object:
    """``text`` parsed as JSON, or ``error`` naming ``source``: not JSON, an object with a
    key given twice, or nested deeper than ``max_depth``. NaN and Infinity are read as
    Python reads them: the schema that checks a field says whether it may hold them."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
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
    value = parse_json(data, str(path), error=error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
