"""The synthetic lumbar generator: Kaggle layout, geometry agreement, visible signal, quirks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from spine.core import geometry
from spine.core.paths import truth_dir
from spine.lumbar import synth as lumbar
from spine.lumbar.task import (
    CONDITION_NAMES,
    CONDITION_SERIES,
    CONDITIONS,
    GRADES,
    LEVEL_NAMES,
    PRED_COLUMNS,
    SERIES_DESCRIPTIONS,
    TARGETS,
    LumbarTask,
)

SEED = 3
N_TRAIN, N_TEST, SIZE = 6, 3, 96


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "lumbar"
    summary = lumbar.generate(out, N_TRAIN, N_TEST, seed=SEED, image_size=SIZE)
    return out, summary


@pytest.fixture(scope="module")
def headers(data) -> pd.DataFrame:
    """One row per DICOM file: where it is, its geometry and syntax, or readable=False."""
    out, _ = data
    rows = []
    for path in sorted(out.glob("*_images/*/*/*.dcm")):
        split, study, series = path.parts[-4].split("_")[0], int(path.parts[-3]), int(path.parts[-2])
        rec = dict(split=split, study_id=study, series_id=series, file=int(path.stem), path=str(path))
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rec.update(
                readable=True,
                instance=int(ds.InstanceNumber),
                ipp=tuple(float(v) for v in ds.ImagePositionPatient),
                iop=tuple(float(v) for v in ds.ImageOrientationPatient),
                spacing=tuple(float(v) for v in ds.PixelSpacing),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                syntax=str(ds.file_meta.TransferSyntaxUID),
                description=str(ds.SeriesDescription),
            )
        except Exception:
            rec.update(readable=False)
        rows.append(rec)
    return pd.DataFrame(rows)


def _truth(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(truth_dir(out) / f"{name}.csv", keep_default_na=False, na_values=[""])


def _series_geometry(headers: pd.DataFrame, study_id: int, series_id: int) -> dict[str, np.ndarray]:
    h = headers[(headers.study_id == study_id) & (headers.series_id == series_id) & headers.readable]
    return dict(
        instance=h["instance"].to_numpy(),
        ipp=np.array(h["ipp"].tolist()),
        iop=np.array(h["iop"].tolist()),
        spacing=np.array(h["spacing"].iloc[0]),
    )


# --- Kaggle schema -------------------------------------------------------------------------------


def test_kaggle_files_and_columns(data):
    out, summary = data
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "train.csv",
            "train_label_coordinates.csv",
            "train_series_descriptions.csv",
            "test_series_descriptions.csv",
            "sample_submission.csv",
            "train_images",
            "test_images",
        ]
    )
    train = pd.read_csv(out / "train.csv")
    assert list(train.columns) == ["study_id", *TARGETS]
    assert len(train) == N_TRAIN and train["study_id"].is_unique
    values = set(train[TARGETS].stack().dropna())
    assert values <= set(GRADES) and "Normal/Mild" in values
    n_missing = int(train[TARGETS].isna().sum().sum())
    assert n_missing == summary["counts"]["train"]["missing_labels"] >= 1
    assert all(1_000_000 <= s < 10_000_000_000 for s in train["study_id"])

    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        desc = pd.read_csv(out / f"{split}_series_descriptions.csv")
        assert list(desc.columns) == ["study_id", "series_id", "series_description"]
        assert set(desc["series_description"]) <= set(SERIES_DESCRIPTIONS)
        assert desc["study_id"].nunique() == n and desc["series_id"].is_unique
        listed = {(int(a), int(b)) for a, b in zip(desc["study_id"], desc["series_id"], strict=True)}
        on_disk = {(int(p.parent.name), int(p.name)) for p in (out / f"{split}_images").glob("*/*")}
        assert listed == on_disk

    test_ids = sorted(pd.read_csv(out / "test_series_descriptions.csv")["study_id"].unique())
    sub = pd.read_csv(out / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", *PRED_COLUMNS]
    assert sub["row_id"].tolist() == LumbarTask().row_ids(test_ids)
    assert np.allclose(sub[PRED_COLUMNS].to_numpy(), 1 / 3)


def test_coordinates_point_to_files_of_the_right_series(data, headers):
    out, _ = data
    coords = pd.read_csv(out / "train_label_coordinates.csv")
    assert list(coords.columns) == [
        "study_id",
        "series_id",
        "instance_number",
        "condition",
        "level",
        "x",
        "y",
    ]
    assert set(coords["condition"]) == set(CONDITION_NAMES.values())
    assert set(coords["level"]) <= set(LEVEL_NAMES.values())
    desc = pd.read_csv(out / "train_series_descriptions.csv").set_index("series_id")["series_description"]
    by_name = {v: k for k, v in CONDITION_NAMES.items()}
    for r in coords.itertuples():
        assert desc[r.series_id] == CONDITION_SERIES[by_name[r.condition]]
        path = out / "train_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm"
        assert path.exists()
        assert headers.set_index("path").loc[str(path), "readable"]  # never the corrupt file
    # One coordinate row per labeled row, none for a missing label.
    train = pd.read_csv(out / "train.csv")
    long = LumbarTask().labels_long(train)
    key = coords["study_id"].astype(str) + "_" + coords["condition"] + "_" + coords["level"]
    names = long["study_id"].astype(str) + "_" + long["condition"].map(CONDITION_NAMES) + "_"
    labeled = (names + long["level"].map(LEVEL_NAMES))[long["grade"] >= 0]
    assert key.is_unique and set(key) == set(labeled)


def test_truth_tables(data):
    out, summary = data
    labels = _truth(out, "labels")
    assert list(labels.columns) == [
        "row_id", "study_id", "split", "condition", "level", "severity", "latent_grade", "label",
        "bayes_normal_mild", "bayes_moderate", "bayes_severe",
    ]  # fmt: skip
    assert len(labels) == 25 * (N_TRAIN + N_TEST)
    bayes = labels[[f"bayes_{c}" for c in PRED_COLUMNS]].to_numpy()
    assert np.allclose(bayes.sum(1), 1.0)
    assert (labels["latent_grade"].to_numpy() == bayes.argmax(1)).all()
    assert labels["severity"].between(0, 1).all()

    sol = _truth(out, "test_solution")
    assert list(sol.columns) == ["row_id", *PRED_COLUMNS, "sample_weight"]
    test_labeled = labels[(labels["split"] == "test") & labels["label"].notna()]
    assert set(sol["row_id"]) == set(test_labeled["row_id"])
    grade = sol[PRED_COLUMNS].to_numpy().argmax(1)
    assert (sol["sample_weight"].to_numpy() == np.array([1.0, 2.0, 4.0])[grade]).all()

    points = _truth(out, "points")
    for c in ("study_id", "split", "condition", "level", "x_mm", "y_mm", "z_mm", "nx", "ny", "nz"):
        assert c in points.columns
    assert np.allclose(np.linalg.norm(points[["nx", "ny", "nz"]].to_numpy(), axis=1), 1.0)
    assert json.loads((truth_dir(out) / "summary.json").read_text()) == summary


# --- geometry ------------------------------------------------------------------------------------


def test_coordinates_match_truth_points_through_the_dicom_tags(data, headers):
    out, _ = data
    coords = pd.read_csv(out / "train_label_coordinates.csv")
    points = _truth(out, "points")
    points = points[points["split"] == "train"]
    checked = 0
    for r in coords.groupby("condition").head(4).itertuples():
        cond = next(k for k, v in CONDITION_NAMES.items() if v == r.condition)
        lv = next(k for k, v in LEVEL_NAMES.items() if v == r.level)
        p = points[(points.study_id == r.study_id) & (points.condition == cond) & (points.level == lv)]
        point = p[["x_mm", "y_mm", "z_mm"]].to_numpy()[0]
        g = _series_geometry(headers, r.study_id, r.series_id)
        k, dist = geometry.nearest_slice(point, g["ipp"], g["iop"])
        row, col, _ = geometry.patient_to_pixel(point, g["ipp"][k], g["iop"][k], g["spacing"])
        assert g["instance"][k] == r.instance_number
        assert abs(col - r.x) < 0.01 and abs(row - r.y) < 0.01
        # Back from the annotation to 3D: off the truth point only along the slice normal.
        back = geometry.pixel_to_patient(r.y, r.x, g["ipp"][k], g["iop"][k], g["spacing"])
        assert np.linalg.norm(back - point) == pytest.approx(dist, abs=0.01)
        assert dist < 3.0
        checked += 1
    assert checked >= 12


def test_sagittal_and_axial_agree_on_the_canal_point(data, headers):
    """The spinal point clicked on Sagittal T2 projects into the axial series at the same 3D place."""
    out, _ = data
    coords = pd.read_csv(out / "train_label_coordinates.csv")
    desc = pd.read_csv(out / "train_series_descriptions.csv")
    spinal = coords[coords["condition"] == "Spinal Canal Stenosis"]
    checked = 0
    for r in spinal.itertuples():
        axial = desc[(desc.study_id == r.study_id) & (desc.series_description == "Axial T2")]
        if axial.empty:
            continue
        sag = _series_geometry(headers, r.study_id, r.series_id)
        k = int(np.flatnonzero(sag["instance"] == r.instance_number)[0])
        p_sag = geometry.pixel_to_patient(r.y, r.x, sag["ipp"][k], sag["iop"][k], sag["spacing"])
        ax = _series_geometry(headers, r.study_id, int(axial["series_id"].iloc[0]))
        j, dist = geometry.nearest_slice(p_sag, ax["ipp"], ax["iop"])
        if dist > 3.0:  # a level the first axial series does not cover
            continue
        row, col, _ = geometry.patient_to_pixel(p_sag, ax["ipp"][j], ax["iop"][j], ax["spacing"])
        assert 0 <= row < SIZE and 0 <= col < SIZE
        p_ax = geometry.pixel_to_patient(row, col, ax["ipp"][j], ax["iop"][j], ax["spacing"])
        assert np.linalg.norm(p_ax - p_sag) == pytest.approx(dist, abs=0.01)
        checked += 1
    assert checked >= 5


# --- signal --------------------------------------------------------------------------------------


def test_canal_narrows_with_spinal_severity_in_the_written_images(data):
    """CSF width across the canal at the annotated point shrinks as the latent severity grows.

    Bright means brighter than 3/4 of the CSF a vertebra higher (the canal's normal width there),
    so gain and bias fields cancel out.
    """
    out, _ = data
    coords = pd.read_csv(out / "train_label_coordinates.csv")
    labels = _truth(out, "labels").set_index("row_id")
    width, severity = [], []
    for r in coords[coords["condition"] == "Spinal Canal Stenosis"].itertuples():
        path = out / "train_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm"
        img = pydicom.dcmread(path).pixel_array.astype(float)
        y, x = int(round(r.y)), int(round(r.x))
        ref = np.median(np.sort(img[y - 9 : y - 6, x - 8 : x + 9].ravel())[-4:])
        width.append((img[y, x - 8 : x + 9] > 0.75 * ref).sum())
        level = r.level.lower().replace("/", "_")
        severity.append(labels.loc[f"{r.study_id}_spinal_canal_stenosis_{level}", "severity"])
    assert np.corrcoef(width, severity)[0, 1] < -0.5


def test_each_sign_shrinks_with_its_severity():
    """Canal AP width (sagittal), foraminal fat (sagittal) and recess width (axial): s=1 vs s=0."""
    rng = np.random.default_rng(0)
    severity = np.zeros((5, 5))
    severity[:, 3] = 1.0  # L4/L5 severe in every condition, the other levels normal
    sp = lumbar.sample_spine(rng, severity)

    def csf_width(level: int) -> float:
        p = sp.row_point(0, level)
        n = sp.disc_normal(level)
        line = p + np.arange(-15, 15, 0.25)[:, None] * np.array([0.0, n[2], -n[1]])
        return (lumbar.render(sp, "T2", line, 0.25) > 0.8).sum() * 0.25

    def fat_area(level: int) -> float:
        p = sp.row_point(1, level)
        u, w = np.meshgrid(np.arange(-12, 12, 0.25), np.arange(-12, 12, 0.25))
        grid = p + u[..., None] * np.array([0.0, 1.0, 0.0]) + w[..., None] * np.array([0.0, 0.0, 1.0])
        return (lumbar.render(sp, "T1", grid, 0.25) > 0.85).sum() * 0.0625

    def recess_reach(level: int, condition: int) -> float:
        p = sp.row_point(condition, level)
        line = p + np.arange(-6, 8, 0.25)[:, None] * np.array([1.0 if condition == 3 else -1.0, 0, 0])
        return (lumbar.render(sp, "T2", line, 0.25) > 0.8).sum() * 0.25

    assert csf_width(3) < 0.5 * csf_width(2)
    assert fat_area(3) < 0.25 * fat_area(2)
    for condition in (3, 4):
        assert recess_reach(3, condition) < 0.5 * recess_reach(2, condition)


def test_fast_slices_match_the_exact_phantom():
    rng = np.random.default_rng(1)
    sp = lumbar.sample_spine(rng, lumbar.sample_severity(rng))
    p = sp.row_point(0, 2)
    iop = np.array([[0.0, 1.0, 0.0, 0.0, 0.0, -1.0]])
    ipp = p[None] - 31.5 * 0.8 * (iop[:, :3] + iop[:, 3:])
    fast = lumbar.render_slices(sp, "T2", ipp, iop, (0.8, 0.8), 64, 64)
    r, c = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    exact = lumbar.render(sp, "T2", geometry.pixel_to_patient(r, c, ipp[0], iop[0], (0.8, 0.8)), 0.8)
    assert np.abs(fast[0] - exact).mean() < 1e-3


def test_grade_probabilities_are_an_ordinal_model():
    s = np.linspace(0, 1, 101)
    p = lumbar.grade_probabilities(s)
    assert np.allclose(p.sum(-1), 1.0) and (p >= 0).all()
    assert (np.diff(p[:, 0]) <= 0).all() and (np.diff(p[:, 2]) >= 0).all()
    assert p[0].argmax() == 0 and p[-1].argmax() == 2 and p[:, 1].max() > 0.5


# --- quirks --------------------------------------------------------------------------------------


def test_quirks_present(data, headers):
    out, summary = data
    ok = headers[headers.readable]
    # Reversed instance numbers: InstanceNumber falls as the slice position rises.
    reversed_kinds = set()
    for (_, _), h in ok.groupby(["study_id", "series_id"]):
        first = h.sort_values("instance").iloc[[0, -1]]
        pos = geometry.slice_positions(np.array(first["ipp"].tolist()), np.array(first["iop"].tolist()))
        z = np.array(first["ipp"].tolist())[:, 2]
        axial = h["description"].iloc[0] == "Axial T2"
        if (z[0] > z[1]) if axial else (pos[0] > pos[1]):
            reversed_kinds.add(h["description"].iloc[0])
    assert "Axial T2" in reversed_kinds and reversed_kinds & {"Sagittal T1", "Sagittal T2/STIR"}
    # Tilted blocks: one axial series with several orientations.
    axial = ok[ok["description"] == "Axial T2"]
    assert axial.groupby("series_id")["iop"].nunique().max() >= 2
    # Several axial series in one study.
    assert axial.groupby("study_id")["series_id"].nunique().max() >= 2
    # Every transfer syntax.
    assert set(ok["syntax"]) == {
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90",
    }  # fmt: skip
    # Exactly one corrupt file per split, the one the summary names.
    bad = headers[~headers.readable]
    assert sorted(bad["split"]) == ["test", "train"]
    for r in bad.itertuples():
        assert r.path.endswith(summary["corrupt_files"][r.split])
        with pytest.raises((AttributeError, EOFError, OSError, ValueError, InvalidDicomError)):
            pydicom.dcmread(r.path).pixel_array  # noqa: B018
    # A test study lacks a series.
    test_desc = pd.read_csv(out / "test_series_descriptions.csv")
    assert (test_desc.groupby("study_id")["series_description"].nunique() < 3).any()
    # Sagittal image sizes differ between series of one study somewhere.
    sag = ok[ok["description"] != "Axial T2"]
    assert (sag.groupby("study_id")["rows"].nunique() > 1).any()
    # The truth: Bayes beats the prior in both splits.
    for split in ("train", "test"):
        assert summary["scores"][split]["bayes"]["score"] < summary["scores"][split]["prior"]["score"]
    names = {q["quirk"] for q in summary["quirks"]}
    assert {"reversed_instances", "tilted_axial_blocks", "missing_series", "corrupt_file"} <= names


def test_same_seed_same_data(tmp_path):
    a = lumbar.generate(tmp_path / "a", 2, 1, seed=11, image_size=32)
    b = lumbar.generate(tmp_path / "b", 2, 1, seed=11, image_size=32)
    assert a == b
    for name in ("train.csv", "train_label_coordinates.csv", "test_series_descriptions.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    files = sorted((tmp_path / "a" / "train_images").glob("*/*/1.dcm"))
    for fa in files[:3]:
        fb = tmp_path / "b" / fa.relative_to(tmp_path / "a")
        if a["corrupt_files"]["train"] not in str(fa):
            assert (pydicom.dcmread(fa).pixel_array == pydicom.dcmread(fb).pixel_array).all()
    c = lumbar.generate(tmp_path / "c", 2, 1, seed=12, image_size=32)
    assert (tmp_path / "c" / "train.csv").read_bytes() != (tmp_path / "a" / "train.csv").read_bytes()
    assert c != a


def test_every_condition_has_a_truth_point(data):
    out, _ = data
    points = _truth(out, "points")
    assert set(points["condition"]) == set(CONDITIONS)
    assert len(points) == 25 * (N_TRAIN + N_TEST)


def test_recess_place_varies_by_level_and_moves_medially_with_severity():
    rng = np.random.default_rng(4)
    sp = lumbar.sample_spine(rng, np.zeros((5, 5)))
    lumbar.vary_recesses(sp, np.random.default_rng(5))
    lateral = [abs(sp.row_point(3, lv)[0] - sp.x0) for lv in range(5)]  # left recess, per level
    assert np.ptp(lateral) > 0.5  # not one fixed offset from the canal
    severe = np.zeros((5, 5))
    severe[3, 2] = 1.0  # left subarticular L3/L4 severe
    sp2 = lumbar.sample_spine(np.random.default_rng(4), severe)
    sp2.recess_dx, sp2.recess_db = sp.recess_dx, sp.recess_db
    moved = abs(sp2.row_point(3, 2)[0] - sp2.x0)
    assert moved == pytest.approx(lateral[2] - lumbar.RECESS_MEDIAL_MM)
    # the rendered recess (CSF) is centred where the truth point says, at the disc
    p = sp2.row_point(3, 2)
    line = p + np.arange(-4, 4.25, 0.25)[:, None] * np.array([1.0, 0, 0])
    signal = lumbar.render(sp2, "T2", line, 0.25)
    assert signal[len(line) // 2] > 0.5
