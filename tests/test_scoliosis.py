"""Scoliosis (AASCE 2019): the challenge's Cobb routine on constructed spines, SMAPE by hand, heights,
the mirror augmentation's corner swap, the generator's layout, and stages 00-06 on a tiny set."""

import json
import math
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from spine.scoliosis import synth
from spine.scoliosis.cobb import cobb_angles, is_s_curve, score_angles, score_files, smape_per_image
from spine.scoliosis.data import read_angles, read_filenames, read_landmarks
from spine.scoliosis.heights import heights_table, measure
from spine.scoliosis.landmarks import augment
from spine.scoliosis.model import decode, targets, unflip
from spine.scoliosis.task import ANGLES, VERTEBRAE

# --- constructed spines ----------------------------------------------------------------------------


def spine_from_tilts(tilts, height=20.0, width=40.0, disc=6.0, top=(100.0, 100.0)) -> np.ndarray:
    """(17, 4, 2) corners in pixels of rectangular vertebrae whose endplates are tilted by ``tilts``
    degrees (positive: the right side higher), stacked along their axes."""
    t = np.radians(np.asarray(tilts, dtype=float))
    across = np.stack([np.cos(t), -np.sin(t)], 1)  # along the endplate, towards the image's right
    down = np.stack([np.sin(t), np.cos(t)], 1)
    centre = np.array(top, dtype=float)
    corners = []
    for i in range(17):
        if i:
            centre = centre + (height + disc) * (down[i - 1] + down[i]) / 2
        top_mid, bottom_mid = centre - height / 2 * down[i], centre + height / 2 * down[i]
        half = width / 2 * across[i]
        corners.append([top_mid - half, top_mid + half, bottom_mid - half, bottom_mid + half])
    return np.array(corners)


def ramp(knots: dict[int, float]) -> np.ndarray:
    """Tilts of the 17 vertebrae, linear between the given (vertebra: tilt) knots."""
    k = sorted(knots)
    return np.interp(np.arange(17), k, [knots[i] for i in k])


def test_straight_spine_has_zero_angles():
    c = cobb_angles(spine_from_tilts(np.zeros(17)), image_height=1000)
    assert c.angles() == pytest.approx([0, 0, 0], abs=1e-6)


def test_c_curve_main_angle_and_compensation():
    # One curve from T4 (+20°) to L1 (-15°), T1 at +12°, L5 at -5°: a C curve (not S by the test).
    tilts = ramp({0: 12.0, 3: 20.0, 12: -15.0, 16: -5.0})
    c = cobb_angles(spine_from_tilts(tilts), image_height=1000)
    assert not c.s_curve
    assert c.mt == pytest.approx(35.0, abs=1e-6)
    assert c.ends["mt"] == (3, 12)
    assert c.pt == pytest.approx(8.0, abs=1e-6)  # T1 against the upper end vertebra
    assert c.tl == pytest.approx(10.0, abs=1e-6)  # L5 against the lower end vertebra


def test_s_curve_with_the_main_curve_on_top():
    # T1 +5, T3 +15, T9 -15, L3 +10: thoracic 30° (main, upper half), lumbar 25° below, PT 10° above.
    tilts = ramp({0: 5.0, 2: 15.0, 8: -15.0, 14: 10.0, 16: 10.0})
    corners = spine_from_tilts(tilts, top=(100.0, 50.0))
    c = cobb_angles(corners, image_height=2 * corners[..., 1].max())  # curve centre in the upper half
    assert c.s_curve
    assert c.angles() == pytest.approx([10.0, 30.0, 25.0], abs=1e-6)
    assert c.ends == {"pt": (0, 2), "mt": (2, 8), "tl": (8, 14)}


