"""The generator's truth beside a generated data set (``<data_dir>_truth/``): its Bayes-optimal
probabilities, read by the stage reports to say how much of the learnable signal a model captured.
A real Kaggle folder has no truth folder; every reader then returns None.
"""

from __future__ import annotations

import pandas as pd

from spine.core.paths import Paths


def truth_labels(paths: Paths) -> pd.DataFrame | None:
    """``labels.csv`` of the truth folder indexed by row_id (None when there is none)."""
    f = paths.truth_dir / "labels.csv"
    if not f.exists():
        return None
    return pd.read_csv(f, dtype={"study_id": str}).set_index("row_id")


def bayes_frame(paths: Paths, row_ids, columns) -> pd.DataFrame | None:
    """The Bayes-optimal prediction of ``row_ids`` in the prediction ``columns`` (the truth's
    ``bayes_<column>``), one row per row id in their order (index 0..n-1); None when there is no
    truth or it lacks some of the rows."""
    truth = truth_labels(paths)
    if truth is None:
        return None
    columns = list(columns)
    bayes = truth.reindex(list(row_ids))[[f"bayes_{c}" for c in columns]]
    if not bayes.notna().all().all():
        return None
    bayes.columns = columns
    return bayes.reset_index(drop=True)


def add_bayes(report: dict, bayes: dict | None, model: str = "model") -> dict:
    """``report`` (holding the ``prior`` and ``model`` scores) with, when ``bayes`` (the Bayes optimum's
    scores) is given, ``bayes`` and ``signal_captured``: the share of the prior-to-Bayes gap that the
    ``model`` entry closes."""
    if bayes is not None:
        report["bayes"] = bayes
        gap = report["prior"]["score"] - bayes["score"]
        report["signal_captured"] = (report["prior"]["score"] - report[model]["score"]) / gap
    return report
