"""Disc levels of the lumbar sagittal stacks from a spider segmenter's masks (``localize.method``).

The spider task (reached through the registry, never imported) segments each study's Sagittal T2/STIR
and Sagittal T1 stack into vertebrae, discs and canal, its discs counted up from the sacrum (SPIDER
label 201 = L5/S1, 202 = L4/L5, ...). A cached stack is turned into spider's canonical layout by its
geometry (the nearest axis permutation and flips that take the stack's index, row and column directions,
in patient LPS, to right -> left, superior -> inferior, anterior -> posterior), and every position found
on the masks is mapped back through the same permutation and the stack's own slice geometry.

A study's two sagittal stacks agree on the names (``reconcile_stacks``): the stack that reaches lower
(else the one with more discs) names the levels of the other's discs at the same height, and the
measurements of a renamed stack are renamed with it (``rename_measurements``). Each disc gives an
anchor: the centroid of its pixels on the mid-sagittal slice (the slice with the most
fully visible vertebral body, as spider's measurements choose it), in patient mm, with a frame read off
the same pixels: ``ap`` (the disc's long axis, toward posterior), ``up`` (square to it in the sagittal
plane, toward superior) and ``lateral`` (toward the patient's left). A labelled point of a condition sits
at a nearly constant place in that frame (the canal centre just behind the disc, each foramen to one
side): its offset is the median over the training folds' studies of (label - anchor) in the frame, so
``segmentation`` points are out of fold like the keypoint model's. A condition uses the anchors of its
own series kind (canal: T2/STIR, foramina: T1), a level missing there those of the other sagittal stack.

``both`` keeps the keypoint model's positions and takes the level names from the masks: per study and
condition, the keypoint points are matched one to one to the mask points (least total distance), each
renamed to its mask point's level; the recess points of a level follow their canal point's new name.
Masks whose disc sequence spider's check calls broken (a gap, a missing vertebra, bone below the lowest
disc: the count from the sacrum may be off) rename nothing; their points get confidence 0.5.
A (study, condition, level) the masks do not give keeps the keypoint row (counted in the report).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from spine.core import geometry
from spine.core.io import fingerprint, is_current, mark_current, save_table, save_text
from spine.core.paths import Paths
from spine.core.stacks import StackGeometry, stack_geometries
from spine.lumbar.task import CONDITION_SERIES, LEVEL_NAMES, LEVELS

log = logging.getLogger(__name__)

METHODS = ("keypoints", "segmentation", "both")
# SPIDER's label ids and mid-slice rule, restated here: a task package imports no other (tests/test_layout.py)
DISC_OFFSET = 200  # SPIDER: disc 200 + k is the k-th from the sacrum
MAX_VERTEBRA = 25  # SPIDER: vertebrae 1..25 (fully visible)
# canonical axis directions in patient LPS: right -> left (+x), superior -> inferior (-z), anterior ->
# posterior (+y), the layout spider's models read (spine.spider.io)
CANONICAL_DIRECTIONS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
ANCHORS_VERSION = 4  # bump when the anchors or measurements tables change, so stored ones are remade
FRAME = ("lateral", "up", "ap")
FRAME_COLUMNS = [f"{f}_{a}" for f in FRAME for a in "xyz"]
ANCHOR_COLUMNS = ["study_id", "split", "description", "series_id", "stack", "level", "x_mm", "y_mm", "z_mm"]
MEASUREMENT_COLUMNS = [
    "study_id",
    "split",
    "description",
    "series_id",
    "structure",
    "measurement",
    "value",
    "unit",
]


# --- stacks <-> spider's canonical layout ----------------------------------------------------------
@dataclass(frozen=True)
class CanonicalView:
    """How a cached stack (index, row, col) maps to the canonical layout: canonical axis ``j`` is stack
    axis ``order[j]``, reversed where ``flip[j]``; ``spacing`` (mm) in canonical order."""

    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]  # the stack's own (index, row, col) shape


def stack_directions(geo: StackGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions (3, 3) in patient LPS in which the stack's index, row and column grow, and the
    spacing (mm) along each."""
    normal = geometry.slice_normal(geo.iop[0])
    if len(geo.ipp) > 1:
        step = np.diff(geometry.slice_positions(geo.ipp, geo.iop))
        along = normal * np.sign(np.median(step) or 1.0)
        slice_mm = float(np.median(np.abs(step)))
    else:
        along, slice_mm = normal, 1.0
    dirs = np.stack([along, geo.iop[0, 3:6], geo.iop[0, 0:3]])
    spacing = np.array([slice_mm, *np.median(geo.spacing, axis=0)])
    return dirs, spacing


