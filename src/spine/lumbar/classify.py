"""Stage 04 (lumbar): severity classifiers over the stage-03 crops, trained on the shared study folds.

A sample is one (study, condition, level) row: its crop stacks of the views ``train.views`` (sagittal,
axial), which of them exist (a view stage 03 could not crop — no such series, no point — is zero-filled
and masked out of the model's fusion), its condition and level. One multi-task model per fold predicts
every row, through the head of the row's condition group (spinal, foraminal, subarticular). The loss is
the metric's: cross entropy weighted 1/2/4 by the true grade, plus an optional binary (moderate or worse)
auxiliary loss; rows without a label are masked.

A row is predicted from the views it has; only a row with none gets the prior (NaN in stage 06, which
falls back to the train prior; its fold's out-of-fold prior in ``oof.csv``). So that the model has seen
a missing view, training drops each view of a row with probability ``train.view_dropout`` (never all of
them). Each fold's model predicts its held-out studies, so ``oof.csv`` holds an out-of-fold prediction
for every labelled train row, and — with several views — the same rows predicted with each view removed
(columns ``without_<view>_<grade>``), which the report scores beside the prior.
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
from spine.lumbar.crops import VIEWS
from spine.lumbar.models.classifier import MASK_VERSION_KEY, build_classifier
from spine.lumbar.task import CONDITIONS, GRADE_WEIGHTS, LEVELS, PRED_COLUMNS, condition_group
from spine.registry import get_task

log = logging.getLogger(__name__)

GROUPS = ["spinal", "foraminal", "subarticular"]


def train_rows(paths: Paths, views=VIEWS) -> pd.DataFrame:
    """The crop manifest's train rows with their grade (-1 where the label is missing), indices and
    which of ``views`` are missing (``missing_views``, ``n_views``: see ``_with_indices``)."""
    manifest = pd.read_parquet(require(paths.crop_manifest, "03_crop"))
    rows = manifest[manifest["split"] == "train"].copy()
    labels = get_task("lumbar").labels_long(pd.read_csv(paths.data_dir / "train.csv"))
    rows = rows.merge(labels[["row_id", "grade"]], on="row_id", how="left")
    rows["grade"] = rows["grade"].fillna(-1).astype(int)
    return _with_indices(rows, views)


def _with_indices(rows: pd.DataFrame, views) -> pd.DataFrame:
    """Model indices of each row, the comma-separated ``views`` it lacks and how many it has."""
    return rows.assign(
        condition_idx=rows["condition"].map({c: i for i, c in enumerate(CONDITIONS)}),
        level_idx=rows["level"].map({lv: i for i, lv in enumerate(LEVELS)}),
        group_idx=rows["condition"].map(lambda c: GROUPS.index(condition_group(c))),
        missing_views=missing_views(rows, views),
        n_views=view_present(rows, views).sum(1),
    ).reset_index(drop=True)


def view_present(rows: pd.DataFrame, views, without=()) -> np.ndarray:
    """(len(rows), len(views)) bool: the views of each manifest row that stage 03 cropped, less
    ``without``."""
    unknown = [v for v in views if f"{v}_missing" not in rows]
    if unknown:
        raise ValueError(f"train.views names {unknown}, which the crop manifest lacks; it has {list(VIEWS)}")
    return np.stack([~rows[f"{v}_missing"].to_numpy(bool) & (v not in without) for v in views], 1)


def missing_views(rows: pd.DataFrame, views=VIEWS) -> pd.Series:
    """Per manifest row, the comma-separated ``views`` whose crop stage 03 could not make ('' if none)."""
    present = view_present(rows, views)
    return pd.Series([",".join(v for v, p in zip(views, ps) if not p) for ps in present], index=rows.index)


def missing_view_rows(paths: Paths, split: str, views=VIEWS) -> pd.Series:
    """row_id → comma-separated missing views (e.g. 'ax'), for the rows of ``split`` in this out_dir's
    crop manifest that lack at least one of ``views``; a row listing every view is one the model
    cannot read (stage 06 gives it the train prior). Index name ``row_id``, series name ``missing_views``."""
    manifest = pd.read_parquet(require(paths.crop_manifest, "03_crop"))
    rows = manifest[manifest["split"] == split]
    missing = pd.Series(missing_views(rows, views).to_numpy(), index=pd.Index(rows["row_id"], name="row_id"))
    return missing[missing != ""].rename("missing_views")


def drop_views(present: torch.Tensor, p: float) -> torch.Tensor:
    """View dropout: each present view is dropped with probability ``p``, never all of them (when every
    draw drops, one present view, drawn at random, is kept). Draws from torch's generator, which the
    training loop seeds, so a run repeats its drops."""
    if p <= 0 or int(present.sum()) <= 1:
        return present
    keep = present & (torch.rand(len(present)) >= p)
    if not keep.any():
        idx = present.nonzero()[:, 0]
        keep = torch.zeros_like(present)
        keep[idx[torch.randint(len(idx), ())]] = True
    return keep


class CropDataset(Dataset):
    """Rows → {'x': (views, slices, pixels, pixels), 'present': (views,) bool, 'condition', 'level',
    'group', 'y', 'index'}.

    A view is absent when stage 03 flagged it missing, when it is in ``without`` (OOF predictions with a
    view removed) or when view dropout (``view_dropout``, training only) drops it; an absent view's
    crop is zeros.
    """

    def __init__(
        self, paths: Paths, rows: pd.DataFrame, views, augment: bool, view_dropout: float = 0.0, without=()
    ):
        if not 0 <= view_dropout < 1:
            raise ValueError(f"train.view_dropout must be in [0, 1), got {view_dropout}")
        self.paths, self.rows, self.views = paths, rows.reset_index(drop=True), list(views)
        self.view_dropout = view_dropout if augment else 0.0
        self.present = view_present(self.rows, self.views, without)
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
        present = drop_views(torch.from_numpy(self.present[i].copy()), self.view_dropout)
        x = np.stack([self._array(r["split"], r["study_id"], v)[r["array_index"]] for v in self.views])
        x = x.astype(np.float32)  # (V, S, P, P)
        if self.aug is not None:  # one random transform for every slice of every view
            v, s, p, _ = x.shape
            x = (
                reseed(self.aug)(image=x.reshape(v * s, p, p).transpose(1, 2, 0))["image"]
                .transpose(2, 0, 1)
                .reshape(x.shape)
            )
        x[~present.numpy()] = 0  # after augmenting: brightness and noise would fill a blank view
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "present": present,
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
        batch["present"].to(device),
        batch["condition"].to(device),
        batch["level"].to(device),
        batch["group"].to(device),
    )


def train_dataset(paths: Paths, rows: pd.DataFrame, cfg, augment: bool) -> CropDataset:
    """A fold's training rows, less those with no view to read (nothing to learn from; logged)."""
    readable = rows[rows["n_views"] > 0]
    if len(readable) < len(rows):
        log.warning(
            "%d training rows have none of the views %s: not trained on",
            len(rows) - len(readable),
            list(cfg.train.views),
        )
    return CropDataset(paths, readable, cfg.train.views, augment, cfg.train.view_dropout)


