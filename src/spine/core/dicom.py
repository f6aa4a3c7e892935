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

    Returns (pixels, meta): pixels of rescaled values (slope/intercept applied, MONOCHROME1 inverted),
    int16 when they are whole numbers that fit, else float32; meta with instance number and geometry.
    Raises DicomError naming the file for unreadable files, unsupported transfer syntaxes and missing
    geometry tags.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for broken files
        raise DicomError(f"{path}: unreadable DICOM ({type(e).__name__}: {e}); re-download the file") from e
    if "PixelData" not in ds:  # pydicom stops quietly at the end of a truncated file
        raise DicomError(f"{path}: no pixel data (truncated file, or not an image); re-download the file")
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
        h = _header(ds)
        meta = _meta(h, path)
        pixels = _pixels(ds, h, syntax)
    except DicomError:
        raise
    except Exception as e:
        raise DicomError(f"{path}: cannot decode pixels ({type(e).__name__}: {e})") from e
    meta["transfer_syntax"] = SUPPORTED_SYNTAXES[syntax]
    return pixels, meta


# The header tags stage 01 needs, read straight from pydicom's raw elements: its attribute access
# costs ~12 us a tag, as much in all as decoding an uncompressed image.
_US = {
    "rows": 0x00280010,
    "cols": 0x00280011,
    "samples": 0x00280002,
    "bits_allocated": 0x00280100,
    "bits_stored": 0x00280101,
    "pixel_representation": 0x00280103,
}
_NUMBERS = {
    "ipp": 0x00200032,
    "iop": 0x00200037,
    "pixel_spacing": 0x00280030,
    "slice_thickness": 0x00180050,
    "instance_number": 0x00200013,
    "frames": 0x00280008,
    "slope": 0x00281053,
    "intercept": 0x00281052,
}
_TEXT = {"photometric": 0x00280004}


def _header(ds) -> dict:
    """Header values by name; None where a tag is absent or empty. Numbers (DS/IS) come as lists."""
    out = {}
    for key, tag in {**_US, **_NUMBERS, **_TEXT}.items():
        elem = ds.get_item(tag)
        v = None if elem is None else elem.value
        if v is None or (isinstance(v, (bytes, str)) and not v.strip()):
            v = None
        elif not isinstance(v, bytes):  # pydicom already converted this element
            v = np.atleast_1d(np.asarray(v, dtype=float)).tolist() if key in _NUMBERS else v
        elif key in _US:
            v = int.from_bytes(v[:2], "little" if elem.is_little_endian else "big")
        elif key in _NUMBERS:
            v = [float(x) for x in v.split(b"\\")]
        else:
            v = v.decode(errors="replace").strip()
        out[key] = v
    return out


def _meta(h: dict, path) -> dict:
    for key, tag in (
        ("ipp", "ImagePositionPatient"),
        ("iop", "ImageOrientationPatient"),
        ("pixel_spacing", "PixelSpacing"),
        ("rows", "Rows"),
        ("cols", "Columns"),
    ):
        if h[key] is None:
            raise DicomError(f"{path}: missing {tag}; the slice cannot be placed in patient space")
    return {
        "instance_number": int(h["instance_number"][0]) if h["instance_number"] else -1,
        "ipp": h["ipp"],
        "iop": h["iop"],
        "pixel_spacing": h["pixel_spacing"],
        "slice_thickness": h["slice_thickness"][0] if h["slice_thickness"] else float("nan"),
        "rows": h["rows"],
        "cols": h["cols"],
    }


def _pixels(ds, h: dict, syntax) -> np.ndarray:
    if (h["samples"] or 1) != 1 or int((h["frames"] or [1])[0]) != 1:
        raise DicomError("only single-frame grayscale images are supported")
    bits, stored, rows, cols = h["bits_allocated"], h["bits_stored"], h["rows"], h["cols"]
    signed = h["pixel_representation"] == 1
    if syntax in _NATIVE_LE and bits in (8, 16) and stored == bits:
        # Fast path: uncompressed little-endian data is the raw array; skips pydicom's handlers.
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        arr = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
    else:
        arr = ds.pixel_array
    if h["photometric"] == "MONOCHROME1":  # invert stored values so that bright means dense
        arr = -1 - arr.astype(np.int32) if signed else (2**stored - 1) - arr.astype(np.int32)
    slope = (h["slope"] or [1.0])[0]
    intercept = (h["intercept"] or [0.0])[0]
    if arr.dtype.kind in "iu" and float(slope).is_integer() and float(intercept).is_integer():
        # integer rescale (CT and most MR): exact, and int16 when the values fit
        out = arr.astype(np.int32)
        if slope != 1:
            out *= int(slope)
        if intercept != 0:
            out += int(intercept)
        if out.min() >= -32768 and out.max() <= 32767:
            return out.astype(np.int16)
        return out.astype(np.float32)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
