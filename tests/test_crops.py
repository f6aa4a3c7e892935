"""Stage 03 crops: registration and crop geometry with known answers, then the stage on a tiny set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spine.core import crops as core_crops
from spine.core import geometry
from spine.core.config import REPO_ROOT, load_config
from spine.core.io import save_table
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.stacks import StackGeometry
from spine.core.synth import generate
from spine.lumbar import crops
from spine.lumbar.crops import CropSpec, StackRef
from spine.lumbar.localize import run_localize
from spine.lumbar.points import POINT_COLUMNS, label_points
from spine.lumbar.task import CONDITION_SERIES, CONDITIONS, LEVELS, LumbarTask

SAG_IOP = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])  # columns run posterior, rows run inferior
AX_IOP = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def tilted_iop(degrees: float) -> np.ndarray:
    """An axial IOP tilted about patient x, like a block laid along one disc."""
    rot = geometry.rotation([1, 0, 0], degrees)
    return np.concatenate([rot @ [1, 0, 0], rot @ [0, 1, 0]])


def stack_ref(centre, iop, n: int, gap: float, spacing, size: int, series_id=1, stack=0) -> StackRef:
    """A stack of ``n`` square slices centred on ``centre``, in position order along its normal."""
    iop = np.asarray(iop, dtype=float)
    normal = geometry.slice_normal(iop)
    centres = np.asarray(centre, dtype=float) + ((np.arange(n) - (n - 1) / 2) * gap)[:, None] * normal
    half = (size - 1) / 2
    ipp = centres - half * spacing[1] * iop[:3] - half * spacing[0] * iop[3:]
    geo = StackGeometry(ipp, np.repeat(iop[None], n, 0), np.repeat(np.asarray(spacing, float)[None], n, 0))
    return StackRef(series_id, stack, geo, (n, size, size), "")


def sagittal_stack() -> StackRef:
    """Sagittal slices 4 mm apart at x = -8..8, 0.75 mm pixels."""
    return stack_ref([0.0, 0.0, 0.0], SAG_IOP, 5, 4.0, (0.75, 0.75), 160)


# --- registration --------------------------------------------------------------------------------


def point_on_sagittal(x: float, y: float, z: float) -> np.ndarray:
    """A point placed on a sagittal slice by (index, row, col), as a label would give it."""
    sag = sagittal_stack()
    index = int(np.argmin(np.abs(sag.geo.ipp[:, 0] - x)))
    assert sag.geo.ipp[index, 0] == pytest.approx(x)  # x is one of the slice positions
    row = (sag.geo.ipp[index, 2] - z) / 0.75
    col = (y - sag.geo.ipp[index, 1]) / 0.75
    return sag.geo.to_patient(index, row, col)


def test_point_from_sagittal_slice_lands_on_the_right_tilted_block_slice_and_pixel():
    # three blocks, each tilted to its own disc; the point sits 1.2 mm above slice 2 of the middle block
    spacing = (0.6, 0.5)
    blocks = [
        stack_ref([0, 10, 40], tilted_iop(-8), 5, 4.0, spacing, 128, series_id=7, stack=0),
        stack_ref([0, 12, 5], tilted_iop(12), 5, 4.0, spacing, 128, series_id=7, stack=1),
        stack_ref([0, 16, -30], tilted_iop(25), 5, 4.0, spacing, 128, series_id=7, stack=2),
    ]
    g = blocks[1].geo
    want_row, want_col = 70.25, 60.5
    on_plane = g.ipp[2] + want_col * spacing[1] * g.iop[2, :3] + want_row * spacing[0] * g.iop[2, 3:]
    target = on_plane + 1.2 * geometry.slice_normal(g.iop[2])
    # slide along x onto the sagittal slice x = 4: row_dir is +x in every block (they tilt about x)
    want_col += (4.0 - target[0]) / spacing[1]
    target[0] = 4.0
    point = point_on_sagittal(*target)
    assert np.allclose(point, target)

    plane = crops.nearest_plane(point, blocks)
    assert (plane.ref.stack, plane.index) == (1, 2)
    assert (plane.row, plane.col) == pytest.approx((want_row, want_col), abs=1e-9)
    assert plane.distance_mm == pytest.approx(1.2) and plane.inside


def test_descending_stack_finds_the_slice_and_pixel():
    # IOP (1,0,0, 0,-1,0): the normal points inferior, so position order runs from head to feet
    iop = np.array([1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    ref = stack_ref([0, 0, 0], iop, 9, 3.0, (0.8, 0.8), 100)
    assert np.all(np.diff(ref.geo.ipp[:, 2]) < 0)  # index 0 is the highest slice
    point = point_on_sagittal(-4.0, 7.0, -1.2)  # slices at z = 12, 9, ..., -12: nearest z = 0, index 4
    plane = crops.nearest_plane(point, [ref])
    assert plane.index == 4 and plane.distance_mm == pytest.approx(1.2)
    half = 99 / 2
    assert plane.col == pytest.approx(half - 4.0 / 0.8)  # x = -4 mm
    assert plane.row == pytest.approx(half - 7.0 / 0.8)  # col_dir is -y: rows grow anterior


def test_reversed_instance_numbers_give_the_same_geometry():
    ref = stack_ref([0, 0, 0], AX_IOP, 6, 4.0, (0.7, 0.7), 64)
    g = ref.geo
    inst = pd.DataFrame(
        {
            "status": "ok",
            "index": np.arange(6)[::-1],  # rows listed by instance number, which runs downwards
            "instance_number": np.arange(1, 7),
            **{f"ipp_{a}": g.ipp[::-1, j] for j, a in enumerate("xyz")},
            **{f"iop_{k}": g.iop[::-1, k] for k in range(6)},
            "spacing_row": 0.7,
            "spacing_col": 0.7,
        }
    )
    geo = StackGeometry.from_instances(inst)
    plane = crops.nearest_plane([1.0, 2.0, 5.1], [StackRef(1, 0, geo, ref.shape, "")])
    assert plane.index == 4 and plane.distance_mm == pytest.approx(0.9)  # slices z = -10, -6, ..., 10


def test_a_plane_that_shows_the_point_wins_over_a_nearer_one_that_does_not():
    small = stack_ref([100, 0, 0], AX_IOP, 3, 4.0, (0.5, 0.5), 32, stack=0)  # far off to the left
    wide = stack_ref([0, 0, 2.5], AX_IOP, 3, 4.0, (0.5, 0.5), 256, stack=1)
    plane = crops.nearest_plane([0.0, 0.0, 0.0], [small, wide])
    assert plane.ref.stack == 1 and plane.inside and plane.distance_mm == pytest.approx(1.5)
    alone = crops.nearest_plane([0.0, 0.0, 0.0], [small])
    assert not alone.inside and alone.distance_mm == pytest.approx(0.0)
    assert crops.nearest_plane([0.0, 0.0, 0.0], []) is None


def test_slice_window_repeats_edge_slices_and_counts_them():
    assert crops.slice_window(5, 5, 10) == ([3, 4, 5, 6, 7], 0)
    assert crops.slice_window(0, 5, 10) == ([0, 0, 0, 1, 2], 2)
    assert crops.slice_window(2, 5, 3) == ([0, 1, 2, 2, 2], 2)
    assert crops.slice_window(0, 3, 1) == ([0, 0, 0], 2)


# --- crops ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(0.7, 0.7), (0.5, 1.25)])
@pytest.mark.parametrize("pixels", [33, 32])
def test_crop_of_a_bright_voxel_is_centred(spacing, pixels):
    vol = np.zeros((7, 90, 60), np.int16)
    vol[3, 61, 17] = 1000
    spec = CropSpec(size_mm=20.0, pixels=pixels, n_slices=5, recess_offset_mm=0.0)
    slices, _ = crops.slice_window(3, 5, 7)
    out = crops.crop_stack(vol, slices, 61.0, 17.0, spacing, spec)
    assert out.shape == (5, pixels, pixels)
    assert out[2].max() > 0 and np.all(out[[0, 1, 3, 4]] == 0)
    mass = out[2] / out[2].sum()
    centroid = (mass.sum(1) @ np.arange(pixels), mass.sum(0) @ np.arange(pixels))
    assert centroid == pytest.approx(((pixels - 1) / 2,) * 2, abs=0.1)
    peak = np.unravel_index(out[2].argmax(), out[2].shape)
    assert np.all(np.abs(np.array(peak) - (pixels - 1) / 2) <= 0.5)


def test_crop_maps_millimetres_exactly_with_anisotropic_pixels():
    # an image whose value is the row position in mm: bilinear sampling reproduces it exactly
    dr, dc = 0.45, 1.1
    rows, cols = np.mgrid[0:200, 0:100].astype(np.float32)
    row_mm, col_mm = rows * dr, cols * dc
    size, px, r0, c0 = 30.0, 64, 101.3, 47.6
    step = size / px
    expect = (np.arange(px) - (px - 1) / 2) * step
    got_r = core_crops.crop_slice(row_mm, r0, c0, (dr, dc), size, px)
    got_c = core_crops.crop_slice(col_mm, r0, c0, (dr, dc), size, px)
    assert np.allclose(got_r[:, 10], r0 * dr + expect, atol=0.02)
    assert np.allclose(got_c[10, :], c0 * dc + expect, atol=0.05)
    row0, col0, row1, col1 = core_crops.crop_box(r0, c0, (dr, dc), size)
    assert ((row1 - row0) * dr, (col1 - col0) * dc) == pytest.approx((size, size))


def test_mirrored_and_transposed_slices_give_the_canonical_crop():
    # the same anatomy stored three ways: usual axial IOP, columns mirrored (row_dir -x), transposed
    rng = np.random.default_rng(0)
    image = rng.random((70, 90)).astype(np.float32)
    r, c, spacing, size, px = 30.0, 41.0, (0.8, 0.6), 24.0, 31
    usual = core_crops.crop_slice(image, r, c, spacing, size, px, iop=AX_IOP)
    assert np.array_equal(usual, core_crops.crop_slice(image, r, c, spacing, size, px))  # already canonical
    mirrored = core_crops.crop_slice(image[:, ::-1], r, 89 - c, spacing, size, px, iop=[-1, 0, 0, 0, 1, 0])
    transposed = core_crops.crop_slice(image.T, c, r, spacing[::-1], size, px, iop=[0, 1, 0, 1, 0, 0])
    assert np.allclose(mirrored, usual, atol=1e-2) and np.allclose(transposed, usual, atol=1e-2)
    assert core_crops.canonical_axes(SAG_IOP) == (False, 1.0, 1.0)
    assert core_crops.canonical_axes([0, -1, 0, 0, 0, 1]) == (False, -1.0, -1.0)  # sagittal upside down


def test_intensity_scale_is_a_robust_percentile():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    vol[0, 0, 0] = 1e6  # one hot pixel does not set the scale
    assert crops.robust_scale(vol) == pytest.approx(np.percentile(vol, 99.5))
    assert crops.robust_scale(np.zeros((2, 4, 4))) == 1.0


# --- the stage on a tiny generated set -----------------------------------------------------------

SEED, N_TRAIN, N_TEST, SIZE = 17, 4, 3, 64  # seed 17: one test study without Axial T2, one without T1


def truth_as_stage02_points(paths: Paths, inst: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """Test-study points as stage 02 would give them: the true points placed on their sagittal series.

    Tests only: the pipeline never reads the truth folder to crop.
    """
    truth = pd.read_csv(paths.truth_dir / "points.csv")
    truth = truth[(truth["split"] == "test") & truth["condition"].isin(crops.ANCHORS)]
    rows = []
    for study, g in truth.groupby("study_id"):
        refs = crops.stack_refs(series[series["study_id"] == study], inst[inst["study_id"] == study])
        for r in g.itertuples(index=False):
            plane = crops.nearest_plane([r.x_mm, r.y_mm, r.z_mm], refs.get(CONDITION_SERIES[r.condition], []))
            if plane is None:  # no such series: stage 02 has nothing to place
                continue
            xyz = plane.ref.geo.to_patient(plane.index, plane.row, plane.col)
            where = [plane.ref.series_id, plane.ref.stack, plane.index, plane.row, plane.col, *xyz]
            rows.append([study, "test", r.condition, r.level, *where, 1.0, "truth", -1])
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    generate("lumbar", root / "data", N_TRAIN, N_TEST, SEED, image_size=SIZE)
    over = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", "num_workers=1"]
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over + ["crop.points=label"])
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    inst, series = pd.read_parquet(paths.instance_table), pd.read_parquet(paths.series_table)
    ok = series[series["status"] == "ok"]
    points = pd.concat([label_points(paths.data_dir, inst), truth_as_stage02_points(paths, inst, ok)])
    save_table(paths.points, points)
    summary = crops.run_crops(cfg)
    return cfg, paths, summary, pd.read_parquet(paths.crop_manifest)


def test_every_row_is_in_the_manifest_in_row_order(tiny):
    cfg, paths, summary, manifest = tiny
    task = LumbarTask()
    studies = crops.list_studies(task, paths.data_dir, ["train", "test"])
    assert len(studies) == N_TRAIN + N_TEST
    assert manifest["row_id"].tolist() == task.row_ids(studies["study_id"])
    assert len(manifest) == 25 * (N_TRAIN + N_TEST) == summary["rows"]
    assert set(manifest["condition"]) == set(CONDITIONS) and set(manifest["level"]) == set(LEVELS)
    assert (manifest.groupby("study_id")["array_index"].apply(list) == [list(range(25))] * 7).all()


def test_arrays_have_the_right_shape_and_content(tiny):
    cfg, paths, _, manifest = tiny
    shape = (25, cfg.crop.n_slices, cfg.crop.pixels, cfg.crop.pixels)
    for (split, study), m in manifest.groupby(["split", "study_id"]):
        for view in crops.VIEWS:
            arr = np.load(paths.crop_array(split, study, view))
            assert arr.shape == shape and arr.dtype == np.float16
            present = ~m[f"{view}_missing"].to_numpy()
            assert np.all(arr[~present] == 0)
            assert np.all(arr[present].max(axis=(1, 2, 3)) > 0.1)  # not blank
            assert np.isfinite(arr.astype(np.float32)).all()


def test_missing_series_and_points_are_flagged_never_dropped(tiny):
    _, paths, _, manifest = tiny
    test = manifest[manifest["split"] == "test"]
    by_study = test.groupby("study_id")
    no_axial = [s for s, m in by_study if m["ax_missing"].all()]
    assert len(no_axial) == 1
    m = test[test["study_id"] == no_axial[0]]
    assert set(m["ax_reason"]) == {"no Axial T2 series"} and not m["sag_missing"].any()
    foraminal = test[test["condition"].str.contains("foraminal")]
    no_t1 = [s for s, m in foraminal.groupby("study_id") if m["sag_missing"].all()]
    assert len(no_t1) == 1  # stage 02 places no foramen without a T1 series: both views flagged
    m = foraminal[foraminal["study_id"] == no_t1[0]]
    assert m["sag_reason"].str.endswith("narrowing point").all() and m["ax_missing"].all()
    train = manifest[manifest["split"] == "train"]  # train rows miss only where a label is missing
    assert (train["ax_missing"] == train["sag_missing"]).all() and 0 < train["ax_missing"].sum() <= 6


def test_manifest_records_where_each_crop_came_from(tiny):
    cfg, _, _, manifest = tiny
    ax = manifest[~manifest["ax_missing"]]
    assert (ax["ax_slices"].apply(len) == cfg.crop.n_slices).all()
    assert (ax["ax_index"] == ax["ax_slices"].apply(lambda s: s[len(s) // 2])).all()
    assert (ax["ax_box_mm"] == cfg.crop.size_mm).all() and ax["ax_inside"].all()
    assert ax["ax_plane_mm"].max() < 3.0
    assert set(manifest.loc[manifest["split"] == "train", "point_source"]) <= {"label", ""}
    # a recess with its own point is cropped there (its axial plane is its own slice); one without falls
    # back to the canal point moved by the fixed offset (left is +x), and says so
    recess = manifest[manifest["condition"] == "left_subarticular_stenosis"].set_index(["study_id", "level"])
    spinal = manifest[manifest["condition"] == "spinal_canal_stenosis"].set_index(["study_id", "level"])
    own = recess[(recess["point_fallback"] == "") & (recess["point_source"] != "")]
    assert len(own) and (own["ax_plane_mm"] < 0.5).all()
    fell = recess[recess["point_fallback"] != ""]
    shift = fell["x_mm"] - spinal.loc[fell.index, "x_mm"]
    assert shift.to_numpy() == pytest.approx(np.full(len(fell), cfg.crop.recess_offset_mm))


def test_within_3mm_share_is_reported_and_high_with_label_points(tiny):
    _, paths, summary, _ = tiny
    report = json.loads(paths.crop_report.read_text())
    for split in ("train", "test"):
        assert report[split]["ax_truth_plane_mm"]["n"] > 0
        assert report[split]["ax_within_3mm_share"] > 0.8
    assert "train_ax_within_3mm_share" in summary
    assert report["test"]["ax_missing_reasons"]["no Axial T2 series"] == 25


def test_rerun_skips_done_studies_and_recrops_a_study_whose_points_changed(tiny):
    cfg, paths, first, manifest = tiny
    again = crops.run_crops(cfg)
    assert again["studies_cropped"] == 0 and again["studies_skipped_done"] == N_TRAIN + N_TEST
    pts = pd.read_csv(paths.points)
    moved = pts["study_id"] == pts.loc[pts["split"] == "test", "study_id"].iloc[0]
    pts.loc[moved & (pts["condition"] == "spinal_canal_stenosis"), "z_mm"] += 1.0
    save_table(paths.points, pts)
    third = crops.run_crops(cfg)
    assert third["studies_cropped"] == 1
    assert pd.read_parquet(paths.crop_manifest)["row_id"].tolist() == manifest["row_id"].tolist()


def _make_fallback_points(paths: Paths) -> None:
    """Drop one test study's recess points, so its subarticular rows fall back to the fixed offset."""
    pts = pd.read_csv(paths.points)
    study = pts.loc[pts["split"] == "test", "study_id"].iloc[0]
    drop = (pts["study_id"] == study) & pts["condition"].str.contains("subarticular")
    save_table(paths.points, pts[~drop])


