"""Synthetic head CT: phantom determinism, valid DICOM, HU round trip, streaming."""

from __future__ import annotations

import inspect
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.preprocess import prepare_ct_slice
from tests.dicom_tools import dciodvfy_errors
from training.synthetic import ct, headct

FEATURES = ("age_years", "age_known", "sex_male", "sex_female", "slice_thickness")
WINDOWS = ((40.0, 80.0), (80.0, 200.0))


def _head(seed: int = 11, **kwargs: object) -> headct.Head:
    return headct.sample_head(np.random.default_rng(seed), **kwargs)  # type: ignore[arg-type]


def _series(head: headct.Head, out: Path | None, **kwargs: object) -> list:
    args: dict[str, object] = dict(
        slice_thickness_mm=5.0, n_slices=2, pixel_spacing_mm=0.9, rows=256, cols=256,
        patient_id="P1", patient_name="TEST^HEAD", patient_sex=head.sex,
        patient_age_years=head.age_years, study_uid="2.25.1", series_uid="2.25.1.2",
    )
    args.update(kwargs)
    return list(ct.write_ct_series(head, out, **args))  # type: ignore[arg-type]


def _prepare(ds: pydicom.Dataset) -> np.ndarray:
    mi = prepare_ct_slice(ds, canvas=(256, 256), target_mm=1.0, windows=WINDOWS,
                          feature_names=FEATURES)
    return mi.image.pixels


def test_phantom_and_series_are_deterministic() -> None:
    a, b = _head(3, haemorrhage=True), _head(3, haemorrhage=True)
    assert a == b
    sa, sb = _series(a, None), _series(b, None)
    assert [d.SOPInstanceUID for d in sa] == [d.SOPInstanceUID for d in sb]
    assert all(x.PixelData == y.PixelData for x, y in zip(sa, sb, strict=True))
    # A different head is a different image.
    assert _series(_head(4), None)[0].PixelData != sa[0].PixelData


@pytest.mark.parametrize("encoding", ct.ENCODINGS)
def test_written_slice_passes_dciodvfy(tmp_path: Path, encoding: str) -> None:
    head = _head(5, haemorrhage=True)
    paths = _series(head, tmp_path, encoding=encoding, n_slices=1, rows=512, cols=512,
                    pixel_spacing_mm=0.45)
    assert len(paths) == 1 and paths[0].is_file()
    assert dciodvfy_errors(paths[0]) == []
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == ct.CT_IMAGE_STORAGE
    assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    assert ds.RescaleType == "HU"


def test_hu_round_trip_through_prepare_ct_slice() -> None:
    # A known HU pattern: brain-like 40 HU square, blood 70 HU, bone 1500, air.
    hu = np.full((200, 200), -1000.0, np.float32)
    hu[40:160, 40:160] = 40.0
    hu[90:110, 90:110] = 70.0
    hu[20:30, 20:180] = 1500.0
    ds = ct.ct_dataset(
        hu, pixel_spacing_mm=1.0, image_position=(-99.5, -99.5, 10.0), slice_thickness_mm=5.0,
        patient_id="P", patient_name="A^B", patient_sex="F", patient_age_years=50.0,
        study_uid="2.25.9", series_uid="2.25.9.1", sop_uid="2.25.9.1.1",
        frame_of_reference_uid="2.25.9.2", instance_number=1, pad_outside_circle=False,
    )
    px = _prepare(ds)
    # 1 mm pixels, 200 x 200 centred on 256 x 256: offset 28.
    brain, blood = px[28 + 60, 28 + 60], px[28 + 100, 28 + 100]
    assert brain[0] == pytest.approx(0.5, abs=1e-3)  # 40 HU: middle of the brain window
    assert brain[1] == pytest.approx((40 + 20) / 200, abs=1e-3)
    assert blood[0] == pytest.approx(70 / 80, abs=1e-3)
    assert px[28 + 25, 28 + 100, 0] == 1.0 and px[28 + 5, 28 + 5, 0] == 0.0


def test_rendered_brain_lands_in_the_brain_window() -> None:
    head = _head(7, haemorrhage=False, age_years=30.0)
    ds = _series(head, None, n_slices=1, noise=False, z_range=(20.0, 21.0))[0]
    px = _prepare(ds)
    centre = px[118:138, 100:156, 0]  # deep white matter around the midline
    assert 0.25 < float(np.median(centre)) < 0.6  # ~20-48 HU


