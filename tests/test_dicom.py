"""Decoding across transfer syntaxes, on pydicom's bundled test files (same image, many encodings)."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder

from spine.core.dicom import SUPPORTED_SYNTAXES, DicomError, read_instance


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
