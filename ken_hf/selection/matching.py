"""KEN's greedy matching: each grid point, in priority order, takes the nearest free position.

This is the torch path, taken by CUDA tensors (and by CPU tensors under
``KEN_HF_SELECT_BACKEND=torch``); CPU tensors otherwise go through compiled.py.

The reference is a Python loop of ``k`` argmin-and-delete steps per row. Here the ``k`` steps
run once for a whole chunk of rows: each row is sorted, so the nearest free value to a target
is either the first free one at or above it or the last free one below it. Free positions are
tracked in a bitset over the sorted order, so a step costs a few word operations per row,
however many neighbours are already used up.

Ties, exactly as the reference breaks them (lowest position index on equal float32 distance):
- equal values form a group in the stable sort, ordered by position, and a group is always
  consumed from its lowest position up; the bitset therefore tracks groups;
- a left and a right candidate at equal distance: the lower position wins;
- two *different* values can round to the same float32 distance (when they are less than an
  ulp of that distance apart). Each step checks whether the next distinct value beyond a
  winning candidate rounds to the same distance (distances are monotone in the value, so
  nothing further out can tie if it does not); rows where that ever happens are rare and are
  redone by the reference loop (``_match_row_reference``).
"""

from __future__ import annotations

import numpy as np
import torch


