"""The one place where jobs end: done, skipped, failed, retried or dead, and counted.

Like pynetdicom's ``attempt``: one catch-all per job records the reason and
the worker goes on. Only the worker that still holds a job's lease may end
it, so a job taken over by another node is never overwritten late.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from inference.errors import JobOutcome, SkipInput, TransientError

from .config import AIConfig
from .metrics import WorkerMetrics
from .stores import Job, JobState, JobStore, NewJob

log = logging.getLogger("orthanc_ai")

Done = Callable[[dict[str, Any], float | None], None]


class RetryPolicy(Protocol):
    """How often and how soon a job is retried (AI, AI.Priors, AI.Forward)."""

    max_attempts: int
    retry_backoff_seconds: float


@dataclass
class Ledger:
    store: JobStore
    metrics: WorkerMetrics
    config: AIConfig
    owner: str
    clock: Callable[[], float]

    def record(self, job: NewJob) -> Job | None:
        """Create a job; an outcome decided at once (skipped, failed) is counted."""
        created = self.store.add(job)
        if created is not None and job.state != JobState.QUEUED:
            self.metrics.finished.labels(JobState(job.state).value).inc()
        return created

    def claim(self, job: Job) -> Job | None:
        return self.store.claim(job.id, self.owner, self.config.lease_seconds)

    def claim_next(self) -> Job | None:
        job = self.store.claim_next(self.owner, self.config.lease_seconds,
                                    self.config.max_attempts)
        if job is not None and job.deaths:
            self.metrics.worker_deaths.inc()
        return job

    def finish(self, job: Job, state: JobState, **kw: Any) -> None:
        if self.store.finish(job.id, state, owner=self.owner, **kw):
            self.metrics.finished.labels(state.value).inc()
        else:
            log.warning("orthanc-ai: job %d was taken over before it ended here", job.id)

    def retry_or_give_up(self, job: Job, reason: str, policy: RetryPolicy | None = None) -> None:
        policy = policy or self.config
        if job.attempts >= policy.max_attempts:
            self.finish(job, JobState.DEAD,
                        reason=f"gave up after {job.attempts} attempt(s): {reason}")
            return
        delay = policy.retry_backoff_seconds * (2 ** min(job.attempts - 1, 30))
        delay = min(delay, getattr(policy, "max_backoff_seconds", delay))
        self.finish(job, JobState.FAILED, reason=f"will retry in {delay:.0f} s: {reason}",
                    retry_at=self.clock() + delay)

    @contextmanager
    def outcome(self, job: Job, policy: RetryPolicy | None = None) -> Iterator[Done]:
        """Run a job's body: ``done(result, queued_at)``, or its error's state.

        ``queued_at`` (when the input arrived) is counted in the end-to-end
        latency; None for jobs that are not analyses."""

        def done(result: dict[str, Any], queued_at: float | None) -> None:
            self.finish(job, JobState.DONE, result=result)
            if queued_at is not None:
                self.metrics.end_to_end.observe(max(0.0, self.clock() - queued_at))

        try:
            yield done
        except TransientError as exc:
            self.retry_or_give_up(job, exc.reason, policy)
        except JobOutcome as exc:
            state = JobState.SKIPPED if isinstance(exc, SkipInput) else JobState.FAILED
            self.finish(job, state, reason=exc.reason)
        except Exception as exc:
            # Unexpected: a bug or a model failure; it may be transient. The
            # traceback goes to the worker's log, the type to the job.
            log.exception("orthanc-ai: job %d failed", job.id)
            self.retry_or_give_up(job, f"internal error: {type(exc).__name__}", policy)
