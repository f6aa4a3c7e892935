"""Stage 04 (cervical): fracture classifiers over the stage-03 vertebra crops, on the shared study folds.

A sample is one study: its 7 vertebra crops (int16 HU, windowed into ``train.windows`` channels) and
which of them stage 02 found. A model (``spine.cervical.models.fracture``, ``train.model`` seq25d | res3d)
returns a fracture logit per vertebra, a patient_overall logit and slice-level auxiliary logits.

The loss is the metric: per study, the weighted mean of the binary log losses of its 8 rows with the
official weights (vertebra 1 negative / 2 positive, patient_overall 7 / 14; a vertebra that was not
found is left out), then the mean over the studies of the batch. Plus ``train.aux_slice`` x the
binary loss of the slice-level box labels (stage 03's ``box_depth``, max-pooled to the model's bins):
known for a vertebra labelled fractured in a study with boxes (its boxed slices), and for every vertebra
labelled not fractured (no slice has a fracture).

Each fold's model predicts its held-out studies, so ``oof.csv`` holds, in submission format, an
out-of-fold prediction of every labelled train row; a vertebra that was not found gets the training
folds' label rate of its target (with a ``reason``). ``predict_test`` is stage 06's inference path.
"""

from __future__ import annotations

import logging

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from spine.cervical.crops import AIR_HU, VIEW
from spine.cervical.ct import window
from spine.cervical.models.fracture import build_fracture_model
from spine.cervical.task import TARGETS, VERTEBRAE, WEIGHTS
from spine.core.paths import Paths, require
from spine.core.priors import oof_prior, prior_probs, prior_table
from spine.core.train import dist
from spine.core.train.loop import autocast, load_weights, reseed
from spine.core.train.stage import Family, make_loader, predict_checkpoints, run_folds, torch_threads
from spine.core.truth import add_bayes, bayes_frame
from spine.registry import get_task

log = logging.getLogger(__name__)

OVERALL = "patient_overall"
# (negative, positive) weight of each of the 8 columns, in TARGETS order (C1..C7, patient_overall)
COLUMN_WEIGHTS = np.array([WEIGHTS["vertebra"]] * len(VERTEBRAE) + [WEIGHTS[OVERALL]], dtype=np.float32)
FILLED = "; filled with the training folds' rate"
# "lines": a derived channel beside the HU windows of spine.cervical.ct: the black top-hat (closing
# minus image) of the soft-tissue window, slice by slice, with a 5-pixel disc. It is bright where a thin
# lucent line crosses bone (a fracture cleft) and dark in wide soft tissue, the canal and the air; scaled x2.
LINES = "lines"
LINES_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


# =============================================================================================
# Studies and labels
# =============================================================================================


def study_table(paths: Paths, split: str, listed=()) -> pd.DataFrame:
    """One row per study of ``split`` in the crop manifest (and per study of ``listed`` missing from it:
    nothing found, reason "no crop manifest row"): its 7 vertebra rows gathered as lists.

    Columns: study_id, split, found (7 bools), reason (7 strings), box_depth (7 lists or None),
    has_boxes; for train also y (8 labels in TARGETS order, NaN where missing).
    """
    manifest = pd.read_parquet(require(paths.crop_manifest, "03_crop"))
    m = manifest[manifest["split"] == split].copy()
    m["study_id"] = m["study_id"].astype(str)
    m = m.sort_values(["study_id", "array_index"])
    groups = dict(list(m.groupby("study_id", sort=False)))
    missing = [str(s) for s in dict.fromkeys(listed) if str(s) not in groups]
    if missing:
        log.warning("%d %s studies have no crop manifest row; their rows get the prior", len(missing), split)
    rows = []
    for study, g in [*groups.items(), *((s, m.iloc[:0]) for s in missing)]:
        g = g.set_index("vertebra").reindex(VERTEBRAE)
        rows.append(
            {
                "study_id": study,
                "split": split,
                "found": g["found"].fillna(False).astype(bool).to_numpy(),
                "reason": g["reason"].fillna("no crop manifest row").astype(str).to_numpy(),
                "box_depth": list(g["box_depth"]),
                "has_boxes": bool(g["has_boxes"].fillna(False).any()),
            }
        )
    studies = pd.DataFrame(rows, columns=["study_id", "split", "found", "reason", "box_depth", "has_boxes"])
    if split == "train":
        labels = pd.read_csv(paths.data_dir / "train.csv", dtype={"StudyInstanceUID": str})
        labels = labels.set_index("StudyInstanceUID").reindex(studies["study_id"])[TARGETS]
        studies["y"] = list(labels.to_numpy(dtype=np.float32))
        studies = studies[[np.isfinite(y).any() for y in studies["y"]]]
    return studies.reset_index(drop=True)


