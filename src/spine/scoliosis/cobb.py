"""Cobb angles from the 68 landmarks, as the AASCE 2019 challenge computes them, and its SMAPE metric.

The challenge's routine (its MATLAB ``angleCal``), written out:

1. Each vertebra's line joins the midpoint of its left edge (corners top-left, bottom-left) to the
   midpoint of its right edge (top-right, bottom-right).
2. The angle between two vertebrae is the angle between their lines (0..180°, from the cosine).
3. The main curve is the pair with the largest angle; its upper and lower end vertebrae are that pair
   (upper = the smaller index, as MATLAB's first-maximum ``max`` picks).
4. S test on the 34 endplate midpoints (top and bottom endplate of each vertebra, top to bottom): the
   spine is S-shaped when these points lie on both sides of the chord from the first to the last one
   (``is_s_curve``).
5. Not S (one curve): the proximal angle is between the first vertebra (T1) and the upper end
   vertebra, the distal one between the last vertebra (L5) and the lower end vertebra.
   S, main curve in the image's upper half (the bottom endplates of its two end vertebrae average
   above half the image height): the proximal angle is the largest between the upper end vertebra and
   any vertebra above it, the distal one the largest between the lower end vertebra and any below it.
   S, main curve in the lower half: the curve above it is the largest angle between its upper end
   vertebra and any vertebra above, and the next one up the largest between that curve's upper end
   vertebra and any vertebra above it.

The MATLAB code prints the largest angle first; the label files hold the angles by region (PT, MT,
TL/L). Here every curve goes to its region's column: one curve or an upper-half main curve is MT with PT
above and TL/L below; a lower-half main curve of an S spine is TL/L with MT and PT the two curves above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spine.scoliosis.task import ANGLES

S_TOLERANCE = 1e-4  # the python ports' tolerance on the S test (MATLAB: exact inequality)


@dataclass
class Cobb:
    """The three angles (degrees) and each curve's end vertebrae (0 = T1 .. 16 = L5, upper first)."""

    pt: float
    mt: float
    tl: float
    ends: dict[str, tuple[int, int]] = field(default_factory=dict)
    s_curve: bool = False

    def angles(self) -> list[float]:
        return [self.pt, self.mt, self.tl]


def vertebra_vectors(points: np.ndarray) -> np.ndarray:
    """(17, 4, 2) corners → (17, 2): from each vertebra's left-edge midpoint to its right-edge midpoint."""
    p = np.asarray(points, dtype=np.float64)
    left = (p[:, 0] + p[:, 2]) / 2
    right = (p[:, 1] + p[:, 3]) / 2
    return right - left


def endplate_midpoints(points: np.ndarray) -> np.ndarray:
    """(17, 4, 2) corners → (34, 2): top then bottom endplate midpoint of each vertebra, top to bottom."""
    p = np.asarray(points, dtype=np.float64)
    top = (p[:, 0] + p[:, 1]) / 2
    bottom = (p[:, 2] + p[:, 3]) / 2
    return np.stack([top, bottom], axis=1).reshape(-1, 2)


