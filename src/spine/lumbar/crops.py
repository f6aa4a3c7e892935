"""Stage 03: fixed-size crops around every (study, condition, level) row, in a sagittal and an axial view.

Every row of the submission (test) or of train.csv (train) gets two crop stacks of ``crop.n_slices``
slices of ``crop.pixels``² pixels covering ``crop.size_mm``² mm, resampled bilinearly with the source
stack's own row/column spacing, so a crop has the same physical size whatever the scanner's pixels:

- **sag**: spinal canal on the Sagittal T2/STIR series, each foramen on Sagittal T1, each lateral recess
  (subarticular) on the T2 series at the slice nearest the recess point.
- **ax**: the row's 3D point registered into the Axial T2 series: over every stack of every axial
  series (tilted blocks are separate stacks with their own orientation) the slice whose plane is
  nearest the point, preferring planes whose in-plane projection falls inside the image.

Crops are laid out in one orientation whatever the stored IOP (``spine.core.crops.canonical_axes``:
axial with patient left to the right and posterior down, sagittal with posterior to the right and
inferior down). Each crop stack is divided by its source stack's 99.5th percentile and stored as float16.

Points come from stage 02 (``paths.points``); with ``crop.points=label`` train studies use
``train_label_coordinates.csv`` instead. Subarticular rows use their own recess point (stage 02's
localized one on Axial T2, or the label); a row without one falls back to the canal point moved
``crop.recess_offset_mm`` along patient x (left is +x in LPS), and says why in ``point_fallback``. A
row without a point or a study without the series keeps its place: its view is zeros, flagged
``{view}_missing`` with a reason (a study with no readable series at all — no folder, or every file
failed in stage 01 — says so, and is logged).

Config keys (``crop.*``): ``points`` (oof | label), ``size_mm``, ``pixels``, ``n_slices``,
``recess_offset_mm``, and ``overwrite`` (optional, default false: recrop every study even if done).

Outputs per study: ``paths.crop_array(split, study, view)`` (rows, slices, pixels, pixels) float16 in
the task's row order, and ``paths.crop_study_manifest`` (written last: marks the study done; it holds a
fingerprint of the crop settings and the study's points, so a changed point recrops the study). Then
the merged ``paths.crop_manifest`` and ``paths.crop_report``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spine.core import geometry
from spine.core.crops import (
    CropHooks,
    CropSettings,
    crop_box,
    crop_slice,
    quantiles,
    run_crop_stage,
    write_study_manifest,
)
from spine.core.io import fingerprint, save_npy
from spine.core.paths import Paths
from spine.core.stacks import IOP_COLS, StackGeometry
from spine.lumbar.points import POINT_COLUMNS, label_points
from spine.registry import get_task

log = logging.getLogger(__name__)

VIEWS = ("sag", "ax")
AXIAL_SERIES = "Axial T2"
SPINAL = "spinal_canal_stenosis"
POINT_SOURCES = ("oof", "label")
PERCENTILE = 99.5  # robust intensity scale of a stack: bright CSF/fat, not a single hot pixel
TRUTH_WITHIN_MM = 3.0
QUANTILES = ((0.5, 0.9, 0.99), 3, "mean")  # report quantiles: qs, digits, first statistic


@dataclass(frozen=True)
class Roi:
    """Where a condition's crops come from.

    ``anchor``: the condition of the points table whose point the row builds on; ``sag_series``: the
    series description of its sagittal view; ``fallback``: the condition whose point stands in when the
    anchor has none, moved by ``side`` times the recess offset (+1 patient left, -1 right).
    """

    anchor: str
    sag_series: str
    fallback: str | None = None
    side: float = 0.0


ROIS = {
    "spinal_canal_stenosis": Roi(SPINAL, "Sagittal T2/STIR"),
    "left_neural_foraminal_narrowing": Roi("left_neural_foraminal_narrowing", "Sagittal T1"),
    "right_neural_foraminal_narrowing": Roi("right_neural_foraminal_narrowing", "Sagittal T1"),
    "left_subarticular_stenosis": Roi("left_subarticular_stenosis", "Sagittal T2/STIR", SPINAL, +1.0),
    "right_subarticular_stenosis": Roi("right_subarticular_stenosis", "Sagittal T2/STIR", SPINAL, -1.0),
}
ANCHORS = sorted({r.anchor for r in ROIS.values()})
NO_SERIES = "no readable series (no folder, or every file failed in stage 01)"


@dataclass(frozen=True)
class CropSpec(CropSettings):
    """The crop settings of one run (``crop.*``)."""

    size_mm: float
    pixels: int
    n_slices: int
    recess_offset_mm: float

    def check(self) -> None:
        """An odd number of slices: a centre slice and as many on each side."""
        if self.n_slices < 1 or self.n_slices % 2 == 0:
            raise ValueError(f"crop.n_slices must be odd and >= 1 (a centre slice), got {self.n_slices}")


# =============================================================================================
# Geometry: which slice, which pixel
# =============================================================================================


@dataclass(frozen=True)
class StackRef:
    """One cached stack a crop can come from: its geometry, shape and path under the cache."""

    series_id: int
    stack: int
    geo: StackGeometry
    shape: tuple[int, int, int]  # slices, rows, cols
    path: str


@dataclass(frozen=True)
class Plane:
    """A slice chosen for a point: the point's in-plane projection and its distance to the plane."""

    ref: StackRef
    index: int
    row: float
    col: float
    distance_mm: float  # |signed distance| from the point to the slice plane
    inside: bool  # the projection falls inside the image