def check_crops(paths: Paths, studies: pd.DataFrame, cfg) -> None:
    """An error when the stage-03 arrays were made with other crop settings than ``cfg.crop``."""
    seen = studies[[bool(np.any(f)) for f in studies["found"]]]  # a study without crops may have no array
    if not len(seen):
        return
    r = seen.iloc[0]
    shape = np.load(paths.crop_array(r["split"], r["study_id"], VIEW), mmap_mode="r").shape
    want = (len(VERTEBRAE), int(cfg.crop.depth), int(cfg.crop.pixels), int(cfg.crop.pixels))
    if tuple(shape) != want:
        raise ValueError(
            f"crops under {paths.crop_dir} are {tuple(shape)}, this config wants {want}: "
            "rerun src/03_crop.py with this config"
        )


def aux_target(box_depth: list, y: np.ndarray, has_boxes: bool, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice-level targets (7, depth) and which vertebrae have them (7,).

    A vertebra labelled not fractured has no fractured slice; one labelled fractured has its boxed
    slices when the study has boxes (a box of a neighbour on a shared slice is dropped by the label);
    otherwise the target is unknown.
    """
    target = np.zeros((len(VERTEBRAE), depth), dtype=np.float32)
    known = np.zeros(len(VERTEBRAE), dtype=bool)
    for v in range(len(VERTEBRAE)):
        if y[v] == 0:
            known[v] = True
        elif y[v] == 1 and has_boxes and box_depth[v] is not None:
            target[v] = np.asarray(box_depth[v], dtype=np.float32)[:depth]
            known[v] = True
    return target, known


# =============================================================================================
# Data
# =============================================================================================


def input_channels(hu: np.ndarray, names) -> np.ndarray:
    """(C, *hu.shape) float32 model inputs of HU crops (..., H, W): each name a window of
    ``spine.cervical.ct.WINDOWS`` or ``"lines"`` (see LINES)."""
    out = np.empty((len(names), *hu.shape), dtype=np.float32)
    for c, name in enumerate(names):
        if name == LINES:
            soft = window(hu, "soft").reshape(-1, *hu.shape[-2:])
            lines = out[c].reshape(soft.shape)
            for k, s in enumerate(soft):
                lines[k] = cv2.morphologyEx(s, cv2.MORPH_BLACKHAT, LINES_KERNEL)
            out[c] *= 2.0
        else:
            out[c] = window(hu, name)
    return out


class StudyDataset(Dataset):
    """Studies → {'x': (7, C, D, H, W) windowed crops, 'found': (7,), 'y': (8,) (-1 = unknown),
    'aux': (7, D), 'aux_known': (7,), 'index'}."""

    def __init__(self, paths: Paths, studies: pd.DataFrame, names, augment: bool):
        self.paths, self.studies, self.names = paths, studies.reset_index(drop=True), list(names)
        self.aug = (
            A.Compose(
                [
                    A.HorizontalFlip(p=0.5),  # patient left-right: fractures have no side
                    A.Affine(
                        scale=(0.9, 1.1),
                        translate_percent=(-0.06, 0.06),
                        rotate=(-12, 12),
                        border_mode=cv2.BORDER_CONSTANT,
                        fill=float(AIR_HU),
                        p=0.8,
                    ),
                ]
            )
            if augment
            else None
        )

    def __len__(self) -> int:
        return len(self.studies)

    def _augment(self, crop: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
        """One random in-plane transform for every slice of a vertebra, then HU scale, shift and noise,
        written into ``out``."""
        out[:] = self.aug(image=crop.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
        out *= np.float32(rng.uniform(0.95, 1.05))
        out += np.float32(rng.uniform(-30, 30))
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0, 25))

    def __getitem__(self, i: int) -> dict:
        r = self.studies.iloc[i]
        hu = np.load(self.paths.crop_array(r["split"], r["study_id"], VIEW)).astype(np.float32)
        if self.aug is not None:  # torch's generator: seeded by the training loop, distinct per worker
            rng = np.random.default_rng(int(torch.randint(2**31, ())))
            reseed(self.aug)
            for v in np.flatnonzero(r["found"]):
                self._augment(hu[v].copy(), rng, hu[v])
        x = input_channels(hu, self.names).transpose(1, 0, 2, 3, 4)  # (7, C, D, H, W)
        y = r["y"] if "y" in r.index else np.full(len(TARGETS), np.nan, np.float32)
        aux, known = aux_target(r["box_depth"], y, r["has_boxes"], hu.shape[1])
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "found": torch.from_numpy(r["found"].copy()),
            "y": torch.from_numpy(np.nan_to_num(np.asarray(y, np.float32), nan=-1.0)),
            "aux": torch.from_numpy(aux),
            "aux_known": torch.from_numpy(known & r["found"]),
            "index": i,
        }


# =============================================================================================
# Loss
# =============================================================================================


def metric_loss(vertebra: torch.Tensor, overall: torch.Tensor, y: torch.Tensor, found: torch.Tensor):
    """The metric as a loss: per study, sum(w * bce) / sum(w) over its known rows, then the mean over
    studies. ``y`` (B, 8) in TARGETS order with -1 for a missing label; a vertebra not found is left out
    (its prediction will be the prior, not the model's)."""
    logits = torch.cat([vertebra, overall[:, None]], 1).float()
    known = (y >= 0) & torch.cat([found, torch.ones_like(found[:, :1])], 1)
    w = torch.as_tensor(COLUMN_WEIGHTS, device=y.device)
    weight = torch.where(y > 0.5, w[:, 1], w[:, 0]) * known
    bce = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0), reduction="none")
    total = weight.sum(1)
    per_study = (weight * bce).sum(1) / total.clamp_min(1e-6)
    return per_study[total > 0].mean() if (total > 0).any() else logits.sum() * 0


