"""The AASCE 2019 download's layout, and this task's artifact file names (one place for both).

data_dir/data/{training,test}/<name>.jpg
data_dir/labels/{training,test}/filenames.csv    no header; one image name a row: the row order
data_dir/labels/training/landmarks.csv           no header; x1..x68 then y1..y68, divided by the image's
                                                 width / height (17 vertebrae T1..L5 x 4 corners)
data_dir/labels/training/angles.csv              no header; PT, MT, TL/L in degrees

Test labels are never read here: they live in the generator's truth folder (or nowhere, on real data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine.core.paths import Paths
from spine.scoliosis.task import ANGLES, N_POINTS

FOLDER = {"train": "training", "test": "test"}  # pipeline split -> the download's folder name


def image_path(data_dir: Path, split: str, name: str) -> Path:
    return Path(data_dir) / "data" / FOLDER[split] / name


def labels_dir(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / "labels" / FOLDER[split]


def read_filenames(data_dir: Path, split: str) -> list[str]:
    """The split's image names in ``filenames.csv`` order (names may hold spaces)."""
    path = labels_dir(data_dir, split) / "filenames.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is data_dir the AASCE 2019 folder (data/, labels/)?")
    return pd.read_csv(path, header=None, dtype=str)[0].str.strip().tolist()


def read_landmarks(data_dir: Path) -> np.ndarray:
    """Training landmarks, normalized: (n, 17, 4, 2) as (x / width, y / height), rows as filenames.csv."""
    raw = pd.read_csv(labels_dir(data_dir, "train") / "landmarks.csv", header=None).to_numpy(np.float64)
    if raw.shape[1] != 2 * N_POINTS:
        raise ValueError(f"landmarks.csv has {raw.shape[1]} columns, expected {2 * N_POINTS}")
    return landmarks_from_flat(raw)


def read_angles(data_dir: Path) -> np.ndarray:
    """Training angles (n, 3): PT, MT, TL/L in degrees, rows as filenames.csv."""
    raw = pd.read_csv(labels_dir(data_dir, "train") / "angles.csv", header=None).to_numpy(np.float64)
    if raw.shape[1] != len(ANGLES):
        raise ValueError(f"angles.csv has {raw.shape[1]} columns, expected {len(ANGLES)}")
    return raw


def landmarks_from_flat(flat: np.ndarray) -> np.ndarray:
    """(n, 136) rows of x1..x68, y1..y68 → (n, 17, 4, 2)."""
    flat = np.asarray(flat, dtype=np.float64)
    xy = np.stack([flat[:, :N_POINTS], flat[:, N_POINTS:]], axis=-1)
    return xy.reshape(len(flat), -1, 4, 2)


def landmarks_to_flat(points: np.ndarray) -> np.ndarray:
    """(n, 17, 4, 2) → (n, 136) rows of x1..x68, y1..y68 (the label file's layout)."""
    p = np.asarray(points, dtype=np.float64).reshape(len(points), N_POINTS, 2)
    return np.concatenate([p[..., 0], p[..., 1]], axis=1)


def landmark_columns() -> list[str]:
    return [f"x{i}" for i in range(1, N_POINTS + 1)] + [f"y{i}" for i in range(1, N_POINTS + 1)]


# --- this task's artifacts, under the core's folders ---------------------------------------------


def cache_images(paths: Paths, split: str) -> Path:
    """Stage 01: (n, H, W) uint8 images of a split at the model size, rows as ``cache_table``."""
    return paths.cache_dir / f"{split}_images.npy"


def cache_table(paths: Paths) -> Path:
    """Stage 01: one row per image: split, index, filename, status, reason, height, width, channels."""
    return paths.cache_dir / "images.csv"


def fold_predictions(paths: Paths, fold: int) -> Path:
    """Stage 02: one fold's held-out landmarks (px); marks the fold done."""
    return paths.localize_dir / "folds" / f"fold{fold}.csv"


def oof_landmarks(paths: Paths) -> Path:
    """Stage 02: every readable training image's out-of-fold landmarks (px) and angles."""
    return paths.localize_dir / "landmarks.csv"


def test_landmarks(paths: Paths) -> Path:
    """Stage 06: the fold-mean landmarks (px) of every readable test image."""
    return paths.predict_dir / "landmarks.csv"


def heights_submission(paths: Paths) -> Path:
    """Stage 06: the heights table beside the angles submission."""
    return paths.submission.with_name(f"{paths.task}_{paths.exp}_heights.csv")
