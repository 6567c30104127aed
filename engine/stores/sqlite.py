"""Durable job store (SQLite) behind a small interface.

One job is one (input instance, model id, model version). Its key is
unique, so an instance seen twice (a resend, a replayed change) never runs
a model version twice. Instance-level outcomes that happen before a model
is chosen (non-image object, no model applies, instance vanished) are
jobs with an empty model.

States: ``queued`` -> ``running`` -> ``done`` | ``skipped`` | ``failed`` |
``dead``. ``failed`` with a ``not_before`` time will be retried then (a
transient error); ``failed`` without one failed for good at once (a broken
input: retrying cannot help). ``dead`` means transient errors used up all
attempts. At start-up ``running`` jobs go back to ``queued``: the process
that ran them is gone.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

STATES = ("queued", "running", "done", "skipped", "failed", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_key TEXT NOT NULL UNIQUE,
    instance TEXT NOT NULL,
    study TEXT,
    series TEXT,
    model TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_instance ON jobs(instance);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Instances and series seen in Orthanc's change log, not yet triaged. A row
-- is deleted only once its triage is over ("taken": when a worker took it).
CREATE TABLE IF NOT EXISTS inbox (
    kind TEXT NOT NULL,
    resource TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received REAL NOT NULL,
    taken REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, resource)
);
CREATE INDEX IF NOT EXISTS inbox_seq ON inbox(seq);
"""


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    instance: str
    study: str | None
    series: str | None
    model: str
    model_version: str
    state: str
    reason: str | None
    attempts: int
    created: float
    updated: float
    not_before: float
    result: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "model": self.model or None,
            "model_version": self.model_version or None,
            "level": "instance" if self.instance else "series",
            "instance": self.instance or None,
            "study": self.study,
            "series": self.series,
            "attempts": self.attempts,
            "next_attempt": _iso(self.not_before) if self.not_before else None,
            "reason": self.reason,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "result": self.result,
        }


INBOX_RETAKE_SECONDS = 30.0


class InboxItem(NamedTuple):
    """An instance or series to triage; ``row`` is its durable inbox row, if any."""

    kind: str  # "instance", "series" or "reprocess"
    resource: str  # Orthanc ID
    queued_at: float
    row: int | None = None


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def job_key(instance: str, model: str = "", version: str = "") -> str:
    return f"{instance}|{model}|{version}"


class JobStore(Protocol):
    """What the service needs from a job store.

    SQLite serves one Orthanc; a PostgreSQL store (claims with
    ``SELECT ... FOR UPDATE SKIP LOCKED``) would let several Orthanc nodes share
    the work behind the same interface.
    """

    def recover(self) -> int: ...
    def add(self, instance: str, *, study: str | None, series: str | None, model: str = "",
            version: str = "", state: str = "queued", reason: str | None = None,
            key: str | None = None) -> Job | None: ...
    def claim(self, job_id: int) -> Job | None: ...
    def claim_next(self) -> Job | None: ...
    def finish(self, job_id: int, state: str, *, reason: str | None = None,
               result: dict[str, Any] | None = None, retry_at: float = 0.0) -> None: ...
    def requeue(self, job_id: int) -> Job | None: ...
    def delete(self, job_id: int) -> None: ...
    def get(self, job_id: int) -> Job | None: ...
    def for_instance(self, instance: str) -> list[Job]: ...
    def list(self, **filters: Any) -> list[Job]: ...
    def counts(self) -> dict[str, int]: ...
    def add_to_inbox(self, items: list[tuple[str, str, int]], cursor: int) -> None: ...
    def push_inbox(self, items: list[tuple[str, str]]) -> None: ...
    def take_from_inbox(self) -> InboxItem | None: ...
    def ack_inbox(self, row: int) -> None: ...
    def inbox_size(self) -> int: ...
    def forget_instance_outcomes(self, instance: str) -> int: ...
    def get_value(self, key: str) -> str | None: ...


