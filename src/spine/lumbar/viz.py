"""Pictures for a person to check localization and crops: points on sagittal slices, axial crop boxes.

Figures use matplotlib's object API on the Agg canvas (no pyplot state, no global backend switch), so
the same functions serve ``src/plot_overlays.py``, the tests and ``notebooks/lumbar_localization.ipynb``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from spine.core import geometry
from spine.core.paths import Paths
from spine.lumbar import crops
from spine.lumbar.points import label_points

log = logging.getLogger(__name__)

# (title, series description, conditions whose points the panel shows)
SAGITTAL_PANELS = [
    ("canal (T2)", "Sagittal T2/STIR", ["spinal_canal_stenosis"]),
    ("left foramen (T1)", "Sagittal T1", ["left_neural_foraminal_narrowing"]),
    ("right foramen (T1)", "Sagittal T1", ["right_neural_foraminal_narrowing"]),
]
# crop boxes drawn on each level's axial slice: (condition, colour)
AXIAL_BOXES = [
    ("spinal_canal_stenosis", "yellow"),
    ("left_subarticular_stenosis", "cyan"),
    ("right_subarticular_stenosis", "magenta"),
]
RECESS_CONDITIONS = ["left_subarticular_stenosis", "right_subarticular_stenosis"]  # points on Axial T2
SHORT_NAMES = {
    "spinal_canal_stenosis": "canal",
    "left_neural_foraminal_narrowing": "L foramen",
    "right_neural_foraminal_narrowing": "R foramen",
    "left_subarticular_stenosis": "L recess",
    "right_subarticular_stenosis": "R recess",
}
LABEL_STYLE = dict(marker="o", s=36, facecolors="none", edgecolors="lime", linewidths=1.2)
PRED_STYLE = dict(marker="x", s=30, c="red", linewidths=1.2)


@dataclass
class OverlayData:
    """The tables the overlays read, loaded once: cache tables, labelled points, stage 02 points (if
    any) and the crop manifest (if stage 03 ran)."""

    paths: Paths
    series: pd.DataFrame
    inst: pd.DataFrame
    labels: pd.DataFrame
    predicted: pd.DataFrame | None
    manifest: pd.DataFrame | None

    @classmethod
    def load(cls, cfg) -> OverlayData:
        paths = Paths.from_config(cfg)
        series, inst = pd.read_parquet(paths.series_table), pd.read_parquet(paths.instance_table)
        predicted = pd.read_csv(paths.points) if paths.points.exists() else None
        manifest = pd.read_parquet(paths.crop_manifest) if paths.crop_manifest.exists() else None
        return cls(paths, series[series["status"] == "ok"], inst, label_points(paths.data_dir, inst),
                   predicted, manifest)  # fmt: skip

    def train_studies(self, n: int) -> list[int]:
        """The first ``n`` labelled train studies (by id)."""
        return sorted(self.labels["study_id"].unique())[:n]

    def refs(self, study_id) -> dict[str, list[crops.StackRef]]:
        """Series description → the study's cached stacks."""
        return crops.stack_refs(
            self.series[self.series["study_id"] == study_id], self.inst[self.inst["study_id"] == study_id]
        )


