"""Stage 02 (cervical): masks aligned to the cached stacks by geometry, and a tiny end-to-end run."""

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from spine.cervical import ct
from spine.cervical.segment import (
    SLICE_COLUMNS,
    VERTEBRA_COLUMNS,
    TrainVolumes,
    align_mask,
    aligned_mask,
    augment,
    bone_share,
    convention_mask,
    geometries,
    neck_classes,
    neck_extent,
    planes_path,
    predict_test,
    run_segment,
    study_items,
)
from spine.cervical.task import VERTEBRAE
from spine.core.config import REPO_ROOT, load_config
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.stacks import StackGeometry
from spine.core.synth import generate
from tiny import SEGMENT_TINY

CONFIG = REPO_ROOT / "configs/cervical/demo.yaml"
TINY = SEGMENT_TINY


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """6 train (3 with a mask) + 2 test studies (one missing) of 32 slices of 40², through stage 01."""
    root = tmp_path_factory.mktemp("segment")
    generate("cervical", root / "data", 6, 2, seed=2, image_size=40, n_slices=32)
    over = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY]
    run_preprocess(load_config(CONFIG, over))
    return root, over


def _truth(root) -> pd.DataFrame:
    return pd.read_csv(root / "data_truth" / "vertebrae.csv", dtype={"study_id": str})


def _naive(nifti) -> np.ndarray:
    """The mistake the real masks invite: reading the voxel axes as (col, row, slice) reversed."""
    return np.asanyarray(nib.load(str(nifti)).dataobj).transpose(2, 1, 0)


def _spans_match(mask, z, truth: pd.DataFrame) -> bool:
    """Every vertebra's slices on ``mask`` (z in mm) are exactly the truth's span (where cached)."""
    for r in truth.itertuples():
        on = (
            z[(mask == VERTEBRAE.index(r.vertebra) + 1).reshape(len(mask), -1).any(1)]
            if r.vertebra in VERTEBRAE
            else None
        )
        if on is None:
            continue
        expect = z[(z >= r.z_min_mm - 1e-3) & (z <= r.z_max_mm + 1e-3)]
        if len(on) == 0 or not (np.isclose(on.min(), expect.min()) and np.isclose(on.max(), expect.max())):
            return False
    return True


def test_masks_align_by_geometry(cached):
    root, over = cached
    paths = Paths.from_config(load_config(CONFIG, over))
    geos = geometries(paths)
    truth = _truth(root)
    segmented = [it for it in study_items(paths) if it.mask is not None]
    assert len(segmented) == 3
    orders = pd.read_json(root / "data_truth" / "summary.json", typ="series")["quirks"]["instance_order"]
    assert {orders[it.study_id] for it in segmented} == {"head_first", "feet_first"}  # both layouts met
    for it in segmented:
        geo = geos[(it.study_id, it.series_id, it.stack)]
        z = geo.ipp[:, 2]
        stack = ct.CTStack(paths.cache_dir / it.path)
        aligned = aligned_mask(it.mask, geo, it.shape, stack, 0.5)
        mask = aligned.labels
        t = truth[truth["study_id"] == it.study_id]
        assert _spans_match(mask, z, t), it.study_id  # slice spans: exactly the truth's
        for r in t[t["vertebra"].isin(VERTEBRAE)].itertuples():  # left-right centre of each vertebra
            rows, cols = np.nonzero((mask == VERTEBRAE.index(r.vertebra) + 1).any(0))
            x_mm = geo.ipp[0, 0] + cols.mean() * geo.spacing[0, 1]
            assert abs(x_mm - r.cx_mm) < 3.0, (it.study_id, r.vertebra)
        assert aligned.share > 0.9  # the mask lies on bone
        if aligned.method == "convention":  # a dishonest header: the fixed rule fixed it
            assert not aligned.header_share > 0.5
            continue
        # the same mask stored in another axis order and flips (its affine adjusted) aligns the same
        img = nib.load(str(it.mask))
        other = img.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))
        nib.save(other, root / "reoriented.nii")
        np.testing.assert_array_equal(align_mask(root / "reoriented.nii", geo, it.shape), mask)
        # ignoring the affine flips the mask: it leaves the bone or lands on the wrong slices
        naive = _naive(it.mask)
        if naive.shape == mask.shape:
            flipped = bone_share(naive, stack) < 0.6 or not _spans_match(naive, z, t)
            assert flipped, it.study_id


