"""Stage 02 (cervical): segment the vertebrae C1..C7 with a 3D UNet, trained on study folds.

Targets are the ``segmentations/*.nii`` masks (only some train studies have one; labels 1..7 = C1..C7,
8 and up = thoracic). A mask's voxel axes are not those of the DICOM slices, so each mask is mapped
onto the cached stack **by geometry**: every cached pixel (slice k, row r, col c) is placed in
patient LPS mm by its slice's ImagePositionPatient / ImageOrientationPatient / PixelSpacing, turned
into RAS (x and y negated: NIfTI affines are RAS, DICOM is LPS) and into a mask voxel through the
inverse of the NIfTI affine (``align_mask``). No axis order is assumed, but the header is checked:
when less than ``segment.min_bone_share`` of the mask lies on bone (HU >= 200), the fixed rule that
fits the real masks (``convention_mask``, DOMAIN.md) is tried and the better of the two kept, logged.

Model (``spine.cervical.models.unet.UNet3D``): every study is resampled to a grid of fixed millimetres
per voxel (``segment.voxel_mm``), by position, not slice index, so slice spacing and count never change
the scale. In-plane the grid covers ``segment.field_mm`` centred on the spine (the median of the bone
pixels); along the slices it covers the whole stack (the UNet is fully convolutional), and training
takes whole studies (padded with air) up to ``field_mm[0]``, random windows of it beyond: the model sees
C1 on top and can count down (a GRU along the slices at the deepest level, ``z_context``). Channels:
the HU windows of ``segment.windows`` (``spine.cervical.ct``) and, with ``coords``, each voxel's
distance in mm from the spine axis. The UNet predicts 9 classes (background, C1..C7, thoracic), because
which of the look-alike C3..C7 a vertebra is follows from counting down the neck. Loss: cross entropy +
soft Dice; random affine, left-right mirror (``flip``; prediction averages both) and intensity
augmentation per batch.

Folds: the shared study folds (``spine.core.folds.load_folds``); the model of fold k trains on the
segmented studies of the other folds and predicts its own held-out segmented studies (source
``oof``). Every other study (train without a mask, test) is predicted once by the mean of all fold
models' probabilities (source ``fold_mean``); stage 06 does the same for a new test split
(``predict_test``, source ``test_mean``).

Reduction to the cached stack: the grid probabilities are interpolated back to every cached slice and
pixel (a few slices at a time); each voxel takes its most likely class, restricted to that class's
largest connected component on the grid (dilated by one voxel), which drops stray islands. With
``refine_hu`` the boundaries come from the full-resolution bone; with ``order`` the labelled bone pieces
are relabelled in anatomical order along the slices (``order_components``: C1, C2, then C3..C7 one
piece each, then the thorax), which counts the look-alike C3..C7 a small model confuses. Outputs:

- ``paths.vertebrae`` (``VERTEBRA_COLUMNS``): one row per (split, study, vertebra C1..C7) of every
  study, found or not: slice span and pixel box in the cached stack (inclusive; NaN when not found),
  predicted voxels, confidence = mean max-probability over its voxels, source.
- ``paths.slice_labels`` (``SLICE_COLUMNS``): per cached slice of every study, each vertebra's
  probability of being on it (the max over the slice of its probability, within its component).
- ``planes_path``: per study, the predicted classes on its mid-sagittal and mid-coronal planes (the
  overlays of ``spine.cervical.viz``).
- ``paths.localize_report``: OOF Dice and found-rate per vertebra over the segmented studies, the share
  of studies with C1..C7 all found in superior-to-inferior order, the mask alignment check per study
  (share of mask voxels on bone through the header, the alignment kept) and, on generated data, the
  agreement of the slice spans with the truth folder's (read by the report only, never by a prediction).

Resumable: each fold's model and predictions are marked with a fingerprint of what made them (folds,
config, seed, cache, masks); a rerun skips current folds and retrains stale ones.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numba
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy import ndimage
from scipy.sparse.csgraph import connected_components
from torch.utils.data import DataLoader, Dataset

from spine.cervical import ct
from spine.cervical.models.unet import UNet3D
from spine.cervical.task import VERTEBRAE
from spine.core import geometry
from spine.core.config import save_config
from spine.core.folds import fold_checkpoints, fold_key, load_folds, selected_folds
from spine.core.io import fingerprint, is_current, mark_current, save_table, save_text
from spine.core.paths import Paths, require
from spine.core.stacks import StackGeometry, stack_geometries
from spine.core.train.loop import TrainSettings, autocast, fit, load_weights, resolve_device
from spine.core.train.stage import fold_model, torch_threads

log = logging.getLogger(__name__)

CLASSES = ["background", *VERTEBRAE, "thoracic"]  # model classes; mask label l -> min(l, 8)
N_CLASSES = len(CLASSES)
NECK_CLASSES = ["background", "cervical", "thoracic"]  # the first pass: C1..C7 as one class
VERTEBRA_COLUMNS = [
    "study_id",
    "split",
    "vertebra",
    "series_id",
    "stack",
    "found",
    "slice_start",
    "slice_end",
    "row_start",
    "row_end",
    "col_start",
    "col_end",
    "voxels",
    "confidence",
    "source",
]
SLICE_COLUMNS = ["study_id", "split", "series_id", "stack", "index", *VERTEBRAE, "source"]
DICE_COLUMNS = ["fold", "overlap", "true_voxels", "raw_voxels", "raw_overlap"]  # per-fold files only
ALIGN_COLUMNS = ["mask_alignment", "mask_bone_share", "header_bone_share", "neck_error_mm"]  # per-fold only
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
BONE_HU = 200.0  # bone from here up: the mask alignment check and the spine's centre


# =============================================================================================
# Studies and masks
# =============================================================================================


@dataclass
class StudyItem:
    """One study's stack to segment (``path`` None when it has no readable volume), and its mask."""

    study_id: str
    split: str
    series_id: str | None
    stack: int
    path: str | None
    shape: tuple[int, int, int] | None
    mask: Path | None = None


def mask_path(data_dir: Path, study_id) -> Path | None:
    """The study's segmentation file (``segmentations/{study}.nii`` or ``.nii.gz``), or None."""
    for suffix in (".nii", ".nii.gz"):
        p = Path(data_dir) / "segmentations" / f"{study_id}{suffix}"
        if p.exists():
            return p
    return None


def study_items(paths: Paths, splits=("train", "test")) -> list[StudyItem]:
    """One item per study of ``splits`` in the stage-01 cache: its longest stack, or no path when the
    study has none readable (it still gets its 7 rows, found=False). Train studies get their mask."""
    series = pd.read_parquet(require(paths.series_table, "01_preprocess"))
    series = series.astype({"study_id": str, "series_id": str})
    items = []
    for (split, study), g in series[series["split"].isin(splits)].groupby(["split", "study_id"], sort=True):
        ok = g[g["status"] == "ok"]
        if not len(ok):
            items.append(StudyItem(study, split, str(g["series_id"].iloc[0]), -1, None, None))
            continue
        r = ok.sort_values("n_slices").iloc[-1]
        mask = mask_path(paths.data_dir, study) if split == "train" else None
        shape = (int(r["n_slices"]), int(r["rows"]), int(r["cols"]))
        items.append(StudyItem(study, split, r["series_id"], int(r["stack"]), r["path"], shape, mask))
    return items


def geometries(paths: Paths) -> dict[tuple, StackGeometry]:
    """(study_id, series_id, stack) → geometry of every cached stack, ids as strings."""
    inst = pd.read_parquet(paths.instance_table).astype({"study_id": str, "series_id": str})
    return stack_geometries(inst)


def align_mask(nifti: Path, geo: StackGeometry, shape: tuple[int, int, int]) -> np.ndarray:
    """The NIfTI mask resampled onto the cached stack's voxels (nearest), uint8 (slices, rows, cols).

    Each cached pixel goes to patient LPS through its slice's geometry, to RAS (x, y negated), then to a
    mask voxel through the inverse NIfTI affine; pixels outside the mask's extent are 0. Works for any
    axis order or flip the file was stored in, and for slices missing from the stack.
    """
    data = _nifti_data(nifti)
    inv = np.linalg.inv(nib.load(str(nifti)).affine)
    m, t = inv[:3, :3] @ LPS_TO_RAS, inv[:3, 3]
    origin = geo.ipp @ m.T + t  # (n, 3): each slice's first pixel, in mask voxels
    step_row = (geo.iop[:, 3:] * geo.spacing[:, :1]) @ m.T  # one row down: along the column direction
    step_col = (geo.iop[:, :3] * geo.spacing[:, 1:]) @ m.T  # one column right: along the row direction
    out = np.zeros(shape, dtype=np.uint8)
    _sample_nearest(np.asarray(data, dtype=np.uint8), origin, step_row, step_col, out)  # any memory order
    return out


