"""spider scores: Dice per structure, measurement errors beside the train baseline, grades, herniation
AP, missing rows, and score.py on a submission with its predicted masks."""

import pandas as pd
import pytest
import SimpleITK as sitk

from spine.spider import scores
from spine.spider.submit import SUBMISSION_COLUMNS, complete_rows
from test_spider_io import canonical_image, column


def rows(image, values: dict) -> pd.DataFrame:
    """Measurement rows of one image from {(structure, measurement): value}."""
    return pd.DataFrame(
        [
            {"image": image, "structure": s, "measurement": m, "value": v, "unit": "-"}
            for (s, m), v in values.items()
        ]
    )


def test_structure_and_class_dice():
    truth = column()
    pred = truth.copy()
    pred[pred == 2] = 0  # vertebra 2 missed
    pred[0, 0, 0] = 7  # a spurious structure
    d = scores.structure_dice(pred, truth)
    assert d[1] == 1.0 and d[2] == 0.0 and d[7] == 0.0 and d[100] == 1.0
    c = scores.class_dice(pred, truth)
    n1, n2 = (truth == 1).sum(), (truth == 2).sum()
    assert c["class vertebra"] == pytest.approx(2 * (2 * n1) / (3 * n1 + 2 * n1 + 1))
    assert n1 == n2
    summary = scores.dice_summary(pd.DataFrame(scores.dice_rows("a", pred, truth)))
    assert summary["spurious_structures"] == 1
    assert summary["per_structure"]["L4"] == 0.0 and summary["per_structure"]["L5"] == 1.0
    assert summary["mean"] == pytest.approx(6 / 7)  # 7 true structures, one missed


def test_measurement_scores_beside_the_baseline():
    truth = pd.concat(
        [
            rows(
                "tr1",
                {
                    ("L1", "anterior_height"): 20.0,
                    ("L1/L2", "meyerding_grade"): 0,
                    ("spine", "lordosis_deg"): 40,
                },
            ),
            rows(
                "tr2",
                {
                    ("L1", "anterior_height"): 24.0,
                    ("L1/L2", "meyerding_grade"): 0,
                    ("spine", "lordosis_deg"): 50,
                },
            ),
            rows(
                "te1",
                {
                    ("L1", "anterior_height"): 21.0,
                    ("L1/L2", "meyerding_grade"): 1,
                    ("spine", "lordosis_deg"): 44,
                },
            ),
            rows(
                "te2",
                {
                    ("L1", "anterior_height"): 25.0,
                    ("L1/L2", "meyerding_grade"): 0,
                    ("spine", "lordosis_deg"): 46,
                },
            ),
        ]
    )
    base = scores.baseline_values(truth[truth["image"].str.startswith("tr")])
    assert base.set_index(["structure", "measurement"])["base"].to_dict() == {
        ("L1", "anterior_height"): 22.0,
        ("spine", "lordosis_deg"): 45.0,
        ("L1/L2", "meyerding_grade"): 0.0,
    }
    pred = pd.concat(
        [
            rows("te1", {("L1", "anterior_height"): 21.5, ("L1/L2", "meyerding_grade"): 1.2}),
            rows(
                "te2",
                {
                    ("L1", "anterior_height"): 24.0,
                    ("L1/L2", "meyerding_grade"): 0,
                    ("spine", "lordosis_deg"): 47,
                },
            ),
        ]
    )
    m = scores.scores_of(scores.aligned(pred, truth[truth["image"].str.startswith("te")], base))
    g = m["groups"]
    assert m["missing_rows"] == 1  # te1's lordosis: scored with the baseline's 45
    assert g["vertebra anterior_height"]["median_ae"] == pytest.approx(0.75)
    assert g["vertebra anterior_height"]["baseline_median_ae"] == pytest.approx(2.0)
    assert g["spine lordosis_deg"]["median_ae"] == pytest.approx(1.0)  # |45-44|, |47-46|
    assert (
        g["level meyerding_grade"]["accuracy"] == 1.0
        and g["level meyerding_grade"]["baseline_accuracy"] == 0.5
    )
    assert g["vertebra body heights"]["n"] == 2


