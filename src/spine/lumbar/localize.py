"""Stage 02 (lumbar): find each disc level's canal point (Sagittal T2/STIR) and left/right foramen
points (Sagittal T1) with a keypoint heatmap model, then the left/right lateral recess (subarticular)
points on the Axial T2 series, trained on folds split by study.

One model per fold serves both sagittal series kinds: its heatmap channels are the keypoints of
every kind, and each stack supervises (and is decoded on) its own kind's channels only, so what the
model learns of the spine's levels is shared. Each fold's model predicts its held-out train studies
(every train prediction is out-of-fold) and every test study (the test prediction is the fold mean).
The result is one points table (``spine.lumbar.points.POINT_COLUMNS``) and a report of the localization
error in mm against the labelled points, beside a baseline of mean relative positions per level.

The recesses (``localize.axial``): a fold's canal point of each level is projected into the axial
stacks (the nearest slice plane, as stage 03 does) and a patch of ``axial.size_mm``² mm around it (the
slice and its two neighbours as channels, laid out canonically) goes through a second heatmap model
with one channel per side. It trains on patches centred on the labelled canal points, moved at random
by up to ``axial.jitter_mm`` (the sagittal model's error), with the labelled recess points as targets,
and predicts at the fold's own canal points: OOF for the held-out studies, and for every test study
(the fold mean, taken on the stack most folds chose). Its report puts the recess error beside the fixed
lateral offset stage 03 falls back to (``crop.recess_offset_mm``), on the same rows.

``localize.method`` segmentation / both (``spine.lumbar.levels_from_masks``): a spider run's segmenter
(``localize.segmenter``, reached through the registry) segments every sagittal stack; ``segmentation``
places each level's point at its disc's anchor on the masks plus the labels' out-of-fold median offset,
``both`` keeps the keypoint positions under the masks' level names. The keypoint model still runs (its
points fill what the masks miss), and the report puts every method's OOF error side by side; the spider
measurements of every study go to ``localize/lumbar/measurements.csv``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from spine.core import geometry
from spine.core.config import save_config
from spine.core.crops import crop_matrix, crop_slice
from spine.core.folds import fold_checkpoints, fold_key, load_folds, selected_folds
from spine.core.io import fingerprint, is_current, mark_current, save_table, save_text
from spine.core.paths import Paths, require
from spine.core.stacks import stack_geometries
from spine.core.train.loop import TrainSettings, autocast, fit, load_weights, reseed, resolve_device
from spine.core.train.stage import fold_model
from spine.lumbar import levels_from_masks as masks
from spine.lumbar.crops import Plane, nearest_plane, robust_scale, stack_refs
from spine.lumbar.models.heatmap import SliceHeatmapNet, decode_peaks, heatmap_loss, patch_heatmap_loss
from spine.lumbar.points import POINT_COLUMNS, label_points
from spine.lumbar.task import LEVELS, LOCALIZER_TARGETS

log = logging.getLogger(__name__)


MODEL_NAME = "sagittal"
# (description, condition, level) of each heatmap channel
CHANNELS = [(d, c, lv) for d, conds in LOCALIZER_TARGETS.items() for c in conds for lv in LEVELS]


# Laterality of each channel from its condition: +1 patient left, -1 right, 0 either side.
SIDES = np.array([1 if c.startswith("left") else -1 if c.startswith("right") else 0 for _, c, _ in CHANNELS])


def allowed_slices(lateral: np.ndarray) -> np.ndarray:
    """(D, K): a left structure lies on the stack's patient-left half, a right one on its right half.

    Left and right foramina look alike on sagittal slices; their side is a matter of geometry. The
    halves are split at the stack's centre (sagittal stacks are centred on the spine); the slice at the
    centre belongs to both.
    """
    side = np.sign(np.round(lateral * 50.0, 1))[:, None]  # mm, so a centre slice counts as 0
    return (SIDES[None] == 0) | (side == 0) | (side == SIDES[None])


def channels(description: str) -> list[int]:
    """The heatmap channels a series description supervises and is decoded on."""
    return [k for k, (d, _, _) in enumerate(CHANNELS) if d == description]


@dataclass
class StackItem:
    """One sagittal stack of one study, with its labelled keypoints (NaN where unlabelled)."""

    description: str
    study_id: object
    split: str
    series_id: object
    stack: int
    path: str
    shape: tuple[int, int, int]
    targets: np.ndarray = field(default=None)  # (len(CHANNELS), 3): index, row, col in the cached stack
    lateral: np.ndarray = field(default=None)  # (D,) each slice's offset along patient x (left +), / 50 mm


def stack_items(paths: Paths, description: str, labels: pd.DataFrame | None) -> list[StackItem]:
    """The stack to localize on for every study that has a series of ``description``.

    Where a study has several such series, the one carrying its labels wins, then the longest.
    """
    series = pd.read_parquet(paths.series_table)
    series = series[(series["description"] == description) & (series["status"] == "ok")]
    geos = stack_geometries(pd.read_parquet(paths.instance_table))
    items = []
    for study, g in series.groupby("study_id", sort=False):
        lab = labels[labels["study_id"] == study] if labels is not None else pd.DataFrame()
        labelled = set(lab["series_id"]) if len(lab) else set()
        g = g.assign(_has=g["series_id"].isin(labelled)).sort_values(["_has", "n_slices"], ascending=False)
        row = g.iloc[0]
        targets = np.full((len(CHANNELS), 3), np.nan)
        if len(lab):
            on = lab[(lab["series_id"] == row.series_id) & (lab["stack"] == row.stack)]
            for k in channels(description):
                _, cond, lv = CHANNELS[k]
                hit = on[(on["condition"] == cond) & (on["level"] == lv)]
                if len(hit):
                    targets[k] = hit[["index", "row", "col"]].to_numpy(float)[0]
        items.append(
            StackItem(
                description,
                study,
                row.split,
                row.series_id,
                int(row.stack),
                row.path,
                (int(row.n_slices), int(row.rows), int(row.cols)),
                targets,
                lateral_position(geos[(study, row.series_id, row.stack)]),
            )
        )
    return items


def lateral_position(geo) -> np.ndarray:
    """Each slice's centre along patient x (left is +x in LPS) relative to the stack's, in 50 mm units."""
    x = geo.ipp[:, 0]
    return ((x - x.mean()) / 50.0).astype(np.float32)


class StackDataset(Dataset):
    """A study's stack as (D, 3, S, S): each slice with its two neighbours as channels (2.5D)."""

    def __init__(self, paths: Paths, items: list[StackItem], size: int, stride: int, augment: bool):
        self.paths, self.items, self.size, self.stride = paths, items, size, stride
        self.aug = (
            A.Compose(
                [
                    A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), p=0.8),
                    A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
                    A.RandomGamma((80, 120), p=0.3),
                ],
                keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
            )
            if augment
            else None
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        vol = np.load(self.paths.cache_dir / item.path, mmap_mode="r").astype(np.float32)
        img = normalize(resize_slices(vol, self.size))  # (S, S, D)
        t = to_resized(item.targets, item.shape, self.size)
        if self.aug is not None:
            valid = ~np.isnan(t).any(1)
            out = reseed(self.aug)(image=img, keypoints=t[valid][:, [2, 1]])
            img = out["image"]
            t[valid, 1:] = np.asarray(out["keypoints"])[:, [1, 0]]
        d = img.shape[2]
        idx = np.clip(np.arange(d)[:, None] + [-1, 0, 1], 0, d - 1)
        x = np.ascontiguousarray(img.transpose(2, 0, 1)[idx])  # (D, 3, S, S)
        cells = t.copy()
        cells[:, 1:] = (t[:, 1:] - (self.stride - 1) / 2) / self.stride
        allowed = allowed_slices(item.lateral)
        valid = ~np.isnan(cells).any(1)
        k_bad = [k for k in np.flatnonzero(valid) if not allowed[int(round(cells[k, 0])), k]]
        allowed[:, k_bad] = True  # a label on the other half (an off-centre stack): do not forbid it
        return {
            "x": torch.from_numpy(x),
            "position": torch.from_numpy(item.lateral),
            "allowed": torch.from_numpy(allowed),
            "target": torch.from_numpy(cells).float(),
            "i": i,
        }


