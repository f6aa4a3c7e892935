"""Synthetic SPIDER data: sagittal lumbar MRI (.mha) with vertebra, disc and canal masks in the SPIDER layout.

Each patient is one anatomy, imaged as T1, T2 and sometimes T2-SPACE (near-isotropic). The soft tissue,
posterior elements, canal and foramina come from the core phantom (``spine.core.synth.phantom``, the same
as the lumbar generator's); the vertebral bodies and discs are drawn here, in the mid-sagittal plane, as a
chain built from the sacrum up, so the shapes the measurements look for are known exactly:

- each body is a quadrilateral in its own frame (straight anterior and posterior walls, straight rims)
  with heights given 10 % inside its walls (anterior, posterior) and an optional central dip of both
  endplates; wedge, biconcave and crush deformities (Genant grades 1-3) change those heights;
- each disc fills the space between two bodies (corner to corner, and the dips); its anterior/posterior
  wedge makes the lordosis (from flat to marked); narrowed discs are thin; a herniation is a bump of
  known height beyond the line joining the two bodies' posterior corners, central or (as often on real
  scans) paracentral, off the midline toward one side, where the mid-sagittal slice shows little of it;
- a listhesis shifts the body above (and all above it) forward along the lower endplate (Meyerding I-III);
- now and then a transitional sixth lumbar vertebra (L6), which shifts the SPIDER numbering;
- under L5/S1 the sacrum, unlabelled as in SPIDER: S1 to S4 fused into one tapering mass that curves
  back (no full disc under S1, so the lowest disc is told from the bone below it as on real scans), in a
  third of patients with a thin rudimentary S1/S2 disc.

Masks hold the vertebrae, the discs and the canal (the dural sac), with the SPIDER label ids
(``spine.spider.labels``); bodies cut by the field of view get 100 + id. As in SPIDER, a vertebra's label
covers its posterior arch too (pedicles, laminae, spinous process); ``whole_vertebrae=False`` labels
the bodies only, as other data sets do (one convention per data set, as in real data).
The truth folder holds the measurements computed from the drawn geometry (corner points, heights, slip,
angles: never from the masks), the drawn grades and the test split's masks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter1d

from spine.core.io import save_table, save_text
from spine.core.paths import truth_dir
from spine.core.synth import common, phantom
from spine.spider import labels as lab
from spine.spider.io import write_mha
from spine.spider.measure import STUDY, UNITS, curve_stats, genant, level_values

log = logging.getLogger(__name__)

# --- sizes (generator defaults: the real data's; configs/spider/demo.yaml draws small images) -----
DEFAULT_IMAGE_SIZE = 512
DEFAULT_FOV_MM = (280.0, 340.0)  # in-plane field of view: 0.55-0.66 mm pixels at 512
DEFAULT_SLICE_MM = (3.3, 4.8)  # sagittal slice spacing of T1 / T2
DEFAULT_N_SLICES = (13, 19)
SPACE_SLICE_RATIO = (1.8, 2.0)  # T2-SPACE: slice spacing / in-plane spacing (0.90 / 0.47 mm)
SPACE_COVER_MM = 50.0  # T2-SPACE covers about this much left to right
DEFAULT_SPACE_SHARE = 0.25  # share of patients with a T2-SPACE image
# SPIDER's vertebra masks hold the whole vertebra (body, pedicles, laminae, spinous process); other data
# sets label the bodies only: one convention per data set (the measurements isolate the body).
DEFAULT_WHOLE_VERTEBRAE = True

# --- anatomy, bottom up (index 0: the level just above the sacrum) ---------------------------------
# Thoracic extras above the phantom's nodes (T9/T10, T10/T11; bodies T9..T11), the rest from core's
# phantom (BASE_DISC_MM, BASE_BODY_MM: the same anatomy as the lumbar generator).
BODY_MM = {"T9": 21.0, "T10": 22.0, "T11": 23.0, "T12": phantom.BASE_BODY_MM[0]}
BODY_MM.update(zip(("L1", "L2", "L3", "L4", "L5"), phantom.BASE_BODY_MM[1:6], strict=True))
DISC_MM = {"T9": 6.0, "T10": 6.5}  # disc below the named vertebra
DISC_MM.update(zip(("T11", "T12", "L1", "L2", "L3", "L4", "L5"), phantom.BASE_DISC_MM[:7], strict=True))
# Lordotic wedge of the disc below each vertebra (degrees), scaled per patient from flat to marked.
DISC_ANGLE_DEG = {"L5": 12.0, "L4": 9.0, "L3": 6.0, "L2": 4.0, "L1": 2.0, "T12": 0.0, "T11": -2.0}
LORDOSIS_SCALE = (0.3, 1.7)  # L1-S1 lordosis from ~10 to ~60 degrees
SACRUM_MM = 32.0  # height of the (unlabelled) S1 segment drawn under the last disc
# The sacrum below S1 (unlabelled, as in SPIDER): S2..S4 fused, tapering and curving back (kyphotic), so
# no full disc shows under L5/S1; now and then a thin rudimentary S1/S2 disc, as real MRI shows in many.
SACRAL_SEGMENTS = (("S2", 0.85, 0.80), ("S3", 0.70, 0.65), ("S4", 0.55, 0.50))  # name, height, depth x S1
SACRAL_KYPHOSIS_DEG = (6.0, 14.0)  # tilt change per segment, drawn
P_SACRAL_REMNANT = 0.35
MIN_DISC_MM = 2.0  # thinnest disc edge allowed (a lordotic wedge is limited by it)
P_L6 = 0.08  # a transitional sixth lumbar vertebra

# --- what the measurements must catch (per lumbar vertebra / level, bottom up: L5 or L5/S1 first) -----
P_FRACTURE = 0.10
FRACTURE_TYPES = ("wedge", "biconcave", "crush")
GENANT_LOSS = {1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.55)}  # drawn well inside each grade
GENANT_GRADE_P = (0.4, 0.35, 0.25)
P_LISTHESIS = (0.12, 0.12, 0.05, 0.03, 0.02)  # L5/S1, L4/L5, L3/L4, L2/L3, L1/L2
MEYERDING_PERCENT = {1: (8.0, 22.0), 2: (28.0, 47.0), 3: (53.0, 72.0)}
MEYERDING_P = (0.6, 0.3, 0.1)
P_HERNIATION = (0.25, 0.25, 0.12, 0.08, 0.05)
HERNIATION_MM = (2.5, 7.0)
P_PARACENTRAL = 0.4  # share of herniations centred off the midline
P_NARROWING = (0.15, 0.15, 0.10, 0.08, 0.05)
NARROWING_FACTOR = (0.4, 0.6)

# --- storage: how the volume's axes sit in the file (the reader must use the header) --------------
# name -> orientation code of the stored file (the letters name where each SimpleITK axis x, y, z points;
# the canonical layout, spine.spider.io.CANONICAL, is "PIL": numpy [slice R->L, row S->I, column A->P])
LAYOUTS = {
    "standard": "PIL",
    "slices_reversed": "PIR",  # slices stored left to right
    "slice_last": "LPI",  # numpy [row, column, slice]
    "rows_flipped": "PSL",  # rows stored inferior to superior
    "in_plane_transposed": "IPL",  # numpy [slice, column, row]
}
LAYOUT_P = (0.6, 0.1, 0.1, 0.1, 0.1)
CONTRAST = {"t1": "T1", "t2": "T2", "t2_SPACE": "T2"}
MAX_STORED = 4095
PARTIAL_MARGIN_MM = 1.0  # a body with a corner closer than this to the image border is "partial"


def _unit(th: float) -> np.ndarray:
    """Superior normal (y, z) of a frame tilted by ``th`` (radians; positive tips the normal forward)."""
    return np.array([-np.sin(th), np.cos(th)])


def _post(th: float) -> np.ndarray:
    """Posterior direction (y, z) of a frame tilted by ``th``."""
    return np.array([np.cos(th), np.sin(th)])


def _soft(dist, edge: float):
    """Soft indicator of dist > 0 (dist in mm, positive inside), anti-aliased over ``edge`` mm."""
    return np.clip(0.5 + dist / edge, 0.0, 1.0)


@dataclass
class Body:
    """A vertebral body in the sagittal plane, in its own frame: s along the superior normal, p posterior.

    Walls at p = -depth/2 (anterior) and +depth/2 (posterior); rims straight, with heights ``h_ant`` and
    ``h_post`` measured 10 % inside the walls (p = -/+0.4 depth); ``dip``: the middle height lost to both
    endplates' central depression (biconcave), half each, within |p| < DIP_REACH * depth.
    """

    name: str
    centre: np.ndarray  # (y, z) patient mm, at x = the midline
    tilt: float  # radians
    depth: float
    h_ant: float
    h_post: float
    dip: float = 0.0
    half_width: float = 22.0  # lateral half width (x)
    labelled: bool = True

    DIP_REACH = 0.35

    @property
    def slope(self) -> float:
        """Height change per mm of p (posterior)."""
        return (self.h_post - self.h_ant) / (0.8 * self.depth)

    def rim_height(self, p):
        """Rim-to-rim height at p (straight rims, no dip)."""
        return 0.5 * (self.h_ant + self.h_post) + np.asarray(p) * self.slope

    def dip_at(self, p):
        """Depression of each endplate at p (mm)."""
        reach = self.DIP_REACH * self.depth
        return 0.5 * self.dip * np.clip(1.0 - (np.asarray(p) / reach) ** 2, 0.0, None)

    def local(self, y, z) -> tuple[np.ndarray, np.ndarray]:
        """Frame coordinates (s, p) of patient (y, z)."""
        dy, dz = y - self.centre[0], z - self.centre[1]
        u, n = _unit(self.tilt), _post(self.tilt)
        return dy * u[0] + dz * u[1], dy * n[0] + dz * n[1]

    def point(self, s, p) -> np.ndarray:
        """Patient (y, z) of frame coordinates (s, p)."""
        return self.centre + s * _unit(self.tilt) + p * _post(self.tilt)

    def height(self, p) -> float:
        """Height along the frame's normal at p, with the dip: what a measurement line there crosses."""
        return float(self.rim_height(p) - 2.0 * self.dip_at(p))

    def corners(self) -> np.ndarray:
        """(4, 2) patient (y, z): superior-anterior, superior-posterior, inferior-posterior, inferior-anterior
        (the rims' ends on the walls)."""
        half = self.depth / 2
        ha, hp = self.rim_height(-half) / 2, self.rim_height(half) / 2
        return np.stack(
            [self.point(ha, -half), self.point(hp, half), self.point(-hp, half), self.point(-ha, -half)]
        )

    def inside(self, y, z, x, edge: float, inset: float = 0.0):
        """Soft indicator of the body (``inset`` mm inside its surface: the marrow inside the cortex)."""
        s, p = self.local(y, z)
        half = self.depth / 2
        top = self.rim_height(p) / 2 - self.dip_at(p)
        q = ((np.abs(x) / self.half_width) ** 4 + (np.abs(p) / half) ** 4) ** 0.25
        dist = np.minimum(np.minimum(top - s, s + top), (1.0 - q) * min(half, self.half_width))
        return _soft(dist - inset, edge)

    def concavity(self, y, z, upper: bool, edge: float):
        """Soft indicator of the depression of the upper (or lower) endplate: filled by the disc there."""
        if self.dip <= 0:
            return 0.0
        s, p = self.local(y, z)
        s = s if upper else -s
        rim = self.rim_height(p) / 2
        dist = np.minimum(
            np.minimum(s - (rim - self.dip_at(p)), rim + 1.0 - s), self.DIP_REACH * self.depth - np.abs(p)
        )
        return _soft(dist, edge)


