"""Stage 02 (spider): a 2.5D segmentation model on patient folds, instance labels, OOF Dice and
measurements.

Model: a UNet from segmentation_models_pytorch over a timm encoder (``smp.Unet("tu-<name>")``, no
download; ``segment.checkpoint`` is a local weights file of the 3-channel timm model). Input: one
sagittal slice of the stage-01 grid with ``segment.context`` neighbours on each side as channels, taken
``segment.context_mm`` apart (the nearest slice: the same millimetres whatever the slice spacing).
Output: ``preprocess.CLASSES`` per pixel (background, vertebra, disc, canal); cross entropy + soft Dice.

Instance labels (``instance_labels``) follow the SPIDER convention, counted up from the sacrum: the
lowest disc is 201 (L5/S1), the next 202, ...; disc pieces on one plane are one disc
(``segment.disc_merge_mm``), and a disc smaller than ``segment.min_disc_share`` of the median disc is
a fragment or, at the bottom, a sacral remnant (the S1/S2 line many sacra show) and is dropped (not
the top one, which the field of view may cut). A vertebra voxel belongs to
the vertebra just above the highest disc whose plane (centroid, normal = the disc's thinnest axis) it
lies above: label k above disc 200 + k (so merged vertebra blobs are split at the discs); below the
lowest disc is the sacrum, which SPIDER leaves unlabelled. Per level only the largest piece is kept. A
vertebra within 1 mm of the image's in-plane border is partially visible (100 + k); the canal (100) is
every canal piece of at least ``segment.min_mm3``. The sequence is checked: every level between two
discs holds a vertebra, no gap between neighbouring discs is over ``segment.max_gap`` times their
median gap; images that fail are listed in the report (the vertebra volume found below the lowest
disc, the sacrum, is reported and dropped).

Folds: the patient folds of ``core.folds.load_folds`` (``SpiderTask.fold_strata``); fold k's model
trains on the other folds' images and predicts its own (out of fold). Per fold: the checkpoint
(``Paths.segmenter_checkpoint``), ``localize/spider/masks/<image>.mha`` (predicted labels in the input
file's exact geometry), the fold's Dice table (``Paths.segmenter_predictions``, written last: marks the
fold done) and its measurements (``spine.spider.measure.measure`` on the predicted labels and, with
``segment.measure_true_masks``, on the true masks). With SPIDER's radiological gradings, each fold also
trains a herniation classifier (``spine.spider.hernia``) whose probability replaces the rule's
``herniation_probability`` of the held-out images. ``report.json``: OOF Dice per structure and class,
broken sequences, seconds per image, and the OOF measurement errors beside the baseline (the other
folds' mean / majority grade), against the generator's truth when it exists and against the
measurements of the true masks when made (the segmentation's share of the error; the only reference
on real data).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from spine.core.config import save_config
from spine.core.folds import fold_checkpoints, fold_key, load_folds, selected_folds
from spine.core.io import fingerprint, is_current, mark_current, save_table, save_text
from spine.core.paths import Paths
from spine.core.train import dist
from spine.core.train.loop import TrainSettings, fit, load_weights, resolve_device
from spine.core.train.stage import fold_model, torch_threads
from spine.spider import hernia, io, scores
from spine.spider.labels import CANAL, DISC_OFFSET, MAX_COUNT, PARTIAL_OFFSET, cut_by_field
from spine.spider.measure import measure_kwargs, measure_table
from spine.spider.preprocess import CLASSES, cached, load_table

log = logging.getLogger(__name__)

N_CLASSES = len(CLASSES)
VERTEBRA, DISC, CANAL_CLASS = 1, 2, 3


# --- inputs ---------------------------------------------------------------------------------------
def channel_offsets(context: int, context_mm: float, slice_mm: float) -> list[int]:
    """Slice offsets of the input channels: the centre and ``context`` neighbours each side, the nearest
    slices ``context_mm`` apart (at least one slice apart)."""
    step = max(1, int(round(context_mm / slice_mm)))
    return [k * step for k in range(-context, context + 1)]


def stack_input(vol: np.ndarray, s: int, offsets: list[int]) -> np.ndarray:
    """(channels, rows, cols) float32 of slice ``s`` with its neighbours (edge slices repeated)."""
    idx = np.clip(np.asarray(offsets) + s, 0, len(vol) - 1)
    return np.asarray(vol[idx], dtype=np.float32)


def pad_to(x: np.ndarray, rows: int, cols: int, value: float = 0.0) -> np.ndarray:
    """Pad the last two axes at their end up to (rows, cols)."""
    pr, pc = max(0, rows - x.shape[-2]), max(0, cols - x.shape[-1])
    if pr == pc == 0:
        return x
    width = [(0, 0)] * (x.ndim - 2) + [(0, pr), (0, pc)]
    return np.pad(x, width, constant_values=value)


@dataclass(frozen=True)
class ImageItem:
    """One cached image: its table row fields the model needs."""

    image: str
    split: str
    slice_mm: float


def items_of(table: pd.DataFrame) -> list[ImageItem]:
    ok = table[table["status"] == "ok"]
    return [ImageItem(r["image"], r["split"], float(r["grid_spacing"][0])) for r in ok.to_dict("records")]


class SliceSamples(Dataset):
    """Training samples: (image, slice) pairs of the cached grid, a random ``crop_px`` square each
    (padded), with intensity jitter and a left-right mirror (the neighbour order reversed)."""

    def __init__(self, cache: Path, items: list[ImageItem], sc, seed: int):
        self.cache, self.sc = Path(cache), sc
        self.vols = {it.image: np.load(cached(cache, it.split, it.image)) for it in items}
        self.masks = {it.image: np.load(cached(cache, it.split, it.image, "mask")) for it in items}
        self.offsets = {it.image: channel_offsets(sc.context, sc.context_mm, it.slice_mm) for it in items}
        rng = np.random.default_rng(seed)
        self.samples = []
        for it in items:
            fg = (self.masks[it.image] > 0).reshape(len(self.masks[it.image]), -1).any(1)
            for s in range(len(fg)):
                if fg[s] or rng.random() < sc.empty_share:
                    self.samples.append((it.image, s))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image, s = self.samples[i]
        x = stack_input(self.vols[image], s, self.offsets[image])
        y = self.masks[image][s].astype(np.int64)
        size = int(self.sc.crop_px)
        x, y = pad_to(x, size, size), pad_to(y, size, size)
        r0 = int(torch.randint(x.shape[-2] - size + 1, ()))
        c0 = int(torch.randint(x.shape[-1] - size + 1, ()))
        x, y = x[:, r0 : r0 + size, c0 : c0 + size], y[r0 : r0 + size, c0 : c0 + size]
        if self.sc.augment:
            gain, shift, gamma = (1 + 0.2 * (torch.rand(3) * 2 - 1)).tolist()
            x = np.clip(x, 0, None) ** gamma * gain + (shift - 1)
            if torch.rand(()) < 0.5:
                x = x[::-1]
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "y": torch.from_numpy(np.ascontiguousarray(y)),
        }


# --- model ----------------------------------------------------------------------------------------
def build_model(sc) -> torch.nn.Module:
    """``smp.Unet`` over the timm encoder ``segment.encoder`` (random init, or ``segment.checkpoint``)."""
    import segmentation_models_pytorch as smp

    in_chans = 2 * int(sc.context) + 1
    model = smp.Unet(
        f"tu-{sc.encoder}",
        encoder_weights=None,
        in_channels=in_chans,
        classes=N_CLASSES,
        decoder_channels=list(sc.decoder_channels),
    )
    if sc.checkpoint:
        from spine.core.models.encoder import build_encoder

        weights = build_encoder(sc.encoder, in_chans, sc.checkpoint).state_dict()
        model.encoder.model.load_state_dict(weights)
    return model.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU


def dice_ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy + (1 - soft Dice) averaged over the foreground classes present in the batch."""
    ce = F.cross_entropy(logits, y)
    prob = logits.float().softmax(1)
    onehot = F.one_hot(y, N_CLASSES).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1) / (denom + 1)
    return ce + (1 - dice[1:]).mean()


