"""Geometry of the cached stacks: each slice's position, orientation and spacing, read from the stage-01
instance table, and the transforms between (index, row, col) in a stack and patient millimetres."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from spine.core import geometry

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
