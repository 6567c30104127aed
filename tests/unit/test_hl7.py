"""The ORU^R01 built from an SR, the ACK's meaning, and MLLP against a real listener."""

from __future__ import annotations

import datetime as dt
import io
import threading

import hl7
import pydicom
import pytest
from prometheus_client import CollectorRegistry

from engine.config import _HL7, parse_ai_section
from engine.context import Context
from engine.deliveries import deliveries, hl7_control_id, hl7_destination_of, hl7_key
from engine.metrics import WorkerMetrics
from engine.sinks import hl7_oru
from engine.sinks.hl7_oru import Ack, build_oru, check_ack, parse_ack, send
from engine.sinks.orthanc_store import OrthancStoreSink
from engine.standins.ris import SILENT, MllpListener
from engine.stores import InboxKind, JobKind, JobState
from engine.stores.sqlite import SqliteJobStore
from engine.worker import Worker
from inference.card import ModelCard
from inference.errors import BadInput, TransientError
from inference.interval import PriorFinding, compare
from inference.postprocess import Finding, Region
from inference.registry import Registry
from inference.report import build_sr, sr_bytes
from tests.factories import card_json, synthetic_dx, write_card
from tests.fakes import FakeBackend, FakeOrthanc

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
SR_TIME = dt.datetime(2026, 1, 2, 3, 0, 0)
CONFIG = _HL7(host="ris.example", port=2575, sending_application="ORTHANC-AI",
              sending_facility="RADIOLOGY", receiving_application="RIS",
              receiving_facility="HOSPITAL")


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    (folder / "model.keras").write_bytes(b"")
    write_card(folder, card_json())
    return ModelCard.from_folder(folder)


def _source(**changes):
    ds = synthetic_dx(7, fracture=True, patient_id="P-7", patient_name="DOE^JANE^Q^DR^III",
                      accession_number="ACC-77", birth_date="19750304", study_date="20251001",
                      study_time="101500.25")
    ds.StudyDescription = "XR wrist left"
    ds.IssuerOfPatientID = "HOSP_A"
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _read(sr) -> pydicom.Dataset:
    """The SR as Orthanc would give it back: its file, read by pydicom."""
    return pydicom.dcmread(io.BytesIO(sr_bytes(sr)))


def _sr(card, findings, source=None, **kw) -> pydicom.Dataset:
    return _read(build_sr(source if source is not None else _source(), card, findings,
                          now=SR_TIME, **kw))


def _parsed(message: hl7.Message) -> hl7.Message:
    """What the RIS reads: the rendered message, parsed again."""
    text = str(message)
    assert text.endswith("\r") and "\n" not in text
    return hl7.parse(text)


def _obx(m: hl7.Message) -> list[dict[str, str]]:
    rows = []
    for seg in m.segments("OBX"):
        rows.append({"set": str(seg(1)), "type": str(seg(2)), "id": str(seg(3)),
                     "sub": str(seg(4)), "value": str(seg(5)), "units": str(seg(6)),
                     "status": str(seg(11)), "time": str(seg(14)) if len(seg) > 14 else ""})
    return rows


# --------------------------------------------------------------------------
# The message


