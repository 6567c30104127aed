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


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (what a histogram
    can tell; None past its last finite bucket)."""
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return None if bound == float("inf") else bound
    return None


def latency_summary(folder: Path) -> dict[str, Any]:
    """The workers' latency histograms, summed over processes, for a person to read:
    per stage and end to end, ``count``, ``mean_s``, ``p50_s`` and ``p95_s`` (bucket
    upper bounds), and the jobs finished by state."""
    out: dict[str, Any] = {"stages": {}, "end_to_end": None, "finished": {}}
    if not folder.is_dir():
        return out
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    histograms: dict[tuple[str, str], dict[str, Any]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if family.name == "orthanc_ai_jobs_finished" and sample.name.endswith("_total"):
                state = sample.labels.get("state", "")
                out["finished"][state] = out["finished"].get(state, 0) + int(sample.value)
                continue
            if family.name not in ("orthanc_ai_stage_seconds", "orthanc_ai_end_to_end_seconds"):
                continue
            h = histograms.setdefault((family.name, sample.labels.get("stage", "")),
                                      {"buckets": [], "count": 0.0, "sum": 0.0})
            if sample.name.endswith("_bucket"):
                h["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                h["count"] = sample.value
            elif sample.name.endswith("_sum"):
                h["sum"] = sample.value
    for (name, stage), h in histograms.items():
        count = h["count"]
        if not count:
            continue
        buckets = sorted(h["buckets"])
        described = {"count": int(count), "mean_s": round(h["sum"] / count, 4),
                     "p50_s": _quantile(buckets, count, 0.5),
                     "p95_s": _quantile(buckets, count, 0.95)}
        if name == "orthanc_ai_end_to_end_seconds":
            out["end_to_end"] = described
        else:
            out["stages"][stage] = described
    return out
