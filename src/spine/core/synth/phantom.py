"""The analytic 3D lumbar phantom the MRI generators share: anatomy, tissue signals and rendering.

Every image is rendered by evaluating the phantom at each pixel's patient position (LPS mm: +x patient
left, +y posterior, +z superior), so every series of a study agrees through its geometry. The phantom is
described in spine coordinates: arc length ``t`` along a lordotic axis through the vertebral bodies
(growing superior), ``b`` the posterior offset from that axis in the sagittal plane and ``x`` the lateral
offset from the midline. Discs are perpendicular to the axis, so each disc's tilt follows the curve.

``Spine.node_severity`` holds, per disc node, how far each lumbar sign goes (rows: spinal canal, left and
right foramen, left and right lateral recess; 0 = normal), so a task that draws none of these signs
leaves it 0. Rendering paints layers (``PAINTERS``: torso, posterior elements, canal, column, foramina);
a task may pass its own list, e.g. to draw vertebral bodies of other shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from spine.core import geometry

# --- anatomy -----------------------------------------------------------------------------------
# Disc nodes along the spine, top to bottom. The sacral nodes are fused (no disc) but keep the column
# and the canal going below S1.
NODE_NAMES = ["T11/T12", "T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1", "S1/S2", "S2/S3"]
ANCHOR_NODE = 4  # L3/L4 sits at arc length 0
BASE_TILT_DEG = np.array([-8.0, -5.0, -2.0, 2.0, 6.0, 11.0, 17.0, 26.0, 34.0])
BASE_DISC_MM = np.array([7.0, 8.0, 9.0, 10.0, 11.0, 11.5, 10.0, 0.0, 0.0])
BASE_BODY_MM = np.array([24.0, 26.0, 26.5, 27.0, 27.0, 26.5, 24.0, 20.0])  # T12 .. S2, between nodes
FORAMEN_DT = 4.0  # foramina open just above their disc, below the upper pedicle
RECESS_DB = -1.5  # lateral recesses sit in the front half of the canal
# Where the recess sits varies with the anatomy (per side and level, on top of the study's canal width)
# and with the grade: a stenotic recess is pinched medially by the facet, so its centre moves inwards.
RECESS_X_JITTER, RECESS_B_JITTER = 1.5, 0.8  # mm, standard deviation per side and level
RECESS_MEDIAL_MM = 3.0  # medial shift of the recess centre at s = 1
# How far each sign goes at s = 1 (fraction of the normal size removed).
CANAL_AP_LOSS, CANAL_LR_LOSS, DISC_BULGE_MM = 0.72, 0.30, 3.5
FORAMEN_LOSS, RECESS_LOSS = 0.70, 0.85

# Relative signal of each tissue (CSF on T2 = 1). nucleus_drop: how much a degenerated disc darkens.
TISSUES = ("air", "soft", "muscle", "fat", "marrow", "cortex", "annulus", "nucleus", "nucleus_drop", "csf",
           "ligament", "nerve", "vessel")  # fmt: skip
# fmt: off
_SIGNALS = {
    #         air  soft  muscle fat  marrow cortex annul nucl drop  csf   lig  nerve vessel
    "T1":   (0.0, 0.38, 0.30, 1.00, 0.72, 0.06, 0.28, 0.42, 0.2, 0.14, 0.10, 0.30, 0.05),
    "T2":   (0.0, 0.32, 0.22, 0.62, 0.45, 0.05, 0.20, 0.90, 0.6, 1.00, 0.08, 0.25, 0.05),
    "STIR": (0.0, 0.30, 0.25, 0.08, 0.22, 0.04, 0.20, 0.95, 0.6, 1.00, 0.08, 0.30, 0.05),
}
# fmt: on
CONTRASTS = {name: dict(zip(TISSUES, values, strict=True)) for name, values in _SIGNALS.items()}
COARSE_STEP = 4  # pixels between exact evaluations of the slowly varying fields


@dataclass
class Spine:
    """One study's lumbar spine: a curved axis with disc nodes, and the sizes of its structures.

    Positions are in patient mm. ``tab`` samples the axis: (y, z, tilt in radians) at arc length
    ``tab_t0 + i * tab_dt``; ``t_nodes`` (descending) is the arc length of each disc node.
    """

    x0: float
    t_nodes: np.ndarray
    disc_mm: np.ndarray
    tab_t0: float
    tab_dt: float
    tab: np.ndarray
    body_rx: float
    body_rb: float
    canal_b: float
    canal_ap: float
    canal_lr: float
    foramen_x: float
    foramen_b: float
    recess_x: float
    node_severity: np.ndarray  # (5 conditions, nodes); 0 at the unlabeled nodes
    degeneration: np.ndarray  # (nodes,) mean severity of a node: darkens and thins its disc
    # (2 sides: left, right; nodes): each recess's own lateral / posterior offset from the study's
    # recess_x / RECESS_DB (zero until ``vary_recesses``)
    recess_dx: np.ndarray = None
    recess_db: np.ndarray = None

    def __post_init__(self):
        n = len(self.t_nodes)
        self.recess_dx = np.zeros((2, n)) if self.recess_dx is None else self.recess_dx
        self.recess_db = np.zeros((2, n)) if self.recess_db is None else self.recess_db

    def recess_at(self, side: int, node_sev: np.ndarray | float, node=slice(None)) -> tuple:
        """(lateral |x|, b relative to the canal centre) of the recess centre of ``side`` (0 left,
        1 right) at ``node`` whose subarticular severity is ``node_sev``: narrower recesses sit medially."""
        x = self.recess_x + self.recess_dx[side, node] - RECESS_MEDIAL_MM * node_sev
        return x, RECESS_DB + self.recess_db[side, node]

    def _at(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, z, tilt) of the axis at arc length t, by linear interpolation in the uniform table."""
        f = (np.asarray(t, dtype=np.float64) - self.tab_t0) / self.tab_dt
        i = np.clip(np.floor(f), 0, len(self.tab) - 2).astype(np.intp)
        w = np.clip(f - i, 0.0, 1.0)[..., None]
        v = self.tab[i] * (1.0 - w) + self.tab[i + 1] * w
        return v[..., 0], v[..., 1], v[..., 2]

    def to_patient(self, t, b, x) -> np.ndarray:
        """Patient coordinates (..., 3) of spine coordinates (arc length, posterior offset, lateral)."""
        y, z, th = self._at(t)
        b = np.asarray(b, dtype=np.float64)
        return np.stack(
            np.broadcast_arrays(
                self.x0 + np.asarray(x, dtype=np.float64), y + b * np.cos(th), z + b * np.sin(th)
            ),
            axis=-1,
        )

    def to_spine(self, points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spine coordinates (t, b, x) of patient points (..., 3): the foot of each point on the axis.

        Starts from the axis point at the same height and moves along the axis by the point's
        offset along the local direction; the axis bends slowly (radius ~ 40 cm), so three steps
        are exact to far below a pixel within the canal's reach.
        """
        p = np.asarray(points, dtype=np.float64)
        y, z = p[..., 1], p[..., 2]
        t_tab = self.tab_t0 + self.tab_dt * np.arange(len(self.tab))
        t = np.interp(z, self.tab[:, 1], t_tab)
        for _ in range(3):
            yq, zq, th = self._at(t)
            t = t + (z - zq) * np.cos(th) - (y - yq) * np.sin(th)
        yq, zq, th = self._at(t)
        b = (y - yq) * np.cos(th) + (z - zq) * np.sin(th)
        return t, b, p[..., 0] - self.x0

    def axis_direction(self, t) -> np.ndarray:
        """Unit direction of the axis (superior) at arc length t: the normal of a disc there."""
        th = self._at(t)[2]
        return np.stack(np.broadcast_arrays(np.zeros_like(th), -np.sin(th), np.cos(th)), axis=-1)


def vary_recesses(spine: Spine, rng: np.random.Generator) -> None:
    """Give each recess (side, level) its own lateral and AP place around the study's.

    Drawn from a stream of its own, so the studies' other draws (and thus every other quirk of a
    seed) stay where they were.
    """
    shape = spine.recess_dx.shape
    spine.recess_dx = rng.normal(0.0, RECESS_X_JITTER, shape)
    spine.recess_db = rng.normal(0.0, RECESS_B_JITTER, shape)


def centreline(
    t_nodes: np.ndarray, tilt_deg: np.ndarray, origin_yz, step: float = 0.5, margin: float = 120.0
) -> tuple[float, np.ndarray]:
    """Integrate the axis from the node tilts: table of (y, z, tilt) and its first arc length."""
    t = np.arange(t_nodes[-1] - margin, t_nodes[0] + margin + step, step)
    th = np.deg2rad(np.interp(t, t_nodes[::-1], tilt_deg[::-1]))

    def integrate(d):
        return np.concatenate([[0.0], np.cumsum((d[1:] + d[:-1]) * 0.5 * step)])

    y, z = integrate(-np.sin(th)), integrate(np.cos(th))
    y += origin_yz[0] - np.interp(0.0, t, y)
    z += origin_yz[1] - np.interp(0.0, t, z)
    return float(t[0]), np.stack([y, z, th], axis=1)


# =============================================================================================
# Rendering
# =============================================================================================


@dataclass
class Local:
    """Spine coordinates of a set of points and the parameters of each point's nearest disc node."""

    b: np.ndarray
    x: np.ndarray
    bc: np.ndarray  # b relative to the canal centre
    dt: np.ndarray  # arc length relative to the nearest node
    half: np.ndarray  # half the thickness of that node's disc (0: fused)
    sev: np.ndarray  # (5 conditions, ...) that node's severities
    deg: np.ndarray  # that node's degeneration
    recess: tuple  # per side (left, right): that node's recess centre (lateral |x|, b from the canal)