@numba.njit(cache=True, nogil=True)
def _sample_nearest(data, origin, step_row, step_col, out):  # pragma: no cover - compiled
    """out[k, r, c] = data[round(origin[k] + r step_row[k] + c step_col[k])], 0 outside ``data``.

    The hot loop of stage 02's training data (a 600 x 512² stack is 157 M lookups): numba runs it in
    one pass, without numpy's per-slice temporaries: 6.7x faster (docs/BENCHMARKS.md).
    """
    n, rows, cols = out.shape
    di, dj, dk = data.shape
    for k in range(n):
        for r in range(rows):
            x = origin[k, 0] + r * step_row[k, 0]
            y = origin[k, 1] + r * step_row[k, 1]
            z = origin[k, 2] + r * step_row[k, 2]
            for c in range(cols):
                i = int(np.rint(x + c * step_col[k, 0]))
                j = int(np.rint(y + c * step_col[k, 1]))
                q = int(np.rint(z + c * step_col[k, 2]))
                if 0 <= i < di and 0 <= j < dj and 0 <= q < dk:
                    out[k, r, c] = data[i, j, q]


def to_classes(labels: np.ndarray) -> np.ndarray:
    """Mask labels → model classes: 0 background, 1..7 C1..C7, 8 any thoracic vertebra."""
    return np.minimum(labels, N_CLASSES - 1).astype(np.uint8)


def bone_share(mask: np.ndarray, stack: ct.CTStack) -> float:
    """Share of labelled voxels whose HU is bone (>= BONE_HU): near 1 when the mask sits on the
    vertebrae, far lower when it is flipped or shifted (the alignment check of the report)."""
    on, total = 0, 0
    for k in np.flatnonzero(mask.reshape(len(mask), -1).any(1)):
        m = mask[k] > 0
        on += int((stack.read(k)[0][m] >= BONE_HU).sum())
        total += int(m.sum())
    return on / total if total else float("nan")


def convention_mask(nifti: Path, geo: StackGeometry, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The mask by the fixed rule that fits every real RSNA 2022 mask (DOMAIN.md), ignoring the header:
    the voxel axes are (column, row, slice), the row axis reversed, the slice axis ascending patient z.

    The published form sorts the DICOM files by slice number and takes ``seg[:, ::-1, ::-1]`` when
    ImagePositionPatient z falls with the slice number, else ``seg[:, ::-1]``, then ``.transpose(2,
    1, 0)``: both put mask slice i on the i-th lowest z, which is what this does for the cached stack
    (whatever its order). None when the mask's shape does not match the stack (a slice missing from
    the cache makes the rule ambiguous).
    """
    data = _nifti_data(nifti)
    m = np.ascontiguousarray(data[:, ::-1].transpose(2, 1, 0))
    if m.shape != tuple(shape):
        return None
    out = np.empty(shape, dtype=np.uint8)
    out[np.argsort(geo.ipp[:, 2], kind="stable")] = m
    return out


@dataclass
class AlignedMask:
    """A study's mask on its cached stack, how it was aligned, and the bone check of both ways."""

    labels: np.ndarray  # uint8 (slices, rows, cols) mask labels
    method: str  # "header" (the NIfTI affine) or "convention" (the fixed rule of the real masks)
    header_share: float  # share of mask voxels on bone when aligned through the header
    share: float  # the same for the kept alignment


def aligned_mask(
    nifti: Path, geo: StackGeometry, shape: tuple[int, int, int], stack: ct.CTStack, min_share: float
) -> AlignedMask:
    """The mask aligned through its header; when too little of it lies on bone (< ``min_share``), the
    real-data convention is tried too and the one with more bone kept (logged)."""
    mask = align_mask(nifti, geo, shape)
    share = bone_share(mask, stack)
    if share >= min_share:
        return AlignedMask(mask, "header", share, share)
    alt = convention_mask(nifti, geo, shape)
    alt_share = bone_share(alt, stack) if alt is not None else float("nan")
    if alt is not None and (alt_share > share or np.isnan(share)):
        log.warning(
            "%s: %.2f of the mask on bone through its header (< segment.min_bone_share %.2f); "
            "the real-data convention puts %.2f there: kept",
            nifti.name, share, min_share, alt_share,
        )  # fmt: skip
        return AlignedMask(alt, "convention", share, alt_share)
    log.warning(
        "%s: %.2f of the mask on bone through its header (< segment.min_bone_share %.2f), the convention "
        "%s: header kept; check the file",
        nifti.name, share, min_share, "does not fit the stack" if alt is None else f"gives {alt_share:.2f}",
    )  # fmt: skip
    return AlignedMask(mask, "header", share, share)


def _nifti_data(nifti: Path) -> np.ndarray:
    """The NIfTI voxel array, 3D (a trailing singleton axis dropped), as stored."""
    data = np.asanyarray(nib.load(str(nifti)).dataobj)
    return data.reshape(data.shape[:3]) if data.ndim > 3 else data


# =============================================================================================
# The model grid: fixed millimetres per voxel, centred on the spine
# =============================================================================================


@dataclass
class Field:
    """Where the model grid lies on one cached stack. Per axis, the positions (mm) of the stack's
    samples and of the grid's, in one frame: slices along the slice normal; rows and columns from the
    field centre (the spine, found by HU before the model runs)."""

    stack_z: np.ndarray
    grid_z: np.ndarray
    stack_rows: np.ndarray
    grid_rows: np.ndarray
    stack_cols: np.ndarray
    grid_cols: np.ndarray
    centre: tuple[int, int]  # (row, col) of the field centre on the stack: the overlays' planes
    head: int = 0  # +1: stack_z grows toward the head, -1: toward the feet, 0: not axial, unknown

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.grid_z), len(self.grid_rows), len(self.grid_cols)

    def to_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weights (grid x stack) along slices, rows and columns."""
        return (
            ct.axis_weights(self.stack_z, self.grid_z),
            ct.axis_weights(self.stack_rows, self.grid_rows),
            ct.axis_weights(self.stack_cols, self.grid_cols),
        )

    def to_stack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weights (stack x grid) along slices, rows and columns (zero outside the grid)."""
        return (
            ct.axis_weights(self.grid_z, self.stack_z),
            ct.axis_weights(self.grid_rows, self.stack_rows),
            ct.axis_weights(self.grid_cols, self.stack_cols),
        )


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def spine_centre(stack: ct.CTStack, samples: int = 16) -> tuple[float, float]:
    """(row, col) of the spine on the stack: the median of the bone pixels (HU >= BONE_HU) of a few
    evenly spaced slices; the image centre when there is no bone."""
    idx = np.unique(np.linspace(0, len(stack) - 1, min(samples, len(stack))).round().astype(int))
    rows, cols = np.nonzero((stack.read(idx) >= BONE_HU).any(0))
    if not len(rows):
        return (stack.shape[1] - 1) / 2, (stack.shape[2] - 1) / 2
    return float(np.median(rows)), float(np.median(cols))


def study_field(stack: ct.CTStack, geo: StackGeometry, sc, multiple: int, z_range=None) -> Field:
    """The study's grid: ``segment.voxel_mm`` (slice, row, col) per voxel; in-plane the square of
    ``segment.field_mm[1:]`` centred on the spine; along the slices the whole scanned extent (the UNet
    is fully convolutional there), or its part within ``z_range`` (mm along the slice normal: the neck
    window of the first pass), each side a multiple of ``multiple``."""
    vz, vy, vx = (float(v) for v in sc.voxel_mm)
    z = geometry.slice_positions(geo.ipp, geo.iop[0])
    lo, hi = float(z.min()), float(z.max())
    if z_range is not None and min(hi, z_range[1]) > max(lo, z_range[0]):
        lo, hi = max(lo, float(z_range[0])), min(hi, float(z_range[1]))
    d = _round_up(int(np.ceil((hi - lo) / vz)) + 1, multiple)
    h = _round_up(round(float(sc.field_mm[1]) / vy), multiple)
    w = _round_up(round(float(sc.field_mm[2]) / vx), multiple)
    cr, cc = spine_centre(stack)
    sr, scol = geo.spacing[0]
    return Field(
        stack_z=z,
        grid_z=(hi + lo) / 2 + (np.arange(d) + 0.5 - d / 2) * vz,
        stack_rows=(np.arange(stack.shape[1]) - cr) * sr,
        grid_rows=(np.arange(h) + 0.5 - h / 2) * vy,
        stack_cols=(np.arange(stack.shape[2]) - cc) * scol,
        grid_cols=(np.arange(w) + 0.5 - w / 2) * vx,
        centre=(int(round(cr)), int(round(cc))),
        head=head_direction(geo.iop[0]),
    )


