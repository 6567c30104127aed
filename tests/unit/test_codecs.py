"""Every common encoding decodes to the right pixel values.

Two sources of truth: pydicom's reference files (lossless variants of the
same image must decode identically), and our own synthetic radiograph
re-encoded by real tools (dcmtk's dcmconv, dcmcrle, dcmcjpeg, dcmcjpls and
pydicom's OpenJPEG encoder), compared with the original stored values.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from inference.errors import BadInput, SkipInput
from inference.pixels import decode_frame, frame_count, to_presentation
from tests.factories import synthetic_dx


def _frames(name: str) -> list[np.ndarray]:
    ds = pydicom.dcmread(get_testdata_file(name))
    return [decode_frame(ds, i) for i in range(frame_count(ds))]


# (reference, [lossless variants of the same pixels])
LOSSLESS_PAIRS = [
    ("MR_small.dcm", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                      "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]),
    ("emri_small.dcm", ["emri_small_RLE.dcm", "emri_small_big_endian.dcm",
                        "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"]),
    ("RG1_UNCR.dcm", ["RG1_J2KR.dcm"]),
    ("RG3_UNCR.dcm", ["RG3_J2KR.dcm"]),
    ("MR2_UNCR.dcm", ["MR2_J2KR.dcm"]),
]


@pytest.mark.parametrize(("reference", "variant"),
                         [(r, v) for r, vs in LOSSLESS_PAIRS for v in vs])
def test_pydicom_lossless_variants_match_their_reference(reference, variant):
    ref, got = _frames(reference), _frames(variant)
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(("reference", "lossy"),
                         [("RG1_UNCR.dcm", "RG1_J2KI.dcm"), ("MR2_UNCR.dcm", "MR2_J2KI.dcm"),
                          ("RG3_UNCR.dcm", "RG3_J2KI.dcm")])
def test_pydicom_lossy_variants_are_close(reference, lossy):
    a, b = _frames(reference)[0].astype(float), _frames(lossy)[0].astype(float)
    assert np.abs(a - b).mean() < 0.01 * (a.max() - a.min())


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm", "JPEG-LL.dcm",
                                  "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEGLSNearLossless_16.dcm",
                                  "image_dfl.dcm", "JPEG2000.dcm", "693_J2KR.dcm"])
def test_other_encodings_decode_to_a_plausible_image(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    arr = decode_frame(ds)
    assert arr.shape == (ds.Rows, ds.Columns)
    assert arr.max() > arr.min()
    display, _ = to_presentation(arr, ds)
    assert 0.0 <= display.min() < display.max() <= 1.0


def test_voi_lut_sequence_and_modality_lut_sequence():
    for name in ("vlut_04.dcm", "mlut_18.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        display, _ = to_presentation(decode_frame(ds), ds)
        assert display.max() > display.min()


@pytest.mark.parametrize(("name", "outcome", "reason"), [
    ("MR_truncated.dcm", BadInput, "truncated"),
    ("SC_rgb.dcm", SkipInput, "colour"),
    ("US1_J2KR.dcm", SkipInput, "colour"),
    ("OBXXXX1A.dcm", SkipInput, "colour"),
    ("SC_ybr_full_uncompressed.dcm", SkipInput, "colour"),
])
def test_unusable_pixel_data_has_a_clear_reason(name, outcome, reason):
    ds = pydicom.dcmread(get_testdata_file(name))
    with pytest.raises(outcome, match=reason):
        for i in range(frame_count(ds)):
            decode_frame(ds, i)


# -- our synthetic radiograph through real encoders ------------------------------------


def _variant(bits: int) -> pydicom.Dataset:
    """The phantom at 8, 12 (as generated) or 15 bits stored."""
    ds = synthetic_dx(41, fracture=True)
    if bits != 12:
        arr = ds.pixel_array.astype(np.int64)
        scaled = (arr * ((1 << bits) - 1) // 4095).astype(np.uint16 if bits > 8 else np.uint8)
        ds.BitsAllocated = 8 if bits == 8 else 16
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.WindowCenter = float(ds.WindowCenter) * ((1 << bits) - 1) / 4095
        ds.WindowWidth = float(ds.WindowWidth) * ((1 << bits) - 1) / 4095
        ds.PixelData = scaled.tobytes()
    return ds


def _tool(args: list[str], src: Path, dst: Path) -> None:
    proc = subprocess.run([*args, str(src), str(dst)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# (name, bits stored, how to encode, transfer syntax expected, lossless)
# Lossless: the exact stored values. Lossy: the same picture (correlation
# > 0.97) with a mean error under 5% of the stored range; the phantom's
# quantum noise is what lossy codecs lose first.
ENCODINGS = [
    ("implicit VR little endian", 12, ["dcmconv", "+ti"], "1.2.840.10008.1.2", True),
    ("explicit VR big endian", 12, ["dcmconv", "+tb"], "1.2.840.10008.1.2.2", True),
    ("deflated explicit VR little endian", 12, ["dcmconv", "+td"], "1.2.840.10008.1.2.1.99",
     True),
    ("RLE lossless", 12, ["dcmcrle"], "1.2.840.10008.1.2.5", True),
    ("JPEG lossless SV1, 12 bits", 12, ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70", True),
    ("JPEG lossless SV1, 15 bits", 15, ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70", True),
    ("JPEG lossless process 14, 15 bits", 15, ["dcmcjpeg", "+el"], "1.2.840.10008.1.2.4.57",
     True),
    ("JPEG baseline, 8 bits", 8, ["dcmcjpeg", "+eb"], "1.2.840.10008.1.2.4.50", False),
    ("JPEG extended, 12 bits", 12, ["dcmcjpeg", "+ee"], "1.2.840.10008.1.2.4.51", False),
    ("JPEG-LS lossless", 12, ["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80", True),
    ("JPEG-LS near-lossless", 12, ["dcmcjpls", "+en", "+md", "2"], "1.2.840.10008.1.2.4.81",
     False),
    ("JPEG 2000 lossless", 12, "j2k-lossless", "1.2.840.10008.1.2.4.90", True),
    ("JPEG 2000 lossy", 12, "j2k-lossy", "1.2.840.10008.1.2.4.91", False),
]


@pytest.mark.parametrize(("name", "bits", "how", "tsuid", "lossless"), ENCODINGS,
                         ids=[e[0] for e in ENCODINGS])
def test_synthetic_radiograph_survives_every_encoding(tmp_path, name, bits, how, tsuid,
                                                      lossless):
    original = _variant(bits)
    src, dst = tmp_path / "src.dcm", tmp_path / "dst.dcm"
    original.save_as(src, enforce_file_format=True)
    if how == "j2k-lossless":
        original.compress(UID(tsuid), encoding_plugin="pylibjpeg")
        original.save_as(dst, enforce_file_format=True)
    elif how == "j2k-lossy":
        original.compress(UID(tsuid), j2k_cr=[10], encoding_plugin="pylibjpeg")
        original.save_as(dst, enforce_file_format=True)
    else:
        _tool(how, src, dst)
    encoded = pydicom.dcmread(dst)
    assert encoded.file_meta.TransferSyntaxUID == tsuid
    expected = decode_frame(pydicom.dcmread(src)).astype(np.int64)
    got = decode_frame(encoded).astype(np.int64)
    assert got.shape == expected.shape
    if lossless:
        assert np.array_equal(got, expected), f"{name}: not lossless"
        return
    error = np.abs(got - expected).mean()
    assert error <= 0.05 * ((1 << bits) - 1), f"{name}: mean error {error:.2f}"
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.97
