"""KEN's kernel density step: bandwidth, grid, rounded densities and the grid's priority order.

Every quantity that feeds a comparison reproduces the reference arithmetic of
../KEN_ALGORITHM.md bit for bit (bandwidth, grid, rounded density). The densities are
computed fast and a little inexactly, with a rigorous bound on the error; the few grid points
whose density lies so close to a rounding boundary (x.5) that the error could flip the
rounding are recomputed directly in float64, which agrees with scikit-learn to ~1e-15.

The fast path avoids one exp per (grid point, value) pair. Grid points come in blocks of
``B`` around an anchor ``c``; with ``y = c - x``, ``d = g - c ~ m * D`` (D the grid spacing)
and ``s = 1 / (h sqrt 2)``:

    exp(-((g - x) s)^2) = exp(-(y s)^2) * exp(-2 (y s)(D s))^m * exp(-(m D s)^2)
                        =      E        *          Q^m          *       G_m

so a block costs two exps per value and one multiply-add per pair. Using ``c + m D`` for the
true (float32-rounded) grid point moves it by at most ``dev``, measured per point.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_FLOAT32_EPS = 2.0**-24  # unit roundoff of float32
# Safety factor on every error bound below (they are first-order bounds).
_SAFETY = 4.0
# Largest |d/dg exp(-(g s)^2)| / s = max 2t exp(-t^2) = sqrt(2/e): a grid point moved by
# dev changes each term by at most 0.858 * s * dev.
_SLOPE = math.sqrt(2.0 / math.e)
# Values with (y s)^2 above this have E flushed to 0 (and Q to 1, to avoid 0 * inf): their
# terms stay below exp(-(sqrt(80) - 2.24)^2) ~ 3e-20 over a block, far below the bound.
_FLUSH = 80.0
_FLUSH_ABS = math.sqrt(_FLUSH)
# Keep |2 (y s)(m D s)| <= 40 for unflushed values so Q^m stays finite in float32.
_MAX_POWER_EXPONENT = 40.0
_MAX_BLOCK = 16
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
    """Direct sums ``sum_i exp(-(g - x_i)^2 / (2 h^2))`` in float64.

    rows ``[P, n]``, grid ``[P, G]``, h ``[P]``; returns float64 ``[P, G]``.
    """
    diff = grid.double().unsqueeze(2) - rows.double().unsqueeze(1)
    return torch.exp(-(diff * diff) / (2.0 * h * h).view(-1, 1, 1)).sum(dim=2)


def _kernel_sums_blocked(
    rows: torch.Tensor, grid: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast sums by grid blocks (module docstring); rows ``[R, n]``, grid ``[R, k]``, h ``[R]``.

    Returns float64 ``[R, k]`` sums and ``[R, k]`` bounds on their absolute error.
    """
    num_rows, n = rows.shape
    k = grid.shape[1]
    device = rows.device
    s = 1.0 / (h * math.sqrt(2.0))  # [R] float64
    spacing = (grid[:, -1].double() - grid[:, 0].double()) / max(1, k - 1)  # D, [R]
    spacing_s = (spacing * s).amax().item()
    block = 1
    if spacing_s > 0:
        block = int(_MAX_POWER_EXPONENT / (2.0 * _FLUSH_ABS * spacing_s)) + 1
    block = max(1, min(_MAX_BLOCK, block, k))
    num_blocks = -(-k // block)

    # Pad the grid to whole blocks (repeating the last point); extra sums are dropped.
    padded = torch.cat([grid, grid[:, -1:].expand(-1, num_blocks * block - k)], dim=1).double()
    anchors = padded[:, ::block]  # [R, J]
    steps = torch.arange(block, device=device, dtype=torch.float64)  # m
    ideal = anchors.unsqueeze(2) + steps * spacing.view(-1, 1, 1)  # [R, J, B]
    deviation = (ideal.flatten(1) - padded)[:, :k].abs()
    gaussian_m = torch.exp(-((steps * (spacing * s).unsqueeze(1)) ** 2))  # G_m, [R, B]

    sums = torch.empty(num_rows, num_blocks, block, dtype=torch.float64, device=device)
    rows_per_block = max(1, _BLOCK_BYTES // (4 * num_blocks * n))
    for r0 in range(0, num_rows, rows_per_block):
        r1 = min(num_rows, r0 + rows_per_block)
        ys = anchors[r0:r1].unsqueeze(2) - rows[r0:r1].double().unsqueeze(1)  # [r, J, n]
        ys.mul_(s[r0:r1].view(-1, 1, 1))
        kept = (ys * ys) <= _FLUSH
        # Clamping first keeps exp away from subnormal and infinite results (slow paths);
        # the clamped entries are exactly the flushed ones.
        ys.clamp_(-_FLUSH_ABS, _FLUSH_ABS)
        ratio = torch.exp(ys * (-2.0 * spacing[r0:r1] * s[r0:r1]).view(-1, 1, 1))  # Q
        value = ys.mul_(ys).neg_().exp_().mul_(kept).float()  # E
        ratio = ratio.masked_fill_(~kept, 1.0).float()
        for m in range(block):
            sums[r0:r1, :, m] = value.sum(dim=2)
            if m + 1 < block:
                value.mul_(ratio)
    sums = sums.flatten(1)[:, :k] * gaussian_m.repeat(1, num_blocks)[:, :k]

    # Per term: (2B + 1) u relative from E, Q and the powers; the sum adds (n - 1) u of itself.
    relative = (2 * block + 1 + n) * _FLOAT32_EPS
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
