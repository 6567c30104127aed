"""Results to the RIS: one ORU^R01 per SR over MLLP, against a real listener.

One orthanc-ai node with ``AI.HL7`` pointing at an MLLP listener on
loopback (tests/mllp.py, python-hl7's asyncio server). Each scenario C-STOREs
a DX of its own patient and follows the SR's HL7 delivery at /ai/deliveries.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from engine.deliveries import hl7_control_id
from engine.standins.ris import MllpListener
from tests.factories import patient_study_dx
from tests.harness import OrthancAI, write_config


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hl7")
    ris = MllpListener(text="not today").start()
    config = write_config(tmp / "ai.json", HL7={
        "Host": ris.host, "Port": ris.port, "SendingApplication": "ORTHANC-AI",
        "SendingFacility": "RADIOLOGY", "ReceivingApplication": "RIS",
        "ReceivingFacility": "HOSPITAL", "TimeoutSeconds": 3, "MaxAttempts": 40,
        "RetryBackoffSeconds": 0.2, "MaxBackoffSeconds": 0.5})
    ai = OrthancAI(tmp / "ai", config=config)
    try:
        ai.start()
        yield {"ai": ai, "ris": ris, "tmp": tmp}
    finally:
        ai.stop()
        ris.stop()


def send_dx(net: dict[str, Any], patient: str) -> str:
    """C-STORE a DX of ``patient``; the Orthanc ID of its SR, once the analysis is done."""
    ds = patient_study_dx(patient, "20251001", fracture=True, accession=f"ACC-{patient}")
    path = net["tmp"] / f"{patient}.dcm"
    ds.save_as(path, enforce_file_format=True)
    ai: OrthancAI = net["ai"]
    ai.storescu([path])
    deadline = time.time() + 120
    while (instance := ai.lookup(str(ds.SOPInstanceUID))) is None:
        assert time.time() < deadline, ai.log_tail()
        time.sleep(0.2)
    jobs = [j for j in ai.wait_jobs([instance], timeout=180) if j["model"]]
    assert len(jobs) == 1 and jobs[0]["state"] == "done", jobs
    assert jobs[0]["result"]["hl7"] == "queued"
    return jobs[0]["result"]["sr_instance"]


def delivery(ai: OrthancAI, sr_instance: str, until=None, timeout: float = 90) -> dict[str, Any]:
    """The SR's HL7 delivery at /ai/deliveries, once ``until(it)`` (default: settled)."""
    def settled(d: dict[str, Any]) -> bool:
        return d["state"] in ("done", "dead", "skipped") or \
            (d["state"] == "failed" and not d["next_attempt"])

    until = until or settled
    deadline = time.time() + timeout
    while True:
        found = [d for d in ai.get("/ai/deliveries?limit=10000")
                 if d["sr_instance"] == sr_instance and d["kind"] == "hl7"]
        assert len(found) <= 1, found
        if found and until(found[0]):
            return found[0]
        assert time.time() < deadline, f"{found}\n{ai.log_tail()}"
        time.sleep(0.2)


def sr_uid(ai: OrthancAI, sr_instance: str) -> str:
    return ai.get(f"/instances/{sr_instance}/simplified-tags")["SOPInstanceUID"]


