"""The GSPS and KOS beside the SR: valid (dciodvfy), showing the finding, deterministic."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
)

from engine.config import PROJECT_ROOT
from inference.card import ModelCard
from inference.interval import PriorFinding, compare
from inference.postprocess import Finding, Region
from inference.presentation import (
    KO_SERIES_NUMBER,
    PR_SERIES_NUMBER,
    build_companions,
    companion_sop_uids,
    companion_uids,
    file_bytes,
)
from inference.report import MANUFACTURER, SR_SERIES_NUMBER, build_sr
from inference.routing import is_own_output, may_be_own_output, non_image_reason
from inference.version import __version__
from tests.dicom_tools import dciodvfy_errors, first_content_item
from tests.factories import synthetic_dx

REGION = Region(400.0, 500.0, 520.0, 700.0)  # rows 400-520, columns 500-700


@pytest.fixture(scope="module")
def xr_card() -> ModelCard:
    return ModelCard.from_folder(PROJECT_ROOT / "models" / "limb-fracture-xr")


@pytest.fixture(scope="module")
def ct_card() -> ModelCard:
    return ModelCard.from_folder(PROJECT_ROOT / "models" / "head-ct-haemorrhage")


def _header(ds: Dataset) -> Dataset:
    """A source header as the pipeline hands it over (pixel data read, not needed)."""
    header = ds.copy()
    del header.PixelData
    return header


def _dx(seed: int = 3, **changes) -> Dataset:
    header = _header(synthetic_dx(seed, fracture=True, age=63.0, sex="F"))
    for keyword, value in changes.items():
        if value is None:
            delattr(header, keyword)
        else:
            setattr(header, keyword, value)
    return header


def _positive(card: ModelCard, probability: float = 0.63, **kw) -> Finding:
    return Finding(probability, card.threshold, REGION, **kw)


def _valid(ds: Dataset, tmp_path: Path) -> Dataset:
    """Written, checked by dciodvfy, read back."""
    data = file_bytes(ds)
    path = tmp_path / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
    path.write_bytes(data)
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(io.BytesIO(data))


def _build(source: Dataset, card: ModelCard, finding: Finding, **kw):
    sr = build_sr(source, card, [finding], **kw)
    return sr, build_companions(source, card, [finding], sr, **kw)


def _content(ko: Dataset, value_type: str) -> list[Dataset]:
    return [i for i in ko.ContentSequence if i.ValueType == value_type
            and i.RelationshipType == "CONTAINS"]  # not the observer context


def test_a_located_fracture_gets_a_valid_gsps_outlining_it_and_a_kos_naming_it(
        xr_card, tmp_path):
    source = _dx()
    sr, made = _build(source, xr_card, _positive(xr_card))
    pr, ko = (_valid(ds, tmp_path) for ds in made)
    assert (pr.SOPClassUID, ko.SOPClassUID) == (GrayscaleSoftcopyPresentationStateStorage,
                                                KeyObjectSelectionDocumentStorage)
    # The GSPS: the source image, the region as a closed polyline in pixels, the words.
    (series,) = pr.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (annotation,) = pr.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    assert annotation.GraphicLayer == pr.GraphicLayerSequence[0].GraphicLayer
    (graphic,) = annotation.GraphicObjectSequence
    assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
    assert [float(v) for v in graphic.GraphicData] == [
        c for point in REGION.polyline() for c in point]  # the SR's SCOORD points
    (text,) = annotation.TextObjectSequence
    assert text.UnformattedTextValue == "AI: Fracture present, probability 0.63"
    assert text.BoundingBoxAnnotationUnits == "PIXEL"
    left, top = text.BoundingBoxTopLeftHandCorner
    right, bottom = text.BoundingBoxBottomRightHandCorner
    assert bottom <= REGION.row0 and 0 <= left < right <= source.Columns  # above the box
    # The SR's tracking identifier: a viewer can tell the two show one finding.
    group = _measurement_group(sr)
    assert graphic.TrackingUID == text.TrackingUID == group.UID
    # The KOS: "Of Interest", the description, the key image with its GSPS, the SR.
    title = ko.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000", "DCM", "Of Interest")
    (description,) = _content(ko, "TEXT")
    assert description.ConceptNameCodeSequence[0].CodeValue == "113012"  # Key Object Descr.
    assert description.TextValue.startswith("Fracture present, probability 0.63. Found by "
                                            f"{xr_card.name} {xr_card.version}")
    (image,) = _content(ko, "IMAGE")
    reference = image.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPSequence[0].ReferencedSOPClassUID == \
        GrayscaleSoftcopyPresentationStateStorage
    assert reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pr.SOPInstanceUID
    (composite,) = _content(ko, "COMPOSITE")
    assert composite.ReferencedSOPSequence[0].ReferencedSOPClassUID == Comprehensive3DSRStorage
    assert composite.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
    evidence = {s.ReferencedSOPInstanceUID
                for series in ko.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence for s in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, pr.SOPInstanceUID, sr.SOPInstanceUID}


def _measurement_group(sr: Dataset) -> Dataset:
    """The SR's tracking unique identifier item of its first measurement group."""
    return first_content_item(sr, "112040")  # Tracking Unique Identifier


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the values set below
def test_both_are_ours_in_the_srs_study_with_its_patient_and_study_attributes(
        xr_card, tmp_path):
    # Values the SR normalises: the companions carry the same, normalised ones.
    source = _dx(PatientSex="f", PatientAge="63", StudyDate="2026-01-15")
    sr, made = _build(source, xr_card, _positive(xr_card))
    pr, ko = (_valid(ds, tmp_path) for ds in made)
    for ds in (pr, ko):
        assert ds.Manufacturer == MANUFACTURER == "orthanc-ai"
        assert ds.ManufacturerModelName == xr_card.id
        assert list(ds.SoftwareVersions) == [__version__, xr_card.version]
        assert xr_card.id in ds.SeriesDescription and xr_card.version in ds.SeriesDescription
        for keyword in ("PatientID", "PatientName", "PatientSex", "PatientAge",
                        "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime",
                        "AccessionNumber", "StudyID", "StudyDescription",
                        "ReferringPhysicianName"):
            assert ds.get(keyword) == sr.get(keyword), keyword
        assert is_own_output(str(ds.SOPClassUID), ds.Manufacturer)
    assert (pr.PatientSex, pr.PatientAge, pr.StudyDate) == ("F", "063Y", "20260115")
    assert len({SR_SERIES_NUMBER, PR_SERIES_NUMBER, KO_SERIES_NUMBER}) == 3
    assert (pr.SeriesNumber, ko.SeriesNumber) == (PR_SERIES_NUMBER, KO_SERIES_NUMBER)
    assert len({sr.SeriesInstanceUID, pr.SeriesInstanceUID, ko.SeriesInstanceUID}) == 3


