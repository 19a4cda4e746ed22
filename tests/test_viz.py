"""KENviz renders every view for a real subnetwork, and draws what the subnetwork holds."""

from __future__ import annotations

import io
import re
import time
import tracemalloc

import matplotlib.image
import numpy as np
import pytest
import torch

from ken_hf import KENConfig, KENSubnetwork
from ken_hf.cli import main as ken
from ken_hf.storage.format import PrunedTensor
from ken_hf.viz import (
    kept_neighbours,
    layer_figure,
    matrix_figure,
    matrix_image,
    matrix_shape,
    neighbour_figure,
    neighbour_image,
    resolve_tensor,
    summary_figure,
    write_report,
)

EMBEDDING = "bert.embeddings.word_embeddings.weight"
QUERY = "bert.encoder.layer.2.attention.self.query.weight"


def _pixels(figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    return matplotlib.image.imread(buffer)


def _dense_neighbour_counts(kept: np.ndarray) -> np.ndarray:
    """The former dense reference: kept neighbours (of 4) at each position of a bool
    ``[rows, columns]`` (int8, same shape)."""
    k = kept.astype(np.int8)
    counts = np.zeros_like(k)
    counts[1:, :] += k[:-1, :]
    counts[:-1, :] += k[1:, :]
    counts[:, 1:] += k[:, :-1]
    counts[:, :-1] += k[:, 1:]
    return counts


def _dense_blocks(values: np.ndarray, weights: np.ndarray | None, max_pixels: int) -> np.ndarray:
    """The former dense reference: weighted block means of ``values`` ``[R, C]`` (NaN where a
    block's weight is 0), blocks of ``ceil(R / max)`` by ``ceil(C / max)``."""
    rows, columns = values.shape
    block_r, block_c = -(-rows // max_pixels), -(-columns // max_pixels)
    if block_r == block_c == 1:
        out = values.astype(float)
        if weights is not None:
            out[~weights.astype(bool)] = np.nan
        return out
    w = np.ones_like(values, dtype=float) if weights is None else weights.astype(float)
    padded_r, padded_c = -(-rows // block_r) * block_r, -(-columns // block_c) * block_c
    v = np.zeros((padded_r, padded_c))
    ww = np.zeros((padded_r, padded_c))
    v[:rows, :columns] = values * w
    ww[:rows, :columns] = w
    shape = (padded_r // block_r, block_r, padded_c // block_c, block_c)
    total = v.reshape(shape).sum(axis=(1, 3))
    weight = ww.reshape(shape).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def test_kept_neighbours_by_hand():
    # 1 1 0
    # 0 1 0
    # 1 0 0   (flat 0, 1, 4, 6); 2 and 3 are not neighbours: 2 ends row 0, 3 starts row 1
    counts = kept_neighbours(np.array([0, 1, 4, 6]), (3, 3))
    assert counts.dtype == np.int8 and counts.tolist() == [1, 2, 1, 0]
    assert kept_neighbours(np.array([2, 3]), (3, 3)).tolist() == [0, 0]
    assert kept_neighbours(np.array([2, 5, 8]), (3, 3)).tolist() == [1, 2, 1]  # a column
    assert kept_neighbours(np.array([0, 1, 2, 3, 4, 5]), (2, 3)).tolist() == [2, 3, 2, 2, 3, 2]


@pytest.mark.parametrize(
    ("name", "max_pixels"),
    [
        (QUERY, 768),  # full size
        (QUERY, 7),  # blocks of 55 x 55, the last ones partial
        (EMBEDDING, 768),  # 30522 rows in blocks of 40, the last partial
        ("bert.encoder.layer.1.intermediate.dense.weight", 256),  # as layer_figure draws it
        ("bert.encoder.layer.1.intermediate.dense.bias", 100),  # rank 1: one row
    ],
)
def test_images_equal_the_dense_reference(minilm_subnetwork, name, max_pixels):
    subnetwork, _ = minilm_subnetwork
    kept = subnetwork.mask(name).numpy().reshape(matrix_shape(subnetwork, name))
    expected = _dense_blocks(kept, None, max_pixels)
    assert np.array_equal(matrix_image(subnetwork, name, max_pixels), expected)
    expected = _dense_blocks(_dense_neighbour_counts(kept), kept, max_pixels)
    assert np.array_equal(neighbour_image(subnetwork, name, max_pixels), expected, equal_nan=True)


def test_a_huge_declared_shape_is_drawn_from_its_kept_positions_alone(monkeypatch, tmp_path):
    # A hostile file may declare 10**6 x 10**6 (a dense mask: 1 TB) and keep a handful.
    name = "encoder.layer.0.dense.weight"
    side = 10**6
    positions = torch.tensor([0, 1, side, side + 1, 5 * side**2 // 10 + 7, side**2 - 1])
    pruned = PrunedTensor(torch.Size([side, side]), torch.float32, positions)
    pruned.values = torch.ones(len(positions))
    config = KENConfig(keep_ratio=0.25, base_model_name_or_path="hostile")
    subnetwork = KENSubnetwork(config, {name: pruned}, {}, {})

    def no_dense_mask(self):
        raise AssertionError("a dense mask of the declared shape was built")

    monkeypatch.setattr(PrunedTensor, "mask", no_dense_mask)
    # Memory: both images and the working of one, a few float64 images of pixels.
    for max_pixels, most in [(768, 4 * 768**2 * 8), (64, 2**20)]:
        tracemalloc.start()
        try:
            start = time.perf_counter()
            kept = matrix_image(subnetwork, name, max_pixels)
            neighbours = neighbour_image(subnetwork, name, max_pixels)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert seconds < 1 and peak < most, (max_pixels, seconds, peak)
    kept, neighbours = matrix_image(subnetwork, name), neighbour_image(subnetwork, name)
    block = -(-side // 768)  # 1303 rows and columns; the last block is partial
    assert kept.shape == neighbours.shape == (768, 768)
    assert kept[0, 0] == pytest.approx(4 / block**2)
    assert neighbours[0, 0] == 2 and np.isnan(neighbours[0, 1])
    last = side - 767 * block
    assert kept[-1, -1] == pytest.approx(1 / last**2) and neighbours[-1, -1] == 0
    assert np.count_nonzero(kept) == 3 and np.count_nonzero(np.isfinite(neighbours)) == 3
    report = write_report(subnetwork, tmp_path, tensors=[name])  # what `ken viz` draws
    assert len(list(tmp_path.glob("*.png"))) == 4 and name in report.read_text()


def test_small_matrix_is_drawn_exactly(minilm_subnetwork):
    subnetwork, _ = minilm_subnetwork
    image = matrix_image(subnetwork, QUERY)
    assert image.shape == (384, 384)
    assert np.array_equal(image == 1, subnetwork.mask(QUERY).numpy())
    assert image.mean() == pytest.approx(0.25)


def test_large_embedding_is_reduced_and_keeps_the_kept_fraction(minilm_subnetwork):
    subnetwork, _ = minilm_subnetwork
    image = matrix_image(subnetwork, EMBEDDING)
    assert max(image.shape) <= 768 and image.shape[1] == 384
    block_rows = -(-30522 // 768)
    weights = np.full(image.shape[0], block_rows, dtype=float)
    weights[-1] = 30522 - block_rows * (image.shape[0] - 1)  # the last block is partial
    drawn = np.average(image.mean(axis=1), weights=weights)
    kept = subnetwork.pruned[EMBEDDING]
    assert drawn == pytest.approx(kept.positions.numel() / kept.shape.numel(), rel=1e-9)
    counts = neighbour_image(subnetwork, EMBEDDING)
    assert np.nanmin(counts) >= 0 and np.nanmax(counts) <= 4 and np.isfinite(counts).any()


@pytest.mark.parametrize("view", ["matrix", "neighbours", "layers", "summary"])
def test_every_view_renders_something(minilm_subnetwork, view):
    subnetwork, folder = minilm_subnetwork
    figure = {
        "matrix": lambda: matrix_figure(folder, EMBEDDING),  # from the saved folder alone
        "neighbours": lambda: neighbour_figure(subnetwork, QUERY),
        "layers": lambda: layer_figure(subnetwork, "intermediate.dense.weight"),
        "summary": lambda: summary_figure(subnetwork),
    }[view]()
    pixels = _pixels(figure)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # not blank
    if view == "layers":
        assert len(figure.axes) >= 12  # 6 layers x 2 views (+ colour bars)


def test_summary_records_kept_and_reset_changes(minilm_subnetwork):
    subnetwork, _ = minilm_subnetwork
    pruned = subnetwork.pruned[QUERY]
    assert pruned.delta_kept is not None and pruned.delta_reset is not None
    assert pruned.delta_kept >= 0 and pruned.delta_reset >= 0


def test_cli_writes_pngs_and_a_self_contained_html_report(minilm_subnetwork, tmp_path, capsys):
    _, folder = minilm_subnetwork
    assert ken(["viz", str(folder), "--tensor", QUERY, "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.html").read_text()
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(pngs) == 4  # summary, matrix, neighbours, layers
    assert re.findall(r'src="([^"]+)"', report) and all(
        src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]+)"', report)
    )
    anchors = re.findall(r'href="#([^"]+)"', report)
    assert len(anchors) == 4 and all(f'id="{a}"' in report for a in anchors)
    assert ken(["viz", str(folder), "--tensor", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "'nope' is not pruned" in capsys.readouterr().err


def test_report_default_tensors(minilm_subnetwork, tmp_path):
    subnetwork, _ = minilm_subnetwork
    path = write_report(subnetwork, tmp_path)
    assert EMBEDDING in path.read_text()


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        (QUERY, ("matrix", QUERY)),
        ("layer.2.attention.self.query.weight", ("matrix", QUERY)),
        ("word_embeddings", ("matrix", EMBEDDING)),
        ("attention.self.query.weight", ("layers", "attention.self.query.weight")),
        ("query", ("layers", "attention.self.query.weight")),
        ("query.bias", ("layers", "attention.self.query.bias")),
        ("intermediate.dense", ("layers", "intermediate.dense.weight")),
    ],
)
def test_tensor_names_resolve_by_suffix_or_family(minilm_subnetwork, text, meant):
    subnetwork, _ = minilm_subnetwork
    assert resolve_tensor(subnetwork, text) == meant


@pytest.mark.parametrize(
    ("text", "listed"),
    [
        ("layer.2.attention.self.qurey.weight", QUERY),  # closest names
        ("dense", "intermediate.dense.weight"),  # ambiguous: the candidates
        ("output.dense", "attention.output.dense.weight"),
    ],
)
def test_unresolved_tensor_names_list_candidates(minilm_subnetwork, text, listed):
    subnetwork, _ = minilm_subnetwork
    with pytest.raises(ValueError, match=re.escape(listed)):
        resolve_tensor(subnetwork, text)


def test_family_view_spans_every_layer_of_that_family_only(minilm_subnetwork, tmp_path):
    subnetwork, folder = minilm_subnetwork
    argv = ["viz", str(folder), "--tensor", "output.dense.weight", "--out", str(tmp_path)]
    assert ken(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "layers-output.dense.weight.png",
        "summary.png",
    ]
    figure = layer_figure(subnetwork, "output.dense.weight")
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == [f"layer {i}" for i in range(6)]  # not attention.output.dense as well
