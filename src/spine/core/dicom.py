"""Read one DICOM instance: pixels in output units (rescale applied) and its geometry tags.

dicomsdl (compiled) reads the usual files: the header tags and the stored pixel values of
uncompressed little-endian, RLE and JPEG 2000 files. pydicom (+ the pylibjpeg plugins) reads the
rest (no preamble, big endian, deflated, JPEG, JPEG-LS, unknown syntaxes, anything dicomsdl fails
on) and words the error messages.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as U

try:  # optional: a compiled reader, several times faster than pydicom's Dataset
    import dicomsdl
except ImportError:  # pragma: no cover - pydicom reads everything without it
    dicomsdl = None

log = logging.getLogger(__name__)

# Transfer syntaxes stage 01 decodes (dicomsdl, or pydicom natively or through the pylibjpeg plugins).
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
_NATIVE_LE = (U.ImplicitVRLittleEndian, U.ExplicitVRLittleEndian)

# The syntaxes dicomsdl reads here: those checked against pydicom's pixel_array (tests/test_dicom.py).
# JPEG Lossless and JPEG-LS stay on pydicom + pylibjpeg: no encoder here to check dicomsdl on them.
_DICOMSDL_SYNTAXES = {}
if dicomsdl is not None:
    _DICOMSDL_SYNTAXES = {
        dicomsdl.UID.IMPLICIT_VR_LITTLE_ENDIAN: U.ImplicitVRLittleEndian,
        dicomsdl.UID.EXPLICIT_VR_LITTLE_ENDIAN: U.ExplicitVRLittleEndian,
        dicomsdl.UID.RLE_LOSSLESS: U.RLELossless,
        dicomsdl.UID.JPEG2000_IMAGE_COMPRESSION_LOSSLESS_ONLY: U.JPEG2000Lossless,
        dicomsdl.UID.JPEG2000_IMAGE_COMPRESSION: U.JPEG2000,
    }
    # dicomsdl prints every file it rejects to stderr; those files go to pydicom, which words the error
    # that stage 01 logs and counts.
    dicomsdl.set_loglevel(dicomsdl.LogLevel.DISABLE)

_PIXEL_DATA = 0x7FE00010
_BEFORE_PIXELS = _PIXEL_DATA - 1  # dicomsdl's load_until: the header, without the pixel data
_PIXEL_TAG_BYTES = struct.pack("<HH", _PIXEL_DATA >> 16, _PIXEL_DATA & 0xFFFF)


class DicomError(Exception):
    """A file that cannot be used; the message names the file and what to do.

    ``reason`` is a short category (e.g. "unreadable", "missing geometry") that stage 01 counts.
    """

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def read_instance(path: Path) -> tuple[np.ndarray, dict]:
    """Decode one single-frame grayscale instance.

    Returns (pixels, meta): pixels in output units (see ``_to_output``), int16 when they are whole
    numbers that fit, else float32; meta with instance number and geometry. Raises DicomError naming
    the file (with a short ``reason``) for empty, unreadable or truncated files, unsupported transfer
    syntaxes and missing geometry tags.
    """
    data = Path(path).read_bytes()
    if not data:
        raise DicomError(f"{path}: empty file (0 bytes); re-download it", "empty file")
    opened = open_with_dicomsdl(data)
    if opened is not None:  # the common case: no pydicom Dataset at all
        syntax, dset = opened
        h = _header_from_dicomsdl(dset)
        stored_values = lambda: _dicomsdl_pixels(path, data, h, syntax)
    else:
        ds = _dcmread(path, data)
        syntax = _syntax(ds, path)
        h = _header(ds)
        stored_values = lambda: _pydicom_stored_values(ds, h, syntax)
    try:
        meta = _meta(h, path)
        pixels = _to_output(stored_values(), h)
    except DicomError as e:
        raise DicomError(f"{path}: {e}" if str(path) not in str(e) else str(e), e.reason) from e
    except Exception as e:
        raise DicomError(f"{path}: cannot decode pixels ({type(e).__name__}: {e})", "cannot decode") from e
    meta["transfer_syntax"] = SUPPORTED_SYNTAXES[syntax]
    return pixels, meta


def open_with_dicomsdl(data: bytes):
    """(transfer syntax, dicomsdl header DataSet) of a Part-10 file in a syntax dicomsdl reads here,
    or None when pydicom must read it. The DataSet holds the header only (no pixel data) and reads
    from ``data``, which must outlive it."""
    if dicomsdl is None or data[128:132] != b"DICM":  # no preamble: pydicom's reading, as always
        return None
    try:
        dset = dicomsdl.open_memory(data, False, _BEFORE_PIXELS)
    except Exception as e:  # dicomsdl.DicomException: pydicom reads it and words the error
        log.debug("dicomsdl cannot read the header (%s); reading with pydicom", e)
        return None
    syntax = _DICOMSDL_SYNTAXES.get(dset.getTransferSyntax())
    return None if syntax is None else (syntax, dset)


def _dcmread(path: Path, data: bytes):
    """pydicom's reading of ``data`` (the bytes of ``path``), with the errors stage 01 reports."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # pydicom raises many types for broken files
        raise DicomError(f"{path}: unreadable DICOM ({type(e).__name__}: {e}); re-download the file") from e
    if "PixelData" not in ds:  # pydicom stops quietly at the end of a truncated file
        raise DicomError(
            f"{path}: no pixel data (truncated file, or not an image); re-download the file", "no pixel data"
        )
    return ds


