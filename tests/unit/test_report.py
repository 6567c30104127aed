"""The SR: valid (dciodvfy), complete (TID 1500 content), deterministic."""

import datetime as dt

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference.card import ModelCard
from inference.postprocess import Finding, Region
from inference.report import build_sr, device_uid, sr_uids
from tests.dicom_tools import dciodvfy_errors
from tests.factories import card_json, write_card


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    (folder / "model.keras").write_bytes(b"")
    c = card_json()
    c["finding_site"] = {"value": "66019005", "scheme": "SCT", "meaning": "Limb structure"}
    write_card(folder, c)
    return ModelCard.from_folder(folder)


@pytest.fixture(scope="module")
def source():
    return pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))


def _save_and_read(sr, tmp_path):
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


def _items(ds, found=None):
    found = [] if found is None else found
    for item in ds.get("ContentSequence", []):
        found.append(item)
        _items(item, found)
    return found


def test_positive_finding_sr_is_valid_and_complete(card, source, tmp_path):
    finding = Finding(0.87, 0.5, Region(100.0, 200.0, 180.5, 260.25))
    sr = build_sr(source, card, [finding], missing_inputs=["age"])
    path, back = _save_and_read(sr, tmp_path)
    assert dciodvfy_errors(path) == []
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.Manufacturer == "orthanc-ai"
    items = _items(back)
    names = {i.ConceptNameCodeSequence[0].CodeMeaning
             for i in items if "ConceptNameCodeSequence" in i}
    assert {"Imaging Measurements", "Tracking Identifier", "Tracking Unique Identifier",
            "Finding", "Algorithm Name", "Algorithm Version", "Probability"} <= names
    version = [i.TextValue for i in items if i.get("ValueType") == "TEXT"
               and i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Version"]
    assert set(version) == {"0.0.1"}
    params = [i.TextValue for i in items if i.get("ValueType") == "TEXT"
              and i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
    assert "missing input: age" in params
    prob = [i for i in items if i.get("ValueType") == "NUM"]
    assert float(prob[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.87)
    scoord = [i for i in items if i.get("ValueType") == "SCOORD"]
    assert len(scoord) == 1 and scoord[0].GraphicType == "POLYLINE"
    assert list(scoord[0].GraphicData[:2]) == [200.0, 100.0]  # (column, row)
    ref = scoord[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    codes = {i.ConceptCodeSequence[0].CodeValue for i in items if i.get("ValueType") == "CODE"}
    assert {"72704001", "52101004", "66019005"} <= codes  # Fracture, Present, site


def test_negative_result_is_explicit(card, source, tmp_path):
    sr = build_sr(source, card, [Finding(0.12, 0.5, None)])
    path, back = _save_and_read(sr, tmp_path)
    assert dciodvfy_errors(path) == []
    items = _items(back)
    codes = {i.ConceptCodeSequence[0].CodeValue for i in items if i.get("ValueType") == "CODE"}
    assert "272519000" in codes  # Absent
    assert not [i for i in items if i.get("ValueType") == "SCOORD"]
    image_refs = [i for i in items if i.get("ValueType") == "IMAGE"]
    assert any(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
               for r in image_refs)


def test_uids_are_deterministic_per_model_version(card, source):
    t = dt.datetime(2026, 1, 1, 12, 0)
    a = build_sr(source, card, [Finding(0.3, 0.5, None)], now=t)
    b = build_sr(source, card, [Finding(0.9, 0.5, None)], now=t)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    newer = ModelCard(**{**card.__dict__, "version": "0.0.2"})
    assert sr_uids(source, newer)[1] != a.SOPInstanceUID
    assert sr_uids(source, newer)[0] != a.SeriesInstanceUID
    assert device_uid(newer) == device_uid(card)


def test_highdicom_reads_it_back_as_a_measurement_report(card, source, tmp_path):
    sr = build_sr(source, card, [Finding(0.7, 0.5, Region(1, 1, 20, 20))])
    path, _ = _save_and_read(sr, tmp_path)
    doc = hd.sr.srread(path)
    groups = doc.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    assert groups[0].finding_type.value == "72704001"
    assert groups[0].reference_type.value == "111030"  # Image Region


def test_cached_iod_pixel_check_answers_like_highdicom():
    import highdicom._standard_utils as standard
    import highdicom.sr.templates as templates

    assert hasattr(templates.does_iod_have_pixel_data, "cache_info")
    for sop_class in ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.2",
                      "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"):
        assert templates.does_iod_have_pixel_data(sop_class) == \
            standard.does_iod_have_pixel_data(sop_class)
