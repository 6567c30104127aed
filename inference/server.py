"""A model server speaking the TensorFlow Serving / KServe V1 REST protocol.

    python -m inference.server --models models --host 127.0.0.1 --port 8501

``GET /v1/models/NAME`` tells whether a model is available and its version;
``POST /v1/models/NAME:predict`` takes ``{"inputs": {name: nested lists}}``
and answers ``{"outputs": {name: nested lists}}`` (the "columnar" format).
Because JSON is slow for images, the same route also takes and answers
``application/x-npz`` (a NumPy .npz archive, one array per input/output);
our HTTP back end uses that.

Running inference in a separate process keeps TensorFlow away from Orthanc's
interpreter, whose GIL the Python plugin holds during every SDK call.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .backend import InProcessBackend
from .card import ModelCard
from .registry import Registry

log = logging.getLogger("orthanc_ai.server")
NPZ = "application/x-npz"
_ROUTE = re.compile(r"^/v1/models/([A-Za-z0-9._-]+)(:predict)?$")


class ModelServer:
    def __init__(self, models: Path, threads: int = 0) -> None:
        self.registry = Registry.scan(models)
        self.backend = InProcessBackend(intra_op_threads=threads)
        self._lock = threading.Lock()
        for card in list(self.registry.cards.values()):
            try:
                self.backend.load(card)
            except Exception as exc:
                self.registry.disable(card.id, str(exc))
                log.error("model %s not served: %s", card.id, exc)

    def predict(self, card: ModelCard, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        call = self.backend._models[card.id]
        with self._lock:  # one TensorFlow call at a time; TF uses all cores itself
            outputs = call(inputs)
        return {k: np.asarray(v) for k, v in outputs.items()}


def _handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
            log.debug(fmt, *args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode())

        def do_GET(self) -> None:  # noqa: N802
            m = _ROUTE.match(self.path)
            if not m or m.group(2):
                return self._error(404, "unknown route")
            card = server.registry.cards.get(m.group(1))
            if card is None:
                return self._error(404, f"model {m.group(1)} not served")
            status = {"version_status": [{"version": card.version, "state": "AVAILABLE",
                                          "status": {"error_code": "OK"}}]}
            self._send(200, json.dumps(status).encode())

        def do_POST(self) -> None:  # noqa: N802
            m = _ROUTE.match(self.path)
            if not m or not m.group(2):
                return self._error(404, "unknown route")
            card = server.registry.cards.get(m.group(1))
            if card is None:
                return self._error(404, f"model {m.group(1)} not served")
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            binary = self.headers.get("Content-Type", "").startswith(NPZ)
            try:
                if binary:
                    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                        inputs = {k: npz[k].astype(np.float32) for k in npz.files}
                else:
                    payload = json.loads(body)
                    inputs = {k: np.asarray(v, np.float32) for k, v in payload["inputs"].items()}
            except Exception as exc:
                return self._error(400, f"bad request body: {exc}")
            try:
                outputs = server.predict(card, inputs)
            except Exception as exc:
                return self._error(500, f"prediction failed: {type(exc).__name__}: {exc}")
            if binary:
                buf = io.BytesIO()
                np.savez(buf, **outputs)
                return self._send(200, buf.getvalue(), NPZ)
            self._send(200, json.dumps({"outputs": {k: v.tolist()
                                                    for k, v in outputs.items()}}).encode())

    return Handler


def _exit_with_parent(parent: int, httpd: ThreadingHTTPServer) -> None:
    import os
    import time

    while os.getppid() == parent:
        time.sleep(1.0)
    log.warning("parent process %d is gone: stopping", parent)
    httpd.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m inference.server`` and ``orthanc-ai model-server``."""
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="exit when this process is gone (Orthanc killed with -9)")
    parser.add_argument("--listen-fd", type=int, default=-1,
                        help="serve on this inherited listening socket instead of --port")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = ModelServer(args.models, args.threads)
    if args.listen_fd >= 0:
        httpd = ThreadingHTTPServer((args.host, 0), _handler(server), bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = socket.socket(fileno=args.listen_fd)
        httpd.server_address = httpd.socket.getsockname()
        args.host = httpd.server_address[0]
    else:
        httpd = ThreadingHTTPServer((args.host, args.port), _handler(server))
    port = httpd.server_address[1]
    log.info("serving %s on http://%s:%d", sorted(server.registry.cards), args.host, port)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid, httpd),
                         daemon=True).start()
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