def canonical_view(geo: StackGeometry, shape) -> CanonicalView:
    """The permutation and flips that take a stack nearest to the canonical layout (by its geometry)."""
    dirs, spacing = stack_directions(geo)
    cos = dirs @ CANONICAL_DIRECTIONS.T  # (stack axis, canonical axis)
    stack_axis, canon_axis = linear_sum_assignment(-np.abs(cos))
    order = [0, 0, 0]
    for i, j in zip(stack_axis, canon_axis):
        order[j] = int(i)
    flip = tuple(bool(cos[order[j], j] < 0) for j in range(3))
    return CanonicalView(
        tuple(order), flip, tuple(float(spacing[i]) for i in order), tuple(int(s) for s in shape)
    )


def to_canonical(vol: np.ndarray, view: CanonicalView) -> np.ndarray:
    """A stack's array in the canonical layout (a view: axes permuted and reversed, no resampling)."""
    out = np.transpose(vol, view.order)
    for j, f in enumerate(view.flip):
        if f:
            out = np.flip(out, axis=j)
    return out


def canonical_to_stack(view: CanonicalView, points: np.ndarray) -> np.ndarray:
    """Canonical voxel coordinates (n, 3) -> the stack's (index, row, col) (n, 3), fractional."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    out = np.empty_like(points)
    for j, i in enumerate(view.order):
        out[:, i] = view.shape[i] - 1 - points[:, j] if view.flip[j] else points[:, j]
    return out


# --- anchors from one label array -------------------------------------------------------------------
def mid_sagittal(labels: np.ndarray) -> int:
    """The slice (canonical axis 0) with the largest area of fully visible vertebral bodies."""
    body = (labels >= 1) & (labels <= MAX_VERTEBRA)
    return int(np.argmax(body.reshape(len(labels), -1).sum(1)))


def disc_pixels(labels: np.ndarray, disc: int, mid: int) -> np.ndarray:
    """Canonical voxels (n, 3) of one disc on the mid-sagittal slice, or on its own largest slice where
    the mid slice misses it."""
    on = labels == disc
    area = on.reshape(len(on), -1).sum(1)
    k = mid if area[mid] >= 3 else int(np.argmax(area))
    rr, cc = np.nonzero(on[k])
    return np.column_stack([np.full(len(rr), k), rr, cc]).astype(float)


def disc_frame(points_mm: np.ndarray) -> np.ndarray:
    """(3, 3) rows lateral, up, ap of a disc's pixels on one slice (patient mm): ap = the long axis
    toward posterior (+y), up = square to it toward superior (+z), lateral = ap x up (toward +x, left)."""
    centred = points_mm - points_mm.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ap = vt[0] if vt[0][1] >= 0 else -vt[0]
    up = vt[1] - (vt[1] @ ap) * ap
    up = up / max(np.linalg.norm(up), 1e-9)
    up = up if up[2] >= 0 else -up
    return np.stack([np.cross(ap, up), up, ap])


def level_of_disc(disc: int) -> str | None:
    """Lumbar level of a SPIDER disc label (201 = l5_s1, ..., 205 = l1_l2); None above L1/L2."""
    k = disc - DISC_OFFSET
    return LEVELS[-k] if 1 <= k <= len(LEVELS) else None


def anchors_of(labels: np.ndarray, view: CanonicalView, geo: StackGeometry) -> list[dict]:
    """One anchor per lumbar disc of a canonical label array: level, position and frame in patient mm."""
    mid = mid_sagittal(labels)
    out = []
    for disc in sorted(int(v) for v in np.unique(labels) if DISC_OFFSET < v <= DISC_OFFSET + len(LEVELS)):
        pix = disc_pixels(labels, disc, mid)
        if len(pix) < 3:
            continue
        idx = canonical_to_stack(view, pix)
        mm = geo.to_patient(idx[:, 0], idx[:, 1], idx[:, 2])
        centre = geo.to_patient(*canonical_to_stack(view, pix.mean(0))[0])
        frame = disc_frame(mm)
        row = {"level": level_of_disc(disc), "x_mm": centre[0], "y_mm": centre[1], "z_mm": centre[2]}
        row.update(dict(zip(FRAME_COLUMNS, frame.ravel())))
        out.append(row)
    return out


# --- the segmenter over every sagittal stack ----------------------------------------------------------
def segmenter_id(location: Path) -> str:
    """What a spider run's models are: its folder and every checkpoint's name, size and time."""
    files = sorted((Path(location) / "models" / "spider" / "segmenter").glob("*.pt"))
    return fingerprint(
        str(Path(location).resolve()), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    )


def segment_stacks(cfg, paths: Paths, items: list, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Segment every item's stack with the spider run ``localize.segmenter``: (anchors, measurements,
    report). Resumable: both tables are kept while the segmenter, the cache and the items are the same.

    A stack that fails (unreadable cache file, no disc found) is a logged, counted skip. A study is
    measured on its Sagittal T2/STIR stack, else (no T2, nothing measurable, or no level name left to it
    after ``reconcile_stacks``) its T1 stack, whose masks are then made again.
    """
    location = Path(cfg.localize.segmenter)
    anchors_csv, meas_csv = anchors_path(out_dir), measurements_path(out_dir)
    key = fingerprint(
        ANCHORS_VERSION,
        segmenter_id(location),
        paths.cache_source.read_text(),
        [[str(it.study_id), str(it.series_id), int(it.stack), it.description] for it in items],
    )
    if is_current(anchors_csv, key) and meas_csv.exists():
        log.info("mask anchors exist for this segmenter and cache, reused")
        report = json.loads(anchors_csv.with_suffix(".json").read_text())
        return pd.read_csv(anchors_csv), pd.read_csv(meas_csv), report
    seg = StackSegmenter(cfg, paths)
    anchors, meas, failed, broken, seconds = [], {}, {}, {}, []
    order = sorted(items, key=lambda it: it.description != "Sagittal T2/STIR")  # T2 first: it is measured
    for it in tqdm(order, desc="segment stacks", leave=False, dynamic_ncols=True):
        t0 = time.perf_counter()
        try:
            labels, info, view, geo, volume = seg.labels(it)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log.warning("segmentation skipped %s: %s", seg.name(it), e)
            failed[seg.name(it)] = f"{type(e).__name__}: {e}"
            continue
        seconds.append(time.perf_counter() - t0)
        if info.get("broken"):
            broken[seg.name(it)] = info.get("reasons", [])
        found = anchors_of(labels, view, geo)
        if not found:
            failed[seg.name(it)] = "no lumbar disc found on the masks"
        anchors += [{**stack_ids(it), **a, "broken": bool(info.get("broken"))} for a in found]
        if it.study_id not in meas and found:
            table = seg.measure(it, labels, view, volume)
            if len(table):
                meas[it.study_id] = table
    anchors_df = reconcile_stacks(pd.DataFrame(anchors, columns=[*ANCHOR_COLUMNS, *FRAME_COLUMNS, "broken"]))
    meas_df = measure_studies(seg, order, meas, anchors_df)
    report = {
        "segmenter": str(location),
        "stacks": len(items),
        "stacks_failed": failed,
        "stacks_broken_sequence": len(broken),
        "studies_measured": int(meas_df["study_id"].nunique()),
        "seconds_per_stack": round(float(np.mean(seconds)), 3) if seconds else None,
    }
    save_table(meas_csv, meas_df)
    save_text(anchors_csv.with_suffix(".json"), json.dumps(report, indent=2))
    save_table(anchors_csv, anchors_df)
    mark_current(anchors_csv, key)
    return anchors_df, meas_df, report