class SqliteJobStore:
    """Thread-safe; one connection per thread, WAL so readers never block the writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)  # executescript manages its own transaction
        columns = {r[1] for r in conn.execute("PRAGMA table_info(inbox)")}
        if "taken" not in columns:  # a queue written by an earlier version
            conn.execute("ALTER TABLE inbox ADD COLUMN taken REAL NOT NULL DEFAULT 0")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            key=row["job_key"],
            instance=row["instance"],
            study=row["study"],
            series=row["series"],
            model=row["model"],
            model_version=row["model_version"],
            state=row["state"],
            reason=row["reason"],
            attempts=row["attempts"],
            created=row["created"],
            updated=row["updated"],
            not_before=row["not_before"] if row["state"] == "failed" else 0.0,
            result=json.loads(row["result"]) if row["result"] else None,
        )

    # -- writing -------------------------------------------------------------

    def recover(self) -> int:
        """Jobs left ``running`` by a process that died go back to the queue.

        Inbox rows taken but not triaged are available again too.
        """
        with self._tx() as db:
            db.execute("UPDATE inbox SET taken=0 WHERE taken > 0")
            cur = db.execute(
                "UPDATE jobs SET state='queued', updated=? WHERE state='running'", (time.time(),)
            )
            return cur.rowcount

    def add(
        self,
        instance: str,
        *,
        study: str | None,
        series: str | None,
        model: str = "",
        version: str = "",
        state: str = "queued",
        reason: str | None = None,
        key: str | None = None,
    ) -> Job | None:
        """Create a job unless its key exists; returns the new job or None.

        Instance jobs are keyed by (instance, model, version); series jobs pass
        ``instance=""`` and a ``key`` naming the series and its set of slices.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (job_key, instance, study, series, model,"
                " model_version, state, reason, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key or job_key(instance, model, version), instance, study, series, model, version,
                 state, reason, now, now),
            )
            if cur.rowcount == 0:
                return None
            row = db.execute("SELECT * FROM jobs WHERE id=?", (cur.lastrowid,)).fetchone()
        return self._job(row)

    def claim(self, job_id: int) -> Job | None:
        """Move one queued job to running, if nobody else took it."""
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, updated=?"
                " WHERE id=? AND state = 'queued' RETURNING *",
                (time.time(), job_id),
            ).fetchone()
        return self._job(row) if row else None

    def claim_next(self) -> Job | None:
        """The oldest job that is due (queued, or failed and past its back-off)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, updated=?"
                " WHERE id = (SELECT id FROM jobs WHERE (state = 'queued' AND not_before <= ?)"
                " OR (state = 'failed' AND not_before > 0 AND not_before <= ?)"
                " ORDER BY not_before, id LIMIT 1) RETURNING *",
                (now, now, now),
            ).fetchone()
        return self._job(row) if row else None

    def finish(
        self,
        job_id: int,
        state: str,
        *,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
        retry_at: float = 0.0,
    ) -> None:
        if state not in STATES:
            raise ValueError(state)
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, reason=?, result=?, updated=?, not_before=?"
                " WHERE id=?",
                (state, reason, json.dumps(result) if result is not None else None,
                 time.time(), retry_at, job_id),
            )

    def requeue(self, job_id: int) -> Job | None:
        """Operator retry: any job that is not running goes back to the queue."""
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state='queued', attempts=0, not_before=0, updated=?"
                " WHERE id=? AND state != 'running' RETURNING *",
                (time.time(), job_id),
            ).fetchone()
        return self._job(row) if row else None

    # -- reading -------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def for_instance(self, instance: str) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE instance=? ORDER BY id", (instance,)
        ).fetchall()
        return [self._job(r) for r in rows]

    def list(
        self,
        *,
        state: str | None = None,
        study: str | None = None,
        model: str | None = None,
        instance: str | None = None,
        series: str | None = None,
        since_id: int = 0,
        limit: int = 1000,
    ) -> list[Job]:
        where, args = ["id > ?"], [since_id]
        for column, value in (("state", state), ("study", study), ("model", model),
                              ("instance", instance), ("series", series)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        rows = self._conn().execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        counts = dict.fromkeys(STATES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    # -- inbox: the durable side of the change log ------------------------------

    def add_to_inbox(self, items: list[tuple[str, str, int]], cursor: int) -> None:
        """Record changes and advance the cursor in one transaction (no gap, no loss)."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO inbox (kind, resource, seq, received) VALUES (?, ?, ?, ?)",
                [(kind, resource, seq, now) for kind, resource, seq in items],
            )
            db.execute(
                "INSERT INTO kv (key, value) VALUES ('changes_cursor', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(cursor),),
            )

    def push_inbox(self, items: list[tuple[str, str]]) -> None:
        """Queue (kind, resource) items durably ahead of the change log's, e.g. a
        reprocess request: it survives a stop before its triage."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO inbox (kind, resource, seq, received, taken) VALUES (?, ?, 0, ?, 0)"
                " ON CONFLICT(kind, resource) DO UPDATE SET taken=0, received=excluded.received",
                [(kind, resource, now) for kind, resource in items],
            )

    def take_from_inbox(self) -> InboxItem | None:
        """The oldest change not yet triaged, kept until :meth:`ack_inbox`.

        A row taken more than ``INBOX_RETAKE_SECONDS`` ago without an ack (its
        triage met a transient error) can be taken again.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "UPDATE inbox SET taken=? WHERE rowid = (SELECT rowid FROM inbox"
                " WHERE taken < ? ORDER BY seq LIMIT 1)"
                " RETURNING rowid, kind, resource, received",
                (now, now - INBOX_RETAKE_SECONDS),
            ).fetchone()
        return InboxItem(row[1], row[2], row[3], row[0]) if row else None

    def ack_inbox(self, row: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM inbox WHERE rowid=?", (row,))

    def inbox_size(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM inbox").fetchone()[0]

    def delete(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def forget_instance_outcomes(self, instance: str) -> int:
        """Drop instance-level outcomes (skipped/failed before routing) to decide again."""
        with self._tx() as db:
            return db.execute(
                "DELETE FROM jobs WHERE instance=? AND model='' AND state != 'running'",
                (instance,),
            ).rowcount

    def get_value(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return row[0] if row else None
