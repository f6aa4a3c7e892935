"""SPIDER mask labels, structure names and level names: one place for every label id of the task.

Dataset card (SPIDER, Zenodo 10159290 / DOMAIN.md): 0 background; 1-25 vertebrae numbered from the
bottom (L5 = 1, L4 = 2, ... with a transitional L6 the numbering shifts: L6 = 1, L5 = 2, ...); 100 the
spinal canal; 101-125 partially visible vertebrae (same numbering + 100); 201-225 intervertebral discs
numbered from the bottom (L5/S1 = 201). The sacrum's top is the lower face of disc 201.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
CANAL = 100
PARTIAL_OFFSET = 100  # a partially visible vertebra v is labelled v + 100
DISC_OFFSET = 200  # the disc below vertebra v (counted from the bottom) is labelled v + 200
MAX_COUNT = 25  # labels 1..25, 101..125, 201..225

MODALITIES = ("t1", "t2", "t2_SPACE")  # file name suffixes: <patient>_<modality>.mha
LUMBAR = ("L1", "L2", "L3", "L4", "L5")  # the measured vertebrae, top to bottom
# Disc levels measured, top to bottom; the lowest is the lumbosacral disc (label 201).
LEVELS = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")


def is_vertebra(label: int) -> bool:
    """Whether ``label`` is a (fully visible) vertebra."""
    return 1 <= int(label) <= MAX_COUNT


def is_partial(label: int) -> bool:
    """Whether ``label`` is a partially visible vertebra (cut by the field of view)."""
    return PARTIAL_OFFSET + 1 <= int(label) <= PARTIAL_OFFSET + MAX_COUNT


def is_disc(label: int) -> bool:
    """Whether ``label`` is an intervertebral disc."""
    return DISC_OFFSET + 1 <= int(label) <= DISC_OFFSET + MAX_COUNT


def vertebra_names(n_lumbar: int = 5) -> list[str]:
    """Names of vertebra labels 1, 2, 3, ... (bottom up) for a spine with ``n_lumbar`` lumbar vertebrae
    (5, or 6 with a transitional L6): e.g. 5 -> ["L5", "L4", "L3", "L2", "L1", "T12", "T11", ...]."""
    lumbar = [f"L{i}" for i in range(n_lumbar, 0, -1)]
    thoracic = [f"T{i}" for i in range(12, 0, -1)]
    cervical = [f"C{i}" for i in range(7, 0, -1)]
    names = lumbar + thoracic + cervical  # 24 with 5 lumbar vertebrae: the 25th has no anatomical name
    return (names + [f"V{k}" for k in range(len(names) + 1, MAX_COUNT + 1)])[:MAX_COUNT]


def vertebra_label(name: str, n_lumbar: int = 5) -> int:
    """Label id of vertebra ``name`` ("L5", "T12", ...) counted from the bottom."""
    return vertebra_names(n_lumbar).index(name) + 1


def vertebra_name(label: int, n_lumbar: int = 5) -> str:
    """Name of a vertebra label (1..25) or a partially visible one (101..125)."""
    v = int(label) - (PARTIAL_OFFSET if is_partial(label) else 0)
    return vertebra_names(n_lumbar)[v - 1]


def disc_name(label: int, n_lumbar: int = 5) -> str:
    """Level name of a disc label: 201 -> "L5/S1" (or "L6/S1" with a transitional L6), 202 -> "L4/L5"."""
    v = int(label) - DISC_OFFSET
    names = vertebra_names(n_lumbar)
    below = "S1" if v == 1 else names[v - 2]
    return f"{names[v - 1]}/{below}"


def disc_label(level: str, n_lumbar: int = 5) -> int:
    """Label id of the disc at ``level`` ("L4/L5" -> 202); the disc below vertebra v is 200 + v."""
    upper = level.split("/")[0]
    return DISC_OFFSET + vertebra_label(upper, n_lumbar)


def structure_name(label: int, n_lumbar: int = 5) -> str:
    """Human-readable name of any mask label ("L3", "L4/L5", "canal", "T11 (partial)", "background")."""
    label = int(label)
    if label == BACKGROUND:
        return "background"
    if label == CANAL:
        return "canal"
    if is_vertebra(label):
        return vertebra_name(label, n_lumbar)
    if is_partial(label):
        return f"{vertebra_name(label, n_lumbar)} (partial)"
    if is_disc(label):
        return disc_name(label, n_lumbar)
    raise ValueError(f"unknown SPIDER label {label}")


def cut_by_field(piece, spacing, margin_mm: float = 1.0) -> bool:
    """Whether a labelled piece (canonical boolean array) comes within ``margin_mm`` of the image's
    in-plane border (rows or columns): the field of view cuts it, so it is partially visible (label
    100 + id). Stage 02 and the generator mark vertebrae with this one rule."""
    rr = np.nonzero(piece.any(axis=(0, 2)))[0]
    cc = np.nonzero(piece.any(axis=(0, 1)))[0]
    mr, mc = margin_mm / spacing[1], margin_mm / spacing[2]
    rows, cols = piece.shape[1:]
    return bool(rr[0] < mr or rr[-1] > rows - 1 - mr or cc[0] < mc or cc[-1] > cols - 1 - mc)