def head_direction(iop) -> int:
    """+1 when positions along the slice normal grow toward the head, -1 when toward the feet (DICOM's
    patient z points to the head whatever the scan direction or instance order), 0 when the slices are
    too far from axial to tell."""
    up = float(geometry.slice_normal(iop)[2])
    return int(np.sign(up)) if abs(up) >= 0.5 else 0


def multiple_of(sc) -> int:
    """What every grid side must be divisible by: each UNet level but the last halves it."""
    return 2 ** (len(sc.widths) - 1)


def grid_input(stack: ct.CTStack, field: Field, sc) -> np.ndarray:
    """The study on its grid, HU windows as channels: float16 (C, D, H, W)."""
    return ct.windows(ct.resample_hu(stack, *field.to_grid()), list(sc.windows)).astype(np.float16)


class GridInputs(Dataset):
    """Per study: its field, the grid input and, with ``targets``, the aligned mask on the grid (one
    study at a time; volumes are memory-mapped and read a few slices at a time)."""

    def __init__(self, paths: Paths, items: list[StudyItem], sc, geos: dict, targets=False):
        self.paths, self.items, self.sc, self.geos, self.targets = paths, items, sc, geos, targets

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        stack = ct.CTStack(self.paths.cache_dir / it.path)
        geo = self.geos[(it.study_id, it.series_id, it.stack)]
        field = study_field(stack, geo, self.sc, multiple_of(self.sc))
        out = {"i": i, "field": field, "x": grid_input(stack, field, self.sc)}
        if self.targets:
            aligned = aligned_mask(it.mask, geo, it.shape, stack, float(self.sc.min_bone_share))
            out["y"] = ct.resample_labels(to_classes(aligned.labels), N_CLASSES, *field.to_grid())
            out["aligned"] = aligned
        return out


def load_grids(paths: Paths, items: list[StudyItem], sc, geos: dict, targets=False):
    """Yield ``GridInputs`` samples in item order, prepared by ``sc.loader_workers`` processes."""
    loader = DataLoader(
        GridInputs(paths, items, sc, geos, targets),
        batch_size=None,
        num_workers=int(sc.loader_workers),
        collate_fn=_as_is,
    )
    yield from loader


def _as_is(sample):
    """Keep a sample's numpy arrays as they are (the default would turn them into tensors)."""
    return sample


def cervical_planes(y: np.ndarray) -> tuple[int, int] | None:
    """First and last grid plane holding C1..C7 in a (D, H, W) class grid; None when none does."""
    on = np.flatnonzero(((y >= 1) & (y <= len(VERTEBRAE))).any((1, 2)))
    return (int(on[0]), int(on[-1])) if len(on) else None


class TrainVolumes(Dataset):
    """Prepared (input, target) grids of the training studies, as tensors of a fixed depth: the whole
    study when it fits (padded with air at a random offset), else a random window of ``depth`` planes.
    With ``margin`` (planes, low and high), a study is first cut to its C1..C7 planes plus a random
    margin above and below: what the second pass sees inside the first pass's neck window.
    Each study comes ``repeats`` times per epoch (fresh augmentation each time)."""

    def __init__(self, grids, depth: int, air: np.ndarray, seed: int, repeats: int = 1, margin=None):
        self.grids, self.depth, self.air = grids, int(depth), np.asarray(air, dtype=np.float32)
        self.repeats = max(1, int(repeats))
        self.rng = np.random.default_rng(seed)
        self.margin = margin

    def __len__(self) -> int:
        return len(self.grids) * self.repeats

    def __getitem__(self, i: int) -> dict:
        x, y = self.grids[i % len(self.grids)]
        span = cervical_planes(y) if self.margin is not None else None
        if span is not None:
            above, below = self.rng.integers(self.margin[0], self.margin[1] + 1, size=2)
            lo, hi = max(0, span[0] - int(above)), min(len(y), span[1] + int(below) + 1)
            x, y = x[:, lo:hi], y[lo:hi]
        d = x.shape[1]
        xo = np.broadcast_to(self.air[:, None, None, None], (len(x), self.depth, *x.shape[2:])).copy()
        yo = np.zeros((self.depth, *y.shape[1:]), dtype=np.int64)
        if d >= self.depth:
            s = int(self.rng.integers(0, d - self.depth + 1))
            xo[:], yo[:] = x[:, s : s + self.depth], y[s : s + self.depth]
        else:
            s = int(self.rng.integers(0, self.depth - d + 1))
            xo[:, s : s + d], yo[s : s + d] = x, y
        return {"x": torch.from_numpy(xo), "y": torch.from_numpy(yo)}


def train_depth(sc, depths=()) -> int:
    """Grid planes of a training sample: ``segment.field_mm[0]`` at ``segment.voxel_mm[0]``, or the
    longest of the training studies' ``depths`` when that is less (whole studies then: the model sees
    the top of the column and counts down from it, as it does at prediction)."""
    window = _round_up(round(float(sc.field_mm[0]) / float(sc.voxel_mm[0])), multiple_of(sc))
    return min(window, _round_up(max(depths), multiple_of(sc))) if len(depths) else window


# =============================================================================================
# The neck window (two passes): a coarse model over the whole stack finds C1..C7 along the slices;
# the fine model segments that window plus a margin. Scans from the skull base to the thorax are
# 2-4 times longer than the neck, and the fine model then works on what it was trained on.
# =============================================================================================


def neck_section(sc):
    """The first pass's settings: ``segment`` with the keys of ``segment.neck`` (less ``margin_mm``)
    over it; None when ``segment.neck`` is null (one pass over the whole stack)."""
    if sc.get("neck") is None:
        return None
    merged = OmegaConf.to_container(sc, resolve=True)
    neck = merged.pop("neck")
    merged.update({k: v for k, v in neck.items() if k != "margin_mm"})
    return OmegaConf.create({**merged, "neck": None})


def neck_classes(y: np.ndarray) -> np.ndarray:
    """Model classes (``CLASSES``) to the first pass's ``NECK_CLASSES``."""
    return np.select([y == 0, y <= len(VERTEBRAE)], [0, 1], 2).astype(y.dtype)


def neck_margin_planes(sc) -> tuple[int, int] | None:
    """``segment.neck.margin_mm`` in fine-grid planes (None without a neck pass)."""
    if sc.get("neck") is None:
        return None
    lo, hi = (float(m) / float(sc.voxel_mm[0]) for m in sc.neck.margin_mm)
    return int(round(lo)), int(round(hi))


def neck_extent(probs: torch.Tensor, field: Field) -> tuple[float, float] | None:
    """(low, high) mm along the slice normal of the largest connected piece the first pass labels
    cervical; None when it labels none."""
    comp, n = ndimage.label(probs.argmax(0).cpu().numpy() == NECK_CLASSES.index("cervical"))
    if n == 0:
        return None
    largest = np.argmax(np.bincount(comp.ravel())[1:]) + 1
    on = np.flatnonzero((comp == largest).any((1, 2)))
    half = abs(float(field.grid_z[1] - field.grid_z[0])) / 2 if len(field.grid_z) > 1 else 0.0
    ends = field.grid_z[on[[0, -1]]]
    return float(ends.min()) - half, float(ends.max()) + half


def neck_window(neck_models: list, stack: ct.CTStack, geo: StackGeometry, sc, device) -> tuple | None:
    """The fine pass's z range: the first pass's C1..C7 extent widened by the middle of
    ``segment.neck.margin_mm`` on each side; None (the whole stack) when the first pass found none."""
    nsc = neck_section(sc)
    field = study_field(stack, geo, nsc, multiple_of(nsc))
    probs = predict_grid(neck_models, grid_input(stack, field, nsc), device, sc.amp, bool(sc.flip))
    extent = neck_extent(probs, field)
    if extent is None:
        return None
    m = float(np.mean(sc.neck.margin_mm))
    return extent[0] - m, extent[1] + m


def true_extent(labels: np.ndarray, geo: StackGeometry) -> tuple[float, float] | None:
    """(low, high) mm along the slice normal of the stack slices a mask labels C1..C7."""
    on = np.flatnonzero(((labels >= 1) & (labels <= len(VERTEBRAE))).any((1, 2)))
    if not len(on):
        return None
    z = geometry.slice_positions(geo.ipp, geo.iop[0])[on]
    return float(z.min()), float(z.max())