def test_every_segment_and_field_of_a_positive_finding_with_interval_change(card):
    current = Finding(0.87, 0.5, Region(100.0, 200.0, 180.5, 260.25), volume_ml=12.5)
    comparison = compare(current, PriorFinding(0.1, 0.5, 0.0), prior_study_uid="1.2.3.4",
                         prior_study_date="20240301")
    sr = _sr(card, [current], comparisons=[comparison])
    m = _parsed(build_oru(sr, CONFIG, now=NOW))
    assert [str(s(0)) for s in m] == ["MSH", "PID", "ORC", "OBR"] + ["OBX"] * 10

    msh = m.segment("MSH")
    assert str(msh(1)) == "|" and str(msh(2)) == "^~\\&"
    assert [str(msh(i)) for i in range(3, 8)] == [
        "ORTHANC-AI", "RADIOLOGY", "RIS", "HOSPITAL", "20260102030405+0000"]
    assert str(msh(9)) == "ORU^R01^ORU_R01"
    assert m["MSH.F9.R1.C1"] == "ORU" and m["MSH.F9.R1.C3"] == "ORU_R01"
    control = str(msh(10))
    assert control == hl7_control_id(str(sr.SOPInstanceUID)) and 0 < len(control) <= 20
    assert str(msh(11)) == "P" and str(msh(12)) == "2.5.1"
    assert len(msh) <= 13  # all ASCII: no MSH-18

    pid = m.segment("PID")
    assert str(pid(1)) == "1"
    assert str(pid(3)) == "P-7^^^HOSP_A"
    assert m["PID.F3.R1.C1"] == "P-7" and m["PID.F3.R1.C4"] == "HOSP_A"
    # DICOM family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    assert str(pid(5)) == "DOE^JANE^Q^III^DR"
    assert str(pid(7)) == "19750304" and str(pid(8)) == "F"

    orc = m.segment("ORC")
    assert [str(orc(i)) for i in (1, 2, 3)] == ["RE", "ACC-77", "ACC-77"]

    obr = m.segment("OBR")
    assert [str(obr(i)) for i in (1, 2, 3)] == ["1", "ACC-77", "ACC-77"]
    assert str(obr(4)) == "^XR wrist left"  # the study description: no procedure code
    assert str(obr(7)) == "20251001101500"  # the study's date and time
    assert str(obr(22)) == "20260102030000"  # the SR's content date and time
    assert str(obr(25)) == "P"

    rows = _obx(m)
    assert [r["set"] for r in rows] == [str(i) for i in range(1, 11)]
    assert {r["status"] for r in rows} == {"P"}
    assert {r["time"] for r in rows} == {"20260102030000"}
    finding = [r for r in rows if r["sub"] == "1"]
    assert [(r["type"], r["id"], r["value"], r["units"]) for r in finding] == [
        ("CWE", "72704001^Fracture^SCT", "52101004^Present^SCT", ""),
        ("NM", "122157^Probability^DCM", "0.87", "1^no units^UCUM"),
        ("NM", "118565006^Volume^SCT", "12.5", "mL^milliliter^UCUM"),
        ("CWE", "111049^Qualitative Difference^DCM", "129721008^New finding^SCT", ""),
        ("ST", "121106^Comment^DCM", comparison.describe(), ""),
    ]
    document = [(r["type"], r["id"], r["value"]) for r in rows if r["sub"] == ""]
    assert document == [
        ("ST", "111001^Algorithm Name^DCM", "Tiny test model"),
        ("ST", "111003^Algorithm Version^DCM", "0.0.1"),
        ("ST", "110180^Study Instance UID^DCM", str(sr.StudyInstanceUID)),
        ("ST", "112002^Series Instance UID^DCM", str(sr.SeriesInstanceUID)),
        ("ST", "SRUID^SR SOP Instance UID^99ORTHANCAI", str(sr.SOPInstanceUID)),
    ]


def test_a_negative_finding_is_absent_without_volume_or_change(card):
    sr = _sr(card, [Finding(0.12, 0.5, None)])
    rows = _obx(_parsed(build_oru(sr, CONFIG, now=NOW)))
    assert [(r["type"], r["id"], r["sub"], r["value"]) for r in rows[:2]] == [
        ("CWE", "72704001^Fracture^SCT", "1", "272519000^Absent^SCT"),
        ("NM", "122157^Probability^DCM", "1", "0.12"),
    ]
    assert len(rows) == 2 + 5
    assert not any("118565006" in r["id"] or "111049" in r["id"] for r in rows)


def test_two_findings_are_two_groups_of_obx(card):
    sr = _sr(card, [Finding(0.9, 0.5, None, volume_ml=3.25), Finding(0.2, 0.5, None)])
    rows = _obx(_parsed(build_oru(sr, CONFIG, now=NOW)))
    assert [r["sub"] for r in rows] == ["1", "1", "1", "2", "2", "", "", "", "", ""]
    assert [r["value"] for r in rows if r["sub"] == "2"] == ["272519000^Absent^SCT", "0.2"]


