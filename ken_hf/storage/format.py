"""What a subnetwork file holds, in memory, and the pieces both file versions share: the
pruned tensor record, the header checks and the position encodings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from ..errors import KENError
from .delta_codec import add_bit_difference, bit_difference
from .safetensors_io import FLOAT_DTYPES

FORMAT = "ken-hf-subnetwork"
SUBNETWORK_NAME = "ken_subnetwork.safetensors"
_INDEX_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as file headers and configs name it: ``"float32"``, ``"bfloat16"``, ..."""
    return str(dtype).removeprefix("torch.")


VALUE_DTYPES = {dtype_name(dtype): dtype for dtype in FLOAT_DTYPES}


class KENFormatError(KENError):
    """A subnetwork file that is truncated, corrupted, foreign or inconsistent.

    Every header, checksum and array of ``ken_subnetwork.safetensors`` is checked before
    anything reaches a model; the message names the file and the tensor at fault. Also
    raised when ``ken_subnetwork.safetensors`` is not the file its ``ken_config.json`` was
    saved with.

    Example:
        ```python
        from ken_hf import KENFormatError, KENSubnetwork

        try:
            subnetwork = KENSubnetwork.from_pretrained("ken/")
        except KENFormatError as error:
            print(error)
        ```
    """


@dataclass
class PrunedTensor:
    """A pruned tensor: where KEN kept values, and those values, either as they are or as a
    delta against the base values at the same positions.

    Attributes:
        shape: the tensor's shape.
        dtype: its (floating-point) dtype.
        positions: int64 ``[K]`` flat (row-major) positions kept, increasing.
        values: ``[K]`` fine-tuned values at those positions (None when known only as a
            delta, as read from a version 2 file: see ``written_values``).
        changed: bool ``[K]``: kept values whose bits differ from the base's (None when
            only ``values`` are known, as read from a version 1 file).
        difference: integers ``[C]`` (C = changed count, same width as the dtype): the
            zigzag-coded difference of the fine-tuned from the base bit patterns of the
            changed kept values (``ken_hf.storage.delta_codec.bit_difference``).
        delta_kept, delta_reset: mean |fine-tuned - pre-trained| over the kept and over the
            reset positions, measured when the subnetwork was made (None if unknown).
        base_rows: for a tensor that grew along its first dimension (a vocabulary that
            gained tokens), the rows of the base; ``positions`` lie in those rows.
        added: ``[shape[0] - base_rows, ...]`` the fine-tuned values of the rows beyond
            them, stored whole (None when the tensor did not grow).
    """

    shape: torch.Size
    dtype: torch.dtype
    positions: torch.Tensor
    values: torch.Tensor | None = None
    changed: torch.Tensor | None = None
    difference: torch.Tensor | None = None
    delta_kept: float | None = None
    delta_reset: float | None = None
    base_rows: int | None = None
    added: torch.Tensor | None = None
    _written: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def written_positions(self) -> torch.Tensor:
        """int64 ``[W]``: the positions a rebuild writes into the base: the kept values that
        differ from the base's (the others equal it already), or every kept position when
        only the values are known (read from a version 1 file)."""
        if self.changed is None:
            return self.positions
        if self._written is None:
            # numpy: flatnonzero then take is 1.3-3x its bool indexing, several times torch's
            written = np.flatnonzero(self.changed.cpu().numpy())
            if self.positions.numel() < self.base_numel():  # else positions = range
                written = np.take(self.positions.cpu().numpy(), written)
            self._written = torch.from_numpy(written)
        return self._written

    def written_values(self, base_values: torch.Tensor) -> torch.Tensor:
        """``[W]`` fine-tuned values for ``written_positions``, given the base's values
        there (the caller has checked the base against its fingerprint)."""
        if self.changed is None:
            return self.values.to(base_values.device, base_values.dtype)
        return add_bit_difference(base_values, self.difference)

    def with_delta(self, base_values: torch.Tensor) -> PrunedTensor:
        """This tensor with its delta against the base's values ``[K]`` at ``positions``
        (for one read from a version 1 file, which holds the values only)."""
        if self.changed is not None:
            return self
        changed, difference = bit_difference(self.values, base_values.cpu())
        return dataclasses.replace(self, changed=changed, difference=difference)

    def base_shape(self) -> torch.Size:
        """The shape of the base tensor: ``shape`` with ``base_rows`` rows when it grew."""
        if self.base_rows is None:
            return self.shape
        return torch.Size((self.base_rows, *self.shape[1:]))

    def base_numel(self) -> int:
        return self.base_shape().numel()

    def only_new_rows(self) -> bool:
        """Whether this is a tensor reset to the base (not targeted) that grew: it is stored
        for its new rows alone, nothing of the base's rows is kept."""
        return self.base_rows is not None and self.positions.numel() == 0

    def mask(self) -> torch.Tensor:
        """Bool tensor of ``shape``: True at the kept positions."""
        flat = torch.zeros(self.shape.numel(), dtype=torch.bool)
        flat[self.positions] = True
        return flat.reshape(self.shape)


