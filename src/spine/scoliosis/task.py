"""AASCE 2019: 17 vertebrae (T1..L5) x 4 corners on AP radiographs → PT, MT and TL/L Cobb angles.

The task reads the public download's layout (``spine.scoliosis.data``) and is scored by SMAPE over the
three angles (``spine.scoliosis.cobb.score_files``). Not a row task: stage 01 caches JPGs (its own
runner), stage 02 trains the landmark model on image folds, stage 06 predicts the test images; stages
03 to 05 have nothing to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine.core.task import Task

VERTEBRAE = [*(f"T{i}" for i in range(1, 13)), *(f"L{i}" for i in range(1, 6))]  # top to bottom
CORNERS = ["top_left", "top_right", "bottom_left", "bottom_right"]  # the label files' order
N_POINTS = len(VERTEBRAE) * len(CORNERS)  # 68
ANGLES = ["pt", "mt", "tl"]  # proximal thoracic, main thoracic, thoracolumbar/lumbar (angles.csv order)
MT_BINS = [10.0, 20.0, 30.0, 45.0]  # degrees: fold strata of the main thoracic angle


class ScoliosisTask(Task):
    name = "scoliosis"
    slug = "aasce-2019"
    runners = {
        "generate": "spine.scoliosis.synth:generate",
        "preprocess": "spine.scoliosis.preprocess:run_preprocess",
        "localize": "spine.scoliosis.landmarks:run_landmarks",
        "submit": "spine.scoliosis.predict:run_predict",
        "overlays": "spine.scoliosis.viz:write_overlays",
        "score": "spine.scoliosis.cobb:score_files",
        "summary_rows": "spine.scoliosis.predict:summary_rows",
    }

    def fold_strata(self, data_dir: Path) -> pd.DataFrame:
        """One row per training image: study_id = its file name (an image is its own group), y = its
        main thoracic angle binned at ``MT_BINS`` (so every fold gets straight and curved spines)."""
        from spine.scoliosis.data import read_angles, read_filenames

        names = read_filenames(data_dir, "train")
        mt = read_angles(data_dir)[:, ANGLES.index("mt")]
        return pd.DataFrame({"study_id": names, "y": np.digitize(mt, MT_BINS)})
