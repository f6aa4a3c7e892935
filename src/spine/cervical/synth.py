"""Synthetic RSNA 2022 Cervical Spine Fracture Detection data, in the exact Kaggle layout.

Each study is an axial CT of a neck phantom (patient LPS mm: +x left, +y posterior, +z superior):
soft tissue with a fat rim, an airway, and vertebrae C1..T3 stacked along a gently lordotic axis.
A fractured vertebra shows a thin soft-tissue cleft with a small step-off, but only when it is
*visible* (each fractured vertebra independently, probability ``Q_VISIBLE``); occult fractures
leave no trace. Because the labels depend on the image only through the set of visible clefts,
the Bayes-optimal probabilities are exact: enumerate the prior's fracture patterns (none, or one
contiguous block of 1-3 cervical vertebrae) and weigh them by the visibility likelihood.

Studies are rendered one axial slice at a time and written straight to DICOM, so a real-size study
(512 x 512 x 600) never holds more than its own label volume (and only when it gets a mask).
The ground truth (labels, Bayes probabilities, vertebra positions, quirks) goes to ``{out}_truth/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom

from spine.cervical.task import TARGETS, TRAIN_COLUMNS, VERTEBRAE, CervicalTask
from spine.core import geometry
from spine.core.synth import common
from spine.core.synth.dicom_writer import make_uid, write_slice

log = logging.getLogger(__name__)

# --- prior of the labels -----------------------------------------------------------------------
P_FRACTURED = 0.48  # patient_overall rate (47.6 % in the real train.csv)
Q_VISIBLE = 0.85  # chance that a fractured vertebra shows a cleft
BLOCK_LEN_PROBS = (0.6, 0.3, 0.1)  # 1, 2 or 3 adjacent fractured vertebrae
# A block's start is drawn with probability proportional to the mean of these weights over the
# block. They were fitted so the marginal rates come close to the real ones (C1 7 %, C2 14 %, C3 4 %,
# C4 5 %, C5 8 %, C6 14 %, C7 20 % of patients); C3 ends near 5 % because blocks through C2 cover it.
START_WEIGHTS = (0.10, 0.23, 0.01, 0.055, 0.065, 0.13, 0.41)

# --- phantom -----------------------------------------------------------------------------------
NAMES = [*VERTEBRAE, *(f"T{i}" for i in range(1, 13))]  # mask labels 1..19 as real (T1..T12 = 8..19)
HU_AIR, HU_FAT, HU_SOFT, HU_CSF, HU_DISC, HU_BRAIN = -1000.0, -100.0, 40.0, 20.0, 80.0, 35.0
# (LR half-width a, AP half-depth b, half-height h, disc gap above) in mm, before per-study jitter.
# C2's body is 24 mm tall; with its dens (~12 mm above the body) it is the tallest, ~36 mm.
BODY_DIMS = {
    "C2": (9.0, 8.0, 12.0, 0.0),
    "C3": (8.5, 7.5, 6.5, 4.5),
    "C4": (9.0, 7.5, 6.5, 5.0),
    "C5": (9.5, 8.0, 6.5, 5.0),
    "C6": (10.0, 8.0, 7.0, 5.0),
    "C7": (11.0, 8.5, 7.5, 5.0),
    "T1": (12.0, 9.0, 8.0, 5.0),
    "T2": (12.5, 10.0, 8.5, 5.0),
    "T3": (13.0, 11.0, 9.0, 5.0),
    "T4": (13.5, 11.5, 9.0, 5.0),
    "T5": (14.0, 12.0, 9.5, 5.0),
    "T6": (14.5, 12.5, 9.5, 5.0),
    "T7": (15.0, 13.0, 10.0, 5.0),
    "T8": (15.5, 13.5, 10.0, 5.5),
    "T9": (16.0, 14.0, 10.5, 5.5),
    "T10": (17.0, 14.5, 11.0, 5.5),
    "T11": (18.0, 15.0, 11.5, 6.0),
    "T12": (19.0, 15.5, 12.0, 6.0),
}
SPINOUS_LEN = {"C2": 14.0, "C7": 20.0}  # thoracic 22 mm, other cervical 11 mm
# name -> (dtype, RescaleIntercept); HU = stored * 1 + intercept. Stored values fit 12 bits (BitsStored
# 12, as scanners write): 0..4095 unsigned, -2048..2047 signed, so each storage clips HU to its own range.
STORAGES = {
    "uint16_m1024": (np.uint16, -1024.0),  # HU -1024..3071
    "int16_0": (np.int16, 0.0),  # HU -1024..2047
    "int16_m1024": (np.int16, -1024.0),  # HU -1024..1023: the densest bone saturates, as on such scanners
}
SPECIAL_SYNTAXES = ("rle", "j2k", "implicit")  # the rest of the studies are explicit VR LE
MASK_SHARE = 87 / 2019  # train studies with a segmentation mask on the real data
MIN_MASKS = 3  # even a tiny train split gets a few masks, so a segmenter can be trained on it
BAD_AFFINE_SHARE = 0.1  # masks whose NIfTI header is an identity affine (at least one when >= 3 masks)


@dataclass(frozen=True)
class Scan:
    """How studies are acquired: the generator's defaults are the real data's ranges.

    Each study draws its in-plane field of view, slice spacing and how far the scan reaches beyond the
    cervical spine (skull base above C1, upper thorax below C7) from these ranges; the slice count follows
    (about 200 to over 1,000 slices at the defaults). ``n_slices`` fixes the count instead (tests): the
    scan then spans C1 to T1 only, whatever spacing that gives.
    """

    image_size: int = 512
    fov_mm: tuple[float, float] = (140.0, 220.0)  # in-plane field of view: 0.27-0.43 mm pixels at 512
    slice_spacing_mm: tuple[float, float] = (0.5, 1.25)
    above_c1_mm: tuple[float, float] = (20.0, 90.0)  # scanned above C1's top (skull base, posterior fossa)
    below_c7_mm: tuple[float, float] = (40.0, 150.0)  # scanned below C7's bottom (T1.. upper thorax)
    n_slices: int | None = None


NARROW_ABOVE_MM, NARROW_BELOW_MM = (3.0, 10.0), (5.0, 20.0)  # the scan of ``Scan.n_slices``: C1 to T1


# =============================================================================================
# Prior and Bayes posterior
# =============================================================================================


@lru_cache(maxsize=1)
def pattern_prior() -> tuple[tuple[frozenset, float], ...]:
    """Every fracture pattern the prior allows with its probability: (set of vertebra indices 0..6, p).

    The empty pattern (no fracture) has probability 1 - P_FRACTURED; the others are one contiguous
    block of 1-3 cervical vertebrae.
    """
    patterns = [(frozenset(), 1.0 - P_FRACTURED)]
    w = np.asarray(START_WEIGHTS)
    for k, pk in enumerate(BLOCK_LEN_PROBS, start=1):
        starts = range(len(VERTEBRAE) - k + 1)
        score = np.array([w[s : s + k].mean() for s in starts])
        for s, p in zip(starts, score / score.sum()):
            patterns.append((frozenset(range(s, s + k)), P_FRACTURED * pk * p))
    return tuple(patterns)


def bayes_probabilities(visible: set[int] | None) -> np.ndarray:
    """Exact posterior P(fractured) of C1..C7 and patient_overall (TARGETS order) given the image.

    ``visible`` is the set of vertebra indices (0 = C1) that show a cleft; ``None`` means the study
    could not be seen at all (the prior marginals). A pattern F explains the image only if it
    contains every visible vertebra; each of its vertebrae is then visible with Q_VISIBLE and occult
    with 1 - Q_VISIBLE, independently.
    """
    post = np.zeros(len(TARGETS))
    total = 0.0
    for pattern, prior in pattern_prior():
        if visible is None:
            like = 1.0
        elif not set(visible) <= pattern:
            continue
        else:
            like = Q_VISIBLE ** len(visible) * (1 - Q_VISIBLE) ** (len(pattern) - len(visible))
        p = prior * like
        total += p
        for v in pattern:
            post[v] += p
        post[-1] += p if pattern else 0.0
    return post / total


def _draw_pattern(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One study's fractured vertebrae and the visible subset, drawn from the prior."""
    patterns = pattern_prior()
    i = rng.choice(len(patterns), p=[p for _, p in patterns])
    fractured = tuple(sorted(patterns[i][0]))
    visible = tuple(v for v in fractured if rng.random() < Q_VISIBLE)
    return fractured, visible


