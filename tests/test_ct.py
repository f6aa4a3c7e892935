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


def test_axis_weights_by_position():
    # downsampling: a tent as wide as the output step, rows sum to 1
    w = ct.axis_weights([0.0, 1.0, 2.0, 3.0], [0.5, 2.5])
    np.testing.assert_allclose(w.sum(1), 1)
    np.testing.assert_allclose(w[0], np.array([3, 3, 1, 0]) / 7)  # distances 0.5, 0.5, 1.5, 2.5 of reach 2
    # upsampling: linear interpolation between the two nearest samples
    np.testing.assert_allclose(ct.axis_weights([0.0, 2.0], [0.5, 1.0]), [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_allclose(ct.axis_weights([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]), np.eye(3))
    # an output beyond the scanned extent gets nothing
    assert ct.axis_weights([0.0, 1.0], [5.0]).sum() == 0
    # the same physical grid from 0.5 mm or 1.25 mm slices: the weights follow mm, not slice counts
    fine, coarse = (
        ct.axis_weights(np.arange(0, 20, 0.5), [10.0]),
        ct.axis_weights(np.arange(0, 20, 1.25), [10.0]),
    )
    assert np.isclose(fine @ np.arange(0, 20, 0.5), 10.0) and np.isclose(
        coarse @ np.arange(0, 20, 1.25), 10.0
    )


def test_resample_hu_and_labels(tmp_path):
    z = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 6, 6), np.float32) * 10
    np.save(tmp_path / "z.npy", z.astype(np.int16))
    stack = ct.CTStack(tmp_path / "z.npy")
    wz = ct.axis_weights(np.arange(8.0), [1.5, 5.5, 9.5, 13.5])  # the last plane lies beyond reach
    wr = ct.axis_weights(np.arange(6.0), [1.0, 4.0, 10.0])  # so does the last row
    wc = ct.axis_weights(np.arange(6.0), [1.0, 4.0])
    out = ct.resample_hu(stack, wz, wr, wc)
    assert out.shape == (4, 3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:3, 0, 0], wz[:3] @ z[:, 0, 0], rtol=1e-5)  # the tent mean per plane
    assert 10 < out[0, 0, 0] < 30 and 50 < out[1, 0, 0] < 60  # around 15 and 55 HU
    assert (out[3] == ct.AIR_HU).all() and (out[:, 2] == ct.AIR_HU).all()  # outside: air
    labels = np.zeros((8, 6, 6), dtype=np.uint8)
    labels[4:, :, :3] = 2
    lab = ct.resample_labels(labels, 3, wz, wr, wc)
    assert lab.shape == (4, 3, 2) and lab[1, 0].tolist() == [2, 0] and lab[0, 0].tolist() == [0, 0]
    assert not lab[3].any() and not lab[:, 2].any()  # outside: background
    np.testing.assert_array_equal(stack.reformat("sagittal", 2), z[:, :, 2])
    np.testing.assert_array_equal(stack.reformat("coronal", 5), z[:, 5, :])
    with pytest.raises(KeyError, match="unknown reformat"):
        stack.reformat("axial", 0)
