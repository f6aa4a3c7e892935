"""Stage 03 (crops), the parts every task shares: crop geometry and the stage's driver.

Geometry: ``canonical_axes`` / ``crop_matrix`` / ``crop_box`` / ``crop_slice`` map a square of
``size_mm``² mm around a source pixel onto a ``pixels``² crop laid out in one canonical orientation
whatever the stored IOP (axial with patient left to the right and posterior down, sagittal with posterior
to the right and inferior down).

Driver: a task's ``run_crops(cfg)`` loads its tables, builds one job per study (with ``split``,
``study_id`` and a ``fingerprint`` of what the study's crops are made from) and hands them to
``run_crop_stage`` with its ``CropHooks``. The driver skips studies already done (``study_done``: the
per-study manifest holds the same fingerprint and the study's arrays exist) unless ``crop.overwrite``,
crops the others in a worker pool, merges the per-study manifests (``merge_manifests``) into
``paths.crop_manifest``, writes ``paths.crop_report`` and the config, and returns the run summary. A
task's worker writes its arrays, then ``write_study_manifest`` (last: it marks the study done).
``CropSettings`` reads a task's crop settings from ``cfg.crop``; ``quantiles`` summarises a column for
the reports.

Nothing here knows a task's rows, views or columns: those come in through the hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from spine.core.config import save_config
from spine.core.io import save_table, save_text
from spine.core.parallel import resolve_workers, worker_pool
from spine.core.paths import Paths

log = logging.getLogger(__name__)


# =============================================================================================
# Settings
# =============================================================================================


class CropSettings:
    """Base of a task's crop settings: a frozen dataclass whose fields are keys of ``cfg.crop``."""

    @classmethod
    def from_config(cls, cfg):
        """The settings of ``cfg.crop``, each field cast to its annotated type, then ``check``-ed."""
        types = typing.get_type_hints(cls)
        spec = cls(**{f.name: types[f.name](cfg.crop[f.name]) for f in dataclasses.fields(cls)})
        spec.check()
        return spec

    def check(self) -> None:
        """Raise ValueError when the settings cannot make crops (any settings can, by default)."""


# =============================================================================================
# Geometry: a square of patient mm around a source pixel, laid out canonically
# =============================================================================================

# Canonical direction of each patient axis in a crop: +x (patient left) and +y (posterior) grow to the
# right/down, z grows downwards as -z (inferior), as the usual axial (1,0,0,0,1,0) and sagittal
# (0,1,0,0,0,-1) orientations show them.
CANONICAL_SIGN = np.array([1.0, 1.0, -1.0])


def canonical_axes(iop) -> tuple[bool, float, float]:
    """How a slice's pixel axes map onto the canonical crop axes: (transposed, col sign, row sign).

    The crop's columns follow the first of the plane's two patient axes in (x, y, z) order, its rows
    the second, each pointing the canonical way; so a series stored mirrored or transposed (another
    IOP) gives the same crop as the usual one. ``transposed``: source rows run along crop columns.
    """
    iop = np.asarray(iop, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:6]  # directions in which source columns / rows grow
    a_col, a_row = int(np.argmax(np.abs(row_dir))), int(np.argmax(np.abs(col_dir)))
    if a_col == a_row:  # a plane at 45 degrees: no dominant axis each, keep the stored orientation
        return False, 1.0, 1.0
    col_sign = float(np.sign(row_dir[a_col]) * CANONICAL_SIGN[a_col])
    row_sign = float(np.sign(col_dir[a_row]) * CANONICAL_SIGN[a_row])
    return a_row < a_col, col_sign, row_sign


def crop_matrix(row: float, col: float, spacing, size_mm: float, pixels: int, iop=None) -> np.ndarray:
    """2x3 affine from crop pixel (x=j, y=i) to source pixel (x=col, y=row).

    Crop pixel centres sit every ``size_mm / pixels`` mm, symmetric about (row, col), so the crop's
    centre (pixels-1)/2 lands exactly on the point and its edges span ``size_mm``. With ``iop`` the crop
    is laid out in the canonical orientation (``canonical_axes``), else in the stored one.
    """
    step = size_mm / pixels
    half = (pixels - 1) / 2.0
    transposed, col_sign, row_sign = canonical_axes(iop) if iop is not None else (False, 1.0, 1.0)
    dc = col_sign * step / float(spacing[1])  # source columns per crop step
    dr = row_sign * step / float(spacing[0])  # source rows per crop step
    if transposed:
        return np.array([[0.0, dc, col - half * dc], [dr, 0.0, row - half * dr]])
    return np.array([[dc, 0.0, col - half * dc], [0.0, dr, row - half * dr]])


def crop_box(row: float, col: float, spacing, size_mm: float) -> tuple[float, float, float, float]:
    """(row0, col0, row1, col1): the crop's edges in source pixels."""
    hr, hc = size_mm / 2.0 / float(spacing[0]), size_mm / 2.0 / float(spacing[1])
    return row - hr, col - hc, row + hr, col + hc


def crop_slice(
    image: np.ndarray, row: float, col: float, spacing, size_mm: float, pixels: int, iop=None
) -> np.ndarray:
    """Bilinear ``pixels``² crop of ``size_mm``² mm centred on (row, col); zeros outside the image."""
    m = crop_matrix(row, col, spacing, size_mm, pixels, iop)
    return cv2.warpAffine(
        np.ascontiguousarray(image, dtype=np.float32),
        m,
        (pixels, pixels),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )


