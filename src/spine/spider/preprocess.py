"""Stage 01 (spider): every .mha image (and train mask) reoriented to the canonical layout and resampled
in-plane to a fixed mm grid, cached as .npy with one table of geometry.

Per image, under ``cache/spider/<split>/``: ``<image>.npy`` (float16 [s, r, c], intensities scaled so the
0.5th..99.5th percentiles map to 0..1), ``<image>.mask.npy`` for train images (uint8 classes of
``CLASSES``: the mask resampled by nearest neighbour) and ``<image>.json`` (its table row, written last:
its presence with a current key marks the image done). ``images.parquet`` gathers the rows (image,
patient, sequence, split, paths, the file's orientation code, native canonical shape and spacing, grid
shape and spacing, status, reason). An unreadable image or mask is a counted, logged skip naming the file
and the reason (status "failed", also in ``failures.csv``); the rest of the run goes on. Resumable: an
image is redone only when its file or ``preprocess.grid_mm`` changed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from spine.core.io import fingerprint, is_current, mark_current, save_npy, save_table, save_text
from spine.core.paths import Paths
from spine.spider import io
from spine.spider.labels import CANAL, is_disc, is_partial, is_vertebra

log = logging.getLogger(__name__)

CLASSES = ("background", "vertebra", "disc", "canal")  # what the segmenter predicts per voxel


def to_classes(labels: np.ndarray) -> np.ndarray:
    """SPIDER label ids -> ``CLASSES`` indices (uint8): vertebrae (also partially visible ones) 1,
    discs 2, the canal 3, everything else 0."""
    out = np.zeros(labels.shape, np.uint8)
    for value in np.unique(labels):
        if is_vertebra(value) or is_partial(value):
            out[labels == value] = 1
        elif is_disc(value):
            out[labels == value] = 2
        elif value == CANAL:
            out[labels == value] = 3
    return out


def normalize(vol: np.ndarray) -> np.ndarray:
    """MR intensities have no unit: the 0.5th..99.5th percentiles map to 0..1 (float16)."""
    vol = vol.astype(np.float32)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    return ((vol - lo) / max(float(hi - lo), 1e-6)).clip(-0.5, 1.5).astype(np.float16)


def image_table_path(cache: Path) -> Path:
    return Path(cache) / "images.parquet"


def failures_path(cache: Path) -> Path:
    return Path(cache) / "failures.csv"


def cached(cache: Path, split: str, image: str, what: str = "image") -> Path:
    """Cache file of one image: ``what`` = image (the .npy), mask, or row (its table row, JSON)."""
    suffix = {"image": ".npy", "mask": ".mask.npy", "row": ".json"}[what]
    return Path(cache) / split / f"{image}{suffix}"


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [Path(path).name, st.st_size, st.st_mtime_ns]


def cache_image(row: dict, cache: Path, grid_mm: float) -> dict:
    """Read, reorient, resample and write one image (and its mask); returns its table row. Raises
    ValueError naming the file when the image or mask cannot be used."""
    img = io.read_canonical(Path(row["image_path"]))
    grid = io.resample_inplane(img.image, grid_mm)
    vol = sitk.GetArrayFromImage(grid)
    out = {
        **row,
        "orientation": img.orientation,
        "shape": list(img.array.shape),
        "spacing": list(img.spacing),
        "grid_shape": list(vol.shape),
        "grid_spacing": [img.spacing[0], grid_mm, grid_mm],
        "status": "ok",
        "reason": "",
    }
    if row["mask_path"]:
        mask = io.read_canonical(Path(row["mask_path"]))
        if not io.same_grid(mask.image, img.image):
            raise ValueError(f"{row['mask_path']}: the mask's geometry differs from its image's")
        labels = io.resample_inplane(mask.image, grid_mm, labels=True)
        classes = to_classes(sitk.GetArrayFromImage(labels))
        save_npy(cached(cache, row["split"], row["image"], "mask"), classes)
    save_npy(cached(cache, row["split"], row["image"], "image"), normalize(vol))
    return out


def cache_split(images: pd.DataFrame, cache: Path, grid_mm: float, desc: str = "cache") -> pd.DataFrame:
    """Cache every image of ``images`` (``io.list_images`` rows), skipping current ones; returns their
    table rows, failed ones with status "failed" and the reason."""
    rows = []
    for row in tqdm(images.to_dict("records"), desc=desc, leave=False, dynamic_ncols=True):
        marker = cached(cache, row["split"], row["image"], "row")
        try:
            mask_id = _file_id(row["mask_path"]) if row["mask_path"] else None
            key = fingerprint(grid_mm, _file_id(row["image_path"]), mask_id)
            if is_current(marker, key):
                rows.append(json.loads(marker.read_text()))
                continue
            out = cache_image(row, cache, grid_mm)
        except (ValueError, RuntimeError, OSError) as e:
            log.warning("skipped %s: %s", row["image"], e)
            rows.append({**row, "status": "failed", "reason": str(e)})
            continue
        save_text(marker, json.dumps(out))
        mark_current(marker, key)
        rows.append(out)
    return pd.DataFrame(rows)


def run_cache(
    images: pd.DataFrame, cache: Path, grid_mm: float, max_failed_share: float
) -> tuple[pd.DataFrame, dict]:
    """Cache ``images`` under ``cache`` and write its tables; returns (the image table, a report). An
    error when too many failed (a wrong data_dir rather than a few bad files)."""
    t0 = time.perf_counter()
    table = cache_split(images, cache, grid_mm)
    save_table(image_table_path(cache), table)
    failed = table[table["status"] == "failed"] if len(table) else table
    save_table(failures_path(cache), failed.reindex(columns=["image", "split", "image_path", "reason"]))
    for split, part in table.groupby("split"):
        share = (part["status"] == "failed").mean()
        if share > max_failed_share:
            first = part[part["status"] == "failed"].iloc[0]["reason"]
            raise RuntimeError(
                f"{share:.0%} of the {split} images failed (e.g. {first}); see {failures_path(cache)}"
            )
    seconds = time.perf_counter() - t0
    return table, {
        "images": len(table),
        "failed": len(failed),
        "failed_images": failed["image"].tolist() if len(failed) else [],
        "seconds": round(seconds, 1),
    }


def run_preprocess(cfg) -> dict:
    """Stage 01: cache the splits of ``preprocess.splits`` (``preprocess.limit`` images of each at
    most) under ``cache/spider/``."""
    pc = cfg.preprocess
    paths = Paths.from_config(cfg)
    if pc.overwrite and paths.cache_dir.exists():
        import shutil

        shutil.rmtree(paths.cache_dir)
    images = io.list_images(paths.data_dir)
    if images.empty:
        raise FileNotFoundError(f"{paths.data_dir}: no images/*.mha (the SPIDER layout)")
    images = images[images["split"].isin(list(pc.splits))]
    if pc.limit:
        images = images.groupby("split", group_keys=False).head(int(pc.limit))
    _, report = run_cache(images, paths.cache_dir, float(pc.grid_mm), float(pc.max_failed_share))
    counts = images["split"].value_counts().to_dict()
    report["summary"] = {
        "cache": str(paths.cache_dir),
        **{f"{s} images": n for s, n in sorted(counts.items())},
        "failed (skipped, named in failures.csv)": report["failed"],
        "seconds": report["seconds"],
    }
    return report


def load_table(cache: Path) -> pd.DataFrame:
    """The cache's image table (stage 01 must have run)."""
    path = image_table_path(cache)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python src/01_preprocess.py` with this config")
    return pd.read_parquet(path)