def locate(spine: Spine, t, b, x) -> Local:
    """The spine coordinates of points with their nearest disc node's parameters (float32)."""
    asc = spine.t_nodes[::-1]
    k = len(asc) - 1 - np.searchsorted((asc[1:] + asc[:-1]) / 2, t)
    f32 = np.float32
    return Local(
        b=b.astype(f32),
        x=x.astype(f32),
        bc=(b - spine.canal_b).astype(f32),
        dt=(t - spine.t_nodes[k]).astype(f32),
        half=(spine.disc_mm / 2).astype(f32)[k],
        sev=spine.node_severity.astype(f32)[:, k],
        deg=spine.degeneration.astype(f32)[k],
        recess=tuple(
            tuple(v.astype(f32)[k] for v in spine.recess_at(side, spine.node_severity[3 + side]))
            for side in (0, 1)
        ),
    )


def ellipse(u, v, ru, rv, edge: float) -> np.ndarray:
    """Soft (anti-aliased over ``edge`` mm) indicator of the ellipse (u/ru)^2 + (v/rv)^2 < 1."""
    q = np.sqrt((u / ru) ** 2 + (v / rv) ** 2)
    return np.clip(0.5 + (1.0 - q) * np.minimum(ru, rv) / edge, 0.0, 1.0)


