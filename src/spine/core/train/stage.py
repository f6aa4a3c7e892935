"""Stage 04, shared by both tasks: the fold driver (train the selected folds, skipping current ones,
under DDP when launched by torchrun; gather the OOF tables, write ``oof.csv`` once every fold is done,
and the report), one fold's training, the data loader and stage 06's checkpoint list. What a sample is,
which model and loss learn it and how its rows are predicted and scored is the task module's
``Family``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from spine.core.config import save_config
from spine.core.folds import RUN_ONLY_KEYS, fold_checkpoints, fold_key, load_folds, selected_folds
from spine.core.io import claim, is_current, mark_current, save_table, save_text
from spine.core.paths import Paths
from spine.core.report import score_summary
from spine.core.train import dist
from spine.core.train.loop import TrainSettings, fit, load_weights

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


def make_loader(ds: Dataset, tc, shuffle: bool, device) -> DataLoader:
    """A loader that keeps a GPU fed: worker processes, pinned memory, a DistributedSampler under DDP."""
    sampler = DistributedSampler(ds, shuffle=shuffle) if dist.world_size() > 1 else None
    return DataLoader(
        ds,
        batch_size=tc.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=tc.loader_workers,
        pin_memory=bool(tc.pin_memory) and device.type == "cuda",
        persistent_workers=tc.loader_workers > 0,
        drop_last=shuffle and len(ds) > tc.batch_size,
    )


@dataclass(frozen=True)
class Family:
    """What stage 04 needs from a task's classifiers. ``items`` is the task's table of labelled samples
    (lumbar: one row per (study, condition, level); cervical: one row per study).

    - ``load_items(paths, cfg) -> items``
    - ``split(items, fold_of, fold) -> (train, held)``: the samples a fold trains on and predicts
    - ``build_model(cfg) -> nn.Module``
    - ``dataset(paths, items, cfg, augment) -> Dataset`` of the samples
    - ``loss(cfg) -> loss_fn(model, batch, device)``
    - ``predict_frame(model, paths, held, train, cfg, device, fold) -> DataFrame``: the held-out rows
      in OOF format (submission columns, ids, fold and seed)
    - ``score(frame, items) -> dict``: the official metric of such a frame (``score`` key)
    - ``oof_report(paths, oof, items, fold_of) -> dict``: the report entries of the OOF rows
    - ``oof_dtype``: read_csv dtypes of the fold tables
    """

    load_items: Callable
    split: Callable
    build_model: Callable
    dataset: Callable
    loss: Callable
    predict_frame: Callable
    score: Callable
    oof_report: Callable
    oof_dtype: dict | None = None


def train_key(cfg, paths: Paths) -> str:
    """What a stage-04 fold's model and OOF rows are made from: the train config and the crop config
    (each less ``RUN_ONLY_KEYS``), the folds, the seed and the crops."""
    crop = {k: v for k, v in OmegaConf.to_container(cfg.crop, resolve=True).items() if k not in RUN_ONLY_KEYS}
    return fold_key(cfg.train, paths.folds.read_text(), crop, cfg.seed, paths.crop_manifest.stat().st_size)


def fold_model(ckpt: Path, key: str, seed: int, build: Callable, train: Callable, device) -> tuple:
    """One fold's model and its training history: the checkpoint ``ckpt`` when it was made from ``key``,
    else ``train(model) -> (model, history)`` on a fresh ``build()``. A checkpoint made from other inputs
    is deleted first (``claim``); torch is seeded with ``seed`` right before the build, so a fold starts
    from the same weights every run. Shared by every trained stage (localizer, segmenter, classifiers)."""
    if dist.is_main():
        claim(ckpt, key)
    dist.barrier()
    torch.manual_seed(seed)
    model = build()
    if ckpt.exists():
        return load_weights(model, ckpt, device), []
    return train(model)


def train_fold(cfg, paths: Paths, items, fold_of: dict, fold: int, device, family: Family) -> dict:
    """Train one fold (or load its checkpoint) and write its out-of-fold predictions."""
    tc = cfg.train
    key = train_key(cfg, paths)
    train, held = family.split(items, fold_of, fold)

    def fit_fold(model):
        loader = make_loader(family.dataset(paths, train, cfg, True), tc, True, device)

        def validate(m):  # the official metric on the fold's held-out rows
            frame = family.predict_frame(m, paths, held, train, cfg, device, fold)
            return family.score(frame, items)["score"]

        use_val = tc.select == "best" or tc.patience is not None or tc.validate_every_epoch
        return fit(
            model,
            loader,
            family.loss(cfg),
            TrainSettings.from_config(tc, cfg.seed + fold),
            ckpt,
            device,
            f"fold {fold}",
            validate=validate if use_val else None,
        )

    ckpt = paths.checkpoint(fold, cfg.seed)
    model, history = fold_model(ckpt, key, cfg.seed + fold, lambda: family.build_model(cfg), fit_fold, device)
    frame = family.predict_frame(model, paths, held, train, cfg, device, fold)
    if dist.is_main():
        save_table(paths.oof_fold(fold), frame)
        mark_current(paths.oof_fold(fold), key)
    return {"fold": fold, "history": history}


def run_folds(cfg, family: Family) -> dict:
    """Stage 04 over the folds of ``fold`` / ``train.folds`` (default all), with ``train.torch_threads``.

    Each fold not current (``train_key``) is trained by ``train_fold``; once every fold is done their
    tables make ``oof.csv``, scored by ``family.oof_report``.
    """
    with torch_threads(cfg.train.torch_threads):
        return _run_folds(cfg, family)


def _run_folds(cfg, family: Family) -> dict:
    rank, world = dist.init_distributed()
    device = dist.device_for_rank(cfg.train.device)
    paths = Paths.from_config(cfg)
    folds_df = load_folds(cfg) if dist.is_main() else None
    dist.barrier()
    folds_df = folds_df if folds_df is not None else load_folds(cfg)
    fold_of = dict(zip(folds_df["study_id"], folds_df["fold"]))
    items = family.load_items(paths, cfg)
    all_folds = list(range(cfg.folds.n_folds))
    folds = selected_folds(cfg, cfg.train)
    log.info("stage 04 %s: folds %s on %s (rank %d of %d)", cfg.exp, folds, device, rank, world)
    histories = []
    for fold in folds:
        if is_current(paths.oof_fold(fold), train_key(cfg, paths)):
            log.info("fold %d: OOF predictions exist, skipped", fold)
            continue
        histories.append(train_fold(cfg, paths, items, fold_of, fold, device, family))
    dist.barrier()
    done = [f for f in all_folds if is_current(paths.oof_fold(f), train_key(cfg, paths))]
    oof = pd.concat([pd.read_csv(paths.oof_fold(f), dtype=family.oof_dtype) for f in done], ignore_index=True)
    report = {
        "exp": cfg.exp,
        "folds_done": done,
        "complete": done == all_folds,
        "world_size": world,
        **family.oof_report(paths, oof, items, fold_of),
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


def predict_checkpoints(cfg, paths: Paths) -> list[Path]:
    """Stage 06: the classifier checkpoint of every fold of ``train.folds`` (default all) of this seed,
    in fold order; an error naming the first one missing."""
    tc = cfg.train
    folds = list(tc.folds) if tc.get("folds") is not None else list(range(cfg.folds.n_folds))
    return fold_checkpoints(lambda f: paths.checkpoint(f, cfg.seed), folds, "04_train", "classifier")