def _syntax(ds, path: Path) -> U.UID:
    file_meta = getattr(ds, "file_meta", None)
    syntax = (
        file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    ) or U.ImplicitVRLittleEndian
    if syntax not in SUPPORTED_SYNTAXES:
        raise DicomError(
            f"{path}: unsupported transfer syntax {syntax} ({getattr(syntax, 'name', '?')}); "
            "convert it, e.g. with `gdcmconv --raw`",
            "unsupported transfer syntax",
        )
    return syntax


# The header tags stage 01 needs.
_US = {
    "rows": 0x00280010,
    "cols": 0x00280011,
    "samples": 0x00280002,
    "bits_allocated": 0x00280100,
    "bits_stored": 0x00280101,
    "high_bit": 0x00280102,
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
_TEXT = {"photometric": 0x00280004, "modality": 0x00080060}
_TAGS = {**_US, **_NUMBERS, **_TEXT}
_TAG_LIST = list(_TAGS.values())


def _header_from_dicomsdl(dset) -> dict:
    """Header values by name, as ``_header`` gives them, from dicomsdl's header DataSet."""
    out = {}
    for (key, tag), v in zip(_TAGS.items(), dset.getValues(_TAG_LIST)):
        # dicomsdl reads an empty DS, IS or US as 0: only the element's length tells it from a real 0
        if v == 0 and not isinstance(v, list) and dset.getDataElement(tag).length() == 0:
            v = None
        out[key] = _normalized(key, v)
    return out


def _header(ds) -> dict:
    """Header values by name from a pydicom Dataset; None where a tag is absent or empty.
    US as int, numbers (DS/IS) as lists of floats, text stripped."""
    out = {}
    for key, tag in _TAGS.items():
        elem = ds.get_item(tag)
        v = None if elem is None else elem.value
        # a raw value (a VR pydicom did not convert, e.g. UN): decoded here
        out[key] = _from_bytes(key, v, elem.is_little_endian) if isinstance(v, bytes) else _normalized(key, v)
    return out


def _normalized(key: str, v):
    """One decoded value in the types ``_header`` promises; None when absent or empty."""
    if v is None or (isinstance(v, str) and not v.strip("\0 ")):
        return None
    if key in _US:
        return int(v)
    if key in _NUMBERS:
        return [float(v)] if isinstance(v, (int, float, str)) else [float(x) for x in v]
    return str(v).strip("\0 ")


def _from_bytes(key: str, v: bytes, little: bool):
    """One raw value: US as int, DS/IS as a list of floats, text stripped; None when empty."""
    if key in _US:
        return int.from_bytes(v[:2], "little" if little else "big") if len(v) >= 2 else None
    if not v.strip(b"\0 "):
        return None
    if key in _NUMBERS:
        return [float(x) for x in v.split(b"\\")]
    return v.decode(errors="replace").strip("\0 ")


def _meta(h: dict, path) -> dict:
    for key, tag in (
        ("ipp", "ImagePositionPatient"),
        ("iop", "ImageOrientationPatient"),
        ("pixel_spacing", "PixelSpacing"),
        ("rows", "Rows"),
        ("cols", "Columns"),
    ):
        if h[key] is None:
            raise DicomError(
                f"{path}: missing {tag}; the slice cannot be placed in patient space", "missing geometry"
            )
    return {
        "instance_number": int(h["instance_number"][0]) if h["instance_number"] else -1,
        "ipp": h["ipp"],
        "iop": h["iop"],
        "pixel_spacing": h["pixel_spacing"],
        "slice_thickness": h["slice_thickness"][0] if h["slice_thickness"] else float("nan"),
        "rows": h["rows"],
        "cols": h["cols"],
    }


def _check_single_frame(h: dict) -> None:
    if (h["samples"] or 1) != 1 or int((h["frames"] or [1])[0]) != 1:
        raise DicomError("only single-frame grayscale images are supported", "not single-frame grayscale")


def _dicomsdl_pixels(path: Path, data: bytes, h: dict, syntax) -> np.ndarray:
    """Stored values (unused high bits masked, signed data sign-extended) through dicomsdl, or through
    pydicom when dicomsdl cannot decode them (pydicom then words the error)."""
    _check_single_frame(h)
    if syntax in _NATIVE_LE and not pixel_data_ends_file(data, h, syntax == U.ExplicitVRLittleEndian):
        log.debug("%s: pixel data not whole at the end of the file; decoding with pydicom", path)
        return _pydicom_stored_values(_dcmread(path, data), h, syntax)
    try:
        arr = dicomsdl.open_memory(data, False).pixelData(storedvalue=True)
        if arr.shape != (h["rows"], h["cols"]) or arr.dtype.kind not in "iu":
            raise ValueError(f"unexpected {arr.dtype} {arr.shape} for {h['rows']}x{h['cols']}")
        if arr.dtype.itemsize * 8 != h["bits_allocated"]:
            raise ValueError(f"unexpected {arr.dtype} for BitsAllocated {h['bits_allocated']}")
        # dicomsdl may leave the unused high bits as stored (native data, RLE): mask like pydicom
        return keep_stored_bits(arr, h["bits_stored"] or h["bits_allocated"], h["pixel_representation"] == 1)
    except Exception as e:  # dicomsdl raises its own error types; pydicom gets the last word
        log.debug("%s: dicomsdl failed (%s); decoding with pydicom", path, e)
    return _pydicom_stored_values(_dcmread(path, data), h, syntax)


def pixel_data_ends_file(data: bytes, h: dict, explicit: bool) -> bool:
    """Whether ``data`` ends with an uncompressed Pixel Data element of exactly the size the header
    gives (its tag, VR and length checked). dicomsdl 0.109.4 crashes the process (a segfault while
    wording its error) on uncompressed pixel data that runs past the end of the file, so only files
    that pass go to it; the rest (truncated, trailing elements, odd layouts) go to pydicom."""
    if not (h["rows"] and h["cols"] and h["bits_allocated"] in (8, 16, 32)):
        return False
    n = h["rows"] * h["cols"] * h["bits_allocated"] // 8
    n += n % 2  # values are padded to an even length
    length = struct.pack("<I", n)
    if explicit:  # tag, VR (OW, or OB from some writers), 2 reserved bytes, 4-byte length
        heads = (_PIXEL_TAG_BYTES + b"OW\0\0" + length, _PIXEL_TAG_BYTES + b"OB\0\0" + length)
    else:  # tag, 4-byte length
        heads = (_PIXEL_TAG_BYTES + length,)
    start = len(data) - n - len(heads[0])
    return start >= 0 and data[start : start + len(heads[0])] in heads


def _pydicom_stored_values(ds, h: dict, syntax) -> np.ndarray:
    """The stored pixel values from pydicom's ``pixel_array`` (unused high bits masked, signed data
    sign-extended); a short uncompressed Pixel Data is reported as a truncated file."""
    _check_single_frame(h)
    if syntax in _NATIVE_LE or syntax == U.DeflatedExplicitVRLittleEndian:
        rows, cols, bits = h["rows"], h["cols"], h["bits_allocated"] or 0
        n = rows * cols * bits // 8
        if len(ds.PixelData) < n:
            raise DicomError(
                f"pixel data has {len(ds.PixelData)} bytes, {rows}x{cols}x{bits} bits need {n}; "
                "the file is truncated: re-download it",
                "truncated pixel data",
            )
    return pydicom_pixels(ds)


def pydicom_pixels(ds) -> np.ndarray:
    """pydicom's decoders (big endian, deflated, JPEG, JPEG-LS, unusual bit layouts, dicomsdl's
    failures)."""
    return ds.pixel_array


def keep_stored_bits(raw: np.ndarray, stored: int, signed: bool) -> np.ndarray:
    """Mask the bits above ``stored`` and sign-extend signed data, as pydicom's ``pixel_array`` does.

    Those bits may hold anything (overlays, garbage): shifting them out to the left and back
    (an arithmetic shift for signed data) masks them and sign-extends in one pass. Done in place when
    ``raw`` is writeable (a decoder's fresh output: no copy), else on a copy.
    """
    raw = raw.view(f"<u{raw.dtype.itemsize}")
    shift = raw.dtype.itemsize * 8 - stored
    if shift and not raw.flags.writeable:
        raw = raw.copy()
    if not signed:
        if shift:
            raw &= np.array(2**stored - 1, raw.dtype)
        return raw
    if shift:
        raw <<= np.array(shift, raw.dtype)
    as_signed = raw.view(f"<i{raw.dtype.itemsize}")
    if shift:
        as_signed >>= np.array(shift, as_signed.dtype)
    return as_signed


def _to_output(arr: np.ndarray, h: dict) -> np.ndarray:
    """Stored values to output units.

    CT, or any image with Rescale tags: stored * slope + intercept (the modality LUT), whatever the
    PhotometricInterpretation: MONOCHROME1 is a display instruction and must not flip HU. MR without
    rescale: MONOCHROME1 is inverted over the stored bit range (2^BitsStored - 1 - v) for the usual look.
    """
    rescaled = h["modality"] == "CT" or h["slope"] is not None or h["intercept"] is not None
    if h["photometric"] == "MONOCHROME1" and not rescaled:
        stored = h["bits_stored"] or h["bits_allocated"]
        signed = h["pixel_representation"] == 1
        arr = -1 - arr.astype(np.int32) if signed else (2**stored - 1) - arr.astype(np.int32)
    slope = (h["slope"] or [1.0])[0]
    intercept = (h["intercept"] or [0.0])[0]
    if arr.dtype.kind in "iu" and float(slope).is_integer() and float(intercept).is_integer():
        stored = h["bits_stored"] or h["bits_allocated"] or arr.dtype.itemsize * 8
        signed = h["pixel_representation"] == 1
        return _integer_rescale(arr, int(slope), int(intercept), stored, signed)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _integer_rescale(arr: np.ndarray, slope: int, intercept: int, stored: int, signed: bool) -> np.ndarray:
    """Exact integer rescale (CT and most MR), int16 when the values fit, else float32.

    When the whole stored range (from BitsStored) fits int16 before and after the rescale, the
    arithmetic is done in int16 directly: no int32 copy and no min/max pass (most real files).
    """
    lo, hi = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    native_16 = arr.dtype.itemsize == 2 and arr.dtype.isnative  # pydicom keeps big-endian data big-endian
    if slope == 1 and intercept == 0 and native_16 and -32768 <= lo and hi <= 32767:
        return arr.view(np.int16)  # MR without rescale: the stored values, as they are (no copy)
    ends = (lo * slope + intercept, hi * slope + intercept)
    if -32768 <= lo and hi <= 32767 and -32768 <= min(ends) and max(ends) <= 32767:
        out = arr.astype(np.int16)
    else:
        out = arr.astype(np.int32)
    if slope != 1:
        out *= slope
    if intercept != 0:
        out += intercept
    if out.dtype == np.int16 or (out.min() >= -32768 and out.max() <= 32767):
        return out.astype(np.int16, copy=False)
    return out.astype(np.float32)