def _draw_split_labels(rng: np.random.Generator, n: int, need_signal: bool) -> list:
    """Fracture patterns of a split. With ``need_signal`` (train, n >= 2) redraw until at least one
    study shows a cleft and one is unfractured, so even a tiny data set has something to learn from
    (for 30 studies this almost never triggers, so the per-study posterior stays exact)."""
    while True:
        draws = [_draw_pattern(rng) for _ in range(n)]
        if not need_signal or n < 2:
            return draws
        if any(vis for _, vis in draws) and any(not frac for frac, _ in draws):
            return draws


# =============================================================================================
# Study plans: labels and quirks, before any pixel is drawn
# =============================================================================================


@dataclass
class StudyPlan:
    """What one study will be: ids, labels and the real-data quirks it carries."""

    uid: str
    split: str
    index: int
    fractured: tuple[int, ...]
    visible: tuple[int, ...]
    order: str = "head_first"  # InstanceNumber 1 is the most superior slice, or the most inferior
    storage: str = "uint16_m1024"
    syntax: str = "explicit"
    missing: bool = False  # listed in test.csv, no images folder
    corrupt_at: float | None = None  # fraction along the instances of the one file to truncate
    segmented: bool = False
    honest_affine: bool = True  # False: the mask's NIfTI header is an identity affine (a header quirk)
    monochrome1: bool = False  # PhotometricInterpretation MONOCHROME1; stored values (so HU) unchanged
    boxes: bool = False


def _balanced(rng: np.random.Generator, values, n: int) -> list:
    """``n`` values cycling through ``values``, shuffled: each occurs when n >= len(values)."""
    cyc = [values[i % len(values)] for i in range(n)]
    return [cyc[i] for i in rng.permutation(n)]


def _assign_quirks(rng: np.random.Generator, plans: list[StudyPlan]) -> None:
    """Instance order, pixel storage, transfer syntax, a missing study (test), one corrupt file and one
    MONOCHROME1 series (an explicit-syntax study other than the corrupt one, when there is one)."""
    n = len(plans)
    if n == 0:
        return
    for p, order, storage in zip(
        plans, _balanced(rng, ["head_first", "feet_first"], n), _balanced(rng, list(STORAGES), n)
    ):
        p.order, p.storage = order, storage
    if plans[0].split == "test" and n >= 2:
        plans[int(rng.integers(n))].missing = True
    readable = [p for p in plans if not p.missing]
    # ~10 % of studies per special syntax, but at most half of the split, so most stay explicit
    n_special = min(len(SPECIAL_SYNTAXES) * max(1, round(0.1 * len(readable))), len(readable) // 2)
    for j, i in enumerate(rng.choice(len(readable), n_special, replace=False)):
        readable[i].syntax = SPECIAL_SYNTAXES[j % len(SPECIAL_SYNTAXES)]
    readable[int(rng.integers(len(readable)))].corrupt_at = float(rng.uniform(0.25, 0.75))
    plain = [p for p in readable if p.syntax == "explicit" and p.corrupt_at is None] or readable
    plain[int(rng.integers(len(plain)))].monochrome1 = True


def n_masks(n_train: int, mask_share: float) -> int:
    """Train studies that get a segmentation mask: the share, but at least MIN_MASKS (or all of them)."""
    return min(n_train, max(MIN_MASKS, round(mask_share * n_train)))


def _assign_train_extras(rng: np.random.Generator, plans: list[StudyPlan], mask_share: float) -> None:
    """Segmentation masks (``n_masks``; a few with an identity affine) and bounding boxes (~half of the
    studies with a cleft). A study with a visible fracture is put first in both, so even tiny data sets
    hold one; the identity-affine masks are drawn among the others.
    """
    n = len(plans)
    if n == 0:
        return
    shown = [i for i, p in enumerate(plans) if p.visible]
    first = [int(rng.choice(shown))] if shown else []
    rest = [int(i) for i in rng.permutation(n) if i not in first]
    masked = (first + rest)[: n_masks(n, mask_share)]
    for i in masked:
        plans[i].segmented = True
    n_bad = max(1, round(BAD_AFFINE_SHARE * len(masked))) if len(masked) >= 3 else 0
    for i in masked[len(masked) - n_bad :]:
        plans[i].honest_affine = False
    for i in shown:
        plans[i].boxes = bool(rng.random() < 0.5)
    if shown and not any(plans[i].boxes for i in shown):
        plans[first[0]].boxes = True


def plan_studies(seed: int, n_train: int, n_test: int, mask_share: float = MASK_SHARE) -> list[StudyPlan]:
    """Labels, UIDs and quirks of every study, deterministic for ``seed``."""
    rng = np.random.default_rng([seed, 0])
    numbers = rng.choice(90000, n_train + n_test, replace=False) + 10000  # 5 digits, like the real ones
    plans = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, n_train)):
        labels = _draw_split_labels(rng, n, need_signal=split == "train")
        split_plans = [
            StudyPlan(make_uid(numbers[offset + i]), split, i, frac, vis)
            for i, (frac, vis) in enumerate(labels)
        ]
        _assign_quirks(rng, split_plans)
        if split == "train":
            _assign_train_extras(rng, split_plans, mask_share)
        plans += split_plans
    return plans