@pytest.mark.parametrize("function", [None, "LINEAR", "SIGMOID"])
def test_the_gsps_keeps_the_images_window_and_voi_lut_function(xr_card, tmp_path, function):
    source = _dx(VOILUTFunction=function)
    _, (pr, _) = _build(source, xr_card, _positive(xr_card))
    pr = _valid(pr, tmp_path)
    (voi,) = pr.SoftcopyVOILUTSequence
    assert float(voi.WindowCenter) == float(source.WindowCenter)
    assert float(voi.WindowWidth) == float(source.WindowWidth)
    assert voi.WindowCenterWidthExplanation == source.WindowCenterWidthExplanation
    assert voi.get("VOILUTFunction") == function  # absent: LINEAR, as in the image
    assert (float(pr.RescaleSlope), float(pr.RescaleIntercept), pr.RescaleType) == (
        float(source.RescaleSlope), float(source.RescaleIntercept), source.RescaleType)
    assert pr.PresentationLUTShape == "IDENTITY"


def test_monochrome1_stays_monochrome1_and_an_invalid_window_is_left_to_the_viewer(
        xr_card, tmp_path):
    source = _dx(PhotometricInterpretation="MONOCHROME1", WindowWidth="0")
    _, (pr, _) = _build(source, xr_card, _positive(xr_card))
    pr = _valid(pr, tmp_path)
    assert pr.PresentationLUTShape == "INVERSE"  # a GSPS replaces the image's polarity
    assert "SoftcopyVOILUTSequence" not in pr


