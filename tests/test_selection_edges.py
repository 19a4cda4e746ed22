"""Edge cases of the spec, half precision, chunking, and the tie rules that need care."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES
from sklearn.neighbors import KernelDensity

from ken_hf import KENConfigError, KENError, ken_prune, ken_select, ken_select_many
from ken_hf.selection.density import even_grid, rounded_densities, silverman_bandwidth
from ken_hf.selection.matching import greedy_match
from oracle import oracle_select


def _real_rows(minilm_weights, count=64):
    return minilm_weights["encoder.layer.2.attention.self.value.weight"][:count].clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_match_oracle_on_upcast_values(minilm_weights, dtype, selection_device):
    weight = _real_rows(minilm_weights).to(dtype)
    on_device = weight.to(selection_device)
    for k in (96, 192):
        expected, expected_compat = oracle_select(weight.float().numpy(), k)
        mask = ken_select(on_device, k)
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert mask.device == on_device.device
        assert (mask.cpu().numpy() == expected).all()
        compat = ken_select(on_device, k, compat=True)
        assert (compat.cpu().numpy() == expected_compat).all()


def test_half_precision_compat_keeps_more_than_k(minilm_weights, selection_device):
    weight = _real_rows(minilm_weights).to(selection_device, torch.bfloat16)
    compat = ken_select(weight, 96, compat=True)
    # bf16 rows repeat values, and value-based keeping keeps every copy of a matched value.
    assert (compat.sum(dim=1) > 96).float().mean() > 0.9
    assert (ken_select(weight, 96).sum(dim=1) == 96).all()


def test_constant_rows_keep_the_first_k_positions(selection_device):
    weight = torch.full((3, 10), 0.25, device=selection_device)
    weight[1] = 0.0
    mask = ken_select(weight, 4)
    assert mask[:, :4].all() and not mask[:, 4:].any()
    assert torch.equal(ken_select(weight, 4, compat=True), mask)


def test_k_at_least_row_width_keeps_everything(minilm_weights, selection_device):
    weight = _real_rows(minilm_weights, 4).to(selection_device)
    assert ken_select(weight, weight.shape[1]).all()
    assert ken_select(weight, 10 * weight.shape[1], compat=True).all()


@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_tiny_rows_match_oracle(n, k, selection_device):
    rng = np.random.default_rng(n * 10 + k)
    weight = torch.from_numpy(rng.standard_normal((50, n)).astype(np.float32))
    expected, expected_compat = oracle_select(weight.numpy(), k)
    on_device = weight.to(selection_device)
    assert (ken_select(on_device, k).cpu().numpy() == expected).all()
    assert (ken_select(on_device, k, compat=True).cpu().numpy() == expected_compat).all()


def test_rank_one_tensor_is_one_row(minilm_weights, selection_device):
    bias = minilm_weights["encoder.layer.0.intermediate.dense.bias"]
    mask = ken_select(bias.to(selection_device), 100).cpu()
    assert mask.shape == bias.shape and int(mask.sum()) == 100
    assert (mask.numpy() == oracle_select(bias.numpy(), 100)[0]).all()


def test_rank_three_tensor_rows_are_flattened_dim0_slices(minilm_weights, selection_device):
    weight = _real_rows(minilm_weights, 16).reshape(16, 12, 32).to(selection_device)
    mask = ken_select(weight, 50)
    assert mask.shape == weight.shape
    assert (mask.reshape(16, -1).sum(dim=1) == 50).all()
    flat = ken_select(weight.reshape(16, -1), 50)
    assert torch.equal(mask.reshape(16, -1), flat)


@pytest.mark.parametrize("bad_k", [0, -3, 2.5, "7", True, None])
def test_bad_k_is_a_value_error(bad_k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ken_select(torch.randn(4, 8), bad_k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_the_tensor(bad, selection_device):
    weight = torch.randn(4, 8, device=selection_device)
    weight[2, 3] = bad
    with pytest.raises(ValueError, match="'encoder.query'.*NaN/Inf"):
        ken_select(weight, 3, name="encoder.query")
    with pytest.raises(ValueError, match="'layer.7'"):
        ken_select_many({"ok": torch.randn(3, 3, device=selection_device), "layer.7": weight}, 2)


def test_integer_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match="'position_ids' has dtype torch.int64"):
        ken_select(torch.arange(10), 3, name="position_ids")


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match="'classifier.weight'.*\\(2, 8\\).*\\(3, 8\\)"):
        ken_prune(torch.zeros(2, 8), torch.zeros(3, 8), 2, name="classifier.weight")


def test_a_name_missing_from_minus_is_refused_by_name():
    weights = {"layer.0.weight": torch.randn(4, 8), "layer.1.weight": torch.randn(4, 8)}
    with pytest.raises(KENError, match="minus has no tensor 'layer.1.weight'"):
        ken_select_many(weights, 2, minus={"layer.0.weight": torch.randn(4, 8)})


@pytest.mark.parametrize("value", ["numba", "TORCH"])
def test_a_bad_backend_variable_is_a_config_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("KEN_HF_SELECT_BACKEND", value)
    with pytest.raises(KENConfigError, match=f"KEN_HF_SELECT_BACKEND={value!r}.*auto"):
        ken_select(torch.randn(4, 8), 2)


def test_prune_takes_kept_from_finetuned_and_the_rest_from_pretrained(
    minilm_weights, selection_device
):
    finetuned = _real_rows(minilm_weights, 8).to(selection_device)
    pretrained = finetuned + 1.0
    mask = ken_select(finetuned, 100)
    result = ken_prune(pretrained, finetuned, 100)
    assert torch.equal(result[mask], finetuned[mask])
    assert torch.equal(result[~mask], pretrained[~mask])


def test_chunking_and_batching_across_tensors_do_not_change_results(
    minilm_weights, selection_device
):
    tensors = {
        "a": minilm_weights["encoder.layer.1.attention.self.key.weight"][:40],
        "b": minilm_weights["encoder.layer.1.attention.output.LayerNorm.weight"],
        "c": minilm_weights["embeddings.position_embeddings.weight"][:30],
    }
    tensors = {name: tensor.to(selection_device) for name, tensor in tensors.items()}
    together = ken_select_many(tensors, 120)
    tiny_chunks = ken_select_many(tensors, 120, max_memory=1)  # one row per chunk
    for name, weight in tensors.items():
        alone = ken_select(weight, 120)
        assert torch.equal(together[name], alone)
        assert torch.equal(tiny_chunks[name], alone)


def test_densities_equal_sklearn_rounding_including_near_half_points(minilm_weights):
    rows = minilm_weights["encoder.layer.4.intermediate.dense.weight"][:200].contiguous()
    k = 192
    h = silverman_bandwidth(rows)
    grid = even_grid(rows, k)
    fast = rounded_densities(rows, grid, h)
    near_half = 0
    for r in range(rows.shape[0]):
        x = rows[r].numpy()
        kde = KernelDensity(kernel="gaussian", bandwidth=float(h[r])).fit(x.reshape(-1, 1))
        exact = np.exp(kde.score_samples(grid[r].numpy().reshape(-1, 1).astype(np.float64)))
        assert (fast[r].numpy() == np.array([round(float(d)) for d in exact])).all(), r
        near_half += int((np.abs(exact - np.floor(exact) - 0.5) < 1e-3).sum())
    assert near_half > 0, "the sample should hold densities within 1e-3 of a rounding boundary"


# greedy_match is the torch path's matching (CPU rows under KEN_HF_SELECT_BACKEND=torch, and
# CUDA rows); the compiled kernels' ties are covered by the oracle tests.
@pytest.mark.parametrize("device", DEVICES)
def test_equal_distances_left_and_right_lowest_position_wins(device):
    # target 0.5 sits exactly between 0.25 (position 2) and 0.75 (position 0).
    row = torch.tensor([[0.75, 3.0, 0.25, -2.0]], device=device)
    positions = greedy_match(row, torch.tensor([[0.5, 0.5]], device=device))
    assert positions.tolist() == [[0, 2]]


@pytest.mark.parametrize("device", DEVICES)
def test_equal_values_are_taken_lowest_position_first(device):
    row = torch.tensor([[0.5, 0.25, 0.5, 0.5, 0.75]], device=device)
    positions = greedy_match(row, torch.tensor([[0.5, 0.5, 0.5, 0.5]], device=device))
    assert positions.tolist() == [[0, 2, 3, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_different_values_rounding_to_the_same_float32_distance(device):
    # fl32(1 - 2**-25) == fl32(1 - 0) == 1.0: two different values tie at distance 1.0 from
    # the target, so the lower position (value 0.0 at position 0) must win.
    tiny = 2.0**-25
    row = torch.tensor([[0.0, tiny, 5.0]], dtype=torch.float32, device=device)
    assert float(torch.tensor(1.0) - torch.tensor(tiny)) == 1.0
    positions = greedy_match(row, torch.tensor([[1.0]], device=device))
    assert positions.tolist() == [[0]]
