"""Stage 06 (spider): every test image (an image without a mask file) -> predicted masks, measurements,
overlays and ``submissions/spider_<exp>.csv``, with the fold models of stage 02 only.

Under ``Paths.predict_dir``: ``cache/`` (stage 01 on the test split), ``masks/<image>.mha`` (SPIDER
labels in the input file's exact geometry, so Dice can be scored voxel for voxel) and
``overlays/<image>.png`` (mid-sagittal slice, labels, corner points, measuring lines and values). Each
test image is segmented with the mean of the fold models' probabilities (``segment.mirror`` adds the
left-right mirror) and measured by ``spine.spider.measure.measure``; a disc's herniation probability is
the mean of stage 02's fold classifiers (``spine.spider.hernia``) where it made them.

The submission (``SUBMISSION_COLUMNS``) has one row per image, structure and measurement: every test
image gets the full set of rows (the structures and measurements stage 02 measured out of fold, and any
more found here); a value that could not be made is NaN, with ``note`` saying why (unreadable file: the
reason; segmentation or measuring failed; structure not found). The report names those images and
rows, gives the seconds per image for segmenting and for measuring, and on generated data the test
scores (``scores.score`` against the truth folder).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from spine.core.config import save_config
from spine.core.folds import selected_folds
from spine.core.io import save_table, save_text
from spine.core.paths import Paths
from spine.core.train.loop import resolve_device
from spine.core.train.stage import torch_threads
from spine.spider import hernia, io, scores
from spine.spider.measure import measure_image
from spine.spider.preprocess import run_cache
from spine.spider.segment import load_models, oof_measurements_path, segment_image

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["image", "structure", "measurement", "value", "unit", "note"]
ROW_KEY = ["structure", "measurement", "unit"]


def template_rows(paths: Paths, measured: list[pd.DataFrame]) -> pd.DataFrame:
    """Every (structure, measurement, unit) an image should have: those of stage 02's OOF measurements
    and of the test images measured here."""
    frames = [m[ROW_KEY] for m in measured if len(m)]
    oof = oof_measurements_path(paths)
    if oof.exists():
        frames.append(pd.read_csv(oof)[ROW_KEY])
    if not frames:
        return pd.DataFrame(columns=ROW_KEY)
    return pd.concat(frames, ignore_index=True).drop_duplicates(["structure", "measurement"])


def complete_rows(
    image: str, measured: pd.DataFrame | None, template: pd.DataFrame, note: str
) -> pd.DataFrame:
    """One image's rows on the template: measured values kept, the rest NaN with ``note``."""
    base = template.assign(image=image)
    if measured is None or measured.empty:
        return base.assign(value=np.nan, note=note)[SUBMISSION_COLUMNS]
    got = measured[["structure", "measurement", "value"]].drop_duplicates(["structure", "measurement"])
    out = base.merge(got, on=["structure", "measurement"], how="left")
    extra = measured[
        ~measured.set_index(["structure", "measurement"]).index.isin(
            base.set_index(["structure", "measurement"]).index
        )
    ].assign(image=image)
    out = pd.concat([out, extra], ignore_index=True)
    out["note"] = np.where(out["value"].isna(), note, "")
    return out[SUBMISSION_COLUMNS]


def run_submit(cfg) -> dict:
    """Stage 06 with ``segment.torch_threads``."""
    with torch_threads(cfg.segment.torch_threads):
        return _run_submit(cfg)


