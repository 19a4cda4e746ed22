"""The subnetwork file: ``ken_subnetwork.safetensors``, pickle-free and validated on read.

Layout (safetensors, one file):

- ``pruned.<name>.values``: the kept fine-tuned values of a pruned tensor, in flat row-major
  order of their positions, in the model's dtype;
- ``pruned.<name>.mask`` (uint8, bits little-endian within each byte) **or**
  ``pruned.<name>.indices`` (flat positions, increasing, in the narrowest unsigned type):
  whichever is smaller for that tensor;
- ``whole.<name>``: a tensor stored whole.

The metadata holds ``format`` / ``format_version`` and ``ken``: a JSON document with, per
tensor, its kind, shape, dtype, kept count, encoding and an xxh3 checksum of every stored
array, plus the fingerprints of the base tensors; ``digest`` is the xxh3 of that JSON text.
Reading checks all of it before anything is returned, so a truncated, corrupted or foreign
file raises ``KENFormatError`` and never reaches a model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from .safetensors_io import (
    FLOAT_DTYPES,
    SafetensorsError,
    SafetensorsFile,
    SafetensorsWriter,
)

if TYPE_CHECKING:
    from .pipeline import TensorRecord

FORMAT = "ken-hf-subnetwork"
FORMAT_VERSION = "1"
SUBNETWORK_NAME = "ken_subnetwork.safetensors"

_INDEX_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.int64)
_VALUE_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}


class KENFormatError(ValueError):
    """A subnetwork file that is truncated, corrupted, foreign or inconsistent."""


@dataclass
class PrunedTensor:
    """A pruned tensor's kept values and where they go.

    Attributes:
        shape: the tensor's shape.
        positions: int64 ``[count]`` flat (row-major) positions kept, increasing.
        values: ``[count]`` fine-tuned values at those positions, in the model's dtype.
        delta_kept, delta_reset: mean |fine-tuned - pre-trained| over the kept and over the
            reset positions, measured when the subnetwork was made (None if unknown).
    """

    shape: torch.Size
    positions: torch.Tensor
    values: torch.Tensor
    delta_kept: float | None = None
    delta_reset: float | None = None

    @classmethod
    def from_mask(cls, mask: torch.Tensor, finetuned: torch.Tensor) -> PrunedTensor:
        """From a bool ``mask`` of kept positions and the fine-tuned tensor (same shape)."""
        positions = torch.from_numpy(np.flatnonzero(mask.detach().cpu().numpy()))
        values = finetuned.detach().reshape(-1).index_select(0, positions.to(finetuned.device))
        return cls(mask.shape, positions, values.cpu())

    def mask(self) -> torch.Tensor:
        """Bool tensor of ``shape``: True at the kept positions."""
        flat = torch.zeros(self.shape.numel(), dtype=torch.bool)
        flat[self.positions] = True
        return flat.reshape(self.shape)


@dataclass
class StoredSubnetwork:
    """What the file holds: pruned tensors, whole tensors, base fingerprints ``{name: hex}``."""

    pruned: dict[str, PrunedTensor]
    whole: dict[str, torch.Tensor]
    fingerprints: dict[str, str]


def pack_positions(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat positions -> uint8 bitmask ``[ceil(numel / 8)]``: bit j of byte i is element 8i+j."""
    bits = np.zeros(numel, dtype=bool)
    bits[positions.numpy()] = True
    return _pack_bits(bits)


