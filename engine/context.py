"""The ports a job runs with: one object handed to triage and to every job.

Nothing in a job reaches for a global: tests build a context with a fake
Orthanc source, an in-memory store and a fake back end, and drive the
pipeline without Orthanc.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from inference.backend import Backend
from inference.registry import Registry
from inference.routing import Router

from .audit import Audit
from .audit import null as no_audit
from .config import AIConfig
from .ledger import Ledger
from .metrics import WorkerMetrics
from .sinks import Report, ResultSink
from .source import OrthancSource
from .stores import JobStore


@dataclass
class Context:
    config: AIConfig
    source: OrthancSource
    store: JobStore
    backend: Backend
    registry: Registry
    router: Router
    sinks: Sequence[ResultSink]
    metrics: WorkerMetrics
    owner: str  # "node/pid": whose leases these are
    dimse: Any = None  # engine.dimse.OrthancDimse: C-FIND, C-MOVE, C-STORE through Orthanc
    clock: Callable[[], float] = time.time
    audit: Audit = field(default_factory=no_audit)  # the IHE ATNA trail (engine/audit)
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.store, self.metrics, self.config, self.owner, self.clock)

    @property
    def node(self) -> str:
        return self.owner.rsplit("/", 1)[0]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_seconds.labels(name).observe(time.perf_counter() - t0)

    def deliver(self, report: Report) -> dict[str, Any]:
        """Hand a report to every sink, in order; their answers, merged (a sink sees
        what the ones before it answered in ``report.extra``, e.g. ``sr_instance``)."""
        out: dict[str, Any] = {}
        for sink in self.sinks:
            with self.stage(f"sink_{sink.name}"):
                out.update(sink.deliver(report))
            report.extra.update(out)
        return out


def sr_file(sr: Any) -> bytes:
    """The SR as a DICOM Part 10 file: what ``save_as`` writes, faster for build_sr's SRs."""
    from inference.report import sr_bytes

    return sr_bytes(sr)
