"""HU windows as channels and the memory-mapped slice reader, on known values."""

import numpy as np
import pytest

from spine.cervical import ct


def test_windows_map_known_hu_values():
    hu = np.array([-2000.0, -500.0, -160.0, 40.0, 240.0, 400.0, 1300.0, 3000.0])
    out = ct.windows(hu, ["bone", "soft"])
    assert out.shape == (2, len(hu)) and out.dtype == np.float32
    # bone: centre 400, width 1800 -> [-500, 1300]
    np.testing.assert_allclose(out[0], [0, 0, 340 / 1800, 540 / 1800, 740 / 1800, 0.5, 1, 1], atol=1e-6)
    # soft: centre 40, width 400 -> [-160, 240]
    np.testing.assert_allclose(out[1], [0, 0, 0, 0.5, 1, 1, 1, 1], atol=1e-6)
    assert ct.window(np.full((2, 3), 40.0), "brain").tolist() == [[0.5] * 3] * 2
    with pytest.raises(KeyError, match="unknown HU window"):
        ct.window(hu, "lung")


def test_stack_reads_only_the_slices_asked_for(tmp_path):
    vol = (np.arange(6 * 4 * 5).reshape(6, 4, 5) - 50).astype(np.int16)
    np.save(tmp_path / "v.npy", vol)
    stack = ct.CTStack(tmp_path / "v.npy")
    assert isinstance(stack._vol, np.memmap)  # nothing is read until asked
    assert stack.shape == (6, 4, 5) and len(stack) == 6
    got = stack.read([4, 1])
    assert got.dtype == np.float32 and not isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, vol[[4, 1]])
    assert stack.read(2).shape == (1, 4, 5)
    np.testing.assert_array_equal(stack.read(slice(1, 3)), vol[1:3])
    w = stack.windowed([0, 5], ["soft", "bone"])
    assert w.shape == (2, 2, 4, 5)
    np.testing.assert_allclose(w[0], ct.window(vol[[0, 5]], "soft"))


def test_interpolation_weights():
    np.testing.assert_allclose(ct.interpolation_weights(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(ct.interpolation_weights(5, 5), np.eye(5))
    np.testing.assert_allclose(ct.interpolation_weights(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    w = ct.interpolation_weights(7, 3)  # a third of an input cell: area weights
    np.testing.assert_allclose(w.sum(1), 1)
    np.testing.assert_allclose(w[0], np.array([1, 1, 1 / 3, 0, 0, 0, 0]) * 3 / 7)


def test_resample_keeps_means_and_shape(tmp_path):
    z = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 6, 6), np.float32) * 10
    np.save(tmp_path / "z.npy", z.astype(np.int16))
    out = ct.resample(ct.CTStack(tmp_path / "z.npy"), (4, 3, 3))
    assert out.shape == (4, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [5, 25, 45, 65])  # the mean of each pair of slices
    up = ct.resample(ct.CTStack(tmp_path / "z.npy"), (16, 12, 12))
    assert up.shape == (16, 12, 12) and np.isclose(up.mean(), z.mean(), atol=0.5)