# =============================================================================================
# Anatomy of one study
# =============================================================================================


@dataclass
class Cleft:
    """A fracture plane in a vertebra's local frame (u = LR, v = AP posterior, t = along the axis).

    Bone within ``width``/2 of the plane (and within ``radius`` of ``p0`` in the u-v plane) becomes
    soft tissue; the fragment on the positive side is moved by ``disp``.
    """

    p0: np.ndarray
    normal: np.ndarray
    disp: np.ndarray
    width: float
    radius: float


@dataclass
class Vertebra:
    """One vertebra: its frame (``centre`` + rotation ``rot``, local -> patient) and shape sizes (mm)."""

    name: str
    label: int
    centre: np.ndarray
    rot: np.ndarray
    dims: dict[str, float]
    reach: float  # the vertebra lies within |z - centre_z| <= reach
    cleft: Cleft | None = None


@dataclass
class Anatomy:
    """Everything needed to render one study, slice by slice."""

    vertebrae: list[Vertebra]
    z_instances: np.ndarray  # z (mm) of the slice with InstanceNumber k+1
    origin: tuple[float, float]  # patient x, y of pixel (0, 0)
    spacing: float  # square pixels, mm
    size: int
    neck: dict[str, float]
    hu: dict[str, float]
    noise: float
    axis: dict[str, float]
    head: dict[str, float]  # skull base above C1: foramen magnum, occipital condyles, cranium


def _axis_xy(axis: dict[str, float], z) -> tuple[np.ndarray, np.ndarray]:
    """Spine axis (x, y) at height z: a lean plus a lordotic bump (mid-neck pushed anterior)."""
    dz = np.asarray(z, dtype=np.float64) - axis["z_c4"]
    x = axis["x0"] + axis["lat"] * dz
    y = axis["y0"] + axis["lean"] * dz - axis["curv"] * np.exp(-((dz / 45.0) ** 2))
    return x, y


def _axis_rotation(axis: dict[str, float], z: float, twist_deg: float) -> np.ndarray:
    """Rotation whose third column follows the axis tangent at z (plus an axial twist)."""
    dz = 1e-3
    x0, y0 = _axis_xy(axis, z - dz)
    x1, y1 = _axis_xy(axis, z + dz)
    sy, sx = (y1 - y0) / (2 * dz), (x1 - x0) / (2 * dz)
    rx = geometry.rotation([1, 0, 0], -np.degrees(np.arctan(sy)))
    ry = geometry.rotation([0, 1, 0], np.degrees(np.arctan(sx)))
    return rx @ ry @ geometry.rotation([0, 0, 1], twist_deg)


def _atlas_dims(rng, s: float) -> dict[str, float]:
    j = lambda: s * rng.uniform(0.94, 1.06)  # noqa: E731 - one jitter factor per size
    return {
        "ri_lr": 14.0 * j(),
        "ri_ap": 14.0 * j(),
        "ring": 4.0 * j(),
        "ring_h": 3.5 * j(),  # the arches: 7 mm tall
        "lm_u": 14.5 * j(),
        "lm_v": -3.0 * j(),
        "lm_ru": 5.5 * j(),
        "lm_rv": 8.0 * j(),
        "lm_h": 5.0 * j(),  # the lateral masses: C1 is ~10 mm tall
        "tp": 10.0 * j(),
        "shell": 1.5,
    }


def _typical_dims(rng, name: str, s: float) -> dict[str, float]:
    a, b, h, gap = BODY_DIMS[name]
    j = lambda: s * rng.uniform(0.93, 1.07)  # noqa: E731
    cervical = name.startswith("C")
    d = {
        "a": a * j(),
        "b": b * j(),
        "h": h * j(),
        "gap": gap * j(),
        "shell": 1.5,
        "rc_lr": (11.0 if cervical else 8.0) * j(),
        "rc_ap": 7.0 * j(),
        "th": 3.5 * j(),
        "spin": SPINOUS_LEN.get(name, 11.0 if cervical else 22.0) * j(),
        "tp": (9.0 if cervical else 14.0) * j(),
    }
    d["ha"] = 0.6 * d["h"]
    if name == "C2":
        d.update(dens_r=5.0 * j(), dens_v=-1.5 * j())
    return d


def _stack_vertebrae(rng, s: float) -> list[tuple[str, float, dict[str, float]]]:
    """Names, centre heights (C1 at z = 0) and sizes, stacked top-down: C1 sits on C2's body,
    the dens rises through C1's ring, each lower body sits one disc gap below the one above."""
    atlas = _atlas_dims(rng, s)
    out = [("C1", 0.0, atlas)]
    top = -atlas["lm_h"] - 1.5 * s  # C2 body top: below C1's lateral masses and the joint
    for name in NAMES[1:]:
        d = _typical_dims(rng, name, s)
        top -= d["gap"]
        if name == "C2":  # the dens tip rises just above C1's anterior arch
            d["dens_len"] = atlas["ring_h"] + 2.0 - top
        out.append((name, top - d["h"], d))
        top -= 2 * d["h"]
    return out


def _make_cleft(rng, name: str, d: dict[str, float], pixel: float) -> Cleft:
    """A steep fracture plane (|normal_t| <= 0.3, so it shows on every slice it crosses) through the
    body or across the arch (C1: across its ring)."""
    width = max(2.0, 1.6 * pixel) + rng.uniform(0.0, 0.6)
    if name == "C1":
        psi = rng.uniform(0, 2 * np.pi)
        ru, rv = d["ri_lr"] + d["ring"] / 2, d["ri_ap"] + d["ring"] / 2
        p0 = np.array([ru * np.cos(psi), rv * np.sin(psi), 0.0])
        tangent, radius = np.array([-ru * np.sin(psi), rv * np.cos(psi)]), d["ring"] + 4.0
    elif rng.random() < 0.65:  # through the body (on C2 it runs on up into the dens)
        p0 = np.array(
            [
                rng.uniform(-0.5, 0.5) * d["a"],
                rng.uniform(-0.5, 0.5) * d["b"],
                rng.uniform(-0.3, 0.3) * d["h"],
            ]
        )
        phi = rng.uniform(0, np.pi)
        tangent, radius = np.array([np.cos(phi), np.sin(phi)]), 2.0 * max(d["a"], d["b"])
    else:  # across the posterior arch
        psi = rng.uniform(np.radians(15), np.radians(165))
        ru, rv = d["rc_lr"] + d["th"] / 2, d["rc_ap"] + d["th"] / 2
        vc = d["b"] + d["rc_ap"] + 1.0
        p0 = np.array([ru * np.cos(psi), vc + rv * np.sin(psi), 0.0])
        tangent, radius = np.array([-ru * np.sin(psi), rv * np.cos(psi)]), d["th"] + 4.0
    normal = np.append(tangent / np.linalg.norm(tangent), rng.uniform(-0.3, 0.3))
    normal /= np.linalg.norm(normal)
    disp = normal * rng.uniform(0.4, 1.2) + np.array([0.0, 0.0, rng.uniform(-1.0, 1.0)])
    return Cleft(p0, normal, disp, width, radius)


