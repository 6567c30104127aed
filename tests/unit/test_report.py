"""The SR: valid (dciodvfy), complete (TID 1500 content), deterministic.

Also: invalid values in the source's patient, study and equipment modules
give a valid SR with a note each, and the cached (fast) build equals a direct
highdicom build element by element.
"""

import copy
import dataclasses
import datetime as dt
import io
import re
import shutil
import struct
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, DSdecimal

from inference import report
from inference.card import ModelCard
from inference.errors import BadInput
from inference.interval import Change, Comparison, PriorFinding, PriorReference, compare
from inference.postprocess import Finding, Region
from inference.report import build_sr, build_sr_highdicom, device_uid, sr_uids
from inference.version import __version__
from tests.dicom_tools import DCIODVFY, dciodvfy_errors
from tests.factories import card_json, write_card

try:  # the synthetic phantoms moved from inference/ to training/
    from training.synthetic.ct import ct_dataset
    from training.synthetic.dx import dx_dataset
    from training.synthetic.radiograph import render, sample_case
except ImportError:  # pragma: no cover - older tree
    from inference.synthetic.ct import ct_dataset
    from inference.synthetic.dx import dx_dataset
    from inference.synthetic.radiograph import render, sample_case


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
    """The SR's file as the engine stores it (report.sr_bytes, checked), and read back."""
    path = tmp_path / "sr.dcm"
    path.write_bytes(_checked_bytes(sr))
    return path, pydicom.dcmread(path)


def _saved(sr) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _checked_bytes(sr) -> bytes:
    """report.sr_bytes(sr): pydicom's save_as bytes, reading back to the dataset built."""
    data = report.sr_bytes(sr)
    if isinstance(sr, report._TemplatedComprehensive3DSR):
        assert report._part10(sr) == data  # the lean writer wrote them; it did not decline
    saved = _saved(sr)
    assert data == saved
    back = pydicom.dcmread(io.BytesIO(data))
    assert _read_back_differences(sr, back) == []
    # the group length written is the group's (highdicom's value counts its own 12 bytes)
    length = back.file_meta.FileMetaInformationGroupLength
    assert data[128:144] == b"DICM\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", length)
    assert data[144 + length:146 + length] == b"\x08\x00"  # the dataset starts there
    assert _differences(back, pydicom.dcmread(io.BytesIO(saved))) == []
    return data


def _as_read(vr: str, value) -> object:
    """A value in the form pydicom reads it from a file, to compare a built one with."""
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    if not values or values == [None] or values == [""] or values == [b""]:
        return None
    if vr in ("DA", "DT", "TM"):
        parse = {"DA": DA, "DT": DT, "TM": TM}[vr]
        return [parse(v) for v in values]
    if vr == "DS":
        return [float(v) for v in values]
    if vr == "IS":
        return [int(v) for v in values]
    if vr in ("PN", "UI") or isinstance(values[0], str):
        return [str(v) for v in values]
    return values


def _read_back_differences(built: Dataset, back: Dataset, path: str = "") -> list[str]:
    """Where a dataset read from a file differs from the one written (tags, VRs, values)."""
    found = []
    if path == "":
        found += _read_back_differences(built.file_meta, back.file_meta, "file_meta")
    if set(built.keys()) != set(back.keys()):
        found.append(f"{path}: only in one: {sorted(set(built.keys()) ^ set(back.keys()))}")
    for tag in sorted(set(built.keys()) & set(back.keys())):
        x, y = built[tag], back[tag]
        here = f"{path}/{x.keyword or tag}"
        if x.VR != y.VR:
            found.append(f"{here}: VR {x.VR} != {y.VR}")
        elif tag == 0x00020000:
            continue  # the writer's to compute (checked in _checked_bytes)
        elif x.VR == "SQ":
            if len(x.value) != len(y.value):
                found.append(f"{here}: {len(x.value)} items != {len(y.value)}")
            for i, (p, q) in enumerate(zip(x.value, y.value, strict=False)):
                found += _read_back_differences(p, q, f"{here}[{i}]")
        elif _as_read(x.VR, x.value) != _as_read(y.VR, y.value):
            found.append(f"{here}: {x.value!r} != {y.value!r}")
    return found


def _items(ds, found=None):
    found = [] if found is None else found
    for item in ds.get("ContentSequence", []):
        found.append(item)
        _items(item, found)
    return found


