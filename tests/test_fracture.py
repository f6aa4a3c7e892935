"""Cervical stages 03 (vertebra crops) and 04 (fracture classifiers) on a tiny generated set.

Stage 02 is stood in for by ``truth_vertebrae``: the generator's true vertebra spans written in the
contract's vertebrae.csv schema (source "label"). A dev/test helper only, never used by a stage.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from spine.cervical.crops import AIR_HU, VERTEBRA_COLUMNS, list_studies, resample_vertebra, run_crops
from spine.cervical.fracture import (
    StudyDataset,
    fill_with_prior,
    long_frame,
    metric_loss,
    predict_test,
    run_train,
    study_table,
)
from spine.cervical.models.fracture import noisy_or_logit
from spine.cervical.task import TARGETS, VERTEBRAE
from spine.core import geometry
from spine.core.config import REPO_ROOT, load_config
from spine.core.io import save_table
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.synth import generate
from spine.registry import get_task

# in-plane extent of a vertebra around its centre (mm, LPS): transverse processes, C1's ring, and the
# spinous process reaching ~45 mm behind the body centre
TRUTH_BOX_MM = {"x": (-28.0, 28.0), "y": (-16.0, 48.0)}


def truth_vertebrae(paths: Paths, splits=("train", "test")) -> pd.DataFrame:
    """vertebrae.csv from the generator's truth (``<data>_truth/vertebrae.csv``), in stage 02's schema.

    The truth's slice_min/slice_max count every generated slice in ascending z, while the cached stack
    lacks unreadable files; so the span is mapped through its millimetres (z_min_mm, z_max_mm) onto the
    cached slice positions of instances.parquet. The in-plane box is the true centre ± TRUTH_BOX_MM.
    """
    truth = pd.read_csv(paths.truth_dir / "vertebrae.csv", dtype={"study_id": str}).set_index(
        ["study_id", "vertebra"]
    )
    series = pd.read_parquet(paths.series_table).astype({"study_id": str, "series_id": str})
    inst = pd.read_parquet(paths.instance_table).astype({"study_id": str, "series_id": str})
    inst = inst[inst["status"] == "ok"]
    rows = []
    for split, study in list_studies(paths.data_dir, splits).itertuples(index=False):
        ok = series[(series["study_id"] == study) & (series["status"] == "ok")]
        g = inst[inst["study_id"] == study].sort_values("index")
        for name in VERTEBRAE:
            row = {"study_id": study, "split": split, "vertebra": name, "found": False, "source": "label"}
            if len(ok) and (study, name) in truth.index:
                t = truth.loc[(study, name)]
                ipp = g[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(float)
                iop = g[[f"iop_{k}" for k in range(6)]].to_numpy(float)
                z = geometry.slice_positions(ipp, iop)
                spacing = g[["spacing_row", "spacing_col"]].to_numpy(float)[0]
                corners = np.array(
                    [
                        [t.cx_mm + dx, t.cy_mm + dy, t.cz_mm]
                        for dx in TRUTH_BOX_MM["x"]
                        for dy in TRUTH_BOX_MM["y"]
                    ]
                )
                r, c, _ = geometry.patient_to_pixel(corners, ipp[0], iop[0], spacing)
                n_rows, n_cols = int(ok["rows"].iloc[0]), int(ok["cols"].iloc[0])
                row.update(
                    series_id=ok["series_id"].iloc[0],
                    stack=int(ok["stack"].iloc[0]),
                    found=True,
                    slice_start=int(np.searchsorted(z, t.z_min_mm - 0.01)),
                    slice_end=int(np.searchsorted(z, t.z_max_mm + 0.01, side="right") - 1),
                    row_start=int(np.clip(np.floor(r.min()), 0, n_rows - 1)),
                    row_end=int(np.clip(np.ceil(r.max()), 0, n_rows - 1)),
                    col_start=int(np.clip(np.floor(c.min()), 0, n_cols - 1)),
                    col_end=int(np.clip(np.ceil(c.max()), 0, n_cols - 1)),
                    voxels=0,
                    confidence=1.0,
                )
            rows.append(row)
    out = pd.DataFrame(rows).reindex(columns=VERTEBRA_COLUMNS)
    save_table(paths.vertebrae, out)
    return out


# =============================================================================================
# Fixtures
# =============================================================================================

TINY = [
    "num_workers=1",
    "folds.n_folds=2",
    "crop.depth=8",
    "crop.pixels=32",
    "train.n_seq=4",
    "train.width_3d=4",
    "train.epochs=1",
    "train.batch_size=2",
    "train.loader_workers=0",
    "ensemble.members=null",
]
CONFIGS = {"seq25d": "configs/cervical/demo.yaml", "res3d": "configs/cervical/demo_3d.yaml"}


def _cfg(family: str, over):
    return load_config(REPO_ROOT / CONFIGS[family], over)


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """6 train + 2 test studies (one test study missing) through stages 01 and 03, truth for stage 02."""
    root = tmp_path_factory.mktemp("fracture")
    generate("cervical", root / "data", 6, 2, seed=3, image_size=64, n_slices=40)
    over = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY]
    cfg = _cfg("seq25d", over)
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    truth_vertebrae(paths)
    summary = run_crops(cfg)
    return root, over, summary


# =============================================================================================
# Stage 03
# =============================================================================================


def test_crops_schema_and_resume(cropped):
    root, over, summary = cropped
    cfg = _cfg("seq25d", over)
    paths = Paths.from_config(cfg)
    m = pd.read_parquet(paths.crop_manifest)
    studies = list_studies(paths.data_dir, ["train", "test"])
    assert len(m) == 7 * len(studies) and m["row_id"].is_unique
    assert (m["row_id"] == m["study_id"] + "_" + m["vertebra"]).all()
    assert m.groupby("study_id")["array_index"].apply(list).map(lambda a: a == list(range(7))).all()
    gone = m[~m["found"]]
    assert len(gone) == 7 and gone["reason"].str.startswith("no volume").all()  # the missing test study
    found = m[m["found"]]
    assert (found["depth_mm"] > 0).all() and (found["box_mm"] > 0).all()
    for split, study in studies.itertuples(index=False):
        arr = np.load(paths.crop_array(split, study, "vert"))
        assert arr.shape == (7, 8, 32, 32) and arr.dtype == np.int16
    train = m[m["split"] == "train"]
    boxed = train[train["has_boxes"]]
    assert len(boxed) and boxed["box_depth"].map(lambda d: d is None or len(d) == 8).all()
    assert (boxed["box_slices"].fillna(0) > 0).any()  # a box of the generator lands on some vertebra
    assert m.loc[m["split"] == "test", "box_depth"].isna().all()
    report = json.loads(paths.crop_report.read_text())
    assert report["train"]["truth_centre_inside_share"] == 1.0
    # a rerun crops nothing; a changed vertebra row recrops its study only
    assert run_crops(cfg)["studies_cropped"] == 0
    vert = pd.read_csv(paths.vertebrae, dtype={"study_id": str})
    vert.loc[vert["study_id"] == train["study_id"].iloc[0], "slice_end"] += 1
    save_table(paths.vertebrae, vert)
    assert run_crops(cfg)["studies_cropped"] == 1
    truth_vertebrae(paths)
    assert run_crops(cfg)["studies_cropped"] == 1


def test_resample_keeps_millimetres():
    """Depth positions follow the slices' millimetres, so a missing slice does not stretch the crop."""
    z = np.array([0.0, 2.0, 6.0, 8.0])  # the slice at 4 mm is missing
    volume = np.broadcast_to(z[:, None, None], (4, 8, 8)).astype(np.float32)
    out, outside = resample_vertebra(volume, z, np.array([1.0, 4.0, 7.0, 20.0]), np.eye(2, 3), 8, 1.0)
    np.testing.assert_allclose(out[:3, 4, 4], [1.0, 4.0, 7.0], atol=1e-5)
    assert outside == 1 and (out[3] == AIR_HU).all()