def _tiny_case(tmp_path, z_falls: bool):
    """A 6-slice stack of 8 x 10 pixels with a bone block, and its mask stored as the real files are:
    axes (column, row, slice), the slice axis ascending patient z, the row axis reversed, with an
    identity affine that says nothing true. ``z_falls``: the stack's cached order runs downwards."""
    n, rows, cols = 6, 8, 10
    hu = np.full((n, rows, cols), -1000, dtype=np.int16)
    hu[1:4, 2:5, 3:7] = 700
    labels = np.zeros((n, rows, cols), dtype=np.uint8)
    labels[1:4, 2:5, 3:7] = 3  # C3 on the bone
    z = np.arange(n, dtype=float) * 1.25
    if z_falls:
        z = z[::-1]
    np.save(tmp_path / "hu.npy", hu)
    ascending = labels[np.argsort(z)]  # (slice ascending z, row, col)
    stored = ascending[:, ::-1].transpose(2, 1, 0)  # real layout: (col, row, slice), rows reversed
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), np.eye(4)), tmp_path / "m.nii")
    ipp = np.stack([np.full(n, -5.0), np.full(n, -4.0), z], 1)
    iop = np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1))
    geo = StackGeometry(ipp, iop, np.ones((n, 2)))
    return tmp_path / "m.nii", geo, ct.CTStack(tmp_path / "hu.npy"), labels


@pytest.mark.parametrize("z_falls", [False, True])
def test_dishonest_header_falls_back_to_the_convention(tmp_path, z_falls):
    nifti, geo, stack, labels = _tiny_case(tmp_path, z_falls)
    np.testing.assert_array_equal(convention_mask(nifti, geo, labels.shape), labels)
    got = aligned_mask(nifti, geo, labels.shape, stack, min_share=0.5)
    assert got.method == "convention" and got.share == 1.0 and not got.header_share >= 0.5
    np.testing.assert_array_equal(got.labels, labels)
    # an honest header (voxel -> RAS of the stored layout) keeps the header path and the same mask
    img = nib.load(str(nifti))
    rows = labels.shape[1]
    z0 = geo.ipp[:, 2].min()
    affine = np.array(  # i = col, j = reversed row, k = ascending slice; RAS = (-LPS x, -LPS y, z)
        [[-1.0, 0, 0, 5.0], [0, 1.0, 0, 4.0 - (rows - 1)], [0, 0, 1.25, z0], [0, 0, 0, 1]]
    )
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), tmp_path / "honest.nii")
    got = aligned_mask(tmp_path / "honest.nii", geo, labels.shape, stack, min_share=0.5)
    assert got.method == "header" and got.share == 1.0
    np.testing.assert_array_equal(got.labels, labels)


def test_augment_keeps_labels_on_their_voxels():
    """With no rotation, zoom or shift, augmentation changes intensities only, never labels."""
    from omegaconf import OmegaConf

    sc = OmegaConf.create({"rotate_deg": 0.0, "scale": 0.0, "shift": 0.0})
    x = torch.rand(2, 2, 8, 8, 8)
    y = torch.randint(0, 9, (2, 8, 8, 8))
    xa, ya = augment(x, y, sc, torch.Generator().manual_seed(0))
    assert torch.equal(ya, y) and xa.shape == x.shape
    sc = OmegaConf.create({"rotate_deg": 10.0, "scale": 0.1, "shift": 0.05})
    _, ya = augment(x, y, sc, torch.Generator().manual_seed(0))
    assert set(ya.unique().tolist()) <= set(range(9))