@torch.no_grad()
def predict(model, paths: Paths, rows: pd.DataFrame, tc, device, without=()) -> np.ndarray:
    """Grade probabilities (len(rows), 3), each rank predicting a shard under DDP, gathered on all ranks.

    Each row is predicted from its present views less ``without``; a row left with none gets NaN.
    """
    rows = rows.reset_index(drop=True)
    probs = np.full((len(rows), 3), np.nan)
    readable = np.flatnonzero(view_present(rows, tc.views, without).any(1))
    if len(readable) == 0:
        return probs
    ds = CropDataset(paths, rows.iloc[readable], tc.views, augment=False, without=without)
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
    for i, p in parts:  # DistributedSampler pads with repeats: the same row, the same prediction
        probs[readable[i]] = p
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
    """The held-out rows' predictions in OOF format (submission columns, ids, fold and seed).

    A row with no view gets its out-of-fold prior, as stage 06 gives such a test row the train prior.
    With several views, the columns ``without_<view>_<grade>`` hold the same rows predicted with that
    view removed (the prior where no other view is left), for the report's missing-view figures.
    """
    prior = oof_prior(
        prior_keys(held), held["fold"], len(PRED_COLUMNS), prior_keys(train), train["grade"], train["fold"]
    )

    def predicted(without=()):
        probs = predict(model, paths, held, cfg.train, device, without)
        return np.where(np.isnan(probs).any(1, keepdims=True), prior, probs)

    frame = submission_frame(held, predicted(), fold=fold, seed=cfg.seed)
    views = list(cfg.train.views)
    for v in views if len(views) > 1 else []:
        frame[[f"without_{v}_{c}" for c in PRED_COLUMNS]] = predicted((v,))
    return frame


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
    """OOF metric beside the prior-only baseline and (on generated data) the Bayes optimum, and the
    missing-view figures (``missing_view_report``)."""
    lab = rows.set_index("row_id").loc[oof["row_id"]].reset_index()
    prior = prior_baseline(lab, fold_of, rows)
    report = {
        "rows": len(oof),
        "studies": int(oof["study_id"].nunique()),
        "model": score_frame(oof, rows),
        "prior": score_rows(lab, prior),
        "missing_views": missing_view_report(oof.reset_index(drop=True), lab, prior),
    }
    bayes = bayes_frame(paths, lab["row_id"], PRED_COLUMNS)
    return add_bayes(report, None if bayes is None else score_rows(lab, bayes.to_numpy()))