def nearest_plane(point, refs: list[StackRef]) -> Plane | None:
    """The slice, over every stack of ``refs``, whose plane is nearest ``point`` (patient mm).

    Planes whose in-plane projection falls inside the image win over any plane it falls outside of
    (a nearer plane of a block with another field of view shows other anatomy). Each slice is
    measured with its own IPP/IOP, so tilted blocks and stacks of any direction need no special case.
    Returns None when ``refs`` is empty.
    """
    point = np.asarray(point, dtype=np.float64)[None]
    best, best_key = None, None
    for ref in refs:
        g = ref.geo
        row, col, dist = geometry.patient_to_pixel(point, g.ipp, g.iop, g.spacing)
        _, rows, cols = ref.shape
        inside = (row >= -0.5) & (row <= rows - 0.5) & (col >= -0.5) & (col <= cols - 0.5)
        k = int(np.lexsort((np.abs(dist), ~inside))[0])
        key = (not inside[k], abs(float(dist[k])))
        if best_key is None or key < best_key:
            best_key = key
            best = Plane(ref, k, float(row[k]), float(col[k]), abs(float(dist[k])), bool(inside[k]))
    return best


def slice_window(centre: int, n_slices: int, n_total: int) -> tuple[list[int], int]:
    """``n_slices`` indices around ``centre``, clamped to the stack; and how many were clamped.

    Clamped positions repeat the edge slice, so every crop stack has the same depth.
    """
    half = n_slices // 2
    wanted = np.arange(centre - half, centre + half + 1)
    used = np.clip(wanted, 0, n_total - 1)
    return used.tolist(), int((used != wanted).sum())


def crop_stack(
    volume: np.ndarray, slices: list[int], row: float, col: float, spacing, spec: CropSpec, iop=None
):
    """(len(slices), pixels, pixels) float32 crops of ``volume`` at the given slices (canonical with iop)."""
    return np.stack(
        [crop_slice(volume[k], row, col, spacing, spec.size_mm, spec.pixels, iop) for k in slices]
    )


def robust_scale(volume: np.ndarray) -> float:
    """The stack's 99.5th percentile (1.0 for a blank stack), to divide its crops by."""
    v = float(np.percentile(volume, PERCENTILE))
    return v if v > 0 else 1.0


# =============================================================================================
# Points
# =============================================================================================


