"""Read one DICOM instance: pixels in output units (rescale applied) and its geometry tags."""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as U

try:  # optional: a compiled decoder, faster than pydicom's handlers on compressed files
    import dicomsdl
except ImportError:  # pragma: no cover - pydicom decodes everything without it
    dicomsdl = None

log = logging.getLogger(__name__)

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
    scanned = scan_native(data)
    if scanned is not None:  # uncompressed little endian, the common case: no pydicom Dataset at all
        syntax, raw, pixel_data = scanned
        h = _header_from_raw(raw)
        if pixel_data is None:
            stored_values = lambda: _compressed_pixels(path, data, h)
        else:
            stored_values = lambda: _native_or_pydicom(pixel_data, h, lambda: _dcmread(path, data))
    else:
        ds = _dcmread(path, data)
        syntax = _syntax(ds, path)
        h = _header(ds)
        stored_values = lambda: _stored_values(ds, h, syntax)
    try:
        meta = _meta(h, path)
        pixels = _to_output(stored_values(), h)
    except DicomError as e:
        raise DicomError(f"{path}: {e}" if str(path) not in str(e) else str(e), e.reason) from e
    except Exception as e:
        raise DicomError(f"{path}: cannot decode pixels ({type(e).__name__}: {e})", "cannot decode") from e
    meta["transfer_syntax"] = SUPPORTED_SYNTAXES[syntax]
    return pixels, meta


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


# --- A minimal reader for little-endian Part-10 files (most MR and CT files) ---
# pydicom builds a Dataset of every element (~2 ms a file, more than decoding an uncompressed image);
# stage 01 needs ~17 top-level tags and the pixel bytes. Anything unusual (no preamble, big endian,
# deflated, a syntax not in _SCANNED, odd lengths) returns None and goes through pydicom, which also
# words the errors.

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# Syntaxes whose header the minimal reader walks: the two native ones, and the compressed ones a
# compiled decoder (dicomsdl) measured faster than pydicom on (explicit VR little endian outside the
# pixels). JPEG Lossless is left to pydicom + pylibjpeg: no encoder here to check dicomsdl on it.
_SCANNED = {str(u): u for u in (U.ImplicitVRLittleEndian, U.ExplicitVRLittleEndian)}
_COMPRESSED = {str(u): u for u in (U.RLELossless, U.JPEG2000Lossless, U.JPEG2000)}
if dicomsdl is not None:
    _SCANNED.update(_COMPRESSED)


class _Unusual(Exception):
    """The minimal reader met something it leaves to pydicom."""


def scan_native(data: bytes) -> tuple[U.UID, dict[int, bytes], memoryview | None] | None:
    """(transfer syntax, raw values of the tags stage 01 reads, pixel bytes) of a little-endian Part-10
    file, or None when pydicom must read it. Pixel bytes are None for compressed (encapsulated) data."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    buf = memoryview(data)
    try:
        meta, pos = _walk(buf, 132, True, {0x00020010}, only_group=0x0002)
        syntax = _SCANNED.get(bytes(meta.get(0x00020010, b"")).rstrip(b"\0 ").decode(errors="replace"))
        if syntax is None:
            return None
        raw, pos = _walk(buf, pos, syntax != U.ImplicitVRLittleEndian, _WANTED)
    except (_Unusual, struct.error):
        return None
    if _PIXEL_DATA not in raw:
        return None
    return syntax, raw, raw.pop(_PIXEL_DATA)


def _walk(buf, pos: int, explicit: bool, wanted, only_group=None, until=None) -> tuple[dict, int]:
    """Read elements from ``pos``: the values of ``wanted`` tags, up to and including Pixel Data (or
    the end of group ``only_group``, or the ``until`` delimiter). Sequences are skipped, unread."""
    out, n = {}, len(buf)
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | elem
        if only_group is not None and group != only_group:
            break
        if group == 0xFFFE:  # item and delimiter tags carry no VR in either encoding
            if tag != until:
                raise _Unusual(f"unexpected item tag {tag:08X}")
            return out, pos + 8
        if explicit:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                (length,), head = struct.unpack_from("<I", buf, pos + 8), 12
            else:
                (length,), head = struct.unpack_from("<H", buf, pos + 6), 8
        else:
            vr, ((length,), head) = None, (struct.unpack_from("<I", buf, pos + 4), 8)
        pos += head
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and explicit:  # encapsulated (compressed) frames: decoded elsewhere
                out[tag] = None
                return out, pos
            if vr not in (None, b"SQ"):
                raise _Unusual("undefined length outside a sequence (UN holding a sequence)")
            pos = _skip_sequence(buf, pos, explicit)
            continue
        if tag in wanted or tag == _PIXEL_DATA:
            out[tag] = buf[pos : pos + length]
        if tag == _PIXEL_DATA:
            return out, pos + length
        pos += length
    if until is not None:
        raise _Unusual("sequence item runs past the end of the file")
    return out, pos


def _skip_sequence(buf, pos: int, explicit: bool) -> int:
    """The position after a sequence of undefined length starting at ``pos`` (its first item)."""
    while pos + 8 <= len(buf):
        tag = struct.unpack_from("<HH", buf, pos)
        tag = tag[0] << 16 | tag[1]
        (length,) = struct.unpack_from("<I", buf, pos + 4)
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise _Unusual(f"expected an item, found {tag:08X}")
        if length == _UNDEFINED:
            _, pos = _walk(buf, pos + 8, explicit, (), until=_ITEM_END)
        else:
            pos += 8 + length
    raise _Unusual("sequence runs past the end of the file")


# The header tags stage 01 needs, read straight from pydicom's raw elements: its attribute access
# costs ~12 us a tag, as much in all as decoding an uncompressed image.
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


_WANTED = {tag for group in (_US, _NUMBERS, _TEXT) for tag in group.values()}


def _header(ds) -> dict:
    """Header values by name; None where a tag is absent or empty. Numbers (DS/IS) come as lists."""
    out = {}
    for key, tag in {**_US, **_NUMBERS, **_TEXT}.items():
        elem = ds.get_item(tag)
        v = None if elem is None else elem.value
        if isinstance(v, bytes):
            out[key] = _from_bytes(key, v, elem.is_little_endian)
        elif v is None or (isinstance(v, str) and not v.strip()):
            out[key] = None
        else:  # pydicom already converted this element
            out[key] = np.atleast_1d(np.asarray(v, dtype=float)).tolist() if key in _NUMBERS else v
    return out


def _header_from_raw(raw: dict) -> dict:
    """``_header`` from the raw little-endian values ``scan_native`` found."""
    return {
        key: _from_bytes(key, bytes(raw[tag]), True) if tag in raw else None
        for key, tag in {**_US, **_NUMBERS, **_TEXT}.items()
    }


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


def _stored_values(ds, h: dict, syntax) -> np.ndarray:
    """The stored pixel values as pydicom's ``pixel_array`` gives them (unused high bits masked,
    signed data sign-extended), decoding uncompressed little-endian data without pydicom's handlers."""
    if syntax in _NATIVE_LE:
        return _native_or_pydicom(ds.PixelData, h, lambda: ds)
    _check_single_frame(h)
    return pydicom_pixels(ds)


