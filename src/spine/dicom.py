"""Read one DICOM instance: pixels in output units (rescale applied) and its geometry tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as U

# Transfer syntaxes stage 01 decodes (pydicom natively or through the pylibjpeg plugins).
SUPPORTED_SYNTAXES = {
    U.ImplicitVRLittleEndian: "implicit",
    U.ExplicitVRLittleEndian: "explicit",
    U.DeflatedExplicitVRLittleEndian: "deflated",
    U.ExplicitVRBigEndian: "big-endian",
    U.RLELossless: "rle",
    U.JPEGBaseline8Bit: "jpeg-baseline",
    U.JPEGExtended12Bit: "jpeg-extended",
    U.JPEGLossless: "jpeg-lossless",
    U.JPEGLosslessSV1: "jpeg-lossless-sv1",
    U.JPEGLSLossless: "jpeg-ls",
    U.JPEGLSNearLossless: "jpeg-ls-near",
    U.JPEG2000Lossless: "jpeg2000-lossless",
    U.JPEG2000: "jpeg2000",
}
_NATIVE_LE = {U.ImplicitVRLittleEndian, U.ExplicitVRLittleEndian, U.DeflatedExplicitVRLittleEndian}


class DicomError(Exception):
    """A file that cannot be used; the message names the file and what to do."""


def read_instance(path: Path) -> tuple[np.ndarray, dict]:
    """Decode one single-frame grayscale instance.

    Returns (pixels, meta): pixels as a float32 array of rescaled values (slope/intercept applied,
    MONOCHROME1 inverted), meta with instance number and geometry. Raises DicomError naming the file
    for unreadable files, unsupported transfer syntaxes and missing geometry tags.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for broken files
        raise DicomError(f"{path}: unreadable DICOM ({type(e).__name__}: {e}); re-download the file") from e
    file_meta = getattr(ds, "file_meta", None)
    syntax = (
        file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    ) or U.ImplicitVRLittleEndian
    if syntax not in SUPPORTED_SYNTAXES:
        raise DicomError(
            f"{path}: unsupported transfer syntax {syntax} ({getattr(syntax, 'name', '?')}); "
            "convert it, e.g. with `gdcmconv --raw`"
        )
    try:
        meta = _meta(ds, path)
        pixels = _pixels(ds, syntax)
    except DicomError:
        raise
    except Exception as e:
        raise DicomError(f"{path}: cannot decode pixels ({type(e).__name__}: {e})") from e
    meta["transfer_syntax"] = SUPPORTED_SYNTAXES[syntax]
    return pixels, meta


def _meta(ds, path) -> dict:
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise DicomError(f"{path}: missing {tag}; the slice cannot be placed in patient space")
    return {
        "instance_number": int(ds.get("InstanceNumber", -1) or -1),
        "ipp": [float(v) for v in ds.ImagePositionPatient],
        "iop": [float(v) for v in ds.ImageOrientationPatient],
        "pixel_spacing": [float(v) for v in ds.PixelSpacing],
        "slice_thickness": float(ds.get("SliceThickness", np.nan) or np.nan),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
    }


def _pixels(ds, syntax) -> np.ndarray:
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomError("only single-frame grayscale images are supported")
    bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    if syntax in _NATIVE_LE and bits in (8, 16) and stored == bits:
        # Fast path: uncompressed little-endian data is the raw array; skips pydicom's handlers.
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        arr = np.frombuffer(ds.PixelData, dtype=dtype, count=int(ds.Rows) * int(ds.Columns))
        arr = arr.reshape(int(ds.Rows), int(ds.Columns))
    else:
        arr = ds.pixel_array
    out = arr.astype(np.float32)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        out = -1.0 - out if signed else float(2**stored - 1) - out
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1:
        out *= slope
    if intercept != 0:
        out += intercept
    return out