def test_stage_02_tables_resume_and_test_inference(cached, tmp_path):
    root, over = cached
    cfg = load_config(CONFIG, over)
    paths = Paths.from_config(cfg)
    report = run_segment(cfg)
    folds = pd.read_csv(paths.folds, dtype={"study_id": str})
    items = study_items(paths)
    segmented = {it.study_id for it in items if it.mask is not None}
    assert folds[folds["study_id"].isin(segmented)]["fold"].nunique() == 2  # every fold holds one out

    vert = pd.read_csv(paths.vertebrae, dtype={"study_id": str, "series_id": str})
    assert list(vert.columns) == VERTEBRA_COLUMNS
    assert vert.groupby(["split", "study_id"]).size().eq(7).all() and len(vert) == 7 * 8
    assert set(vert.loc[vert["study_id"].isin(segmented), "source"]) == {"oof"}
    assert set(vert.loc[~vert["study_id"].isin(segmented), "source"]) == {"fold_mean"}
    missing = [it.study_id for it in items if it.path is None]
    assert len(missing) == 1 and not vert.loc[vert["study_id"] == missing[0], "found"].any()
    found = vert[vert["found"]]
    assert (found["slice_start"] <= found["slice_end"]).all() and (
        found["row_start"] <= found["row_end"]
    ).all()

    slices = pd.read_parquet(paths.slice_labels)
    assert list(slices.columns) == SLICE_COLUMNS
    n_slices = {it.study_id: it.shape[0] for it in items if it.path is not None}
    assert slices.groupby("study_id").size().to_dict() == n_slices
    assert slices[VERTEBRAE].to_numpy().min() >= 0 and slices[VERTEBRAE].to_numpy().max() <= 1

    assert set(report["dice_oof"]["per_vertebra"]) <= set(VERTEBRAE) and report["dice_oof"]["studies"] == 3
    assert set(report["dice_oof"]["found_rate"]) == set(report["dice_oof"]["per_vertebra"])
    align = report["mask_alignment"]
    assert align["studies"] == 3 and align["min_share_kept"] > 0.9 and "summary" in report
    assert {s["kept"] for s in align["per_study"].values()} <= {"header", "convention"}
    assert all(planes_path(paths, s).exists() for s in n_slices)  # the overlays' mid planes
    assert report["truth_agreement"] is not None  # generated data: spans compared with the truth
    assert paths.localize_report.exists() and (paths.localize_dir / "config.yaml").exists()
    # the first pass (neck window): one model per fold, its extent error reported per OOF study
    assert all(paths.segmenter_checkpoint(f, cfg.seed, part="neck").exists() for f in (0, 1))
    assert report["neck_window_error_mm"]["studies"] == 3

    # a rerun trains nothing and keeps the fold-mean predictions
    stamp = paths.segmenter_checkpoint(0, cfg.seed).stat().st_mtime_ns
    mean_stamp = paths.segmenter_mean_predictions.stat().st_mtime_ns
    again = run_segment(cfg)
    assert (
        again["folds_trained"] == [] and paths.segmenter_checkpoint(0, cfg.seed).stat().st_mtime_ns == stamp
    )
    assert paths.segmenter_mean_predictions.stat().st_mtime_ns == mean_stamp
    # a fold retrained since (its checkpoint rewritten) remakes them
    os.utime(paths.segmenter_checkpoint(0, cfg.seed), ns=(stamp + 10**9, stamp + 10**9))
    run_segment(cfg)
    assert paths.segmenter_mean_predictions.stat().st_mtime_ns != mean_stamp

    # stage 06: the test split of another out_dir, the models read from the first
    out2 = [
        *over,
        f"out_dir={tmp_path / 'predict'}",
        f"models_from={root / 'out'}",
        "preprocess.splits=[test]",
    ]
    cfg2 = load_config(CONFIG, out2)
    run_preprocess(cfg2)
    summary = predict_test(cfg2)
    test = pd.read_csv(Paths.from_config(cfg2).vertebrae, dtype={"study_id": str})
    assert list(test.columns) == VERTEBRA_COLUMNS and set(test["source"]) == {"test_mean"}
    assert set(test["split"]) == {"test"} and test.groupby("study_id").size().eq(7).all()
    assert summary["studies"] == 2 and summary["studies_without_volume"] == 1
    assert (
        len(pd.read_parquet(Paths.from_config(cfg2).slice_labels))
        == n_slices[next(s for s in test["study_id"].unique() if s in n_slices)]
    )
    with pytest.raises(FileNotFoundError, match="segmenter checkpoint"):
        predict_test(load_config(CONFIG, [*out2, f"models_from={tmp_path / 'nothing'}"]))