# =============================================================================================
# Model, loss, augmentation
# =============================================================================================


def build_model(sc, n_classes: int = N_CLASSES) -> UNet3D:
    """The segmenter of ``segment``: HU windows in, C1..C7 + thoracic + background out (the first
    pass: ``NECK_CLASSES``)."""
    coord_mm = tuple(sc.voxel_mm[1:]) if sc.coords else None
    return UNet3D(
        len(sc.windows), n_classes, tuple(sc.widths), coord_mm=coord_mm, z_context=bool(sc.z_context)
    )


def augment(x: torch.Tensor, y: torch.Tensor, sc, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation (each axis), scale and shift of a batch (one affine per volume; labels nearest),
    a left-right mirror of half the volumes (with ``flip``: the neck is near symmetric), then a random
    intensity gain and offset. No flip along the slices (they run inferior → superior) or rows."""
    b = len(x)
    if sc.get("flip", False):
        mirror = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None, None], x.flip(-1), x)
        y = torch.where(mirror[:, None, None, None], y.flip(-1), y)

    def uniform(*shape, scale=1.0):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * scale

    ang = uniform(b, 3, scale=np.deg2rad(float(sc.rotate_deg)))
    cos, sin = ang.cos(), ang.sin()
    one, zero = torch.ones(b), torch.zeros(b)
    rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1)
    ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1)
    rot = rx.view(b, 3, 3) @ ry.view(b, 3, 3) @ rz.view(b, 3, 3)
    scale = 1 + uniform(b, 1, 1, scale=float(sc.scale))
    theta = torch.cat([rot * scale, uniform(b, 3, 1, scale=2 * float(sc.shift))], 2).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    gain = (1 + uniform(b, 1, 1, 1, 1, scale=0.1)).to(x.device)
    offset = uniform(b, 1, 1, 1, 1, scale=0.05).to(x.device)
    return x * gain + offset, y[:, 0].long()


def dice_ce_loss(logits: torch.Tensor, y: torch.Tensor, background_weight: float = 1.0) -> torch.Tensor:
    """Cross entropy (background down-weighted: vertebrae are ~1 % of the voxels, and an unweighted
    loss first learns to call everything background) + (1 - soft Dice) averaged over the foreground
    classes present in the batch."""
    n_classes = logits.shape[1]
    weight = torch.ones(n_classes, device=logits.device)
    weight[0] = background_weight
    ce = F.cross_entropy(logits.float(), y, weight=weight)
    p = logits.float().softmax(1)
    onehot = F.one_hot(y, n_classes).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter, denom = (p * onehot).sum(dims), p.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1) / (denom + 1)
    present = onehot.sum(dims)[1:] > 0
    soft = (1 - dice[1:])[present].mean() if present.any() else logits.sum() * 0
    return ce + soft


class SegLoss:
    """``loss_fn(model, batch, device)`` for the training loop (augments on the device)."""

    def __init__(self, sc, seed: int):
        self.sc = sc
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model, batch, device):
        x, y = batch["x"].to(device), batch["y"].to(device)
        if self.sc.augment:
            x, y = augment(x, y, self.sc, self.gen)
        return dice_ce_loss(model(x), y, float(self.sc.background_weight))


@torch.no_grad()
def predict_grid(models: list, x: np.ndarray, device, amp: bool, flip: bool = False) -> torch.Tensor:
    """Mean over ``models`` (and, with ``flip``, over the volume and its left-right mirror) of the class
    probabilities on the grid: float32 (classes, D, H, W) on device."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))[None].to(device)
    if flip:  # the volume and its left-right mirror in one batch of two (on CPU also a faster path)
        xt = torch.cat([xt, xt.flip(-1)])
    total = None
    for model in models:
        with autocast(device, amp):
            p = model(xt).float().softmax(1)
        p = (p[0] + p[1].flip(-1)) / 2 if flip else p[0]
        total = p if total is None else total + p
    return total / len(models)


# =============================================================================================
# Probabilities on the grid → the cached stack's tables
# =============================================================================================


def kept_components(probs: torch.Tensor) -> torch.Tensor:
    """(classes, D, H, W) bool on the grid: each vertebra's largest 26-connected component of the
    argmax, dilated by one voxel (so interpolated boundaries stay); the other classes everywhere."""
    lab = probs.argmax(0).cpu().numpy()
    keep = np.ones((N_CLASSES, *lab.shape), dtype=bool)
    for v in range(1, len(VERTEBRAE) + 1):
        comp, n = ndimage.label(lab == v, structure=np.ones((3, 3, 3)))
        if n == 0:
            keep[v] = False
            continue
        largest = np.argmax(np.bincount(comp.ravel())[1:]) + 1
        keep[v] = ndimage.binary_dilation(comp == largest, structure=np.ones((3, 3, 3)))
    return torch.from_numpy(keep).to(probs.device)


@dataclass
class Reduced:
    """One study's prediction on its cached stack, per slice and vertebra (index 0 = C1)."""

    counts: np.ndarray  # (slices, 7) predicted voxels
    conf: np.ndarray  # (7,) sum of max-probability over the voxels
    rows: np.ndarray  # (7, 2) min, max row
    cols: np.ndarray  # (7, 2) min, max col
    slice_prob: np.ndarray  # (slices, 7)
    sagittal: np.ndarray  # (slices, rows) predicted classes on the column through the field centre
    coronal: np.ndarray  # (slices, cols) the same on the row through the field centre
    overlap: np.ndarray | None = None  # (7,) voxels predicted and true (with a truth mask)
    true_voxels: np.ndarray | None = None  # (7,)
    raw_voxels: np.ndarray | None = None  # (7,) the same before the HU refinement
    raw_overlap: np.ndarray | None = None  # (7,)


REFINE_MIN_FOREGROUND = 0.25  # HU refinement: bone voxels where the vertebrae's interpolated share is this


@torch.no_grad()
def reduce_to_stack(
    probs: torch.Tensor,
    field: Field,
    shape,
    chunk: int,
    truth: np.ndarray | None = None,
    stack: ct.CTStack | None = None,
    refine_hu: float | None = None,
    order: bool = False,
) -> Reduced:
    """Interpolate grid probabilities back to the cached stack ``shape`` through the study's ``field``
    (a few slices at a time; zero outside the grid), label every voxel by its most likely class within
    the kept components, and gather the per-slice and per-vertebra figures (and the overlap with
    ``truth`` classes, for Dice).

    With ``refine_hu`` (and the study's ``stack``), boundaries come from the full-resolution image
    instead of the coarse grid: a voxel is vertebra when its HU is at least ``refine_hu`` and the
    vertebra classes hold at least REFINE_MIN_FOREGROUND of its interpolated probability; it takes the
    most likely vertebra class. With ``order``, the labelled pieces are then relabelled in anatomical
    order along the slices (``order_components``). The model's own labels (interpolated grid, before
    refinement and order) are still scored (``raw_*``) when ``truth`` is given.
    """
    n, rows, cols = shape
    dev = probs.device
    nv = len(VERTEBRAE)
    d = probs.shape[1]
    wz, wr, wc = (torch.from_numpy(w.astype(np.float32)).to(dev) for w in field.to_stack())
    keep = kept_components(probs)
    jz, iy, ix = wz.argmax(1), wr.argmax(1), wc.argmax(1)  # the nearest grid cell (weights peak there)
    flat = probs.reshape(N_CLASSES, d, -1).permute(1, 0, 2).reshape(d, -1)  # (d, classes*h*w)
    labels = np.zeros(shape, dtype=np.uint8)
    conf = np.zeros(shape, dtype=np.uint8)  # max probability x 255: the voxel's confidence
    raw_vox, raw_overlap = np.zeros(nv, dtype=np.int64), np.zeros(nv, dtype=np.int64)
    refine = refine_hu is not None and stack is not None
    classes = torch.arange(1, nv + 1, device=dev)[None, :, None, None]
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        p = (wz[k0:k1] @ flat).reshape(k1 - k0, N_CLASSES, *probs.shape[2:])
        p = wr @ p @ wc.T  # (s, classes, R, C); zero outside the grid: background there
        kp = keep[:, jz[k0:k1]][:, :, iy][:, :, :, ix].permute(1, 0, 2, 3)  # (s, classes, R, C)
        vertebra_share = p[:, 1:].sum(1)  # before the kept components: the refinement's foreground
        p = p * kp
        maxp, lab = p.max(1)
        if truth is not None:
            t_hot = torch.from_numpy(truth[k0:k1]).to(dev)[:, None] == classes
            raw_hot = lab[:, None] == classes
            raw_vox += raw_hot.sum((0, 2, 3)).cpu().numpy()
            raw_overlap += (raw_hot & t_hot).sum((0, 2, 3)).cpu().numpy()
        if refine:
            hu = torch.from_numpy(stack.read(slice(k0, k1))).to(dev)
            bone = (hu >= refine_hu) & (vertebra_share >= REFINE_MIN_FOREGROUND)
            fg = p[:, 1:].max(1)  # max(1), not argmax(1): ~10x faster on CPU
            lab = torch.where(bone, fg.indices + 1, torch.zeros_like(lab))
        labels[k0:k1] = lab.cpu().numpy()
        conf[k0:k1] = (maxp * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if order:
        labels = order_components(labels, field.stack_z, field.head)
    red = _gather(labels, conf, field, truth)
    if truth is not None:
        red.raw_voxels, red.raw_overlap = raw_vox, raw_overlap
    return red


def _gather(labels: np.ndarray, conf: np.ndarray, field: Field, truth: np.ndarray | None) -> Reduced:
    """Per-slice and per-vertebra figures of a labelled stack (and its overlap with ``truth``)."""
    n = len(labels)
    nv = len(VERTEBRAE)
    counts = np.zeros((n, nv), dtype=np.int64)
    slice_prob = np.zeros((n, nv), dtype=np.float32)
    conf_sum = np.zeros(nv)
    overlap, true_voxels = np.zeros(N_CLASSES, dtype=np.int64), np.zeros(N_CLASSES, dtype=np.int64)
    for k in range(n):  # slice by slice: whole-stack temporaries of a 1,000-slice study take ~1 GB
        lab, c = labels[k].ravel(), conf[k].ravel().astype(np.float64) / 255
        counts[k] = np.bincount(lab, minlength=N_CLASSES)[1 : nv + 1]
        conf_sum += np.bincount(lab, weights=c, minlength=N_CLASSES)[1 : nv + 1]
        hi = np.zeros(N_CLASSES)
        np.maximum.at(hi, lab, c)
        slice_prob[k] = hi[1 : nv + 1]
        if truth is not None:
            t = truth[k].ravel()
            overlap += np.bincount(lab[lab == t], minlength=N_CLASSES)
            true_voxels += np.bincount(t, minlength=N_CLASSES)
    boxes = ndimage.find_objects(labels, max_label=nv)
    rows = np.array([[b[1].start, b[1].stop - 1] if b else [labels.shape[1], -1] for b in boxes])
    cols = np.array([[b[2].start, b[2].stop - 1] if b else [labels.shape[2], -1] for b in boxes])
    cr, cc = field.centre
    red = Reduced(counts, conf_sum, rows, cols, slice_prob, labels[:, :, cc].copy(), labels[:, cr, :].copy())
    if truth is not None:
        red.overlap, red.true_voxels = overlap[1 : nv + 1], true_voxels[1 : nv + 1]
    return red


ORDER_MIN_PIECE = 0.1  # pieces under this share of the largest keep their labels (fragments)
ORDER_SAME_LEVEL = 0.8  # pieces sharing this share of the longer one's slice range: one level
ORDER_SKIP_COST = 1.5  # a vertebra missing from the sequence costs this share of the median piece
ORDER_KEEP = 0.25  # a piece gains this share of its voxels (at most of the median piece's) for being
# labelled at all (it is bone the model calls vertebra): with a model unsure which vertebra it is,
# counting the pieces then decides; the cap keeps a large piece (the skull base) from taking C1


def order_components(labels: np.ndarray, z_mm: np.ndarray, head: int = 0) -> np.ndarray:
    """Relabel the labelled pieces (6-connected) of a stack so that C1..C7 and the thorax follow each
    other along the slices: a model that sees a few vertebrae at a time confuses the look-alike C3..C7,
    while bone pieces in a row along the neck can only be counted one way.

    Each piece votes with its voxels' labels, pieces on nearly the same slices together (one level,
    ``vertebra_units``); ``sequence_labels`` picks the labels, one per level from the head down
    (``z_mm``: each slice's position; ``head``: +1 when z grows toward the head, -1 when toward the
    feet, as the DICOM header says), that keep the most votes under the anatomical order.
    With ``head`` 0 (unknown) both directions are tried and the votes decide: on real-reach scans the
    skull base, voted thorax by an unsure model, made the reversed order win there and numbered the
    neck from T1 up. Fragments (under ORDER_MIN_PIECE of the largest piece) keep their voxels' labels
    on the slices that the pieces given the same label reach, and are dropped elsewhere.
    """
    comp, n = ndimage.label(labels > 0)
    if n < 2:
        return labels
    # slice by slice: a 1,000-slice stack's int64 keys at once would take 2 GB, and their product 2 more
    per_slice = np.stack([np.bincount(c.ravel(), minlength=n + 1) for c in comp])  # (slices, pieces+1)
    size = per_slice.sum(0)[1:]
    z = (np.asarray(z_mm, dtype=np.float64) @ per_slice)[1:] / np.maximum(size, 1)
    votes = np.zeros((n + 1) * N_CLASSES, dtype=np.int64)
    for c, lab in zip(comp, labels):
        votes += np.bincount((c.astype(np.int64) * N_CLASSES + lab).ravel(), minlength=len(votes))
    votes = votes.reshape(n + 1, N_CLASSES)[1:]
    big = np.flatnonzero(size >= ORDER_MIN_PIECE * size.max())
    units = vertebra_units(per_slice[:, 1 + big], z_mm)  # lists of indices into big
    u_votes = np.stack([votes[big[u]].sum(0) for u in units])
    u_size = np.array([size[big[u]].sum() for u in units])
    u_z = np.array([(z[big[u]] * size[big[u]]).sum() for u in units]) / u_size
    typical = float(np.median(u_size))
    skip = ORDER_SKIP_COST * typical
    keep = ORDER_KEEP * np.minimum(u_size, typical)  # a unit is at most one vertebra's worth of bone
    best = None
    down = np.argsort(-u_z)  # head first when z grows toward the head
    for order in [down, down[::-1]] if head == 0 else [down if head > 0 else down[::-1]]:
        score, seq = sequence_labels(u_votes[order] + keep[order, None], skip)
        if best is None or score > best[0]:
            best = (score, order, seq)
    _, order, seq = best
    relabel = np.zeros(n + 1, dtype=bool)
    mapping = np.zeros(n + 1, dtype=np.uint8)
    # a fragment keeps its label only on slices its vertebra's pieces reach: elsewhere a few stray
    # voxels stretched the vertebra's slice span (stage 03 crops by it) over its neighbours
    reach = np.zeros((len(labels), N_CLASSES), dtype=bool)
    for unit, lab in zip(order, seq):
        pieces = big[units[unit]]
        relabel[1 + pieces], mapping[1 + pieces] = True, lab
        if lab:
            reach[(per_slice[:, 1 + pieces] > 0).any(1), lab] = True
    out = np.empty_like(labels)
    for k, c in enumerate(comp):
        out[k] = np.where(relabel[c], mapping[c], np.where(reach[k][labels[k]], labels[k], 0))
    return out


def vertebra_units(per_slice: np.ndarray, z_mm) -> list[list[int]]:
    """Group bone pieces into levels for the relabelling by order: pieces that span nearly the same
    slices (sharing at least ORDER_SAME_LEVEL of the longer one's range) lie at one level of the
    column, one vertebra split at full resolution (a C2 or C3 whose halves or arch part from the body,
    or bone beside it); counted as two, they pushed every vertebra below them one down. C1's ring
    around C2's dens lies within C2's slices but spans a third of them: it stays apart.

    ``per_slice``: (slices, pieces) voxel counts. Returns lists of piece indices (joined transitively)."""
    z = np.asarray(z_mm, dtype=np.float64)
    on = (per_slice > 0).T
    lo = np.array([z[o].min() for o in on])
    hi = np.array([z[o].max() for o in on])
    shared = np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None])
    longer = np.maximum((hi - lo)[:, None], (hi - lo)[None])
    _, unit = connected_components((shared > 0) & (shared >= ORDER_SAME_LEVEL * longer), directed=False)
    return [np.flatnonzero(unit == u).tolist() for u in range(unit.max() + 1)]


