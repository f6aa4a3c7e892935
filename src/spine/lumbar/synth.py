"""Synthetic RSNA 2024 Lumbar Spine Degenerative Classification data, in the exact Kaggle layout.

Every image is rendered by evaluating one analytic 3D phantom per study at each pixel's patient
position (LPS mm: +x patient left, +y posterior, +z superior), so the sagittal and axial series of a
study agree through their geometry tags. The phantom is described in spine coordinates: arc length
``t`` along a lordotic axis through the vertebral bodies (growing superior), ``b`` the posterior
offset from that axis in the sagittal plane and ``x`` the lateral offset from the midline. Discs are
perpendicular to the axis, so each disc's tilt follows the curve. The phantom (anatomy, signals,
rendering) is core's, ``spine.core.synth.phantom``, shared with the SPIDER generator; this module adds
the lumbar signs' severities, the reader model, the series plans and the Kaggle files.

Each of the 25 rows of a study has a latent severity s in [0, 1] that the phantom shows: the canal
narrows at the disc (spinal), the foraminal fat shrinks (foraminal), the lateral recess shrinks and
moves medially (subarticular; each recess also has its own place per side and level). The label is
drawn from an ordinal reader model P(grade | s), so those probabilities are the Bayes-optimal answer;
they go to the truth folder ``{out}_truth/`` with the points, the quirks placed and the prior and
Bayes scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spine.core import geometry
from spine.core.io import save_table
from spine.core.synth import common
from spine.core.synth.dicom_writer import make_uid, write_slice
from spine.core.synth.phantom import (
    ANCHOR_NODE,
    BASE_BODY_MM,
    BASE_DISC_MM,
    BASE_TILT_DEG,
    FORAMEN_DT,
    NODE_NAMES,
    RECESS_MEDIAL_MM,
    Spine,
    centreline,
    render,
    render_slices,
    smooth_on_pixels,
    vary_recesses,
)
from spine.lumbar.task import (
    CONDITION_NAMES,
    CONDITION_SERIES,
    CONDITIONS,
    GRADES,
    LEVEL_NAMES,
    LEVELS,
    PRED_COLUMNS,
    TARGETS,
    LumbarTask,
    condition_group,
)

log = logging.getLogger(__name__)
# The phantom's renderer and recess shift stay part of this module's interface (tests, notebooks).
__all__ = ["RECESS_MEDIAL_MM", "generate", "grade_probabilities", "plan_dataset", "render", "render_slices",
           "sample_severity", "sample_spine", "vary_recesses"]  # fmt: skip

DEFAULT_IMAGE_SIZE = 128

# --- latent severity and the reader model ------------------------------------------------------
# s = study degeneration x level load + level noise (+ side noise); lower levels carry more load.
DEGENERATION_BETA = (2.0, 2.7)
LEVEL_LOAD = {
    "spinal": np.array([0.50, 0.65, 0.85, 1.05, 0.55]),
    "foraminal": np.array([0.40, 0.55, 0.75, 1.00, 1.05]),
    "subarticular": np.array([0.50, 0.65, 0.85, 1.05, 0.75]),
}
LEVEL_NOISE, GROUP_NOISE, SIDE_NOISE = 0.08, 0.08, 0.06
# P(grade >= g | s) = sigmoid((s - CUT_POINTS[g-1]) / READER_TEMPERATURE): readers disagree most
# where s sits between the cut points, i.e. around Moderate.
CUT_POINTS = (0.50, 0.72)
READER_TEMPERATURE = 0.045
MISSING_RATE = np.array([0.003, 0.003, 0.004, 0.005, 0.03])  # per level; the lowest level most often
PRIOR_PSEUDO_COUNT = 0.5  # keeps a grade never seen in train from costing -log(eps)

# --- anatomy (the phantom's nodes and sizes are core's: spine.core.synth.phantom) -------------------
FIRST_LEVEL_NODE = 2  # the five labeled levels are nodes 2..6 of phantom.NODE_NAMES

# --- acquisition and quirks --------------------------------------------------------------------
SAGITTAL_IOP = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
AXIAL_MODES = ("blocks", "single", "two_split", "two_repeat")
AXIAL_MODE_P = (0.70, 0.12, 0.09, 0.09)
SYNTAX_NAMES = ("explicit", "implicit", "rle", "j2k")
SYNTAX_P = (0.70, 0.10, 0.10, 0.10)
P_REVERSED, P_STIR, P_SIZE_DIFFERS, P_MISSING_SERIES = 0.2, 0.25, 0.3, 0.12
CHUNK_PIXELS = 1 << 20  # render this many pixels at a time (bounds memory at real sizes)
MAX_STORED = 4095


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def grade_probabilities(s) -> np.ndarray:
    """P(Normal/Mild, Moderate, Severe | s) of the reader model, shape (..., 3).

    These are the Bayes-optimal predictions: the image shows s, and the label depends on s only.
    """
    s = np.asarray(s, dtype=np.float64)
    ge1 = _sigmoid((s - CUT_POINTS[0]) / READER_TEMPERATURE)
    ge2 = _sigmoid((s - CUT_POINTS[1]) / READER_TEMPERATURE)
    return np.stack([1.0 - ge1, ge1 - ge2, ge2], axis=-1)


def sample_severity(rng: np.random.Generator) -> np.ndarray:
    """Latent severities of one study, shape (5 conditions, 5 levels) in CONDITIONS x LEVELS order.

    One degeneration factor per study, scaled by a level load (lower levels worse); the level noise
    is shared by all conditions and the group noise by left and right, so the sides stay correlated.
    """
    d = rng.beta(*DEGENERATION_BETA)
    level = rng.normal(0.0, LEVEL_NOISE, 5)
    shared = {g: d * load + level + rng.normal(0.0, GROUP_NOISE, 5) for g, load in LEVEL_LOAD.items()}
    out = np.empty((len(CONDITIONS), len(LEVELS)))
    for ci, cond in enumerate(CONDITIONS):
        g = condition_group(cond)
        out[ci] = shared[g] + (0.0 if g == "spinal" else rng.normal(0.0, SIDE_NOISE, 5))
    return np.clip(out, 0.0, 1.0)


# =============================================================================================
# Anatomy
# =============================================================================================


class LumbarSpine(Spine):
    """The phantom's spine with the lumbar task's levels and annotation points."""

    @property
    def severity(self) -> np.ndarray:
        """Latent severities (5 conditions, 5 levels)."""
        return self.node_severity[:, FIRST_LEVEL_NODE : FIRST_LEVEL_NODE + len(LEVELS)]

    def level_t(self, level: int) -> float:
        """Arc length of labeled level ``level`` (0 = L1/L2 ... 4 = L5/S1)."""
        return float(self.t_nodes[FIRST_LEVEL_NODE + level])

    def disc_normal(self, level: int) -> np.ndarray:
        """Unit normal (superior) of the disc plane of labeled level ``level``."""
        return self.axis_direction(self.level_t(level))

    def tilt_deg(self, level: int) -> float:
        """Tilt of the disc of ``level`` about the x axis (degrees, positive: normal tips anterior)."""
        return float(np.rad2deg(self._at(self.level_t(level))[2]))

    def row_point(self, condition: int, level: int) -> np.ndarray:
        """Patient point an annotator clicks for condition index ``condition`` at ``level``.

        Spinal: the canal centre at the disc; foraminal: the foramen centre on that side;
        subarticular: the lateral recess on that side. Left is +x (patient left).
        """
        t = self.level_t(level)
        group = condition_group(CONDITIONS[condition])
        side = 1.0 if "left" in CONDITIONS[condition] else -1.0
        if group == "spinal":
            return self.to_patient(t, self.canal_b, 0.0)
        if group == "foraminal":
            return self.to_patient(t + FORAMEN_DT, self.foramen_b, side * self.foramen_x)
        node = FIRST_LEVEL_NODE + level
        x, db = self.recess_at(0 if side > 0 else 1, self.node_severity[condition, node], node)
        return self.to_patient(t, self.canal_b + db, side * x)


def sample_spine(rng: np.random.Generator, severity: np.ndarray) -> LumbarSpine:
    """Draw one study's anatomy (jittered sizes, tilts and position) showing ``severity`` (5, 5)."""
    n = len(NODE_NAMES)
    node_sev = np.zeros((len(CONDITIONS), n))
    node_sev[:, FIRST_LEVEL_NODE : FIRST_LEVEL_NODE + len(LEVELS)] = severity
    degeneration = node_sev.mean(0)
    tilt = BASE_TILT_DEG * rng.uniform(0.75, 1.25) + rng.normal(0.0, 1.5, n) + rng.normal(0.0, 3.0)
    disc = BASE_DISC_MM * rng.uniform(0.85, 1.15, n) * (1.0 - 0.35 * degeneration)
    body = BASE_BODY_MM * rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, n - 1)
    t_nodes = -np.concatenate([[0.0], np.cumsum(disc[:-1] / 2 + body + disc[1:] / 2)])
    t_nodes -= t_nodes[ANCHOR_NODE]
    t0, tab = centreline(t_nodes, tilt, (rng.uniform(-40.0, 0.0), rng.uniform(-60.0, 60.0)))
    body_rb, canal_ap, canal_lr = rng.uniform(15.5, 18.5), rng.uniform(6.5, 8.0), rng.uniform(8.5, 10.0)
    return LumbarSpine(
        x0=rng.normal(0.0, 3.0),
        t_nodes=t_nodes,
        disc_mm=disc,
        tab_t0=t0,
        tab_dt=0.5,
        tab=tab,
        body_rx=rng.uniform(20.0, 24.0),
        body_rb=body_rb,
        canal_b=body_rb + rng.uniform(1.5, 2.5) + canal_ap,
        canal_ap=canal_ap,
        canal_lr=canal_lr,
        foramen_x=rng.uniform(16.5, 19.5),
        foramen_b=body_rb + rng.uniform(3.0, 5.0),
        recess_x=canal_lr + rng.uniform(0.5, 1.5),
        node_severity=node_sev,
        degeneration=degeneration,
    )


