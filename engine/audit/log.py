"""The durable local audit trail: a hash chain of JSON lines, appended with fsync.

Each line: ``{"seq", "time", "prev", "xml", "hash"}`` where ``hash`` is the
SHA-256 (hex) of the canonical JSON (sorted keys, no spaces) of the entry
without ``hash``, so it covers the previous entry's hash too: altering,
deleting, inserting or reordering a line breaks the chain at that line.
Sequence numbers start at 1; the first ``prev`` is 64 zeros.

Several processes append (the plugin in Orthanc, each worker): an exclusive
``fcntl.flock`` on the log file itself is held while the last entry is read
and the next one written and fsync'd.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
_TAIL = 1 << 16


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _last_line(f: Any, size: int) -> bytes:
    """The last complete line of a file open for reading (b"" when empty)."""
    end = size
    buf = b""
    while end > 0:
        start = max(0, end - _TAIL)
        f.seek(start)
        buf = f.read(end - start) + buf
        stripped = buf.rstrip(b"\n")
        i = stripped.rfind(b"\n")
        if i >= 0:
            return stripped[i + 1:]
        end = start
    return buf.rstrip(b"\n")


@dataclass(frozen=True)
class Entry:
    seq: int
    offset: int  # where its line starts in the file
    end: int  # the byte after its newline
    record: dict[str, Any]

    @property
    def xml(self) -> str:
        return str(self.record.get("xml", ""))

    @property
    def outcome(self) -> int:
        return int(self.record.get("outcome", 0))


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, xml: str, *, outcome: int = 0, event: str = "") -> int:
        """Append one message; its sequence number, once it is on disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A writer killed mid-line: that entry was never acknowledged to
                # anyone; cut it off so the chain goes on from the last whole line.
                size = self._whole_lines(fd, size)
                os.ftruncate(fd, size)
            with os.fdopen(os.dup(fd), "rb") as f:
                last = _last_line(f, size)
            if last:
                previous = json.loads(last)
                seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
            else:
                seq, prev = 1, GENESIS
            entry: dict[str, Any] = {"seq": seq, "time": _iso(time.time()), "event": event,
                                     "outcome": outcome, "prev": prev, "xml": xml}
            entry["hash"] = entry_hash(entry)
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False) + "\n"
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
            return seq
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _whole_lines(fd: int, size: int) -> int:
        """The length of the file up to its last newline."""
        end = size
        while end > 0:
            start = max(0, end - _TAIL)
            i = os.pread(fd, end - start, start).rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
        return 0

    def last_seq(self) -> int:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                last = _last_line(f, size)
            return int(json.loads(last)["seq"]) if last else 0
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def entries(self, offset: int = 0) -> Iterator[Entry]:
        """Entries from a byte offset (a line start) on; a torn last line is skipped."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            f.seek(offset)
            pos = offset
            for raw in f:
                end = pos + len(raw)
                if raw.endswith(b"\n"):
                    try:
                        record = json.loads(raw)
                        yield Entry(int(record["seq"]), pos, end, record)
                    except (ValueError, KeyError, TypeError):
                        pass
                pos = end


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    first_bad: int | None = None  # the sequence number of the first altered or missing entry
    reason: str = ""


def verify(path: Path) -> Verdict:
    """Walk the chain: each line parses, has the next sequence number, names the
    previous entry's hash and has its own hash right."""
    expected, prev, n = 1, GENESIS, 0
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return Verdict(True, 0, reason="no audit log yet")
    with f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                seq = int(record["seq"])
            except (ValueError, KeyError, TypeError):
                return Verdict(False, n, expected, f"line {number} is not an audit entry")
            if seq != expected:
                what = "missing" if seq > expected else "out of order or repeated"
                return Verdict(False, n, expected,
                               f"entry {expected} is {what} (line {number} holds {seq})")
            if record.get("prev") != prev:
                return Verdict(False, n, seq, f"entry {seq} does not follow entry {seq - 1}"
                               if seq > 1 else "entry 1 does not start the chain")
            if entry_hash(record) != record.get("hash"):
                return Verdict(False, n, seq, f"entry {seq} was altered (its hash differs)")
            prev, expected, n = record["hash"], seq + 1, n + 1
    return Verdict(True, n)
