"""Reading and writing SPIDER .mha files by their geometry (SimpleITK), never by an assumed axis order.

Every image (and mask) is turned into one canonical layout before anything looks at its voxels:
``sitk.DICOMOrient(img, "PIL")``, whose array (``sitk.GetArrayFromImage``, axes reversed) is

    vol[s, r, c]:  s = sagittal slices, index increasing toward the patient's left;
                   r = rows, superior -> inferior;  c = columns, anterior -> posterior,

with ``spacing = (ds, dr, dc)`` in mm in the same order. DICOMOrient only permutes and flips axes (no
resampling), so the canonical array holds exactly the file's voxels and maps back losslessly
(``write_like``). The letters of an orientation code name the direction in which each index increases
(an identity direction matrix is "LPS"). An oblique image keeps its direction cosines: the permutation
is the nearest one, and positions stay exact through the direction matrix.

File names: ``images/<patient>_<sequence>.mha`` with sequence one of ``labels.MODALITIES`` (t1, t2,
t2_SPACE), masks in ``masks/<same name>.mha``; an image without a mask file is a test image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from spine.core.io import atomic_path
from spine.spider.labels import MODALITIES

CANONICAL = "PIL"  # sitk axes (x, y, z) point to posterior, inferior, left: array [s, r, c] as above


@dataclass(frozen=True)
class Canonical:
    """One image in the canonical layout: the array, its spacing (mm, array order), the reoriented sitk
    image (its geometry) and the file's own orientation code (to write results back the same way)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    image: sitk.Image
    orientation: str


def split_name(name: str) -> tuple[str, str]:
    """``"12_t2_SPACE.mha"`` -> ("12", "t2_SPACE"): the patient id is the part before the sequence suffix.

    A name with no known sequence suffix is its own patient with sequence "unknown".
    """
    stem = name[: -len(".mha")] if name.endswith(".mha") else name
    for seq in sorted(MODALITIES, key=len, reverse=True):  # "t2_SPACE" before "t2"
        if stem.endswith("_" + seq) and len(stem) > len(seq) + 1:
            return stem[: -len(seq) - 1], seq
    return stem, "unknown"


def list_images(data_dir: Path) -> pd.DataFrame:
    """Every ``images/*.mha``: image (file stem), patient, sequence, split (train when its mask file
    exists, else test), image_path, mask_path (empty for test), sorted by image."""
    data_dir = Path(data_dir)
    rows = []
    for path in sorted((data_dir / "images").glob("*.mha")):
        patient, sequence = split_name(path.name)
        mask = data_dir / "masks" / path.name
        rows.append(
            {
                "image": path.stem,
                "patient": patient,
                "sequence": sequence,
                "split": "train" if mask.exists() else "test",
                "image_path": str(path),
                "mask_path": str(mask) if mask.exists() else "",
            }
        )
    columns = ["image", "patient", "sequence", "split", "image_path", "mask_path"]
    return pd.DataFrame(rows, columns=columns)


def read_image(path: Path) -> sitk.Image:
    """The 3D image of a file; an error naming the file and why it cannot be used."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:  # ITK's message: the source line, then what went wrong
        why = [ln for ln in str(e).splitlines() if "ERROR" in ln or "Reason" in ln] or str(e).splitlines()
        raise ValueError(f"{path}: unreadable ({' '.join(ln.strip() for ln in why)[-300:]})") from e
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a 3D scalar image, found {img.GetDimension()}D with "
            f"{img.GetNumberOfComponentsPerPixel()} components"
        )
    return img


def orientation(img: sitk.Image) -> str:
    """The image's orientation code (nearest axis letters: the direction of increasing index)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


def canonical(img: sitk.Image) -> Canonical:
    """``img`` reoriented to the canonical layout (module docstring), with its array and spacing."""
    oriented = sitk.DICOMOrient(img, CANONICAL)
    spacing = tuple(float(v) for v in reversed(oriented.GetSpacing()))
    return Canonical(sitk.GetArrayFromImage(oriented), spacing, oriented, orientation(img))


def read_canonical(path: Path) -> Canonical:
    """Read a file and reorient it (see ``canonical``)."""
    return canonical(read_image(path))


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """Whether two images share size, spacing, origin and direction (within ``tol``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def from_canonical(array: np.ndarray, ref: Canonical) -> sitk.Image:
    """A canonical-layout array of ``ref``'s shape as an image in the geometry of ``ref``'s file: the
    axes permuted and flipped back to its own orientation."""
    if array.shape != ref.array.shape:
        raise ValueError(f"array shape {array.shape} differs from the image's canonical {ref.array.shape}")
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(ref.image)
    return sitk.DICOMOrient(img, ref.orientation)


def write_like(array: np.ndarray, ref: Canonical, original: sitk.Image, path: Path) -> Path:
    """Write a canonical-layout array as ``path`` (.mha, compressed) in the exact geometry of the
    ``original`` file (size, spacing, origin, direction), so it overlays the input voxel for voxel."""
    img = from_canonical(array, ref)
    if img.GetSize() != original.GetSize():
        raise ValueError(f"{path}: reoriented size {img.GetSize()} != original {original.GetSize()}")
    img.CopyInformation(original)  # the file's own numbers, free of round-off from reorienting twice
    return write_mha(img, path)


def write_mha(img: sitk.Image, path: Path) -> Path:
    """Write ``img`` as a compressed .mha atomically."""
    with atomic_path(Path(path)) as tmp:
        named = tmp.with_suffix(".mha")  # SimpleITK picks the writer by the extension
        try:
            sitk.WriteImage(img, str(named), useCompression=True)
            named.replace(tmp)
        finally:
            named.unlink(missing_ok=True)
    return Path(path)


def inplane_grid(img: sitk.Image, grid_mm: float) -> sitk.Image:
    """An empty image of a canonical image's geometry with ``grid_mm`` square pixels in the sagittal
    plane (rows, columns) and the same slices, origin and direction: the first voxel centre stays put."""
    sx, sy, sz = img.GetSpacing()
    nx, ny, nz = img.GetSize()
    size = [max(1, int(round(nx * sx / grid_mm))), max(1, int(round(ny * sy / grid_mm))), nz]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(img.GetOrigin())
    grid.SetSpacing((grid_mm, grid_mm, sz))
    grid.SetDirection(img.GetDirection())
    return grid


def resample_inplane(img: sitk.Image, grid_mm: float, labels: bool = False) -> sitk.Image:
    """A canonical image resampled onto ``inplane_grid``: linear for intensities, nearest neighbour for
    ``labels``."""
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    grid = inplane_grid(img, grid_mm)
    return sitk.Resample(img, grid, sitk.Transform(), interp, 0.0, img.GetPixelID())


def resample_to(array: np.ndarray, grid: sitk.Image, target: sitk.Image, labels: bool = False) -> np.ndarray:
    """A canonical array on ``grid``'s geometry resampled onto ``target``'s (both canonical images) by
    position; returns the canonical array of ``target``'s shape (float32, or the labels' dtype)."""
    src = sitk.GetImageFromArray(array if labels else array.astype(np.float32))
    src.CopyInformation(grid)
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    out = sitk.Resample(src, target, sitk.Transform(), interp, 0.0, src.GetPixelID())
    return sitk.GetArrayFromImage(out)


def masks_dir(folder: Path) -> Path:
    """Predicted masks (.mha, the input file's geometry) under a stage's folder."""
    return Path(folder) / "masks"