def _pack_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_positions(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_positions`` (bits past ``numel`` ignored): int64 positions."""
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
    return torch.from_numpy(np.flatnonzero(bits.view(bool)))  # bool: numpy scans it faster


def _index_dtype(numel: int) -> torch.dtype:
    for dtype in _INDEX_DTYPES:
        if numel - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"tensor of {numel} elements is too large to index")


def _checksum(tensor: torch.Tensor, shape: list[int]) -> str:
    """xxh3 of a stored array's bytes and of the logical ``shape`` of the tensor it encodes
    (an index list does not carry that shape itself)."""
    hasher = xxhash.xxh3_64(repr(list(shape)).encode())
    data = tensor.contiguous().reshape(-1)
    if data.numel():
        hasher.update(data.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def _smaller_encoding(numel: int, count: int) -> str:
    """``"indices"`` when an index list of ``count`` takes fewer bytes than a bitmask."""
    index_size = torch.tensor([], dtype=_index_dtype(numel)).element_size()
    return "indices" if count * index_size < -(-numel // 8) else "mask"


def _masked_values(flat: torch.Tensor, mask: torch.Tensor, block: int = 2**22) -> torch.Tensor:
    """``flat[mask]`` for 1-D tensors, in blocks: selecting by a bool mask builds an int64
    helper as long as the mask (8 bytes per value), so whole tensors would pay that."""
    mask = mask.to(flat.device)
    pieces = [
        torch.masked_select(flat[start : start + block], mask[start : start + block])
        for start in range(0, flat.numel(), block)
    ]
    return torch.cat(pieces) if pieces else flat[:0].clone()


class SubnetworkWriter:
    """Writes a subnetwork file one tensor at a time (``write_subnetwork`` writes one held in
    memory). Use as a context manager; set ``fingerprints`` before the block ends."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._file = SafetensorsWriter(path)
        self._entries: dict[str, dict] = {}
        self.fingerprints: dict[str, str] = {}
        self.digest: str | None = None  # of the header's document, set on closing

    def add_record(self, record: TensorRecord) -> None:
        """Store what the pipeline's step found for one tensor; returns nothing."""
        name = record.plan.name
        if record.fingerprint is not None:
            self.fingerprints[name] = record.fingerprint
        if record.mask is not None:
            self.add_pruned_mask(name, record.mask, record.finetuned, record.delta)
        elif record.fingerprint is None:
            self.add_whole(name, record.finetuned)

    def add_pruned(self, name: str, pruned: PrunedTensor) -> None:
        numel = pruned.shape.numel()
        if _smaller_encoding(numel, pruned.positions.numel()) == "indices":
            encoding, positions = "indices", pruned.positions.to(_index_dtype(numel))
        else:
            encoding, positions = "mask", pack_positions(pruned.positions, numel)
        delta = [pruned.delta_kept, pruned.delta_reset]
        self._add_pruned(name, list(pruned.shape), pruned.values, encoding, positions, delta)

    def add_pruned_mask(
        self, name: str, mask: torch.Tensor, finetuned: torch.Tensor, delta: list
    ) -> int:
        """A pruned tensor from its bool ``mask`` and ``finetuned`` values (same shape),
        without the int64 position list (8 bytes per kept value) that ``PrunedTensor`` holds.
        ``delta``: ``[delta_kept, delta_reset]``. Returns the kept count."""
        bits = mask.detach().cpu().reshape(-1).numpy()
        values = _masked_values(finetuned.detach().reshape(-1), mask.reshape(-1))
        if _smaller_encoding(bits.size, values.numel()) == "indices":
            encoding = "indices"
            positions = torch.from_numpy(np.flatnonzero(bits)).to(_index_dtype(bits.size))
        else:
            encoding, positions = "mask", _pack_bits(bits)
        self._add_pruned(name, list(mask.shape), values, encoding, positions, delta)
        return values.numel()

    def _add_pruned(self, name, shape, values, encoding, positions, delta) -> None:
        values = values.detach().cpu().contiguous()
        self._file.add(f"pruned.{name}.values", values)
        self._file.add(f"pruned.{name}.{encoding}", positions)
        self._entries[name] = {
            "kind": "pruned",
            "shape": shape,
            "dtype": str(values.dtype).removeprefix("torch."),
            "count": values.numel(),
            "encoding": encoding,
            "delta": delta,
            "checksums": [_checksum(values, shape), _checksum(positions, shape)],
        }

    def add_whole(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        self._file.add(f"whole.{name}", tensor)
        self._entries[name] = {
            "kind": "whole",
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "checksums": [_checksum(tensor, list(tensor.shape))],
        }

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
            "format_version": FORMAT_VERSION,
            "ken": document,
            "digest": self.digest,
        }
        self._file.close()


def write_subnetwork(stored: StoredSubnetwork, path: str | os.PathLike) -> str:
    """Write ``stored`` to ``path`` (a safetensors file), tensors in name order; returns the
    header's digest."""
    with SubnetworkWriter(path) as writer:
        for name in sorted([*stored.pruned, *stored.whole]):
            if name in stored.pruned:
                writer.add_pruned(name, stored.pruned[name])
            else:
                writer.add_whole(name, stored.whole[name])
        writer.fingerprints = stored.fingerprints
    return writer.digest


class SubnetworkReader:
    """Reads a subnetwork file one tensor at a time, each validated as it is read
    (``read_subnetwork`` reads them all). The header is checked on opening: format,
    version, digest, and that every stored array is one the header describes.

    Use as a context manager; ``names`` lists the tensors in the model's order.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise KENFormatError(f"{self.path}: no such subnetwork file")
        try:
            self._file = SafetensorsFile(self.path)
        except SafetensorsError as error:
            raise KENFormatError(str(error)) from None
        self._document = _read_document(self.path, self._file.metadata)
        self.digest: str = self._file.metadata["digest"]
        self._keys = set(self._file.names)
        extra = sorted(self._keys - _described_keys(self._document["tensors"]))
        if extra:
            raise KENFormatError(f"{self.path}: arrays not described by the header: {extra[:5]}")
        fingerprints = self._document["fingerprints"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()):
            raise KENFormatError(f"{self.path}: malformed base fingerprints")
        self.fingerprints: dict[str, str] = dict(fingerprints)
        self.names: list[str] = list(self._document["tensors"])

    def entry(self, name: str) -> dict:
        """The header's record of tensor ``name`` (kind, shape, dtype, count, encoding)."""
        return self._document["tensors"][name]

    def summary(self) -> dict[str, int]:
        """Counts from the header alone (no tensor is read): tensors and values pruned,
        kept and stored whole."""
        entries = [self.entry(name) for name in self.names]
        pruned = [e for e in entries if e.get("kind") == "pruned"]
        whole = [e for e in entries if e.get("kind") == "whole"]
        return {
            "pruned_tensors": len(pruned),
            "pruned_values": sum(math.prod(e["shape"]) for e in pruned),
            "kept_values": sum(e["count"] for e in pruned),
            "whole_tensors": len(whole),
            "whole_values": sum(math.prod(e["shape"]) for e in whole),
        }

    def read(self, name: str) -> PrunedTensor | torch.Tensor:
        """Tensor ``name``: a ``PrunedTensor``, or the tensor itself when stored whole."""
        return _validate_entry(self.path, name, self.entry(name), self._get)

    def _get(self, key: str) -> torch.Tensor | None:
        if key not in self._keys:
            return None
        try:
            return self._file.read(key)
        except SafetensorsError as error:
            raise KENFormatError(f"{self.path}: array {key!r} is unreadable ({error})") from None

    def __enter__(self) -> SubnetworkReader:
        return self

    def close(self) -> None:
        self._file.close()

    def __exit__(self, *exception) -> None:
        self.close()


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


def _described_keys(entries: dict) -> set[str]:
    """The array names the header's entries call for (malformed entries fail on reading)."""
    keys = set()
    for name, entry in entries.items():
        if isinstance(entry, dict) and entry.get("kind") == "whole":
            keys.add(f"whole.{name}")
        elif isinstance(entry, dict):
            keys.update({f"pruned.{name}.values", f"pruned.{name}.{entry.get('encoding')}"})
    return keys


def _read_document(path: Path, metadata: dict[str, str]) -> dict:
    if metadata.get("format") != FORMAT:
        raise KENFormatError(f"{path}: not a ken-hf subnetwork (format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise KENFormatError(
            f"{path}: format version {metadata.get('format_version')!r} is not supported "
            f"(this ken-hf reads {FORMAT_VERSION})"
        )
    text = metadata.get("ken", "")
    if xxhash.xxh3_64_hexdigest(text.encode()) != metadata.get("digest"):
        raise KENFormatError(f"{path}: metadata digest mismatch (corrupted header)")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise KENFormatError(f"{path}: metadata is not valid JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("tensors"), dict):
        raise KENFormatError(f"{path}: metadata lacks the tensor table")
    if not isinstance(document.get("fingerprints"), dict):
        raise KENFormatError(f"{path}: metadata lacks the base fingerprints")
    return document


def _validate_entry(path: Path, name: str, entry, get) -> PrunedTensor | torch.Tensor:
    """Check one header entry against its arrays (``get(key)`` -> tensor or None)."""

    def fail(problem: str) -> KENFormatError:
        return KENFormatError(f"{path}: tensor {name!r}: {problem}")

    def array(key: str) -> torch.Tensor:
        tensor = get(key)
        if tensor is None:
            raise fail(f"array {key!r} is missing")
        return tensor

    if not isinstance(entry, dict):
        raise fail("malformed entry")
    shape, dtype_name = entry.get("shape"), entry.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise fail(f"bad shape {shape!r}")
    if dtype_name not in _VALUE_DTYPES:
        raise fail(f"unsupported dtype {dtype_name!r}")
    dtype = _VALUE_DTYPES[dtype_name]
    numel = int(torch.Size(shape).numel())
    checksums = entry.get("checksums")
    if entry.get("kind") == "whole":
        tensor = array(f"whole.{name}")
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise fail(f"stored {tensor.dtype} {list(tensor.shape)}, header says {dtype} {shape}")
        _check_sums(fail, checksums, [tensor], shape)
        return tensor
    if entry.get("kind") != "pruned":
        raise fail(f"unknown kind {entry.get('kind')!r}")
    count, encoding = entry.get("count"), entry.get("encoding")
    if not isinstance(count, int) or not 0 <= count <= numel:
        raise fail(f"bad kept count {count!r}")
    kept = array(f"pruned.{name}.values")
    if kept.dtype != dtype or kept.shape != (count,):
        raise fail(f"values are {kept.dtype} {tuple(kept.shape)}, expected {dtype} ({count},)")
    if encoding == "mask":
        packed = array(f"pruned.{name}.mask")
        if packed.dtype != torch.uint8 or packed.shape != (-(-numel // 8),):
            raise fail("packed mask has the wrong type or length")
        _check_sums(fail, checksums, [kept, packed], shape)
        if numel % 8 and int(packed[-1]) >> (numel % 8):
            raise fail("packed mask has bits set past the tensor's end")
        positions = unpack_positions(packed, numel)
    elif encoding == "indices":
        positions = array(f"pruned.{name}.indices")
        if positions.dtype != _index_dtype(numel) or positions.shape != (count,):
            raise fail("index list has the wrong type or length")
        _check_sums(fail, checksums, [kept, positions], shape)
        positions = positions.long()
        if count and (positions[0] < 0 or positions[-1] >= numel):
            raise fail("index out of range")
        if count > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise fail("indices are not strictly increasing")
    else:
        raise fail(f"unknown encoding {encoding!r}")
    if positions.numel() != count:
        raise fail(f"mask keeps {positions.numel()} positions, header says {count}")
    delta = entry.get("delta", [None, None])
    if not (
        isinstance(delta, list)
        and len(delta) == 2
        and all(d is None or isinstance(d, int | float) for d in delta)
    ):
        raise fail(f"bad delta statistics {delta!r}")
    return PrunedTensor(torch.Size(shape), positions, kept, *delta)


def _check_sums(fail, checksums, tensors, shape) -> None:
    if not isinstance(checksums, list) or len(checksums) != len(tensors):
        raise fail("checksums missing")
    for expected, tensor in zip(checksums, tensors, strict=True):
        if _checksum(tensor, shape) != expected:
            raise fail("checksum mismatch (corrupted data)")
