"""Stage 02 (scoliosis): the landmark model on image folds, with out-of-fold landmarks and angles.

The folds are the shared ones (``spine.core.folds.load_folds`` over ``ScoliosisTask.fold_strata``: one
group per image, balanced on the binned main thoracic angle). The model of fold k (``VertebraNet``,
settings in the config's ``train`` section: this task's only trained model) trains on the readable
images of the other folds and predicts its own: every training image gets out-of-fold landmarks. Those
turn into Cobb angles with the challenge's routine (``spine.scoliosis.cobb``) in the image's own pixels.

Augmentation (model pixels): a horizontal mirror that swaps left and right corners, a random affine
(scale, rotation, shift), gamma / contrast, an occasional inversion, and noise.

Writes ``models/scoliosis/<exp>/fold{k}_seed{s}.pt``, ``localize/scoliosis/folds/fold{k}.csv`` (one
fold's held-out landmarks; marks the fold done), ``localize/scoliosis/landmarks.csv`` (all OOF
landmarks in pixels with their angles) and ``report.json``: OOF landmark error in pixels and in % of the
image height, OOF SMAPE, each beside a baseline computed out of fold (the other folds' mean angles; their
mean normalized landmarks).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from spine.core.config import save_config
from spine.core.folds import fold_key, load_folds, selected_folds
from spine.core.io import is_current, mark_current, save_table, save_text
from spine.core.paths import Paths, require
from spine.core.train.loop import TrainSettings, autocast, fit, resolve_device
from spine.core.train.stage import fold_model, torch_threads
from spine.scoliosis.cobb import cobb_angles, score_angles
from spine.scoliosis.data import (
    cache_images,
    cache_table,
    fold_predictions,
    landmark_columns,
    landmarks_from_flat,
    landmarks_to_flat,
    oof_landmarks,
    read_angles,
    read_landmarks,
)
from spine.scoliosis.model import FLIP_CORNERS, VertebraNet, decode, landmark_loss, targets, unflip
from spine.scoliosis.task import ANGLES

log = logging.getLogger(__name__)


# =============================================================================================
# Data
# =============================================================================================


def load_cached(paths: Paths, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """A split's cached images (n, H, W) and their rows of the stage-01 table."""
    table = pd.read_csv(require(cache_table(paths), "01_preprocess"), dtype={"filename": str})
    return np.load(cache_images(paths, split)), table[table["split"] == split].reset_index(drop=True)


def train_items(paths: Paths) -> pd.DataFrame:
    """One row per training image: filename, index (into the cache), status, height, width, the
    normalized landmarks (``points``, (17, 4, 2)) and the label angles."""
    _, table = load_cached(paths, "train")
    points = read_landmarks(paths.data_dir)
    angles = read_angles(paths.data_dir)
    if len(points) < len(table) or len(angles) < len(table):
        raise ValueError(
            f"labels hold {len(points)} landmark rows and {len(angles)} angle rows for {len(table)} images"
        )
    items = table.copy()
    items["points"] = list(points[: len(table)])
    items[ANGLES] = angles[: len(table)]
    return items


def to_model(points_norm: np.ndarray, size) -> np.ndarray:
    """Normalized (x / width, y / height) → model pixels of a (rows, cols) model image."""
    return np.asarray(points_norm) * [size[1], size[0]]


def to_image(points_model: np.ndarray, size, height: float, width: float) -> np.ndarray:
    """Model pixels → the original image's pixels."""
    return np.asarray(points_model) * [width / size[1], height / size[0]]


class LandmarkDataset(Dataset):
    """Cached images with their landmark targets; ``augment`` draws a fresh augmentation per sample."""

    def __init__(self, images: np.ndarray, points: list[np.ndarray], tc, augment: bool):
        self.images, self.points, self.tc, self.augment = images, points, tc, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        img = self.images[i].astype(np.float32) / 255.0
        pts = to_model(self.points[i], img.shape).copy()
        if self.augment:
            img, pts = augment(img, pts, self.tc, np.random.default_rng(int(torch.randint(2**31, ()))))
        t = targets(pts, img.shape, self.tc.stride, self.tc.heatmap_sigma, self.tc.offset_radius)
        return {"image": torch.from_numpy(img[None].copy()), **{k: torch.from_numpy(v) for k, v in t.items()}}