def missing_view_report(oof: pd.DataFrame, lab: pd.DataFrame, prior: np.ndarray) -> dict:
    """Model vs the prior on rows with a missing view, row-aligned ``oof`` / ``lab`` / ``prior``.

    - ``rows_lacking_a_view``: rows whose crop manifest lacks a view the model reads (how many per set
      of missing views; ``no_view`` of them have none and hold the prior);
    - ``without_<view>``: every row predicted with that view removed, beside the same rows' prediction
      from every view they have and the prior; it exists even when few rows lack a view.
    """
    model = oof[PRED_COLUMNS].to_numpy()
    lacking = (lab["missing_views"] != "").to_numpy()
    out = {
        "rows_lacking_a_view": {
            "rows": int(lacking.sum()),
            "no_view": int((lab["n_views"] == 0).sum()),
            "by_missing_views": {
                k: int(n) for k, n in lab.loc[lacking, "missing_views"].value_counts().items()
            },
            **_model_vs_prior(lab[lacking], {"model": model[lacking]}, prior[lacking]),
        }
    }
    for view in VIEWS:
        cols = [f"without_{view}_{c}" for c in PRED_COLUMNS]
        if set(cols) <= set(oof.columns):  # written by predict_frame when the model reads several views
            preds = {"model": oof[cols].to_numpy(), "model_all_views": model}
            out[f"without_{view}"] = {"rows": len(lab), **_model_vs_prior(lab, preds, prior)}
    return out


def _model_vs_prior(lab: pd.DataFrame, preds: dict, prior: np.ndarray) -> dict:
    """The metric of each prediction of ``preds`` and of the prior on rows ``lab`` (none when empty)."""
    if not len(lab):
        return {}
    return {name: score_rows(lab, p) for name, p in {**preds, "prior": prior}.items()}


FAMILY = Family(
    load_items=lambda paths, cfg: train_rows(paths, cfg.train.views),
    split=split,
    build_model=build_model,
    dataset=train_dataset,
    loss=lambda cfg: RowLoss(cfg.train.aux_binary),
    predict_frame=predict_frame,
    score=score_frame,
    oof_report=oof_report,
)


def run_train(cfg) -> dict:
    """Stage 04: train the folds of ``fold`` / ``train.folds`` (default all); write oof.csv and a report."""
    return run_folds(cfg, FAMILY)


def load_classifier(cfg, ckpt, device) -> torch.nn.Module:
    """The classifier of ``cfg`` with the weights of ``ckpt``; a clear error for a checkpoint written
    before the models took a per-view present mask (their layers differ: it cannot be used)."""
    try:
        return load_weights(build_model(cfg), ckpt, device)
    except RuntimeError as e:
        if MASK_VERSION_KEY not in str(e):
            raise
        raise RuntimeError(
            f"{ckpt} holds a lumbar classifier trained before the per-view present mask (views fused "
            f"without a mask); it cannot be loaded into today's model. Retrain it: "
            f"python src/04_train.py --config <this experiment's config>"
        ) from e


def _unread_reason(row: pd.Series, views) -> str:
    """Why no view of a manifest row can be read, e.g. 'sag, ax: no spinal_canal_stenosis point'."""
    by_reason: dict = {}
    for v in views:
        by_reason.setdefault(row[f"{v}_reason"], []).append(v)
    return "; ".join(f"{', '.join(vs)}: {why}" for why, vs in by_reason.items())


def predict_test(cfg) -> pd.DataFrame:
    """Stage 06's classification: every test row of this out_dir's crop manifest, predicted by every
    fold's model of the experiment (read from ``models_from``) and averaged over folds.

    A row is predicted from the views it has (``missing_views`` lists those it lacks); a row with none
    of the views the model reads gets NaN probabilities and the reason, so stage 06 can fall back to the
    prior and report it.
    """
    tc = cfg.train
    paths = Paths.from_config(cfg)
    device = resolve_device(tc.device)
    manifest = pd.read_parquet(require(paths.crop_manifest, "03_crop"))
    rows = _with_indices(manifest[manifest["split"] == "test"], tc.views)
    unread = (rows["n_views"] == 0).to_numpy()
    reason = np.full(len(rows), "", dtype=object)
    reason[unread] = [_unread_reason(r, tc.views) for _, r in rows[unread].iterrows()]
    ckpts = predict_checkpoints(cfg, paths)
    probs = np.zeros((len(rows), 3))
    for ckpt in ckpts:
        probs += predict(load_classifier(cfg, ckpt, device), paths, rows, tc, device) / len(ckpts)
    return submission_frame(rows, probs, reason=reason, missing_views=rows["missing_views"].to_numpy())