def load_points(cfg, paths: Paths, inst: pd.DataFrame) -> pd.DataFrame:
    """The anchor points (spinal canal, foramina) of every study, one row per study/condition/level.

    ``crop.points=oof``: stage 02's table (required). ``crop.points=label``: train studies from
    ``train_label_coordinates.csv``; a train row without a label, and every test study, from stage 02's
    table when it exists (else those rows have no point and their crops are flagged missing). Stage 06
    (test split only) thus always crops at stage 02's points.
    """
    mode = str(cfg.crop.points)
    if mode not in POINT_SOURCES:
        raise ValueError(f"crop.points must be one of {POINT_SOURCES}, got {mode!r}")
    if paths.points.exists():
        predicted = pd.read_csv(paths.points)
    elif mode == "oof":
        raise FileNotFoundError(
            f"stage 02 points {paths.points} not found: run src/02_localize.py first, or crop.points=label"
        )
    else:
        log.warning("no stage 02 points at %s: test rows get no point (flagged missing)", paths.points)
        predicted = pd.DataFrame(columns=POINT_COLUMNS)
    tables = [predicted]
    if mode == "label" and "train" in cfg.preprocess.splits:  # labels exist for train studies only
        labels = label_points(paths.data_dir, inst)
        # labels first: a train row's label wins over stage 02's point for it
        tables = [labels, predicted[predicted["split"] != "train"], predicted[predicted["split"] == "train"]]
    tables = [t.assign(_rank=rank) for rank, t in enumerate(tables) if len(t)]
    if not tables:
        return pd.DataFrame(columns=POINT_COLUMNS)
    pts = pd.concat(tables, ignore_index=True)
    pts = pts[pts["condition"].isin(ANCHORS)]
    # several points for one row (rare in the real labels): the first table, then the most confident
    pts = pts.sort_values(["_rank", "confidence"], ascending=[True, False], kind="stable")
    pts = pts.drop_duplicates(["study_id", "condition", "level"]).drop(columns="_rank")
    return pts.sort_values(["study_id", "condition", "level"]).reset_index(drop=True)


def list_studies(task, data_dir: Path, splits) -> pd.DataFrame:
    """(split, study_id) of every study to crop: train.csv for train; for test the studies of
    sample_submission.csv and of test_series_descriptions.csv (the hidden test set may list more)."""
    data_dir = Path(data_dir)
    out = []
    for split in splits:
        if split == "train":
            ids = pd.read_csv(data_dir / "train.csv")["study_id"].tolist()
        else:
            ids = [
                task.parse_row_id(r)["study_id"]
                for r in pd.read_csv(data_dir / "sample_submission.csv")["row_id"]
            ]
            desc = data_dir / f"{split}_series_descriptions.csv"
            if desc.exists():
                ids += pd.read_csv(desc)["study_id"].tolist()
        out += [(split, s) for s in sorted(set(ids))]
    return pd.DataFrame(out, columns=["split", "study_id"])


# =============================================================================================
# One study
# =============================================================================================


@dataclass
class StudyJob:
    """Everything a worker needs for one study (small tables, no paths to re-read)."""

    split: str
    study_id: int
    stacks: pd.DataFrame  # the study's ok rows of series.parquet
    instances: pd.DataFrame  # the study's ok rows of instances.parquet
    points: pd.DataFrame  # the study's anchor points
    fingerprint: str


MANIFEST_VERSION = 3  # bump when the manifest's columns change, so stored studies are remade


def study_fingerprint(spec: CropSpec, points: pd.DataFrame) -> str:
    """Hash of the crop settings and a study's points: a stored manifest with another hash is stale."""
    cols = [c for c in POINT_COLUMNS if c not in ("study_id", "split", "confidence", "fold")]
    rows = points[cols].sort_values(["condition", "level"]).astype(str).to_numpy().tolist()
    return fingerprint(asdict(spec), rows, MANIFEST_VERSION)


