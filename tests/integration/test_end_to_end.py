"""C-STORE in, validated AI SR out: the product's core path against a real Orthanc."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from engine.config import PROJECT_ROOT
from inference.backend import Batch, InProcessBackend
from inference.card import ModelCard
from inference.preprocess import prepare_radiograph
from inference.version import __version__
from tests.dicom_tools import dciodvfy_errors
from tests.factories import synthetic_dx
from tests.harness import CURRENT

MODEL = PROJECT_ROOT / "models" / "limb-fracture-xr"


@pytest.fixture(scope="module")
def card():
    return ModelCard.from_folder(MODEL)


@pytest.fixture(scope="module")
def backend(card):
    backend = InProcessBackend()
    backend.load(card)
    return backend


def direct_probability(card: ModelCard, backend, ds: pydicom.Dataset) -> float:
    prepared = prepare_radiograph(
        ds, canvas=tuple(card.image.shape[:2]), target_mm=card.image.pixel_spacing_mm,
        feature_names=card.metadata.features,
    )
    return backend.predict(card, Batch(prepared.image.pixels[None, :, :, None],
                                       prepared.features[None, :]))[0].probability


@pytest.fixture(scope="module")
def sent(server, card, backend, tmp_path_factory):
    """A radiograph the model calls positive and one it calls negative, sent by C-STORE.

    The cases are chosen by the model's own prediction: this module tests the
    pipeline around the model; the model's accuracy is the card's business
    (tests/unit/test_model_card_metrics.py).
    """
    folder = tmp_path_factory.mktemp("dx")
    files = []
    for fracture, age, sex in ((True, 81.0, "F"), (False, 35.0, "M")):
        for seed in range(11, 60):
            ds = synthetic_dx(seed, fracture=fracture, age=age, sex=sex)
            if (direct_probability(card, backend, ds) >= card.threshold) == fracture:
                break
        path = folder / f"{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    server.storescu(files)
    ids = [server.lookup(str(pydicom.dcmread(f).SOPInstanceUID)) for f in files]
    jobs = server.wait_jobs(ids)
    return files, ids, jobs


def test_every_image_gets_a_done_job_with_a_result(sent, card):
    _, ids, jobs = sent
    assert sorted(j["instance"] for j in jobs) == sorted(ids)
    for job in jobs:
        assert job["state"] == "done", job
        assert job["model"] == card.id and job["model_version"] == card.version
        assert job["attempts"] == 1
        assert job["result"]["sr_sop_instance_uid"]


def test_sr_is_in_the_source_study_references_the_source_and_is_valid(
    server, sent, card, tmp_path
):
    files, ids, jobs = sent
    for path, instance_id in zip(files, ids, strict=True):
        source = pydicom.dcmread(path)
        job = next(j for j in jobs if j["instance"] == instance_id)
        sr_id = job["result"]["sr_instance"]
        assert server.get(f"/instances/{sr_id}/study")["ID"] == job["study"]
        assert server.get(f"/instances/{instance_id}/study")["ID"] == job["study"]
        sr_bytes = server.get_bytes(f"/instances/{sr_id}/file")
        sr_path = tmp_path / f"{instance_id}.dcm"
        sr_path.write_bytes(sr_bytes)
        assert dciodvfy_errors(sr_path) == []
        sr = hd.sr.srread(sr_path)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SOPInstanceUID == job["result"]["sr_sop_instance_uid"]
        text = str(pydicom.dcmread(sr_path))
        assert source.SOPInstanceUID in text  # referenced by the region / image library
        assert card.version in text and card.name in text  # algorithm identification
        assert card.finding.value in text  # the finding's SNOMED CT code
        check_companions(server, job, source, sr, tmp_path)


def check_companions(server, job, source, sr, tmp_path) -> None:
    """A located finding's GSPS and KOS, in the source's study, valid; none for a negative."""
    from inference.presentation import companion_sop_uids

    companions = job["result"].get("companions", [])
    study = server.get(f"/studies/{job['study']}/instances")
    ours = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in study}
    pr_uid, ko_uid = companion_sop_uids(str(sr.SOPInstanceUID))
    if not (job["result"]["positive"] and job["result"]["region"]):
        assert companions == [] and pr_uid not in ours and ko_uid not in ours
        return
    assert companions == [ours[pr_uid]["ID"], ours[ko_uid]["ID"]]
    objects = {}
    for instance_id in companions:
        path = tmp_path / f"{instance_id}.dcm"
        path.write_bytes(server.get_bytes(f"/instances/{instance_id}/file"))
        assert dciodvfy_errors(path) == []
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.Manufacturer == "orthanc-ai" and ds.PatientID == source.PatientID
        objects[ds.Modality] = ds
    pr, ko = objects["PR"], objects["KO"]
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
        .ReferencedSOPInstanceUID == source.SOPInstanceUID
    text = pr.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    assert text.startswith(f"AI: {job['result']['finding']} present, probability ")
    assert source.SOPInstanceUID in str(ko) and sr.SOPInstanceUID in str(ko)
    # Our own outputs: no job for either.
    assert not set(companions) & {j["instance"] for j in server.jobs()}


def test_probability_equals_a_direct_prediction(sent, card, backend):
    files, ids, jobs = sent
    for path, instance_id in zip(files, ids, strict=True):
        prepared = prepare_radiograph(
            pydicom.dcmread(path),
            canvas=tuple(card.image.shape[:2]),
            target_mm=card.image.pixel_spacing_mm,
            feature_names=card.metadata.features,
        )
        raw = backend.predict(card, Batch(prepared.image.pixels[None, :, :, None],
                                          prepared.features[None, :]))[0]
        job = next(j for j in jobs if j["instance"] == instance_id)
        assert job["result"]["probability"] == pytest.approx(raw.probability, abs=1e-5)
        assert job["result"]["positive"] == (raw.probability >= card.threshold)


def test_fracture_is_located_and_negative_is_reported_absent(server, sent):
    _, ids, jobs = sent
    by_instance = {j["instance"]: j for j in jobs}
    positive, negative = by_instance[ids[0]], by_instance[ids[1]]
    assert positive["result"]["positive"] is True
    assert positive["result"]["region"] is not None
    assert negative["result"]["positive"] is False
    sr = pydicom.dcmread(io.BytesIO(
        server.get_bytes(f"/instances/{negative['result']['sr_instance']}/file")))
    assert "Absent" in str(sr)


def test_our_own_srs_are_not_processed(server, sent):
    _, _, jobs = sent
    sr_ids = {j["result"]["sr_instance"] for j in jobs}
    assert not sr_ids & {j["instance"] for j in server.jobs()}


def test_same_image_twice_yields_one_sr(server, sent):
    files, ids, jobs = sent
    server.storescu(files[:1])  # a resend by the modality
    again = server.post("/instances", files[0].read_bytes(),
                        headers={"Content-Type": "application/dicom"})
    assert again["ID"] == ids[0]
    server.wait_jobs(ids)
    assert len([j for j in server.jobs() if j["instance"] == ids[0]]) == 1
    study = jobs[0]["study"]
    srs = [i for i in server.get(f"/studies/{study}/instances")
           if i["MainDicomTags"].get("SOPInstanceUID") == jobs[0]["result"]["sr_sop_instance_uid"]]
    assert len(srs) == 1
    # The resent image's GSPS and KOS once each too: the same UIDs, AlreadyStored.
    positive = next(j for j in jobs if j["instance"] == ids[0])
    by_series: dict[str, int] = {}
    for i in server.get(f"/studies/{positive['study']}/instances"):
        by_series[i["ParentSeries"]] = by_series.get(i["ParentSeries"], 0) + 1
    companions = positive["result"]["companions"]
    assert len(companions) == 2
    for instance_id in companions:
        assert by_series[server.get(f"/instances/{instance_id}")["ParentSeries"]] == 1


def test_non_image_objects_get_no_sr(server, sent, tmp_path):
    files, ids, _ = sent
    image = pydicom.dcmread(files[1])
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=[image],
        content=hd.ko.KeyObjectSelection(
            document_title=pydicom.sr.codedict.codes.DCM.Manifest,
            referenced_objects=[image],
        ),
        series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Test",
    )
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=hd.UID(), series_number=51,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Test",
        manufacturer_model_name="Test", software_versions="1", device_serial_number="1",
        content_label="TEST",
    )
    paths = []
    for name, obj in (("ko", ko), ("pr", pr)):
        p = tmp_path / f"{name}.dcm"
        obj.save_as(p, enforce_file_format=True)
        paths.append(p)
    paths.append(get_testdata_file("test-SR.dcm"))
    server.storescu(paths)
    new_ids = [server.lookup(str(pydicom.dcmread(p).SOPInstanceUID)) for p in paths]
    jobs = server.wait_jobs(new_ids)
    assert len(jobs) == 3
    for job in jobs:
        assert job["state"] == "skipped" and job["model"] is None
        assert job["reason"].startswith("non-image object (")
    reasons = " ".join(j["reason"] for j in jobs)
    assert "Key Object Selection" in reasons and "Presentation State" in reasons


def test_broken_image_stays_stored_and_fails_with_a_reason(server, tmp_path):
    ds = synthetic_dx(21, fracture=False)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2 // 2 * 2]
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    server.storescu([path])
    instance_id = server.lookup(str(ds.SOPInstanceUID))
    assert instance_id is not None  # Orthanc kept it
    (job,) = server.wait_jobs([instance_id])
    assert job["state"] == "failed"
    assert "truncated" in job["reason"]
    assert job["result"] is None
    assert server.get("/system")["Version"]  # Orthanc keeps serving


def test_metrics_are_prometheus_text(server, sent):
    r = server.http.get(server.url + "/ai/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert 'orthanc_ai_jobs{state="done"}' in r.text
    assert 'orthanc_ai_stage_seconds_count{stage="infer"}' in r.text


def test_models_lists_the_card_with_its_metrics(server, card):
    models = server.get("/ai/models")
    assert models["ready"] is True
    assert models["version"] == __version__  # the product's; each model has its own
    (listed,) = [m for m in models["models"] if m["id"] == card.id]
    assert listed["version"] == card.version
    metrics = listed["metrics"]
    assert metrics["held_out"]["auroc"] > metrics["image_only_ablation"]["auroc"]
    assert np.isfinite(listed["threshold"])


def test_reprocessing_a_study_keeps_one_sr_per_image_and_model_version(server, sent):
    _, ids, jobs = sent
    study = jobs[0]["study"]
    before = server.get(f"/studies/{study}/instances")
    answer = server.post(f"/ai/studies/{study}/reprocess")
    assert answer == {"study": study, "queued": True}
    import time

    time.sleep(3)  # let the workers decide again
    server.wait_jobs([ids[0]])
    assert len([j for j in server.jobs(instance=ids[0]) if j["model"]]) == 1
    assert server.get(f"/studies/{study}/instances") == before  # no new SR
    r = server.http.post(server.url + "/ai/studies/not-a-study/reprocess", timeout=10)
    assert r.status_code == 400
    r = server.http.post(server.url + f"/ai/studies/{'0' * 8}{'-00000000' * 4}/reprocess",
                         timeout=10)
    assert r.status_code == 404


def _listening(port: int) -> set[str]:
    """The IPv4 addresses a TCP port is listening on, from /proc/net/tcp."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_http_listens_on_loopback_where_the_orthanc_version_allows(server):
    # 1.12.10 and later: HttpBindAddresses; 1.10.1 listens everywhere and refuses
    # remote clients (RemoteAccessAllowed false). The DICOM port: everywhere on both.
    assert _listening(server.http_port) == ({"127.0.0.1"} if CURRENT else {"0.0.0.0"})
    assert _listening(server.dicom_port) == {"0.0.0.0"}
