"""spider: .mha reading by geometry (any axis order), writing back in the file's geometry, the file
layout, bad files, the stage-01 cache and the instance labels counted from the sacrum."""

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from spine.spider import io
from spine.spider.preprocess import CLASSES, cached, run_cache, to_classes
from spine.spider.segment import instance_labels

SPACING = (4.0, 1.0, 0.8)  # (slice, row, col) mm of the canonical array below


def column(shape=(5, 60, 40)) -> np.ndarray:
    """A canonical label array [s, r, c]: three vertebrae (labels 3, 2, 1 top down) with discs 203, 202,
    201 below each, a canal behind them; nothing below the lowest disc (the unlabelled sacrum)."""
    lab = np.zeros(shape, np.int16)
    for k, top in enumerate((4, 20, 36)):  # vertebra rows [top, top+10), its disc [top+10, top+16)
        lab[1:4, top : top + 10, 8:24] = 3 - k
        lab[1:4, top + 10 : top + 16, 8:24] = 203 - k
    lab[2, 2:54, 27:31] = 100
    return lab


def canonical_image(arr: np.ndarray, spacing=SPACING, origin=(10.0, -20.0, 30.0)) -> sitk.Image:
    """``arr`` ([s, r, c]) as an image whose direction makes it the canonical layout: sitk axes point
    posterior, inferior, left (LPS)."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(spacing)))
    img.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))  # columns: i -> +y (P), j -> -z (I), k -> +x (L)
    img.SetOrigin(origin)
    return img


def stored_otherwise(arr: np.ndarray, spacing=SPACING) -> sitk.Image:
    """The same voxels stored by hand in another axis order with flips: numpy [r (S->I flipped to
    I->S), c, s]: sitk i = s (left), j = c (posterior), k = r (superior)."""
    b = np.ascontiguousarray(arr[:, ::-1, :].transpose(1, 2, 0))
    img = sitk.GetImageFromArray(b)
    img.SetSpacing((spacing[0], spacing[2], spacing[1]))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # columns: i -> +x (L), j -> +y (P), k -> +z (S)
    return img


@pytest.mark.parametrize("code", ["LPS", "RAS", "ASL", "SPR", "IRA"])
def test_canonical_array_whatever_the_stored_axis_order(code, tmp_path):
    arr = column()
    path = tmp_path / f"1_t2_{code}.mha"
    sitk.WriteImage(sitk.DICOMOrient(canonical_image(arr), code), str(path))
    got = io.read_canonical(path)
    assert got.orientation == code
    assert np.array_equal(got.array, arr) and np.allclose(got.spacing, SPACING)


def test_canonical_of_a_hand_made_header(tmp_path):
    arr = column()
    sitk.WriteImage(stored_otherwise(arr), str(tmp_path / "a.mha"))
    got = io.read_canonical(tmp_path / "a.mha")
    assert got.orientation == "LPS"
    assert np.array_equal(got.array, arr) and np.allclose(got.spacing, SPACING)


def test_write_like_gives_the_files_own_geometry(tmp_path):
    arr = column()
    original = sitk.DICOMOrient(canonical_image(arr), "ASL")
    sitk.WriteImage(original, str(tmp_path / "img.mha"))
    ref = io.read_canonical(tmp_path / "img.mha")
    io.write_like(ref.array.copy(), ref, io.read_image(tmp_path / "img.mha"), tmp_path / "out" / "img.mha")
    back = sitk.ReadImage(str(tmp_path / "out" / "img.mha"))
    assert io.same_grid(back, original, tol=0)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))


def test_file_names_and_splits(tmp_path):
    assert io.split_name("12_t2_SPACE.mha") == ("12", "t2_SPACE")
    assert io.split_name("12_t2.mha") == ("12", "t2")
    assert io.split_name("p_7_t1.mha") == ("p_7", "t1")
    assert io.split_name("odd.mha") == ("odd", "unknown")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("1_t1", "1_t2", "2_t2_SPACE"):
        sitk.WriteImage(canonical_image(column()), str(tmp_path / "images" / f"{name}.mha"))
    sitk.WriteImage(canonical_image(column()), str(tmp_path / "masks" / "1_t1.mha"))
    table = io.list_images(tmp_path)
    assert table["image"].tolist() == ["1_t1", "1_t2", "2_t2_SPACE"]
    assert table["split"].tolist() == ["train", "test", "test"]
    assert table["patient"].tolist() == ["1", "1", "2"]


def test_cache_resamples_by_geometry_and_names_a_bad_file(tmp_path):
    lab = column()
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    intensity = (lab > 0).astype(np.float32) * 100 + 10
    sitk.WriteImage(
        sitk.DICOMOrient(canonical_image(intensity), "RAS"), str(tmp_path / "data/images/1_t2.mha")
    )
    sitk.WriteImage(sitk.DICOMOrient(canonical_image(lab), "RAS"), str(tmp_path / "data/masks/1_t2.mha"))
    sitk.WriteImage(canonical_image(intensity), str(tmp_path / "data/images/2_t2.mha"))
    bad = tmp_path / "data/images/3_t1.mha"
    bad.write_bytes((tmp_path / "data/images/2_t2.mha").read_bytes()[:150])
    images = io.list_images(tmp_path / "data")
    table, report = run_cache(images, tmp_path / "cache", 2.0, max_failed_share=0.9)
    assert report["failed"] == 1 and report["failed_images"] == ["3_t1"]
    failed = table.set_index("image").loc["3_t1"]
    assert failed["status"] == "failed" and "3_t1.mha" in failed["reason"]
    row = table.set_index("image").loc["1_t2"]
    assert list(row["grid_shape"]) == [5, 30, 16]  # 60 x 1 mm rows, 40 x 0.8 mm cols at 2 mm
    classes = np.load(cached(tmp_path / "cache", "train", "1_t2", "mask"))
    assert classes.shape == (5, 30, 16) and set(np.unique(classes)) == {0, 1, 2, 3}
    # the mask went through the same geometry as the image: structures stay where the image shows them
    vol = np.load(cached(tmp_path / "cache", "train", "1_t2"))
    assert vol[classes == 1].mean() > vol[classes == 0].mean() + 0.5
    # resumable: a second run reads the rows back without re-reading the images
    again, _ = run_cache(images, tmp_path / "cache", 2.0, max_failed_share=0.9)
    assert json.loads(cached(tmp_path / "cache", "train", "1_t2", "row").read_text())["status"] == "ok"
    assert again.set_index("image").loc["2_t2", "status"] == "ok"
    with pytest.raises(RuntimeError, match="failed"):
        run_cache(images, tmp_path / "cache", 2.0, max_failed_share=0.1)


def test_classes_of_spider_labels():
    lab = np.array([0, 1, 5, 100, 104, 201, 205, 7])
    assert CLASSES[0] == "background"
    assert to_classes(lab).tolist() == [0, 1, 1, 3, 1, 2, 2, 1]


def test_instance_labels_count_up_from_the_sacrum():
    truth = column()
    labels, info = instance_labels(to_classes(truth), SPACING, min_mm3=1.0, max_gap=1.8)
    assert np.array_equal(labels, truth)
    assert info["discs"] == 3 and info["vertebrae"] == 3 and not info["broken"]


def test_instance_labels_partial_vertebra_and_split_blob():
    truth = column()
    truth[1:4, 0:4, 8:24] = 3  # the top vertebra now touches the image's top row: partially visible
    classes = to_classes(truth)
    classes[2, 30:36, 12:16] = 1  # a bridge of vertebra through disc 202: one blob for vertebrae 2 and 1
    labels, info = instance_labels(classes, SPACING, min_mm3=1.0, max_gap=1.8)
    assert info["partial"] == [3] and (labels == 103).sum() == (truth == 3).sum()
    assert (labels[truth == 2] == 2).all() and (labels[truth == 1] == 1).all()  # split at the disc plane
    assert info["discs"] == 3


def test_instance_labels_join_a_disc_cut_in_two():
    truth = column()
    classes = to_classes(truth)
    classes[:, 30:36, 14:16] = 1  # disc 202 cut through on every slice: two pieces on one plane
    labels, info = instance_labels(classes, SPACING, min_mm3=1.0, max_gap=1.8)
    assert info["discs"] == 3 and set(np.unique(labels[truth == 202])) >= {202}


def test_instance_labels_report_a_broken_sequence():
    truth = column((5, 76, 40))
    truth[1:4, 60:66, 8:24] = 201  # a fourth disc below the lowest, with no vertebra between them
    labels, info = instance_labels(to_classes(truth), SPACING, min_mm3=1.0, max_gap=1.8)
    assert info["broken"] and any("no vertebra" in r for r in info["reasons"])
    assert pd.Series(labels[labels > 200]).nunique() == 4


def test_instance_labels_drop_a_sacral_remnant_but_not_a_cut_top_disc():
    truth = column((5, 76, 40))
    classes = to_classes(truth)
    classes[2, 60:62, 12:16] = 2  # a thin sliver under L5/S1: the S1/S2 line of the sacrum
    labels, info = instance_labels(classes, SPACING, min_mm3=1.0, max_gap=1.8)
    assert info["discs"] == 3 and np.array_equal(labels[truth > 0], truth[truth > 0])
    top = truth.copy()
    top[top == 203] = 0
    top[1:4, 0:2, 8:24] = 203  # the top disc cut by the field of view: small, kept
    labels, info = instance_labels(to_classes(top), SPACING, min_mm3=1.0, max_gap=1.8)
    assert info["discs"] == 3 and (labels == 203).sum() == (top == 203).sum()