class _Volumes:
    """The study's cached stacks, loaded once each with their intensity scale."""

    def __init__(self, paths: Paths):
        self.paths, self.cache = paths, {}

    def get(self, ref: StackRef) -> tuple[np.ndarray, float]:
        key = (ref.series_id, ref.stack)
        if key not in self.cache:
            vol = np.load(self.paths.cache_dir / ref.path, mmap_mode="r")
            self.cache[key] = (vol, robust_scale(vol))
        return self.cache[key]


def stack_refs(stacks: pd.DataFrame, instances: pd.DataFrame) -> dict[str, list[StackRef]]:
    """Series description → the study's cached stacks of that description.

    A stack without ok instance rows (the tables disagree) is left out and logged: nothing can be
    placed on it.
    """
    geos = _geometries(instances)
    out: dict[str, list[StackRef]] = {}
    for r in stacks.itertuples(index=False):
        key = (int(r.series_id), int(r.stack))
        if key not in geos:
            log.warning("series %s stack %s has no ok instance rows: skipped", *key)
            continue
        shape = (int(r.n_slices), int(r.rows), int(r.cols))
        out.setdefault(r.description, []).append(StackRef(*key, geos[key], shape, r.path))
    return out


def _geometries(instances: pd.DataFrame) -> dict[tuple[int, int], StackGeometry]:
    """(series_id, stack) → StackGeometry, from one sort of the study's ok instance rows.

    Same result as ``StackGeometry.from_instances`` per stack, without a pandas filter and sort per
    stack (that was half of this stage's time on the demo data).
    """
    ok = instances[instances["status"] == "ok"].sort_values(["series_id", "stack", "index"])
    if ok.empty:  # a study with no folder or no readable file
        return {}
    keys = ok[["series_id", "stack"]].to_numpy(np.int64)
    ipp = ok[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(float)
    iop = ok[IOP_COLS].to_numpy(float)
    spacing = ok[["spacing_row", "spacing_col"]].to_numpy(float)
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(1)])
    ends = np.r_[starts[1:], len(keys)]
    return {
        (int(keys[a, 0]), int(keys[a, 1])): StackGeometry(ipp[a:b], iop[a:b], spacing[a:b])
        for a, b in zip(starts, ends)
    }


# the manifest fields of each view (prefixed sag_ / ax_); see _view
VIEW_FIELDS = (
    "missing reason series_id stack index slices clamped row col box_row0 box_col0 box_row1 box_col1 box_mm "
    "plane_mm inside scale"
).split()
VIEW_COLUMNS = [f"{v}_{f}" for v in VIEWS for f in VIEW_FIELDS]


def _empty_view(reason: str) -> dict:
    return {"missing": True, "reason": reason}


def _view(plane: Plane, spec: CropSpec, volumes: _Volumes) -> tuple[dict, np.ndarray]:
    """Crop one view at a chosen plane: its manifest fields and its (slices, pixels, pixels) stack."""
    ref, spacing = plane.ref, plane.ref.geo.spacing[plane.index]
    slices, clamped = slice_window(plane.index, spec.n_slices, ref.shape[0])
    vol, scale = volumes.get(ref)
    iop = ref.geo.iop[plane.index]
    crops = crop_stack(vol, slices, plane.row, plane.col, spacing, spec, iop) / scale
    row0, col0, row1, col1 = crop_box(plane.row, plane.col, spacing, spec.size_mm)
    fields = {
        "missing": False,
        "reason": "",
        "series_id": ref.series_id,
        "stack": ref.stack,
        "index": plane.index,
        "slices": slices,
        "clamped": clamped,
        "row": plane.row,
        "col": plane.col,
        "box_row0": row0,
        "box_col0": col0,
        "box_row1": row1,
        "box_col1": col1,
        "box_mm": spec.size_mm,
        "plane_mm": plane.distance_mm,
        "inside": plane.inside,
        "scale": scale,
    }
    return fields, crops


