"""Ship the local audit log to a syslog collector: RFC 5424 over TCP or TLS (RFC 5425).

Each entry becomes one RFC 5424 message: PRI with facility 10 (authpriv) and
a severity by the event's outcome, the entry's own time, APP-NAME
``orthanc-ai``, MSGID ``IHE+RFC-3881`` (IHE ITI TF-2a 3.20.4.2.1, also used
for the DICOM schema's messages), no structured data, the XML as MSG (UTF-8,
with the BOM RFC 5424 §6.4 asks for). Frames are octet-counted (RFC 6587
§3.4.1; RFC 5425 §4.3): ``MSG-LEN SP SYSLOG-MSG``.

Delivery never blocks the pipeline: the entry is durable in the local log
before anything is sent. A sender thread in each process forwards the
entries after a cursor (``audit.forwarded``, beside the log: the last
sequence number sent and the byte offset after it), holding an exclusive
``flock`` on ``audit.forwarded.lock`` while it sends, so one process at a
time ships and none ships twice. While the collector is down it retries
with back-off; the cursor is durable, so nothing is lost across restarts.
An entry is sent again only if its sender is killed between the send and
the cursor write. Syslog has no acknowledgement: "sent" means the kernel
accepted it on a connection that the collector had not closed (checked
before each send).
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .log import AuditLog, Entry

log = logging.getLogger("orthanc_ai")

FACILITY_AUTHPRIV = 10
APP_NAME = "orthanc-ai"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
_SEVERITY = {0: 5, 4: 4, 8: 3, 12: 2}  # notice, warning, error, critical
_CURSOR_WIDTH = 48


def _header_token(value: str, limit: int) -> str:
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def format_message(entry: Entry, hostname: str, procid: str = "-") -> bytes:
    """One RFC 5424 SYSLOG-MSG for an audit entry."""
    severity = _SEVERITY.get(entry.outcome, 3)
    if entry.record.get("event") == "110113":  # a security alert
        severity = min(severity, 4)
    pri = FACILITY_AUTHPRIV * 8 + severity
    timestamp = str(entry.record.get("time") or "-")
    header = (f"<{pri}>1 {timestamp} {_header_token(hostname, 255)} {APP_NAME} "
              f"{_header_token(procid, 128)} {MSGID} -")
    return header.encode("ascii") + b" " + BOM + entry.xml.encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 octet counting."""
    return str(len(message)).encode("ascii") + b" " + message


def parse_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split whole octet-counted frames off a buffer: (messages, the rest)."""
    out = []
    while True:
        space = buffer.find(b" ")
        if space <= 0:
            return out, buffer
        digits = buffer[:space]
        if not digits.isdigit():
            raise ValueError("not an octet-counted frame")
        n = int(digits)
        if len(buffer) < space + 1 + n:
            return out, buffer
        out.append(buffer[space + 1: space + 1 + n])
        buffer = buffer[space + 1 + n:]


class Cursor:
    """The last sequence number forwarded and the byte offset after it, in one
    fixed-width record rewritten in place with fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, int]:
        try:
            seq, offset = self.path.read_text().split()[:2]
            return int(seq), int(offset)
        except (FileNotFoundError, ValueError):
            return 0, 0

    def write(self, seq: int, offset: int) -> None:
        record = f"{seq} {offset}".ljust(_CURSOR_WIDTH - 1) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            os.pwrite(fd, record.encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)


class Connection:
    """One TCP or TLS connection to the collector, opened when needed."""

    def __init__(self, host: str, port: int, transport: str, timeout: float, *,
                 ca_file: str = "", cert_file: str = "", key_file: str = "") -> None:
        self.host, self.port, self.transport, self.timeout = host, port, transport, timeout
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self.sock: Any = None

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file or None)
        return context

    def _open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self.transport == "tls":
            try:
                sock = self._tls().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        self.sock = sock

    def _alive(self) -> bool:
        """A collector never writes to us: a readable socket was closed or reset,
        unless what is there is TLS's own (a session ticket after the handshake)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.setblocking(False)
                try:
                    return bool(self.sock.recv(1))
                except ssl.SSLWantReadError:
                    return True  # only TLS records of its own: still open
                finally:
                    self.sock.settimeout(self.timeout)
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (OSError, ValueError):
            return False

    def send(self, data: bytes) -> None:
        if self.sock is not None and not self._alive():
            self.close()
        if self.sock is None:
            self._open()
        try:
            self.sock.sendall(data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class Forwarder:
    """The sender thread of one process."""

    def __init__(self, audit_log: AuditLog, settings: Any, hostname: str, *,
                 idle_seconds: float = 2.0,
                 connection: Callable[[], Connection] | None = None) -> None:
        self.log = audit_log
        self.settings = settings
        self.hostname = hostname
        self.idle = idle_seconds
        self.cursor = Cursor(audit_log.path.with_suffix(".forwarded"))
        self.lock_path = self.cursor.path.with_name(self.cursor.path.name + ".lock")
        self.conn = (connection or self._connection)()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    def _connection(self) -> Connection:
        s = self.settings
        return Connection(s.host, s.port, s.transport, s.timeout_seconds, ca_file=s.ca_file,
                          cert_file=s.cert_file, key_file=s.key_file)

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._run, name="orthanc-ai-audit", daemon=True)
        self._thread.start()
        return self

    def kick(self) -> None:
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Try to ship everything logged so far within ``timeout``; True when done."""
        deadline = time.monotonic() + timeout
        target = self.log.last_seq()
        while self.cursor.read()[0] < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._thread is None or not self._thread.is_alive():
                try:
                    self.forward_once()
                except Exception:  # the collector is down: the log keeps them
                    self.conn.close()
                if self.cursor.read()[0] < target:
                    time.sleep(min(0.2, max(0.0, left)))
                continue
            self.kick()
            with self._progress:
                self._progress.wait(min(0.2, left))
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.settings.timeout_seconds + 1)
        self.conn.close()

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self.forward_once()
                backoff, self.last_error = 0.0, ""
                self._wake.wait(self.idle)
            except Exception as exc:  # the collector is down or refused us: later
                self.conn.close()
                base = self.settings.retry_backoff_seconds
                backoff = min(self.settings.max_backoff_seconds,
                              max(base, backoff * 2 if backoff else base))
                error = f"{type(exc).__name__}: {exc}"[:200]
                if error != self.last_error:
                    log.warning("orthanc-ai: the audit collector %s:%d is unreachable "
                                "(%s); the local audit log keeps the messages, retrying",
                                self.settings.host, self.settings.port, error)
                self.last_error = error
                self._stop.wait(backoff)
            self._wake.clear()

    def forward_once(self) -> int:
        """Send what follows the cursor, if no other process is sending; how many."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is sending
            return self._send_after_cursor()
        finally:
            os.close(fd)

    def _send_after_cursor(self) -> int:
        seq, offset = self.cursor.read()
        try:
            size = self.log.path.stat().st_size
        except FileNotFoundError:
            return 0
        if offset > size:
            offset = 0  # the log was replaced: find our place by sequence number
        sent = 0
        for entry in self.log.entries(offset):
            if entry.seq <= seq:
                continue
            if entry.seq != seq + 1 and offset:
                # The offset is not where the next entry is: look it up by number.
                self.cursor.write(seq, 0)
                return sent + self._send_after_cursor()
            self.conn.send(frame(format_message(entry, self.hostname, str(os.getpid()))))
            self.cursor.write(entry.seq, entry.end)
            seq, sent = entry.seq, sent + 1
            with self._progress:
                self._progress.notify_all()
        return sent