def display_range(image: np.ndarray) -> tuple[float, float]:
    """Grey levels to show: 1st to 99.5th percentile, so one bright pixel does not darken the slice."""
    lo, hi = np.percentile(image, [1.0, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _slice_of(data: OverlayData, ref: crops.StackRef, index: int) -> np.ndarray:
    return np.asarray(np.load(data.paths.cache_dir / ref.path, mmap_mode="r")[index], dtype=np.float32)


def _show(ax, image: np.ndarray, title: str) -> None:
    vmin, vmax = display_range(image)
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _study_points(table: pd.DataFrame | None, study_id, conditions) -> pd.DataFrame:
    if table is None:
        return pd.DataFrame()
    return table[(table["study_id"] == study_id) & table["condition"].isin(conditions)]


def _panel_slice(refs: list[crops.StackRef], pts: pd.DataFrame) -> tuple[crops.StackRef, int]:
    """The stack and slice a panel shows: where its points lie (median), else the middle slice."""
    for ref in refs:
        mine = pts[(pts["series_id"] == ref.series_id) & (pts["stack"] == ref.stack)] if len(pts) else pts
        if len(mine):
            return ref, int(np.rint(np.median(mine["index"])))
    return refs[0], refs[0].shape[0] // 2


def _draw_points(ax, pts: pd.DataFrame, ref: crops.StackRef, index: int, style: dict, names: bool) -> None:
    """Project points (patient mm) onto the shown slice's plane and mark them."""
    if pts.empty:
        return
    g = ref.geo
    xyz = pts[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    row, col, _ = geometry.patient_to_pixel(xyz, g.ipp[index], g.iop[index], g.spacing[index])
    ax.scatter(col, row, **style)
    if names:
        for r, c, level in zip(row, col, pts["level"]):
            ax.text(c + 4, r, level.upper().replace("_", "/"), color="lime", fontsize=6, va="center")


def sagittal_figure(data: OverlayData, study_id) -> Figure:
    """Labelled (green circles) vs predicted (red crosses) points on the study's sagittal slices."""
    refs = data.refs(study_id)
    fig = Figure(figsize=(10, 3.8), dpi=100)
    axes = fig.subplots(1, len(SAGITTAL_PANELS))
    for ax, (title, description, conditions) in zip(axes, SAGITTAL_PANELS):
        labels = _study_points(data.labels, study_id, conditions)
        predicted = _study_points(data.predicted, study_id, conditions)
        if not refs.get(description):
            ax.set_axis_off()
            ax.set_title(f"{title}: no {description} series", fontsize=8)
            continue
        ref, index = _panel_slice(refs[description], labels if len(labels) else predicted)
        _show(ax, _slice_of(data, ref, index), f"{title} slice {index}")
        _draw_points(ax, labels, ref, index, LABEL_STYLE, names=True)
        _draw_points(ax, predicted, ref, index, PRED_STYLE, names=False)
    source = "labels o, stage 02 x" if data.predicted is not None else "labels o (no stage 02 points yet)"
    fig.suptitle(f"study {study_id}: {source}", fontsize=9)
    return fig


def axial_figure(data: OverlayData, study_id) -> Figure:
    """Per level, the axial slice chosen for the canal with the crop boxes of canal and both recesses,
    and the labelled and stage-02 recess points projected onto it.

    A box whose crop comes from another slice of the same stack is dashed; one from another stack is
    not drawn (its slice is not the one shown).
    """
    m = data.manifest[data.manifest["study_id"] == study_id].set_index(["condition", "level"])
    refs = {(r.series_id, r.stack): r for r in data.refs(study_id).get(crops.AXIAL_SERIES, [])}
    levels = list(dict.fromkeys(m.index.get_level_values("level")))
    fig = Figure(figsize=(3.2 * len(levels), 3.6), dpi=100)
    for ax, level in zip(fig.subplots(1, len(levels)), levels):
        canal = m.loc[("spinal_canal_stenosis", level)]
        if canal["ax_missing"]:
            ax.set_axis_off()
            ax.set_title(f"{level}: {canal['ax_reason']}", fontsize=7)
            continue
        ref = refs[(int(canal["ax_series_id"]), int(canal["ax_stack"]))]
        title = (
            f"{level} stack {ref.stack} slice {canal['ax_index']}\n{canal['ax_plane_mm']:.1f} mm from plane"
        )
        _show(ax, _slice_of(data, ref, int(canal["ax_index"])), title)
        for condition, colour in AXIAL_BOXES:
            _draw_box(ax, m.loc[(condition, level)], ref, int(canal["ax_index"]), colour)
        for table, style in ((data.labels, LABEL_STYLE), (data.predicted, PRED_STYLE)):
            pts = _study_points(table, study_id, RECESS_CONDITIONS)
            _draw_points(
                ax, pts[pts["level"] == level] if len(pts) else pts, ref, int(canal["ax_index"]), style, False
            )
    fig.suptitle(
        f"study {study_id}: axial crops (canal yellow, left recess cyan, right magenta); "
        "recess points: labels o, stage 02 x",
        fontsize=9,
    )
    return fig


def _draw_box(ax, row: pd.Series, ref: crops.StackRef, index: int, colour: str) -> None:
    if row["ax_missing"] or (int(row["ax_series_id"]), int(row["ax_stack"])) != (ref.series_id, ref.stack):
        return
    r0, c0, r1, c1 = row[["ax_box_row0", "ax_box_col0", "ax_box_row1", "ax_box_col1"]].astype(float)
    style = "-" if int(row["ax_index"]) == index else "--"
    ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor=colour, linestyle=style, lw=1))
    ax.plot([row["ax_col"]], [row["ax_row"]], marker="+", color=colour, markersize=6)


def crop_figure(data: OverlayData, study_id, view: str) -> Figure:
    """The centre slice of every crop of one view: conditions in rows, levels in columns."""
    m = data.manifest[data.manifest["study_id"] == study_id]
    split = m["split"].iloc[0]
    arr = np.load(data.paths.crop_array(split, study_id, view), mmap_mode="r")
    conditions, levels = list(dict.fromkeys(m["condition"])), list(dict.fromkeys(m["level"]))
    fig = Figure(figsize=(1.5 * len(levels), 1.5 * len(conditions) + 0.4), dpi=100)
    axes = fig.subplots(len(conditions), len(levels), squeeze=False)
    for r in m.itertuples(index=False):
        ax = axes[conditions.index(r.condition), levels.index(r.level)]
        image = np.asarray(arr[r.array_index, arr.shape[1] // 2], dtype=np.float32)
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=max(float(image.max()), 1e-3))
        ax.axhline((image.shape[0] - 1) / 2, color="yellow", lw=0.4)
        ax.axvline((image.shape[1] - 1) / 2, color="yellow", lw=0.4)
        ax.set_axis_off()
        ax.set_title(f"{SHORT_NAMES.get(r.condition, r.condition)} {r.level}", fontsize=6)
    fig.suptitle(f"study {study_id}: {view} crops, centre slices", fontsize=9)
    return fig


def study_figures(data: OverlayData, study_id) -> dict[str, Figure]:
    """Every overlay of one study, by name: sagittal points, then (after stage 03) axial boxes and crops."""
    figs = {"sagittal": sagittal_figure(data, study_id)}
    if data.manifest is not None and (data.manifest["study_id"] == study_id).any():
        figs["axial"] = axial_figure(data, study_id)
        for view in crops.VIEWS:
            figs[f"crops_{view}"] = crop_figure(data, study_id, view)
    return figs


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure (for IPython.display.Image or a file)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def write_overlays(cfg, n: int = 3, out: Path | None = None) -> list[Path]:
    """Write the overlays of the first ``n`` labelled train studies as PNGs; returns their paths.

    Default folder: ``paths.localize_dir / "overlays"``.
    """
    data = OverlayData.load(cfg)
    out = Path(out) if out is not None else data.paths.localize_dir / "overlays"
    out.mkdir(parents=True, exist_ok=True)
    if data.manifest is None:
        log.info("no crop manifest at %s: axial overlays skipped (run stage 03)", data.paths.crop_manifest)
    written = []
    for study_id in data.train_studies(n):
        for name, fig in study_figures(data, study_id).items():
            path = out / f"{study_id}_{name}.png"
            path.write_bytes(figure_png(fig))
            written.append(path)
    return written
