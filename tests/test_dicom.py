"""Decoding: syntaxes on pydicom's bundled files; bit layouts and photometric rules on written files."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence

from spine.core import dicom
from spine.core.dicom import SUPPORTED_SYNTAXES, DicomError, read_instance
from spine.core.synth.dicom_writer import write_slice


def _file(name):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


@pytest.mark.parametrize(
    "name, syntax",
    [
        ("MR_small_implicit.dcm", "implicit"),
        ("MR_small_bigendian.dcm", "big-endian"),
        ("MR_small_RLE.dcm", "rle"),
        ("MR_small_jpeg_ls_lossless.dcm", "jpeg-ls"),
        ("MR_small_jp2klossless.dcm", "jpeg2000-lossless"),
    ],
)
def test_lossless_encodings_decode_to_the_same_pixels(name, syntax):
    ref, ref_meta = read_instance(_file("MR_small.dcm"))
    pixels, meta = read_instance(_file(name))
    assert meta["transfer_syntax"] == syntax
    np.testing.assert_array_equal(pixels, ref)
    assert meta["ipp"] == ref_meta["ipp"] and meta["pixel_spacing"] == ref_meta["pixel_spacing"]


def test_ct_rescale_gives_hounsfield_units():
    path = _file("CT_small.dcm")
    pixels, _ = read_instance(path)
    ds = pydicom.dcmread(path)
    assert pixels.dtype == np.int16
    np.testing.assert_array_equal(pixels, ds.pixel_array * int(ds.RescaleSlope) + int(ds.RescaleIntercept))


def test_missing_geometry_is_a_clear_error():
    # a JPEG Extended secondary capture: decodable, but it cannot be placed in patient space
    with pytest.raises(DicomError, match="missing ImagePositionPatient"):
        read_instance(_file("JPEG-lossy.dcm"))


@pytest.mark.parametrize("syntax", sorted(SUPPORTED_SYNTAXES), ids=lambda u: SUPPORTED_SYNTAXES[u])
def test_every_supported_syntax_has_a_decoder(syntax):
    if not syntax.is_compressed:
        return  # native encodings need no plugin
    assert get_decoder(syntax).is_available, f"install the pylibjpeg plugins for {syntax.name}"


def test_not_dicom_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(DicomError, match=str(bad)):
        read_instance(bad)


# --- Files as scanners write them: BitsAllocated 16, BitsStored 12, photometric interpretations ---

GEOMETRY = dict(ipp=[0, 0, 0], iop=[1, 0, 0, 0, 1, 0], spacing=[0.5, 0.5], thickness=1.0, instance_number=1)
UIDS = dict(study_uid="1.2.3", series_uid="1.2.3.4", series_number=1, series_description="test")


def _write(path, pixels, **kw):
    write_slice(path, pixels, **GEOMETRY, **UIDS, **kw)
    return path


def _set(path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, implicit_vr=ds.original_encoding[0], little_endian=True)


def _add_garbage_high_bits(path, rng):
    """Random values in the 4 unused high bits, as pydicom's pixel_array must ignore them."""
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, "<u2")
    junk = rng.integers(0, 16, raw.size).astype(np.uint16) << 12
    ds.PixelData = (raw | junk).tobytes()
    ds.save_as(path, implicit_vr=ds.original_encoding[0], little_endian=True)


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
@pytest.mark.parametrize("dtype, rescale", [(np.uint16, None), (np.uint16, (1, -1024)), (np.int16, None)])
def test_fast_path_masks_high_bits_like_pydicom(tmp_path, monkeypatch, syntax, dtype, rescale):
    rng = np.random.default_rng(0)
    lo, hi = (-2048, 2048) if dtype == np.int16 else (0, 4096)
    values = rng.integers(lo, hi, (24, 20)).astype(dtype)
    values[0, :4] = [lo, hi - 1, 0, -1 if dtype == np.int16 else 1]  # both ends and the sign boundary
    path = _write(tmp_path / "x.dcm", values, syntax=syntax, rescale=rescale)
    _add_garbage_high_bits(path, rng)

    ds = pydicom.dcmread(path)
    assert ds.BitsStored == 12 and ds.HighBit == 11
    slope, intercept = rescale or (1, 0)
    expected = ds.pixel_array.astype(np.int32) * slope + intercept
    np.testing.assert_array_equal(expected, values.astype(np.int32) * slope + intercept)

    def not_taken(*args):
        raise AssertionError("uncompressed little-endian data must not go through pydicom")

    monkeypatch.setattr(dicom, "pydicom_pixels", not_taken)
    monkeypatch.setattr(dicom, "_dcmread", not_taken)  # dicomsdl, not pydicom, reads the header too
    pixels, meta = read_instance(path)
    assert meta["transfer_syntax"] == syntax and pixels.dtype == np.int16
    np.testing.assert_array_equal(pixels, expected)