# =============================================================================================
# Series plans
# =============================================================================================


@dataclass
class SeriesPlan:
    """Geometry and storage of one series; slices in ascending position (instance order aside)."""

    description: str
    contrast: str
    ipp: np.ndarray  # (n, 3)
    iop: np.ndarray  # (n, 6)
    spacing: tuple[float, float]
    rows: int
    cols: int
    thickness: float
    levels: tuple[int, ...]  # labeled levels whose disc it shows (for annotations)
    tilted: bool = False
    reversed: bool = False
    syntax: str = "explicit"
    series_id: int = 0
    number: int = 0

    @property
    def instance_numbers(self) -> np.ndarray:
        """InstanceNumber of each slice: 1 at the lowest position, or at the highest when reversed."""
        n = len(self.ipp)
        return np.arange(n, 0, -1) if self.reversed else np.arange(1, n + 1)

    @property
    def is_axial(self) -> bool:
        """Whether this is an Axial T2 series."""
        return self.description == "Axial T2"


def _ipp_from_centres(centres: np.ndarray, iop: np.ndarray, spacing: float, size: int) -> np.ndarray:
    """IPP (top-left pixel centre) of square slices centred on ``centres``."""
    row_dir, col_dir = iop[..., :3], iop[..., 3:6]
    return centres - (size - 1) / 2 * spacing * (row_dir + col_dir)


