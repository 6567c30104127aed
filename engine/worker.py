"""A worker process beside Orthanc: ``python -m engine.worker``, started by the plugin.

The supervisor (``plugin/supervisor.py``) writes one JSON line to our stdin:
the Orthanc configuration, the loopback URL and REST token, the node name
and the worker's index. After that, each line on stdin is a wake-up (an
instance was queued), and the end of stdin means Orthanc is gone: we stop.
Our stdout carries status lines back to the supervisor; our log is stderr.

Everything heavy lives here, never in Orthanc's process: pydicom decoding,
TensorFlow, highdicom. A codec that aborts, a model that leaks or runs out
of memory, takes this process down and the supervisor starts another; the
jobs it held are due again when its lease is released, with the death
counted as an attempt.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from inference.backend import HttpBackend, InProcessBackend
from inference.card import CardError
from inference.errors import TransientError
from inference.registry import Registry

from . import instance_job, priors, series_job
from .audit import Audit
from .audit import log_path as audit_log_path
from .config import parse_ai_section
from .context import Context
from .dimse import OrthancDimse
from .metrics import WorkerMetrics
from .sinks import dicom_forward, hl7_oru
from .sinks.dicom_forward import DicomForwardSink
from .sinks.hl7_oru import Hl7OruSink
from .sinks.orthanc_store import OrthancStoreSink
from .source import OrthancClient
from .stores import InboxKind, JobKind, JobState, open_store
from .triage import DIED_IN_TRIAGE, Triage, triage_failed

log = logging.getLogger("orthanc_ai")


class Worker:
    def __init__(self, ctx: Context, *, follow_changes: bool, wake: threading.Event,
                 stop: threading.Event) -> None:
        self.ctx = ctx
        self.triage = Triage(ctx)
        self.follow = follow_changes
        self.wake = wake
        self.stop = stop
        self.busy_since: float | None = None  # monotonic start of the current batch
        self.priors_asked: set[str] = set()  # studies whose priors job exists

    # -- the loop ------------------------------------------------------------

    def run(self) -> None:
        threads = [threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)]
        if self.follow:
            threads.append(threading.Thread(target=self._follow_changes, name="changes",
                                            daemon=True))
        for t in threads:
            t.start()
        while not self.stop.is_set():
            try:
                self.busy_since = time.monotonic()
                worked = self.step()
                self.busy_since = None
                if not worked:
                    self.wake.wait(self.ctx.config.changes_poll_seconds)
                    self.wake.clear()
            except Exception:  # the loop itself must survive anything
                self.busy_since = None
                log.exception("orthanc-ai: worker error")
                self.stop.wait(1.0)

    def step(self) -> bool:
        """Do one batch of work; False when there was nothing to do."""
        ctx = self.ctx
        job = ctx.ledger.claim_next()
        if job is not None:
            if job.kind == JobKind.PRIORS:
                self.run_priors(job)
            elif job.kind == JobKind.FORWARD:
                dicom_forward.run(ctx, job)
            elif job.kind == JobKind.HL7:
                hl7_oru.run(ctx, job)
            elif job.kind == JobKind.RETENTION:
                priors.run_retention(ctx, job)
            elif job.kind == JobKind.REVISE:
                priors.run_revision(ctx, job)
            elif not job.model:
                # An outcome decided before routing, retried by an operator: decide again.
                ctx.store.delete(job.id)
                kind = "reprocess" if job.instance else "series"
                ctx.store.push_inbox([(kind, job.instance or job.series or "")], again=True)
            elif job.instance:
                # One at a time: a job found after a worker's death may be what killed it.
                instance_job.run(ctx, self.triage.series_cache, [(job, None)])
            else:
                series_job.run(ctx, job)
            return True
        items = self._take_batch()
        if not items:
            return False
        claimed: list[tuple[Any, Any]] = []
        searches: list[Any] = []
        try:
            for item in items:
                self._triage(item, claimed, searches)
        finally:
            self._run(searches, claimed)
        return True

    def _run(self, searches: list[Any], claimed: list[tuple[Any, Any]]) -> None:
        """Run what this worker claimed, whatever happens: a claimed job never
        waits for its lease. Prior searches first (bounded by
        AI.Priors.DeadlineSeconds): the results compare with them."""
        ctx = self.ctx
        try:
            for job in searches:
                self.run_priors(job)
        finally:
            instance_job.run(ctx, self.triage.series_cache,
                             [(j, s) for j, s in claimed if j.instance])
            for job, _ in claimed:
                if not job.instance:
                    series_job.run(ctx, job)

    # -- priors --------------------------------------------------------------

    def _ask_priors(self, decision: Any, searches: list[Any]) -> None:
        """A priors job for each study that gets analysis jobs (once: keyed by study).

        Asked from the decision, before its inbox row is acknowledged: a worker
        killed in between triages the row again and asks again."""
        ctx = self.ctx
        if not priors.enabled(ctx):
            return
        for study in dict.fromkeys(j.study for j in decision.jobs
                                   if j.study and j.state == JobState.QUEUED):
            if study in self.priors_asked or priors.is_prior(ctx, study):
                continue
            job = ctx.ledger.record(priors.new_priors_job(study))
            if len(self.priors_asked) > 10000:
                self.priors_asked.clear()
            self.priors_asked.add(study)
            mine = ctx.ledger.claim(job) if job is not None else None
            if mine is not None:
                searches.append(mine)

    def run_priors(self, job: Any) -> None:
        try:
            priors.run(self.ctx, job, self.ctx.dimse, self.analyse_study)
        except Exception as exc:  # outside its outcome (the store): never left running
            log.exception("orthanc-ai: prior search %d failed", job.id)
            self.ctx.ledger.retry_or_give_up(job, f"internal error: {type(exc).__name__}",
                                            self.ctx.config.priors)

    def analyse_study(self, study: str, until: float) -> None:
        """Analyse a prior now, by the current model versions, and wait until every
        analysis of it has ended (some may be another worker's)."""
        ctx = self.ctx
        instances = ctx.source.get_json(f"/studies/{study}/instances")
        claimed: list[tuple[Any, Any]] = []
        late = False
        try:
            for i in instances:
                if time.time() > until:  # the rest waits for a later attempt
                    late = True
                    break
                self._record(self.triage.instance(i["ID"], time.time(), force=True), claimed)
            for series in sorted({i["ParentSeries"] for i in instances}):
                if late or time.time() > until:
                    late = True
                    break
                self._record(self.triage.series(series), claimed)
        finally:
            self._run([], claimed)
        if late:
            raise TransientError("the deadline passed while analysing the prior")
        while any(ctx.store.list(study=study, state=state, limit=1)
                  for state in ("queued", "running")):
            if time.time() > until:
                raise TransientError("the prior's analysis has not ended in time")
            self.stop.wait(0.2)

    def _take_batch(self) -> list[Any]:
        """Up to BatchSize inbox items, waiting at most BatchWaitMs to fill the batch."""
        ctx = self.ctx
        size, lease = ctx.config.batch_size, ctx.config.lease_seconds
        items = ctx.store.take_from_inbox(ctx.owner, size, lease)
        if not items or ctx.config.batch_wait_ms <= 0:
            return items
        deadline = time.monotonic() + ctx.config.batch_wait_ms / 1000.0
        while len(items) < size and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.wake.wait(min(left, 0.05))
            self.wake.clear()
            items += ctx.store.take_from_inbox(ctx.owner, size - len(items), lease)
        return items

    def _triage(self, item: Any, claimed: list[tuple[Any, Any]], searches: list[Any]) -> None:
        """Triage one inbox item, create and claim its jobs (into ``claimed``) and
        its study's prior search (into ``searches``); ack the row."""
        ctx = self.ctx
        if item.attempts > ctx.config.max_attempts:  # its triage killed the worker each time
            ctx.ledger.record(triage_failed(item, DIED_IN_TRIAGE))
            ctx.store.ack_inbox([item.row], ctx.owner)
            return
        try:
            decision = self.triage(item)
        except TransientError as exc:
            log.warning("orthanc-ai: triage postponed: %s", exc.reason)
            ctx.store.release_inbox([item.row], delay=2.0)
            return
        except Exception as exc:  # a bug: the traceback here, the type in the job
            log.exception("orthanc-ai: triage failed")
            ctx.ledger.record(triage_failed(
                item, f"internal error in triage: {type(exc).__name__}"))
            ctx.store.ack_inbox([item.row], ctx.owner)
            return
        self._record(decision, claimed)
        self._ask_priors(decision, searches)
        ctx.store.ack_inbox([item.row], ctx.owner)

    def _record(self, decision: Any, claimed: list[tuple[Any, Any]]) -> None:
        """Create a decision's jobs; the queued ones are claimed, with the fetched
        instance, into ``claimed`` as they are (so an error halfway loses none)."""
        for spec in decision.jobs:
            job = self.ctx.ledger.record(spec)
            if job is not None and spec.state == JobState.QUEUED:
                mine = self.ctx.ledger.claim(job)
                if mine is not None:
                    claimed.append((mine, decision.stored))

    # -- beside the loop -----------------------------------------------------

    def _heartbeat(self) -> None:
        """Renew our leases while we work, so no other worker takes our jobs."""
        period = max(0.5, self.ctx.config.lease_seconds / 3)
        while not self.stop.wait(period):
            since = self.busy_since
            if since is not None and time.monotonic() - since > self.ctx.config.job_timeout_seconds:
                # A hung codec or model cannot be interrupted from Python: leave,
                # and let the lease go, so the death counts against its input.
                log.error("orthanc-ai: a batch ran over JobTimeoutSeconds; the worker exits")
                os._exit(70)
            try:  # the store's connections are per thread: this one is the heartbeat's
                self.ctx.store.renew(self.ctx.owner, self.ctx.config.lease_seconds)
            except Exception as exc:
                log.warning("orthanc-ai: lease renewal failed: %s", type(exc).__name__)

    def changes_cursor(self) -> int:
        """Where the change log is read from; on the very first start, its end.

        Called before the worker says it is ready, so that a stop right after
        the first start still leaves the cursor: what is stored while the
        plugin is off is then analysed at the next start.
        """
        store = self.ctx.store
        saved = store.get_value("changes_cursor")
        if saved is None:
            last = int(self.ctx.source.get_json("/changes?last")["Last"])
            store.add_changes([], last)
            saved = store.get_value("changes_cursor") or str(last)
        return int(saved)

    def _follow_changes(self) -> None:
        """Copy NewInstance/StableSeries changes into the durable inbox, with the cursor.

        The stored-instance callback is the fast path; this is the path that
        survives crashes (an instance stored just before a kill -9, or while
        the plugin was off). On the very first start the cursor begins at the
        end of the log: enabling the plugin does not re-analyse the archive.
        """
        ctx = self.ctx
        store, source = ctx.store, ctx.source  # both keep a connection per thread
        kinds = {"NewInstance": InboxKind.INSTANCE, "StableSeries": InboxKind.SERIES}
        cursor: int | None = None
        while not self.stop.is_set():
            try:
                if cursor is None:
                    cursor = self.changes_cursor()
                page = source.changes(cursor, limit=500)
                items = [(kinds[c["ChangeType"]], c["ID"])
                         for c in page.get("Changes", []) if c.get("ChangeType") in kinds]
                last = int(page.get("Last", cursor))
                if items or last != cursor:
                    store.add_changes(items, last)
                    cursor = last
                    if items:
                        self.wake.set()
                if page.get("Done", True):
                    self.stop.wait(ctx.config.changes_poll_seconds)
            except Exception as exc:  # Orthanc busy or stopping: try again shortly
                log.warning("orthanc-ai: reading the change log failed: %s",
                            getattr(exc, "reason", type(exc).__name__))
                self.stop.wait(2.0)


# -- the process ---------------------------------------------------------------

def _status(**fields: Any) -> None:
    """A status line for the supervisor (never the token or patient data)."""
    try:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _read_stdin(wake: threading.Event, stop: threading.Event) -> None:
    """Each line wakes us; end of input means Orthanc is gone.

    Orthanc stops us with SIGTERM first, so an end of input without it means
    Orthanc died (kill -9, a crash). Leave at once: what we hold stays leased
    and is run again by whoever takes it (this node restarted, or another),
    instead of being failed here against an Orthanc that is not there.
    """
    for _ in sys.stdin:
        wake.set()
    if not stop.is_set():
        log.warning("orthanc-ai: Orthanc is gone; the worker leaves its jobs to the next")
        os._exit(0)
    # Stopping already (SIGTERM): finish the batch, but be gone soon.
    threading.Timer(15.0, lambda: os._exit(0)).start()


def build_context(boot: dict[str, Any]) -> Context:
    ai = parse_ai_section(boot["configuration"].get("AI"))
    store = open_store(boot["store"])
    source = OrthancClient(boot["orthanc_url"], boot["token"], timeout=ai.http_timeout_seconds)
    registry = Registry.scan(ai.models_directory)
    router = ai.router(registry.cards)
    if boot.get("model_server_url"):
        backend: Any = HttpBackend(boot["model_server_url"], timeout=ai.http_timeout_seconds,
                                   startup_wait=180.0)
    elif ai.backend == "http":
        backend = HttpBackend(ai.model_server_url, timeout=ai.http_timeout_seconds)
    else:
        backend = InProcessBackend(intra_op_threads=ai.tensorflow_threads)
    configuration = boot["configuration"]
    # The plugin names the log (it resolves a relative StorageDirectory as Orthanc does).
    audit = Audit.open(ai.audit, Path(boot.get("audit_log") or audit_log_path(
        Path(configuration.get("StorageDirectory", "OrthancStorage")))),
        source_id=boot["node"], aet=str(configuration.get("DicomAet") or "ORTHANC"))
    ctx = Context(config=ai, source=source, store=store, backend=backend, registry=registry,
                  router=router, sinks=[], metrics=WorkerMetrics(),
                  owner=f"{boot['node']}/{os.getpid()}",
                  dimse=OrthancDimse(source, configuration, audit=audit), audit=audit)
    ctx.sinks = [OrthancStoreSink(source, store, audit), DicomForwardSink(ctx),
                 Hl7OruSink(ctx)]
    return ctx


def load_models(ctx: Context) -> dict[str, Any]:
    states: dict[str, Any] = {}
    for card in list(ctx.registry.cards.values()):
        try:
            ctx.backend.load(card)
            states[card.id] = {"state": "loaded", "version": card.version}
        except CardError as exc:
            ctx.registry.disable(card.id, str(exc))
            states[card.id] = {"state": "disabled", "reason": str(exc)}
        except Exception as exc:  # a model that cannot load must not stop the others
            log.exception("orthanc-ai: model %s failed to load", card.id)
            ctx.registry.disable(card.id, f"cannot be loaded: {type(exc).__name__}: {exc}")
            states[card.id] = {"state": "disabled", "reason": f"cannot be loaded: {exc}"}
    return states


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    from .logsafe import make_safe  # tracebacks without values from DICOM files

    for handler in logging.getLogger().handlers:
        make_safe(handler)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per module copied
    # pydicom warns about an invalid value by quoting it: patient data in a log.
    # Our SR builder checks every value it copies, and says what it changed.
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    line = sys.stdin.readline()
    if not line:
        return 1
    boot = json.loads(line)
    stop, wake = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), wake.set()))
    threading.Thread(target=_read_stdin, args=(wake, stop), daemon=True).start()
    ctx = build_context(boot)
    models = load_models(ctx)
    worker = Worker(ctx, follow_changes=boot.get("index", 0) == 0, wake=wake, stop=stop)
    if worker.follow:
        while not stop.is_set():
            try:
                worker.changes_cursor()
                break
            except Exception as exc:  # Orthanc still starting: its REST API answers soon
                log.warning("orthanc-ai: the change log cannot be read yet: %s",
                            getattr(exc, "reason", type(exc).__name__))
                stop.wait(1.0)
    log.warning("orthanc-ai: worker %s ready, models %s", ctx.owner, sorted(models))
    _status(event="ready", pid=os.getpid(), models=models)
    worker.run()
    log.warning("orthanc-ai: worker %s stopped", ctx.owner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