def test_delimiters_in_values_are_escaped(card):
    source = _source(PatientName="O|Brien&Co^Mary~Ann", PatientID="P~1|2",
                     IssuerOfPatientID="HOSP^A&B", AccessionNumber="A|1^2",
                     StudyDescription="XR wrist|left^right & more")
    sr = _sr(card, [Finding(0.2, 0.5, None)], source=source)
    text = str(build_oru(sr, CONFIG, now=NOW))
    pid = next(s for s in text.split("\r") if s.startswith("PID|"))
    assert pid == (r"PID|1||P\R\1\F\2^^^HOSP\S\A\T\B"
                   r"||O\F\Brien\T\Co^Mary\R\Ann||19750304|F")
    m = hl7.parse(text)
    assert [str(s(0)) for s in m][:4] == ["MSH", "PID", "ORC", "OBR"]
    assert len(m.segment("PID")) == 9  # no field was split by a value's '|'
    assert m["PID.F3.R1.C1"] == "P~1|2" and m["PID.F3.R1.C4"] == "HOSP^A&B"
    assert m["PID.F5.R1.C1"] == "O|Brien&Co" and m["PID.F5.R1.C2"] == "Mary~Ann"
    assert m["ORC.F2"] == "A|1^2" and m["OBR.F3"] == "A|1^2"
    assert m["OBR.F4.R1.C2"] == "XR wrist|left^right & more"
    assert len(m.segment("OBR")) == 26


def test_text_outside_ascii_is_utf8_with_msh_18(card):
    sr = _sr(card, [Finding(0.2, 0.5, None)], source=_source(PatientName="Müller^Jürgen"))
    message = build_oru(sr, CONFIG, now=NOW)
    m = _parsed(message)
    assert m["MSH.F18"] == "UNICODE UTF-8"
    assert m["PID.F5.R1.C1"] == "Müller" and m["PID.F5.R1.C2"] == "Jürgen"


def test_configured_applications_may_have_hd_components(card):
    config = _HL7(host="ris", sending_application="AI^1.2.3.4^ISO", receiving_facility="")
    m = _parsed(build_oru(_sr(card, [Finding(0.2, 0.5, None)]), config, now=NOW))
    assert m["MSH.F3.R1.C2"] == "1.2.3.4" and m["MSH.F3.R1.C3"] == "ISO"
    assert str(m.segment("MSH")(6)) == ""


def test_missing_values_leave_fields_empty(card):
    source = _source(AccessionNumber="", PatientBirthDate="", PatientSex="")
    del source.StudyDescription
    del source.IssuerOfPatientID
    m = _parsed(build_oru(_sr(card, [Finding(0.2, 0.5, None)], source=source), CONFIG, now=NOW))
    assert str(m.segment("PID")(3)) == "P-7"
    assert m["PID.F7"] == "" and m["PID.F8"] == ""
    assert m["ORC.F2"] == "" and m["OBR.F2"] == ""
    assert str(m.segment("OBR")(4)) == "tiny-xr^Tiny test model 0.0.1^99ORTHANCAI"  # the model


def _without_algorithm_identification(items) -> None:
    """Drops the TID 4019 Algorithm Name/Version items, as an SR of another vendor may."""
    for item in list(items):
        names = item.get("ConceptNameCodeSequence") or []
        code = names[0].CodeValue if names else ""
        if code in ("111001", "111003"):
            items.remove(item)
        elif "ContentSequence" in item:
            _without_algorithm_identification(item.ContentSequence)


def test_without_tid_4019_the_version_is_the_model_s_of_software_versions(card):
    sr = _sr(card, [Finding(0.7, 0.5, None)])
    assert list(sr.SoftwareVersions)[-1] == "0.0.1"  # [product version, model version]
    _without_algorithm_identification(sr.ContentSequence)
    content = hl7_oru.sr_content(sr)
    assert content.algorithm_version == "0.0.1"
    sr.SoftwareVersions = "3.1"  # single-valued, as most vendors write it
    assert hl7_oru.sr_content(sr).algorithm_version == "3.1"
    sr.Manufacturer, sr.SoftwareVersions = "Other", ["VA20", "2.4"]  # their order, not ours
    assert hl7_oru.sr_content(sr).algorithm_version == "VA20, 2.4"


