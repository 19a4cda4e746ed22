"""Baseline selection rules with KEN's shape: per row (as KEN sees rows), k positions kept.

- ``largest_delta_select``: the k positions whose value moved most in fine-tuning,
  ``|finetuned - pretrained|`` (ties: lower position first);
- ``random_select``: k positions drawn uniformly per row (reproducible with ``seed``).

They return masks like ``ken_select`` so that they store, apply and compare the same way.
"""

from __future__ import annotations

import torch

from .rows import as_rows, check_finite, check_k, check_same_shape


def largest_delta_select(
    finetuned: torch.Tensor, k: int, *, pretrained: torch.Tensor, name: str = "weight"
) -> torch.Tensor:
    """Bool mask (``finetuned``'s shape): the ``min(k, n)`` largest ``|finetuned -
    pretrained|`` of each row, lower positions first among equal changes."""
    k = check_k(k)
    check_same_shape(pretrained, finetuned, name)
    check_finite(finetuned, name)
    change = as_rows((finetuned.float() - pretrained.to(finetuned.device).float()).abs())
    order = torch.sort(change, dim=1, descending=True, stable=True).indices[:, :k]
    return _mask_from(order, finetuned)


def random_select(
    weight: torch.Tensor, k: int, *, seed: int = 0, name: str = "weight"
) -> torch.Tensor:
    """Bool mask (``weight``'s shape): ``min(k, n)`` positions per row, uniformly at random."""
    k = check_k(k)
    check_finite(weight, name)
    rows = as_rows(weight)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows.shape, generator=generator)
    order = scores.topk(min(k, rows.shape[1]), dim=1).indices.to(weight.device)
    return _mask_from(order, weight)


def _mask_from(order: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bool mask of ``like``'s shape with True at ``order`` ``[rows, kept]`` per row."""
    rows = as_rows(like)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=like.device)
    mask.scatter_(1, order, True)
    return mask.reshape(like.shape)
