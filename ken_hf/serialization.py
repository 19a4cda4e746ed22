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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "ken-hf-subnetwork"
FORMAT_VERSION = "1"
SUBNETWORK_NAME = "ken_subnetwork.safetensors"

_INDEX_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.int64)
_VALUE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


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


def write_subnetwork(stored: StoredSubnetwork, path: str | os.PathLike) -> None:
    """Write ``stored`` to ``path`` (a safetensors file)."""
    arrays: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, pruned in stored.pruned.items():
        values = pruned.values.detach().cpu().contiguous()
        shape = list(pruned.shape)
        numel = pruned.shape.numel()
        index_dtype = _index_dtype(numel)
        index_bytes = values.numel() * torch.tensor([], dtype=index_dtype).element_size()
        if index_bytes < -(-numel // 8):
            encoding, positions = "indices", pruned.positions.to(index_dtype)
        else:
            encoding, positions = "mask", pack_positions(pruned.positions, numel)
        arrays[f"pruned.{name}.values"] = values
        arrays[f"pruned.{name}.{encoding}"] = positions
        entries[name] = {
            "kind": "pruned",
            "shape": shape,
            "dtype": str(values.dtype).removeprefix("torch."),
            "count": values.numel(),
            "encoding": encoding,
            "delta": [pruned.delta_kept, pruned.delta_reset],
            "checksums": [_checksum(values, shape), _checksum(positions, shape)],
        }
    for name, tensor in stored.whole.items():
        tensor = tensor.detach().cpu().contiguous()
        arrays[f"whole.{name}"] = tensor
        entries[name] = {
            "kind": "whole",
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "checksums": [_checksum(tensor, list(tensor.shape))],
        }
    # Model order, not sorted: errors name the first tensor as the model lists them.
    document = json.dumps({"tensors": entries, "fingerprints": stored.fingerprints})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ken": document,
        "digest": xxhash.xxh3_64_hexdigest(document.encode()),
    }
    save_file(arrays, str(path), metadata=metadata)


def read_subnetwork(path: str | os.PathLike) -> StoredSubnetwork:
    """Read and fully validate a subnetwork file; raise ``KENFormatError`` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise KENFormatError(f"{path}: no such subnetwork file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            document = _read_document(path, metadata)
            names = set(handle.keys())
            arrays = {key: handle.get_tensor(key) for key in names}
    except KENFormatError:
        raise
    except Exception as error:  # safetensors raises its own error types on malformed files
        raise KENFormatError(f"{path}: not a readable safetensors file ({error})") from None
    return _validate(path, document, arrays)


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


def _validate(path: Path, document: dict, arrays: dict[str, torch.Tensor]) -> StoredSubnetwork:
    pruned: dict[str, PrunedTensor] = {}
    whole: dict[str, torch.Tensor] = {}
    expected_keys: set[str] = set()

    def fail(name: str, problem: str) -> KENFormatError:
        return KENFormatError(f"{path}: tensor {name!r}: {problem}")

    for name, entry in document["tensors"].items():
        if not isinstance(entry, dict):
            raise fail(name, "malformed entry")
        shape, dtype_name = entry.get("shape"), entry.get("dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise fail(name, f"bad shape {shape!r}")
        if dtype_name not in _VALUE_DTYPES:
            raise fail(name, f"unsupported dtype {dtype_name!r}")
        dtype = _VALUE_DTYPES[dtype_name]
        numel = int(torch.Size(shape).numel())
        checksums = entry.get("checksums")
        if entry.get("kind") == "whole":
            key = f"whole.{name}"
            tensor = _array(arrays, key, fail, name)
            if tensor.dtype != dtype or list(tensor.shape) != shape:
                raise fail(
                    name, f"stored {tensor.dtype} {list(tensor.shape)}, header says {dtype} {shape}"
                )
            _check_sums(fail, name, checksums, [tensor], shape)
            whole[name] = tensor
            expected_keys.add(key)
        elif entry.get("kind") == "pruned":
            count, encoding = entry.get("count"), entry.get("encoding")
            if not isinstance(count, int) or not 0 <= count <= numel:
                raise fail(name, f"bad kept count {count!r}")
            kept = _array(arrays, f"pruned.{name}.values", fail, name)
            if kept.dtype != dtype or kept.shape != (count,):
                raise fail(
                    name,
                    f"values are {kept.dtype} {tuple(kept.shape)}, expected {dtype} ({count},)",
                )
            if encoding == "mask":
                packed = _array(arrays, f"pruned.{name}.mask", fail, name)
                if packed.dtype != torch.uint8 or packed.shape != (-(-numel // 8),):
                    raise fail(name, "packed mask has the wrong type or length")
                _check_sums(fail, name, checksums, [kept, packed], shape)
                if numel % 8 and int(packed[-1]) >> (numel % 8):
                    raise fail(name, "packed mask has bits set past the tensor's end")
                positions = unpack_positions(packed, numel)
            elif encoding == "indices":
                positions = _array(arrays, f"pruned.{name}.indices", fail, name)
                if positions.dtype != _index_dtype(numel) or positions.shape != (count,):
                    raise fail(name, "index list has the wrong type or length")
                _check_sums(fail, name, checksums, [kept, positions], shape)
                positions = positions.long()
                if count and (positions[0] < 0 or positions[-1] >= numel):
                    raise fail(name, "index out of range")
                if count > 1 and not bool((positions[1:] > positions[:-1]).all()):
                    raise fail(name, "indices are not strictly increasing")
            else:
                raise fail(name, f"unknown encoding {encoding!r}")
            if positions.numel() != count:
                raise fail(name, f"mask keeps {positions.numel()} positions, header says {count}")
            delta = entry.get("delta", [None, None])
            if not (
                isinstance(delta, list)
                and len(delta) == 2
                and all(d is None or isinstance(d, int | float) for d in delta)
            ):
                raise fail(name, f"bad delta statistics {delta!r}")
            pruned[name] = PrunedTensor(torch.Size(shape), positions, kept, *delta)
            expected_keys.update({f"pruned.{name}.values", f"pruned.{name}.{encoding}"})
        else:
            raise fail(name, f"unknown kind {entry.get('kind')!r}")
    extra = sorted(set(arrays) - expected_keys)
    if extra:
        raise KENFormatError(f"{path}: arrays not described by the header: {extra[:5]}")
    fingerprints = document["fingerprints"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()):
        raise KENFormatError(f"{path}: malformed base fingerprints")
    return StoredSubnetwork(pruned, whole, dict(fingerprints))


def _array(arrays, key, fail, name) -> torch.Tensor:
    if key not in arrays:
        raise fail(name, f"array {key!r} is missing")
    return arrays[key]


def _check_sums(fail, name, checksums, tensors, shape) -> None:
    if not isinstance(checksums, list) or len(checksums) != len(tensors):
        raise fail(name, "checksums missing")
    for expected, tensor in zip(checksums, tensors, strict=True):
        if _checksum(tensor, shape) != expected:
            raise fail(name, "checksum mismatch (corrupted data)")
