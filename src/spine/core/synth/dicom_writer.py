"""Write one DICOM slice with full geometry tags, optionally compressed."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}
SOP_CLASS = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
UID_ROOT = "1.2.826.0.1.3680043.10."


def make_uid(*parts) -> str:
    """Deterministic DICOM UID built from ``parts`` under a fixed root (same inputs, same UID)."""
    return (UID_ROOT + ".".join(str(int(p)) for p in parts))[:64]


def write_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    ipp,
    iop,
    spacing,
    thickness: float,
    instance_number: int,
    study_uid: str,
    series_uid: str,
    series_number: int,
    series_description: str,
    modality: str = "MR",
    patient_id: str = "0",
    rescale: tuple[float, float] | None = None,
    syntax: str = "explicit",
    bits_stored: int = 12,
) -> None:
    """Write ``pixels`` (2D uint16 or int16 stored values) as one DICOM file.

    ``rescale`` = (slope, intercept) adds the Rescale tags (CT: HU = stored * slope + intercept).
    ``syntax`` is one of SYNTAXES: explicit / implicit VR little endian, RLE or JPEG 2000 lossless.
    ``bits_stored``: BitsAllocated is 16; like most scanners the default stores 12 bits (HighBit 11),
    so uint16 values must lie in 0..4095 and int16 values in -2048..2047 (CT: HU -1024..3071 as
    uint16 with intercept -1024). Values that do not fit are an error, never silently wrapped.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"pixels must be 2D uint16/int16, got {pixels.dtype} {pixels.shape}")
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown syntax {syntax!r}; choose from {sorted(SYNTAXES)}")
    _check_fits(pixels, bits_stored, path)
    sop_uid = f"{series_uid}.{instance_number}"[:64]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_ROOT + "1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else study_uid
    ds.Modality = modality
    ds.PatientID = str(patient_id)
    ds.StudyDate = _dt.date(2024, 1, 1).strftime("%Y%m%d")
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.InstanceNumber = int(instance_number)
    ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
    ds.PixelSpacing = [round(float(v), 6) for v in spacing]
    ds.SliceThickness = round(float(thickness), 4)
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = int(pixels.dtype == np.int16)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
        ds.RescaleType = "HU"
    arr = np.ascontiguousarray(pixels)

    ts = SYNTAXES[syntax]
    if ts.is_compressed:
        ds.compress(
            ts, arr, encoding_plugin="pylibjpeg" if syntax == "rle" else "", generate_instance_uid=False
        )
    else:
        ds.PixelData = arr.tobytes()
        ds.file_meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True)


def _check_fits(pixels: np.ndarray, bits_stored: int, path: Path) -> None:
    """Refuse values outside the range ``bits_stored`` bits can hold (they would be masked on reading)."""
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 1..16 (BitsAllocated is 16), got {bits_stored}")
    signed = pixels.dtype == np.int16
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    vmin, vmax = int(pixels.min()), int(pixels.max())
    if vmin < lo or vmax > hi:
        raise ValueError(
            f"{path}: {pixels.dtype} values {vmin}..{vmax} do not fit BitsStored {bits_stored} ({lo}..{hi}); "
            "clip them, store them unsigned with a RescaleIntercept (CT: HU - (-1024) in 0..4095), "
            "or pass bits_stored=16"
        )


def read_back(path: Path) -> np.ndarray:
    """Stored values of a written file (for tests)."""
    return pydicom.dcmread(path).pixel_array
