"""Orthanc 1.10.1's DIMSE REST client against two PACS: a plain Orthanc and dcmqrscp.

The "AI" side here is a plain Orthanc too (tests.peers.OrthancPacs named AI):
these tests pin what the REST routes the priors / forwarding code relies on
do, and how each PACS answers, so the code can be written against facts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.factories import patient_study_dx
from tests.peers import DcmqrscpPacs, OrthancPacs, stop_all

STUDY_KEYS = {"StudyInstanceUID": "", "StudyDate": "", "AccessionNumber": "",
              "NumberOfStudyRelatedInstances": "", "StudyDescription": ""}
MODS = ["pacs", "dcmqr"]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peers")
    ai = OrthancPacs(tmp / "ai", "AI")
    strict = OrthancPacs(tmp / "strict", "STRICT", config={"DicomAlwaysAllowStore": False})
    pacs = OrthancPacs(tmp / "pacs", "PACS")
    dcmqr = DcmqrscpPacs(tmp / "dcmqr", "DCMQR")
    ai.known = {"pacs": pacs.peer, "dcmqr": dcmqr.peer}
    strict.known = {"pacs": pacs.peer}  # not dcmqr: its C-STOREs are refused
    pacs.known = {"ai": ai.peer, "strict": strict.peer}
    dcmqr.known = dict(pacs.known)
    studies = {
        "A1": patient_study_dx("P1", "20240110", issuer="HOSP_A", accession="A1"),
        "A2": patient_study_dx("P1", "20250310", issuer="HOSP_A", accession="A2",
                               body_part="LEG", fracture=True),
        "B1": patient_study_dx("P1", "20240601", issuer="HOSP_B", accession="B1"),
    }
    paths = []
    for name, ds in studies.items():
        path = tmp / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    try:
        for node in (ai, pacs, dcmqr):
            node.start()
        for path in paths:
            pacs.upload(path.read_bytes())
        dcmqr.load(paths)
        yield {"ai": ai, "strict": strict, "pacs": pacs, "dcmqr": dcmqr,
               "studies": studies, "tmp": tmp}
    finally:
        stop_all((ai, strict, pacs, dcmqr))


def answers(ai: OrthancPacs, query_id: str) -> list[dict[str, Any]]:
    """``/queries/{id}/answers?expand`` as {keyword: value} dicts."""
    return [{tag["Name"]: tag.get("Value") for tag in answer.values()}
            for answer in ai.get(f"/queries/{query_id}/answers?expand")]


def find(ai: OrthancPacs, mod: str, query: dict[str, Any], level: str = "Study",
         **options: Any) -> list[dict[str, Any]]:
    r = ai.request("POST", f"/modalities/{mod}/query",
                   {"Level": level, "Query": query, **options})
    assert r.status_code == 200, r.text
    return answers(ai, r.json()["ID"])


def accessions(found: list[dict[str, Any]]) -> set[str]:
    return {a["AccessionNumber"] for a in found}


def clear(node: OrthancPacs) -> None:
    for oid in node.instances():
        node.request("DELETE", f"/instances/{oid}")


# -- C-FIND --------------------------------------------------------------------


@pytest.mark.parametrize("mod", MODS)
def test_study_query_with_date_range_and_issuer(net, mod):
    ai, studies = net["ai"], net["studies"]
    found = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "StudyDate": "-20241231",
                           "IssuerOfPatientID": "HOSP_A", "ModalitiesInStudy": "DX"},
                 Timeout=5)
    assert len(found) == 1
    (a1,) = found
    assert a1["StudyInstanceUID"] == studies["A1"].StudyInstanceUID
    assert a1["StudyDate"] == "20240110"
    assert a1["AccessionNumber"] == "A1"
    assert a1["StudyDescription"] == "XR limb"
    assert a1["IssuerOfPatientID"] == "HOSP_A"
    assert a1["RetrieveAETitle"] == mod.upper()
    if mod == "pacs":
        assert a1["NumberOfStudyRelatedInstances"] == "1"
        assert a1["ModalitiesInStudy"] == "DX"
    else:  # dcmqrscp returns neither
        assert "NumberOfStudyRelatedInstances" not in a1
        assert "ModalitiesInStudy" not in a1


@pytest.mark.parametrize("mod", MODS)
def test_issuer_of_patient_id_is_a_matching_key(net, mod):
    ai = net["ai"]
    everyone = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "IssuerOfPatientID": ""})
    assert {(a["AccessionNumber"], a["IssuerOfPatientID"]) for a in everyone} == {
        ("A1", "HOSP_A"), ("A2", "HOSP_A"), ("B1", "HOSP_B")}
    only_b = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "IssuerOfPatientID": "HOSP_B"})
    assert accessions(only_b) == {"B1"}
    later = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "StudyDate": "20240301-"})
    assert accessions(later) == {"A2", "B1"}


@pytest.mark.parametrize("mod", MODS)
def test_modalities_in_study_matching(net, mod):
    ai = net["ai"]
    ct = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "ModalitiesInStudy": "CT"})
    either = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "ModalitiesInStudy": "CT\\DX"})
    assert accessions(either) == {"A1", "A2", "B1"}
    # Orthanc matches it; dcmqrscp ignores the key (and does not return it).
    assert accessions(ct) == (set() if mod == "pacs" else {"A1", "A2", "B1"})


@pytest.mark.parametrize("mod", MODS)
def test_body_part_only_at_series_level(net, mod):
    ai, a2 = net["ai"], net["studies"]["A2"]
    # Study level: Orthanc's client drops BodyPartExamined (Normalize), no one matches it.
    study = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1", "BodyPartExamined": "LEG"})
    assert accessions(study) == {"A1", "A2", "B1"}
    assert all("BodyPartExamined" not in a for a in study)
    series_keys = {"StudyInstanceUID": a2.StudyInstanceUID, "SeriesInstanceUID": "",
                   "Modality": "", "BodyPartExamined": ""}
    (series,) = find(ai, mod, series_keys, level="Series")
    assert series["SeriesInstanceUID"] == a2.SeriesInstanceUID
    assert series["Modality"] == "DX"
    forearm = find(ai, mod, {**series_keys, "BodyPartExamined": "FOREARM"}, level="Series")
    if mod == "pacs":
        assert series["BodyPartExamined"] == "LEG"
        assert forearm == []
    else:  # dcmqrscp: not returned, not matched
        assert "BodyPartExamined" not in series
        assert len(forearm) == 1


def test_query_timeout_must_be_an_integer(net):
    r = net["ai"].request("POST", "/modalities/pacs/query",
                          {"Level": "Study", "Query": {"PatientID": "P1"}, "Timeout": "x"})
    assert r.status_code == 400
    assert r.json()["Details"] == "Integer value expected in field: Timeout"


# -- C-MOVE --------------------------------------------------------------------


@pytest.mark.parametrize("mod", MODS)
def test_move_study_to_ai(net, mod):
    ai, a1 = net["ai"], net["studies"]["A1"]
    clear(ai)
    r = ai.request("POST", f"/modalities/{mod}/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": a1.StudyInstanceUID}],
        "TargetAet": "AI", "Synchronous": True, "Timeout": 10})
    assert (r.status_code, r.json()) == (200, {})
    assert ai.find_sop(a1.SOPInstanceUID)  # synchronous: stored when it returns
    oid = ai.lookup(a1.SOPInstanceUID)
    tags = ai.get(f"/instances/{oid}/simplified-tags")
    assert (tags["PatientID"], tags["IssuerOfPatientID"]) == ("P1", "HOSP_A")
    # 1.10.1 ignores "Synchronous": false here: it moves at once, answers {}, no job.
    clear(ai)
    r = ai.request("POST", f"/modalities/{mod}/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": a1.StudyInstanceUID}],
        "TargetAet": "AI", "Synchronous": False})
    assert (r.status_code, r.json()) == (200, {})
    assert ai.find_sop(a1.SOPInstanceUID)


@pytest.mark.parametrize("mod", MODS)
def test_move_to_unknown_destination_fails(net, mod):
    ai, b1 = net["ai"], net["studies"]["B1"]
    r = ai.request("POST", f"/modalities/{mod}/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": b1.StudyInstanceUID}],
        "TargetAet": "NOBODY", "Synchronous": True, "Timeout": 10})
    body = r.json()
    assert body["OrthancStatus"] == 9  # "Error in the network protocol"
    if mod == "pacs":
        assert r.status_code == 422
        assert "DIMSE status 0xC000" in body["Details"]
    else:
        assert r.status_code == 500
        assert body["Details"] == 'C-MOVE SCU to AET "DCMQR" has failed with DIMSE status 0xA801'


def test_dcmqrscp_without_ai_known_refuses_moves_then_accepts(net):
    ai, dcmqr, b1 = net["ai"], net["dcmqr"], net["studies"]["B1"]
    move = {"Level": "Study", "Resources": [{"StudyInstanceUID": b1.StudyInstanceUID}],
            "TargetAet": "AI", "Synchronous": True, "Timeout": 10}
    known = dcmqr.known
    clear(ai)
    try:
        dcmqr.stop()
        dcmqr.known = {}
        dcmqr.start()
        r = ai.request("POST", "/modalities/dcmqr/move", move)
        assert r.status_code == 500
        assert "DIMSE status 0xA801" in r.json()["Details"]
        assert not ai.find_sop(b1.SOPInstanceUID)
    finally:
        dcmqr.stop()
        dcmqr.known = known
        dcmqr.start()
    r = ai.request("POST", "/modalities/dcmqr/move", move)
    assert r.status_code == 200, r.text
    assert ai.find_sop(b1.SOPInstanceUID)


def test_move_unknown_study(net):
    ai = net["ai"]
    move = {"Level": "Study", "Resources": [{"StudyInstanceUID": "1.2.3.4.5"}],
            "TargetAet": "AI", "Synchronous": True}
    orthanc = ai.request("POST", "/modalities/pacs/move", move)
    dcmqr = ai.request("POST", "/modalities/dcmqr/move", move)
    assert orthanc.status_code == 422 and "0xC000" in orthanc.json()["Details"]
    assert (dcmqr.status_code, dcmqr.json()) == (200, {})  # zero sub-operations


def test_strict_receiver_needs_the_sender_in_its_modalities(net):
    """DicomAlwaysAllowStore false: C-STOREs only from DicomModalities' AE titles."""
    strict, studies = net["strict"], net["studies"]
    strict.start()
    try:
        r = strict.request("POST", "/modalities/pacs/move", {
            "Level": "Study", "Resources": [{"StudyInstanceUID": studies["A2"].StudyInstanceUID}],
            "TargetAet": "STRICT", "Synchronous": True})
        assert r.status_code == 200, r.text
        assert strict.find_sop(studies["A2"].SOPInstanceUID)
        # The AI asks dcmqrscp to move to STRICT, which does not know DCMQR.
        r = net["ai"].request("POST", "/modalities/dcmqr/move", {
            "Level": "Study", "Resources": [{"StudyInstanceUID": studies["A1"].StudyInstanceUID}],
            "TargetAet": "STRICT", "Synchronous": True})
        assert r.status_code == 500
        assert "DIMSE status 0xA702" in r.json()["Details"]
        assert not strict.find_sop(studies["A1"].SOPInstanceUID)
    finally:
        strict.kill()


