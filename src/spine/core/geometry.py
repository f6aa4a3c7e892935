"""DICOM geometry as small pure functions.

Conventions (DICOM, patient LPS millimetres):
- ImageOrientationPatient (IOP) = (row_dir, col_dir): ``row_dir`` is the direction in which the
  column index grows along a row, ``col_dir`` the direction in which the row index grows.
- PixelSpacing = (spacing between rows, spacing between columns).
- A pixel (row r, column c) of a slice sits at ``IPP + c * dc * row_dir + r * dr * col_dir``.
- The slice normal is ``row_dir x col_dir``; slices are ordered by ``IPP . normal``.
"""

from __future__ import annotations

import numpy as np


def _as_iop(iop) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray(iop, dtype=np.float64)
    return iop[..., :3], iop[..., 3:6]


def slice_normal(iop) -> np.ndarray:
    """Unit normal of the plane(s) given by IOP, shape (..., 3)."""
    r, c = _as_iop(iop)
    # written out: np.cross costs ~50 us on 3-vectors, and stage 01 calls this per stack
    n = np.stack(
        [
            r[..., 1] * c[..., 2] - r[..., 2] * c[..., 1],
            r[..., 2] * c[..., 0] - r[..., 0] * c[..., 2],
            r[..., 0] * c[..., 1] - r[..., 1] * c[..., 0],
        ],
        axis=-1,
    )
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def pixel_to_patient(row, col, ipp, iop, spacing) -> np.ndarray:
    """Patient coordinates (mm, LPS) of pixel centres (row, col) on a slice; shape (..., 3)."""
    r_dir, c_dir = _as_iop(iop)
    ipp = np.asarray(ipp, dtype=np.float64)
    dr, dc = np.asarray(spacing, dtype=np.float64)[..., 0], np.asarray(spacing, dtype=np.float64)[..., 1]
    row = np.asarray(row, dtype=np.float64)[..., None]
    col = np.asarray(col, dtype=np.float64)[..., None]
    return ipp + col * dc[..., None] * r_dir + row * dr[..., None] * c_dir


def patient_to_pixel(point, ipp, iop, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project patient points onto slice plane(s).

    Returns (row, col, distance): fractional pixel coordinates of the orthogonal projection and
    the signed distance in mm from the plane along its normal. Broadcasts over points and slices.
    """
    r_dir, c_dir = _as_iop(iop)
    d = np.asarray(point, dtype=np.float64) - np.asarray(ipp, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    col = (d * r_dir).sum(-1) / spacing[..., 1]
    row = (d * c_dir).sum(-1) / spacing[..., 0]
    dist = (d * slice_normal(iop)).sum(-1)
    return row, col, dist


def slice_positions(ipp, iop) -> np.ndarray:
    """Position of each slice along its normal: ``IPP . normal`` (mm)."""
    return (np.asarray(ipp, dtype=np.float64) * slice_normal(iop)).sum(-1)


def order_by_position(ipp, iop) -> np.ndarray:
    """Indices that sort slices by position along the normal (ascending), stable for ties."""
    return np.argsort(slice_positions(ipp, iop), kind="stable")


def nearest_slice(point, ipp, iop) -> tuple[int, float]:
    """Index of the slice whose plane is nearest to ``point`` and the absolute distance (mm).

    ``ipp`` is (n, 3); ``iop`` is (6,) or (n, 6), so tilted blocks with their own orientation
    are handled slice by slice.
    """
    _, _, dist = patient_to_pixel(np.asarray(point, dtype=np.float64)[None], ipp, iop, np.ones(2))
    k = int(np.argmin(np.abs(dist)))
    return k, float(abs(dist[k]))


def orientation_class(iop) -> str:
    """'sagittal', 'coronal' or 'axial' by the dominant component of the slice normal."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(slice_normal(iop))))]


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation matrix about a unit ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