def test_herniation_ap_and_false_positives():
    truth = pd.concat([rows(f"i{k}", {("L4/L5", "herniation_probability"): float(k % 2)}) for k in range(4)])
    pred = pd.concat(
        [rows(f"i{k}", {("L4/L5", "herniation_probability"): p}) for k, p in enumerate([0.6, 0.9, 0.1, 0.7])]
    )
    base = scores.baseline_values(truth)
    h = scores.scores_of(scores.aligned(pred, truth, base))["groups"]["level herniation_probability"]
    assert h["ap"] == pytest.approx(1.0) and h["baseline_ap"] == pytest.approx(0.5)
    assert h["false_positives_per_image"] == pytest.approx(0.25) and h["recall"] == pytest.approx(1.0)


def test_oof_baseline_never_uses_the_images_own_fold():
    truth = pd.concat([rows(f"i{k}", {("spine", "lordosis_deg"): 10.0 * k}) for k in range(4)])
    pred = truth.copy()
    m = scores.oof_measurement_scores(pred, truth, {"i0": 0, "i1": 0, "i2": 1, "i3": 1})
    g = m["groups"]["spine lordosis_deg"]
    assert g["median_ae"] == 0.0
    assert g["baseline_median_ae"] == pytest.approx(20.0)  # fold 0 against 25, fold 1 against 5


def test_complete_rows_give_every_image_the_template():
    template = pd.DataFrame(
        {
            "structure": ["L1", "spine"],
            "measurement": ["anterior_height", "lordosis_deg"],
            "unit": ["mm", "deg"],
        }
    )
    got = complete_rows(
        "a",
        rows("a", {("L1", "anterior_height"): 20.0})[["structure", "measurement", "value", "unit"]],
        template,
        "not found",
    )
    assert list(got.columns) == SUBMISSION_COLUMNS and len(got) == 2
    assert got.set_index("structure").loc["spine", "note"] == "not found"
    bad = complete_rows("b", None, template, "unreadable: x")
    assert bad["value"].isna().all() and (bad["note"] == "unreadable: x").all()


def test_score_reads_the_truth_folder_and_the_predicted_masks(tmp_path):
    truth_dir, out = tmp_path / "data_truth", tmp_path / "out"
    (truth_dir / "masks").mkdir(parents=True)
    lab = column()
    sitk.WriteImage(sitk.DICOMOrient(canonical_image(lab), "RAS"), str(truth_dir / "masks" / "t_t2.mha"))
    pred_dir = scores.predicted_masks(out / "submissions" / "spider_demo.csv")
    assert pred_dir == out / "predict" / "spider" / "demo" / "masks"
    pred_dir.mkdir(parents=True)
    sitk.WriteImage(sitk.DICOMOrient(canonical_image(lab), "RAS"), str(pred_dir / "t_t2.mha"))
    sol = pd.concat(
        [rows("t_t2", {("spine", "lordosis_deg"): 40.0}), rows("tr_t2", {("spine", "lordosis_deg"): 30.0})]
    )
    sol.to_csv(truth_dir / "measurements.csv", index=False)
    sub = rows("t_t2", {("spine", "lordosis_deg"): 41.0}).assign(note="")
    (out / "submissions").mkdir(parents=True)
    sub.to_csv(out / "submissions" / "spider_demo.csv", index=False)
    s = scores.score(truth_dir / "measurements.csv", out / "submissions" / "spider_demo.csv")
    assert s["dice mean"] == 1.0 and s["dice class canal"] == 1.0
    assert s["spine lordosis_deg median_ae"] == 1.0 and s["spine lordosis_deg baseline_median_ae"] == 10.0
