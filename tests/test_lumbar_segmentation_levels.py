"""Lumbar stage 02 with a spider segmenter (``localize.method`` segmentation / both): the stack <-> canonical
mapping by geometry, disc anchors and level names from masks, and a tiny run of both methods against a
tiny trained spider model, through the registry as the stage calls it."""

import json

import numpy as np
import pandas as pd
import pytest

from spine.core.config import REPO_ROOT, load_config
from spine.core.preprocess import run_preprocess
from spine.core.stacks import StackGeometry
from spine.core.synth import generate
from spine.lumbar import levels_from_masks as masks
from spine.lumbar.localize import predict_test, run_localize
from spine.lumbar.points import POINT_COLUMNS
from spine.lumbar.task import LEVELS, LOCALIZER_TARGETS, LumbarTask
from tiny import SPIDER_TINY


def _geometry(n, row_dir, col_dir, step):
    """A stack of ``n`` slices: pixel (r, c) of slice k at k * step + c * row_dir + r * col_dir (1 mm)."""
    iop = np.repeat([[*row_dir, *col_dir]], n, 0).astype(float)
    ipp = np.arange(n)[:, None] * np.asarray(step, float)[None]
    return StackGeometry(ipp, iop, np.ones((n, 2)))


@pytest.mark.parametrize(
    "row_dir, col_dir, step",
    [
        ((0, 1, 0), (0, 0, -1), (-3.5, 0, 0)),  # the usual sagittal stack, slices ordered toward the right
        ((0, 0, -1), (0, 1, 0), (3.0, 0, 0)),  # rows and columns swapped (a transposed export)
        ((0, -1, 0), (0, 0, 1), (3.0, 0, 0)),  # both in-plane axes reversed
    ],
)
def test_canonical_view_follows_the_patient_directions_and_maps_back(row_dir, col_dir, step):
    geo = _geometry(5, row_dir, col_dir, step)
    vol = np.random.default_rng(0).random((5, 7, 9))
    view = masks.canonical_view(geo, vol.shape)
    canon = masks.to_canonical(vol, view)
    p = np.array([[1.0, 2.0, 3.0]])
    q = masks.canonical_to_stack(view, p)[0]
    assert canon[1, 2, 3] == vol[tuple(q.astype(int))]
    # one step along each canonical axis moves toward the patient's left, inferior, posterior
    base = geo.to_patient(*q)
    for axis, (d, sign) in enumerate([(0, 1), (2, -1), (1, 1)]):
        step_p = p.copy()
        step_p[0, axis] += 1
        moved = geo.to_patient(*masks.canonical_to_stack(view, step_p)[0]) - base
        assert sign * moved[d] > 0 and np.isclose(np.abs(moved).sum(), abs(moved[d]))
    assert view.spacing[0] == pytest.approx(np.abs(step).max())