# =============================================================================================
# Loss
# =============================================================================================


def test_metric_loss_is_the_official_metric():
    """On labelled rows the loss equals the official cervical score of the sigmoid probabilities."""
    rng = np.random.default_rng(0)
    vert = torch.tensor(rng.normal(0, 2, (3, 7)), dtype=torch.float32)
    overall = torch.tensor(rng.normal(0, 2, 3), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 2, (3, 8)), dtype=torch.float32)
    found = torch.ones(3, 7, dtype=torch.bool)
    loss = metric_loss(vert, overall, y, found).item()
    p = torch.cat([vert, overall[:, None]], 1).sigmoid().numpy()
    ids = [f"s{i}_{t}" for i in range(3) for t in TARGETS]
    sol = pd.DataFrame({"row_id": ids, "fractured": y.numpy().reshape(-1)})
    sub = pd.DataFrame({"row_id": ids, "fractured": p.reshape(-1)})
    assert loss == pytest.approx(get_task("cervical").score(sol, sub)["score"], rel=1e-5)


def test_metric_loss_hand_computed():
    """One study: C1 fractured (p = 0.5), C2..C7 healthy (p = 0.5), patient_overall fractured (p = 0.8):
    weights 2, 1 x 6, 14 → (2 ln2 + 6 ln2 + 14 (-ln 0.8)) / 22. A vertebra not found drops out."""
    vert = torch.zeros(1, 7)
    overall = torch.logit(torch.tensor([0.8]))
    y = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    found = torch.ones(1, 7, dtype=torch.bool)
    expected = (8 * np.log(2) - 14 * np.log(0.8)) / 22
    assert metric_loss(vert, overall, y, found).item() == pytest.approx(expected, rel=1e-5)
    found[0, 6] = False  # C7 (healthy, weight 1) not found
    expected = (7 * np.log(2) - 14 * np.log(0.8)) / 21
    assert metric_loss(vert, overall, y, found).item() == pytest.approx(expected, rel=1e-5)
    y[0, 1] = -1  # a missing label is not scored either
    expected = (6 * np.log(2) - 14 * np.log(0.8)) / 20
    assert metric_loss(vert, overall, y, found).item() == pytest.approx(expected, rel=1e-5)


