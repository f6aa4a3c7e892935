"""Overlays for a person: landmarks, each vertebra's line and the three Cobb angles on the radiograph.

Training images show the out-of-fold landmarks of stage 02 (red) beside the labelled ones (green), the
predicted line of every vertebra (yellow) and, for PT, MT and TL/L, the lines of the curve's two end
vertebrae drawn long, in the angle's colour, with the predicted and labelled angles. Test images (after
stage 06) show the predicted landmarks and angles only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from spine.core.paths import Paths, require
from spine.scoliosis.cobb import cobb_angles
from spine.scoliosis.data import (
    image_path,
    landmark_columns,
    landmarks_from_flat,
    oof_landmarks,
    read_angles,
    read_filenames,
    read_landmarks,
    test_landmarks,
)
from spine.scoliosis.preprocess import read_image
from spine.scoliosis.task import ANGLES

log = logging.getLogger(__name__)

COLOURS = {"pt": (255, 160, 0), "mt": (255, 0, 255), "tl": (0, 200, 255)}  # BGR
DISPLAY_HEIGHT = 900  # pixels of a written overlay


def draw(
    img: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, label: np.ndarray | None, s_smooth: int = 1
) -> np.ndarray:
    """The overlay (BGR) of one radiograph: ``pred`` / ``truth`` corners (17, 4, 2) in its pixels,
    ``label`` its labelled PT, MT, TL/L (or None); ``s_smooth``: as ``cobb_angles``."""
    scale = DISPLAY_HEIGHT / img.shape[0]
    out = cv2.cvtColor(
        cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR
    )
    pred, truth = pred * scale, None if truth is None else truth * scale
    pt = lambda p: (int(round(p[0])), int(round(p[1])))
    if truth is not None:
        for p in truth.reshape(-1, 2):
            cv2.circle(out, pt(p), 2, (0, 220, 0), -1, cv2.LINE_AA)
    left, right = (pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2
    for a, b in zip(left, right):
        cv2.line(out, pt(a), pt(b), (0, 230, 230), 1, cv2.LINE_AA)
    for p in pred.reshape(-1, 2):
        cv2.circle(out, pt(p), 2, (0, 0, 255), -1, cv2.LINE_AA)
    cobb = cobb_angles(pred / scale, img.shape[0], s_smooth)
    for k, name in enumerate(ANGLES):
        for v in cobb.ends[name]:
            d = (right[v] - left[v]) / max(np.linalg.norm(right[v] - left[v]), 1e-6)
            mid = (left[v] + right[v]) / 2
            cv2.line(
                out,
                pt(mid - 0.9 * d * out.shape[1] / 2),
                pt(mid + 0.9 * d * out.shape[1] / 2),
                COLOURS[name],
                1,
                cv2.LINE_AA,
            )
        text = f"{name.upper()} {cobb.angles()[k]:.1f}" + (
            "" if label is None else f" (label {label[k]:.1f})"
        )
        cv2.putText(
            out, text, (5, 18 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, COLOURS[name], 1, cv2.LINE_AA
        )
    return out


def write_overlays(cfg, n: int = 3, out=None) -> list[Path]:
    """PNGs of the first ``n`` training images with OOF landmarks and of the first ``n`` test images
    stage 06 predicted, in ``out`` (default ``localize/scoliosis/overlays``)."""
    paths = Paths.from_config(cfg)
    folder = Path(out) if out else paths.localize_dir / "overlays"
    oof = pd.read_csv(require(oof_landmarks(paths), "02_localize"), dtype={"filename": str})
    names = read_filenames(paths.data_dir, "train")
    row_of = {name: i for i, name in enumerate(names)}
    labels, angles = read_landmarks(paths.data_dir), read_angles(paths.data_dir)
    jobs = [
        ("train", r, labels[row_of[r.filename]], angles[row_of[r.filename]]) for r in oof.head(n).itertuples()
    ]
    if test_landmarks(paths).exists():
        test = pd.read_csv(test_landmarks(paths), dtype={"filename": str})
        jobs += [("test", r, None, None) for r in test.head(n).itertuples()]
    written = []
    for split, row, truth_norm, label in jobs:
        img, _, reason = read_image(image_path(paths.data_dir, split, row.filename))
        if img is None:
            log.warning("%s %s: no overlay (%s)", split, row.filename, reason)
            continue
        pred = landmarks_from_flat(np.array([[getattr(row, c) for c in landmark_columns()]]))[0]
        truth = None if truth_norm is None else truth_norm * [img.shape[1], img.shape[0]]
        path = folder / f"{split}_{Path(row.filename).stem.replace(' ', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), draw(img, pred, truth, label, cfg.cobb.s_test_smooth))
        written.append(path)
    return written