def test_signed_and_unsigned_encodings_give_the_same_hu() -> None:
    head = _head(8, haemorrhage=True)
    prepared = [
        _prepare(_series(head, None, n_slices=1, encoding=enc)[0]) for enc in ct.ENCODINGS
    ]
    for other in prepared[1:]:
        np.testing.assert_array_equal(prepared[0], other)
    datasets = [_series(head, None, n_slices=1, encoding=enc)[0] for enc in ct.ENCODINGS]
    assert {int(d.PixelRepresentation) for d in datasets} == {0, 1}
    assert {int(d.BitsStored) for d in datasets} == {12, 16}


def test_thousand_slice_series_streams_in_bounded_memory() -> None:
    head = _head(9)
    stream = ct.write_ct_series(
        head, None, slice_thickness_mm=0.625, spacing_between_slices_mm=0.15, n_slices=1000,
        pixel_spacing_mm=8.0, rows=32, cols=32, patient_id="P", patient_name="A^B",
        patient_sex="M", patient_age_years=40.0, study_uid="2.25.5", series_uid="2.25.5.1",
    )
    assert inspect.isgenerator(stream)
    # Tracing slows pydicom ~5x, so only the first and the last 100 slices
    # are traced: a generator that kept its slices would grow in both windows.
    window = 100
    count, last_z, uids, peaks, growth, baseline = 0, -1e9, set(), [], [], 0
    tracemalloc.start()
    try:
        for ds in stream:
            z = float(ds.ImagePositionPatient[2])
            assert z > last_z
            last_z = z
            uids.add(ds.SOPInstanceUID)
            count += 1
            if count in (1, 1000 - window):  # a window opens
                if not tracemalloc.is_tracing():
                    tracemalloc.start()
                baseline = tracemalloc.get_traced_memory()[0]
            elif count in (window, 1000):  # a window closes
                current, peak = tracemalloc.get_traced_memory()
                peaks.append(peak)
                growth.append(current - baseline)
                tracemalloc.stop()
    finally:
        tracemalloc.stop()
    assert count == 1000 and len(uids) == 1000
    # 100 kept slices would be over 1 MiB of datasets; a stream holds one.
    assert max(peaks) < 2 * 2**20, f"peaks {[p / 2**20 for p in peaks]} MiB"
    assert max(growth) < 256 * 2**10, f"growth {growth} bytes"


def test_lesion_mask_and_volume() -> None:
    head = _head(12, haemorrhage=True, lesion_kind="iph", volume_ml=10.0)
    volume = headct.true_volume_ml(head)
    # The blob is lobulated, so the volume is near, not at, the request.
    assert 6.0 < volume < 15.0
    z = headct.lesion_z_range(head)
    assert z is not None
    centre = (head.position[0], head.position[1])
    mask = headct.lesion_mask_slice(head, (z[0] + z[1]) / 2, pixel_spacing_mm=1.0, rows=256,
                                    cols=256, thickness_mm=5.0, centre_xy=centre)
    assert mask.max() == 1.0 and mask.min() == 0.0
    normal = _head(12, haemorrhage=False)
    assert headct.true_volume_ml(normal) == 0.0 and headct.lesion_z_range(normal) is None


def test_calcifications_follow_age() -> None:
    rng = np.random.default_rng(0)
    young = [headct.sample_head(rng, age_years=10.0) for _ in range(60)]
    old = [headct.sample_head(rng, age_years=75.0) for _ in range(60)]
    assert sum(bool(h.calcifications) for h in young) < 10
    assert sum(bool(h.calcifications) for h in old) > 40
    assert np.mean([h.ventricle_scale for h in old]) > np.mean([h.ventricle_scale for h in young])


def test_demo_study(tmp_path: Path) -> None:
    paths = ct.write_demo_ct_study(tmp_path, seed=1)
    assert 25 <= len(paths) <= 35
    first, last = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
    assert first.SeriesInstanceUID == last.SeriesInstanceUID
    assert float(last.ImagePositionPatient[2]) > float(first.ImagePositionPatient[2])
    assert float(first.SliceThickness) == 5.0
    assert dciodvfy_errors(paths[len(paths) // 2]) == []
