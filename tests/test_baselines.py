"""The baseline selection rules: exactly k per row, the right positions, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ken_hf import KENConfig, KENSubnetwork
from ken_hf.selection import (
    RULES,
    ken_select,
    largest_delta_select,
    random_select,
    select_by_rule,
)


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


@pytest.mark.filterwarnings("ignore:the subnetwork names no base checkpoint")
def test_rules_through_the_subnetwork_keep_k_per_row(minilm_weights):
    """Every rule goes through KENConfig into a stored subnetwork with k kept per row;
    the delta rules see the change, not the fine-tuned values."""
    pretrained = {n: t for n, t in minilm_weights.items() if "layer.0.attention" in n}
    torch.manual_seed(0)
    finetuned = {n: t + 0.01 * torch.randn_like(t) for n, t in pretrained.items()}
    masks = {}
    for rule in RULES:
        config = KENConfig(k=40, rule=rule, seed=1)
        subnetwork = KENSubnetwork.from_weights(
            pretrained, finetuned, config, new_tensors=(), progress=False
        )
        assert set(subnetwork.pruned) == set(finetuned)
        masks[rule] = subnetwork.mask("encoder.layer.0.attention.self.query.weight")
        assert (masks[rule].sum(dim=1) == 40).all(), rule
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(
        masks["largest_delta"],
        largest_delta_select(finetuned[name], 40, pretrained=pretrained[name]),
    )
    assert torch.equal(masks["ken_delta"], ken_select(finetuned[name] - pretrained[name], 40))
    assert torch.equal(masks["ken"], ken_select(finetuned[name], 40))
    assert len({tuple(m.flatten().tolist()) for m in masks.values()}) == len(RULES)


def test_rule_arguments_are_checked():
    with pytest.raises(ValueError, match="rule 'best'"):
        KENConfig(k=3, rule="best")
    with pytest.raises(ValueError, match="compat"):
        KENConfig(k=3, rule="random", compat=True)
    with pytest.raises(ValueError, match="needs the pre-trained"):
        select_by_rule({"w": torch.ones(2, 4)}, 2, rule="largest_delta")
