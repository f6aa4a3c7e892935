"""Stage 01 (scoliosis): every train and test JPG → one uint8 array per split at the model size.

Each image is read as grayscale whatever its channels (3-channel JPGs are averaged by OpenCV's
conversion), equalized with CLAHE at its own size (contrast varies a lot between radiographs), then
resized to ``preprocess.image_size`` (rows, cols) regardless of its aspect ratio. The scale factors
follow from the original height and width kept in the table, so landmarks map back exactly. An image
that cannot be read is a row with its reason (logged, counted), never the end of the run.

Writes ``cache/scoliosis/{train,test}_images.npy`` and ``images.csv`` (``IMAGE_COLUMNS``), remade only
when the data's file list or the preprocess settings change.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from spine.core.config import save_config
from spine.core.io import fingerprint, is_current, mark_current, save_npy, save_table
from spine.core.paths import Paths
from spine.scoliosis.data import cache_images, cache_table, image_path, read_filenames

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["split", "index", "filename", "status", "reason", "height", "width", "channels"]


def read_image(path: Path) -> tuple[np.ndarray | None, int, str]:
    """(grayscale uint8 image or None, channels of the file, reason it failed or '')."""
    if not Path(path).exists():
        return None, 0, "file not found"
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        return None, 0, "unreadable image (not a complete JPG/PNG)"
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    img = raw if channels == 1 else cv2.cvtColor(raw[..., :3], cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:  # 16-bit exports: stretch to 8 bits
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return img, channels, ""


def prepare(img: np.ndarray, size: tuple[int, int], clip: float, tiles: int) -> np.ndarray:
    """CLAHE at the image's own size, then a resize to ``size`` (rows, cols)."""
    if clip:
        img = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tiles), int(tiles))).apply(img)
    return cv2.resize(img, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA)


def load_split(data_dir: Path, split: str, pc, limit: int | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """A split's images at the model size (unreadable ones all zero) and their ``IMAGE_COLUMNS`` rows."""
    names = read_filenames(data_dir, split)[:limit] if limit else read_filenames(data_dir, split)
    size = tuple(pc.image_size)
    out = np.zeros((len(names), *size), np.uint8)
    rows = []
    for i, name in enumerate(tqdm(names, desc=f"01 {split}", leave=False, dynamic_ncols=True)):
        img, channels, reason = read_image(image_path(data_dir, split, name))
        if img is None:
            log.warning("%s %s: skipped (%s)", split, name, reason)
            rows.append((split, i, name, "failed", reason, np.nan, np.nan, channels))
            continue
        out[i] = prepare(img, size, pc.clahe_clip, pc.clahe_tiles)
        rows.append((split, i, name, "ok", "", img.shape[0], img.shape[1], channels))
    return out, pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def cache_key(cfg, paths: Paths) -> str:
    """What the cache is made from: the preprocess settings and each split's file names and sizes."""
    pc = cfg.preprocess
    files = []
    for split in pc.splits:
        for name in read_filenames(paths.data_dir, split):
            p = image_path(paths.data_dir, split, name)
            files.append((split, name, p.stat().st_size if p.exists() else -1))
    settings = [list(pc.splits), pc.limit, list(pc.image_size), pc.clahe_clip, pc.clahe_tiles]
    return fingerprint(str(paths.data_dir.resolve()), settings, files)


def run_preprocess(cfg) -> dict:
    """Stage 01: cache every split's images; a cache made from the same files and settings is kept."""
    paths = Paths.from_config(cfg)
    pc = cfg.preprocess
    start = time.perf_counter()
    key = cache_key(cfg, paths)
    table_path = cache_table(paths)
    if is_current(table_path, key) and not pc.overwrite:
        table = pd.read_csv(table_path)
        log.info("%s is current; kept", paths.cache_dir)
    else:
        tables = []
        for split in pc.splits:
            images, table = load_split(paths.data_dir, split, pc, pc.limit)
            failed = (table["status"] != "ok").mean() if len(table) else 0.0
            if failed > pc.max_failed_share:
                raise RuntimeError(
                    f"{failed:.0%} of the {split} images could not be read (more than "
                    f"preprocess.max_failed_share={pc.max_failed_share}); first: "
                    f"{table[table['status'] != 'ok'].head(3)[['filename', 'reason']].to_dict('records')}"
                )
            save_npy(cache_images(paths, split), images)
            tables.append(table)
        table = pd.concat(tables, ignore_index=True)
        save_table(table_path, table)
        mark_current(table_path, key)
        save_config(cfg, paths.cache_dir)
    failed = table[table["status"] != "ok"]
    summary = {
        "images": {s: int((table["split"] == s).sum()) for s in pc.splits},
        "failed": failed[["split", "filename", "reason"]].to_dict("records"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    summary["summary"] = {
        **{f"{s} images": n for s, n in summary["images"].items()},
        "unreadable (skipped, named in images.csv)": len(failed),
        "model size (rows, cols)": list(pc.image_size),
        "cache": str(paths.cache_dir),
        "seconds": summary["seconds"],
    }
    return summary
