"""``ken_select``: the KEN rule (docs/algorithm.md) over whole tensors, batched over rows."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import KENConfigError, KENError
from .density import even_grid, priority_order, rounded_densities, silverman_bandwidth
from .matching import greedy_match
from .rows import (
    DEFAULT_MAX_MEMORY,
    as_rows,
    check_finite,
    check_k,
    check_same_shape,
    rows_per_chunk,
)


def ken_select(
    weight: torch.Tensor,
    k: int,
    *,
    compat: bool = False,
    name: str = "weight",
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> torch.Tensor:
    """Mask of the positions KEN keeps in one fine-tuned tensor.

    KEN looks at the fine-tuned values alone: per row, it keeps the ``k`` values that best
    match ``k`` grid points ordered by their kernel density estimate (docs/algorithm.md).
    Rows are independent: CPU rows run compiled kernels (numba; torch when it cannot be
    imported), CUDA rows batched torch, a chunk of rows at a time so that working memory
    stays within ``max_memory``.

    Args:
        weight: the fine-tuned tensor: any shape, a floating-point dtype (float32, float16,
            bfloat16, float64), CPU or CUDA. Rank >= 2: each slice along dim 0, flattened,
            is a row (a Linear ``[out, in]`` gives ``out`` rows of ``in`` values); rank 0
            or 1: one row. Selection runs in float32.
        k: values kept per row, a positive integer: ``min(k, n)`` of a row of ``n`` in the
            default mode (``k >= n`` keeps the whole row; a constant row keeps its first
            ``k`` positions).
        compat: reproduce the published code bit for bit: every position whose value equals
            a matched value is kept too, and kept exact zeros are dropped, so a row may keep
            more or fewer than ``k``.
        name: what error messages call the tensor.
        max_memory: bytes of working memory, beyond input and output, per chunk of rows.

    Returns:
        Bool tensor of ``weight``'s shape, on its device: True where the fine-tuned value is
        kept.

    Raises:
        KENConfigError: ``k`` is not a positive integer, or the environment variable
            ``KEN_HF_SELECT_BACKEND`` is set to something other than ``auto``,
            ``compiled`` or ``torch``.
        KENError: ``weight`` is not floating point, or holds NaN or Inf.

    Example:
        ```python
        import torch
        from ken_hf import ken_select

        weight = torch.randn(768, 3072)  # a fine-tuned Linear weight
        mask = ken_select(weight, k=300)  # bool [768, 3072]
        assert (mask.sum(dim=1) == 300).all()
        ```
    """
    return ken_select_many({name: weight}, k, compat=compat, max_memory=max_memory)[name]


def ken_prune(
    pretrained: torch.Tensor,
    finetuned: torch.Tensor,
    k: int,
    *,
    compat: bool = False,
    name: str = "weight",
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> torch.Tensor:
    """The KEN result for one tensor: fine-tuned values where KEN keeps, pre-trained elsewhere.

    The mask is ``ken_select(finetuned, k, ...)``: KEN selects on the fine-tuned values alone,
    and ``pretrained`` only fills the positions it does not keep.

    Args:
        pretrained: the tensor before fine-tuning, of ``finetuned``'s shape (any floating-point
            dtype and device: it is converted to ``finetuned``'s).
        finetuned: the fine-tuned tensor: any shape, a floating-point dtype, CPU or CUDA.
        k: values kept per row, a positive integer (see ``ken_select``).
        compat: reproduce the published code bit for bit (see ``ken_select``).
        name: what error messages call the tensor.
        max_memory: bytes of working memory, beyond input and output, per chunk of rows.

    Returns:
        A new tensor of ``finetuned``'s shape, dtype and device: ``finetuned``'s values at the
        kept positions, ``pretrained``'s elsewhere.

    Raises:
        KENConfigError: ``k`` is not a positive integer, or ``KEN_HF_SELECT_BACKEND`` is
            set to something other than ``auto``, ``compiled`` or ``torch``.
        KENError: the shapes differ, or ``finetuned`` is not floating point or holds NaN or
            Inf.

    Example:
        ```python
        import torch
        from ken_hf import ken_prune

        pretrained = torch.randn(768, 768)
        finetuned = pretrained + 0.01 * torch.randn(768, 768)
        pruned = ken_prune(pretrained, finetuned, k=96)  # [768, 768], finetuned's dtype
        ```
    """
    check_same_shape(pretrained, finetuned, name)
    mask = ken_select(finetuned, k, compat=compat, name=name, max_memory=max_memory)
    return torch.where(mask, finetuned, pretrained.to(finetuned.device, finetuned.dtype))


def ken_select_many(
    weights: Mapping[str, torch.Tensor],
    k: int,
    *,
    compat: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    minus: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``ken_select`` over many tensors at once, with the same ``k`` for every row.

    Rows of equal width from different tensors share chunks, so small tensors (biases,
    LayerNorm vectors) cost no more than their rows. The masks equal those of ``ken_select``
    on each tensor alone.

    Args:
        weights: ``{name: tensor}``: the fine-tuned tensors, each as ``ken_select`` takes it
            (any shape, floating point, CPU or CUDA).
        k: values kept per row, a positive integer (see ``ken_select``).
        compat: reproduce the published code bit for bit (see ``ken_select``).
        max_memory: bytes of working memory, beyond input and output, per chunk of rows.
        progress: show a tqdm progress bar over the rows.
        minus: ``{name: tensor}`` of the same names and shapes as ``weights`` (a mapping
            that may read each tensor on access, such as
            ``ken_hf.storage.checkpoints.LazyTensors``).
            KEN then selects on ``weights - minus`` in float32, formed a chunk of rows at a
            time, so that no copy of the whole differences is held; each tensor of ``minus``
            is fetched once.

    Returns:
        ``{name: mask}``, in the order of ``weights``: each mask a bool tensor of that
        tensor's shape, on its device, True where the value is kept.

    Raises:
        KENConfigError: ``k`` is not a positive integer, or the environment variable
            ``KEN_HF_SELECT_BACKEND`` is set to something other than ``auto``,
            ``compiled`` or ``torch``.
        KENError: a tensor is not floating point or holds NaN or Inf (in ``weights``, or
            in the difference with ``minus``), or a tensor of ``minus`` is missing or has
            another shape.

    Example:
        ```python
        from ken_hf import ken_select_many

        weights = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        masks = ken_select_many(weights, k=64, progress=True)
        kept = sum(int(m.sum()) for m in masks.values())
        ```
    """
    k = check_k(k)
    # detached: the torch path writes into out= buffers, which autograd refuses
    weights = {name: weight.detach() for name, weight in weights.items()}
    for name, weight in weights.items():
        check_finite(weight, name)
    if minus is not None:  # its names only: no tensor of a lazy mapping is read here
        present = set(minus)
        missing = [name for name in weights if name not in present]
        if missing:
            raise KENError(
                f"minus has no tensor {missing[0]!r} ({len(missing)} of the {len(weights)} "
                "names of weights missing): minus must hold every tensor of weights"
            )
    masks = {  # every row of every tensor is written below
        name: torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        for name, weight in weights.items()
    }
    by_width: dict[int, list[str]] = {}
    for name, weight in weights.items():
        by_width.setdefault(as_rows(weight).shape[1], []).append(name)

    subtracted: dict[str, torch.Tensor] = {}  # rows of ``minus``: the latest tensor's

    def float_rows(rows_of: Mapping[str, torch.Tensor], piece: _Piece) -> torch.Tensor:
        """The float32 rows KEN selects on for ``piece``."""
        rows = rows_of[piece.name][piece.rows].to(torch.float32)
        if minus is None:
            return rows
        if piece.name not in subtracted:
            other = minus[piece.name].detach()
            check_same_shape(other, weights[piece.name], piece.name)
            subtracted.clear()  # the pieces before this one are formed already
            subtracted[piece.name] = as_rows(other)
        change = rows - subtracted[piece.name][piece.rows].to(rows.device, torch.float32)
        check_finite(change, piece.name)
        return change

    total_rows = sum(as_rows(w).shape[0] for w in weights.values())
    with tqdm(total=total_rows, desc="KEN selection", unit="row", disable=not progress) as bar:
        for width, names in by_width.items():
            rows_of = {name: as_rows(weights[name]) for name in names}
            for pieces in _chunks_across(rows_of, width, max_memory):
                if len(pieces) == 1:  # rows of one tensor: no copy, results written in place
                    p = pieces[0]
                    chunk = float_rows(rows_of, p)
                    target = as_rows(masks[p.name])[p.rows]
                    kept = _select_rows(chunk, k, compat=compat, out=target)
                    if kept is not target:
                        target.copy_(kept)
                    bar.update(chunk.shape[0])
                    continue
                parts = [float_rows(rows_of, p) for p in pieces]
                if all(part.device.type == "cpu" for part in parts):  # numpy: one thread
                    chunk = torch.from_numpy(np.concatenate([part.numpy() for part in parts]))
                else:
                    chunk = torch.cat(parts)
                kept = _select_rows(chunk, k, compat=compat)
                offset = 0
                for p in pieces:
                    count = p.rows.stop - p.rows.start
                    target = as_rows(masks[p.name])[p.rows]
                    if target.device.type == "cpu" and kept.device.type == "cpu":
                        target.numpy()[:] = kept[offset : offset + count].numpy()
                    else:
                        target.copy_(kept[offset : offset + count])
                    offset += count
                bar.update(chunk.shape[0])
    return masks


