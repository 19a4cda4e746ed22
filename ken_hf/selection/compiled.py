"""KEN on CPU rows, compiled: one pass per row (densities, order, matching), rows in parallel.

numba compiles these kernels on first use and caches the machine code on disk
(``NUMBA_CACHE_DIR`` when set, else next to this file, else in the user's cache directory),
so a machine compiles them once; later processes load them in well under a second. Where
none of these is writable (a read-only installation, no writable home), the kernels are
compiled without a cache, in every process (half a minute on two cores), with one warning.
Rows are independent, so blocks of rows run on threads (the kernels release the GIL).

Densities (docs/algorithm.md step 4) are computed in O(n + k) per row instead of O(n k):

- Each value's kernel ``K(g - x) = exp(-(g - x)^2 / (2 h^2))``, as a function of ``x``, is
  replaced by its degree-5 Lagrange interpolant on six equally spaced *nodes* around ``x``
  (spacing ``delta = rho h``), so the row becomes six weights per value on a node array
  ("binning"). The nodes are laid out so that every grid point is itself a node position
  (``delta`` is a multiple or a fraction of the grid step), so each density is a short
  discrete convolution of the node weights with kernel taps ``K(q sigma)``, computed once per
  row: no exponential per value and grid point.
- Rigorous bound on the error of each sum, in four parts (then multiplied by a safety
  factor): interpolation, ``n * 15 / 720 * 3.515625 * (delta / h)^6`` (``|K^(6)| <= 15 /
  h^6``, and ``|prod (t - s)| <= 3.515625`` for six nodes and ``t`` in the middle interval);
  truncation of the taps beyond ``Q sigma``, ``sum |c_m| * K((Q + 1) sigma)``; the float32
  grid point's distance from the ideal node position, ``n * exp(-1/2) / h * dev`` (the
  kernel's largest slope), and the float64 rounding of all of this.
- Any grid point whose density lies within that bound of a rounding boundary (x.5) is
  recomputed directly in float64, term by term, as the torch path does (density.py).
  ``rho`` is chosen per row so that the bound is about ``_TARGET`` in density units: few
  points are recomputed, and the convolution stays ~60 taps per grid point.

Order (step 6): a stable LSD radix sort of the integer rounded densities, highest first.

Matching (step 7): the row is sorted once (a stable radix sort of the float32 bit patterns,
-0.0 counted as 0.0), equal values form groups, and two union-find arrays over the sorted
order give the first free value at or above a target and the last free one below it in
near-constant time. A group is consumed lowest position first. Ties are resolved exactly
as the reference does: among all free values at the minimal float32 distance (also two
different values whose distances round to the same float32), the lowest position wins;
since float32 distances are monotone in the value on each side, the search only looks past
a candidate while the next group is at the same distance.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

_U64 = 2.0**-53  # float64 unit roundoff
_SQRT_2PI = math.sqrt(2.0 * math.pi)
# Degree-5 interpolation of K: max |K^(6)| = 15 / h^6; max |prod_{s=-2..3} (t - s)| on
# [0, 1] is 3.515625 (t = 1/2); 6! = 720.
_C6 = 15.0 * 3.515625 / 720.0
# The six weights of one value sum in absolute value to at most 1.390625 (Lebesgue constant).
_LEBESGUE = 1.390625
_SLOPE = math.exp(-0.5)  # max |K'(u)| * h
_SAFETY = 4.0
# Interpolation error aimed at, in density units (after the safety factor), which sets rho:
# _TARGET / n, so that the float64 recomputations (n exps each, ~2 * bound * k of them per
# row) stay a small share of a row's time at any width; at most _MAX_TARGET.
_TARGET = 0.25
_MAX_TARGET = 1e-3
# The truncated taps may add this fraction of _TARGET.
_TAIL_SHARE = 0.01
_MAX_RHO = 0.5
# Rows needing more nodes than this many per value (a huge spread) sum directly in float64.
_MAX_NODES_PER_VALUE = 4
_MIN_NODE_CAP = 4096


def _cache_probe():  # decorated once below, never called
    pass


def _can_cache() -> bool:
    """Whether numba has a writable place for the machine code of this file's kernels. numba
    looks for one when a function is decorated with ``cache=True`` (and raises RuntimeError
    "no locator available" when there is none), so a probe from this file decides, once, at
    import: else the kernels compile without a cache, and one warning says so."""
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError:
        warnings.warn(
            "numba finds no writable cache for the KEN kernels (NUMBA_CACHE_DIR unset or not "
            "writable, ken_hf read-only, no writable user cache directory): they are compiled "
            "without a cache, in each process; set NUMBA_CACHE_DIR to a writable folder to "
            "compile them once",
            stacklevel=2,
        )
        return False
    return True


_CACHE = _can_cache()


@njit(nogil=True, cache=_CACHE)
def _direct_sum(x, g, h):
    """sum_i exp(-(g - x_i)^2 / (2 h^2)) in float64, term by term (as density.py does)."""
    total = 0.0
    scale = -2.0 * h * h
    gg = np.float64(g)
    for i in range(x.shape[0]):
        diff = gg - np.float64(x[i])
        total += math.exp(diff * diff / scale)
    return total


@njit(nogil=True, cache=_CACHE)
def _round_half_even(d):
    low = math.floor(d)
    rest = d - low
    if rest > 0.5:
        return low + 1.0
    if rest < 0.5:
        return low
    return low + (low % 2.0)


@njit(nogil=True, cache=_CACHE, fastmath={"reassoc", "contract"})
def _convolve(nodes, taps, k, fine, coarse, pad, q_max, out):
    """out[j] = sum_m nodes[m] * K(distance of grid point j to node m), |distance| <= Q.

    Grid point j sits at fine index j * fine; node m at fine index (m - pad) * coarse;
    taps[Q + q] = K(q sigma) = taps[Q - q]. One of fine, coarse is 1: with nodes coarser
    than the grid, each node adds its taps to a contiguous run of grid points; with nodes
    finer, each grid point sums a contiguous run of nodes. The bound does not depend on the
    summation order, so the compiler may reorder (vectorize) the sums."""
    num_nodes = nodes.shape[0]
    # Slices and 0-based loops: indices the compiler knows are not negative, so that the
    # inner loops vectorize.
    if fine == 1:
        out[:k] = 0.0
        for m in range(num_nodes):
            weight = nodes[m]
            if weight == 0.0:
                continue
            at = (m - pad) * coarse
            first = max(0, at - q_max)
            last = min(k - 1, at + q_max)
            if last < first:
                continue
            run = out[first : last + 1]
            kernel = taps[q_max - at + first : q_max - at + last + 1]
            for i in range(run.shape[0]):
                run[i] += weight * kernel[i]
        return
    for j in range(k):
        at = j * fine
        first = max(0, at - q_max + pad)
        last = min(num_nodes - 1, at + q_max + pad)
        run = nodes[first : last + 1]
        kernel = taps[q_max - at - pad + first : q_max - at - pad + last + 1]
        total = 0.0
        for i in range(run.shape[0]):
            total += run[i] * kernel[i]
        out[j] = total


@njit(nogil=True, cache=_CACHE)
def _kernel_sums(x, g, h, target, sums, bounds):
    """Fast kernel sums of one row at its grid, with rigorous bounds on their error.

    x float32 [n] (not constant), g float32 [k] (k >= 2), h float64 > 0, target: the
    interpolation error aimed at, in density units. Fills sums [k] and bounds [k] (absolute,
    in the units of the sums) and returns True; returns False, filling nothing, for a row
    whose spread would need too many nodes (the caller then sums directly)."""
    n = x.shape[0]
    k = g.shape[0]
    norm = 1.0 / (n * h * _SQRT_2PI)
    lo = np.float64(g[0])
    hi = np.float64(g[k - 1])
    # Node spacing delta about rho h, from the interpolation bound in density units.
    rho = (target * h * _SQRT_2PI / (_SAFETY * _C6)) ** (1.0 / 6.0)
    if rho > _MAX_RHO:
        rho = _MAX_RHO
    wanted = rho * h
    cap = max(_MIN_NODE_CAP, _MAX_NODES_PER_VALUE * (n + k))
    if not ((hi - lo) / wanted < cap / 2):  # delta >= wanted / 2 below; also inf / nan
        return False
    step = (hi - lo) / (k - 1)
    if step >= wanted:  # nodes finer than the grid: fine nodes per grid step
        fine = int(math.ceil(step / wanted))
        coarse = 1
    else:  # nodes coarser: one node every coarse grid points
        fine = 1
        coarse = int(math.floor(wanted / step))
    sigma = step / fine
    delta = coarse * sigma
    pad = 2
    num_nodes = int((hi - lo) / delta) + 2 * pad + 3
    nodes = np.zeros(num_nodes)
    inverse = 1.0 / delta
    for i in range(n):
        t = (np.float64(x[i]) - lo) * inverse
        base = int(math.floor(t))
        if base < 0:
            base = 0
        f = t - base
        d0 = f + 2.0
        d1 = f + 1.0
        d2 = f
        d3 = f - 1.0
        d4 = f - 2.0
        d5 = f - 3.0
        p01 = d0 * d1
        p45 = d4 * d5
        p012 = p01 * d2
        p345 = d3 * p45
        # Lagrange basis on nodes -2..3: prod_{s != r} (f - s) / prod_{s != r} (r - s).
        nodes[base] -= d1 * d2 * p345 * (1.0 / 120.0)
        nodes[base + 1] += d0 * d2 * p345 * (1.0 / 24.0)
        nodes[base + 2] -= p01 * p345 * (1.0 / 12.0)
        nodes[base + 3] += p012 * p45 * (1.0 / 12.0)
        nodes[base + 4] -= p012 * d3 * d5 * (1.0 / 24.0)
        nodes[base + 5] += p012 * d3 * d4 * (1.0 / 120.0)
    mass = 0.0  # sum |c_m|
    for m in range(num_nodes):
        mass += abs(nodes[m])
    # Taps out to Q sigma, Q chosen so that the truncated tail adds little to the bound.
    tail_allowed = _TAIL_SHARE * target / _SAFETY / norm
    reach = h * math.sqrt(2.0 * math.log(max(mass / tail_allowed, 2.0)))
    q_max = int(math.ceil(reach / sigma))
    taps = np.empty(2 * q_max + 1)
    scale = -2.0 * h * h
    for q in range(q_max + 1):
        u = q * sigma
        value = math.exp(u * u / scale)
        taps[q_max + q] = value
        taps[q_max - q] = value
    _convolve(nodes, taps, k, fine, coarse, pad, q_max, sums)

    # The bound (module docstring): interpolation, truncated taps, the value positions'
    # and the taps' float64 rounding, then per grid point its distance from its node.
    u_far = (q_max + 1) * sigma
    terms = 2.0 * q_max / coarse + 2.0
    shared = (
        n * _C6 * (delta / h) ** 6
        + mass * math.exp(u_far * u_far / scale)
        + n * _SLOPE / h * 8.0 * _U64 * (hi - lo + 8.0 * delta + abs(lo))
        + 4.0 * _U64 * (terms + n + 256.0) * max(mass, _LEBESGUE * n)
    )
    slope = n * _SLOPE / h
    stride = fine * sigma
    for j in range(k):
        ideal = lo + j * stride
        dev = abs(np.float64(g[j]) - ideal) + 8.0 * _U64 * (abs(lo) + abs(ideal))
        bounds[j] = _SAFETY * (shared + slope * dev)
    return True


@njit(nogil=True, cache=_CACHE)
def _densities(x, g, h, sums, bounds, out):
    """Rounded densities of one row at its grid (docs/algorithm.md steps 4-5) into out [k]:
    fast sums, and a direct float64 sum wherever the bound reaches a rounding boundary.

    x float32 [n] (not constant), g float32 [k] (k >= 2), h float64 > 0; sums and bounds
    float64 [k] scratch."""
    n = x.shape[0]
    k = g.shape[0]
    norm = 1.0 / (n * h * _SQRT_2PI)
    if not _kernel_sums(x, g, h, min(_MAX_TARGET, _TARGET / n), sums, bounds):
        for j in range(k):
            out[j] = _round_half_even(_direct_sum(x, g[j], h) * norm)
        return
    for j in range(k):
        density = sums[j] * norm
        if abs((density - math.floor(density)) - 0.5) <= bounds[j] * norm:
            density = _direct_sum(x, g[j], h) * norm
        out[j] = _round_half_even(density)


@njit(nogil=True, cache=_CACHE)
def _priority(rounded, order, scratch):
    """order[:] = grid indices by highest rounded density first, lower index first on ties
    (a stable LSD radix sort on top - density)."""
    k = rounded.shape[0]
    top = 0.0
    for j in range(k):
        if rounded[j] > top:
            top = rounded[j]
    for j in range(k):
        order[j] = j
    if top >= 2.0**62:  # astronomically large densities: a comparison sort
        keyed = np.empty(k)
        for j in range(k):
            keyed[j] = -rounded[j]
        order[:] = np.argsort(keyed, kind="mergesort")
        return
    keys = np.empty(k, dtype=np.int64)
    for j in range(k):
        keys[j] = np.int64(top - rounded[j])
    counts = np.empty(257, dtype=np.int64)
    shift = 0
    width = np.int64(top)
    while width > 0:
        counts[:] = 0
        for j in range(k):
            counts[((keys[order[j]] >> shift) & 255) + 1] += 1
        for b in range(256):
            counts[b + 1] += counts[b]
        for j in range(k):
            index = order[j]
            digit = (keys[index] >> shift) & 255
            scratch[counts[digit]] = index
            counts[digit] += 1
        order[:] = scratch[:k]
        shift += 8
        width >>= 8


@njit(nogil=True, cache=_CACHE)
def _sort_row(
    x, values, positions, scratch_keys, scratch_positions, sorted_positions, keys, counts
):
    """values[1 : n + 1], positions[1 : n + 1]: the row sorted ascending, stable (a radix sort
    on the float32 bit patterns; -0.0 is keyed as 0.0, since it equals it)."""
    n = x.shape[0]
    bits = x.view(np.uint32)
    for i in range(n):
        v = bits[i]
        if v == np.uint32(0x80000000):
            v = np.uint32(0)
        if v >> np.uint32(31):
            keys[i] = ~v
        else:
            keys[i] = v | np.uint32(0x80000000)
        scratch_positions[i] = i
    src_keys, dst_keys = keys, scratch_keys
    src_pos, dst_pos = scratch_positions, sorted_positions
    for shift in range(0, 32, 8):
        counts[:] = 0
        for i in range(n):
            counts[((src_keys[i] >> np.uint32(shift)) & np.uint32(255)) + 1] += 1
        if counts[((src_keys[0] >> np.uint32(shift)) & np.uint32(255)) + 1] == n:
            continue  # every key has this digit: the pass would not move anything
        for b in range(256):
            counts[b + 1] += counts[b]
        for i in range(n):
            digit = (src_keys[i] >> np.uint32(shift)) & np.uint32(255)
            j = counts[digit]
            counts[digit] = j + 1
            dst_keys[j] = src_keys[i]
            dst_pos[j] = src_pos[i]
        src_keys, dst_keys = dst_keys, src_keys
        src_pos, dst_pos = dst_pos, src_pos
    for i in range(n):
        positions[1 + i] = src_pos[i]
    for i in range(n):
        values[1 + i] = x[positions[1 + i]]


@njit(nogil=True, cache=_CACHE)
def _find_up(parent, i):
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        following = parent[i]
        parent[i] = root
        i = following
    return root


@njit(nogil=True, cache=_CACHE)
def _match(values, positions, targets, starts, group_first, group_last, up, down, taken):
    """Greedy matching on a sorted row (docs/algorithm.md step 7); marks taken[i] for each
    sorted index i that a target takes.

    values float32 [n + 2] (sorted, -inf and +inf sentinels at 0 and n + 1), positions
    [n + 2] (original positions), targets float32 [k] in priority order, starts [k]: the
    first sorted index whose value is >= each target."""
    size = values.shape[0]
    n = size - 2
    for i in range(size):
        up[i] = i
        down[i] = i
        taken[i] = False
    group_first[0] = 0
    for i in range(1, n + 1):
        group_first[i] = group_first[i - 1] if (i > 1 and values[i] == values[i - 1]) else i
    group_first[n + 1] = n + 1
    group_last[n + 1] = n + 1
    group_last[0] = 0
    for i in range(n, 0, -1):
        group_last[i] = group_last[i + 1] if (i < n and values[i] == values[i + 1]) else i
    for step in range(targets.shape[0]):
        t = targets[step]
        low = starts[step]
        right = _find_up(up, low)
        left = _find_up(down, low - 1)
        if left != 0:
            left = _find_up(up, group_first[left])  # the group's lowest free position
        right_distance = values[right] - t
        left_distance = t - values[left]
        best = min(right_distance, left_distance)
        chosen = -1
        chosen_position = n + 1
        if right_distance == best:
            chosen = right
            chosen_position = positions[right]
            # Farther values can tie only if the next group already does (monotone).
            while right <= n and values[group_last[right] + 1] - t == best:
                right = _find_up(up, group_last[right] + 1)
                if right > n or values[right] - t != best:
                    break
                if positions[right] < chosen_position:
                    chosen = right
                    chosen_position = positions[right]
        if left_distance == best:
            if positions[left] < chosen_position:
                chosen = left
                chosen_position = positions[left]
            while left >= 1 and t - values[group_first[left] - 1] == best:
                left = _find_up(down, group_first[left] - 1)
                if left == 0:
                    break
                left = _find_up(up, group_first[left])
                if t - values[left] != best:
                    break
                if positions[left] < chosen_position:
                    chosen = left
                    chosen_position = positions[left]
        taken[chosen] = True
        up[chosen] = chosen + 1
        down[chosen] = chosen - 1


@njit(nogil=True, cache=_CACHE)
def _insertion_points(values, grid, out):
    """out[j]: the first index of values (sorted, +inf last) whose value is >= grid[j]. The
    grid ascends (linspace), so this is a merge; a descent falls back to bisection."""
    size = values.shape[0]
    at = 1
    previous = -np.inf
    for j in range(grid.shape[0]):
        t = grid[j]
        if t < previous:
            low, high = 1, size - 1
            while low < high:
                middle = (low + high) >> 1
                if values[middle] < t:
                    low = middle + 1
                else:
                    high = middle
            at = low
        else:
            while values[at] < t:
                at += 1
        out[j] = at
        previous = t


@njit(nogil=True, cache=_CACHE)
def _select_block(rows, grids, bandwidths, compat, mask):
    """KEN on rows with k < n: mask[r] = kept positions of rows[r]; a row with bandwidth 0
    (constant) keeps positions 0..k-1."""
    n = rows.shape[1]
    k = grids.shape[1]
    rounded = np.empty(k)
    sums = np.empty(k)
    bounds = np.empty(k)
    order = np.empty(k, dtype=np.int64)
    order_scratch = np.empty(k, dtype=np.int64)
    targets = np.empty(k, dtype=np.float32)
    starts = np.empty(k, dtype=np.int64)
    grid_starts = np.empty(k, dtype=np.int64)
    values = np.empty(n + 2, dtype=np.float32)
    positions = np.empty(n + 2, dtype=np.int64)
    scratch_keys = np.empty(n, dtype=np.uint32)
    scratch_positions = np.empty(n, dtype=np.int64)
    sorted_positions = np.empty(n, dtype=np.int64)
    keys = np.empty(n, dtype=np.uint32)
    counts = np.empty(257, dtype=np.int64)
    group_first = np.empty(n + 2, dtype=np.int64)
    group_last = np.empty(n + 2, dtype=np.int64)
    up = np.empty(n + 2, dtype=np.int64)
    down = np.empty(n + 2, dtype=np.int64)
    taken = np.empty(n + 2, dtype=np.bool_)
    values[0] = -np.inf
    values[n + 1] = np.inf
    positions[0] = n
    positions[n + 1] = n
    for r in range(rows.shape[0]):
        x = rows[r]
        g = grids[r]
        if bandwidths[r] == 0.0:
            mask[r, :] = False
            mask[r, :k] = True
            continue
        if k == 1:
            order[0] = 0
        else:
            _densities(x, g, bandwidths[r], sums, bounds, rounded)
            _priority(rounded, order, order_scratch)
        _sort_row(
            x, values, positions, scratch_keys, scratch_positions, sorted_positions, keys, counts
        )
        _insertion_points(values, g, grid_starts)
        for t in range(k):
            targets[t] = g[order[t]]
            starts[t] = grid_starts[order[t]]
        _match(values, positions, targets, starts, group_first, group_last, up, down, taken)
        out = mask[r]
        out[:] = False
        if compat:
            i = 1
            while i <= n:
                end = group_last[i]
                hit = False
                for j in range(i, end + 1):
                    if taken[j]:
                        hit = True
                        break
                if hit and values[i] != 0:
                    for j in range(i, end + 1):
                        out[positions[j]] = True
                i = end + 1
        else:
            for i in range(1, n + 1):
                if taken[i]:
                    out[positions[i]] = True


def _bandwidths(rows: np.ndarray) -> np.ndarray:
    """Silverman's rule per row, as density.silverman_bandwidth computes it: numpy's float32
    std (pairwise summation), then ``|1.06 * std * n ** (-1/5)|`` in float64."""
    std = np.std(rows, axis=1).astype(np.float64)
    return np.abs(1.06 * std * (rows.shape[1] ** (-1 / 5)))


def _grids(rows: np.ndarray, k: int) -> np.ndarray:
    """``k`` points from each row's min to max with numpy.linspace's float32 arithmetic, as
    density.even_grid computes them (one float32 operation at a time)."""
    low = rows.min(axis=1, keepdims=True)
    high = rows.max(axis=1, keepdims=True)
    if k == 1:
        return np.ascontiguousarray(low)
    positions = np.arange(k, dtype=np.float32)[None, :]
    delta = high - low
    step = delta / np.float32(k - 1)
    # numpy's guard for a step that underflows to zero: scale the positions first.
    stepped = np.where(step == 0, positions / np.float32(k - 1) * delta, positions * step)
    grid = stepped + low
    grid[:, -1:] = high
    return grid


def _select(rows: np.ndarray, k: int, compat: bool, mask: np.ndarray) -> None:
    """One block of rows, on the calling thread: bandwidths, grids, then the kernel."""
    _select_block(rows, _grids(rows, k), _bandwidths(rows), compat, mask)


# Rows per block handed to a thread, at least (fewer blocks than threads below this).
_MIN_BLOCK_VALUES = 1 << 16


def select_rows(
    rows: np.ndarray, k: int, compat: bool, threads: int, out: np.ndarray | None = None
) -> np.ndarray:
    """KEN masks of rows float32 ``[R, n]`` with ``k < n``: bool ``[R, n]`` (written into
    ``out``, C-contiguous, when given), computed by up to ``threads`` threads, each on
    contiguous blocks of rows."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    num_rows, n = rows.shape
    mask = np.empty(rows.shape, dtype=np.bool_) if out is None else out
    blocks = min(4 * max(1, threads), max(1, num_rows * n // _MIN_BLOCK_VALUES), num_rows)
    if blocks <= 1 or threads <= 1:
        _select(rows, k, compat, mask)
        return mask
    edges = [num_rows * b // blocks for b in range(blocks + 1)]
    with ThreadPoolExecutor(max_workers=min(threads, blocks)) as pool:
        jobs = [
            pool.submit(_select, rows[a:b], k, compat, mask[a:b])
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        for job in jobs:
            job.result()
    return mask
