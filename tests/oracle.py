"""A direct, per-row transcription of docs/algorithm.md, used as the test oracle.

It is deliberately slow and literal: scikit-learn's ``KernelDensity`` for the density and a
numpy greedy loop for the matching, the shape of the published KEN code.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KernelDensity


def oracle_select_row(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the kept positions of one row ``[n]``, spec step by step: bool ``[n]`` for
    the default mode and bool ``[n]`` for the compatibility mode."""
    x = np.asarray(row).astype(np.float32).ravel()
    n = x.size
    mask = np.zeros(n, dtype=bool)
    if k >= n:
        mask[:] = True
        return mask, mask
    std = np.std(x)  # float32, ddof=0
    if std == 0:
        mask[: min(k, n)] = True
        return mask, mask
    h = abs(1.06 * float(std) * n ** (-1 / 5))
    grid = np.linspace(x.min(), x.max(), k)
    assert grid.dtype == np.float32
    kde = KernelDensity(kernel="gaussian", bandwidth=h).fit(x.reshape(-1, 1))
    density = np.exp(kde.score_samples(grid.reshape(-1, 1)))
    rounded = [round(float(d)) for d in density]
    order = sorted(range(k), key=lambda j: (-rounded[j], j))

    pool_values = x.copy()
    pool_positions = np.arange(n)
    matched = []
    for j in order:
        distance = np.abs(pool_values - grid[j])  # float32
        p = int(np.argmin(distance))  # first minimum: pool stays in position order
        matched.append(int(pool_positions[p]))
        pool_values = np.delete(pool_values, p)
        pool_positions = np.delete(pool_positions, p)

    mask[matched] = True
    compat_mask = np.isin(x, x[matched]) & (x != 0)  # value-based keeping, zeros reset
    return mask, compat_mask


def oracle_select(weight: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Oracle masks (default, compat) for a tensor: rows are dim-0 slices, rank 1 is one row."""
    w = np.asarray(weight)
    rows = w.reshape(1, -1) if w.ndim <= 1 else w.reshape(w.shape[0], -1)
    pairs = [oracle_select_row(r, k) for r in rows]
    default = np.stack([p[0] for p in pairs]).reshape(w.shape)
    compat = np.stack([p[1] for p in pairs]).reshape(w.shape)
    return default, compat