def _sag_refs(refs: dict[str, list[StackRef]], roi: Roi, anchor) -> list[StackRef]:
    """Sagittal stacks for a row: those of the anchor point's own series when it has that description
    (stage 02 chose it), else every stack of the description."""
    mine = refs.get(roi.sag_series, [])
    own = [r for r in mine if r.series_id == anchor.series_id]
    return own or mine


def _row_point(anchor, roi: Roi, spec: CropSpec) -> np.ndarray:
    """The row's 3D point: the anchor point; a fallback point moved laterally (left is +x in LPS)."""
    xyz = np.array([anchor.x_mm, anchor.y_mm, anchor.z_mm], dtype=np.float64)
    side = roi.side if anchor.condition != roi.anchor else 0.0
    return xyz + np.array([side * spec.recess_offset_mm, 0.0, 0.0])


def row_anchor(anchors: dict, roi: Roi, level: str) -> tuple:
    """(the point a row builds on or None, why it is a fallback: "" when it is the row's own point)."""
    own = anchors.get((roi.anchor, level))
    if own is not None or roi.fallback is None:
        return own, ""
    stand_in = anchors.get((roi.fallback, level))
    why = f"no {roi.anchor} point: {roi.fallback} point + {roi.side:+.0f} x crop.recess_offset_mm"
    return stand_in, why if stand_in is not None else ""


def crop_study(job: StudyJob, paths: Paths, spec: CropSpec, task_name: str) -> list[dict]:
    """Crop every row of one study, write its arrays and then its manifest; returns the manifest rows."""
    task = get_task(task_name)
    refs = stack_refs(job.stacks, job.instances)
    if not refs:
        log.warning("%s study %s: %s; its crops are flagged missing", job.split, job.study_id, NO_SERIES)
    volumes = _Volumes(paths)
    anchors = {(p.condition, p.level): p for p in job.points.itertuples(index=False)}
    row_ids = task.row_ids([job.study_id])
    arrays = {v: np.zeros((len(row_ids), spec.n_slices, spec.pixels, spec.pixels), np.float16) for v in VIEWS}
    rows = []
    for i, row_id in enumerate(row_ids):
        part = task.parse_row_id(row_id)
        roi = ROIS[part["condition"]]
        anchor, fallback = row_anchor(anchors, roi, part["level"])
        base = {
            "row_id": row_id,
            "study_id": job.study_id,
            "split": job.split,
            "condition": part["condition"],
            "level": part["level"],
            "array_index": i,
            "point_source": anchor.source if anchor is not None else "",
            "point_confidence": float(anchor.confidence) if anchor is not None else float("nan"),
            "point_fallback": fallback,
        }
        views = _crop_row(anchor, roi, refs, spec, volumes, arrays, i) if refs else _no_series()
        point = _row_point(anchor, roi, spec) if anchor is not None else np.full(3, np.nan)
        base.update(x_mm=point[0], y_mm=point[1], z_mm=point[2])
        rows.append(base | {f"{v}_{k}": val for v, fields in views.items() for k, val in fields.items()})
    for v in VIEWS:
        save_npy(paths.crop_array(job.split, job.study_id, v), arrays[v])
    write_study_manifest(paths, job.split, job.study_id, job.fingerprint, rows)
    return rows


def _no_series() -> dict:
    return {v: _empty_view(NO_SERIES) for v in VIEWS}


def _crop_row(anchor, roi: Roi, refs, spec: CropSpec, volumes: _Volumes, arrays: dict, i: int) -> dict:
    """Manifest fields of both views of one row; fills ``arrays[view][i]``."""
    if anchor is None:
        reason = f"no {roi.anchor} point"
        return {v: _empty_view(reason) for v in VIEWS}
    point = _row_point(anchor, roi, spec)
    candidates = {"sag": _sag_refs(refs, roi, anchor), "ax": refs.get(AXIAL_SERIES, [])}
    series_name = {"sag": roi.sag_series, "ax": AXIAL_SERIES}
    out = {}
    for v in VIEWS:
        plane = nearest_plane(point, candidates[v])
        if plane is None:
            out[v] = _empty_view(f"no {series_name[v]} series")
            continue
        out[v], arrays[v][i] = _view(plane, spec, volumes)
    return out


