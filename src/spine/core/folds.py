"""Study folds, made once per task and shared by every model (localizer and classifiers alike)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from spine.core.io import save_table
from spine.core.paths import Paths
from spine.registry import get_task

log = logging.getLogger(__name__)


def make_folds(task_name: str, data_dir: Path, n_folds: int, seed: int) -> pd.DataFrame:
    """StratifiedGroupKFold over the label rows of train.csv, grouped by study: study_id, fold.

    Stratifying the rows (not the studies) balances every grade of every target across folds,
    while grouping keeps all rows of a study in one fold.
    """
    task = get_task(task_name)
    strata = task.strata(pd.read_csv(Path(data_dir) / "train.csv"))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = {}
    for k, (_, idx) in enumerate(splitter.split(strata, strata["y"], groups=strata["study_id"])):
        fold_of.update({s: k for s in strata["study_id"].iloc[idx]})
    studies = strata["study_id"].drop_duplicates()
    return pd.DataFrame({"study_id": studies, "fold": studies.map(fold_of).astype(int)})


def load_folds(cfg) -> pd.DataFrame:
    """The task's folds file, made on first use; an error if it no longer matches train.csv."""
    paths = Paths.from_config(cfg)
    folds = make_folds(cfg.task, paths.data_dir, cfg.folds.n_folds, cfg.seed)
    if paths.folds.exists():
        saved = pd.read_csv(paths.folds)
        if set(saved["study_id"].astype(str)) != set(folds["study_id"].astype(str)) or (
            saved["fold"].nunique() != cfg.folds.n_folds
        ):
            raise RuntimeError(
                f"{paths.folds} was made for other studies or another fold count; delete it to remake it "
                "(models trained on the old folds are then no longer out-of-fold)"
            )
        return saved.astype({"study_id": folds["study_id"].dtype})
    save_table(paths.folds, folds)
    log.info("wrote %s: %d studies in %d folds", paths.folds, len(folds), cfg.folds.n_folds)
    return folds
