"""Spine measurements from a SPIDER label mask: vertebral body heights (Genant), disc heights, listhesis
(Meyerding), posterior disc herniation, lumbar lordosis and the lumbar curve. Pure numpy / scipy.

Input: labels in the canonical orientation, a 3D array [slice (patient right -> left), row (superior ->
inferior), column (anterior -> posterior)] with ``spacing_mm`` per axis (or one 2D sagittal slice [row,
column]). Everything is measured on the mid-sagittal slice, the slice with the largest area of
(fully visible) vertebral bodies, and its two neighbours; each value is the median over them.

Each vertebral body's outline is fitted with a quadrilateral: its superior and inferior rim lines (rays
along the body's axis near both walls, where a biconcave endplate is still at the rim) and its anterior
and posterior walls; the body's axis is square to the bisector of the two rims. Heights are the length
of the mask along lines square to the endplates (along the axis), 10 % inside the anterior and
posterior walls and in the middle. The mask is sampled bilinearly along each line and counted where it
is >= 0.5, so a boundary falls between the last voxel in and the first out (no half-voxel bias); five
parallel lines 1.5 % of the depth apart are averaged. A predicted mask may come with its class margins
(``segment.class_margins``): then the 0.5 line runs where the segmenter's class probabilities cross,
between voxels, rather than on the voxels' own edges (``structure_mask``). Each body's first frame
comes from the normals of the discs on it (a slipped body sits off its neighbours' centroid line).

Discs: the same three heights along the mean axis of the two bodies; the intervertebral distances
join the facing corners. Listhesis: the offset of the upper body's posterior-inferior corner from the
lower body's posterior-superior corner, along the lower endplate (mm and % of its length; positive:
the upper body is forward). Herniation: the disc's largest protrusion beyond the line joining the two
posterior corners, and a probability (logistic in mm). The sacrum has no label in SPIDER: S1's
superior endplate is the lower face of disc 201 (L5/S1), its posterior corner where that face ends
(not the disc's end, which a herniation pushes back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from spine.spider import labels as lab

log = logging.getLogger(__name__)

STUDY = "spine"  # the structure name of the per-study rows
UNITS = {
    "anterior_height": "mm",
    "middle_height": "mm",
    "posterior_height": "mm",
    "height_loss": "%",
    "genant_grade": "grade",
    "genant_type": "code",
    "height_index": "ratio",
    "anterior_distance": "mm",
    "posterior_distance": "mm",
    "listhesis_mm": "mm",
    "listhesis_percent": "%",
    "meyerding_grade": "grade",
    "herniation_mm": "mm",
    "herniation_probability": "prob",
    "lordosis_deg": "deg",
    "curve_length_mm": "mm",
    "curve_area_mm2": "mm2",
}
VERTEBRA_MEASUREMENTS = (
    "anterior_height",
    "middle_height",
    "posterior_height",
    "height_loss",
    "genant_grade",
    "genant_type",
)
LEVEL_MEASUREMENTS = (
    "anterior_height",
    "middle_height",
    "posterior_height",
    "height_index",
    "anterior_distance",
    "posterior_distance",
    "listhesis_mm",
    "listhesis_percent",
    "meyerding_grade",
    "herniation_mm",
    "herniation_probability",
)
STUDY_MEASUREMENTS = ("lordosis_deg", "curve_length_mm", "curve_area_mm2")
GENANT_TYPES = ("none", "wedge", "biconcave", "crush")  # genant_type codes 0..3
GENANT_CUTS = (20.0, 25.0, 40.0)  # % height loss: grade 1 from 20, 2 from 25, 3 from 40 (DOMAIN.md)
MEYERDING_CUTS = (5.0, 25.0, 50.0, 75.0, 100.0)  # % slip: grade I from 5 (below: no listhesis) .. V above 100
INSIDE_FRACTION = 0.1  # height lines sit 10 % of the depth inside the walls
RIM_ZONE = (0.03, 0.14)  # rim lines are fitted this far inside each wall (share of the depth)
LINE_OFFSETS = (-0.03, -0.015, 0.0, 0.015, 0.03)  # parallel lines averaged, share of the depth
MIN_PIXELS = 20  # a structure with fewer pixels on a slice is not measured there


# --- grading rules (shared with the generator's truth, which applies them to the drawn heights) ----


def genant(h_ant: float, h_mid: float, h_post: float, reference: float | None) -> tuple[float, int, int]:
    """(height loss %, Genant grade 0-3, type code) of a body from its three heights.

    Wedge: anterior against posterior height; biconcave: middle against the larger of the two;
    crush: posterior against ``reference``, the posterior height expected without a fracture (the
    median of the other lumbar bodies; None: not assessed). The largest loss decides the type.
    """
    losses = [1.0 - h_ant / h_post, 1.0 - h_mid / max(h_ant, h_post)]
    losses.append(1.0 - h_post / reference if reference else 0.0)
    k = int(np.argmax(losses))
    loss = 100.0 * max(losses[k], 0.0)
    grade = int(np.searchsorted(GENANT_CUTS, loss, side="right"))
    return loss, grade, (k + 1) if grade > 0 else 0


def meyerding(percent: float) -> int:
    """Meyerding grade of a forward slip given in % of the lower endplate (0: none, or backward)."""
    return int(np.searchsorted(MEYERDING_CUTS, percent, side="right"))


def herniation_probability(protrusion_mm: float, mid_mm: float = 1.5, scale_mm: float = 0.5) -> float:
    """Probability of a herniation given the protrusion (logistic: 0.5 at ``mid_mm``)."""
    return float(1.0 / (1.0 + np.exp(-(protrusion_mm - mid_mm) / scale_mm)))


def curve_stats(points: np.ndarray) -> tuple[float, float]:
    """(length, area) of the polyline through ``points`` (k, 2) mm: its length, and the area between it
    and the chord joining its ends."""
    pts = np.asarray(points, dtype=np.float64)
    length = float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return length, area


# --- geometry on one slice (points in mm: (row, column) = (down, back)) --------------------------


def _perp(d: np.ndarray) -> np.ndarray:
    return np.array([-d[1], d[0]])


def tilt_deg(line_dir: np.ndarray) -> float:
    """Tilt of a line given its direction in (row, column) mm: the angle of its superior normal from
    straight up, positive when the normal tips forward (the convention of the generator's tilts)."""
    u = _perp(np.asarray(line_dir, dtype=np.float64))
    if u[0] > 0:  # make it point up (rows grow downwards)
        u = -u
    return float(np.degrees(np.arctan2(-u[1], -u[0])))


class _Sampler:
    """Bilinear lookups of one structure's binary mask at points in mm."""

    def __init__(self, mask: np.ndarray, spacing):
        self.img = mask.astype(np.float32)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.step = 0.2 * float(self.spacing.min())

    def inside(self, pts: np.ndarray) -> np.ndarray:
        """Whether each point (..., 2) mm lies inside (bilinear value >= 0.5)."""
        idx = (pts / self.spacing).reshape(-1, 2).T
        val = ndimage.map_coordinates(self.img, idx, order=1, mode="constant", cval=0.0)
        return val.reshape(pts.shape[:-1]) >= 0.5

    def ray(self, origin: np.ndarray, direction: np.ndarray, reach: float) -> tuple[float, float, float]:
        """Along origin + s * direction (|s| <= reach): (lowest s inside, highest s inside, length inside)."""
        # samples off the half-voxel grid, so an edge is never sampled exactly (no one-step bias)
        s = np.arange(-reach, reach + self.step, self.step) + 0.37 * self.step
        inside = self.inside(origin[None, :] + s[:, None] * direction[None, :])
        if not inside.any():
            return np.nan, np.nan, 0.0
        return float(s[inside].min()), float(s[inside].max()), float(inside.sum() * self.step)


@dataclass
class Quad:
    """A body fitted on one slice: frame (centre, superior axis u, posterior axis n), rim lines, walls."""

    centre: np.ndarray
    u: np.ndarray
    n: np.ndarray
    # (4, 2) mm: superior-anterior, superior-posterior, inferior-posterior, inferior-anterior
    corners: np.ndarray
    heights: tuple[float, float, float] = (np.nan, np.nan, np.nan)
    lines: list = field(default_factory=list)  # (what, start mm, end mm)

    @property
    def depth(self) -> float:
        """Anterior to posterior wall at mid height."""
        return float(
            np.linalg.norm((self.corners[1] + self.corners[2]) / 2 - (self.corners[0] + self.corners[3]) / 2)
        )

    @property
    def superior_dir(self) -> np.ndarray:
        """Direction of the superior rim line (anterior to posterior)."""
        d = self.corners[1] - self.corners[0]
        return d / np.linalg.norm(d)


def _frame(pts: np.ndarray, up: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, superior axis u (pointing up) and posterior axis n of a body's points: ``up`` if given (the
    spine's direction there), else the short principal axis (ambiguous for a square body)."""
    centre = pts.mean(0)
    if up is None:
        up = np.linalg.eigh(np.cov((pts - centre).T))[1][:, 0]
    u = np.asarray(up, dtype=np.float64) / np.linalg.norm(up)
    u = -u if u[0] > 0 else u
    n = _perp(u)
    n = -n if n[1] < 0 else n
    return centre, u, n


def _fit_line(ps: np.ndarray, ss: np.ndarray) -> tuple[float, float]:
    """Least-squares s = a + b p."""
    b, a = np.polyfit(ps, ss, 1)
    return float(a), float(b)


def _rays(sampler: _Sampler, centre, u, n, positions, along_u: bool, reach: float) -> np.ndarray:
    """(k, 3) lowest, highest and length inside for rays through centre + pos * (n or u) along u (or n)."""
    across, along = (n, u) if along_u else (u, n)
    return np.array([sampler.ray(centre + q * across, along, reach) for q in positions])


def _fit_sides(sampler: _Sampler, centre, u, n, reach: float):
    """Walls (p = a + b s, from rays along n through the middle 60 % of the height) and rims (s = a + b p,
    from rays along u near both walls) of a body in the frame (centre, u, n); None if too little shows."""
    lo, hi, _ = sampler.ray(centre, u, reach)
    if not np.isfinite(lo):
        return None
    s_pos = lo + (hi - lo) * np.linspace(0.2, 0.8, 15)
    walls = _rays(sampler, centre, u, n, s_pos, along_u=False, reach=reach)
    ok = np.isfinite(walls[:, 0])
    if ok.sum() < 3:
        return None
    ant, post = _fit_line(s_pos[ok], walls[ok, 0]), _fit_line(s_pos[ok], walls[ok, 1])
    depth = post[0] - ant[0]
    zone = [ant[0] + f * depth for f in np.linspace(*RIM_ZONE, 6)]
    zone += [post[0] - f * depth for f in np.linspace(*RIM_ZONE, 6)]
    rims = _rays(sampler, centre, u, n, zone, along_u=True, reach=reach)
    ok = np.isfinite(rims[:, 0])
    if ok.sum() < 4:
        return None
    zone = np.asarray(zone)[ok]
    return ant, post, _fit_line(zone, rims[ok, 1]), _fit_line(zone, rims[ok, 0])


def fit_body(mask: np.ndarray, spacing, up: np.ndarray | None = None) -> Quad | None:
    """Fit the quadrilateral of one vertebral body's 2D mask and measure its three heights (mm).

    Starts from ``up`` (the spine's direction at the body, (row, column); default: the mask's short
    principal axis), then turns the frame (three times) so that its posterior axis bisects the two rim
    lines (the endplates), with the centre between the rims at mid depth.
    """
    rr, cc = np.nonzero(mask >= 0.5)
    if len(rr) < MIN_PIXELS:
        return None
    spacing = np.asarray(spacing, dtype=np.float64)
    pts = np.stack([rr, cc], axis=1) * spacing
    sampler = _Sampler(mask, spacing)
    centre, u, n = _frame(pts, up)
    reach = float(np.ptp(pts, axis=0).max())
    for _ in range(3):
        sides = _fit_sides(sampler, centre, u, n, reach)
        if sides is None:
            return None
        ant, post, top, bottom = sides
        # unit directions (p, s) of both rims, summed: the bisector
        bis = np.array([1.0, top[1]]) / np.hypot(1.0, top[1])
        bis += np.array([1.0, bottom[1]]) / np.hypot(1.0, bottom[1])
        p_mid = 0.5 * (ant[0] + post[0])
        s_mid = 0.5 * (top[0] + bottom[0] + (top[1] + bottom[1]) * p_mid)
        centre = centre + p_mid * n + s_mid * u
        n = bis[0] * n + bis[1] * u
        n /= np.linalg.norm(n)
        u = -_perp(n) if _perp(n)[0] > 0 else _perp(n)
    sides = _fit_sides(sampler, centre, u, n, reach)
    if sides is None:
        return None
    ant, post, top, bottom = sides

    def corner(rim, wall):
        # rim: s = a + b p; wall: p = c + d s  ->  p = c + d (a + b p)
        p = (wall[0] + wall[1] * rim[0]) / (1.0 - wall[1] * rim[1])
        return centre + p * n + (rim[0] + rim[1] * p) * u

    corners = np.stack([corner(top, ant), corner(top, post), corner(bottom, post), corner(bottom, ant)])
    quad = Quad(centre=centre, u=u, n=n, corners=corners)
    quad.heights, quad.lines = _heights(sampler, quad, post[0] - ant[0], reach)
    return quad


def _heights(sampler: _Sampler, quad: Quad, depth: float, reach: float):
    """Anterior, middle and posterior height (mask length along u), and the lines drawn for them."""
    c, u, n = quad.centre, quad.u, quad.n
    p_ant = float(((quad.corners[0] + quad.corners[3]) / 2 - c) @ n)
    out, lines = [], []
    for name, f in (("anterior", INSIDE_FRACTION), ("middle", 0.5), ("posterior", 1.0 - INSIDE_FRACTION)):
        p = p_ant + f * depth
        vals = [sampler.ray(c + (p + o * depth) * n, u, reach) for o in LINE_OFFSETS]
        out.append(float(np.mean([v[2] for v in vals])))
        lo, hi, _ = vals[len(vals) // 2]
        if np.isfinite(lo):
            lines.append((f"{name}_height", c + p * n + lo * u, c + p * n + hi * u))
    return tuple(out), lines


# --- discs ---------------------------------------------------------------------------------------


def _face_of_disc(sampler: _Sampler, upper: Quad, reach: float):
    """S1's superior endplate from the disc under L5 (no sacrum label), as a partial Quad.

    Its line is fitted to the lower ends of rays across the disc that lie on one line. S1's anterior
    corner is the disc's end along that line, taken a little above it at several heights and
    extrapolated down to it (the face line itself is hard to follow to its end on voxels). The posterior
    corner is where the rays' lower ends leave the line: a herniation bulges the disc's posterior edge
    above the face, so the disc's end a little above the face lies behind S1's corner by about the
    herniation's size (an unslipped L5/S1 with a 4-6 mm herniation measured as a 4-7 mm listhesis).
    """
    rr, cc = np.nonzero(sampler.img >= 0.5)
    c0 = np.array([rr.mean(), cc.mean()]) * sampler.spacing  # the disc's centroid
    u, n = upper.u, upper.n
    ps = np.linspace(-0.75, 0.75, 121) * upper.depth
    rays = np.array([sampler.ray(c0 + p * n, u, 0.6 * reach) for p in ps])
    ok = np.isfinite(rays[:, 0])
    if ok.sum() < 8:
        return None
    ps_ok, low, high = ps[ok], rays[ok, 0], rays[ok, 1]
    # start from the middle half of the rays, then keep the rays whose lower end lies on the line: the
    # face is straight, a sheared (slipped) disc's slanted edges are not
    core = (ps_ok > np.quantile(ps_ok, 0.25)) & (ps_ok < np.quantile(ps_ok, 0.75))
    tol = 0.75 * float(sampler.spacing.max())
    for _ in range(3):
        a, b = _fit_line(ps_ok[core], low[core])
        near = np.abs(low - (a + b * ps_ok)) <= tol
        if near.sum() < 4:
            break
        core = near
    d = n + b * u
    d /= np.linalg.norm(d)
    up_face = -_perp(d) if _perp(d)[0] > 0 else _perp(d)
    p_mid = float(np.median(ps_ok[core]))
    start = c0 + p_mid * n + (a + b * p_mid) * u
    thin = max(float(np.quantile((high - low)[core], 0.1)), 4.0 * sampler.step)  # the disc's thin end
    heights = np.linspace(0.25, 0.6, 4) * thin
    ends = np.array([sampler.ray(start + h * up_face, d, 0.6 * reach)[:2] for h in heights])
    if not np.all(np.isfinite(ends)):
        return None
    lo0 = float(np.polyval(np.polyfit(heights, ends[:, 0], 1), 0.0))
    la = start + lo0 * d
    # from the face's middle backwards while the rays' lower ends stay on the line
    on_face = np.zeros(len(ps), bool)
    on_face[ok] = np.abs(low - (a + b * ps_ok)) <= tol
    k = int(np.argmin(np.abs(ps - p_mid)))
    while k + 1 < len(ps) and on_face[k + 1]:
        k += 1
    p_end = ps[k] + 0.5 * (ps[1] - ps[0])
    lp = c0 + p_end * n + (a + b * p_end) * u
    corners = np.stack([la, lp, lp, la])
    return Quad(centre=(la + lp) / 2, u=up_face, n=d, corners=corners)


def measure_level(disc: np.ndarray, spacing, upper: Quad, lower: Quad | None, hernia_mid_mm: float,
                  hernia_scale_mm: float) -> tuple[dict, Quad | None, list]:  # fmt: skip
    """Measurements of the disc under ``upper`` (``lower``: the body below, None: S1 from the disc)."""
    rr, _ = np.nonzero(disc >= 0.5)
    if len(rr) < MIN_PIXELS:
        return {}, None, []
    sampler = _Sampler(disc, spacing)
    reach = 3.0 * upper.depth
    from_disc = lower is None
    if from_disc:
        lower = _face_of_disc(sampler, upper, reach)
        if lower is None:
            return {}, None, []
    ua, up = upper.corners[3], upper.corners[2]
    la, lp = lower.corners[0], lower.corners[1]
    u_d = upper.u + lower.u
    u_d /= np.linalg.norm(u_d)
    n_d = _perp(u_d)
    n_d = -n_d if n_d[1] < 0 else n_d
    o = (ua + up + lp + la) / 4
    p_a = 0.5 * float((ua - o) @ n_d + (la - o) @ n_d)
    p_p = 0.5 * float((up - o) @ n_d + (lp - o) @ n_d)
    depth = p_p - p_a
    heights, lines = [], []
    for name, f in (("anterior", INSIDE_FRACTION), ("middle", 0.5), ("posterior", 1.0 - INSIDE_FRACTION)):
        p = p_a + f * depth
        vals = [sampler.ray(o + (p + off * depth) * n_d, u_d, reach) for off in LINE_OFFSETS]
        heights.append(float(np.mean([v[2] for v in vals])))
        lo, hi, _ = vals[len(vals) // 2]
        if np.isfinite(lo):
            lines.append((f"disc_{name}_height", o + p * n_d + lo * u_d, o + p * n_d + hi * u_d))
    protrusion = _protrusion(sampler, up, lp, o)
    lines.append(("posterior_corner_line", lp, up))
    mids = [upper.heights[1]] + ([lower.heights[1]] if np.isfinite(lower.heights[1]) else [])
    out = dict(
        **level_values(heights, mids, ua, la, up, lp),
        herniation_mm=protrusion,
        herniation_probability=herniation_probability(protrusion, hernia_mid_mm, hernia_scale_mm),
    )
    return out, (lower if from_disc else None), lines


def level_values(heights, mids, ua, la, up, lp) -> dict:
    """A disc level's values from its three disc heights (anterior, middle, posterior), the middle
    heights of its vertebrae and the corners facing it (upper / lower vertebra, anterior / posterior):
    disc height index, intervertebral distances, listhesis (the upper posterior corner's offset along
    the lower endplate, mm and % of it) and the Meyerding grade. Shared by the measurement of masks and
    the generator's truth (the same definitions on drawn corners)."""
    e = (lp - la) / np.linalg.norm(lp - la)
    slip = float((lp - up) @ e)
    pct = 100.0 * slip / float(np.linalg.norm(lp - la))
    return dict(
        anterior_height=heights[0],
        middle_height=heights[1],
        posterior_height=heights[2],
        height_index=float(np.mean(heights) / np.mean(mids)),
        anterior_distance=float(np.linalg.norm(ua - la)),
        posterior_distance=float(np.linalg.norm(up - lp)),
        listhesis_mm=slip,
        listhesis_percent=pct,
        meyerding_grade=float(meyerding(pct)),
    )


def _protrusion(sampler: _Sampler, up: np.ndarray, lp: np.ndarray, centre: np.ndarray) -> float:
    """Largest distance (mm) the disc reaches beyond the line lp-up (outwards, away from ``centre``)."""
    d = up - lp
    normal = _perp(d / np.linalg.norm(d))
    if normal @ (centre - lp) > 0:
        normal = -normal
    best = 0.0
    s = np.arange(-3.0, 20.0, sampler.step) + 0.37 * sampler.step
    for w in np.linspace(0.1, 0.9, 33):
        inside = sampler.inside((lp + w * d)[None, :] + s[:, None] * normal[None, :])
        if not inside[s <= 0].any():
            continue
        # follow the disc outwards from the line: the first gap ends the protrusion
        out = inside[s > 0]
        k = int(np.argmin(out)) if not out.all() else len(out)
        best = max(best, float(s[s > 0][k - 1]) if k > 0 else 0.0)
    return best


# --- the whole study -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What ``measure`` found: the table and, for overlays, the points and lines on the mid slice."""

    table: pd.DataFrame  # structure, measurement, value, unit
    mid_slice: int
    slices: list[int]
    corners: dict[str, np.ndarray]  # structure -> (4, 2) (row, column) pixels on mid_slice
    lines: list[tuple[str, np.ndarray, np.ndarray]]  # (what, start, end) (row, column) pixels on mid_slice
    centres: np.ndarray  # (k, 2) (row, column) pixels: the curve L1 .. S1


def mid_sagittal(labels: np.ndarray) -> int:
    """Index of the slice (axis 0) with the largest area of fully visible vertebral bodies."""
    body = (labels >= 1) & (labels <= lab.MAX_COUNT)
    return int(np.argmax(body.reshape(len(labels), -1).sum(1)))


def bodies_only(labels2d: np.ndarray, spacing2d) -> np.ndarray:
    """The slice with each vertebra label reduced to its body. SPIDER's vertebra labels cover the
    posterior arch too; near the midline the laminae and spinous process lie behind the canal, apart
    from the body, and the body is the piece nearest a disc (bodies and discs alternate along the
    column; without a disc, the largest piece). A body-only label passes unchanged."""
    spacing2d = np.asarray(spacing2d, dtype=np.float64)
    out = labels2d.copy()
    discs = [np.argwhere(labels2d == d).mean(0) * spacing2d for d in np.unique(labels2d) if lab.is_disc(d)]
    for v in np.unique(labels2d):
        if not (lab.is_vertebra(v) or lab.is_partial(v)):
            continue
        pieces, n = ndimage.label(labels2d == v)
        if n < 2:
            continue
        index = np.arange(1, n + 1)
        if discs:
            centres = np.array(ndimage.center_of_mass(np.ones_like(pieces), pieces, index)) * spacing2d
            gap = np.min(np.linalg.norm(centres[:, None] - np.array(discs)[None], axis=-1), axis=1)
            keep = index[np.argmin(gap)]
        else:
            keep = index[np.argmax(ndimage.sum_labels(np.ones_like(pieces), pieces, index))]
        out[(pieces > 0) & (pieces != keep)] = lab.BACKGROUND
    return out


def disc_frame(disc: np.ndarray, spacing2d, min_pixels: int = 3):
    """A disc's (centroid, long axis toward posterior, normal toward superior) in mm (row, column) on a
    sagittal slice, from the principal axes of its pixels; None under ``min_pixels`` pixels."""
    pts = np.argwhere(disc) * np.asarray(spacing2d, dtype=float)
    if len(pts) < min_pixels:
        return None
    centre = pts.mean(0)
    _, vecs = np.linalg.eigh((pts - centre).T @ (pts - centre))
    axis = vecs[:, 1] if vecs[1, 1] >= 0 else -vecs[:, 1]  # long axis, toward posterior (+column)
    normal = np.array([-axis[1], axis[0]])
    return centre, axis, -normal if normal[0] > 0 else normal  # toward superior (-row)


def _spine_directions(labels2d: np.ndarray, spacing2d) -> dict[int, np.ndarray]:
    """The spine's upward direction (row, column) at each vertebra label: the mean normal of the discs
    under and over it; without either, from the centroid of the body below to the one above (one-sided
    at the ends); none for a lone body. The discs first: a slipped body sits off the line of its
    neighbours' centroids (a 22 mm slip tilted that line by ~17 degrees and the body's fit failed), but
    its endplates, and the discs on them, keep their direction."""
    found = sorted(v for v in np.unique(labels2d).tolist() if lab.is_vertebra(v) or lab.is_partial(v))
    cents = {}
    for v in found:
        rr, cc = np.nonzero(labels2d == v)
        cents[v % lab.PARTIAL_OFFSET] = np.array([rr.mean(), cc.mean()]) * np.asarray(spacing2d)
    frames = {d: disc_frame(labels2d == d, spacing2d, MIN_PIXELS) for d in np.unique(labels2d).tolist()}
    normals = {d - lab.DISC_OFFSET: f[2] for d, f in frames.items() if lab.is_disc(d) and f is not None}
    out = {}
    for v in cents:
        near = [n for n in (normals.get(v), normals.get(v + 1)) if n is not None]
        above, below = cents.get(v + 1, cents[v]), cents.get(v - 1, cents[v])
        if near:
            out[v] = np.mean(near, axis=0)
        elif not np.allclose(above, below):
            out[v] = above - below
    return out


def structure_mask(v: int, labels2d: np.ndarray, bodies2d: np.ndarray, margin2d: np.ndarray | None):
    """What the measurements sample of structure ``v`` on a slice: its body (``bodies2d``, the labels
    after ``bodies_only``) as 0 / 1, or with ``margin2d`` (its class's margin, ``segment.class_margins``)
    0.5 + margin / 2 on the body and the voxels next to it, so the bilinear 0.5 line runs where the
    classes' probabilities cross, between voxels; next-door voxels of another structure of the same
    class (or of v's own arch) stay 0."""
    own = bodies2d == v
    if margin2d is None:
        return own
    count = labels2d % lab.PARTIAL_OFFSET  # vertebrae 1..25, partial ones 101..125, discs 201..225
    same_class = (count >= 1) & (count <= lab.MAX_COUNT) & ((labels2d > lab.DISC_OFFSET) == lab.is_disc(v))
    keep = own | (ndimage.binary_dilation(own) & ~same_class)
    return np.where(keep, np.clip(0.5 + 0.5 * margin2d, 0.0, 1.0), 0.0).astype(np.float32)


def measure_slice(labels2d: np.ndarray, spacing2d, n_lumbar: int = 5, hernia_mid_mm: float = 1.5,
                  hernia_scale_mm: float = 0.5, margins2d=None) -> tuple[dict, dict, list, list]:  # fmt: skip
    """Measurements of one sagittal slice: ({(structure, measurement): value}, corners mm, lines mm,
    curve points mm). ``margins2d``: the slice's vertebra and disc class margins, or None (the labels'
    own voxel edges)."""
    raw, labels2d = labels2d, bodies_only(labels2d, spacing2d)
    vert_margin, disc_margin = margins2d if margins2d is not None else (None, None)

    def mask(v: int) -> np.ndarray:
        return structure_mask(v, raw, labels2d, disc_margin if lab.is_disc(v) else vert_margin)

    names = lab.vertebra_names(n_lumbar)
    lumbar = [v for v in range(1, n_lumbar + 1)]  # labels of L{n}..L1 (bottom up)
    quads: dict[int, Quad] = {}
    ups = _spine_directions(labels2d, spacing2d)
    for v in lumbar + [n_lumbar + 1]:  # the body above L1 too (not measured)
        q = fit_body(mask(v), spacing2d, ups.get(v))
        if q is not None:
            quads[v] = q
    values, corners, lines = {}, {}, []
    posts = {v: q.heights[2] for v, q in quads.items() if v in lumbar}
    for v in lumbar:
        if v not in quads:
            continue
        q = quads[v]
        name = names[v - 1]
        others = [h for k, h in posts.items() if k != v and np.isfinite(h)]
        ref = float(np.median(others)) if others else None
        loss, grade, kind = genant(*q.heights, ref)
        values.update({(name, "anterior_height"): q.heights[0], (name, "middle_height"): q.heights[1],
                       (name, "posterior_height"): q.heights[2], (name, "height_loss"): loss,
                       (name, "genant_grade"): float(grade), (name, "genant_type"): float(kind)})  # fmt: skip
        corners[name] = q.corners
        lines += [(f"{name} {w}", a, b) for w, a, b in q.lines]
    s1 = None
    for v in lumbar:
        if v not in quads:
            continue
        lower = quads.get(v - 1) if v > 1 else None
        if v > 1 and lower is None:
            continue
        level = lab.disc_name(lab.DISC_OFFSET + v, n_lumbar)
        disc = mask(lab.DISC_OFFSET + v)
        got, face, ls = measure_level(disc, spacing2d, quads[v], lower, hernia_mid_mm, hernia_scale_mm)
        values.update({(level, k): val for k, val in got.items()})
        lines += [(f"{level} {w}", a, b) for w, a, b in ls]
        if v == 1 and face is not None:
            s1 = face
            corners["S1"] = face.corners
    top = quads.get(n_lumbar)
    centres = [quads[v].corners.mean(0) for v in sorted(quads, reverse=True) if v in lumbar]
    if top is not None and s1 is not None:
        values[(STUDY, "lordosis_deg")] = tilt_deg(s1.n) - tilt_deg(top.superior_dir)
        lines.append(("L1 superior endplate", top.corners[0], top.corners[1]))
        lines.append(("S1 superior endplate", s1.corners[0], s1.corners[1]))
    if s1 is not None and len(centres) == n_lumbar:
        centres.append(s1.centre)
        length, area = curve_stats(np.array(centres))
        values[(STUDY, "curve_length_mm")] = length
        values[(STUDY, "curve_area_mm2")] = area
    return values, corners, lines, centres


def measure(labels: np.ndarray, spacing_mm, *, n_lumbar: int = 5, hernia_mid_mm: float = 1.5,
            hernia_scale_mm: float = 0.5, neighbours: int = 1, margins=None) -> Measurement:  # fmt: skip
    """Measure a SPIDER label mask in the canonical orientation (3D, or one 2D sagittal slice).

    ``n_lumbar``: lumbar vertebrae in this spine (6 with a transitional L6; the mask's numbering from
    the bottom cannot tell). Values are the median over the mid-sagittal slice and ``neighbours``
    slices on each side (where measured). Grades are recomputed from the medians. ``margins``: for a
    predicted mask, the vertebra and disc class margins of its voxels (``segment.class_margins``, shape
    (2, *labels.shape)), which place every edge between voxels (``structure_mask``).
    """
    labels = np.asarray(labels)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if labels.ndim == 2:
        labels, spacing = labels[None], np.concatenate([[1.0], spacing])
        margins = None if margins is None else np.asarray(margins)[:, None]
    mid = mid_sagittal(labels)
    slices = [k for k in range(mid - neighbours, mid + neighbours + 1) if 0 <= k < len(labels)]
    per_slice, geometry = [], None
    for k in slices:
        m2d = None if margins is None else (margins[0][k], margins[1][k])
        got = measure_slice(labels[k], spacing[1:], n_lumbar, hernia_mid_mm, hernia_scale_mm, m2d)
        per_slice.append(got[0])
        if k == mid:
            geometry = got[1:]
    keys = list(dict.fromkeys(key for d in per_slice for key in d))
    med = {key: float(np.nanmedian([d.get(key, np.nan) for d in per_slice])) for key in keys}
    _regrade(med, n_lumbar)
    table = pd.DataFrame(
        [(s, m, v, UNITS[m]) for (s, m), v in med.items()],
        columns=["structure", "measurement", "value", "unit"],
    )
    px = spacing[1:]
    corners, lines, centres = geometry
    return Measurement(
        table=table,
        mid_slice=mid,
        slices=slices,
        corners={k: v / px for k, v in corners.items()},
        lines=[(w, a / px, b / px) for w, a, b in lines],
        centres=np.array(centres).reshape(-1, 2) / px,
    )


def _regrade(values: dict, n_lumbar: int) -> None:
    """Recompute grades, types and probabilities from the median heights / slips (a median of grades
    could disagree with the median heights)."""
    names = lab.vertebra_names(n_lumbar)[:n_lumbar]
    posts = {n: values.get((n, "posterior_height"), np.nan) for n in names}
    for name in names:
        h = [values.get((name, f"{w}_height"), np.nan) for w in ("anterior", "middle", "posterior")]
        if not np.all(np.isfinite(h)):
            continue
        others = [v for k, v in posts.items() if k != name and np.isfinite(v)]
        loss, grade, kind = genant(*h, float(np.median(others)) if others else None)
        values[(name, "height_loss")], values[(name, "genant_grade")], values[(name, "genant_type")] = (
            loss,
            float(grade),
            float(kind),
        )
    for (s, m), v in list(values.items()):
        if m == "listhesis_percent" and np.isfinite(v):
            values[(s, "meyerding_grade")] = float(meyerding(v))


# --- with a config (stages 02, 06 and the overlays) ---------------------------------------------
def measure_kwargs(cfg) -> dict:
    """The config's ``measure`` section as keyword arguments of ``measure``."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.measure, resolve=True) if cfg.get("measure") else {}


def measure_image(labels: np.ndarray, spacing, cfg, margins=None):
    """spider_data's measurements of one label array (canonical layout; ``margins``: see ``measure``):
    its ``Measurement`` (table of structure, measurement, value, unit; the points and lines used), or
    (None, why) when it fails, so one mask the measurements cannot read never loses the other images."""
    try:
        return measure(labels, spacing, margins=margins, **measure_kwargs(cfg)), ""
    except Exception as e:  # any failure is logged, counted and named in the report
        log.warning("measuring failed: %s: %s", type(e).__name__, e)
        return None, f"measurement failed: {type(e).__name__}: {e}"


def measure_table(labels: np.ndarray, spacing, cfg, margins=None) -> pd.DataFrame:
    """``measure_image``'s table (empty when measuring failed)."""
    meas, _ = measure_image(labels, spacing, cfg, margins)
    return (
        meas.table
        if meas is not None
        else pd.DataFrame(columns=["structure", "measurement", "value", "unit"])
    )
