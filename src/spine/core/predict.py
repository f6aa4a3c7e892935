"""Stage 06: from the raw test DICOM of ``data_dir`` to the submission CSV, with trained models only.

The inference paths of stages 01-04 run on the test split in a work folder of their own
(``out_dir/predict/<task>/<exp>/``: cache, localization, crops), reading every model from
``models_from`` (default ``out_dir``): the localizer of each fold, the classifiers of each fold of
every ensemble member, and stage 05's stacker. Nothing is trained and nothing is downloaded.

Every row of ``sample_submission.csv`` gets a valid prediction, in its order. A row that no member
could predict (a missing series or study, an unreadable file) gets the train prior of its target, and
the run ends with a count of every such fallback and its reason.
"""

from __future__ import annotations

import json
import logging
import resource
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from spine.core import ensemble
from spine.core.io import save_table, save_text
from spine.core.paths import Paths, require
from spine.core.preprocess import run_preprocess
from spine.core.priors import prior_probs
from spine.core.truth import bayes_frame
from spine.registry import get_task

log = logging.getLogger(__name__)


def work_config(cfg: DictConfig, paths: Paths) -> DictConfig:
    """``cfg`` redirected to stage 06's work folder: test split only, models from ``paths.model_root``."""
    work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(work, True)
    work.out_dir = str(paths.predict_dir)
    work.models_from = str(paths.model_root)
    work.preprocess.splits = ["test"]
    work.preprocess.limit = None
    return work


