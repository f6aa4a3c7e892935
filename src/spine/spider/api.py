"""The spider segmenter as a service to other tasks, found through the registry
(``get_task("spider").runner("load_segmenter" | "segment_sagittal" | "measure")``), so no task imports
this package.

A trained spider run is named by its ``out_dir`` (the ``location``): its stage 02 saved the resolved
config as ``localize/spider/config.yaml`` and the fold models under ``models/spider/segmenter/``. The
caller hands a sagittal volume already in the canonical layout of ``spine.spider.io`` (array
[s patient right -> left, r superior -> inferior, c anterior -> posterior], spacing in mm in that order);
it is resampled in-plane to the run's ``preprocess.grid_mm`` and scaled as stage 01 scales an image, every
fold model's class probabilities are averaged, mapped back onto the volume's own voxels and labelled as
stage 02 labels them (SPIDER ids: vertebrae 1.. and discs 201.. counted up from the sacrum, canal 100).
Measuring gives the disc herniation probabilities of the run's fold classifiers (``spine.spider.hernia``)
when stage 02 trained them, as stage 06 does; otherwise the rule's probability from the protrusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from omegaconf import OmegaConf

from spine.core.paths import Paths
from spine.core.train.loop import resolve_device
from spine.spider import hernia, io
from spine.spider.measure import measure_table
from spine.spider.preprocess import normalize
from spine.spider.segment import channel_offsets, instance_labels, load_models, predict_probs, probs_to_native


@dataclass
class Segmenter:
    """A trained spider run ready to segment: its config, every fold model, its fold herniation
    classifiers (none when stage 02 trained none) and the device."""

    cfg: object  # the run's resolved config (DictConfig)
    models: list
    device: torch.device
    location: Path
    hernia_models: list


def config_path(location: Path) -> Path:
    """The resolved config a spider run's stage 02 saved under its out_dir."""
    return Path(location) / "localize" / "spider" / "config.yaml"


def load_segmenter(location, device: str = "auto") -> Segmenter:
    """The fold models of the spider run whose out_dir is ``location`` (every fold of its config; a
    missing checkpoint is an error naming the file)."""
    location = Path(location)
    path = config_path(location)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: localize.segmenter must be the out_dir of a spider run whose stage 02 "
            "(src/02_localize.py --config configs/spider/...) has finished"
        )
    cfg = OmegaConf.load(path)
    cfg.out_dir, cfg.models_from = str(location), None  # the run may have been moved since
    dev = resolve_device(device)
    paths = Paths.from_config(cfg)
    folds = list(range(int(cfg.folds.n_folds)))
    models = load_models(cfg, paths, folds, dev)
    return Segmenter(
        cfg, [m.eval() for m in models], dev, location, hernia.load_classifiers(cfg, paths, folds, dev)
    )


def canonical_image(volume: np.ndarray, spacing_mm) -> sitk.Image:
    """A canonical-layout array as a SimpleITK image (origin 0, the canonical directions), so the
    stage-01 grid and the mapping back follow the same code as a spider image."""
    img = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    img.SetSpacing([float(s) for s in reversed(spacing_mm)])
    # io.CANONICAL "PIL": sitk x (array axis 2) posterior, y (axis 1) inferior, z (axis 0) left, in LPS
    img.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    return img


def segment_sagittal(volume: np.ndarray, spacing_mm, segmenter: Segmenter) -> tuple[np.ndarray, dict]:
    """SPIDER labels (int16, the volume's shape) of one canonical sagittal volume, from the mean of the
    run's fold models, and the instance info (discs, vertebrae, broken sequence and why)."""
    cfg = segmenter.cfg
    sc, grid_mm = cfg.segment, float(cfg.preprocess.grid_mm)
    img = canonical_image(volume, spacing_mm)
    grid = normalize(sitk.GetArrayFromImage(io.resample_inplane(img, grid_mm)))
    offsets = channel_offsets(int(sc.context), float(sc.context_mm), float(spacing_mm[0]))
    probs = predict_probs(segmenter.models, grid, offsets, segmenter.device, bool(sc.mirror))
    ref = io.Canonical(np.asarray(volume), tuple(float(s) for s in spacing_mm), img, io.CANONICAL)
    classes, _ = probs_to_native(probs, ref, grid_mm)  # the measurements of lumbar stacks use the labels
    return instance_labels(classes, spacing_mm, float(sc.min_mm3), float(sc.max_gap), float(sc.disc_merge_mm))


def measure_labels(labels: np.ndarray, spacing_mm, segmenter: Segmenter, volume: np.ndarray) -> pd.DataFrame:
    """``spine.spider.measure``'s table (structure, measurement, value, unit) of one canonical label
    array and its ``volume`` (the array ``segment_sagittal`` was given) with the run's ``measure``
    settings and herniation classifiers; empty (logged) when the masks cannot be measured."""
    table = measure_table(labels, spacing_mm, segmenter.cfg)
    models, dev = segmenter.hernia_models, segmenter.device
    return hernia.classified(table, models, np.asarray(volume), labels, spacing_mm, segmenter.cfg, dev)
