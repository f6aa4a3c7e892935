"""The synthetic cervical data set: Kaggle layout, geometry, fracture signal, quirks, truth."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from spine.cervical import synth as cervical
from spine.cervical.task import TARGETS, TRAIN_COLUMNS, VERTEBRAE, CervicalTask
from spine.core import geometry
from spine.core.paths import truth_dir

N_TRAIN, N_TEST, SEED = 5, 3, 7
SIZE = 64
# the quick demo's scan (real slice spacing, C1 to T1), small images; half the train studies masked
SCAN = {"fov_mm": (150, 175), "above_c1_mm": (3, 10), "below_c7_mm": (5, 20), "mask_share": 0.5}
TASK = CervicalTask()


def _make(root: Path, seed: int = SEED) -> dict:
    return cervical.generate(root, N_TRAIN, N_TEST, seed, image_size=SIZE, **SCAN)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cervical") / "data"
    summary = _make(root)
    return root, summary


def _truth(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(truth_dir(root) / f"{name}.csv")


def _folder(root: Path, uid: str) -> Path:
    """The images folder of a study, whichever split it is in."""
    train = root / "train_images" / uid
    return train if train.exists() else root / "test_images" / uid


def _read_study(folder: Path):
    """Readable slices of a study in InstanceNumber order: (datasets, HU volume V[k, r, c])."""
    dsets = []
    for f in folder.glob("*.dcm"):
        try:
            ds = pydicom.dcmread(f)
            ds.pixel_array  # noqa: B018 - a corrupt file fails here
        except Exception:
            continue
        dsets.append(ds)
    dsets.sort(key=lambda d: int(d.InstanceNumber))
    n = max(int(d.InstanceNumber) for d in dsets)
    vol = np.full((n, dsets[0].Rows, dsets[0].Columns), np.nan, dtype=np.float32)
    for d in dsets:
        vol[int(d.InstanceNumber) - 1] = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
    return dsets, vol


def _z_decreases(folder: Path) -> bool:
    """Whether ImagePositionPatient z decreases with the slice number (read from slices 1 and 2)."""
    z = [float(pydicom.dcmread(folder / f"{k}.dcm").ImagePositionPatient[2]) for k in (1, 2)]
    return z[1] < z[0]


def _mask(root: Path, uid: str):
    """The stored mask S, its DICOM-aligned view V (by the published rule) and the NIfTI affine."""
    img = nib.load(root / "segmentations" / f"{uid}.nii")
    s = np.asarray(img.dataobj)
    return s, cervical.dicom_order_from_mask(s, _z_decreases(_folder(root, uid))), img.affine


def _segmented_with(root: Path, summary: dict, visible: bool) -> str:
    """A segmented study whose mask header is honest, with or without a visible fracture."""
    labels = _truth(root, "labels")
    shown = set(labels.loc[labels["visible"] == 1, "study_id"])
    honest = set(summary["quirks"]["segmented"]) - set(summary["quirks"]["identity_affine_masks"])
    for uid in summary["quirks"]["segmented"]:
        if (uid in shown) == visible and uid in honest:
            return uid
    raise AssertionError("no segmented study of the kind asked for")


def test_kaggle_files_columns_and_counts(data):
    root, summary = data
    train = pd.read_csv(root / "train.csv")
    assert list(train.columns) == TRAIN_COLUMNS and len(train) == N_TRAIN
    assert (train["patient_overall"] == train[VERTEBRAE].max(axis=1)).all()
    test = pd.read_csv(root / "test.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    uids = test["StudyInstanceUID"].drop_duplicates().tolist()
    assert len(uids) == N_TEST and len(test) == 8 * N_TEST
    assert (test["row_id"] == test["StudyInstanceUID"] + "_" + test["prediction_type"]).all()
    sub = pd.read_csv(root / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["fractured"] == 0.5).all()
    assert sub["row_id"].tolist() == TASK.row_ids(uids) == test["row_id"].tolist()
    assert all(u.startswith("1.2.826.0.1.3680043.") for u in [*train["StudyInstanceUID"], *uids])
    boxes = pd.read_csv(root / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    fractured = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    assert len(boxes) and set(boxes["StudyInstanceUID"]) <= fractured
    for uid, slice_number in boxes[["StudyInstanceUID", "slice_number"]].itertuples(index=False):
        assert (root / "train_images" / uid / f"{slice_number}.dcm").exists()
    masks = sorted(p.stem for p in (root / "segmentations").glob("*.nii"))
    assert len(masks) >= 3 and set(masks) <= set(train["StudyInstanceUID"])


def test_truth_tables_match_kaggle_files(data):
    root, summary = data
    labels = _truth(root, "labels")
    assert len(labels) == 8 * (N_TRAIN + N_TEST) and set(labels["target"]) == set(TARGETS)
    sol = _truth(root, "test_solution")
    test_labels = labels[labels["split"] == "test"]
    assert sol["row_id"].tolist() == pd.read_csv(root / "test.csv")["row_id"].tolist()
    assert (sol["fractured"].to_numpy() == test_labels["label"].to_numpy()).all()
    assert np.allclose(sol["sample_weight"], TASK.row_weights(sol))
    train = pd.read_csv(root / "train.csv")
    train_long = TASK.labels_long(train)
    merged = train_long.merge(labels, on="row_id")
    assert len(merged) == 8 * N_TRAIN and (merged["label_x"] == merged["label_y"]).all()
    # a visible fracture makes its vertebra certain (unless the study cannot be read at all)
    seen = ~labels["study_id"].isin(summary["quirks"]["missing_test_studies"])
    vis = labels[(labels["visible"] == 1) & seen]
    assert len(vis) and np.allclose(vis["bayes_fractured"], 1.0)


def test_vertebra_centre_is_bone_in_dicom_and_mask(data):
    root, summary = data
    uid = _segmented_with(root, summary, visible=True)
    labels = _truth(root, "labels").set_index("row_id")
    verts = _truth(root, "vertebrae")
    verts = verts[(verts["study_id"] == uid) & verts["vertebra"].isin(VERTEBRAE[2:])]
    dsets, hu = _read_study(root / "train_images" / uid)
    s, v_mask, affine = _mask(root, uid)
    assert s.shape == (hu.shape[2], hu.shape[1], hu.shape[0]) and v_mask.shape == hu.shape
    ipp = np.array([d.ImagePositionPatient for d in dsets], dtype=float)
    iop, spacing = dsets[0].ImageOrientationPatient, np.array(dsets[0].PixelSpacing, dtype=float)
    dz = np.diff(np.sort(ipp[:, 2])).max()
    descending = _z_decreases(root / "train_images" / uid)
    checked = 0
    for row in verts.itertuples():
        if labels.loc[f"{uid}_{row.vertebra}", "visible"] == 1:
            continue  # a cleft may run through the centre
        centre = np.array([row.cx_mm, row.cy_mm, row.cz_mm])
        j, dist = geometry.nearest_slice(centre, ipp, iop)
        assert dist <= dz / 2 + 1e-6
        r, c, _ = geometry.patient_to_pixel(centre, ipp[j], iop, spacing)
        k, r, c = int(dsets[j].InstanceNumber) - 1, int(round(float(r))), int(round(float(c)))
        assert np.median(hu[k, r - 1 : r + 2, c - 1 : c + 2]) > 200
        label = cervical.NAMES.index(row.vertebra) + 1
        assert v_mask[k, r, c] == label
        k_asc = hu.shape[0] - 1 - k if descending else k  # the mask's slice axis runs in ascending z
        voxel = np.array([c, hu.shape[1] - 1 - r, k_asc, 1.0])
        assert s[tuple(voxel[:3].astype(int))] == label
        lps = np.array([ipp[j, 0] + c * spacing[1], ipp[j, 1] + r * spacing[0], ipp[j, 2]])
        ras = (affine @ voxel)[:3]
        assert np.allclose(ras, lps * [-1, -1, 1], atol=1e-3)
        assert np.all(np.abs(ras - centre * [-1, -1, 1]) <= [spacing[1], spacing[0], dz])
        checked += 1
    assert checked >= 2


def test_visible_fracture_leaves_soft_tissue_inside_the_vertebra(data):
    root, summary = data
    uid = _segmented_with(root, summary, visible=True)
    labels = _truth(root, "labels")
    labels = labels[labels["study_id"] == uid].set_index("target")
    _, hu = _read_study(root / "train_images" / uid)
    _, v_mask, _ = _mask(root, uid)
    ok = ~np.isnan(hu)  # skip a corrupt slice
    soft = {i + 1: int(((v_mask == i + 1) & ok & (hu < 100)).sum()) for i in range(len(VERTEBRAE))}
    shown = [i + 1 for i, t in enumerate(VERTEBRAE) if labels.loc[t, "visible"] == 1]
    intact = [i + 1 for i, t in enumerate(VERTEBRAE) if labels.loc[t, "visible"] == 0]
    assert shown and intact
    assert all(soft[v] >= 5 for v in shown), soft
    assert all(soft[v] <= 2 for v in intact), soft


def test_pixel_storage_conventions_and_hu(data):
    root, summary = data
    seen = set()
    for uid, storage in summary["quirks"]["storage"].items():
        ds = pydicom.dcmread(_folder(root, uid) / "1.dcm")
        dtype, intercept = cervical.STORAGES[storage]
        assert ds.pixel_array.dtype == dtype and float(ds.RescaleIntercept) == intercept
        assert ds.PixelRepresentation == int(dtype == np.int16)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.all(hu == np.round(hu))
        assert -1024 <= hu[:4, :4].mean() <= -950  # air in the corner
        seen.add((ds.pixel_array.dtype.name, intercept))
    assert seen == {("uint16", -1024.0), ("int16", 0.0), ("int16", -1024.0)}


def test_compressed_syntaxes_instance_order_corrupt_and_missing(data):
    root, summary = data
    q = summary["quirks"]
    want = {"rle": RLELossless, "j2k": JPEG2000Lossless}
    placed = {syn: uid for uid, syn in q["syntax"].items() if syn in want}
    assert set(placed) == set(want)
    for syn, uid in placed.items():
        ds = pydicom.dcmread(_folder(root, uid) / "2.dcm")
        assert ds.file_meta.TransferSyntaxUID == want[syn] and ds.pixel_array.shape == (SIZE, SIZE)
    assert set(q["instance_order"].values()) == {"head_first", "feet_first"}
    for uid, order in q["instance_order"].items():
        z = [float(pydicom.dcmread(_folder(root, uid) / f"{k}.dcm").ImagePositionPatient[2]) for k in (3, 4)]
        assert (z[0] > z[1]) == (order == "head_first")
    assert sorted(p.split("/")[0] for p in q["corrupt_files"]) == ["test_images", "train_images"]
    for rel in q["corrupt_files"]:
        with pytest.raises(Exception):  # noqa: B017 - any failure to read counts
            pydicom.dcmread(root / rel).pixel_array  # noqa: B018
    missing = q["missing_test_studies"]
    test_uids = set(pd.read_csv(root / "test.csv")["StudyInstanceUID"])
    assert len(missing) == 1 and missing[0] in test_uids and not (root / "test_images" / missing[0]).exists()
    assert len(list((root / "test_images").iterdir())) == N_TEST - 1


def test_bayes_beats_prior(data):
    _, summary = data
    for split in ("train", "test"):
        scores = summary["scores"][split]
        assert scores["bayes"]["score"] < scores["prior"]["score"]


def test_bayes_posterior_matches_sampling():
    post = cervical.bayes_probabilities(set())
    assert post[-1] < cervical.P_FRACTURED and np.all(post[:-1] < post[-1])
    prior = cervical.bayes_probabilities(None)
    assert prior[-1] == pytest.approx(cervical.P_FRACTURED)
    assert cervical.bayes_probabilities({5})[[5, 7]] == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(0)
    draws = [cervical._draw_pattern(rng) for _ in range(20000)]
    unseen = [frac for frac, vis in draws if not vis]
    freq = [np.mean([i in f for f in unseen]) for i in range(7)] + [np.mean([bool(f) for f in unseen])]
    assert np.allclose(freq, post, atol=0.01)


def test_same_seed_same_data(data, tmp_path):
    root, summary = data
    again = tmp_path / "again"
    _make(again)
    for name in ("train.csv", "train_bounding_boxes.csv", "test.csv"):
        assert (again / name).read_bytes() == (root / name).read_bytes()
    for name in ("labels.csv", "vertebrae.csv"):
        assert (truth_dir(again) / name).read_bytes() == (truth_dir(root) / name).read_bytes()
    # uncompressed files are byte-identical (compression gives each file a fresh SOPInstanceUID)
    uid = next(u for u, syn in summary["quirks"]["syntax"].items() if syn == "explicit")
    for k in (1, 2):
        rel = (_folder(root, uid) / f"{k}.dcm").relative_to(root)
        assert (again / rel).read_bytes() == (root / rel).read_bytes()


def test_slice_spacing_and_count_vary_between_studies(data):
    root, summary = data
    spacings, counts = [], []
    for uid in summary["quirks"]["instance_order"]:
        dsets, hu = _read_study(_folder(root, uid))
        z = np.sort([float(d.ImagePositionPatient[2]) for d in dsets])
        step = np.median(np.diff(z))
        assert 0.5 - 1e-3 <= step <= 1.25 + 1e-3 and float(dsets[0].SliceThickness) == pytest.approx(
            step, abs=1e-3
        )
        spacings.append(step)
        counts.append(hu.shape[0])
    assert max(spacings) - min(spacings) > 0.2  # a model gridded by slice index would see other scales
    assert min(counts) >= 100 and max(counts) > min(counts)
    lo, hi = summary["counts"]["train"]["slice_spacing_mm"]
    assert 0.5 <= lo < hi <= 1.25


def test_default_scan_is_the_real_one():
    """Without demo keys a study spans the skull base to the upper thorax: hundreds of slices of 512²,
    0.5-1.25 mm apart (drawn without rendering a pixel)."""
    plan = cervical.StudyPlan("1.2.3", "train", 0, (), ())
    counts, steps = [], []
    for i in range(30):
        anat = cervical.build_anatomy(np.random.default_rng(i), plan, cervical.Scan())
        z = np.sort(anat.z_instances)
        counts.append(len(z))
        steps.append(np.diff(z).mean())
        assert anat.size == 512 and 0.25 <= anat.spacing <= 0.45
        t1 = anat.vertebrae[cervical.NAMES.index("T1")]
        assert z[-1] > anat.head["z_base"] and z[0] < t1.centre[2]  # skull base above, thorax below
    assert 0.5 <= min(steps) and max(steps) <= 1.25
    assert 150 <= min(counts) and max(counts) >= 500 and max(counts) <= 1300


def _render_column(anat, z_values):
    """Labels and HU of the slices at z_values (ascending), rendered without noise."""
    slices = [cervical.render_slice(anat, float(z)) for z in z_values]
    return np.stack([s.labels for s in slices]), np.stack([s.hu for s in slices])


def test_atlas_is_a_ring_around_the_dens_and_c2_is_the_tallest():
    plan = cervical.StudyPlan("1.2.3", "train", 0, (), ())
    scan = cervical.Scan(image_size=128, fov_mm=(150, 150))
    for seed in range(3):
        anat = cervical.build_anatomy(np.random.default_rng(seed), plan, scan)
        c1 = anat.vertebrae[0]
        z = np.arange(c1.centre[2] - 60, c1.centre[2] + 20, 0.5)
        labels, hu = _render_column(anat, z)
        heights = {
            name: np.ptp(z[(labels == i + 1).any(axis=(1, 2))]) for i, name in enumerate(cervical.NAMES[:3])
        }
        assert 8.0 <= heights["C1"] <= 13.0, heights
        assert 30.0 <= heights["C2"] <= 42.0 and heights["C2"] > heights["C3"], heights
        # on C1's mid slice: bone all around the ring, none at its centre, the dens (C2) inside it
        k = int(np.argmin(np.abs(z - c1.centre[2])))
        col = int(round((c1.centre[0] - anat.origin[0]) / anat.spacing))
        row = int(round((c1.centre[1] - anat.origin[1]) / anat.spacing))
        assert labels[k, row, col] == 0 and hu[k, row, col] < 200
        ring = labels[k] == 1
        assert (
            ring[:row, col].any()
            and ring[row:, col].any()
            and ring[row, :col].any()
            and ring[row, col:].any()
        )
        inner = round(c1.dims["ri_ap"] / anat.spacing)
        dens = labels[k, row - inner : row, col - 3 : col + 4] == 2  # in front of the centre, inside the ring
        assert dens.any()


def test_mask_header_quirk_and_monochrome1(data):
    root, summary = data
    q = summary["quirks"]
    bad = q["identity_affine_masks"]
    assert len(bad) == 1 and summary["counts"]["train"]["identity_affine_masks"] == 1
    assert set(bad) < set(q["segmented"])
    for uid in q["segmented"]:
        assert np.allclose(nib.load(root / "segmentations" / f"{uid}.nii").affine, np.eye(4)) == (uid in bad)
        _, hu = _read_study(root / "train_images" / uid)
        _, v_mask, _ = _mask(root, uid)
        ok = ~np.isnan(hu) & (v_mask > 0)
        assert (hu[ok] >= 200).mean() > 0.9  # the published rule puts every mask on bone
    mono = q["monochrome1"]
    assert len(mono) == 2  # one series per split
    for uid in mono:
        ds = pydicom.dcmread(_folder(root, uid) / "2.dcm")
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert ds.PhotometricInterpretation == "MONOCHROME1" and -1024 <= hu[:4, :4].mean() <= -950


def test_mask_layout_round_trips_with_the_published_rule():
    rng = np.random.default_rng(0)
    asc = rng.integers(0, 8, size=(5, 4, 3)).astype(np.uint8)  # A[k, r, c] in ascending z
    stored = cervical.mask_from_ascending(asc)
    assert stored.shape == (3, 4, 5)
    assert np.array_equal(cervical.dicom_order_from_mask(stored, z_decreases=False), asc)
    assert np.array_equal(cervical.dicom_order_from_mask(stored, z_decreases=True), asc[::-1])
