"""SPIDER lumbar MRI: segment vertebrae, discs and canal on sagittal .mha images, then measure them.

Not a Kaggle row task: the submission is one row per (image, structure, measurement) with its value
(``submit.SUBMISSION_COLUMNS``), scored against the generator's measurements and masks (``scores``).
Stages: 00 generator (spider_data's ``synth``), 01 cache (``preprocess``), 02 segmentation on patient
folds with OOF Dice and measurements (``segment``), 06 test images to masks, measurements and overlays
(``submit``); 03-05 have nothing to do.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spine.core.task import Task
from spine.spider.io import list_images
from spine.spider.labels import MODALITIES


class SpiderTask(Task):
    name = "spider"
    slug = "spider"
    runners = {
        "generate": "spine.spider.synth:generate",
        "preprocess": "spine.spider.preprocess:run_preprocess",
        "localize": "spine.spider.segment:run_segment",
        "submit": "spine.spider.submit:run_submit",
        "overlays": "spine.spider.viz:write_overlays",
        "score": "spine.spider.scores:score",
        "summary_rows": "spine.spider.scores:summary_rows",
        # what another task (lumbar's localize.method) uses through the registry: a trained run's models
        "load_segmenter": "spine.spider.api:load_segmenter",
        "segment_sagittal": "spine.spider.api:segment_sagittal",
        "measure": "spine.spider.api:measure_labels",
    }

    def fold_strata(self, data_dir: Path) -> pd.DataFrame:
        """One row per train image (an image with a mask): study_id = its patient, so every image of a
        patient (t1, t2, t2_SPACE: the same anatomy) lands in one fold; y = its sequence, balanced."""
        images = list_images(Path(data_dir))
        train = images[images["split"] == "train"]
        if train.empty:
            raise FileNotFoundError(f"{data_dir}: no images/*.mha with a masks/ file of the same name")
        codes = {m: i for i, m in enumerate(MODALITIES)}
        y = train["sequence"].map(codes).fillna(len(codes)).astype(int)
        return pd.DataFrame({"study_id": train["patient"].to_numpy(), "y": y.to_numpy()})
