"""ken_select equals the per-row transcription of the spec (tests/oracle.py) on real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ken_hf import ken_select_many
from oracle import oracle_select

FRACTIONS = (0.25, 0.50, 0.75)


def _minilm_sample(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows from every tensor family of MiniLM: embeddings, attention, FFN (384 and 1536
    wide), biases and LayerNorm vectors; 2,000+ rows of width 384 plus 1536-wide ones."""
    sample = {
        "embeddings.word_embeddings.weight": weights["embeddings.word_embeddings.weight"][::97][
            :300
        ],
        "embeddings.position_embeddings.weight": weights["embeddings.position_embeddings.weight"][
            :200
        ],
        "embeddings.token_type_embeddings.weight": weights[
            "embeddings.token_type_embeddings.weight"
        ],
        "embeddings.LayerNorm.weight": weights["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": weights["embeddings.LayerNorm.bias"],
        "pooler.dense.weight": weights["pooler.dense.weight"][:100],
    }
    for layer in range(6):
        prefix = f"encoder.layer.{layer}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value"):
            sample[prefix + part + ".weight"] = weights[prefix + part + ".weight"][::5]
        sample[prefix + "attention.output.dense.weight"] = weights[
            prefix + "attention.output.dense.weight"
        ][::8]
        sample[prefix + "intermediate.dense.weight"] = weights[
            prefix + "intermediate.dense.weight"
        ][::20]
        sample[prefix + "attention.output.LayerNorm.bias"] = weights[
            prefix + "attention.output.LayerNorm.bias"
        ]
        sample[prefix + "intermediate.dense.bias"] = weights[prefix + "intermediate.dense.bias"]
    sample["encoder.layer.5.output.dense.weight"] = weights["encoder.layer.5.output.dense.weight"][
        ::40
    ]
    return sample


# The oracle's masks, computed once and compared with every way of selecting:
# {(name, k): (default mask, compat mask)}.
_ORACLE: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}


def _oracle(name: str, weight: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    if (name, k) not in _ORACLE:
        _ORACLE[(name, k)] = oracle_select(weight.numpy(), k)
    return _ORACLE[(name, k)]


def _assert_matches_oracle(sample: dict[str, torch.Tensor], fraction: float, device: str) -> int:
    """Select every tensor with k = fraction of its row width on ``device``; compare with the
    oracle in both modes. Returns the number of rows checked."""
    rows_checked = 0
    by_k: dict[int, dict[str, torch.Tensor]] = {}
    for name, weight in sample.items():
        width = weight.numel() if weight.dim() <= 1 else weight[0].numel()
        by_k.setdefault(max(1, round(fraction * width)), {})[name] = weight
    for k, tensors in by_k.items():
        on_device = {name: weight.to(device) for name, weight in tensors.items()}
        fast = ken_select_many(on_device, k)
        fast_compat = ken_select_many(on_device, k, compat=True)
        for name, weight in tensors.items():
            expected, expected_compat = _oracle(name, weight, k)
            assert fast[name].device == on_device[name].device
            rows = 1 if weight.dim() <= 1 else weight.shape[0]
            mismatched = (fast[name].cpu().numpy() != expected).reshape(rows, -1).any(axis=1)
            assert not mismatched.any(), (
                f"{name} k={k}: rows {mismatched.nonzero()[0][:10].tolist()} differ from oracle"
            )
            compat = fast_compat[name].cpu().numpy()
            assert (compat == expected_compat).all(), f"{name} k={k} compat"
            rows_checked += rows
    return rows_checked


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_minilm_every_family_matches_oracle(minilm_weights, fraction, selection_device):
    rows = _assert_matches_oracle(_minilm_sample(minilm_weights), fraction, selection_device)
    assert rows >= 2000


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_smollm2_dequantized_rows_match_oracle(smollm2_weights, fraction, selection_device):
    sample = {
        name: (weight[::6] if weight.dim() > 1 else weight)
        for name, weight in smollm2_weights.items()
    }
    first = next(w for w in sample.values() if w.dim() > 1)
    assert len(torch.unique(first[0])) < first.shape[1] / 2, "expected many repeated values"
    assert _assert_matches_oracle(sample, fraction, selection_device) >= 300


def test_compat_keeps_more_than_k_on_repeated_values(smollm2_weights, selection_device):
    weight = smollm2_weights["blk.0.attn_q.weight"][:32].to(selection_device)
    k = weight.shape[1] // 4
    default = ken_select_many({"q": weight}, k)["q"]
    compat = ken_select_many({"q": weight}, k, compat=True)["q"]
    assert (default.sum(dim=1) == k).all()
    assert (compat.sum(dim=1) > k).all()
