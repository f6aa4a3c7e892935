"""Scores of the spider task: Dice per structure, measurement errors, grade accuracy and herniation
average precision, each beside a trivial baseline (the train mean of a measurement, the majority grade,
a constant herniation probability), out of fold (stage 02) and on the test split (``score``).

Measurements are rows (image, structure, measurement, value, unit). A measurement is grouped by the
kind of its structure: ``vertebra`` (L1..L5), ``level`` (L1/L2..L5/S1) or ``spine``, so a vertebra's
``anterior_height`` and a disc's are scored apart. Grades (``GRADES``) are scored by accuracy of the
rounded value, ``HERNIATION`` by average precision (truth 1 = herniated) and false positives per image
at ``THRESHOLD``; every other measurement by the median and 90th percentile of |predicted - true|. A
row the submission lacks or leaves NaN is counted as missing and takes the baseline's value, so a
model never gains by leaving rows out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from spine.core.paths import Paths
from spine.spider.labels import CANAL, is_disc, is_partial, is_vertebra, structure_name

KEY = ["image", "structure", "measurement"]
GRADES = ("genant_grade", "meyerding_grade", "genant_type")
HERNIATION = "herniation_probability"
THRESHOLD = 0.5  # a herniation is called at this probability
BODY_HEIGHTS = ("vertebra anterior_height", "vertebra middle_height", "vertebra posterior_height")


# --- Dice -----------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |A ∩ B| / (|A| + |B|) of two boolean masks (1 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def structure_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice of every label (not background) in the truth or the prediction, by SPIDER label id: a
    structure only one of them has scores 0."""
    labels = sorted((set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())) - {0})
    return {int(v): dice(pred == v, truth == v) for v in labels}


def class_of(label: int) -> str | None:
    """The structure class of a label: vertebra (also partially visible), disc, canal."""
    if is_vertebra(label) or is_partial(label):
        return "vertebra"
    if is_disc(label):
        return "disc"
    return "canal" if label == CANAL else None


def class_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of each class as a whole (every vertebra together, ...): what the model's pixels get right
    before the instance labelling."""
    values = set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())
    out = {}
    for name in ("vertebra", "disc", "canal"):
        members = [v for v in values if class_of(v) == name]
        out[f"class {name}"] = dice(np.isin(pred, members), np.isin(truth, members))
    return out


def name_of(label: int) -> str:
    """A label's structure name ("L3", "L4/L5", "canal"), or "label <id>" when it has none."""
    try:
        return structure_name(int(label))
    except (ValueError, IndexError):
        return f"label {int(label)}"


def dice_summary(rows: pd.DataFrame) -> dict:
    """Rows (image, label, dice; label a label id or "class <name>") -> mean Dice over the true
    structures (a missed one counts 0), per structure name, per class, and the spurious structures."""
    rows = rows.copy()
    rows["label"] = rows["label"].astype(str)
    cls = rows[rows["label"].str.startswith("class ")]
    lab = rows[~rows["label"].str.startswith("class ")].copy()
    lab["label"] = lab["label"].astype(float).astype(int)
    lab["name"] = lab["label"].map(name_of)
    true = lab[lab["in_truth"].astype(bool)] if "in_truth" in lab else lab
    out = {
        "mean": float(true["dice"].mean()) if len(true) else None,
        "per_structure": {k: float(v) for k, v in true.groupby("name")["dice"].mean().items()},
        "per_class": {k: float(v) for k, v in cls.groupby("label")["dice"].mean().items()},
    }
    if "in_truth" in lab:
        out["spurious_structures"] = int((~lab["in_truth"].astype(bool)).sum())
    return out