def _timed(steps: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    steps[name] = round(time.perf_counter() - t0, 2)
    log.info("stage 06 %s: %.1f s", name, steps[name])
    return out


def peak_memory_mb() -> dict:
    """Peak resident memory of this process and of its finished worker processes (MB), and of the GPU."""
    out = {
        "process_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "largest_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available():
        out["gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def member_predictions(task, names: list[str], preds: dict, row_ids) -> tuple[np.ndarray, pd.Series]:
    """(n, M, K) member probabilities of ``row_ids`` (NaN where a member could not predict a row) and,
    per row, why not (empty where every member predicted it)."""
    probs, reason = [], pd.Series("", index=pd.Index(row_ids, name="row_id"), dtype=object)
    for name in names:
        df = preds[name].drop_duplicates("row_id").set_index("row_id").reindex(row_ids)
        probs.append(ensemble.to_matrix(task, df))
        why = df["reason"].where(df["reason"].notna(), "no crop row (study not localized or not cropped)")
        bad = ~np.isfinite(probs[-1]).all(1) & (reason == "").to_numpy()
        reason[bad] = why[bad].astype(str).to_numpy()
    return np.stack(probs, axis=1), reason


def finish(task, q: np.ndarray, sample: pd.DataFrame) -> pd.DataFrame:
    """The submission: sample_submission's rows, order and columns; probabilities checked valid."""
    q = np.clip(q, 0.0, 1.0)
    q = q / q.sum(1, keepdims=True)
    sub = pd.concat([sample[["row_id"]].reset_index(drop=True), ensemble.from_matrix(task, q)], axis=1)
    if list(sub.columns) != list(sample.columns):
        raise ValueError(f"submission columns {list(sub.columns)} differ from sample {list(sample.columns)}")
    if not np.isfinite(sub[task.pred_columns].to_numpy()).all():
        raise ValueError("submission holds non-finite probabilities")
    return sub


def test_scores(task, paths: Paths, sub: pd.DataFrame, prior: np.ndarray, partial: pd.Series) -> dict | None:
    """On generated data: the submission, the prior and the Bayes optimum scored on the test truth; and
    the model beside the prior on the rows predicted from part of their input (``partial``)."""
    sol_file = paths.truth_dir / "test_solution.csv"
    if not sol_file.exists():
        return None
    sol = pd.read_csv(sol_file)
    prior_sub = pd.concat([sub[["row_id"]], ensemble.from_matrix(task, prior)], axis=1)
    out = {"model": task.score(sol, sub), "prior": task.score(sol, prior_sub)}
    bayes = bayes_frame(paths, sub["row_id"], task.pred_columns)
    if bayes is not None:
        out["bayes"] = task.score(sol, pd.concat([sub[["row_id"]], bayes], axis=1))
    part = sol[sol["row_id"].isin(partial.index)]
    if len(part):
        out["partial_rows"] = {
            "rows": len(part),
            "model": task.score(part, sub)["score"],
            "prior": task.score(part, prior_sub)["score"],
        }
    return out


def study_problems(task, work_paths: Paths, reason: pd.Series, partial: pd.Series) -> dict:
    """Per study with any problem: the files stage 01 could not read (by reason), the rows that fell back
    to the prior (by reason) and the rows predicted from part of their input (by what was missing)."""
    out: dict[str, dict] = {}

    def add(study, part: str, why: str, n: int = 1) -> None:
        counts = out.setdefault(str(study), {}).setdefault(part, {})
        counts[why] = counts.get(why, 0) + n

    if work_paths.failure_table.exists():
        failed = pd.read_csv(work_paths.failure_table, dtype={"study_id": str})
        why_col = "reason" if "reason" in failed else "status"
        for (study, why), n in failed.groupby(["study_id", why_col]).size().items():
            add(study, "unread_files", str(why), int(n))
    for row_id, why in reason[reason != ""].items():
        add(task.parse_row_id(row_id)["study_id"], "prior_rows", str(why))
    for row_id, why in partial.items():
        add(task.parse_row_id(row_id)["study_id"], "partial_rows", str(why))
    return dict(sorted(out.items()))


def partial_rows(task, work_paths: Paths, ok: np.ndarray, row_ids) -> pd.Series:
    """Rows the members predicted from part of their input (row_id -> what was missing), as the task's
    ``partial_rows`` runner says; none where the task has no such runner."""
    if "partial_rows" not in task.runners:
        return pd.Series(dtype=object)
    partial = task.runner("partial_rows")(work_paths, "test")
    predicted = {r for r, good in zip(row_ids, ok) if good}
    return partial[partial.index.isin(predicted)]


def run_predict(cfg: DictConfig, members: list[DictConfig]) -> dict:
    """Stage 06. Returns the run report (also written beside the submission)."""
    task = get_task(cfg.task)
    paths = Paths.from_config(cfg)
    spec = ensemble.load_spec(paths)
    names = [m.exp for m in members]
    if spec["members"] != names:
        raise ValueError(
            f"{paths.ensemble_spec} stacks {spec['members']}, the config names {names}: "
            "rerun src/05_ensemble.py"
        )
    sample = pd.read_csv(require(paths.data_dir / "sample_submission.csv", "00_make_demo_data"))
    row_ids = sample["row_id"].astype(str).tolist()
    t0, steps = time.perf_counter(), {}
    work = work_config(cfg, paths)
    _timed(steps, "01 preprocess", run_preprocess, work)
    _timed(steps, "02 localize", task.runner("localize_test"), work)
    _timed(steps, "03 crop", task.runner("crop"), work)
    preds = {}
    for m in members:
        preds[m.exp] = _timed(steps, f"04 {m.exp}", task.runner("predict"), work_config(m, paths))
    probs, reason = member_predictions(task, names, preds, row_ids)
    k = spec["classes"]
    keys = [task.prior_key(r) for r in row_ids]
    prior = prior_probs(spec["prior"], keys, k)
    ok = (reason == "").to_numpy()
    q = prior.copy()
    work_paths = Paths.from_config(work)
    manifest = pd.read_parquet(work_paths.crop_manifest) if work_paths.crop_manifest.exists() else None
    if ok.any():
        ok_ids = [r for r, good in zip(row_ids, ok) if good]
        q[ok] = _timed(steps, "05 stack", ensemble.apply_spec, spec, task, ok_ids, probs[ok], manifest, work)
    sub = finish(task, q, sample)
    save_table(paths.submission, sub)
    seconds = time.perf_counter() - t0
    studies = len({task.parse_row_id(r)["study_id"] for r in row_ids})
    fallback = reason[~ok]
    partial = partial_rows(task, work_paths, ok, row_ids)
    problems = study_problems(task, work_paths, reason, partial)
    report = {
        "submission": str(paths.submission),
        "rows": len(sub),
        "studies": studies,
        "members": names,
        "stacker": spec["chosen"],
        "seconds": round(seconds, 2),
        "seconds_per_study": round(seconds / max(studies, 1), 3),
        "steps_seconds": steps,
        "memory": peak_memory_mb(),
        "fallback_rows": int((~ok).sum()),
        "fallback_reasons": {k: int(v) for k, v in fallback.value_counts().items()},
        "fallback_studies": sorted({str(task.parse_row_id(r)["study_id"]) for r in fallback.index}),
        "partial_rows": len(partial),
        "studies_with_problems": problems,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    for study, what in problems.items():
        log.warning("stage 06: study %s: %s", study, json.dumps(what))
    scores = test_scores(task, paths, sub, prior, partial)
    if scores is not None:
        report["test"] = scores
    save_text(paths.predict_report, json.dumps(report, indent=2, default=float))
    return {**report, "summary": _summary(report)}


def _summary(report: dict) -> dict:
    out = {
        "submission": report["submission"],
        "rows / studies": f"{report['rows']} / {report['studies']}",
        "stacker": report["stacker"],
        "seconds per study": report["seconds_per_study"],
        **{f"seconds {k}": v for k, v in report["steps_seconds"].items()},
        **{f"peak {k}": v for k, v in report["memory"].items()},
        "fallback rows (train prior)": report["fallback_rows"],
    }
    for why, n in report["fallback_reasons"].items():
        out[f"  fallback: {why}"] = n
    out["rows from part of their input"] = report["partial_rows"]
    out["studies with a problem (see report)"] = len(report["studies_with_problems"])
    for who, s in report.get("test", {}).items():
        if who == "partial_rows":
            scores = f"{s['model']:.4f} / {s['prior']:.4f} ({s['rows']} rows)"
            out["test partial rows: model / prior"] = scores
        else:
            out[f"test {who}"] = round(s["score"], 4)
    return out
