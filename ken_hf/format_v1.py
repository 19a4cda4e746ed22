"""Reading version 1 subnetwork files (written by ken-hf 0.1): kept values stored as they are.

Per pruned tensor: ``pruned.<name>.values`` (the kept fine-tuned values, in the model's
dtype) and ``pruned.<name>.mask`` (uint8 bitmask, bits little-endian) or
``pruned.<name>.indices`` (increasing flat positions, narrowest unsigned type);
``whole.<name>`` for a tensor stored whole. Version 1 is read, never written.
"""

from __future__ import annotations

import numpy as np
import torch

from .subnetwork_format import EntryCheck, PrunedTensor, positions_of


def described_keys(name: str, entry: dict) -> set[str]:
    """The array names a version 1 entry calls for."""
    if entry.get("kind") == "whole":
        return {f"whole.{name}"}
    return {f"pruned.{name}.values", f"pruned.{name}.{entry.get('encoding')}"}


def read_entry(check: EntryCheck, entry) -> PrunedTensor | torch.Tensor:
    """Tensor ``check.name`` of a version 1 file, every array checked."""
    shape, dtype, numel = check.basics(entry)
    name, checksums = check.name, entry.get("checksums")
    if entry["kind"] == "whole":
        tensor = check.array(f"whole.{name}")
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise check.fail(
                f"stored {tensor.dtype} {list(tensor.shape)}, header says {dtype} {shape}"
            )
        check.sums(checksums, [tensor], shape)
        return tensor
    count, encoding = check.count(entry, "count", numel), entry.get("encoding")
    kept = check.array(f"pruned.{name}.values")
    if kept.dtype != dtype or kept.shape != (count,):
        raise check.fail(
            f"values are {kept.dtype} {tuple(kept.shape)}, expected {dtype} ({count},)"
        )
    if encoding == "mask":
        packed = check.array(f"pruned.{name}.mask")
        if packed.dtype != torch.uint8 or packed.shape != (-(-numel // 8),):
            raise check.fail("packed mask has the wrong type or length")
        check.sums(checksums, [kept, packed], shape)
        if numel % 8 and int(packed[-1]) >> (numel % 8):
            raise check.fail("packed mask has bits set past the tensor's end")
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(bool)
        positions = positions_of(bits)
    elif encoding == "indices":
        indices = check.array(f"pruned.{name}.indices")
        check.sums(checksums, [kept, indices], shape)
        positions = check.indices(indices, count, numel)
    else:
        raise check.fail(f"unknown encoding {encoding!r}")
    if positions.numel() != count:
        raise check.fail(f"mask keeps {positions.numel()} positions, header says {count}")
    delta = check.statistics(entry.get("delta", [None, None]))
    return PrunedTensor(torch.Size(shape), dtype, positions, kept, None, None, *delta)