def test_s_curve_with_the_main_curve_below_is_thoracolumbar():
    # T1 0, T3 +12, T9 -14, L4 +26: the largest curve (40°) is the lower one, in the image's lower half;
    # the curve above it is MT (26°), the next one up PT (12°).
    tilts = ramp({0: 0.0, 2: 12.0, 8: -14.0, 15: 26.0, 16: 26.0})
    corners = spine_from_tilts(tilts, top=(100.0, 400.0))
    c = cobb_angles(corners, image_height=corners[..., 1].max() + 50)
    assert c.s_curve
    assert c.angles() == pytest.approx([12.0, 26.0, 40.0], abs=1e-6)
    assert c.ends == {"pt": (0, 2), "mt": (2, 8), "tl": (8, 15)}
    # The same spine high in a taller image: its main curve is now in the upper half, so it is MT.
    c = cobb_angles(corners, image_height=10 * corners[..., 1].max())
    assert c.mt == pytest.approx(40.0, abs=1e-6) and c.ends["mt"] == (8, 15)


def test_a_mirrored_spine_has_the_same_angles():
    tilts = ramp({0: 5.0, 2: 15.0, 8: -15.0, 14: 10.0, 16: 10.0})
    corners = spine_from_tilts(tilts)
    mirrored = corners[:, [1, 0, 3, 2]].copy()
    mirrored[..., 0] = 1000 - mirrored[..., 0]
    assert cobb_angles(mirrored, 2000).angles() == pytest.approx(cobb_angles(corners, 2000).angles())


def test_s_test_takes_a_vertical_chord():
    mid = np.stack([np.zeros(34), np.arange(34.0)], 1)  # first and last point share x: MATLAB divides by 0
    assert not is_s_curve(mid)
    mid[5, 0], mid[25, 0] = 3.0, -3.0
    assert is_s_curve(mid)


# --- metric -----------------------------------------------------------------------------------------


