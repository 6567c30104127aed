"""Prometheus metrics served at ``GET /ai/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _StateCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]], inbox: Callable[[], int]) -> None:
        self._counts = counts
        self._inbox = inbox

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        jobs = GaugeMetricFamily("orthanc_ai_jobs", "Jobs by state", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        depth = counts.get("queued", 0) + counts.get("running", 0) + self._inbox()
        yield GaugeMetricFamily(
            "orthanc_ai_queue_depth",
            "Instances and jobs waiting or running (in-memory inbox + queued + running)",
            value=depth,
        )


class Metrics:
    def __init__(self, counts: Callable[[], dict[str, int]], inbox: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(counts, inbox))
        self.stage_seconds = Histogram(
            "orthanc_ai_stage_seconds",
            "Time per pipeline stage",
            ["stage"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.finished = Counter(
            "orthanc_ai_jobs_finished", "Jobs that reached a state", ["state"],
            registry=self.registry,
        )
        self.deferred_seconds = Counter(
            "orthanc_ai_ingest_deferred_seconds",
            "Time workers waited for a burst of incoming instances to pass",
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "orthanc_ai_end_to_end_seconds",
            "From the instance being queued to its SR stored",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
