"""The worker processes' supervisor, inside Orthanc.

Starts ``Workers`` processes of ``python -m engine.worker`` with the venv's
own ``python`` (inside Orthanc ``sys.executable`` is Orthanc), at a lower
CPU and I/O priority than Orthanc, so the operating system protects ingest.
Each worker's stdin is one end of a socket pair: the first line hands over
the configuration and the REST token (never on a command line, where ``ps``
shows it, nor in a log); later lines are wake-ups; its end tells the worker
that Orthanc is gone, even after ``kill -9``. Sockets, unlike pipes, can be
written with ``MSG_NOSIGNAL``: a dead worker never sends Orthanc a SIGPIPE.

A worker that dies has its leases released at once (its jobs are due again,
the death counted) and is started again after a back-off. Stopping sends
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("orthanc_ai")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
MAX_BACKOFF = 60.0
STABLE_SECONDS = 60.0  # a worker that lived this long starts again without delay


def venv_python(site_packages: str | None) -> Path:
    """``<venv>/bin/python`` for ``<venv>/lib/pythonX.Y/site-packages``; without it,
    the venv we were installed into (a wheel), else the checkout's ``.venv``."""
    if not site_packages and PROJECT_ROOT.parent.name == "site-packages":
        site_packages = str(PROJECT_ROOT.parent)  # PROJECT_ROOT: site-packages/orthanc_ai
    if site_packages:
        candidate = Path(site_packages).resolve().parents[2] / "bin" / "python"
        if candidate.exists():
            return candidate
    fallback = PROJECT_ROOT / ".venv" / "bin" / "python"
    if not fallback.exists():
        raise FileNotFoundError(
            f"orthanc-ai: no venv python for the workers (looked beside {site_packages or '-'} "
            f"and at {fallback}): install orthanc-ai into a venv, or set "
            "ORTHANC_AI_SITE_PACKAGES to that venv's site-packages")
    return fallback


@dataclass
class WorkerProcess:
    index: int
    proc: subprocess.Popen | None = None
    link: socket.socket | None = None
    state: str = "stopped"  # starting | ready | restarting | stopped
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    backoff: float = 1.0
    last_exit: str | None = None
    models: dict[str, Any] = field(default_factory=dict)

    @property
    def owner_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.owner_pid, "state": self.state,
                "restarts": self.restarts, "last_exit": self.last_exit,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
                if self.started else None}


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, count: int, boot: dict[str, Any], *, node: str, log_dir: Path,
                 env: dict[str, str], nice: int, on_death: Callable[[str], None],
                 idle: bool = False, grace: float = 10.0) -> None:
        self.boot = boot
        self.node = node
        self.log_dir = log_dir
        self.env = env
        self.nice = nice
        self.idle = idle
        self.on_death = on_death
        self.grace = grace
        self.workers = [WorkerProcess(i) for i in range(count)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self.python = venv_python(os.environ.get("ORTHANC_AI_SITE_PACKAGES"))

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for w in self.workers:
            self._spawn(w)
        self._monitor = threading.Thread(target=self._watch, name="orthanc-ai-supervisor",
                                         daemon=True)
        self._monitor.start()

    def _command(self) -> list[str]:
        cmd = [str(self.python), "-m", "engine.worker"]
        if self.nice or self.idle:
            # Best-effort I/O class, lowest level: not "idle", which could
            # starve a worker holding the queue's write lock behind Orthanc's writes.
            cmd = ["ionice", "-c", "2", "-n", "7", *cmd]
        if self.idle:
            cmd = ["chrt", "--idle", "0", *cmd]
        elif self.nice:
            cmd = ["nice", "-n", str(self.nice), *cmd]
        return cmd

    def _spawn(self, w: WorkerProcess) -> None:
        ours, theirs = socket.socketpair()
        log_path = self.log_dir / f"worker-{w.index}.log"
        try:
            with open(log_path, "ab") as log_file:
                w.proc = subprocess.Popen(
                    self._command(), cwd=PROJECT_ROOT, stdin=theirs.fileno(),
                    stdout=subprocess.PIPE, stderr=log_file, env=self.env,
                    start_new_session=True,  # Ctrl-C in a terminal reaches Orthanc only
                )
        finally:
            theirs.close()
        boot = dict(self.boot, index=w.index)
        ours.sendall(json.dumps(boot).encode() + b"\n", socket.MSG_NOSIGNAL)
        ours.setblocking(False)
        w.link, w.state, w.started, w.models = ours, "starting", time.time(), {}
        threading.Thread(target=self._read_status, args=(w, w.proc), daemon=True,
                         name=f"orthanc-ai-worker-{w.index}-status").start()
        log.warning("orthanc-ai: worker %d started (pid %d, log %s)", w.index, w.proc.pid,
                    log_path)

    def _read_status(self, w: WorkerProcess, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                status = json.loads(line)
            except ValueError:
                continue
            if status.get("event") == "ready" and w.proc is proc:
                w.models, w.state = status.get("models", {}), "ready"

    def _watch(self) -> None:
        while not self._stopping.wait(0.25):
            for w in self.workers:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._check(w)

    def _check(self, w: WorkerProcess) -> None:
        now = time.time()
        if w.proc is not None and (code := w.proc.poll()) is not None:
            owner = f"{self.node}/{w.proc.pid}"
            w.last_exit = _exit_text(code)
            lived = now - w.started
            w.backoff = 1.0 if lived > STABLE_SECONDS else min(MAX_BACKOFF, w.backoff * 2)
            w.next_start, w.state, w.restarts = now + w.backoff, "restarting", w.restarts + 1
            w.proc = None
            if w.link is not None:
                w.link.close()
                w.link = None
            log.error("orthanc-ai: worker %d died (%s) after %.0f s; starting again in %.0f s",
                      w.index, w.last_exit, lived, w.backoff)
            try:
                self.on_death(owner)
            except Exception as exc:
                log.error("orthanc-ai: releasing the dead worker's jobs failed: %s", exc)
        if w.proc is None and w.state == "restarting" and now >= w.next_start:
            try:
                self._spawn(w)
            except OSError as exc:
                log.error("orthanc-ai: worker %d cannot start: %s", w.index, exc)
                w.next_start = now + w.backoff

    def wake(self) -> None:
        """An instance was queued: wake the workers (never blocks, never raises)."""
        for w in self.workers:
            link = w.link
            if link is not None:
                try:
                    link.send(b"\n", socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                except OSError:
                    pass  # busy (buffer full) or gone: it will look anyway

    def stop(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after the grace period."""
        self._stopping.set()
        with self._lock:
            procs = [w.proc for w in self.workers if w.proc is not None]
            for p in procs:
                try:
                    p.terminate()
                except OSError:
                    pass
            deadline = time.time() + self.grace
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for w in self.workers:
                if w.link is not None:
                    w.link.close()
                w.proc, w.link, w.state = None, None, "stopped"

    # -- state -------------------------------------------------------------------

    def ready(self) -> bool:
        return any(w.state == "ready" for w in self.workers)

    def model_states(self) -> dict[str, Any]:
        for w in self.workers:
            if w.state == "ready":
                return w.models
        return {}

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("starting", "ready", "restarting", "stopped"), 0)
        for w in self.workers:
            out[w.state] = out.get(w.state, 0) + 1
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.workers]