def test_numba_alignment_matches_numpy_on_a_stored_mask(tmp_path):
    """The numba kernel of align_mask against bench/align_mask.py's plain numpy version, on a mask
    stored as the real files are (axes (col, row, slice), flipped): same array, the labels recovered."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_align", REPO_ROOT / "bench/align_mask.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path, geo, labels = bench.full_size_case(tmp_path, 40, 64)
    fast = align_mask(path, geo, labels.shape)
    np.testing.assert_array_equal(fast, bench.align_mask_numpy(path, geo, labels.shape))
    np.testing.assert_array_equal(fast, labels)
    assert len(np.unique(labels)) == 9  # background and the 8 boxes all present


def test_order_counts_confused_vertebrae_down_the_neck():
    """Seven separate bone pieces in a column: the model calls the top two C1 and C2 and every other
    one C4 (the look-alike C3..C7); the order relabelling counts them down: C1..C7, top to bottom."""
    from spine.cervical.segment import order_components

    labels = np.zeros((70, 6, 6), dtype=np.uint8)
    said = [1, 2, 4, 4, 4, 4, 4]
    for i, lab in enumerate(said):  # piece i on slices 10 i .. 10 i + 7 (a 2-slice gap: the disc)
        labels[10 * i : 10 * i + 8, 1:5, 1:5] = lab
    z = -np.arange(70, dtype=float)  # slice 0 is the top (head)
    out = order_components(labels, z, head=1)
    got = [int(out[10 * i + 3, 2, 2]) for i in range(7)]
    assert got == [1, 2, 3, 4, 5, 6, 7]
    # the same stack stored feet first (slices and positions reversed): the same labels
    flipped = order_components(labels[::-1].copy(), z[::-1].copy(), head=1)
    assert [int(flipped[69 - (10 * i + 3), 2, 2]) for i in range(7)] == got
    # positions that grow toward the feet (a slice normal pointing down), and a header that cannot
    # tell (head 0: the votes decide)
    assert [int(order_components(labels, -z, head=-1)[10 * i + 3, 2, 2]) for i in range(7)] == got
    assert [int(order_components(labels, z, head=0)[10 * i + 3, 2, 2]) for i in range(7)] == got


def test_a_vertebra_in_two_pieces_is_counted_once():
    """At full resolution a vertebra may fall apart into pieces side by side (its halves, or its arch
    and body) that span the same slices: counted as two, they pushed every vertebra below one down. C1's
    ring around the dens lies within C2's slices but spans a third of them, and stays apart."""
    from spine.cervical.segment import order_components

    labels = np.zeros((70, 6, 8), dtype=np.uint8)
    labels[0:5, 1:5, 1:3] = 1  # C1's ring: within C2's slices (the dens rises into it), a third of them
    labels[0:15, 1:5, 4:6] = 2  # C2 with its dens
    for i in range(5):  # C3..C7, each 8 slices and a 2-slice gap, all called the look-alike C4
        labels[17 + 10 * i : 25 + 10 * i, 1:5, 4:6] = 4
    labels[17:25, 1:5, 1:3] = 4  # C3's other half beside it, on the same slices
    z = -np.arange(70, dtype=float)
    out = order_components(labels, z, head=1)
    assert int(out[2, 2, 1]) == 1 and int(out[10, 2, 4]) == 2
    assert int(out[20, 2, 1]) == 3 and int(out[20, 2, 4]) == 3  # both halves C3
    assert [int(out[17 + 10 * i + 3, 2, 4]) for i in range(5)] == [3, 4, 5, 6, 7]