def test_a_ct_key_slice_gets_its_hu_and_windows_and_the_volume_in_words(ct_card, tmp_path):
    from training.synthetic.ct import write_demo_ct_study

    with tempfile.TemporaryDirectory() as folder:
        paths = write_demo_ct_study(Path(folder), seed=31)
        key = pydicom.dcmread(paths[len(paths) // 2])
    key.PixelData = b""  # as the series job keeps the key slice's header
    finding = Finding(0.91, ct_card.threshold, Region(100.0, 120.0, 180.0, 200.0),
                      volume_ml=12.34)
    sr, made = _build(key, ct_card, finding)
    pr, ko = (_valid(ds, tmp_path) for ds in made)
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
        .ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert (float(pr.RescaleIntercept), pr.RescaleType) == (float(key.RescaleIntercept), "HU")
    (voi,) = pr.SoftcopyVOILUTSequence
    assert list(voi.WindowCenterWidthExplanation) == list(key.WindowCenterWidthExplanation)
    assert [float(c) for c in voi.WindowCenter] == [float(c) for c in key.WindowCenter]
    text = pr.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    assert text == "AI: Hemorrhage present, probability 0.91, volume 12.3 mL"
    assert _content(ko, "TEXT")[0].TextValue.startswith(text.removeprefix("AI: "))
    assert pr.InstanceNumber == ko.InstanceNumber == key.InstanceNumber


def test_an_interval_change_is_in_the_words(xr_card, tmp_path):
    finding = _positive(xr_card, 0.81)
    comparison = compare(finding, PriorFinding(0.12, xr_card.threshold),
                         prior_study_uid="1.2.826.0.1.3680043.8.498.1",
                         prior_study_date="20240110")
    source = _dx()
    sr = build_sr(source, xr_card, [finding], comparisons=[comparison])
    pr, ko = (_valid(ds, tmp_path) for ds in build_companions(
        source, xr_card, [finding], sr, comparisons=[comparison]))
    text = pr.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    assert text == ("AI: Fracture present, probability 0.81; new since 2024-01-10 "
                    "(probability 0.12 -> 0.81)")
    assert comparison.describe() in _content(ko, "TEXT")[0].TextValue


def test_the_same_sr_has_the_same_companions_and_another_sr_others(xr_card):
    source = _dx()
    sr, first = _build(source, xr_card, _positive(xr_card))
    again = build_companions(source, xr_card, [_positive(xr_card)], sr)
    assert [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in first] == \
        [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in again]
    uids = companion_uids(str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
    assert [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in first] == \
        [uids.presentation_state, uids.key_objects]
    assert companion_sop_uids(str(sr.SOPInstanceUID)) == tuple(d.SOPInstanceUID for d in first)
    other_sr = build_sr(source, xr_card, [_positive(xr_card)],
                        uids=(str(sr.SeriesInstanceUID), "1.2.826.0.1.3680043.8.498.2"))
    other = build_companions(source, xr_card, [_positive(xr_card)], other_sr)
    assert {d.SOPInstanceUID for d in other}.isdisjoint(d.SOPInstanceUID for d in first)
    assert {d.SeriesInstanceUID for d in other} == {d.SeriesInstanceUID for d in first}


@pytest.mark.parametrize("finding", [
    pytest.param(Finding(0.2, 0.5, None), id="negative"),
    pytest.param(Finding(0.9, 0.5, None), id="positive without a region"),
])
def test_nothing_to_show_means_no_companions(xr_card, finding):
    source = _dx()
    sr = build_sr(source, xr_card, [finding])
    assert build_companions(source, xr_card, [finding], sr) == []


def test_a_colour_image_gets_the_kos_without_a_gsps(xr_card, tmp_path):
    grey = _dx()
    sr = build_sr(grey, xr_card, [_positive(xr_card)])
    colour = _dx(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    (ko,) = build_companions(colour, xr_card, [_positive(xr_card)], sr)
    ko = _valid(ko, tmp_path)
    (image,) = _content(ko, "IMAGE")
    assert "ReferencedSOPSequence" not in image.ReferencedSOPSequence[0]


@pytest.mark.parametrize("sop_class", [GrayscaleSoftcopyPresentationStateStorage,
                                       KeyObjectSelectionDocumentStorage,
                                       Comprehensive3DSRStorage])
def test_triage_takes_ours_for_our_own_output_and_anyone_elses_for_a_non_image(sop_class):
    assert may_be_own_output(sop_class)
    assert is_own_output(sop_class, "orthanc-ai")
    assert not is_own_output(sop_class, "Test")
    assert non_image_reason(sop_class) is not None