def test_smape_by_hand():
    gt = np.array([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    pred = np.array([[12.0, 18.0, 30.0], [0.0, 0.0, 0.0], [5.0, 10.0, 0.0]])
    per_image = smape_per_image(gt, pred)
    assert per_image == pytest.approx([100 * 4 / 120, 0.0, 100 * 5 / 25])
    s = score_angles(gt, pred)
    assert s["smape"] == pytest.approx(per_image.mean())
    assert s["smape_pt"] == pytest.approx((100 * 2 / 22 + 0 + 100) / 3)
    assert s["mae_pt"] == pytest.approx(7 / 3) and s["mae"] == pytest.approx(9 / 9)


def test_score_files_aligns_by_filename_and_names_missing_rows(tmp_path):
    sol = pd.DataFrame({"filename": ["a b.jpg", "c.jpg"], "pt": [10, 0], "mt": [20, 10], "tl": [30, 0]})
    sub = pd.DataFrame({"filename": ["c.jpg", "a b.jpg"], "pt": [0, 10], "mt": [10, 20], "tl": [0, 30]})
    sol.to_csv(tmp_path / "sol.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert score_files(tmp_path / "sol.csv", tmp_path / "sub.csv")["smape"] == 0.0
    sub.iloc[:1].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match="a b.jpg"):
        score_files(tmp_path / "sol.csv", tmp_path / "short.csv")


# --- heights --------------------------------------------------------------------------------------


def test_heights_of_a_straight_spine():
    corners = spine_from_tilts(np.zeros(17), height=20.0, width=40.0, disc=6.0)
    got = {(s, m): v for s, m, v in measure(corners)}
    assert got[("T7", "body_height_mid")] == pytest.approx(20.0)
    assert got[("L2", "body_height_left")] == pytest.approx(20.0)
    assert got[("T12/L1", "disc_height_mid")] == pytest.approx(6.0)
    assert got[("spine", "height_T1_L5")] == pytest.approx(17 * 20 + 16 * 6)
    assert got[("thoracic", "height_T1_T12")] == pytest.approx(12 * 20 + 11 * 6)
    table = heights_table(["a.jpg", "bad.jpg"], np.stack([corners, np.full_like(corners, np.nan)]), 0.5)
    assert set(table["filename"]) == {"a.jpg"} and set(table["unit"]) == {"px", "mm"}
    mm = table[
        (table["unit"] == "mm") & (table["structure"] == "T7") & (table["measurement"] == "body_height_mid")
    ]
    assert mm["value"].item() == pytest.approx(10.0)
    assert len(table) == 2 * (2 + 3 * len(VERTEBRAE) + 3 * (len(VERTEBRAE) - 1))


def test_a_curved_spine_is_measured_along_its_curve():
    corners = spine_from_tilts(ramp({0: 30.0, 16: -30.0}))
    got = {(s, m): v for s, m, v in measure(corners)}
    vertical = corners[16, 2:, 1].mean() - corners[0, :2, 1].mean()
    assert got[("spine", "height_T1_L5")] > vertical + 1


# --- model targets, decoding and the mirror ---------------------------------------------------------


def maps_from_targets(t: dict, shape, radius: int = 0) -> dict:
    """Model outputs that say exactly what the targets (made with ``radius``) say: a peak logit at each
    centre's cell, a weaker one at the cells around it, the offsets at every taught cell."""
    h, w = shape[0] // 2, shape[1] // 2
    heat = np.full((1, 1, h, w), -10.0, np.float32)
    offset, corners = np.zeros((1, 2, h * w), np.float32), np.zeros((1, 8, h * w), np.float32)
    centre_slot = (2 * radius + 1) ** 2 // 2
    for k, idx in enumerate(t["index"]):
        heat.reshape(-1)[idx] = 10.0 if k % (2 * radius + 1) ** 2 == centre_slot else 0.0
        offset[0, :, idx] = t["offset"][k]
        corners[0, :, idx] = t["corners"][k]
    return {
        "heat": torch.from_numpy(heat),
        "offset": torch.from_numpy(offset.reshape(1, 2, h, w)),
        "corners": torch.from_numpy(corners.reshape(1, 8, h, w)),
    }


def model_spine(shape=(256, 96)) -> np.ndarray:
    corners = spine_from_tilts(ramp({0: 5.0, 4: 15.0, 11: -12.0, 16: 0.0}), height=8.0, width=14.0, disc=3.0)
    return corners - corners.reshape(-1, 2).mean(0) + [shape[1] / 2, shape[0] / 2]


def test_decode_inverts_the_targets_and_unflip_swaps_left_and_right():
    shape = (256, 96)
    pts = model_spine(shape)
    t = targets(pts, shape, stride=2, sigma=1.0)
    assert t["valid"].all() and t["heat"].max() == 1.0
    assert decode(maps_from_targets(t, shape), stride=2)[0] == pytest.approx(pts, abs=1e-4)
    # The mirrored image's targets (corners swapped so top-left stays top-left), mapped back by unflip.
    mirrored = pts[:, [1, 0, 3, 2]].copy()
    mirrored[..., 0] = shape[1] - mirrored[..., 0]
    back = unflip(maps_from_targets(targets(mirrored, shape, 2, 1.0), shape))
    assert decode(back, stride=2)[0] == pytest.approx(pts, abs=1e-4)


def test_decode_passes_over_a_second_maximum_on_one_vertebra():
    shape = (256, 96)
    pts = model_spine(shape)
    maps = maps_from_targets(targets(pts, shape, stride=2, sigma=1.0), shape)
    # a second peak two cells below T5's (its offsets point at T5's centre), stronger than a weak L5
    heat = maps["heat"].clone()
    cx, cy = np.floor(pts[4].mean(axis=0) / 2).astype(int)
    heat[0, 0, cy + 2, cx] = 5.0
    maps["offset"][0, :, cy + 2, cx] = maps["offset"][0, :, cy, cx] - torch.tensor([0.0, 2.0])
    maps["corners"][0, :, cy + 2, cx] = maps["corners"][0, :, cy, cx]
    lx, ly = np.floor(pts[16].mean(axis=0) / 2).astype(int)
    heat[0, 0, ly, lx] = 3.0
    maps["heat"] = heat
    assert decode(maps, stride=2, min_gap=0.5)[0] == pytest.approx(pts, abs=1e-4)
    wrong = decode(maps, stride=2, min_gap=0.0)[0]  # no gap: T5 twice, one vertebra lost
    assert np.abs(wrong - pts).max() > 5


def test_s_test_smoothing_keeps_a_jittered_straight_spine_straight_and_an_s_spine_s():
    straight = spine_from_tilts(np.zeros(17))
    jitter = np.tile([0.0, 0.3, -0.3], 6)[:17, None, None] * [1.0, 0.0]  # 0.3 px left / right
    assert cobb_angles(straight + jitter, 1000).s_curve  # the literal test: S
    assert not cobb_angles(straight + jitter, 1000, s_smooth=3).s_curve
    s_spine = spine_from_tilts(ramp({0: -10.0, 4: 15.0, 11: -20.0, 16: 5.0}))
    assert cobb_angles(s_spine, 1000).s_curve and cobb_angles(s_spine, 1000, s_smooth=3).s_curve


def test_offsets_taught_around_the_centre_point_back_to_it():
    shape = (256, 96)
    pts = model_spine(shape)
    t = targets(pts, shape, stride=2, sigma=1.0, radius=1)
    assert len(t["index"]) == 17 * 9 and t["valid"].all()
    cells = np.stack([t["index"] % 48, t["index"] // 48], 1)
    centres = np.repeat(pts.mean(axis=1) / 2, 9, axis=0)
    assert cells + t["offset"] == pytest.approx(centres, abs=1e-5)
    assert (np.abs(t["offset"] - 0.5) <= 1.5).all()
    # Decoding averages the estimates of the 3x3 cells around each peak: all agree here.
    assert decode(maps_from_targets(t, shape, radius=1), stride=2, radius=1)[0] == pytest.approx(
        pts, abs=1e-4
    )


def test_the_mirror_augmentation_swaps_left_and_right_corners():
    tc = SimpleNamespace(flip=True, aug_scale=0.0, aug_rotate_deg=0.0, aug_shift=0.0, aug_invert=0.0)
    shape = (256, 96)
    pts = model_spine(shape)
    img = np.zeros(shape, np.float32)
    img[:, :10] = 1.0  # a bright left edge shows whether the image was mirrored
    for seed in range(20):
        out, moved = augment(img, pts, tc, np.random.default_rng(seed))
        if out[:, -5:].mean() > 0.5:  # mirrored
            assert moved[:, 0, 0] == pytest.approx(shape[1] - pts[:, 1, 0], abs=1e-3)  # new top-left
            assert (moved[:, 0, 0] < moved[:, 1, 0]).all()  # left corners stay left of right corners
            assert cobb_angles(moved, 256).angles() == pytest.approx(cobb_angles(pts, 256).angles(), abs=1e-3)
            return
    pytest.fail("no mirrored sample in 20 draws")


# --- generator ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoliosis")
    summary = synth.generate(
        root / "data", 12, 4, seed=3, height=(150, 190), aspect=(2.2, 2.8), color_share=0.5
    )
    return root, summary


def test_generator_writes_the_download_layout(tiny_data):
    root, summary = tiny_data
    data, truth = root / "data", root / "data_truth"
    names = read_filenames(data, "train")
    assert len(names) == 12 and all(" " in n for n in names)  # real names hold spaces
    raw = pd.read_csv(data / "labels/training/landmarks.csv", header=None)
    assert raw.shape == (12, 136) and raw.to_numpy().min() >= 0 and raw.to_numpy().max() <= 1
    assert pd.read_csv(data / "labels/training/angles.csv", header=None).shape == (12, 3)
    assert sorted(p.name for p in (data / "labels/test").iterdir()) == ["filenames.csv"]  # no test labels
    sizes, channels = set(), set()
    for n, points, angles in zip(names, read_landmarks(data), read_angles(data)):
        img = cv2.imread(str(data / "data/training" / n), cv2.IMREAD_UNCHANGED)
        h, w = img.shape[:2]
        sizes.add((h, w))
        channels.add(img.ndim)
        assert 2.1 < h / w < 2.9
        # The labels are the routine's angles of the labelled landmarks, as on the real data.
        assert cobb_angles(points * [w, h], h).angles() == pytest.approx(angles, abs=1e-3)
    assert len(sizes) > 6 and channels == {2, 3}
    test_names = read_filenames(data, "test")
    solution = pd.read_csv(truth / "test_angles.csv")
    assert solution["filename"].tolist() == test_names and list(solution.columns) == ["filename", *ANGLES]
    assert cv2.imread(str(data / "data/test" / test_names[0])) is None  # the corrupt one
    assert summary["corrupt test images"] == 1
    assert json.loads((truth / "summary.json").read_text())["n_test"] == 4


def test_generator_draws_curves_up_to_seventy_degrees():
    rng = np.random.default_rng(0)
    mains = []
    for _ in range(200):
        spine = synth.build_spine(rng, 2500, 1000)
        mains.append(cobb_angles(spine.corners, 2500).mt)
        assert 0 <= spine.corners[..., 1].min() and spine.corners[..., 1].max() <= 2500
    assert min(mains) < 8 and 60 < max(mains) < 85 and np.median(mains) > 15


# --- stages 00-06 on a tiny set ------------------------------------------------------------------------

TINY = [
    "folds.n_folds=2",
    "preprocess.image_size=[128,48]",
    "train.epochs=1",
    "train.batch_size=4",
    "train.width=8",
    "train.torch_threads=1",
]


def test_stages_00_to_06_on_a_tiny_set(tmp_path, stage_script, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["--config", "configs/scoliosis/demo.yaml", f"data_dir={data}", f"out_dir={out}", *TINY]
    stage_script("00_make_demo_data").main(
        [*args, "demo_data.n_train=8", "demo_data.n_test=3", "demo_data.height=[120,160]"]
    )
    broken = read_filenames(data, "train")[2]
    (data / "data/training" / broken).write_bytes(b"not a jpg")  # a bad training file: named, skipped
    pre = stage_script("01_preprocess").main(args)
    assert pre["images"] == {"train": 8, "test": 3}
    assert sorted(f["filename"] for f in pre["failed"]) == sorted([broken, read_filenames(data, "test")[0]])
    loc = stage_script("02_localize").main(args)
    assert loc["images"] == 7 and loc["skipped_unreadable"] == [broken]
    assert set(loc["landmarks"]["model"]) >= {"median_px", "median_pct_height"}
    assert "smape" in loc["angles"]["train_mean"]
    for stage in ("03_crop", "04_train", "05_ensemble"):
        assert stage_script(stage).main(args) in ({}, [])
    assert "nothing to do" in capsys.readouterr().out
    sub = stage_script("06_predict").main(args)
    csv = pd.read_csv(out / "submissions/scoliosis_demo.csv")
    names = read_filenames(data, "test")
    assert csv["filename"].tolist() == names and list(csv.columns) == ["filename", *ANGLES]
    assert csv[ANGLES].iloc[0].to_numpy() == pytest.approx(read_angles(data).mean(0))  # unreadable: mean
    assert [f["filename"] for f in sub["fallback_rows"]] == [names[0]]
    assert set(sub["test"]["heights_median_error_pct"]) == {"spine", "body", "disc"}
    heights = pd.read_csv(out / "submissions/scoliosis_demo_heights.csv")
    assert list(heights.columns) == ["filename", "structure", "measurement", "value", "unit"]
    assert set(heights["filename"]) == set(names[1:]) and set(heights["unit"]) == {"px"}
    scores = stage_script("score").main(
        [
            "--task",
            "scoliosis",
            str(tmp_path / "data_truth/test_angles.csv"),
            str(out / "submissions/scoliosis_demo.csv"),
        ]
    )
    assert scores["smape"] == pytest.approx(sub["test"]["model"]["smape"])
    assert math.isfinite(scores["mae_mt"])
    pngs = stage_script("plot_overlays").main([*args[:2], *args[2:], "--n", "1"])
    assert len(pngs) == 2 and all(p.exists() for p in pngs)
    rows = stage_script("demo_summary").main(args)
    assert [r[1] for r in rows][0].startswith("OOF SMAPE") and all(r[2] is not None for r in rows)