# =============================================================================================
# The stage
# =============================================================================================


def _work(args) -> int:
    """Crop one study (a worker pool item); returns the number of crop stacks made."""
    job, paths, spec, task_name = args
    rows = crop_study(job, paths, spec, task_name)
    return sum(not r[f"{v}_missing"] for r in rows for v in VIEWS)


def build_jobs(studies: pd.DataFrame, series: pd.DataFrame, inst: pd.DataFrame, points: pd.DataFrame, spec):
    """One StudyJob per study, each with its own slices of the tables."""
    ok_series = series[(series["status"] == "ok") & (series["stack"] >= 0)]
    by_series = {k: g for k, g in ok_series.groupby(["split", "study_id"])}
    by_inst = {k: g for k, g in inst[inst["status"] == "ok"].groupby(["split", "study_id"])}
    by_points = {k: g for k, g in points.groupby(["split", "study_id"])}
    empty_pts = pd.DataFrame(columns=POINT_COLUMNS)
    jobs = []
    for split, study_id in studies.itertuples(index=False):
        key = (split, study_id)
        pts = by_points.get(key, empty_pts)
        jobs.append(
            StudyJob(
                split,
                int(study_id),
                by_series.get(key, ok_series.iloc[:0]),
                by_inst.get(key, inst.iloc[:0]),
                pts,
                study_fingerprint(spec, pts),
            )
        )
    return jobs


def run_crops(cfg) -> dict:
    """Stage 03 over every study of ``cfg.preprocess.splits``. Returns the run summary."""
    task = get_task(cfg.task)
    paths = Paths.from_config(cfg)
    spec = CropSpec.from_config(cfg)
    series, inst = pd.read_parquet(paths.series_table), pd.read_parquet(paths.instance_table)
    points = load_points(cfg, paths, inst)
    studies = list_studies(task, paths.data_dir, cfg.preprocess.splits)
    jobs = build_jobs(studies, series, inst, points, spec)
    report = lambda manifest: crop_report(manifest, inst, _truth_points(paths))
    hooks = CropHooks(_work, (paths, spec, task.name), VIEWS, VIEW_COLUMNS, tidy_manifest, report, _summary)
    return run_crop_stage(cfg, paths, studies, jobs, hooks)


def tidy_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """The merged manifest's dtypes: nullable ints and bools where a missing view has NaN, lists of slices."""
    for v in VIEWS:
        for col in ("series_id", "stack", "index", "clamped"):
            df[f"{v}_{col}"] = df[f"{v}_{col}"].astype("Int64")
        df[f"{v}_inside"] = df[f"{v}_inside"].astype("boolean")
        df[f"{v}_slices"] = [s if isinstance(s, list) else [] for s in df[f"{v}_slices"]]
    return df


def _summary(manifest: pd.DataFrame, report: dict, crops_made: int) -> dict:
    """The lumbar keys of the run summary: crops made, missing views, the report's headline."""
    missing = {f"{v}_missing": int(manifest[f"{v}_missing"].sum()) for v in VIEWS}
    return {"crops_made": crops_made, **missing, **_headline(report)}


# =============================================================================================
# Report
# =============================================================================================


def _truth_points(paths: Paths) -> pd.DataFrame | None:
    """The generator's true points (only for generated data; the report alone reads them)."""
    path = paths.truth_dir / "points.csv"
    return pd.read_csv(path) if path.exists() else None


