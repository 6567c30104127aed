"""REST routes under ``/ai/``, as plain functions of the request.

The adapter registers them with Orthanc, so Orthanc's own authentication
and authorisation apply. Each returns (HTTP status, content type, body).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from .jobs import STATES
from .service import Service

Response = tuple[int, str, bytes]
JSON = "application/json"


def _json(status: int, value: Any) -> Response:
    return status, JSON, json.dumps(value, indent=2).encode()


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


class Api:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[tuple[str, str, Callable[..., Response]]]:
        """(regex for Orthanc, HTTP method, handler(query, *groups))."""
        return [
            ("/ai/jobs", "GET", self.list_jobs),
            ("/ai/jobs/([0-9]+)", "GET", self.get_job),
            ("/ai/jobs/([0-9]+)/retry", "POST", self.retry_job),
            ("/ai/studies/([0-9a-f-]+)/reprocess", "POST", self.reprocess_study),
            ("/ai/models", "GET", self.models),
            ("/ai/metrics", "GET", self.metrics),
        ]

    def list_jobs(self, query: Mapping[str, str]) -> Response:
        state = query.get("state")
        if state is not None and state not in STATES:
            return _error(400, f"state must be one of {', '.join(STATES)}")
        try:
            since = int(query.get("since", "0"))
            limit = min(int(query.get("limit", "1000")), 10000)
        except ValueError:
            return _error(400, "since and limit must be integers")
        jobs = self.service.store.list(
            state=state,
            study=query.get("study"),
            model=query.get("model"),
            instance=query.get("instance"),
            series=query.get("series"),
            since_id=since,
            limit=limit,
        )
        return _json(200, [j.as_json() for j in jobs])

    def get_job(self, query: Mapping[str, str], job_id: str) -> Response:
        job = self.service.store.get(int(job_id))
        return _json(200, job.as_json()) if job else _error(404, f"no job {job_id}")

    def retry_job(self, query: Mapping[str, str], job_id: str) -> Response:
        job = self.service.store.requeue(int(job_id))
        if job is None:
            return _error(409, f"job {job_id} does not exist or is running")
        return _json(200, job.as_json())

    def reprocess_study(self, query: Mapping[str, str], study_id: str) -> Response:
        from inference.errors import JobOutcome

        try:
            return _json(200, self.service.reprocess_study(study_id))
        except JobOutcome as exc:
            return _error(404, exc.reason)

    def models(self, query: Mapping[str, str]) -> Response:
        # "ready": weights are loaded and workers are taking jobs.
        return _json(200, {"ready": self.service.wait_ready(0), **self.service.registry.describe()})

    def metrics(self, query: Mapping[str, str]) -> Response:
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.service.metrics.render()
