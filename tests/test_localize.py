"""Stage 02: coordinate mappings, heatmap loss and decoding, folds, the training loop, and a tiny run."""

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from spine.core.config import REPO_ROOT, load_config
from spine.core.folds import load_folds, make_folds
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.stacks import StackGeometry
from spine.core.synth import generate
from spine.core.train.loop import TrainSettings, fit
from spine.lumbar.crops import Plane, StackRef
from spine.lumbar.localize import (
    CHANNELS,
    RECESS_CONDITIONS,
    RecessDataset,
    RecessItem,
    allowed_slices,
    from_cells,
    from_patch,
    modal_stack,
    run_localize,
    to_resized,
)
from spine.lumbar.models.heatmap import decode_peaks, heatmap_loss, patch_heatmap_loss


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


def test_patch_loss_keeps_each_patch_apart_and_skips_missing_points():
    target = torch.tensor([[[0.0, 3.0, 4.0], [float("nan")] * 3], [[0.0, 6.0, 2.0], [0.0, 1.0, 1.0]]])
    good = torch.cat(
        [
            _gaussian_logits(1, 2, 8, 8, [(0, 3, 4), (0, 0, 0)]),
            _gaussian_logits(1, 2, 8, 8, [(0, 6, 2), (0, 1, 1)]),
        ]
    )
    swapped = good.flip(0)  # each patch scored against the other's targets
    assert patch_heatmap_loss(good, target, 1.0) < patch_heatmap_loss(swapped, target, 1.0)
    assert patch_heatmap_loss(good, torch.full((2, 2, 3), float("nan")), 1.0) == 0


def test_recess_patch_targets_land_where_the_points_are(tmp_path):
    """A bright dot at a known source pixel of an axial slice: the patch shows it where the target says,
    and the patch → source mapping round-trips."""
    iop = np.repeat([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], 3, 0)
    geo = StackGeometry(
        np.array([[0.0, 0.0, z] for z in (-4.0, 0.0, 4.0)]), iop, np.repeat([[0.8, 0.6]], 3, 0)
    )
    ref = StackRef(1, 0, geo, (3, 100, 100), "ax.npy")
    vol = np.zeros((3, 100, 100), np.float32)
    vol[1, 62, 30] = 1.0
    np.save(tmp_path / "ax.npy", vol)
    plane = Plane(ref, 1, 50.0, 40.0, 0.0, True)
    item = RecessItem(1, "train", "l1_l2", plane, np.array([[62.0, 30.0], [np.nan, np.nan]]))
    ac = OmegaConf.create({"size_mm": 48.0, "pixels": 64, "jitter_mm": 0.0})
    paths = type("P", (), {"cache_dir": tmp_path})()
    ds = RecessDataset(paths, [item], ac, stride=4, augment=False)
    x, m = ds.patch(0)
    target = ds[0]["target"].numpy()
    assert np.isnan(target[1]).all() and target[0, 0] == 0
    peak = np.unravel_index(np.argmax(x[1]), x[1].shape)
    cell_px = target[0, 1:] * 4 + 1.5  # heatmap cell → patch pixel
    np.testing.assert_allclose(cell_px, peak, atol=1.0)
    np.testing.assert_allclose(from_patch(m, cell_px[None]), [[62.0, 30.0]], atol=1e-6)


def test_fold_mean_averages_within_the_stack_most_folds_chose():
    rows = pd.DataFrame(
        {
            "study_id": [1, 1, 1],
            "condition": ["left_subarticular_stenosis"] * 3,
            "level": ["l4_l5"] * 3,
            "series_id": [7, 7, 7],
            "stack": [2, 2, 3],
            "row": [10.0, 12.0, 50.0],
        }
    )
    kept = modal_stack(rows)
    assert kept["stack"].tolist() == [2, 2] and kept["row"].mean() == 11.0


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
    assert torch.load(last, weights_only=True)["epoch"] == 0
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
    # every train study with a sagittal series: 5 canal + 10 foramen points; and up to 10 recess points,
    # on Axial T2, where the fold's canal point falls inside an axial stack
    recess = train["condition"].isin(RECESS_CONDITIONS)
    assert (train[~recess].groupby("study_id").size() == 15).all()
    assert 0 < recess.sum() and (train[recess].groupby("study_id").size() <= 10).all()
    inst = pd.read_parquet(paths.series_table).drop_duplicates("series_id").set_index("series_id")
    assert (
        inst.loc[pts.loc[pts["condition"].isin(RECESS_CONDITIONS), "series_id"], "description"] == "Axial T2"
    ).all()
    assert np.isfinite(pts[["x_mm", "y_mm", "z_mm", "confidence"]].to_numpy()).all()
    for name in ("model", "baseline_mean_position"):
        assert {"median_mm", "p90_mm", "within_5mm", "within_10mm"} <= set(report[name]["all"])
        assert 0 <= report[name]["level_assignment_accuracy"] <= 1
    # the recess error beside the fixed offset, on the same rows, against the labels and the truth
    for ref in ("vs_labels", "vs_truth"):
        model, fixed = report["recess"][ref]["model"], report["recess"][ref]["fixed_offset"]
        assert model["n"] == fixed["n"] > 0 and {"median_mm", "p90_mm"} <= set(model) & set(fixed)
    assert (paths.localize_dir / "config.yaml").exists()


def test_stage_02_rerun_skips_trained_folds(localized):
    cfg, _ = localized
    paths = Paths.from_config(cfg)
    ckpts = sorted(paths.out_dir.rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    run_localize(cfg)
    # one sagittal and one recess model per fold
    assert len(ckpts) == 4 and [p.stat().st_mtime_ns for p in ckpts] == stamps


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
    assert trained == ["fold 0", "recess fold 0", "fold 1", "recess fold 1"]
    run_localize(load())  # every fold: all current
    assert len(trained) == 4
    run_localize(load("localize.epochs=2", "localize.folds=[0]"))  # what a fold learns changed: retrain
    assert trained[4:] == ["fold 0"]  # the recess model keeps its own epochs; only its predictions are redone
    run_localize(load("localize.epochs=2", "localize.folds=[0]", "localize.axial.jitter_mm=2.0"))
    assert trained[5:] == ["recess fold 0"]  # a recess setting never retrains the sagittal model