def test_the_control_id_is_derived_from_the_sr(card):
    sr = _sr(card, [Finding(0.7, 0.5, None)])
    first = _parsed(build_oru(sr, CONFIG, now=NOW))
    later = _parsed(build_oru(sr, CONFIG, now=NOW + dt.timedelta(hours=5)))
    assert first["MSH.F10"] == later["MSH.F10"] == hl7_control_id(str(sr.SOPInstanceUID))
    assert first["MSH.F7"] != later["MSH.F7"]
    assert len(str(first["MSH.F10"])) == 20 and str(first["MSH.F10"]).isalnum()
    other = _sr(card, [Finding(0.7, 0.5, None)], source=_source(SOPInstanceUID="1.2.3.999"))
    assert _parsed(build_oru(other, CONFIG, now=NOW))["MSH.F10"] != first["MSH.F10"]


def test_an_instance_that_is_not_our_sr_is_refused(card):
    with pytest.raises(BadInput):
        hl7_oru.read_sr(b"not dicom")
    image = io.BytesIO()
    _source().save_as(image, enforce_file_format=True)
    with pytest.raises(BadInput, match="not a structured report"):
        hl7_oru.read_sr(image.getvalue())


def test_keys_and_destinations():
    key = hl7_key("ris.example", 2575, "1.2.3")
    assert key == "hl7:ris.example:2575:1.2.3"

    class J:  # hl7_destination_of reads the key only
        pass

    j = J()
    j.key = key
    assert hl7_destination_of(j) == ("ris.example", 2575, "1.2.3")
    j.key = hl7_key("fd00::1", 7, "1.2")
    assert hl7_destination_of(j) == ("fd00::1", 7, "1.2")


# --------------------------------------------------------------------------
# The ACK


def _message(card) -> hl7.Message:
    return build_oru(_sr(card, [Finding(0.7, 0.5, None)]), CONFIG, now=NOW)


def _ack(message: hl7.Message, code: str, text: str = "", control: str | None = None) -> str:
    ack = message.create_ack(code, message_id="ACK1")
    if text:
        ack.segment("MSA").assign_field(ack.escape(text), 3)
    if control is not None:
        ack.segment("MSA").assign_field(control, 2)
    return str(ack)


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_an_accepting_ack_is_done(card, code):
    message = _message(card)
    control = str(message.segment("MSH")(10))
    ack = parse_ack(_ack(message, code))
    assert ack == Ack(code, control, "")
    assert check_ack(ack, control) is ack


@pytest.mark.parametrize("code", ["AE", "CE"])
def test_an_error_ack_is_retried(card, code):
    message = _message(card)
    control = str(message.segment("MSH")(10))
    with pytest.raises(TransientError, match=f"answered {code}.*withheld"):
        check_ack(parse_ack(_ack(message, code, "database busy")), control)


@pytest.mark.parametrize("code", ["AR", "CR"])
def test_a_rejecting_ack_fails_for_good_without_quoting_its_text(card, code):
    message = _message(card)
    control = str(message.segment("MSH")(10))
    text = "unknown order | " + "x" * 200
    ack = parse_ack(_ack(message, code, text))
    assert len(ack.text) == hl7_oru.REASON_TEXT and ack.text.startswith("unknown order | x")
    with pytest.raises(BadInput) as raised:
        check_ack(ack, control)
    assert raised.value.reason == (f"the RIS rejected message {control} ({code}) (its text "
                                   "is withheld: it may quote patient data)")
    assert not isinstance(raised.value, TransientError)


def test_an_ack_of_another_message_or_no_ack_is_retried(card):
    message = _message(card)
    control = str(message.segment("MSH")(10))
    with pytest.raises(TransientError, match="another message"):
        check_ack(parse_ack(_ack(message, "AA", control="SOMETHINGELSE")), control)
    with pytest.raises(TransientError, match="unknown acknowledgment code"):
        check_ack(parse_ack(_ack(message, "ZZ")), control)
    for garbage in ("", "hello", "MSH|^~\\&|RIS\rPID|1\r"):
        with pytest.raises(TransientError, match="not an HL7 ACK"):
            parse_ack(garbage)


# --------------------------------------------------------------------------
# MLLP against a real listener


