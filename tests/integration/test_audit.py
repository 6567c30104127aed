"""The audit trail against a real Orthanc: C-STORE in, ATNA messages out to a real
syslog collector (TCP and TLS), none lost while it is down, the chain verifies."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest

from engine.audit import log_path
from engine.audit.log import AuditLog, verify
from engine.standins.audit_repository import Syslog, SyslogReceiver
from tests.factories import synthetic_dx
from tests.harness import OrthancAI, write_config

ORTHANC_AI = str(Path(sys.executable).parent / "orthanc-ai")


def event(msg: Syslog) -> tuple[str, str]:
    root = ET.fromstring(msg.xml)
    ev = root.find("EventIdentification")
    types = [t.get("csd-code") for t in ev.findall("EventTypeCode")]
    return ev.find("EventID").get("csd-code"), types[0] if types else ""


def studies(msg: Syslog) -> set[str]:
    root = ET.fromstring(msg.xml)
    return {o.get("ParticipantObjectID") for o in root.findall(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']")}


def has(got: list[Syslog], code: str, study: str | None = None, kind: str = "") -> bool:
    return any(event(g)[0] == code and (not kind or event(g)[1] == kind)
               and (study is None or study in studies(g)) for g in got)


def dx(folder: Path, seed: int) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    ds = synthetic_dx(seed, fracture=False, age=40.0, sex="F")
    path = folder / f"{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def send(server: OrthancAI, path: Path) -> None:
    server.storescu([path])
    instance = server.lookup(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    jobs = server.wait_jobs([instance])
    assert all(j["state"] == "done" for j in jobs), jobs


def audit_config(tmp_path: Path, receiver: SyslogReceiver) -> Path:
    audit = {"Host": "127.0.0.1", "Port": receiver.port, "Transport": receiver.transport,
             "RetryBackoffSeconds": 0.2, "MaxBackoffSeconds": 1.0}
    if receiver.transport == "tls":
        audit["CaFile"] = receiver.ca_file
    return write_config(tmp_path / "orthanc.json", Audit=audit)


def test_atna_messages_reach_the_collector_none_lost_while_it_is_down(tmp_path):
    receiver = SyslogReceiver("tcp").start()
    server = OrthancAI(tmp_path / "data", config=audit_config(tmp_path, receiver))
    try:
        server.start()
        receiver.wait_for(lambda got: has(got, "110100", kind="110120"), timeout=60)
        first, study1 = dx(tmp_path / "dx", 21)
        send(server, first)
        got = receiver.wait_for(lambda got: has(got, "110103", study1)
                                and has(got, "110104", study1), timeout=60)
        assert has(got, "110102", study1)  # Begin Transferring the SR
        for g in got:
            assert (g.facility, g.app_name, g.msgid) == (10, "orthanc-ai", "IHE+RFC-3881")
        # The collector goes down: what happens meanwhile is kept and sent later.
        receiver.stop()
        second, study2 = dx(tmp_path / "dx", 22)
        send(server, second)
        before = len(receiver.parsed())
        receiver.start()
        got = receiver.wait_for(lambda got: has(got, "110103", study2)
                                and has(got, "110104", study2), timeout=60)
        assert len(got) > before
        assert server.stop() == 0
        got = receiver.wait_for(lambda got: has(got, "110100", kind="110121"), timeout=30)
    finally:
        server.stop()
        receiver.stop()
    path = log_path(tmp_path / "data" / "orthanc-db")
    verdict = verify(path)
    assert verdict.ok
    # Every entry of the local log reached the collector.
    logged = [e.xml for e in AuditLog(path).entries()]
    assert len(logged) == verdict.entries
    assert set(logged) <= {g.xml for g in got}
    worker_logs = "".join(p.read_text() for p in path.parent.glob("worker-*.log"))
    assert "lacks" not in worker_logs + server.log_tail(1000)  # every message was valid
    out = subprocess.run([ORTHANC_AI, "audit", "verify", "--data", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("transport", ["tls"])
def test_atna_over_tls(tmp_path, transport):
    receiver = SyslogReceiver(transport, tmp_path / "certs").start()
    server = OrthancAI(tmp_path / "data", config=audit_config(tmp_path, receiver))
    try:
        server.start()
        path, study = dx(tmp_path / "dx", 23)
        send(server, path)
        receiver.wait_for(lambda got: has(got, "110100", kind="110120")
                          and has(got, "110103", study) and has(got, "110104", study),
                          timeout=60)
        assert server.stop() == 0
        receiver.wait_for(lambda got: has(got, "110100", kind="110121"), timeout=30)
        assert not receiver.errors
    finally:
        server.stop()
        receiver.stop()