def angle_matrix(vectors: np.ndarray) -> np.ndarray:
    """(n, 2) line vectors → (n, n) angles between every two lines, in degrees."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1)
    cos = (v @ v.T) / np.maximum(np.outer(norm, norm), 1e-12)
    return np.degrees(np.arccos(np.clip(np.round(cos, 8), -1.0, 1.0)))


def smooth_lateral(mid: np.ndarray, window: int) -> np.ndarray:
    """Endplate midpoints with x replaced by its moving average over ``window`` points (ends repeated)."""
    m = np.array(mid, dtype=np.float64)
    if window > 1:
        r = window // 2
        m[:, 0] = np.convolve(np.pad(m[:, 0], r, mode="edge"), np.ones(window) / window, mode="valid")
    return m


def is_s_curve(mid: np.ndarray, tol: float = S_TOLERANCE) -> bool:
    """The challenge's S test on the endplate midpoints (34, 2).

    MATLAB: ll_i = (y_i - y_n)/(y_1 - y_n) - (x_i - x_n)/(x_1 - x_n) for i = 1..n-2, and the spine is S
    when ll holds values of both signs, i.e. (sum ll)^2 != (sum |ll|)^2. Multiplying every ll_i by the
    same (y_1 - y_n)(x_1 - x_n) gives the cross product of (point - last) with (first - last): the same
    signs without dividing by zero on a vertical chord. Scaled by the chord's squared length it is
    unitless like ll, and the python ports' tolerance 1e-4 applies.
    """
    m = np.asarray(mid, dtype=np.float64)
    first, last = m[0], m[-1]
    chord = first - last
    d = m[:-2] - last
    ll = (d[:, 1] * chord[0] - d[:, 0] * chord[1]) / max(float(chord @ chord), 1e-12)
    return bool(abs(ll.sum() ** 2 - np.abs(ll).sum() ** 2) > tol)


def cobb_angles(points: np.ndarray, image_height: float, s_smooth: int = 1) -> Cobb:
    """PT, MT and TL/L of one spine from its (17, 4, 2) corners in pixels (see the module docstring).

    ``image_height`` (pixels) decides whether an S spine's main curve lies in the upper or lower half.
    ``s_smooth`` > 1: the S test reads the endplate midpoints' lateral positions averaged over that many
    neighbours (1 = the challenge's literal test, as the labels were made). For predicted landmarks: on a
    near-straight spine a pixel of jitter between neighbours flips the literal test, and with it which
    column each angle goes to (quick-demo OOF SMAPE 20.1 % literal, 17.8 % with 3).
    """
    vec = vertebra_vectors(points)
    mid = endplate_midpoints(points)
    a = angle_matrix(vec)
    n = len(a)
    upper = int(np.argmax(a.max(axis=0)))  # first column holding the maximum: the smaller index
    lower = int(np.argmax(a[:, upper]))
    main = float(a[upper, lower])
    if not is_s_curve(smooth_lateral(mid, s_smooth)):
        return Cobb(
            pt=float(a[0, upper]),
            mt=main,
            tl=float(a[n - 1, lower]),
            ends={"pt": (0, upper), "mt": (upper, lower), "tl": (lower, n - 1)},
        )
    above = int(np.argmax(a[upper, : upper + 1]))  # the curve above the main one: (above, upper)
    if mid[2 * upper + 1, 1] + mid[2 * lower + 1, 1] < image_height:  # main curve in the upper half
        below = lower + int(np.argmax(a[lower, lower:]))
        return Cobb(
            pt=float(a[upper, above]),
            mt=main,
            tl=float(a[lower, below]),
            ends={"pt": (above, upper), "mt": (upper, lower), "tl": (lower, below)},
            s_curve=True,
        )
    top = int(np.argmax(a[above, : above + 1]))  # the curve above that one: (top, above)
    return Cobb(
        pt=float(a[above, top]),
        mt=float(a[upper, above]),
        tl=main,
        ends={"pt": (top, above), "mt": (above, upper), "tl": (upper, lower)},
        s_curve=True,
    )


# --- metric ----------------------------------------------------------------------------------------


def smape_per_image(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per image: sum over the angles of |gt - pred| / sum of (gt + pred) x 100 (0 when both are 0)."""
    gt, pred = np.asarray(gt, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    num = np.abs(gt - pred).sum(axis=-1)
    den = (gt + pred).sum(axis=-1)
    return np.where(den > 0, 100.0 * num / np.where(den > 0, den, 1.0), 0.0)


def score_angles(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """SMAPE (the challenge's score: per-image SMAPE over the 3 angles, mean over images), each angle's
    own SMAPE and mean absolute error in degrees, for (n, 3) arrays in PT, MT, TL/L order."""
    gt, pred = np.asarray(gt, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    out = {"smape": float(smape_per_image(gt, pred).mean())}
    for k, name in enumerate(ANGLES):
        out[f"smape_{name}"] = float(smape_per_image(gt[:, k : k + 1], pred[:, k : k + 1]).mean())
    for k, name in enumerate(ANGLES):
        out[f"mae_{name}"] = float(np.abs(gt[:, k] - pred[:, k]).mean())
    out["mae"] = float(np.abs(gt - pred).mean())
    return out


def align(solution: pd.DataFrame, submission: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(gt, pred) arrays in the solution's row order; a clear error names missing images or columns."""
    for what, df in (("solution", solution), ("submission", submission)):
        missing = [c for c in ["filename", *ANGLES] if c not in df.columns]
        if missing:
            raise ValueError(f"{what} lacks columns {missing}; expected filename,{','.join(ANGLES)}")
    sub = submission.drop_duplicates("filename").set_index("filename")
    absent = solution["filename"][~solution["filename"].isin(sub.index)]
    if len(absent):
        raise ValueError(f"submission lacks {len(absent)} images of the solution, e.g. {absent.iloc[0]!r}")
    pred = sub.loc[solution["filename"], ANGLES].to_numpy(np.float64)
    if not np.isfinite(pred).all():
        raise ValueError("submission holds non-finite angles")
    return solution[ANGLES].to_numpy(np.float64), pred


def score_files(solution_path, submission_path) -> dict[str, float]:
    """``src/score.py --task scoliosis SOLUTION SUBMISSION``: both CSVs with header filename,pt,mt,tl
    (the generator writes the solution as ``<data_dir>_truth/test_angles.csv``)."""
    gt, pred = align(pd.read_csv(solution_path), pd.read_csv(submission_path))
    return score_angles(gt, pred)
