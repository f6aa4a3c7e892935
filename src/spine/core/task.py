"""The interface every competition implements, so the stages stay generic."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd

EPS = np.finfo(np.float64).eps


class Task:
    """What every task has: a name, a default data folder, and its implementation of each stage."""

    name: str
    slug: str  # the competition's or dataset's slug, also the default folder name under input/
    # The task's implementation of each stage, as "module:function" (imported on use, so the task
    # modules stay free of torch). Stage scripts look their function up here, never by task name:
    #   generate (stage 00): generate(out, n_train, n_test, seed, **kwargs) -> summary dict;
    #   preprocess / localize / crop / train / ensemble / submit (stages 01-06): run(cfg) -> report dict
    #     (with a flat "summary" for the console); a stage in ``core_stages`` and not here runs the core
    #     implementation; a stage in neither says it has nothing to do and exits 0;
    #   overlays (plot_overlays.py): run(cfg, n=..., out=...) -> [paths];
    #   score (score.py): score(solution_path, submission_path) -> {name: value};
    #   row tasks also: localize_test / predict (inference paths of stage 06), and optionally
    #   partial_rows(paths, split) -> pd.Series (row_id -> what was missing).
    runners: dict[str, str] = {}
    core_stages: frozenset[str] = frozenset()

    def runner(self, stage: str):
        """The function that runs ``stage`` for this task; a clear error when it has none."""
        if stage not in self.runners:
            raise NotImplementedError(
                f"task {self.name!r} has no implementation of {stage!r}; it has {sorted(self.runners)}"
            )
        module, func = self.runners[stage].split(":")
        return getattr(importlib.import_module(module), func)

    def fold_strata(self, data_dir: Path) -> pd.DataFrame:
        """Rows to split into folds: study_id (the group kept in one fold: a study or a patient) and y (a
        class to balance across folds)."""
        raise NotImplementedError(f"task {self.name!r} has no folds")


class RowTask(Task, ABC):
    """A Kaggle competition scored on submission rows of class probabilities (RSNA lumbar, cervical):
    targets, row ids, labels, metric, DICOM series layout. Stages 01 (DICOM cache), 05 (stacking) and
    06 (test DICOM to submission) are the core's."""

    pred_columns: list[str]  # submission columns after row_id
    core_stages = frozenset({"preprocess", "ensemble", "submit"})

    def fold_strata(self, data_dir: Path) -> pd.DataFrame:
        return self.strata(pd.read_csv(Path(data_dir) / "train.csv"))

    @abstractmethod
    def row_ids(self, study_ids) -> list[str]:
        """Submission row ids of the given studies, in sample_submission order."""

    @abstractmethod
    def parse_row_id(self, row_id: str) -> dict:
        """Split a row id into its parts (study_id and the target's parts)."""

    @abstractmethod
    def solution_from_train(self, train: pd.DataFrame) -> pd.DataFrame:
        """Solution table (row_id, pred_columns..., sample_weight) from the train label file.

        Rows without a label are left out: they are not scored.
        """

    @abstractmethod
    def score(self, solution: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
        """Official metric. Returns {'score': ..., <part>: ...}; lower is better."""

    @abstractmethod
    def strata(self, train: pd.DataFrame) -> pd.DataFrame:
        """Label rows for fold stratification: study_id, y (an integer class, missing labels as 0)."""

    @abstractmethod
    def list_series(self, data_dir: Path, split: str) -> pd.DataFrame:
        """Series to read for ``split`` ('train' or 'test'): study_id, series_id, description, folder.

        Only series listed by the competition files (or found on disk, where the competition lists
        none) are returned; ``folder`` may not exist (a missing series), which the caller reports.
        """

    # --- stage 05: what stackers know about a row besides the members' probabilities -------------
    def prior_key(self, row_id: str) -> str:
        """The row's target without its study (e.g. 'spinal_canal_stenosis_l4_l5', 'C3')."""
        parts = self.parse_row_id(row_id)
        return "_".join(str(v) for k, v in parts.items() if k != "study_id")

    def prior_keys(self) -> list[str]:
        return list(self.targets)

    @abstractmethod
    def stack_group(self, row_id: str) -> str:
        """The row's group: stackers that blend per group fit one set of weights for each."""

    @abstractmethod
    def stack_groups(self) -> list[str]: ...

    def stack_features(
        self, rows: pd.DataFrame, probs: np.ndarray, manifest: pd.DataFrame | None, cfg=None
    ) -> pd.DataFrame:
        """Numeric row features for stackers (NaN where unknown), one row per row of ``rows``.

        ``probs`` are the members' (n, M, K) probabilities of these rows; ``manifest`` the crop manifest;
        ``cfg`` the run's config (stage 05) or stage 06's work config (whose out_dir holds the test
        split's stage-02 outputs).
        """
        return pd.DataFrame(index=rows.index)

    def align(self, solution: pd.DataFrame, submission: pd.DataFrame) -> pd.DataFrame:
        """Submission rows in the solution's order; a clear error names missing row ids."""
        sub = submission.drop_duplicates("row_id").set_index("row_id")
        missing = solution["row_id"][~solution["row_id"].isin(sub.index)]
        if len(missing):
            raise ValueError(
                f"submission lacks {len(missing)} row ids of the solution, e.g. {missing.iloc[0]!r}"
            )
        cols = [c for c in self.pred_columns if c not in sub.columns]
        if cols:
            raise ValueError(f"submission lacks columns {cols}; expected {self.pred_columns}")
        out = sub.loc[solution["row_id"].to_numpy(), self.pred_columns].astype(np.float64)
        if not np.isfinite(out.to_numpy()).all():
            raise ValueError("submission holds non-finite probabilities")
        return out.reset_index()


def weighted_log_loss(y_onehot: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    """Sample-weighted multiclass log loss, as sklearn.metrics.log_loss computes it.

    Prediction rows are normalized to sum 1, then clipped to [eps, 1 - eps] with eps the float64
    machine epsilon, before the log; the loss is sum(w * -log p_true) / sum(w).
    """
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(1, keepdims=True)
    p = np.clip(p, EPS, 1 - EPS)
    per_row = -(np.asarray(y_onehot, dtype=np.float64) * np.log(p)).sum(1)
    w = np.asarray(w, dtype=np.float64)
    return float((w * per_row).sum() / w.sum())


def binary_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-row binary log loss with p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))
