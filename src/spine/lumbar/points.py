"""Points on cached stacks: label coordinates → (stack, index, row, col) and patient millimetres.

A points table (the output of stage 02, and of ``label_points``) has one row per study, condition and
level: study_id, split, condition, level, series_id, stack, index, row, col (fractional positions in
the cached stack), x_mm, y_mm, z_mm (patient LPS), confidence, source, fold.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spine.core.stacks import stack_geometries
from spine.lumbar.task import CONDITION_NAMES, LEVEL_NAMES

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