def _native_or_pydicom(pixel_data, h: dict, get_ds) -> np.ndarray:
    """Uncompressed little-endian pixels: ``native_pixels`` for the usual bit layouts, else pydicom."""
    _check_single_frame(h)
    bits, stored = h["bits_allocated"], h["bits_stored"] or h["bits_allocated"]
    if bits in (8, 16) and 0 < stored <= bits and h["high_bit"] in (None, stored - 1):
        signed = h["pixel_representation"] == 1
        return native_pixels(pixel_data, h["rows"], h["cols"], bits, stored, signed)
    return pydicom_pixels(get_ds())


def _check_single_frame(h: dict) -> None:
    if (h["samples"] or 1) != 1 or int((h["frames"] or [1])[0]) != 1:
        raise DicomError("only single-frame grayscale images are supported", "not single-frame grayscale")


def native_pixels(data: bytes, rows: int, cols: int, bits: int, stored: int, signed: bool) -> np.ndarray:
    """Uncompressed little-endian pixel data as an array, exactly as pydicom's ``pixel_array``."""
    n = rows * cols * bits // 8
    if len(data) < n:
        raise DicomError(
            f"pixel data has {len(data)} bytes, {rows}x{cols}x{bits} bits need {n}; "
            "the file is truncated: re-download it",
            "truncated pixel data",
        )
    raw = np.frombuffer(data, dtype=f"<u{bits // 8}", count=rows * cols).reshape(rows, cols)
    return keep_stored_bits(raw, stored, signed)


def keep_stored_bits(raw: np.ndarray, stored: int, signed: bool) -> np.ndarray:
    """Mask the bits above ``stored`` and sign-extend signed data, as pydicom's ``pixel_array`` does.

    Those bits may hold anything (overlays, garbage): shifting them out to the left and back
    (an arithmetic shift for signed data) masks them and sign-extends in one pass.
    """
    raw = raw.view(f"<u{raw.dtype.itemsize}")
    shift = raw.dtype.itemsize * 8 - stored
    if not signed:
        return raw & np.array(2**stored - 1, raw.dtype) if shift else raw
    as_signed = raw.view(f"<i{raw.dtype.itemsize}")
    return ((raw << shift).view(as_signed.dtype) >> shift) if shift else as_signed


def _compressed_pixels(path: Path, data: bytes, h: dict) -> np.ndarray:
    """Stored values of a compressed single-frame image: dicomsdl, or pydicom when dicomsdl fails."""
    _check_single_frame(h)
    try:
        arr = dicomsdl.open(str(path)).pixelData(storedvalue=True).reshape(h["rows"], h["cols"])
        if arr.dtype.kind not in "iu" or arr.dtype.itemsize * 8 != h["bits_allocated"]:
            raise ValueError(f"unexpected {arr.dtype} for BitsAllocated {h['bits_allocated']}")
        stored = h["bits_stored"] or h["bits_allocated"]
        # dicomsdl leaves the unused high bits as decoded (RLE keeps them): mask like pydicom
        return keep_stored_bits(arr, stored, h["pixel_representation"] == 1)
    except Exception as e:  # dicomsdl raises its own error types; pydicom gets the last word
        log.debug("%s: dicomsdl failed (%s); decoding with pydicom", path, e)
    return pydicom_pixels(_dcmread(path, data))


def pydicom_pixels(ds) -> np.ndarray:
    """pydicom's decoders (compressed syntaxes, big endian, unusual bit layouts)."""
    return ds.pixel_array


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