def resize_slices(vol: np.ndarray, size: int) -> np.ndarray:
    """(D, H, W) → (size, size, D). One slice at a time: cv2 resizes at most 4 channels at once."""
    out = np.empty((size, size, len(vol)), dtype=np.float32)
    for k, sl in enumerate(vol):
        out[:, :, k] = cv2.resize(
            np.asarray(sl, dtype=np.float32), (size, size), interpolation=cv2.INTER_AREA
        )
    return out


def normalize(img: np.ndarray) -> np.ndarray:
    """Scale by the 99.5th percentile of the stack, so series of any gain look alike."""
    if img.ndim == 2:
        img = img[..., None]
    return np.clip(img / max(float(np.percentile(img, 99.5)), 1e-6), 0, 2).astype(np.float32)


def to_resized(points: np.ndarray, shape: tuple, size: int) -> np.ndarray:
    """(index, row, col) in the cached stack → the resized grid (pixel centres preserved)."""
    out = points.astype(np.float64).copy()
    out[:, 1] = (points[:, 1] + 0.5) * size / shape[1] - 0.5
    out[:, 2] = (points[:, 2] + 0.5) * size / shape[2] - 0.5
    return out


def from_cells(cells: np.ndarray, shape: tuple, size: int, stride: int) -> np.ndarray:
    """Heatmap cells (index, row, col) → the cached stack's (index, row, col)."""
    out = cells.astype(np.float64).copy()
    resized = cells[:, 1:] * stride + (stride - 1) / 2
    out[:, 1] = (resized[:, 0] + 0.5) * shape[1] / size - 0.5
    out[:, 2] = (resized[:, 1] + 0.5) * shape[2] / size - 0.5
    return out


