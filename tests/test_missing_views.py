"""Lumbar rows predicted from the views that exist: present masks, view dropout, the missing-view report."""

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from spine.core.config import REPO_ROOT, load_config
from spine.core.io import save_table
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.synth import generate
from spine.lumbar.classify import (
    CropDataset,
    build_model,
    drop_views,
    load_classifier,
    missing_view_rows,
    predict_test,
    run_train,
    train_dataset,
    train_rows,
)
from spine.lumbar.crops import ANCHORS, run_crops
from spine.lumbar.models.classifier import MASK_VERSION_KEY, build_classifier
from spine.lumbar.points import POINT_COLUMNS, label_points
from spine.lumbar.task import PRED_COLUMNS
from tiny import CLASSIFY_TINY

TINY = [*CLASSIFY_TINY, "train.batch_size=16", "train.folds=[0]"]
HEADS = {"n_groups": 3, "n_conditions": 5, "n_levels": 5}
NO_POINT = "l5_s1"  # the level of a test study whose points are all withheld: its 5 rows have no view


def _test_points(truth_dir, drop_level: str) -> pd.DataFrame:
    """The generator's true anchor points of the test studies as a stage-02 points table (stage 02
    stands in), less every point of ``drop_level`` of the first test study."""
    t = pd.read_csv(truth_dir / "points.csv")
    t = t[(t["split"] == "test") & t["condition"].isin(ANCHORS)]
    first = t["study_id"].min()
    t = t[~((t["study_id"] == first) & (t["level"] == drop_level))]
    # series_id -1: the crop takes the nearest plane over every stack of the view's series description
    pts = t.assign(series_id=-1, stack=-1, index=np.nan, row=np.nan, col=np.nan, confidence=1.0)
    return pts.assign(source="oof", fold=-1)[POINT_COLUMNS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 train + 2 test studies (seed 11: one test study lacks Axial T2) through stages 01, 03 and fold
    0 of stage 04."""
    root = tmp_path_factory.mktemp("views")
    generate("lumbar", root / "data", 4, 2, seed=11, image_size=64)
    over = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY]
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over)
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    train_pts = label_points(paths.data_dir, pd.read_parquet(paths.instance_table)).assign(source="oof")
    save_table(paths.points, pd.concat([train_pts, _test_points(root / "data_truth", NO_POINT)]))
    run_crops(cfg)
    report = run_train(cfg)
    return cfg, paths, report


def test_study_without_a_series_is_predicted_from_its_other_views(trained):
    cfg, paths, _ = trained
    out = predict_test(cfg)
    lacking = out[out["missing_views"] == "ax"]
    assert lacking["study_id"].nunique() == 1, "the generated test set should hold a study without Axial T2"
    p = lacking[PRED_COLUMNS].to_numpy()
    assert len(lacking) == 25 and np.isfinite(p).all() and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (lacking["reason"] == "").all()  # stage 06 gives no fallback: the model predicted them


def test_row_without_any_view_gets_nan_and_the_reason(trained):
    cfg, paths, _ = trained
    out = predict_test(cfg)
    unread = out[out["missing_views"] == "sag,ax"]
    assert len(unread) == 5 and set(unread["level"]) == {NO_POINT}
    assert np.isnan(unread[PRED_COLUMNS].to_numpy()).all()
    assert unread["reason"].str.match(r"sag, ax: no \w+ point").all()  # one reason for both views
    read = out[out["missing_views"] != "sag,ax"]
    assert np.isfinite(read[PRED_COLUMNS].to_numpy()).all()


def test_missing_view_rows_lists_rows_lacking_a_view(trained):
    _, paths, _ = trained
    rows = missing_view_rows(paths, "test")
    assert rows.index.name == "row_id" and rows.name == "missing_views"
    assert sorted(rows.value_counts().items()) == [("ax", 25), ("sag,ax", 5)]
    # every train study has every series; a train row without a label coordinate has no point
    assert set(missing_view_rows(paths, "train")) <= {"sag,ax"}


def test_oof_report_scores_rows_with_a_view_removed_beside_the_prior(trained):
    cfg, paths, report = trained
    oof = pd.read_csv(paths.oof_fold(0))
    for v in cfg.train.views:
        removed = oof[[f"without_{v}_{c}" for c in PRED_COLUMNS]].to_numpy()
        assert np.isfinite(removed).all() and np.allclose(removed.sum(1), 1, atol=1e-5)
        part = report["missing_views"][f"without_{v}"]
        assert part["rows"] == len(oof)
        assert {"model", "model_all_views", "prior"} <= set(part)
        assert part["model_all_views"]["score"] == pytest.approx(report["model"]["score"])
    rows = train_rows(paths, cfg.train.views).set_index("row_id").loc[oof["row_id"]]
    lacking = report["missing_views"]["rows_lacking_a_view"]
    assert lacking["rows"] == int((rows["missing_views"] != "").sum())
    assert ("model" in lacking) == (lacking["rows"] > 0)


def test_masked_view_does_not_reach_the_prediction():
    x = torch.randn(3, 2, 5, 32, 32)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    idx = torch.zeros(3, dtype=torch.long)
    for model in ("cnn25d", "cnn3d"):
        tc = OmegaConf.create(
            {
                "model": model,
                "backbone": "resnet10t",
                "slice_mode": "channels",
                "checkpoint": None,
                "width_3d": 4,
            }
        )
        net = build_classifier(tc, 2, 5, HEADS).eval()
        changed = x.clone()
        changed[1, 1], changed[2, 0] = 9.0, -9.0  # new content in the masked-out views only
        with torch.no_grad():
            a, b = net(x, present, idx, idx, idx)[0], net(changed, present, idx, idx, idx)[0]
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a[0], a[1])  # a row with one view is not predicted as with two


def test_view_dropout_never_drops_every_view():
    torch.manual_seed(0)
    for present in ([True, True], [True, True, True], [True, False, True], [False, True]):
        present = torch.tensor(present)
        draws = torch.stack([drop_views(present, 0.9) for _ in range(500)])
        assert (draws.sum(1) >= 1).all()  # never all of them
        assert not (draws & ~present).any()  # a missing view never comes back
        if present.sum() > 1:
            assert (draws.sum(1) < present.sum()).any()  # but views are dropped
    one = torch.tensor([False, True])
    assert torch.equal(drop_views(one, 0.9), one)  # a row's only view is kept
    torch.manual_seed(3)
    first = [drop_views(torch.tensor([True, True]), 0.5) for _ in range(20)]
    torch.manual_seed(3)
    again = [drop_views(torch.tensor([True, True]), 0.5) for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic per seed


def test_dataset_zeroes_dropped_views(trained):
    cfg, paths, _ = trained
    rows = train_rows(paths, cfg.train.views).iloc[:40]
    assert (rows["n_views"] == 0).any(), "the fixture should hold a train row without a point"
    ds = train_dataset(paths, rows, cfg, augment=True)  # train.view_dropout 0.2 (base.yaml)
    assert len(ds) == int((rows["n_views"] > 0).sum())  # a row with no view is not trained on
    torch.manual_seed(1)
    items = [ds[i] for i in range(len(ds))]
    assert any(not it["present"].all() for it in items)
    for it in items:
        assert it["present"].any()
        assert (it["x"][~it["present"]] == 0).all() and (it["x"][it["present"]] != 0).any()
    with pytest.raises(ValueError, match="view_dropout"):
        CropDataset(paths, rows, cfg.train.views, augment=True, view_dropout=1.0)


def test_checkpoint_from_before_the_mask_fails_clearly(trained, tmp_path):
    cfg, paths, _ = trained
    state = torch.load(paths.checkpoint(0, cfg.seed), weights_only=True)
    assert MASK_VERSION_KEY in state["model"]
    build_model(cfg).load_state_dict(state["model"])  # today's checkpoints load
    # the old classifiers had neither the version buffer nor the fusion layers
    old = {k: v for k, v in state["model"].items() if k != MASK_VERSION_KEY and not k.startswith("fusion.")}
    torch.save({**state, "model": old}, tmp_path / "old.pt")
    with pytest.raises(RuntimeError, match=r"before the per-view present mask.*04_train\.py"):
        load_classifier(cfg, tmp_path / "old.pt", torch.device("cpu"))