# =============================================================================================
# Per-study manifests: written last by a worker, they mark a study done
# =============================================================================================


def _plain(value):
    """JSON fallback for numpy scalars."""
    return value.item()


def write_study_manifest(paths: Paths, split: str, study_id, fingerprint: str, rows: list[dict]) -> None:
    """Write a study's manifest ``{"fingerprint", "rows"}``; call it after the study's arrays."""
    manifest = {"fingerprint": fingerprint, "rows": rows}
    save_text(paths.crop_study_manifest(split, study_id), json.dumps(manifest, default=_plain))


def study_done(paths: Paths, split: str, study_id, fingerprint: str, views: Sequence[str] = ()) -> bool:
    """True when the study's manifest exists with ``fingerprint`` and its array of every view exists."""
    path = paths.crop_study_manifest(split, study_id)
    return (
        path.exists()
        and all(paths.crop_array(split, study_id, v).exists() for v in views)
        and json.loads(path.read_text()).get("fingerprint") == fingerprint
    )


def merge_manifests(
    paths: Paths,
    studies: pd.DataFrame,
    columns: Sequence[str] = (),
    tidy: Callable[[pd.DataFrame], pd.DataFrame] = lambda df: df,
) -> pd.DataFrame:
    """Concatenate the per-study manifests (in the order of ``studies``' (split, study_id) rows) into
    ``paths.crop_manifest``; ``columns`` exist even when no row has them; ``tidy`` sets the task's dtypes."""
    rows = []
    for split, study_id in studies.itertuples(index=False):
        rows += json.loads(paths.crop_study_manifest(split, study_id).read_text())["rows"]
    df = pd.DataFrame(rows)
    df = tidy(df.reindex(columns=[*df.columns, *(c for c in columns if c not in df.columns)]))
    save_table(paths.crop_manifest, df)
    return df


def quantiles(values, qs: Sequence[float], digits: int, first: str = "min") -> dict:
    """``{n, <first>, p.., max}`` of the numeric values (``first``: "min" or "mean"); ``{n: 0}`` if none."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    if v.empty:
        return {"n": 0}
    q = v.quantile(list(qs)).round(digits).tolist()
    return {
        "n": len(v),
        first: round(float(getattr(v, first)()), digits),
        **{f"p{round(p * 100)}": x for p, x in zip(qs, q)},
        "max": round(float(v.max()), digits),
    }


# =============================================================================================
# The stage
# =============================================================================================


@dataclass(frozen=True)
class CropHooks:
    """What a task plugs into ``run_crop_stage``.

    ``work(item) -> int``: crops one study, item = (job, *shared); a module-level function, since it is
    pickled to the workers; returns how many crops it made (``counted`` names them on the progress bar).
    ``views``: the arrays a done study has. ``columns``/``tidy``: see ``merge_manifests``.
    ``report(manifest) -> dict``: the JSON report. ``summary(manifest, report, made) -> dict``: the
    task's own summary keys.
    """

    work: Callable[[tuple], int]
    shared: tuple
    views: Sequence[str]
    columns: Sequence[str]
    tidy: Callable[[pd.DataFrame], pd.DataFrame]
    report: Callable[[pd.DataFrame], dict]
    summary: Callable[[pd.DataFrame, dict, int], dict]
    counted: str = "crops"


def crop_studies(cfg, paths: Paths, jobs: list, hooks: CropHooks) -> tuple[list, int, float]:
    """Crop every job not done yet (all with ``crop.overwrite``) in a worker pool with a progress bar.

    Returns (the jobs cropped, crops made, seconds).
    """
    overwrite = bool(cfg.crop.get("overwrite", False))
    todo = [
        j for j in jobs if overwrite or not study_done(paths, j.split, j.study_id, j.fingerprint, hooks.views)
    ]
    workers = resolve_workers(cfg.num_workers)
    log.info("stage 03: %d studies (%d to crop) with %d workers", len(jobs), len(todo), workers)
    t0, made = time.perf_counter(), 0
    bar = tqdm(total=len(todo), desc="crop", unit="study")
    with worker_pool(workers, len(todo)) as pool:
        for n in pool(hooks.work, [(j, *hooks.shared) for j in todo]):
            made += n
            bar.update()
            bar.set_postfix({hooks.counted: made})
    bar.close()
    return todo, made, time.perf_counter() - t0


def run_crop_stage(cfg, paths: Paths, studies: pd.DataFrame, jobs: list, hooks: CropHooks) -> dict:
    """Stage 03 over ``jobs`` (one per row of ``studies``): crop, merge the manifests, write the report
    and the config. Returns the run summary: the common counts and timing around the task's keys."""
    todo, made, seconds = crop_studies(cfg, paths, jobs, hooks)
    manifest = merge_manifests(paths, studies, hooks.columns, hooks.tidy)
    report = hooks.report(manifest)
    save_text(paths.crop_report, json.dumps(report, indent=2))
    save_config(cfg, paths.crop_dir)
    return {
        "studies": len(jobs),
        "studies_cropped": len(todo),
        "studies_skipped_done": len(jobs) - len(todo),
        "rows": len(manifest),
        **hooks.summary(manifest, report, made),
        "seconds": round(seconds, 2),
        "studies_per_s": round(len(todo) / seconds, 1) if seconds > 0 else 0.0,
        "crop_dir": str(paths.crop_dir),
    }