def test_retrieve_from_query_answers_can_be_asynchronous(net):
    ai, a2 = net["ai"], net["studies"]["A2"]
    clear(ai)
    r = ai.request("POST", "/modalities/pacs/query",
                   {"Level": "Study", "Query": {"StudyInstanceUID": a2.StudyInstanceUID}})
    qid = r.json()["ID"]
    r = ai.request("POST", f"/queries/{qid}/retrieve", {"TargetAet": "AI", "Synchronous": False})
    assert r.status_code == 200
    job = r.json()["ID"]
    deadline = time.time() + 10
    while (state := ai.get(f"/jobs/{job}"))["State"] not in ("Success", "Failure"):
        assert time.time() < deadline, state
        time.sleep(0.1)
    assert state["Type"] == "DicomMoveScu" and state["State"] == "Success"
    assert ai.find_sop(a2.SOPInstanceUID)


# -- C-STORE -------------------------------------------------------------------


@pytest.mark.parametrize("mod", MODS)
def test_store_to_pacs(net, mod):
    ai, peer, tmp = net["ai"], net[mod], net["tmp"]
    ds = patient_study_dx(f"FWD-{mod}", "20260101", accession=f"F{mod}")
    oid = ai.upload(_bytes(ds, tmp / f"fwd-{mod}.dcm"))["ID"]
    r = ai.request("POST", f"/modalities/{mod}/store",
                   {"Resources": [oid], "Synchronous": True, "Timeout": 10})
    assert r.status_code == 200, r.text
    assert r.json() == {"Description": "REST API", "FailedInstancesCount": 0,
                        "InstancesCount": 1, "LocalAet": "AI", "ParentResources": [oid],
                        "RemoteAet": mod.upper()}
    assert peer.find_sop(ds.SOPInstanceUID)
    back = find(ai, mod, {**STUDY_KEYS, "PatientID": f"FWD-{mod}"})
    assert accessions(back) == {f"F{mod}"}


