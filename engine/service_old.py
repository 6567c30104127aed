"""The AI service inside Orthanc: inbox, worker threads, the per-job pipeline.

Nothing here imports ``orthanc``: the adapter hands us an Orthanc HTTP
client and calls ``enqueue`` from the stored-instance callback. Every
instance ends as a job in a visible state; one catch-all per job records
the reason and the worker goes on (like pynetdicom's ``attempt``).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from inference.backend import Backend, Batch
from inference.card import CardError, ModelCard
from inference.errors import BadInput, JobOutcome, SkipInput, TransientError
from inference.postprocess import Finding, to_finding
from inference.preprocess import ModelInput, prepare_radiograph
from inference.registry import Registry
from inference.report import MANUFACTURER, build_sr
from inference.routing import Router

from .config import AIConfig
from .jobs import InboxItem, Job, JobStore
from .metrics import Metrics
from .orthanc_http import InstanceGone, OrthancClient
from .series import analyse_series, triage_series

log = logging.getLogger("orthanc_ai")

# SOP Class UID prefixes of objects without an image to analyse; they are
# skipped from Orthanc's metadata alone, without downloading the file.
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL, ...
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG, audio, ...)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, seg
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose ... RT plans, not RT Image (.481.1)
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
    "1.2.840.10008.5.1.1.",  # printing, basic film
)


def _batch(card: ModelCard, inputs: Sequence[ModelInput]) -> Batch:
    """Stack prepared radiographs into the card's input shape."""
    images = np.stack([i.image.pixels for i in inputs])[..., None]
    if card.image.shape[2] != 1:
        images = np.repeat(images, card.image.shape[2], axis=-1)
    features = np.stack([i.features for i in inputs]) if card.metadata else None
    return Batch(images, features)


def sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"SOP Class {uid}"


def non_image_reason(sop_class_uid: str) -> str | None:
    if sop_class_uid and sop_class_uid.startswith(_NON_IMAGE_PREFIXES):
        return f"non-image object ({sop_class_name(sop_class_uid)})"
    return None


@dataclass(frozen=True)
class Stored:
    """An instance as the pipeline knows it after fetching."""

    instance: str
    study: str
    series: str
    dataset: Dataset
    queued_at: float


