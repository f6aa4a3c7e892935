"""Stage 04 (lumbar): severity classifiers over the stage-03 crops, trained on the shared study folds.

A sample is one (study, condition, level) row: its sagittal and axial crop stacks, its condition and
level. One multi-task model per fold predicts every row, through the head of the row's condition group
(spinal, foraminal, subarticular). The loss is the metric's: cross entropy weighted 1/2/4 by the true
grade, plus an optional binary (moderate or worse) auxiliary loss; rows without a label are masked.
Each fold's model predicts its held-out studies, so ``oof.csv`` holds an out-of-fold prediction for
every labelled train row.
"""

from __future__ import annotations

import logging

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from spine.core.io import claim, mark_current, save_table
from spine.core.paths import Paths, require
from spine.core.train import dist
from spine.core.train.loop import TrainSettings, autocast, fit, load_weights, reseed, resolve_device
from spine.core.train.stage import fold_key, run_folds
from spine.lumbar.models.classifier import build_classifier
from spine.lumbar.task import CONDITIONS, GRADE_WEIGHTS, LEVELS, PRED_COLUMNS, condition_group
from spine.registry import get_task

log = logging.getLogger(__name__)

GROUPS = ["spinal", "foraminal", "subarticular"]


def train_rows(paths: Paths) -> pd.DataFrame:
    """The crop manifest's train rows with their grade (-1 where the label is missing) and indices."""
    manifest = pd.read_parquet(require(paths.crop_manifest, "03_crop"))
    rows = manifest[manifest["split"] == "train"].copy()
    labels = get_task("lumbar").labels_long(pd.read_csv(paths.data_dir / "train.csv"))
    rows = rows.merge(labels[["row_id", "grade"]], on="row_id", how="left")
    rows["grade"] = rows["grade"].fillna(-1).astype(int)
    return _with_indices(rows)


def _with_indices(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(
        condition_idx=rows["condition"].map({c: i for i, c in enumerate(CONDITIONS)}),
        level_idx=rows["level"].map({lv: i for i, lv in enumerate(LEVELS)}),
        group_idx=rows["condition"].map(lambda c: GROUPS.index(condition_group(c))),
    ).reset_index(drop=True)


class CropDataset(Dataset):
    """Rows → {'x': (views, slices, pixels, pixels), 'condition', 'level', 'group', 'y', 'index'}."""

    def __init__(self, paths: Paths, rows: pd.DataFrame, views, augment: bool):
        self.paths, self.rows, self.views = paths, rows.reset_index(drop=True), list(views)
        self._arrays: dict = {}  # memory-mapped per worker process
        self.aug = (
            A.Compose(
                [
                    A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-12, 12), p=0.7),
                    A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
                    A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
                ]
            )
            if augment
            else None
        )

    def __len__(self) -> int:
        return len(self.rows)

    def _array(self, split, study_id, view) -> np.ndarray:
        key = (split, study_id, view)
        if key not in self._arrays:
            self._arrays[key] = np.load(self.paths.crop_array(split, study_id, view), mmap_mode="r")
        return self._arrays[key]

    def __getitem__(self, i: int) -> dict:
        r = self.rows.iloc[i]
        x = np.stack([self._array(r["split"], r["study_id"], v)[r["array_index"]] for v in self.views])
        x = x.astype(np.float32)  # (V, S, P, P)
        if self.aug is not None:  # one random transform for every slice of every view
            v, s, p, _ = x.shape
            x = (
                reseed(self.aug)(image=x.reshape(v * s, p, p).transpose(1, 2, 0))["image"]
                .transpose(2, 0, 1)
                .reshape(x.shape)
            )
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "condition": int(r["condition_idx"]),
            "level": int(r["level_idx"]),
            "group": int(r["group_idx"]),
            "y": int(r.get("grade", -1)),
            "index": i,
        }


class RowLoss:
    """The metric's weighted cross entropy (1/2/4 by true grade) + ``aux`` × binary moderate-or-worse loss."""

    def __init__(self, aux: float):
        self.aux = aux

    def __call__(self, model, batch, device):
        grade, binary = model(*_inputs(batch, device))
        y = batch["y"].to(device)
        loss = F.cross_entropy(
            grade.float(),
            y,
            weight=torch.tensor(GRADE_WEIGHTS, dtype=torch.float32, device=device),
            ignore_index=-1,
        )
        if self.aux:
            m = y >= 0
            if m.any():
                loss = loss + self.aux * F.binary_cross_entropy_with_logits(
                    binary[m].float(), (y[m] >= 1).float()
                )
        return loss


