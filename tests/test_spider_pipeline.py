"""The spider chain end to end on a tiny generated set, through the stage scripts 01 to 06 with one
config, then score.py, demo_summary.py and plot_overlays.py, as the README runs them; a test image is
made unreadable first, and still gets its rows."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from spine.core.synth import generate
from spine.spider import io
from spine.spider.submit import SUBMISSION_COLUMNS
from tiny import SPIDER_TINY

STAGES = ("01_preprocess", "02_localize", "03_crop", "04_train", "05_ensemble", "06_predict")
TINY = [
    *SPIDER_TINY,
    "submit.overlays=2",
    "segment.measure_true_masks=true",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, stage_script):
    root = tmp_path_factory.mktemp("spider_e2e")
    generate("spider", root / "data", 4, 2, seed=3, image_size=64, n_slices=[5, 7])
    test = sorted(
        p for p in (root / "data/images").glob("*.mha") if not (root / "data/masks" / p.name).exists()
    )
    broken = test[0]
    broken.write_bytes(broken.read_bytes()[:120])  # a download cut short
    args = [
        "--config",
        "configs/spider/demo.yaml",
        f"data_dir={root / 'data'}",
        f"out_dir={root / 'out'}",
        *TINY,
    ]
    reports = {stage: stage_script(stage).main(args) for stage in STAGES}
    return root, args, reports, broken.stem


def test_stages_without_work_say_so(pipeline):
    _, _, reports, _ = pipeline
    assert reports["03_crop"] == reports["04_train"] == reports["05_ensemble"] == {}


def test_stage_01_caches_every_image_and_names_the_bad_one(pipeline):
    root, _, reports, broken = pipeline
    assert reports["01_preprocess"]["failed_images"] == [broken]
    table = pd.read_parquet(root / "out/cache/spider/images.parquet").set_index("image")
    assert (
        table.loc[broken, "status"] == "failed" and f"{broken}.mha: unreadable" in table.loc[broken, "reason"]
    )
    assert (table.drop(broken)["status"] == "ok").all() and set(table["split"]) == {"train", "test"}


def test_stage_02_oof_masks_in_the_input_geometry_and_a_report(pipeline):
    root, _, reports, _ = pipeline
    report = reports["02_localize"]
    assert report["complete"] and report["folds_done"] == [0, 1]
    train = sorted((root / "data/masks").glob("*.mha"))
    assert report["images"] == len(train)
    for mask in train:
        pred = sitk.ReadImage(str(root / "out/localize/spider/masks" / mask.name))
        assert io.same_grid(pred, sitk.ReadImage(str(root / "data/images" / mask.name)))
    assert 0 <= report["dice"]["mean"] <= 1 and set(report["dice"]["per_class"]) == {
        "class vertebra",
        "class disc",
        "class canal",
    }
    assert "groups" in report["measurements_vs_truth"] and "groups" in report["measurements_vs_true_masks"]
    saved = json.loads((root / "out/localize/spider/report.json").read_text())
    assert saved["folds_done"] == [0, 1]
    folds = pd.read_csv(root / "out/folds/spider.csv", dtype={"study_id": str})
    patients = {io.split_name(m.name)[0] for m in train}
    assert set(folds["study_id"]) == patients  # folds by patient: each patient's images in one fold
    # the generator writes SPIDER's radiological gradings: a fold trains a herniation classifier when its
    # training patients have discs with and without a herniation
    grades = pd.read_csv(root / "data/radiological_gradings.csv")
    patient_fold = dict(zip(folds["study_id"], folds["fold"]))
    grades["fold"] = grades["Patient"].astype(str).map(patient_fold)
    for fold in (0, 1):
        both = grades.loc[grades["fold"] != fold, "Disc herniation"].nunique() == 2
        assert (fold in report["herniation_classifier_folds"]) == both
        assert (root / f"out/models/spider/segmenter/hernia_fold{fold}_seed42.pt").exists() == both
    assert report["herniation_classifier_folds"]  # this data set trains one at least
    oof = pd.read_csv(root / "out/localize/spider/measure.csv")
    probs = oof.loc[oof["measurement"] == "herniation_probability", "value"]
    assert len(probs) and probs.between(0, 1).all()


def test_stage_06_rows_for_every_test_image_and_masks_to_score(pipeline):
    root, _, reports, broken = pipeline
    report = reports["06_predict"]
    sub = pd.read_csv(report["submission"])
    assert list(sub.columns) == SUBMISSION_COLUMNS
    test = {
        p.stem for p in (root / "data/images").glob("*.mha") if not (root / "data/masks" / p.name).exists()
    }
    assert set(sub["image"]) == test
    per_image = sub.groupby("image").size()
    assert per_image.nunique() == 1  # every image has the full set of rows
    bad = sub[sub["image"] == broken]
    assert bad["value"].isna().all() and bad["note"].str.startswith("unreadable").all()
    assert broken in report["failed_images"]
    for image in test - {broken}:
        assert (root / "out/predict/spider/demo/masks" / f"{image}.mha").exists()
    assert len(list((root / "out/predict/spider/demo/overlays").glob("*.png"))) == 2
    assert "dice mean" in report["test_scores"]


def test_score_script_and_demo_summary(pipeline, stage_script):
    root, args, _, _ = pipeline
    scores = stage_script("score").main(
        [
            "--task",
            "spider",
            str(root / "data_truth/measurements.csv"),
            str(root / "out/submissions/spider_demo.csv"),
        ]
    )
    assert 0 <= scores["dice mean"] <= 1
    assert "vertebra body heights median_ae" in scores and "spine lordosis_deg baseline_median_ae" in scores
    rows = stage_script("demo_summary").main(["--config", "configs/spider/demo.yaml", *args[2:]])
    whats = [r[1] for r in rows]
    assert "OOF mean Dice" in whats and "test mean Dice" in whats
    assert all(r[0] == "spider" for r in rows)


def test_overlays_of_oof_masks(pipeline, stage_script, tmp_path):
    _, args, _, _ = pipeline
    written = stage_script("plot_overlays").main([*args, "--n", "2", "--out", str(tmp_path)])
    assert len(written) == 2 and all(Path(p).stat().st_size > 1000 for p in written)
    assert np.all([Path(p).suffix == ".png" for p in written])
