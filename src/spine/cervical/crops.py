"""Stage 03 (cervical): one fixed-size 3D crop per vertebra C1..C7, in Hounsfield units.

Input: stage 02's ``paths.vertebrae`` (one row per study and vertebra: slice span and pixel box in the
cached stack, ``found``). Every vertebra that was found is cropped as

- **along the slices**: its span from the first to the last slice it shows on, widened by
  ``crop.z_margin_mm`` on each side, sampled at ``crop.depth`` evenly spaced positions in millimetres
  along the slice normal (linear between the two nearest cached slices, so a gap left by an unreadable
  file or uneven spacing does not stretch the crop);
- **in-plane**: a square of side ``max(box height, box width)`` mm + 2 ``crop.margin_mm``, centred on
  the box and laid out canonically (patient left to the right, posterior down), resampled bilinearly to
  ``crop.pixels``²; the square keeps the aspect ratio, so a vertebra is never squashed.

Anything outside the scan is air (-1024 HU). A study's crops are stored as one int16 HU array
``paths.crop_array(split, study, "vert")`` of shape (7, depth, pixels, pixels) in C1..C7 order; the
stage-04 models window the HU themselves. The 2.5D model reads the same array as ``train.n_seq`` slabs
of ``depth / n_seq`` consecutive slices (its channels), so it needs no crops of its own.

Train studies also get slice-level box labels: a box of ``train_bounding_boxes.csv`` (slice_number =
InstanceNumber) belongs to a vertebra when its slice lies within the vertebra's span and its centre
within the vertebra's in-plane box (geometry only; several vertebrae may share a box, stage 04 keeps
it for a vertebra labelled fractured only). ``box_depth`` holds, for each of the ``depth`` positions,
whether the nearest cached slice has such a box.

A vertebra not found, or a study without a readable volume, keeps its manifest row and its place in
the array (air), with ``found=False`` and a ``reason``.

Outputs: the per-study arrays, ``paths.crop_study_manifest`` per study (written last, with a fingerprint
of the settings, the study's vertebra rows and boxes: a changed input recrops the study), then the
merged ``paths.crop_manifest`` (one row per study and vertebra), ``paths.crop_report``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np
import pandas as pd

from spine.cervical.segment import (
    VERTEBRA_COLUMNS,  # the stage 02 -> 03 table (localize/cervical/vertebrae.csv)
)
from spine.cervical.task import VERTEBRAE
from spine.core import geometry
from spine.core.crops import (
    CropHooks,
    CropSettings,
    crop_matrix,
    quantiles,
    run_crop_stage,
    write_study_manifest,
)
from spine.core.io import fingerprint, save_npy
from spine.core.paths import Paths, require
from spine.core.stacks import IOP_COLS
from spine.registry import get_task

log = logging.getLogger(__name__)

VIEW = "vert"
AIR_HU = -1024
BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
QUANTILES = ((0.5, 0.9), 2, "min")  # report quantiles: qs, digits, first statistic


@dataclass(frozen=True)
class VertebraCropSpec(CropSettings):
    """The crop settings of one run: ``crop.depth``, ``pixels``, ``margin_mm``, ``z_margin_mm``."""

    depth: int
    pixels: int
    margin_mm: float
    z_margin_mm: float

    def check(self) -> None:
        """At least one position along the slices and crops of 8² pixels or more."""
        if self.depth < 1 or self.pixels < 8:
            raise ValueError(f"crop.depth must be >= 1 and crop.pixels >= 8, got {self}")


# =============================================================================================
# Resampling
# =============================================================================================


def depth_positions(z_lo: float, z_hi: float, depth: int) -> np.ndarray:
    """``depth`` positions (mm) evenly spread over [z_lo, z_hi]: the centres of ``depth`` equal bins."""
    step = (z_hi - z_lo) / depth
    return z_lo + (np.arange(depth) + 0.5) * step


def depth_weights(z_slices: np.ndarray, z_out: np.ndarray, tolerance: float):
    """Linear interpolation along the slices: (lower index, upper index, upper weight, inside) per position.

    ``z_slices`` ascending (mm). A position more than ``tolerance`` mm beyond the first or last slice is
    outside the scan; within it the edge slice is used.
    """
    n = len(z_slices)
    hi = np.clip(np.searchsorted(z_slices, z_out), 1, max(n - 1, 1))
    lo = hi - 1
    if n == 1:
        lo = hi = np.zeros(len(z_out), int)
        w = np.zeros(len(z_out))
    else:
        gap = z_slices[hi] - z_slices[lo]
        w = np.clip((z_out - z_slices[lo]) / np.where(gap > 0, gap, 1.0), 0.0, 1.0)
    inside = (z_out >= z_slices[0] - tolerance) & (z_out <= z_slices[-1] + tolerance)
    return lo, hi, w, inside


def resample_vertebra(
    volume: np.ndarray, z_slices: np.ndarray, z_out: np.ndarray, matrix: np.ndarray, pixels: int, tol: float
) -> tuple[np.ndarray, int]:
    """(depth, pixels, pixels) float32 HU sampled at ``z_out`` (mm) through the in-plane ``matrix``.

    Each source slice needed is cropped once (cv2, bilinear, air outside), then neighbouring crops are
    blended linearly. Returns the crop and the number of positions outside the scan.
    """
    lo, hi, w, inside = depth_weights(z_slices, z_out, tol)
    crops = {}

    def crop(k: int) -> np.ndarray:
        if k not in crops:
            crops[k] = cv2.warpAffine(
                np.ascontiguousarray(volume[k], dtype=np.float32),
                matrix,
                (pixels, pixels),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=float(AIR_HU),
            )
        return crops[k]

    out = np.full((len(z_out), pixels, pixels), AIR_HU, dtype=np.float32)
    for d in np.flatnonzero(inside):
        a = crop(int(lo[d]))
        out[d] = a if w[d] == 0 else (1 - w[d]) * a + w[d] * crop(int(hi[d]))
    return out, int((~inside).sum())


def square_box(row0, row1, col0, col1, spacing, margin_mm: float) -> tuple[float, float, float]:
    """(centre row, centre col, side mm) of the square around an inclusive pixel box plus a margin."""
    height = (row1 - row0 + 1) * float(spacing[0])
    width = (col1 - col0 + 1) * float(spacing[1])
    return (row0 + row1) / 2.0, (col0 + col1) / 2.0, max(height, width) + 2 * margin_mm


# =============================================================================================
# One study
# =============================================================================================


@dataclass
class StudyJob:
    """Everything a worker needs for one study (small tables only)."""

    split: str
    study_id: str
    vertebrae: pd.DataFrame  # the study's rows of vertebrae.csv
    stack: dict | None  # its row of series.parquet (ok stack), None when no readable volume
    stack_reason: str  # why there is no volume
    geometry: dict | None  # z (mm along the normal), iop, spacing per cached slice; instance -> index
    boxes: pd.DataFrame | None  # its rows of train_bounding_boxes.csv (train only)
    fingerprint: str


def _stack_geometry(inst: pd.DataFrame) -> dict:
    """Slice positions along the normal (ascending), IOP and spacing of one stack's ok instances."""
    g = inst.sort_values("index")
    ipp = g[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(float)
    iop = g[IOP_COLS].to_numpy(float)
    return {
        "z": geometry.slice_positions(ipp, iop),
        "ipp": ipp,
        "iop": iop[len(iop) // 2],
        "spacing": g[["spacing_row", "spacing_col"]].to_numpy(float)[len(g) // 2],
        "index_of_instance": dict(zip(g["instance_number"].astype(int), g["index"].astype(int))),
    }


def crop_study(job: StudyJob, paths: Paths, spec: VertebraCropSpec) -> list[dict]:
    """Crop the 7 vertebrae of one study, write its array and then its manifest; returns the rows.

    A study that fails to crop (a cached stack that does not load, a stage-02 box that makes no sense)
    is logged and keeps its 7 rows, not found, with the error as their reason: the stage goes on.
    """
    arr = np.full((len(VERTEBRAE), spec.depth, spec.pixels, spec.pixels), AIR_HU, dtype=np.int16)
    try:
        rows = _crop_rows(job, paths, spec, arr)
    except Exception as err:  # noqa: BLE001 - one bad study must not stop the stage; counted by reason
        log.exception("cervical crop of %s %s failed; its vertebrae get the prior", job.split, job.study_id)
        arr[:] = AIR_HU
        job = replace(job, stack=None, stack_reason=f"crop failed: {err!r}")
        rows = _crop_rows(job, paths, spec, arr)
    save_npy(paths.crop_array(job.split, job.study_id, VIEW), arr)
    write_study_manifest(paths, job.split, job.study_id, job.fingerprint, rows)
    return rows


def _crop_rows(job: StudyJob, paths: Paths, spec: VertebraCropSpec, arr: np.ndarray) -> list[dict]:
    """The manifest rows of one study's 7 vertebrae, each found one's crop written into ``arr``."""
    by_name = {r["vertebra"]: r for r in job.vertebrae.to_dict("records")}
    volume = np.load(paths.cache_dir / job.stack["path"], mmap_mode="r") if job.stack else None
    boxes = _box_slices(job)
    rows = []
    for i, name in enumerate(VERTEBRAE):
        v = by_name.get(name)
        base = {
            "row_id": f"{job.study_id}_{name}",
            "split": job.split,
            "study_id": job.study_id,
            "vertebra": name,
            "array_index": i,
            **{k: (v.get(k) if v is not None else None) for k in VERTEBRA_COLUMNS[3:]},
            "has_boxes": job.boxes is not None and len(job.boxes) > 0,
        }
        reason = _missing_reason(job, v)
        if reason:
            rows.append(base | {"found": False, "reason": reason})
            continue
        fields, arr[i] = _crop_vertebra(v, volume, job.geometry, spec, boxes)
        rows.append(base | {"found": True, "reason": ""} | fields)
    return rows


def _missing_reason(job: StudyJob, v: dict | None) -> str:
    if job.stack is None:
        return f"no volume ({job.stack_reason})"
    if v is None:
        return "no stage 02 row"
    if not bool(v["found"]):
        return "vertebra not found by stage 02"
    named = (str(v.get("series_id")), v.get("stack"))
    if pd.notna(named[1]) and named != (str(job.stack["series_id"]), int(job.stack["stack"])):
        return "stage 02 found it on another stack than the one cropped"
    if any(
        pd.isna(v[k]) for k in ("slice_start", "slice_end", "row_start", "row_end", "col_start", "col_end")
    ):
        return "stage 02 row without a box"
    return ""


def _crop_vertebra(
    v: dict, volume, geo: dict, spec: VertebraCropSpec, boxes: dict
) -> tuple[dict, np.ndarray]:
    """Manifest fields and the int16 (depth, pixels, pixels) crop of one found vertebra."""
    z = geo["z"]
    s0, s1 = int(np.clip(v["slice_start"], 0, len(z) - 1)), int(np.clip(v["slice_end"], 0, len(z) - 1))
    z_lo, z_hi = z[s0] - spec.z_margin_mm, z[s1] + spec.z_margin_mm
    z_out = depth_positions(z_lo, z_hi, spec.depth)
    rc, cc, side = square_box(
        v["row_start"], v["row_end"], v["col_start"], v["col_end"], geo["spacing"], spec.margin_mm
    )
    matrix = crop_matrix(rc, cc, geo["spacing"], side, spec.pixels, geo["iop"])
    spacing_z = float(np.median(np.diff(z))) if len(z) > 1 else 1.0
    crop, outside = resample_vertebra(volume, z, z_out, matrix, spec.pixels, spacing_z / 2)
    half_r, half_c = side / 2 / geo["spacing"][0], side / 2 / geo["spacing"][1]
    fields = {
        "crop_z0_mm": float(z_lo),
        "crop_z1_mm": float(z_hi),
        "depth_mm": float(z_hi - z_lo),
        "depth_outside": outside,
        "crop_row0": rc - half_r,
        "crop_row1": rc + half_r,
        "crop_col0": cc - half_c,
        "crop_col1": cc + half_c,
        "box_mm": float(side),
        **_box_labels(v, z, z_out, boxes),
    }
    return fields, np.clip(np.rint(crop), -32768, 32767).astype(np.int16)


def _box_slices(job: StudyJob) -> dict[int, list[tuple[float, float]]]:
    """Cached slice index → box centres (row, col) of the study's bounding boxes."""
    if job.boxes is None or not len(job.boxes) or job.geometry is None:
        return {}
    index_of = job.geometry["index_of_instance"]
    out: dict[int, list] = {}
    for b in job.boxes.itertuples(index=False):
        k = index_of.get(int(b.slice_number))
        if k is not None:  # a box on an unreadable file has no cached slice
            out.setdefault(k, []).append((b.y + b.height / 2.0, b.x + b.width / 2.0))
    return out


def _box_labels(v: dict, z: np.ndarray, z_out: np.ndarray, boxes: dict) -> dict:
    """Slice-level box labels of one vertebra (train studies with boxes; None elsewhere)."""
    if not boxes:
        return {"box_slices": None, "box_share": None, "box_depth": None}
    s0, s1 = int(v["slice_start"]), int(v["slice_end"])
    hit = np.zeros(len(z), dtype=bool)
    for k, centres in boxes.items():
        if s0 <= k <= s1:
            hit[k] = any(
                v["row_start"] <= r <= v["row_end"] and v["col_start"] <= c <= v["col_end"]
                for r, c in centres
            )
    nearest = np.abs(z[None, :] - z_out[:, None]).argmin(1)
    n = int(hit[s0 : s1 + 1].sum())
    return {
        "box_slices": n,
        "box_share": n / (s1 - s0 + 1),
        "box_depth": hit[nearest].astype(int).tolist(),
    }


# =============================================================================================
# Jobs
# =============================================================================================


def list_studies(data_dir, splits) -> pd.DataFrame:
    """(split, study_id) of every study of the splits, as the task lists its series."""
    task = get_task("cervical")
    out = [(split, str(s)) for split in splits for s in task.list_series(data_dir, split)["study_id"]]
    return pd.DataFrame(out, columns=["split", "study_id"]).drop_duplicates()


def load_vertebrae(paths: Paths) -> pd.DataFrame:
    """Stage 02's table, with the contract's columns checked."""
    vert = pd.read_csv(require(paths.vertebrae, "02_localize"), dtype={"study_id": str, "series_id": str})
    missing = [c for c in VERTEBRA_COLUMNS if c not in vert.columns]
    if missing:
        raise ValueError(f"{paths.vertebrae} lacks columns {missing}")
    vert["found"] = vert["found"].astype(str).str.lower().isin(["true", "1", "1.0"])  # bool even with gaps
    return vert


def load_boxes(data_dir) -> pd.DataFrame:
    f = data_dir / "train_bounding_boxes.csv"
    return (
        pd.read_csv(f, dtype={"StudyInstanceUID": str}) if f.exists() else pd.DataFrame(columns=BOX_COLUMNS)
    )


def study_fingerprint(spec: VertebraCropSpec, job: StudyJob) -> str:
    """Hash of the settings, the study's vertebra rows, its stack and boxes: another hash = stale."""
    vert = job.vertebrae[VERTEBRA_COLUMNS].sort_values("vertebra").astype(str).to_numpy().tolist()
    boxes = job.boxes[BOX_COLUMNS].astype(str).to_numpy().tolist() if job.boxes is not None else []
    stack = [job.stack.get(k) for k in ("path", "n_slices")] if job.stack else job.stack_reason
    return fingerprint(asdict(spec), vert, boxes, stack)


def build_jobs(studies, vertebrae, series, inst, boxes, spec) -> list[StudyJob]:
    """One StudyJob per study, each with its own slices of the tables."""
    ok = series[(series["status"] == "ok") & (series["stack"] >= 0)]
    stack_of = {k: g.sort_values("n_slices").iloc[-1].to_dict() for k, g in ok.groupby(["split", "study_id"])}
    status_of = {k: str(g["status"].iloc[0]) for k, g in series.groupby(["split", "study_id"])}
    inst = inst[inst["status"] == "ok"]
    inst_of = {k: g for k, g in inst.groupby(["split", "study_id", "series_id", "stack"])}
    vert_of = {k: g for k, g in vertebrae.groupby(["split", "study_id"])}
    box_of = {k: g for k, g in boxes.groupby("StudyInstanceUID")}
    jobs = []
    for split, study in studies.itertuples(index=False):
        stack = stack_of.get((split, study))
        geo = None
        if stack is not None:
            # stage 02 names the stack it segmented; else the study's largest
            v = vert_of.get((split, study))
            if v is not None and v["stack"].notna().any():
                sid, st = str(v["series_id"].dropna().iloc[0]), int(v["stack"].dropna().iloc[0])
                stack = ok[(ok["split"] == split) & (ok["series_id"] == sid) & (ok["stack"] == st)]
                stack = stack.iloc[0].to_dict() if len(stack) else stack_of[(split, study)]
            slices = inst_of.get((split, study, stack["series_id"], stack["stack"]))
            if slices is None or not len(slices):  # a stack row without a readable slice
                stack = None
            else:
                geo = _stack_geometry(slices)
        reason = status_of.get((split, study), "not in the stage 01 cache (no folder on disk?)")
        job = StudyJob(
            split,
            study,
            vert_of.get((split, study), vertebrae.iloc[:0]),
            stack,
            "no readable slice in the stage 01 cache" if reason == "ok" else reason,
            geo,
            box_of.get(study) if split == "train" else None,
            "",
        )
        job.fingerprint = study_fingerprint(spec, job)
        jobs.append(job)
    return jobs


def _work(args) -> int:
    """Crop one study (a worker pool item); returns the number of vertebrae cropped."""
    job, paths, spec = args
    return sum(r["found"] for r in crop_study(job, paths, spec))


# =============================================================================================
# The stage
# =============================================================================================


def run_crops(cfg) -> dict:
    """Stage 03 (cervical) over every study of ``cfg.preprocess.splits``. Returns the run summary."""
    paths = Paths.from_config(cfg)
    spec = VertebraCropSpec.from_config(cfg)
    series = pd.read_parquet(require(paths.series_table, "01_preprocess"))
    inst = pd.read_parquet(paths.instance_table)
    for t in (series, inst):
        t["study_id"], t["series_id"] = t["study_id"].astype(str), t["series_id"].astype(str)
    studies = list_studies(paths.data_dir, cfg.preprocess.splits)
    jobs = build_jobs(studies, load_vertebrae(paths), series, inst, load_boxes(paths.data_dir), spec)
    report = lambda manifest: crop_report(manifest, inst, _truth_vertebrae(paths))
    hooks = CropHooks(
        _work, (paths, spec), (VIEW,), MANIFEST_FIELDS, tidy_manifest, report, _summary, "vertebrae"
    )
    return run_crop_stage(cfg, paths, studies, jobs, hooks)


def _summary(manifest: pd.DataFrame, report: dict, vertebrae_cropped: int) -> dict:
    """The cervical keys of the run summary: vertebrae cropped, rows missing, the report's headline."""
    missing = int((~manifest["found"]).sum())
    return {"vertebrae_cropped": vertebrae_cropped, "rows_missing": missing, **_headline(report)}


MANIFEST_FIELDS = [
    "crop_z0_mm",
    "crop_z1_mm",
    "depth_mm",
    "depth_outside",
    "crop_row0",
    "crop_row1",
    "crop_col0",
    "crop_col1",
    "box_mm",
    "box_slices",
    "box_share",
    "box_depth",
]


def tidy_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """The merged manifest's dtypes: string ids, nullable ints where a row was not cropped, bools."""
    df["study_id"], df["series_id"] = df["study_id"].astype(str), df["series_id"].astype("string")
    for col in ("stack", "slice_start", "slice_end", "depth_outside", "box_slices", "voxels"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("row_start", "row_end", "col_start", "col_end", "confidence", "box_share"):
        df[col] = pd.to_numeric(df[col]).astype(float)
    df["found"], df["has_boxes"] = df["found"].astype(bool), df["has_boxes"].astype(bool)
    df["box_depth"] = [d if isinstance(d, list) else None for d in df["box_depth"]]
    return df


# =============================================================================================
# Report
# =============================================================================================


def _truth_vertebrae(paths: Paths) -> pd.DataFrame | None:
    """The generator's true vertebra positions (only on generated data; the report alone reads them)."""
    f = paths.truth_dir / "vertebrae.csv"
    return pd.read_csv(f, dtype={"study_id": str}) if f.exists() else None


def truth_inside(manifest: pd.DataFrame, inst: pd.DataFrame, truth: pd.DataFrame) -> pd.Series:
    """Per found row with a true position: whether the vertebra's true centre lies inside its crop."""
    found = manifest[manifest["found"]]
    true_xyz = truth.assign(row_id=truth["study_id"] + "_" + truth["vertebra"]).set_index("row_id")
    found = found[found["row_id"].isin(true_xyz.index)]
    ok = inst[inst["status"] == "ok"]
    out = {}
    for (study, sid, st), g in found.groupby(["study_id", "series_id", "stack"]):
        geo = _stack_geometry(ok[(ok["study_id"] == study) & (ok["series_id"] == sid) & (ok["stack"] == st)])
        k = len(geo["z"]) // 2
        for r in g.itertuples(index=False):
            xyz = true_xyz.loc[r.row_id, ["cx_mm", "cy_mm", "cz_mm"]].to_numpy(float)
            row, col, _ = geometry.patient_to_pixel(xyz, geo["ipp"][k], geo["iop"], geo["spacing"])
            zc = float(geometry.slice_positions(xyz[None], geo["iop"])[0])
            out[r.row_id] = bool(
                r.crop_row0 <= row <= r.crop_row1
                and r.crop_col0 <= col <= r.crop_col1
                and r.crop_z0_mm <= zc <= r.crop_z1_mm
            )
    return pd.Series(out, dtype=bool)


def crop_report(manifest: pd.DataFrame, inst: pd.DataFrame, truth: pd.DataFrame | None) -> dict:
    """Per split: found rows, why the others are missing, crop sizes, box labels and, on generated
    data, the share of found rows whose true vertebra centre lies inside the crop."""
    inside = truth_inside(manifest, inst, truth) if truth is not None else None
    report = {}
    for split, m in manifest.groupby("split", sort=False):
        f = m[m["found"]]
        part = {
            "studies": int(m["study_id"].nunique()),
            "rows": len(m),
            "found": len(f),
            "missing_reasons": {k: int(n) for k, n in m.loc[~m["found"], "reason"].value_counts().items()},
            "box_mm": quantiles(f["box_mm"], *QUANTILES),
            "depth_mm": quantiles(f["depth_mm"], *QUANTILES),
            "positions_outside_scan": int(f["depth_outside"].fillna(0).sum()),
            "rows_with_box_labels": int(f["box_depth"].notna().sum()),
            "rows_with_a_boxed_slice": int((f["box_slices"].fillna(0) > 0).sum()),
        }
        if inside is not None:
            s = inside[inside.index.isin(m["row_id"])]
            part["truth_centre_inside_share"] = round(float(s.mean()), 4) if len(s) else None
        report[split] = part
    return report


def _headline(report: dict) -> dict:
    out = {}
    for split, part in report.items():
        out[f"{split}_found"] = f"{part['found']} of {part['rows']}"
        if part.get("truth_centre_inside_share") is not None:
            out[f"{split}_truth_centre_inside_share"] = part["truth_centre_inside_share"]
        out[f"{split}_box_mm_p50/depth_mm_p50"] = f"{part['box_mm'].get('p50')}/{part['depth_mm'].get('p50')}"
    return out
