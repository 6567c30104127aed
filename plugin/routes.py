"""REST routes under ``/ai/``, as plain functions of the request.

The adapter registers them with Orthanc, so Orthanc's own authentication
and authorisation apply. Each returns (HTTP status, content type, body).
Every parameter is checked: a wrong one is a 400 that names it, never a 500.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from engine.deliveries import deliveries
from engine.metrics import render
from engine.stores import STATES, InboxKind, JobKind

if TYPE_CHECKING:
    from .adapter import Plugin

Response = tuple[int, str, bytes]
JSON = "application/json"
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_ID = 2**63 - 1
MAX_LIMIT = 10000


class BadRequest(ValueError):
    pass


def _json(status: int, value: Any) -> Response:
    return status, JSON, json.dumps(value, indent=2).encode()


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw.strip()):
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def _id(value: str, name: str) -> str:
    if not ORTHANC_ID.fullmatch(value):
        raise BadRequest(f"{name} must be an Orthanc ID (five groups of 8 hex digits)")
    return value


def _job_id(value: str) -> int:
    if len(value) > 19 or int(value) > MAX_ID:
        raise BadRequest("job id out of range")
    return int(value)


class Api:
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def routes(self) -> list[tuple[str, str, Callable[..., Response]]]:
        """(regex for Orthanc, HTTP method, handler(query, *groups))."""
        return [
            ("/ai/jobs", "GET", self.list_jobs),
            ("/ai/jobs/([0-9]+)", "GET", self.get_job),
            ("/ai/jobs/([0-9]+)/retry", "POST", self.retry_job),
            ("/ai/deliveries", "GET", self.list_deliveries),
            ("/ai/studies/([^/]+)/reprocess", "POST", self.reprocess_study),
            ("/ai/models", "GET", self.models),
            ("/ai/health", "GET", self.health),
            ("/ai/metrics", "GET", self.metrics),
        ]

    def list_jobs(self, query: Mapping[str, str]) -> Response:
        try:
            filters = self._job_filters(query)
        except BadRequest as exc:
            return _error(400, str(exc))
        return _json(200, [j.as_json() for j in self.plugin.store.list(**filters)])

    @staticmethod
    def _job_filters(query: Mapping[str, str]) -> dict[str, Any]:
        unknown = sorted(set(query) - {"", "state", "study", "series", "instance", "model", "node",
                                       "since", "limit", "kind"})
        if unknown:
            raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}")
        state = query.get("state")
        if state is not None and state not in STATES:
            raise BadRequest(f"state must be one of {', '.join(STATES)}")
        filters: dict[str, Any] = {"state": state}
        for name in ("study", "series", "instance"):
            if query.get(name) is not None:
                filters[name] = _id(query[name], name)
        model = query.get("model")
        if model is not None and not MODEL_ID.fullmatch(model):
            raise BadRequest("model must be a model id (letters, digits, . _ -)")
        node = query.get("node")
        if node is not None and not 0 < len(node) <= 200:
            raise BadRequest("node must be 1 to 200 characters")
        kind = query.get("kind", JobKind.ANALYSIS.value)
        kinds = [k.value for k in JobKind]
        if kind not in (*kinds, "all"):
            raise BadRequest(f"kind must be one of {', '.join(kinds)}, all")
        filters.update(model=model, node=node,
                       since_id=_int(query, "since", 0, 0, MAX_ID),
                       limit=_int(query, "limit", 1000, 1, MAX_LIMIT),
                       kind=None if kind == "all" else kind)
        return filters

    def list_deliveries(self, query: Mapping[str, str]) -> Response:
        """Delivered SRs: one entry per (destination, SR), with its delivery state; C-STORE
        forwards (kind "forward") and HL7 ORU messages (kind "hl7"), by id."""
        kinds = (JobKind.FORWARD.value, JobKind.HL7.value)
        try:
            kind = query.get("kind")
            if kind is not None and kind not in kinds:
                raise BadRequest(f"kind must be one of {', '.join(kinds)}")
            filters = self._job_filters({**query, "kind": JobKind.FORWARD.value})
        except BadRequest as exc:
            return _error(400, str(exc))
        jobs = [job for k in ((kind,) if kind else kinds)
                for job in self.plugin.store.list(**{**filters, "kind": k})]
        jobs.sort(key=lambda job: job.id)
        return _json(200, deliveries(jobs[:filters["limit"]]))

    def get_job(self, query: Mapping[str, str], job_id: str) -> Response:
        try:
            job = self.plugin.store.get(_job_id(job_id))
        except BadRequest as exc:
            return _error(400, str(exc))
        if job is None:
            return _error(404, f"no job {job_id}")
        described = job.as_json()
        sr = (job.result or {}).get("sr_instance")
        if job.kind == JobKind.ANALYSIS and sr:
            sent = [j for k in (JobKind.FORWARD.value, JobKind.HL7.value)
                    for j in self.plugin.store.list(kind=k, instance=sr)]
            described["deliveries"] = deliveries(sorted(sent, key=lambda j: j.id))
        return _json(200, described)

    def retry_job(self, query: Mapping[str, str], job_id: str) -> Response:
        try:
            found = self.plugin.store.get(_job_id(job_id))
        except BadRequest as exc:
            return _error(400, str(exc))
        if found is not None and found.kind == JobKind.RETENTION:
            return _error(409, f"job {job_id} removes a fetched prior at its due time; "
                               "it is not retried")
        job = self.plugin.store.requeue(int(job_id))
        if job is None:
            return _error(409, f"job {job_id} does not exist or is running")
        if self.plugin.supervisor is not None:
            self.plugin.supervisor.wake()
        return _json(200, job.as_json())

    def reprocess_study(self, query: Mapping[str, str], study_id: str) -> Response:
        try:
            _id(study_id, "study")
        except BadRequest as exc:
            return _error(400, str(exc))
        if not self._study_exists(study_id):
            return _error(404, f"no study {study_id}")
        # Durable: a stop before a worker expands it loses nothing.
        self.plugin.store.push_inbox([(InboxKind.STUDY, study_id)], again=True)
        if self.plugin.supervisor is not None:
            self.plugin.supervisor.wake()
        return _json(200, {"study": study_id, "queued": True})

    def _study_exists(self, study_id: str) -> bool:
        # Loopback HTTP, not the SDK: see plugin/adapter.py and DESIGN.md.
        import orthanc

        request = urllib.request.Request(
            f"{self.plugin.base_url}/studies/{study_id}",
            headers={"Authorization": orthanc.GenerateRestApiAuthorizationToken()})
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if self.plugin.base_url.startswith("https://"):
            # Loopback to our own Orthanc: its certificate names the public host.
            handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=10):
                return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise

    def models(self, query: Mapping[str, str]) -> Response:
        """The installed models; ``ready``: a worker has loaded them and takes jobs."""
        sup = self.plugin.supervisor
        described = self.plugin.registry.describe()
        states = sup.model_states() if sup is not None else {}
        for model in described["models"]:
            model["worker_state"] = states.get(model["id"], {}).get("state", "not loaded")
        disabled = [{"folder": k, "error": v["reason"]} for k, v in states.items()
                    if v.get("state") == "disabled"]
        described["errors"] = described["errors"] + disabled
        return _json(200, {"ready": bool(sup and sup.ready()), **described})

    def health(self, query: Mapping[str, str]) -> Response:
        sup = self.plugin.supervisor
        try:
            counts, store_ok = self.plugin.store.counts(), True
        except Exception as exc:
            counts, store_ok = {"error": type(exc).__name__}, False
        return _json(200, {
            "node": self.plugin.node,
            "ready": bool(sup and sup.ready()),
            "workers": sup.describe() if sup is not None else [],
            "queue": {"location": self.plugin.store.url, "reachable": store_ok, "jobs": counts},
            "callback": self.plugin.callback_cost(),
        })

    def metrics(self, query: Mapping[str, str]) -> Response:
        sup = self.plugin.supervisor
        body = render(self.plugin.metrics_dir, self.plugin.store.counts,
                      self.plugin.store.inbox_size, sup.counts if sup else dict)
        return 200, "text/plain; version=0.0.4; charset=utf-8", body
