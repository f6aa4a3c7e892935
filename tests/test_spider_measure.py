"""SPIDER measurements (spine.spider.measure): known shapes drawn here, then the generator's true masks."""

import numpy as np
import pandas as pd
import pytest

from spine.spider import io, synth
from spine.spider import labels as lab
from spine.spider.measure import genant, herniation_probability, measure, meyerding

PIXEL = 0.2  # mm: fine enough that the drawn polygons are exact to ~0.1 mm


def _frame(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Superior axis u and posterior axis n, (row, column) mm, of a frame tilted forward by ``tilt_deg``."""
    th = np.radians(tilt_deg)
    return np.array([-np.cos(th), -np.sin(th)]), np.array([-np.sin(th), np.cos(th)])


def _quad(centre, tilt_deg: float, depth: float, h_ant: float, h_post: float) -> np.ndarray:
    """Corners (superior-anterior, superior-posterior, inferior-posterior, inferior-anterior), (row, col)
    mm, of a body whose heights are h_ant / h_post 10 % inside its walls (straight rims, walls along u)."""
    u, n = _frame(tilt_deg)
    slope = (h_post - h_ant) / (0.8 * depth)
    mid = 0.5 * (h_ant + h_post)
    out = []
    for p, sign in ((-depth / 2, 1), (depth / 2, 1), (depth / 2, -1), (-depth / 2, -1)):
        out.append(np.asarray(centre) + p * n + sign * 0.5 * (mid + slope * p) * u)
    return np.array(out)


def _fill(img: np.ndarray, corners_mm: np.ndarray, value: int) -> None:
    """Label the pixels whose centres lie inside a convex polygon (corners in order, (row, col) mm)."""
    rows, cols = np.mgrid[: img.shape[0], : img.shape[1]] * PIXEL
    inside = np.ones(img.shape, dtype=bool)
    centre = corners_mm.mean(0)
    for a, b in zip(corners_mm, np.roll(corners_mm, -1, axis=0), strict=True):
        normal = np.array([-(b - a)[1], (b - a)[0]])
        normal = normal if normal @ (centre - a) > 0 else -normal
        inside &= (rows - a[0]) * normal[0] + (cols - a[1]) * normal[1] > 0
    img[inside] = value


def _spine(bodies: list[dict], disc_mm: float = 10.0, size_mm: float = 240.0):
    """Label image of a stack of bodies, bottom up (L5 first), each sitting on the one below with a disc
    of ``disc_mm`` (at the facing corners' mid points); the sacrum is a block under the lowest disc,
    unlabelled as in SPIDER. Returns (labels, corners by name)."""
    img = np.zeros((int(size_mm / PIXEL),) * 2, dtype=np.uint8)
    sacrum = _quad((200.07, 120.03), bodies[0].get("sacrum_tilt", 0.0), 36.0, 30.0, 30.0)
    corners = {"S1": sacrum}
    below = sacrum
    for j, b in enumerate(bodies, start=1):
        u, n = _frame(b["tilt"])
        top_mid = (below[0] + below[1]) / 2
        base = (
            top_mid
            + disc_mm * u
            - b.get("slip", 0.0) * (below[1] - below[0]) / np.linalg.norm(below[1] - below[0])
        )
        height_mid = 0.5 * (b["h_ant"] + b["h_post"])
        q = _quad(base + 0.5 * height_mid * u, b["tilt"], b.get("depth", 36.0), b["h_ant"], b["h_post"])
        corners[f"L{6 - j}"] = q
        disc = np.array([q[3], q[2], below[1], below[0]])
        _fill(img, disc, lab.DISC_OFFSET + j)
        _fill(img, q, j)
        below = q
    return img, corners


def _values(table: pd.DataFrame) -> dict:
    return {(r.structure, r.measurement): r.value for r in table.itertuples()}


def test_rules():
    """Genant, Meyerding and the herniation probability follow DOMAIN.md's cut points."""
    assert genant(20.0, 20.0, 20.0, 20.0)[1:] == (0, 0)
    assert genant(14.0, 19.0, 20.0, 20.0)[1:] == (2, 1)  # 30 % anterior loss: wedge, grade 2
    assert genant(20.0, 11.0, 20.0, 20.0)[1:] == (3, 2)  # 45 % middle loss: biconcave, grade 3
    assert genant(15.5, 15.5, 15.5, 20.0)[1:] == (1, 3)  # 22.5 % loss against the others: crush, grade 1
    assert [meyerding(v) for v in (-10, 2, 10, 30, 60, 80, 110)] == [0, 0, 1, 2, 3, 4, 5]
    assert herniation_probability(1.5) == pytest.approx(0.5)
    assert herniation_probability(4.0) > 0.99 > 0.05 > herniation_probability(0.0)


def test_known_shapes():
    """Upright rectangles: heights, disc heights, no slip, no lordosis, a straight curve."""
    bodies = [dict(tilt=0.0, h_ant=26.0, h_post=26.0) for _ in range(5)]
    img, corners = _spine(bodies)
    got = _values(measure(img, (PIXEL, PIXEL)).table)
    for name in lab.LUMBAR:
        for w in ("anterior", "middle", "posterior"):
            assert got[(name, f"{w}_height")] == pytest.approx(26.0, abs=0.15)
        assert got[(name, "genant_grade")] == 0
    for level in lab.LEVELS:
        assert got[(level, "middle_height")] == pytest.approx(10.0, abs=0.15)
        assert got[(level, "anterior_distance")] == pytest.approx(10.0, abs=0.3)
        assert got[(level, "listhesis_mm")] == pytest.approx(0.0, abs=0.3)
        assert got[(level, "herniation_mm")] < 0.4
        assert got[(level, "height_index")] == pytest.approx(10.0 / 26.0, abs=0.02)
    assert got[("spine", "lordosis_deg")] == pytest.approx(0.0, abs=0.5)
    assert got[("spine", "curve_area_mm2")] < 20.0
    # L1 centre to S1's superior endplate centre: 4 bodies + 4.5 discs + half a body ... straight
    assert got[("spine", "curve_length_mm")] == pytest.approx(4 * 36.0 + 13.0 + 10.0, abs=1.0)


def test_wedge_slip_and_lordosis():
    """A wedge fracture (30 % anterior loss), a 9 mm forward slip of L4 on L5 and a lordosis of 30 deg."""
    tilts = [-5.0, -12.0, -18.0, -24.0, -30.0]  # L5 .. L1: the superior rims turn back going up
    bodies = [dict(tilt=t, h_ant=26.0, h_post=26.0) for t in tilts]
    bodies[2].update(h_ant=0.7 * 26.0)  # L3: wedge
    bodies[1]["slip"] = 9.0  # L4 slipped forward on L5
    img, corners = _spine(bodies, disc_mm=11.0)
    got = _values(measure(img, (PIXEL, PIXEL)).table)
    assert got[("L3", "anterior_height")] == pytest.approx(0.7 * 26.0, abs=0.2)
    assert got[("L3", "posterior_height")] == pytest.approx(26.0, abs=0.2)
    assert (got[("L3", "genant_grade")], got[("L3", "genant_type")]) == (2, 1)
    for upper, lower in (("L4", "L5"), ("L3", "L4")):
        # the slip drawn plus what the two bodies' different tilts add: from the drawn corners
        up, lp, la = corners[upper][2], corners[lower][1], corners[lower][0]
        e = (lp - la) / np.linalg.norm(lp - la)
        slip = float((lp - up) @ e)
        assert got[(f"{upper}/{lower}", "listhesis_mm")] == pytest.approx(slip, abs=0.5)
        assert got[(f"{upper}/{lower}", "listhesis_percent")] == pytest.approx(
            100 * slip / np.linalg.norm(lp - la), abs=1.5
        )
    assert got[("L4/L5", "meyerding_grade")] == 1
    # L1's superior rim is tilted by -30 deg plus its own wedge (none), S1's by 0: lordosis 30 deg
    assert got[("spine", "lordosis_deg")] == pytest.approx(30.0, abs=1.0)


def test_the_posterior_arch_in_a_vertebra_label_changes_nothing():
    """SPIDER labels whole vertebrae: on a mid-sagittal slice the lamina and spinous process lie behind
    the canal, apart from the body, and are set aside (the body is the piece nearest a disc)."""
    bodies = [dict(tilt=t, h_ant=26.0, h_post=26.0) for t in (-5.0, -12.0, -18.0, -24.0, -30.0)]
    bodies[2].update(h_ant=0.7 * 26.0)
    img, corners = _spine(bodies, disc_mm=11.0)
    whole = img.copy()
    for label, name in enumerate(("L5", "L4", "L3", "L2", "L1"), start=1):
        c = corners[name]  # superior-anterior, superior-posterior, inferior-posterior, inferior-anterior
        n = (c[1] - c[0]) / np.linalg.norm(c[1] - c[0])  # posterior
        u = (c[0] - c[3]) / np.linalg.norm(c[0] - c[3])  # superior
        start = (c[1] + c[2]) / 2 + 15.0 * n  # 15 mm behind the posterior wall: the canal between
        arch = np.array([start + 5 * u, start + 30 * n + 5 * u, start + 30 * n - 8 * u, start - 5 * u])
        _fill(whole, arch, label)
    assert (whole != img).sum() > 0.5 * (img == 3).sum()  # each arch about half a body's area, or more
    assert _values(measure(whole, (PIXEL, PIXEL)).table) == pytest.approx(
        _values(measure(img, (PIXEL, PIXEL)).table), nan_ok=True
    )


def test_a_herniation_at_l5_s1_is_not_a_slip():
    """S1 has no label: its posterior corner is where the disc's lower face ends, not the disc's end a
    little above the face, where a herniation bulges back (it read as a 4-7 mm listhesis before)."""
    img, corners = _spine([dict(tilt=0.0, h_ant=26.0, h_post=26.0) for _ in range(5)], disc_mm=8.0)
    lp, up = corners["S1"][1], corners["L5"][2]  # the disc's posterior corners, below and above
    back = (lp - corners["S1"][0]) / np.linalg.norm(lp - corners["S1"][0])
    # a 5 mm bump over the middle 80 % of the disc's posterior edge, tapering to both corners
    bump = [lp + f * (up - lp) + h * back for f, h in ((0.1, 0.0), (0.3, 5.0), (0.7, 5.0), (0.9, 0.0))]
    _fill(img, np.array(bump), lab.DISC_OFFSET + 1)
    got = _values(measure(img, (PIXEL, PIXEL)).table)
    assert got[("L5/S1", "herniation_mm")] == pytest.approx(5.0, abs=0.5)
    assert got[("L5/S1", "listhesis_mm")] == pytest.approx(0.0, abs=0.3)


def _coarse(fine: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of k x k blocks of a fine label image (the most common label) and the vertebra and disc
    class margins (share of the block's pixels in the class minus the largest other class's share), as a
    segmenter's probabilities would give them."""
    rows, cols = (s // k * k for s in fine.shape)
    blocks = (
        fine[:rows, :cols]
        .reshape(rows // k, k, cols // k, k)
        .transpose(0, 2, 1, 3)
        .reshape(rows // k, cols // k, -1)
    )
    values = np.unique(blocks)
    counts = np.stack([(blocks == v).sum(-1) for v in values])
    labels = values[counts.argmax(0)]
    cls = (
        np.stack(
            [(counts[(values >= lo) & (values <= hi)]).sum(0) for lo, hi in ((0, 0), (1, 25), (201, 225))]
        )
        / k**2
    )
    margins = np.stack([cls[c] - np.delete(cls, c, axis=0).max(0) for c in (1, 2)])
    return labels, margins


def test_class_margins_place_edges_between_voxels():
    """On 1.8 mm voxels the labels round every edge to a voxel; with the segmenter's class margins the
    edges fall where the classes cross, between voxels (heights and slips to ~0.3 mm)."""
    bodies = [dict(tilt=t, h_ant=26.0, h_post=26.0) for t in (-5.0, -12.0, -18.0, -24.0, -30.0)]
    bodies[1]["slip"] = 6.0
    fine, corners = _spine(bodies, disc_mm=10.0)
    labels, margins = _coarse(fine, 9)
    hard = _values(measure(labels, (9 * PIXEL,) * 2).table)
    soft = _values(measure(labels, (9 * PIXEL,) * 2, margins=margins).table)
    truth = _values(measure(fine, (PIXEL, PIXEL)).table)
    keys = [(n, f"{w}_height") for n in lab.LUMBAR for w in ("anterior", "middle", "posterior")]
    keys += [(lv, "listhesis_mm") for lv in lab.LEVELS]
    err = lambda got: np.median([abs(got[k] - truth[k]) for k in keys])
    assert err(soft) <= 0.3 < err(hard)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """3 patients (7 images) at 192 px (~1.5 mm pixels), with their true masks."""
    out = tmp_path_factory.mktemp("spider") / "data"
    synth.generate(out, 2, 1, seed=3, image_size=192, fov_mm=(270, 300), n_slices=(9, 11))
    return out


def test_generator_masks_match_truth(generated):
    """On the generator's true masks: heights median error <= 1 mm, lordosis <= 3 deg, listhesis <= 1 mm."""
    truth = generated.parent / "data_truth"
    images = pd.read_csv(truth / "images.csv")
    rows = []
    for im in images.itertuples():
        path = generated / "masks" / f"{im.image}.mha"
        path = path if path.exists() else truth / "masks" / f"{im.image}.mha"
        c = io.read_canonical(path)
        rows.append(measure(c.array, c.spacing, n_lumbar=int(im.n_lumbar)).table.assign(image=im.image))
    got = pd.concat(rows)
    want = pd.read_csv(truth / "measurements.csv")
    both = want.merge(got, on=["image", "structure", "measurement"], suffixes=("_true", "_pred"))
    assert len(both) == len(want)  # every true row was measured
    err = (both["value_pred"] - both["value_true"]).abs().groupby(both["measurement"]).median()
    assert err[["anterior_height", "middle_height", "posterior_height"]].max() <= 1.0
    assert err["lordosis_deg"] <= 3.0
    assert err["listhesis_mm"] <= 1.0
    assert err["herniation_mm"] <= 1.0
