"""Fingerprints of base tensors: how a subnetwork recognises the base it was made from."""

from __future__ import annotations

import torch
import xxhash


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """128-bit xxh3 hash of a tensor's dtype, shape and bytes (hex string).

    Any change of value, dtype or shape changes it; the device does not.
    """
    data = tensor.detach().contiguous().cpu()
    hasher = xxhash.xxh3_128()
    hasher.update(f"{data.dtype}{tuple(data.shape)}".encode())
    if data.numel():
        hasher.update(data.view(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()
