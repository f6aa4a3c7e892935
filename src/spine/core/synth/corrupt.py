"""Damage the test split of a generated data set the ways real data is damaged.

Real test folders hold what the generators never write: a study listed but absent, truncated and empty
files, stray non-DICOM files, a transfer syntax no decoder reads, files without the geometry tags, the
same slice twice, a one-slice series, an image of another size, an unknown series description, a study
whose every file is unreadable. ``damage_test_split`` applies each kind once, to studies of its own,
and returns what it did; stage 06 must still give every study all its rows and name each problem.

``removed=True`` applies the same plan as a reader that skips what it cannot use would see it: a bad
file is deleted instead of damaged, stray files and consistent changes (a MONOCHROME1 series, a
duplicated slice) are left out. A study predicted from the damaged copy must score as the same study
predicted from that copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

FILE_KINDS = (
    "truncated file",
    "empty file",
    "stray non-DICOM files",
    "unknown transfer syntax",
    "no PixelSpacing",
    "no ImagePositionPatient",
    "no ImageOrientationPatient",
    "same slice twice",
    "image of another size",
)
SERIES_KINDS = ("MONOCHROME1 series", "one-slice series", "unknown series description")
STUDY_KINDS = ("study listed but absent", "every file unreadable")
KINDS = STUDY_KINDS + FILE_KINDS + SERIES_KINDS  # one study each, in this order
# Kinds a reader sees as nothing at all once it skips what it cannot use (see ``removed``).
CONSISTENT = {"stray non-DICOM files", "MONOCHROME1 series", "same slice twice"}
UNKNOWN_SYNTAX = "1.2.826.0.1.3680043.9.9999.1"  # a private UID: no decoder knows it
SERIES_TABLE = "test_series_descriptions.csv"  # where a task lists series by description


def _dicoms(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"), key=lambda p: (len(p.name), p.name))


def _study_folder(series_folder: Path, study_id: str) -> Path:
    """The study's own folder: the series folder itself (one series per study) or its parent."""
    return series_folder if series_folder.name == str(study_id) else series_folder.parent


def _usable_series(task, data_dir: Path) -> pd.DataFrame:
    """Series on disk with at least 3 files, in listing order."""
    series = task.list_series(data_dir, "test").copy()
    series["study_id"] = series["study_id"].astype(str)
    n_files = [len(_dicoms(Path(f))) if Path(f).is_dir() else 0 for f in series["folder"]]
    return series[np.array(n_files) >= 3].reset_index(drop=True)


def _rewrite(path: Path, change) -> None:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # a file without a meta header (a generator quirk)
        implicit, _ = ds.original_encoding
        uid = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = uid
    change(ds)
    ds.save_as(path)


def _drop_tag(keyword: str):
    def change(ds):
        delattr(ds, keyword)

    return change


def _smaller_image(ds) -> None:
    pixels = ds.pixel_array[:-8, :-4].copy()  # decoded: also right after a compressed syntax
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian


def _monochrome1(ds) -> None:
    """The tag says MONOCHROME1. CT keeps its stored values (the rescale gives HU whatever the tag
    says); MR stores the inverted values, so a reader that inverts back sees the same image."""
    if ds.get("Modality") != "CT":
        pixels = ds.pixel_array
        top = (1 << int(ds.BitsStored)) - 1
        ds.PixelData = (top - pixels.astype(np.int64)).astype(pixels.dtype).tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PhotometricInterpretation = "MONOCHROME1"


def _unknown_syntax(path: Path) -> None:
    """Relabel the file's transfer syntax as a private UID: the bytes stay, no decoder reads them."""
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta.TransferSyntaxUID = UNKNOWN_SYNTAX
    ds.save_as(path, implicit_vr=False, little_endian=True)


def _decodes(path: Path) -> bool:
    try:
        return pydicom.dcmread(path, force=True).pixel_array.ndim == 2
    except Exception:  # the generator's own quirks (a truncated file, no pixel data): not a target
        return False


def _damage_file(kind: str, files: list[Path], removed: bool) -> list[str]:
    """Damage one decodable file of a series (the one nearest the middle); returns the files touched."""
    middle = len(files) // 2
    target = next(f for f in sorted(files, key=lambda f: abs(files.index(f) - middle)) if _decodes(f))
    if kind in CONSISTENT and removed:
        return [str(target)]
    if removed:
        target.unlink()
    elif kind == "truncated file":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "empty file":
        target.write_bytes(b"")
    elif kind == "stray non-DICOM files":
        (target.parent / "notes.txt").write_text("reviewed by R.S., see report\n")
        (target.parent / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
        (target.parent / "DICOMDIR").write_bytes(bytes(132))
    elif kind == "unknown transfer syntax":
        _unknown_syntax(target)
    elif kind.startswith("no "):
        _rewrite(target, _drop_tag(kind[3:]))
    elif kind == "same slice twice":
        shutil.copyfile(target, target.parent / f"{10_000 + len(files)}.dcm")
    elif kind == "image of another size":
        _rewrite(target, _smaller_image)
    return [str(target)]


def _change_series(kind: str, data_dir: Path, row, removed: bool) -> list[str]:
    files = _dicoms(Path(row.folder))
    if kind == "MONOCHROME1 series":
        if not removed:
            for f in filter(_decodes, files):
                _rewrite(f, _monochrome1)
        return [row.folder]
    if kind == "one-slice series":
        for f in files[: len(files) // 2] + files[len(files) // 2 + 1 :]:
            f.unlink()
        return [row.folder]
    table = data_dir / SERIES_TABLE  # unknown series description
    if table.exists():
        df = pd.read_csv(table)
        df.loc[df["series_id"].astype(str) == str(row.series_id), "series_description"] = "Sagittal T2 FLAIR"
        df.to_csv(table, index=False)
    return [str(table)]


def _change_study(kind: str, folder: Path, removed: bool) -> list[str]:
    if kind == "study listed but absent" or removed:
        shutil.rmtree(folder)
        return [str(folder)]
    for f in folder.rglob("*.dcm"):
        f.write_bytes(f.read_bytes()[:100])
    return [str(folder)]


def damage_test_split(task, data_dir: Path, removed: bool = False) -> pd.DataFrame:
    """Apply every kind of damage once, each to a study of its own, to the test split of ``data_dir``
    (in place). Returns one row per kind: kind, study_id, series_id, files (what was touched).

    Studies are taken in listing order among those with a series of at least 3 files on disk; the
    rest stay untouched. A series kind that needs a description table the task lacks changes nothing.
    """
    data_dir = Path(data_dir)
    series = _usable_series(task, data_dir)
    studies = list(dict.fromkeys(series["study_id"]))
    if len(studies) < len(KINDS):
        raise ValueError(f"{data_dir}: {len(studies)} test studies with a readable series; need {len(KINDS)}")
    done = []
    for kind, study in zip(KINDS, studies):
        row = series[series["study_id"] == study].iloc[0]
        if kind in STUDY_KINDS:
            files = _change_study(kind, _study_folder(Path(row.folder), study), removed)
        elif kind in FILE_KINDS:
            files = _damage_file(kind, _dicoms(Path(row.folder)), removed)
        else:
            files = _change_series(kind, data_dir, row, removed)
        done.append((kind, study, "" if kind in STUDY_KINDS else str(row.series_id), files))
    return pd.DataFrame(done, columns=["kind", "study_id", "series_id", "files"])