def _reach(name: str, d: dict[str, float]) -> float:
    """Half of the z range a vertebra can touch, generous for tilt and the sloping spinous process."""
    if name == "C1":
        return d["lm_h"] + 8.0
    return d["h"] + d["gap"] + d.get("dens_len", 0.0) + 16.0


def build_anatomy(rng: np.random.Generator, plan: StudyPlan, scan: Scan) -> Anatomy:
    """Random anatomy and scan geometry of one study (jittered sizes, position, curvature, spacing)."""
    size = int(scan.image_size)
    # clefts get their own stream, so the rest of the anatomy does not depend on the labels at all
    cleft_rng = np.random.default_rng(rng.integers(2**63))
    spacing = rng.uniform(*scan.fov_mm) / size
    s = float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1))
    stack = _stack_vertebrae(rng, s)
    z_off = rng.uniform(-150.0, 150.0)  # table position
    z_of = {name: zc + z_off for name, zc, _ in stack}
    axis = {
        "z_c4": z_of["C4"],
        "x0": rng.uniform(-4, 4),
        "y0": rng.uniform(0, 8),
        "lat": rng.uniform(-0.05, 0.05),
        "lean": rng.uniform(-0.08, 0.08),
        "curv": rng.uniform(2, 10),
    }
    verts = []
    for label, (name, _, d) in enumerate(stack, start=1):
        zc = z_of[name]
        x, y = _axis_xy(axis, zc)
        if name == "C1":  # the ring is centred behind the dens, which rises on C2's axis
            c2 = stack[1][2]
            y = y + c2["dens_v"] + d["ri_ap"] - 1.5 - c2["dens_r"]
        v = Vertebra(
            name,
            label,
            np.array([x, y, zc], dtype=np.float64),
            _axis_rotation(axis, zc, rng.normal(0, 3)),
            d,
            _reach(name, d),
        )
        if name in VERTEBRAE and VERTEBRAE.index(name) in plan.visible:
            v.cleft = _make_cleft(cleft_rng, name, d, spacing)
        verts.append(v)
    z_asc = _slice_heights(rng, verts, scan)
    neck = {
        "cx": rng.uniform(-3, 3),
        "cy": rng.uniform(-2, 4),
        "a": rng.uniform(55, 65) * s,
        "b": rng.uniform(50, 58) * s,
        "rim": rng.uniform(3, 7),
        "z_shoulder": z_of["T1"] + 5.0,
    }
    hu = {"cortical": rng.uniform(900, 1200), "cancellous": rng.uniform(250, 350)}
    shift = rng.uniform(-10, 10, size=2)
    origin = (-size * spacing / 2 + shift[0], -size * spacing / 2 + shift[1])
    z_inst = z_asc[::-1] if plan.order == "head_first" else z_asc
    noise = rng.uniform(20, 40)
    return Anatomy(verts, z_inst, origin, spacing, size, neck, hu, noise, axis, _head(rng, verts[0], s))


def _head(rng, c1: Vertebra, s: float) -> dict[str, float]:
    """Skull base above C1 (not labelled in the masks, as on the real ones): the occipital condyles on
    C1's lateral masses, the foramen magnum over C1's ring, and the cranium as an ellipsoid shell."""
    d = c1.dims
    top = c1.centre[2] + d["lm_h"]
    return {
        "x": c1.centre[0],
        "y": c1.centre[1],
        "z_condyle": top + 1.0,  # the atlanto-occipital joint
        "z_base": top + rng.uniform(6.0, 9.0),  # lowest point of the skull base (at the foramen magnum)
        "fm_r": rng.uniform(15.0, 18.0) * s,
        "cond_u": d["lm_u"],
        "cond_v": d["lm_v"],
        "a": rng.uniform(65, 75) * s,  # cranium half-axes (LR, AP, SI)
        "b": rng.uniform(80, 92) * s,
        "c": rng.uniform(70, 80) * s,
        "dy": -rng.uniform(10, 20),  # the cranium's centre lies anterior to the foramen magnum
        "shell": rng.uniform(5, 8),
    }


def _slice_heights(rng, verts: list[Vertebra], scan: Scan) -> np.ndarray:
    """Ascending z of the slices, evenly spaced: from above C1 (skull base) down below C7 (thorax).

    The spacing is drawn per study (so a model gridded by slice index would see different scales) and
    the count follows; with ``scan.n_slices`` the count is fixed and the scan spans C1 to T1.
    """
    c1, c7 = verts[0], verts[VERTEBRAE.index("C7")]
    above, below = scan.above_c1_mm, scan.below_c7_mm
    if scan.n_slices:
        above, below = NARROW_ABOVE_MM, NARROW_BELOW_MM
    top = c1.centre[2] + c1.dims["lm_h"] + rng.uniform(*above)
    bottom = c7.centre[2] - c7.dims["h"] - rng.uniform(*below)
    if scan.n_slices:
        return np.linspace(bottom, top, int(scan.n_slices))
    step = rng.uniform(*scan.slice_spacing_mm)
    return bottom + step * np.arange(int((top - bottom) / step) + 1)


# =============================================================================================
# Shapes in a vertebra's local frame
# =============================================================================================


