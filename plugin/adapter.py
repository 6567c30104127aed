"""The only module besides the entry script that talks to the ``orthanc`` module.

Inside Orthanc stays only what must: the callbacks (a durable enqueue and a
wake-up, well under a millisecond, never raising), the ``/ai/*`` routes, and
the supervisor of the worker processes, started once Orthanc's HTTP server
is up (``ORTHANC_STARTED``), since workers reach Orthanc over loopback HTTP.
No TensorFlow, no pixel decoding and no highdicom are imported here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orthanc
from engine.audit import Audit
from engine.audit import log_path as audit_log_path
from engine.audit import set_current as set_current_audit
from engine.config import PROJECT_ROOT, AIConfig, ConfigError, check_peers, parse_ai_section
from engine.logsafe import SafeFormatter
from engine.stores import InboxKind, JobStore, open_store
from inference.registry import Registry

from . import access
from .routes import Api
from .supervisor import Supervisor
from .viewer import Viewer

log = logging.getLogger("orthanc_ai")


class _OrthancLogHandler(logging.Handler):
    """Send our log records to Orthanc's log.

    ``logging.basicConfig()`` would silently do nothing inside Orthanc once
    another plugin configured logging, so we attach our own handler.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                orthanc.LogError(message)
            elif record.levelno >= logging.WARNING:
                orthanc.LogWarning(message)
            else:
                orthanc.LogInfo(message)
        except Exception:  # logging must never raise into Orthanc
            pass


def _storage_directory(config: dict[str, Any]) -> Path:
    """StorageDirectory as Orthanc reads it: relative to the configuration file."""
    path = Path(config.get("StorageDirectory", "OrthancStorage"))
    if not path.is_absolute():
        base = Path(orthanc.GetConfigurationPath())
        path = (base if base.is_dir() else base.parent) / path
    return path.resolve()


class Plugin:
    """What lives in Orthanc's process: the store handle, the supervisor, the routes."""

    def __init__(self, config: dict[str, Any], ai: AIConfig) -> None:
        self.ai = ai
        storage = _storage_directory(config)
        self.work_dir = storage / "orthanc-ai"
        self.store_location = ai.queue_location(storage)
        # The inbox writer's own handle: a commit that does not wait for the disk
        # (the change log backs it up) and a short wait for the write lock.
        self.inbox: JobStore = open_store(self.store_location, **_fast_options(
            self.store_location))
        self.store: JobStore = open_store(self.store_location)
        self.registry = Registry.scan(ai.models_directory)
        for folder, error in self.registry.errors.items():
            log.error("orthanc-ai: model folder %s not used: %s", folder, error)
        ai.router(self.registry.cards)  # a wrong rule raises: the plugin fails loudly
        self.http_port = int(config.get("HttpPort", 8042))
        self.node = ai.node_name or f"{socket.gethostname()}:{self.http_port}"
        # The audit trail (IHE ATNA): this process' records and its syslog sender.
        self.audit = Audit.open(ai.audit, audit_log_path(storage), source_id=self.node,
                                aet=str(config.get("DicomAet") or "ORTHANC"))
        set_current_audit(self.audit)  # for the HTTP filter's security alerts
        scheme = "https" if config.get("SslEnabled") else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.http_port}"
        self.metrics_dir = self.work_dir / f"metrics-{os.getpid()}"
        self.config = config
        self.supervisor: Supervisor | None = None
        self.model_server = None
        self.callback_ns: deque[int] = deque(maxlen=20000)
        # The callbacks only append here; one thread writes the rows to the job
        # store, so a C-STORE never waits for the store's write lock (held, now
        # and then, by a worker that the scheduler put behind Orthanc's threads).
        self._pending: deque[tuple[InboxKind, str]] = deque()
        self._pending_ready = threading.Event()
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_inbox, name="orthanc-ai-inbox",
                                        daemon=True)
        self._writer.start()

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        # Workers of this node's former run (Orthanc killed) are gone: what
        # they held is due now, not when their leases run out.
        released = self.store.release_node(self.node)
        if released:
            log.warning("orthanc-ai: %d job(s) held by this node's former workers are "
                        "due again", released)
        token = orthanc.GenerateRestApiAuthorizationToken()
        model_server_url = ""
        if self.ai.backend == "http" and not self.ai.model_server_url:
            from .model_server import start_model_server

            model_server_url, self.model_server = start_model_server(
                self.ai.models_directory, self.work_dir / "model-server.log",
                self.ai.tensorflow_threads, self.ai.worker_nice)
        for old in self.work_dir.glob("metrics-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        boot = {"configuration": self.config, "orthanc_url": self.base_url, "token": token,
                "node": self.node, "store": str(self.store_location),
                "model_server_url": model_server_url, "audit_log": str(self.audit.log.path)}
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "MALLOC_ARENA_MAX": env.get("MALLOC_ARENA_MAX", "2"),
        })
        self.supervisor = Supervisor(self.ai.workers, boot, node=self.node,
                                     log_dir=self.work_dir, env=env, nice=self.ai.worker_nice,
                                     idle=self.ai.worker_scheduling == "idle",
                                     on_death=self.store.release_owner)
        self.supervisor.start()
        self.audit.application(True, launcher=_os_user())

    def stop(self) -> None:
        self._closing.set()
        self._pending_ready.set()
        self._writer.join(5.0)  # what the callbacks queued reaches the store
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.model_server is not None:
            self.model_server.terminate()
        self.audit.application(False, launcher=_os_user())
        self.audit.close(flush_seconds=min(5.0, self.ai.audit.timeout_seconds))

    # -- callbacks: quick, never raising -----------------------------------------

    def enqueue(self, kind: InboxKind, resource_id: str) -> None:
        t0 = time.perf_counter_ns()
        self._pending.append((kind, resource_id))
        if not self._pending_ready.is_set():  # set() takes a lock: only when needed
            self._pending_ready.set()
        if kind == InboxKind.INSTANCE:
            self.callback_ns.append(time.perf_counter_ns() - t0)

    def _write_inbox(self) -> None:
        """Write what the callbacks queued into the job store's inbox, then wake
        the workers. A row lost here (Orthanc killed within this millisecond,
        the store unreachable) is not lost: Orthanc's change log, which the
        workers follow, holds every event."""
        while True:
            self._pending_ready.wait(1.0)
            self._pending_ready.clear()
            batch = []
            while self._pending and len(batch) < 1000:
                batch.append(self._pending.popleft())
            if not batch:
                if self._closing.is_set():
                    return
                continue
            instances = [b for b in batch if b[0] != InboxKind.SERIES]
            series = [b for b in batch if b[0] == InboxKind.SERIES]
            try:
                if instances:
                    self.inbox.push_inbox(instances)
                if series:  # stable again after late slices: the row re-opens
                    self.inbox.push_inbox(series, again=True)
            except Exception as exc:
                log.warning("orthanc-ai: queueing %d event(s) failed (the change log "
                            "brings them): %s", len(batch), getattr(exc, "reason", exc))
                time.sleep(0.5)
            if self.supervisor is not None:
                self.supervisor.wake()
            if self._pending:
                self._pending_ready.set()

    def callback_cost(self) -> dict[str, Any]:
        """The stored-instance callback's own cost over its last calls, in microseconds."""
        costs = sorted(self.callback_ns)
        if not costs:
            return {"calls": 0}

        def pick(q: float) -> float:
            return round(costs[min(len(costs) - 1, int(q * len(costs)))] / 1000, 1)

        return {"calls": len(costs), "p50_us": pick(0.5), "p99_us": pick(0.99),
                "max_us": round(costs[-1] / 1000, 1)}