def _series(
    description: str,
    contrast: str,
    centres: np.ndarray,
    iop,
    *,
    spacing: float,
    size: int,
    thickness: float,
    levels,
    order_key: np.ndarray,
    tilted: bool = False,
) -> SeriesPlan:
    """Build a plan with geometry rounded as the DICOM tags store it, slices sorted by ``order_key``."""
    iop = np.round(np.broadcast_to(iop, (len(centres), 6)), 6)
    ipp = np.round(_ipp_from_centres(centres, iop, spacing, size), 4)
    order = np.argsort(order_key, kind="stable")
    return SeriesPlan(
        description=description,
        contrast=contrast,
        ipp=ipp[order],
        iop=iop[order],
        spacing=(spacing, spacing),
        rows=size,
        cols=size,
        thickness=round(thickness, 4),
        levels=tuple(levels),
        tilted=tilted,
    )


def _plan_sagittal(rng, spine: Spine, description: str, contrast: str, size: int) -> SeriesPlan:
    """15-17 sagittal slices about 4 mm apart covering x in about [-32, 32] around the midline."""
    n = int(rng.integers(15, 18))
    gap = 64.0 / n * rng.uniform(0.93, 1.07)
    spacing = round(rng.uniform(200.0, 220.0) / size, 6)
    centre = spine.to_patient(spine.t_nodes[ANCHOR_NODE], 0.0, 0.0)
    centre = centre + [rng.uniform(-2.5, 2.5), rng.uniform(5.0, 20.0), rng.uniform(-8.0, 8.0)]
    centres = np.repeat(centre[None], n, axis=0)
    centres[:, 0] += (np.arange(n) - (n - 1) / 2) * gap
    iop = np.broadcast_to(SAGITTAL_IOP, (n, 6))
    key = geometry.slice_positions(centres, iop)
    thickness = gap * rng.uniform(0.85, 1.0)
    return _series(
        description,
        contrast,
        centres,
        SAGITTAL_IOP,
        spacing=spacing,
        size=size,
        thickness=thickness,
        levels=range(len(LEVELS)),
        order_key=key,
    )


