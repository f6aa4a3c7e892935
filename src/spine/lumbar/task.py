"""RSNA 2024 Lumbar Spine Degenerative Classification: 25 targets a study, 3 grades each."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from spine.core.task import RowTask, binary_log_loss, weighted_log_loss

log = logging.getLogger(__name__)

CONDITIONS = [
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
]
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
# Strings of train_label_coordinates.csv.
CONDITION_NAMES = {c: " ".join(w.capitalize() for w in c.split("_")) for c in CONDITIONS}
LEVEL_NAMES = {lv: lv.upper().replace("_", "/") for lv in LEVELS}
GRADES = ["Normal/Mild", "Moderate", "Severe"]
PRED_COLUMNS = ["normal_mild", "moderate", "severe"]
GRADE_WEIGHTS = np.array([1.0, 2.0, 4.0])
TARGETS = [f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS]  # train.csv column order
SERIES_DESCRIPTIONS = ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"]
# Series on which each condition is annotated (train_label_coordinates.csv).
CONDITION_SERIES = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}

# What the sagittal localizer (stage 02) finds, per series description: the conditions whose
# train_label_coordinates points lie on that series. Subarticular points come from stage 02's axial
# recess model (spine.lumbar.localize, `localize.axial`), on the Axial T2 slice the canal point projects to.
LOCALIZER_TARGETS = {
    "Sagittal T2/STIR": ["spinal_canal_stenosis"],
    "Sagittal T1": ["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"],
}


# spider measurements of a row's level that stage 05 may read (ensemble.measurement_features)
MEASUREMENT_FEATURES = ["height_index", "listhesis_mm", "herniation_probability"]


def condition_group(condition: str) -> str:
    """'spinal', 'foraminal' or 'subarticular'."""
    for g in ("spinal", "foraminal", "subarticular"):
        if g in condition:
            return g
    raise ValueError(f"unknown lumbar condition {condition!r}")


class LumbarTask(RowTask):
    name = "lumbar"
    slug = "rsna-2024-lumbar-spine-degenerative-classification"
    pred_columns = PRED_COLUMNS
    targets = TARGETS
    grades = GRADES
    runners = {
        "generate": "spine.lumbar.synth:generate",
        "localize": "spine.lumbar.localize:run_localize",
        "localize_test": "spine.lumbar.localize:predict_test",
        "crop": "spine.lumbar.crops:run_crops",
        "train": "spine.lumbar.classify:run_train",
        "predict": "spine.lumbar.classify:predict_test",
        "overlays": "spine.lumbar.viz:write_overlays",
        "partial_rows": "spine.lumbar.classify:missing_view_rows",
    }

    def stack_group(self, row_id: str) -> str:
        return condition_group(self.parse_row_id(row_id)["condition"])

    def stack_groups(self) -> list[str]:
        return ["spinal", "foraminal", "subarticular"]

    def stack_features(self, rows, probs, manifest, cfg=None) -> pd.DataFrame:
        """Side (+1 left, -1 right, 0 centre), missing views, stage-02 confidence, distance to the
        chosen axial plane; from the crop manifest. With ``ensemble.measurement_features`` (``cfg``),
        also the spider measurements of the row's level (``measurement_features``)."""
        cols = ["sag_missing", "ax_missing", "point_confidence", "ax_plane_mm"]
        m = manifest.drop_duplicates("row_id").set_index("row_id") if manifest is not None else pd.DataFrame()
        m = m.reindex(index=rows["row_id"], columns=cols)
        cond = [self.parse_row_id(r)["condition"] for r in rows["row_id"]]
        side = [1.0 if c.startswith("left") else -1.0 if c.startswith("right") else 0.0 for c in cond]
        out = pd.DataFrame({"side": side, **{c: m[c].astype(float).to_numpy() for c in cols}})
        if cfg is not None and cfg.ensemble.get("measurement_features"):
            from spine.core.paths import Paths
            from spine.lumbar.levels_from_masks import measurements_path

            path = measurements_path(Paths.from_config(cfg).localize_dir)
            out = pd.concat([out, self.measurement_features(rows["row_id"], path)], axis=1)
        return out

    def measurement_features(self, row_ids, path: Path) -> pd.DataFrame:
        """The spider measurements (stage 02's ``measurements.csv``, localize.method segmentation / both)
        of each row's level: ``MEASUREMENT_FEATURES``; NaN where the study or level has none, and for
        every row (logged) when the file does not exist."""
        parts = [self.parse_row_id(r) for r in row_ids]
        keys = pd.DataFrame(
            {
                "study_id": [p["study_id"] for p in parts],
                "structure": [LEVEL_NAMES[p["level"]] for p in parts],
            }
        )
        if not Path(path).exists():
            log.warning("%s is missing: measurement features are NaN", path)
            table = pd.DataFrame(columns=["study_id", "structure", *MEASUREMENT_FEATURES])
        else:
            m = pd.read_csv(path)
            m = m[m["measurement"].isin(MEASUREMENT_FEATURES)]
            table = m.pivot_table(index=["study_id", "structure"], columns="measurement", values="value")
            table = table.reset_index()
        out = keys.merge(table, on=["study_id", "structure"], how="left")
        return out.reindex(columns=MEASUREMENT_FEATURES).astype(float).rename(columns=lambda c: f"spider_{c}")

    def row_ids(self, study_ids) -> list[str]:
        """Rows of each study in sample_submission order (targets sorted by name)."""
        return [f"{s}_{t}" for s in study_ids for t in sorted(TARGETS)]

    def parse_row_id(self, row_id: str) -> dict:
        parts = row_id.split("_")
        condition, level = "_".join(parts[1:-2]), "_".join(parts[-2:])
        if condition not in CONDITIONS or level not in LEVELS:
            raise ValueError(f"not a lumbar row id: {row_id!r}")
        return {"study_id": int(parts[0]), "condition": condition, "level": level}

    def labels_long(self, train: pd.DataFrame) -> pd.DataFrame:
        """train.csv → one row per (study, target): row_id, study_id, condition, level, grade.

        ``grade`` is 0/1/2 for Normal/Mild, Moderate, Severe and -1 where the label is missing.
        Unknown label strings raise, naming the value.
        """
        long = train.melt(id_vars="study_id", value_vars=TARGETS, var_name="target", value_name="label")
        bad = set(long["label"].dropna()) - set(GRADES)
        if bad:
            raise ValueError(f"train.csv holds unknown grades {sorted(bad)}; expected {GRADES}")
        long["grade"] = long["label"].map({g: i for i, g in enumerate(GRADES)}).fillna(-1).astype(int)
        long["row_id"] = long["study_id"].astype(str) + "_" + long["target"]
        long["condition"] = long["target"].str[:-6]
        long["level"] = long["target"].str[-5:]
        return long[["row_id", "study_id", "condition", "level", "grade"]]

    def strata(self, train: pd.DataFrame) -> pd.DataFrame:
        long = self.labels_long(train)
        return pd.DataFrame({"study_id": long["study_id"], "y": long["grade"].clip(lower=0)})

    def solution_from_train(self, train: pd.DataFrame) -> pd.DataFrame:
        long = self.labels_long(train)
        long = long[long["grade"] >= 0]
        onehot = np.eye(3)[long["grade"].to_numpy()]
        sol = pd.DataFrame(onehot, columns=PRED_COLUMNS)
        sol.insert(0, "row_id", long["row_id"].to_numpy())
        sol["sample_weight"] = GRADE_WEIGHTS[long["grade"].to_numpy()]
        return sol

    def score(self, solution: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
        """Official metric: weighted log loss per condition group plus any_severe_spinal, averaged.

        Solution rows whose one-hot columns are all zero or NaN (no label) are not scored.
        ``sample_weight`` defaults to 1/2/4 by the true grade when the solution has none.
        """
        sol = solution.copy()
        y = sol[PRED_COLUMNS].to_numpy(dtype=np.float64)
        labeled = np.nan_to_num(y).sum(1) > 0
        sol, y = sol[labeled].reset_index(drop=True), y[labeled]
        if "sample_weight" not in sol:
            sol["sample_weight"] = GRADE_WEIGHTS[y.argmax(1)]
        pred = self.align(sol, submission)[PRED_COLUMNS].to_numpy()
        parts = [self.parse_row_id(r) for r in sol["row_id"]]
        group = np.array([condition_group(p["condition"]) for p in parts])
        study = np.array([p["study_id"] for p in parts])
        w = sol["sample_weight"].to_numpy(dtype=np.float64)
        out = {}
        for g in ("spinal", "foraminal", "subarticular"):
            m = group == g
            if m.any():
                out[g] = weighted_log_loss(y[m], pred[m], w[m])
        m = group == "spinal"
        if m.any():
            p_norm = pred[m] / pred[m].sum(1, keepdims=True)
            df = pd.DataFrame({"study": study[m], "y": y[m, 2], "p": p_norm[:, 2], "w": w[m]})
            agg = df.groupby("study").max()
            losses = binary_log_loss(agg["y"].to_numpy(), agg["p"].to_numpy())
            out["any_severe_spinal"] = float((agg["w"] * losses).sum() / agg["w"].sum())
        return {"score": float(np.mean(list(out.values()))), **out}

    def list_series(self, data_dir: Path, split: str) -> pd.DataFrame:
        desc = pd.read_csv(Path(data_dir) / f"{split}_series_descriptions.csv")
        desc["folder"] = [
            str(Path(data_dir) / f"{split}_images" / str(st) / str(se))
            for st, se in zip(desc["study_id"], desc["series_id"])
        ]
        return desc.rename(columns={"series_description": "description"})[
            ["study_id", "series_id", "description", "folder"]
        ]
