"""Transformers checkpoints read tensor by tensor: a folder or Hub id with ``model.safetensors``
or sharded ``model-*.safetensors`` plus ``model.safetensors.index.json``. Headers are read
first (names, dtypes, shapes at no cost); a tensor is read only when asked for, from a
memory-mapped file. Pickle checkpoints (``*.bin``) are never loaded.

Tensor names are matched across two checkpoints as ``from_pretrained`` matches them: a
base saved without the model's ``base_model_prefix`` (``bert-base-uncased`` as ``BertModel``,
a Llama as ``LlamaModel``) against a fine-tune that has it, and the other way round.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
# Files of a checkpoint besides its weights, copied where a checkpoint is written.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]
_READ_PIECE = 16 * 2**20  # bytes of a mapped file copied at a time
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or two that do not belong together."""


class Checkpoint:
    """The safetensors weights of a transformers checkpoint, one tensor at a time.

    Attributes:
        folder: the local folder (a Hub id is downloaded, weights and JSON files only).
        names: tensor names in file order.
        config: the checkpoint's ``config.json`` as a dict (empty if it has none).
    """

    def __init__(self, name_or_path: str | os.PathLike, *, revision: str | None = None) -> None:
        self.source = str(name_or_path)
        self.folder = _resolve(name_or_path, revision)
        self.config = (
            read_json(self.folder / "config.json")
            if (self.folder / "config.json").is_file()
            else {}
        )
        if (self.folder / INDEX_NAME).is_file():
            weight_map = read_json(self.folder / INDEX_NAME).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{self.folder / INDEX_NAME}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif (self.folder / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
        else:
            raise CheckpointError(
                f"{self.source}: no {WEIGHTS_NAME} or {INDEX_NAME} (pickle *.bin checkpoints "
                "are never loaded: convert them to safetensors first)"
            )
        self._header: dict[str, dict] = {}
        self._file_of: dict[str, Path] = {}
        self._data_start: dict[Path, int] = {}
        for file in files:
            path = self.folder / file
            header, self._data_start[path] = read_header_and_start(path)
            for name, record in header.items():
                self._header[name] = record
                self._file_of[name] = path
        self.names = list(self._header)
        self._maps: dict[Path, mmap.mmap] = {}

    @property
    def architecture(self) -> str | None:
        return architecture_of(self.config)

    @property
    def base_model_prefix(self) -> str | None:
        return base_model_prefix_of(self.config)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's torch dtype (None for a dtype torch cannot hold here)."""
        return _DTYPES.get(self._header[name]["dtype"])

    def nbytes(self, name: str) -> int:
        start, end = self._header[name]["data_offsets"]
        return end - start

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU: a fresh, writable copy out of the memory-mapped file,
        whose pages are then dropped from this process's memory (so reading a whole
        checkpoint never makes it resident)."""
        path = self._file_of[name]
        dtype = self.dtype(name)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype")
        if path not in self._maps:
            with open(path, "rb") as handle:
                self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        mapped = self._maps[path]
        begin, end = (self._data_start[path] + o for o in self._header[name]["data_offsets"])
        shape = self.shape(name)
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or end > len(mapped) or begin < self._data_start[path]:
            raise CheckpointError(f"{path}: tensor {name!r} has a bad byte range")
        data = np.empty(end - begin, dtype=np.uint8)
        # Copied in pieces, each piece's pages dropped once copied: at no time is more than
        # one piece of the file resident besides the copy.
        for offset in range(0, end - begin, _READ_PIECE):
            count = min(_READ_PIECE, end - begin - offset)
            source = np.frombuffer(mapped, dtype=np.uint8, count=count, offset=begin + offset)
            data[offset : offset + count] = source
            del source
            first_page = (begin + offset) // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, first_page, begin + offset + count - first_page)
        return torch.from_numpy(data).view(dtype).reshape(shape)

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def architecture_of(model_config: dict) -> str | None:
    """The transformers class a ``config.json`` names (its first architecture)."""
    return (model_config.get("architectures") or [None])[0]


def base_model_prefix_of(model_config: dict) -> str | None:
    """The ``base_model_prefix`` of that class (``bert``, ``model``, ...), if known."""
    import transformers

    model_class = getattr(transformers, architecture_of(model_config) or "", None)
    return getattr(model_class, "base_model_prefix", None) or None


def match_names(names: Iterable[str], stored: Iterable[str], prefix: str | None) -> dict[str, str]:
    """``{name: stored name}`` for each of ``names`` (a model's tensors) that a checkpoint
    holding ``stored`` has, as ``from_pretrained`` matches them: the same name, or with
    ``prefix`` (the model class's ``base_model_prefix``) taken off or put on."""
    stored = set(stored)
    matched = {}
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
        found = next((c for c in candidates if c in stored), None)
        if found is not None:
            matched[name] = found
    return matched


def copy_side_files(source: Path, target: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the files of ``names`` that ``source`` has into ``target``; returns those copied."""
    import shutil

    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def _resolve(name_or_path: str | os.PathLike, revision: str | None) -> Path:
    from .hub import resolve_folder

    try:
        return resolve_folder(name_or_path, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from error


def read_header(path: Path) -> dict[str, dict]:
    """``{tensor name: {dtype, shape, data_offsets}}`` of a safetensors file, header only."""
    return read_header_and_start(path)[0]


def read_header_and_start(path: Path) -> tuple[dict[str, dict], int]:
    """The header of a safetensors file and the byte where its tensor data starts."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > os.path.getsize(path):
                raise ValueError("header length past the end of the file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``CheckpointError`` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value