def _ellipse(u, v, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _atlas_shape(d, u, v, t):
    """C1: a ring with lateral masses and transverse processes, no body. Returns bone, cancellous, canal."""
    au = np.abs(u)
    ring = (
        _ellipse(u, v, 0, 0, d["ri_lr"] + d["ring"], d["ri_ap"] + d["ring"])
        & ~_ellipse(u, v, 0, 0, d["ri_lr"], d["ri_ap"])
        & (np.abs(t) <= d["ring_h"])
    )
    lm = _ellipse(au, v, d["lm_u"], d["lm_v"], d["lm_ru"], d["lm_rv"]) & (np.abs(t) <= d["lm_h"])
    core = _ellipse(au, v, d["lm_u"], d["lm_v"], d["lm_ru"] - d["shell"], d["lm_rv"] - d["shell"]) & (
        np.abs(t) <= d["lm_h"] - d["shell"]
    )
    tp = (
        (au >= d["ri_lr"] + d["ring"] - 2)
        & (au <= d["ri_lr"] + d["ring"] + d["tp"])
        & (np.abs(v - d["lm_v"]) <= 3.0)
        & (np.abs(t) <= 3.0)
    )
    canal = _ellipse(u, v, 0, 0, d["ri_lr"], d["ri_ap"]) & (np.abs(t) <= d["lm_h"])
    return ring | lm | tp, core, canal


def _body_shape(d, u, v, t):
    """Body (cortical shell around a cancellous core), C2's dens, arch ring, spinous and transverse
    processes. Returns bone, cancellous, canal."""
    at = np.abs(t)
    a, b, h, sh = d["a"], d["b"], d["h"], d["shell"]
    bone = _ellipse(u, v, 0, 0, a, b) & (at <= h)
    core = _ellipse(u, v, 0, 0, a - sh, b - sh) & (at <= h - sh)
    if "dens_r" in d:
        bone, core = _add_dens(d, u, v, t, bone, core)
    vc = b + d["rc_ap"] + 1.0  # canal centre, just behind the body
    canal_e = _ellipse(u, v, 0, vc, d["rc_lr"], d["rc_ap"])
    ring = _ellipse(u, v, 0, vc, d["rc_lr"] + d["th"], d["rc_ap"] + d["th"]) & ~canal_e & (at <= d["ha"])
    back = v - vc - d["rc_ap"]  # distance behind the canal; the spinous process slopes down
    spinous = (
        (np.abs(u) <= 2.5)
        & (back >= 0)
        & (back <= d["th"] + d["spin"])
        & (np.abs(t + 0.35 * back) <= 0.6 * d["ha"])
    )
    au = np.abs(u)
    tp = (au >= a - 1) & (au <= a + d["tp"]) & (np.abs(v - 0.6 * b) <= 2.5) & (at <= 0.5 * d["ha"])
    canal = canal_e & (at <= h + d["gap"])
    return bone | ring | spinous | tp, core, canal


def _add_dens(d, u, v, t, bone, core):
    """C2's dens: a cylinder on the body with a rounded tip."""
    r, top = d["dens_r"], d["h"] + d["dens_len"]
    taper = 1.0 - np.clip((t - (top - r)) / r, 0.0, 1.0) ** 2  # 1 below the tip, 0 at the top
    rho2 = u**2 + (v - d["dens_v"]) ** 2
    above = (t >= d["h"] - 1.0) & (t <= top)
    dens = above & (rho2 <= r**2 * taper)
    dens_core = above & (t <= top - d["shell"]) & (rho2 <= (r - d["shell"]) ** 2 * taper)
    return bone | dens, core | dens_core


def _disc_above(d, u, v, t) -> np.ndarray:
    """The disc between this body's top and the body above (none above C2)."""
    if not d.get("gap"):
        return np.zeros(np.shape(u), dtype=bool)
    between = (t > d["h"] - 0.5) & (t <= d["h"] + d["gap"] + 0.5)
    return _ellipse(u, v, 0, 0, d["a"] - 0.5, d["b"] - 0.5) & between


def _shape(vert: Vertebra, u, v, t):
    return (_atlas_shape if vert.name == "C1" else _body_shape)(vert.dims, u, v, t)


def _fractured_shape(vert: Vertebra, u, v, t):
    """Bone, cancellous, cleft and canal masks of a vertebra, its cleft (if any) applied."""
    bone, core, canal = _shape(vert, u, v, t)
    c = vert.cleft
    if c is None:
        return bone, core, np.zeros_like(bone), canal
    du, dv, dt = u - c.p0[0], v - c.p0[1], t - c.p0[2]
    side = du * c.normal[0] + dv * c.normal[1] + dt * c.normal[2]
    near = du**2 + dv**2 <= c.radius**2
    bone_m, core_m, _ = _shape(vert, u - c.disp[0], v - c.disp[1], t - c.disp[2])
    frag = near & (side > 0)  # the moved fragment: bone is looked up where it came from
    bone_f, core_f = np.where(frag, bone_m, bone), np.where(frag, core_m, core)
    cleft = near & (np.abs(side) <= c.width / 2) & (bone | bone_f)
    return bone_f & ~cleft, core_f & ~cleft, cleft, canal


# =============================================================================================
# Rendering
# =============================================================================================


def _local_coords(vert: Vertebra, xs: np.ndarray, ys: np.ndarray, z: float):
    """Local (u, v, t) of the pixel grid (rows ys, columns xs) of the slice at height z."""
    dx = (xs - vert.centre[0])[None, :]
    dy = (ys - vert.centre[1])[:, None]
    dz = z - vert.centre[2]
    r = vert.rot  # local = r.T @ (p - centre)
    return tuple((r[0, m] * dx + r[1, m] * dy + r[2, m] * dz).astype(np.float32) for m in range(3))


def _window(anat: Anatomy, vert: Vertebra) -> tuple[slice, slice]:
    """Pixel rows/columns around a vertebra that hold all of it (processes included)."""
    x0, y0 = anat.origin
    cx, cy = vert.centre[:2]
    to_px = lambda mm, o: int(np.clip(round((mm - o) / anat.spacing), 0, anat.size))  # noqa: E731
    return (slice(to_px(cy - 40, y0), to_px(cy + 65, y0)), slice(to_px(cx - 50, x0), to_px(cx + 50, x0)))


def _paint_neck(anat: Anatomy, z: float) -> np.ndarray:
    """HU of the soft tissue at height z: a neck ellipse (fat rim) widening to the shoulders, an airway."""
    n, sp = anat.neck, anat.spacing
    grid = np.arange(anat.size, dtype=np.float32) * sp
    xs, ys = grid + anat.origin[0], grid + anat.origin[1]
    widen = 1.0 / (1.0 + np.exp((z - n["z_shoulder"]) / 10.0))  # 0 above the shoulders, 1 below
    a, b = n["a"] * (1 + 0.4 * widen), n["b"] * (1 + 0.15 * widen)
    e = ((xs[None, :] - n["cx"]) / a) ** 2 + ((ys[:, None] - n["cy"]) / b) ** 2
    hu = np.full((anat.size, anat.size), HU_AIR, dtype=np.float32)
    hu[e <= 1.0] = HU_FAT
    hu[e <= (1.0 - n["rim"] / b) ** 2] = HU_SOFT
    ax, ay = _axis_xy(anat.axis, z)
    airway = ((xs[None, :] - ax) / 9.0) ** 2 + ((ys[:, None] - (ay - 26.0)) / 7.0) ** 2 <= 1.0
    hu[airway] = HU_AIR
    if z >= anat.head["z_condyle"]:
        _paint_head(anat, z, hu, xs, ys)
    return hu


def _paint_head(anat: Anatomy, z: float, hu: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
    """Skull base and cranium at height z (in place): bone that is not a vertebra, above C1."""
    h, bone = anat.head, anat.hu["cortical"] * 1.2
    dx, dy = xs[None, :] - h["x"], ys[:, None] - h["y"]
    zc = h["z_base"] + h["c"]  # the cranium's lowest point is the skull base
    for grow, value in ((6.0, HU_SOFT), (0.0, bone), (-h["shell"], HU_BRAIN)):  # scalp, skull, brain
        a, b, c = h["a"] + grow, h["b"] + grow, h["c"] + grow
        f2 = 1.0 - ((z - zc) / c) ** 2
        if f2 > 0:
            hu[(dx / a) ** 2 + ((dy - h["dy"]) / b) ** 2 <= f2] = value
    if z <= h["z_base"] + h["shell"] + 4.0:  # the foramen magnum: the canal runs up through the base
        hu[dx**2 + dy**2 <= h["fm_r"] ** 2] = HU_CSF
    if z <= h["z_base"] + 2.0:  # the occipital condyles, resting on C1's lateral masses
        for side in (-1.0, 1.0):
            hu[((dx - side * h["cond_u"]) / 5.5) ** 2 + ((dy - h["cond_v"]) / 8.0) ** 2 <= 1.0] = bone


@dataclass
class SliceImage:
    hu: np.ndarray  # float32 HU before noise
    labels: np.ndarray  # uint8 mask labels
    clefts: dict[str, tuple[int, int, int, int]]  # vertebra -> (row_min, row_max, col_min, col_max)


def render_slice(anat: Anatomy, z: float) -> SliceImage:
    """HU and mask labels of the axial slice at height z, and the bounding box of each cleft on it."""
    hu = _paint_neck(anat, z)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    grid = np.arange(anat.size) * anat.spacing
    active = [v for v in anat.vertebrae if abs(z - v.centre[2]) <= v.reach]
    parts = []
    for vert in active:  # soft parts first, so no vertebra's canal or disc covers another's bone
        win = _window(anat, vert)
        u, v, t = _local_coords(vert, grid[win[1]] + anat.origin[0], grid[win[0]] + anat.origin[1], z)
        bone, core, cleft, canal = _fractured_shape(vert, u, v, t)
        hu[win][canal] = HU_CSF
        if vert.name != "C1":
            hu[win][_disc_above(vert.dims, u, v, t)] = HU_DISC
        parts.append((vert, win, bone, core, cleft))
    clefts = {}
    for vert, win, bone, core, cleft in parts:
        hw, lw = hu[win], labels[win]
        hw[bone] = anat.hu["cortical"]
        hw[core] = anat.hu["cancellous"]
        hw[cleft] = HU_SOFT
        lw[bone | cleft] = vert.label
        if cleft.sum() >= 2:
            rows, cols = np.nonzero(cleft)
            clefts[vert.name] = (
                rows.min() + win[0].start,
                rows.max() + win[0].start,
                cols.min() + win[1].start,
                cols.max() + win[1].start,
            )
    return SliceImage(hu, labels, clefts)


def _to_stored(hu: np.ndarray, storage: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Integer HU stored in the study's convention (clipped to what 12 stored bits hold), with its
    (slope, intercept)."""
    dtype, intercept = STORAGES[storage]
    lo, hi = (0, 4095) if dtype == np.uint16 else (-2048, 2047)
    h = np.clip(np.rint(hu), max(-1024.0, lo + intercept), min(3071.0, hi + intercept))
    return (h - intercept).astype(dtype), (1.0, intercept)


def nifti_affine(anat: Anatomy) -> np.ndarray:
    """Voxel (i, j, k) of the stored mask -> RAS mm.

    The mask is stored like the real ones: S[i, j, k] = A[k, R-1-j, i] with A[k, r, c] the volume in
    ascending patient z (whatever the DICOM file order); a DICOM pixel sits at LPS (x0 + c dx, y0 + r dy, z)
    and RAS = (-x, -y, z).
    """
    size, sp = anat.size, anat.spacing
    x0, y0 = anat.origin
    z = np.sort(anat.z_instances)
    step = (z[-1] - z[0]) / (len(z) - 1) if len(z) > 1 else 1.0
    return np.array(
        [
            [-sp, 0.0, 0.0, -x0],
            [0.0, sp, 0.0, -(y0 + (size - 1) * sp)],
            [0.0, 0.0, step, z[0]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def mask_from_ascending(volume: np.ndarray) -> np.ndarray:
    """The stored NIfTI array of a label volume A[k, r, c] in ascending z: axes (column, row, slice),
    row axis reversed. The published reading rule undoes it (``dicom_order_from_mask``)."""
    return volume.transpose(2, 1, 0)[:, ::-1, :]


def dicom_order_from_mask(stored: np.ndarray, z_decreases: bool) -> np.ndarray:
    """The published rule (a top-3 solution, right on all 87 real masks): the mask in DICOM file order
    V[k, r, c], given whether ImagePositionPatient z decreases with the slice number."""
    if z_decreases:
        return stored[:, ::-1, ::-1].transpose(2, 1, 0)
    return stored[:, ::-1].transpose(2, 1, 0)


def _write_mask(path: Path, volume: np.ndarray, anat: Anatomy, honest: bool) -> None:
    """Save the label volume (ascending z) in the real masks' layout (see ``nifti_affine``). A dishonest
    header (a quirk) carries the identity affine instead: only the reading rule places such a mask."""
    affine = nifti_affine(anat) if honest else np.eye(4)
    img = nib.Nifti1Image(np.ascontiguousarray(mask_from_ascending(volume)), affine)
    img.set_data_dtype(np.uint8)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _set_monochrome1(path: Path) -> None:
    """Mark a written slice MONOCHROME1: only the tag changes (for CT the rescale gives HU whatever the
    photometric interpretation says)."""
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path, enforce_file_format=True)


@dataclass
class StudyResult:
    """What rendering one study leaves for the tables."""

    n_slices: int
    slice_spacing: float  # mm between slices
    pixel_spacing: float  # mm
    vertebrae: list[dict]
    boxes: list[dict]
    corrupt: str | None = None


def render_study(out: Path, plan: StudyPlan, anat: Anatomy, rng: np.random.Generator) -> StudyResult:
    """Render and write every slice of one study (and its mask), one slice in memory at a time."""
    n = len(anat.z_instances)
    folder = out / f"{plan.split}_images" / plan.uid
    volume = np.zeros((n, anat.size, anat.size), dtype=np.uint8) if plan.segmented else None  # ascending z
    present = np.zeros((n, len(NAMES) + 1), dtype=bool)  # by ascending-z index, label
    asc_index = np.argsort(np.argsort(anat.z_instances))
    boxes = []
    for k, z in enumerate(anat.z_instances):
        img = render_slice(anat, float(z))
        hu = img.hu + rng.standard_normal(img.hu.shape, dtype=np.float32) * anat.noise
        stored, rescale = _to_stored(hu, plan.storage)
        write_slice(
            folder / f"{k + 1}.dcm",
            stored,
            ipp=(anat.origin[0], anat.origin[1], z),
            iop=(1, 0, 0, 0, 1, 0),
            spacing=(anat.spacing, anat.spacing),
            thickness=_thickness(anat),
            instance_number=k + 1,
            study_uid=plan.uid,
            series_uid=plan.uid + ".1",
            series_number=1,
            series_description="CERVICAL SPINE",
            modality="CT",
            patient_id=plan.uid.rsplit(".", 1)[-1],
            rescale=rescale,
            syntax=plan.syntax,
        )
        if plan.monochrome1:
            _set_monochrome1(folder / f"{k + 1}.dcm")
        present[asc_index[k]] = np.bincount(img.labels.ravel(), minlength=len(NAMES) + 1) > 0
        if volume is not None:
            volume[asc_index[k]] = img.labels
        if plan.boxes:
            boxes += [_box_row(plan.uid, k + 1, b) for b in img.clefts.values()]
    if volume is not None:
        _write_mask(out / "segmentations" / f"{plan.uid}.nii", volume, anat, plan.honest_affine)
    corrupt = None
    if plan.corrupt_at is not None:
        path = folder / f"{1 + int(plan.corrupt_at * n)}.dcm"
        common.corrupt(path)
        corrupt = str(path.relative_to(out))
    rows = _vertebra_rows(plan, anat, present)
    return StudyResult(n, _thickness(anat), anat.spacing, rows, boxes, corrupt)


def _thickness(anat: Anatomy) -> float:
    z = anat.z_instances
    return float(abs(z[-1] - z[0]) / max(len(z) - 1, 1))


def _box_row(uid: str, slice_number: int, box: tuple[int, int, int, int]) -> dict:
    r0, r1, c0, c1 = box
    return {
        "StudyInstanceUID": uid,
        "x": float(c0),
        "y": float(r0),
        "width": float(c1 - c0 + 1),
        "height": float(r1 - r0 + 1),
        "slice_number": slice_number,
    }


def _vertebra_rows(plan: StudyPlan, anat: Anatomy, present: np.ndarray) -> list[dict]:
    """One truth row per vertebra that shows on at least one slice."""
    z_asc = np.sort(anat.z_instances)
    rows = []
    for vert in anat.vertebrae:
        idx = np.nonzero(present[:, vert.label])[0]
        if len(idx) == 0:
            continue
        rows.append(
            {
                "study_id": plan.uid,
                "split": plan.split,
                "vertebra": vert.name,
                "z_min_mm": float(z_asc[idx[0]]),
                "z_max_mm": float(z_asc[idx[-1]]),
                "cx_mm": float(vert.centre[0]),
                "cy_mm": float(vert.centre[1]),
                "cz_mm": float(vert.centre[2]),
                "slice_min": int(idx[0]),
                "slice_max": int(idx[-1]),
            }
        )
    return rows


# =============================================================================================
# Tables and summary
# =============================================================================================


def _label_rows(plan: StudyPlan) -> list[dict]:
    """Truth rows of one study: label, visibility and Bayes probability per target."""
    bayes = bayes_probabilities(None if plan.missing else set(plan.visible))
    rows = []
    for i, target in enumerate(TARGETS):
        is_v = target != "patient_overall"
        label = int(i in plan.fractured) if is_v else int(bool(plan.fractured))
        rows.append(
            {
                "row_id": f"{plan.uid}_{target}",
                "study_id": plan.uid,
                "split": plan.split,
                "target": target,
                "label": label,
                "visible": int(i in plan.visible) if is_v else None,
                "bayes_fractured": float(bayes[i]),
            }
        )
    return rows


def _train_csv(plans: list[StudyPlan]) -> pd.DataFrame:
    rows = []
    for p in plans:
        flags = [int(i in p.fractured) for i in range(len(VERTEBRAE))]
        rows.append([p.uid, int(any(flags)), *flags])
    return pd.DataFrame(rows, columns=TRAIN_COLUMNS)


def _split_scores(task: CervicalTask, labels: pd.DataFrame, rates: pd.Series) -> dict:
    """Official score of the prior (train label rates) and of the Bayes probabilities on one split."""
    sol = pd.DataFrame({"row_id": labels["row_id"], "fractured": labels["label"].astype(int)})
    prior = pd.DataFrame({"row_id": labels["row_id"], "fractured": labels["target"].map(rates).to_numpy()})
    bayes = pd.DataFrame({"row_id": labels["row_id"], "fractured": labels["bayes_fractured"]})
    return {"prior": task.score(sol, prior), "bayes": task.score(sol, bayes)}


def _split_counts(plans: list[StudyPlan], results: dict[str, StudyResult], labels: pd.DataFrame) -> dict:
    """Studies, slices, label rates and the share of fractured vertebrae that show a cleft."""
    n_frac = sum(len(p.fractured) for p in plans)
    done = [results[p.uid] for p in plans if p.uid in results]
    spread = lambda xs: [round(min(xs), 3), round(max(xs), 3)] if xs else None  # noqa: E731
    return {
        "studies": len(plans),
        "slices": int(sum(r.n_slices for r in done)),
        "slices_per_study": spread([r.n_slices for r in done]),
        "slice_spacing_mm": spread([r.slice_spacing for r in done]),
        "pixel_spacing_mm": spread([r.pixel_spacing for r in done]),
        "fracture_rate": {t: float(r) for t, r in labels.groupby("target")["label"].mean().items()},
        "visible_share": sum(len(p.visible) for p in plans) / n_frac if n_frac else None,
    }


def _quirks(plans: list[StudyPlan], results: dict[str, StudyResult]) -> dict:
    return {
        "syntax": {p.uid: p.syntax for p in plans if not p.missing},
        "instance_order": {p.uid: p.order for p in plans if not p.missing},
        "storage": {p.uid: p.storage for p in plans if not p.missing},
        "corrupt_files": sorted(r.corrupt for r in results.values() if r.corrupt),
        "missing_test_studies": [p.uid for p in plans if p.missing],
        "monochrome1": [p.uid for p in plans if p.monochrome1],
        "segmented": [p.uid for p in plans if p.segmented],
        "identity_affine_masks": [p.uid for p in plans if p.segmented and not p.honest_affine],
        "nifti_layout": "S[i, j, k] = A[k, R-1-j, i], A in ascending patient z; DICOM order V = "
        "S[:, ::-1, ::-1].transpose(2, 1, 0) if z decreases with InstanceNumber, else "
        "S[:, ::-1].transpose(2, 1, 0); the affine maps (i, j, k) to RAS mm, except on identity_affine_masks",
    }


def _write_kaggle_tables(out: Path, plans: list[StudyPlan], boxes: pd.DataFrame, task: CervicalTask) -> None:
    train = [p for p in plans if p.split == "train"]
    test_uids = [p.uid for p in plans if p.split == "test"]
    _train_csv(train).to_csv(out / "train.csv", index=False)
    boxes.to_csv(out / "train_bounding_boxes.csv", index=False)
    row_ids = task.row_ids(test_uids)
    parts = [task.parse_row_id(r) for r in row_ids]
    test = pd.DataFrame(
        {
            "row_id": row_ids,
            "StudyInstanceUID": [p["study_id"] for p in parts],
            "prediction_type": [p["target"] for p in parts],
        }
    )
    test.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": row_ids, "fractured": 0.5}).to_csv(out / "sample_submission.csv", index=False)


def _truth_tables(plans, results, task: CervicalTask) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    labels = pd.DataFrame([r for p in plans for r in _label_rows(p)])
    test = labels[labels["split"] == "test"]
    sol = pd.DataFrame({"row_id": test["row_id"].to_numpy(), "fractured": test["label"].to_numpy(dtype=int)})
    sol["sample_weight"] = task.row_weights(sol)
    verts = pd.DataFrame(
        [row for r in results.values() for row in r.vertebrae],
        columns=[
            "study_id",
            "split",
            "vertebra",
            "z_min_mm",
            "z_max_mm",
            "cx_mm",
            "cy_mm",
            "cz_mm",
            "slice_min",
            "slice_max",
        ],
    )
    return {"labels": labels, "test_solution": sol, "vertebrae": verts}, labels


def _prior_rates(labels: pd.DataFrame) -> pd.Series:
    """Train label rate per target: the constant prediction to beat. Kept within [0.5/n, 1 - 0.5/n] so a
    target never seen fractured in a small train split does not get probability 0."""
    train = labels[labels["split"] == "train"]
    n = train["study_id"].nunique()
    return train.groupby("target")["label"].mean().clip(0.5 / n, 1 - 0.5 / n)


def _summary(plans, results, labels: pd.DataFrame, boxes: pd.DataFrame, meta: dict) -> dict:
    """Counts, prior and Bayes scores per split, the quirks placed and the prior's parameters."""
    task = CervicalTask()
    rates = _prior_rates(labels) if (labels["split"] == "train").any() else None
    summary = {
        **meta,
        "counts": {},
        "scores": {},
        "params": {
            "p_fractured": P_FRACTURED,
            "q_visible": Q_VISIBLE,
            "block_len_probs": list(BLOCK_LEN_PROBS),
            "start_weights": list(START_WEIGHTS),
        },
    }
    for split in ("train", "test"):
        sl = labels[labels["split"] == split]
        summary["counts"][split] = _split_counts([p for p in plans if p.split == split], results, sl)
        summary["scores"][split] = _split_scores(task, sl, rates) if len(sl) and rates is not None else None
    summary["counts"]["train"].update(
        segmentations=sum(p.segmented for p in plans),
        identity_affine_masks=sum(p.segmented and not p.honest_affine for p in plans),
        monochrome1=sum(p.monochrome1 for p in plans if p.split == "train"),
        box_studies=int(boxes["StudyInstanceUID"].nunique()),
        boxes=len(boxes),
    )
    summary["quirks"] = _quirks(plans, results)
    return summary


# =============================================================================================
# Entry point
# =============================================================================================


def generate(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    image_size: int | None = None,
    n_slices: int | None = None,
    *,
    fov_mm: tuple[float, float] | None = None,
    slice_spacing_mm: tuple[float, float] | None = None,
    above_c1_mm: tuple[float, float] | None = None,
    below_c7_mm: tuple[float, float] | None = None,
    mask_share: float | None = None,
) -> dict:
    """Write a synthetic cervical data set to ``out`` (Kaggle layout) and its truth to ``{out}_truth/``.

    Every size defaults to the real data's (``Scan``): 512² slices 0.5-1.25 mm apart from the skull base
    to the upper thorax, a mask for ~4 % of the train studies. The demo configs scale it down.

    Args:
        out: data folder to create (an existing one is replaced only if it was generated).
        n_train, n_test: numbers of studies.
        seed: everything (labels, quirks, anatomy, noise) follows from it.
        image_size: pixels per side.
        n_slices: a fixed number of slices per study spanning C1 to T1 (cheap tests); None = from spacing.
        fov_mm: (min, max) in-plane field of view; pixel spacing = fov / image_size.
        slice_spacing_mm: (min, max) slice spacing, drawn per study.
        above_c1_mm, below_c7_mm: (min, max) of how far the scan reaches above C1 and below C7.
        mask_share: share of the train studies with a segmentation mask (at least MIN_MASKS).

    Returns:
        The summary (also written as ``summary.json``): counts, prior and Bayes scores, quirks placed.
    """
    start = time.perf_counter()
    given = {
        "image_size": image_size,
        "n_slices": n_slices,
        "fov_mm": fov_mm,
        "slice_spacing_mm": slice_spacing_mm,
        "above_c1_mm": above_c1_mm,
        "below_c7_mm": below_c7_mm,
    }
    scan = Scan(**{k: _pair(v) if k.endswith("_mm") else v for k, v in given.items() if v is not None})
    share = MASK_SHARE if mask_share is None else float(mask_share)
    out = common.prepare_out(out)
    task = CervicalTask()
    plans = plan_studies(seed, n_train, n_test, share)
    split_code = {"train": 1, "test": 2}
    results: dict[str, StudyResult] = {}
    for plan in plans:
        if plan.missing:
            continue
        rng = np.random.default_rng([seed, split_code[plan.split], plan.index])
        anat = build_anatomy(rng, plan, scan)
        results[plan.uid] = render_study(out, plan, anat, rng)
    boxes = pd.DataFrame(
        [b for r in results.values() for b in r.boxes],
        columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"],
    )
    _write_kaggle_tables(out, plans, boxes, task)
    tables, labels = _truth_tables(plans, results, task)
    meta = {"task": "cervical", "seed": seed, "scan": asdict(scan), "mask_share": share}
    summary = _summary(plans, results, labels, boxes, meta)
    common.write_truth(out, tables, summary)
    log.info(
        "cervical synth: %d train, %d test studies in %.1f s", n_train, n_test, time.perf_counter() - start
    )
    return summary


def _pair(value) -> tuple[float, float]:
    """A (min, max) range from a config list; a clear error otherwise."""
    lo, hi = (float(v) for v in value)
    if not 0 <= lo <= hi:
        raise ValueError(f"a range must be [min, max] with 0 <= min <= max, got {list(value)}")
    return lo, hi