def sequence_labels(votes: np.ndarray, skip_cost: float) -> tuple[float, np.ndarray]:
    """Labels for pieces in head-to-feet order (``votes``: pieces x classes voxel counts, class 0 the
    background, the last the thorax). Each piece is dropped (label 0, gains nothing) or takes a label
    after the previous piece's: the next vertebra, or a later one at ``skip_cost`` per vertebra
    skipped; only the thorax (12 vertebrae) repeats. Maximises the voxel votes kept (dynamic
    programming over the last label used). Returns (score, labels)."""
    m, k = votes.shape
    thorax = k - 1
    score = np.full(k, -np.inf)
    score[0] = 0.0  # state: the last label used (0: none yet)
    back = np.full((m, k), -1, dtype=np.int64)  # previous state when piece i took label l; -1 dropped
    for i in range(m):
        new = score.copy()  # dropping piece i keeps the state
        for lab in range(1, k):
            prev = np.arange(lab + (lab == thorax))  # strictly earlier states (or the thorax again)
            gain = score[prev] - skip_cost * np.clip(lab - prev - 1, 0, None) + votes[i, lab]
            j = int(np.argmax(gain))
            if gain[j] > new[lab]:
                new[lab], back[i, lab] = gain[j], prev[j]
        score = new
    state = int(np.argmax(score))
    out = np.zeros(m, dtype=np.uint8)
    for i in range(m - 1, -1, -1):
        if back[i, state] >= 0:
            out[i], state = state, int(back[i, state])
    return float(score.max()), out


