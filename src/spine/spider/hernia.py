"""Per-disc herniation classifier of the spider task (stage 02 trains it on folds, stage 06 predicts).

Measuring the protrusion on a predicted mask finds herniations only where the segmenter draws them, and
a segmenter smooths a few-millimetre bump away (the rule's probability on predicted masks ranked
herniations little better than chance on the demo's 1.8 mm pixels, while the same rule on the true masks
scored average precision 0.92). The research system this repo grew from detects herniations on the
central sagittal slices instead (../shared/DOMAIN.md). This does the same per disc: a small timm CNN
reads a square patch of the image at the disc's posterior edge, on the mid-sagittal slice and
``hernia.context`` neighbours each side (``hernia.context_mm`` apart) as channels, and gives the
probability of a herniation. Supervision: SPIDER's ``radiological_gradings.csv`` ("Disc herniation" per
patient and "IVD label", 1 = L5/S1 counted up, as the public file; an image takes its patient's
grades). Training patches sit on the true masks' discs, prediction patches on the predicted masks'.

Patch geometry (``disc_frames``): on the mid-sagittal slice of the label mask (``measure.mid_sagittal``),
a disc's centroid, long axis (principal axis of its pixels, pointing posterior) and normal (pointing
superior); the patch is centred ``hernia.offset_mm`` behind the centroid along the long axis (about
half a disc: the posterior edge, and the canal behind it, are in the patch) and sampled along those axes
at ``hernia.patch_mm`` per pixel, so every scan and tilt gives the same picture. Not on the disc's
posterior end: on a true mask that end is the herniation's tip, on a predicted mask the smoothed edge,
and a classifier trained on the one would read the other's herniations at another place (out-of-fold
average precision 0.48 that way, 0.98 on true-mask patches of the same images).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spine.core.folds import fold_key
from spine.core.io import fingerprint, is_current
from spine.core.models.encoder import build_encoder
from spine.core.train.loop import TrainSettings, fit, load_weights
from spine.core.train.stage import fold_model
from spine.spider import io
from spine.spider import labels as lab
from spine.spider.measure import UNITS, disc_frame, measure_kwargs, mid_sagittal
from spine.spider.preprocess import normalize

log = logging.getLogger(__name__)

GRADINGS = "radiological_gradings.csv"
PATIENT, IVD, HERNIATION = "Patient", "IVD label", "Disc herniation"  # the public file's columns


# --- labels ---------------------------------------------------------------------------------------
def load_gradings(data_dir: Path) -> pd.DataFrame:
    """``radiological_gradings.csv`` as (patient str, disc SPIDER label 201.., herniation 0/1); an error
    naming the file and the columns it lacks."""
    path = Path(data_dir) / GRADINGS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; the herniation classifier learns from SPIDER's radiological gradings "
            "(set hernia.enabled=false to call herniations from the measured protrusion only)"
        )
    table = pd.read_csv(path)
    missing = [c for c in (PATIENT, IVD, HERNIATION) if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (found {list(table.columns)})")
    table = table.dropna(subset=[PATIENT, IVD, HERNIATION])
    return pd.DataFrame(
        {
            "patient": table[PATIENT].astype(int).astype(str),
            "disc": lab.DISC_OFFSET + table[IVD].astype(int),
            "herniation": (table[HERNIATION].astype(float) > 0).astype(int),
        }
    )


# --- patches --------------------------------------------------------------------------------------
def disc_frames(
    labels: np.ndarray, spacing
) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(mid-sagittal slice, {disc label: (centroid, long axis, normal)}) in mm (row, column) on that
    slice; discs with fewer than 3 pixels there are left out."""
    mid = mid_sagittal(labels)
    px = np.asarray(spacing, dtype=float)[1:]
    frames = {}
    for d in np.unique(labels[mid]):
        frame = disc_frame(labels[mid] == d, px) if lab.is_disc(d) else None
        if frame is not None:
            frames[int(d)] = frame
    return mid, frames