def seg_loss(model, batch, device) -> torch.Tensor:
    x = batch["x"].to(device, memory_format=torch.channels_last)
    return dice_ce_loss(model(x), batch["y"].to(device))


# --- prediction -----------------------------------------------------------------------------------
@torch.no_grad()
def predict_probs(models: list, vol: np.ndarray, offsets: list[int], device, mirror: bool, batch: int = 16):
    """Mean class probabilities (slices, classes, rows, cols) float32 of every slice of a cached grid
    volume over ``models`` (and the left-right mirror of the input when ``mirror``)."""
    n, rows, cols = vol.shape
    pr, pc = -(-rows // 32) * 32, -(-cols // 32) * 32  # the encoder halves the grid 5 times
    out = np.zeros((n, N_CLASSES, rows, cols), np.float32)
    for start in range(0, n, batch):
        x = np.stack([stack_input(vol, s, offsets) for s in range(start, min(n, start + batch))])
        x = torch.from_numpy(pad_to(x, pr, pc)).to(device, memory_format=torch.channels_last)
        views = [x, x.flip(1)] if mirror else [x]
        total = 0
        for m in models:
            for v in views:
                total = total + m(v).float().softmax(1)
        out[start : start + len(x)] = (total / (len(models) * len(views)))[..., :rows, :cols].cpu().numpy()
    return out


def probs_to_native(probs: np.ndarray, img: io.Canonical, grid_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid probabilities (slices, classes, rows, cols) -> on the image's own canonical voxels (each
    class's probability resampled by position, linear): the class indices (the most likely class) and
    the vertebra and disc margins (``class_margins``) for sub-voxel measurements."""
    grid = io.inplane_grid(img.image, grid_mm)
    native = np.stack([io.resample_to(probs[:, k], grid, img.image) for k in range(probs.shape[1])], axis=1)
    return native.argmax(1).astype(np.uint8), class_margins(native)


def class_margins(probs: np.ndarray) -> np.ndarray:
    """(2, slices, rows, cols) float32: the vertebra and the disc class's probability minus the largest
    other class's, per voxel of (slices, classes, rows, cols) probabilities: positive where the class
    wins, zero on the boundary the class indices draw. ``spine.spider.measure`` interpolates them to place
    edges between voxels (on the demo's 1.8 mm voxels the class indices alone round every edge)."""
    out = []
    for k in (VERTEBRA, DISC):
        others = np.delete(probs, k, axis=1).max(1)
        out.append(probs[:, k] - others)
    return np.stack(out).astype(np.float32)


# --- instance labels ------------------------------------------------------------------------------
def _pieces(mask: np.ndarray, min_voxels: int) -> list[np.ndarray]:
    """Connected pieces of ``mask`` (face connectivity) with at least ``min_voxels`` voxels, as boolean
    masks, largest first."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(-sizes)
    return [lab == i + 1 for i in order if sizes[i] >= min_voxels]


def _disc_plane(mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A disc's centroid (mm, array axes) and unit normal in the sagittal plane pointing superior: the
    axis of least spread of its voxels (rows, columns only: thin slices carry no tilt information)."""
    pts = np.argwhere(mask) * np.asarray(spacing)
    centre = pts.mean(0)
    rc = pts[:, 1:] - centre[1:]
    if len(rc) < 3:
        return centre, np.array([0.0, -1.0, 0.0])
    _, vecs = np.linalg.eigh(rc.T @ rc)
    normal = np.array([0.0, *vecs[:, 0]])
    return centre, normal if normal[1] < 0 else -normal  # rows grow inferior: superior is -row


def merge_coplanar(discs: list[np.ndarray], spacing, merge_mm: float) -> list[np.ndarray]:
    """Disc pieces that lie on one plane (a smaller piece's centroid within ``merge_mm`` of a larger
    piece's plane) joined: a disc cut in two by a few wrong pixels stays one disc."""
    kept: list[np.ndarray] = []
    for piece in discs:  # largest first
        centre = np.argwhere(piece).mean(0) * np.asarray(spacing)
        for i, big in enumerate(kept):
            c, n = _disc_plane(big, spacing)
            if abs((centre - c) @ n) < merge_mm:
                kept[i] = big | piece
                break
        else:
            kept.append(piece)
    return kept


def instance_labels(
    classes: np.ndarray,
    spacing,
    min_mm3: float,
    max_gap: float,
    merge_mm: float = 8.0,
    min_disc_share: float = 0.35,
) -> tuple[np.ndarray, dict]:
    """Class indices (canonical array) -> SPIDER label ids and a sequence check (module docstring).

    Returns (labels int16, info: discs, vertebrae, partial, sacrum_mm3, broken, reasons).
    """
    spacing = np.asarray(spacing, dtype=float)
    min_voxels = max(1, int(round(min_mm3 / spacing.prod())))
    labels = np.zeros(classes.shape, np.int16)
    for piece in _pieces(classes == CANAL_CLASS, min_voxels):  # one structure, maybe cut by gaps
        labels[piece] = CANAL
    discs = merge_coplanar(_pieces(classes == DISC, min_voxels), spacing, merge_mm)
    planes = [_disc_plane(d, spacing) for d in discs]
    order = np.argsort([-c[1] for c, _ in planes])  # bottom (largest row) first
    discs, planes = [discs[i] for i in order], [planes[i] for i in order]
    reasons, partial = [], []
    sizes = np.array([int(d.sum()) for d in discs])
    # fragments and the sacral remnant below L5/S1 are small; the top disc may be cut by the field of view
    keep = [
        k for k in range(len(discs)) if sizes[k] >= min_disc_share * np.median(sizes) or k == len(discs) - 1
    ]
    discs, planes = [discs[k] for k in keep], [planes[k] for k in keep]
    if len(discs) > MAX_COUNT:  # SPIDER numbers 25 levels at most
        reasons.append(f"{len(discs)} discs found; the {len(discs) - MAX_COUNT} highest dropped")
        discs, planes = discs[:MAX_COUNT], planes[:MAX_COUNT]
    for k, d in enumerate(discs, start=1):
        labels[d] = DISC_OFFSET + k
    vert = np.argwhere(classes == VERTEBRA)
    level = np.zeros(len(vert), int)
    pts = vert * spacing
    for k, (centre, normal) in enumerate(planes, start=1):
        level = np.where((pts - centre) @ normal > 0, k, level)  # ends at the highest disc it is above
    sacrum_mm3 = float((level == 0).sum() * spacing.prod())
    for k in range(1, len(discs) + 1):
        piece = np.zeros(classes.shape, bool)
        sel = vert[level == k]
        piece[tuple(sel.T)] = True
        pieces = _pieces(piece, min_voxels)
        if not pieces:
            if k < len(discs):
                reasons.append(f"no vertebra between discs {DISC_OFFSET + k} and {DISC_OFFSET + k + 1}")
            continue
        cut = cut_by_field(pieces[0], spacing)
        labels[pieces[0]] = k + (PARTIAL_OFFSET if cut else 0)
        if cut:
            partial.append(k)
    if not discs:
        reasons.append("no disc found")
    centres = np.array([c[1] for c, _ in planes])
    if len(centres) >= 3:
        gaps = -np.diff(centres)
        if gaps.max() > max_gap * np.median(gaps):
            reasons.append(f"a gap of {gaps.max():.0f} mm between discs (median {np.median(gaps):.0f} mm)")
    info = {
        "discs": len(discs),
        "vertebrae": int(len(np.unique(labels[(labels > 0) & (labels < DISC_OFFSET) & (labels != CANAL)]))),
        "partial": partial,
        "sacrum_mm3": round(sacrum_mm3, 1),
        "broken": bool(reasons),
        "reasons": reasons,
    }
    return labels, info


# --- one image, end to end ------------------------------------------------------------------------
def segment_image(
    models, row: dict, cache: Path, sc, grid_mm: float, device
) -> tuple[io.Canonical, np.ndarray, np.ndarray, dict]:
    """Predict one cached image: (its canonical image, the SPIDER label array on its own voxels, the
    vertebra and disc margins on them (``class_margins``), the instance info with the seconds it took)."""
    t0 = time.perf_counter()
    vol = np.load(cached(cache, row["split"], row["image"]))
    offsets = channel_offsets(sc.context, sc.context_mm, float(row["grid_spacing"][0]))
    probs = predict_probs(models, vol, offsets, device, bool(sc.mirror))
    img = io.read_canonical(Path(row["image_path"]))
    classes, margins = probs_to_native(probs, img, grid_mm)
    labels, info = instance_labels(
        classes, img.spacing, sc.min_mm3, sc.max_gap, sc.disc_merge_mm, sc.min_disc_share
    )
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return img, labels, margins, info


def oof_measurements_path(paths: Paths, fold: int | None = None, truth_masks: bool = False) -> Path:
    """OOF measurements of one fold (or all): from the predicted masks, or from the true masks."""
    name = "measure_true" if truth_masks else "measure"
    return (
        paths.localize_dir
        / ("folds" if fold is not None else "")
        / (f"{name}_fold{fold}.csv" if fold is not None else f"{name}.csv")
    )


def load_models(cfg, paths: Paths, folds: list[int], device) -> list:
    """The segmenter of each fold in ``folds`` (an error naming a missing checkpoint)."""
    ckpts = fold_checkpoints(
        lambda f: paths.segmenter_checkpoint(f, cfg.seed), folds, "02_localize", "segmenter"
    )
    return [load_weights(build_model(cfg.segment), c, device) for c in ckpts]


# --- the stage ------------------------------------------------------------------------------------
def segmenter_key(cfg, paths: Paths, table: pd.DataFrame) -> str:
    """What a fold's model and predictions are made from: the segment config (less run-only keys), the
    grid, folds, seed, the cached train images (names and grid shapes) and the measurement settings."""
    train = train_images(table)
    cache_id = fingerprint(list(train["image"]), [list(v) for v in train["grid_shape"]])
    return fold_key(
        cfg.segment, paths.folds.read_text(), cfg.seed, cfg.preprocess.grid_mm, cache_id, measure_kwargs(cfg)
    )


def train_images(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["split"] == "train") & (table["status"] == "ok")].reset_index(drop=True)


def run_fold(
    cfg, paths: Paths, table: pd.DataFrame, fold_of: dict, fold: int, device, hernia_key: str | None
) -> None:
    """Train fold ``fold``'s segmenter and herniation classifier (or load their checkpoints), segment
    and measure its held-out images."""
    sc, key = cfg.segment, segmenter_key(cfg, paths, table)
    train = train_images(table)
    in_fold = train["patient"].astype(str).map(fold_of) == fold
    held, rest = train[in_fold], train[~in_fold]

    def fit_fold(model):
        ds = SliceSamples(paths.cache_dir, items_of(rest), sc, cfg.seed + fold)
        loader = DataLoader(
            ds,
            batch_size=int(sc.batch),
            shuffle=True,
            drop_last=len(ds) > sc.batch,
            num_workers=int(sc.loader_workers),
        )
        settings = TrainSettings.from_config(sc, cfg.seed + fold)
        return fit(
            model,
            loader,
            seg_loss,
            settings,
            paths.segmenter_checkpoint(fold, cfg.seed),
            device,
            f"fold {fold}",
        )

    ckpt = paths.segmenter_checkpoint(fold, cfg.seed)
    model, _ = fold_model(ckpt, key, cfg.seed + fold, lambda: build_model(sc), fit_fold, device)
    model.eval()
    classifier = hernia.fold_classifier(cfg, paths, rest, fold, hernia_key, device)
    classifiers = [classifier] if classifier is not None else []
    dice_rows, pred_rows, true_rows = [], [], []
    for row in held.to_dict("records"):
        img, labels, margins, info = segment_image(
            [model], row, paths.cache_dir, sc, float(cfg.preprocess.grid_mm), device
        )
        original = io.read_image(Path(row["image_path"]))
        io.write_like(labels, img, original, io.masks_dir(paths.localize_dir) / f"{row['image']}.mha")
        truth = io.read_canonical(Path(row["mask_path"])).array
        dice_rows += [{**r, "fold": fold} for r in scores.dice_rows(row["image"], labels, truth)]
        dice_rows.append({"image": row["image"], "fold": fold, "label": "sequence", "info": json.dumps(info)})
        t0 = time.perf_counter()
        table = measure_table(labels, img.spacing, cfg, margins)
        m = hernia.classified(table, classifiers, img.array, labels, img.spacing, cfg, device)
        m = m.assign(image=row["image"], fold=fold)
        m["seconds"] = time.perf_counter() - t0
        pred_rows.append(m)
        if sc.measure_true_masks:
            true_rows.append(measure_table(truth, img.spacing, cfg).assign(image=row["image"], fold=fold))
    cols = ["image", "fold", "structure", "measurement", "value", "unit"]
    save_table(oof_measurements_path(paths, fold), _concat(pred_rows, cols + ["seconds"]))
    save_table(oof_measurements_path(paths, fold, truth_masks=True), _concat(true_rows, cols))
    out = paths.segmenter_predictions(fold)
    save_table(out, pd.DataFrame(dice_rows, columns=["image", "fold", "label", "dice", "in_truth", "info"]))
    mark_current(out, fingerprint(key, hernia_key))


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def run_segment(cfg) -> dict:
    """Stage 02 over the folds of ``segment.folds`` (default all), with ``segment.torch_threads``."""
    with torch_threads(cfg.segment.torch_threads):
        return _run_segment(cfg)


def _run_segment(cfg) -> dict:
    t0 = time.perf_counter()
    paths = Paths.from_config(cfg)
    device = resolve_device(cfg.segment.device)
    table = load_table(paths.cache_dir)
    folds_df = load_folds(cfg)
    fold_of = {str(s): int(f) for s, f in zip(folds_df["study_id"], folds_df["fold"])}
    hernia_key = hernia.classifier_key(cfg, paths, train_images(table))
    key = fingerprint(segmenter_key(cfg, paths, table), hernia_key)
    for fold in selected_folds(cfg, cfg.segment):
        if is_current(paths.segmenter_predictions(fold), key):
            log.info("fold %d: OOF segmentation exists, skipped", fold)
            continue
        run_fold(cfg, paths, table, fold_of, fold, device, hernia_key)
    done = [f for f in range(cfg.folds.n_folds) if is_current(paths.segmenter_predictions(f), key)]
    report = oof_report(cfg, paths, table, done, fold_of)
    with_classifier = [
        f for f in done if hernia_key and paths.segmenter_checkpoint(f, cfg.seed, "hernia").exists()
    ]
    report["herniation_classifier_folds"] = with_classifier
    report["summary"]["herniation probability"] = (
        f"classifier in folds {with_classifier}, else the rule"
        if with_classifier
        else "rule (measured protrusion)"
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["summary"]["seconds"] = report["seconds"]
    if dist.is_main():
        save_text(paths.localize_report, json.dumps(report, indent=2, default=float))
        save_config(cfg, paths.localize_dir)
    return report


def oof_report(cfg, paths: Paths, table: pd.DataFrame, done: list[int], fold_of: dict) -> dict:
    """The OOF report of the finished folds: Dice, sequences, measurements (see the module docstring)."""
    if not done:
        return {"folds_done": [], "complete": False, "summary": {"folds done": "none"}}
    dice = pd.concat([pd.read_csv(paths.segmenter_predictions(f)) for f in done], ignore_index=True)
    pred = pd.concat([pd.read_csv(oof_measurements_path(paths, f)) for f in done], ignore_index=True)
    true = pd.concat(
        [pd.read_csv(oof_measurements_path(paths, f, truth_masks=True)) for f in done], ignore_index=True
    )
    cols = ["image", "fold", "structure", "measurement", "value", "unit"]
    save_table(oof_measurements_path(paths), pred[cols])
    seq = dice[dice["label"] == "sequence"]
    infos = {r["image"]: json.loads(r["info"]) for r in seq.to_dict("records")}
    dice = dice[dice["label"] != "sequence"]
    report = {
        "folds_done": done,
        "complete": done == list(range(cfg.folds.n_folds)),
        "images": len(infos),
        "dice": scores.dice_summary(dice),
        "broken_sequences": {k: v["reasons"] for k, v in infos.items() if v["broken"]},
        "seconds_per_image_segment": float(np.mean([v["seconds"] for v in infos.values()])),
        "seconds_per_image_measure": float(pred.groupby("image")["seconds"].first().mean())
        if len(pred)
        else None,
    }
    truth_csv = paths.truth_dir / "measurements.csv"
    train = train_images(table)
    fold_of_image = dict(zip(train["image"], train["patient"].astype(str).map(fold_of)))
    if truth_csv.exists():
        truth = pd.read_csv(truth_csv)
        report["measurements_vs_truth"] = scores.oof_measurement_scores(pred, truth, fold_of_image)
    if len(true):
        report["measurements_vs_true_masks"] = scores.oof_measurement_scores(pred, true, fold_of_image)
    report["summary"] = scores.report_summary(report)
    return report