def test_a_row_without_its_recess_point_falls_back_to_the_offset_and_is_counted(tiny):
    cfg, paths, _, _ = tiny
    _make_fallback_points(paths)
    crops.run_crops(cfg)
    report = json.loads(paths.crop_report.read_text())["test"]["recess_points"]
    assert (
        report["fixed_offset"] > 0 and sum(report["fixed_offset_reasons"].values()) == report["fixed_offset"]
    )
    assert report["own_point"] + report["fixed_offset"] + report["no_point"] == report["rows"]


# --- bad input: stages 02 and 03 keep going, with reasons -----------------------------------------


def _break_test_studies(data) -> dict:
    """Damage the test split of a generated set in every way the stages must survive; returns which
    study got what. Each case hits a different test study."""
    import shutil

    desc = pd.read_csv(data / "test_series_descriptions.csv")
    studies = sorted(desc["study_id"].unique())
    cases = dict(zip(["no_folder", "failed_series", "one_slice", "unknown", "unreadable"], studies))
    shutil.rmtree(data / "test_images" / str(cases["no_folder"]))
    first = lambda study, kind: desc[(desc["study_id"] == study) & (desc["series_description"] == kind)]
    failed = first(cases["failed_series"], "Sagittal T2/STIR")["series_id"].iloc[0]
    for f in (data / "test_images" / str(cases["failed_series"]) / str(failed)).glob("*.dcm"):
        f.write_bytes(b"not a dicom")
    one = first(cases["one_slice"], "Axial T2")["series_id"].iloc[0]
    for f in sorted((data / "test_images" / str(cases["one_slice"]) / str(one)).glob("*.dcm"))[1:]:
        f.unlink()
    desc.loc[desc["study_id"] == cases["unknown"], "series_description"] = "Sagittal T1 FLAIR (new)"
    desc.to_csv(data / "test_series_descriptions.csv", index=False)
    for f in (data / "test_images" / str(cases["unreadable"])).rglob("*.dcm"):
        f.write_bytes(b"")
    return cases


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    generate("lumbar", root / "data", 4, 5, 23, image_size=SIZE)
    cases = _break_test_studies(root / "data")
    over = [
        f"data_dir={root / 'data'}",
        f"out_dir={root / 'out'}",
        "num_workers=1",
        "folds.n_folds=2",
        "localize.epochs=1",
        "localize.axial.epochs=1",
        "localize.image_size=64",
        "localize.backbone=resnet10t",
    ]
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over)
    run_preprocess(cfg)
    run_localize(cfg)
    summary = crops.run_crops(cfg)
    return cfg, cases, summary, pd.read_parquet(Paths.from_config(cfg).crop_manifest)


