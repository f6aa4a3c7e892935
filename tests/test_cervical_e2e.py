"""The cervical chain end to end on a tiny generated set, through the stage scripts 01 to 06 with one
config (two members: 2.5D + GRU and 3D), as the README runs it."""

import json

import numpy as np
import pandas as pd
import pytest

from spine.cervical.task import TARGETS
from spine.registry import get_task


@pytest.fixture(scope="module")
def pipeline(cervical_pipeline):
    p = cervical_pipeline
    return p.root, p.args(), p.reports


def test_stage_02_writes_a_row_per_study_and_vertebra(pipeline):
    root, _, reports = pipeline
    vert = pd.read_csv(root / "out/localize/cervical/vertebrae.csv", dtype={"study_id": str})
    train = pd.read_csv(root / "data/train.csv", dtype={"StudyInstanceUID": str})
    assert len(vert) == 7 * vert["study_id"].nunique()
    assert set(train["StudyInstanceUID"]) <= set(vert["study_id"])
    assert set(vert["source"]) == {"oof", "fold_mean"}  # segmented studies out of fold, the rest by the mean
    dice = reports["02_localize"]["dice_oof"]
    assert dice["studies"] == 3 and 0 <= dice["mean"] <= 1


def test_stage_04_oof_covers_every_labelled_row_of_both_members(pipeline):
    root, _, _ = pipeline
    train = pd.read_csv(root / "data/train.csv", dtype={"StudyInstanceUID": str})
    labelled = {f"{s}_{t}" for s in train["StudyInstanceUID"] for t in TARGETS}
    for member in ("demo", "demo_3d"):
        oof = pd.read_csv(root / f"out/oof/cervical/{member}/oof.csv", dtype={"study_id": str})
        assert oof["row_id"].is_unique and set(oof["row_id"]) == labelled
        assert oof["fractured"].between(0, 1).all()


def test_stage_05_stacks_both_members_out_of_fold(pipeline):
    _, _, reports = pipeline
    report = reports["05_ensemble"]
    assert report["members"] == ["demo", "demo_3d"]
    assert {"member:demo", "member:demo_3d", "mean"} <= set(report["candidates"])
    for s in [*report["candidates"].values(), report["selected"], report["prior"], report["bayes"]]:
        assert np.isfinite(s["score"]) and s["score"] > 0


def test_stage_06_submission_in_sample_order_with_reported_fallbacks(pipeline):
    root, _, reports = pipeline
    report = reports["06_predict"]
    sample = pd.read_csv(root / "data/sample_submission.csv")
    sub = pd.read_csv(report["submission"])
    assert list(sub.columns) == list(sample.columns)
    assert sub["row_id"].tolist() == sample["row_id"].tolist()
    assert sub["fractured"].between(0, 1).all()
    # the generator drops a test study's files: its rows carry the train prior and are counted
    quirks = json.loads((root / "data_truth/summary.json").read_text())["quirks"]
    (missing,) = quirks["missing_test_studies"]
    assert missing in report["fallback_studies"]
    spec = json.loads((root / "out/models/cervical/ensemble_demo/spec.json").read_text())
    task = get_task("cervical")
    rows = sub[sub["row_id"].str.startswith(f"{missing}_")]
    assert len(rows) == len(TARGETS)
    for r in rows.itertuples():
        assert r.fractured == pytest.approx(spec["prior"][task.prior_key(r.row_id)][1], abs=1e-6)
    assert sum(report["fallback_reasons"].values()) == report["fallback_rows"] >= len(TARGETS)
    assert set(report["test"]) == {"model", "prior", "bayes"}


def test_demo_summary_reads_every_cervical_report(pipeline, stage_script):
    _, args, _ = pipeline
    rows = stage_script("demo_summary").main(args)
    assert [r[1] for r in rows] == ["OOF demo", "OOF demo_3d", "OOF stacked", "test submission"]
    assert all(v is not None and np.isfinite(v) for r in rows for v in r[2:])
