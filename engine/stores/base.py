"""What every job store offers: jobs with leases, a durable inbox, a few values.

One job is one (input, model id, model version). Its key is unique, so an
input seen twice (a resend, a replayed change) never runs a model version
twice. Outcomes decided before a model is chosen (non-image object, no
model applies, instance vanished) are jobs with an empty model.

States: ``queued`` -> ``running`` -> ``done`` | ``skipped`` | ``failed`` |
``dead``. ``failed`` with a ``not_before`` time will be retried then (a
transient error); ``failed`` without one failed for good (a broken input,
or an input whose analysis killed its worker ``MaxAttempts`` times).
``dead`` means transient errors used up all attempts.

A claim is a lease: the claiming worker (``owner``, "node/pid") renews it
while it works. A job whose lease ran out (its worker or its whole node
died) is due again, with the death counted as an attempt; nothing is moved
back at start-up, so any node can take over any other node's work.

The inbox holds instances, series and studies to triage, from Orthanc's
callbacks and its change log. A triaged row stays, marked done, for an hour:
the change log's copy of an event the callback already delivered is then
ignored by the insert instead of being triaged a second time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    DEAD = "dead"


STATES = tuple(s.value for s in JobState)


class JobKind(StrEnum):
    """What a job does; every kind goes through the same claims, leases and retries."""

    ANALYSIS = "analysis"  # one input (instance or series), one model version: an SR
    PRIORS = "priors"  # find (and fetch) the prior studies of a study
    FORWARD = "forward"  # send one SR to one DICOM destination (C-STORE)
    RETENTION = "retention"  # a study fetched only for comparison; removed when due
    REVISE = "revise"  # rebuild an analysis' SR with the comparison that came later
    HL7 = "hl7"  # send one ORU^R01 for one SR to the RIS (MLLP)


class InboxKind(StrEnum):
    INSTANCE = "instance"  # a stored instance (callback or change log)
    SERIES = "series"  # a stable series (volumes)
    REPROCESS = "reprocess"  # an instance to decide again (operator)
    STUDY = "study"  # every instance and series of a study, again (operator)


DIED_REASON = "the worker died while analysing this input"
INBOX_DONE_KEEP_SECONDS = 3600.0


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def job_key(instance: str, model: str = "", version: str = "") -> str:
    return f"{instance}|{model}|{version}"


@dataclass(frozen=True)
class NewJob:
    """A job that triage decided should exist (queued, or an outcome at once)."""

    instance: str  # Orthanc ID; "" for a series job
    study: str | None
    series: str | None
    model: str = ""
    version: str = ""
    state: JobState = JobState.QUEUED
    reason: str | None = None
    key: str | None = None  # default: job_key(instance, model, version)
    kind: JobKind = JobKind.ANALYSIS
    not_before: float = 0.0  # a queued job is not due before this time

    @property
    def job_key(self) -> str:
        return self.key or job_key(self.instance, self.model, self.version)


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    instance: str
    study: str | None
    series: str | None
    model: str
    model_version: str
    state: str
    reason: str | None
    attempts: int
    created: float
    updated: float
    not_before: float
    result: dict[str, Any] | None
    node: str | None = None  # the node whose worker ran (or runs) it
    deaths: int = 0  # times its worker died while running it
    kind: str = JobKind.ANALYSIS.value

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "model": self.model or None,
            "model_version": self.model_version or None,
            "level": "instance" if self.instance else "series",
            "instance": self.instance or None,
            "study": self.study,
            "series": self.series,
            "attempts": self.attempts,
            "next_attempt": iso(self.not_before) if self.not_before else None,
            "reason": self.reason,
            "node": self.node,
            "created": iso(self.created),
            "updated": iso(self.updated),
            "result": self.result,
        }


def job_from_row(row: Any) -> Job:
    """A ``jobs`` row (a mapping by column name, as both stores return) as a Job."""
    return Job(
        id=row["id"], key=row["job_key"], instance=row["instance"], study=row["study"],
        series=row["series"], model=row["model"], model_version=row["model_version"],
        state=row["state"], reason=row["reason"], attempts=row["attempts"],
        created=row["created"], updated=row["updated"],
        not_before=row["not_before"] if row["state"] in ("failed", "queued") else 0.0,
        result=json.loads(row["result"]) if row["result"] else None,
        node=row["node"], deaths=row["deaths"], kind=row["kind"],
    )


@dataclass(frozen=True)
class InboxItem:
    """An instance, series or study to triage; ``row`` identifies its inbox row."""

    kind: InboxKind
    resource: str  # Orthanc ID
    queued_at: float
    row: int
    attempts: int = 1  # takes so far, this one included


class JobStore(Protocol):
    """The job store the plugin and the workers share (SQLite or PostgreSQL)."""

    url: str  # where it lives, for logs and /ai/health (no password)

    def close(self) -> None: ...

    # -- jobs ----------------------------------------------------------------
    def add(self, job: NewJob) -> Job | None:
        """Create the job unless its key exists; the new job, or None."""

    def claim(self, job_id: int, owner: str, lease_seconds: float) -> Job | None:
        """Move one queued job to running under ``owner``, counting an attempt."""

    def claim_next(self, owner: str, lease_seconds: float, max_attempts: int) -> Job | None:
        """The oldest due job: queued, failed and past its back-off, or running
        with an expired lease (a death: counted; at ``max_attempts`` it ends
        ``failed`` with :data:`DIED_REASON` instead of being returned)."""

    def renew(self, owner: str, lease_seconds: float) -> int:
        """Extend the leases of every job and inbox row ``owner`` holds."""

    def release_owner(self, owner: str) -> int:
        """``owner`` died: its leases expire now (its jobs are due at once)."""

    def release_node(self, node: str) -> int:
        """``node`` starts again: the leases of its former workers expire now."""

    def finish(self, job_id: int, state: JobState, *, reason: str | None = None,
               result: dict[str, Any] | None = None, retry_at: float = 0.0,
               owner: str | None = None) -> bool:
        """Record how a job ended; with ``owner``, only if it still holds the job."""

    def requeue(self, job_id: int, not_before: float = 0.0) -> Job | None:
        """A job that is not running goes back to the queue (an operator's retry, a
        revision), due at ``not_before``; its attempts start again."""

    def delete(self, job_id: int) -> None: ...
    def get(self, job_id: int) -> Job | None: ...
    def by_key(self, key: str) -> Job | None: ...
    def for_instance(self, instance: str) -> list[Job]:
        """The analysis jobs and outcomes of an instance."""

    def list(self, *, state: str | None = None, study: str | None = None,
             model: str | None = None, instance: str | None = None,
             series: str | None = None, node: str | None = None, since_id: int = 0,
             kind: str | None = JobKind.ANALYSIS.value, limit: int = 1000,
             newest_first: bool = False) -> list[Job]:
        """Jobs by id (``newest_first``: the latest ``limit``, highest id first);
        ``kind=None``: every kind."""

    def counts(self, kind: str | None = JobKind.ANALYSIS.value) -> dict[str, int]: ...

    def forget_instance_outcomes(self, instance: str) -> int:
        """Drop instance-level outcomes (decided before routing), to decide again."""

    # -- inbox ---------------------------------------------------------------
    def push_inbox(self, items: list[tuple[InboxKind, str]], *, again: bool = False) -> None:
        """Queue items durably; ``again`` re-opens an item already triaged."""

    def mark_triaged(self, items: list[tuple[InboxKind, str]]) -> None:
        """Record items as already triaged (our own SR, before we store it), so
        that their callback and change-log events cost nothing."""

    def add_changes(self, items: list[tuple[InboxKind, str]], cursor: int) -> None:
        """Queue change-log items and advance the cursor in one transaction.

        An instance already queued or triaged is ignored; a series is re-opened,
        since each stable-series change may follow new slices."""

    def take_from_inbox(self, owner: str, limit: int, lease_seconds: float) -> list[InboxItem]:
        """The oldest untriaged items, leased to ``owner`` until acknowledged."""

    def ack_inbox(self, rows: list[int], owner: str | None = None) -> None:
        """Triage of these rows is over. With ``owner``, only rows it still holds:
        a row re-opened meanwhile (a series that changed again) stays to do."""

    def release_inbox(self, rows: list[int], delay: float) -> None:
        """Triage met a transient error: take these rows again after ``delay``,
        without counting the take."""

    def inbox_size(self) -> int:
        """Rows not yet triaged."""

    # -- values (the change-log cursor) --------------------------------------
    def get_value(self, key: str) -> str | None: ...
    def set_value(self, key: str, value: str) -> None: ...
