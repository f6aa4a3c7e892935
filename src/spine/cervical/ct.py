"""CT intensities as model inputs: HU windows as channels, read from the cached stacks slice by slice.

A window (centre, width) in Hounsfield units maps [centre - width/2, centre + width/2] linearly onto
[0, 1] and clips outside it. Several windows of the same slices, stacked as channels, let a model see
bone detail and soft tissue at once without learning the HU scale itself.

``CTStack`` memory-maps a cached int16 HU volume (stage 01) and reads only the slices asked for, so a
loader holds at most one study's slices at a time, never a whole study list.
"""

from __future__ import annotations

from pathlib import Path

import cv2
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

    def windowed(self, index, names) -> np.ndarray:
        """The named windows of slices ``index``: float32 (C, k, rows, cols)."""
        return windows(self.read(index), names)


def interpolation_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights that resample n_in samples to n_out with pixel centres preserved.

    Downsampling averages each output's footprint (the overlap length of input cells with it, like
    cv2's INTER_AREA), so a thin bone between two output planes is kept, not skipped. Upsampling
    interpolates linearly. Rows sum to 1.
    """
    w = np.zeros((n_out, n_in), dtype=np.float64)
    if n_out <= n_in:
        edges = np.arange(n_out + 1) * n_in / n_out
        for j in range(n_out):
            lo, hi = edges[j], edges[j + 1]
            for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                w[j, i] = min(hi, i + 1) - max(lo, i)
    else:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        np.add.at(w, (np.arange(n_out), lo), 1 - (pos - lo))
        np.add.at(w, (np.arange(n_out), hi), pos - lo)
    return w / w.sum(1, keepdims=True)


def resample(stack: CTStack, shape: tuple[int, int, int]) -> np.ndarray:
    """The stack's HU resampled to ``shape`` (D, H, W): float32, read a few slices at a time.

    Along the slices by ``interpolation_weights``; in-plane with cv2 (area when shrinking, linear when
    growing). Peak memory is the output plus the few input slices of one output plane.
    """
    d, h, w = (int(s) for s in shape)
    weights = interpolation_weights(len(stack), d)
    out = np.empty((d, h, w), dtype=np.float32)
    inter = cv2.INTER_AREA if h <= stack.shape[1] else cv2.INTER_LINEAR
    for j in range(d):
        idx = np.flatnonzero(weights[j])
        plane = np.tensordot(weights[j, idx].astype(np.float32), stack.read(idx), axes=1)
        out[j] = cv2.resize(plane, (w, h), interpolation=inter)
    return out
