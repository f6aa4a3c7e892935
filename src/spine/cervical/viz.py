"""Pictures for a person to check cervical segmentation at a glance: per study, mid-sagittal and
mid-coronal reformats with the given mask outlined and the predicted vertebrae filled in colour, and
the centre slice of each of the seven vertebra crops of stage 03 (when it ran).

The planes pass through the field centre stage 02 used (the spine, found by HU), so the mask and the
prediction are both cut where the vertebrae are. Superior is up, and pixels have their true aspect
(slice spacing against pixel spacing). Figures use matplotlib's object API on the Agg canvas, as the
lumbar overlays do (``spine.lumbar.viz``).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from spine.cervical import ct
from spine.cervical.crops import VIEW
from spine.cervical.segment import (
    StudyItem,
    aligned_mask,
    geometries,
    planes_path,
    spine_centre,
    study_items,
)
from spine.cervical.task import VERTEBRAE
from spine.core import geometry
from spine.core.paths import Paths

log = logging.getLogger(__name__)

# one colour per vertebra C1..C7 (matplotlib's tab10); the thoracic class is not drawn
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
FILL = ListedColormap(["#00000000", *COLOURS])  # label 0 transparent, 1..7 the vertebrae


def _bone_image(hu: np.ndarray) -> np.ndarray:
    return ct.window(hu, "bone")


def _vertebrae_only(labels: np.ndarray) -> np.ndarray:
    """Labels 1..7 kept, the rest (thoracic, background) 0."""
    return np.where(labels <= len(VERTEBRAE), labels, 0)


def plane_panel(ax, hu: np.ndarray, z: np.ndarray, spacing: float, mask, pred, title: str) -> None:
    """One reformat (slices x pixels) with superior up: the given mask's vertebrae outlined, the
    predicted ones filled (each in its vertebra's colour)."""
    order = np.argsort(-z, kind="stable")  # top row = highest z (superior)
    dz = float(np.median(np.abs(np.diff(np.sort(z))))) if len(z) > 1 else 1.0
    extent = (0, hu.shape[1] * spacing, float(z.min()), float(z.max()))
    ax.imshow(_bone_image(hu[order]), cmap="gray", vmin=0, vmax=1, extent=extent, aspect="equal")
    if pred is not None:
        ax.imshow(_vertebrae_only(pred[order]), cmap=FILL, vmin=0, vmax=len(VERTEBRAE), alpha=0.45,
                  extent=extent, aspect="equal", interpolation="nearest")  # fmt: skip
    if mask is not None:
        xs = (np.arange(hu.shape[1]) + 0.5) * spacing
        zs = z[order]
        for v, colour in enumerate(COLOURS, start=1):
            on = mask[order] == v
            if on.any():
                ax.contour(xs, zs, on.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("mm", fontsize=6)
    ax.set_ylabel(f"z mm ({dz:.2f} mm slices)", fontsize=6)
    ax.tick_params(labelsize=5)


def planes_figure(paths: Paths, item: StudyItem, geo, min_share: float) -> Figure:
    """Mid-sagittal and mid-coronal reformats of one study, with its mask and the prediction."""
    stack = ct.CTStack(paths.cache_dir / item.path)
    saved = planes_path(paths, item.study_id)
    pred = np.load(saved) if saved.exists() else None
    if pred is not None:
        cr, cc = (int(c) for c in pred["centre"])
    else:
        cr, cc = (int(round(c)) for c in spine_centre(stack))
    mask, kept = None, "no mask"
    if item.mask is not None:
        aligned = aligned_mask(item.mask, geo, item.shape, stack, min_share)
        mask, kept = aligned.labels, f"mask by {aligned.method}, {aligned.share:.0%} on bone"
    z = geometry.slice_positions(geo.ipp, geo.iop[0])
    fig = Figure(figsize=(8, 6), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, axis, index, spacing in (
        (axes[0], "sagittal", cc, geo.spacing[0, 0]),
        (axes[1], "coronal", cr, geo.spacing[0, 1]),
    ):
        hu = stack.reformat(axis, index)
        m = None if mask is None else (mask[:, :, index] if axis == "sagittal" else mask[:, index, :])
        p = None if pred is None else pred[axis]
        plane_panel(ax, hu, z, spacing, m, p, f"{axis} ({'column' if axis == 'sagittal' else 'row'} {index})")
    fig.suptitle(
        f"study {item.study_id}: {kept}; outline = mask, fill = prediction"
        + ("" if pred is not None else " (none: run stage 02)"),
        fontsize=8,
    )
    for i, (name, colour) in enumerate(zip(VERTEBRAE, COLOURS)):
        fig.text(0.3 + i * 0.06, 0.02, name, color=colour, fontsize=9, weight="bold")
    return fig


def crops_figure(paths: Paths, item: StudyItem, vert: pd.DataFrame | None) -> Figure:
    """The centre slice of each of the study's seven vertebra crops (bone window), found or not."""
    arr = np.load(paths.crop_array(item.split, item.study_id, VIEW), mmap_mode="r")
    found = {}
    if vert is not None:
        rows = vert[vert["study_id"] == item.study_id]
        found = dict(zip(rows["vertebra"], rows["found"].astype(bool)))
    fig = Figure(figsize=(1.6 * len(VERTEBRAE), 2.0), dpi=100)
    axes = fig.subplots(1, len(VERTEBRAE), squeeze=False)[0]
    for i, (ax, name) in enumerate(zip(axes, VERTEBRAE)):
        image = np.asarray(arr[i, arr.shape[1] // 2], dtype=np.float32)
        ax.imshow(_bone_image(image), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(f"{name}{'' if found.get(name, True) else ' (not found)'}", fontsize=7,
                     color=COLOURS[i])  # fmt: skip
    fig.suptitle(f"study {item.study_id}: vertebra crops, centre slices", fontsize=8)
    return fig


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def overlay_studies(items: list[StudyItem], n: int) -> list[StudyItem]:
    """The first ``n`` readable train studies, those with a mask first (by id)."""
    train = [it for it in items if it.split == "train" and it.path is not None]
    return sorted(train, key=lambda it: (it.mask is None, it.study_id))[:n]


def write_overlays(cfg, n: int = 3, out: Path | None = None) -> list[Path]:
    """Write the overlays of ``n`` train studies (segmented ones first) as PNGs; returns their paths.

    Per study ``{study}_planes.png`` and, after stage 03, ``{study}_crops.png``. Default folder:
    ``paths.localize_dir / "overlays"``.
    """
    paths = Paths.from_config(cfg)
    out = Path(out) if out is not None else paths.localize_dir / "overlays"
    out.mkdir(parents=True, exist_ok=True)
    geos = geometries(paths)
    vert = pd.read_csv(paths.vertebrae, dtype={"study_id": str}) if paths.vertebrae.exists() else None
    if vert is None:
        log.info("no %s: predictions not drawn (run stage 02)", paths.vertebrae)
    written = []
    for item in overlay_studies(study_items(paths, splits=("train",)), n):
        geo = geos[(item.study_id, item.series_id, item.stack)]
        figs = {"planes": planes_figure(paths, item, geo, float(cfg.segment.min_bone_share))}
        if paths.crop_array(item.split, item.study_id, VIEW).exists():
            figs["crops"] = crops_figure(paths, item, vert)
        else:
            log.info("%s: no crops (run stage 03)", item.study_id)
        for name, fig in figs.items():
            path = out / f"{item.study_id}_{name}.png"
            path.write_bytes(figure_png(fig))
            written.append(path)
    return written