def stack_ids(it) -> dict:
    """The identifying columns of a stage-02 stack item."""
    return {
        "study_id": it.study_id,
        "split": it.split,
        "description": it.description,
        "series_id": it.series_id,
        "stack": it.stack,
    }


class StackSegmenter:
    """The spider runners (through the registry) over cached lumbar stacks."""

    def __init__(self, cfg, paths: Paths):
        from spine.registry import get_task

        spider = get_task("spider")
        self.model = spider.runner("load_segmenter")(Path(cfg.localize.segmenter), str(cfg.localize.device))
        self.segment, self._measure = spider.runner("segment_sagittal"), spider.runner("measure")
        self.paths = paths
        self.geos = stack_geometries(pd.read_parquet(paths.instance_table))

    @staticmethod
    def name(it) -> str:
        return f"{it.study_id}/{it.series_id}_{it.stack} ({it.description})"

    def labels(self, it):
        """(SPIDER labels in the canonical layout, spider's instance info, the view, the geometry, the
        canonical volume)."""
        geo = self.geos[(it.study_id, it.series_id, it.stack)]
        vol = np.load(self.paths.cache_dir / it.path).astype(np.float32)
        view = canonical_view(geo, vol.shape)
        volume = np.ascontiguousarray(to_canonical(vol, view))
        labels, info = self.segment(volume, view.spacing, self.model)
        return labels, info, view, geo, volume

    def measure(self, it, labels: np.ndarray, view: CanonicalView, volume: np.ndarray) -> pd.DataFrame:
        """spider's measurement table of one stack's labels (herniation probabilities from the spider
        run's classifiers on ``volume`` when it has them), with the stack's identifying columns."""
        table = self._measure(labels, view.spacing, self.model, volume)
        return table.assign(**stack_ids(it)) if len(table) else table


