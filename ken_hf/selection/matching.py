"""KEN's greedy matching: each grid point, in priority order, takes the nearest free position.

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


def _lowest_bit(words: torch.Tensor) -> torch.Tensor:
    """Index of the lowest set bit of each int64 word ``[R]`` (< 2**52); -1 for 0."""
    return torch.frexp((words & -words).double()).exponent.long() - 1


def _highest_bit(words: torch.Tensor) -> torch.Tensor:
    """Index of the highest set bit of each int64 word ``[R]`` (< 2**52); -1 for 0."""
    return torch.frexp(words.double()).exponent.long() - 1


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
    of ``levels[l]`` is nonzero; the last level is a single word.
    """

    def __init__(self, flags: torch.Tensor) -> None:
        self.levels = [_pack_bits(flags)]
        while self.levels[-1].shape[1] > 1:
            self.levels.append(_pack_bits(self.levels[-1] != 0))

    def next_at_or_after(self, index: torch.Tensor, level: int = 0) -> torch.Tensor:
        """First set bit ``>= index`` per row (``index`` ``[R]``); it must exist."""
        words = self.levels[level]
        word = index // _WORD_BITS
        bits = _word(words, word) & -(1 << (index % _WORD_BITS))
        found = word * _WORD_BITS + _lowest_bit(bits)
        if level + 1 == len(self.levels):
            return found
        later = self.next_at_or_after(word + 1, level + 1)
        from_later = later * _WORD_BITS + _lowest_bit(_word(words, later))
        return torch.where(bits != 0, found, from_later)

    def last_at_or_before(self, index: torch.Tensor, level: int = 0) -> torch.Tensor:
        """Last set bit ``<= index`` per row (``index`` ``[R]``); it must exist."""
        words = self.levels[level]
        word = index // _WORD_BITS
        bits = _word(words, word) & ((2 << (index % _WORD_BITS)) - 1)
        found = word * _WORD_BITS + _highest_bit(bits)
        if level + 1 == len(self.levels):
            return found
        earlier = self.last_at_or_before(word - 1, level + 1)
        from_earlier = earlier * _WORD_BITS + _highest_bit(_word(words, earlier))
        return torch.where(bits != 0, found, from_earlier)

    def clear(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Clear bit ``index[j]`` of row ``rows[j]``, and summary bits of emptied words."""
        for words in self.levels:
            word = index // _WORD_BITS
            remaining = words[rows, word] & ~(1 << (index % _WORD_BITS))
            words[rows, word] = remaining
            emptied = remaining == 0
            rows, index = rows[emptied], word[emptied]
            if rows.numel() == 0:
                return


def _word(words: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """``words[r, word[r]]`` ``[R]``, with out-of-range word indices clamped (their rows'
    results are discarded by the caller)."""
    return words.gather(1, word.clamp(0, words.shape[1] - 1).unsqueeze(1)).squeeze(1)


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
    result = torch.empty(targets.shape, dtype=torch.int64, device=device)
    tangled = torch.zeros(num_rows, dtype=torch.bool, device=device)
    # Insertion points do not change as values get used: find them all at once. As a padded
    # index, ``below`` is the last value < target (or the left sentinel).
    below_all = torch.searchsorted(values, targets).t().contiguous()  # [k, R]
    targets = targets.t().contiguous()  # [k, R]: one contiguous column per step

    for step in range(targets.shape[0]):
        target = targets[step]
        below = below_all[step]
        right_local = free.next_at_or_after(below + 1)
        left_local = free.last_at_or_before(below)
        right_group = row_base + right_local
        left_group = row_base + left_local
        right = right_group + taken[right_group]
        left = left_group + taken[left_group]
        right_distance = padded[right] - target
        left_distance = target - padded[left]
        right_position = position[right]
        left_position = position[left]
        take_left = (left_distance < right_distance) | (
            (left_distance == right_distance) & (left_position < right_position)
        )
        result[:, step] = torch.where(take_left, left_position, right_position)

        best = torch.minimum(left_distance, right_distance)
        beyond_right = padded[right_group + group_size[right_group]] - target
        beyond_left = target - padded[torch.where(left_local == 0, left_group, left_group - 1)]
        tangled |= (beyond_right == right_distance) & (right_distance == best)
        tangled |= (beyond_left == left_distance) & (left_distance == best)

        group = torch.where(take_left, left_group, right_group)
        now_taken = taken[group] + 1
        taken[group] = now_taken
        used_up = now_taken == group_size[group]
        if bool(used_up.any()):
            rows = used_up.nonzero().squeeze(1)
            free.clear(rows, torch.where(take_left, left_local, right_local)[rows])
    return result, tangled


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