def vertebra_rows(item: StudyItem, red: Reduced | None, source: str, min_voxels: int) -> list[dict]:
    """The study's 7 rows of ``VERTEBRA_COLUMNS`` (found=False with NaN spans when ``red`` is None)."""
    rows = []
    for v, name in enumerate(VERTEBRAE):
        row = {
            "study_id": item.study_id,
            "split": item.split,
            "vertebra": name,
            "series_id": item.series_id,
            "stack": item.stack,
            "found": False,
            **dict.fromkeys(
                ["slice_start", "slice_end", "row_start", "row_end", "col_start", "col_end"], np.nan
            ),
            "voxels": 0,
            "confidence": 0.0,
            "source": source,
        }
        if red is not None:
            on = np.flatnonzero(red.counts[:, v])
            voxels = int(red.counts[:, v].sum())
            row["voxels"] = voxels
            if voxels >= max(1, min_voxels):
                row.update(
                    found=True,
                    slice_start=int(on[0]),
                    slice_end=int(on[-1]),
                    row_start=int(red.rows[v, 0]),
                    row_end=int(red.rows[v, 1]),
                    col_start=int(red.cols[v, 0]),
                    col_end=int(red.cols[v, 1]),
                    confidence=round(float(red.conf[v] / voxels), 4),
                )
        if red is not None and red.overlap is not None:
            row.update(
                overlap=int(red.overlap[v]),
                true_voxels=int(red.true_voxels[v]),
                raw_voxels=int(red.raw_voxels[v]),
                raw_overlap=int(red.raw_overlap[v]),
            )
        rows.append(row)
    return rows


def slice_rows(item: StudyItem, red: Reduced, source: str) -> pd.DataFrame:
    """The study's ``SLICE_COLUMNS`` rows, one per cached slice."""
    n = len(red.slice_prob)
    df = pd.DataFrame(red.slice_prob.round(4), columns=VERTEBRAE)
    df.insert(0, "index", np.arange(n))
    df.insert(0, "stack", item.stack)
    df.insert(0, "series_id", item.series_id)
    df.insert(0, "split", item.split)
    df.insert(0, "study_id", item.study_id)
    df["source"] = source
    return df[SLICE_COLUMNS]


def planes_path(paths: Paths, study_id) -> Path:
    """The study's predicted classes on its mid-sagittal and mid-coronal planes (read by the overlays)."""
    return paths.localize_dir / "planes" / f"{study_id}.npz"


def prediction_grids(paths: Paths, items: list[StudyItem], sc, geos: dict, neck_models, device):
    """Yield (item index, field, grid input) of every item: the whole stack, or with ``neck_models``
    (the first pass) the neck window it finds (the whole stack where it finds none, logged)."""
    if not neck_models:
        for sample in load_grids(paths, items, sc, geos):
            yield sample["i"], sample["field"], sample["x"], None
        return
    for i, it in enumerate(items):
        stack = ct.CTStack(paths.cache_dir / it.path)
        geo = geos[(it.study_id, it.series_id, it.stack)]
        window = neck_window(neck_models, stack, geo, sc, device)
        if window is None:
            log.warning(
                "study %s: the first pass found no cervical vertebra: whole stack segmented", it.study_id
            )
        field = study_field(stack, geo, sc, multiple_of(sc), window)
        yield i, field, grid_input(stack, field, sc), window


def predict_studies(
    paths: Paths,
    items: list[StudyItem],
    models: list,
    sc,
    source: str,
    geos: dict,
    score=False,
    device=None,
    neck_models=None,
) -> tuple[list[dict], list[pd.DataFrame]]:
    """Vertebra rows and slice tables of ``items`` from the mean of ``models`` (within the neck window
    of ``neck_models``, the first pass, when given); each study's mid planes saved for the overlays.
    With ``score``, a study with a mask is also scored against it (overlap and true_voxels for Dice,
    how its mask was aligned, and the neck window's error in mm)."""
    device = device or resolve_device(sc.device)
    readable = [it for it in items if it.path is not None]
    rows, slices = [], []
    for it in items:
        if it.path is None:
            rows += vertebra_rows(it, None, source, sc.min_voxels)
    for i, field, x, window in prediction_grids(paths, readable, sc, geos, neck_models, device):
        it = readable[i]
        probs = predict_grid(models, x, device, sc.amp, bool(sc.flip))
        stack = ct.CTStack(paths.cache_dir / it.path)
        aligned, neck_error = None, np.nan
        if score and it.mask is not None:
            geo = geos[(it.study_id, it.series_id, it.stack)]
            aligned = aligned_mask(it.mask, geo, it.shape, stack, float(sc.min_bone_share))
            truth_z = true_extent(to_classes(aligned.labels), geo)
            if neck_models and truth_z is not None:
                margin = float(np.mean(sc.neck.margin_mm))
                found = (window[0] + margin, window[1] - margin) if window else (np.inf, np.inf)
                neck_error = max(abs(found[0] - truth_z[0]), abs(found[1] - truth_z[1]))
        truth = to_classes(aligned.labels) if aligned is not None else None
        red = reduce_to_stack(
            probs, field, it.shape, int(sc.chunk_slices), truth, stack, sc.refine_hu, bool(sc.order)
        )
        study_rows = vertebra_rows(it, red, source, sc.min_voxels)
        if aligned is not None:
            for r in study_rows:
                r.update(
                    mask_alignment=aligned.method,
                    mask_bone_share=round(aligned.share, 4),
                    header_bone_share=round(aligned.header_share, 4),
                    neck_error_mm=round(float(neck_error), 1),
                )
        rows += study_rows
        slices.append(slice_rows(it, red, source))
        save_planes(planes_path(paths, it.study_id), red, field)
    return rows, slices