def _spine(shape=(7, 80, 60), n_discs=5):
    """Canonical labels of a straight spine filling the rows: bodies 1..n_discs and discs 201.. counted
    up from the bottom (the sacrum unlabelled) on the middle slices, the canal behind them."""
    labels = np.zeros(shape, np.int16)
    rows, cols = shape[1:]
    step = (rows - 6) // n_discs
    disc = max(2, step // 3)
    front, back = int(cols * 0.2), int(cols * 0.65)
    for k in range(1, n_discs + 1):
        low = rows - 3 - (k - 1) * step  # the disc's lower face
        labels[1:-1, low - disc : low, front:back] = 200 + k
        labels[1:-1, low - step : low - disc, front - 1 : back + 1] = k
    labels[2:-2, 1 : rows - 1, back + 3 : back + 3 + max(2, cols // 10)] = 100
    return labels


def test_disc_anchors_name_levels_from_the_sacrum_and_carry_their_frame():
    labels = _spine()
    geo = _geometry(7, (0, 1, 0), (0, 0, -1), (3.0, 0, 0))
    view = masks.canonical_view(geo, labels.shape)
    # the stack holds the labels in its own axis order; anchors come back in patient mm
    stack_labels = np.ascontiguousarray(np.transpose(labels, np.argsort(view.order)))
    assert (masks.to_canonical(stack_labels, view) == labels).all()
    anchors = pd.DataFrame(masks.anchors_of(labels, view, geo)).set_index("level")
    assert list(anchors.index) == LEVELS[::-1]  # disc 201 (lowest) first = l5_s1
    z = anchors.loc[LEVELS, "z_mm"].to_numpy()
    assert (np.diff(z) < 0).all()  # l1_l2 highest
    frame = anchors[masks.FRAME_COLUMNS].to_numpy().reshape(-1, 3, 3)
    np.testing.assert_allclose(np.abs(frame[:, 0, 0]), 1, atol=1e-6)  # lateral = patient x
    assert (frame[:, 1, 2] > 0.99).all() and (frame[:, 2, 1] > 0.99).all()  # up = +z, ap = +y


def test_both_renames_keypoint_levels_by_the_nearest_disc_and_keeps_one_row_per_level():
    z = np.array([50.0, 30.0, 10.0, -10.0, -30.0])  # l1_l2 .. l5_s1 from the masks
    masks_df = pd.DataFrame({"study_id": 1, "condition": "spinal_canal_stenosis", "level": LEVELS, "z_mm": z})
    kp = masks_df.assign(level=LEVELS[1:] + LEVELS[:1], z_mm=z + 1.0)  # the keypoint model is one level off
    kp = kp.assign(x_mm=0.0, y_mm=0.0)
    masks_df = masks_df.assign(x_mm=0.0, y_mm=0.0, confidence=1.0)
    recess = kp.assign(condition="left_subarticular_stenosis")
    out, info = masks.combine("both", pd.concat([kp, recess]), masks_df, ["left_subarticular_stenosis"])
    for _, g in out.groupby("condition"):
        assert sorted(g["level"]) == sorted(LEVELS)
        np.testing.assert_allclose(g.set_index("level").loc[LEVELS, "z_mm"], z + 1.0)
    assert info["renamed_levels"] == 5
    broken = masks_df.assign(confidence=0.5)  # a broken disc sequence: its count may be off
    out, info = masks.combine("both", kp, broken, ["left_subarticular_stenosis"])
    assert info["renamed_levels"] == 0 and list(out["level"]) == list(kp["level"])


def test_stacks_agree_on_levels_the_lower_reaching_stack_names_them():
    """T2 missed L5/S1 and counted T12/L1 as its top lumbar disc: one level off against T1. T1's lowest
    disc lies lower, so T1 names the levels and T2's extra top disc is dropped."""
    z = np.array([-60.0, -25.0, 10.0, 45.0, 80.0, 115.0])  # true discs L5/S1 .. T12/L1, bottom first
    t1 = pd.DataFrame({"description": "Sagittal T1", "level": LEVELS[::-1], "z_mm": z[:5]})
    t2 = pd.DataFrame({"description": "Sagittal T2/STIR", "level": LEVELS[::-1], "z_mm": z[1:] + 2.0})
    anchors = pd.concat([t1, t2], ignore_index=True).assign(study_id=1, x_mm=0.0, y_mm=0.0)
    out = masks.reconcile_stacks(anchors)
    t2_out = out[out["description"] == "Sagittal T2/STIR"].set_index("level")["z_mm"]
    assert list(t2_out.index) == LEVELS[::-1][1:]  # l4_l5 .. l1_l2; the T12/L1 disc is gone
    np.testing.assert_allclose(t2_out.loc[LEVELS[:4]], z[1:5][::-1] + 2.0)
    assert (out[out["description"] == "Sagittal T1"]["level"] == t1["level"]).all()
    # T2's measurements move with its names: its "L5/S1" was L4/L5, its "L1" was T12 (dropped)
    meas = pd.DataFrame(
        {"study_id": 1, "description": "Sagittal T2/STIR", "structure": ["L5/S1", "L1", "L5", "spine"]}
    )
    renamed = masks.rename_measurements(meas.assign(value=[1.0, 2.0, 3.0, 4.0]), out)
    assert dict(zip(renamed["structure"], renamed["value"])) == {"L4/L5": 1.0, "L4": 3.0}
    # one stack alone: unchanged
    alone = masks.reconcile_stacks(anchors.iloc[:5])
    assert (alone["level"] == alone["mask_level"]).all() and len(alone) == 5


def test_measurement_features_read_the_rows_level_and_are_nan_where_absent(tmp_path):
    path = tmp_path / "measurements.csv"
    pd.DataFrame(
        {
            "study_id": [7, 7, 7],
            "structure": ["L4/L5", "L4/L5", "L5/S1"],
            "measurement": ["height_index", "listhesis_mm", "herniation_probability"],
            "value": [0.4, 2.0, 0.9],
        }
    ).to_csv(path, index=False)
    rows = [
        "7_spinal_canal_stenosis_l4_l5",
        "7_left_neural_foraminal_narrowing_l5_s1",
        "8_spinal_canal_stenosis_l4_l5",
    ]
    f = LumbarTask().measurement_features(rows, path)
    assert f.loc[0, "spider_height_index"] == 0.4 and f.loc[0, "spider_listhesis_mm"] == 2.0
    assert f.loc[1, "spider_herniation_probability"] == 0.9 and np.isnan(f.loc[1, "spider_height_index"])
    assert f.loc[2].isna().all()
    assert LumbarTask().measurement_features(rows, tmp_path / "none.csv").isna().all().all()


# --- a tiny run against a tiny trained spider model --------------------------------------------------
LUMBAR_TINY = [
    "num_workers=1",
    "folds.n_folds=2",
    "localize.epochs=1",
    "localize.image_size=48",
    "localize.axial.enabled=false",  # the recess model renames with its canal point (unit test above)
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stage_script):
    root = tmp_path_factory.mktemp("lumbar_seg")
    generate("spider", root / "spider", 4, 0, seed=3, image_size=64, n_slices=[5, 7])
    spider_args = [
        "--config",
        "configs/spider/demo.yaml",
        f"data_dir={root / 'spider'}",
        f"out_dir={root / 'so'}",
    ]
    for stage in ("01_preprocess", "02_localize"):
        stage_script(stage).main([*spider_args, *SPIDER_TINY])
    generate("lumbar", root / "lumbar", 6, 2, seed=5, image_size=48)
    base = [f"data_dir={root / 'lumbar'}", f"out_dir={root / 'lo'}", f"localize.segmenter={root / 'so'}"]
    load = lambda method: load_config(
        REPO_ROOT / "configs/lumbar/demo.yaml", [*base, *LUMBAR_TINY, f"localize.method={method}"]
    )
    run_preprocess(load("keypoints"))
    return root, load


def _sagittal_stacks(root) -> set:
    """(study, description) of every readable sagittal series: stage 02 localizes on one stack of each."""
    series = pd.read_parquet(root / "lo/cache/lumbar/series.parquet")
    ok = series[series["description"].isin(list(LOCALIZER_TARGETS)) & (series["status"] == "ok")]
    return set(zip(ok["study_id"], ok["description"]))


def _expected_rows(root) -> set:
    return {(s, c, lv) for s, d in _sagittal_stacks(root) for c in LOCALIZER_TARGETS[d] for lv in LEVELS}


def _check_points(root):
    points = pd.read_csv(root / "lo/localize/lumbar/points.csv")
    assert list(points.columns) == POINT_COLUMNS
    sagittal = points[points["condition"].isin([c for v in LOCALIZER_TARGETS.values() for c in v])]
    got = list(zip(sagittal["study_id"], sagittal["condition"], sagittal["level"]))
    assert len(got) == len(set(got)) and set(got) == _expected_rows(root)
    assert set(points.loc[points["split"] == "train", "source"]) == {"oof"}
    return points


def test_segmentation_method_with_a_trained_spider_model(tiny):
    root, load = tiny
    report = run_localize(load("segmentation"))
    assert report["method"] == "segmentation"
    assert set(report["methods"]["error_mm"]) == {"keypoints", "segmentation", "both"}
    seg = report["methods"]["segmenter"]
    assert seg["stacks"] == len(_sagittal_stacks(root))
    # an untrained model may find no disc on a stack: a named skip, never an error
    assert all("no lumbar disc" in why for why in seg["stacks_failed"].values())
    _check_points(root)
    assert (root / "lo/localize/lumbar/measurements.csv").exists()
    offsets = pd.read_csv(root / "lo/models/lumbar/localizer/mask_offsets.csv")
    assert set(offsets.columns) == {"condition", "level", "d_lateral", "d_up", "d_ap", "n"}


def test_both_method_takes_levels_from_clean_masks_and_measures_every_study(tiny, monkeypatch):
    """With masks of a clean spine (the segmenter replaced), every stack gives five anchors, every study
    is measured, and the keypoint points keep their positions under the masks' level names."""
    import spine.spider.api as api

    def clean_spine(volume, spacing_mm, segmenter):
        return _spine(volume.shape), {"broken": False, "reasons": []}

    monkeypatch.setattr(api, "segment_sagittal", clean_spine)
    root, load = tiny
    # the anchors of the same segmenter run are reused on a rerun: drop them, the masks are other now
    masks.anchors_path(root / "lo/localize/lumbar").unlink(missing_ok=True)
    report = run_localize(load("both"))
    anchors = pd.read_csv(root / "lo/localize/lumbar/mask_anchors.csv")
    # the clean spine fills each stack's rows, so a study's two stacks disagree on heights: the one
    # reaching lower names the other's discs (dropping those without a match), and the measurements follow
    assert not report["methods"]["segmenter"]["stacks_failed"]
    assert set(anchors["study_id"]) == {s for s, _ in _sagittal_stacks(root)}
    assert (anchors.groupby("study_id")["level"].nunique() == len(LEVELS)).all()
    meas = pd.read_csv(root / "lo/localize/lumbar/measurements.csv")
    studies = pd.read_parquet(root / "lo/cache/lumbar/series.parquet")["study_id"].unique()
    assert set(meas["study_id"]) == set(studies)
    assert set(masks.MEASUREMENT_COLUMNS) <= set(meas.columns) and {"L4/L5", "spine"} <= set(
        meas["structure"]
    )
    points = _check_points(root)
    keypoint = report["methods"]["error_mm"]["keypoints"]["all"]
    assert report["methods"]["error_mm"]["both"]["all"]["n"] == keypoint["n"]
    saved = json.loads((root / "lo/localize/lumbar/report.json").read_text())
    assert saved["method"] == "both" and len(points)
    # stage 06's path: the test stacks again, with the offsets stage 02 fitted on every train study
    predict_test(load("both"))
    test = pd.read_csv(root / "lo/localize/lumbar/points.csv")
    expected = {
        r for r in _expected_rows(root) if r[0] in set(points.loc[points["split"] == "test", "study_id"])
    }
    got = test[test["condition"].isin([c for v in LOCALIZER_TARGETS.values() for c in v])]
    assert set(zip(got["study_id"], got["condition"], got["level"])) == expected and set(test["split"]) == {
        "test"
    }
