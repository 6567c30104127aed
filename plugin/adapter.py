"""The only module besides the entry script that talks to the ``orthanc`` module.

It reads the configuration, registers the callbacks and REST routes, and
starts the service's worker threads once Orthanc's HTTP server is up
(``ORTHANC_STARTED``), since workers reach Orthanc over loopback HTTP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orthanc
from inference.backend import HttpBackend, InProcessBackend
from inference.registry import Registry

from .config import parse_ai_section
from .jobs import SqliteJobStore
from .model_server import start_model_server
from .orthanc_http import OrthancClient
from .routes import Api
from .service import Service

log = logging.getLogger("orthanc_ai")
_service: Service | None = None


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


def _on_stored_instance(dicom: Any, instance_id: str) -> None:
    # Runs inside Orthanc's ingest path: enqueue and return, never raise.
    try:
        if _service is not None:
            _service.enqueue(instance_id)
    except Exception:
        pass


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    try:
        if _service is None:
            return
        if change_type == orthanc.ChangeType.ORTHANC_STARTED:
            _service.start()
        elif change_type == orthanc.ChangeType.STABLE_SERIES:
            _service.enqueue_series(resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            _service.stop()
    except Exception:
        log.exception("orthanc-ai: change callback failed")


def _rest_handler(method: str, handler: Any):
    def callback(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != method:
            output.SendMethodNotAllowed(method)
            return
        try:
            status, content_type, body = handler(request.get("get", {}) or {},
                                                 *request.get("groups", ()))
        except Exception as exc:
            log.exception("orthanc-ai: REST %s failed", uri)
            status, content_type = 500, "application/json"
            body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        if status == 200:
            output.AnswerBuffer(body, content_type)
        else:
            # orthanc-python 4.0: (status, body as str, its size)
            text = body.decode("utf-8", "replace")
            output.SendHttpStatus(status, text, len(text.encode()))

    return callback


def install() -> None:
    """Called once by the entry script while Orthanc loads plugins."""
    global _service
    handler = _OrthancLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    config = json.loads(orthanc.GetConfiguration())
    # A wrong AI section raises here: the plugin fails to load, loudly.
    ai = parse_ai_section(config.get("AI"))
    if not ai.enabled:
        log.warning("orthanc-ai: disabled by AI.Enabled = false")
        return
    storage = _storage_directory(config)
    store = SqliteJobStore(ai.queue_database or storage / "orthanc-ai" / "jobs.sqlite")
    scheme = "https" if config.get("SslEnabled") else "http"
    client = OrthancClient(
        f"{scheme}://127.0.0.1:{int(config.get('HttpPort', 8042))}",
        orthanc.GenerateRestApiAuthorizationToken(),
        timeout=ai.http_timeout_seconds,
    )
    registry = Registry.scan(ai.models_directory)
    for folder, error in registry.errors.items():
        log.error("orthanc-ai: model folder %s not used: %s", folder, error)
    router = ai.router(registry.cards)  # a wrong rule raises: the plugin fails loudly
    if ai.backend == "http":
        url, wait = ai.model_server_url, 0.0
        if not url:
            url, _ = start_model_server(ai.models_directory, storage / "orthanc-ai" /
                                        "model-server.log", ai.tensorflow_threads,
                                        ai.worker_nice)
            wait = 180.0  # TensorFlow's import and the model loads take a while
        backend = HttpBackend(url, timeout=ai.http_timeout_seconds, startup_wait=wait)
    else:
        backend = InProcessBackend(intra_op_threads=ai.tensorflow_threads)
    _service = Service(ai, store, client, registry, backend, router)

    orthanc.RegisterOnStoredInstanceCallback(_on_stored_instance)
    orthanc.RegisterOnChangeCallback(_on_change)
    for pattern, method, fn in Api(_service).routes():
        orthanc.RegisterRestCallback(pattern, _rest_handler(method, fn))
    log.warning(
        "orthanc-ai: %d model(s) %s, queue %s", len(registry.cards),
        sorted(registry.cards), store.path,
    )
