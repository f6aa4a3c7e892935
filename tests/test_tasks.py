"""Row ids and the official metrics of both tasks, on cases computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from spine.lumbar.task import CONDITIONS, LEVELS, PRED_COLUMNS, TARGETS
from spine.registry import get_task

LUMBAR = get_task("lumbar")
CERVICAL = get_task("cervical")


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="known tasks"):
        get_task("thoracic")


def test_lumbar_row_ids_round_trip():
    ids = LUMBAR.row_ids([44036939, 7])
    assert len(ids) == 50 and ids[0] == "44036939_left_neural_foraminal_narrowing_l1_l2"
    parsed = [LUMBAR.parse_row_id(r) for r in ids]
    assert {(p["condition"], p["level"]) for p in parsed} == {(c, lv) for c in CONDITIONS for lv in LEVELS}
    assert all(f"{p['study_id']}_{p['condition']}_{p['level']}" == r for p, r in zip(parsed, ids))
    with pytest.raises(ValueError):
        LUMBAR.parse_row_id("1_spinal_canal_stenosis_l6_l7")


def test_cervical_row_ids_round_trip():
    uid = "1.2.826.0.1.3680043.10197"
    ids = CERVICAL.row_ids([uid])
    assert ids == [f"{uid}_C{i}" for i in range(1, 8)] + [f"{uid}_patient_overall"]
    assert [CERVICAL.parse_row_id(r) for r in ids][-1] == {"study_id": uid, "target": "patient_overall"}
    assert CERVICAL.parse_row_id(ids[2]) == {"study_id": uid, "target": "C3"}


def _lumbar_solution(rows):
    """rows: (row_id, grade index) → official solution table."""
    sol = pd.DataFrame(np.eye(3)[[g for _, g in rows]], columns=PRED_COLUMNS)
    sol.insert(0, "row_id", [r for r, _ in rows])
    sol["sample_weight"] = np.array([1.0, 2.0, 4.0])[[g for _, g in rows]]
    return sol


def test_lumbar_metric_by_hand():
    # One study, two spinal rows: Normal/Mild (w 1) predicted 0.5, Severe (w 4) predicted 0.6.
    # A foraminal Moderate row (w 2) predicted 0.25; a subarticular Normal/Mild row predicted 0.8.
    sol = _lumbar_solution(
        [
            ("1_spinal_canal_stenosis_l1_l2", 0),
            ("1_spinal_canal_stenosis_l2_l3", 2),
            ("1_left_neural_foraminal_narrowing_l1_l2", 1),
            ("1_left_subarticular_stenosis_l4_l5", 0),
        ]
    )
    sub = pd.DataFrame(
        {
            "row_id": sol["row_id"],
            # the first row is not normalized (sums to 2): the metric normalizes it to 0.5/0.3/0.2
            "normal_mild": [1.0, 0.2, 0.5, 0.8],
            "moderate": [0.6, 0.2, 0.25, 0.1],
            "severe": [0.4, 0.6, 0.25, 0.1],
        }
    )
    got = LUMBAR.score(sol, sub.iloc[::-1])  # row order of the submission does not matter
    spinal = (1 * -math.log(0.5) + 4 * -math.log(0.6)) / 5
    any_severe = -math.log(0.6)  # label 1, prediction max(0.2, 0.6), weight max(1, 4)
    assert got["spinal"] == pytest.approx(spinal)
    assert got["foraminal"] == pytest.approx(-math.log(0.25))
    assert got["subarticular"] == pytest.approx(-math.log(0.8))
    assert got["any_severe_spinal"] == pytest.approx(any_severe)
    assert got["score"] == pytest.approx((spinal - math.log(0.25) - math.log(0.8) + any_severe) / 4)


def test_lumbar_uniform_prediction_and_any_severe_negative():
    ids = LUMBAR.row_ids([5])
    sol = _lumbar_solution([(r, 0) for r in ids])  # all Normal/Mild: no severe spinal row
    sub = pd.DataFrame({"row_id": ids, **{c: 1 / 3 for c in PRED_COLUMNS}})
    got = LUMBAR.score(sol, sub)
    for group in ("spinal", "foraminal", "subarticular"):
        assert got[group] == pytest.approx(math.log(3))
    assert got["any_severe_spinal"] == pytest.approx(-math.log(2 / 3))


def test_lumbar_metric_matches_sklearn_and_skips_unlabeled_rows():
    rng = np.random.default_rng(0)
    studies = list(range(100, 140))
    train = pd.DataFrame({"study_id": studies})
    for t in TARGETS:
        train[t] = rng.choice(
            ["Normal/Mild", "Moderate", "Severe", None], size=len(studies), p=[0.7, 0.15, 0.1, 0.05]
        )
    sol = LUMBAR.solution_from_train(train)
    assert len(sol) == train[TARGETS].notna().sum().sum()
    ids = LUMBAR.row_ids(studies)
    p = rng.dirichlet([2, 1, 1], size=len(ids))
    sub = pd.DataFrame(p, columns=PRED_COLUMNS).assign(row_id=ids)
    got = LUMBAR.score(sol, sub)
    m = sub.set_index("row_id").loc[sol["row_id"]]
    spinal = sol["row_id"].str.contains("spinal").to_numpy()
    ref = log_loss(
        sol.loc[spinal, PRED_COLUMNS].to_numpy().argmax(1),
        m[spinal].to_numpy(),
        sample_weight=sol.loc[spinal, "sample_weight"],
        labels=[0, 1, 2],
    )
    assert got["spinal"] == pytest.approx(ref)


def test_lumbar_unknown_grade_string_is_named():
    train = pd.DataFrame({"study_id": [1], **{t: ["Normal/Mild"] for t in TARGETS}})
    train.loc[0, TARGETS[3]] = "normal"
    with pytest.raises(ValueError, match="normal"):
        LUMBAR.labels_long(train)


def test_missing_submission_rows_are_named():
    sol = _lumbar_solution([("1_spinal_canal_stenosis_l1_l2", 0)])
    sub = pd.DataFrame(
        {"row_id": ["2_spinal_canal_stenosis_l1_l2"], "normal_mild": [1], "moderate": [0], "severe": [0]}
    )
    with pytest.raises(ValueError, match="1_spinal_canal_stenosis_l1_l2"):
        LUMBAR.score(sol, sub)


def test_cervical_metric_by_hand():
    a, b = "1.2.3.4", "1.2.3.5"
    ids = CERVICAL.row_ids([a, b])
    y = [0] * 8 + [1, 0, 0, 0, 0, 0, 0, 1]
    p = [0.1] * 7 + [0.2] + [0.7] + [0.1] * 6 + [0.9]
    sol = pd.DataFrame({"row_id": ids, "fractured": y})
    sub = pd.DataFrame({"row_id": ids, "fractured": p})
    study_a = (7 * -math.log(0.9) + 7 * -math.log(0.8)) / (7 + 7)
    study_b = (2 * -math.log(0.7) + 6 * -math.log(0.9) + 14 * -math.log(0.9)) / (2 + 6 + 14)
    got = CERVICAL.score(sol, sub)
    assert got["score"] == pytest.approx((study_a + study_b) / 2)
    assert got["patient_overall"] == pytest.approx((7 * -math.log(0.8) + 14 * -math.log(0.9)) / 21)


def test_cervical_solution_from_train_weights():
    train = pd.DataFrame(
        {"StudyInstanceUID": ["1.2"], "patient_overall": [1], **{f"C{i}": [int(i == 2)] for i in range(1, 8)}}
    )
    sol = CERVICAL.solution_from_train(train)
    assert sol["row_id"].tolist() == CERVICAL.row_ids(["1.2"])
    assert sol["sample_weight"].tolist() == [1, 2, 1, 1, 1, 1, 1, 14]


def test_clipping_keeps_losses_finite():
    sol = pd.DataFrame({"row_id": CERVICAL.row_ids(["9"]), "fractured": [1] * 8})
    sub = sol.assign(fractured=0.0)
    assert math.isfinite(CERVICAL.score(sol, sub)["score"])
