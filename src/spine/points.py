"""Points on cached stacks: label coordinates → (stack, index, row, col) and patient millimetres.

A points table (the output of stage 02, and of ``label_points``) has one row per study, condition and
level: study_id, split, condition, level, series_id, stack, index, row, col (fractional positions in
the cached stack), x_mm, y_mm, z_mm (patient LPS), confidence, source, fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import geometry
from .tasks.lumbar import CONDITION_NAMES, LEVEL_NAMES

POINT_COLUMNS = [
    "study_id",
    "split",
    "condition",
    "level",
    "series_id",
    "stack",
    "index",
    "row",
    "col",
    "x_mm",
    "y_mm",
    "z_mm",
    "confidence",
    "source",
    "fold",
]
IOP_COLS = [f"iop_{k}" for k in range(6)]


@dataclass
class StackGeometry:
    """Per-slice geometry of one cached stack, in cached (position) order."""

    ipp: np.ndarray  # (n, 3)
    iop: np.ndarray  # (n, 6)
    spacing: np.ndarray  # (n, 2) row, col spacing

    @classmethod
    def from_instances(cls, inst: pd.DataFrame) -> StackGeometry:
        """From the instance rows of one stack (any order)."""
        g = inst[inst["status"] == "ok"].sort_values("index")
        return cls(
            g[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(float),
            g[IOP_COLS].to_numpy(float),
            g[["spacing_row", "spacing_col"]].to_numpy(float),
        )

    def to_patient(self, index, row, col) -> np.ndarray:
        """Patient mm of fractional (index, row, col); slice origins are interpolated between slices."""
        index = np.clip(np.asarray(index, dtype=float), 0, len(self.ipp) - 1)
        lo = np.floor(index).astype(int)
        hi = np.minimum(lo + 1, len(self.ipp) - 1)
        w = (index - lo)[..., None]
        ipp = self.ipp[lo] * (1 - w) + self.ipp[hi] * w
        k = np.rint(index).astype(int)
        return geometry.pixel_to_patient(row, col, ipp, self.iop[k], self.spacing[k])

    def to_stack(self, point) -> tuple[float, float, float, float]:
        """(index, row, col, distance mm) of a patient point: nearest slice plane, in-plane projection."""
        k, dist = geometry.nearest_slice(point, self.ipp, self.iop)
        row, col, _ = geometry.patient_to_pixel(point, self.ipp[k], self.iop[k], self.spacing[k])
        return float(k), float(row), float(col), dist


def stack_geometries(inst: pd.DataFrame) -> dict[tuple, StackGeometry]:
    """(study_id, series_id, stack) → StackGeometry for every cached stack of an instance table."""
    ok = inst[inst["status"] == "ok"]
    return {key: StackGeometry.from_instances(g) for key, g in ok.groupby(["study_id", "series_id", "stack"])}


def label_points(data_dir: Path, inst: pd.DataFrame) -> pd.DataFrame:
    """train_label_coordinates.csv as a points table (source 'label'), placed through the cache.

    A coordinate whose instance is not in the cache (unreadable file) is dropped and counted in the
    returned frame's ``attrs['dropped']``.
    """
    coords = pd.read_csv(Path(data_dir) / "train_label_coordinates.csv")
    cond = {v: k for k, v in CONDITION_NAMES.items()}
    level = {v: k for k, v in LEVEL_NAMES.items()}
    coords["condition"] = coords["condition"].map(cond)
    coords["level"] = coords["level"].map(level)
    ok = inst[(inst["status"] == "ok") & (inst["split"] == "train")]
    ok = ok[["study_id", "series_id", "instance_number", "stack", "index"]].astype({"instance_number": int})
    merged = coords.merge(ok, on=["study_id", "series_id", "instance_number"], how="inner")
    geos = stack_geometries(inst[inst["split"] == "train"])
    rows = []
    for r in merged.itertuples(index=False):
        geo = geos[(r.study_id, r.series_id, r.stack)]
        xyz = geo.to_patient(r.index, r.y, r.x)
        rows.append(
            {
                "study_id": r.study_id,
                "split": "train",
                "condition": r.condition,
                "level": r.level,
                "series_id": r.series_id,
                "stack": int(r.stack),
                "index": float(r.index),
                "row": r.y,
                "col": r.x,
                "x_mm": xyz[0],
                "y_mm": xyz[1],
                "z_mm": xyz[2],
                "confidence": 1.0,
                "source": "label",
                "fold": -1,
            }
        )
    out = pd.DataFrame(rows, columns=POINT_COLUMNS)
    out.attrs["dropped"] = len(coords) - len(merged)
    return out