def disc_patches(vol: np.ndarray, labels: np.ndarray, spacing, hc) -> dict[int, np.ndarray]:
    """{disc label: (channels, side, side) float32} of a canonical image ``vol`` (normalized) and its
    label mask (module docstring); ``side`` = ``hernia.patch_px`` + 2 x ``hernia.jitter_px`` (training
    crops a random ``patch_px`` window, prediction the centre)."""
    from spine.spider.segment import channel_offsets  # the segmenter's neighbours (it imports this module)

    mid, frames = disc_frames(labels, spacing)
    offsets = channel_offsets(int(hc.context), float(hc.context_mm), float(spacing[0]))
    chans = np.clip(mid + np.asarray(offsets), 0, len(vol) - 1)  # edge slices repeated
    side = int(hc.patch_px) + 2 * int(hc.jitter_px)
    grid = (np.arange(side) - (side - 1) / 2) * float(hc.patch_mm)
    px = np.asarray(spacing, dtype=float)[1:]
    out = {}
    for d, (centre, axis, normal) in frames.items():
        # rows of the patch run inferior (-normal), columns posterior (+axis)
        pts = (
            (centre + float(hc.offset_mm) * axis)[None, None]
            - grid[:, None, None] * normal
            + grid[None, :, None] * axis
        )
        rc = (pts / px).transpose(2, 0, 1)
        out[d] = np.stack(
            [ndimage.map_coordinates(vol[s].astype(np.float32), rc, order=1, mode="nearest") for s in chans]
        )
    return out


# --- model ----------------------------------------------------------------------------------------
class HerniaNet(nn.Module):
    """A timm encoder (pooled features) and one logit."""

    def __init__(self, hc):
        super().__init__()
        self.encoder = build_encoder(hc.encoder, 2 * int(hc.context) + 1, hc.checkpoint, features_only=False)
        self.head = nn.Linear(self.encoder.num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(1)


class PatchSamples(Dataset):
    """Training patches: a random ``patch_px`` window of each (the jitter), intensity jitter and the
    left-right mirror (the channel order reversed)."""

    def __init__(self, patches: np.ndarray, targets: np.ndarray, hc):
        self.patches, self.targets, self.hc = patches, targets.astype(np.float32), hc

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        x, j, size = self.patches[i], int(self.hc.jitter_px), int(self.hc.patch_px)
        r0, c0 = (int(v) for v in torch.randint(2 * j + 1, (2,)))
        x = x[:, r0 : r0 + size, c0 : c0 + size]
        gain, shift, gamma = (1 + 0.2 * (torch.rand(3) * 2 - 1)).tolist()
        x = np.clip(x, 0, None) ** gamma * gain + (shift - 1)
        if torch.rand(()) < 0.5:
            x = x[::-1]
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "y": torch.tensor(self.targets[i]),
        }


def centre_crop(patches: np.ndarray, hc) -> np.ndarray:
    j, size = int(hc.jitter_px), int(hc.patch_px)
    return np.ascontiguousarray(patches[:, :, j : j + size, j : j + size], dtype=np.float32)


def hernia_loss(model, batch, device) -> torch.Tensor:
    logits = model(batch["x"].to(device))
    return nn.functional.binary_cross_entropy_with_logits(logits, batch["y"].to(device))


def make_loader(patches: np.ndarray, targets: np.ndarray, hc) -> DataLoader:
    ds = PatchSamples(patches, targets, hc)
    return DataLoader(ds, batch_size=int(hc.batch), shuffle=True, drop_last=len(ds) > int(hc.batch))


@torch.no_grad()
def predict(models: list, patches: np.ndarray, device, mirror: bool = True) -> np.ndarray:
    """Mean probability over ``models`` (and the left-right mirror) of each patch (n,)."""
    if not len(patches):
        return np.zeros(0)
    x = torch.from_numpy(patches).to(device)
    views = [x, x.flip(1)] if mirror else [x]
    total = sum(torch.sigmoid(m(v)) for m in models for v in views)
    return (total / (len(models) * len(views))).cpu().numpy()


# --- the stages -----------------------------------------------------------------------------------
def classifier_key(cfg, paths, train: pd.DataFrame) -> str | None:
    """What the fold classifiers are made from (config, folds, seed, training images, gradings), or None
    when they are not made (``hernia.enabled`` false, or no gradings file: the rule's probability
    stays, and stage 02 says so)."""

    if not cfg.hernia.enabled:
        return None
    try:
        grades = load_gradings(paths.data_dir)
    except FileNotFoundError as e:
        log.warning("%s", e)
        return None
    grades_id = fingerprint(grades.values.tolist())
    return fold_key(cfg.hernia, paths.folds.read_text(), cfg.seed, sorted(train["image"]), grades_id)


