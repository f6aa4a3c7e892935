"""Stage 02: coordinate mappings, heatmap loss and decoding, folds, the training loop, and a tiny run."""

import numpy as np
import pandas as pd
import pytest
import torch

from spine.core.config import REPO_ROOT, load_config
from spine.core.folds import load_folds, make_folds
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.synth import generate
from spine.core.train.loop import TrainSettings, fit
from spine.lumbar.localize import CHANNELS, allowed_slices, from_cells, run_localize, to_resized
from spine.lumbar.models.heatmap import decode_peaks, heatmap_loss


def test_resize_and_cell_mappings_round_trip():
    pts = np.array([[3.0, 10.25, 97.5], [0.0, 0.0, 0.0], [7.5, 159.0, 1.0]])
    shape, size = (9, 160, 120), 96
    resized = to_resized(pts, shape, size)
    for stride in (2, 4):
        cells = resized.copy()
        cells[:, 1:] = (resized[:, 1:] - (stride - 1) / 2) / stride
        np.testing.assert_allclose(from_cells(cells, shape, size, stride), pts, atol=1e-9)


def _gaussian_logits(d, k, h, w, centres, sharp=4.0):
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    maps = [-sharp * ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2).float() for c in centres]
    return torch.stack(maps, 1)  # (D, K, h, w)


def test_decode_peaks_recovers_sub_cell_positions():
    centres = [(2.0, 5.3, 7.6), (6.0, 12.0, 3.25)]
    coords, conf = decode_peaks(_gaussian_logits(8, 2, 16, 16, centres, sharp=1.0))
    np.testing.assert_allclose(coords.numpy(), centres, atol=0.15)
    assert (conf > 0.9).all()


def test_heatmap_loss_is_lowest_at_the_target_and_skips_missing_points():
    target = torch.tensor([[2.0, 5.0, 7.0], [float("nan")] * 3])
    good = _gaussian_logits(6, 2, 12, 12, [(2, 5, 7), (0, 0, 0)])
    off = _gaussian_logits(6, 2, 12, 12, [(3, 8, 4), (2, 5, 7)])
    assert heatmap_loss(good, target, 1.0) < heatmap_loss(off, target, 1.0)
    assert heatmap_loss(good, torch.full((2, 3), float("nan")), 1.0) == 0


def test_laterality_comes_from_geometry():
    lateral = np.array([40.0, 20.0, 0.0, -20.0, -40.0]) / 50  # mm along patient x (left +), / 50
    allowed = allowed_slices(lateral)
    for k, (_, condition, _) in enumerate(CHANNELS):
        if condition.startswith("left"):
            assert allowed[:, k].tolist() == [True, True, True, False, False]
        elif condition.startswith("right"):
            assert allowed[:, k].tolist() == [False, False, True, True, True]
        else:
            assert allowed[:, k].all()
    # a masked decode cannot pick the brighter peak on the wrong side
    logits = _gaussian_logits(5, 1, 8, 8, [(4, 3, 3)]) + 0.0
    logits[0] = _gaussian_logits(5, 1, 8, 8, [(0, 3, 3)])[0] - 1.0
    coords, _ = decode_peaks(logits, allowed=torch.tensor([[True], [True], [True], [False], [False]]))
    assert round(float(coords[0, 0])) == 0


def test_fit_resumes_after_an_interruption(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]
    calls = {"n": 0}

    def loss_fn(m, batch, device):
        calls["n"] += 1
        if calls["n"] == 5:  # during the second epoch
            raise KeyboardInterrupt
        return ((m(batch["x"]) - batch["y"]) ** 2).mean()

    ckpt = tmp_path / "m.pt"
    settings = TrainSettings(epochs=3, lr=0.01, warmup_epochs=0, ema=0.9)
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, loss_fn, settings, ckpt, torch.device("cpu"))
    last = tmp_path / "m.pt.last"
    assert last.exists() and not ckpt.exists()
    assert torch.load(last, weights_only=False)["epoch"] == 0
    calls["n"] = 100  # no more interruptions
    fit(model, data, loss_fn, settings, ckpt, torch.device("cpu"))
    assert ckpt.exists() and not last.exists()
    assert calls["n"] == 100 + 2 * 3  # only epochs 2 and 3 ran again