def test_one_oru_per_sr_is_accepted(net):
    ai, ris = net["ai"], net["ris"]
    sr = send_dx(net, "HL7-AA")
    d = delivery(ai, sr)
    uid = sr_uid(ai, sr)
    control = hl7_control_id(uid)
    assert d["state"] == "done" and d["attempts"] == 1, d
    assert d["destination"] == f"HL7 {ris.host}:{ris.port}"
    assert (d["sr_sop_instance_uid"], d["control_id"], d["ack"]) == (uid, control, "AA")
    assert d["delivered"]
    job = ai.get(f"/ai/jobs/{d['id']}")
    assert job["kind"] == "hl7" and job["result"]["control_id"] == control
    assert job["result"]["ack"] == "AA"

    message, = [m for m in ris.messages if str(m["MSH.F10"]) == control]
    assert m_str(message, "MSH.F9") == "ORU^R01^ORU_R01" and m_str(message, "MSH.F12") == "2.5.1"
    assert message["MSH.F3"] == "ORTHANC-AI" and message["MSH.F6"] == "HOSPITAL"
    assert message["PID.F3.R1.C1"] == "HL7-AA"
    assert message["PID.F5.R1.C1"] == "PRIOR" and message["PID.F5.R1.C2"] == "HL7-AA"
    assert message["ORC.F1"] == "RE" and message["ORC.F2"] == "ACC-HL7-AA"
    assert message["OBR.F3"] == "ACC-HL7-AA" and message["OBR.F25"] == "P"
    obx = {m_str(s, 3): s for s in message.segments("OBX")}
    finding = next(s for s in message.segments("OBX") if str(s(4)) == "1")
    assert str(finding(2)) == "CWE" and m_str(finding, 5).split("^")[1] in ("Present", "Absent")
    assert str(obx["122157^Probability^DCM"](2)) == "NM"
    assert str(obx["SRUID^SR SOP Instance UID^99ORTHANCAI"](5)) == uid
    assert {str(s(11)) for s in message.segments("OBX")} == {"P"}

    # /ai/deliveries lists HL7 and forward deliveries, each with its kind
    assert [x["id"] for x in ai.get("/ai/deliveries?kind=hl7")] == \
        [x["id"] for x in ai.get("/ai/deliveries") if x["kind"] == "hl7"]
    assert ai.get("/ai/deliveries?kind=forward") == []
    with pytest.raises(requests.HTTPError):
        ai.get("/ai/deliveries?kind=analysis")


def m_str(container: Any, key: Any) -> str:
    """A field as it was sent (its components joined)."""
    if isinstance(key, int):
        return str(container(key))
    segment, _, number = key.partition(".F")
    return str(container.segment(segment)(int(number)))


def test_error_acks_are_retried_until_accepted(net):
    ai, ris = net["ai"], net["ris"]
    ris.answer("AE", "AE")
    sr = send_dx(net, "HL7-AE")
    d = delivery(ai, sr)
    assert d["state"] == "done" and d["attempts"] == 3 and d["ack"] == "AA", d
    assert ris.control_ids().count(d["control_id"]) == 3  # the same message each time


def test_a_reject_fails_for_good_with_the_reason(net):
    ai, ris = net["ai"], net["ris"]
    ris.answer("AR")
    sr = send_dx(net, "HL7-AR")
    d = delivery(ai, sr)
    assert d["state"] == "failed" and d["next_attempt"] is None and d["attempts"] == 1, d
    assert d["reason"] == (f"the RIS rejected message {d['control_id']} (AR) (its text is "
                           "withheld: it may quote patient data)")
    assert "HL7-AR" not in d["reason"]
    time.sleep(1.5)  # nothing more is sent
    assert ris.control_ids().count(d["control_id"]) == 1


def test_a_ris_down_then_up_gets_the_message_once(net):
    ai, ris = net["ai"], net["ris"]
    ris.stop()
    try:
        sr = send_dx(net, "HL7-DOWN")
        d = delivery(ai, sr, until=lambda d: d["attempts"] >= 2 and d["state"] == "failed")
        assert d["next_attempt"] and "connection refused" in d["reason"], d
    finally:
        ris.start()
    d = delivery(ai, sr)
    assert d["state"] == "done" and d["ack"] == "AA", d
    assert ris.control_ids().count(d["control_id"]) == 1


def test_a_pending_message_survives_kill_9(net):
    ai, ris = net["ai"], net["ris"]
    ris.stop()
    try:
        sr = send_dx(net, "HL7-KILL")
        delivery(ai, sr, until=lambda d: d["attempts"] >= 1 and d["state"] == "failed")
        ai.kill()
        ris.start()
        ai.start()
    finally:
        ris.start()
    d = delivery(ai, sr)
    assert d["state"] == "done" and d["ack"] == "AA", d
    assert ris.control_ids().count(d["control_id"]) == 1
