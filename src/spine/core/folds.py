"""Study folds, made once per task and shared by every model (localizer and classifiers alike)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from sklearn.model_selection import StratifiedGroupKFold

from spine.core.io import fingerprint, save_table
from spine.core.paths import Paths
from spine.registry import get_task

log = logging.getLogger(__name__)


def make_folds(task_name: str, data_dir: Path, n_folds: int, seed: int) -> pd.DataFrame:
    """StratifiedGroupKFold over the task's label rows (``Task.fold_strata``), grouped by study (or
    patient): study_id, fold.

    Stratifying the rows (not the studies) balances every grade of every target across folds,
    while grouping keeps all rows of a study in one fold.
    """
    strata = get_task(task_name).fold_strata(Path(data_dir))
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


# Config keys that change how a fold runs, never what it learns: which folds run, on which device, with
# how many loader or pool workers and torch threads, pinned memory, mixed precision, per-epoch validation
# logging and how finely inference is chunked. A fold made under other values of these is still current.
RUN_ONLY_KEYS = frozenset(
    {
        "folds",
        "device",
        "loader_workers",
        "num_workers",
        "torch_threads",
        "pin_memory",
        "amp",
        "validate_every_epoch",
        "chunk_slices",
        "overwrite",
    }
)


def fold_key(section, *inputs) -> str:
    """What a trained fold (its checkpoint and predictions) is made from: the stage's config ``section``
    (a DictConfig or dict) less ``RUN_ONLY_KEYS``, and the ``inputs`` it reads (folds file text, seed,
    cache or crop identity, ...). Two runs that differ only in run-only keys share the key, so running
    folds one by one and then all together trains each fold once."""
    if not isinstance(section, dict):
        section = OmegaConf.to_container(section, resolve=True)
    learned = {k: v for k, v in section.items() if k not in RUN_ONLY_KEYS}
    return fingerprint(learned, *inputs)


def selected_folds(cfg, section) -> list[int]:
    """The folds a stage runs: ``fold=K`` (stage 04) wins, then ``<section>.folds``, else all."""
    if cfg.get("fold") is not None:
        return [int(cfg.fold)]
    return list(section.folds) if section.get("folds") is not None else list(range(cfg.folds.n_folds))


def fold_checkpoints(checkpoint_of, folds: list[int], stage: str, what: str) -> list[Path]:
    """The expected checkpoint file of each fold, ``checkpoint_of(fold)`` (fold and seed in its name);
    never a glob, which would pick up another seed's or an old fold's file. A missing one is an error
    naming the file, the stage that makes it and the ``models_from`` way out."""
    found = []
    for fold in folds:
        ckpt = Path(checkpoint_of(fold))
        if not ckpt.exists():
            raise FileNotFoundError(
                f"{what} checkpoint {ckpt} is missing: run `python src/{stage}.py` with this config, or "
                "point models_from= at the folder that holds models/"
            )
        found.append(ckpt)
    return found
