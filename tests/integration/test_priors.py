"""Priors by C-FIND/C-MOVE, interval change in the SR, and forwarding, against real peers.

One orthanc-ai node and four PACS on loopback: a plain Orthanc ("PACS",
also the forwarding destination), dcmtk's dcmqrscp ("DCMQR"), a second
dcmqrscp that does not know our AE title, so that its C-MOVEs fail
("BADMOVE"), and a third that does not know us either but is retrieved
from by C-GET ("GETPACS": the images come back on our own association).
Each scenario is its own patient.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from inference.interval import PriorFinding, change
from inference.postprocess import Finding
from tests.dicom_tools import dciodvfy_errors, first_content_item
from tests.factories import patient_study_dx
from tests.harness import OrthancAI, write_config
from tests.peers import DcmqrscpPacs, OrthancPacs, stop_all

CURRENT_DATE = "20251001"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("priors")
    pacs = OrthancPacs(tmp / "pacs", "PACS")
    dcmqr = DcmqrscpPacs(tmp / "dcmqr", "DCMQR")
    badmove = DcmqrscpPacs(tmp / "badmove", "BADMOVE", known={})  # moves fail (0xA801)
    getpacs = DcmqrscpPacs(tmp / "getpacs", "GETPACS", known={})  # C-GET needs no HostTable
    config = write_config(tmp / "ai.json", Priors={
        "Sources": ["PACS", "DCMQR", "BADMOVE", "GETPACS"], "MaxAgeDays": 3650, "MaxPriors": 1,
        "RetrieveMethod": {"GETPACS": "C-GET"},
        "DeadlineSeconds": 30, "RetryBackoffSeconds": 1, "MaxBackoffSeconds": 3,
        "MaxAttempts": 10, "RetentionHours": 24,
    }, Forward={"Destinations": ["PACS"], "RetryBackoffSeconds": 1, "MaxBackoffSeconds": 2},
        StableAge=3)
    ai = OrthancAI(tmp / "ai", config=config)
    data = json.loads(config.read_text())
    data["DicomModalities"] = {
        p.aet: {"AET": p.aet, "Host": "127.0.0.1", "Port": p.peer[2]}
        for p in (pacs, dcmqr, badmove)}
    data["DicomModalities"]["GETPACS"] = list(getpacs.peer)  # Orthanc's list form
    config.write_text(json.dumps(data))
    me = ("ORTHANC", "127.0.0.1", ai.dicom_port)
    pacs.known = {"ORTHANC": me}
    dcmqr.known = {"ORTHANC": me}
    priors = {
        "found": ("P-FOUND", pacs, {}),
        "promoted": ("P-PROMOTED", pacs, {}),
        "dcmqr": ("P-DCMQR", dcmqr, {}),
        "issuer": ("P-ISSUER", dcmqr, {"issuer": "HOSP_B"}),
        "movefail": ("P-MOVEFAIL", badmove, {}),
        "down": ("P-DOWN", pacs, {}),
        "get": ("P-GET", getpacs, {}),
    }
    try:
        for node in (pacs, dcmqr, badmove, getpacs):
            node.start()
        for name, (patient, where, kw) in priors.items():
            ds = patient_study_dx(patient, "20240110", fracture=False, accession=f"PRI-{name}",
                                  **kw)
            path = tmp / f"prior-{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if isinstance(where, OrthancPacs):
                where.upload(path.read_bytes())
            else:
                where.load([path])
        for path in head_ct(tmp / "ct-prior", seed=31, prior_of="P-CT"):
            pacs.upload(path.read_bytes())
        ai.start()
        yield {"ai": ai, "pacs": pacs, "dcmqr": dcmqr, "getpacs": getpacs, "tmp": tmp}
    finally:
        ai.stop()
        stop_all((pacs, dcmqr, badmove, getpacs))


def head_ct(folder: Path, *, seed: int, prior_of: str | None = None) -> list[Path]:
    """The demo head CT (a haematoma); as a prior: patient P-CT, 2024, its own UIDs."""
    from inference.uids import derived_uid
    from training.synthetic.ct import write_demo_ct_study

    paths = write_demo_ct_study(folder, seed=seed)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientID = "P-CT"
        if prior_of is not None:
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240110"
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, keyword, derived_uid("ct-prior", str(ds[keyword].value)))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    return paths


def send_current(net: dict[str, Any], patient: str, **kw: Any) -> str:
    """C-STORE a current study of ``patient``; its SOP Instance UID."""
    ds = patient_study_dx(patient, CURRENT_DATE, fracture=True, accession=f"CUR-{patient}",
                          **kw)
    path = net["tmp"] / f"current-{patient}.dcm"
    ds.save_as(path, enforce_file_format=True)
    net["ai"].storescu([path])
    return str(ds.SOPInstanceUID)


def analysis(ai: OrthancAI, sop: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.time() + timeout
    while (instance := ai.lookup(sop)) is None:
        assert time.time() < deadline, ai.log_tail()
        time.sleep(0.2)
    jobs = [j for j in ai.wait_jobs([instance], timeout=timeout) if j["model"]]
    assert len(jobs) == 1 and jobs[0]["state"] == "done", jobs
    return jobs[0]


def sr_of(ai: OrthancAI, job: dict[str, Any]) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(ai.get_bytes(f"/instances/{job['result']['sr_instance']}"
                                                   "/file")))


def qualitative_difference(sr: pydicom.Dataset) -> pydicom.Dataset | None:
    return first_content_item(sr, "111049")


def notes(sr: pydicom.Dataset) -> str:
    """Every text value of the content tree (the algorithm's parameters among them)."""
    texts: list[str] = []

    def walk(items):
        for item in items:
            texts.append(str(item.get("TextValue", "")))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return "\n".join(texts)


def wait(condition, timeout: float = 60, what: str = "") -> Any:
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def deliveries(ai: OrthancAI, sr_instance: str) -> list[dict[str, Any]]:
    return [d for d in ai.get("/ai/deliveries?limit=10000") if d["sr_instance"] == sr_instance]


def check_compared(ai: OrthancAI, job: dict[str, Any], source: str, tmp: Path) -> None:
    cmp = job["result"]["comparison"]
    assert cmp["state"] == "compared", cmp
    assert cmp["prior_source"] == source and cmp["prior_study_date"] == "20240110"
    expected = change(Finding(job["result"]["probability"], job["result"]["threshold"], None),
                      PriorFinding(cmp["prior_probability"], job["result"]["threshold"]))
    assert cmp["change"] == expected.value
    sr = sr_of(ai, job)
    item = qualitative_difference(sr)
    assert item is not None
    codes = {"new": "129721008", "unchanged": "129723006", "resolved": "723506003"}
    assert item.ConceptCodeSequence[0].CodeValue == codes[cmp["change"]]
    evidence = sr.PertinentOtherEvidenceSequence[0]
    assert evidence.StudyInstanceUID == cmp["prior_study_uid"]
    path = tmp / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    # The prior: marked as fetched for comparison (or local), analysed, not a current study.
    prior = cmp["prior_study"]
    prior_jobs = [j for j in ai.jobs(study=prior) if j["model"]]
    assert prior_jobs and all(j["state"] == "done" for j in prior_jobs)
    if source != "local":  # a local prior was a current study once
        assert not [j for j in ai.jobs(kind="priors", study=prior)]
        assert [j for j in ai.jobs(kind="retention", study=prior)]
        for j in prior_jobs:
            assert j["result"]["forward"] == "not forwarded: a prior fetched for comparison"
            assert deliveries(ai, j["result"]["sr_instance"]) == []


def test_prior_on_the_pacs_is_fetched_compared_and_the_sr_forwarded(net):
    ai, pacs = net["ai"], net["pacs"]
    job = analysis(ai, send_current(net, "P-FOUND"))
    check_compared(ai, job, "PACS", net["tmp"])
    sr = sr_of(ai, job)
    done = wait(lambda: [d for d in deliveries(ai, job["result"]["sr_instance"])
                         if d["state"] == "done"], what="delivery")
    assert done[0]["destination"] == "PACS"
    assert pacs.find_sop(str(sr.SOPInstanceUID))
    detail = ai.get(f"/ai/jobs/{job['id']}")
    assert detail["deliveries"][0]["state"] == "done"


def test_a_located_finding_is_forwarded_with_its_gsps_and_kos_in_one_job(net):
    """The SR's GSPS and KOS go to the destination with it, on the forward job of the
    SR (one delivery per SR and destination, as before), valid there."""
    from inference.presentation import companion_sop_uids

    ai, pacs = net["ai"], net["pacs"]
    ds = located_fracture("P-KEYIMAGES")
    path = net["tmp"] / "current-keyimages.dcm"
    ds.save_as(path, enforce_file_format=True)
    ai.storescu([path])
    job = analysis(ai, str(ds.SOPInstanceUID))
    assert job["result"]["positive"] and job["result"]["region"]
    companions = job["result"]["companions"]
    assert len(companions) == 2
    (delivery,) = wait(lambda: [d for d in deliveries(ai, job["result"]["sr_instance"])
                                if d["state"] == "done"], what="delivery")
    forward = ai.get(f"/ai/jobs/{delivery['id']}")
    assert forward["result"]["companions"] == companions
    sr = sr_of(ai, job)
    for uid in (str(sr.SOPInstanceUID), *companion_sop_uids(str(sr.SOPInstanceUID))):
        received = pacs.lookup(uid)
        assert received is not None, uid
        path = net["tmp"] / f"forwarded-{uid}.dcm"
        path.write_bytes(pacs.request("GET", f"/instances/{received}/file").content)
        assert dciodvfy_errors(path) == []
        assert pydicom.dcmread(path).StudyInstanceUID == sr.StudyInstanceUID


def located_fracture(patient: str) -> pydicom.Dataset:
    """A current study of ``patient`` that the shipped model calls positive, with a region
    (chosen by the model's own prediction, as tests/integration/test_end_to_end.py does)."""
    from engine.config import PROJECT_ROOT
    from inference.backend import InProcessBackend, batch_of
    from inference.card import ModelCard
    from inference.pixels import DEFAULT_MAX_PIXEL_BYTES
    from inference.postprocess import to_finding
    from inference.preprocess import radiograph_input

    card = ModelCard.from_folder(PROJECT_ROOT / "models" / "limb-fracture-xr")
    backend = InProcessBackend()
    backend.load(card)
    for seed in range(1, 60):
        ds = patient_study_dx(patient, CURRENT_DATE, fracture=True, seed=seed,
                              accession=f"CUR-{patient}")
        inputs = radiograph_input(card, ds, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)
        (raw,) = backend.predict(card, batch_of(card, [inputs]))
        finding = to_finding(card, raw, inputs.image.geometry)
        if finding.positive and finding.region is not None:
            return ds
    raise AssertionError("no located fracture among 60 phantoms")


def test_a_prior_later_sent_by_a_modality_becomes_a_current_study(net):
    """A study fetched as a prior, to which a modality then sends an image, is a
    current study from then on: its own prior search, its SRs forwarded."""
    ai = net["ai"]
    current = analysis(ai, send_current(net, "P-PROMOTED"))
    prior = current["result"]["comparison"]["prior_study"]
    assert ai.jobs(kind="retention", study=prior)
    late = patient_study_dx("P-PROMOTED", "20240110", fracture=False, accession="PRI-promoted")
    late.SeriesInstanceUID = late.SeriesInstanceUID + ".2"
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID + ".2"
    path = net["tmp"] / "late-view.dcm"
    late.save_as(path, enforce_file_format=True)
    ai.storescu([path])
    job = analysis(ai, str(late.SOPInstanceUID))
    assert job["study"] == prior
    assert not ai.jobs(kind="retention", study=prior)
    assert ai.jobs(kind="priors", study=prior)
    assert isinstance(job["result"]["forward"], dict)  # forwarded like any current study


def test_prior_only_on_the_second_pacs(net):
    job = analysis(net["ai"], send_current(net, "P-DCMQR"))
    check_compared(net["ai"], job, "DCMQR", net["tmp"])


def test_prior_fetched_by_c_get_from_a_pacs_that_does_not_know_us(net):
    ai = net["ai"]
    job = analysis(ai, send_current(net, "P-GET"))
    check_compared(ai, job, "GETPACS", net["tmp"])
    priors_job = ai.jobs(kind="priors", study=job["study"])[0]
    found = priors_job["result"]["priors"]
    assert [(p["source"], p["retrieved"]) for p in found] == [("GETPACS", True)]
    # The C-GET's association, not a C-MOVE to us: GETPACS knows no AE to move to.
    log = net["getpacs"].log_path.read_text(errors="replace")
    assert "C-GET RQ" in log and "C-MOVE RQ" not in log


def test_a_local_prior_is_used_where_it_is(net):
    ai = net["ai"]
    prior = patient_study_dx("P-LOCAL", "20240110", fracture=False, accession="PRI-local")
    ai.upload(io_bytes(prior))
    prior_job = analysis(ai, str(prior.SOPInstanceUID))
    job = analysis(ai, send_current(net, "P-LOCAL"))
    check_compared(ai, job, "local", net["tmp"])
    assert job["result"]["comparison"]["prior_sr"] == prior_job["result"]["sr_sop_instance_uid"]


def io_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_no_prior_says_so(net):
    job = analysis(net["ai"], send_current(net, "P-NONE"))
    cmp = job["result"]["comparison"]
    assert cmp["state"] == "none" and "no earlier study" in cmp["reason"]
    sr = sr_of(net["ai"], job)
    assert qualitative_difference(sr) is None
    assert "no prior comparison" in notes(sr)


def test_same_patient_id_of_another_issuer_is_not_a_prior(net):
    job = analysis(net["ai"], send_current(net, "P-ISSUER", issuer="HOSP_A"))
    assert job["result"]["comparison"]["state"] == "none", job["result"]["comparison"]
    assert qualitative_difference(sr_of(net["ai"], job)) is None


def test_a_failing_c_move_is_recorded_and_the_result_not_held_back(net):
    ai = net["ai"]
    job = analysis(ai, send_current(net, "P-MOVEFAIL"))
    cmp = job["result"]["comparison"]
    assert cmp["state"] == "pending" and "C-MOVE from BADMOVE failed" in cmp["reason"], cmp
    assert "C-MOVE from BADMOVE failed" in notes(sr_of(ai, job))
    priors_job = ai.jobs(kind="priors", study=job["study"])[0]
    assert priors_job["state"] in ("failed", "running") and "BADMOVE" in priors_job["reason"]


def test_pacs_down_then_back_revised_sr_and_each_sr_delivered_once(net):
    ai, pacs = net["ai"], net["pacs"]
    pacs.stop()
    try:
        job = analysis(ai, send_current(net, "P-DOWN"))
        cmp = job["result"]["comparison"]
        assert cmp["state"] == "pending" and "PACS" in cmp["reason"], cmp
        first_sr = job["result"]["sr_instance"]
        wait(lambda: any(d["attempts"] >= 1 and d["state"] == "failed"
                         for d in deliveries(ai, first_sr)), what="a failed delivery")
    finally:
        pacs.start()
    revised = wait(lambda: (j := ai.get(f"/ai/jobs/{job['id']}"))["result"].get("revises")
                   and j, timeout=90, what="the revised SR")
    assert revised["result"]["revises"] == job["result"]["sr_sop_instance_uid"]
    check_compared(ai, revised, "PACS", net["tmp"])
    sr = sr_of(ai, revised)
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == job["result"]["sr_sop_instance_uid"]
    for sr_instance in (first_sr, revised["result"]["sr_instance"]):
        done = wait(lambda i=sr_instance: [d for d in deliveries(ai, i) if d["state"] == "done"],
                    timeout=60, what="delivery after the PACS came back")
        assert len(deliveries(ai, sr_instance)) == 1
        attempts = done[0]["attempts"]
        time.sleep(2)
        assert deliveries(ai, sr_instance)[0]["attempts"] == attempts  # never sent again
    assert pacs.find_sop(job["result"]["sr_sop_instance_uid"])
    assert pacs.find_sop(revised["result"]["sr_sop_instance_uid"])


def test_a_head_ct_is_compared_with_its_prior_volume(net):
    ai = net["ai"]
    paths = head_ct(net["tmp"] / "ct-current", seed=20261202)
    ai.storescu(paths)
    series = ai.get(f"/instances/{ai.lookup(str(pydicom.dcmread(paths[0]).SOPInstanceUID))}"
                    )["ParentSeries"]
    job = wait(lambda: next((j for j in ai.jobs(series=series) if j["level"] == "series"
                             and j["state"] in ("done", "failed", "dead")), None),
               timeout=180, what="the series job")
    assert job["state"] == "done", job
    cmp = job["result"]["comparison"]
    assert cmp["state"] == "compared" and cmp["prior_source"] == "PACS", \
        json.dumps(ai.jobs(kind="priors", study=job["study"]))
    result = job["result"]
    assert result["summary"].endswith(f"; {cmp['text']}")  # the interval change in words
    prior = PriorFinding(cmp["prior_probability"], result["threshold"], cmp["prior_volume_ml"])
    assert cmp["change"] == change(Finding(result["probability"], result["threshold"], None,
                                           result["volume_ml"]), prior).value
    item = qualitative_difference(sr_of(ai, job))
    assert item is not None
    children = {c.ConceptNameCodeSequence[0].CodeValue: c for c in item.ContentSequence}
    if result["volume_ml"] is not None and cmp["prior_volume_ml"] is not None:
        assert cmp["volume_difference_ml"] == pytest.approx(
            result["volume_ml"] - cmp["prior_volume_ml"], abs=1e-3)
        num = children["129806009"].MeasuredValueSequence[0]
        assert float(num.NumericValue) == pytest.approx(cmp["volume_difference_ml"], abs=1e-3)
    prior_jobs = [j for j in ai.jobs(study=cmp["prior_study"]) if j["level"] == "series"]
    assert len(prior_jobs) == 1 and prior_jobs[0]["state"] == "done"  # analysed once


def test_a_delivery_survives_kill_9_while_the_destination_is_down(net):
    """Last in the module: it kills and restarts the orthanc-ai node."""
    ai, pacs = net["ai"], net["pacs"]
    pacs.stop()
    try:
        job = analysis(ai, send_current(net, "P-RESTART"))
        sr = job["result"]["sr_instance"]
        wait(lambda: any(d["state"] == "failed" for d in deliveries(ai, sr)),
             what="a failed delivery")
        ai.kill()  # kill -9: Orthanc and, with their stdin closed, its workers
        ai.start()
    finally:
        pacs.start()
    done = wait(lambda: [d for d in deliveries(ai, sr) if d["state"] == "done"], timeout=90,
                what="the delivery after the restart")
    assert len(deliveries(ai, sr)) == 1 and done[0]["attempts"] >= 2
    assert pacs.find_sop(job["result"]["sr_sop_instance_uid"])
