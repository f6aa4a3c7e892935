"""Stage 04's fold driver, shared by both tasks: train the selected folds (skipping current ones, under
DDP when launched by torchrun), gather the OOF tables, write ``oof.csv`` once every fold is done, and the
report. What a sample is, how a fold trains and how OOF rows are scored is the task module's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from spine.core.config import save_config
from spine.core.folds import load_folds
from spine.core.io import fingerprint, is_current, save_table, save_text
from spine.core.paths import Paths
from spine.core.report import score_summary
from spine.core.train import dist

log = logging.getLogger(__name__)


@contextmanager
def torch_threads(n):
    """Run with ``n`` torch CPU threads (None: leave the default), restoring the setting after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# train.* keys that change how a fold runs, never what it learns
RUN_ONLY_KEYS = ("folds", "loader_workers", "pin_memory", "device", "validate_every_epoch", "torch_threads")


def fold_key(cfg, paths: Paths) -> str:
    """What a stage-04 fold's model and OOF rows are made from: the folds, the crops, the train config
    (less ``RUN_ONLY_KEYS``) and the seed."""
    train = {k: v for k, v in OmegaConf.to_container(cfg.train).items() if k not in RUN_ONLY_KEYS}
    return fingerprint(
        paths.folds.read_text(),
        train,
        OmegaConf.to_container(cfg.crop),
        cfg.seed,
        paths.crop_manifest.stat().st_size,
    )


def run_folds(
    cfg,
    load_items: Callable,
    train_fold: Callable,
    oof_report: Callable,
    oof_dtype: dict | None = None,
) -> dict:
    """Stage 04 over the folds of ``fold`` / ``train.folds`` (default all).

    ``load_items(paths, cfg)`` gives the labelled samples; ``train_fold(cfg, paths, items, fold_of,
    fold, device)`` trains one fold and writes ``paths.oof_fold(fold)`` marked with ``fold_key(cfg,
    paths)``; ``oof_report(paths, oof, items, fold_of)`` scores the OOF rows.
    """
    rank, world = dist.init_distributed()
    device = dist.device_for_rank(cfg.train.device)
    paths = Paths.from_config(cfg)
    folds_df = load_folds(cfg) if dist.is_main() else None
    dist.barrier()
    folds_df = folds_df if folds_df is not None else load_folds(cfg)
    fold_of = dict(zip(folds_df["study_id"], folds_df["fold"]))
    items = load_items(paths, cfg)
    all_folds = list(range(cfg.folds.n_folds))
    folds = [cfg.fold] if cfg.fold is not None else list(cfg.train.folds or all_folds)
    log.info("stage 04 %s: folds %s on %s (rank %d of %d)", cfg.exp, folds, device, rank, world)
    histories = []
    for fold in folds:
        if is_current(paths.oof_fold(fold), fold_key(cfg, paths)):
            log.info("fold %d: OOF predictions exist, skipped", fold)
            continue
        histories.append(train_fold(cfg, paths, items, fold_of, fold, device))
    dist.barrier()
    done = [f for f in all_folds if is_current(paths.oof_fold(f), fold_key(cfg, paths))]
    oof = pd.concat([pd.read_csv(paths.oof_fold(f), dtype=oof_dtype) for f in done], ignore_index=True)
    report = {
        "exp": cfg.exp,
        "folds_done": done,
        "complete": done == all_folds,
        "world_size": world,
        **oof_report(paths, oof, items, fold_of),
        "history": {h["fold"]: h["history"] for h in histories},
    }
    report["summary"] = score_summary(report)
    if dist.is_main():
        if report["complete"]:
            save_table(paths.oof, oof)
        save_text(paths.train_report, json.dumps(report, indent=2, default=float))
        save_config(cfg, paths.model_dir)
        save_config(cfg, Path(paths.oof).parent)
    return report
