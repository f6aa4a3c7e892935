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
SIZE, SLICES = 96, 64
TASK = CervicalTask()


def _make(root: Path, seed: int = SEED) -> dict:
    return cervical.generate(root, N_TRAIN, N_TEST, seed, image_size=SIZE, n_slices=SLICES)


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


def _mask(root: Path, uid: str):
    """The stored mask S, its DICOM-aligned view V and the NIfTI affine."""
    img = nib.load(root / "segmentations" / f"{uid}.nii")
    s = np.asarray(img.dataobj)
    return s, s[:, ::-1, ::-1].transpose(2, 1, 0), img.affine


def _segmented_with(root: Path, summary: dict, visible: bool) -> str:
    labels = _truth(root, "labels")
    shown = set(labels.loc[labels["visible"] == 1, "study_id"])
    for uid in summary["quirks"]["segmented"]:
        if (uid in shown) == visible:
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
        voxel = np.array([c, hu.shape[1] - 1 - r, hu.shape[0] - 1 - k, 1.0])
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
