"""Prometheus metrics: counted in the worker processes, served by the plugin.

Workers count with prometheus_client's multi-process mode (one file per
process in a folder named by ``PROMETHEUS_MULTIPROC_DIR``, set by the
supervisor before the worker imports prometheus_client); the plugin's
``GET /ai/metrics`` adds them up and adds the job store's gauges. Counts
survive a worker's restart, since its files stay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
END_TO_END_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class WorkerMetrics:
    """What a worker counts (prometheus_client must see the folder before import)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        reg = registry if registry is not None else REGISTRY
        self.stage_seconds = Histogram(
            "orthanc_ai_stage_seconds", "Time per pipeline stage", ["stage"],
            buckets=STAGE_BUCKETS, registry=reg)
        self.finished = Counter(
            "orthanc_ai_jobs_finished", "Jobs that reached a state", ["state"], registry=reg)
        self.end_to_end = Histogram(
            "orthanc_ai_end_to_end_seconds", "From the instance being queued to its SR stored",
            buckets=END_TO_END_BUCKETS, registry=reg)
        self.worker_deaths = Counter(
            "orthanc_ai_job_worker_deaths", "Jobs found running after their worker died",
            registry=reg)


def render(folder: Path, counts: Callable[..., dict[str, int]], inbox: Callable[[], int],
           workers: Callable[[], dict[str, int]]) -> bytes:
    """The text exposition of the workers' counts and the store's gauges."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    class _State(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            jobs = GaugeMetricFamily("orthanc_ai_jobs", "Jobs by state", labels=["state"])
            by_state = counts()
            for state, n in by_state.items():
                jobs.add_metric([state], n)
            yield jobs
            others = GaugeMetricFamily(
                "orthanc_ai_jobs_of_kind", "Prior searches (priors), deliveries (forward) and "
                "fetched priors kept (retention), by state", labels=["kind", "state"])
            for kind in ("priors", "forward", "retention"):
                for state, n in counts(kind=kind).items():
                    others.add_metric([kind, state], n)
            yield others
            yield GaugeMetricFamily(
                "orthanc_ai_queue_depth", "Inbox rows not yet triaged, plus queued and "
                "running jobs", value=by_state.get("queued", 0) + by_state.get("running", 0)
                + inbox())
            alive = GaugeMetricFamily("orthanc_ai_workers", "Worker processes of this node",
                                      labels=["state"])
            for state, n in workers().items():
                alive.add_metric([state], n)
            yield alive

    registry = CollectorRegistry()
    if folder.is_dir():
        MultiProcessCollector(registry, path=str(folder))
    registry.register(_State())
    return generate_latest(registry)
