"""CT intensities as model inputs: HU windows as channels, read from the cached stacks slice by slice.

A window (centre, width) in Hounsfield units maps [centre - width/2, centre + width/2] linearly onto
[0, 1] and clips outside it. Several windows of the same slices, stacked as channels, let a model see
bone detail and soft tissue at once without learning the HU scale itself.

``CTStack`` memory-maps a cached int16 HU volume (stage 01) and reads only the slices asked for, so a
loader holds at most one study's slices at a time, never a whole study list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# name -> (centre, width) in HU
WINDOWS = {
    "bone": (400.0, 1800.0),  # cortical and cancellous bone apart, fracture clefts visible
    "soft": (40.0, 400.0),  # soft tissue, discs, the canal
    "brain": (40.0, 80.0),  # narrow: fluid against tissue
    "wide": (500.0, 3000.0),  # air to dense bone, nothing clipped but metal
}


def window(volume_hu: np.ndarray, name: str) -> np.ndarray:
    """One named window of HU values → float32 in [0, 1], same shape."""
    if name not in WINDOWS:
        raise KeyError(f"unknown HU window {name!r}; known: {sorted(WINDOWS)}")
    centre, width = WINDOWS[name]
    lo = centre - width / 2
    out = (np.asarray(volume_hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def windows(volume_hu: np.ndarray, names) -> np.ndarray:
    """The named windows of HU values as channels: float32 (C, *volume_hu.shape) in [0, 1]."""
    return np.stack([window(volume_hu, n) for n in names])


class CTStack:
    """A cached HU volume (slices, rows, cols), memory-mapped; reads copy only the slices asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._vol = np.load(self.path, mmap_mode="r")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._vol.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index) -> np.ndarray:
        """HU of the slices ``index`` (an int, a slice or a list of ints) as float32 (k, rows, cols)."""
        idx = np.atleast_1d(np.arange(len(self))[index])
        return np.asarray(self._vol[idx], dtype=np.float32)

    def reformat(self, axis: str, index: int) -> np.ndarray:
        """HU of one plane across all slices: ``sagittal`` (a column: slices x rows) or ``coronal`` (a
        row: slices x cols), float32."""
        planes = {"sagittal": lambda v: v[:, :, index], "coronal": lambda v: v[:, index, :]}
        if axis not in planes:
            raise KeyError(f"unknown reformat {axis!r}; known: {sorted(planes)}")
        return np.asarray(planes[axis](self._vol), dtype=np.float32)

    def windowed(self, index, names) -> np.ndarray:
        """The named windows of slices ``index``: float32 (C, k, rows, cols)."""
        return windows(self.read(index), names)


AIR_HU = -1000.0  # what a resampled voxel outside the scanned volume holds


def axis_weights(src_mm, dst_mm) -> np.ndarray:
    """(len(dst), len(src)) weights that resample samples at positions ``src_mm`` to ``dst_mm`` (mm).

    A tent kernel whose half-width is the coarser of the two sample spacings: linear interpolation
    when ``dst`` is finer, an anti-aliased average over each output's footprint when it is coarser (a
    thin bone between two output planes is kept, not skipped). Positions, not indices, so a study's
    slice spacing and count never change the scale. Rows sum to 1; a row with no source within reach
    (outside the scanned extent) is all zero.
    """
    src, dst = np.asarray(src_mm, dtype=np.float64), np.asarray(dst_mm, dtype=np.float64)
    reach = max(_step(src), _step(dst))
    w = np.clip(1.0 - np.abs(dst[:, None] - src[None, :]) / reach, 0.0, None)
    total = w.sum(1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def _step(pos: np.ndarray) -> float:
    """The median spacing of sorted positions (1 for a single sample)."""
    gaps = np.diff(np.sort(pos))
    gaps = gaps[gaps > 1e-6]
    return float(np.median(gaps)) if len(gaps) else 1.0


def resample_hu(stack: CTStack, wz: np.ndarray, wr: np.ndarray, wc: np.ndarray) -> np.ndarray:
    """The stack's HU on a grid given per-axis weights (``axis_weights``: grid from stack along slices,
    rows and columns): float32 (D, H, W), AIR_HU outside the scanned volume. Reads only the few slices
    of one grid plane at a time."""
    out = np.full((len(wz), len(wr), len(wc)), AIR_HU, dtype=np.float32)
    inside = (wr.sum(1) > 0)[:, None] & (wc.sum(1) > 0)[None, :]
    wr32, wc32 = wr.astype(np.float32), wc.astype(np.float32).T
    for j in range(len(wz)):
        idx = np.flatnonzero(wz[j])
        if not len(idx):
            continue
        plane = np.tensordot(wz[j, idx].astype(np.float32), stack.read(idx), axes=1)
        out[j] = np.where(inside, wr32 @ plane @ wc32, AIR_HU)
    return out


def resample_labels(
    labels: np.ndarray, n_labels: int, wz: np.ndarray, wr: np.ndarray, wc: np.ndarray
) -> np.ndarray:
    """Integer labels (slices, rows, cols) on a grid by the same weights: per grid voxel, the label
    covering most of it (a weighted vote); 0 outside the scanned volume. uint8 (D, H, W)."""
    out = np.zeros((len(wz), len(wr), len(wc)), dtype=np.uint8)
    wr32, wc32 = wr.astype(np.float32), wc.astype(np.float32).T
    for j in range(len(wz)):
        idx = np.flatnonzero(wz[j])
        if not len(idx):
            continue
        w = wz[j, idx].astype(np.float32)
        votes = [
            wr32 @ np.tensordot(w, (labels[idx] == c).astype(np.float32), 1) @ wc32 for c in range(n_labels)
        ]
        out[j] = np.argmax(votes, 0)
    return out