def aux_loss(aux: torch.Tensor, target: torch.Tensor, known: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary loss of the slice-level logits (B, 7, K) against the (B, 7, D) targets max-pooled to K
    bins, on the vertebrae whose target is known; a fractured bin weighs ``pos_weight``."""
    if not known.any():
        return aux.sum() * 0
    b, v, k = aux.shape
    pooled = F.adaptive_max_pool1d(target.reshape(b * v, 1, -1), k).view(b, v, k)
    return _weighted_bce(aux[known], pooled[known], pos_weight)


def detect_loss(aux: torch.Tensor, y: torch.Tensor, found: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary loss of each found, labelled vertebra's evidence (its best bin) against its label, a
    fractured vertebra weighing ``pos_weight``: about one vertebra in ten is fractured, and without
    the weight a study's 6 healthy vertebrae teach the local detector far more than its broken one."""
    known = found & (y[:, : aux.shape[1]] >= 0)
    if not known.any():
        return aux.sum() * 0
    return _weighted_bce(aux.amax(2)[known], y[:, : aux.shape[1]][known], pos_weight)


def _weighted_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    w = torch.where(target > 0.5, pos_weight, 1.0)
    return (w * F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")).sum() / w.sum()


class StudyLoss:
    """``metric_loss`` + ``aux_slice`` x ``aux_loss`` + ``aux_detect`` x ``detect_loss``."""

    def __init__(self, aux_slice: float, aux_detect: float = 0.0, pos_weight: float = 1.0):
        self.aux_slice, self.aux_detect, self.pos_weight = aux_slice, aux_detect, pos_weight

    def __call__(self, model, batch, device):
        x, found = batch["x"].to(device, non_blocking=True), batch["found"].to(device)
        y = batch["y"].to(device)
        vertebra, overall, aux = model(x, found)
        loss = metric_loss(vertebra, overall, y, found)
        if self.aux_slice:
            known = batch["aux_known"].to(device)
            loss = loss + self.aux_slice * aux_loss(aux, batch["aux"].to(device), known, self.pos_weight)
        if self.aux_detect:
            loss = loss + self.aux_detect * detect_loss(aux, y, found, self.pos_weight)
        return loss


# =============================================================================================
# Prediction
# =============================================================================================


def predict_studies(model, paths: Paths, studies: pd.DataFrame, tc, device) -> np.ndarray:
    """(n studies, 8) probabilities in TARGETS order; NaN for a vertebra not found and for
    patient_overall of a study with no vertebra found (such a study is not even read: it may have no
    crop array). Each rank predicts a shard under DDP."""
    seen = np.array([bool(np.any(f)) for f in studies["found"]], dtype=bool)
    probs = np.full((len(studies), len(TARGETS)), np.nan)
    if seen.any():
        probs[seen] = _predict_found(model, paths, studies[seen], tc, device)
    return probs


@torch.no_grad()
def _predict_found(model, paths: Paths, studies: pd.DataFrame, tc, device) -> np.ndarray:
    loader = make_loader(StudyDataset(paths, studies, tc.windows, augment=False), tc, False, device)
    model.eval()
    idx, out = [], []
    for batch in loader:
        found = batch["found"].to(device)
        with autocast(device, tc.amp):
            vertebra, overall, _ = model(batch["x"].to(device, non_blocking=True), found)
        p = torch.cat([vertebra, overall[:, None]], 1).float().sigmoid()
        ok = torch.cat([found, found.any(1, keepdim=True)], 1)
        out.append(torch.where(ok, p, torch.full_like(p, float("nan"))).cpu().numpy())
        idx.append(batch["index"].numpy())
    parts = dist.gather(
        (
            np.concatenate(idx) if idx else np.zeros(0, int),
            np.concatenate(out) if out else np.zeros((0, len(TARGETS))),
        )
    )
    probs = np.full((len(studies), len(TARGETS)), np.nan)
    for i, p in parts:  # DistributedSampler pads with repeats: the same study, the same prediction
        probs[i] = p
    return probs


def long_frame(studies: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """(n, 8) probabilities → submission rows: row_id, fractured, study_id, target, reason."""
    n = len(studies)
    study = np.repeat(studies["study_id"].to_numpy(), len(TARGETS))
    target = np.tile(TARGETS, n)
    reason = []
    for r, p in zip(studies.itertuples(index=False), probs):
        why = list(r.reason) + ["" if np.isfinite(p[-1]) else "no vertebra found"]
        reason += [w if not np.isfinite(q) else "" for w, q in zip(why, p)]
    return pd.DataFrame(
        {
            "row_id": [f"{s}_{t}" for s, t in zip(study, target)],
            "fractured": probs.reshape(-1),
            "study_id": study,
            "target": target,
            "reason": reason,
        }
    )


def target_labels(studies: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every (study, target) of ``studies``: its target (the prior key) and label (NaN where missing)."""
    y = np.stack(studies["y"].to_list()) if len(studies) else np.zeros((0, len(TARGETS)))
    return np.tile(np.array(TARGETS, dtype=object), len(y)), y.reshape(-1)


def label_rates(studies: pd.DataFrame) -> np.ndarray:
    """Per target (TARGETS order), the labelled studies' fracture rate: the prior of
    ``spine.core.priors`` with its two classes, so a target never seen fractured is not impossible."""
    return prior_probs(prior_table(*target_labels(studies), 2), TARGETS, 2)[:, 1]


def fill_with_prior(frame: pd.DataFrame, rates: np.ndarray) -> pd.DataFrame:
    """Rows the model could not predict get their target's rate; ``reason`` says why and so."""
    missing = frame["fractured"].isna()
    if not missing.any():
        return frame
    rate_of = dict(zip(TARGETS, rates))
    frame.loc[missing, "fractured"] = frame.loc[missing, "target"].map(rate_of)
    frame.loc[missing, "reason"] = frame.loc[missing, "reason"] + FILLED
    return frame


# =============================================================================================
# Training
# =============================================================================================


def build_model(cfg) -> torch.nn.Module:
    return build_fracture_model(cfg.train, int(cfg.crop.depth))


def split(studies: pd.DataFrame, fold_of: dict, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The studies a fold trains on (the other folds') and those it predicts (its own)."""
    folds = studies["study_id"].map(fold_of)
    return studies[folds != fold], studies[folds == fold]


def oof_frame(model, paths, held, train, cfg, device, fold: int) -> pd.DataFrame:
    """The held-out studies' rows in submission format, gaps filled with the training folds' rates."""
    frame = long_frame(held, predict_studies(model, paths, held, cfg.train, device))
    frame = fill_with_prior(frame, label_rates(train))
    frame = frame.assign(fold=fold, seed=cfg.seed)
    return frame[["row_id", "fractured", "study_id", "target", "fold", "seed", "reason"]]


# =============================================================================================
# Report
# =============================================================================================


def labels_long(studies: pd.DataFrame) -> pd.Series:
    """row_id → label (0/1) of every labelled row of ``studies``."""
    y = np.stack(studies["y"].to_list())
    ids = [f"{s}_{t}" for s in studies["study_id"] for t in TARGETS]
    out = pd.Series(y.reshape(-1), index=ids)
    return out[out.notna()]


def score_frame(frame: pd.DataFrame, studies: pd.DataFrame) -> dict:
    """Official cervical metric of a frame (row_id, fractured) on its labelled rows."""
    labels = labels_long(studies)
    rows = frame[frame["row_id"].isin(labels.index)]
    sol = pd.DataFrame(
        {"row_id": rows["row_id"].to_numpy(), "fractured": labels.loc[rows["row_id"]].to_numpy()}
    )
    return get_task("cervical").score(sol, rows[["row_id", "fractured"]])


def prior_frame(oof: pd.DataFrame, studies: pd.DataFrame, fold_of: dict) -> pd.DataFrame:
    """Prior-only baseline, out of fold: each row gets its target's label rate in the other folds."""
    keys, labels = target_labels(studies)
    ref_folds = np.repeat(studies["study_id"].map(fold_of).to_numpy(), len(TARGETS))
    out = oof[["row_id", "target", "fold"]].copy()
    out["fractured"] = oof_prior(out["target"], out["fold"], 2, keys, labels, ref_folds)[:, 1]
    return out


def oof_report(paths: Paths, oof: pd.DataFrame, studies: pd.DataFrame, fold_of: dict) -> dict:
    """OOF metric beside the prior-only baseline and (on generated data) the Bayes optimum."""
    report = {
        "rows": len(oof),
        "studies": int(oof["study_id"].nunique()),
        "rows_filled_with_prior": int(oof["reason"].astype("string").fillna("").ne("").sum()),
        "model": score_frame(oof, studies),
        "prior": score_frame(prior_frame(oof, studies, fold_of), studies),
    }
    bayes = bayes_frame(paths, oof["row_id"], ["fractured"])
    if bayes is not None:
        bayes = score_frame(pd.concat([oof[["row_id"]].reset_index(drop=True), bayes], axis=1), studies)
    return add_bayes(report, bayes)


# =============================================================================================
# Entry points
# =============================================================================================


def load_studies(paths: Paths, cfg) -> pd.DataFrame:
    """The labelled train studies, checked against this config's crop settings."""
    studies = study_table(paths, "train")
    check_crops(paths, studies, cfg)
    return studies


FAMILY = Family(
    load_items=load_studies,
    split=split,
    build_model=build_model,
    dataset=lambda paths, studies, cfg, augment: StudyDataset(paths, studies, cfg.train.windows, augment),
    loss=lambda cfg: StudyLoss(cfg.train.aux_slice, cfg.train.aux_detect, cfg.train.aux_pos_weight),
    predict_frame=oof_frame,
    score=score_frame,
    oof_report=oof_report,
    oof_dtype={"study_id": str, "reason": str},
)


def run_train(cfg) -> dict:
    """Stage 04: train the folds of ``fold`` / ``train.folds`` (default all); write oof.csv and a report."""
    return run_folds(cfg, FAMILY)


def predict_test(cfg) -> pd.DataFrame:
    """Stage 06 inference: every test study of the crop manifest, predicted by the model of every fold
    of ``train.folds`` (default all) and averaged. Returns row_id, study_id, target, fractured (NaN where
    the row could not be predicted, e.g. a vertebra not found) and reason, patient_overall rows included."""
    with torch_threads(cfg.train.torch_threads):
        return _predict_test(cfg)


def _predict_test(cfg) -> pd.DataFrame:
    device = dist.device_for_rank(cfg.train.device)
    paths = Paths.from_config(cfg)
    listed = get_task("cervical").list_series(paths.data_dir, "test")["study_id"]
    studies = study_table(paths, "test", listed)
    check_crops(paths, studies, cfg)
    probs = []
    for ckpt in predict_checkpoints(cfg, paths):
        model = load_weights(build_model(cfg), ckpt, device)
        probs.append(predict_studies(model, paths, studies, cfg.train, device))
        log.info("predicted %d test studies with %s", len(studies), ckpt.name)
    mean = np.mean(probs, axis=0) if len(studies) else np.zeros((0, len(TARGETS)))
    frame = long_frame(studies, mean)
    _log_reasons(frame)
    return frame[["row_id", "study_id", "target", "fractured", "reason"]]


def _log_reasons(frame: pd.DataFrame) -> None:
    """Count the studies with rows the model could not predict, by reason (stage 06 gives them the prior)."""
    bad = frame[frame["fractured"].isna()]
    for why, n in bad.groupby("reason")["study_id"].nunique().items():
        log.warning("%d test studies have rows without a prediction: %s", n, why)
