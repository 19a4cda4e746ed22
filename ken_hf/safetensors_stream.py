"""Writing safetensors files one tensor at a time, so no whole model is ever held in memory.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range
of every tensor, plus string metadata) and the tensors' bytes. The header comes first but
is known only at the end, so ``SafetensorsWriter`` appends each tensor's bytes to a scratch
file as it comes and, on ``close``, writes header and bytes into a temporary file that is
renamed onto the target: a killed run leaves no file under the target's name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .io import write_text_atomic

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
_COPY_BUFFER = 64 * 2**20


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
        final = tempfile.NamedTemporaryFile(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp", delete=False
        )
        try:
            with final:
                final.write(struct.pack("<Q", len(text)))
                final.write(text)
                self._scratch.seek(0)
                shutil.copyfileobj(self._scratch, final, _COPY_BUFFER)
                final.flush()
                os.fsync(final.fileno())
            os.replace(final.name, self.path)
        except BaseException:
            Path(final.name).unlink(missing_ok=True)
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
    ``max_shard_bytes`` each (a tensor larger than that gets a shard of its own) and writes
    ``model.safetensors.index.json``, as ``save_pretrained`` lays a checkpoint out. A single
    shard is named ``model.safetensors`` and needs no index."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[tuple[Path, list[str]]] = []
        self._writer: SafetensorsWriter | None = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._writer is None or (
            self._writer.bytes_written and self._writer.bytes_written + size > self.max_shard_bytes
        ):
            self._next_shard()
        self._writer.add(name, tensor)
        self._shards[-1][1].append(name)
        self.total_bytes += size

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.folder / f"shard-{len(self._shards) + 1}.safetensors"
        self._writer = SafetensorsWriter(path)
        self._writer.metadata = {"format": "pt"}
        self._shards.append((path, []))

    def close(self) -> None:
        """Finish the last shard, give the shards their final names, write the index."""
        if self._writer is None:
            self._next_shard()
        self._writer.close()
        count = len(self._shards)
        if count == 1:
            os.replace(self._shards[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_text_atomic(
            self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n"
        )

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        for path, _ in self._shards:
            path.unlink(missing_ok=True)
