"""Lossless coding of kept values as a delta against the base, and the compression of the
subnetwork file's arrays.

A kept fine-tuned value is stored as the difference of its bit pattern from the base
value's at the same position, read as same-width integers (wrapping around, so bit-exact
in every dtype: float32, bfloat16, float16, float64), zigzag-coded so that small
differences of either sign have leading zero bits. It is zero where fine-tuning left the
value as it was. The differences are split into byte planes (byte 0 of every value, then
byte 1, ...), which puts the nearly constant high bytes together, and each array is
compressed with zstd (python-zstandard): see the README for the measurements behind the
choices (the XOR of the bit patterns compressed less well).
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

# Same-width integer views of the floating-point dtypes: the difference works on their bits.
BITS_DTYPES = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
DEFAULT_LEVEL = 1  # measured smaller and faster than 3 on fine-tune deltas (README)
DEFAULT_THREADS = 0  # zstd's single-threaded mode: the same bytes on every machine


def bits_of(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of floating-point ``values`` as same-width integers (a view)."""
    return values.view(BITS_DTYPES[values.dtype])


def bit_difference(
    finetuned: torch.Tensor, base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``finetuned`` and ``base`` values ``[K]`` of one dtype: ``changed``, bool ``[K]``
    (the bit pattern differs), and ``difference``, integers ``[C]`` (C = changed count):
    the zigzag-coded difference of the two bit patterns where they differ."""
    tuned_bits = bits_of(finetuned.contiguous())
    base_bits = bits_of(base.to(finetuned.device).contiguous())
    changed = tuned_bits != base_bits
    difference = torch.masked_select(tuned_bits, changed) - torch.masked_select(base_bits, changed)
    width = difference.element_size() * 8
    return changed, (difference << 1) ^ (difference >> (width - 1))  # zigzag (wraps)


def add_bit_difference(base: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """The fine-tuned values ``[C]`` from the base's values ``[C]`` and ``bit_difference``'s
    zigzag-coded ``difference`` ``[C]``."""
    width = difference.element_size() * 8
    # Undo the zigzag: a logical right shift (torch shifts integers arithmetically).
    magnitude = (difference >> 1) & ~(torch.ones((), dtype=difference.dtype) << (width - 1))
    signed = magnitude ^ -(difference & 1)
    return (bits_of(base.contiguous()) + signed.to(base.device)).view(base.dtype)


def to_planes(data: torch.Tensor) -> bytes:
    """The bytes of ``data`` (any dtype, on the CPU) as byte planes: byte 0 of every element,
    then byte 1, ... (uint8 ``[itemsize * numel]``)."""
    array = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return array.reshape(-1, data.element_size()).T.tobytes()


def from_planes(planes: bytes, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Inverse of ``to_planes``: a 1-D tensor of ``numel`` elements of ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    array = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, numel).T.copy()
    return torch.from_numpy(array.reshape(-1)).view(dtype)


def compress(data: bytes, *, level: int = DEFAULT_LEVEL, threads: int = DEFAULT_THREADS) -> bytes:
    """zstd frame of ``data`` (its size recorded in the frame)."""
    return zstandard.ZstdCompressor(level=level, threads=threads).compress(data)


def decompress(frame: bytes, size: int) -> bytes:
    """The ``size`` bytes a zstd ``frame`` holds; ``ValueError`` if it holds anything else."""
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as error:
        raise ValueError(f"not a valid zstd frame ({error})") from None
    if len(data) != size:
        raise ValueError(f"zstd frame holds {len(data)} bytes, expected {size}")
    return data


def pack_bits(bits: torch.Tensor) -> bytes:
    """Bool ``[n]`` -> ``ceil(n / 8)`` bytes, bit j of byte i for element 8i + j."""
    return np.packbits(bits.detach().cpu().reshape(-1).numpy(), bitorder="little").tobytes()


def unpack_bits(packed: bytes, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: bool ``[count]`` (bits past ``count`` must be zero)."""
    array = np.frombuffer(packed, dtype=np.uint8)
    if len(array) != -(-count // 8):
        raise ValueError(f"{len(array)} packed bytes for {count} bits")
    if count % 8 and int(array[-1]) >> (count % 8):
        raise ValueError("bits set past the end")
    return torch.from_numpy(np.unpackbits(array, count=count, bitorder="little").view(bool))
