"""Reading version 1 subnetwork files (written by ken-hf 0.1): kept values stored as they are.

Per pruned tensor: ``pruned.<name>.values`` (the kept fine-tuned values, in the model's
dtype) and ``pruned.<name>.mask`` (uint8 bitmask, bits little-endian) or
``pruned.<name>.indices`` (increasing flat positions, narrowest unsigned type);
``whole.<name>`` for a tensor stored whole. Version 1 is read, never written.
"""

from __future__ import annotations

import numpy as np
import torch

from .format import EntryCheck, PrunedTensor, positions_of


def read_entry(check: EntryCheck, entry) -> PrunedTensor | torch.Tensor:
    """Tensor ``check.name`` of a version 1 file, whose header passed ``check_document``
    (arrays of the types and lengths the entry implies); their contents are checked here."""
    shape, dtype, numel = check.basics(entry)
    name, checksums = check.name, entry["checksums"]
    if entry["kind"] == "whole":
        tensor = check.array(f"whole.{name}")
        check.sums(checksums, [tensor], shape)
        return tensor
    count, encoding = entry["count"], entry["encoding"]
    kept = check.array(f"pruned.{name}.values")
    if encoding == "mask":
        packed = check.array(f"pruned.{name}.mask")
        check.sums(checksums, [kept, packed], shape)
        if numel % 8 and int(packed[-1]) >> (numel % 8):
            raise check.fail("packed mask has bits set past the tensor's end")
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(bool)
        positions = positions_of(bits)
    elif encoding == "indices":
        indices = check.array(f"pruned.{name}.indices")
        check.sums(checksums, [kept, indices], shape)
        positions = check.indices(indices, count, numel)
    if positions.numel() != count:
        raise check.fail(f"mask keeps {positions.numel()} positions, header says {count}")
    return PrunedTensor(torch.Size(shape), dtype, positions, kept, None, None, *entry["delta"])