def measure_studies(seg: StackSegmenter, order: list, meas: dict, anchors: pd.DataFrame) -> pd.DataFrame:
    """Every study's measurements under the reconciled level names: the stack measured first, else the
    study's other stack (segmented again) when the first has no level name left or nothing measurable."""
    out = []
    for study in dict.fromkeys(it.study_id for it in order):
        table = rename_measurements(meas[study], anchors) if study in meas else pd.DataFrame()
        if table.empty:  # rare: segment the study's other stack again rather than keep every mask
            done = meas[study]["description"].iloc[0] if study in meas else None
            for it in (i for i in order if i.study_id == study and i.description != done):
                try:
                    labels, _, view, _, volume = seg.labels(it)
                except (OSError, ValueError, KeyError, RuntimeError):
                    continue  # already named in the report's stacks_failed
                table = rename_measurements(seg.measure(it, labels, view, volume), anchors)
                if len(table):
                    break
        if len(table):
            out.append(table)
    return (
        pd.concat(out, ignore_index=True)[MEASUREMENT_COLUMNS]
        if out
        else pd.DataFrame(columns=MEASUREMENT_COLUMNS)
    )


def anchors_path(folder: Path) -> Path:
    """Disc anchors of every segmented stack (study, series kind, level: position and frame)."""
    return Path(folder) / "mask_anchors.csv"


def measurements_path(folder: Path) -> Path:
    """The spider measurements of every study (one row per study, structure and measurement)."""
    return Path(folder) / "measurements.csv"


def offsets_path(paths: Paths) -> Path:
    """The offsets of each condition's point from its disc anchor, from every train study (stage 06)."""
    return paths.models_dir / "localizer" / "mask_offsets.csv"


