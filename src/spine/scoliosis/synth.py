"""Synthetic AP spine radiographs in the AASCE 2019 layout, with the 68 landmarks and Cobb angles.

Each image is a frontal (AP) radiograph of a phantom: air, a torso of soft tissue with darker lungs,
ribs from each thoracic vertebra, the iliac wings and sacrum, and the 17 vertebral bodies T1..L5 with
a bright cortex, two pedicles and a spinous process. The spine is built in millimetres from the tilt of
each vertebra along its length: straight, C-shaped (one curve, compensated above and below) or S-shaped
(two opposite curves), main angle ~0-70°; some vertebrae are wedged (top and bottom endplates not
parallel) or rotated (pedicles and spinous process shifted sideways). Images vary in size, aspect
ratio, exposure, gamma, noise and sharpness, some are saved as 3-channel JPGs and some look inverted.

Labels are those of the real download (``spine.scoliosis.data``): corners in normalized coordinates, and
angles computed from the landmarks with the challenge's routine (``spine.scoliosis.cobb``), as the real
ones were. Test labels go to the truth folder only: ``test_angles.csv`` (filename,pt,mt,tl: the
solution ``src/score.py`` reads), ``test_landmarks.csv``, ``images.csv`` (how each image was drawn) and
``summary.json`` (with the train-mean baseline's test SMAPE). One test image is written unreadable
(``corrupt_test``), as broken downloads are.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from spine.core.synth import common
from spine.scoliosis.cobb import cobb_angles, score_angles
from spine.scoliosis.data import FOLDER, image_path, labels_dir, landmark_columns, landmarks_to_flat
from spine.scoliosis.task import ANGLES

log = logging.getLogger(__name__)

# Vertebral body size in mm, T1 -> T12 -> L5 (adult averages, rounded): height, width, disc below.
BODY_HEIGHT = np.interp(np.arange(17), [0, 11, 16], [14.0, 23.0, 27.0])
BODY_WIDTH = np.interp(np.arange(17), [0, 11, 16], [28.0, 42.0, 50.0])
DISC_HEIGHT = np.interp(np.arange(17), [0, 11, 16], [4.0, 6.0, 11.0])
CURVES = {"straight": 0.2, "C": 0.4, "S": 0.4}  # share of each curve type


@dataclass
class Spine:
    """One drawn spine: corners (17, 4, 2) in pixels and what made it."""

    corners: np.ndarray
    curve: str
    design_angle: float  # the main curve's designed angle (the label is measured from the corners)
    rotation: np.ndarray  # (17,) axial rotation as a share of the half width (pedicle shift)


def tilt_profile(rng: np.random.Generator) -> tuple[str, np.ndarray, float]:
    """(curve type, tilt of each vertebra in degrees, the main curve's designed angle).

    Tilts are set at a few knot vertebrae and eased between them (a cosine ramp, monotone between two
    knots), so the angle between two knots is their tilt difference.
    """
    curve = rng.choice(list(CURVES), p=list(CURVES.values()))
    main = rng.uniform(0, 10) if curve == "straight" else rng.uniform(10, 70)
    side = rng.choice([-1.0, 1.0])
    lean = rng.normal(0, 2)
    if curve == "S":
        u = int(rng.integers(1, 5))
        m = int(rng.integers(u + 4, u + 8))
        l_ = int(rng.integers(min(m + 3, 16), 17))
        second = main * rng.uniform(0.4, 1.0)
        if rng.random() < 0.3:  # a lumbar major curve: the lower one is the larger
            main, second = second, main
        top = main / 2
        knots = [0, u, m, l_, 16]
        values = [top - rng.uniform(0, 0.3) * main, top, top - main, top - main + second, top - main + second]
    else:
        u = int(rng.integers(1, 7))
        l_ = int(rng.integers(min(u + 5, 16), min(u + 12, 17)))
        knots = [0, u, l_, 16]
        values = [main / 2 - rng.uniform(0.1, 0.5) * main, main / 2, -main / 2, -main / 2]
        values[3] += rng.uniform(0.1, 0.5) * main if l_ < 16 else 0.0
    knots, idx = np.unique(knots, return_index=True)
    values = np.asarray(values)[idx]
    tilt = np.empty(17)
    for a, b, va, vb in zip(knots[:-1], knots[1:], values[:-1], values[1:]):
        t = (np.arange(a, b + 1) - a) / max(1, b - a)
        tilt[a : b + 1] = va + (vb - va) * (1 - np.cos(np.pi * t)) / 2
    tilt = side * tilt + lean + rng.normal(0, 0.8, 17)
    return str(curve), tilt, float(main)


def build_spine(rng: np.random.Generator, h: int, w: int) -> Spine:
    """Corners in pixels of a spine placed on an h x w image."""
    curve, tilt, main = tilt_profile(rng)
    size = rng.uniform(0.9, 1.1)
    heights = BODY_HEIGHT * size * rng.uniform(0.92, 1.08, 17)
    widths = BODY_WIDTH * size * rng.uniform(0.93, 1.07, 17)
    discs = DISC_HEIGHT * size * rng.uniform(0.8, 1.2, 17)
    wedge = np.where(rng.random(17) < 0.2, rng.uniform(-6, 6, 17), 0.0)  # degrees, top vs bottom
    theta = np.radians(tilt)
    down = np.stack([np.sin(theta), np.cos(theta)], 1)  # each vertebra's axis, image y pointing down
    centres = np.zeros((17, 2))
    for i in range(1, 17):
        step = (heights[i - 1] / 2 + discs[i - 1] + heights[i] / 2) * (down[i - 1] + down[i]) / 2
        centres[i] = centres[i - 1] + step
    corners = np.zeros((17, 4, 2))
    for i in range(17):
        for row, sign in ((0, -1), (1, 1)):  # top endplate (wedge opens one way), bottom endplate
            t = theta[i] - sign * np.radians(wedge[i]) / 2
            across = np.array([np.cos(t), -np.sin(t)])  # along the endplate, to the image's right
            mid = centres[i] + sign * heights[i] / 2 * down[i]
            corners[i, 2 * row] = mid - widths[i] / 2 * across
            corners[i, 2 * row + 1] = mid + widths[i] / 2 * across
    # Millimetres to pixels: the spine spans 70-85 % of the image height (less when a wide curve would
    # not fit the width), centred near the middle and never cut by the image's sides.
    span = corners.max(axis=(0, 1)) - corners.min(axis=(0, 1))
    px = min(rng.uniform(0.70, 0.85) * h / span[1], 0.92 * w / span[0])
    corners = corners * px
    corners[..., 0] += w / 2 + rng.normal(0, 0.03) * w - corners[..., 0].mean()
    corners[..., 0] += max(0.0, 0.02 * w - corners[..., 0].min()) - max(0.0, corners[..., 0].max() - 0.98 * w)
    top = rng.uniform(0.04, 0.97 * h - (corners[..., 1].max() - corners[..., 1].min()))
    corners[..., 1] += top - corners[..., 1].min()
    rotation = np.clip(np.gradient(tilt) / 15 + rng.normal(0, 0.05, 17), -0.35, 0.35)
    return Spine(corners, curve, main, rotation)


# --- rendering ----------------------------------------------------------------------------------


def _layer(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w), np.uint8)


def _pts(points) -> np.ndarray:
    """Sub-pixel polygon points for cv2 (shift=4)."""
    return np.round(np.asarray(points) * 16).astype(np.int32).reshape(-1, 1, 2)


def _ellipse(img, centre, axes, angle, thickness):
    c = tuple(int(v) for v in np.round(np.asarray(centre) * 16))
    a = tuple(max(1, int(v)) for v in np.round(np.asarray(axes) * 16))
    cv2.ellipse(img, c, a, angle, 0, 360, 255, thickness, cv2.LINE_AA, 4)


def render(spine: Spine, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The radiograph (h, w) float32 in 0..1 (bright = dense) of one spine, before exposure effects."""
    c = spine.corners
    centres = c.mean(axis=1)
    widths = np.linalg.norm(c[:, 1] - c[:, 0], axis=1)
    heights = np.linalg.norm(c[:, 2] - c[:, 0], axis=1)
    img = np.full((h, w), 0.04, np.float32)

    def add(layer: np.ndarray, value: float, blur: float) -> None:
        img[:] += value * _blurred(layer, blur)

    # Soft tissue: a torso band around the spine, wider at the pelvis; darker lungs in the thorax.
    torso = _layer(h, w)
    ys = np.linspace(0, h - 1, 24)
    half = w * (0.40 + 0.06 * np.interp(ys, [0, 0.6 * h, h], [-1.0, -0.3, 1.0])) * rng.uniform(0.9, 1.15)
    cx = np.interp(ys, centres[:, 1], centres[:, 0])
    outline = np.concatenate([np.stack([cx - half, ys], 1), np.stack([cx + half, ys], 1)[::-1]])
    cv2.fillPoly(torso, [_pts(outline)], 255, cv2.LINE_AA, 4)
    add(torso, rng.uniform(0.18, 0.30), 0.02 * w)
    lungs = _layer(h, w)
    t1, t12 = centres[0], centres[11]
    for side in (-1, 1):
        centre = ((t1 + t12) / 2) + [side * 0.22 * w, 0]
        _ellipse(lungs, centre, (0.17 * w, 0.5 * abs(t12[1] - t1[1]) + 0.05 * h), 0, -1)
    add(lungs, -rng.uniform(0.05, 0.12), 0.03 * w)

    # Ribs: an arc from each thoracic vertebra's side, out and down; the iliac wings and the sacrum.
    ribs = _layer(h, w)
    for i in range(12):
        length = w * (0.36 - 0.018 * max(0, i - 7) ** 1.5)
        for side in (-1, 1):
            t = np.linspace(0, 1, 16)
            x = centres[i, 0] + side * (widths[i] * 0.55 + length * np.sin(t * np.pi / 2))
            y = centres[i, 1] - 0.3 * heights[i] + length * (0.55 * t**2 - 0.12 * np.sin(np.pi * t))
            thick = max(1, int(heights[i] * 0.45))
            cv2.polylines(ribs, [_pts(np.stack([x, y], 1))], False, 255, thick, cv2.LINE_AA, 4)
    add(ribs, rng.uniform(0.07, 0.13), 0.004 * w)
    pelvis = _layer(h, w)
    l5 = centres[16]
    for side in (-1, 1):
        _ellipse(pelvis, l5 + [side * 0.24 * w, 0.9 * heights[16] + 0.06 * h], (0.16 * w, 0.09 * h), 0, -1)
    sacrum = [c[16, 2] + [0, heights[16] * 0.3], c[16, 3] + [0, heights[16] * 0.3], l5 + [0, 3 * heights[16]]]
    cv2.fillPoly(pelvis, [_pts(sacrum)], 255, cv2.LINE_AA, 4)
    add(pelvis, rng.uniform(0.08, 0.14), 0.006 * w)

    # Vertebrae: body, cortex rim, pedicles (shifted by axial rotation), spinous process.
    bodies, rims, posterior = _layer(h, w), _layer(h, w), _layer(h, w)
    for i in range(17):
        quad = c[i, [0, 1, 3, 2]]
        cv2.fillPoly(bodies, [_pts(quad)], 255, cv2.LINE_AA, 4)
        cv2.polylines(rims, [_pts(quad)], True, 255, max(1, int(round(widths[i] * 0.06))), cv2.LINE_AA, 4)
        across = (c[i, 1] - c[i, 0]) / max(widths[i], 1e-6)
        angle = math.degrees(math.atan2(across[1], across[0]))
        shift = spine.rotation[i] * widths[i] / 2 * across
        upper = centres[i] - 0.15 * (c[i, 2] - c[i, 0])
        for side in (-1, 1):
            p = upper + side * 0.32 * widths[i] * across + shift * (1 - 0.5 * side * spine.rotation[i])
            _ellipse(
                posterior, p, (0.09 * widths[i], 0.16 * heights[i]), angle, max(1, int(widths[i] * 0.04))
            )
        _ellipse(posterior, centres[i] - shift * 1.5, (0.05 * widths[i], 0.2 * heights[i]), angle, -1)
    add(bodies, rng.uniform(0.25, 0.38), 0.002 * w)
    add(rims, rng.uniform(0.10, 0.18), 0.002 * w)
    add(posterior, rng.uniform(0.10, 0.18), 0.002 * w)
    return img


def _blurred(layer: np.ndarray, sigma: float) -> np.ndarray:
    out = layer.astype(np.float32) / 255.0
    return cv2.GaussianBlur(out, (0, 0), max(0.3, float(sigma)))


def expose(img: np.ndarray, rng: np.random.Generator, invert: bool) -> np.ndarray:
    """Exposure, heel effect, gamma, blur and noise: the image as a uint8 radiograph."""
    h, w = img.shape
    heel = np.linspace(rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), h, dtype=np.float32)[:, None]
    x = np.clip(img * rng.uniform(0.8, 1.3) + heel, 0, 1)
    x = x ** rng.uniform(0.7, 1.4)
    x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2) * max(1.0, h / 1000))
    x = x + rng.normal(0, rng.uniform(0.01, 0.04), x.shape).astype(np.float32)
    if invert:
        x = 1 - x
    lo, hi = rng.uniform(0.0, 0.08), rng.uniform(0.9, 1.0)
    return np.clip((x * (hi - lo) + lo) * 255, 0, 255).astype(np.uint8)