def test_send_over_mllp(card):
    message = _message(card)
    control = str(message.segment("MSH")(10))
    with MllpListener(text="try later") as ris:
        ack = parse_ack(send(ris.host, ris.port, message, 5))
        assert (ack.code, ack.control_id) == ("AA", control)
        received, = ris.messages
        assert str(received) == str(message)  # byte for byte what was built
        ris.answer("AE", "AR", SILENT)
        assert parse_ack(send(ris.host, ris.port, message, 5)) == Ack("AE", control, "try later")
        assert parse_ack(send(ris.host, ris.port, message, 5)).code == "AR"
        with pytest.raises(TransientError, match="no ACK within 0.5 s"):
            send(ris.host, ris.port, message, 0.5)
        assert ris.control_ids() == [control] * 4
    with pytest.raises(TransientError, match="connection refused"):
        send(ris.host, ris.port, message, 5)
    ris.start()  # the same port again
    try:
        assert parse_ack(send(ris.host, ris.port, message, 5)).code == "AA"
    finally:
        ris.stop()


# --------------------------------------------------------------------------
# The sink and its job, in the pipeline (fake Orthanc, in-memory store)


@pytest.fixture
def world(tmp_path):
    ris = MllpListener().start()
    folder = tmp_path / "models" / "tiny"
    write_card(folder, card_json())
    (folder / "model.keras").write_bytes(b"")
    config = parse_ai_section({
        "ModelsDirectory": str(tmp_path / "models"),
        "HL7": {"Host": ris.host, "Port": ris.port, "RetryBackoffSeconds": 0,
                "MaxAttempts": 4, "TimeoutSeconds": 2}})
    registry = Registry.scan(config.models_directory)
    orthanc, store = FakeOrthanc(), SqliteJobStore(":memory:")
    ctx = Context(config=config, source=orthanc, store=store, backend=FakeBackend(),
                  registry=registry, router=config.router(registry.cards), sinks=[],
                  metrics=WorkerMetrics(CollectorRegistry()), owner="node-a/100")
    ctx.sinks = [OrthancStoreSink(orthanc, store), hl7_oru.Hl7OruSink(ctx)]
    worker = Worker(ctx, follow_changes=False, wake=threading.Event(), stop=threading.Event())

    def run(ds) -> list:
        store.push_inbox([(InboxKind.INSTANCE, orthanc.add(ds))])
        while worker.step():
            pass
        return store.list(kind=JobKind.HL7.value)

    yield ris, orthanc, store, run
    ris.stop()


def test_one_message_per_sr_accepted(world):
    ris, orthanc, store, run = world
    job, = run(synthetic_dx(11, fracture=True))
    sr, = orthanc.srs()
    control = hl7_control_id(str(sr.SOPInstanceUID))
    assert job.state == JobState.DONE and job.attempts == 1
    assert job.result["control_id"] == control and job.result["ack"] == "AA"
    assert job.result["delivered"] and job.result["destination"] == f"{ris.host}:{ris.port}"
    assert job.key == hl7_key(ris.host, ris.port, str(sr.SOPInstanceUID))
    assert ris.control_ids() == [control]
    analysis, = store.list()
    assert analysis.result["hl7"] == "queued"
    entry, = deliveries([job])
    assert entry["kind"] == "hl7" and entry["destination"] == f"HL7 {ris.host}:{ris.port}"
    assert entry["control_id"] == control and entry["ack"] == "AA"
    assert entry["sr_sop_instance_uid"] == str(sr.SOPInstanceUID)


def test_error_acks_are_retried_and_a_reject_fails_for_good(world):
    ris, orthanc, store, run = world
    ris.answer("AE", "AE")
    job, = run(synthetic_dx(12, fracture=False))
    assert job.state == JobState.DONE and job.attempts == 3
    assert len(ris.messages) == 3 and len(set(ris.control_ids())) == 1

    ris.answer("AR")
    ris.text = "no such order"
    jobs = run(synthetic_dx(13, fracture=True))
    rejected = next(j for j in jobs if j.id != job.id)
    assert rejected.state == JobState.FAILED and rejected.not_before == 0  # for good
    assert rejected.attempts == 1
    assert rejected.reason.endswith("(AR) (its text is withheld: it may quote patient data)")
    assert "no such order" not in rejected.reason
    assert "TEST13" not in rejected.reason  # no patient data

    ris.default = "AE"
    jobs = run(synthetic_dx(14, fracture=True))
    dead = next(j for j in jobs if j.id not in (job.id, rejected.id))
    assert dead.state == JobState.DEAD and dead.attempts == 4
