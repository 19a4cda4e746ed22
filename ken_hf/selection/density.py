"""KEN's kernel density step: bandwidth, grid, rounded densities and the grid's priority order.

This is the torch path, taken by CUDA tensors (and by CPU tensors under
``KEN_HF_SELECT_BACKEND=torch``); CPU tensors otherwise go through compiled.py, which computes
the same rounded densities another way.

Every quantity that feeds a comparison reproduces the reference arithmetic of
docs/algorithm.md bit for bit (bandwidth, grid, rounded density). The densities are
computed fast and a little inexactly, with a rigorous bound on the error; the few grid points
whose density lies so close to a rounding boundary (x.5) that the error could flip the
rounding are recomputed directly in float64, which agrees with scikit-learn to ~1e-15.

The fast path turns the kernel sums into small matrix products. Grid points come in blocks
of ``B`` after an anchor ``c_j``, spaced ``D`` apart (the true float32 grid point differs from
``c_j + m D`` by ``dev``, measured per point). With ``s = 1 / (h sqrt 2)``, a row centre
``mu``, ``a_j = (c_j - mu) s``, ``b_i = (x_i - mu) s`` and ``d = D s``:

    exp(-((c_j + m D - x_i) s)^2) = exp(-(a_j - b_i)^2) * exp(2 b_i m d) * exp(-2 a_j m d - (m d)^2)
                                  =       E[j, i]       *     P[i, m]     *          F[j, m]

so ``sum_i`` is ``F * (E @ P)``: ``J * n + n * B`` exps per row instead of ``k * n``, and one
float32 matrix product. ``B`` is kept small enough that ``P`` stays finite in float32 and the
terms dropped where ``E`` is flushed to zero stay negligible. The bound assumes IEEE float32
products, so the products run inside ``full_precision_matmul`` (precision.py): TF32 or bf16
products, which torch's global matmul precision settings allow, would exceed it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .precision import full_precision_matmul

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_FLOAT32_EPS = 2.0**-24  # unit roundoff of float32
# Safety factor on every error bound below (they are first-order bounds).
_SAFETY = 4.0
# Largest |d/dg exp(-(g s)^2)| / s = max 2t exp(-t^2) = sqrt(2/e): a grid point moved by
# dev changes each term by at most 0.858 * s * dev.
_SLOPE = math.sqrt(2.0 / math.e)
# E is flushed to 0 where (a - b)^2 exceeds this; with (B - 1) d <= _MAX_BLOCK_SPAN the
# dropped terms stay below exp(-(sqrt(80) - 2.24)^2) ~ 3e-20, far below the bound.
_FLUSH = 80.0
_MAX_BLOCK_SPAN = 2.24
# Keep |2 b m d| <= 40 so that P stays far from float32 overflow (exp(88)).
_MAX_POWER_EXPONENT = 40.0
# Rows whose spread in bandwidths could overflow go through float64 directly.
_SAFE_SPREAD = 1e18
# Cache-sized working block of float32 values.
_BLOCK_BYTES = 2**20


def silverman_bandwidth(rows: torch.Tensor) -> torch.Tensor:
    """Silverman's rule per row: ``|1.06 * std * n ** (-1/5)|``.

    rows: float32 ``[R, n]``. Returns float64 ``[R]``. The population std is numpy's float32
    std (pairwise summation), computed on the CPU because the bandwidth must match the
    reference bit for bit: one ulp of h moves densities across rounding boundaries.
    """
    std32 = np.std(np.ascontiguousarray(rows.detach().cpu().numpy()), axis=1)
    std = torch.from_numpy(std32).to(device=rows.device, dtype=torch.float64)
    return (1.06 * std * (rows.shape[1] ** (-1 / 5))).abs()


def even_grid(rows: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` evenly spaced points from each row's min to max, as ``numpy.linspace`` gives them.

    rows: float32 ``[R, n]``. Returns float32 ``[R, k]``: ``arange(k) * step + min`` in float32
    with ``step = (max - min) / (k - 1)`` and the last point set to ``max`` (numpy >= 2).
    """
    low = rows.amin(dim=1, keepdim=True)
    high = rows.amax(dim=1, keepdim=True)
    if k == 1:
        return low
    positions = torch.arange(k, dtype=torch.float32, device=rows.device).unsqueeze(0)
    delta = high - low
    step = delta / torch.tensor(float(k - 1), dtype=torch.float32, device=rows.device)
    # numpy's guard for a step that underflows to zero: scale the positions first.
    stepped = torch.where(step == 0, positions / float(k - 1) * delta, positions * step)
    grid = stepped + low
    grid[:, -1:] = high
    return grid