def write_image(path: Path, img: np.ndarray, color: bool, quality: int) -> None:
    """A JPG: grayscale, or 3 identical channels (as some real files are)."""
    data = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if color else img
    ok, buf = cv2.imencode(".jpg", data, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


# --- the data set ----------------------------------------------------------------------------------


def _pair(v, default) -> tuple[float, float]:
    lo, hi = default if v is None else v
    return float(lo), float(hi)


def generate(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    height: tuple[float, float] | None = None,
    aspect: tuple[float, float] | None = None,
    color_share: float = 0.3,
    invert_share: float = 0.05,
    corrupt_test: int = 1,
) -> dict:
    """Write a synthetic AASCE 2019 data set to ``out`` and its truth to ``{out}_truth/``.

    Args:
        out: data folder to create (an existing one is replaced only if it was generated).
        n_train, n_test: numbers of images.
        seed: everything follows from it.
        height: (min, max) image height in pixels, drawn per image (default: the real ~2,200-2,800).
        aspect: (min, max) of height / width, drawn per image (default 2.0-3.0; real ~2.5).
        color_share: share of images saved as 3-channel JPGs.
        invert_share: share of images that look inverted (dense = dark).
        corrupt_test: test images written unreadable (a few bytes of a JPG).

    Returns:
        The summary (also ``summary.json``): counts, curve types, the train-mean baseline's test SMAPE.
    """
    start = time.perf_counter()
    height, aspect = _pair(height, (2200, 2800)), _pair(aspect, (2.0, 3.0))
    out = common.prepare_out(out)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        names = [
            f"sunhl-synth-{i + 1:03d} A AP.jpg"
            if split == "train"
            else f"sunhl-synth-test-{i + 1:03d} a ap.jpg"
            for i in range(n)
        ]
        for i, name in enumerate(names):
            rng = np.random.default_rng([seed, 1 if split == "train" else 2, i])
            h = int(rng.uniform(*height))
            w = int(round(h / rng.uniform(*aspect)))
            spine = build_spine(rng, h, w)
            invert = bool(rng.random() < invert_share)
            color = bool(rng.random() < color_share)
            img = expose(render(spine, h, w, rng), rng, invert)
            corrupt = split == "test" and i < corrupt_test and n >= 3
            path = image_path(out, split, name)
            write_image(path, img, color, int(rng.integers(75, 96)))
            if corrupt:
                path.write_bytes(path.read_bytes()[:200])
            cobb = cobb_angles(spine.corners, h)
            rows.append(
                {
                    "split": split,
                    "filename": name,
                    "height": h,
                    "width": w,
                    "channels": 3 if color else 1,
                    "inverted": invert,
                    "corrupt": corrupt,
                    "curve": spine.curve,
                    "design_angle": round(spine.design_angle, 2),
                    "s_curve": cobb.s_curve,
                    **dict(zip(ANGLES, cobb.angles())),
                    "points": spine.corners / [w, h],
                }
            )
    table = pd.DataFrame(rows)
    for split in ("train", "test"):
        part = table[table["split"] == split]
        folder = labels_dir(out, split)
        folder.mkdir(parents=True, exist_ok=True)
        part[["filename"]].to_csv(folder / "filenames.csv", header=False, index=False)
        if split == "train":
            flat = landmarks_to_flat(np.stack(part["points"].to_list())) if len(part) else np.zeros((0, 136))
            pd.DataFrame(flat).to_csv(
                folder / "landmarks.csv", header=False, index=False, float_format="%.6f"
            )
            part[ANGLES].to_csv(folder / "angles.csv", header=False, index=False, float_format="%.4f")
    return _write_truth(out, table, n_train, n_test, seed, time.perf_counter() - start)


def _write_truth(
    out: Path, table: pd.DataFrame, n_train: int, n_test: int, seed: int, seconds: float
) -> dict:
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    flat = landmarks_to_flat(np.stack(test["points"].to_list())) if len(test) else np.zeros((0, 136))
    landmarks = pd.DataFrame(flat, columns=landmark_columns())
    landmarks.insert(0, "filename", test["filename"].to_numpy())
    baseline = np.broadcast_to(train[ANGLES].to_numpy().mean(0), (len(test), 3)) if len(train) else None
    test_smape = (
        score_angles(test[ANGLES].to_numpy(), baseline)["smape"] if len(test) and len(train) else None
    )
    summary = {
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "curves": table["curve"].value_counts().to_dict(),
        "s_curves (challenge rule)": int(table["s_curve"].sum()),
        "corrupt test images": int(test["corrupt"].sum()),
        "3-channel images": int((table["channels"] == 3).sum()),
        "inverted images": int(table["inverted"].sum()),
        "test SMAPE of the train-mean angles": None if test_smape is None else round(test_smape, 3),
        "seconds": round(seconds, 1),
        "layout": {split: f"data/{FOLDER[split]}/, labels/{FOLDER[split]}/" for split in FOLDER},
    }
    common.write_truth(
        out,
        {
            "test_angles": test[["filename", *ANGLES]],
            "test_landmarks": landmarks,
            "images": table.drop(columns="points"),
        },
        summary,
    )
    log.info("wrote %d train + %d test radiographs to %s in %.1fs", n_train, n_test, out, seconds)
    return summary
