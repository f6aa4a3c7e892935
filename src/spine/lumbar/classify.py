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
from torch.utils.data import Dataset

from spine.core.paths import Paths, require
from spine.core.priors import oof_prior
from spine.core.train import dist
from spine.core.train.loop import autocast, load_weights, reseed, resolve_device
from spine.core.train.stage import Family, make_loader, predict_checkpoints, run_folds
from spine.core.truth import add_bayes, bayes_frame
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


def split(rows: pd.DataFrame, fold_of: dict, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled rows a fold trains on (the other folds') and those it predicts (its own)."""
    rows = rows.assign(fold=rows["study_id"].map(fold_of))
    labelled = rows[rows["grade"] >= 0]
    return labelled[labelled["fold"] != fold], labelled[labelled["fold"] == fold]


def predict_frame(model, paths: Paths, held: pd.DataFrame, train, cfg, device, fold: int) -> pd.DataFrame:
    """The held-out rows' predictions in OOF format (submission columns, ids, fold and seed)."""
    probs = predict(model, paths, held, cfg.train, device)
    return submission_frame(held, probs, fold=fold, seed=cfg.seed)


def score_rows(rows: pd.DataFrame, probs: np.ndarray) -> dict:
    """Official lumbar metric of ``probs`` on labelled ``rows``."""
    task = get_task("lumbar")
    sol = pd.DataFrame(np.eye(3)[rows["grade"].to_numpy()], columns=PRED_COLUMNS)
    sol.insert(0, "row_id", rows["row_id"].to_numpy())
    sol["sample_weight"] = GRADE_WEIGHTS[rows["grade"].to_numpy()]
    sub = pd.DataFrame(probs, columns=PRED_COLUMNS).assign(row_id=rows["row_id"].to_numpy())
    return task.score(sol, sub)


def score_frame(frame: pd.DataFrame, rows: pd.DataFrame) -> dict:
    """Official lumbar metric of a frame (row_id + PRED_COLUMNS) of labelled rows of ``rows``."""
    lab = rows.set_index("row_id").loc[frame["row_id"]].reset_index()
    return score_rows(lab, frame[PRED_COLUMNS].to_numpy())


def prior_keys(rows: pd.DataFrame) -> pd.Series:
    """Each row's target without its study (the task's prior key): '<condition>_<level>'."""
    return rows["condition"] + "_" + rows["level"]


def prior_baseline(rows: pd.DataFrame, fold_of: dict, train: pd.DataFrame) -> np.ndarray:
    """Prior-only baseline, out of fold: each row of ``rows`` gets its (condition, level)'s grade
    prior (``spine.core.priors``) among the labelled ``train`` rows of the other folds."""
    return oof_prior(
        prior_keys(rows),
        rows["study_id"].map(fold_of),
        len(PRED_COLUMNS),
        prior_keys(train),
        train["grade"],
        train["study_id"].map(fold_of),
    )


def oof_report(paths: Paths, oof: pd.DataFrame, rows: pd.DataFrame, fold_of: dict) -> dict:
    """OOF metric beside the prior-only baseline and (on generated data) the Bayes optimum."""
    lab = rows.set_index("row_id").loc[oof["row_id"]].reset_index()
    report = {
        "rows": len(oof),
        "studies": int(oof["study_id"].nunique()),
        "model": score_frame(oof, rows),
        "prior": score_rows(lab, prior_baseline(lab, fold_of, rows)),
    }
    bayes = bayes_frame(paths, lab["row_id"], PRED_COLUMNS)
    return add_bayes(report, None if bayes is None else score_rows(lab, bayes.to_numpy()))


FAMILY = Family(
    load_items=lambda paths, cfg: train_rows(paths),
    split=split,
    build_model=build_model,
    dataset=lambda paths, rows, cfg, augment: CropDataset(paths, rows, cfg.train.views, augment),
    loss=lambda cfg: RowLoss(cfg.train.aux_binary),
    predict_frame=predict_frame,
    score=score_frame,
    oof_report=oof_report,
)


def run_train(cfg) -> dict:
    """Stage 04: train the folds of ``fold`` / ``train.folds`` (default all); write oof.csv and a report."""
    return run_folds(cfg, FAMILY)


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
    ckpts = predict_checkpoints(cfg, paths)
    probs = np.zeros((len(rows), 3))
    ok = rows[~missing]
    for ckpt in ckpts:
        model = load_weights(build_model(cfg), ckpt, device)
        if len(ok):
            probs[~missing] += predict(model, paths, ok, tc, device) / len(ckpts)
    probs[missing] = np.nan
    return submission_frame(rows, probs, reason=reason)