def augment(img: np.ndarray, pts: np.ndarray, tc, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mirror (left and right corners swap), affine, intensity and noise; points follow the image."""
    h, w = img.shape
    if tc.flip and rng.random() < 0.5:
        img = img[:, ::-1]
        pts = pts[:, FLIP_CORNERS].copy()
        pts[..., 0] = w - pts[..., 0]
    scale = math.exp(rng.uniform(-tc.aug_scale, tc.aug_scale))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-tc.aug_rotate_deg, tc.aug_rotate_deg), scale)
    m[:, 2] += rng.uniform(-tc.aug_shift, tc.aug_shift, 2) * [w, h]
    img = cv2.warpAffine(
        np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    pts = pts @ m[:, :2].T + m[:, 2]
    img = np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < tc.aug_invert:
        img = 1 - img
    img = img + rng.normal(0, rng.uniform(0, 0.03), img.shape)
    return img.astype(np.float32), pts


# =============================================================================================
# Model, training, prediction
# =============================================================================================


def build_model(tc) -> VertebraNet:
    return VertebraNet(tc.backbone, tc.checkpoint, width=tc.width, stride=tc.stride)


def loss_fn(tc):
    def loss(model, batch, device):
        batch = {k: v.to(device) for k, v in batch.items()}
        return landmark_loss(model(batch["image"]), batch, tc.corner_weight, tc.line_weight)

    return loss


@torch.no_grad()
def predict(model, images: np.ndarray, tc, device) -> np.ndarray:
    """(n, 17, 4, 2) corners in model pixels of cached images; with ``tta_flip`` the maps are the mean
    of the image's and its mirror's."""
    model.eval()
    out = []
    for start in range(0, len(images), tc.batch_size):
        x = torch.from_numpy(images[start : start + tc.batch_size].astype(np.float32) / 255.0)[:, None].to(
            device
        )
        with autocast(device, tc.amp):
            maps = {k: v.float() for k, v in model(x).items()}
            if tc.tta_flip:
                mirrored = unflip({k: v.float() for k, v in model(x.flip(-1)).items()})
                maps = {k: (maps[k] + mirrored[k]) / 2 for k in maps}
        out.append(
            decode(maps, tc.stride, window=tc.peak_window, radius=tc.decode_radius, min_gap=tc.peak_min_gap)
        )
    return np.concatenate(out) if out else np.zeros((0, 17, 4, 2))


def landmark_frame(names, fold, points_px: np.ndarray) -> pd.DataFrame:
    """filename, fold, x1..x68, y1..y68 (pixels of the original image)."""
    df = pd.DataFrame(landmarks_to_flat(points_px), columns=landmark_columns())
    df.insert(0, "fold", fold)
    df.insert(0, "filename", list(names))
    return df


def train_fold(cfg, paths, items, images, fold_of: dict, fold: int, device) -> pd.DataFrame:
    """Train fold ``fold`` (or load its current checkpoint) and return its held-out landmarks."""
    tc = cfg.train
    ok = items["status"] == "ok"
    in_fold = items["filename"].map(fold_of) == fold
    train, held = items[ok & ~in_fold], items[ok & in_fold]
    key = fold_key(tc, paths.folds.read_text(), cfg.seed, cache_identity(paths))
    out = fold_predictions(paths, fold)
    if is_current(out, key) and paths.checkpoint(fold, cfg.seed).exists():
        return pd.read_csv(out, dtype={"filename": str})

    def fit_fold(model):
        ds = LandmarkDataset(images[train["index"].to_numpy()], list(train["points"]), tc, augment=True)
        loader = DataLoader(
            ds,
            batch_size=tc.batch_size,
            shuffle=True,
            num_workers=tc.loader_workers,
            drop_last=len(ds) > tc.batch_size,
        )
        return fit(
            model,
            loader,
            loss_fn(tc),
            TrainSettings.from_config(tc, cfg.seed + fold),
            paths.checkpoint(fold, cfg.seed),
            device,
            f"fold {fold}",
        )

    model, _ = fold_model(
        paths.checkpoint(fold, cfg.seed), key, cfg.seed + fold, lambda: build_model(tc), fit_fold, device
    )
    pred = predict(model, images[held["index"].to_numpy()], tc, device)
    px = (
        np.stack([to_image(p, model_size(cfg), h, w) for p, h, w in zip(pred, held["height"], held["width"])])
        if len(held)
        else pred
    )
    frame = landmark_frame(held["filename"], fold, px)
    save_table(out, frame)
    mark_current(out, key)
    return frame


def cache_identity(paths: Paths) -> str:
    """What stage 01's cache was made from (its key): a fold trained on another cache is stale."""
    return Path(str(cache_table(paths)) + ".key").read_text()


def model_size(cfg) -> tuple[int, int]:
    """The model image (rows, cols) of ``preprocess.image_size``."""
    return tuple(cfg.preprocess.image_size)


# =============================================================================================
# OOF report
# =============================================================================================


def angles_of(points_px: np.ndarray, heights, s_smooth: int = 1) -> np.ndarray:
    """(n, 3) PT, MT, TL/L of each spine (corners in pixels) with the challenge's routine (``s_smooth``:
    ``cobb_angles``; predictions use the config's ``cobb.s_test_smooth``)."""
    return np.array([cobb_angles(p, h, s_smooth).angles() for p, h in zip(points_px, heights)]).reshape(-1, 3)


def landmark_errors(pred_px: np.ndarray, true_px: np.ndarray, heights) -> dict:
    """Per-landmark distance in pixels and in % of the image height: median, mean, 90th percentile."""
    d = np.linalg.norm(pred_px - true_px, axis=-1).reshape(len(pred_px), -1)
    pct = 100 * d / np.asarray(heights, dtype=np.float64)[:, None]
    return {
        "median_px": float(np.median(d)),
        "mean_px": float(d.mean()),
        "p90_px": float(np.percentile(d, 90)),
        "median_pct_height": float(np.median(pct)),
        "mean_pct_height": float(pct.mean()),
    }


def oof_report(
    items: pd.DataFrame, oof: pd.DataFrame, fold_of: dict, s_smooth: int = 1
) -> tuple[dict, pd.DataFrame]:
    """Scores of the OOF landmarks and angles beside out-of-fold baselines; the OOF table with angles."""
    rows = items.set_index("filename").loc[oof["filename"]]
    heights, widths = rows["height"].to_numpy(float), rows["width"].to_numpy(float)
    pred = landmarks_from_flat(oof[landmark_columns()].to_numpy())
    true = np.stack(rows["points"].to_list()) * np.stack([widths, heights], 1)[:, None, None, :]
    pred_angles = angles_of(pred, heights, s_smooth)
    gt = rows[ANGLES].to_numpy(float)
    # Baselines out of fold: each image gets the mean of the other folds' angles / normalized shapes.
    folds = oof["filename"].map(fold_of).to_numpy()
    labelled = items[items["filename"].map(fold_of).notna()]
    lab_folds = labelled["filename"].map(fold_of).to_numpy()
    lab_points, lab_angles = np.stack(labelled["points"].to_list()), labelled[ANGLES].to_numpy(float)
    base_angles = np.stack([lab_angles[lab_folds != f].mean(0) for f in folds])
    base_points = (
        np.stack([lab_points[lab_folds != f].mean(0) for f in folds])
        * np.stack([widths, heights], 1)[:, None, None, :]
    )
    report = {
        "images": int(len(oof)),
        "skipped_unreadable": items.loc[items["status"] != "ok", "filename"].tolist(),
        "landmarks": {
            "model": landmark_errors(pred, true, heights),
            "mean_shape": landmark_errors(base_points, true, heights),
        },
        "angles": {"model": score_angles(gt, pred_angles), "train_mean": score_angles(gt, base_angles)},
        "angles_from_true_landmarks": score_angles(gt, angles_of(true, heights)),
    }
    table = oof.copy()
    for k, name in enumerate(ANGLES):
        table[name] = pred_angles[:, k]
    return report, table


def run_landmarks(cfg) -> dict:
    """Stage 02: train every selected fold (resumable), then the OOF table and report."""
    paths = Paths.from_config(cfg)
    tc = cfg.train
    start = time.perf_counter()
    items = train_items(paths)
    images, _ = load_cached(paths, "train")
    if images.shape[1:] != model_size(cfg):
        raise RuntimeError(
            f"the stage-01 cache holds {images.shape[1:]} images, the config asks for "
            f"preprocess.image_size={list(model_size(cfg))}: run `python src/01_preprocess.py` with it"
        )
    folds = load_folds(cfg)
    fold_of = dict(zip(folds["study_id"].astype(str), folds["fold"]))
    device = resolve_device(tc.device)
    frames = []
    with torch_threads(tc.torch_threads):
        for fold in selected_folds(cfg, tc):
            t0 = time.perf_counter()
            frames.append(train_fold(cfg, paths, items, images, fold_of, fold, device))
            log.info("fold %d: %d held-out images in %.1fs", fold, len(frames[-1]), time.perf_counter() - t0)
    save_config(cfg, paths.localize_dir)
    done = [f for f in range(cfg.folds.n_folds) if fold_predictions(paths, f).exists()]
    if len(done) < cfg.folds.n_folds:
        return {"folds_done": done, "summary": {"folds done": done, "OOF": "after every fold is trained"}}
    oof = pd.concat(
        [pd.read_csv(fold_predictions(paths, f), dtype={"filename": str}) for f in done], ignore_index=True
    )
    report, table = oof_report(items, oof, fold_of, cfg.cobb.s_test_smooth)
    report["seconds"] = round(time.perf_counter() - start, 1)
    save_table(oof_landmarks(paths), table)
    save_text(paths.localize_report, json.dumps(report, indent=2))
    lm, an = report["landmarks"], report["angles"]
    report["summary"] = {
        "OOF images (skipped unreadable)": f"{report['images']} ({len(report['skipped_unreadable'])})",
        "landmark median error px | % height": _median_error(lm["model"]),
        "  mean-shape baseline px | % height": _median_error(lm["mean_shape"]),
        "OOF SMAPE % (train-mean baseline)": f"{an['model']['smape']:.2f} ({an['train_mean']['smape']:.2f})",
        "OOF MAE deg PT / MT / TL": " / ".join(f"{an['model'][f'mae_{a}']:.1f}" for a in ANGLES),
        "seconds": report["seconds"],
    }
    return report


def _median_error(d: dict) -> str:
    return f"{d['median_px']:.2f} | {d['median_pct_height']:.2f}"
