"""Overlays for a person to check the segmentation and the measurements at a glance: the mid-sagittal
slice the measurements used, superior up, anterior left, pixels at their true aspect; the predicted
structures filled in colour (vertebrae, discs, canal), each vertebra's four corner points, the measuring
lines (heights, endplates, posterior walls) and the values written beside them (body heights a/m/p in
mm; per level the disc's middle height, the listhesis and the herniation probability when it is called);
the lordosis in the title. Figures use matplotlib's object API on the Agg canvas, as the other tasks do.

``write_overlays`` (``src/plot_overlays.py``): stage 02's OOF predicted masks of the first ``n`` train
images; stage 06 draws every test image with ``overlay_png``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from spine.core.io import atomic_path
from spine.core.paths import Paths
from spine.spider import io
from spine.spider.labels import CANAL, is_disc, is_partial, is_vertebra

log = logging.getLogger(__name__)

FILL = ListedColormap(
    ["#00000000", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"]
)  # none, vert, disc, canal, partial
LINE_COLOURS = {"height": "#ffdd00", "endplate": "#00e5ff", "posterior": "#ff4081"}


def _colour_classes(labels2d: np.ndarray) -> np.ndarray:
    out = np.zeros(labels2d.shape, np.uint8)
    for v in np.unique(labels2d):
        code = 1 if is_vertebra(v) else 2 if is_disc(v) else 3 if v == CANAL else 4 if is_partial(v) else 0
        out[labels2d == v] = code
    return out


def _line_colour(what: str) -> str:
    for key, colour in LINE_COLOURS.items():
        if key in what:
            return colour
    return "#ffffff"


def _value(table: pd.DataFrame, structure: str, measurement: str):
    hit = table[(table["structure"] == structure) & (table["measurement"] == measurement)]["value"]
    return float(hit.iloc[0]) if len(hit) and np.isfinite(hit.iloc[0]) else None


def _labels_text(table: pd.DataFrame, structure: str) -> str:
    """The values written beside a structure."""
    if "/" in structure:
        parts = [("h", "middle_height", "{:.1f}"), ("slip", "listhesis_mm", "{:.1f}")]
        text = " ".join(
            f"{n} {fmt.format(v)}" for n, m, fmt in parts if (v := _value(table, structure, m)) is not None
        )
        p = _value(table, structure, "herniation_probability")
        return text + (f" hern {p:.2f}" if p is not None and p >= 0.5 else "")
    vals = [_value(table, structure, f"{k}_height") for k in ("anterior", "middle", "posterior")]
    return "/".join("-" if v is None else f"{v:.1f}" for v in vals)


def _level_point(corners: dict, level: str):
    """(row, col) where a disc level's values go: between the upper vertebra's inferior corners and the
    lower one's superior corners (anterior side), or below the upper vertebra when the lower has none."""
    upper, lower = level.split("/")
    if upper not in corners:
        return None
    up = np.asarray(corners[upper], float)[2:4]
    pts = up if lower not in corners else np.vstack([up, np.asarray(corners[lower], float)[0:2]])
    if not np.isfinite(pts).all():
        return None
    return pts[:, 0].mean(), pts[:, 1].min()


def overlay_figure(img: io.Canonical, labels: np.ndarray, meas, title: str) -> Figure:
    """The figure of one image (module docstring); ``meas`` is a ``measure`` result or None."""
    s = int(meas.mid_slice) if meas is not None else labels.shape[0] // 2
    _, dr, dc = img.spacing
    rows, cols = img.array.shape[1:]
    extent = (-0.5 * dc, (cols - 0.5) * dc, (rows - 0.5) * dr, -0.5 * dr)  # mm; superior up
    fig = Figure(figsize=(6, 6 * rows * dr / max(cols * dc, 1e-6) + 0.6), dpi=100)
    ax = fig.subplots()
    ax.imshow(img.array[s], cmap="gray", extent=extent, interpolation="bilinear")
    ax.imshow(_colour_classes(labels[s]), cmap=FILL, vmin=0, vmax=4, alpha=0.35, extent=extent,
              interpolation="nearest")  # fmt: skip
    lordosis = None
    if meas is not None:
        for structure, pts in meas.corners.items():
            pts = np.asarray(pts, float)
            if not np.isfinite(pts).all():
                continue
            ax.plot(pts[:, 1] * dc, pts[:, 0] * dr, "o", ms=2.5, color="#ff1744")
            label = _labels_text(meas.table, structure).replace("-/-/-", "")  # S1 has no heights
            ax.text(pts[:, 1].max() * dc + 3, pts[:, 0].mean() * dr, f"{structure} {label}", color="w",
                    fontsize=6, va="center")  # fmt: skip
        for what, start, end in meas.lines:
            (r0, c0), (r1, c1) = start, end
            ax.plot([c0 * dc, c1 * dc], [r0 * dr, r1 * dr], "-", lw=0.8, color=_line_colour(str(what)))
        for level in sorted({str(v) for v in meas.table["structure"] if "/" in str(v)}):
            at = _level_point(meas.corners, level)
            if at is not None:
                ax.text(at[1] * dc - 3, at[0] * dr, f"{level} {_labels_text(meas.table, level)}",
                        color="#b9f6ca", fontsize=6, va="center", ha="right")  # fmt: skip
        lordosis = _value(meas.table, "spine", "lordosis_deg")
    ax.set_title(
        f"{title}: slice {s}"
        + (f", lordosis {lordosis:.1f} deg" if lordosis is not None else "")
        + ("" if meas is not None else " (not measured)"),
        fontsize=8,
    )
    ax.set_xlabel("anterior -> posterior (mm)", fontsize=6)
    ax.set_ylabel("superior -> inferior (mm)", fontsize=6)
    ax.tick_params(labelsize=5)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)


def overlay_png(img: io.Canonical, labels: np.ndarray, meas, path: Path, title: str) -> Path:
    """Draw and write one image's overlay PNG."""
    return save_figure(overlay_figure(img, labels, meas, title), path)


def write_overlays(cfg, n: int = 3, out=None) -> list[Path]:
    """Overlays of stage 02's OOF predicted masks of the first ``n`` train images (to ``out``, default
    ``<localize_dir>/overlays``)."""
    from spine.spider.measure import measure_image
    from spine.spider.preprocess import load_table

    paths = Paths.from_config(cfg)
    out = Path(out) if out else paths.localize_dir / "overlays"
    table = load_table(paths.cache_dir)
    written = []
    for row in table[(table["split"] == "train") & (table["status"] == "ok")].to_dict("records"):
        pred = io.masks_dir(paths.localize_dir) / f"{row['image']}.mha"
        if not pred.exists():
            continue
        img = io.read_canonical(Path(row["image_path"]))
        labels = io.read_canonical(pred).array
        meas, _ = measure_image(labels, img.spacing, cfg)
        written.append(overlay_png(img, labels, meas, out / f"{row['image']}.png", f"{row['image']} (OOF)"))
        if len(written) >= n:
            break
    if not written:
        log.warning("no OOF predicted masks under %s: run stage 02 first", io.masks_dir(paths.localize_dir))
    return written