def below(u, hi, edge: float) -> np.ndarray:
    """Soft indicator of u < hi."""
    return np.clip(0.5 + (hi - u) / edge, 0.0, 1.0)


def between(u, lo, hi, edge: float) -> np.ndarray:
    """Soft indicator of lo < u < hi."""
    return np.clip(0.5 + np.minimum(u - lo, hi - u) / edge, 0.0, 1.0)


def gauss(u, sigma: float) -> np.ndarray:
    """Gaussian bump exp(-u^2 / 2 sigma^2)."""
    return np.exp(-0.5 * (u / sigma) ** 2)


def paint(img: np.ndarray, mask, value) -> None:
    """Lay ``value`` over ``img`` where ``mask`` (0..1) is set; later layers cover earlier ones."""
    img += mask * (value - img)


def paint_torso(img, sp: Spine, loc: Local, v: dict, edge: float) -> None:
    """Torso fat and soft tissue, back and psoas muscles, and the aorta."""
    # The torso is an ellipse in front of the spine: skin a few cm behind the back muscles.
    bt = loc.bc + 40.0
    paint(img, ellipse(loc.x, bt, 140.0, 115.0, edge), v["fat"])
    paint(img, ellipse(loc.x, bt, 128.0, 103.0, edge), v["soft"])
    for side in (1.0, -1.0):
        paint(img, ellipse(loc.x - side * 24.0, loc.bc - 32.0, 18.0, 26.0, edge), v["muscle"])
        paint(img, ellipse(loc.x - side * (sp.body_rx + 12.0), loc.b + 2.0, 11.0, 15.0, edge), v["muscle"])
    # The aorta runs left of the midline in front of the body: a flow void that tells left from right.
    paint(img, ellipse(loc.x - 10.0, loc.b + sp.body_rb + 14.0, 9.0, 9.0, edge), v["vessel"])


