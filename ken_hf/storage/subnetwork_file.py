"""The subnetwork file: ``ken_subnetwork.safetensors``, pickle-free and validated on read.

Version 2 (written; version 1 is still read, see ``format_v1``), one safetensors file:

- ``pruned.<name>.kept``: where KEN kept values, as a packed bitmask (bits little-endian)
  or an index list (increasing flat positions, narrowest unsigned type), whichever is
  smaller, zstd-compressed: KEN's selection itself, with no value attached;
- ``pruned.<name>.changed``: packed bits over the kept positions, set where the fine-tuned
  value's bits differ from the base's, zstd-compressed (kept values equal to the base cost
  nothing more);
- ``pruned.<name>.difference``: the changed values as the zigzag-coded difference of their
  bit patterns from the base's, in byte planes, zstd-compressed (``ken_hf.storage.delta_codec``):
  lossless in every float dtype;
- ``whole.<name>``: a tensor stored whole, as it is or, where that is smaller, its byte
  planes zstd-compressed.

- for a tensor that grew along its first dimension (a vocabulary that gained tokens), its
  entry records ``rows``, the base's rows (``kept``, ``changed`` and ``difference`` cover
  those), and ``pruned.<name>.added`` holds the rows after them, in byte planes,
  zstd-compressed. A file with such a tensor is version 3; others stay version 2.

All arrays but raw whole tensors are uint8. The metadata holds ``format`` /
``format_version`` and ``ken``: a JSON document with, per tensor, its kind, shape, dtype,
kept and changed counts, encodings, the raw size of each compressed array and an xxh3
checksum of every stored array, plus the fingerprints of the base tensors; ``digest`` is
the xxh3 of that JSON text. Reading checks all of it before anything is returned, so a
truncated, corrupted or foreign file raises ``KENFormatError`` and never reaches a model.
The kept values are rebuilt only on a base whose fingerprints match
(``PrunedTensor.written_values``, called by the loaders after checking).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from ..errors import KENError
from ..utils.json_input import parse_json
from ..utils.lazy_tensors import LazyTensors
from . import format_v1
from .delta_codec import (
    BITS_DTYPES,
    DEFAULT_LEVEL,
    DEFAULT_THREADS,
    compress,
    decompress,
    from_planes,
    pack_bits,
    to_planes,
    unpack_bits,
)
from .format import (
    FORMAT,
    SUBNETWORK_NAME,
    EntryCheck,
    KENFormatError,
    PrunedTensor,
    StoredSubnetwork,
    checksum,
    dtype_name,
    index_dtype,
    positions_of,
    smaller_encoding,
)
from .safetensors_io import SafetensorsError, SafetensorsFile, SafetensorsWriter
from .schema import MAX_SUBNETWORK_HEADER, check_document

if TYPE_CHECKING:
    from ..making.plan import TensorRecord

FORMAT_VERSION = "2"
# Version 2 plus tensors grown along their first dimension (``rows``, ``added``): written
# only for a subnetwork that has one, so that others stay readable by older ken-hf.
GROWN_FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")

__all__ = [
    "FORMAT_VERSION",
    "SUBNETWORK_NAME",
    "KENFormatError",
    "PrunedTensor",
    "StoredSubnetwork",
    "SubnetworkReader",
    "SubnetworkWriter",
    "open_subnetwork",
    "read_subnetwork",
    "write_subnetwork",
]


@dataclasses.dataclass(frozen=True)
class SubnetworkFileFacts:
    """What a model card or a driver reports about a written subnetwork file, from the
    header's entries (the writer's own, or a reader's): ``counts`` (tensors and values
    pruned, of a grown tensor its base's rows; kept; stored whole), ``full_bytes`` (the same
    tensors in full), ``file_bytes`` (the file's size), ``added_values`` (the values of the
    rows grown tensors added, stored whole) and ``per_tensor`` (``{name: {"kept", "values"}}``
    of each pruned tensor counted in ``counts``), ``whole_names`` (the tensors stored whole)."""

    counts: dict[str, int]
    full_bytes: int
    file_bytes: int
    added_values: int = 0
    per_tensor: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    whole_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, entries: Mapping[str, dict], file_bytes: int) -> SubnetworkFileFacts:
        """The facts of the header ``entries`` (``{name: entry}``) of a file of ``file_bytes``."""
        per_tensor, added = {}, 0
        for name, entry in entries.items():
            if entry["kind"] != "pruned":
                continue
            shape, rows = entry["shape"], entry.get("rows")
            width = math.prod(shape[1:])
            if rows is not None:
                added += (shape[0] - rows) * width
                if entry["count"] == 0:  # reset, stored for its new rows alone: not pruned
                    continue
            values = rows * width if rows is not None else math.prod(shape)
            per_tensor[name] = {"kept": entry["count"], "values": values}
        whole = {n: e for n, e in entries.items() if e["kind"] == "whole"}
        counts = {
            "pruned_tensors": len(per_tensor),
            "pruned_values": sum(t["values"] for t in per_tensor.values()),
            "kept_values": sum(t["kept"] for t in per_tensor.values()),
            "whole_tensors": len(whole),
            "whole_values": sum(math.prod(e["shape"]) for e in whole.values()),
        }
        full_bytes = sum(
            math.prod(e["shape"]) * torch.empty((), dtype=getattr(torch, e["dtype"])).itemsize
            for e in entries.values()
        )
        return cls(counts, full_bytes, file_bytes, added, per_tensor, tuple(sorted(whole)))


def _uint8(data: bytes) -> torch.Tensor:
    """A uint8 tensor of ``data``'s bytes."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