def _plan_axial_blocks(rng, spine: Spine, levels, size: int) -> SeriesPlan:
    """One Axial T2 series of 3-5 slice blocks, each tilted to its own disc (its own IOP)."""
    n = int(rng.integers(3, 6))
    gap = rng.uniform(3.3, 4.2)
    spacing = round(rng.uniform(160.0, 180.0) / size, 6)
    centres, iops = [], []
    for level in levels:
        t = spine.level_t(level) + rng.uniform(-1.5, 1.5)
        th = np.deg2rad(spine.tilt_deg(level) + rng.normal(0.0, 1.5))
        normal = np.array([0.0, -np.sin(th), np.cos(th)])
        centre = spine.to_patient(t, spine.canal_b - rng.uniform(8.0, 16.0), rng.uniform(-3.0, 3.0))
        offsets = (np.arange(n) - (n - 1) / 2) * gap
        centres.append(centre + offsets[:, None] * normal)
        iops.append(np.repeat([[1.0, 0.0, 0.0, 0.0, np.cos(th), np.sin(th)]], n, axis=0))
    centres = np.concatenate(centres)
    thickness = gap * rng.uniform(0.85, 1.0)
    return _series(
        "Axial T2",
        "T2",
        centres,
        np.concatenate(iops),
        spacing=spacing,
        size=size,
        thickness=thickness,
        levels=levels,
        order_key=centres[:, 2],
        tilted=True,
    )


def _plan_axial_stack(rng, spine: Spine, size: int) -> SeriesPlan:
    """One non-tilted Axial T2 stack from above L1/L2 to below L5/S1."""
    gap = rng.uniform(3.6, 4.4)
    spacing = round(rng.uniform(160.0, 180.0) / size, 6)
    top = spine.to_patient(spine.level_t(0) + 12.0, spine.canal_b, 0.0)[2]
    bottom = spine.to_patient(spine.level_t(len(LEVELS) - 1) - 12.0, spine.canal_b, 0.0)[2]
    n = int(np.ceil((top - bottom) / gap)) + 1
    centre = spine.to_patient(
        spine.t_nodes[ANCHOR_NODE], spine.canal_b - rng.uniform(8.0, 16.0), rng.uniform(-3.0, 3.0)
    )
    centres = np.repeat(centre[None], n, axis=0)
    centres[:, 2] = bottom + rng.uniform(-1.0, 1.0) + np.arange(n) * gap
    iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    thickness = gap * rng.uniform(0.85, 1.0)
    return _series(
        "Axial T2",
        "T2",
        centres,
        iop,
        spacing=spacing,
        size=size,
        thickness=thickness,
        levels=range(len(LEVELS)),
        order_key=centres[:, 2],
    )


def _plan_axial(rng, spine: Spine, mode: str, size: int) -> list[SeriesPlan]:
    every = list(range(len(LEVELS)))
    if mode == "single":
        return [_plan_axial_stack(rng, spine, size)]
    if mode == "two_split":  # upper levels in one series, lower in another
        cut = int(rng.integers(2, 4))
        return [
            _plan_axial_blocks(rng, spine, every[:cut], size),
            _plan_axial_blocks(rng, spine, every[cut:], size),
        ]
    if mode == "two_repeat":  # the lowest levels acquired again
        return [_plan_axial_blocks(rng, spine, every, size), _plan_axial_blocks(rng, spine, [3, 4], size)]
    return [_plan_axial_blocks(rng, spine, every, size)]


def _scaled(size: int, scale: float) -> int:
    return max(16, int(round(size * scale / 16.0)) * 16)


# =============================================================================================
# Study plans and quirks
# =============================================================================================


@dataclass
class StudyPlan:
    """Everything drawn for one study before anything is written."""

    split: str
    index: int
    study_id: int
    rng: np.random.Generator
    spine: Spine
    probs: np.ndarray  # (5, 5, 3) Bayes probabilities
    grades: np.ndarray  # (5, 5) sampled grade
    missing: np.ndarray  # (5, 5) bool: label left empty
    axial_mode: str
    t1_scale: float
    stir: bool
    missing_series: str | None
    series: list[SeriesPlan] = field(default_factory=list)