def test_asynchronous_store_gives_a_job(net):
    ai, tmp = net["ai"], net["tmp"]
    ds = patient_study_dx("FWD-ASYNC", "20260102")
    oid = ai.upload(_bytes(ds, tmp / "fwd-async.dcm"))["ID"]
    r = ai.request("POST", "/modalities/pacs/store", {"Resources": [oid], "Synchronous": False})
    job = r.json()["ID"]
    deadline = time.time() + 10
    while (state := ai.get(f"/jobs/{job}"))["State"] not in ("Success", "Failure"):
        assert time.time() < deadline, state
        time.sleep(0.1)
    assert (state["Type"], state["State"]) == ("DicomModalityStore", "Success")
    assert net["pacs"].find_sop(ds.SOPInstanceUID)


# -- the REST API around it ------------------------------------------------------


def test_no_c_get_route_and_modality_configuration(net):
    ai = net["ai"]
    assert ai.request("POST", "/modalities/pacs/get", {"Level": "Study"}).status_code == 404
    assert "get" not in ai.get("/modalities/pacs")
    config = ai.get("/modalities/dcmqr/configuration")
    assert config == {
        "AET": "DCMQR", "AllowEcho": True, "AllowEventReport": True, "AllowFind": True,
        "AllowFindWorklist": True, "AllowGet": True, "AllowMove": True, "AllowNAction": True,
        "AllowStore": True, "AllowTranscoding": True, "Host": "127.0.0.1", "LocalAet": "",
        "Manufacturer": "Generic", "Port": net["dcmqr"].dicom_port, "Timeout": 0,
        "UseDicomTls": False}


