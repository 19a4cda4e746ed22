"""How KEN sees a tensor: as rows, validated, and processed a memory-bounded chunk at a time."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..errors import KENConfigError, KENError

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)

# Extra bytes held per row element while a chunk is selected: the sorted copy, group
# arrays and bookkeeping of ``greedy_match`` (measured by benchmarks/bench_select.py).
BYTES_PER_ELEMENT = 96
DEFAULT_MAX_MEMORY = 256 * 2**20


def check_k(k: object, name: str = "k") -> int:
    """Return ``k`` as an int, or raise ``KENError`` unless it is a positive integer."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise KENConfigError(f"{name} must be a positive integer, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise KENConfigError(f"{name} must be a positive integer, got {k}")
    return int(k)


def check_finite(weight: torch.Tensor, name: str, *, block: int = 2**22) -> None:
    """Raise ``KENError`` naming ``name`` unless ``weight`` is floating point and finite.

    Checked ``block`` values at a time: a whole-tensor check builds a bool tensor as long as
    ``weight`` (and for bfloat16 a float32 copy), five times a bf16 tensor's own bytes."""
    if not weight.is_floating_point():
        raise KENError(
            f"tensor {name!r} has dtype {weight.dtype}; KEN selects on floating-point tensors"
        )
    flat = weight.detach().reshape(-1)
    # numpy, one thread: as fast as torch here, and free of thread hand-offs (which cost
    # whole scheduler slices on a busy machine) for each of a model's many small tensors.
    in_numpy = flat.device.type == "cpu" and flat.dtype in _NUMPY_FLOATS
    for start in range(0, flat.numel(), block):
        piece = flat[start : start + block]
        finite = np.isfinite(piece.numpy()).all() if in_numpy else torch.isfinite(piece).all()
        if not bool(finite):
            bad = int((~torch.isfinite(weight)).sum())
            raise KENError(f"tensor {name!r} holds {bad} NaN/Inf value(s); KEN cannot select on it")


def check_same_shape(pretrained: torch.Tensor, finetuned: torch.Tensor, name: str) -> None:
    """Raise ``KENError`` naming ``name`` if the two tensors differ in shape."""
    if pretrained.shape != finetuned.shape:
        raise KENError(
            f"tensor {name!r}: pre-trained shape {tuple(pretrained.shape)} differs from "
            f"fine-tuned shape {tuple(finetuned.shape)}"
        )


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """View ``weight`` as KEN rows ``[rows, n]``.

    Rank >= 2: slices along dim 0, flattened (a Linear ``[out, in]`` gives ``out`` rows of
    length ``in``). Rank 0 or 1: a single row.
    """
    if weight.dim() <= 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


def rows_per_chunk(row_width: int, max_memory: int) -> int:
    """How many rows of ``row_width`` values fit ``max_memory`` bytes of working memory."""
    return max(1, max_memory // max(1, BYTES_PER_ELEMENT * row_width))
