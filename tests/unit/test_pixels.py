"""Decoding safety and the LUT chain, on pydicom's reference files and built datasets."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.errors import BadInput, SkipInput
from inference.pixels import check_decodable, decode_frame, to_presentation


def native(arr: np.ndarray, bits_stored: int = 12, signed: bool = False, **kw) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = kw.pop("photometric", "MONOCHROME2")
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_jpeg2000_lossless_decodes_to_the_uncompressed_reference():
    ref = decode_frame(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")))
    j2k = decode_frame(pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm")))
    assert ref.shape == j2k.shape == (1955, 1841)
    assert np.array_equal(ref, j2k)


def test_monochrome1_is_inverted_so_that_high_attenuation_is_white():
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = decode_frame(ds)
    display, _ = to_presentation(stored, ds)
    assert display.min() >= 0.0 and display.max() <= 1.0
    # The largest stored value of a MONOCHROME1 image is the darkest, the smallest the brightest.
    assert display[np.unravel_index(np.argmax(stored), stored.shape)] == display.min()
    assert display[np.unravel_index(np.argmin(stored), stored.shape)] == display.max()
    assert display.max() - display.min() > 0.8


def test_junk_above_bits_stored_is_cleared():
    arr = np.array([[0x0FFF | 0xF000, 0x0001 | 0x3000]], np.uint16)
    assert decode_frame(native(arr)).tolist() == [[4095, 1]]


def test_signed_pixels_are_sign_extended_from_bits_stored():
    raw = np.array([[0x0FFF, 0x0800, 0x07FF]], np.uint16).view(np.int16)
    assert decode_frame(native(raw, signed=True)).tolist() == [[-1, -2048, 2047]]


def test_linear_window_per_ps33_c11_2_1_2():
    arr = np.array([[0, 1024, 2048, 3072, 4095]], np.uint16)
    ds = native(arr, WindowCenter=2048, WindowWidth=2048)
    display, _ = to_presentation(decode_frame(ds), ds)
    assert display.tolist()[0][0] == 0.0 and display.tolist()[0][4] == 1.0
    assert display[0, 2] == pytest.approx(0.5, abs=1e-3)


def test_rescale_then_window_and_padding():
    arr = np.array([[0, 100, 200, 300]], np.uint16)
    ds = native(arr, RescaleSlope=2, RescaleIntercept=-100, RescaleType="US",
                WindowCenter=300, WindowWidth=400, PixelPaddingValue=0)
    display, valid = to_presentation(decode_frame(ds), ds)
    assert valid.tolist() == [[False, True, True, True]]
    assert display[0, 0] == 0.0
    assert display[0, 2] == pytest.approx(0.5, abs=0.01)  # 200 -> 300 = window centre


def test_no_voi_uses_the_image_range():
    arr = np.linspace(0, 4000, 100).reshape(10, 10).astype(np.uint16)
    ds = native(arr)
    display, _ = to_presentation(decode_frame(ds), ds)
    assert display.min() == 0.0 and display.max() == 1.0


def test_truncated_pixel_data_is_a_clear_failure():
    ds = native(np.zeros((64, 64), np.uint16))
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(BadInput, match="truncated"):
        decode_frame(ds)


def test_size_cap_applies_before_decoding():
    ds = native(np.zeros((4, 4), np.uint16))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 30000, 30000, 10
    with pytest.raises(BadInput, match="over the"):
        check_decodable(ds, max_pixel_bytes=1 << 30)


def test_colour_and_pixelless_objects_are_skipped():
    ds = native(np.zeros((4, 4), np.uint16), photometric="RGB")
    with pytest.raises(SkipInput, match="colour"):
        check_decodable(ds)
    with pytest.raises(SkipInput, match="no pixel data"):
        check_decodable(Dataset())
