"""safetensors files read and written one tensor at a time, so no whole model is ever held in
memory. Every reader and writer of ken-hf goes through this module: one table of dtypes, one
reader, one writer.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range
of every tensor, plus string metadata) and the tensors' bytes. ``SafetensorsFile`` validates
the whole header on opening and copies a tensor out of the memory-mapped file only when
asked. The header comes first but is known only at the end of a write, so
``SafetensorsWriter`` appends each tensor's bytes to a scratch file as it comes and, on
``close``, writes header and bytes into the target path (a staging path of a
``FolderWriter``, or a temporary file renamed onto the target).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from ..errors import KENConfigError, KENError, shown
from ..utils.atomic_files import FolderWriter, staging_file
from ..utils.json_input import parse_json

# torch dtype <-> safetensors dtype name: the one table of the package.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# The floating-point dtypes KEN works on (selection, storage, fingerprints).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Bits per element of every dtype the safetensors format names (torch holds only some).
FORMAT_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_COPY_BUFFER = 64 * 2**20
_READ_PIECE = 16 * 2**20  # bytes of a mapped file copied at a time
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
MAX_RANK = 8


class SafetensorsError(KENError):
    """A file that is not a readable safetensors file, or a tensor that cannot be read."""


class SafetensorsFile:
    """One safetensors file, read a tensor at a time from a memory map.

    Attributes:
        path: the file.
        metadata: the header's ``__metadata__`` (``{str: str}``, empty if none).
        names: tensor names in header order.
    """

    def __init__(self, path: str | os.PathLike, *, max_header: int = MAX_HEADER) -> None:
        self.path = Path(path)
        # Header and data are read through this one handle: a file replaced on disk after
        # opening (a save into the same folder) is not mixed with the one opened.
        try:
            self._handle = open(self.path, "rb")  # closed by close()
        except OSError as error:
            raise SafetensorsError(f"{self.path}: cannot be opened ({error.strerror})") from None
        try:
            self._open(max_header)
        except BaseException:
            self._handle.close()
            raise
        self._map: mmap.mmap | None = None
        # A file read lazily (a subnetwork decoded on first use) is closed when dropped.
        weakref.finalize(self, self._handle.close)

    def _open(self, max_header: int) -> None:
        self._header, self._data_start = _read_header(self.path, self._handle, max_header)
        metadata = self._header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise SafetensorsError(f"{self.path}: malformed __metadata__")
        self.metadata: dict[str, str] = metadata
        self.size = os.fstat(self._handle.fileno()).st_size
        data_size = self.size - self._data_start
        ranges = [
            (*_check_record(self.path, name, record, data_size), name)
            for name, record in self._header.items()
        ]
        _check_contiguous(self.path, ranges, data_size)
        self.names = list(self._header)

    def dtype(self, name: str) -> torch.dtype | None:
        """Tensor ``name``'s torch dtype (None for a dtype torch cannot hold here)."""
        return TORCH_DTYPES.get(self._header[name]["dtype"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self._header[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU: a fresh, writable copy out of the memory-mapped file,
        whose pages are then dropped from this process's memory (so reading a whole
        checkpoint never makes it resident)."""
        dtype = self.dtype(name)
        if dtype is None:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has unsupported dtype {self._header[name]['dtype']}"
            )
        if self._map is None and self.size:
            # An empty mapping is not allowed; a file of header only has no data to read.
            self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = (self._data_start + o for o in self._header[name]["data_offsets"])
        data = np.empty(end - begin, dtype=np.uint8)
        if end > begin and (self._map is None or end > len(self._map)):
            raise SafetensorsError(f"{self.path}: tensor {name!r} lies past the end of the file")
        # Copied in pieces, each piece's pages dropped once copied: at no time is more than
        # one piece of the file resident besides the copy.
        for offset in range(0, end - begin, _READ_PIECE):
            count = min(_READ_PIECE, end - begin - offset)
            source = np.frombuffer(self._map, dtype=np.uint8, count=count, offset=begin + offset)
            data[offset : offset + count] = source
            del source
            first_page = (begin + offset) // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, first_page, begin + offset + count - first_page)
        return torch.from_numpy(data).view(dtype).reshape(self.shape(name))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._handle.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def _read_header(path: Path, handle, max_header: int) -> tuple[dict, int]:
    """The JSON header of the safetensors file open as ``handle`` and the byte where its
    tensor data starts."""
    try:
        size = os.fstat(handle.fileno()).st_size
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            raise ValueError("header length past the end of the file")
        if length > max_header:
            raise ValueError(f"header of {length} bytes, more than {max_header} allowed")
        text = handle.read(length)
    except (OSError, ValueError, struct.error) as error:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({error})") from None
    header = parse_json(text, f"{path}: header", error=SafetensorsError)
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a readable safetensors file (header is not a map)")
    return header, 8 + length


def _check_record(path: Path, name: str, record, data_size: int) -> tuple[int, int]:
    """One header entry: a known dtype name, a shape, and a byte range inside the data that
    is exactly as long as the shape and dtype say. Returns the byte range."""

    def fail(problem: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: tensor {name!r}: {problem}")

    if not isinstance(record, dict):
        raise fail("malformed header entry")
    shape, offsets, dtype_name = (
        record.get("shape"),
        record.get("data_offsets"),
        record.get("dtype"),
    )
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_RANK
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**64 for d in shape)
    ):
        raise fail(f"bad shape {shown(shape)}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise fail(f"bad byte range {shown(offsets)}")
    if not isinstance(dtype_name, str) or dtype_name not in FORMAT_DTYPE_BITS:
        raise fail(f"unknown dtype {shown(dtype_name)}")
    bits = math.prod(shape) * FORMAT_DTYPE_BITS[dtype_name]  # Python ints: no wrapping
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        needed = shown(bits // 8) if bits % 8 == 0 else f"{shown(bits)} bits"
        raise fail(f"byte range of {offsets[1] - offsets[0]} bytes, shape needs {needed}")
    return offsets[0], offsets[1]


def _check_contiguous(path: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges follow one another with no gap and no overlap and end where
    the file does, as the safetensors format requires."""
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end:
            problem = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise SafetensorsError(f"{path}: tensor {name!r}: byte range {[begin, stop]} {problem}")
        end = stop
    if end != data_size:
        raise SafetensorsError(
            f"{path}: the tensors' bytes end at {end}, the file's data at {data_size}"
        )


class SafetensorsWriter:
    """Streams tensors into one safetensors file at ``path``.

    Use as a context manager: ``add`` tensors in the order they should be stored, set
    ``metadata`` if any; leaving the block without an error writes the file, an error
    removes every partial file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._scratch = tempfile.NamedTemporaryFile(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".data", delete=False
        )

    @property
    def bytes_written(self) -> int:
        """Bytes of tensor data added so far."""
        return self._offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any shape, a dtype of ``SAFETENSORS_DTYPES``) as ``name``."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} is written twice")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        size = data.numel() * data.element_size()
        if size:
            self._scratch.write(data.view(torch.uint8).numpy().data)
        self._header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size

    def close(self) -> None:
        """Write header and data into ``path`` (via a temporary file and a rename)."""
        self._scratch.flush()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        final = staging_file(self.path)
        try:
            with open(final, "wb") as stream:
                stream.write(struct.pack("<Q", len(text)))
                stream.write(text)
                self._scratch.seek(0)
                shutil.copyfileobj(self._scratch, stream, _COPY_BUFFER)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(final, self.path)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        finally:
            self._discard_scratch()

    def abort(self) -> None:
        """Drop everything written so far."""
        self._discard_scratch()

    def _discard_scratch(self) -> None:
        self._scratch.close()
        Path(self._scratch.name).unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class ShardedWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` each (a tensor larger than that gets a shard of its own) and an
    ``model.safetensors.index.json``, as ``save_pretrained`` lays a checkpoint out; a single
    shard is named ``model.safetensors`` and needs no index. The files are staged in
    ``folder`` (a ``FolderWriter``), whose commit point ``close`` sets: the index, or the
    single shard. Use as a context manager."""

    def __init__(self, folder: FolderWriter, max_shard_bytes: int) -> None:
        if max_shard_bytes < 1:
            raise KENConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[list[str]] = []
        self._writer: SafetensorsWriter | None = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._writer is None or (
            self._writer.bytes_written and self._writer.bytes_written + size > self.max_shard_bytes
        ):
            self._next_shard()
        self._writer.add(name, tensor)
        self._shards[-1].append(name)
        self.total_bytes += size

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shards.append([])
        self._writer = SafetensorsWriter(self.folder.staged(f"shard-{len(self._shards)}"))
        self._writer.metadata = {"format": "pt"}

    def close(self) -> None:
        """Finish the last shard, give the shards their final names, write the index."""
        if self._writer is None:
            self._next_shard()
        self._writer.close()
        count = len(self._shards)
        if count == 1:
            self.folder.rename_staged("shard-1", "model.safetensors")
            self.folder.commit = "model.safetensors"
            return
        weight_map = {}
        for number, names in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            self.folder.rename_staged(f"shard-{number}", final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        self.folder.write_text("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        self.folder.commit = "model.safetensors.index.json"

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Without an error, ``close``; with one, drop the shard being written (the staged
        shards are the ``FolderWriter``'s to remove)."""
        if kind is None:
            self.close()
        elif self._writer is not None:
            self._writer.abort()