def training_patches(rows: pd.DataFrame, hc, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Patches on the true masks' discs of the images in ``rows`` (image_path, mask_path, patient) and
    their gradings' herniation (discs without a grading are left out)."""

    grades = load_gradings(data_dir)
    target = {(p, d): h for p, d, h in zip(grades["patient"], grades["disc"], grades["herniation"])}
    xs, ys = [], []
    for r in rows.to_dict("records"):
        img, mask = io.read_canonical(Path(r["image_path"])), io.read_canonical(Path(r["mask_path"]))
        for d, x in disc_patches(normalize(img.array), mask.array, img.spacing, hc).items():
            if (str(r["patient"]), d) in target:
                xs.append(x)
                ys.append(target[(str(r["patient"]), d)])
    side = int(hc.patch_px) + 2 * int(hc.jitter_px)
    shape = (0, 2 * int(hc.context) + 1, side, side)
    return (np.stack(xs).astype(np.float32) if xs else np.zeros(shape, np.float32)), np.array(ys, int)


def fold_classifier(cfg, paths, rest: pd.DataFrame, fold: int, key: str | None, device):
    """Fold ``fold``'s classifier, trained on the patches of the images in ``rest`` (or its checkpoint);
    None without a key, or when the training discs are all of one class."""

    if key is None:
        return None
    hc, ckpt = cfg.hernia, paths.segmenter_checkpoint(fold, cfg.seed, "hernia")
    if not is_current(ckpt, key):  # to be trained: its patches
        x, y = training_patches(rest, hc, paths.data_dir)
        if len(set(y.tolist())) < 2:
            log.warning(
                "fold %d: %d graded discs, %d herniated: no herniation classifier", fold, len(y), y.sum()
            )
            ckpt.unlink(missing_ok=True)  # one made from other inputs must not be used by stage 06
            return None
        log.info("fold %d: herniation classifier on %d discs (%d herniated)", fold, len(y), y.sum())

    def fit_fold(model):
        settings = TrainSettings.from_config(hc, cfg.seed + fold)
        return fit(model, make_loader(x, y, hc), hernia_loss, settings, ckpt, device, f"fold {fold} hernia")

    model, _ = fold_model(ckpt, key, cfg.seed + fold, lambda: HerniaNet(hc), fit_fold, device)
    return model.eval()


def load_classifiers(cfg, paths, folds: list[int], device) -> list:
    """The fold classifiers stage 02 made (none when it made none: the rule's probability stays)."""

    if not cfg.hernia.enabled:
        return []
    ckpts = [paths.segmenter_checkpoint(f, cfg.seed, "hernia") for f in folds]
    return [load_weights(HerniaNet(cfg.hernia), c, device).eval() for c in ckpts if c.exists()]


def disc_probabilities(
    models: list, image: np.ndarray, labels: np.ndarray, spacing, hc, device
) -> dict[int, float]:
    """{disc label: herniation probability} of one canonical image and its (predicted) label mask."""
    if not models:
        return {}
    patches = disc_patches(normalize(image), labels, spacing, hc)
    if not patches:
        return {}
    probs = predict(models, centre_crop(np.stack(list(patches.values())), hc), device, bool(hc.mirror))
    return dict(zip(patches, probs.tolist()))


def with_probabilities(table: pd.DataFrame, probs: dict[int, float], n_lumbar: int = 5) -> pd.DataFrame:
    """The measurement table with each lumbar disc's ``herniation_probability`` from the classifier (a
    row is added for a disc the measurements could not read; discs above L1/L2 are not measured)."""

    rows = {
        (lab.disc_name(d, n_lumbar), "herniation_probability"): p
        for d, p in probs.items()
        if d - lab.DISC_OFFSET <= n_lumbar
    }
    if not rows:
        return table
    keep = [key not in rows for key in zip(table["structure"], table["measurement"])]
    new = pd.DataFrame(
        [(s, m, p, UNITS[m]) for (s, m), p in rows.items()],
        columns=["structure", "measurement", "value", "unit"],
    )
    return pd.concat([table[keep], new], ignore_index=True)


def classified(
    table: pd.DataFrame, models: list, image: np.ndarray, labels: np.ndarray, spacing, cfg, device
) -> pd.DataFrame:
    """One image's measurement table with the ``models``' herniation probabilities (stages 02 and 06,
    and the lumbar task through ``spine.spider.api``; unchanged without models). ``image``: the
    canonical array, ``labels``: its predicted label mask, ``spacing``: mm per voxel of both."""
    probs = disc_probabilities(models, image, labels, spacing, cfg.hernia, device)
    return with_probabilities(table, probs, measure_kwargs(cfg).get("n_lumbar", 5))