def test_the_header_not_the_votes_says_where_the_head_is():
    """Real-reach CT: the skull base, one large bone piece above C1 that an unsure model calls thorax,
    outvoted the neck when both directions were tried, and the column was numbered from T1 up. The
    header's head direction keeps C1..C7 from the top (the skull piece gets no cervical label)."""
    from spine.cervical.segment import head_direction, order_components

    labels = np.zeros((130, 6, 6), dtype=np.uint8)
    labels[0:48, 1:5, 1:5] = 8  # the skull base: six vertebrae's worth, voted thorax
    said = [1, 2, 3, 4, 5, 6, 7]
    for i, lab in enumerate(said):
        labels[50 + 10 * i : 58 + 10 * i, 1:5, 1:5] = lab
    z = -np.arange(130, dtype=float)  # slice 0 is the top (head)
    assert head_direction([1, 0, 0, 0, 1, 0]) == 1  # axial: the normal is DICOM's +z, the head
    assert head_direction([1, 0, 0, 0, -1, 0]) == -1
    assert head_direction([0, 1, 0, 0, 0, -1]) == 0  # sagittal slices: no head direction along them
    by_votes = order_components(labels, z, head=0)
    assert int(by_votes[53, 2, 2]) != 1  # both directions tried: the big piece's votes win, wrongly
    by_header = order_components(labels, z, head=1)
    assert [int(by_header[50 + 10 * i + 3, 2, 2]) for i in range(7)] == said
    assert int(by_header[20, 2, 2]) in (0, 8)  # never a cervical label above C1


def test_neck_window_cuts_training_volumes_and_is_found_on_the_grid():
    """The fine pass trains on the C1..C7 planes plus a random margin; the first pass's extent is the
    z span (mm) of its largest C1..C7 piece."""
    y = np.zeros((40, 4, 4), dtype=np.int64)
    y[10:15, 1:3, 1:3] = 1  # C1
    y[15:25, 1:3, 1:3] = 5  # down to a "C5"
    y[28:35, 1:3, 1:3] = 8  # thorax
    x = np.broadcast_to((np.arange(40, dtype=np.float32) + 1)[None, :, None, None], (2, 40, 4, 4)).copy()
    data = TrainVolumes([(x, y)], depth=40, air=np.zeros(2), seed=0, margin=(2, 4))
    above, below = set(), set()
    for _ in range(40):
        planes = np.unique(data[0]["x"][0].numpy())  # the source plane number of every plane kept
        planes = planes[planes > 0].astype(int) - 1
        assert (np.diff(planes) == 1).all()  # one contiguous cut
        above.add(10 - planes[0])
        below.add(planes[-1] - 24)
    assert above == {2, 3, 4} and below == {2, 3, 4}  # C1..C5 planes 10..24 plus 2-4 planes each side

    probs = torch.zeros((3, 40, 4, 4))  # the first pass: background, cervical, thoracic
    probs[0] = 1.0
    probs[0, 12:20, 1:3, 1:3], probs[1, 12:20, 1:3, 1:3] = 0.0, 1.0  # the neck on planes 12..19
    probs[0, 30, 0, 0], probs[1, 30, 0, 0] = 0.0, 1.0  # a stray voxel: not the largest piece
    probs[0, 33:38], probs[2, 33:38] = 0.0, 1.0  # thorax
    field = type("F", (), {"grid_z": np.arange(40) * 2.0 + 100.0})()
    assert neck_extent(probs, field) == (100.0 + 24 - 1, 100.0 + 38 + 1)
    assert neck_extent(torch.zeros((3, 5, 2, 2)).index_fill_(0, torch.tensor([0]), 1.0), field) is None
    y = np.array([0, 1, 4, 7, 8])
    np.testing.assert_array_equal(neck_classes(y), [0, 1, 1, 1, 2])
