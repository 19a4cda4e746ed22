"""KENviz renders every view for a real subnetwork, and draws what the subnetwork holds."""

from __future__ import annotations

import io
import re

import matplotlib.image
import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification

from ken_hf import KENConfig, KENSubnetwork
from ken_hf.cli import main as ken
from ken_hf.viz import (
    layer_figure,
    matrix_figure,
    matrix_image,
    neighbour_counts,
    neighbour_figure,
    neighbour_image,
    resolve_tensor,
    summary_figure,
    write_report,
)

EMBEDDING = "bert.embeddings.word_embeddings.weight"
QUERY = "bert.encoder.layer.2.attention.self.query.weight"


@pytest.fixture(scope="module")
def minilm_subnetwork(minilm_finetune, tmp_path_factory):
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    config = KENConfig(keep_ratio=0.25, base_model_name_or_path=minilm_finetune["base"])
    subnetwork = KENSubnetwork.from_weights(
        base, minilm_finetune["model"], config, new_tensors=minilm_finetune["new"], progress=False
    )
    folder = tmp_path_factory.mktemp("viz") / "ken"
    subnetwork.save_pretrained(folder)
    return subnetwork, folder


def _pixels(figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    return matplotlib.image.imread(buffer)


def test_neighbour_counts_by_hand():
    kept = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=bool)
    counts = neighbour_counts(kept)
    assert counts[0, 0] == 1 and counts[0, 1] == 2 and counts[1, 1] == 1 and counts[2, 0] == 0


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