def _run_submit(cfg) -> dict:
    from spine.spider.viz import overlay_png

    t0 = time.perf_counter()
    paths = Paths.from_config(cfg)
    work = paths.predict_dir
    images = io.list_images(paths.data_dir)
    test = images[images["split"] == "test"]
    table, _ = run_cache(test, work / "cache", float(cfg.preprocess.grid_mm), max_failed_share=1.0)
    device = resolve_device(cfg.segment.device)
    folds = selected_folds(cfg, cfg.segment)
    models = load_models(cfg, paths, folds, device)
    classifiers = hernia.load_classifiers(cfg, paths, folds, device)
    measured, infos, failed, drawn = {}, {}, {}, 0
    for row in tqdm(table.to_dict("records"), desc="test images", leave=False):
        if row["status"] != "ok":
            failed[row["image"]] = f"unreadable: {row['reason']}"
            continue
        try:
            img, labels, margins, info = segment_image(
                models, row, work / "cache", cfg.segment, float(cfg.preprocess.grid_mm), device
            )
            original = io.read_image(Path(row["image_path"]))
            io.write_like(labels, img, original, io.masks_dir(work) / f"{row['image']}.mha")
        except Exception as e:  # one image that cannot be segmented must not lose the others' rows
            log.warning("segmenting %s failed: %s: %s", row["image"], type(e).__name__, e)
            failed[row["image"]] = f"segmentation failed: {type(e).__name__}: {e}"
            continue
        t1 = time.perf_counter()
        meas, why = measure_image(labels, img.spacing, cfg, margins)
        if meas is None:
            failed[row["image"]] = why
        else:
            meas.table = hernia.classified(
                meas.table, classifiers, img.array, labels, img.spacing, cfg, device
            )
            measured[row["image"]] = meas.table
        info["measure_seconds"] = round(time.perf_counter() - t1, 3)
        infos[row["image"]] = info
        if drawn < int(cfg.submit.overlays):  # also without measurements: the person sees why
            overlay_png(img, labels, meas, work / "overlays" / f"{row['image']}.png", row["image"])
            drawn += 1
    template = template_rows(paths, list(measured.values()))
    parts = [
        complete_rows(
            image, measured.get(image), template, failed.get(image, "not measured: structure not found")
        )
        for image in table["image"]
    ]
    sub = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SUBMISSION_COLUMNS)
    save_table(paths.submission, sub)
    report = submit_report(cfg, paths, table, sub, infos, failed)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["summary"]["seconds"] = report["seconds"]
    save_text(paths.predict_report, json.dumps(report, indent=2, default=float))
    save_config(cfg, work)
    return report


def submit_report(cfg, paths: Paths, table, sub: pd.DataFrame, infos: dict, failed: dict) -> dict:
    """What stage 06 did: images, failures, NaN rows, broken sequences, seconds, test scores."""
    seg = [v["seconds"] for v in infos.values()]
    mea = [v["measure_seconds"] for v in infos.values()]
    report = {
        "submission": str(paths.submission),
        "images": int(len(table)),
        "rows": int(len(sub)),
        "nan_rows": int(sub["value"].isna().sum()),
        "failed_images": failed,
        "broken_sequences": {k: v["reasons"] for k, v in infos.items() if v["broken"]},
        "seconds_per_image_segment": float(np.mean(seg)) if seg else None,
        "seconds_per_image_measure": float(np.mean(mea)) if mea else None,
    }
    truth = paths.truth_dir / "measurements.csv"
    if truth.exists():  # generated data: score the test split (the truth is read by the report only)
        sol = pd.read_csv(truth)
        test = sorted(table["image"])
        report["test_scores"] = scores.score(truth, paths.submission)
        m = scores.scores_of(
            scores.aligned(
                sub, sol[sol["image"].isin(test)], scores.baseline_values(sol[~sol["image"].isin(test)])
            )
        )
        report["measurements_vs_truth"] = m
        report["dice"] = {"mean": report["test_scores"].get("dice mean")}
        report["dice"]["per_class"] = {
            k[len("dice ") :]: v for k, v in report["test_scores"].items() if k.startswith("dice class ")
        }
    report["summary"] = {
        "submission": str(paths.submission),
        "rows (NaN)": f"{report['rows']} ({report['nan_rows']})",
        "failed images": len(failed),
        **scores.report_summary(report),
    }
    return report