def _os_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no user name for this uid
        return str(os.getuid())


def _audit_config_error(config: dict[str, Any], exc: Exception) -> None:
    """A configuration the plugin refuses is a Security Alert, in the local log
    (shipped by the next start that has a valid AI.Audit)."""
    try:
        Audit.open(None, audit_log_path(_storage_directory(config)), forward=False,
                   source_id=str(config.get("Name") or socket.gethostname()),
                   aet=str(config.get("DicomAet") or "ORTHANC")).security_alert(
            "software-configuration", "orthanc.json#AI", str(exc), outcome=8)
    except Exception:  # the plugin fails loudly all the same
        pass


def _fast_options(location: Any) -> dict[str, Any]:
    return {"fast_enqueue": True, "busy_timeout": 2.0}


_plugin: Plugin | None = None


def _on_stored_instance(dicom: Any, instance_id: str) -> None:
    # Runs inside Orthanc's ingest path: enqueue and return, never raise.
    if _plugin is not None:
        _plugin.enqueue(InboxKind.INSTANCE, instance_id)


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    try:
        if _plugin is None:
            return
        if change_type == orthanc.ChangeType.ORTHANC_STARTED:
            _plugin.start()
        elif change_type == orthanc.ChangeType.STABLE_SERIES:
            _plugin.enqueue(InboxKind.SERIES, resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            _plugin.stop()
    except Exception:
        log.exception("orthanc-ai: change callback failed")


def _rest_handler(method: str, handler: Any):
    def callback(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != method:
            output.SendMethodNotAllowed(method)
            return
        # orthanc-python 4.0 passes the request's headers too (names lower-case).
        extra = {"headers": request.get("headers") or {}} \
            if getattr(handler, "needs_headers", False) else {}
        try:
            status, content_type, body = handler(request.get("get", {}) or {},
                                                 *request.get("groups", ()), **extra)
        except Exception as exc:
            log.exception("orthanc-ai: REST %s failed", uri)
            status, content_type = 500, "application/json"
            body = json.dumps({"error": f"internal error: {type(exc).__name__}"}).encode()
        if status == 200:
            output.AnswerBuffer(body, content_type)
        else:
            _send_status(output, status, body)

    return callback


_KEPT: list[Any] = []


def _kept(callback: Any) -> Any:
    """Hold a reference to a callback given to Orthanc for the process's life.

    orthanc-python 7.1 drops its references to REST callbacks after Python is
    finalized: a callback nobody else holds (a closure) is then freed on a dead
    interpreter and Orthanc ends with a segmentation fault (reproduced with a
    three-line script)."""
    _KEPT.append(callback)
    return callback


def _register_rest(pattern: str, callback: Any) -> None:
    """Every REST callback of ours goes through here, kept alive (``_kept``)."""
    orthanc.RegisterRestCallback(pattern, _kept(callback))


_status_with_size = [True]  # orthanc-python 4.0's form, until it is refused


def _send_status(output: Any, status: int, body: bytes) -> None:
    """An error answer with a body: orthanc-python 4.0 takes (status, str, size),
    later versions (7.1 checked) take (status, bytes)."""
    if _status_with_size[0]:
        text = body.decode("utf-8", "replace")
        try:
            output.SendHttpStatus(status, text, len(text.encode()))
            return
        except TypeError:  # refused before the call: nothing was sent
            _status_with_size[0] = False
    output.SendHttpStatus(status, body)


def _serve_viewer(viewer: Viewer) -> None:
    """OHIF's files at /ohif/ (its client-side routes answered with index.html)."""
    def files(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        groups = request.get("groups") or ("",)
        try:
            status, content_type, body, headers = viewer.answer(groups[0] or "")
        except OSError:
            log.exception("orthanc-ai: OHIF file %s could not be read", uri)
            status, content_type, body, headers = 500, "text/plain", b"unreadable", {}
        if status != 200:
            _send_status(output, status, body)
            return
        for name, value in headers.items():
            output.SetHttpHeader(name, value)
        output.AnswerBuffer(body, content_type)

    # Orthanc hands "/ohif/" to the callback of "/ohif": both are the viewer's start page.
    _register_rest("/ohif", files)
    _register_rest("/ohif/(.*)", files)
    if not viewer.available():
        log.warning("orthanc-ai: the OHIF viewer is not installed in %s (make ohif)",
                    viewer.root)


EXPLORER_JS = Path(__file__).resolve().parent.parent / "orthanc" / "explorer.js"


def _extend_explorer() -> None:
    """The AI panel of Orthanc Explorer's study and series pages (orthanc/explorer.js,
    read once at start; Orthanc appends it to /plugins/explorer.js)."""
    try:
        js = EXPLORER_JS.read_text(encoding="utf-8")
    except OSError as exc:  # Explorer without our panel; the rest works
        log.error("orthanc-ai: %s not read (%s): Orthanc Explorer has no AI panel",
                  EXPLORER_JS, type(exc).__name__)
        return
    orthanc.ExtendOrthancExplorer(js)


def install() -> None:
    """Called once by the entry script while Orthanc loads plugins."""
    global _plugin
    handler = _OrthancLogHandler()
    handler.setFormatter(SafeFormatter("%(message)s"))  # tracebacks: no DICOM values
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    config = json.loads(orthanc.GetConfiguration())
    # A wrong AI section raises here: the plugin fails to load, loudly.
    try:
        ai = parse_ai_section(config.get("AI"))
        check_peers(ai, config)
    except ConfigError as exc:
        _audit_config_error(config, exc)
        raise
    if not ai.enabled:
        log.warning("orthanc-ai: disabled by AI.Enabled = false")
        return
    _plugin = Plugin(config, ai)
    orthanc.RegisterOnStoredInstanceCallback(_on_stored_instance)
    orthanc.RegisterOnChangeCallback(_on_change)
    for pattern, method, fn in Api(_plugin).routes():
        _register_rest(pattern, _rest_handler(method, fn))
    _extend_explorer()
    if ai.ohif_directory:
        _serve_viewer(Viewer(PROJECT_ROOT / ai.ohif_directory))
    if access.authentication_enabled(config):
        # Only AI.Administrators may call the /ai routes that change anything.
        orthanc.RegisterIncomingHttpRequestFilter(_kept(access.make_filter(ai.administrators)))
        if not ai.administrators:
            log.warning("orthanc-ai: AI.Administrators is empty: no user may retry or "
                        "reprocess")
    elif ai.administrators:
        log.warning("orthanc-ai: AI.Administrators is not enforced: Orthanc's "
                    "authentication is off")
    log.warning("orthanc-ai: node %s, %d model(s) %s, %d worker process(es), queue %s",
                _plugin.node, len(_plugin.registry.cards), sorted(_plugin.registry.cards),
                ai.workers, _plugin.store.url)
