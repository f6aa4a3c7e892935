"""Stage 06 (scoliosis): test JPGs → fold-mean landmarks → Cobb angles and heights, with the trained
fold models only; and the demo table's rows.

The test images are read from ``data_dir`` as stage 01 reads them (so a new ``data_dir`` with
``models_from`` works without stages 01-02). Every fold model predicts every readable image; the fold
models' landmarks are averaged vertebra by vertebra (each model's 17 vertebrae are sorted top to
bottom), mapped to the image's pixels, and turned into angles with the challenge's routine. An image
that cannot be read still gets its row, with the training images' mean angles, and the report names it
and why.

Writes ``submissions/scoliosis_<exp>.csv`` (filename,pt,mt,tl in the test ``filenames.csv`` order),
``submissions/scoliosis_<exp>_heights.csv`` (``spine.scoliosis.heights``), the landmarks in
``predict/scoliosis/<exp>/landmarks.csv`` and ``submissions/scoliosis_<exp>.report.json`` (with the test
SMAPE beside the train-mean baseline when the generator's truth folder is there; it is never read to
predict).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import torch

from spine.core.folds import fold_checkpoints
from spine.core.io import save_table, save_text
from spine.core.paths import Paths
from spine.core.train.loop import load_weights, resolve_device
from spine.core.train.stage import torch_threads
from spine.scoliosis.cobb import align, score_angles
from spine.scoliosis.data import (
    heights_submission,
    landmark_columns,
    landmarks_from_flat,
    read_angles,
    test_landmarks,
)
from spine.scoliosis.heights import heights_table, measure
from spine.scoliosis.landmarks import angles_of, build_model, landmark_frame, predict, to_image
from spine.scoliosis.preprocess import load_split
from spine.scoliosis.task import ANGLES

log = logging.getLogger(__name__)


def fold_mean_landmarks(cfg, paths: Paths, images: np.ndarray, device) -> np.ndarray:
    """(n, 17, 4, 2) model-pixel landmarks: the mean over the fold models of their predictions."""
    folds = list(range(cfg.folds.n_folds))
    ckpts = fold_checkpoints(lambda f: paths.checkpoint(f, cfg.seed), folds, "02_localize", "landmark model")
    preds = []
    for ckpt in ckpts:
        model = load_weights(build_model(cfg.train), ckpt, device)
        preds.append(predict(model, images, cfg.train, device))
    return np.mean(preds, axis=0)


def test_scores(paths: Paths, submission: pd.DataFrame, baseline: np.ndarray, rows, points) -> dict | None:
    """On generated data: the submission's and the train-mean baseline's scores against the truth, and
    the heights' median relative error against those of the true landmarks (readable images ``rows``
    with their predicted ``points`` in pixels)."""
    truth = paths.truth_dir / "test_angles.csv"
    if not truth.exists():
        return None
    solution = pd.read_csv(truth)
    gt, pred = align(solution, submission)
    out = {
        "model": score_angles(gt, pred),
        "train_mean": score_angles(gt, np.broadcast_to(baseline, gt.shape)),
    }
    marks = pd.read_csv(paths.truth_dir / "test_landmarks.csv").set_index("filename").loc[rows["filename"]]
    sizes = np.stack([rows["width"], rows["height"]], 1).astype(float)[:, None, None, :]
    true_points = landmarks_from_flat(marks[landmark_columns()].to_numpy()) * sizes
    true_h, pred_h = (np.array([[v for *_, v in measure(p)] for p in pts]) for pts in (true_points, points))
    names = [(s, m) for s, m, _ in measure(true_points[0])] if len(true_points) else []
    error = np.abs(pred_h - true_h) / np.maximum(true_h, 1e-6) * 100
    kinds = {"spine": ("height_T1_L5",), "body": ("body_height_mid",), "disc": ("disc_height_mid",)}
    out["heights_median_error_pct"] = {
        k: float(np.median(error[:, [i for i, (_, m) in enumerate(names) if m in ms]]))
        if len(error)
        else None
        for k, ms in kinds.items()
    }
    return out


def run_predict(cfg) -> dict:
    """Stage 06: the submission, the heights table and the report (see the module docstring)."""
    paths = Paths.from_config(cfg)
    tc = cfg.train
    start = time.perf_counter()
    images, table = load_split(paths.data_dir, "test", cfg.preprocess)
    ok = (table["status"] == "ok").to_numpy()
    device = resolve_device(tc.device)
    with torch_threads(tc.torch_threads), torch.no_grad():
        model_px = fold_mean_landmarks(cfg, paths, images[ok], device)
    size = tuple(cfg.preprocess.image_size)
    points = np.full((len(table), 17, 4, 2), np.nan)
    rows = table[ok]
    points[ok] = [to_image(p, size, h, w) for p, h, w in zip(model_px, rows["height"], rows["width"])]
    baseline = read_angles(paths.data_dir).mean(axis=0)  # the fallback of an unreadable image
    angles = np.tile(baseline, (len(table), 1))
    angles[ok] = angles_of(points[ok], rows["height"].to_numpy(float), cfg.cobb.s_test_smooth)
    submission = pd.DataFrame(
        {"filename": table["filename"], **{a: angles[:, k] for k, a in enumerate(ANGLES)}}
    )
    save_table(paths.submission, submission)
    save_table(
        heights_submission(paths), heights_table(list(table["filename"]), points, cfg.pixel_spacing_mm)
    )
    save_table(test_landmarks(paths), landmark_frame(rows["filename"], -1, points[ok]))
    failed = table.loc[~ok, ["filename", "reason"]].to_dict("records")
    for f in failed:
        log.warning("test %s: %s; its row holds the training images' mean angles", f["filename"], f["reason"])
    seconds = time.perf_counter() - start
    report = {
        "images": len(table),
        "fallback_rows": failed,
        "seconds": round(seconds, 1),
        "seconds_per_image": round(seconds / max(1, len(table)), 3),
        "submission": str(paths.submission),
        "heights": str(heights_submission(paths)),
        "test": test_scores(paths, submission, baseline, rows, points[ok]),
    }
    save_text(paths.predict_report, json.dumps(report, indent=2))
    report["summary"] = {
        "submission": str(paths.submission),
        "rows": len(table),
        "fallback rows (train-mean angles)": [f["filename"] for f in failed],
        "heights table": str(heights_submission(paths)),
        "seconds": report["seconds"],
    }
    if report["test"]:
        t = report["test"]
        report["summary"]["test SMAPE % (train-mean baseline)"] = (
            f"{t['model']['smape']:.2f} ({t['train_mean']['smape']:.2f})"
        )
        report["summary"]["test heights: median error % spine / body / disc"] = " / ".join(
            f"{v:.1f}" for v in t["heights_median_error_pct"].values()
        )
    return report


def summary_rows(cfg) -> list[tuple[str, object, object, object]]:
    """(what, model, baseline, best) rows of ``src/demo_summary.py``, read from the stage reports."""
    paths = Paths.from_config(cfg)
    read = lambda p: json.loads(p.read_text()) if p.exists() else {}
    loc, sub = read(paths.localize_report), read(paths.predict_report)
    get = lambda d, *keys: _dig(d, keys)
    return [
        (
            "OOF SMAPE % (vs train mean)",
            *(get(loc, "angles", w, "smape") for w in ("model", "train_mean")),
            None,
        ),
        (
            "OOF landmark err % of height",
            *(get(loc, "landmarks", w, "median_pct_height") for w in ("model", "mean_shape")),
            None,
        ),
        (
            "test SMAPE % (vs train mean)",
            *(get(sub, "test", w, "smape") for w in ("model", "train_mean")),
            None,
        ),
    ]


def _dig(d, keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d
