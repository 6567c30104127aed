"""The pipeline without Orthanc: a fake Orthanc source, an in-memory store, a fake back end."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from engine.config import parse_ai_section
from engine.context import Context
from engine.metrics import WorkerMetrics
from engine.sinks import Report
from engine.sinks.orthanc_store import OrthancStoreSink
from engine.stores import DIED_REASON, InboxKind, JobState, NewJob
from engine.stores.sqlite import SqliteJobStore
from engine.triage import Triage
from engine.worker import Worker
from inference.registry import Registry
from tests.factories import card_json, synthetic_dx, write_card
from tests.fakes import FakeBackend, FakeOrthanc


class RecordingSink:
    name = "recording"

    def __init__(self) -> None:
        self.reports: list[Report] = []

    def deliver(self, report: Report) -> dict[str, Any]:
        self.reports.append(report)
        return {"recorded": len(self.reports)}


@pytest.fixture
def world(tmp_path):
    folder = tmp_path / "models" / "tiny"
    write_card(folder, card_json())
    (folder / "model.keras").write_bytes(b"")  # the fake back end never opens it
    config = parse_ai_section({"ModelsDirectory": str(tmp_path / "models"), "MaxAttempts": 3,
                               "RetryBackoffSeconds": 0, "BatchSize": 4})
    registry = Registry.scan(config.models_directory)
    orthanc, backend, store = FakeOrthanc(), FakeBackend(), SqliteJobStore(":memory:")
    recording = RecordingSink()
    ctx = Context(config=config, source=orthanc, store=store, backend=backend,
                  registry=registry, router=config.router(registry.cards),
                  sinks=[OrthancStoreSink(orthanc, store), recording],
                  metrics=WorkerMetrics(CollectorRegistry()), owner="node-a/100")
    worker = Worker(ctx, follow_changes=False, wake=threading.Event(), stop=threading.Event())

    class World:
        pass

    w = World()
    w.ctx, w.orthanc, w.backend, w.store, w.sink, w.worker = (
        ctx, orthanc, backend, store, recording, worker)

    def stored(ds) -> str:  # what the stored-instance callback does
        instance = orthanc.add(ds)
        store.push_inbox([(InboxKind.INSTANCE, instance)])
        return instance

    def drain() -> int:
        steps = 0
        while worker.step():
            steps += 1
        return steps

    w.stored, w.drain = stored, drain
    return w


def _dx(seed: int) -> Dataset:
    return synthetic_dx(seed, fracture=True, age=40.0, spacing_mm=0.4)


def test_a_radiograph_gets_one_sr_in_its_study_through_every_sink(world):
    instance = world.stored(_dx(1))
    world.drain()
    (job,) = world.store.for_instance(instance)
    assert job.state == "done" and job.node == "node-a" and job.attempts == 1
    (sr,) = world.orthanc.srs()
    assert sr.StudyInstanceUID == world.orthanc.headers[instance].StudyInstanceUID
    assert job.result["sr_status"] == "Success" and job.result["recorded"] == 1
    assert job.result["sr_sop_instance_uid"] == sr.SOPInstanceUID
    (report,) = world.sink.reports
    assert report.instance == instance and report.card.id == "tiny-xr"
    # Our SR was marked triaged before it was stored: its event is no work.
    world.store.push_inbox([(InboxKind.INSTANCE, job.result["sr_instance"])])
    assert world.store.inbox_size() == 0


def test_a_resend_or_replayed_event_makes_no_second_job_or_sr(world):
    instance = world.stored(_dx(2))
    world.drain()
    world.store.push_inbox([(InboxKind.INSTANCE, instance)], again=True)  # replayed change
    world.drain()
    (job,) = world.store.for_instance(instance)
    # Stored once each: the SR, and its GSPS and KOS (a located positive finding).
    assert len(job.result["companions"]) == 2
    assert len(world.orthanc.srs()) == 1 and world.orthanc.calls["store"] == 3


def test_images_for_one_model_share_one_model_call(world):
    for seed in range(3, 7):
        world.stored(_dx(seed))
    world.drain()
    assert world.backend.batches == [4]
    assert world.store.counts()["done"] == 4


def test_triage_decides_jobs_and_never_runs_them(world):
    instance = world.orthanc.add(_dx(7))
    (item,) = [type("Item", (), {"kind": InboxKind.INSTANCE, "resource": instance,
                                 "queued_at": 0.0})()]
    decision = Triage(world.ctx)(item)
    assert [(j.instance, j.model, j.state) for j in decision.jobs] == [
        (instance, "tiny-xr", JobState.QUEUED)]
    assert world.backend.batches == [] and world.orthanc.calls["store"] == 0
    assert world.store.counts()["queued"] == 0  # deciding is not creating


def _non_image() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # encapsulated PDF
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.PatientID, ds.Modality = "P1", "DOC"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_a_non_image_object_is_skipped_by_its_sop_class_without_a_download(world):
    instance = world.stored(_non_image())
    world.drain()
    (job,) = world.store.for_instance(instance)
    assert job.state == "skipped" and job.reason.startswith("non-image object")
    assert world.orthanc.calls["file"] == 0


def test_a_deleted_instance_is_skipped_with_its_reason(world):
    world.store.push_inbox([(InboxKind.INSTANCE, "00000000-00000000-00000000-00000000-0")])
    world.drain()
    (job,) = world.store.list()
    assert job.state == "skipped" and "deleted" in job.reason


def test_a_transient_sink_error_is_retried_to_completion(world):
    world.orthanc.fail_stores = 1
    instance = world.stored(_dx(8))
    world.drain()
    (job,) = world.store.for_instance(instance)
    assert job.state == "done" and job.attempts == 2
    assert len(world.orthanc.srs()) == 1


def test_a_job_whose_worker_died_runs_again_alone_then_fails_for_good(world):
    instance = world.orthanc.add(_dx(9))
    job = world.store.add(NewJob(instance, None, None, model="tiny-xr", version="0.0.1"))
    for death in range(3):  # claimed, then its worker dies, three times
        dead_owner = f"node-b/{death}"
        if death == 0:
            assert world.store.claim(job.id, dead_owner, 30)
        else:
            assert world.store.claim_next(dead_owner, 30, 3).deaths == death
        world.store.release_owner(dead_owner)
    world.drain()
    (job,) = world.store.for_instance(instance)
    assert job.state == "failed" and job.reason.startswith(DIED_REASON)
    assert job.attempts == 3 and job.as_json()["next_attempt"] is None
    assert world.orthanc.srs() == []


def test_one_death_then_success_counts_one_more_attempt(world):
    instance = world.orthanc.add(_dx(10))
    job = world.store.add(NewJob(instance, None, None, model="tiny-xr", version="0.0.1"))
    world.store.claim(job.id, "node-b/1", 30)
    world.store.release_owner("node-b/1")
    world.drain()
    (job,) = world.store.for_instance(instance)
    assert job.state == "done" and job.attempts == 2 and job.deaths == 1
    assert job.node == "node-a"


def test_an_operator_retry_of_a_skipped_instance_decides_again(world):
    instance = world.stored(_non_image())
    world.drain()
    (job,) = world.store.for_instance(instance)
    world.store.requeue(job.id)
    world.drain()
    (again,) = world.store.for_instance(instance)
    assert again.state == "skipped" and again.id != job.id


def test_a_study_reprocess_keeps_done_jobs_and_reruns_failed_ones(world):
    a = world.stored(_dx(11))
    world.drain()
    (done,) = world.store.for_instance(a)
    failed = world.store.add(NewJob("x", done.study, None, model="tiny-xr", version="0.0.1",
                                    state=JobState.FAILED, reason="broken"))
    study = done.study
    world.store.push_inbox([(InboxKind.STUDY, study)], again=True)
    world.drain()
    assert world.store.get(done.id).state == "done" and len(world.orthanc.srs()) == 1
    assert world.store.get(failed.id).state != "failed"


def test_our_own_sr_is_never_analysed(world):
    instance = world.stored(_dx(12))
    world.drain()
    sr_id = world.store.for_instance(instance)[0].result["sr_instance"]
    world.store.push_inbox([(InboxKind.INSTANCE, sr_id)], again=True)  # e.g. a reprocess
    world.drain()
    assert world.store.for_instance(sr_id) == []
    assert len(world.orthanc.srs()) == 1 and world.backend.batches == [1]


def test_a_located_finding_gets_a_gsps_and_a_kos_that_are_never_analysed(world):
    instance = world.stored(_dx(13))
    world.drain()
    (job,) = world.store.for_instance(instance)
    pr_id, ko_id = job.result["companions"]
    source, pr, ko = (world.orthanc.headers[i] for i in (instance, pr_id, ko_id))
    assert (pr.Modality, ko.Modality) == ("PR", "KO")
    for ds in (pr, ko):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.Manufacturer == "orthanc-ai"
    # Marked triaged before they were stored; our own outputs when seen again.
    world.store.push_inbox([(InboxKind.INSTANCE, pr_id), (InboxKind.INSTANCE, ko_id)])
    assert world.store.inbox_size() == 0
    world.store.push_inbox([(InboxKind.INSTANCE, pr_id), (InboxKind.INSTANCE, ko_id)],
                           again=True)  # e.g. a reprocess
    world.drain()
    assert world.store.for_instance(pr_id) == [] and world.store.for_instance(ko_id) == []
    assert world.backend.batches == [1]


def test_presentation_states_switched_off_leave_the_sr_alone(world):
    world.ctx.config = world.ctx.config.model_copy(update={"presentation_states": False})
    instance = world.stored(_dx(14))
    world.drain()
    (job,) = world.store.for_instance(instance)
    assert job.state == "done" and "companions" not in job.result
    assert world.orthanc.calls["store"] == 1