# --- anchors -> points ---------------------------------------------------------------------------
def reconcile_stacks(anchors: pd.DataFrame, match_mm: float = 10.0) -> pd.DataFrame:
    """Level names agreed between a study's two sagittal stacks (the same patient space). A missed
    L5/S1 disc shifts a stack's count from the sacrum by one, so the stack whose lowest disc lies lower
    (by more than ``match_mm``; else the one with more discs) names the levels: each disc of the other
    stack takes the level of its disc at the same height and depth within ``match_mm``, and a disc with
    none there is dropped (its level then comes from the naming stack). ``mask_level`` keeps the stack's
    own count."""
    anchors = anchors.assign(mask_level=anchors["level"])
    out = []
    yz = ["y_mm", "z_mm"]  # the stacks lie side by side: compare heights and depths, not sides
    for _, g in anchors.groupby("study_id", sort=False):
        stacks = dict(tuple(g.groupby("description", sort=False)))
        if len(stacks) < 2:
            out.append(g)
            continue
        lowest = {d: a["z_mm"].min() for d, a in stacks.items()}
        ranked = sorted(stacks, key=lambda d: lowest[d])
        if abs(lowest[ranked[0]] - lowest[ranked[1]]) <= match_mm:
            ranked = sorted(stacks, key=lambda d: -len(stacks[d]))
        ref = stacks[ranked[0]]
        out.append(ref)
        for d in ranked[1:]:
            other = stacks[d]
            dist = np.linalg.norm(other[yz].to_numpy(float)[:, None] - ref[yz].to_numpy(float)[None], axis=2)
            near = dist.argmin(1)
            keep = dist[np.arange(len(other)), near] <= match_mm
            out.append(other.assign(level=ref["level"].to_numpy()[near])[keep].drop_duplicates("level"))
    return pd.concat(out, ignore_index=True) if out else anchors


VERTEBRAE = ["L1", "L2", "L3", "L4", "L5"]


def rename_measurements(meas: pd.DataFrame, anchors: pd.DataFrame) -> pd.DataFrame:
    """The measurements of a stack whose levels ``reconcile_stacks`` shifted, renamed by that shift
    (vertebrae and levels; a name shifted past L1 or L5/S1 is dropped, and so are the whole-spine rows,
    measured over other vertebrae than L1-S1); a stack left without any anchor loses its rows."""
    if meas.empty:
        return meas
    a = anchors.assign(
        shift=[LEVELS.index(n) - LEVELS.index(o) for n, o in zip(anchors["level"], anchors["mask_level"])]
    )
    shift = a.groupby(["study_id", "description"])["shift"].median().round().astype(int).to_dict()
    levels = [LEVEL_NAMES[lv] for lv in LEVELS]
    out = []
    for (study, desc), g in meas.groupby(["study_id", "description"], sort=False):
        k = shift.get((study, desc))
        if k is None:
            continue
        if k == 0:
            out.append(g)
            continue
        names = {}
        for seq in (VERTEBRAE, levels):
            names.update({n: seq[i + k] for i, n in enumerate(seq) if 0 <= i + k < len(seq)})
        out.append(g.assign(structure=g["structure"].map(names)).dropna(subset=["structure"]))
    return pd.concat(out, ignore_index=True) if out else meas.iloc[:0]


def condition_anchors(anchors: pd.DataFrame, conditions) -> pd.DataFrame:
    """One anchor per (study, condition, level): from the condition's own series kind, else the other
    sagittal stack's."""
    out = []
    for cond in conditions:
        own = CONDITION_SERIES[cond]
        ranked = anchors.assign(_rank=(anchors["description"] != own).astype(int))
        ranked = ranked.sort_values("_rank", kind="stable").drop_duplicates(["study_id", "level"])
        out.append(ranked.drop(columns="_rank").assign(condition=cond))
    return pd.concat(out, ignore_index=True) if out else anchors.assign(condition=[])


def frames(df: pd.DataFrame) -> np.ndarray:
    """(n, 3, 3) frames (rows lateral, up, ap) of an anchors table."""
    return df[FRAME_COLUMNS].to_numpy(float).reshape(-1, 3, 3)


