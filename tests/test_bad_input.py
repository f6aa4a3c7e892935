"""Bad input on the test split never costs the submission (both tasks, stage 06).

A second generated set is damaged in every way real test folders are (core.synth.corrupt: a study
listed but absent, truncated / empty / non-DICOM / unknown-syntax files, files without geometry tags,
a duplicated slice, an image of another size, a MONOCHROME1 series, a one-slice series, an unknown
series description, a study whose every file is unreadable) and predicted with the tiny pipeline's
models. Every row is predicted, every problem is named per study, and each study scores as it does
when the bad files are simply not there.
"""

import shutil

import numpy as np
import pandas as pd
import pytest

from spine.core.synth import generate
from spine.core.synth.corrupt import CONSISTENT, damage_test_split
from spine.registry import get_task

N_TEST = 18  # 14 kinds, one study each, and untouched studies (the generator drops some series)
# Kinds a reader must name in the report (the others leave nothing unreadable behind).
NAMED = {
    "study listed but absent",
    "every file unreadable",
    "truncated file",
    "empty file",
    "unknown transfer syntax",
    "no ImagePositionPatient",
    "no ImageOrientationPatient",
}


@pytest.fixture(scope="module", params=["lumbar", "cervical"])
def damaged_run(request, tmp_path_factory, stage_script):
    """Stage 06 on the damaged copy and on the copy with the bad files removed, same models."""
    task_name = request.param
    pipe = request.getfixturevalue(f"{task_name}_pipeline")
    root = tmp_path_factory.mktemp(f"bad_{task_name}")
    extra = {"image_size": 48} if task_name == "lumbar" else {"image_size": 48, "n_slices": 40}
    generate(task_name, root / "clean", 2, N_TEST, seed=77, **extra)
    task = get_task(task_name)
    runs = {}
    for name, removed in (("damaged", False), ("removed", True)):
        shutil.copytree(root / "clean", root / name)
        shutil.copytree(root / "clean_truth", root / f"{name}_truth")
        plan = damage_test_split(task, root / name, removed=removed)
        args = pipe.args(root / name, root / f"out_{name}", f"models_from={pipe.root / 'out'}")
        report = stage_script("06_predict").main(args)
        runs[name] = (plan, report, pd.read_csv(report["submission"]))
    return task, root, runs


def test_every_row_is_predicted(damaged_run):
    task, root, runs = damaged_run
    sample = pd.read_csv(root / "damaged/sample_submission.csv")
    for _, _, sub in runs.values():
        assert sub["row_id"].tolist() == sample["row_id"].tolist()
        p = sub[task.pred_columns].to_numpy()
        assert np.isfinite(p).all() and (p >= 0).all()


def test_the_report_names_each_damaged_study(damaged_run):
    _, _, runs = damaged_run
    plan, report, _ = runs["damaged"]
    problems = report["studies_with_problems"]
    for row in plan.itertuples():
        if row.kind in NAMED:
            assert str(row.study_id) in problems, f"{row.kind}: study {row.study_id} not in the report"
    for kind in ("study listed but absent", "every file unreadable"):  # nothing left to predict from
        study = str(plan.loc[plan["kind"] == kind, "study_id"].iloc[0])
        assert problems[study].get("prior_rows"), problems[study]


def test_readable_studies_score_as_without_the_bad_files(damaged_run):
    task, _, runs = damaged_run
    damaged = runs["damaged"][2].set_index("row_id")[task.pred_columns]
    removed = runs["removed"][2].set_index("row_id")[task.pred_columns]
    plan = runs["damaged"][0]
    assert set(plan["kind"]) >= CONSISTENT
    diff = (damaged - removed.loc[damaged.index]).abs().max(axis=1)
    study_of = pd.Series([str(task.parse_row_id(r)["study_id"]) for r in diff.index], index=diff.index)
    worst = diff.groupby(study_of).max()
    kind_of = dict(zip(plan["study_id"].astype(str), plan["kind"]))
    off = {kind_of.get(s, "untouched"): round(float(v), 6) for s, v in worst.items() if v > 1e-5}
    assert not off, f"studies predicted differently with the bad files present: {off}"