def _kernel_sums_float64(rows: torch.Tensor, grid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Direct sums ``sum_i exp(-(g - x_i)^2 / (2 h^2))`` in float64, in bounded pieces.

    rows ``[P, n]``, grid ``[P, G]``, h ``[P]``; returns float64 ``[P, G]``.
    """
    num_rows, n = rows.shape
    sums = torch.empty(grid.shape, dtype=torch.float64, device=rows.device)
    step = max(1, _BLOCK_BYTES // (8 * n * grid.shape[1]))
    for r0 in range(0, num_rows, step):
        r1 = min(num_rows, r0 + step)
        diff = grid[r0:r1].double().unsqueeze(2) - rows[r0:r1].double().unsqueeze(1)
        diff.mul_(diff).div_((-2.0 * h[r0:r1] * h[r0:r1]).view(-1, 1, 1))
        sums[r0:r1] = diff.exp_().sum(dim=2)
    return sums


def _kernel_sums_blocked(
    rows: torch.Tensor, grid: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast sums by grid blocks (module docstring); rows ``[R, n]``, grid ``[R, k]``, h ``[R]``.

    Returns float64 ``[R, k]`` sums and ``[R, k]`` bounds on their absolute error. Rows are
    grouped by the block size they allow, so that one wide-ranging row does not slow the rest.
    """
    k = grid.shape[1]
    s = 1.0 / (h * math.sqrt(2.0))
    centre = (rows.amax(dim=1).double() + rows.amin(dim=1).double()) / 2
    spacing = (grid[:, -1].double() - grid[:, 0].double()) / max(1, k - 1)  # D, [R]
    reach = (rows.amax(dim=1).double() - centre) * s  # largest |b|, [R]
    blocks = _block_sizes(k, spacing * s, reach)
    sums = torch.empty(grid.shape, dtype=torch.float64, device=rows.device)
    bound = torch.empty(grid.shape, dtype=torch.float64, device=rows.device)
    for block in blocks.unique().tolist():
        chosen = (blocks == block).nonzero().squeeze(1)
        sums[chosen], bound[chosen] = _kernel_sums_by_blocks(
            rows[chosen], grid[chosen], s[chosen], centre[chosen], spacing[chosen], int(block)
        )
    return sums, bound


def _block_sizes(k: int, d: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """Grid points per anchor for each row ``[R]``: about sqrt(k) (balancing the J * n and
    n * B exps), rounded down to a power of two when a row needs fewer: (B - 1) d stays within
    _MAX_BLOCK_SPAN and 2 * reach * (B - 1) d within _MAX_POWER_EXPONENT."""
    span = torch.clamp(_MAX_POWER_EXPONENT / (2.0 * reach), max=_MAX_BLOCK_SPAN)
    limit = torch.floor(span / d).clamp(max=k) + 1  # d > 0: rows are not constant
    target = max(1, min(k, round(math.sqrt(k))))
    power_of_two = torch.exp2(torch.floor(torch.log2(limit)))
    return torch.where(limit >= target, target, power_of_two).long()


def _kernel_sums_by_blocks(
    rows: torch.Tensor,
    grid: torch.Tensor,
    s: torch.Tensor,
    centre: torch.Tensor,
    spacing: torch.Tensor,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_kernel_sums_blocked`` for rows sharing one block size ``B``.

    rows ``[R, n]``, grid ``[R, k]``; s, centre, spacing ``[R]`` float64.
    """
    num_rows, n = rows.shape
    k = grid.shape[1]
    device = rows.device
    d = spacing * s
    num_blocks = -(-k // block)

    # Pad the grid to whole blocks (repeating the last point); extra sums are dropped.
    padded = torch.cat([grid, grid[:, -1:].expand(-1, num_blocks * block - k)], dim=1).double()
    anchors = padded[:, ::block]  # [R, J]
    steps = torch.arange(block, device=device, dtype=torch.float64)  # m
    ideal = anchors.unsqueeze(2) + steps * spacing.view(-1, 1, 1)  # [R, J, B]
    deviation = (ideal.flatten(1) - padded)[:, :k].abs()
    a = (anchors - centre.unsqueeze(1)) * s.unsqueeze(1)  # [R, J]
    md = steps * d.unsqueeze(1)  # [R, B]
    factor = torch.exp(-2.0 * a.unsqueeze(2) * md.unsqueeze(1) - (md * md).unsqueeze(1))  # F

    products = torch.empty(num_rows, num_blocks, block, dtype=torch.float32, device=device)
    # Cache-sized tiles of [rows, anchors, n] values.
    anchors_per_tile = max(1, min(num_blocks, _BLOCK_BYTES // (8 * n)))
    rows_per_tile = max(1, _BLOCK_BYTES // (8 * anchors_per_tile * n))
    with full_precision_matmul():  # the bound below assumes IEEE float32 products
        for r0 in range(0, num_rows, rows_per_tile):
            r1 = min(num_rows, r0 + rows_per_tile)
            b = (rows[r0:r1].double() - centre[r0:r1].unsqueeze(1)) * s[r0:r1].unsqueeze(1)
            powers = torch.exp(2.0 * b.unsqueeze(2) * md[r0:r1].unsqueeze(1)).float()  # P [r,n,B]
            for j0 in range(0, num_blocks, anchors_per_tile):
                j1 = min(num_blocks, j0 + anchors_per_tile)
                exponent = a[r0:r1, j0:j1].unsqueeze(2) - b.unsqueeze(1)  # [r, j, n]
                exponent.mul_(exponent)
                flushed = exponent > _FLUSH
                # Clamping keeps exp away from subnormal results (a slow path on CPUs).
                near = exponent.clamp_(max=_FLUSH).neg_().exp_().masked_fill_(flushed, 0.0)  # E
                torch.bmm(near.float(), powers, out=products[r0:r1, j0:j1])
    sums = (products.double() * factor).flatten(1)[:, :k]

    # Per term: E and P are rounded once each and multiplied once; the float32 products and
    # sums of n positive terms add at most (n - 1) u of the total.
    relative = (n + 3) * _FLOAT32_EPS
    bound = _SAFETY * (relative * sums + n * _SLOPE * s.unsqueeze(1) * deviation)
    return sums, bound


def rounded_densities(rows: torch.Tensor, grid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gaussian KDE of each row at its grid, rounded to integers half to even.

    rows: float32 ``[R, n]``; grid: float32 ``[R, k]``; h: float64 ``[R]``, all > 0.
    Returns float64 ``[R, k]`` holding integers: ``round(1/(n h sqrt(2 pi)) * sum_i
    exp(-(g - x_i)^2 / (2 h^2)))``, the value scikit-learn's ``KernelDensity`` rounds to.
    """
    n = rows.shape[1]
    norm = (1.0 / (n * h * _SQRT_2PI)).unsqueeze(1)
    spread = (rows.amax(dim=1) - rows.amin(dim=1)).double() / h
    fast = spread < _SAFE_SPREAD
    sums = torch.empty(grid.shape, dtype=torch.float64, device=rows.device)
    bound = torch.zeros(grid.shape, dtype=torch.float64, device=rows.device)
    if bool(fast.any()):
        sums[fast], bound[fast] = _kernel_sums_blocked(rows[fast], grid[fast], h[fast])
    if not bool(fast.all()):
        sums[~fast] = _kernel_sums_float64(rows[~fast], grid[~fast], h[~fast])
    density = sums * norm

    near_half = ((density - density.floor()) - 0.5).abs() <= bound * norm
    if bool(near_half.any()):
        row_ids, grid_ids = near_half.nonzero(as_tuple=True)
        exact = _kernel_sums_float64(
            rows[row_ids], grid[row_ids, grid_ids].unsqueeze(1), h[row_ids]
        )
        density[row_ids, grid_ids] = exact.squeeze(1) * norm[row_ids, 0]
    return torch.round(density)


def priority_order(densities: torch.Tensor) -> torch.Tensor:
    """Grid indices ``[R, k]`` by highest rounded density first, then lower grid index."""
    return torch.sort(-densities, dim=1, stable=True).indices