class Service:
    def __init__(
        self,
        config: AIConfig,
        store: JobStore,
        client: OrthancClient,
        registry: Registry,
        backend: Backend,
        router: Router,
    ) -> None:
        self.config = config
        self.router = router
        self.store = store
        self.client = client
        self.registry = registry
        self.backend = backend
        # The callbacks' fast path; the change log's durable inbox backs it up.
        self._inbox: queue.Queue[InboxItem] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._arrivals: deque[float] = deque(maxlen=2)  # monotonic times of the last stores
        self._own_stores = 0  # SRs being stored by our workers (not an ingest burst)
        self._own_lock = threading.Lock()
        self._series_info: OrderedDict[str, tuple[str, str]] = OrderedDict()  # study, modality
        self._without_job: OrderedDict[str, None] = OrderedDict()  # see triage()
        # Both inboxes usually hold the same instances: the larger is the depth.
        self.metrics = Metrics(store.counts,
                               lambda: max(self._inbox.qsize(), store.inbox_size()))
        self.clock: Callable[[], float] = time.time

    # -- called from Orthanc callbacks: must be quick and never raise -------

    def enqueue(self, instance_id: str) -> None:
        if not self._own_stores:
            self._arrivals.append(time.monotonic())
        self._inbox.put(InboxItem("instance", instance_id, time.time()))

    def enqueue_series(self, series_id: str) -> None:
        """A series became stable (Orthanc's StableAge passed without new instances)."""
        self._inbox.put(InboxItem("series", series_id, time.time()))

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        recovered = self.store.recover()
        if recovered:
            log.warning("orthanc-ai: %d job(s) interrupted by a stop were queued again", recovered)
        self._stop.clear()
        loader = threading.Thread(target=self._load_models, name="orthanc-ai-loader", daemon=True)
        follower = threading.Thread(target=self._follow_changes, name="orthanc-ai-changes",
                                    daemon=True)
        loader.start()
        follower.start()
        self._threads = [loader, follower]
        for i in range(self.config.workers):
            t = threading.Thread(target=self._loop, name=f"orthanc-ai-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Signal every thread, then wait for them all within one `timeout`."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def _lower_priority(self) -> None:
        """Let Orthanc's own threads (C-STORE, HTTP) win the CPU over our work.

        Linux keeps a nice value per thread; the threads TensorFlow creates
        inherit it from the thread that first runs a model.
        """
        if self.config.worker_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               self.config.worker_nice)
            except (AttributeError, OSError):
                pass

    def _load_models(self) -> None:
        self._lower_priority()
        for card in list(self.registry.cards.values()):
            try:
                self.backend.load(card)
                log.warning("orthanc-ai: model %s %s loaded", card.id, card.version)
            except CardError as exc:
                log.error("orthanc-ai: model %s disabled: %s", card.id, exc)
                self.registry.disable(card.id, str(exc))
            except Exception as exc:  # a model that cannot load must not stop the others
                log.exception("orthanc-ai: model %s failed to load", card.id)
                self.registry.disable(card.id, f"cannot be loaded: {exc}")
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    # -- Orthanc's change log: nothing stored while we were down is missed -------

    def _follow_changes(self) -> None:
        """Copy NewInstance/StableSeries changes into the durable inbox, with the cursor.

        The stored-instance callback is only the fast path; this is the path
        that survives crashes. On the very first start the cursor begins at
        the end of the log: enabling the plugin does not re-analyse the archive.
        """
        kinds = {"NewInstance": "instance", "StableSeries": "series"}
        cursor: int | None = None
        while not self._stop.is_set():
            try:
                if cursor is None:
                    saved = self.store.get_value("changes_cursor")
                    if saved is None:
                        last = int(self.client.get_json("/changes?last")["Last"])
                        self.store.add_to_inbox([], last)
                        saved = str(last)
                    cursor = int(saved)
                page = self.client.changes(cursor, limit=500)
                items = [(kinds[c["ChangeType"]], c["ID"], int(c["Seq"]))
                         for c in page.get("Changes", []) if c.get("ChangeType") in kinds]
                last = int(page.get("Last", cursor))
                if items or last != cursor:
                    self.store.add_to_inbox(items, last)
                    cursor = last
                if page.get("Done", True):
                    self._stop.wait(self.config.changes_poll_seconds)
            except Exception as exc:  # Orthanc busy or stopping: try again shortly
                log.warning("orthanc-ai: reading the change log failed: %s", exc)
                self._stop.wait(2.0)

    # -- worker loop -------------------------------------------------------------

    def in_ingest_burst(self) -> bool:
        """Two or more instances stored within the last IngestQuietMs."""
        quiet = self.config.ingest_quiet_ms / 1000.0
        arrivals = tuple(self._arrivals)
        return len(arrivals) == 2 and time.monotonic() - arrivals[0] < quiet

    def _yield_to_ingest(self) -> None:
        """Let a modality's burst of C-STOREs pass before taking CPU, GIL and index locks.

        A single image (the latency case) is not held back; a burst defers
        the next batch until the sender pauses, at most IngestMaxDeferMs, so
        analysis still progresses under endless ingest.
        """
        if self.config.ingest_quiet_ms <= 0:
            return
        deadline = time.monotonic() + self.config.ingest_max_defer_ms / 1000.0
        step = min(0.05, self.config.ingest_quiet_ms / 4000.0)
        while (self.in_ingest_burst() and time.monotonic() < deadline
               and not self._stop.is_set()):
            self.metrics.deferred_seconds.inc(step)
            self._stop.wait(step)

    def _loop(self) -> None:
        self._lower_priority()
        self._ready.wait()
        while not self._stop.is_set():
            try:
                self._yield_to_ingest()
                job = self.store.claim_next()
                if job is not None:
                    self.run_job(job)
                    continue
                item = self._next_item(0.2)
                if item is None:
                    continue
                # Gather what is waiting (up to BatchSize, waiting at most BatchWaitMs)
                # so that images for the same model share one model call.
                pending: list[tuple[Job, Stored | None]] = []
                deadline = time.monotonic() + self.config.batch_wait_ms / 1000.0
                try:
                    while item is not None:
                        pending += self._triage_item(item)
                        if len(pending) >= self.config.batch_size:
                            break
                        item = self._next_item(max(0.0, deadline - time.monotonic()))
                finally:
                    self.run_instance_jobs(pending)  # claimed jobs never stay "running"
            except Exception:  # the loop itself must survive anything
                log.exception("orthanc-ai: worker error")
                time.sleep(1.0)

    def _triage_item(self, item: InboxItem) -> list[tuple[Job, Stored | None]]:
        """Triage one inbox item; its durable row goes once triage is over.

        On a transient error (Orthanc busy or restarting) the durable row
        stays and is taken again later; a stored-instance event is dropped,
        as its change-log twin will come; a stable-series event is kept in
        memory and tried again.
        """
        pending: list[tuple[Job, Stored | None]] = []
        try:
            if item.kind == "series":
                triage_series(self, item.resource)
            else:
                pending = self.triage(item.resource, item.queued_at,
                                      force=item.kind == "reprocess")
        except TransientError as exc:
            log.warning("orthanc-ai: triage postponed: %s", exc.reason)
            if item.row is None and item.kind != "instance":
                self._stop.wait(1.0)
                self._inbox.put(item)
            return pending
        if item.row is not None:
            self.store.ack_inbox(item.row)
        return pending

    def _next_item(self, timeout: float) -> InboxItem | None:
        """Next instance or series: the callback's fast path first, then the change log's."""
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            pass
        taken = self.store.take_from_inbox()
        if taken is not None or timeout <= 0:
            return taken
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    @contextmanager
    def _stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.metrics.stage_seconds.labels(name).observe(time.perf_counter() - t0)

    def _locate(self, instance_id: str) -> tuple[dict[str, Any], str, str, str]:
        """Orthanc's record of an instance, its study and series IDs, and Modality.

        A series' study and Modality never change: they are kept for the last
        few hundred series, as ``/series/{id}`` lists every instance (a
        1,000-slice CT would otherwise cost 1,000 such lists).
        """
        info = self.client.instance(instance_id)
        series_id = info["ParentSeries"]
        known = self._series_info.get(series_id)
        if known is None:
            series = self.client.get_json(f"/series/{series_id}")
            known = (series["ParentStudy"],
                     str(series.get("MainDicomTags", {}).get("Modality", "")))
            self._series_info[series_id] = known
            while len(self._series_info) > 512:
                self._series_info.popitem(last=False)
        return info, known[0], series_id, known[1]

    def _fetch(
        self, instance_id: str, queued_at: float, located: tuple | None = None
    ) -> Stored:
        """Download and parse one instance, refusing oversized files first."""
        with self._stage("fetch"):
            info, study, series, _ = located or self._locate(instance_id)
            size = int(info.get("FileSize", 0) or 0)
            if size > self.config.max_instance_bytes:
                raise BadInput(
                    f"instance file is {size / 2**20:.0f} MiB, over the "
                    f"{self.config.max_instance_bytes / 2**20:.0f} MiB cap (MaxInstanceBytes)"
                )
            data = self.client.instance_file(instance_id)
            try:
                ds = pydicom.dcmread(io.BytesIO(data))
            except (InvalidDicomError, EOFError, ValueError, OSError, KeyError) as exc:
                raise BadInput(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
            if "SOPClassUID" not in ds:
                # pydicom gives up silently on some truncated files (an empty dataset)
                raise BadInput("the file could not be parsed (truncated or corrupt)")
        return Stored(instance_id, study, series, ds, queued_at)

    def reprocess_study(self, study_id: str) -> dict[str, int]:
        """Decide again for every instance and series of a study.

        Jobs already done by the current model versions stay done (same SR);
        failed and dead ones run again; a new model version gets its own jobs.
        """
        instances = self.client.get_json(f"/studies/{study_id}/instances")
        series = sorted({i["ParentSeries"] for i in instances})
        requeued = 0
        for instance in instances:
            self.store.forget_instance_outcomes(instance["ID"])
            for job in self.store.for_instance(instance["ID"]):
                if job.state in ("failed", "dead") and self.store.requeue(job.id):
                    requeued += 1
        for job in self.store.list(study=study_id, state="failed") + self.store.list(
                study=study_id, state="dead"):
            if not job.instance and self.store.requeue(job.id):
                requeued += 1
        # Durable, so a stop before triage loses nothing; after the outcomes are
        # forgotten, so that triage may record new ones.
        self.store.push_inbox([("reprocess", i["ID"]) for i in instances]
                              + [("series", s) for s in series])
        return {"instances": len(instances), "series": len(series), "requeued": requeued}

    def triage(self, instance_id: str, queued_at: float | None = None,
               force: bool = False) -> list[tuple[Job, Stored]]:
        """Decide what to do with a newly stored instance; return its claimed jobs.

        Whatever happens, the instance ends with a job in a visible state,
        except our own SRs and slices whose series job will report on them.
        """
        queued_at = queued_at or time.time()
        if not force and (instance_id in self._without_job
                          or self.store.for_instance(instance_id)):
            return []  # seen before (resend, replayed change): handled or in progress
        try:
            return self._triage(instance_id, queued_at)
        except TransientError:
            raise  # Orthanc unreachable or overloaded: the inbox keeps the item
        except Exception as exc:
            log.exception("orthanc-ai: triage failed")
            self.store.add(instance_id, study=None, series=None, state="failed",
                           reason=f"internal error: {type(exc).__name__}: {exc}")
            self.metrics.finished.labels("failed").inc()
        return []

    def _triage(self, instance_id: str, queued_at: float) -> list[tuple[Job, Stored]]:
        try:
            located = self._locate(instance_id)
            meta = self.client.instance_metadata(instance_id)
        except InstanceGone:
            self.store.add(instance_id, study=None, series=None, state="skipped",
                           reason="instance deleted before it could be processed")
            return []
        _, study, series, modality = located
        sop_class = meta.get("SopClassUid", "")
        try:
            reason = non_image_reason(sop_class)
            if reason is not None:
                if self._is_own_output(instance_id, sop_class):
                    self._remember_without_job(instance_id)
                    return []
                raise SkipInput(reason)
            if not self.router.wants(modality, "instance"):
                if self.router.wants(modality, "series"):
                    self._remember_without_job(instance_id)
                    return []  # a slice of a volume: its series job reports on it
                raise SkipInput(f"no rule matched (Modality {modality or 'missing'})")
            stored = self._fetch(instance_id, queued_at, located)
            ds = stored.dataset
            if "PixelData" not in ds:
                raise SkipInput(f"non-image object ({sop_class_name(sop_class)})")
            cards = self.router.route(ds)
        except TransientError:
            raise
        except JobOutcome as exc:
            state = "skipped" if isinstance(exc, SkipInput) else "failed"
            self.store.add(instance_id, study=study, series=series, state=state,
                           reason=exc.reason)
            self.metrics.finished.labels(state).inc()
            return []
        pending = []
        for card in cards:
            job = self.store.add(instance_id, study=study, series=series,
                                 model=card.id, version=card.version)
            if job is not None and (claimed := self.store.claim(job.id)) is not None:
                pending.append((claimed, stored))
        return pending

    def _remember_without_job(self, instance_id: str) -> None:
        """Our SRs and volume slices get no job of their own: remember them, so
        that the change log's copy of their event costs no second triage."""
        self._without_job[instance_id] = None
        while len(self._without_job) > 20000:
            self._without_job.popitem(last=False)

    def _is_own_output(self, instance_id: str, sop_class: str) -> bool:
        if not sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
            return False
        try:
            tags = self.client.get_json(f"/instances/{instance_id}/simplified-tags")
        except TransientError:
            raise
        except JobOutcome:
            return False
        return tags.get("Manufacturer") == MANUFACTURER

    # -- one job -------------------------------------------------------------------

    def run_job(self, job: Job, stored: Stored | None = None) -> None:
        if not job.model:
            # An outcome decided before routing, retried by an operator: decide again.
            self.store.delete(job.id)
            self.store.push_inbox([("reprocess", job.instance) if job.instance
                                   else ("series", job.series or "")])
            return
        if job.instance:
            self.run_instance_jobs([(job, stored)])
            return
        with self._outcome(job) as done:
            card = self._card(job)
            done(analyse_series(self, job, card), job.created)

    def _card(self, job: Job) -> ModelCard:
        card = self.registry.cards.get(job.model)
        if card is None or card.version != job.model_version:
            raise BadInput(f"model {job.model} {job.model_version} is not loaded")
        return card

    @contextmanager
    def _outcome(self, job: Job):
        """Record how a job ended: ``done(result, queued_at)``, or the error's state."""

        def done(result: dict[str, Any], queued_at: float) -> None:
            self.store.finish(job.id, "done", result=result)
            self.metrics.finished.labels("done").inc()
            self.metrics.end_to_end.observe(max(0.0, time.time() - queued_at))

        try:
            yield done
        except TransientError as exc:
            self._retry_or_give_up(job, exc.reason)
            return
        except JobOutcome as exc:
            state = "skipped" if isinstance(exc, SkipInput) else "failed"
            self.store.finish(job.id, state, reason=exc.reason)
            self.metrics.finished.labels(state).inc()
            return
        except Exception as exc:
            # An unexpected error is a bug or a model failure; it may be transient.
            log.exception("orthanc-ai: job %d failed", job.id)
            self._retry_or_give_up(job, f"{type(exc).__name__}: {exc}")

    def run_instance_jobs(self, pending: list[tuple[Job, Stored | None]]) -> None:
        """Run instance jobs, one model call per model for all of them."""
        prepared: dict[str, list[tuple[Job, Stored, ModelInput]]] = {}
        for job, stored in pending:
            with self._outcome(job):
                card = self._card(job)
                if stored is None:
                    stored = self._fetch(job.instance, job.created)
                with self._stage("decode"):
                    prepared.setdefault(card.id, []).append(
                        (job, stored, self._prepare(card, stored.dataset)))
        for model_id, items in prepared.items():
            card = self.registry.cards[model_id]
            try:
                with self._stage("infer"):
                    outputs = self.backend.predict(card, _batch(card, [i[2] for i in items]))
            except Exception as exc:
                for job, _, _ in items:
                    with self._outcome(job):
                        raise exc
                continue
            for (job, stored, inputs), raw in zip(items, outputs, strict=True):
                with self._outcome(job) as done:
                    finding = to_finding(card, raw, inputs.image.geometry)
                    done(self.report(card, stored.dataset, finding, study=stored.study,
                                     missing=inputs.missing_inputs,
                                     notes=inputs.image.notes), stored.queued_at)

    @contextmanager
    def _own_store(self):
        """Our SR's arrival at Orthanc is not a modality's burst."""
        with self._own_lock:
            self._own_stores += 1
        try:
            yield
        finally:
            with self._own_lock:
                self._own_stores -= 1

    def _retry_or_give_up(self, job: Job, reason: str) -> None:
        if job.attempts >= self.config.max_attempts:
            self.store.finish(job.id, "dead",
                              reason=f"gave up after {job.attempts} attempt(s): {reason}")
            self.metrics.finished.labels("dead").inc()
            return
        delay = self.config.retry_backoff_seconds * (2 ** (job.attempts - 1))
        self.store.finish(job.id, "failed", reason=f"will retry in {delay:.0f} s: {reason}",
                          retry_at=time.time() + delay)
        self.metrics.finished.labels("failed").inc()

    def _prepare(self, card: ModelCard, ds: Dataset) -> ModelInput:
        rows, cols, _ = card.image.shape
        return prepare_radiograph(
            ds,
            canvas=(rows, cols),
            target_mm=card.image.pixel_spacing_mm,
            feature_names=card.metadata.features if card.metadata else (),
            max_pixel_bytes=self.config.max_pixel_bytes,
        )

    def report(self, card: ModelCard, source: Dataset, finding: Finding, *, study: str,
               missing: Sequence[str] = (), notes: Sequence[str] = (),
               uids: tuple[str, str] | None = None,
               predecessor: Dataset | None = None) -> dict[str, Any]:
        """Build the SR, store it into the source's study, and describe the result."""
        with self._stage("report"):
            sr = build_sr(source, card, [finding], missing_inputs=missing, notes=notes,
                          uids=uids, predecessor=predecessor)
            buffer = io.BytesIO()
            sr.save_as(buffer, enforce_file_format=True)
        with self._stage("store"), self._own_store():
            answer = self.client.store(buffer.getvalue())
        if answer.get("ParentStudy") not in (None, study):
            raise BadInput("the SR was filed under another study than its source")
        region = finding.region
        return {
            "finding": card.finding.meaning,
            "probability": round(finding.probability, 6),
            "positive": finding.positive,
            "threshold": finding.threshold,
            "region": None if region is None else [region.col0, region.row0,
                                                    region.col1, region.row1],
            "missing_inputs": list(missing),
            "notes": list(notes),
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "sr_series_instance_uid": str(sr.SeriesInstanceUID),
            "sr_instance": answer.get("ID"),
            "sr_status": answer.get("Status"),
        }
