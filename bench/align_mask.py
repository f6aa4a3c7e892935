"""Stage 02's mask alignment (NIfTI mask → cached CT stack, by geometry): numba kernel vs plain numpy.

python bench/align_mask.py [--slices 600] [--size 512] [--repeats 3]

One full-size axial stack (``--slices`` x ``--size``², 0.7 mm pixels, 1 mm slices) and a labelled
mask stored the way the RSNA 2022 files are (axes (col, row, slice) with flips, an RAS affine); both
contenders align the same mask onto the same geometry, must give the same array, and are timed best
of ``--repeats`` after one warm-up call (numba compiles there, or loads its cache).
"""

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from spine.cervical.segment import LPS_TO_RAS, align_mask
from spine.core.stacks import StackGeometry


def align_mask_numpy(nifti: Path, geo: StackGeometry, shape) -> np.ndarray:
    """The plain version: per slice, every pixel's mask voxel as numpy arrays, then a gather."""
    img = nib.load(str(nifti))
    data = np.asanyarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    m, t = inv[:3, :3] @ LPS_TO_RAS, inv[:3, 3]
    n, rows, cols = shape
    r, c = np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64)
    out = np.zeros(shape, dtype=np.uint8)
    for k in range(n):
        dr, dc = geo.spacing[k]
        v0 = m @ geo.ipp[k] + t
        v_row = m @ (geo.iop[k, 3:] * dr)
        v_col = m @ (geo.iop[k, :3] * dc)
        ijk = np.rint(v0[:, None, None] + v_row[:, None, None] * r[:, None] + v_col[:, None, None] * c)
        ijk = ijk.astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(data.shape)[:, None, None]), axis=0)
        out[k][inside] = data[ijk[0][inside], ijk[1][inside], ijk[2][inside]]
    return out


def full_size_case(folder: Path, n: int, size: int) -> tuple[Path, StackGeometry, np.ndarray]:
    """An axial stack's geometry and a mask of 8 stacked boxes on it, stored (col, row, slice) flipped."""
    px, dz = 0.7, 1.0
    ipp = np.stack([np.full(n, -size * px / 2), np.full(n, -size * px / 2), np.arange(n) * dz], 1)
    geo = StackGeometry(ipp, np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)), np.full((n, 2), px))
    labels = np.zeros((n, size, size), dtype=np.uint8)  # (slice, row, col) in stack order
    for v in range(8):
        z0 = int(n * (0.9 - 0.1 * v))
        labels[z0 - int(n * 0.08) : z0, size // 3 : size // 2, 2 * size // 5 : 3 * size // 5] = v + 1
    # stored as the real files are: voxel (i, j, k) = (col flipped, row flipped, slice), affine to RAS
    stored = labels[:, ::-1, ::-1].transpose(2, 1, 0)
    # the affine that maps the stored voxels back onto the stack's pixels exactly
    ras = np.diag([-1.0, -1.0, 1.0])
    col_dir, row_dir = ras @ np.array([px, 0, 0]), ras @ np.array([0, px, 0])
    origin = ras @ ipp[0]
    affine = np.eye(4)
    affine[:3, 0] = -col_dir  # i counts columns from the last one
    affine[:3, 1] = -row_dir  # j counts rows from the last one
    affine[:3, 2] = np.array([0, 0, dz])
    affine[:3, 3] = origin + (size - 1) * col_dir + (size - 1) * row_dir
    path = folder / "mask.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), affine), path)
    return path, geo, labels


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path, geo, labels = full_size_case(Path(tmp), args.slices, args.size)
        shape = labels.shape
        fast, plain = align_mask(path, geo, shape), align_mask_numpy(path, geo, shape)  # warm-up
        assert np.array_equal(fast, plain), "the contenders disagree"
        assert np.array_equal(fast, labels), "the alignment does not recover the labels"
        t_numba = best_of(lambda: align_mask(path, geo, shape), args.repeats)
        t_numpy = best_of(lambda: align_mask_numpy(path, geo, shape), args.repeats)
    print(f"align_mask on {args.slices} x {args.size}^2 (best of {args.repeats}):")
    print("| contender | seconds | ratio |\n|---|---|---|")
    print(f"| numpy, per slice | {t_numpy:.2f} | 1.00 |")
    print(f"| numba kernel | {t_numba:.2f} | {t_numpy / t_numba:.2f}x faster |")


if __name__ == "__main__":
    main()
