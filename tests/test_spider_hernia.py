"""The per-disc herniation classifier's inputs and outputs: the public gradings file, the patch geometry
on a tilted disc, and the measurement rows its probabilities replace."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from spine.spider import hernia

HC = OmegaConf.create(dict(context=1, context_mm=3.0, offset_mm=20.0, patch_mm=1.0, patch_px=20, jitter_px=2))


def test_gradings_as_the_public_file(tmp_path):
    pd.DataFrame(
        {"Patient": [7, 7, 9], "IVD label": [1, 2, 1], "Modic": [0, 1, 0], "Disc herniation": [0, 1, 1]}
    ).to_csv(tmp_path / hernia.GRADINGS, index=False)
    g = hernia.load_gradings(tmp_path)
    assert g.to_dict("records") == [
        {"patient": "7", "disc": 201, "herniation": 0},  # IVD label 1 = L5/S1 = SPIDER mask label 201
        {"patient": "7", "disc": 202, "herniation": 1},
        {"patient": "9", "disc": 201, "herniation": 1},
    ]
    pd.DataFrame({"Patient": [7], "IVD label": [1]}).to_csv(tmp_path / hernia.GRADINGS, index=False)
    with pytest.raises(ValueError, match=r"radiological_gradings.csv: columns \['Disc herniation'\] missing"):
        hernia.load_gradings(tmp_path)


@pytest.mark.parametrize("tilt_deg", [0.0, 25.0, -20.0])
def test_patch_runs_along_the_disc_offset_mm_behind_its_centroid(tilt_deg):
    # a 40 x 8 mm disc (label 201) on 3 slices of 0.5 mm pixels, tilted, its centre at (40, 30) mm;
    # the image is 1 inside the disc and 0 outside; the patch centre 20 mm behind the centroid is the
    # disc's posterior edge
    spacing = (4.0, 0.5, 0.5)
    rows, cols = np.mgrid[0:160, 0:160] * 0.5
    t = np.deg2rad(tilt_deg)
    along = (cols - 30) * np.cos(t) + (rows - 40) * np.sin(t)  # toward posterior (+column)
    across = -(cols - 30) * np.sin(t) + (rows - 40) * np.cos(t)
    disc2d = (np.abs(along) <= 20) & (np.abs(across) <= 4)
    labels = np.repeat(np.where(disc2d, 201, 0)[None], 3, axis=0).astype(np.int16)
    labels[:, 100:120, 20:50] = 1  # a vertebral body in the mid-sagittal choice
    image = (labels == 201).astype(np.float32)
    _, frames = hernia.disc_frames(labels, spacing)
    centroid, axis, normal = frames[201]
    assert np.allclose(centroid, [40, 30], atol=0.3)
    assert np.allclose(axis, [np.sin(t), np.cos(t)], atol=0.01)
    assert axis[1] > 0 and normal[0] < 0  # posterior along the disc, superior across it
    patch = hernia.disc_patches(image, labels, spacing, HC)[201]
    side = HC.patch_px + 2 * HC.jitter_px
    assert patch.shape == (3, side, side)
    mid = side // 2
    assert (patch[:, mid, : mid - 2] > 0.9).all()  # anterior of the edge: inside the disc
    assert (patch[:, mid, mid + 2 :] < 0.1).all()  # posterior of it: outside
    assert (patch[:, :5, :] < 0.1).all() and (patch[:, -5:, :] < 0.1).all()  # beyond the disc's 8 mm


def test_probabilities_replace_the_rule_on_lumbar_levels():
    table = pd.DataFrame(
        [
            ("L4/L5", "herniation_probability", 0.1, "prob"),
            ("L4/L5", "herniation_mm", 0.3, "mm"),
            ("L5/S1", "herniation_probability", 0.2, "prob"),
        ],
        columns=["structure", "measurement", "value", "unit"],
    )
    out = hernia.with_probabilities(table, {202: 0.9, 203: 0.7, 206: 0.5}, n_lumbar=5)
    got = {(s, m): v for s, m, v in zip(out["structure"], out["measurement"], out["value"])}
    assert got == {
        ("L4/L5", "herniation_probability"): 0.9,
        ("L4/L5", "herniation_mm"): 0.3,  # the measured protrusion stays
        ("L5/S1", "herniation_probability"): 0.2,  # no patch for this disc: the rule's value stays
        ("L3/L4", "herniation_probability"): 0.7,  # a disc the measurements missed gets its row
    }  # 206 (T12/L1) is not a measured level
    assert hernia.with_probabilities(table, {}, 5).equals(table)


def test_api_measurements_take_the_runs_classifiers(tmp_path):
    """What the lumbar task gets through ``spine.spider.api``: the run's classifiers' probabilities when it
    has classifiers, the rule's when it has none; every other measurement the same either way."""
    import torch

    from spine.core.config import REPO_ROOT, load_config
    from spine.core.synth import generate
    from spine.spider import api, io
    from spine.spider.measure import measure_table

    generate("spider", tmp_path / "spider", 1, 0, seed=2, image_size=96, n_slices=[9, 9])
    name = sorted((tmp_path / "spider/images").glob("*.mha"))[0].name
    img = io.read_canonical(tmp_path / "spider/images" / name)
    labels = io.read_canonical(tmp_path / "spider/masks" / name).array
    cfg = load_config(REPO_ROOT / "configs/spider/demo.yaml", [])
    torch.manual_seed(0)
    net = hernia.HerniaNet(cfg.hernia).eval()
    cpu = torch.device("cpu")
    with_net = api.measure_labels(
        labels, img.spacing, api.Segmenter(cfg, [], cpu, tmp_path, [net]), img.array
    )
    without = api.measure_labels(labels, img.spacing, api.Segmenter(cfg, [], cpu, tmp_path, []), img.array)
    assert without.equals(measure_table(labels, img.spacing, cfg))
    probs = hernia.disc_probabilities([net], img.array, labels, img.spacing, cfg.hernia, cpu)
    got = with_net.set_index(["structure", "measurement"])["value"]
    lumbar = {d: p for d, p in probs.items() if d - hernia.lab.DISC_OFFSET <= 5}
    assert len(lumbar) >= 4
    for disc, p in lumbar.items():
        assert got[(hernia.lab.disc_name(disc, 5), "herniation_probability")] == pytest.approx(p)
    rest = lambda t: t[t["measurement"] != "herniation_probability"].reset_index(drop=True)
    assert rest(with_net).equals(rest(without))