def _inputs(batch, device):
    return (
        batch["x"].to(device, non_blocking=True),
        batch["condition"].to(device),
        batch["level"].to(device),
        batch["group"].to(device),
    )


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


@torch.no_grad()
def predict(model, paths: Paths, rows: pd.DataFrame, tc, device) -> np.ndarray:
    """Grade probabilities (len(rows), 3), each rank predicting a shard under DDP, gathered on all ranks."""
    ds = CropDataset(paths, rows, tc.views, augment=False)
    loader = make_loader(ds, tc, False, device)
    model.eval()
    idx, out = [], []
    for batch in loader:
        with autocast(device, tc.amp):
            grade, _ = model(*_inputs(batch, device))
        out.append(grade.float().softmax(1).cpu().numpy())
        idx.append(batch["index"].numpy())
    parts = dist.gather(
        (np.concatenate(idx) if idx else np.zeros(0, int), np.concatenate(out) if out else np.zeros((0, 3)))
    )
    probs = np.full((len(rows), 3), np.nan)
    for i, p in parts:  # DistributedSampler pads with repeats: the same row, the same prediction
        probs[i] = p
    return probs


def submission_frame(rows: pd.DataFrame, probs: np.ndarray, **extra) -> pd.DataFrame:
    """Rows + probabilities in submission format (row_id, normal_mild, moderate, severe) plus ids."""
    out = rows[["row_id", "study_id", "condition", "level"]].copy()
    out[PRED_COLUMNS] = probs
    return out.assign(**extra)


def heads_spec() -> dict:
    return {"n_groups": len(GROUPS), "n_conditions": len(CONDITIONS), "n_levels": len(LEVELS)}


def build_model(cfg) -> torch.nn.Module:
    return build_classifier(cfg.train, len(cfg.train.views), cfg.crop.n_slices, heads_spec())


def train_fold(cfg, paths: Paths, rows: pd.DataFrame, fold_of: dict, fold: int, device) -> dict:
    """Train one fold (or load its checkpoint) and write its out-of-fold predictions."""
    tc = cfg.train
    key = fold_key(cfg, paths)
    rows = rows.assign(fold=rows["study_id"].map(fold_of))
    train = rows[(rows["fold"] != fold) & (rows["grade"] >= 0)]
    held = rows[rows["fold"] == fold]
    val = held[held["grade"] >= 0]
    ckpt = paths.checkpoint(fold, cfg.seed)
    if dist.is_main():
        claim(ckpt, key)
    dist.barrier()
    torch.manual_seed(cfg.seed + fold)  # the same initial weights every run
    model = build_model(cfg)
    history = []
    if ckpt.exists():
        model = load_weights(model, ckpt, device)
    else:
        loader = make_loader(CropDataset(paths, train, tc.views, augment=True), tc, True, device)

        def validate(m):  # the official metric on the fold's held-out rows
            return score_rows(val, predict(m, paths, val, tc, device))["score"]

        use_val = tc.select == "best" or tc.patience is not None or tc.validate_every_epoch
        model, history = fit(
            model,
            loader,
            RowLoss(tc.aux_binary),
            TrainSettings.from_config(cfg.train, cfg.seed + fold),
            ckpt,
            device,
            f"fold {fold}",
            validate=validate if use_val else None,
        )
    probs = predict(model, paths, val, tc, device)
    if dist.is_main():
        save_table(paths.oof_fold(fold), submission_frame(val, probs, fold=fold, seed=cfg.seed))
        mark_current(paths.oof_fold(fold), key)
    return {"fold": fold, "history": history}


def score_rows(rows: pd.DataFrame, probs: np.ndarray) -> dict:
    """Official lumbar metric of ``probs`` on labelled ``rows``."""
    task = get_task("lumbar")
    sol = pd.DataFrame(np.eye(3)[rows["grade"].to_numpy()], columns=PRED_COLUMNS)
    sol.insert(0, "row_id", rows["row_id"].to_numpy())
    sol["sample_weight"] = GRADE_WEIGHTS[rows["grade"].to_numpy()]
    sub = pd.DataFrame(probs, columns=PRED_COLUMNS).assign(row_id=rows["row_id"].to_numpy())
    return task.score(sol, sub)