def save_planes(path: Path, red: Reduced, field: Field) -> None:
    """The mid planes of a prediction (uint8 classes) and where they lie on the stack, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, sagittal=red.sagittal, coronal=red.coronal, centre=np.array(field.centre))
    tmp.replace(path)


# =============================================================================================
# Stage 02: folds, fold mean, tables, report
# =============================================================================================


def segmenter_key(cfg, paths: Paths, items: list[StudyItem], fine_only: bool = False) -> str:
    """What a fold's models and predictions are made from: the segment config (less run-only keys), the
    folds, the seed, the cache and the masks. ``fine_only``: what the fine model alone is made from (of
    ``segment.neck`` only its margin), so retuning the first pass keeps the fine models."""
    section = OmegaConf.to_container(cfg.segment, resolve=True)
    if fine_only and section.get("neck") is not None:
        section["neck"] = {"margin_mm": section["neck"]["margin_mm"]}
    masks = sorted((it.study_id, it.mask.stat().st_size) for it in items if it.mask is not None)
    return fold_key(section, paths.folds.read_text(), cfg.seed, paths.cache_source.read_text(), masks)


def train_fold(cfg, paths: Paths, items, fold_of: dict, fold: int, grids: dict, geos) -> None:
    """Train fold ``fold``'s model on the other folds' segmented studies; write its OOF predictions."""
    sc = cfg.segment
    key = segmenter_key(cfg, paths, items)
    device = resolve_device(sc.device)
    segmented = [it for it in items if it.mask is not None and it.path is not None]
    train = [it for it in segmented if fold_of.get(it.study_id) != fold]
    held = [it for it in segmented if fold_of.get(it.study_id) == fold]
    if not train:
        raise RuntimeError(f"fold {fold}: no segmented study to train on outside the fold")
    ckpt = paths.segmenter_checkpoint(fold, cfg.seed)

    def fit_fold(model):
        need = [it for it in train if it.study_id not in grids]
        for sample in load_grids(paths, need, sc, geos, targets=True):
            it = need[sample["i"]]
            grids[it.study_id] = (sample["x"], sample["y"])
        volumes = [grids[it.study_id] for it in train]
        return train_segmenter(model, volumes, sc, cfg.seed + fold, ckpt, device, f"fold {fold}")

    fine_key = segmenter_key(cfg, paths, items, fine_only=True)
    model, _ = fold_model(ckpt, fine_key, cfg.seed + fold, lambda: build_model(sc), fit_fold, device)
    neck = train_neck_fold(cfg, paths, train, fold, geos, key, device)
    rows, slices = predict_studies(
        paths, held, [model], sc, "oof", geos, score=True, device=device, neck_models=neck
    )
    columns = VERTEBRA_COLUMNS + DICE_COLUMNS[1:] + ALIGN_COLUMNS
    table = pd.DataFrame(rows).reindex(columns=columns).assign(fold=fold)
    save_table(paths.segmenter_slices(fold), _concat(slices))
    save_table(paths.segmenter_predictions(fold), table)
    mark_current(paths.segmenter_predictions(fold), key)


def train_neck_fold(cfg, paths: Paths, train: list, fold: int, geos, key: str, device) -> list | None:
    """The first pass of fold ``fold`` ([model]), trained on whole studies at its coarse grid; None
    without ``segment.neck``."""
    nsc = neck_section(cfg.segment)
    if nsc is None:
        return None
    ckpt = paths.segmenter_checkpoint(fold, cfg.seed, part="neck")

    def fit_fold(model):
        volumes = [(s["x"], neck_classes(s["y"])) for s in load_grids(paths, train, nsc, geos, targets=True)]
        return train_segmenter(model, volumes, nsc, cfg.seed + fold, ckpt, device, f"fold {fold} neck")

    model, _ = fold_model(
        ckpt,
        fingerprint(key, "neck"),
        cfg.seed + fold,
        lambda: build_model(nsc, len(NECK_CLASSES)),
        fit_fold,
        device,
    )
    return [model]


def train_segmenter(model, volumes: list, sc, seed: int, ckpt: Path, device, desc: str = "train"):
    """Fit ``model`` on prepared (input, target) grids; returns ``fit``'s (model, history). With
    ``segment.neck`` (the second pass) each study is cut to its neck plus a random margin."""
    air = ct.windows(np.array([ct.AIR_HU]), list(sc.windows))[:, 0]
    margin = neck_margin_planes(sc)
    depths = [x.shape[1] for x, _ in volumes]
    if margin is not None:  # the longest cut a study can give
        spans = [cervical_planes(y) for _, y in volumes]
        depths = [
            d if sp is None else min(d, sp[1] - sp[0] + 1 + 2 * margin[1])
            for d, sp in zip(depths, spans, strict=True)
        ]
    depth = train_depth(sc, depths)
    data = TrainVolumes(volumes, depth, air, seed, int(sc.repeats), margin)
    # full batches only (when there are enough studies): a batch of one volume takes the slow
    # convolution path on CPU; the shuffle still reaches every study across epochs
    batch = int(sc.batch)
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=0, drop_last=len(data) > batch)
    settings = TrainSettings.from_config(sc, seed)
    return fit(model, loader, SegLoss(sc, seed), settings, ckpt, device, desc)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SLICE_COLUMNS)


def load_models(cfg, paths: Paths, folds: list[int], device, part: str = "") -> list:
    """Every fold's trained segmenter (``part="neck"``: the first pass's; [] without one); a clear
    error naming a missing checkpoint and the fix."""
    sc = neck_section(cfg.segment) if part == "neck" else cfg.segment
    if sc is None:
        return []
    ckpts = fold_checkpoints(
        lambda f: paths.segmenter_checkpoint(f, cfg.seed, part=part),
        folds,
        "02_localize",
        f"segmenter {part}".strip(),
    )
    n_classes = len(NECK_CLASSES) if part == "neck" else N_CLASSES
    return [load_weights(build_model(sc, n_classes), ckpt, device) for ckpt in ckpts]


def run_segment(cfg) -> dict:
    """Stage 02 (cervical): one segmenter per fold (resumable), the fold mean for every other study,
    the vertebra and slice tables and the report. Returns the report with a flat ``summary``."""
    with torch_threads(cfg.segment.torch_threads):
        return _run_segment(cfg)


def _run_segment(cfg) -> dict:
    start = time.perf_counter()
    sc = cfg.segment
    paths = Paths.from_config(cfg)
    folds_df = load_folds(cfg)
    fold_of = dict(zip(folds_df["study_id"].astype(str), folds_df["fold"]))
    items = study_items(paths)
    geos = geometries(paths)
    folds = selected_folds(cfg, cfg.segment)
    key = segmenter_key(cfg, paths, items)
    grids: dict = {}
    trained = []
    for fold in folds:
        if is_current(paths.segmenter_predictions(fold), key):
            log.info("fold %d: predictions exist, skipped", fold)
            continue
        train_fold(cfg, paths, items, fold_of, fold, grids, geos)
        trained.append(fold)
    parts = [
        pd.read_csv(paths.segmenter_predictions(f), dtype={"study_id": str, "series_id": str}) for f in folds
    ]
    oof = pd.concat(parts, ignore_index=True)
    # and the fold models themselves: a fold retrained since (its checkpoint rewritten) remakes the mean
    ckpts = [paths.segmenter_checkpoint(f, cfg.seed, part=part) for f in folds for part in ("", "neck")]
    mean_key = fingerprint(key, folds, [c.stat().st_mtime_ns if c.exists() else None for c in ckpts])
    if not is_current(paths.segmenter_mean_predictions, mean_key):
        others = [it for it in items if it.study_id not in set(oof["study_id"])]
        device = resolve_device(sc.device)
        models = load_models(cfg, paths, folds, device)
        neck = load_models(cfg, paths, folds, device, part="neck")
        rows, slices = predict_studies(
            paths, others, models, sc, "fold_mean", geos, device=device, neck_models=neck
        )
        save_table(paths.segmenter_mean_slices, _concat(slices))
        save_table(paths.segmenter_mean_predictions, pd.DataFrame(rows))
        mark_current(paths.segmenter_mean_predictions, mean_key)
    mean = pd.read_csv(paths.segmenter_mean_predictions, dtype={"study_id": str, "series_id": str})
    vert = order_rows(pd.concat([oof, mean], ignore_index=True))
    slices = pd.concat(
        [pd.read_parquet(paths.segmenter_slices(f)) for f in folds]
        + [pd.read_parquet(paths.segmenter_mean_slices)],
        ignore_index=True,
    )
    save_table(paths.vertebrae, vert[VERTEBRA_COLUMNS])
    save_table(paths.slice_labels, slices.sort_values(["split", "study_id", "index"], ignore_index=True))
    report = segment_report(paths, vert, geos)
    report.update(folds=folds, folds_trained=trained, seconds=round(time.perf_counter() - start, 1))
    save_text(paths.localize_report, json.dumps(report, indent=2))
    save_config(cfg, paths.localize_dir)
    return {**report, "summary": _summary(report)}


def order_rows(vert: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by split, study and vertebra C1..C7."""
    order = {v: i for i, v in enumerate(VERTEBRAE)}
    return vert.sort_values(
        ["split", "study_id", "vertebra"], key=lambda s: s.map(order) if s.name == "vertebra" else s
    ).reset_index(drop=True)


# =============================================================================================
# Report
# =============================================================================================


def dice_report(oof: pd.DataFrame, overlap: str = "overlap", voxels: str = "voxels") -> dict:
    """Per vertebra over the OOF studies whose mask has it: mean Dice, and the share of them where the
    vertebra was found (at least ``segment.min_voxels`` predicted voxels)."""
    oof = oof[oof["true_voxels"] > 0]
    dice = 2 * oof[overlap] / (oof[voxels] + oof["true_voxels"])
    per = dice.groupby(oof["vertebra"]).mean()
    found = oof["found"].astype(bool).groupby(oof["vertebra"]).mean()
    return {
        "studies": int(oof["study_id"].nunique()),
        "mean": round(float(per.mean()), 4) if len(per) else None,
        "per_vertebra": {v: round(float(per[v]), 4) for v in VERTEBRAE if v in per},
        "found_rate": {v: round(float(found[v]), 3) for v in VERTEBRAE if v in found},
    }