def greedy_match(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Positions taken by each target, greedily and without replacement.

    rows: float32 ``[R, n]``; targets: float32 ``[R, k]`` with ``k <= n``, in the order they
    choose. Returns int64 ``[R, k]``: ``out[r, t]`` is the position (index into ``rows[r]``)
    taken by ``targets[r, t]``: the free position nearest in float32 ``|x - target|``, lowest
    position on ties.
    """
    values, order = torch.sort(rows, dim=1, stable=True)
    positions, tangled = _match_sorted(values, order, targets)
    for r in tangled.nonzero().flatten().tolist():
        positions[r] = _match_row_reference(rows[r], targets[r])
    return positions


# Bits live in int64 words of 52 bits: below 2**53 a word converts to float64 exactly, so
# frexp finds its lowest and highest set bits exactly.
_WORD_BITS = 52


def _lowest_bit_plus_one(words: torch.Tensor) -> torch.Tensor:
    """1 + index of the lowest set bit of each int64 word (< 2**52); 0 for a zero word.

    (The +1 is frexp's exponent; callers fold the -1 into precomputed offsets.)"""
    return torch.frexp((words & -words).double()).exponent


def _highest_bit_plus_one(words: torch.Tensor) -> torch.Tensor:
    """1 + index of the highest set bit of each int64 word (< 2**52); 0 for a zero word."""
    return torch.frexp(words.double()).exponent


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool ``[R, m]`` -> int64 words ``[R, m // 52 + 1]``; bit i of word w is flag 52 w + i.

    The spare room past ``m`` means that index ``m`` itself is always addressable.
    """
    num_rows, m = flags.shape
    num_words = m // _WORD_BITS + 1
    padded = torch.zeros(num_rows, num_words * _WORD_BITS, dtype=torch.int64, device=flags.device)
    padded[:, :m] = flags
    weights = torch.ones(_WORD_BITS, dtype=torch.int64, device=flags.device) << torch.arange(
        _WORD_BITS, device=flags.device
    )
    return (padded.view(num_rows, num_words, _WORD_BITS) * weights).sum(dim=2)


class _RowBitsets:
    """One bitset per row with summary levels, so that the nearest set bit above or below
    any index is found in a few word operations per level (at most 3 levels up to n = 140k).

    ``levels[0]`` ``[R, W0]`` holds the bits; bit w of ``levels[l + 1]`` says whether word w
    of ``levels[l]`` is nonzero; the last level is a single word. A search is split in two:
    ``plan`` does the arithmetic that depends only on where the search starts (many steps
    at once), ``resolve`` the few lookups that depend on the bits as they are now.
    """

    def __init__(self, flags: torch.Tensor) -> None:
        self.levels = [_pack_bits(flags)]
        while self.levels[-1].shape[1] > 1:
            self.levels.append(_pack_bits(self.levels[-1] != 0))
        num_rows = flags.shape[0]
        self.flat = [words.view(-1) for words in self.levels]
        self.row_base = [
            torch.arange(num_rows, device=flags.device) * words.shape[1] for words in self.levels
        ]

    def plan(self, index: torch.Tensor, upward: bool) -> list[tuple[torch.Tensor, ...]]:
        """Per level: flat word index, bit mask and (first bit index - 1) of the word where the
        search for the first set bit ``>= index`` (``upward``) or the last ``<= index`` looks.

        index: int64 ``[S, R]`` (S searches per row); each entry of the result is ``[S, R]``.
        """
        plan = []
        for row_base in self.row_base:
            word = index.div(_WORD_BITS, rounding_mode="floor")
            bit = index - word * _WORD_BITS
            if upward:
                mask = -(1 << bit)
            else:  # nothing lies before index -1
                mask = torch.where(index >= 0, (2 << bit) - 1, 0)
            plan.append((row_base + word.clamp(min=0), mask, word * _WORD_BITS - 1))
            index = word + 1 if upward else word - 1
        return plan

    def resolve(self, plan: list[tuple[torch.Tensor, ...]], upward: bool) -> torch.Tensor:
        """Index ``[R]`` of the nearest set bit for one planned search (``plan`` entries
        sliced to ``[R]``); it must exist at level 0. Rows whose answer comes from this level
        ignore what the level above found (then garbage, clamped to a valid index)."""
        extreme = _lowest_bit_plus_one if upward else _highest_bit_plus_one
        bits = [
            flat.index_select(0, word) & mask
            for flat, (word, mask, _) in zip(self.flat, plan, strict=True)
        ]
        found = plan[-1][2] + extreme(bits[-1])
        for level in range(len(self.levels) - 2, -1, -1):
            # found: the nearest nonempty word of this level, in case this word has none.
            upper = self.flat[level].index_select(0, self.row_base[level] + found.clamp(min=0))
            here = plan[level][2] + extreme(bits[level])
            from_upper = (found * _WORD_BITS - 1) + extreme(upper)
            found = torch.where(bits[level] != 0, here, from_upper)
        return found

    def clear(self, where: torch.Tensor, index: torch.Tensor) -> None:
        """Clear bit ``index[r]`` of each row r where bool ``where[r]`` (both ``[R]``), and
        the summary bits of words that become empty.

        Every row is written, a cleared bit or not: no data-dependent indexing, so that a
        step of the matching never waits for the GPU (``nonzero`` or ``any`` would)."""
        for flat, row_base in zip(self.flat, self.row_base, strict=True):
            word = index.div(_WORD_BITS, rounding_mode="floor")
            at = row_base + word
            bit = torch.where(where, 1 << (index - word * _WORD_BITS), 0)
            remaining = flat.index_select(0, at) & ~bit
            flat.index_copy_(0, at, remaining)  # one word per row: no index repeats
            where = where & (remaining == 0)
            index = word


# Searches are planned this many steps at a time: a few [steps, R] arrays of memory.
_PLAN_STEPS = 32


def _match_sorted(
    values: torch.Tensor, order: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy matching on pre-sorted rows.

    values: sorted float32 ``[R, n]``; order: int64 ``[R, n]`` original position of each sorted
    value (stable sort); targets: float32 ``[R, k]``. Returns positions int64 ``[R, k]`` and
    ``tangled`` bool ``[R]``: rows where different values tied in distance, whose positions
    must be recomputed by the reference loop.

    Sorted indices are padded by one sentinel each side (0 and n + 1, at -inf and +inf) so a
    search never runs off a row. A bitset marks the starts of groups that still have a free
    position; the nearest free group above a target is the first set bit after its insertion
    point, the nearest below the last set bit before it: a few word operations per row and
    step, whatever has been used up.
    """
    num_rows, n = values.shape
    width = n + 2
    device = values.device
    inf = torch.full((num_rows, 1), torch.inf, device=device)
    padded = torch.cat([-inf, values, inf], dim=1).flatten()
    sentinel_position = torch.full((num_rows, 1), n, dtype=torch.int64, device=device)
    position = torch.cat([sentinel_position, order, sentinel_position], dim=1).flatten()

    index = torch.arange(width, device=device).expand(num_rows, -1)
    starts_group = torch.ones(num_rows, width, dtype=torch.bool, device=device)
    starts_group[:, 2 : n + 1] = values[:, 1:] != values[:, :-1]
    next_start = torch.where(starts_group, index, width).flip(1).cummin(dim=1).values.flip(1)
    group_size = torch.ones(num_rows, width, dtype=torch.int64, device=device)
    group_size[:, : n + 1] = next_start[:, 1:] - index[:, : n + 1]
    group_size[:, n + 1] = 0  # the right sentinel is its own next distinct value
    group_size = group_size.flatten()

    free = _RowBitsets(starts_group)  # group starts with a free position; sentinels stay set
    row_base = torch.arange(num_rows, device=device) * width
    taken = torch.zeros(num_rows * width, dtype=torch.int64, device=device)
    result = torch.empty(targets.shape[1], num_rows, dtype=torch.int64, device=device)
    tangled = torch.zeros(num_rows, dtype=torch.bool, device=device)
    # Insertion points do not change as values get used: find them all at once. As a padded
    # index, ``below`` is the last value < target (or the left sentinel).
    below_all = torch.searchsorted(values, targets).t().contiguous()  # [k, R]
    targets = targets.t().contiguous()  # [k, R]: one contiguous column per step

    for step in range(targets.shape[0]):
        if step % _PLAN_STEPS == 0:
            below_block = below_all[step : step + _PLAN_STEPS]
            right_plan = free.plan(below_block + 1, upward=True)
            left_plan = free.plan(below_block, upward=False)
        offset = step % _PLAN_STEPS
        target = targets[step]
        right_local = free.resolve([[a[offset] for a in p] for p in right_plan], upward=True)
        left_local = free.resolve([[a[offset] for a in p] for p in left_plan], upward=False)
        right_group = row_base + right_local
        left_group = row_base + left_local
        right = right_group + _at(taken, right_group)
        left = left_group + _at(taken, left_group)
        right_distance = _at(padded, right) - target
        left_distance = target - _at(padded, left)
        right_position = _at(position, right)
        left_position = _at(position, left)
        take_left = (left_distance < right_distance) | (
            (left_distance == right_distance) & (left_position < right_position)
        )
        result[step] = torch.where(take_left, left_position, right_position)

        best = torch.minimum(left_distance, right_distance)
        beyond_right = _at(padded, right_group + _at(group_size, right_group)) - target
        beyond_left = target - _at(padded, left_group - (left_local != 0).long())
        tangled |= (beyond_right == right_distance) & (right_distance == best)
        tangled |= (beyond_left == left_distance) & (left_distance == best)

        group = torch.where(take_left, left_group, right_group)
        now_taken = _at(taken, group) + 1
        taken.index_copy_(0, group, now_taken)  # one group per row: no index repeats
        used_up = now_taken == _at(group_size, group)
        free.clear(used_up, torch.where(take_left, left_local, right_local))
    return result.t(), tangled


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for 1-D tensors (index_select is several times faster here)."""
    return values.index_select(0, index)


def _match_row_reference(row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference loop for one row ``[n]`` and its targets ``[k]``: int64 positions ``[k]``."""
    pool_values = row.detach().cpu().numpy().astype(np.float32)
    pool_positions = np.arange(pool_values.size)
    taken = []
    for target in targets.detach().cpu().numpy():
        nearest = int(np.argmin(np.abs(pool_values - target)))
        taken.append(pool_positions[nearest])
        pool_values = np.delete(pool_values, nearest)
        pool_positions = np.delete(pool_positions, nearest)
    return torch.tensor(taken, dtype=torch.int64, device=row.device)