@dataclass
class StoredSubnetwork:
    """What the file holds: pruned tensors, whole tensors, base fingerprints ``{name: hex}``."""

    pruned: Mapping[str, PrunedTensor]
    whole: Mapping[str, torch.Tensor]
    fingerprints: dict[str, str]


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest integer type that indexes ``numel`` positions."""
    for dtype in _INDEX_DTYPES:
        if numel - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"tensor of {numel} elements is too large to index")


def smaller_encoding(numel: int, count: int) -> str:
    """``"indices"`` when an index list of ``count`` takes fewer bytes than a bitmask."""
    index_size = torch.tensor([], dtype=index_dtype(numel)).element_size()
    return "indices" if count * index_size < -(-numel // 8) else "mask"


def checksum(tensor: torch.Tensor, shape: list[int]) -> str:
    """xxh3 of a stored array's bytes and of the logical ``shape`` of the tensor it encodes
    (an index list or a compressed array does not carry that shape itself)."""
    hasher = xxhash.xxh3_64(repr(list(shape)).encode())
    data = tensor.contiguous().reshape(-1)
    if data.numel():
        hasher.update(data.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def positions_of(bits: np.ndarray) -> torch.Tensor:
    """int64 positions of the set entries of a bool array (all set: keep ratio 1, a range
    written without a search)."""
    return torch.from_numpy(np.arange(bits.size) if bits.all() else np.flatnonzero(bits))


class EntryCheck:
    """Checks of one header entry, raising ``KENFormatError`` that names the file and the
    tensor. ``get(key)`` returns a stored array or None."""

    def __init__(self, path, name: str, get) -> None:
        self.path, self.name, self._get = path, name, get

    def fail(self, problem: str) -> KENFormatError:
        return KENFormatError(f"{self.path}: tensor {self.name!r}: {problem}")

    def array(self, key: str) -> torch.Tensor:
        tensor = self._get(key)
        if tensor is None:
            raise self.fail(f"array {key!r} is missing")
        return tensor

    def basics(self, entry: dict) -> tuple[list[int], torch.dtype, int]:
        """The ``(shape, dtype, numel)`` of an entry that passed ``check_document``."""
        shape = entry["shape"]
        return shape, VALUE_DTYPES[entry["dtype"]], math.prod(shape)

    def indices(self, positions: torch.Tensor, count: int, numel: int) -> torch.Tensor:
        """An index list's int64 positions, checked: ``count`` of them, increasing, inside
        the tensor."""
        if positions.dtype != index_dtype(numel) or positions.shape != (count,):
            raise self.fail("index list has the wrong type or length")
        positions = positions.long()
        if count and (positions[0] < 0 or positions[-1] >= numel):
            raise self.fail("index out of range")
        if count > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise self.fail("indices are not strictly increasing")
        return positions

    def sums(self, checksums, tensors: list[torch.Tensor], shape: list[int]) -> None:
        if not isinstance(checksums, list) or len(checksums) != len(tensors):
            raise self.fail("checksums missing")
        for expected, tensor in zip(checksums, tensors, strict=True):
            if checksum(tensor, shape) != expected:
                raise self.fail("checksum mismatch (corrupted data)")