def alignment_report(oof: pd.DataFrame) -> dict | None:
    """Per segmented study: the share of its mask on bone through the header, the alignment kept and
    its share; and how many studies took the real-data convention instead of the header."""
    if "mask_alignment" not in oof or not oof["mask_alignment"].notna().any():
        return None
    per = oof.dropna(subset=["mask_alignment"]).drop_duplicates("study_id").set_index("study_id")
    return {
        "studies": int(len(per)),
        "convention_used": int((per["mask_alignment"] == "convention").sum()),
        "min_share_kept": round(float(per["mask_bone_share"].min()), 3),
        "per_study": {
            s: {
                "header": _number(r.header_bone_share),
                "kept": r.mask_alignment,
                "share": _number(r.mask_bone_share),
            }
            for s, r in per.iterrows()
        },
    }


def in_order(vert: pd.DataFrame, geos: dict) -> pd.Series:
    """Per study: all of C1..C7 found, their span midpoints strictly descending in patient z (C1 on top)."""
    out = {}
    for study, g in vert.groupby("study_id"):
        g = order_rows(g)
        if not g["found"].astype(bool).all() or len(g) != len(VERTEBRAE):
            out[study] = False
            continue
        geo = geos[(study, g["series_id"].iloc[0], int(g["stack"].iloc[0]))]
        mid = (g["slice_start"].to_numpy(float) + g["slice_end"].to_numpy(float)) / 2
        z = np.array([geo.to_patient(m, 0.0, 0.0)[2] for m in mid])
        out[study] = bool(np.all(np.diff(z) < 0))
    return pd.Series(out, dtype=bool)


def truth_agreement(paths: Paths, vert: pd.DataFrame, geos: dict) -> dict | None:
    """On generated data: predicted slice spans against the truth folder's (per source).

    The truth spans are in mm (z of the first and last slice a vertebra shows on); they are mapped to
    the cached stack's slices by position, so a slice missing from the cache shifts nothing.
    """
    f = paths.truth_dir / "vertebrae.csv"
    if not f.exists():
        return None
    truth = pd.read_csv(f, dtype={"study_id": str})
    m = vert.merge(truth[["study_id", "vertebra", "z_min_mm", "z_max_mm"]], on=["study_id", "vertebra"])
    m = m[m["slice_start"].notna()]
    if not len(m):
        return None
    t_start, t_end = [], []
    for r in m.itertuples(index=False):
        z = geos[(r.study_id, r.series_id, int(r.stack))].ipp[:, 2]
        on = np.flatnonzero((z >= r.z_min_mm - 1e-3) & (z <= r.z_max_mm + 1e-3))
        t_start.append(on.min() if len(on) else np.nan)
        t_end.append(on.max() if len(on) else np.nan)
    m = m.assign(t_start=t_start, t_end=t_end).dropna(subset=["t_start"])
    inter = (np.minimum(m["slice_end"], m["t_end"]) - np.maximum(m["slice_start"], m["t_start"]) + 1).clip(0)
    union = np.maximum(m["slice_end"], m["t_end"]) - np.minimum(m["slice_start"], m["t_start"]) + 1
    m = m.assign(
        iou=inter / union,
        within2=((m["slice_start"] - m["t_start"]).abs() <= 2) & ((m["slice_end"] - m["t_end"]).abs() <= 2),
    )
    return {
        src: {
            "vertebrae": int(len(g)),
            "span_iou": round(float(g["iou"].mean()), 3),
            "ends_within_2_slices": round(float(g["within2"].mean()), 3),
        }
        for src, g in m.groupby("source")
    }


def _number(x) -> float | None:
    """A float for the JSON report; None for NaN (a mask that lands on no cached voxel)."""
    return None if pd.isna(x) else float(x)


def neck_report(oof: pd.DataFrame) -> dict | None:
    """Over the OOF studies, the first pass's error (mm) at the worse end of the neck's extent."""
    if "neck_error_mm" not in oof or not oof["neck_error_mm"].notna().any():
        return None
    err = oof.drop_duplicates("study_id")["neck_error_mm"].dropna()
    return {
        "studies": int(len(err)),
        "median": round(float(err.median()), 1),
        "max": round(float(err.max()), 1),
    }


def segment_report(paths: Paths, vert: pd.DataFrame, geos: dict) -> dict:
    """OOF Dice and found-rate per vertebra, found/in-order shares per source, the mask alignment check,
    truth agreement."""
    order = in_order(vert, geos)
    per_source = {}
    for src, g in vert.groupby("source"):
        studies = g["study_id"].unique()
        per_source[src] = {
            "studies": int(len(studies)),
            "all_found": round(float(g.groupby("study_id")["found"].all().mean()), 3),
            "in_order": round(float(order.reindex(studies).fillna(False).mean()), 3),
            "found_rate": {
                v: round(float(f), 3)
                for v, f in g["found"].astype(bool).groupby(g["vertebra"]).mean().items()
            },
        }
    oof = vert[vert["source"] == "oof"] if "overlap" in vert else None
    return {
        "dice_oof": dice_report(oof) if oof is not None else None,
        "dice_oof_grid_only": (  # without the HU refinement: the model's own boundaries
            dice_report(oof, "raw_overlap", "raw_voxels") if oof is not None else None
        ),
        "studies": per_source,
        "in_order_all": round(float(order.mean()), 3),
        "mask_alignment": alignment_report(oof) if oof is not None else None,
        "neck_window_error_mm": neck_report(oof) if oof is not None else None,
        "truth_agreement": truth_agreement(paths, vert, geos),
    }


def _summary(report: dict) -> dict:
    out = {}
    dice = report.get("dice_oof") or {}
    out["oof studies"] = dice.get("studies")
    out["oof dice mean"] = dice.get("mean")
    out["oof dice mean, grid only"] = (report.get("dice_oof_grid_only") or {}).get("mean")
    out.update({f"oof dice {v}": d for v, d in (dice.get("per_vertebra") or {}).items()})
    out.update({f"oof found {v}": f for v, f in (dice.get("found_rate") or {}).items()})
    neck = report.get("neck_window_error_mm") or {}
    if neck:
        out["oof neck window error mm, median / max"] = f"{neck['median']} / {neck['max']}"
    align = report.get("mask_alignment") or {}
    out["masks on bone, min share"] = align.get("min_share_kept")
    out["masks aligned by convention"] = align.get("convention_used")
    for src, s in report["studies"].items():
        out[f"{src} studies"] = s["studies"]
        out[f"{src} in order"] = s["in_order"]
    for src, s in (report.get("truth_agreement") or {}).items():
        out[f"{src} span IoU vs truth"] = s["span_iou"]
    out["seconds"] = report.get("seconds")
    return out


# =============================================================================================
# Stage 06
# =============================================================================================


def predict_test(cfg) -> dict:
    """Stage 06's segmentation: every test study of this out_dir's cache with every fold's model (read
    from ``models_from``), the mean probabilities reduced to this out_dir's vertebra and slice tables
    (source ``test_mean``). No training. A study without a readable volume keeps its 7 rows."""
    with torch_threads(cfg.segment.torch_threads):
        return _predict_test(cfg)


def _predict_test(cfg) -> dict:
    start = time.perf_counter()
    sc = cfg.segment
    paths = Paths.from_config(cfg)
    device = resolve_device(sc.device)
    items = study_items(paths, splits=("test",))
    folds = selected_folds(cfg, cfg.segment)
    models = load_models(cfg, paths, folds, device)
    neck = load_models(cfg, paths, folds, device, part="neck")
    rows, slices = predict_studies(
        paths, items, models, sc, "test_mean", geometries(paths), device=device, neck_models=neck
    )
    vert = order_rows(pd.DataFrame(rows, columns=VERTEBRA_COLUMNS))
    save_table(paths.vertebrae, vert)
    save_table(paths.slice_labels, _concat(slices))
    order = in_order(vert, geometries(paths)) if len(vert) else pd.Series(dtype=bool)
    return {
        "studies": len(items),
        "studies_without_volume": sum(it.path is None for it in items),
        "vertebrae_found": int(vert["found"].sum()),
        "all_found_share": round(float(vert.groupby("study_id")["found"].all().mean()), 3)
        if len(vert)
        else 0.0,
        "in_order_share": round(float(order.mean()), 3) if len(order) else 0.0,
        "folds": selected_folds(cfg, cfg.segment),
        "seconds": round(time.perf_counter() - start, 1),
    }
