"""Stage 02 (lumbar): find each disc level's canal point (Sagittal T2/STIR) and left/right foramen
points (Sagittal T1) with a keypoint heatmap model, trained on folds split by study.

One model per fold serves both sagittal series kinds: its heatmap channels are the keypoints of
every kind, and each stack supervises (and is decoded on) its own kind's channels only, so what the
model learns of the spine's levels is shared. Each fold's model predicts its held-out train studies
(every train prediction is out-of-fold) and every test study (the test prediction is the fold mean).
The result is one points table (``spine.lumbar.points.POINT_COLUMNS``) and a report of the localization
error in mm against the labelled points, beside a baseline of mean relative positions per level.
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
from torch.utils.data import DataLoader, Dataset

from spine.core.config import save_config
from spine.core.folds import fold_checkpoints, fold_key, load_folds, selected_folds
from spine.core.io import is_current, mark_current, save_table, save_text
from spine.core.paths import Paths, require
from spine.core.stacks import stack_geometries
from spine.core.train.loop import TrainSettings, autocast, fit, load_weights, reseed, resolve_device
from spine.core.train.stage import fold_model
from spine.lumbar.models.heatmap import SliceHeatmapNet, decode_peaks, heatmap_loss
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


def build_model(lc) -> SliceHeatmapNet:
    return SliceHeatmapNet(
        lc.backbone,
        len(CHANNELS),
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


def localizer_key(cfg, paths: Paths) -> str:
    """What a fold's model and predictions are made from: the folds, the stage's config (less run-only
    keys such as ``localize.folds``), the seed and the cache."""
    return fold_key(cfg.localize, paths.folds.read_text(), cfg.seed, paths.cache_source.read_text())


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
    save_table(paths.localizer_predictions(MODEL_NAME, fold), pd.DataFrame(rows))
    mark_current(paths.localizer_predictions(MODEL_NAME, fold), key)


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


def fold_mean_points(paths: Paths, df: pd.DataFrame) -> pd.DataFrame:
    """Train rows as they are (OOF); test rows averaged over the folds' models; placed in patient mm."""
    train = df[df["split"] == "train"]
    key = ["study_id", "split", "condition", "level", "series_id", "stack"]
    test = (
        df[df["split"] == "test"]
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

    def stats(e):
        return {
            "n": int(len(e)),
            "median_mm": round(float(np.median(e)), 2),
            "p90_mm": round(float(np.percentile(e, 90)), 2),
            "within_5mm": round(float((e <= 5).mean()), 3),
            "within_10mm": round(float((e <= 10).mean()), 3),
        }

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


def run_localize(cfg) -> dict:
    """Stage 02: one model per fold, resumable per fold. Returns the report."""
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
    points = assemble_points(paths, folds)
    save_table(paths.points, points)
    oof = points[points["source"] == "oof"]
    report = {
        "model": error_report(oof, labels),
        "baseline_mean_position": error_report(baseline_points(paths, items, fold_of, folds), labels),
        "studies": {
            "train_oof": int(oof["study_id"].nunique()),
            "test": int(points.loc[points["split"] == "test", "study_id"].nunique()),
        },
        "folds": folds,
        "label_points_dropped": labels.attrs.get("dropped", 0),
    }
    save_text(paths.localize_report, json.dumps(report, indent=2))
    save_config(cfg, paths.localize_dir)
    return {**report, "summary": _summary(report)}


def _summary(report: dict) -> dict:
    out = {}
    for name in ("model", "baseline_mean_position"):
        r = report[name]
        out.update({f"{name} {k}": v for k, v in r["all"].items()})
        out[f"{name} level_assignment"] = r["level_assignment_accuracy"]
    out.update({f"model median_mm {lv}": v["median_mm"] for lv, v in report["model"]["per_level"].items()})
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
    rows = []
    ckpts = fold_checkpoints(
        lambda f: paths.localizer_checkpoint(MODEL_NAME, f, cfg.seed), folds, "02_localize", "localizer"
    )
    for fold, ckpt in zip(folds, ckpts):
        model = load_weights(build_model(lc), ckpt, device)
        preds = predict_items(model, paths, items, lc.image_size, device, lc.amp)
        rows += prediction_rows(items, preds, fold)
    points = fold_mean_points(paths, pd.DataFrame(rows)) if rows else pd.DataFrame(columns=POINT_COLUMNS)
    save_table(paths.points, points)
    return {"stacks": len(items), "studies": int(points["study_id"].nunique()), "folds": folds}