def dice_rows(image: str, pred: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Per-structure and per-class Dice rows of one image (``dice_summary``'s input)."""
    present = set(np.unique(truth).tolist())
    rows = [
        {"image": image, "label": v, "dice": d, "in_truth": v in present}
        for v, d in structure_dice(pred, truth).items()
    ]
    rows += [
        {"image": image, "label": k, "dice": d, "in_truth": True} for k, d in class_dice(pred, truth).items()
    ]
    return rows


# --- measurements ---------------------------------------------------------------------------------
def group_of(structure: str, measurement: str) -> str:
    """'vertebra anterior_height', 'level listhesis_mm', 'spine lordosis_deg'."""
    kind = "spine" if structure == "spine" else ("level" if "/" in structure else "vertebra")
    return f"{kind} {measurement}"


def baseline_values(truth: pd.DataFrame) -> pd.DataFrame:
    """The trivial answer per (structure, measurement) from training rows: the mean value, the majority
    grade (GRADES)."""
    t = truth.dropna(subset=["value"])
    grades = t["measurement"].isin(GRADES)
    mean = t[~grades].groupby(["structure", "measurement"])["value"].mean()
    mode = t[grades].groupby(["structure", "measurement"])["value"].agg(lambda v: v.round().mode().iloc[0])
    return pd.concat([mean, mode]).rename("base").reset_index()


def aligned(pred: pd.DataFrame, truth: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Every truth row with its prediction (NaN when missing) and baseline value: image, structure,
    measurement, true, pred, base, missing, group. ``base`` rows: structure, measurement, base, and
    optionally image (a baseline per image, as out of fold)."""
    t = truth.dropna(subset=["value"])[KEY + ["value"]].rename(columns={"value": "true"})
    p = pred[KEY + ["value"]].drop_duplicates(KEY).rename(columns={"value": "pred"})
    m = t.merge(p, on=KEY, how="left")
    on = [c for c in ("image", "structure", "measurement") if c in base.columns]
    m = m.merge(base, on=on, how="left")
    m["missing"] = m["pred"].isna()
    m["pred"] = m["pred"].fillna(m["base"])
    m["group"] = [group_of(s, k) for s, k in zip(m["structure"], m["measurement"])]
    return m


def _abs_err(true, pred) -> np.ndarray:
    return np.abs(np.asarray(pred, float) - np.asarray(true, float))


def scores_of(m: pd.DataFrame) -> dict:
    """Scores of ``aligned`` rows: per group, model and baseline (see the module docstring)."""
    out = {"rows": len(m), "missing_rows": int(m["missing"].sum()), "groups": {}}
    for group, g in m.groupby("group"):
        g = g.dropna(subset=["pred", "base"])
        if g.empty:
            continue
        name = group.split(" ", 1)[1]
        if name in GRADES:
            entry = {
                "accuracy": float((g["pred"].round() == g["true"].round()).mean()),
                "baseline_accuracy": float((g["base"].round() == g["true"].round()).mean()),
            }
        elif name == HERNIATION:
            y = (g["true"] >= THRESHOLD).astype(int)
            called = g["pred"] >= THRESHOLD
            images = g["image"].nunique()
            entry = {
                "ap": float(average_precision_score(y, g["pred"])) if y.any() else None,
                "baseline_ap": float(y.mean()) if y.any() else None,  # AP of a constant score
                "false_positives_per_image": float((called & (y == 0)).sum() / images),
                "recall": float((called & (y == 1)).sum() / y.sum()) if y.any() else None,
                "positives": int(y.sum()),
            }
        else:
            err, base = _abs_err(g["true"], g["pred"]), _abs_err(g["true"], g["base"])
            entry = {
                "median_ae": float(np.median(err)),
                "p90_ae": float(np.percentile(err, 90)),
                "baseline_median_ae": float(np.median(base)),
                "baseline_p90_ae": float(np.percentile(base, 90)),
            }
        out["groups"][group] = {**entry, "n": len(g), "missing": int(g["missing"].sum())}
    heights = m[m["group"].isin(BODY_HEIGHTS)].dropna(subset=["pred", "base"])
    if len(heights):
        out["groups"]["vertebra body heights"] = {
            "median_ae": float(np.median(_abs_err(heights["true"], heights["pred"]))),
            "p90_ae": float(np.percentile(_abs_err(heights["true"], heights["pred"]), 90)),
            "baseline_median_ae": float(np.median(_abs_err(heights["true"], heights["base"]))),
            "baseline_p90_ae": float(np.percentile(_abs_err(heights["true"], heights["base"]), 90)),
            "n": len(heights),
        }
    return out


def oof_measurement_scores(pred: pd.DataFrame, truth: pd.DataFrame, fold_of_image: dict) -> dict:
    """OOF measurement scores of the images in ``pred`` against ``truth``, beside the baseline made from
    the truth rows of the train images (``fold_of_image``: every train image's fold) of the other
    folds (never the image's own fold)."""
    scored = set(pred["image"])
    truth = truth[truth["image"].isin(fold_of_image)]
    bases = []
    for fold in sorted(set(fold_of_image.values())):
        mine = [i for i, f in fold_of_image.items() if f == fold and i in scored]
        others = [i for i, f in fold_of_image.items() if f != fold]
        if mine and others:
            base = baseline_values(truth[truth["image"].isin(others)])
            bases.append(pd.DataFrame({"image": mine}).merge(base, how="cross"))
    base = pd.concat(bases, ignore_index=True) if bases else pd.DataFrame(columns=["image", *KEY[1:], "base"])
    return scores_of(aligned(pred, truth[truth["image"].isin(scored)], base))


# --- console / summary ----------------------------------------------------------------------------
def _r(v, nd=3):
    return None if v is None else round(float(v), nd)


def headline(m: dict) -> dict:
    """(model, baseline) of the headline measurement scores of a ``scores_of`` result."""
    g = m.get("groups", {})

    def pair(group, key, base):
        e = g.get(group)
        return (e.get(key), e.get(base)) if e else (None, None)

    return {
        "body heights med |err| mm": pair("vertebra body heights", "median_ae", "baseline_median_ae"),
        "lordosis med |err| deg": pair("spine lordosis_deg", "median_ae", "baseline_median_ae"),
        "listhesis med |err| mm": pair("level listhesis_mm", "median_ae", "baseline_median_ae"),
        "Meyerding accuracy": pair("level meyerding_grade", "accuracy", "baseline_accuracy"),
        "Genant accuracy": pair("vertebra genant_grade", "accuracy", "baseline_accuracy"),
        "herniation AP": pair(f"level {HERNIATION}", "ap", "baseline_ap"),
        "herniation FP per image": pair(f"level {HERNIATION}", "false_positives_per_image", "x"),
    }


def report_summary(report: dict) -> dict:
    """The flat console table of a stage-02 or stage-06 report."""
    d = report.get("dice") or {}
    out = {"images": report.get("images"), "mean Dice": _r(d.get("mean"))}
    out.update({f"Dice {k}": _r(v) for k, v in (d.get("per_class") or {}).items()})
    out["broken sequences"] = len(report.get("broken_sequences", {}))
    m = report.get("measurements_vs_truth") or report.get("measurements_vs_true_masks")
    if m:
        src = "truth" if "measurements_vs_truth" in report else "true masks"
        for k, (model, base) in headline(m).items():
            out[f"{k} (vs {src}; baseline)"] = f"{_r(model)} ({_r(base)})"
    for k in ("seconds_per_image_segment", "seconds_per_image_measure"):
        if report.get(k) is not None:
            out[k.replace("_", " ")] = _r(report[k])
    return out


# --- score.py and demo_summary.py -------------------------------------------------------------------
def predicted_masks(submission_path: Path) -> Path:
    """Where stage 06 put the predicted masks of a submission ``<out_dir>/submissions/spider_<exp>.csv``:
    ``Paths.predict_dir / masks``."""
    sub = Path(submission_path)
    exp = sub.stem.split("_", 1)[1] if "_" in sub.stem else sub.stem
    return Paths(".", sub.parent.parent, "spider", exp).predict_dir / "masks"


def mask_dice(pred_dir: Path, truth_dir: Path, images) -> pd.DataFrame:
    """Dice rows of every image with a true mask in ``truth_dir``; a missing predicted mask scores 0."""
    from spine.spider import io

    rows = []
    for image in images:
        t = Path(truth_dir) / f"{image}.mha"
        if not t.exists():
            continue
        truth = io.read_canonical(t).array
        p = Path(pred_dir) / f"{image}.mha"
        pred = io.read_canonical(p).array if p.exists() else np.zeros_like(truth)
        if pred.shape != truth.shape:
            raise ValueError(f"{p}: shape {pred.shape} differs from the true mask's {truth.shape}")
        rows += dice_rows(image, pred, truth)
    return pd.DataFrame(rows, columns=["image", "label", "dice", "in_truth"])


def score(solution_path, submission_path) -> dict[str, float]:
    """``src/score.py --task spider SOLUTION SUBMISSION``: SOLUTION is the truth folder's measurements.csv
    (test masks in ``masks/`` beside it), SUBMISSION a stage-06 csv (its masks found by
    ``predicted_masks``). Test images: the truth folder's masks (else the submission's images); the
    baseline comes from the solution's other images (the train split)."""
    sol, sub = pd.read_csv(solution_path), pd.read_csv(submission_path)
    truth_masks = Path(solution_path).parent / "masks"
    test = sorted(p.stem for p in truth_masks.glob("*.mha")) or sorted(sub["image"].unique())
    truth = sol[sol["image"].isin(test)]
    train = sol[~sol["image"].isin(test)]
    if train.empty:
        raise ValueError(f"{solution_path} has no rows besides the test images: no baseline to compare")
    m = scores_of(aligned(sub, truth, baseline_values(train)))
    out = flat_scores(m)
    if truth_masks.exists():
        d = dice_summary(mask_dice(predicted_masks(submission_path), truth_masks, test))
        out["dice mean"] = d["mean"]
        out.update({f"dice {k}": v for k, v in d["per_class"].items()})
        out.update({f"dice {k}": v for k, v in d["per_structure"].items()})
    return {k: float(v) for k, v in out.items() if v is not None}


def flat_scores(m: dict) -> dict:
    """``scores_of`` as one flat dict: '<group> <score>' -> value."""
    out = {"missing rows": m["missing_rows"]}
    for group, e in m["groups"].items():
        out.update({f"{group} {k}": v for k, v in e.items() if k not in ("n", "missing")})
    return out


def summary_rows(cfg) -> list[tuple]:
    """demo_summary.py rows (what, model, baseline, best=None) from the stage-02 and stage-06 reports."""
    paths = Paths.from_config(cfg)
    rows = []
    for what, path in (("OOF", paths.localize_report), ("test", paths.predict_report)):
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        rows.append((f"{what} mean Dice", (report.get("dice") or {}).get("mean"), None, None))
        m = report.get("measurements_vs_truth")
        if m:
            for k, (model, base) in headline(m).items():
                if k in ("Meyerding accuracy", "Genant accuracy", "herniation FP per image"):
                    continue
                rows.append((f"{what} {k}", model, base, None))
    return rows