def prior_probs(rows: pd.DataFrame, fold_of: dict, train: pd.DataFrame) -> np.ndarray:
    """Prior-only baseline, out-of-fold: each row of ``rows`` gets its (condition, level)'s grade
    frequencies among the labelled ``train`` rows of the other folds (with a pseudo count of 0.5 per
    grade, so an unseen grade is not impossible)."""
    folds = rows["study_id"].map(fold_of).to_numpy()
    train_folds = train["study_id"].map(fold_of)
    out = np.zeros((len(rows), 3))
    for fold in np.unique(folds):
        other = train[(train_folds != fold) & (train["grade"] >= 0)]
        counts = other.groupby(["condition", "level"])["grade"].value_counts().unstack(fill_value=0)
        counts = counts.reindex(columns=[0, 1, 2], fill_value=0) + 0.5
        freq = counts.div(counts.sum(axis=1), axis=0)
        m = folds == fold
        keys = pd.MultiIndex.from_frame(rows.loc[m, ["condition", "level"]])
        out[m] = freq.reindex(keys).fillna(1 / 3).to_numpy()
    return out


def bayes_probs(paths: Paths, rows: pd.DataFrame) -> np.ndarray | None:
    """The generator's Bayes-optimal probabilities of these rows, when its truth folder exists."""
    f = paths.truth_dir / "labels.csv"
    if not f.exists():
        return None
    truth = pd.read_csv(f).set_index("row_id")
    return truth.loc[rows["row_id"], [f"bayes_{c}" for c in PRED_COLUMNS]].to_numpy()


def oof_report(paths: Paths, oof: pd.DataFrame, rows: pd.DataFrame, fold_of: dict) -> dict:
    """OOF metric beside the prior-only baseline and (on generated data) the Bayes optimum."""
    lab = rows.set_index("row_id").loc[oof["row_id"]].reset_index()
    report = {
        "rows": len(oof),
        "studies": int(oof["study_id"].nunique()),
        "model": score_rows(lab, oof[PRED_COLUMNS].to_numpy()),
        "prior": score_rows(lab, prior_probs(lab, fold_of, rows)),
    }
    bayes = bayes_probs(paths, lab)
    if bayes is not None:
        report["bayes"] = score_rows(lab, bayes)
        gap = report["prior"]["score"] - report["bayes"]["score"]
        report["signal_captured"] = (report["prior"]["score"] - report["model"]["score"]) / gap
    return report


def run_train(cfg) -> dict:
    """Stage 04: train the folds of ``fold`` / ``train.folds`` (default all); write oof.csv and a report."""
    return run_folds(cfg, lambda paths, _: train_rows(paths), train_fold, oof_report)


def predict_test(cfg) -> pd.DataFrame:
    """Stage 06's classification: every test row of this out_dir's crop manifest, predicted by every
    fold's model of the experiment (read from ``models_from``) and averaged over folds.

    A row whose crop is missing in any view the model reads gets NaN probabilities and the reason,
    so stage 06 can fall back to the prior and report it.
    """
    tc = cfg.train
    paths = Paths.from_config(cfg)
    device = resolve_device(tc.device)
    manifest = pd.read_parquet(require(paths.crop_manifest, "03_crop"))
    rows = _with_indices(manifest[manifest["split"] == "test"])
    missing = np.zeros(len(rows), bool)
    reason = np.full(len(rows), "", dtype=object)
    for v in tc.views:
        m = rows[f"{v}_missing"].to_numpy(bool)
        reason[m & ~missing] = [f"{v}: {r}" for r in rows.loc[m & ~missing, f"{v}_reason"]]
        missing |= m
    folds = list(tc.folds) if tc.folds is not None else list(range(cfg.folds.n_folds))
    probs = np.zeros((len(rows), 3))
    ok = rows[~missing]
    for fold in folds:
        ckpt = paths.checkpoint(fold, cfg.seed)
        if not ckpt.exists():
            raise FileNotFoundError(
                f"checkpoint {ckpt} is missing: run src/04_train.py for experiment {cfg.exp!r}, or point "
                "models_from= at the folder that holds models/"
            )
        model = load_weights(build_model(cfg), ckpt, device)
        if len(ok):
            probs[~missing] += predict(model, paths, ok, tc, device) / len(folds)
    probs[missing] = np.nan
    return submission_frame(rows, probs, reason=reason)