def test_noisy_or_overall():
    logits = torch.tensor([[-3.0, 0.5, -1.0, -20.0, 2.0, -4.0, 0.0]])
    found = torch.tensor([[True, True, True, True, True, True, False]])
    p = logits.sigmoid()[0, :6]
    expected = 1 - torch.prod(1 - p)
    assert noisy_or_logit(logits, found).sigmoid().item() == pytest.approx(expected.item(), rel=1e-5)


# =============================================================================================
# Stage 04 and the inference path
# =============================================================================================


def _labelled_rows(paths) -> list[str]:
    train = pd.read_csv(paths.data_dir / "train.csv", dtype={"StudyInstanceUID": str})
    return sorted(f"{s}_{t}" for s in train["StudyInstanceUID"] for t in TARGETS)


@pytest.mark.parametrize("family", ["seq25d", "res3d"])
def test_oof_covers_every_labelled_row_once(cropped, family):
    root, over, _ = cropped
    cfg = _cfg(family, over)
    assert cfg.train.model == family
    report = run_train(cfg)
    paths = Paths.from_config(cfg)
    oof = pd.read_csv(paths.oof, dtype={"study_id": str})
    assert sorted(oof["row_id"]) == _labelled_rows(paths)
    assert list(oof.columns[:6]) == ["row_id", "fractured", "study_id", "target", "fold", "seed"]
    folds = pd.read_csv(paths.folds, dtype={"study_id": str}).set_index("study_id")["fold"]
    assert (oof["fold"].to_numpy() == folds.loc[oof["study_id"]].to_numpy()).all()
    p = oof["fractured"].to_numpy()
    assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    keys = {
        "rows",
        "studies",
        "folds_done",
        "complete",
        "model",
        "prior",
        "bayes",
        "signal_captured",
        "summary",
    }
    assert keys <= set(report) and report["complete"] and report["rows"] == len(oof)
    stamp = paths.checkpoint(0, cfg.seed).stat().st_mtime_ns
    run_train(cfg)  # resumable: every fold has its predictions, nothing is trained again
    assert paths.checkpoint(0, cfg.seed).stat().st_mtime_ns == stamp


