"""REST routes under ``/ai/``, as plain functions of the request.

The adapter registers them with Orthanc, so Orthanc's own authentication
and authorisation apply. Each returns (HTTP status, content type, body).
Every parameter is checked: a wrong one is a 400 that names it, never a 500.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from engine.deliveries import deliveries
from engine.metrics import latency_summary, render
from engine.stores import STATES, InboxKind, Job, JobKind
from engine.summary import result_summary
from inference.version import __version__

from . import access
from .status_page import render_status

if TYPE_CHECKING:
    from .adapter import Plugin

log = logging.getLogger("orthanc_ai")
Response = tuple[int, str, bytes]
JSON = "application/json"
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_ID = 2**63 - 1
MAX_LIMIT = 10000
HTML = "text/html; charset=utf-8"
RECENT_JOBS = 50  # the status page's latest analyses
MODEL_WINDOW = 1000  # the latest analyses its per-model counts and times cover
RECENT_DELIVERIES = 20
UID_LOOKUPS_PER_PAGE = 20  # Orthanc look-ups of StudyInstanceUIDs one page may make


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


def with_headers(handler: Callable[..., Response]) -> Callable[..., Response]:
    """Mark a route that needs the request's headers (``headers=`` keyword)."""
    handler.needs_headers = True  # type: ignore[attr-defined]
    return handler


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _described(job: Job) -> dict[str, Any]:
    """A job as the study summary and the status page show it: with its finding in
    words (``summary``) and its StudyInstanceUID where its result names it."""
    out = job.as_json()
    result = job.result or {}
    out["summary"] = result.get("summary") or result_summary(result)
    out["study_instance_uid"] = result.get("study_instance_uid") or None
    return out


def _job_id(value: str) -> int:
    if len(value) > 19 or int(value) > MAX_ID:
        raise BadRequest("job id out of range")
    return int(value)


