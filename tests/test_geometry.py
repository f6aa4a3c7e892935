"""Geometry functions against answers worked out by hand."""

import numpy as np
import pytest

from spine.core import geometry as g

SAG_IOP = [0, 1, 0, 0, 0, -1]  # rows run posterior, columns run inferior
AX_IOP = [1, 0, 0, 0, 1, 0]


def test_pixel_to_patient_sagittal_known_answer():
    p = g.pixel_to_patient(20, 30, ipp=[10, -100, 100], iop=SAG_IOP, spacing=[0.5, 0.8])
    assert np.allclose(p, [10, -100 + 30 * 0.8, 100 - 20 * 0.5])


def test_patient_to_pixel_inverts_and_gives_plane_distance():
    row, col, dist = g.patient_to_pixel([13, -76, 90], ipp=[10, -100, 100], iop=SAG_IOP, spacing=[0.5, 0.8])
    assert (row, col, dist) == pytest.approx((20, 30, -3))  # this plane's normal is (0,1,0)x(0,0,-1) = -x


def test_tilted_plane_round_trip():
    rot = g.rotation([1, 0, 0], 17)
    iop = np.concatenate([rot @ [1, 0, 0], rot @ [0, 1, 0]])
    ipp = np.array([-80.0, -60.0, 12.0])
    pt = g.pixel_to_patient(41.5, 77.25, ipp, iop, [0.6, 0.6]) + 2.5 * g.slice_normal(iop)
    row, col, dist = g.patient_to_pixel(pt, ipp, iop, [0.6, 0.6])
    assert (row, col, dist) == pytest.approx((41.5, 77.25, 2.5))
    assert g.orientation_class(iop) == "axial"


def test_order_and_nearest_slice_with_reversed_stack_and_mixed_orientations():
    z = np.array([40.0, 36.0, 32.0, 28.0])  # instance order runs downwards
    ipp = np.stack([np.zeros(4), np.zeros(4), z], 1)
    assert g.order_by_position(ipp, AX_IOP).tolist() == [3, 2, 1, 0]
    tilt = np.concatenate([g.rotation([1, 0, 0], 30) @ [1, 0, 0], g.rotation([1, 0, 0], 30) @ [0, 1, 0]])
    iops = np.array([AX_IOP, AX_IOP, tilt, AX_IOP], dtype=float)
    k, d = g.nearest_slice([0, 0, 33.0], ipp, iops)
    assert k == 2 and d == pytest.approx(np.cos(np.deg2rad(30)) * 1.0)


def test_orientation_classes():
    assert g.orientation_class(SAG_IOP) == "sagittal"
    assert g.orientation_class([1, 0, 0, 0, 0, -1]) == "coronal"