def _select_rows(
    rows: torch.Tensor, k: int, *, compat: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """KEN on a block of rows: float32 ``[R, n]`` -> bool mask ``[R, n]``.

    Edge cases as the spec answers them, in both modes: ``k >= n`` keeps the row, a row
    with zero standard deviation keeps positions ``0 .. min(k, n) - 1``. ``out``: a bool
    ``[R, n]`` tensor the compiled CPU path may write the mask into (and return).
    """
    num_rows, n = rows.shape
    if k >= n:
        return torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    compiled = _compiled_kernels() if rows.device.type == "cpu" else None
    if compiled is not None:
        writable = out is not None and out.device.type == "cpu" and out.is_contiguous()
        kept = compiled.select_rows(
            rows.detach().numpy(),
            k,
            compat,
            torch.get_num_threads(),
            out=out.numpy() if writable else None,
        )
        return out if writable else torch.from_numpy(kept)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    h = silverman_bandwidth(rows)
    constant = h == 0
    mask[constant, :k] = True
    varied = (~constant).nonzero().flatten()
    if varied.numel() == 0:
        return mask
    x = rows[varied]
    grid = even_grid(x, k)
    order = priority_order(rounded_densities(x, grid, h[varied]))
    positions = greedy_match(x, grid.gather(1, order))
    matched = torch.zeros(x.shape, dtype=torch.bool, device=rows.device)
    matched.scatter_(1, positions, True)
    if compat:
        matched = _keep_equal_values(x, matched) & (x != 0)
    mask[varied] = matched
    return mask


# Which implementation selects CPU rows: "auto" (the compiled kernels of compiled.py, or the
# torch path if numba cannot be imported), "compiled" or "torch". CUDA rows always take the
# torch path. Read at every call, so tests and benchmarks can compare the two.
BACKEND_VARIABLE = "KEN_HF_SELECT_BACKEND"
_compiled_module = None
_compiled_failed = False


def _compiled_kernels():
    """The compiled CPU kernels (module ``compiled``), or None for the torch path."""
    global _compiled_module, _compiled_failed
    choice = os.environ.get(BACKEND_VARIABLE, "auto")
    if choice not in ("auto", "compiled", "torch"):
        raise KENConfigError(
            f"environment variable {BACKEND_VARIABLE}={choice!r}: expected auto, compiled or torch"
        )
    if choice == "torch":
        return None
    if _compiled_module is None and not _compiled_failed:
        try:
            from ..selection import compiled
        except ImportError as error:
            if choice == "compiled":
                raise
            _compiled_failed = True
            warnings.warn(
                f"numba could not be imported ({error}); KEN selects CPU rows with the "
                "slower torch path",
                stacklevel=3,
            )
        else:
            _compiled_module = compiled
    return _compiled_module


def _keep_equal_values(rows: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """The published code's value-based keeping: bool ``[R, n]``, True wherever the value
    equals the value of any matched position of the same row."""
    values, order = torch.sort(rows, dim=1, stable=True)
    new_value = torch.ones(values.shape, dtype=torch.int64, device=rows.device)
    new_value[:, 1:] = (values[:, 1:] != values[:, :-1]).long()
    group = new_value.cumsum(dim=1) - 1
    # uint8, not bool: CUDA has no bool scatter_reduce (found on an H100, torch 2.11)
    hit = torch.zeros(values.shape, dtype=torch.uint8, device=rows.device)
    hit.scatter_reduce_(1, group, matched.gather(1, order).to(torch.uint8), reduce="amax")
    return torch.zeros_like(matched).scatter_(1, order, hit.gather(1, group).bool())


@dataclass(frozen=True)
class _Piece:
    """Rows ``rows`` of tensor ``name`` (as ``as_rows`` shapes it)."""

    name: str
    rows: slice


def _chunks_across(
    rows_of: Mapping[str, torch.Tensor], width: int, max_memory: int
) -> Iterator[list[_Piece]]:
    """Chunks of rows, each at most ``rows_per_chunk``, spanning tensor boundaries: the
    chunks every KEN rule selects on (``rows_of``: ``{name: [R, width] rows}``)."""
    limit = rows_per_chunk(width, max_memory)
    pieces: list[_Piece] = []
    filled = 0
    for name, rows in rows_of.items():
        start = 0
        while start < rows.shape[0]:
            stop = min(rows.shape[0], start + limit - filled)
            pieces.append(_Piece(name, slice(start, stop)))
            filled += stop - start
            start = stop
            if filled == limit:
                yield pieces
                pieces, filled = [], 0
    if pieces:
        yield pieces