class Api:
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        # Orthanc study ID -> (StudyInstanceUID or None, when looked up). An Orthanc ID
        # is a hash of the UIDs: a found UID never changes; a miss is asked again later.
        self._study_uids: dict[str, tuple[str | None, float]] = {}

    def routes(self) -> list[tuple[str, str, Callable[..., Response]]]:
        """(regex for Orthanc, HTTP method, handler(query, *groups))."""
        return [
            ("/ai", "GET", self.status_page),  # Orthanc hands /ai/ over as /ai too
            ("/ai/jobs", "GET", self.list_jobs),
            ("/ai/jobs/([0-9]+)", "GET", self.get_job),
            ("/ai/jobs/([0-9]+)/retry", "POST", self.retry_job),
            ("/ai/deliveries", "GET", self.list_deliveries),
            ("/ai/studies/([^/]+)", "GET", self.study),
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
        return self._orthanc_get(f"/studies/{study_id}") is not None

    def _orthanc_get(self, path: str) -> Any:
        """GET ``path`` from our own Orthanc, parsed; None for a 404."""
        # Loopback HTTP, not the SDK: see plugin/adapter.py and DESIGN.md.
        import orthanc

        request = urllib.request.Request(
            f"{self.plugin.base_url}{path}",
            headers={"Authorization": orthanc.GenerateRestApiAuthorizationToken()})
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if self.plugin.base_url.startswith("https://"):
            # Loopback to our own Orthanc: its certificate names the public host.
            handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=10) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def _study_uid(self, study_id: str, *, lookup: bool = True) -> str | None:
        """The StudyInstanceUID of an Orthanc study (cached; None: unknown or gone)."""
        cached = self._study_uids.get(study_id)
        if cached is not None and (cached[0] is not None or time.time() - cached[1] < 60):
            return cached[0]
        if not lookup:
            return None
        try:
            study = self._orthanc_get(f"/studies/{study_id}")
        except Exception as exc:  # Orthanc busy or stopping: no link this time
            log.warning("orthanc-ai: looking up a study's UID failed: %s", type(exc).__name__)
            return None
        uid = ((study or {}).get("MainDicomTags") or {}).get("StudyInstanceUID") or None
        if len(self._study_uids) > 10000:
            self._study_uids.clear()
        self._study_uids[study_id] = (uid, time.time())
        return uid

    # -- what a person reads ---------------------------------------------------------

    def study(self, query: Mapping[str, str], study_id: str) -> Response:
        """One study's AI state: its analyses (with their findings in words), its
        prior search, its SRs' deliveries; what Orthanc Explorer's AI panel shows."""
        try:
            _id(study_id, "study")
            unknown = sorted(set(query) - {"", "_"})  # "_": jQuery's cache buster
            if unknown:
                raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}")
        except BadRequest as exc:
            return _error(400, str(exc))
        store = self.plugin.store
        jobs = [_described(j) for j in store.list(study=study_id, limit=MAX_LIMIT)]
        uid = next((j["study_instance_uid"] for j in jobs if j["study_instance_uid"]), None)
        if uid is None:
            found = self._orthanc_get(f"/studies/{study_id}")
            if found is None and not jobs:
                return _error(404, f"no study {study_id}")
            uid = ((found or {}).get("MainDicomTags") or {}).get("StudyInstanceUID")
        findings = [
            {"job": j["id"], "model": j["model"], "model_version": j["model_version"],
             "series": j["series"], "instance": j["instance"], "summary": j["summary"],
             "finding": r.get("finding"), "probability": r.get("probability"),
             "positive": r.get("positive"), "volume_ml": r.get("volume_ml"),
             "comparison": r.get("comparison"), "sr_instance": r.get("sr_instance"),
             "sr_sop_instance_uid": r.get("sr_sop_instance_uid"),
             "sr_series_instance_uid": r.get("sr_series_instance_uid")}
            for j in jobs if j["state"] == "done" and (r := j["result"] or {}).get("finding")]
        sent = [j for k in (JobKind.FORWARD.value, JobKind.HL7.value)
                for j in store.list(kind=k, study=study_id, limit=MAX_LIMIT)]
        priors = store.list(kind=JobKind.PRIORS.value, study=study_id, limit=1)
        counts = dict.fromkeys(STATES, 0)
        for j in jobs:
            counts[j["state"]] = counts.get(j["state"], 0) + 1
        return _json(200, {
            "study": study_id, "study_instance_uid": uid or None, "counts": counts,
            "jobs": jobs, "findings": findings,
            "priors": priors[0].as_json() if priors else None,
            "deliveries": deliveries(sorted(sent, key=lambda j: j.id)),
        })

    @with_headers
    def status_page(self, query: Mapping[str, str], *, headers: Mapping[str, str]) -> Response:
        """The status page (HTML); the Retry buttons only for administrators."""
        plugin = self.plugin
        admin = access.is_administrator(headers, plugin.ai.administrators,
                                        access.authentication_enabled(plugin.config))
        body = render_status(self.status(), admin=admin)
        return 200, HTML, body.encode("utf-8")

    def status(self) -> dict[str, Any]:
        """Everything the status page shows, as plain values."""
        plugin, store, sup = self.plugin, self.plugin.store, self.plugin.supervisor
        out: dict[str, Any] = {
            "node": plugin.node, "version": __version__, "ready": bool(sup and sup.ready()),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "workers": sup.describe() if sup is not None else [],
            "model_window": MODEL_WINDOW,
        }
        try:
            kinds = {k.value: store.counts(kind=k.value) for k in JobKind}
            out["queue"] = {"location": store.url, "reachable": True,
                            "inbox": store.inbox_size(), "jobs": kinds}
            window = store.list(kind=JobKind.ANALYSIS.value, limit=MODEL_WINDOW,
                                newest_first=True)
            sent = sorted((j for k in (JobKind.FORWARD.value, JobKind.HL7.value)
                           for j in store.list(kind=k, limit=RECENT_DELIVERIES,
                                               newest_first=True)),
                          key=lambda j: -j.id)[:RECENT_DELIVERIES]
        except Exception as exc:  # the page still shows the workers and the audit trail
            log.warning("orthanc-ai: the status page could not read the queue: %s",
                        type(exc).__name__)
            out["queue"] = {"location": store.url, "reachable": False, "inbox": 0, "jobs": {}}
            window, sent = [], []
        recent = [_described(j) for j in window[:RECENT_JOBS]]
        # A skipped or failed job has no result naming its StudyInstanceUID: another
        # job of its study may have; else Orthanc is asked (a few a page, cached).
        uids = {j.study: (j.result or {}).get("study_instance_uid") for j in reversed(window)
                if j.study and (j.result or {}).get("study_instance_uid")}
        budget = UID_LOOKUPS_PER_PAGE
        for j in recent:
            if j["study"] and not j["study_instance_uid"]:
                known = uids.get(j["study"])
                if known is None:
                    asked = j["study"] not in self._study_uids
                    known = self._study_uid(j["study"], lookup=budget > 0)
                    budget -= asked
                j["study_instance_uid"] = known
        out["jobs"] = recent
        out["models"] = self._per_model(window)
        out["nodes"] = self._nodes(window)
        out["deliveries"] = {"recent": deliveries(sent)}
        out["latency"] = latency_summary(plugin.metrics_dir)
        out["audit"] = plugin.audit.status()
        return out

    @staticmethod
    def _per_model(window: list[Job]) -> list[dict[str, Any]]:
        models: dict[tuple[str, str], dict[str, Any]] = {}
        for job in window:
            if not job.model:
                continue
            m = models.setdefault((job.model, job.model_version), {
                "model": job.model, "version": job.model_version,
                "counts": dict.fromkeys(STATES, 0), "seconds": []})
            m["counts"][job.state] = m["counts"].get(job.state, 0) + 1
            if job.state == "done":
                m["seconds"].append(max(0.0, job.updated - job.created))
        out = []
        for key in sorted(models):
            m = models[key]
            seconds = m.pop("seconds")
            out.append({**m, "p50_s": _percentile(seconds, 0.5),
                        "p95_s": _percentile(seconds, 0.95)})
        return out

    @staticmethod
    def _nodes(window: list[Job]) -> list[dict[str, Any]]:
        nodes: dict[str, dict[str, Any]] = {}
        for job in window:
            if not job.node:
                continue
            n = nodes.setdefault(job.node, {"node": job.node, "running": 0, "jobs": 0,
                                            "updated": 0.0})
            n["jobs"] += 1
            n["running"] += job.state == "running"
            n["updated"] = max(n["updated"], job.updated)
        return [{**{k: v for k, v in n.items() if k != "updated"},
                 "last_update": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(n["updated"]))}
                for n in sorted(nodes.values(), key=lambda n: n["node"])]

    def models(self, query: Mapping[str, str]) -> Response:
        """The installed models; ``ready``: a worker has loaded them and takes jobs;
        ``version``: orthanc-ai's own (each model has its own in ``models``)."""
        sup = self.plugin.supervisor
        described = self.plugin.registry.describe()
        states = sup.model_states() if sup is not None else {}
        for model in described["models"]:
            model["worker_state"] = states.get(model["id"], {}).get("state", "not loaded")
        disabled = [{"folder": k, "error": v["reason"]} for k, v in states.items()
                    if v.get("state") == "disabled"]
        described["errors"] = described["errors"] + disabled
        return _json(200, {"version": __version__, "ready": bool(sup and sup.ready()),
                           **described})

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