def test_predict_test_from_another_out_dir(cropped):
    root, over, _ = cropped
    first = _cfg("res3d", over)
    if not Paths.from_config(first).checkpoint(1, first.seed).exists():
        run_train(first)
    second = [o for o in over if not o.startswith("out_dir=")]
    second += [f"out_dir={root / 'second'}", f"models_from={root / 'out'}", "preprocess.splits=[test]"]
    cfg = _cfg("res3d", second)
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    truth_vertebrae(paths, splits=["test"])
    run_crops(cfg)
    pred = predict_test(cfg)
    test_ids = pd.read_csv(paths.data_dir / "test.csv")["row_id"]
    assert sorted(pred["row_id"]) == sorted(test_ids)
    assert list(pred.columns) == ["row_id", "study_id", "target", "fractured", "reason"]
    gone = pred[pred["fractured"].isna()]
    assert len(gone) == 8 and (gone["reason"] != "").all()  # the missing test study, patient_overall too
    ok = pred["fractured"].dropna()
    assert ((ok > 0) & (ok < 1)).all() and (pred.loc[ok.index, "reason"] == "").all()
    empty = [o for o in second if not o.startswith("models_from=")] + [f"models_from={root / 'nowhere'}"]
    with pytest.raises(FileNotFoundError, match="fold0_seed"):
        predict_test(_cfg("res3d", empty))


def test_rows_without_a_vertebra_get_the_prior_in_oof_and_nan_at_test():
    studies = pd.DataFrame(
        {
            "study_id": ["a"],
            "reason": [np.array(["", "vertebra not found by stage 02", "", "", "", "", ""])],
            "y": [np.array([0, 1, 0, 0, 0, 0, 0, 1], np.float32)],
        }
    )
    probs = np.array([[0.1, np.nan, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3]])
    frame = long_frame(studies, probs)
    assert frame["fractured"].isna().sum() == 1 and frame.loc[1, "reason"] == "vertebra not found by stage 02"
    filled = fill_with_prior(frame.copy(), np.full(8, 0.25))
    assert filled.loc[1, "fractured"] == 0.25 and filled.loc[1, "reason"].endswith("rate")
    assert (filled.drop(index=1)["reason"] == "").all()
    complete = long_frame(studies, np.full((1, 8), 0.1))
    assert fill_with_prior(complete.copy(), np.full(8, 0.25)).equals(complete)  # nothing to fill: unchanged


def test_augmentation_repeats_with_the_torch_seed(cropped):
    """Same torch seed, same augmented sample (albumentations included); another seed, another one."""
    root, over, _ = cropped
    paths = Paths.from_config(_cfg("seq25d", over))
    ds = StudyDataset(paths, study_table(paths, "train"), ["bone"], augment=True)

    def sample(seed):
        torch.manual_seed(seed)
        return ds[0]["x"]

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_crops_of_other_settings_are_refused(cropped):
    root, over, _ = cropped
    with pytest.raises(ValueError, match="rerun src/03_crop.py"):
        run_train(_cfg("res3d", [*over, "crop.depth=16"]))