class HeatmapLoss:
    """``loss_fn(model, batch, device)`` for the training loop."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, model, batch, device):
        x = batch["x"].to(device, memory_format=torch.channels_last)
        logits = model(x, batch["position"].to(device))
        return heatmap_loss(logits, batch["target"].to(device), self.sigma, batch["allowed"])


def build_model(lc, n_points: int = len(CHANNELS)) -> SliceHeatmapNet:
    """The heatmap model of a localizer section (``localize``, or ``axial_section``'s merge)."""
    return SliceHeatmapNet(
        lc.backbone,
        n_points,
        in_chans=3,
        decoder_channels=lc.decoder_channels,
        checkpoint=lc.checkpoint,
        stride=lc.heatmap_stride,
    )


@torch.no_grad()
def predict_items(model, paths: Paths, items: list[StackItem], size: int, device, amp: bool) -> list:
    """(coords in the cached stack (K, 3), confidence (K,)) for each item, over all channels."""
    ds = StackDataset(paths, items, size, model.stride, augment=False)
    out = []
    for i in range(len(ds)):
        with autocast(device, amp):
            item = ds[i]
            logits = model(
                item["x"].to(device, memory_format=torch.channels_last), item["position"].to(device)
            )
        cells, conf = decode_peaks(logits.float().cpu(), allowed=item["allowed"])
        out.append((from_cells(cells.numpy(), items[i].shape, size, model.stride), conf.numpy()))
    return out


MASK_KEYS = ("method", "segmenter")  # how stage 02 uses a spider segmenter (levels_from_masks)


def sagittal_section(lc) -> dict:
    """The sagittal model's settings: ``localize`` less its ``axial`` part and the mask keys (which it
    does not read, so changing the recess model or the method never retrains the sagittal one)."""
    section = OmegaConf.to_container(lc, resolve=True)
    for k in ("axial", *MASK_KEYS):
        section.pop(k, None)
    return section


def localizer_key(cfg, paths: Paths) -> str:
    """What a fold's model and predictions are made from: the folds, the stage's config (less run-only
    keys such as ``localize.folds``), the seed and the cache."""
    return fold_key(
        sagittal_section(cfg.localize), paths.folds.read_text(), cfg.seed, paths.cache_source.read_text()
    )


def train_fold(cfg, paths: Paths, items: list[StackItem], fold_of: dict, fold: int) -> None:
    """Train one fold's model and write its predictions (held-out train studies + all test studies)."""
    lc = cfg.localize
    key = localizer_key(cfg, paths)
    device = resolve_device(lc.device)
    train = [
        it
        for it in items
        if it.split == "train" and fold_of.get(it.study_id) != fold and not np.isnan(it.targets).all()
    ]
    ckpt = paths.localizer_checkpoint(MODEL_NAME, fold, cfg.seed)

    def fit_fold(model):
        loader = DataLoader(
            StackDataset(paths, train, lc.image_size, lc.heatmap_stride, augment=True),
            batch_size=None,
            shuffle=True,
            num_workers=lc.loader_workers,
            persistent_workers=lc.loader_workers > 0,
        )
        settings = TrainSettings.from_config(lc, cfg.seed + fold, accumulate=lc.batch_studies)
        return fit(model, loader, HeatmapLoss(lc.heatmap_sigma), settings, ckpt, device, f"fold {fold}")

    model, _ = fold_model(ckpt, key, cfg.seed + fold, lambda: build_model(lc), fit_fold, device)
    targets = [it for it in items if it.split == "test" or fold_of.get(it.study_id) == fold]
    rows = prediction_rows(targets, predict_items(model, paths, targets, lc.image_size, device, lc.amp), fold)
    save_table(paths.localizer_predictions(MODEL_NAME, fold), pd.DataFrame(rows, columns=PREDICTION_COLUMNS))
    mark_current(paths.localizer_predictions(MODEL_NAME, fold), key)


PREDICTION_COLUMNS = [c for c in POINT_COLUMNS if c not in ("x_mm", "y_mm", "z_mm")]  # a fold's table


def prediction_rows(items: list[StackItem], predictions: list, fold: int) -> list[dict]:
    """One row per (item, channel) with the point in the cached stack and its confidence."""
    rows = []
    for it, (coords, conf) in zip(items, predictions):
        for k in channels(it.description):
            _, cond, lv = CHANNELS[k]
            rows.append(
                {
                    "study_id": it.study_id,
                    "split": it.split,
                    "condition": cond,
                    "level": lv,
                    "series_id": it.series_id,
                    "stack": it.stack,
                    "index": coords[k, 0],
                    "row": coords[k, 1],
                    "col": coords[k, 2],
                    "confidence": float(conf[k]),
                    "source": "oof" if it.split == "train" else "test_fold",
                    "fold": fold,
                }
            )
    return rows


def assemble_points(paths: Paths, folds: list[int]) -> pd.DataFrame:
    """OOF rows for train studies, fold-mean rows for test studies, placed in patient mm."""
    df = pd.concat(
        [pd.read_csv(paths.localizer_predictions(MODEL_NAME, f)) for f in folds], ignore_index=True
    )
    return fold_mean_points(paths, df)


def modal_stack(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each (study, condition, level) on the stack most of its rows chose (ties: the first).

    The folds' recess models each start from their own canal point, so two folds may pick slices of
    different tilted blocks; their positions can only be averaged within one stack.
    """
    row_key = ["study_id", "condition", "level"]
    votes = df.groupby([*row_key, "series_id", "stack"], sort=False).size().rename("_n").reset_index()
    best = votes.sort_values("_n", ascending=False, kind="stable").drop_duplicates(row_key)
    return df.merge(best[[*row_key, "series_id", "stack"]], on=[*row_key, "series_id", "stack"])


def fold_mean_points(paths: Paths, df: pd.DataFrame) -> pd.DataFrame:
    """Train rows as they are (OOF); test rows averaged over the folds' models (on the stack most folds
    chose); placed in patient mm."""
    train = df[df["split"] == "train"]
    key = ["study_id", "split", "condition", "level", "series_id", "stack"]
    test = (
        modal_stack(df[df["split"] == "test"])
        .groupby(key, as_index=False)[["index", "row", "col", "confidence"]]
        .mean()
        .assign(source="test_mean", fold=-1)
    )
    pts = pd.concat([train, test], ignore_index=True)
    return place_points(paths, pts)[POINT_COLUMNS]


def place_points(paths: Paths, pts: pd.DataFrame) -> pd.DataFrame:
    """Add x_mm, y_mm, z_mm from (series, stack, index, row, col) through the cached geometry."""
    geos = stack_geometries(pd.read_parquet(paths.instance_table))
    xyz = np.array(
        [
            geos[(r.study_id, r.series_id, r.stack)].to_patient(r.index, r.row, r.col)
            for r in pts.itertuples(index=False)
        ]
    ).reshape(-1, 3)
    return pts.assign(x_mm=xyz[:, 0], y_mm=xyz[:, 1], z_mm=xyz[:, 2])


def baseline_points(paths: Paths, items: list[StackItem], fold_of: dict, folds: list[int]) -> pd.DataFrame:
    """Trivial baseline: per channel, the mean relative (index, row, col) of the training folds'
    labelled points, placed on each held-out stack by its size. Out-of-fold like the model."""
    scale = {id(it): (np.array(it.shape) - [1, 0, 0]).clip(min=1) for it in items}
    rows = []
    for fold in folds:
        rel = [
            it.targets / scale[id(it)]
            for it in items
            if it.split == "train" and fold_of.get(it.study_id) != fold
        ]
        mean = np.nanmean(rel, axis=0)
        for it in items:
            if it.split == "train" and fold_of.get(it.study_id) == fold:
                pts = mean * scale[id(it)]
                for k in channels(it.description):
                    rows.append(
                        {
                            "study_id": it.study_id,
                            "condition": CHANNELS[k][1],
                            "level": CHANNELS[k][2],
                            "series_id": it.series_id,
                            "stack": it.stack,
                            "index": pts[k, 0],
                            "row": pts[k, 1],
                            "col": pts[k, 2],
                        }
                    )
    return place_points(paths, pd.DataFrame(rows))


def error_stats(e) -> dict:
    """n, median, p90 and the shares within 5 and 10 mm of point errors ``e`` (mm); {n: 0} if none."""
    e = np.asarray(e, dtype=float)
    if not len(e):
        return {"n": 0}
    return {
        "n": int(len(e)),
        "median_mm": round(float(np.median(e)), 2),
        "p90_mm": round(float(np.percentile(e, 90)), 2),
        "within_5mm": round(float((e <= 5).mean()), 3),
        "within_10mm": round(float((e <= 10).mean()), 3),
    }


def error_report(pred: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """Localization error (mm) and level-assignment accuracy of predictions against labelled points."""
    key = ["study_id", "condition", "level"]
    m = labels[key + ["x_mm", "y_mm", "z_mm"]].merge(
        pred[key + ["x_mm", "y_mm", "z_mm"]], on=key, suffixes=("", "_p")
    )
    err = np.linalg.norm(
        m[["x_mm", "y_mm", "z_mm"]].to_numpy() - m[["x_mm_p", "y_mm_p", "z_mm_p"]].to_numpy(), axis=1
    )
    m["err"] = err
    stats = error_stats

    # level assignment: the predicted point (same study and condition) nearest each labelled point
    correct = []
    for (_, _), g in m.groupby(["study_id", "condition"]):
        p = g[["x_mm_p", "y_mm_p", "z_mm_p"]].to_numpy()
        for _, r in g.iterrows():
            nearest = np.argmin(np.linalg.norm(p - r[["x_mm", "y_mm", "z_mm"]].to_numpy(float), axis=1))
            correct.append(g["level"].iloc[nearest] == r["level"])
    return {
        "all": stats(err),
        "level_assignment_accuracy": round(float(np.mean(correct)), 3),
        "per_level": {lv: stats(g["err"].to_numpy()) for lv, g in m.groupby("level")},
        "per_condition": {c: stats(g["err"].to_numpy()) for c, g in m.groupby("condition")},
    }


# =============================================================================================
# The lateral recesses on Axial T2
# =============================================================================================

AXIAL_MODEL = "axial"
AXIAL_SERIES = "Axial T2"
SPINAL = "spinal_canal_stenosis"
RECESS_CONDITIONS = ["left_subarticular_stenosis", "right_subarticular_stenosis"]  # heatmap channels
RECESS_SIDE = np.array([1.0, -1.0])  # patient x of each channel's recess from the canal (left is +x)
PATCH_SLICES = (-1, 0, 1)  # the chosen slice and its neighbours, as channels


def axial_section(lc):
    """The recess model's settings: every ``localize`` key, with ``localize.axial`` on top."""
    section = sagittal_section(lc)
    section.update(OmegaConf.to_container(lc.axial, resolve=True))
    return OmegaConf.create(section)


def axial_enabled(cfg) -> bool:
    """Whether stage 02 localizes the recesses (``localize.axial.enabled``)."""
    return "axial" in cfg.localize and bool(cfg.localize.axial.enabled)


def recess_model_key(cfg, paths: Paths) -> str:
    """What a fold's recess model is made from: its settings, the folds, the seed and the cache (it
    trains on labelled points only, so the sagittal model does not enter)."""
    ac = OmegaConf.to_container(axial_section(cfg.localize), resolve=True)
    return fold_key(ac, paths.folds.read_text(), cfg.seed, paths.cache_source.read_text(), AXIAL_MODEL)


def recess_key(cfg, paths: Paths) -> str:
    """What a fold's recess predictions are made from: its model, and the sagittal fold's canal points."""
    return fingerprint(recess_model_key(cfg, paths), localizer_key(cfg, paths))


@dataclass
class RecessItem:
    """One (study, level): the axial slice nearest its canal point, and the labelled recesses there."""

    study_id: object
    split: str
    level: str
    plane: Plane  # the slice and the canal point's projection on it (source row, col)
    targets: np.ndarray  # (2, 2): source (row, col) of the left / right recess on that slice, NaN if none


def axial_refs(paths: Paths) -> dict:
    """study_id → the study's cached Axial T2 stacks (``StackRef``), from the stage-01 tables."""
    series = pd.read_parquet(paths.series_table)
    inst = pd.read_parquet(paths.instance_table)
    ok = series[(series["status"] == "ok") & (series["stack"] >= 0) & (series["description"] == AXIAL_SERIES)]
    inst = inst[(inst["status"] == "ok") & inst["study_id"].isin(ok["study_id"])]
    by_inst = dict(tuple(inst.groupby("study_id")))
    return {
        study: stack_refs(g, by_inst.get(study, inst.iloc[:0])).get(AXIAL_SERIES, [])
        for study, g in ok.groupby("study_id")
    }


def recess_items(refs: dict, centres: pd.DataFrame, labels: pd.DataFrame | None = None) -> list[RecessItem]:
    """One item per canal point of ``centres`` (study_id, split, level, x_mm, y_mm, z_mm) whose nearest
    axial plane shows it; with ``labels`` (a points table), the labelled recesses projected on that plane.
    """
    recess = {}
    if labels is not None:
        lab = labels[labels["condition"].isin(RECESS_CONDITIONS)]
        recess = {(r.study_id, r.condition, r.level): (r.x_mm, r.y_mm, r.z_mm) for r in lab.itertuples()}
    items = []
    for r in centres.itertuples(index=False):
        plane = nearest_plane([r.x_mm, r.y_mm, r.z_mm], refs.get(r.study_id, []))
        if plane is None or not plane.inside:  # no axial series, or none covers this level
            continue
        g, k = plane.ref.geo, plane.index
        targets = np.full((2, 2), np.nan)
        for j, cond in enumerate(RECESS_CONDITIONS):
            xyz = recess.get((r.study_id, cond, r.level))
            if xyz is not None:
                row, col, _ = geometry.patient_to_pixel(
                    np.asarray(xyz, float), g.ipp[k], g.iop[k], g.spacing[k]
                )
                targets[j] = row, col
        items.append(RecessItem(r.study_id, r.split, r.level, plane, targets))
    return items


def to_patch(m: np.ndarray, row_col: np.ndarray) -> np.ndarray:
    """Source (row, col) points (n, 2) → patch (row, col) through the inverse of crop matrix ``m``."""
    a, b = m[:, :2], m[:, 2]
    ji = np.linalg.solve(a, (row_col[:, ::-1] - b).T).T  # (x=j, y=i)
    return ji[:, ::-1]


def from_patch(m: np.ndarray, row_col: np.ndarray) -> np.ndarray:
    """Patch (row, col) points (n, 2) → source (row, col) through crop matrix ``m``."""
    xy = row_col[:, ::-1] @ m[:, :2].T + m[:, 2]
    return xy[:, ::-1]


class RecessDataset(Dataset):
    """Patches (3, P, P) around each item's canal projection, with (2, 3) heatmap-cell targets."""

    def __init__(self, paths: Paths, items: list[RecessItem], ac, stride: int, augment: bool):
        self.paths, self.items, self.ac, self.stride, self.augment = paths, items, ac, stride, augment
        self.scales: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.items)

    def patch(self, i: int, shift_mm=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
        """The item's patch (3, P, P), centred ``shift_mm`` (row, col) off the canal projection, and its
        crop matrix (patch pixel → source pixel)."""
        item, ac = self.items[i], self.ac
        ref, k = item.plane.ref, item.plane.index
        vol = np.load(self.paths.cache_dir / ref.path, mmap_mode="r")
        if ref.path not in self.scales:
            self.scales[ref.path] = robust_scale(vol)
        spacing, iop = ref.geo.spacing[k], ref.geo.iop[k]
        row = item.plane.row + shift_mm[0] / spacing[0]
        col = item.plane.col + shift_mm[1] / spacing[1]
        idx = np.clip(k + np.array(PATCH_SLICES), 0, len(vol) - 1)
        x = np.stack([crop_slice(vol[j], row, col, spacing, ac.size_mm, ac.pixels, iop) for j in idx])
        m = crop_matrix(row, col, spacing, ac.size_mm, ac.pixels, iop)
        return np.clip(x / self.scales[ref.path], 0, 2).astype(np.float32), m

    def __getitem__(self, i: int) -> dict:
        shift, gain = (0.0, 0.0), 1.0
        if self.augment:  # torch's generator: seeded by the training loop, so runs repeat
            u = torch.rand(3).numpy()
            shift = (2 * u[:2] - 1) * float(self.ac.jitter_mm)
            gain = 0.8 + 0.4 * float(u[2])
        x, m = self.patch(i, shift)
        target = np.full((2, 3), np.nan)
        target[:, 0] = 0.0
        target[:, 1:] = (to_patch(m, self.items[i].targets) - (self.stride - 1) / 2) / self.stride
        target[np.isnan(target[:, 1:]).any(1)] = np.nan
        return {"x": torch.from_numpy(x * gain), "target": torch.from_numpy(target).float()}


class RecessLoss:
    """``loss_fn(model, batch, device)`` for the training loop: one heatmap per patch."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, model, batch, device):
        logits = model(batch["x"].to(device, memory_format=torch.channels_last))
        return patch_heatmap_loss(logits, batch["target"].to(device), self.sigma)


@torch.no_grad()
def predict_recesses(model, paths: Paths, items: list[RecessItem], ac, device) -> list[dict]:
    """Points-table rows (no mm yet) of both recesses of every item, on its chosen slice."""
    model.eval()
    ds = RecessDataset(paths, items, ac, model.stride, augment=False)
    rows = []
    for i, item in enumerate(items):
        x, m = ds.patch(i)
        with autocast(device, ac.amp):
            logits = model(torch.from_numpy(x)[None].to(device, memory_format=torch.channels_last))
        cells, conf = decode_peaks(logits.float().cpu())
        px = cells.numpy()[:, 1:] * model.stride + (model.stride - 1) / 2
        src = from_patch(m, px)
        for j, cond in enumerate(RECESS_CONDITIONS):
            rows.append(
                {
                    "study_id": item.study_id,
                    "split": item.split,
                    "condition": cond,
                    "level": item.level,
                    "series_id": item.plane.ref.series_id,
                    "stack": item.plane.ref.stack,
                    "index": float(item.plane.index),
                    "row": float(src[j, 0]),
                    "col": float(src[j, 1]),
                    "confidence": float(conf[j]),
                }
            )
    return rows


def fold_canal_points(paths: Paths, rows: pd.DataFrame) -> pd.DataFrame:
    """The canal points of one fold's sagittal prediction rows, placed in patient mm."""
    canal = rows[rows["condition"] == SPINAL]
    return place_points(paths, canal) if len(canal) else canal.assign(x_mm=[], y_mm=[], z_mm=[])


def recess_rows(model, paths: Paths, refs: dict, sagittal_rows: pd.DataFrame, ac, device, fold: int):
    """One fold's recess predictions at that fold's own canal points (held-out train and test)."""
    items = recess_items(refs, fold_canal_points(paths, sagittal_rows))
    rows = pd.DataFrame(predict_recesses(model, paths, items, ac, device), columns=PREDICTION_COLUMNS)
    source = np.where(rows["split"] == "train", "oof", "test_fold")
    return rows.assign(source=source, fold=fold)


def train_recess_fold(cfg, paths: Paths, refs: dict, labels: pd.DataFrame, fold_of: dict, fold: int) -> None:
    """Train one fold's recess model (or load it) and write its predictions."""
    ac = axial_section(cfg.localize)
    device = resolve_device(ac.device)
    canal = labels[(labels["condition"] == SPINAL) & (labels["study_id"].map(fold_of) != fold)]
    train = [it for it in recess_items(refs, canal, labels) if not np.isnan(it.targets).all()]
    ckpt = paths.localizer_checkpoint(AXIAL_MODEL, fold, cfg.seed)

    def fit_fold(model):
        loader = DataLoader(
            RecessDataset(paths, train, ac, ac.heatmap_stride, augment=True),
            batch_size=int(ac.batch_size),
            shuffle=True,
            num_workers=ac.loader_workers,
            persistent_workers=ac.loader_workers > 0,
        )
        settings = TrainSettings.from_config(ac, cfg.seed + fold)
        return fit(model, loader, RecessLoss(ac.heatmap_sigma), settings, ckpt, device, f"recess fold {fold}")

    key = recess_model_key(cfg, paths)
    build = lambda: build_model(ac, len(RECESS_CONDITIONS))
    model, _ = fold_model(ckpt, key, cfg.seed + fold, build, fit_fold, device)
    sagittal = pd.read_csv(paths.localizer_predictions(MODEL_NAME, fold))
    out = paths.localizer_predictions(AXIAL_MODEL, fold)
    save_table(out, recess_rows(model, paths, refs, sagittal, ac, device, fold))
    mark_current(out, recess_key(cfg, paths))


def fixed_offset_points(canal: pd.DataFrame, offset_mm: float) -> pd.DataFrame:
    """Stage 03's fallback recess points: each canal point moved ``offset_mm`` along patient x."""
    out = []
    for cond, side in zip(RECESS_CONDITIONS, RECESS_SIDE):
        out.append(canal.assign(condition=cond, x_mm=canal["x_mm"] + side * offset_mm))
    return pd.concat(out, ignore_index=True)


def recess_report(pred: pd.DataFrame, canal: pd.DataFrame, labels: pd.DataFrame, offset_mm: float, truth):
    """Recess error (mm) of the model beside the fixed lateral offset, on the same rows: against the
    labelled points and, on generated data, the generator's true points."""
    key = ["study_id", "condition", "level"]
    xyz = ["x_mm", "y_mm", "z_mm"]
    both = pred[key + xyz].merge(
        fixed_offset_points(canal, offset_mm)[key + xyz], on=key, suffixes=("", "_b")
    )
    out = {"fixed_offset_mm": offset_mm}
    refs = {"labels": labels[labels["condition"].isin(RECESS_CONDITIONS)]}
    if truth is not None:
        refs["truth"] = truth[truth["condition"].isin(RECESS_CONDITIONS)]
    for name, ref in refs.items():
        m = both.merge(ref[key + xyz], on=key, suffixes=("", "_r"))
        r = m[[c + "_r" for c in xyz]].to_numpy()
        out[f"vs_{name}"] = {
            "model": error_stats(np.linalg.norm(m[xyz].to_numpy() - r, axis=1)),
            "fixed_offset": error_stats(np.linalg.norm(m[[c + "_b" for c in xyz]].to_numpy() - r, axis=1)),
        }
    return out


def _truth_points(paths: Paths) -> pd.DataFrame | None:
    """The generator's true points (generated data only; the report alone reads them)."""
    path = paths.truth_dir / "points.csv"
    return pd.read_csv(path) if path.exists() else None


def run_recesses(cfg, paths: Paths, labels: pd.DataFrame, fold_of: dict, folds: list[int]) -> pd.DataFrame:
    """The recess model of every selected fold (resumable per fold); returns all folds' rows."""
    refs = axial_refs(paths)
    key = recess_key(cfg, paths)
    for fold in folds:
        if is_current(paths.localizer_predictions(AXIAL_MODEL, fold), key):
            log.info("recess fold %d: predictions exist, skipped", fold)
            continue
        train_recess_fold(cfg, paths, refs, labels, fold_of, fold)
    return pd.concat(
        [pd.read_csv(paths.localizer_predictions(AXIAL_MODEL, f)) for f in folds], ignore_index=True
    )


def run_localize(cfg) -> dict:
    """Stage 02: one model per fold, resumable per fold (then the recess model per fold). Returns the
    report."""
    paths = Paths.from_config(cfg)
    folds_df = load_folds(cfg)
    fold_of = dict(zip(folds_df["study_id"], folds_df["fold"]))
    folds = selected_folds(cfg, cfg.localize)
    labels = label_points(paths.data_dir, pd.read_parquet(require(paths.instance_table, "01_preprocess")))
    items = [it for d in LOCALIZER_TARGETS for it in stack_items(paths, d, labels)]
    for fold in folds:
        if is_current(paths.localizer_predictions(MODEL_NAME, fold), localizer_key(cfg, paths)):
            log.info("fold %d: predictions exist, skipped", fold)
            continue
        train_fold(cfg, paths, items, fold_of, fold)
    rows = [pd.read_csv(paths.localizer_predictions(MODEL_NAME, f)) for f in folds]
    if axial_enabled(cfg):
        rows.append(run_recesses(cfg, paths, labels, fold_of, folds))
    points = fold_mean_points(paths, pd.concat(rows, ignore_index=True))
    methods = None
    if localize_method(cfg) != "keypoints":
        points, methods = mask_method(cfg, paths, items, labels, points, fold_of, folds)
    save_table(paths.points, points)
    oof = points[points["source"] == "oof"]
    sagittal_oof = oof[~oof["condition"].isin(RECESS_CONDITIONS)]
    report = {
        "method": localize_method(cfg),
        "model": error_report(sagittal_oof, labels),
        "baseline_mean_position": error_report(baseline_points(paths, items, fold_of, folds), labels),
        "studies": {
            "train_oof": int(oof["study_id"].nunique()),
            "test": int(points.loc[points["split"] == "test", "study_id"].nunique()),
        },
        "folds": folds,
        "label_points_dropped": labels.attrs.get("dropped", 0),
    }
    if axial_enabled(cfg):
        recess = oof[oof["condition"].isin(RECESS_CONDITIONS)]
        canal = sagittal_oof[sagittal_oof["condition"] == SPINAL]
        offset = float(cfg.crop.recess_offset_mm)
        report["recess"] = recess_report(recess, canal, labels, offset, _truth_points(paths))
    if methods is not None:
        report["methods"] = methods
    save_text(paths.localize_report, json.dumps(report, indent=2))
    save_config(cfg, paths.localize_dir)
    return {**report, "summary": _summary(report)}


def localize_method(cfg) -> str:
    """``localize.method``: keypoints (the heatmap model alone), segmentation or both (module
    ``levels_from_masks``)."""
    method = str(cfg.localize.get("method", "keypoints"))
    if method not in masks.METHODS:
        raise ValueError(f"localize.method must be one of {masks.METHODS}, got {method!r}")
    if method != "keypoints" and not cfg.localize.get("segmenter"):
        raise ValueError(f"localize.method={method} needs localize.segmenter (a spider run's out_dir)")
    return method


def sagittal_conditions() -> list[str]:
    """The conditions the sagittal model localizes (canal, left and right foramen)."""
    return [c for conds in LOCALIZER_TARGETS.values() for c in conds]


def mask_method(cfg, paths: Paths, items: list[StackItem], labels, points, fold_of: dict, folds: list[int]):
    """Stage 02 with a spider segmenter: segment every sagittal stack, put each condition's OOF point at
    its disc anchor + offset, and combine with the keypoint ``points`` by ``localize.method``. Returns
    (the method's points, the report of every method side by side on the same OOF rows)."""
    anchors, _, seg_report = masks.segment_stacks(cfg, paths, items, paths.localize_dir)
    geos = stack_geometries(pd.read_parquet(paths.instance_table))
    stacks = {(it.study_id, it.description): (it.series_id, it.stack) for it in items}
    cond = masks.condition_anchors(anchors, sagittal_conditions())
    mask_pts, offsets = masks.oof_mask_points(cond, labels, fold_of, folds, stacks, geos)
    save_table(masks.offsets_path(paths), offsets)
    report = {"segmenter": seg_report, "error_mm": {}}
    chosen = points
    for method in masks.METHODS:
        pts, info = (
            (points, {})
            if method == "keypoints"
            else masks.combine(method, points, mask_pts, RECESS_CONDITIONS)
        )
        pts = pts[POINT_COLUMNS].sort_values(["study_id", "condition", "level"], kind="stable")
        sag = pts[(pts["source"] == "oof") & ~pts["condition"].isin(RECESS_CONDITIONS)]
        report["error_mm"][method] = {**error_report(sag, labels), **info}
        if method == localize_method(cfg):
            chosen = pts.reset_index(drop=True)
    return chosen, report


def predict_test_masks(cfg, paths: Paths, items: list[StackItem], points: pd.DataFrame) -> pd.DataFrame:
    """Stage 06 with ``localize.method`` segmentation / both: the test stacks segmented, each point at its
    disc anchor + the offsets stage 02 fitted on every train study, combined with the keypoint points."""
    anchors, _, _ = masks.segment_stacks(cfg, paths, items, paths.localize_dir)
    geos = stack_geometries(pd.read_parquet(paths.instance_table))
    stacks = {(it.study_id, it.description): (it.series_id, it.stack) for it in items}
    offsets = pd.read_csv(require(masks.offsets_path(paths), "02_localize"))
    cond = masks.condition_anchors(anchors, sagittal_conditions())
    mask_pts = masks.mask_points(cond, offsets, stacks, geos)
    mask_pts = mask_pts.assign(source="test_mean", fold=-1) if len(mask_pts) else mask_pts
    out, _ = masks.combine(localize_method(cfg), points, mask_pts, RECESS_CONDITIONS)
    return out[POINT_COLUMNS].reset_index(drop=True)


def _summary(report: dict) -> dict:
    out = {}
    for name in ("model", "baseline_mean_position"):
        r = report[name]
        out.update({f"{name} {k}": v for k, v in r["all"].items()})
        out[f"{name} level_assignment"] = r["level_assignment_accuracy"]
    out.update({f"model median_mm {lv}": v["median_mm"] for lv, v in report["model"]["per_level"].items()})
    for method, r in report.get("methods", {}).get("error_mm", {}).items():
        a = r["all"]
        out[f"method {method} median/p90 mm, level acc"] = (
            f"{a.get('median_mm')}/{a.get('p90_mm')}, {r['level_assignment_accuracy']} (n {a['n']})"
        )
    for ref in ("labels", "truth"):
        for name, r in report.get("recess", {}).get(f"vs_{ref}", {}).items():
            out[f"recess {name} vs {ref} median/p90 mm"] = (
                f"{r.get('median_mm')}/{r.get('p90_mm')} (n {r['n']})"
            )
    return out


def predict_test(cfg) -> dict:
    """Stage 06's localization: every test stack with every fold's model (read from
    ``models_from``), the fold mean written to this out_dir's points.csv. No training."""
    lc = cfg.localize
    paths = Paths.from_config(cfg)
    device = resolve_device(lc.device)
    require(paths.instance_table, "01_preprocess")
    items = [it for d in LOCALIZER_TARGETS for it in stack_items(paths, d, None) if it.split == "test"]
    folds = selected_folds(cfg, lc)
    ckpts = fold_checkpoints(
        lambda f: paths.localizer_checkpoint(MODEL_NAME, f, cfg.seed), folds, "02_localize", "localizer"
    )
    recess = {}
    if axial_enabled(cfg):
        ac, refs = axial_section(lc), axial_refs(paths)
        recess = dict(
            zip(
                folds,
                fold_checkpoints(
                    lambda f: paths.localizer_checkpoint(AXIAL_MODEL, f, cfg.seed),
                    folds,
                    "02_localize",
                    "recess",
                ),
            )
        )
    rows = []
    for fold, ckpt in zip(folds, ckpts):
        model = load_weights(build_model(lc), ckpt, device)
        preds = predict_items(model, paths, items, lc.image_size, device, lc.amp)
        rows.append(pd.DataFrame(prediction_rows(items, preds, fold), columns=PREDICTION_COLUMNS))
        if fold in recess:
            axial_model = load_weights(build_model(ac, len(RECESS_CONDITIONS)), recess[fold], device)
            rows.append(recess_rows(axial_model, paths, refs, rows[-1], ac, device, fold))
    points = fold_mean_points(paths, pd.concat(rows, ignore_index=True))
    if localize_method(cfg) != "keypoints":
        points = predict_test_masks(cfg, paths, items, points)
    save_table(paths.points, points)
    return {"stacks": len(items), "studies": int(points["study_id"].nunique()), "folds": folds}