def _edge_distance(a: np.ndarray, b: np.ndarray, y, z, inward: np.ndarray):
    """Signed distance (mm) of points from the line a-b, positive on the side of ``inward``."""
    d = (b - a) / np.linalg.norm(b - a)
    normal = np.array([-d[1], d[0]])
    if normal @ (inward - a) < 0:
        normal = -normal
    return (y - a[0]) * normal[0] + (z - a[1]) * normal[1]


@dataclass
class Disc:
    """The disc between ``upper`` and ``lower`` bodies: the quadrilateral of their facing corners, the
    endplate dips, and an optional posterior herniation of height ``hernia_mm`` beyond the posterior
    corner line (centred at lateral ``hernia_x``, half width ``hernia_half``)."""

    upper: Body
    lower: Body
    hernia_mm: float = 0.0
    hernia_x: float = 0.0
    hernia_half: float = 8.0

    HERNIA_SPAN = 0.4  # the bump spans the middle 80 % of the disc's posterior edge, or on a thin
    HERNIA_MIN_SPAN_MM = 4.0  # disc up to the whole edge, to reach this far from its middle

    def corners(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(upper anterior, upper posterior, lower posterior, lower anterior) corners, patient (y, z)."""
        u, lo = self.upper.corners(), self.lower.corners()
        return u[3], u[2], lo[1], lo[0]

    def inside(self, y, z, x, edge: float, inset: float = 0.0):
        """Soft indicator of the disc (quadrilateral, dips and herniation)."""
        ua, up, lp, la = self.corners()
        centre = (ua + up + lp + la) / 4
        dist = np.minimum.reduce(
            [_edge_distance(a, b, y, z, centre) for a, b in ((ua, up), (up, lp), (lp, la), (la, ua))]
        )
        half_width = min(self.upper.half_width, self.lower.half_width)
        dist = np.minimum(dist, half_width - np.abs(x))
        out = _soft(dist - inset, edge)
        if inset == 0.0:
            out = np.maximum(out, self.upper.concavity(y, z, upper=False, edge=edge))
            out = np.maximum(out, self.lower.concavity(y, z, upper=True, edge=edge))
            out = np.maximum(out, self.hernia(y, z, x, edge))
        return out

    def hernia(self, y, z, x, edge: float):
        """Soft indicator of the herniation beyond the posterior corner line."""
        if self.hernia_mm <= 0:
            return 0.0
        _, up, lp, _ = self.corners()
        along = up - lp
        length = np.linalg.norm(along)
        w = ((y - lp[0]) * along[0] + (z - lp[1]) * along[1]) / length**2
        centre = sum(self.corners()) / 4
        e = -_edge_distance(lp, up, y, z, centre)  # positive beyond the line (posterior)
        # the bump spans the middle 80 % of the edge, more on a thin disc, never past the corners
        span = min(max(self.HERNIA_SPAN, self.HERNIA_MIN_SPAN_MM / length), 0.5)
        bump = self.hernia_mm * np.clip(1.0 - ((w - 0.5) / span) ** 2, 0.0, None)
        # 1 mm back inside the line so the bump joins the disc without a seam; nothing where bump = 0
        dist = np.minimum(np.minimum(bump - e, e + 1.0), self.hernia_half - np.abs(x - self.hernia_x))
        dist = np.where(bump > 0, dist, -1.0)
        return _soft(dist, edge)


@dataclass
class Patient:
    """One patient's anatomy: bodies and discs (top to bottom, the sacrum last), the core phantom's spine
    (soft tissue, posterior elements, canal) and what was drawn."""

    pid: int
    n_lumbar: int
    bodies: list[Body]  # top to bottom; the last is the sacrum's S1 (unlabelled)
    discs: list[Disc]  # discs[i] lies under bodies[i]
    spine: phantom.Spine
    drawn: pd.DataFrame  # structure, deformity, genant_grade, meyerding_grade, herniation, narrowing
    sex: str = "F"
    age: int = 50
    sacral: list[Body] = field(default_factory=list)  # S2.. below S1, fused (drawn, never labelled)
    sacral_remnant: float = 0.0  # thickness (mm) of a rudimentary S1/S2 disc; 0 = none

    def body(self, name: str) -> Body:
        """The body named ``name`` ("L3", "S1")."""
        return next(b for b in self.bodies if b.name == name)

    def disc_below(self, name: str) -> Disc:
        """The disc under vertebra ``name``."""
        return next(d for d in self.discs if d.upper.name == name)


def _deformity(rng, h_post: float) -> tuple[str, int, float, float, float]:
    """(type, drawn grade, h_ant, h_post, dip) of a lumbar body of normal posterior height ``h_post``."""
    if rng.random() >= P_FRACTURE:
        ha = h_post * rng.uniform(0.97, 1.05)
        return "none", 0, ha, h_post, h_post * rng.uniform(0.0, 0.04)
    kind = str(rng.choice(FRACTURE_TYPES))
    grade = int(rng.choice([1, 2, 3], p=GENANT_GRADE_P))
    loss = rng.uniform(*GENANT_LOSS[grade])
    if kind == "wedge":
        return kind, grade, h_post * (1 - loss), h_post, h_post * rng.uniform(0.0, 0.03)
    if kind == "biconcave":
        return kind, grade, h_post * rng.uniform(0.99, 1.02), h_post, h_post * loss
    return kind, grade, h_post * (1 - loss), h_post * (1 - loss), 0.0


def _hernia_place(rng) -> tuple[float, float]:
    """(lateral centre, half width) in mm of a herniation: central and broad, or paracentral (5-9 mm off
    the midline, to either side) and narrower."""
    if rng.random() < P_PARACENTRAL:
        return float(rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 9.0)), float(rng.uniform(5.0, 8.0))
    return float(rng.uniform(-2.0, 2.0)), float(rng.uniform(9.0, 12.0))


def _level_draws(rng, i: int) -> dict:
    """Listhesis, herniation and narrowing of lumbar level ``i`` (0 = the lumbosacral level)."""
    k = min(i, len(P_LISTHESIS) - 1)
    out = dict(meyerding=0, slip_pct=rng.uniform(-2.0, 2.0), hernia=0.0, narrow=False)
    if rng.random() < P_LISTHESIS[k]:
        out["meyerding"] = int(rng.choice([1, 2, 3], p=MEYERDING_P))
        out["slip_pct"] = rng.uniform(*MEYERDING_PERCENT[out["meyerding"]])
    if rng.random() < P_HERNIATION[k]:
        out["hernia"] = rng.uniform(*HERNIATION_MM)
    out["narrow"] = bool(rng.random() < P_NARROWING[k])
    return out


def sample_patient(rng: np.random.Generator, pid: int) -> Patient:
    """Draw one patient's anatomy: the chain of bodies and discs from the sacrum up, and the phantom."""
    n_lumbar = 6 if rng.random() < P_L6 else 5
    lumbar = [f"L{i}" for i in range(n_lumbar, 0, -1)]  # bottom up
    names = lumbar + ["T12", "T11", "T10", "T9"]
    size = rng.uniform(0.9, 1.1)
    depth = 2.0 * rng.uniform(15.5, 18.5)
    half_width = rng.uniform(20.0, 24.0)
    lordosis = rng.uniform(*LORDOSIS_SCALE)
    th = 0.0  # the sacrum's superior endplate; the whole chain is turned upright below
    sacrum = Body("S1", np.zeros(2), th, depth, SACRUM_MM, SACRUM_MM, half_width=half_width, labelled=False)
    sacrum.centre = -sacrum.rim_height(0.0) / 2 * _unit(th)
    q = np.zeros(2)  # centre of the current lower face (p = 0 of the rim line)
    lower = sacrum
    bodies, discs, drawn = [sacrum], [], []
    for i, name in enumerate(names):
        base = "L5" if name == "L6" else name  # a transitional L6 is sized like L5
        is_lumbar = name in lumbar
        lvl = _level_draws(rng, i) if is_lumbar else dict(meyerding=0, slip_pct=0.0, hernia=0.0, narrow=False)
        h = (
            DISC_MM[base]
            * rng.uniform(0.85, 1.15)
            * (rng.uniform(*NARROWING_FACTOR) if lvl["narrow"] else 1.0)
        )
        scale = lordosis if is_lumbar else 1.0
        alpha = np.deg2rad(DISC_ANGLE_DEG.get(base, -3.0) * scale + rng.normal(0.0, 1.5))
        # keep both disc edges at least MIN_DISC_MM thick
        limit = np.arctan(max(h - MIN_DISC_MM, 0.0) / (depth / 2))
        alpha = float(np.clip(alpha, -limit, limit))
        th_up = th - alpha
        q_up = q + h * _unit(th - alpha / 2) - lvl["slip_pct"] / 100.0 * lower.depth * _post(th)
        d = depth if is_lumbar else depth * 0.92
        h_post = BODY_MM[base] * size * rng.uniform(0.96, 1.04)
        if is_lumbar:
            kind, grade, ha, hp, dip = _deformity(rng, h_post)
        else:
            kind, grade, ha, hp, dip = "none", 0, h_post * rng.uniform(0.9, 1.0), h_post, 0.0
        body = Body(name, np.zeros(2), 0.0, d, ha, hp, dip, half_width=half_width)
        # the body's frame bisects its rims: its lower rim (tilt th_up) is turned by -gamma from it
        gamma = float(np.arctan(body.slope / 2))
        body.tilt = th_up + gamma
        body.centre = q_up + body.rim_height(0.0) / 2 * _unit(body.tilt)
        q, th = body.centre + body.rim_height(0.0) / 2 * _unit(body.tilt), body.tilt + gamma
        hernia_mm = lvl["hernia"]
        discs.append(Disc(body, lower, hernia_mm, *_hernia_place(rng)))
        bodies.append(body)
        if is_lumbar:
            drawn.append(dict(structure=name, deformity=kind, genant_grade=grade))
            level = f"{name}/{lower.name}"
            drawn.append(
                dict(
                    structure=level,
                    meyerding_grade=lvl["meyerding"],
                    herniation=int(hernia_mm > 0),
                    herniation_mm=hernia_mm,
                    narrowing=int(lvl["narrow"]),
                )
            )
        lower = body
    bodies, discs = bodies[::-1], discs[::-1]  # top to bottom
    sacral = _sacral_segments(sacrum, rng)
    _place(bodies + sacral, rng)
    spine = _phantom_spine(rng, bodies, discs, depth, half_width)
    table = pd.DataFrame(drawn)
    table["transitional_l6"] = int(n_lumbar == 6)
    return Patient(
        pid,
        n_lumbar,
        bodies,
        discs,
        spine,
        table,
        sex=str(rng.choice(["F", "M"])),
        age=int(rng.integers(20, 85)),
        sacral=sacral,
        sacral_remnant=float(rng.uniform(1.0, 2.0)) if rng.random() < P_SACRAL_REMNANT else 0.0,
    )


def _sacral_segments(s1: Body, rng) -> list[Body]:
    """S2.. under S1: each tilted back from the one above (the sacrum's kyphosis), smaller, and overlapping
    it by enough that no gap opens at either wall: one fused, tapering mass."""
    out, upper = [], s1
    for name, h_share, d_share in SACRAL_SEGMENTS:
        tilt = upper.tilt - np.deg2rad(rng.uniform(*SACRAL_KYPHOSIS_DEG))
        h = SACRUM_MM * h_share * rng.uniform(0.9, 1.1)
        depth = s1.depth * d_share
        overlap = 1.0 + depth / 2 * abs(np.tan(tilt - upper.tilt))
        top = upper.centre - (upper.rim_height(0.0) / 2 - overlap) * _unit(upper.tilt)
        # the segments' posterior walls line up (the sacral canal runs behind them)
        top = top + (upper.depth - depth) / 2 * _post(upper.tilt)
        seg = Body(name, np.zeros(2), tilt, depth, h, h, half_width=upper.half_width * 0.95, labelled=False)
        seg.centre = top - h / 2 * _unit(tilt)
        out.append(seg)
        upper = seg
    return out


def _place(bodies: list[Body], rng) -> None:
    """Turn the chain so L3 stands about upright and move it to a random place in the patient."""
    l3 = next(b for b in bodies if b.name == "L3")
    turn = -l3.tilt + np.deg2rad(rng.normal(0.0, 4.0))
    c, s = np.cos(turn), np.sin(turn)
    rot = np.array([[c, -s], [s, c]])  # rotating (y, z) by +turn adds turn to every tilt
    origin = l3.centre.copy()
    shift = np.array([rng.uniform(-40.0, 0.0), rng.uniform(-60.0, 60.0)])
    for b in bodies:
        b.centre = rot @ (b.centre - origin) + shift
        b.tilt += turn


def _phantom_spine(
    rng, bodies: list[Body], discs: list[Disc], depth: float, half_width: float
) -> phantom.Spine:
    """The core phantom's spine along a smooth axis through the body centres (posterior elements, canal)."""
    pts = [bodies[0].centre + 40.0 * _unit(bodies[0].tilt)]
    for b in bodies:
        pts.append(b.centre)
    pts.append(bodies[-1].centre - 40.0 * _unit(bodies[-1].tilt))
    pts = np.array(pts)[::-1]  # bottom up
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    step = 0.5
    t = np.arange(-120.0, arc[-1] + 120.0 + step, step)
    y = np.interp(t, arc, pts[:, 0], left=np.nan, right=np.nan)
    z = np.interp(t, arc, pts[:, 1], left=np.nan, right=np.nan)
    # extend straight beyond the ends, then smooth the kinks (a listhesis) over ~1 cm
    for arr, k in ((y, 0), (z, 1)):
        d0 = (pts[1, k] - pts[0, k]) / seg[0]
        d1 = (pts[-1, k] - pts[-2, k]) / seg[-1]
        lo, hi = t < 0, t > arc[-1]
        arr[lo] = pts[0, k] + t[lo] * d0
        arr[hi] = pts[-1, k] + (t[hi] - arc[-1]) * d1
    y, z = gaussian_filter1d(y, 20.0, mode="nearest"), gaussian_filter1d(z, 20.0, mode="nearest")
    tilt = np.arctan2(-np.gradient(y), np.gradient(z))
    tab = np.stack([y, z, tilt], axis=1)

    # disc nodes (arc length of each disc centre), top to bottom, then two fused sacral nodes
    def arc_of(p):
        return float(t[np.argmin((y - p[0]) ** 2 + (z - p[1]) ** 2)])

    t_nodes = [arc_of(sum(d.corners()) / 4) for d in discs]
    t_nodes += [t_nodes[-1] - 25.0, t_nodes[-1] - 45.0]
    t_nodes = np.array(t_nodes)
    thick = np.array(
        [np.linalg.norm(d.upper.corners()[3] - d.lower.corners()[0]) for d in discs] + [0.0, 0.0]
    )
    n = len(t_nodes)
    canal_ap, canal_lr = rng.uniform(6.5, 8.0), rng.uniform(8.5, 10.0)
    rb = depth / 2
    return phantom.Spine(
        x0=float(rng.normal(0.0, 3.0)),
        t_nodes=t_nodes,
        disc_mm=thick,
        tab_t0=float(t[0]),
        tab_dt=step,
        tab=tab,
        body_rx=half_width,
        body_rb=rb,
        canal_b=rb + rng.uniform(1.5, 2.5) + canal_ap,
        canal_ap=canal_ap,
        canal_lr=canal_lr,
        foramen_x=rng.uniform(16.5, 19.5),
        foramen_b=rb + rng.uniform(3.0, 5.0),
        recess_x=canal_lr + rng.uniform(0.5, 1.5),
        node_severity=np.zeros((5, n)),
        degeneration=np.zeros(n),
    )


# =============================================================================================
# Images and masks
# =============================================================================================


@dataclass
class ImagePlan:
    """Where one image of a patient sits: canonical grid (slices left to right, rows down, columns back)."""

    name: str  # file stem, "<patient>_<modality>"
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    origin: np.ndarray  # LPS of canonical voxel (0, 0, 0)
    layout: str = "standard"


def _fit_rows(patient: Patient, fov: float, rng) -> float:
    """Patient z of the image's top row: S1's top 12-22 % of the field above the bottom, L1's top inside."""
    s1 = patient.bodies[-1].corners()[:2].mean(0)
    l1_top = max(patient.body("L1").corners()[:2, 1])
    bottom = s1[1] - rng.uniform(0.12, 0.22) * fov
    top = bottom + fov
    if top < l1_top + 8.0:  # a short field: keep L1 inside, the sacrum then sits lower
        top = l1_top + 8.0
    return float(top)


def plan_image(rng, patient: Patient, modality: str, size: int, fov_mm, slice_mm, n_slices) -> ImagePlan:
    """Draw the field of view and sampling of one image (T2-SPACE: near-isotropic, more slices)."""
    fov = rng.uniform(*fov_mm)
    pixel = round(fov / size, 6)
    if modality == "t2_SPACE":
        gap = round(pixel * rng.uniform(*SPACE_SLICE_RATIO), 6)
        n = max(3, int(round(SPACE_COVER_MM / gap)))
    else:
        gap = round(rng.uniform(*slice_mm), 6)
        n = int(rng.integers(n_slices[0], n_slices[1] + 1))
    x_first = patient.spine.x0 + rng.uniform(-2.0, 2.0) - (n - 1) / 2 * gap
    l3 = patient.body("L3").centre
    y_front = l3[0] + rng.uniform(10.0, 25.0) - size * pixel / 2
    z_top = _fit_rows(patient, size * pixel, rng)
    return ImagePlan(
        name=f"{patient.pid}_{modality}",
        modality=modality,
        shape=(n, size, size),
        spacing=(gap, pixel, pixel),
        origin=np.array([x_first, y_front, z_top]),
    )


def _row_window(plan: ImagePlan, pts: np.ndarray, margin: float) -> slice:
    """Rows of the canonical grid spanned by patient (y, z) points, with a margin in mm."""
    z = pts[:, 1]
    r0 = int(np.floor((plan.origin[2] - z.max() - margin) / plan.spacing[1]))
    r1 = int(np.ceil((plan.origin[2] - z.min() + margin) / plan.spacing[1])) + 1
    return slice(max(r0, 0), max(min(r1, plan.shape[1]), 0))


def is_partial(body: Body, plan: ImagePlan) -> bool:
    """Whether the field of view cuts ``body`` (a corner within PARTIAL_MARGIN_MM of the border or out)."""
    c = body.corners()
    rows = (plan.origin[2] - c[:, 1]) / plan.spacing[1]
    cols = (c[:, 0] - plan.origin[1]) / plan.spacing[2]
    m_r, m_c = PARTIAL_MARGIN_MM / plan.spacing[1], PARTIAL_MARGIN_MM / plan.spacing[2]
    inside = (
        (rows >= m_r) & (rows <= plan.shape[1] - 1 - m_r) & (cols >= m_c) & (cols <= plan.shape[2] - 1 - m_c)
    )
    return not bool(inside.all())


def structure_labels(patient: Patient, plan: ImagePlan) -> dict[str, int]:
    """SPIDER label id of every body and disc of ``patient`` in this image (0: not labelled)."""
    named = [b for b in patient.bodies if b.labelled]
    out = {}
    for j, body in enumerate(named[::-1], start=1):  # numbered from the bottom
        out[body.name] = j + (lab.PARTIAL_OFFSET if is_partial(body, plan) else 0)
        out[f"disc:{body.name}"] = lab.DISC_OFFSET + j
    return out


def render_volume(patient: Patient, plan: ImagePlan, whole: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free canonical image (float32) and its SPIDER label mask (uint8); ``whole``: vertebra labels
    cover the posterior arch too (as SPIDER's), else the bodies only."""
    n, rows, cols = plan.shape
    gap, sr, sc = plan.spacing
    spine = patient.spine
    v = phantom.CONTRASTS[CONTRAST[plan.modality]]
    edge = float(max(sr, sc))
    xs = plan.origin[0] + gap * np.arange(n)
    ipp = np.stack([xs, np.full(n, plan.origin[1]), np.full(n, plan.origin[2])], axis=1)
    iop = np.broadcast_to(np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]), (n, 6))
    t, b, x = phantom.smooth_on_pixels(lambda p: np.stack(spine.to_spine(p)), ipp, iop, (sr, sc), rows, cols)
    layers = (phantom.paint_torso, phantom.paint_posterior, phantom.paint_canal, phantom.paint_foramina)
    img = phantom.render_local(
        spine, CONTRAST[plan.modality], t.astype(np.float64), b, x, edge, painters=layers
    )
    mask = np.zeros(plan.shape, dtype=np.uint8)
    mask[phantom.ellipse(x, b - spine.canal_b, spine.canal_lr, spine.canal_ap, edge) >= 0.5] = lab.CANAL
    ids = structure_labels(patient, plan)
    if whole:  # the arch's bone takes the label of the body between the same two discs
        _, bone, _ = phantom.posterior_elements(spine, phantom.locate(spine, t, b, x), edge)
        arch = (bone >= 0.5) & (mask == 0)
        below_discs = np.searchsorted(-spine.t_nodes[: len(patient.discs)], -t[arch])  # discs above it
        lut = np.array([ids.get(body.name, lab.BACKGROUND) for body in patient.bodies], np.uint8)
        mask[arch] = lut[below_discs]  # the last body is S1: unlabelled
    del t, b, x
    y = (plan.origin[1] + sc * np.arange(cols))[None, None, :]
    z = (plan.origin[2] - sr * np.arange(rows))[None, :, None]
    xl = (xs - spine.x0)[:, None, None]
    # a narrowed (degenerated) disc's nucleus is darker on T2
    narrowed = {lv.split("/")[0] for lv in patient.drawn.loc[patient.drawn["narrowing"] == 1, "structure"]}
    for d in patient.discs:
        win = _row_window(plan, np.stack(d.corners()), 15.0)
        if win.stop <= win.start:
            continue
        zz = z[:, win]
        disc = d.inside(y, zz, xl, edge)
        nucleus = d.inside(y, zz, xl, edge, inset=2.5)
        signal = v["nucleus"] * (1.0 - v["nucleus_drop"] * (0.8 if d.upper.name in narrowed else 0.2))
        sub = img[:, win]
        phantom.paint(sub, disc, v["annulus"])
        phantom.paint(sub, nucleus, signal)
        if d.upper.labelled:
            mask[:, win][disc >= 0.5] = ids[f"disc:{d.upper.name}"]
    for body in patient.bodies[:-1]:
        _paint_bodies(img, [body], plan, y, z, xl, edge, v)
        win = _row_window(plan, body.corners(), 5.0)
        if win.stop > win.start:
            mask[:, win][body.inside(y, z[:, win], xl, edge) >= 0.5] = ids[body.name]
    if whole:  # a vertebra whose arch the field of view cuts is partially visible too (stage 02's rule)
        for label in np.unique(mask[mask <= lab.MAX_COUNT]).tolist():
            if label and lab.cut_by_field(mask == label, plan.spacing, PARTIAL_MARGIN_MM):
                mask[mask == label] = label + lab.PARTIAL_OFFSET
    sacrum = [patient.bodies[-1], *patient.sacral]  # unlabelled, as in SPIDER
    _paint_bodies(img, sacrum, plan, y, z, xl, edge, v)
    for body in sacrum:
        win = _row_window(plan, body.corners(), 5.0)
        if win.stop > win.start:
            mask[:, win][body.inside(y, z[:, win], xl, edge) >= 0.5] = lab.BACKGROUND
    if patient.sacral_remnant > 0 and patient.sacral:
        s1, s2 = sacrum[:2]
        _paint_remnant(img, s1, s2, patient.sacral_remnant, plan, y, z, xl, edge, v)
    return img, mask


def _paint_bodies(img, bodies: list[Body], plan: ImagePlan, y, z, xl, edge: float, v: dict) -> None:
    """Cortex then marrow of ``bodies`` as one bone: all cortices first, so that the marrow of fused
    segments (the sacrum's) runs through their junctions."""
    wins = [_row_window(plan, b.corners(), 5.0) for b in bodies]
    for inset, value in ((0.0, v["cortex"]), (1.2, v["marrow"])):
        for body, win in zip(bodies, wins):
            if win.stop > win.start:
                phantom.paint(img[:, win], body.inside(y, z[:, win], xl, edge, inset=inset), value)


def _paint_remnant(img, s1: Body, s2: Body, mm: float, plan, y, z, xl, edge: float, v: dict) -> None:
    """A rudimentary S1/S2 disc: a thin band of disc signal across the middle of the junction."""
    win = _row_window(plan, s1.corners(), 5.0)
    if win.stop <= win.start:
        return
    s, p = s2.local(y, z[:, win])
    across = mm / 2 - np.abs(s - s2.rim_height(0.0) / 2 + 1.0)  # 1 mm below S2's top: in the overlap
    band = _soft(np.minimum(across, 0.3 * s2.depth - np.abs(p)), edge) * _soft(
        0.7 * s2.half_width - np.abs(xl), edge
    )
    phantom.paint(img[:, win], band, 0.5 * (v["annulus"] + v["nucleus"]))


def acquire(clean: np.ndarray, rng) -> np.ndarray:
    """Rician noise and the scanner's gain; stored as uint16 within 12 bits."""
    sigma = np.float32(rng.uniform(0.015, 0.04))
    n1 = rng.standard_normal(clean.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(clean.shape, dtype=np.float32) * sigma
    mag = np.sqrt((clean + n1) ** 2 + n2**2) * rng.uniform(900.0, 1700.0)
    return np.clip(np.rint(mag), 0, MAX_STORED).astype(np.uint16)


def to_image(arr: np.ndarray, spacing, origin, layout: str) -> sitk.Image:
    """A SimpleITK image of a canonical array (``origin``: LPS of voxel (0, 0, 0), ``spacing`` per array
    axis) stored in ``layout``: axes permuted and flipped, the header placing every voxel where it was."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing([float(v) for v in reversed(spacing)])
    img.SetOrigin([float(v) for v in origin])
    # SimpleITK axes x, y, z = array axes 2, 1, 0: posterior, inferior, left
    img.SetDirection([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    return sitk.DICOMOrient(img, LAYOUTS[layout])


# =============================================================================================
# Truth: measurements from the drawn geometry
# =============================================================================================


def _disc_ray_length(disc: Disc, origin: np.ndarray, direction: np.ndarray, step: float = 0.01) -> float:
    """Length (mm) of the line origin + s * direction inside the drawn disc (exact region, midline)."""
    s = np.arange(-40.0, 40.0, step)
    pts = origin[None, :] + s[:, None] * direction[None, :]
    return float((disc.inside(pts[:, 0], pts[:, 1], 0.0, 1e-6) >= 0.5).sum() * step)


def level_truth(disc: Disc) -> dict:
    """Disc heights, intervertebral distances, listhesis and herniation of one level, from its corners."""
    ua, up, lp, la = disc.corners()
    u_d = _unit(disc.upper.tilt) + _unit(disc.lower.tilt)
    u_d /= np.linalg.norm(u_d)
    n_d = np.array([u_d[1], -u_d[0]])  # posterior, square to u_d
    o = (ua + up + lp + la) / 4
    p_a = 0.5 * float((ua - o) @ n_d + (la - o) @ n_d)
    p_p = 0.5 * float((up - o) @ n_d + (lp - o) @ n_d)
    depth = p_p - p_a
    heights = [_disc_ray_length(disc, o + (p_a + f * depth) * n_d, u_d) for f in (0.1, 0.5, 0.9)]
    mids = [disc.upper.height(0.0)] + ([disc.lower.height(0.0)] if disc.lower.labelled else [])
    return dict(
        **level_values(heights, mids, ua, la, up, lp),
        herniation_mm=float(disc.hernia_mm),
        herniation_probability=float(disc.hernia_mm > 0),  # the truth of a probability is the event
    )


def _rim_tilt_deg(body: Body, superior: bool = True) -> float:
    """Tilt (degrees) of a body's superior (or inferior) rim line."""
    gamma = np.arctan(body.slope / 2)
    return float(np.degrees(body.tilt + (gamma if superior else -gamma)))


def truth_measurements(patient: Patient) -> pd.DataFrame:
    """Every measurement of ``patient`` (structure, measurement, value, unit), from the drawn geometry."""
    names = lab.vertebra_names(patient.n_lumbar)[: patient.n_lumbar]
    bodies = {b.name: b for b in patient.bodies}
    heights = {n: [bodies[n].height(f * bodies[n].depth) for f in (-0.4, 0.0, 0.4)] for n in names}
    rows = []
    for name in names[::-1]:  # L1 first
        ha, hm, hp = heights[name]
        others = [heights[k][2] for k in names if k != name]
        loss, grade, kind = genant(ha, hm, hp, float(np.median(others)))
        vals = dict(anterior_height=ha, middle_height=hm, posterior_height=hp, height_loss=loss,
                    genant_grade=float(grade), genant_type=float(kind))  # fmt: skip
        rows += [(name, m, v) for m, v in vals.items()]
    for name in names[::-1]:
        disc = patient.disc_below(name)
        level = f"{name}/{disc.lower.name}"
        rows += [(level, m, v) for m, v in level_truth(disc).items()]
    l1, sacrum = bodies["L1"], patient.bodies[-1]
    rows.append((STUDY, "lordosis_deg", _rim_tilt_deg(sacrum) - _rim_tilt_deg(l1)))
    centres = [bodies[n].corners().mean(0) for n in names[::-1]] + [sacrum.corners()[:2].mean(0)]
    length, area = curve_stats(np.array(centres))
    rows += [(STUDY, "curve_length_mm", length), (STUDY, "curve_area_mm2", area)]
    table = pd.DataFrame(rows, columns=["structure", "measurement", "value"])
    table["unit"] = table["measurement"].map(UNITS)
    return table


# =============================================================================================
# The dataset
# =============================================================================================


def _layouts(rng, n: int) -> list[str]:
    """A storage layout per image: mostly the standard one, each other one at least once (n >= 5)."""
    names = list(LAYOUTS)
    out = [str(v) for v in rng.choice(names, size=n, p=LAYOUT_P)]
    missing = [k for k in names if k not in out]
    spare = [i for i, v in enumerate(out) if v == "standard"]
    for k, i in zip(missing, rng.permutation(spare)[: len(missing)], strict=False):
        out[int(i)] = k
    return out


def _patient_ids(rng, n: int) -> list[int]:
    """``n`` distinct patient numbers like SPIDER's (1..257), in ascending order."""
    return sorted(int(v) for v in rng.choice(np.arange(1, max(257, 2 * n) + 1), size=n, replace=False))


def generate(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    fov_mm=DEFAULT_FOV_MM,
    slice_mm=DEFAULT_SLICE_MM,
    n_slices=DEFAULT_N_SLICES,
    space_share: float = DEFAULT_SPACE_SHARE,
    whole_vertebrae: bool = DEFAULT_WHOLE_VERTEBRAE,
) -> dict:
    """Write a synthetic SPIDER dataset of ``n_train`` + ``n_test`` patients to ``out``.

    ``out/images/<patient>_<t1|t2|t2_SPACE>.mha``, ``out/masks/<same>.mha`` for the training patients,
    ``out/overview.csv`` (image, patient, modality, sex, age) and ``out/radiological_gradings.csv``
    (training patients, per disc). The truth folder ``{out}_truth/`` holds the test masks (``masks/``),
    ``measurements.csv`` (image, structure, measurement, value, unit: every image of both splits, from
    the drawn geometry), ``grades.csv`` (what was drawn), ``images.csv`` (split, layout, size, spacing,
    whether the vertebra labels cover the posterior arch: ``whole_vertebrae``, as SPIDER's, or the
    bodies only) and ``summary.json``. Deterministic for a seed.
    """
    out = common.prepare_out(Path(out))
    truth = truth_dir(out)
    for folder in (out / "images", out / "masks", truth / "masks"):
        folder.mkdir(parents=True, exist_ok=True)
    master = np.random.default_rng([seed, 99])
    ids = _patient_ids(master, n_train + n_test)
    split_of = dict(
        zip(ids, master.permutation(["train"] * n_train + ["test"] * n_test).tolist(), strict=True)
    )
    patients, plans = [], []
    for pid in ids:
        rng = np.random.default_rng([seed, pid])
        patient = sample_patient(rng, pid)
        mods = ["t1", "t2"] + (["t2_SPACE"] if rng.random() < space_share else [])
        for mod in mods:
            plans.append(
                (patient, plan_image(rng, patient, mod, int(image_size), fov_mm, slice_mm, n_slices))
            )
        patients.append(patient)
    for (_, plan), layout in zip(plans, _layouts(master, len(plans)), strict=True):
        plan.layout = layout
    measurements, grades, images = [], [], []
    for patient, plan in plans:
        split = split_of[patient.pid]
        clean, mask = render_volume(patient, plan, bool(whole_vertebrae))
        img = acquire(clean, np.random.default_rng([seed, patient.pid, 7, len(images)]))
        write_mha(to_image(img, plan.spacing, plan.origin, plan.layout), out / "images" / f"{plan.name}.mha")
        mask_dir = out / "masks" if split == "train" else truth / "masks"
        write_mha(to_image(mask, plan.spacing, plan.origin, plan.layout), mask_dir / f"{plan.name}.mha")
        table = truth_measurements(patient)
        table.insert(0, "image", plan.name)
        measurements.append(table)
        drawn = patient.drawn.copy()
        drawn.insert(0, "image", plan.name)
        grades.append(drawn)
        images.append(
            dict(
                image=plan.name,
                patient_id=patient.pid,
                modality=plan.modality,
                split=split,
                layout=plan.layout,
                shape="x".join(map(str, plan.shape)),
                spacing_mm="x".join(f"{v:.4f}" for v in plan.spacing),
                n_lumbar=patient.n_lumbar,
                whole_vertebrae=int(bool(whole_vertebrae)),
                partial=",".join(str(v) for v in sorted(set(np.unique(mask).tolist())) if lab.is_partial(v)),
            )
        )
        log.info("%s image %s written (%s, layout %s)", split, plan.name, images[-1]["shape"], plan.layout)
    image_table = pd.DataFrame(images)
    overview = image_table[["image", "patient_id", "modality"]].assign(
        sex=[next(p.sex for p in patients if p.pid == i) for i in image_table["patient_id"]],
        age=[next(p.age for p in patients if p.pid == i) for i in image_table["patient_id"]],
    )
    save_table(out / "overview.csv", overview)
    save_table(
        out / "radiological_gradings.csv", _gradings([p for p in patients if split_of[p.pid] == "train"])
    )
    grades_table = pd.concat(grades, ignore_index=True)
    save_table(truth / "measurements.csv", pd.concat(measurements, ignore_index=True))
    save_table(truth / "grades.csv", grades_table)
    save_table(truth / "images.csv", image_table)
    drawn_all = pd.concat([p.drawn for p in patients], ignore_index=True)
    summary = dict(
        seed=int(seed),
        n_train=int(n_train),
        n_test=int(n_test),
        image_size=int(image_size),
        counts={
            split: dict(
                patients=sum(v == split for v in split_of.values()),
                images=int((image_table["split"] == split).sum()),
                t2_space=int(
                    ((image_table["split"] == split) & (image_table["modality"] == "t2_SPACE")).sum()
                ),
            )
            for split in ("train", "test")
        },
        drawn=dict(  # per patient (every image of a patient shows the same)
            fractures=int((drawn_all["genant_grade"] > 0).sum()),
            listheses=int((drawn_all["meyerding_grade"] > 0).sum()),
            herniations=int((drawn_all["herniation"] > 0).sum()),
            narrowed=int((drawn_all["narrowing"] > 0).sum()),
            transitional_l6=sorted(int(p.pid) for p in patients if p.n_lumbar == 6),
        ),
        layouts=image_table["layout"].value_counts().to_dict(),
    )
    save_text(truth / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _gradings(patients: list[Patient]) -> pd.DataFrame:
    """Per-disc radiological gradings of the training patients, as SPIDER ships them (a subset)."""
    rows = []
    for p in patients:
        levels = p.drawn[p.drawn["structure"].str.contains("/")]
        for _, r in levels.iterrows():
            upper = r["structure"].split("/")[0]
            rows.append(
                {
                    "Patient": p.pid,
                    "IVD label": lab.vertebra_label(upper, p.n_lumbar),  # 1 = L5/S1, counted up
                    "Spondylolisthesis": int(r["meyerding_grade"] > 0),
                    "Disc herniation": int(r["herniation"]),
                    "Disc narrowing": int(r["narrowing"]),
                }
            )
    return pd.DataFrame(rows)
