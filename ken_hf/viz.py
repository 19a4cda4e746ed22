"""KENviz: pictures of what KEN kept.

Views (as in the paper, plus a summary), each a matplotlib figure:

- ``matrix_figure``: the kept positions of one matrix; rows are output features, columns
  input features; reset positions blank.
- ``neighbour_figure``: for each kept position, how many of its 4 horizontal and vertical
  neighbours are kept too.
- ``layer_figure``: both views for one matrix name across every layer.
- ``summary_figure``: per tensor and per layer, the kept fraction and the mean
  |fine-tuned - pre-trained| of kept against reset positions.

Large matrices are reduced to at most ``max_pixels`` per side by block averages (kept
fraction, or mean neighbour count of kept positions, per block), so a 30522 x 384
embedding renders in well under a second and still shows its structure. The images are
counted from the kept positions alone, in memory O(kept positions + pixels): never a
dense mask of the shape a subnetwork declares (a hostile file may declare 10**6 x 10**6).
Colour maps are cividis (sequential) and a colour-blind-safe qualitative palette.
Everything works from the saved subnetwork alone.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import logging
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import KENConfigError, MissingExtraError
from .storage.format import KENFormatError
from .subnetwork import KENSubnetwork

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# A subnetwork in memory, or a saved folder / Hub id to read it from.
Source = KENSubnetwork | str | Path

logger = logging.getLogger(__name__)

MAX_PIXELS = 768
_LAYER = re.compile(r"\.(\d+)\.")


def _pyplot():
    """matplotlib's pyplot (Agg), or ``MissingExtraError`` saying how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingExtraError(
            f'KENviz needs matplotlib (pip install "ken-hf[viz]"): {error}'
        ) from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise ``MissingExtraError`` (``pip install "ken-hf[viz]"``) unless matplotlib imports:
    a check before anything is read, since every view draws with it."""
    _pyplot()


def load(subnetwork: Source) -> KENSubnetwork:
    """A subnetwork in memory, or read from a saved folder (or Hub id)."""
    if isinstance(subnetwork, KENSubnetwork):
        return subnetwork
    return KENSubnetwork.from_pretrained(subnetwork)


def matrix_shape(subnetwork: KENSubnetwork, name: str) -> tuple[int, int]:
    """``(rows, columns)`` as KEN sees tensor ``name`` (rank-1 tensors: one row)."""
    shape = subnetwork.pruned[name].shape
    return (1, shape.numel()) if len(shape) <= 1 else (shape[0], shape.numel() // max(1, shape[0]))


def kept_positions(subnetwork: KENSubnetwork, name: str) -> np.ndarray:
    """int64 ``[K]``: the kept flat (row-major) positions of ``name``, checked increasing
    and inside its declared shape, since every picture is computed from them alone."""
    positions = subnetwork.pruned[name].positions.cpu().numpy().astype(np.int64, copy=False)
    rows, columns = matrix_shape(subnetwork, name)
    if rows * columns > np.iinfo(np.int64).max // 2:  # p + columns must not overflow
        raise KENFormatError(
            f"tensor {name!r} declares {rows} x {columns} values: too many to draw"
        )
    if positions.size and (positions[0] < 0 or positions[-1] >= rows * columns):
        raise KENFormatError(f"tensor {name!r}: a kept position lies outside its shape")
    if positions.size > 1 and not (positions[1:] > positions[:-1]).all():
        raise KENFormatError(f"tensor {name!r}: kept positions are not strictly increasing")
    return positions


def kept_neighbours(positions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """For each of the increasing flat ``positions`` ``[K]`` kept in a ``shape`` =
    ``(rows, columns)`` matrix: how many of its 4 horizontal and vertical neighbours are
    kept too (int8 ``[K]``). Memory O(K), whatever the shape declares."""
    _, columns = shape
    counts = np.zeros(positions.size, dtype=np.int8)
    if positions.size < 2:
        return counts
    column = positions % columns
    # Increasing positions: p - 1 is kept iff it comes just before p (same row: column > 0).
    beside = (positions[1:] - positions[:-1] == 1) & (column[1:] != 0)
    counts[1:] += beside  # the left one of each kept position
    counts[:-1] += beside  # and, seen from that one, its right one
    # The one a row below p: p + columns, found by a search (no dense array of the shape).
    below = positions + columns
    at = np.searchsorted(positions, below)
    found = at < positions.size
    found[found] = positions[at[found]] == below[found]
    counts += found  # the one below each kept position
    counts[at[found]] += 1  # and, seen from that one, its one above (all distinct)
    return counts


def _blocks(
    positions: np.ndarray, shape: tuple[int, int], max_pixels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How images of at most ``max_pixels`` per side split a ``shape`` = ``(rows,
    columns)`` matrix: blocks of ``ceil(rows / max)`` rows by ``ceil(columns / max)``
    columns, the last ones possibly partial.

    Returns the flat (row-major) block of each of the ``positions`` (int64 ``[K]``), and
    the rows of each block row (int64 ``[n_r]``) and columns of each block column (int64
    ``[n_c]``), so partial blocks are counted exactly.
    """
    rows, columns = shape
    block_r, block_c = max(1, -(-rows // max_pixels)), max(1, -(-columns // max_pixels))
    n_r, n_c = -(-rows // block_r), -(-columns // block_c)
    high_r = np.minimum(block_r, rows - np.arange(n_r, dtype=np.int64) * block_r)
    high_c = np.minimum(block_c, columns - np.arange(n_c, dtype=np.int64) * block_c)
    columns = max(1, columns)  # an empty matrix keeps nothing
    block = (positions // columns // block_r) * n_c + (positions % columns) // block_c
    return block, high_r, high_c


def _draw_matrix(axis, image, shape, title, colour_map, vmax):
    """Draw a (reduced) matrix image with axes in the model's own rows and columns."""
    rows, columns = shape
    shown = axis.imshow(
        image,
        cmap=colour_map,
        vmin=0,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
        extent=(0, columns, rows, 0),
    )
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("input features (columns)")
    axis.set_ylabel("output features (rows)")
    return shown


def matrix_image(subnetwork: KENSubnetwork, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """What ``matrix_figure`` draws: kept fraction per block, float ``[n_r, n_c]`` of at
    most ``max_pixels`` per side (at full size, 1 at kept positions and 0 elsewhere).
    Counted from the kept positions: memory O(K + pixels), not O(rows x columns)."""
    positions = kept_positions(subnetwork, name)
    block, high_r, high_c = _blocks(positions, matrix_shape(subnetwork, name), max_pixels)
    cells = np.outer(high_r.astype(float), high_c.astype(float))  # exact: < 2**53 each
    kept = np.bincount(block, minlength=cells.size).reshape(cells.shape)
    return np.divide(kept, cells, out=cells)  # in place: a few images of memory at most


def neighbour_image(
    subnetwork: KENSubnetwork, name: str, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """What ``neighbour_figure`` draws: mean neighbour count of kept positions per block,
    float ``[n_r, n_c]`` of at most ``max_pixels`` per side (NaN where a block keeps
    nothing). Memory O(K + pixels), not O(rows x columns)."""
    positions = kept_positions(subnetwork, name)
    shape = matrix_shape(subnetwork, name)
    block, high_r, high_c = _blocks(positions, shape, max_pixels)
    pixels = high_r.size * high_c.size
    total = np.bincount(block, weights=kept_neighbours(positions, shape), minlength=pixels)
    total = total.astype(float, copy=False)  # bincount of no positions gives integers
    kept = np.bincount(block, minlength=pixels)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(total, kept, out=total)  # in place: a few images of memory at most
    total[kept == 0] = np.nan
    return total.reshape(high_r.size, high_c.size)


def matrix_figure(subnetwork: Source, name: str, max_pixels: int = MAX_PIXELS) -> Figure:
    """Kept positions of matrix ``name`` (blank = reset to pre-trained)."""
    plt = _pyplot()
    subnetwork = load(subnetwork)
    image = matrix_image(subnetwork, name, max_pixels)
    image = np.where(image > 0, image, np.nan)  # reset (or all-reset blocks) stay blank
    figure, axis = plt.subplots(figsize=(6, 5))
    pruned = subnetwork.pruned[name]
    fraction = pruned.positions.numel() / max(1, pruned.shape.numel())
    shape = matrix_shape(subnetwork, name)
    shown = _draw_matrix(axis, image, shape, f"{name}\nkept {fraction:.1%}", "cividis", 1)
    figure.colorbar(shown, ax=axis, label="kept fraction (per pixel)")
    figure.tight_layout()
    return figure


def neighbour_figure(subnetwork: Source, name: str, max_pixels: int = MAX_PIXELS) -> Figure:
    """For kept positions of ``name``: kept neighbours among the 4 adjacent (0-4)."""
    plt = _pyplot()
    subnetwork = load(subnetwork)
    image = neighbour_image(subnetwork, name, max_pixels)
    figure, axis = plt.subplots(figsize=(6, 5))
    shape = matrix_shape(subnetwork, name)
    title = f"{name}\nkept neighbours of kept positions"
    shown = _draw_matrix(axis, image, shape, title, "viridis", 4)
    figure.colorbar(shown, ax=axis, label="kept neighbours (0-4)")
    figure.tight_layout()
    return figure


def layers_of(subnetwork: KENSubnetwork, suffix: str) -> list[tuple[int, str]]:
    """``[(layer, name)]`` of the pruned tensors of family ``suffix`` (see ``tensor_family``)
    or, where none is, of those whose name ends with ``suffix`` and holds a layer number,
    in layer order."""
    found, exact = [], []
    for name in subnetwork.pruned:
        match = _LAYER.search(name)
        if name.endswith(suffix) and match:
            found.append((int(match.group(1)), name))
            if name[match.end() :] == suffix:
                exact.append(found[-1])
    return sorted(exact or found)


def layer_figure(subnetwork: Source, suffix: str, max_pixels: int = 256) -> Figure:
    """Both views of matrix ``suffix`` (e.g. ``attention.self.query.weight``) in every layer."""
    plt = _pyplot()
    subnetwork = load(subnetwork)
    layers = layers_of(subnetwork, suffix)
    if not layers:
        raise KENConfigError(f"no pruned tensor with a layer number ends with {suffix!r}")
    figure, axes = plt.subplots(2, len(layers), figsize=(2.6 * len(layers), 5.4), squeeze=False)
    for column, (layer, name) in enumerate(layers):
        kept = matrix_image(subnetwork, name, max_pixels)
        top = axes[0, column].imshow(
            np.where(kept > 0, kept, np.nan),
            cmap="cividis",
            vmin=0,
            vmax=1,
            aspect="auto",
            interpolation="nearest",
        )
        bottom = axes[1, column].imshow(
            neighbour_image(subnetwork, name, max_pixels),
            cmap="viridis",
            vmin=0,
            vmax=4,
            aspect="auto",
            interpolation="nearest",
        )
        axes[0, column].set_title(f"layer {layer}", fontsize=9)
        for axis in axes[:, column]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_ylabel("kept\n(rows = outputs)")
    axes[1, 0].set_ylabel("kept neighbours\n(rows = outputs)")
    figure.colorbar(top, ax=axes[0, :].tolist(), label="kept fraction", shrink=0.8)
    figure.colorbar(bottom, ax=axes[1, :].tolist(), label="neighbours (0-4)", shrink=0.8)
    figure.suptitle(f"{suffix} across layers (columns = input features)", fontsize=10)
    return figure


def summary_rows(subnetwork: KENSubnetwork | Mapping[str, dict]) -> list[dict]:
    """Per pruned tensor: layer (or None), kept fraction, mean |delta| kept and reset.

    ``subnetwork``: a subnetwork, or the header entries of its file (``{name: entry}``, as
    ``SubnetworkFolderWriter.entries`` gives them while the folder is being written); nothing
    is decoded for a subnetwork read from a file."""
    entries = subnetwork.entries() if isinstance(subnetwork, KENSubnetwork) else subnetwork
    rows = []
    for name, entry in entries.items():
        if entry["kind"] != "pruned":
            continue
        match = _LAYER.search(name)
        rows.append(
            {
                "name": name,
                "layer": int(match.group(1)) if match else None,
                "kept_fraction": entry["count"] / max(1, math.prod(entry["shape"])),
                "delta_kept": entry["delta"][0],
                "delta_reset": entry["delta"][1],
            }
        )
    return rows


def summary_figure(subnetwork: Source | Mapping[str, dict]) -> Figure:
    """Kept fraction per tensor family and layer (heat map); mean |fine-tuned -
    pre-trained| of kept against reset values, per layer. ``subnetwork``: as ``load``
    takes it, or a file's header entries (see ``summary_rows``)."""
    plt = _pyplot()
    rows = summary_rows(subnetwork if isinstance(subnetwork, Mapping) else load(subnetwork))
    families = sorted({_LAYER.sub(".", r["name"]) for r in rows if r["layer"] is not None})
    others = [r for r in rows if r["layer"] is None]
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    grid = np.full((len(families) + len(others), len(layers) + 1), np.nan)
    for row in rows:
        if row["layer"] is None:
            grid[len(families) + others.index(row), 0] = row["kept_fraction"]
        else:
            family = families.index(_LAYER.sub(".", row["name"]))
            grid[family, 1 + layers.index(row["layer"])] = row["kept_fraction"]
    height = max(4.0, 0.28 * grid.shape[0] + 1.5)
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [1.4, 1]}
    )
    shown = left.imshow(grid, cmap="cividis", vmin=0, vmax=1, aspect="auto")
    left.set_xticks(range(len(layers) + 1), ["(no layer)"] + [str(i) for i in layers], fontsize=7)
    labels = families + [r["name"] for r in others]
    left.set_yticks(range(len(labels)), labels, fontsize=6)
    left.set_xlabel("layer")
    left.set_title("kept fraction per tensor", fontsize=10)
    figure.colorbar(shown, ax=left, label="kept fraction", shrink=0.8)

    measured = [r for r in rows if r["layer"] is not None and r["delta_kept"] is not None]
    if measured:
        by_layer = [[r for r in measured if r["layer"] == i] for i in layers]
        kept = [np.mean([r["delta_kept"] for r in group]) for group in by_layer]
        reset = [np.mean([r["delta_reset"] or 0.0 for r in group]) for group in by_layer]
        x = np.arange(len(layers))
        right.bar(x - 0.2, kept, 0.4, color="#0072B2", label="kept positions")
        right.bar(x + 0.2, reset, 0.4, color="#E69F00", label="reset positions")
        right.set_xticks(x, [str(i) for i in layers])
        right.legend()
    else:
        right.text(0.5, 0.5, "not recorded in this subnetwork", ha="center", va="center")
    right.set_xlabel("layer")
    right.set_ylabel("mean |fine-tuned - pre-trained|")
    right.set_title("how far kept and reset values had moved", fontsize=10)
    figure.tight_layout()
    return figure


def summary_png(subnetwork: Source | Mapping[str, dict]) -> bytes:
    """``summary_figure`` as PNG bytes (what the model card shows)."""
    return _png(summary_figure(subnetwork))


def summary_png_if_available(subnetwork: Source | Mapping[str, dict]) -> bytes | None:
    """``summary_png``, or None and one logged line when matplotlib is not installed (what
    ``KENCallback`` saves beside the model card: a run never fails for want of a picture)."""
    try:
        require_matplotlib()
    except MissingExtraError as error:
        logger.warning(f"KEN: no summary picture saved; {error}")
        return None
    return summary_png(subnetwork)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    _pyplot().close(figure)
    return buffer.getvalue()


def tensor_family(name: str) -> str | None:
    """The part of ``name`` after its layer number (``attention.self.query.weight`` for
    ``bert.encoder.layer.0.attention.self.query.weight``); None without a layer number."""
    match = _LAYER.search(name)
    return name[match.end() :] if match else None


def resolve_tensor(subnetwork: KENSubnetwork, text: str) -> tuple[Literal["matrix", "layers"], str]:
    """What ``text`` names among the pruned tensors of ``subnetwork``:

    - ``("matrix", name)``: one pruned tensor, by its full name, a unique end of it
      (``layer.0.attention.self.query.weight``) or a unique part of a tensor without a layer
      number (``word_embeddings``);
    - ``("layers", family)``: one family across layers (what ``layer_figure`` draws), by its
      name after the layer number (``attention.self.query.weight``) or a unique part of
      that (``query``).

    Parts are whole dot-separated words; where a part fits both a matrix and a rank-1
    tensor (``query``: weight and bias), the matrix is meant. Raises ``KENConfigError`` listing
    the candidates when ``text`` is ambiguous, or the closest names when nothing fits.
    """
    names = list(subnetwork.pruned)
    if not names:
        raise KENConfigError("this subnetwork holds no pruned tensor")
    if text in subnetwork.pruned:
        return "matrix", text
    ends = [name for name in names if name.endswith("." + text)]
    if len(ends) == 1:
        return "matrix", ends[0]
    layered: dict[str, str] = {}  # family -> one of its tensors
    unlayered: list[str] = []
    for name in names:
        family = tensor_family(name)
        if family:
            layered.setdefault(family, name)
        else:
            unlayered.append(name)

    def matrices_first(candidates: list[str]) -> list[str]:
        """The matrices among ``candidates`` where some are matrices and some are not."""
        matrices = [c for c in candidates if len(subnetwork.pruned[layered.get(c, c)].shape) == 2]
        return matrices or candidates

    if text in layered:
        return "layers", text
    families = matrices_first([family for family in layered if _has_part(family, text)])
    if len(families) == 1:
        return "layers", families[0]
    alone = matrices_first([name for name in unlayered if _has_part(name, text)])
    if not families and len(alone) == 1:
        return "matrix", alone[0]
    candidates = families or alone or ends
    if candidates:
        shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise KENConfigError(f"tensor {text!r} is ambiguous: it fits {shown}")
    close = difflib.get_close_matches(text, names + list(layered), n=3)
    hint = f"closest: {', '.join(close)}" if close else f"names look like {names[0]!r}"
    raise KENConfigError(f"tensor {text!r} is not pruned in this subnetwork ({hint})")


def _has_part(name: str, text: str) -> bool:
    """Whether ``text`` is a run of whole dot-separated words of ``name``."""
    return f".{text}." in f".{name}."


def write_report(subnetwork: Source, out_dir: str | Path, tensors: list[str] | None = None) -> Path:
    """Write PNG files and one self-contained ``report.html`` (images embedded, a table of
    contents) into ``out_dir`` and return the HTML path.

    ``tensors`` (default: the three largest pruned matrices) are read by ``resolve_tensor``:
    a tensor gets its kept positions, kept neighbours and the layer view of its family; a
    family gets its layer view; a summary comes first. Everything is drawn before ``out_dir``
    is created, and a folder this call created is removed again if writing fails.
    """
    require_matplotlib()
    subnetwork = load(subnetwork)
    if tensors is None:
        matrices = [n for n, p in subnetwork.pruned.items() if len(p.shape) == 2]
        tensors = sorted(matrices, key=lambda n: -subnetwork.pruned[n].shape.numel())[:3]
    views = [resolve_tensor(subnetwork, text) for text in tensors]
    sections: dict[str, tuple[str, bytes]] = {
        "summary": ("Summary", _png(summary_figure(subnetwork)))
    }
    for view, name in views:
        if view == "matrix":
            sections[f"matrix-{name}"] = (
                f"Kept positions: {name}",
                _png(matrix_figure(subnetwork, name)),
            )
            sections[f"neighbours-{name}"] = (
                f"Kept neighbours: {name}",
                _png(neighbour_figure(subnetwork, name)),
            )
        family = name if view == "layers" else tensor_family(name)
        if family and f"layers-{family}" not in sections:
            sections[f"layers-{family}"] = (
                f"Across layers: {family}",
                _png(layer_figure(subnetwork, family)),
            )
    return _write_pages(subnetwork, Path(out_dir), sections)


def _write_pages(
    subnetwork: KENSubnetwork, out: Path, sections: dict[str, tuple[str, bytes]]
) -> Path:
    """Write each section's PNG and ``report.html`` into ``out``; on failure, remove the
    folders this call created (never one that existed before)."""
    from .utils.atomic_files import write_bytes_atomic, write_text_atomic

    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        body, contents = [], []
        for anchor, (title, png) in sections.items():
            file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", anchor) + ".png"
            write_bytes_atomic(out / file_name, png)  # replaces a link there, never follows it
            encoded = base64.b64encode(png).decode()
            contents.append(f'<li><a href="#{html.escape(anchor)}">{html.escape(title)}</a></li>')
            body.append(
                f'<h2 id="{html.escape(anchor)}">{html.escape(title)}</h2>\n'
                f'<img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'
            )
        config = subnetwork.config
        rule = f"k = {config.k}" if config.k else f"keep ratio {config.keep_ratio:g}"
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>KENviz</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
            "</style></head><body>"
            f"<h1>KENviz: {html.escape(str(config.base_model_name_or_path))}</h1>"
            f"<p>{html.escape(rule)}; {len(subnetwork.pruned)} pruned tensors, "
            f"{subnetwork.kept_fraction():.1%} of their values kept.</p>"
            f"<ul>{''.join(contents)}</ul>{''.join(body)}</body></html>"
        )
        report = out / "report.html"
        write_text_atomic(report, page)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return report
