"""RSNA 2022 Cervical Spine Fracture Detection: C1..C7 and patient_overall per study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine.core.task import RowTask, binary_log_loss

VERTEBRAE = [f"C{i}" for i in range(1, 8)]
TARGETS = VERTEBRAE + ["patient_overall"]  # sample_submission order within a study
TRAIN_COLUMNS = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]  # train.csv order
WEIGHTS = {"vertebra": (1.0, 2.0), "patient_overall": (7.0, 14.0)}  # (negative, positive)


class CervicalTask(RowTask):
    name = "cervical"
    slug = "rsna-2022-cervical-spine-fracture-detection"
    pred_columns = ["fractured"]
    targets = TARGETS
    runners = {  # stage 02 segments the vertebrae; 03/04 crop and classify each vertebra
        "generate": "spine.cervical.synth:generate",
        "localize": "spine.cervical.segment:run_segment",
        "localize_test": "spine.cervical.segment:predict_test",
        "crop": "spine.cervical.crops:run_crops",
        "train": "spine.cervical.fracture:run_train",
        "predict": "spine.cervical.fracture:predict_test",
        "overlays": "spine.cervical.viz:write_overlays",
    }

    def stack_group(self, row_id: str) -> str:
        return "patient_overall" if row_id.endswith("_patient_overall") else "vertebra"

    def stack_groups(self) -> list[str]:
        return ["vertebra", "patient_overall"]

    def stack_features(self, rows, probs, manifest, cfg=None) -> pd.DataFrame:
        """Per member, the study's vertebra probabilities seen from each row: the study's maximum and
        any-fracture probability (1 - prod(1 - p)), and the vertebrae just above and below (fractures
        come in contiguous blocks); plus the vertebra's position and whether stage 02 found it."""
        parts = pd.DataFrame([self.parse_row_id(r) for r in rows["row_id"]])
        study, target = parts["study_id"].to_numpy(), parts["target"].to_numpy()
        pos = np.array([TARGETS.index(t) for t in target], dtype=float)
        is_vert = pos < len(VERTEBRAE)
        out = {"position": np.where(is_vert, pos, np.nan)}
        for m in range(probs.shape[1]):
            p = pd.Series(probs[:, m, 1])
            vert = pd.DataFrame({"study": study, "pos": pos, "p": p})[is_vert]
            by_study = vert.groupby("study")["p"]
            out[f"m{m}_study_max"] = pd.Series(study).map(by_study.max()).to_numpy()
            out[f"m{m}_study_any"] = (
                pd.Series(study).map(1 - by_study.apply(lambda x: np.prod(1 - x))).to_numpy()
            )
            lookup = vert.set_index(["study", "pos"])["p"]
            for name, step in (("above", -1), ("below", 1)):
                keys = pd.MultiIndex.from_arrays([study, pos + step])
                out[f"m{m}_{name}"] = np.where(is_vert, lookup.reindex(keys).to_numpy(), np.nan)
        if manifest is not None and "found" in manifest:
            found = manifest.drop_duplicates("row_id").set_index("row_id")["found"]
            out["found"] = found.reindex(rows["row_id"]).astype(float).to_numpy()
        return pd.DataFrame(out)

    def row_ids(self, study_ids) -> list[str]:
        return [f"{s}_{t}" for s in study_ids for t in TARGETS]

    def parse_row_id(self, row_id: str) -> dict:
        for t in TARGETS:
            if row_id.endswith("_" + t):
                return {"study_id": row_id[: -len(t) - 1], "target": t}
        raise ValueError(f"not a cervical row id: {row_id!r}")

    def labels_long(self, train: pd.DataFrame) -> pd.DataFrame:
        """train.csv → row_id, study_id, target, label (0/1, NaN where missing)."""
        long = train.melt(
            id_vars="StudyInstanceUID", value_vars=TARGETS, var_name="target", value_name="label"
        )
        long = long.rename(columns={"StudyInstanceUID": "study_id"})
        long["row_id"] = long["study_id"] + "_" + long["target"]
        order = {t: i for i, t in enumerate(TARGETS)}
        long = long.sort_values(
            ["study_id", "target"], key=lambda s: s.map(order) if s.name == "target" else s
        )
        return long[["row_id", "study_id", "target", "label"]].reset_index(drop=True)

    def strata(self, train: pd.DataFrame) -> pd.DataFrame:
        long = self.labels_long(train)
        return pd.DataFrame({"study_id": long["study_id"], "y": long["label"].fillna(0).astype(int)})

    def solution_from_train(self, train: pd.DataFrame) -> pd.DataFrame:
        long = self.labels_long(train).dropna(subset=["label"])
        sol = pd.DataFrame({"row_id": long["row_id"], "fractured": long["label"].astype(int)})
        sol["sample_weight"] = self.row_weights(sol)
        return sol.reset_index(drop=True)

    def row_weights(self, solution: pd.DataFrame) -> np.ndarray:
        """Official weights: vertebra 1 (negative) / 2 (positive); patient_overall 7 / 14."""
        is_patient = solution["row_id"].str.endswith("_patient_overall").to_numpy()
        y = solution["fractured"].to_numpy(dtype=np.float64)
        neg = np.where(is_patient, WEIGHTS["patient_overall"][0], WEIGHTS["vertebra"][0])
        pos = np.where(is_patient, WEIGHTS["patient_overall"][1], WEIGHTS["vertebra"][1])
        return np.where(y > 0.5, pos, neg)

    def score(self, solution: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
        """Official metric: per study, weighted mean of its row log losses; then mean over studies.

        Weights are always the official ones derived from the labels. Rows with a missing label
        are not scored. Probabilities are clipped to [eps, 1 - eps] before the log.
        """
        sol = solution.dropna(subset=["fractured"]).reset_index(drop=True)
        pred = self.align(sol, submission)["fractured"].to_numpy()
        y = sol["fractured"].to_numpy(dtype=np.float64)
        w = self.row_weights(sol)
        loss = binary_log_loss(y, pred)
        parts = pd.DataFrame([self.parse_row_id(r) for r in sol["row_id"]])
        df = pd.DataFrame({"study": parts["study_id"], "target": parts["target"], "wl": w * loss, "w": w})
        per_study = df.groupby("study")[["wl", "w"]].sum()
        out = {"score": float((per_study["wl"] / per_study["w"]).mean())}
        is_patient = (df["target"] == "patient_overall").to_numpy()
        for name, m in (("vertebrae", ~is_patient), ("patient_overall", is_patient)):
            if m.any():
                out[name] = float(df["wl"][m].sum() / df["w"][m].sum())
        return out

    def list_series(self, data_dir: Path, split: str) -> pd.DataFrame:
        """One CT series per study, stored as {split}_images/{StudyInstanceUID}/{slice}.dcm."""
        data_dir = Path(data_dir)
        csv = data_dir / f"{split}.csv"
        if csv.exists():
            studies = pd.read_csv(csv)["StudyInstanceUID"].drop_duplicates().tolist()
        else:  # no list (e.g. a folder of studies only): take what is on disk
            studies = sorted(p.name for p in (data_dir / f"{split}_images").iterdir() if p.is_dir())
        return pd.DataFrame(
            {
                "study_id": studies,
                "series_id": studies,
                "description": "CT",
                "folder": [str(data_dir / f"{split}_images" / s) for s in studies],
            }
        )