def test_software_versions_name_the_product_then_the_model(card, source, tmp_path):
    """Software Versions (VM 1-n): orthanc-ai's version, then the model's; in both builds,
    valid, and the UIDs (source UIDs + model id + model version) unchanged by it."""
    finding = Finding(0.87, 0.5, Region(100.0, 200.0, 180.5, 260.25))
    fast = build_sr(source, card, [finding], now=NOW)
    direct = build_sr_highdicom(source, card, [finding], now=NOW)
    for sr in (fast, direct):
        path, back = _save_and_read(sr, tmp_path)
        assert list(back.SoftwareVersions) == [__version__, card.version]
        assert dciodvfy_errors(path) == []
    assert fast.SOPInstanceUID == direct.SOPInstanceUID == sr_uids(source, card)[1]


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
    group = back.ContentSequence[-1].ContentSequence[0]
    region = [i for i in group.ContentSequence if i.get("ValueType") == "SCOORD"]
    assert len(region) == 1 and region[0].GraphicType == "POLYLINE"
    assert region[0].ConceptNameCodeSequence[0].CodeValue == "111030"  # Image Region
    assert list(region[0].GraphicData[:2]) == [200.0, 100.0]  # (column, row)
    ref = region[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    # The same region under the first NUM, where OHIF's TID 1500 import looks for it.
    first_num = next(i for i in group.ContentSequence if i.get("ValueType") == "NUM")
    under = [i for i in first_num.ContentSequence if i.get("ValueType") == "SCOORD"]
    assert len(under) == 1 and under[0].RelationshipType == "INFERRED FROM"
    assert list(under[0].GraphicData) == list(region[0].GraphicData)
    assert under[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    # The finding in words: OHIF's label for the measurement.
    comments = [i.TextValue for i in group.ContentSequence if i.get("ValueType") == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments == ["Fracture present, probability 0.87"]
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
    assert "Fracture absent, probability 0.12" in [i.TextValue for i in items
                                                   if i.get("ValueType") == "TEXT"]
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



# --------------------------------------------------------------------------
# Sources with invalid values: the SR carries only valid ones, says so, and
# passes dciodvfy.

NOW = dt.datetime(2026, 1, 2, 3, 4, 5)
POSITIVE = [Finding(0.87, 0.5, Region(100.0, 200.0, 180.5, 260.25))]
ABSENT = "<absent>"
CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime")
NOTE = re.compile(r"note: source [A-Za-z]+ (normalised|invalid, left empty|invalid, left out"
                  r"|left out with its module|invalid, 1 used)")


@pytest.fixture(scope="module")
def dx():
    """A synthetic DX header (no pixel data: the SR needs none) with valid values."""
    rng = np.random.default_rng(3)
    rendered = render(sample_case(rng, fracture=True, age_years=45.0, sex="F"), rng)
    ds = dx_dataset(rendered, patient_id="P1", patient_name="TEST^PATIENT", patient_sex="F",
                    patient_age_years=45.0, study_uid="1.2.826.0.1.3680043.8.498.100",
                    series_uid="1.2.826.0.1.3680043.8.498.101",
                    sop_uid="1.2.826.0.1.3680043.8.498.102", accession_number="ACC1",
                    birth_date="19800101")
    del ds.PixelData
    ds.ReferringPhysicianName = "REF^DOC"
    return ds


@pytest.fixture(scope="module")
def ct():
    return ct_dataset(
        np.zeros((16, 16), np.int16), pixel_spacing_mm=0.45, image_position=(-3.6, -3.6, 40.0),
        slice_thickness_mm=5.0, patient_id="CT1", patient_name="CT^PATIENT", patient_sex="M",
        patient_age_years=70.0, study_uid="1.2.826.0.1.3680043.8.498.110",
        series_uid="1.2.826.0.1.3680043.8.498.111", sop_uid="1.2.826.0.1.3680043.8.498.112",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.113", instance_number=9,
        spacing_between_slices_mm=5.0,
    )


def _raw(tag: int, value) -> RawDataElement:
    """An element as a modality wrote it: bytes, not checked by anybody."""
    vr = dictionary_VR(tag)
    if isinstance(value, int):
        data = struct.pack("<H", value)
    else:
        data = value if isinstance(value, bytes) else \
            "\\".join(value if isinstance(value, list) else [value]).encode("latin-1")
        if len(data) % 2:
            data += b" "
    return RawDataElement(tag, vr, len(data), data, 0, False, True)


def _source(base: Dataset, changes: dict) -> Dataset:
    """``base`` with ``changes`` (None deletes), written to a file and read back."""
    ds = copy.deepcopy(base)
    for keyword, value in changes.items():
        tag = tag_for_keyword(keyword)
        if value is None:
            if tag in ds:
                del ds[tag]
        elif isinstance(value, DataElement | RawDataElement):
            ds[tag] = value
        else:
            ds[tag] = _raw(tag, value)
    buffer = io.BytesIO()
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _errors(path) -> list[str]:
    """dciodvfy's error lines; its output may quote values in any character set."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, timeout=60)
    lines = (proc.stdout + proc.stderr).decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.startswith("Error")]


def _parameters(back: Dataset) -> list[str]:
    return [str(i.TextValue) for i in _items(back) if i.get("ValueType") == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeValue == "111002"]


def _text(value) -> object:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list):
        return [str(v) for v in value]
    return str(value)


def _root(keyword):
    return lambda back: _text(back[keyword].value) if keyword in back else ABSENT


def _acquisition_equipment(keyword):
    def get(back):
        items = [i for i in back.ContributingEquipmentSequence
                 if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
        if not items:
            return "<no item>"
        return _text(items[0][keyword].value) if keyword in items[0] else ABSENT
    return get


def _library(meaning):
    def get(back):
        found = [i for i in _items(back) if i.get("RelationshipType") == "HAS ACQ CONTEXT"
                 and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]
        if not found:
            return ABSENT
        item = found[0]
        if item.ValueType == "TEXT":
            return str(item.TextValue)
        if item.ValueType == "CODE":
            return str(item.ConceptCodeSequence[0].CodeValue)
        return str(item.MeasuredValueSequence[0].NumericValue)
    return get


def _lower_case_cs_item() -> Dataset:
    item = Dataset()
    item.PatientID = "OTHER1"
    item.add(DataElement(0x00100022, "CS", "text", validation_mode=config.IGNORE))
    return item


# (id, changes to the source, where to look in the SR, expected value there,
#  expected note after "note: source <keyword> " or None for no note)
BAD_VALUES = [
    ("sex X", {"PatientSex": "X"}, "PatientSex", "", "invalid, left empty"),
    ("sex U", {"PatientSex": "U"}, "PatientSex", "", "invalid, left empty"),
    ("sex male", {"PatientSex": "male"}, "PatientSex", "M", "normalised"),
    ("sex lower-case", {"PatientSex": "m"}, "PatientSex", "M", "normalised"),
    ("sex Female padded", {"PatientSex": " Female"}, "PatientSex", "F", "normalised"),
    ("sex absent", {"PatientSex": None}, "PatientSex", "", None),
    ("age without unit", {"PatientAge": "45"}, "PatientAge", "045Y", "normalised"),
    ("age with space", {"PatientAge": "45 Y"}, "PatientAge", "045Y", "normalised"),
    ("age lower-case unit", {"PatientAge": "3m"}, "PatientAge", "003M", "normalised"),
    ("age padded", {"PatientAge": "045Y "}, "PatientAge", "045Y", None),  # padding is no error
    ("age padded in memory",
     {"PatientAge": DataElement(0x00101010, "AS", "045Y ", validation_mode=config.IGNORE)},
     "PatientAge", "045Y", None),
    ("age too large", {"PatientAge": "1000Y"}, "PatientAge", ABSENT, "invalid, left out"),
    ("age decimal", {"PatientAge": "45.5"}, "PatientAge", ABSENT, "invalid, left out"),
    ("birth date 30 Feb", {"PatientBirthDate": "19400230"}, "PatientBirthDate", "",
     "invalid, left empty"),
    ("birth date ISO", {"PatientBirthDate": "1940-03-05"}, "PatientBirthDate", "19400305",
     "normalised"),
    ("birth date text", {"PatientBirthDate": "unknown"}, "PatientBirthDate", "",
     "invalid, left empty"),
    ("study date ACR-NEMA", {"StudyDate": "2004.08.26"}, "StudyDate", "20040826", "normalised"),
    ("study date month 13", {"StudyDate": "20041326"}, "StudyDate", "", "invalid, left empty"),
    ("study date range", {"StudyDate": "20040826-"}, "StudyDate", "", "invalid, left empty"),
    ("study date absent", {"StudyDate": None}, "StudyDate", "", None),
    ("study time colons", {"StudyTime": "18:50:59"}, "StudyTime", "185059", "normalised"),
    ("study time hour 25", {"StudyTime": "256000"}, "StudyTime", "", "invalid, left empty"),
    ("study time 7 decimals", {"StudyTime": "185059.1234567"}, "StudyTime", "",
     "invalid, left empty"),
    ("accession too long", {"AccessionNumber": "ACCESSION-NUMBER-17"}, "AccessionNumber", "",
     "invalid, left empty"),
    ("study id too long", {"StudyID": "STUDY-ID-IS-TOO-LONG"}, "StudyID", "",
     "invalid, left empty"),
    ("name 6 components", {"PatientName": "Doe^John^A^B^C^D"}, "PatientName", "",
     "invalid, left empty"),
    ("name trailing carets", {"PatientName": "Doe^John^^^^"}, "PatientName", "Doe^John",
     "normalised"),
    ("name 4 groups", {"PatientName": "DOE^JOHN=A=B=C"}, "PatientName", "",
     "invalid, left empty"),
    ("name two values", {"PatientName": "Doe^John\\Roe^Jane"}, "PatientName", "",
     "invalid, left empty"),
    ("name group too long", {"PatientName": "Doe^" + "J" * 70}, "PatientName", "",
     "invalid, left empty"),
    ("name control char", {"PatientName": "Doe^Jo\x01hn"}, "PatientName", "",
     "invalid, left empty"),
    ("name as LO", {"PatientName": RawDataElement(0x00100010, "LO", 8, b"Doe^John", 0,
                                                   False, True)},
     "PatientName", "Doe^John", "normalised"),
    ("referring physician too long", {"ReferringPhysicianName": "R" * 70},
     "ReferringPhysicianName", "", "invalid, left empty"),
    ("weight with unit", {"PatientWeight": "70kg"}, "PatientWeight", ABSENT,
     "invalid, left out"),
    ("weight decimal comma", {"PatientWeight": "70,5"}, "PatientWeight", ABSENT,
     "invalid, left out"),
    ("weight too long", {"PatientWeight": "70.000000000000001"}, "PatientWeight", "70.0",
     "normalised"),
    ("pregnancy status 7", {"PregnancyStatus": 7}, "PregnancyStatus", ABSENT,
     "invalid, left out"),
    ("identity removed maybe", {"PatientIdentityRemoved": "MAYBE"}, "PatientIdentityRemoved",
     ABSENT, "invalid, left out"),
    ("other ids sequence", {"OtherPatientIDsSequence": DataElement(
        0x00101002, "SQ", [_lower_case_cs_item()])}, "OtherPatientIDsSequence", ABSENT,
     "invalid, left out"),
    ("trial sponsor too long", {"ClinicalTrialSponsorName": "S" * 70,
                                "ClinicalTrialProtocolID": "PROTO1",
                                "ClinicalTrialProtocolName": "Trial one",
                                "ClinicalTrialSiteID": "SITE1", "ClinicalTrialSiteName": "Ward 3",
                                "ClinicalTrialSubjectID": "SUBJ1"},
     "ClinicalTrialProtocolID", ABSENT, "left out with its module"),
    ("institution too long", {"InstitutionName": "Institution " * 6}, "InstitutionName",
     ABSENT, "invalid, left out"),
    ("station too long", {"StationName": "STATION-NAME-TOO-LONG"},
     _acquisition_equipment("StationName"), ABSENT, "invalid, left out"),
    ("manufacturer control char", {"Manufacturer": "Vendor\x02Inc"},
     _acquisition_equipment("Manufacturer"), "<no item>", "invalid, left out"),
    ("acquisition date-time invalid", {"AcquisitionDateTime": "20041399"},
     _acquisition_equipment("ContributionDateTime"), ABSENT, "invalid, left out"),
    ("instance number text", {"InstanceNumber": "abc"}, "InstanceNumber", "1",
     "invalid, left out"),
    ("instance number zero", {"InstanceNumber": "0"}, "InstanceNumber", "1",
     "invalid, 1 used"),
    ("modality lower-case", {"Modality": "dx"}, _library("Modality"), "DX", "normalised"),
    ("orientation lower-case", {"PatientOrientation": ["l", "f"]},
     _library("Patient Orientation Row"), "L", "normalised"),
    ("orientation one value", {"PatientOrientation": "L"}, _library("Patient Orientation Row"),
     ABSENT, "invalid, left out"),
    ("imager spacing text", {"ImagerPixelSpacing": ["abc", "def"]},
     _library("Horizontal Pixel Spacing"), ABSENT, "invalid, left out"),
]


def _keyword(changes: dict, where) -> str:
    return where if isinstance(where, str) else next(iter(changes))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, reading the invalid source
@pytest.mark.parametrize(("changes", "where", "expected", "note"),
                         [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_invalid_source_value_gives_a_valid_sr_with_a_note(card, dx, tmp_path, changes, where,
                                                           expected, note):
    source = _source(dx, changes)
    sr = build_sr(source, card, POSITIVE, now=NOW)
    path, back = _save_and_read(sr, tmp_path)
    keyword = _keyword(changes, where)
    get = _root(where) if isinstance(where, str) else where
    assert get(back) == expected
    params = _parameters(back)
    source_notes = {p for p in params if p.startswith("note: source ")}
    if note is None:
        assert not source_notes
    else:
        assert f"note: source {keyword} {note}" in source_notes
    assert all(NOTE.fullmatch(p) for p in source_notes)  # a keyword, never a value
    for value in changes.values():
        if isinstance(value, str) and len(value) >= 4:
            assert not any(value.strip() in p for p in params)
    assert _errors(path) == []
    direct = build_sr_highdicom(source, card, POSITIVE, now=NOW)
    assert _differences(sr, direct) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("charset", "name", "expected_charset"), [
    ("ISO_IR 999", b"M\xfcller^Hans", "ISO_IR 192"),  # unknown term: UTF-8 holds any text
    ("latin1", b"M\xfcller^Hans", "ISO_IR 100"),  # Python's name for it
    ("ISO_IR100", b"M\xfcller^Hans", "ISO_IR 100"),  # misspelt
    ("iso_ir 100", b"M\xfcller^Hans", "ISO_IR 100"),
    ("ISO 2022 IR 100", b"M\xfcller^Hans", "ISO_IR 100"),  # code extension alone
    ("UTF-8", "Müller^Hans".encode(), "ISO_IR 192"),
    ("ISO_IR 6", b"Mueller^Hans", ABSENT),  # no such term: the default repertoire
    (None, b"M\xfcller^Hans", "ISO_IR 192"),  # non-ASCII text without a character set
    ("ISO_IR 999", b"Mueller^Hans", ABSENT),
], ids=["unknown", "python-name", "no-space", "lower-case", "extension-alone", "utf-8",
        "iso-ir-6", "missing", "unknown-ascii"])
def test_invalid_character_set_is_normalised(card, dx, tmp_path, charset, name,
                                             expected_charset):
    changes = {"PatientName": name, "SpecificCharacterSet": charset}
    source = _source(dx, changes)
    sr = build_sr(source, card, POSITIVE, now=NOW)
    path, back = _save_and_read(sr, tmp_path)
    assert _root("SpecificCharacterSet")(back) == expected_charset
    assert str(back.PatientName) == str(source.PatientName)
    assert "note: source SpecificCharacterSet normalised" in _parameters(back)
    assert _errors(path) == []
    assert _differences(sr, build_sr_highdicom(source, card, POSITIVE, now=NOW)) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("path", [p for p in sorted(get_charset_files("chr*.dcm"))
                                  if "SQEncoding" not in p],
                         ids=lambda p: p.rsplit("/", 1)[-1])
def test_character_sets_of_real_files_survive(card, tmp_path, path):
    """pydicom's character set samples: the name comes back as it was, in a valid SR."""
    source = pydicom.dcmread(path)
    sr = build_sr(source, card, [Finding(0.2, 0.5, None)], now=NOW)
    out, back = _save_and_read(sr, tmp_path)
    assert str(back.PatientName) == str(source.PatientName)
    assert _errors(out) == []
    direct = build_sr_highdicom(source, card, [Finding(0.2, 0.5, None)], now=NOW)
    assert _differences(sr, direct) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("changes", "reason"), [
    ({"SOPInstanceUID": None}, "SOPInstanceUID"),
    ({"SeriesInstanceUID": "1.2.03.4"}, "SeriesInstanceUID"),
    ({"StudyInstanceUID": "1.2.3." + "4" * 70}, "StudyInstanceUID"),
    ({"SOPClassUID": "1.2.3.4"}, "SOP Class"),
    # Orthanc and the PACS file by PatientID: another one would mean another patient.
    ({"PatientID": "SECRETID" * 9}, "PatientID"),
    ({"PatientID": "ID\x07ONE"}, "PatientID"),
])
def test_unreferenceable_source_is_bad_input(card, dx, changes, reason):
    with pytest.raises(BadInput, match=reason) as raised:
        build_sr(_source(dx, changes), card, POSITIVE)
    assert "SECRET" not in raised.value.reason


def test_sr_highdicom_refuses_is_bad_input_not_a_retry(card, dx):
    nan_volume = [Finding(0.9, 0.5, None, volume_ml=float("nan"))]
    with pytest.raises(BadInput, match="no valid SR"):
        build_sr(dx, card, nan_volume)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_patient_data_in_notes_or_logs(card, dx, tmp_path, caplog):
    secret = {"PatientBirthDate": "SECRET-DATE", "PatientName": "Secretname^" + "X" * 70,
              "PatientAge": "45 years", "StudyTime": "25:61"}
    source = _source(dx, secret)
    with caplog.at_level("DEBUG", logger="inference.report"):
        sr = build_sr(source, card, POSITIVE, now=NOW)
    _, back = _save_and_read(sr, tmp_path)
    logged = caplog.text + " ".join(_parameters(back))
    for value in ("SECRET", "Secretname", "45 years", "25:61"):
        assert value not in logged
    assert {"PatientBirthDate", "PatientName", "PatientAge", "StudyTime"} <= {
        m.split()[2] for m in _parameters(back) if m.startswith("note: source")}


# --------------------------------------------------------------------------
# The cached build equals highdicom's, element by element.


def _differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Where two datasets differ (tags, VRs, values, value types), but for the clock."""
    found = []
    if path == "":
        found += _differences(a.file_meta, b.file_meta, "file_meta")
    tags_a, tags_b = set(a.keys()), set(b.keys())
    if tags_a != tags_b:
        found.append(f"{path}: only in one: {sorted(tags_a ^ tags_b)}")
    for tag in sorted(tags_a & tags_b):
        x, y = a[tag], b[tag]
        here = f"{path}/{x.keyword or tag}"
        if x.keyword in CLOCK:
            continue
        if x.VR != y.VR:
            found.append(f"{here}: VR {x.VR} != {y.VR}")
        elif x.VR == "SQ":
            if len(x.value) != len(y.value):
                found.append(f"{here}: {len(x.value)} items != {len(y.value)}")
            for i, (p, q) in enumerate(zip(x.value, y.value, strict=False)):
                found += _differences(p, q, f"{here}[{i}]")
        elif x.value != y.value or type(x.value) is not type(y.value):
            found.append(f"{here}: {x.value!r} != {y.value!r}")
    return found


def _bytes(sr: Dataset) -> bytes:
    sr = copy.deepcopy(sr)
    sr.InstanceCreationDate, sr.InstanceCreationTime = "20260102", "030405"
    for item in sr.ContributingEquipmentSequence:
        if "ContributionDateTime" in item and item.Manufacturer.startswith("Highdicom"):
            item.ContributionDateTime = "20260102030405"
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _no_slice_thickness(ct: Dataset) -> Dataset:
    ds = copy.deepcopy(ct)
    del ds.SliceThickness
    return ds


def _decimal_spacing(dx: Dataset) -> Dataset:
    ds = copy.deepcopy(dx)
    ds.ImagerPixelSpacing = [DSdecimal("0.15"), DSdecimal("0.15")]
    return ds


@pytest.mark.parametrize(("source_name", "findings", "kwargs"), [
    ("dx", POSITIVE, {"missing_inputs": ["age"]}),
    ("dx", [Finding(0.12, 0.5, None)], {"notes": ["one", "two"]}),
    ("dx", [Finding(0.7, 0.5, None)], {}),  # positive, not located
    ("ct", [Finding(0.95, 0.5, None, volume_ml=12.5)], {"uids": ("1.2.3.4", "1.2.3.5")}),
    ("ct", [Finding(0.2, 0.5, None, volume_ml=0.0)], {}),
    ("rg1", POSITIVE, {}),  # CR without ImagerPixelSpacing: no image library
    ("dx", [*POSITIVE, Finding(0.3, 0.5, None, volume_ml=1.25)], {"notes": ["x"]}),
    ("ct-no-slice-thickness", [Finding(0.95, 0.5, None, volume_ml=3.0)], {}),
    ("dx-decimal-spacing", POSITIVE, {}),  # unusual values: highdicom decides on the library
    ("dx", POSITIVE, {"predecessor": "previous"}),
], ids=["dx-positive", "dx-negative", "dx-unlocated", "ct-volume", "ct-negative", "cr-positive",
        "two-findings", "ct-no-slice-thickness", "dx-decimal-spacing", "revision"])
def test_fast_build_equals_highdicom(card, dx, ct, source, source_name, findings, kwargs,
                                     tmp_path):
    sources = {"dx": dx, "ct": ct, "rg1": source, "ct-no-slice-thickness": _no_slice_thickness(ct),
               "dx-decimal-spacing": _decimal_spacing(dx)}
    src = sources[source_name]
    if kwargs.get("predecessor") == "previous":
        kwargs = {**kwargs, "predecessor": build_sr(src, card, [Finding(0.1, 0.5, None)],
                                                    now=NOW)}
    fast = build_sr(src, card, findings, now=NOW, **kwargs)
    direct = build_sr_highdicom(src, card, findings, now=NOW, **kwargs)
    assert isinstance(fast, report._TemplatedComprehensive3DSR)  # the fast path was taken
    assert type(direct) is hd.sr.Comprehensive3DSR
    assert _differences(fast, direct) == []
    assert _bytes(fast) == _bytes(direct)
    assert type(fast.content) is type(direct.content)
    assert _differences(fast.content[0], direct.content[0], "content") == []
    # its bytes: the lean writer's, save_as's, valid; and it writes highdicom's SR alike
    path = tmp_path / "fast.dcm"
    path.write_bytes(_checked_bytes(fast))
    assert _errors(path) == []
    assert report._part10(direct) == _saved(direct)
    assert report.sr_bytes(direct) == _saved(direct)  # not from a template: save_as


def test_cached_template_is_not_shared_between_srs(card, dx):
    first = build_sr(dx, card, [Finding(0.87, 0.5, Region(1.0, 2.0, 3.0, 4.0))], now=NOW)
    kept = _bytes(first)
    second = build_sr(dx, card, [Finding(0.91, 0.5, Region(5.0, 6.0, 7.0, 8.0))], now=NOW)
    second.ContentSequence[-1].ContentSequence[0].ContentSequence[0].TextValue = "changed"
    assert _bytes(first) == kept
    assert b"changed" in _checked_bytes(second)  # the bytes are the dataset's, as it is now
    third = build_sr(dx, card, [Finding(0.5, 0.5, Region(1.0, 2.0, 3.0, 4.0))], now=NOW)
    direct = build_sr_highdicom(dx, card, [Finding(0.5, 0.5, Region(1.0, 2.0, 3.0, 4.0))],
                                now=NOW)
    assert _differences(third, direct) == []


# --------------------------------------------------------------------------
# The SR's bytes: report.sr_bytes writes what save_as writes, faster.


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("charset", "name", "institution"), [
    ("ISO_IR 100", b"M\xfcller^Hans", b"H\xf4pital Z\xfcrich"),
    ("ISO_IR 192", "Müller^Hans".encode(), "Hôpital Zürich".encode()),
    ("ISO_IR 192", "Ἀθηνᾶ^Παλλάς".encode(), "Πανεπιστήμιο".encode()),
    (None, b"Mueller^Hans", b"Hopital Zurich"),
], ids=["latin-1", "utf-8", "utf-8-greek", "ascii"])
def test_sr_bytes_with_non_ascii_text(card, dx, tmp_path, charset, name, institution):
    source = _source(dx, {"SpecificCharacterSet": charset, "PatientName": name,
                          "InstitutionName": institution})
    notes = ["Größe geschätzt", "plain note"] if charset else ["plain note"]
    sr = build_sr(source, card, [*POSITIVE, Finding(0.3, 0.5, None, volume_ml=2.5)],
                  missing_inputs=["âge" if charset else "age"], notes=notes, now=NOW)
    assert isinstance(sr, report._TemplatedComprehensive3DSR)
    assert sr.get("SpecificCharacterSet") == charset
    path, back = _save_and_read(sr, tmp_path)
    assert str(back.PatientName) == str(source.PatientName)
    assert str(back.InstitutionName) == str(source.InstitutionName)
    assert {f"note: {n}" for n in notes} <= set(_parameters(back))
    assert _errors(path) == []


def test_sr_file_writes_sr_bytes(card, dx):
    from engine.context import sr_file

    sr = build_sr(dx, card, POSITIVE, now=NOW)
    assert sr_file(sr) == report.sr_bytes(sr) == _saved(sr)


def test_sr_bytes_leaves_what_it_does_not_mirror_to_save_as(card, dx):
    sr = build_sr(dx, card, POSITIVE, now=NOW)
    sr.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"  # save_as writes the dataset's
    assert report._part10(sr) is None
    assert report.sr_bytes(sr) == _saved(sr)
    assert pydicom.dcmread(io.BytesIO(report.sr_bytes(sr))).file_meta \
        .MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    sr = build_sr(dx, card, POSITIVE, now=NOW)
    sr.PixelRepresentation = 1
    sr.add(DataElement(0x00280106, "US or SS", -1))  # ambiguous: pydicom corrects it
    with pytest.raises(report._LeaveToPydicom):
        report._part10(sr)
    data = report.sr_bytes(sr)
    assert pydicom.dcmread(io.BytesIO(data))[0x00280106].VR == "SS"
    assert data == _saved(sr)


# --------------------------------------------------------------------------
# Interval change: the comparison with a prior study, in the finding's group.

DSRDUMP = shutil.which("dsrdump")  # DCMTK: checks the IOD's relationship constraints
PRIOR_DATE = "20240301"
CHANGE_CODE = {Change.NEW: "129721008", Change.UNCHANGED: "129723006",
               Change.INCREASED: "15454001", Change.DECREASED: "19776001",
               Change.RESOLVED: "723506003"}
DX_REGION = Region(100.0, 200.0, 180.5, 260.25)
# (current finding, prior finding) per change; DX has no volume, so its
# increased / decreased are a reader's (the rule cannot tell without one).
DX_CASES = {
    Change.NEW: (Finding(0.87, 0.5, DX_REGION), PriorFinding(0.1, 0.5)),
    Change.UNCHANGED: (Finding(0.87, 0.5, DX_REGION), PriorFinding(0.8, 0.5)),
    Change.INCREASED: (Finding(0.87, 0.5, DX_REGION), PriorFinding(0.6, 0.5)),
    Change.DECREASED: (Finding(0.62, 0.5, DX_REGION), PriorFinding(0.9, 0.5)),
    Change.RESOLVED: (Finding(0.12, 0.5, None), PriorFinding(0.9, 0.5)),
}
CT_CASES = {
    Change.NEW: (Finding(0.95, 0.5, None, volume_ml=12.5), PriorFinding(0.2, 0.5, 0.0)),
    Change.UNCHANGED: (Finding(0.9, 0.5, None, volume_ml=12.5), PriorFinding(0.85, 0.5, 12.0)),
    Change.INCREASED: (Finding(0.9, 0.5, None, volume_ml=20.0), PriorFinding(0.8, 0.5, 12.5)),
    Change.DECREASED: (Finding(0.9, 0.5, None, volume_ml=5.0), PriorFinding(0.9, 0.5, 12.5)),
    Change.RESOLVED: (Finding(0.1, 0.5, None, volume_ml=0.0), PriorFinding(0.9, 0.5, 12.5)),
}


def _dsrdump_errors(path) -> list[str]:
    """DCMTK's complaints reading the SR (it refuses relationships the IOD does not allow)."""
    proc = subprocess.run([DSRDUMP, str(path)], capture_output=True, timeout=60)
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    return [line for line in lines if line[:2] in ("E:", "F:", "W:")] + \
        ([f"exit status {proc.returncode}"] if proc.returncode else [])


def _prior_of(base: Dataset, index: str) -> Dataset:
    """``base`` as an image of an earlier study of the same patient."""
    ds = copy.deepcopy(base)
    ds.StudyInstanceUID = f"{base.StudyInstanceUID}.9{index}"
    ds.SeriesInstanceUID = f"{base.SeriesInstanceUID}.9{index}"
    ds.SOPInstanceUID = f"{base.SOPInstanceUID}.9{index}"
    ds.StudyDate = PRIOR_DATE
    return ds


def _reference(sr: Dataset) -> PriorReference:
    return PriorReference(str(sr.SOPClassUID), str(sr.SOPInstanceUID),
                          str(sr.SeriesInstanceUID), str(sr.StudyInstanceUID))


@pytest.fixture(scope="module")
def priors(card, dx, ct):
    """(prior image, our SR of it) per modality."""
    found = {}
    for name, base, finding in (("dx", dx, Finding(0.3, 0.5, None)),
                                ("ct", ct, Finding(0.3, 0.5, None, volume_ml=1.0))):
        image = _prior_of(base, "1")
        found[name] = image, build_sr(image, card, [finding], now=NOW)
    return found


def _case(modality: str, change: Change, priors) -> tuple[Dataset, Finding, Comparison]:
    current, prior = (DX_CASES if modality == "dx" else CT_CASES)[change]
    image, prior_sr = priors[modality]
    comparison = compare(current, prior, prior_study_uid=str(image.StudyInstanceUID),
                         prior_study_date=str(image.StudyDate), prior_sr=_reference(prior_sr))
    if comparison.change != change:  # DX increased / decreased: a reader's assessment
        assert modality == "dx" and change in (Change.INCREASED, Change.DECREASED)
        comparison = dataclasses.replace(comparison, change=change)
    return image, current, comparison


def _difference_items(back: Dataset) -> list[tuple[Dataset, Dataset]]:
    """(measurement group, Qualitative Difference item) pairs of the SR."""
    found = []
    for group in _items(back):
        for item in group.get("ContentSequence", []):
            if item.get("ValueType") == "CODE" and \
                    item.ConceptNameCodeSequence[0].CodeValue == "111049":
                found.append((group, item))
    return found


def _children(item: Dataset) -> dict[str, Dataset]:
    children = {}
    for child in item.ContentSequence:
        code = child.ConceptNameCodeSequence[0]
        children[f"{code.CodingSchemeDesignator}:{code.CodeValue}"] = child
    assert len(children) == len(item.ContentSequence)
    return children


def _pertinent_other_evidence(back: Dataset) -> set[tuple[str, ...]]:
    return {(study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPClassUID,
             sop.ReferencedSOPInstanceUID)
            for study in back.get("PertinentOtherEvidenceSequence", [])
            for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence}


@pytest.mark.parametrize("change", list(Change), ids=[c.value for c in Change])
@pytest.mark.parametrize("modality", ["dx", "ct"])
def test_interval_change_is_in_the_finding_group(card, dx, ct, priors, tmp_path, modality,
                                                 change):
    source = dx if modality == "dx" else ct
    image, finding, comparison = _case(modality, change, priors)
    prior_sr = priors[modality][1]
    sr = build_sr(source, card, [finding], now=NOW, comparisons=[comparison])
    assert isinstance(sr, report._ComparedComprehensive3DSR)  # highdicom built it
    direct = build_sr_highdicom(source, card, [finding], now=NOW, comparisons=[comparison])
    assert _differences(sr, direct) == []
    path, back = _save_and_read(sr, tmp_path)  # sr_bytes == save_as's bytes, read back alike
    assert report._part10(sr) == report.sr_bytes(sr)  # the lean writer wrote them
    assert _errors(path) == []
    if DSRDUMP:
        assert _dsrdump_errors(path) == []

    (group, item), = _difference_items(back)
    assert group.ValueType == "CONTAINER"
    assert group.ConceptNameCodeSequence[0].CodeValue == "125007"  # Measurement Group
    assert item.RelationshipType == "CONTAINS"
    value = item.ConceptCodeSequence[0]
    assert (value.CodeValue, value.CodingSchemeDesignator) == (CHANGE_CODE[change], "SCT")
    assert value.CodeMeaning == report.CHANGE_CODES[change].meaning
    children = _children(item)
    assert {c.RelationshipType for c in children.values()} == {"HAS PROPERTIES"}
    expected = {"DCM:111060", "DCM:110180", "DCM:122157", "DCM:121106", "DCM:122075"}
    if modality == "ct":
        expected.add("SCT:129806009")
    assert set(children) == expected
    date = children["DCM:111060"]
    assert (date.ValueType, date.Date) == ("DATE", PRIOR_DATE)
    uid = children["DCM:110180"]
    assert (uid.ValueType, uid.UID) == ("UIDREF", image.StudyInstanceUID)
    probability = children["DCM:122157"]
    assert probability.ValueType == "NUM"
    measured = probability.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(comparison.prior.probability)
    unit = measured.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    if modality == "ct":
        size = children["SCT:129806009"].MeasuredValueSequence[0]
        assert float(size.NumericValue) == pytest.approx(comparison.volume_difference_ml)
        assert size.MeasurementUnitsCodeSequence[0].CodeValue == "mL"
        assert size.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    comment = children["DCM:121106"]
    assert (comment.ValueType, comment.TextValue) == ("TEXT", comparison.describe())
    assert comment.TextValue.startswith(change.value)
    assert " since 2024-03-01 (probability " in comment.TextValue
    composite = children["DCM:122075"]
    assert composite.ValueType == "COMPOSITE"
    ref = composite.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == \
        (prior_sr.SOPClassUID, prior_sr.SOPInstanceUID)

    # every referenced instance is evidence: the prior SR in Pertinent Other Evidence
    assert _pertinent_other_evidence(back) == {
        (prior_sr.StudyInstanceUID, prior_sr.SeriesInstanceUID, prior_sr.SOPClassUID,
         prior_sr.SOPInstanceUID)}
    current = back.CurrentRequestedProcedureEvidenceSequence
    assert [s.StudyInstanceUID for s in current] == [source.StudyInstanceUID]
    assert [i.ReferencedSOPInstanceUID for i in current[0].ReferencedSeriesSequence[0]
            .ReferencedSOPSequence] == [source.SOPInstanceUID]
    # the rest of the group is what it is without a comparison
    presence = [i for i in group.ContentSequence if i.get("ValueType") == "CODE"
                and i.ConceptNameCodeSequence[0].CodeValue == "72704001"]
    assert [p.ConceptCodeSequence[0].CodeValue for p in presence] == \
        ["52101004" if finding.positive else "272519000"]
    scoords = [i for i in _items(back) if i.get("ValueType") == "SCOORD"]
    # the group's Image Region, and the same under the Probability NUM
    assert len(scoords) == (2 if finding.positive and finding.region is not None else 0)
    words = [i.TextValue for i in group.ContentSequence if i.get("ValueType") == "TEXT"
             and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert len(words) == 1 and words[0].endswith("; " + comparison.brief())
    assert " since 2024-03-01" in words[0] and "->" not in words[0]
    doc = hd.sr.srread(path)  # highdicom reads it back
    groups = doc.content.get_planar_roi_measurement_groups() + \
        doc.content.get_image_measurement_groups()
    assert len(groups) == 1
    names = {e.name.value for e in groups[0].get_qualitative_evaluations()}
    assert {"72704001", "111049"} <= names


def test_comparison_without_prior_sr_or_date(card, dx, tmp_path):
    finding = Finding(0.87, 0.5, DX_REGION)
    comparison = compare(finding, PriorFinding(0.1, 0.5), prior_study_uid="1.2.3.4",
                         prior_study_date="")
    sr = build_sr(dx, card, [finding], now=NOW, comparisons=[comparison])
    path, back = _save_and_read(sr, tmp_path)
    assert _errors(path) == []
    (_, item), = _difference_items(back)
    assert set(_children(item)) == {"DCM:110180", "DCM:122157", "DCM:121106"}
    assert _children(item)["DCM:121106"].TextValue == \
        "new since the prior study (probability 0.10 -> 0.87)"
    assert "PertinentOtherEvidenceSequence" not in back


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_invalid_prior_values_are_left_out(card, dx, tmp_path):
    finding = Finding(0.87, 0.5, DX_REGION)
    bad_sr = PriorReference("1.2.840.10008.5.1.4.1.1.88.34", "1.2.03", "1.2.3", "1.2.3")
    comparison = Comparison(Change.NEW, PriorFinding(float("nan"), 0.5), "1.2.03", "20241399",
                            float("nan"), float("inf"), bad_sr)
    sr = build_sr(dx, card, [finding], now=NOW, comparisons=[comparison])
    path, back = _save_and_read(sr, tmp_path)
    assert _errors(path) == []
    (_, item), = _difference_items(back)
    assert set(_children(item)) == {"DCM:121106"}
    assert "PertinentOtherEvidenceSequence" not in back
    date = dataclasses.replace(comparison, prior_study_date="2024-03-01")
    (_, item), = _difference_items(build_sr(dx, card, [finding], now=NOW, comparisons=[date]))
    assert str(_children(item)["DCM:111060"].Date) == PRIOR_DATE  # one meaning: normalised


def test_comparisons_are_per_finding_and_the_prior_sr_is_listed_once(card, dx, priors, tmp_path):
    _, located, first = _case("dx", Change.NEW, priors)
    _, unlocated, second = _case("dx", Change.RESOLVED, priors)
    findings = [located, Finding(0.3, 0.5, None), unlocated]
    sr = build_sr(dx, card, findings, now=NOW, comparisons=[first, None, second])
    direct = build_sr_highdicom(dx, card, findings, now=NOW, comparisons=[first, None, second])
    assert _differences(sr, direct) == []
    path, back = _save_and_read(sr, tmp_path)
    assert _errors(path) == []
    if DSRDUMP:
        assert _dsrdump_errors(path) == []
    pairs = _difference_items(back)
    assert [item.ConceptCodeSequence[0].CodeValue for _, item in pairs] == \
        ["129721008", "723506003"]
    tracking = [[i.TextValue for i in group.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "112039"] for group, _ in pairs]
    assert tracking == [[f"{card.id} finding 1"], [f"{card.id} finding 3"]]
    assert len(_pertinent_other_evidence(back)) == 1


def test_without_comparisons_the_sr_is_unchanged(card, dx, ct):
    for source, findings in ((dx, POSITIVE), (ct, [Finding(0.95, 0.5, None, volume_ml=12.5)])):
        plain = build_sr(source, card, findings, now=NOW)
        for comparisons in (None, [None] * len(findings)):
            sr = build_sr(source, card, findings, now=NOW, comparisons=comparisons)
            assert isinstance(sr, report._TemplatedComprehensive3DSR)  # the fast path
            assert _differences(sr, plain) == []
            assert _bytes(sr) == _bytes(plain)
            direct = build_sr_highdicom(source, card, findings, now=NOW, comparisons=comparisons)
            assert type(direct) is hd.sr.Comprehensive3DSR
            assert _differences(sr, direct) == []
            assert not _difference_items(sr)


def test_comparisons_must_align_with_findings(card, dx, priors):
    _, finding, comparison = _case("dx", Change.NEW, priors)
    for build in (build_sr, build_sr_highdicom):
        with pytest.raises(ValueError, match="2 comparisons for 1 findings"):
            build(dx, card, [finding], comparisons=[comparison, None])
        with pytest.raises(TypeError, match="Comparison"):
            build(dx, card, [finding], comparisons=["new"])