def test_monochrome1_ct_keeps_hounsfield_units(tmp_path):
    hu = np.array([[-1024, 0], [400, 3071]])
    path = _write(tmp_path / "ct.dcm", (hu + 1024).astype(np.uint16), modality="CT", rescale=(1, -1024))
    _set(path, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(read_instance(path)[0], hu)


def test_monochrome1_ct_without_rescale_tags_is_not_inverted(tmp_path):
    stored = np.array([[0, 100], [2000, 4095]], dtype=np.uint16)
    path = _write(tmp_path / "ct.dcm", stored, modality="CT")
    _set(path, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(read_instance(path)[0], stored)


def test_monochrome1_mr_is_inverted_over_bits_stored(tmp_path):
    stored = np.array([[0, 100], [2000, 4095]], dtype=np.uint16)
    path = _write(tmp_path / "mr.dcm", stored)
    _set(path, PhotometricInterpretation="MONOCHROME1")
    # 2^12 - 1 = 4095, not 2^16 - 1: the image keeps its 0..4095 range
    np.testing.assert_array_equal(read_instance(path)[0], [[4095, 3995], [2095, 0]])


def test_writer_stores_12_bits_and_refuses_what_does_not_fit(tmp_path):
    path = _write(tmp_path / "ok.dcm", np.full((4, 4), 4095, np.uint16))
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    with pytest.raises(ValueError, match="do not fit BitsStored 12 .0..4095.*bits_stored=16"):
        _write(tmp_path / "big.dcm", np.full((4, 4), 4096, np.uint16))
    with pytest.raises(ValueError, match="-2048..2047"):
        _write(tmp_path / "signed.dcm", np.full((4, 4), 3071, np.int16))
    wide = _write(tmp_path / "wide.dcm", np.full((4, 4), 3071, np.int16), bits_stored=16)
    assert pydicom.dcmread(wide).BitsStored == 16 and read_instance(wide)[0].max() == 3071


def test_truncated_pixel_data_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:40]
    ds.save_as(path)
    with pytest.raises(DicomError, match="truncated") as e:
        read_instance(path)
    assert e.value.reason == "truncated pixel data"


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"")
    with pytest.raises(DicomError, match="empty file") as e:
        read_instance(tmp_path / "x.dcm")
    assert e.value.reason == "empty file"


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_dicomsdl_header_agrees_with_pydicom(tmp_path, monkeypatch, syntax):
    """Sequences (defined and undefined length, nested tags of the same name) and private tags."""
    rng = np.random.default_rng(1)
    path = _write(tmp_path / "x.dcm", rng.integers(0, 4096, (10, 12)).astype(np.uint16), syntax=syntax)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.ImagePositionPatient = [9.0, 9.0, 9.0]  # nested: must not be taken for the slice's own
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.SourceImageSequence = Sequence([Dataset()])
    ds.add_new(0x00291010, "OB", b"\x01\x02\x03\x04")
    ds.PixelSpacing = ["0.3125", "0.1"]
    ds.RescaleSlope = ""  # empty: absent, not 0 (dicomsdl reads an empty DS as 0)
    ds.RescaleIntercept = "0"  # a real 0
    ds.save_as(path, implicit_vr=syntax == "implicit", little_endian=True)

    assert dicom.open_with_dicomsdl(path.read_bytes()) is not None
    fast = read_instance(path)
    monkeypatch.setattr(dicom, "open_with_dicomsdl", lambda data: None)  # force pydicom's reading
    slow = read_instance(path)
    np.testing.assert_array_equal(fast[0], slow[0])
    assert fast[0].dtype == slow[0].dtype == np.int16
    assert fast[1] == slow[1] and fast[1]["ipp"] == [0.0, 0.0, 0.0]
    assert fast[1]["pixel_spacing"] == [0.3125, 0.1] and type(fast[1]["rows"]) is int


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
@pytest.mark.parametrize("cut", [1, 2, 100])
def test_truncated_uncompressed_file_never_reaches_dicomsdl(tmp_path, syntax, cut):
    """dicomsdl 0.109.4 segfaults on uncompressed pixel data cut short: such a file must go to pydicom."""
    path = _write(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16), syntax=syntax)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(DicomError, match="truncated") as e:
        read_instance(path)
    assert e.value.reason == "truncated pixel data"


def test_element_after_the_pixel_data_goes_to_pydicom(tmp_path, monkeypatch):
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = _write(tmp_path / "x.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)  # trailing padding, written after Pixel Data
    ds.save_as(path)
    assert not dicom.pixel_data_ends_file(path.read_bytes(), dicom._header(ds), explicit=True)
    taken = []
    monkeypatch.setattr(dicom, "pydicom_pixels", lambda ds: taken.append(1) or ds.pixel_array)
    np.testing.assert_array_equal(read_instance(path)[0], stored)
    assert taken == [1]


@pytest.mark.parametrize("syntax", ["rle", "j2k"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_compressed_12_bit_files_match_pydicom(tmp_path, monkeypatch, syntax, dtype):
    """dicomsdl: the same values as pydicom's pixel_array, high bits masked (RLE stores all 16 bits,
    so garbage there survives compression)."""
    rng = np.random.default_rng(2)
    lo, hi = (-2048, 2048) if dtype == np.int16 else (0, 4096)
    values = rng.integers(lo, hi, (64, 64)).astype(dtype)
    junk = rng.integers(0, 16, values.shape).astype(np.uint16) << 12
    written = ((values.view(np.uint16) & 0x0FFF) | junk).view(dtype) if syntax == "rle" else values
    path = _write(tmp_path / "x.dcm", written, syntax=syntax, bits_stored=16)
    _set(path, BitsStored=12, HighBit=11)  # declared after encoding: the junk bits stay in the data
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, values)
    pytest.importorskip("dicomsdl")
    monkeypatch.setattr(dicom, "_dcmread", lambda *a: pytest.fail("dicomsdl must read this file"))
    pixels, meta = read_instance(path)
    assert meta["transfer_syntax"] == {"rle": "rle", "j2k": "jpeg2000-lossless"}[syntax]
    np.testing.assert_array_equal(pixels, values)