def test_folds_split_studies_and_are_reused(tmp_path):
    data = tmp_path / "data"
    generate("lumbar", data, 10, 1, seed=3, image_size=64)
    folds = make_folds("lumbar", data, 5, 42)
    assert (
        folds["study_id"].is_unique and len(folds) == 10 and sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    )
    pd.testing.assert_frame_equal(folds, make_folds("lumbar", data, 5, 42))
    cfg = load_config(
        REPO_ROOT / "configs/lumbar/demo.yaml",
        [f"data_dir={data}", f"out_dir={tmp_path}/o", "folds.n_folds=5"],
    )
    assert load_folds(cfg)["fold"].tolist() == folds["fold"].tolist()
    cfg3 = load_config(
        REPO_ROOT / "configs/lumbar/demo.yaml",
        [f"data_dir={data}", f"out_dir={tmp_path}/o", "folds.n_folds=3"],
    )
    with pytest.raises(RuntimeError, match="delete it"):
        load_folds(cfg3)


@pytest.fixture(scope="module")
def localized(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    generate("lumbar", root / "data", 6, 2, seed=5, image_size=64)
    cfg = load_config(
        REPO_ROOT / "configs/lumbar/demo.yaml",
        [
            f"data_dir={root / 'data'}",
            f"out_dir={root / 'out'}",
            "num_workers=1",
            "folds.n_folds=2",
            "localize.epochs=1",
            "localize.image_size=64",
            "localize.backbone=resnet10t",
        ],
    )
    run_preprocess(cfg)
    return cfg, run_localize(cfg)


def test_stage_02_points_are_out_of_fold(localized):
    cfg, report = localized
    paths = Paths.from_config(cfg)
    pts = pd.read_csv(paths.points)
    folds = pd.read_csv(paths.folds).set_index("study_id")["fold"]
    train = pts[pts["split"] == "train"]
    assert (train["source"] == "oof").all()
    assert (train["fold"].to_numpy() == folds.loc[train["study_id"]].to_numpy()).all()  # never in-fold
    test = pts[pts["split"] == "test"]
    assert (test["source"] == "test_mean").all() and test["study_id"].nunique() >= 1
    # every train study with a sagittal series: 5 canal + 10 foramen points
    assert (train.groupby("study_id").size() == 15).all()
    assert np.isfinite(pts[["x_mm", "y_mm", "z_mm", "confidence"]].to_numpy()).all()
    for name in ("model", "baseline_mean_position"):
        assert {"median_mm", "p90_mm", "within_5mm", "within_10mm"} <= set(report[name]["all"])
        assert 0 <= report[name]["level_assignment_accuracy"] <= 1
    assert (paths.localize_dir / "config.yaml").exists()


def test_stage_02_rerun_skips_trained_folds(localized):
    cfg, _ = localized
    paths = Paths.from_config(cfg)
    ckpts = sorted(paths.out_dir.rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    run_localize(cfg)
    assert len(ckpts) == 2 and [p.stat().st_mtime_ns for p in ckpts] == stamps  # one model per fold


def test_localizer_fold_by_fold_then_all_trains_each_fold_once(tmp_path, monkeypatch):
    import spine.lumbar.localize as localize

    generate("lumbar", tmp_path / "data", 6, 1, seed=7, image_size=64)
    base = [
        f"data_dir={tmp_path / 'data'}",
        f"out_dir={tmp_path / 'out'}",
        "num_workers=1",
        "folds.n_folds=2",
        "localize.epochs=1",
        "localize.image_size=64",
        "localize.backbone=resnet10t",
    ]
    trained = []
    real_fit = localize.fit

    def counting_fit(*args, **kwargs):
        trained.append(args[6])  # the fit's name, "fold k"
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(localize, "fit", counting_fit)
    load = lambda *extra: load_config(REPO_ROOT / "configs/lumbar/demo.yaml", [*base, *extra])
    run_preprocess(load())
    run_localize(load("localize.folds=[0]"))
    run_localize(load("localize.folds=[1]", "localize.loader_workers=1"))  # run-only keys differ too
    assert trained == ["fold 0", "fold 1"]
    run_localize(load())  # every fold: all current
    assert trained == ["fold 0", "fold 1"]
    run_localize(load("localize.epochs=2", "localize.folds=[0]"))  # what a fold learns changed: retrain
    assert trained == ["fold 0", "fold 1", "fold 0"]