def fit_offsets(cond_anchors: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Median offset (lateral, up, ap mm) of the labelled points from their anchor, per (condition, level)."""
    key, xyz = ["study_id", "condition", "level"], ["x_mm", "y_mm", "z_mm"]
    m = cond_anchors.merge(labels[key + xyz], on=key, suffixes=("", "_label"))
    cols = ["condition", "level", "d_lateral", "d_up", "d_ap", "n"]
    if m.empty:
        return pd.DataFrame(columns=cols)
    d = m[[c + "_label" for c in xyz]].to_numpy(float) - m[xyz].to_numpy(float)
    local = np.einsum("nij,nj->ni", frames(m), d)
    m = m.assign(d_lateral=local[:, 0], d_up=local[:, 1], d_ap=local[:, 2])
    g = m.groupby(["condition", "level"])
    return g[["d_lateral", "d_up", "d_ap"]].median().assign(n=g.size()).reset_index()[cols]


def mask_points(cond_anchors: pd.DataFrame, offsets: pd.DataFrame, stacks: dict, geos: dict) -> pd.DataFrame:
    """Points-table rows (no source/fold yet) of anchors moved by their offset (none where no training
    label had that level) and placed on the nearest slice of the stack of their condition's series kind
    (``stacks``: (study, description) -> (series_id, stack))."""
    m = cond_anchors.merge(offsets, on=["condition", "level"], how="left")
    local = m[["d_lateral", "d_up", "d_ap"]].fillna(0.0).to_numpy(float)
    xyz = m[["x_mm", "y_mm", "z_mm"]].to_numpy(float) + np.einsum("nij,ni->nj", frames(m), local)
    rows = []
    for r, p in zip(m.itertuples(index=False), xyz):
        where = stacks.get((r.study_id, CONDITION_SERIES[r.condition]))
        if where is None:
            continue
        geo = geos[(r.study_id, *where)]
        index, row, col, _ = geo.to_stack(p)
        placed = geo.to_patient(index, row, col)
        rows.append(
            {
                "study_id": r.study_id,
                "split": r.split,
                "condition": r.condition,
                "level": r.level,
                "series_id": where[0],
                "stack": where[1],
                "index": index,
                "row": row,
                "col": col,
                "x_mm": placed[0],
                "y_mm": placed[1],
                "z_mm": placed[2],
                "confidence": 0.5 if r.broken else 1.0,  # a broken disc sequence names levels less surely
            }
        )
    return pd.DataFrame(rows)


def oof_mask_points(
    cond_anchors: pd.DataFrame,
    labels: pd.DataFrame,
    fold_of: dict,
    folds: list[int],
    stacks: dict,
    geos: dict,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mask points of every train study of ``folds`` (offsets from the other folds' labels: out of fold)
    and of every test study (offsets from every train study); returns (points, the all-train offsets)."""
    fold = cond_anchors["study_id"].map(fold_of)
    train = cond_anchors[cond_anchors["split"] == "train"]
    out = []
    for k in folds:
        rest = labels[labels["study_id"].map(fold_of).ne(k) & labels["study_id"].isin(fold_of)]
        offsets = fit_offsets(train[fold.loc[train.index] != k], rest)
        held = cond_anchors[(cond_anchors["split"] == "train") & (fold == k)]
        out.append(mask_points(held, offsets, stacks, geos).assign(source="oof", fold=k))
    all_offsets = fit_offsets(train, labels)
    test = cond_anchors[cond_anchors["split"] == "test"]
    out.append(mask_points(test, all_offsets, stacks, geos).assign(source="test_mean", fold=-1))
    frames_ = [f for f in out if len(f)]
    return (pd.concat(frames_, ignore_index=True) if frames_ else pd.DataFrame()), all_offsets


# --- combining with the keypoint points ---------------------------------------------------------------
def match_levels(keypoints: pd.DataFrame, masks: pd.DataFrame) -> dict:
    """(study, condition, keypoint level) -> mask level: keypoint and mask points of one study and
    condition matched one to one by least total distance (mm)."""
    xyz = ["x_mm", "y_mm", "z_mm"]
    out = {}
    by_mask = dict(tuple(masks.groupby(["study_id", "condition"]))) if len(masks) else {}
    for (study, cond), kp in keypoints.groupby(["study_id", "condition"]):
        mk = by_mask.get((study, cond))
        if mk is None:
            continue
        cost = np.linalg.norm(kp[xyz].to_numpy(float)[:, None] - mk[xyz].to_numpy(float)[None], axis=2)
        ri, ci = linear_sum_assignment(cost)
        for a, b in zip(ri, ci):
            out[(study, cond, kp["level"].iloc[a])] = mk["level"].iloc[b]
    return out


def rename_levels(points: pd.DataFrame, mapping: dict, canal_of: set | None = None) -> pd.DataFrame:
    """Keypoint rows with their levels renamed by ``mapping``. A row it does not name keeps its level when
    no renamed row took it, else takes a level left free (in position order), so each (study, condition)
    keeps one row per level. Recess rows (conditions in ``canal_of``) follow their study's canal mapping."""
    out = []
    for (study, cond), g in points.groupby(["study_id", "condition"], sort=False):
        src = (study, "spinal_canal_stenosis") if canal_of and cond in canal_of else (study, cond)
        own = list(g["level"])
        new = [mapping.get((*src, lv)) for lv in own]
        taken = {n for n in new if n is not None}
        for i, lv in enumerate(own):
            if new[i] is None and lv not in taken:
                new[i] = lv
                taken.add(lv)
        free = iter(lv for lv in LEVELS if lv not in taken)
        for i in np.argsort(-g["z_mm"].to_numpy(float), kind="stable"):  # superior first, as LEVELS
            if new[i] is None:
                new[i] = next(free, own[i])
        out.append(g.assign(level=new))
    return pd.concat(out, ignore_index=True) if out else points


def combine(
    method: str, keypoints: pd.DataFrame, masks: pd.DataFrame, recess_conditions
) -> tuple[pd.DataFrame, dict]:
    """The points of ``method`` from the keypoint points (all conditions) and the mask points (sagittal
    conditions): ``segmentation`` = mask rows, keypoint rows where the masks give none; ``both`` =
    keypoint positions renamed by the masks. Recess rows follow their canal point's renaming."""
    key = ["study_id", "condition", "level"]
    sagittal = keypoints[~keypoints["condition"].isin(recess_conditions)]
    recess = keypoints[keypoints["condition"].isin(recess_conditions)]
    sure = masks[masks["confidence"] >= 1.0] if len(masks) else masks  # a broken sequence renames nothing
    mapping = match_levels(sagittal, sure)
    renamed = rename_levels(sagittal, mapping)
    recess = rename_levels(recess, mapping, canal_of=set(recess_conditions)) if len(recess) else recess
    if method == "both":
        out = pd.concat([renamed, recess], ignore_index=True)
        return out, {"renamed_levels": _renamed(mapping)}
    have = masks[key] if len(masks) else pd.DataFrame(columns=key)
    fallback = sagittal.merge(have, on=key, how="left", indicator=True)
    fallback = fallback[fallback["_merge"] == "left_only"].drop(columns="_merge")
    cols = list(keypoints.columns)
    mask_rows = masks.reindex(columns=cols) if len(masks) else pd.DataFrame(columns=cols)
    out = pd.concat([mask_rows, fallback[cols], recess], ignore_index=True)
    return out, {"keypoint_fallback_rows": len(fallback), "renamed_levels": _renamed(mapping)}


def _renamed(mapping: dict) -> int:
    """How many keypoint levels the masks renamed."""
    return int(sum(1 for (_, _, lv), new in mapping.items() if lv != new))


def level_name(level: str) -> str:
    """'l4_l5' -> 'L4/L5' (spider's structure names)."""
    return LEVEL_NAMES[level]
