"""Heights from the 68 landmarks: spine, thoracic spine, each vertebral body and each disc.

All from the corners in pixels (and in mm when a pixel spacing is given; AP radiographs of this kind
carry none, so ``pixel_spacing_mm`` is null by default):

- spinal height: the path along the curve from T1's top endplate midpoint to L5's bottom endplate
  midpoint, through every endplate midpoint on the way (so a curved spine is measured along its curve);
- thoracic height: the same path from T1's top to T12's bottom endplate;
- each vertebral body: its middle height (top to bottom endplate midpoint) and its left and right edge
  heights (top-left to bottom-left, top-right to bottom-right corner);
- each disc: the gap between adjacent endplates, from the upper vertebra's bottom endplate midpoint to
  the lower one's top endplate midpoint (a wedge-shaped disc also has left and right gaps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spine.scoliosis.cobb import endplate_midpoints
from spine.scoliosis.task import VERTEBRAE

HEIGHT_COLUMNS = ["filename", "structure", "measurement", "value", "unit"]


def path_length(points: np.ndarray) -> float:
    """Length of the polyline through ``points`` (n, 2)."""
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


def measure(points: np.ndarray) -> list[tuple[str, str, float]]:
    """(structure, measurement, pixels) of one spine's (17, 4, 2) corners in pixels."""
    p = np.asarray(points, dtype=np.float64)
    mid = endplate_midpoints(p)  # (34, 2): T1 top, T1 bottom, T2 top, ...
    t12 = VERTEBRAE.index("T12")
    rows = [
        ("spine", "height_T1_L5", path_length(mid)),
        ("thoracic", "height_T1_T12", path_length(mid[: 2 * t12 + 2])),
    ]
    dist = lambda a, b: float(np.linalg.norm(a - b))
    for i, name in enumerate(VERTEBRAE):
        rows += [
            (name, "body_height_mid", dist(mid[2 * i], mid[2 * i + 1])),
            (name, "body_height_left", dist(p[i, 0], p[i, 2])),
            (name, "body_height_right", dist(p[i, 1], p[i, 3])),
        ]
    for i in range(len(VERTEBRAE) - 1):
        disc = f"{VERTEBRAE[i]}/{VERTEBRAE[i + 1]}"
        rows += [
            (disc, "disc_height_mid", dist(mid[2 * i + 1], mid[2 * i + 2])),
            (disc, "disc_height_left", dist(p[i, 2], p[i + 1, 0])),
            (disc, "disc_height_right", dist(p[i, 3], p[i + 1, 1])),
        ]
    return rows


def heights_table(names: list[str], points: np.ndarray, pixel_spacing_mm: float | None) -> pd.DataFrame:
    """Long table (``HEIGHT_COLUMNS``) of every image's heights: px rows, and mm rows when a spacing is
    given. ``points``: (n, 17, 4, 2) in pixels, NaN for an image without landmarks (it gets no rows)."""
    rows = []
    for name, p in zip(names, points):
        if not np.isfinite(p).all():
            continue
        for structure, what, px in measure(p):
            rows.append((name, structure, what, px, "px"))
            if pixel_spacing_mm:
                rows.append((name, structure, what, px * float(pixel_spacing_mm), "mm"))
    return pd.DataFrame(rows, columns=HEIGHT_COLUMNS)
