"""The audit trail: PS3.15 A.5 messages, the hash-chained log, `audit verify`, syslog."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.audit import Audit, log_path
from engine.audit import messages as m
from engine.audit.log import AuditLog, Entry, verify
from engine.audit.syslog import Forwarder, format_message, frame, parse_frames
from engine.standins.audit_repository import SyslogReceiver, parse_syslog
from inference.version import __version__

ORTHANC_AI = str(Path(sys.executable).parent / "orthanc-ai")
DX = "1.2.840.10008.5.1.4.1.1.1.1"
STUDY = "1.2.826.0.1.3680043.8.498.1"


def settings(port: int, transport: str = "tcp", ca: str = "", **kw) -> SimpleNamespace:
    base = {"host": "127.0.0.1", "port": port, "transport": transport, "ca_file": ca,
            "cert_file": "", "key_file": "", "timeout_seconds": 5.0,
            "retry_backoff_seconds": 0.1, "max_backoff_seconds": 0.5}
    return SimpleNamespace(**{**base, **kw})


def recorder(tmp_path: Path) -> tuple[Audit, AuditLog]:
    audit_log = AuditLog(tmp_path / "audit.log")
    return Audit(audit_log, source_id="node-1:8042", aet="ORTHANC_AI", host="ai.example"), \
        audit_log


def all_events(audit: Audit) -> None:
    us, pacs = audit.us(), audit.peer("PACS", "10.0.0.5")
    audit.application(True, launcher="orthanc")
    audit.instances_accessed(STUDY, "P123", {DX: 1})
    audit.query("PACS", "10.0.0.5", "Study", {"PatientID": "P123", "StudyDate": ""})
    audit.begin_transfer(pacs, us, STUDY, "P123", instances=3)
    audit.transferred(pacs, us, STUDY, "P123", instances=3, action="C")
    audit.transferred(us, pacs, STUDY, "P123", sop_classes={"1.2.840.10008.5.1.4.1.1.88.33": 1})
    audit.data_export("RIS", "ris.example", "P123", study_uids=[STUDY],
                      detail={"MSH-10": "ABC1"})
    audit.security_alert("restricted-function", "/ai/jobs/1/retry", "not an administrator",
                         user="alice", user_host="10.0.0.9")
    audit.application(False)


# -- messages ---------------------------------------------------------------------------

def test_every_event_type_has_what_the_standard_requires(tmp_path):
    audit, audit_log = recorder(tmp_path)
    all_events(audit)
    entries = list(audit_log.entries())
    assert [e.record["event"] for e in entries] == [
        "110100", "110103", "110112", "110102", "110104", "110104", "110106", "110113",
        "110100"]
    assert audit.invalid == 0
    for e in entries:
        assert m.validate(ET.fromstring(e.xml)) == [], e.xml


def test_messages_carry_the_participants_and_objects(tmp_path):
    audit, audit_log = recorder(tmp_path)
    all_events(audit)
    by = {}
    for e in audit_log.entries():
        by.setdefault(e.record["event"], []).append(ET.fromstring(e.xml))
    start = by["110100"][0]
    assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert by["110100"][1].find("EventIdentification/EventTypeCode").get("csd-code") == \
        "110121"
    assert start.find("AuditSourceIdentification").get("AuditSourceID") == "node-1:8042"
    app = start.find("ActiveParticipant/RoleIDCode[@csd-code='110150']/..")
    assert app.get("UserName") == f"orthanc-ai {__version__} pid {os.getpid()}"
    accessed = by["110103"][0]
    study = accessed.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']")
    assert study.get("ParticipantObjectID") == STUDY
    assert study.get("ParticipantObjectTypeCodeRole") == "3"
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert study.find("SOPClass").attrib == {"UID": DX, "NumberOfInstances": "1"}
    patient = accessed.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']")
    assert patient.get("ParticipantObjectID") == "P123"
    assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
    query = by["110112"][0]
    roles = {p.find("RoleIDCode").get("csd-code"): p
             for p in query.findall("ActiveParticipant")}
    assert roles["110153"].get("UserID") == "ORTHANC_AI"
    assert roles["110153"].get("UserIsRequestor") == "true"
    assert roles["110152"].get("UserID") == "PACS"
    assert roles["110152"].get("NetworkAccessPointID") == "10.0.0.5"
    assert roles["110152"].get("NetworkAccessPointTypeCode") == "2"
    sent = json.loads(base64.b64decode(query.findtext(
        "ParticipantObjectIdentification/ParticipantObjectQuery")))
    assert sent == {"QueryRetrieveLevel": "Study", "PatientID": "P123", "StudyDate": ""}
    alert = by["110113"][0]
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110132"
    users = [p.get("UserID") for p in alert.findall("ActiveParticipant")]
    assert "alice" in users
    outcomes = {e: x[0].find("EventIdentification").get("EventOutcomeIndicator")
                for e, x in by.items()}
    assert outcomes["110113"] == "4" and outcomes["110103"] == "0"


def test_the_validator_names_what_is_missing():
    msg = m.instances_accessed(m.Participant("AE", True), "src", [m.Study(STUDY, {DX: 1})],
                               "P1")
    assert m.validate(msg) == []
    for el in msg.findall("ParticipantObjectIdentification"):
        if el.get("ParticipantObjectTypeCode") == "1":
            msg.remove(el)
    assert any("Patient" in e for e in m.validate(msg))
    start = m.application_activity(True, m.Participant("AE", False), "src")
    start.find("EventIdentification").remove(start.find("EventIdentification/EventTypeCode"))
    assert any("110120" in e for e in m.validate(start))
    q = m.query(m.Participant("AE", True), m.Participant("PACS", False), "src",
                "1.2.840.10008.5.1.4.1.2.2.1", b"{}")
    q.find("EventIdentification").set("EventOutcomeIndicator", "3")
    assert any("EventOutcomeIndicator" in e for e in m.validate(q))


def test_recording_never_raises(tmp_path):
    (tmp_path / "f").write_text("")
    audit = Audit(AuditLog(tmp_path / "f" / "audit.log"))  # a file where a folder should be
    assert audit.instances_accessed(STUDY, "P", {DX: 1}) is None
    assert Audit().query("PACS", "", "Study", {}) is None  # the null port


def test_the_plugin_side_imports_only_the_standard_library():
    code = ("import sys, engine.audit, engine.audit.syslog, engine.audit.log;"
            "heavy = {'pydicom', 'numpy', 'tensorflow', 'highdicom', 'pydantic'};"
            "print(sorted({k.split('.')[0] for k in sys.modules} & heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# -- the chain and `audit verify` ------------------------------------------------------

def _data_dir(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    data = tmp_path / "data"
    path = log_path(data / "orthanc-db")
    audit = Audit(AuditLog(path))
    for i in range(n):
        audit.instances_accessed(f"{STUDY}.{i}", f"P{i}", {DX: 1})
    return data, path


def _verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ORTHANC_AI, "audit", "verify", *args], capture_output=True,
                          text=True, timeout=60)


def test_sequence_numbers_and_hashes_chain(tmp_path):
    _, path = _data_dir(tmp_path, 3)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3]
    assert lines[0]["prev"] == "0" * 64
    assert lines[1]["prev"] == lines[0]["hash"] and lines[2]["prev"] == lines[1]["hash"]
    assert verify(path).ok


def test_verify_exits_0_on_an_intact_chain(tmp_path):
    data, _ = _data_dir(tmp_path)
    out = _verify("--data", str(data))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 entries" in out.stdout


def _rewrite(path: Path, change) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


def _tamper(lines: list[str]) -> list[str]:
    entry = json.loads(lines[3])
    entry["xml"] = entry["xml"].replace("P3", "P9")
    lines[3] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    return lines


@pytest.mark.parametrize("change, first_bad", [
    (_tamper, 4),
    (lambda lines: lines[:2] + lines[3:], 3),  # entry 3 deleted
    (lambda lines: lines[:2] + [lines[3], lines[2]] + lines[4:], 3),  # 3 and 4 swapped
    (lambda lines: lines[:-1], None),  # the last entry cut off: not detectable by the chain
])
def test_verify_names_the_first_altered_or_missing_entry(tmp_path, change, first_bad):
    data, path = _data_dir(tmp_path)
    _rewrite(path, change)
    out = _verify("--data", str(data))
    if first_bad is None:
        assert out.returncode == 0
        return
    assert out.returncode != 0
    assert f"sequence number {first_bad}" in out.stdout, out.stdout


def test_a_rehashed_forgery_still_breaks_at_the_next_entry(tmp_path):
    data, path = _data_dir(tmp_path)
    from engine.audit.log import entry_hash

    def forge(lines):
        entry = json.loads(lines[1])
        entry["xml"] = entry["xml"].replace("P1", "P7")
        entry["hash"] = entry_hash(entry)
        lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        return lines

    _rewrite(path, forge)
    out = _verify("--data", str(data))
    assert out.returncode != 0 and "sequence number 3" in out.stdout


def test_verify_by_configuration(tmp_path):
    path = log_path(tmp_path / "etc" / "db")
    Audit(AuditLog(path)).application(True)
    config = tmp_path / "etc" / "orthanc.json"
    config.write_text('{"StorageDirectory": "db" // relative to the file\n}')
    out = _verify("--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_torn_last_line_is_cut_off_and_the_chain_goes_on(tmp_path):
    audit, audit_log = recorder(tmp_path)
    audit.application(True)
    with open(audit_log.path, "ab") as f:
        f.write(b'{"seq":2,"trunc')
    audit.application(False)
    assert [e.seq for e in audit_log.entries()] == [1, 2]
    assert verify(audit_log.path).ok


def test_several_processes_append_one_chain(tmp_path):
    path = tmp_path / "audit.log"
    code = ("import sys; from engine.audit import Audit; from engine.audit.log import AuditLog;"
            f"a = Audit(AuditLog({str(path)!r}));"
            "[a.instances_accessed('1.2.3', 'P', {'1.2': 1}) for _ in range(40)]")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert all(p.wait(60) == 0 for p in procs)
    verdict = verify(path)
    assert verdict.ok and verdict.entries == 160


# -- syslog --------------------------------------------------------------------------------

def test_octet_counting_frames():
    framed = frame(b"<85>1 a") + frame("<85>1 é".encode())
    assert framed.startswith(b"7 <85>1 a")
    messages, rest = parse_frames(framed + b"12 <85")
    assert messages == [b"<85>1 a", "<85>1 é".encode()] and rest == b"12 <85"


def test_rfc5424_header(tmp_path):
    entry = Entry(1, 0, 10, {"seq": 1, "time": "2026-01-02T03:04:05.006Z", "outcome": 8,
                             "event": "110112", "xml": "<AuditMessage/>"})
    msg = parse_syslog(format_message(entry, "ai.example", "123"))
    assert (msg.facility, msg.severity) == (10, 3)
    assert (msg.timestamp, msg.hostname, msg.app_name, msg.procid, msg.msgid,
            msg.structured_data) == ("2026-01-02T03:04:05.006Z", "ai.example", "orthanc-ai",
                                     "123", "IHE+RFC-3881", "-")
    assert msg.xml == "<AuditMessage/>"


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_forwarder_ships_every_entry_once_even_across_a_collector_outage(tmp_path, transport):
    receiver = SyslogReceiver(transport, tmp_path / "certs").start()
    audit_log = AuditLog(tmp_path / "audit.log")
    fwd = Forwarder(audit_log, settings(receiver.port, transport, receiver.ca_file),
                    "ai.example", idle_seconds=0.1).start()
    audit = Audit(audit_log, forwarder=fwd)
    try:
        for i in range(3):
            audit.instances_accessed(f"{STUDY}.{i}", "P", {DX: 1})
            time.sleep(0.2)  # one pass each
        receiver.wait_for(lambda got: len(got) == 3)
        assert receiver.connections == 1  # one connection kept open, TLS too
        receiver.stop()
        time.sleep(0.3)
        for i in range(3, 6):
            audit.instances_accessed(f"{STUDY}.{i}", "P", {DX: 1})
        time.sleep(0.5)
        receiver.start()
        got = receiver.wait_for(lambda got: len(got) >= 6)
        time.sleep(0.5)
        got = receiver.parsed()
        studies = [ET.fromstring(g.xml).find("ParticipantObjectIdentification")
                   .get("ParticipantObjectID") for g in got]
        assert studies == [f"{STUDY}.{i}" for i in range(6)]
        assert fwd.cursor.read()[0] == 6
    finally:
        audit.close(1.0)
        receiver.stop()


def test_the_cursor_survives_a_restart_and_one_sender_at_a_time(tmp_path):
    receiver = SyslogReceiver("tcp").start()
    audit_log = AuditLog(tmp_path / "audit.log")
    audit = Audit(audit_log)
    for i in range(4):
        audit.instances_accessed(f"{STUDY}.{i}", "P", {DX: 1})
    s = settings(receiver.port)
    try:
        first = Forwarder(audit_log, s, "h")
        assert first.forward_once() == 4
        first.conn.close()
        audit.application(False)
        second, third = Forwarder(audit_log, s, "h"), Forwarder(audit_log, s, "h")
        import fcntl
        import os

        fd = os.open(second.lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" is sending
        assert third.forward_once() == 0
        os.close(fd)
        assert second.forward_once() == 1
        receiver.wait_for(lambda got: len(got) == 5)
        second.conn.close()
    finally:
        receiver.stop()


def test_tls_with_a_client_certificate(tmp_path):
    receiver = SyslogReceiver("tls", tmp_path / "certs", require_client_cert=True).start()
    f = receiver.files
    audit_log = AuditLog(tmp_path / "audit.log")
    Audit(audit_log).application(True)
    try:
        fwd = Forwarder(audit_log, settings(receiver.port, "tls", str(f["ca"]),
                                            cert_file=str(f["client_cert"]),
                                            key_file=str(f["client_key"])), "h")
        assert fwd.forward_once() == 1
        receiver.wait_for(lambda got: len(got) == 1)
        fwd.conn.close()
    finally:
        receiver.stop()


def test_tls_refuses_a_collector_it_does_not_trust(tmp_path):
    receiver = SyslogReceiver("tls", tmp_path / "certs").start()
    audit_log = AuditLog(tmp_path / "audit.log")
    Audit(audit_log).application(True)
    try:
        fwd = Forwarder(audit_log, settings(receiver.port, "tls", ""), "h")
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            fwd.forward_once()
        assert fwd.cursor.read()[0] == 0
    finally:
        receiver.stop()


# -- the plugin ----------------------------------------------------------------------------

def _install(tmp_path, monkeypatch, ai: dict):
    import importlib

    from tests.orthanc_stub import StrictOrthanc

    stub = StrictOrthanc({"StorageDirectory": str(tmp_path / "db"), "HttpPort": 1,
                          "DicomAet": "OUR_AE", "AI": ai})
    monkeypatch.setitem(sys.modules, "orthanc", stub)
    monkeypatch.delitem(sys.modules, "plugin.adapter", raising=False)
    adapter = importlib.import_module("plugin.adapter")
    return adapter


def test_a_refused_configuration_is_a_security_alert(tmp_path, monkeypatch):
    from engine.config import ConfigError

    adapter = _install(tmp_path, monkeypatch, {"Workers": "two"})
    with pytest.raises(ConfigError):
        adapter.install()
    entries = list(AuditLog(log_path(tmp_path / "db")).entries())
    assert [e.record["event"] for e in entries] == ["110113"]
    alert = ET.fromstring(entries[0].xml)
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110131"
    assert m.validate(alert) == []


def test_the_plugin_opens_the_trail_for_its_filter(tmp_path, monkeypatch):
    from engine import audit

    adapter = _install(tmp_path, monkeypatch, {"ModelsDirectory": str(tmp_path)})
    adapter.install()
    try:
        assert audit.current() is adapter._plugin.audit
        audit.current().security_alert("restricted-function", "/ai/jobs/1/retry",
                                       "not in AI.Administrators", user="bob",
                                       user_host="10.1.2.3")
        entries = list(AuditLog(log_path(tmp_path / "db")).entries())
        assert entries[-1].record["event"] == "110113"
        assert 'UserID="bob"' in entries[-1].xml and 'UserID="OUR_AE"' in entries[-1].xml
    finally:
        audit.set_current(audit.null())


# -- the DICOM port records what it does -------------------------------------------------------

class _Orthanc:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def call(self, method, path, body=None, timeout=None):
        if self.fail and path.startswith("/modalities/"):
            return 500, {"Message": "peer down"}
        if path.endswith("/query"):
            return 200, {"ID": "q1"}
        if path.startswith("/queries/"):
            return 200, []
        if path.endswith("/move"):
            return 200, {}
        if path == "/tools/lookup":
            return 200, [{"Type": "Study", "ID": "s1"}]
        if path == "/studies/s1":
            return 200, {"ID": "s1", "PatientMainDicomTags": {"PatientID": "P77"}}
        if path == "/studies/s1/statistics":
            return 200, {"CountInstances": 2}
        if path.endswith("/tags?simplify"):
            return 200, {"StudyInstanceUID": STUDY, "PatientID": "P77",
                         "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"}
        if path.endswith("/store"):
            return 200, {"FailedInstancesCount": 0}
        return 404, {}

    def get_json(self, path):
        return {"DicomAet": "OUR_AE"}


@pytest.mark.parametrize("fail", [False, True])
def test_queries_retrieves_and_stores_are_audited(tmp_path, fail):
    from engine.dimse import OrthancDimse, PeerError

    audit, audit_log = recorder(tmp_path)
    config = {"DicomModalities": {"pacs": {"AET": "PACS_AE", "Host": "10.0.0.5", "Port": 104}}}
    dimse = OrthancDimse(_Orthanc(fail), config, audit=audit)
    for call in (lambda: dimse.find("pacs", "Study", {"PatientID": "P77"}, 5),
                 lambda: dimse.retrieve_study("pacs", STUDY, "C-MOVE", 5),
                 lambda: dimse.store("pacs", ["i1"], 5)):
        if fail:
            with pytest.raises(PeerError):
                call()
        else:
            call()
    entries = list(audit_log.entries())
    assert [e.record["event"] for e in entries] == ["110112", "110102", "110104", "110102",
                                                    "110104"]
    assert [e.outcome for e in entries] == ([8, 0, 8, 0, 8] if fail else [0] * 5)
    for e in entries:
        assert m.validate(ET.fromstring(e.xml)) == []
        assert 'UserID="PACS_AE"' in e.xml and 'NetworkAccessPointID="10.0.0.5"' in e.xml
        assert "P77" in e.xml
    assert STUDY in entries[2].xml and STUDY in entries[4].xml
    if not fail:
        assert 'NumberOfInstances="2"' in entries[2].xml


def test_closing_with_the_collector_down_gives_up_in_time(tmp_path):
    from tests.harness import free_port

    audit_log = AuditLog(tmp_path / "audit.log")
    fwd = Forwarder(audit_log, settings(free_port()), "h").start()
    audit = Audit(audit_log, forwarder=fwd)
    audit.application(False)
    t0 = time.monotonic()
    assert audit.close(flush_seconds=0.5) is False
    assert time.monotonic() - t0 < 3
    assert fwd.cursor.read()[0] == 0 and verify(audit_log.path).ok  # kept for the next start