class SubnetworkWriter:
    """Writes a version 2 subnetwork file one tensor at a time (``write_subnetwork`` writes
    one held in memory). ``level`` and ``threads``: zstd's compression level (default 1)
    and worker threads (default 0: single-threaded, the same bytes everywhere). Use as a
    context manager; set ``fingerprints`` before the block ends."""

    def __init__(
        self, path: str | os.PathLike, *, level: int = DEFAULT_LEVEL, threads: int = DEFAULT_THREADS
    ) -> None:
        self._path = Path(path)
        self._file = SafetensorsWriter(path)
        self._level, self._threads = level, threads
        self._entries: dict[str, dict] = {}
        self._grown = False
        self.fingerprints: dict[str, str] = {}
        self.digest: str | None = None  # of the header's document, set on closing

    def _compressed(self, data: bytes) -> torch.Tensor:
        return _uint8(compress(data, level=self._level, threads=self._threads))

    def add_record(self, record: TensorRecord) -> None:
        """Store what the pipeline's step found for one tensor."""
        name = record.plan.name
        if record.fingerprint is not None:
            self.fingerprints[name] = record.fingerprint
        if record.mask is not None:
            bits = record.mask.detach().cpu().reshape(-1).numpy()
            shape = record.mask.shape
            if record.added is not None:
                shape = torch.Size((shape[0] + record.added.shape[0], *shape[1:]))
            self._add_pruned(
                name, shape, record.finetuned.dtype, bits, None, record.changed,
                record.difference, record.delta, record.plan.base_rows, record.added,
            )  # fmt: skip
        elif record.fingerprint is None:
            self.add_whole(name, record.finetuned)

    def add_pruned(self, name: str, pruned: PrunedTensor) -> None:
        """A pruned tensor held in memory (it must carry its delta: ``changed``, ``difference``)."""
        if pruned.changed is None:
            raise KENError(
                f"tensor {name!r} was read from a version 1 file and holds no delta against "
                "the base: apply it to its base (KENModel) and save that to write version 2"
            )
        self._add_pruned(
            name,
            pruned.shape,
            pruned.dtype,
            None,
            pruned.positions,
            pruned.changed,
            pruned.difference,
            [pruned.delta_kept, pruned.delta_reset],
            pruned.base_rows,
            pruned.added,
        )

    def _add_pruned(
        self,
        name,
        shape,
        dtype,
        bits,
        positions,
        changed,
        difference,
        statistics,
        base_rows=None,
        added=None,
    ) -> None:
        """``bits`` (bool numpy ``[numel]``) or ``positions`` (int64 ``[K]``) say where,
        over the base's rows (``base_rows`` of ``shape``'s when the tensor grew: the rows
        after them, ``added``, are stored whole)."""
        numel = math.prod(shape if base_rows is None else (base_rows, *shape[1:]))
        count = int(changed.numel())
        if smaller_encoding(numel, count) == "indices":
            encoding = "indices"
            if positions is None:
                positions = positions_of(bits)
            kept = positions.to(index_dtype(numel)).numpy().tobytes()
        else:
            encoding = "mask"
            if bits is None:
                bits = np.zeros(numel, dtype=bool)
                bits[positions.numpy()] = True
            kept = np.packbits(bits, bitorder="little").tobytes()
        arrays = {
            "kept": kept,
            "changed": pack_bits(changed),
            "difference": to_planes(difference.detach().cpu()),
        }
        if added is not None:
            arrays["added"] = to_planes(added.detach().cpu().contiguous())
        stored = {part: self._compressed(data) for part, data in arrays.items()}
        for part, tensor in stored.items():
            self._file.add(f"pruned.{name}.{part}", tensor)
        self._entries[name] = {
            "kind": "pruned",
            "shape": list(shape),
            "dtype": dtype_name(dtype),
            "count": count,
            "changed": int(difference.numel()),
            "encoding": encoding,
            "sizes": [len(data) for data in arrays.values()],
            "delta": statistics,
            "checksums": [checksum(t, list(shape)) for t in stored.values()],
        }
        if added is not None:
            self._entries[name]["rows"] = base_rows
            self._grown = True

    def add_whole(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor stored whole: its byte planes compressed where that is smaller."""
        tensor = tensor.detach().cpu().contiguous()
        planes = to_planes(tensor)
        packed = self._compressed(planes)
        codec = "zstd" if packed.numel() < len(planes) else "none"
        stored = packed if codec == "zstd" else tensor
        self._file.add(f"whole.{name}", stored)
        self._entries[name] = {
            "kind": "whole",
            "shape": list(tensor.shape),
            "dtype": dtype_name(tensor.dtype),
            "codec": codec,
            "checksums": [checksum(stored, list(tensor.shape))],
        }

    def add_stored(self, stored: StoredSubnetwork) -> None:
        """Every tensor of a subnetwork held in memory, in name order, and its fingerprints."""
        for name in sorted([*stored.pruned, *stored.whole]):
            if name in stored.pruned:
                self.add_pruned(name, stored.pruned[name])
            else:
                self.add_whole(name, stored.whole[name])
        self.fingerprints = stored.fingerprints

    @property
    def entries(self) -> dict[str, dict]:
        """``{name: the header's record}`` of each tensor added so far."""
        return self._entries

    def facts(self) -> SubnetworkFileFacts:
        """Counts and sizes of the file written (after the block has ended)."""
        return SubnetworkFileFacts.of(self._entries, self._path.stat().st_size)

    def __enter__(self) -> SubnetworkWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self._file.abort()
            return
        # Sorted: the same subnetwork gives the same bytes whichever driver wrote it.
        document = json.dumps(
            {"tensors": self._entries, "fingerprints": self.fingerprints}, sort_keys=True
        )
        self.digest = xxhash.xxh3_64_hexdigest(document.encode())
        self._file.metadata = {
            "format": FORMAT,
            "format_version": GROWN_FORMAT_VERSION if self._grown else FORMAT_VERSION,
            "ken": document,
            "digest": self.digest,
        }
        self._file.close()


def write_subnetwork(
    stored: StoredSubnetwork,
    path: str | os.PathLike,
    *,
    level: int = DEFAULT_LEVEL,
    threads: int = DEFAULT_THREADS,
) -> str:
    """Write ``stored`` to ``path`` (version 2), tensors in name order; returns the
    header's digest."""
    with SubnetworkWriter(path, level=level, threads=threads) as writer:
        writer.add_stored(stored)
    return writer.digest


class SubnetworkReader:
    """Reads a subnetwork file (version 1 or 2) one tensor at a time, each validated as it
    is read (``read_subnetwork`` reads them all). The header is checked on opening: format,
    version, digest, and that every stored array is one the header describes.

    Use as a context manager; ``names`` lists the tensors in the file's order.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise KENFormatError(f"{self.path}: no such subnetwork file")
        try:
            self._file = SafetensorsFile(self.path, max_header=MAX_SUBNETWORK_HEADER)
        except SafetensorsError as error:
            raise KENFormatError(str(error)) from None
        try:
            self.version, self._document = _read_document(self.path, self._file.metadata)
            check_document(self.path, self.version, self._document, self._file)
        except BaseException:
            self._file.close()
            raise
        self.digest: str = self._file.metadata["digest"]
        self._keys = set(self._file.names)
        self.fingerprints: dict[str, str] = dict(self._document["fingerprints"])
        self.names: list[str] = list(self._document["tensors"])

    def entry(self, name: str) -> dict:
        """The header's record of tensor ``name`` (kind, shape, dtype, count, encoding)."""
        return self._document["tensors"][name]

    def facts(self) -> SubnetworkFileFacts:
        """Counts and sizes from the header alone (no tensor is read)."""
        entries = {name: self.entry(name) for name in self.names}
        return SubnetworkFileFacts.of(entries, self.path.stat().st_size)

    def read(self, name: str) -> PrunedTensor | torch.Tensor:
        """Tensor ``name``: a ``PrunedTensor``, or the tensor itself when stored whole."""
        check = EntryCheck(self.path, name, self._get)
        if self.version == "1":
            return format_v1.read_entry(check, self.entry(name))
        return _read_entry(check, self.entry(name))

    def _get(self, key: str) -> torch.Tensor | None:
        if key not in self._keys:
            return None
        try:
            return self._file.read(key)
        except SafetensorsError as error:
            raise KENFormatError(f"{self.path}: array {key!r} is unreadable ({error})") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SubnetworkReader:
        return self

    def __exit__(self, *exception) -> None:
        self.close()


class DecodedOnAccess(LazyTensors):
    """Tensors of a subnetwork file open in ``reader``, each read, validated and decoded the
    first time it is asked for, then kept. ``entry(name)`` gives a tensor's header record
    without decoding it, so that its shape and dtype can be checked against a base first."""

    def __init__(self, reader: SubnetworkReader, names: list[str]) -> None:
        super().__init__(functools.cache(reader.read), names)
        self._reader = reader

    @property
    def path(self) -> Path:
        """The subnetwork file the tensors are read from."""
        return self._reader.path

    def entry(self, name: str) -> dict:
        """The header's (validated) record of tensor ``name``."""
        return self._reader.entry(name)


def open_subnetwork(reader: SubnetworkReader) -> StoredSubnetwork:
    """The subnetwork of an open file (its header validated in full when opened), its
    tensors decoded on access (``DecodedOnAccess``, which keeps the reader open); a
    ``KENFormatError`` on any problem, when it is found."""
    kinds = {name: reader.entry(name)["kind"] for name in reader.names}
    return StoredSubnetwork(
        DecodedOnAccess(reader, [n for n in reader.names if kinds[n] == "pruned"]),
        DecodedOnAccess(reader, [n for n in reader.names if kinds[n] == "whole"]),
        reader.fingerprints,
    )


def read_subnetwork(path: str | os.PathLike) -> StoredSubnetwork:
    """Read and fully validate a subnetwork file; raise ``KENFormatError`` on any problem."""
    pruned: dict[str, PrunedTensor] = {}
    whole: dict[str, torch.Tensor] = {}
    with SubnetworkReader(path) as reader:
        for name in reader.names:
            tensor = reader.read(name)
            if isinstance(tensor, PrunedTensor):
                pruned[name] = tensor
            else:
                whole[name] = tensor
        return StoredSubnetwork(pruned, whole, reader.fingerprints)


def _read_document(path: Path, metadata: dict[str, str]) -> tuple[str, dict]:
    if metadata.get("format") != FORMAT:
        raise KENFormatError(f"{path}: not a ken-hf subnetwork (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise KENFormatError(
            f"{path}: format version {version!r} is not supported (this ken-hf reads "
            f"{', '.join(READABLE_VERSIONS)})"
        )
    text = metadata.get("ken", "")
    if xxhash.xxh3_64_hexdigest(text.encode()) != metadata.get("digest"):
        raise KENFormatError(f"{path}: metadata digest mismatch (corrupted header)")
    return version, parse_json(text, f"{path}: the KEN document", error=KENFormatError)


def _read_entry(check: EntryCheck, entry) -> PrunedTensor | torch.Tensor:
    """Tensor ``check.name`` of a version 2 file, every array checked before decoding."""
    shape, dtype, numel = check.basics(entry)
    name, checksums = check.name, entry.get("checksums")
    if entry["kind"] == "whole":
        stored = check.array(f"whole.{name}")
        check.sums(checksums, [stored], shape)
        if entry["codec"] == "none":
            return stored
        itemsize = torch.empty((), dtype=dtype).element_size()
        planes = _decompressed(check, stored, numel * itemsize)
        return from_planes(planes, dtype, numel).reshape(shape)
    # The header passed check_document: counts, encoding and sizes agree with each other.
    count, changed_count = entry["count"], entry["changed"]
    encoding, sizes = entry["encoding"], entry["sizes"]
    base_rows = entry.get("rows")
    parts = ["kept", "changed", "difference"] + (["added"] if base_rows is not None else [])
    stored = [check.array(f"pruned.{name}.{part}") for part in parts]
    check.sums(checksums, stored, shape)
    kept, changed, difference, *added = (
        _decompressed(check, t, n) for t, n in zip(stored, sizes, strict=True)
    )
    base_shape = shape if base_rows is None else [base_rows, *shape[1:]]
    numel = math.prod(base_shape)
    try:
        if encoding == "mask":
            positions = positions_of(unpack_bits(kept, numel).numpy())
        else:
            # An empty array's stride cannot be reinterpreted: nothing kept, no indices.
            indices = (
                torch.from_numpy(kept).view(index_dtype(numel))
                if count
                else (torch.empty(0, dtype=index_dtype(numel)))
            )
            positions = check.indices(indices, count, numel)
        changed_bits = unpack_bits(changed, count)
    except ValueError as error:
        raise check.fail(str(error)) from None
    if positions.numel() != count:
        raise check.fail(f"mask keeps {positions.numel()} positions, header says {count}")
    if int(torch.count_nonzero(changed_bits)) != changed_count:
        raise check.fail(f"the changed bits do not number the header's {changed_count}")
    bits = from_planes(difference, BITS_DTYPES[dtype], changed_count)
    new_rows = None
    if added:
        new_shape = (shape[0] - base_rows, *shape[1:])
        new_rows = from_planes(added[0], dtype, math.prod(new_shape)).reshape(new_shape)
    return PrunedTensor(
        torch.Size(shape), dtype, positions, None, changed_bits, bits, *entry["delta"],
        base_rows, new_rows,
    )  # fmt: skip


def _decompressed(check: EntryCheck, stored: torch.Tensor, size: int) -> np.ndarray:
    try:
        return decompress(stored.numpy(), size)
    except ValueError as error:
        raise check.fail(f"compressed array: {error}") from None
