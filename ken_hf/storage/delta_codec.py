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

from collections.abc import Sequence

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
_UNSIGNED = {8: np.uint64, 4: np.uint32, 2: np.uint16}
_SIGNED = {8: np.int64, 4: np.int32, 2: np.int16}
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
    the zigzag-coded difference of the two bit patterns where they differ. Worked in place
    on one new array besides the result: about two copies of ``[C]`` at the peak."""
    tuned_bits = bits_of(finetuned.contiguous())
    base_bits = bits_of(base.to(finetuned.device).contiguous())
    changed = tuned_bits != base_bits
    difference = masked_values(tuned_bits, changed)
    difference -= masked_values(base_bits, changed)  # wraps, as it should
    sign = difference >> (difference.element_size() * 8 - 1)
    difference <<= 1
    difference ^= sign  # zigzag
    return changed, difference


def masked_values(flat: torch.Tensor, mask: torch.Tensor, block: int = 2**22) -> torch.Tensor:
    """``flat[mask]`` for 1-D tensors, in blocks: selecting by a bool mask builds an int64
    helper as long as the mask (8 bytes per value), so whole tensors would pay that."""
    mask = mask.to(flat.device)
    pieces = [
        torch.masked_select(flat[start : start + block], mask[start : start + block])
        for start in range(0, flat.numel(), block)
    ]
    return torch.cat(pieces) if pieces else flat[:0].clone()


def add_bit_difference(base: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """The fine-tuned values ``[C]`` from the base's values ``[C]`` and ``bit_difference``'s
    zigzag-coded ``difference`` ``[C]``.

    Decoded with numpy in place (a few passes over one new array, in memory numpy
    allocates: see ``host_empty``) rather than through torch's chain of temporaries."""
    unsigned = difference.detach().cpu().numpy().view(_UNSIGNED[difference.element_size()])
    # Undo the zigzag: value >> 1 (logical on unsigned), xor'ed with all ones when odd.
    signed = unsigned >> 1
    odd = unsigned & 1
    np.negative(odd, out=odd)
    signed ^= odd
    if base.device.type == "cpu":
        signed += bits_of(base.contiguous()).numpy().view(signed.dtype)  # wraps, as it should
        return torch.from_numpy(signed).view(base.dtype)
    shift = torch.from_numpy(signed.view(_SIGNED[signed.dtype.itemsize])).to(base.device)
    return (bits_of(base.contiguous()) + shift).view(base.dtype)


def host_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor ``[numel]`` in memory numpy allocates: numpy asks Linux for
    huge pages for arrays of 4 MiB and more, which a process fills several times faster than
    the 4 KiB pages torch's own large allocations get (measured 0.03 vs 0.10 s for 200 MB)."""
    if not numel:  # numpy gives an empty array a stride that torch cannot reinterpret
        return torch.empty(0, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.empty(numel * itemsize, dtype=np.uint8)).view(dtype)


def host_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous CPU copies of ``tensors`` (same shapes and dtypes), each with a storage of
    its own but all carved out of one allocation of ``host_empty``, so that tensors under
    4 MiB get huge pages too. The allocation is freed with the last of them."""
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // 64) * 64  # 64-byte aligned
    arena = host_empty(total, torch.uint8).numpy()
    copies = []
    for tensor, offset in zip(tensors, offsets, strict=True):
        size = tensor.numel() * tensor.element_size()
        copy = (
            torch.from_numpy(arena[offset : offset + size]).view(tensor.dtype)
            if size
            else torch.empty(0, dtype=tensor.dtype)
        )
        copies.append(copy.view(tensor.shape).copy_(tensor))
    return copies


def to_planes(data: torch.Tensor) -> bytes:
    """The bytes of ``data`` (any dtype, on the CPU) as byte planes: byte 0 of every element,
    then byte 1, ... (uint8 ``[itemsize * numel]``)."""
    array = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return array.reshape(-1, data.element_size()).T.tobytes()


def from_planes(planes: bytes | np.ndarray, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Inverse of ``to_planes``: a 1-D tensor of ``numel`` elements of ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    source = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, numel)
    values = np.empty((numel, itemsize), dtype=np.uint8)
    for byte in range(itemsize):  # a strided copy per plane: twice a transposed copy's speed
        values[:, byte] = source[byte]
    return torch.from_numpy(values.reshape(-1)).view(dtype)


def compress(data: bytes, *, level: int = DEFAULT_LEVEL, threads: int = DEFAULT_THREADS) -> bytes:
    """zstd frame of ``data`` (its size recorded in the frame)."""
    return zstandard.ZstdCompressor(level=level, threads=threads).compress(data)


# A zstd block holds at most 128 KiB and takes at least 4 bytes (3 of header, 1 of content,
# an RLE block): no frame expands more than 32,768-fold.
_BLOCK_MAX = 128 * 2**10
_BLOCK_MIN_BYTES = 4


def _most_held(frame_bytes: int) -> int:
    """The most bytes a zstd frame of ``frame_bytes`` can decompress to."""
    return (frame_bytes // _BLOCK_MIN_BYTES) * _BLOCK_MAX


def decompress(frame: bytes | np.ndarray, size: int) -> np.ndarray:
    """The ``size`` bytes a zstd ``frame`` holds (uint8 ``[size]``); ``ValueError`` if it
    holds anything else. Decompressed into memory numpy allocates (see ``host_empty``):
    about 2.5x faster than into a ``bytes`` object of that size. The frame's header must
    declare ``size`` before anything is allocated: nothing is expanded past what the caller
    expects."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as error:
        raise ValueError(f"not a valid zstd frame ({error})") from None
    if declared != size:
        shown = "no size" if declared < 0 else f"{declared} bytes"
        raise ValueError(f"zstd frame declares {shown}, expected {size}")
    if size > _most_held(len(frame)):
        raise ValueError(f"a zstd frame of {len(frame)} bytes cannot hold the {size} it declares")
    data = np.empty(size, dtype=np.uint8)
    filled, view = 0, memoryview(data)
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            while filled < size:
                count = reader.readinto(view[filled:])
                if not count:
                    break
                filled += count
            extra = reader.read(1)
    except zstandard.ZstdError as error:
        raise ValueError(f"not a valid zstd frame ({error})") from None
    if filled != size or extra:
        held = f"more than {size}" if extra else str(filled)
        raise ValueError(f"zstd frame holds {held} bytes, expected {size}")
    return data


def pack_bits(bits: torch.Tensor) -> bytes:
    """Bool ``[n]`` -> ``ceil(n / 8)`` bytes, bit j of byte i for element 8i + j."""
    return np.packbits(bits.detach().cpu().reshape(-1).numpy(), bitorder="little").tobytes()


def unpack_bits(packed: bytes | np.ndarray, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: bool ``[count]`` (bits past ``count`` must be zero)."""
    array = np.frombuffer(packed, dtype=np.uint8)
    if len(array) != -(-count // 8):
        raise ValueError(f"{len(array)} packed bytes for {count} bits")
    if count % 8 and int(array[-1]) >> (count % 8):
        raise ValueError("bits set past the end")
    return torch.from_numpy(np.unpackbits(array, count=count, bitorder="little").view(bool))