def posterior_elements(sp: Spine, loc: Local, edge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft indicators of the posterior arch: (lateral column of pedicles and facets at every level, its
    bone and that of the laminae and spinous processes away from the disc levels, the share of each
    point away from a disc level). At a disc level ligaments fill the space, where the foramina open."""
    ax = np.abs(loc.x)
    away = 1.0 - below(np.abs(loc.dt), loc.half + 3.0, edge)
    lateral = below(np.abs(ax - 19.0), 8.0, edge) * between(
        loc.bc, -sp.canal_ap - 3.0, sp.canal_ap + 5.0, edge
    )
    lamina = below(ax, 15.0, edge) * between(loc.bc, sp.canal_ap + 1.5, sp.canal_ap + 8.0, edge)
    spinous = below(ax, 3.5, edge) * between(loc.bc, sp.canal_ap + 1.5, sp.canal_ap + 48.0, edge)
    return lateral, np.maximum(lateral, np.maximum(lamina, spinous)) * away, away


def paint_posterior(img, sp: Spine, loc: Local, v: dict, edge: float) -> None:
    """Pedicles, laminae and spinous processes; ligaments between them at the disc levels."""
    ax = np.abs(loc.x)
    lateral, bone, away = posterior_elements(sp, loc, edge)
    paint(img, lateral, v["ligament"])
    paint(img, bone, 0.9 * v["marrow"])
    flavum = below(ax, 12.0, edge) * between(loc.bc, sp.canal_ap + 0.5, sp.canal_ap + 3.5, edge)
    paint(img, flavum * (1.0 - away), v["ligament"])


def paint_canal(img, sp: Spine, loc: Local, v: dict, edge: float) -> None:
    """The dural sac (CSF) with its lateral recesses, narrowed at stenotic levels."""
    sev = loc.sev
    narrow = sev[0] * gauss(loc.dt, 4.5)
    ap = sp.canal_ap * (1.0 - CANAL_AP_LOSS * narrow)
    lr = sp.canal_lr * (1.0 - CANAL_LR_LOSS * narrow)
    # Stenosis: thickened ligaments take the space the sac loses, so it turns dark, not fatty.
    paint(img, ellipse(loc.x, loc.bc, sp.canal_lr + 1.0, sp.canal_ap + 1.0, edge), v["ligament"])
    paint(img, ellipse(loc.x, loc.bc, lr + 2.0, ap + 1.0, edge), v["fat"])
    csf = ellipse(loc.x, loc.bc, lr, ap, edge)
    for j, (side, ci) in enumerate(((1.0, 3), (-1.0, 4))):
        g = gauss(loc.dt, 5.0)
        f = 1.0 - RECESS_LOSS * sev[ci] * g
        rx, rb = loc.recess[j]
        # the medial shift fades away from the disc like the narrowing, so the recess runs smoothly
        rx = rx + RECESS_MEDIAL_MM * sev[ci] * (1.0 - g)
        recess = ellipse(loc.x - side * rx, loc.bc - rb, 4.5 * f, 4.0 * f, edge)
        csf = np.maximum(csf, recess)
    paint(img, csf, v["csf"])


def paint_column(img, sp: Spine, loc: Local, v: dict, edge: float) -> None:
    """Vertebral bodies (cortex, marrow, endplates) and discs (annulus, nucleus) along the axis."""
    half = loc.half
    has_disc = half > 0
    in_disc = below(np.abs(loc.dt), half, edge) * has_disc
    # A stenotic disc bulges backwards into the canal.
    bulge = DISC_BULGE_MM * loc.sev[0] * in_disc * (loc.b > 0)
    column = ellipse(loc.x, loc.b, sp.body_rx, sp.body_rb + bulge, edge)
    paint(img, column, v["cortex"])
    paint(img, ellipse(loc.x, loc.b, sp.body_rx - 1.5, sp.body_rb - 1.5, edge), v["marrow"])
    endplate = below(np.abs(np.abs(loc.dt) - half - 0.6), 0.8, edge) * has_disc
    paint(img, column * endplate, v["cortex"])
    paint(img, column * in_disc, v["annulus"])
    nucleus = (
        ellipse(loc.x, loc.b + 2.0, 0.6 * sp.body_rx, 0.55 * sp.body_rb, edge)
        * below(np.abs(loc.dt), 0.7 * half, edge)
        * has_disc
    )
    paint(img, nucleus, v["nucleus"] * (1.0 - v["nucleus_drop"] * loc.deg))


def paint_foramina(img, sp: Spine, loc: Local, v: dict, edge: float) -> None:
    """Foraminal fat with the exiting nerve root on each side."""
    for side, ci in ((1.0, 1), (-1.0, 2)):
        f = 1.0 - FORAMEN_LOSS * loc.sev[ci]
        lateral = below(np.abs(loc.x - side * sp.foramen_x), 6.5, edge)
        u, w = loc.dt - FORAMEN_DT, loc.b - sp.foramen_b
        paint(img, lateral * ellipse(u, w, 6.5 * f, 4.5 * f, edge), v["fat"])
        paint(img, lateral * ellipse(u - 2.5 * f, w, 1.6, 1.6, edge), v["nerve"])


# The layers of the phantom, painted in this order (later ones cover earlier ones).
PAINTERS = (paint_torso, paint_posterior, paint_canal, paint_column, paint_foramina)


def render_local(spine: Spine, contrast: str, t, b, x, edge: float, painters=PAINTERS) -> np.ndarray:
    """Noise-free signal at points given in spine coordinates (t, b, x), painted layer by layer."""
    v = CONTRASTS[contrast]
    loc = locate(spine, t, b, x)
    img = np.full(loc.b.shape, v["air"], dtype=np.float32)
    for layer in painters:
        layer(img, spine, loc, v, edge)
    return img


def render(spine: Spine, contrast: str, points: np.ndarray, edge: float) -> np.ndarray:
    """Noise-free signal (relative units, CSF on T2 = 1) of the phantom at patient ``points`` (..., 3).

    ``contrast`` is one of CONTRASTS; ``edge`` (mm, about a pixel) is the width over which tissue
    boundaries are smoothed, so small images are anti-aliased rather than jagged.
    """
    return render_local(spine, contrast, *spine.to_spine(points), edge)


def interp_matrix(n: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Coarse positions over indices 0..n-1 (about ``step`` apart) and the (n, m) linear
    interpolation matrix from values there back to every index."""
    m = max(2, int(np.ceil((n - 1) / step)) + 1)
    pos = np.linspace(0.0, n - 1.0, m)
    idx = np.arange(n)
    j = np.clip(np.searchsorted(pos, idx, side="right") - 1, 0, m - 2)
    f = (idx - pos[j]) / (pos[j + 1] - pos[j])
    w = np.zeros((n, m))
    w[idx, j], w[idx, j + 1] = 1.0 - f, f
    return pos, w


def smooth_on_pixels(fn: Callable, ipp, iop, spacing, rows: int, cols: int) -> np.ndarray:
    """Evaluate ``fn(points) -> (k, n, mr, mc)`` on a coarse pixel grid of slices and interpolate it to
    every pixel, (k, n, rows, cols).

    For fields that vary slowly over a slice (spine coordinates, the coil's bias): the axis bends
    over ~40 cm, so interpolating over 4 pixels errs by far less than a pixel, at 1/16 of the cost.
    """
    pr, wr = interp_matrix(rows, COARSE_STEP)
    pc, wc = interp_matrix(cols, COARSE_STEP)
    pts = geometry.pixel_to_patient(
        pr[None, :, None], pc[None, None, :], ipp[:, None, None], iop[:, None, None], spacing
    )
    coarse = fn(pts)
    lead, (mr, mc) = coarse.shape[:-2], coarse.shape[-2:]
    # Two plain 2D products: numpy's batched matmul over many tiny matrices is much slower.
    cols_done = (coarse.reshape(-1, mc) @ wc.T).reshape(-1, mr, cols)
    full = wr @ cols_done.transpose(1, 0, 2).reshape(mr, -1)
    return full.reshape(rows, -1, cols).transpose(1, 0, 2).reshape(*lead, rows, cols).astype(np.float32)


def render_slices(spine: Spine, contrast: str, ipp, iop, spacing, rows: int, cols: int) -> np.ndarray:
    """Noise-free images (n, rows, cols) of slices given by their DICOM geometry (ipp (n, 3), iop (n, 6)).

    Anti-aliased over one pixel; the same phantom as ``render`` at each pixel centre.
    """
    ipp, iop = np.asarray(ipp, dtype=np.float64), np.asarray(iop, dtype=np.float64)
    t, b, x = smooth_on_pixels(lambda p: np.stack(spine.to_spine(p)), ipp, iop, spacing, rows, cols)
    # Nearest-node lookups need the precision of float64 arc lengths only far below a pixel.
    return render_local(spine, contrast, t.astype(np.float64), b, x, float(max(spacing)))