# -- PACS down -------------------------------------------------------------------


@pytest.mark.parametrize("mod", MODS)
def test_pacs_down_then_back(net, mod):
    ai, peer, a1 = net["ai"], net[mod], net["studies"]["A1"]
    oid = ai.upload(_bytes(a1, net["tmp"] / f"again-{mod}.dcm"))["ID"]
    peer.stop()
    try:
        calls = {
            "query": {"Level": "Study", "Query": {"PatientID": "P1"}, "Timeout": 3},
            "move": {"Level": "Study", "Resources": [{"StudyInstanceUID": a1.StudyInstanceUID}],
                     "TargetAet": "AI", "Synchronous": True, "Timeout": 3},
            "store": {"Resources": [oid], "Synchronous": True, "Timeout": 3},
        }
        for route, body in calls.items():
            t0 = time.time()
            r = ai.request("POST", f"/modalities/{mod}/{route}", body)
            assert time.time() - t0 < 2, route  # refused at once, no timeout wait
            assert r.status_code == 500, (route, r.text)
            assert r.json()["Details"] == (f'DicomAssociation - connecting to AET "{mod.upper()}":'
                                           " TCP Initialization Error: Connection refused")
    finally:
        peer.start()
    found = find(ai, mod, {**STUDY_KEYS, "PatientID": "P1"})
    assert {"A1", "A2", "B1"} <= accessions(found)  # same storage, same port


def _bytes(ds: Any, path: Path) -> bytes:
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()