def _plan_study(seed: int, split: str, index: int, study_id: int) -> StudyPlan:
    """Draw a study's severities, labels, anatomy and acquisition choices from its own stream."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    severity = sample_severity(rng)
    probs = grade_probabilities(severity)
    grades = (rng.random(severity.shape)[..., None] > np.cumsum(probs, -1)[..., :2]).sum(-1)
    missing = rng.random(severity.shape) < MISSING_RATE[None, :]
    spine = sample_spine(rng, severity)
    vary_recesses(spine, np.random.default_rng([seed, 0 if split == "train" else 1, index, 5]))
    missing_series = None
    if split == "test" and rng.random() < P_MISSING_SERIES:
        missing_series = str(rng.choice(["Axial T2", "Sagittal T1", "Sagittal T2/STIR"], p=[0.5, 0.3, 0.2]))
    return StudyPlan(
        split=split,
        index=index,
        study_id=study_id,
        rng=rng,
        spine=spine,
        probs=probs,
        grades=grades,
        missing=missing,
        axial_mode=str(rng.choice(AXIAL_MODES, p=AXIAL_MODE_P)),
        t1_scale=float(rng.choice([0.75, 1.25])) if rng.random() < P_SIZE_DIFFERS else 1.0,
        stir=bool(rng.random() < P_STIR),
        missing_series=missing_series,
    )


def _ensure(items: list, has: Callable, give: Callable, rng, eligible: Callable = lambda it: True) -> None:
    """Make sure at least one item has a quirk: if none has it, give it to a random eligible one."""
    if not items or any(has(it) for it in items):
        return
    pool = [it for it in items if eligible(it)]
    if pool:
        give(pool[int(rng.integers(len(pool)))])


def _is(attr: str, value) -> Callable:
    return lambda it: getattr(it, attr) == value


def _set(attr: str, value) -> Callable:
    return lambda it: setattr(it, attr, value)


def _ensure_study_quirks(studies: list[StudyPlan], rng) -> None:
    """Every study-level quirk occurs at least once (a missing series in test, each axial layout...)."""
    test = [s for s in studies if s.split == "test"]
    lost = "Axial T2" if rng.random() < 0.5 else "Sagittal T1"
    _ensure(test, lambda s: s.missing_series is not None, _set("missing_series", lost), rng)
    with_axial = [s for s in studies if s.missing_series != "Axial T2"]

    def spare(s: StudyPlan) -> bool:
        # Only take a study whose layout another study also has, so no layout disappears.
        return sum(o.axial_mode == s.axial_mode for o in with_axial) > 1

    for mode in AXIAL_MODES:
        _ensure(with_axial, _is("axial_mode", mode), _set("axial_mode", mode), rng, spare)
    both_sagittal = [s for s in studies if s.missing_series not in ("Sagittal T1", "Sagittal T2/STIR")]
    _ensure(both_sagittal, lambda s: s.t1_scale != 1.0, _set("t1_scale", 1.25), rng)
    _ensure(both_sagittal, _is("stir", True), _set("stir", True), rng)

    def drop_lowest_label(s: StudyPlan) -> None:
        s.missing[int(rng.integers(len(CONDITIONS))), len(LEVELS) - 1] = True

    _ensure([s for s in studies if s.split == "train"], lambda s: s.missing.any(), drop_lowest_label, rng)


def _build_series(study: StudyPlan, size: int) -> None:
    """Plan the study's series (all drawn, then the missing one dropped, so draws stay aligned)."""
    rng, sp = study.rng, study.spine
    series = [
        _plan_sagittal(rng, sp, "Sagittal T1", "T1", _scaled(size, study.t1_scale)),
        _plan_sagittal(rng, sp, "Sagittal T2/STIR", "STIR" if study.stir else "T2", size),
        *_plan_axial(rng, sp, study.axial_mode, size),
    ]
    for s in series:
        s.reversed = bool(rng.random() < P_REVERSED)
        s.syntax = str(rng.choice(SYNTAX_NAMES, p=SYNTAX_P))
    study.series = [s for s in series if s.description != study.missing_series]


def _ensure_series_quirks(studies: list[StudyPlan], rng) -> None:
    """Reversed instance numbers (sagittal and axial) and every transfer syntax occur at least once."""
    every = [s for st in studies for s in st.series]
    for axial in (False, True):
        kind = [s for s in every if s.is_axial == axial]
        _ensure(kind, _is("reversed", True), _set("reversed", True), rng)
    for syntax in SYNTAX_NAMES[1:]:
        _ensure(every, _is("syntax", syntax), _set("syntax", syntax), rng, _is("syntax", "explicit"))


def _unique_ids(rng, n: int, taken: set[int]) -> list[int]:
    """``n`` new random 7-10 digit ids (like the real study and series ids), none in ``taken``."""
    out: list[int] = []
    while len(out) < n:
        for v in rng.integers(1_000_000, 4_300_000_000, size=n).tolist():
            if v not in taken and len(out) < n:
                taken.add(v)
                out.append(v)
    return out


def plan_dataset(seed: int, n_train: int, n_test: int, image_size: int | None = None) -> list[StudyPlan]:
    """Draw every study of the dataset (train first, each split sorted by study id) with its series."""
    size = int(image_size or DEFAULT_IMAGE_SIZE)
    master = np.random.default_rng([seed, 99])
    taken: set[int] = set()
    studies = []
    for split, n in (("train", n_train), ("test", n_test)):
        ids = sorted(_unique_ids(master, n, taken))
        studies += [_plan_study(seed, split, i, sid) for i, sid in enumerate(ids)]
    _ensure_study_quirks(studies, master)
    for st in studies:
        _build_series(st, size)
    _ensure_series_quirks(studies, master)
    for st in studies:
        for number, (s, sid) in enumerate(
            zip(st.series, _unique_ids(master, len(st.series), taken), strict=True), start=1
        ):
            s.series_id, s.number = sid, number
    return studies


