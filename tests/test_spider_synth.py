"""SPIDER generator (spine.spider.synth): the file layout, headers that place every voxel, masks with
the SPIDER labels, and a truth table that agrees with what was drawn."""

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from spine.spider import io, synth
from spine.spider import labels as lab
from spine.spider.measure import UNITS

COLUMNS = ["image", "structure", "measurement", "value", "unit"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 train + 1 test patients at 96 px (about 9 images)."""
    out = tmp_path_factory.mktemp("spider") / "data"
    summary = synth.generate(out, 3, 1, seed=1, image_size=96, fov_mm=(270, 300), n_slices=(7, 8))
    return out, out.parent / "data_truth", summary


def _read(path):
    c = io.read_canonical(path)
    return c.array, c.spacing


def test_layout_and_truth_files(data):
    out, truth, summary = data
    images = pd.read_csv(truth / "images.csv")
    assert set(images["modality"]) >= {"t1", "t2"}
    for im in images.itertuples():
        assert (out / "images" / f"{im.image}.mha").exists()
        assert im.image == f"{im.patient_id}_{im.modality}"
        # the test split is every image without a mask; its masks are in the truth folder
        in_data = (out / "masks" / f"{im.image}.mha").exists()
        assert in_data == (im.split == "train")
        assert (truth / "masks" / f"{im.image}.mha").exists() == (im.split == "test")
    assert summary["counts"]["test"]["patients"] == 1
    assert list(pd.read_csv(out / "overview.csv").columns) == [
        "image",
        "patient_id",
        "modality",
        "sex",
        "age",
    ]
    m = pd.read_csv(truth / "measurements.csv")
    assert list(m.columns) == COLUMNS
    assert set(m["image"]) == set(images["image"])  # every image of both splits
    assert (m["unit"] == m["measurement"].map(UNITS)).all() and m["value"].notna().all()
    per_image = m.groupby("image").size()
    assert per_image.min() >= 5 * 6 + 5 * 11 + 3
    assert json.loads((truth / "summary.json").read_text())["seed"] == 1


def test_headers_place_voxels_whatever_the_layout():
    """Every storage layout reads back to the same canonical array, spacing and physical positions."""
    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)  # every value once
    spacing, origin = (4.0, 0.5, 0.7), np.array([-10.0, -50.0, 120.0])
    for layout in synth.LAYOUTS:
        img = synth.to_image(arr, spacing, origin, layout)
        c = io.canonical(img)
        back, sp = c.array, c.spacing
        np.testing.assert_array_equal(back, arr, err_msg=layout)
        assert sp == pytest.approx(spacing)
        # canonical voxel (a, r, c) sits at origin + a*4 (left) - r*0.5 (down) + c*0.7 (back)
        stored = np.argwhere(sitk.GetArrayFromImage(img) == arr[3, 4, 5])
        k, j, i = stored[0]
        point = np.array(img.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        np.testing.assert_allclose(point, origin + [3 * 4.0, 5 * 0.7, -4 * 0.5], err_msg=layout)
    assert len({synth.to_image(arr, spacing, origin, k).GetDirection() for k in synth.LAYOUTS}) == len(
        synth.LAYOUTS
    )


def test_layouts_all_occur():
    rng = np.random.default_rng(5)
    assert set(synth._layouts(rng, 8)) == set(synth.LAYOUTS)


def test_masks_hold_spider_labels_in_order(data):
    out, truth, _ = data
    images = pd.read_csv(truth / "images.csv")
    for im in images.itertuples():
        folder = out / "masks" if im.split == "train" else truth / "masks"
        mask, spacing = _read(folder / f"{im.image}.mha")
        image, _ = _read(out / "images" / f"{im.image}.mha")
        assert mask.shape == image.shape and mask.dtype == np.uint8
        found = set(np.unique(mask).tolist())
        n = int(im.n_lumbar)
        assert set(range(1, n + 1)) <= found  # every lumbar body, numbered from the bottom
        assert {lab.DISC_OFFSET + v for v in range(1, n + 1)} <= found and lab.CANAL in found
        assert all(
            v in (0, lab.CANAL) or lab.is_vertebra(v) or lab.is_partial(v) or lab.is_disc(v) for v in found
        )
        rows = {v: np.nonzero(mask == v)[1].mean() for v in found if lab.is_vertebra(v) or lab.is_disc(v)}
        for v in range(1, n):
            # disc 200 + v lies under body v, which lies under disc 200 + v + 1 and body v + 1 (rows go down)
            assert rows[lab.DISC_OFFSET + v] > rows[v] > rows[lab.DISC_OFFSET + v + 1] > rows[v + 1]
        partial = sorted(v for v in found if lab.is_partial(v))
        assert all(v - lab.PARTIAL_OFFSET > n for v in partial)  # only thoracic bodies cut by the field
        if "t2" in im.modality:  # the image shows what the mask says: T2 discs brighter than bodies
            assert image[mask == lab.DISC_OFFSET + 3].mean() > image[mask == 3].mean()


def test_truth_agrees_with_the_draws(data):
    _, truth, _ = data
    m = pd.read_csv(truth / "measurements.csv")
    g = pd.read_csv(truth / "grades.csv")
    both = g.merge(
        m.pivot_table(index=["image", "structure"], columns="measurement", values="value"),
        on=["image", "structure"],
    )
    bodies = both[both["deformity"].isin(["wedge", "biconcave"])]
    assert (bodies["genant_grade_x"] == bodies["genant_grade_y"]).all()
    levels = both[both["meyerding_grade_x"].notna()]
    assert (levels["meyerding_grade_x"] == levels["meyerding_grade_y"]).all()
    assert (levels["herniation"] == levels["herniation_probability"]).all()
    assert (levels.loc[levels["herniation"] == 1, "herniation_mm_y"] >= synth.HERNIATION_MM[0]).all()


def test_deterministic_and_transitional_l6(tmp_path, monkeypatch):
    a = synth.generate(tmp_path / "a", 1, 0, seed=4, image_size=48, fov_mm=(270, 280), n_slices=(5, 5))
    b = synth.generate(tmp_path / "b", 1, 0, seed=4, image_size=48, fov_mm=(270, 280), n_slices=(5, 5))
    assert a == b
    for f in sorted((tmp_path / "a" / "images").iterdir()):
        np.testing.assert_array_equal(_read(f)[0], _read(tmp_path / "b" / "images" / f.name)[0])
    monkeypatch.setattr(synth, "P_L6", 1.0)
    synth.generate(tmp_path / "c", 1, 0, seed=4, image_size=48, fov_mm=(270, 280), n_slices=(5, 5))
    m = pd.read_csv(tmp_path / "c_truth" / "measurements.csv")
    assert {"L6", "L6/S1", "L5/L6"} <= set(m["structure"])
    mask, _ = _read(next((tmp_path / "c" / "masks").iterdir()))
    assert set(range(1, 7)) <= set(np.unique(mask).tolist())


def test_the_sacrum_is_one_unlabelled_bone_under_the_lowest_disc():
    rng = np.random.default_rng(3)
    for pid in range(6):
        p = synth.sample_patient(rng, pid)
        s1 = p.bodies[-1]
        assert not s1.labelled and [b.name for b in p.sacral] == ["S2", "S3", "S4"]
        assert all(not b.labelled for b in p.sacral)
        for upper, lower in zip([s1, *p.sacral], p.sacral):
            # each segment lies under the one above and is fused to it: its top rim's middle is inside the
            # upper segment, so no disc-like gap opens between them
            assert lower.centre @ synth._unit(upper.tilt) < upper.centre @ synth._unit(upper.tilt)
            top_mid = lower.point(lower.rim_height(0.0) / 2, 0.0)
            assert upper.inside(np.array(top_mid[0]), np.array(top_mid[1]), 0.0, 1e-3) == 1.0
            assert lower.depth < upper.depth


def test_whole_vertebra_labels_add_the_arch_behind_the_canal():
    rng = np.random.default_rng(5)
    patient = synth.sample_patient(rng, 0)
    plan = synth.plan_image(rng, patient, "t2", 96, (270.0, 300.0), (3.5, 3.5), (7, 7))
    _, whole = synth.render_volume(patient, plan, whole=True)
    _, bodies = synth.render_volume(patient, plan, whole=False)
    arch = whole != bodies
    assert arch.sum() > 0 and (bodies[arch] == 0).all()  # the arch only adds labels
    assert all(lab.is_vertebra(v) or lab.is_partial(v) for v in np.unique(whole[arch]))
    mid = whole[len(whole) // 2]
    canal_col = np.nonzero(mid == lab.CANAL)[1].mean()
    assert np.nonzero(arch[len(whole) // 2])[1].mean() > canal_col  # columns run anterior to posterior
