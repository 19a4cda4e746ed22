"""The baseline selection rules: exactly k per row, the right positions, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ken_hf.selection import largest_delta_select, random_select


def test_largest_delta_keeps_the_most_changed_positions(minilm_weights):
    pretrained = minilm_weights["encoder.layer.1.attention.self.key.weight"][:32]
    torch.manual_seed(0)
    finetuned = pretrained + 0.01 * torch.randn_like(pretrained)
    mask = largest_delta_select(finetuned, 96, pretrained=pretrained)
    assert (mask.sum(dim=1) == 96).all()
    change = (finetuned - pretrained).abs().numpy()
    for row in range(32):
        expected = np.argsort(-change[row], kind="stable")[:96]
        assert set(np.flatnonzero(mask[row].numpy())) == set(expected)


def test_largest_delta_ties_go_to_lower_positions():
    pretrained = torch.zeros(1, 6)
    finetuned = torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.5, 0.0]])
    assert largest_delta_select(finetuned, 3, pretrained=pretrained).tolist() == [
        [True, True, False, True, False, False]
    ]
    with pytest.raises(ValueError, match="'q'.*shape"):
        largest_delta_select(finetuned, 3, pretrained=torch.zeros(2, 6), name="q")


def test_random_keeps_k_per_row_reproducibly():
    weight = torch.randn(50, 40)
    first = random_select(weight, 7, seed=3)
    assert first.shape == weight.shape and (first.sum(dim=1) == 7).all()
    assert torch.equal(first, random_select(weight, 7, seed=3))
    assert not torch.equal(first, random_select(weight, 7, seed=4))
    assert random_select(weight[0], 100).all()  # k >= n keeps the row