def truth_plane_distance(manifest: pd.DataFrame, inst: pd.DataFrame, truth: pd.DataFrame) -> pd.Series:
    """Distance (mm) from each spinal row's chosen axial plane to the TRUE canal point of its level."""
    rows = manifest[(manifest["condition"] == SPINAL) & ~manifest["ax_missing"]]
    true_xyz = truth.set_index("row_id")[["x_mm", "y_mm", "z_mm"]]
    rows = rows[rows["row_id"].isin(true_xyz.index)]
    by_study = {k: g for k, g in inst[inst["study_id"].isin(rows["study_id"])].groupby("study_id")}
    out = {}
    for study, g in rows.groupby("study_id"):
        geos = _geometries(by_study[study])
        for r in g.itertuples(index=False):
            geo, k = geos[(int(r.ax_series_id), int(r.ax_stack))], int(r.ax_index)
            xyz = true_xyz.loc[r.row_id].to_numpy()
            out[r.row_id] = abs(float(geometry.patient_to_pixel(xyz, geo.ipp[k], geo.iop[k], np.ones(2))[2]))
    return pd.Series(out, dtype=float)


def crop_report(manifest: pd.DataFrame, inst: pd.DataFrame, truth: pd.DataFrame | None) -> dict:
    """Per split: missing views (and why), distances to the chosen planes, and on generated data the
    share of spinal rows whose chosen axial plane lies within 3 mm of the true canal point."""
    report = {}
    truth_d = truth_plane_distance(manifest, inst, truth) if truth is not None else None
    for split, m in manifest.groupby("split", sort=False):
        part = {"studies": int(m["study_id"].nunique()), "rows": len(m)}
        for v in VIEWS:
            reasons = m.loc[m[f"{v}_missing"], f"{v}_reason"].value_counts()
            part[f"{v}_missing"] = int(m[f"{v}_missing"].sum())
            part[f"{v}_missing_reasons"] = {k: int(n) for k, n in reasons.items()}
            part[f"{v}_plane_mm"] = quantiles(m.loc[~m[f"{v}_missing"], f"{v}_plane_mm"], *QUANTILES)
            part[f"{v}_outside_image"] = int((m[f"{v}_inside"] == False).sum())  # noqa: E712 (nullable)
            part[f"{v}_clamped_slices"] = int(m[f"{v}_clamped"].fillna(0).sum())
        part["recess_points"] = _recess_counts(m)
        part["studies_without_series"] = int((m.groupby("study_id")["sag_reason"].first() == NO_SERIES).sum())
        if truth_d is not None:
            d = truth_d[truth_d.index.isin(m["row_id"])]
            part["ax_truth_plane_mm"] = quantiles(d, *QUANTILES)
            part["ax_within_3mm_share"] = round(float((d <= TRUTH_WITHIN_MM).mean()), 4) if len(d) else None
        report[split] = part
    return report


def _recess_counts(m: pd.DataFrame) -> dict:
    """Subarticular rows by where their point came from: their own (localized or labelled), the fixed
    offset from the canal point (with the reason), or none."""
    sub = m[m["condition"].str.contains("subarticular")]
    fallback = sub["point_fallback"].fillna("")
    own = (fallback == "") & (sub["point_source"] != "")
    return {
        "rows": len(sub),
        "own_point": int(own.sum()),
        "fixed_offset": int((fallback != "").sum()),
        "no_point": int((sub["point_source"] == "").sum()),
        "fixed_offset_reasons": {k: int(n) for k, n in fallback[fallback != ""].value_counts().items()},
    }


def _headline(report: dict) -> dict:
    """The report's figures for the console summary."""
    out = {}
    for split, part in report.items():
        if "ax_within_3mm_share" in part:
            n = part["ax_truth_plane_mm"]["n"]
            out[f"{split}_ax_within_3mm_share"] = f"{part['ax_within_3mm_share']} (of {n} spinal rows)"
        out[f"{split}_ax_plane_mm_p50/p90"] = (
            f"{part['ax_plane_mm'].get('p50')}/{part['ax_plane_mm'].get('p90')}"
        )
        rp = part["recess_points"]
        out[f"{split}_recess_own/fixed_offset/none"] = (
            f"{rp['own_point']}/{rp['fixed_offset']}/{rp['no_point']}"
        )
    return out