# =============================================================================================
# Writing
# =============================================================================================


def _acquire(clean: np.ndarray, series: SeriesPlan, ipp, iop, params: dict, rng) -> np.ndarray:
    """Apply the coil's smooth bias field, Rician noise and the scanner gain; store as uint16."""

    def log_bias(pts):
        rel = (pts - params["centre"]) / 100.0
        return ((rel * params["bias"]).sum(-1) - params["curve"] * (rel**2).sum(-1))[None]

    bias = np.exp(smooth_on_pixels(log_bias, ipp, iop, series.spacing, series.rows, series.cols)[0])
    sigma = np.float32(params["sigma"])
    n1 = rng.standard_normal(clean.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(clean.shape, dtype=np.float32) * sigma
    mag = np.sqrt((clean * bias + n1) ** 2 + n2**2)
    return np.clip(np.rint(mag * params["gain"]), 0, MAX_STORED).astype(np.uint16)


def _acquisition_params(rng, series: SeriesPlan) -> dict:
    # Spine coils sit behind the patient: the signal falls off anteriorly (+y is posterior).
    bias = np.array([rng.normal(0.0, 0.1), rng.uniform(0.2, 0.6), rng.normal(0.0, 0.1)])
    return dict(
        centre=series.ipp.mean(0),
        bias=bias,
        curve=rng.uniform(0.0, 0.3),
        sigma=rng.uniform(0.015, 0.04),
        gain=rng.uniform(900.0, 1700.0),
    )


def _write_series(folder: Path, study: StudyPlan, series: SeriesPlan, rng) -> int:
    """Render and write every slice of ``series`` into ``folder``; returns the number of files."""
    params = _acquisition_params(rng, series)
    per = max(1, CHUNK_PIXELS // (series.rows * series.cols))
    inst = series.instance_numbers
    study_uid = make_uid(study.study_id)
    series_uid = make_uid(study.study_id, series.series_id)
    for s0 in range(0, len(series.ipp), per):
        ipp, iop = series.ipp[s0 : s0 + per], series.iop[s0 : s0 + per]
        clean = render_slices(
            study.spine, series.contrast, ipp, iop, series.spacing, series.rows, series.cols
        )
        images = _acquire(clean, series, ipp, iop, params, rng)
        for j, img in enumerate(images):
            write_slice(
                folder / f"{inst[s0 + j]}.dcm",
                img,
                ipp=ipp[j],
                iop=iop[j],
                spacing=series.spacing,
                thickness=series.thickness,
                instance_number=int(inst[s0 + j]),
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=series.number,
                series_description=series.description,
                patient_id=str(study.study_id),
                syntax=series.syntax,
            )
    return len(series.ipp)


def _annotation(series: SeriesPlan, point: np.ndarray) -> tuple[int, float, float]:
    """(instance_number, x = column, y = row) of ``point`` on the slice whose plane is nearest."""
    k, _ = geometry.nearest_slice(point, series.ipp, series.iop)
    row, col, _ = geometry.patient_to_pixel(point, series.ipp[k], series.iop[k], series.spacing)
    return int(series.instance_numbers[k]), float(col), float(row)


def _study_rows(study: StudyPlan) -> list[dict]:
    """One record per (condition, level): labels, truth point and where an annotator would click."""
    rows = []
    for ci, cond in enumerate(CONDITIONS):
        for li, level in enumerate(LEVELS):
            point = study.spine.row_point(ci, li)
            normal = study.spine.disc_normal(li)
            series = [s for s in study.series if s.description == CONDITION_SERIES[cond] and li in s.levels]
            ann = (series[0].series_id, *_annotation(series[0], point)) if series else None
            grade = int(study.grades[ci, li])
            rows.append(
                dict(
                    row_id=f"{study.study_id}_{cond}_{level}",
                    study_id=study.study_id,
                    split=study.split,
                    condition=cond,
                    level=level,
                    severity=float(study.spine.severity[ci, li]),
                    latent_grade=int(np.argmax(study.probs[ci, li])),
                    label="" if study.missing[ci, li] else GRADES[grade],
                    **{
                        f"bayes_{c}": float(p) for c, p in zip(PRED_COLUMNS, study.probs[ci, li], strict=True)
                    },
                    point=point,
                    normal=normal,
                    annotation=ann,
                )
            )
    return rows


def _corrupt_one(out: Path, split: str, studies: list[StudyPlan], rows: list[dict], rng) -> dict | None:
    """Cut short one file of ``split`` that no annotation points to; returns where."""
    used = {(r["annotation"][0], r["annotation"][1]) for r in rows if r["split"] == split and r["annotation"]}
    cands = [
        (st, s, i)
        for st in studies
        if st.split == split
        for s in st.series
        for i in s.instance_numbers.tolist()
        if (s.series_id, i) not in used
    ]
    if not cands:
        return None
    st, s, inst = cands[int(rng.integers(len(cands)))]
    rel = f"{split}_images/{st.study_id}/{s.series_id}/{inst}.dcm"
    common.corrupt(out / rel)
    return dict(quirk="corrupt_file", split=split, study_id=st.study_id, series_id=s.series_id, detail=rel)


# =============================================================================================
# Tables, truth and summary
# =============================================================================================


def _kaggle_tables(studies: list[StudyPlan], rows: pd.DataFrame, task: LumbarTask) -> dict[str, pd.DataFrame]:
    """train.csv, train_label_coordinates.csv, the series descriptions and sample_submission.csv."""
    train_rows = rows[rows["split"] == "train"]
    wide = train_rows.assign(target=train_rows["condition"] + "_" + train_rows["level"]).pivot(
        index="study_id", columns="target", values="label"
    )
    wide = wide.reindex(columns=TARGETS).replace("", np.nan).reset_index()
    labeled = train_rows[(train_rows["label"] != "") & train_rows["annotation"].notna()]
    coords = pd.DataFrame(
        {
            "study_id": labeled["study_id"].to_numpy(),
            "series_id": [a[0] for a in labeled["annotation"]],
            "instance_number": [a[1] for a in labeled["annotation"]],
            "condition": labeled["condition"].map(CONDITION_NAMES).to_numpy(),
            "level": labeled["level"].map(LEVEL_NAMES).to_numpy(),
            "x": [a[2] for a in labeled["annotation"]],
            "y": [a[3] for a in labeled["annotation"]],
        }
    )
    tables = {"train.csv": wide, "train_label_coordinates.csv": coords}
    for split in ("train", "test"):
        tables[f"{split}_series_descriptions.csv"] = pd.DataFrame(
            [
                (st.study_id, s.series_id, s.description)
                for st in studies
                if st.split == split
                for s in st.series
            ],
            columns=["study_id", "series_id", "series_description"],
        )
    test_ids = [st.study_id for st in studies if st.split == "test"]
    sub = pd.DataFrame({"row_id": task.row_ids(test_ids)})
    for c in PRED_COLUMNS:
        sub[c] = 1.0 / 3.0
    tables["sample_submission.csv"] = sub
    return tables


def _solution(task: LumbarTask, labels: pd.DataFrame) -> pd.DataFrame:
    """Official solution (one-hot, sample_weight) of the labeled rows of ``labels``."""
    wide = labels.assign(target=labels["condition"] + "_" + labels["level"]).pivot(
        index="study_id", columns="target", values="label"
    )
    return task.solution_from_train(wide.reindex(columns=TARGETS).replace("", np.nan).reset_index())


def _prior(labels: pd.DataFrame) -> pd.DataFrame:
    """Per-target grade frequencies of the labeled train rows (with a small pseudo count)."""
    train = labels[(labels["split"] == "train") & (labels["label"] != "")]
    counts = pd.crosstab(train["condition"] + "_" + train["level"], train["label"])
    counts = counts.reindex(index=TARGETS, columns=GRADES, fill_value=0) + PRIOR_PSEUDO_COUNT
    return pd.DataFrame(
        counts.to_numpy() / counts.to_numpy().sum(1, keepdims=True), index=TARGETS, columns=PRED_COLUMNS
    )


def _split_scores(task: LumbarTask, labels: pd.DataFrame, prior: pd.DataFrame) -> dict:
    solution = _solution(task, labels)
    if solution.empty:
        return {}
    bayes = labels[["row_id"]].assign(**{c: labels[f"bayes_{c}"] for c in PRED_COLUMNS})
    prior_sub = prior.loc[labels["condition"] + "_" + labels["level"]].reset_index(drop=True)
    prior_sub.insert(0, "row_id", labels["row_id"].to_numpy())
    return {"prior": task.score(solution, prior_sub), "bayes": task.score(solution, bayes)}


def _split_counts(studies: list[StudyPlan], labels: pd.DataFrame, split: str) -> dict:
    mine = [st for st in studies if st.split == split]
    lab = labels[labels["split"] == split]
    given = lab[lab["label"] != ""]
    shares = given["label"].value_counts(normalize=True).reindex(GRADES, fill_value=0.0)
    by_group = {
        g: given[given["condition"].map(condition_group) == g]["label"]
        .value_counts(normalize=True)
        .reindex(GRADES, fill_value=0.0)
        .round(4)
        .to_dict()
        for g in ("spinal", "foraminal", "subarticular")
    }
    return dict(
        studies=len(mine),
        series=sum(len(st.series) for st in mine),
        images=int(sum(len(s.ipp) for st in mine for s in st.series)),
        rows=len(lab),
        missing_labels=int((lab["label"] == "").sum()),
        class_shares=shares.round(4).to_dict(),
        class_shares_by_group=by_group,
    )


def _quirk_list(studies: list[StudyPlan]) -> list[dict]:
    """Which study and series got which quirk (the corrupt files are added by the caller)."""
    out = []

    def add(quirk, st, series_id=0, detail=""):
        out.append(
            dict(quirk=quirk, split=st.split, study_id=st.study_id, series_id=series_id, detail=detail)
        )

    for st in studies:
        add(f"axial_{st.axial_mode}" if st.missing_series != "Axial T2" else "axial_missing", st)
        if st.missing_series:
            add("missing_series", st, detail=st.missing_series)
        sizes = {s.description: s.rows for s in st.series if not s.is_axial}
        if len(set(sizes.values())) > 1:
            add("sagittal_sizes_differ", st, detail=str(sizes))
        for s in st.series:
            if s.reversed:
                add("reversed_instances", st, s.series_id, s.description)
            if s.syntax != "explicit":
                add(f"syntax_{s.syntax}", st, s.series_id, s.description)
            if s.contrast == "STIR":
                add("stir", st, s.series_id, s.description)
            if s.tilted and len({tuple(r) for r in s.iop}) > 1:
                add("tilted_axial_blocks", st, s.series_id, f"levels {list(s.levels)}")
    return out


def _truth_tables(rows: pd.DataFrame, task: LumbarTask) -> dict[str, pd.DataFrame]:
    labels = rows[
        [
            "row_id",
            "study_id",
            "split",
            "condition",
            "level",
            "severity",
            "latent_grade",
            "label",
            *[f"bayes_{c}" for c in PRED_COLUMNS],
        ]
    ].reset_index(drop=True)
    point, normal = np.stack(rows["point"].to_numpy()), np.stack(rows["normal"].to_numpy())
    points = rows[["row_id", "study_id", "split", "condition", "level"]].reset_index(drop=True)
    for j, c in enumerate(("x_mm", "y_mm", "z_mm")):
        points[c] = point[:, j]
    for j, c in enumerate(("nx", "ny", "nz")):
        points[c] = normal[:, j]
    return {
        "labels": labels,
        "test_solution": _solution(task, labels[labels["split"] == "test"]),
        "points": points,
    }


def generate(out: Path, n_train: int, n_test: int, seed: int, image_size: int | None = None) -> dict:
    """Write a synthetic lumbar dataset in the Kaggle layout to ``out`` and its truth to ``{out}_truth/``.

    ``image_size`` is the sagittal image size in pixels (default 128; other series vary around it).
    Deterministic for a given seed. Returns the summary (also written to the truth folder): prior
    and Bayes scores per split, counts, and the quirks placed.
    """
    out = common.prepare_out(Path(out))
    task = LumbarTask()
    studies = plan_dataset(seed, n_train, n_test, image_size)
    for st in studies:
        for s in st.series:
            folder = out / f"{st.split}_images" / str(st.study_id) / str(s.series_id)
            _write_series(folder, st, s, np.random.default_rng([seed, 7, st.study_id, s.series_id]))
        log.info("%s study %d written (%d series)", st.split, st.study_id, len(st.series))
    records = [r for st in studies for r in _study_rows(st)]
    rows = pd.DataFrame(records)
    corrupt_rng = np.random.default_rng([seed, 13])
    corrupt = [_corrupt_one(out, split, studies, records, corrupt_rng) for split in ("train", "test")]
    corrupt = [c for c in corrupt if c is not None]
    for name, df in _kaggle_tables(studies, rows, task).items():
        save_table(out / name, df)
    tables = _truth_tables(rows, task)
    prior = _prior(tables["labels"])
    labels = tables["labels"]
    summary = dict(
        seed=int(seed),
        n_train=int(n_train),
        n_test=int(n_test),
        image_size=int(image_size or DEFAULT_IMAGE_SIZE),
        scores={
            split: _split_scores(task, labels[labels["split"] == split].reset_index(drop=True), prior)
            for split in ("train", "test")
        },
        counts={split: _split_counts(studies, labels, split) for split in ("train", "test")},
        quirks=_quirk_list(studies) + corrupt,
        corrupt_files={c["split"]: c["detail"] for c in corrupt},
        reader_model=dict(
            cut_points=list(CUT_POINTS), temperature=READER_TEMPERATURE, prior_pseudo_count=PRIOR_PSEUDO_COUNT
        ),
    )
    common.write_truth(out, tables, summary)
    return summary