def test_broken_test_studies_keep_their_rows_with_a_reason(broken):
    cfg, cases, summary, manifest = broken
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 25 * 5 and summary["rows"] == len(manifest)
    for study in (cases["no_folder"], cases["unreadable"], cases["unknown"]):
        m = test[test["study_id"] == study]
        assert m["sag_missing"].all() and m["ax_missing"].all()
        assert (m["sag_reason"] != "").all() and (m["ax_reason"] != "").all()
    for study in (cases["no_folder"], cases["unreadable"]):
        assert set(test.loc[test["study_id"] == study, "ax_reason"]) == {crops.NO_SERIES}
    report = json.loads(Paths.from_config(cfg).crop_report.read_text())["test"]
    assert report["studies_without_series"] >= 2
    # a failed Sagittal T2: no canal point, so its canal rows say so; its foramina are still cropped
    m = test[test["study_id"] == cases["failed_series"]]
    assert m.loc[m["condition"] == "spinal_canal_stenosis", "sag_missing"].all()
    assert not m.loc[m["condition"].str.contains("foraminal"), "sag_missing"].all()
    # a one-slice axial series still gives axial crops (its edge slice repeated)
    m = test[(test["study_id"] == cases["one_slice"]) & ~test["ax_missing"]]
    assert len(m) and (m["ax_clamped"] > 0).any()


def test_stage_06_localize_and_crop_survive_the_broken_studies(broken, tmp_path):
    from spine.lumbar.localize import predict_test

    cfg, cases, _, _ = broken
    summary = predict_test(cfg)
    assert summary["studies"] <= 5
    pts = pd.read_csv(Paths.from_config(cfg).points)
    assert not pts["study_id"].isin([cases["no_folder"], cases["unreadable"]]).any()
