"""The SQLite job store: one node, any number of worker processes.

WAL mode: readers never block the writer, and a commit does not wait for
the disk (``synchronous=NORMAL``), which keeps the stored-instance callback
well under a millisecond. Every write is one short ``BEGIN IMMEDIATE``
transaction, so processes take turns on the write lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from inference.errors import TransientError

from .base import (
    DIED_REASON,
    INBOX_DONE_KEEP_SECONDS,
    STATES,
    InboxItem,
    InboxKind,
    Job,
    JobKind,
    JobState,
    NewJob,
    job_from_row,
)

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
    deaths INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    node TEXT,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    result TEXT,
    kind TEXT NOT NULL DEFAULT 'analysis'
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_instance ON jobs(instance);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind, state);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inbox (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    resource TEXT NOT NULL,
    received REAL NOT NULL,
    taken_by TEXT,
    taken_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, resource)
);
CREATE INDEX IF NOT EXISTS inbox_todo ON inbox(done, received);
"""




_NO_LOCK = nullcontext()
# What counts against MaxAttempts when a job's worker died: an analysis' attempts
# (its input may be what kills workers); for other kinds only the deaths, since
# their attempts are also spent on retries while a peer is down.
_DEATHS = "(CASE WHEN kind = 'analysis' THEN attempts ELSE deaths + 1 END)"
# An item to do again: whoever is triaging it loses it (their ack is ignored).
_REOPEN = ("DO UPDATE SET done=0, attempts=0, taken_until=0, taken_by=NULL,"
           " received=excluded.received")


def _node(owner: str) -> str:
    return owner.rsplit("/", 1)[0]


class SqliteJobStore:
    """Thread-safe: one connection per thread."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0,
                 fast_enqueue: bool = False) -> None:
        # fast_enqueue: WAL commits never wait for the disk here (synchronous=NORMAL).
        self.path = Path(path)
        self.url = str(self.path)
        # ":memory:" (unit tests): one connection shared by all threads.
        self._memory = str(path) == ":memory:"
        self._lock = threading.RLock()
        self._shared: sqlite3.Connection | None = None
        self._busy_timeout = busy_timeout
        if not self._memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
        if columns and "lease_until" not in columns:
            # A queue written before leases existed: keep its jobs, start a new inbox.
            conn.executescript(
                "ALTER TABLE jobs ADD COLUMN deaths INTEGER NOT NULL DEFAULT 0;"
                "ALTER TABLE jobs ADD COLUMN node TEXT;"
                "ALTER TABLE jobs ADD COLUMN owner TEXT;"
                "ALTER TABLE jobs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;"
                "DROP TABLE IF EXISTS inbox;"
            )
        if columns and "kind" not in columns:  # written before priors and forwarding
            conn.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'analysis'")
        conn.executescript(_SCHEMA)  # executescript manages its own transaction

    def _conn(self) -> sqlite3.Connection:
        if self._memory:
            if self._shared is None:
                self._shared = sqlite3.connect(":memory:", isolation_level=None,
                                               check_same_thread=False)
                self._shared.row_factory = sqlite3.Row
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock if self._memory else _NO_LOCK:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # the write lock stayed taken
                raise TransientError(f"the job store {self.url} is busy: {exc}") from exc
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- jobs ----------------------------------------------------------------

    def add(self, job: NewJob) -> Job | None:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (job_key, instance, study, series, model,"
                " model_version, state, reason, created, updated, kind, not_before)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_key, job.instance, job.study, job.series, job.model, job.version,
                 JobState(job.state).value, job.reason, now, now, JobKind(job.kind).value,
                 float(job.not_before)),
            )
            if cur.rowcount == 0:
                return None
            row = db.execute("SELECT * FROM jobs WHERE id=?", (cur.lastrowid,)).fetchone()
        return job_from_row(row)

    def claim(self, job_id: int, owner: str, lease_seconds: float) -> Job | None:
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, updated=?, owner=?,"
                " node=?, lease_until=? WHERE id=? AND state='queued' RETURNING *",
                (now, owner, _node(owner), now + lease_seconds, job_id),
            ).fetchone()
        return job_from_row(row) if row else None

    def claim_next(self, owner: str, lease_seconds: float, max_attempts: int) -> Job | None:
        now = time.time()
        with self._tx() as db:
            # Deaths that used up the attempts end here, for good: no crash loop.
            db.execute(
                "UPDATE jobs SET state='failed', not_before=0, owner=NULL, updated=?,"
                " deaths=deaths+1, reason=? || ' (' || (deaths+1) || ' time(s)); not retried"
                " automatically' WHERE state='running' AND lease_until < ?"
                " AND " + _DEATHS + " >= ?",
                (now, DIED_REASON, now, max_attempts),
            )
            row = db.execute(
                "UPDATE jobs SET deaths = deaths + (state='running'), state='running',"
                " attempts=attempts+1, updated=?, owner=?, node=?, lease_until=?"
                " WHERE id = (SELECT id FROM jobs WHERE (state='queued' AND not_before <= ?)"
                " OR (state='failed' AND not_before > 0 AND not_before <= ?)"
                " OR (state='running' AND lease_until < ?)"
                " ORDER BY not_before, id LIMIT 1) RETURNING *",
                (now, owner, _node(owner), now + lease_seconds, now, now, now),
            ).fetchone()
        return job_from_row(row) if row else None

    def renew(self, owner: str, lease_seconds: float) -> int:
        until = time.time() + lease_seconds
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET lease_until=? WHERE owner=? AND state='running'",
                           (until, owner)).rowcount
            db.execute("UPDATE inbox SET taken_until=? WHERE taken_by=? AND done=0",
                       (until, owner))
        return n

    def release_owner(self, owner: str) -> int:
        with self._tx() as db:
            db.execute("UPDATE inbox SET taken_until=0 WHERE taken_by=? AND done=0", (owner,))
            return db.execute(
                "UPDATE jobs SET lease_until=0 WHERE owner=? AND state='running'", (owner,)
            ).rowcount

    def release_node(self, node: str) -> int:
        with self._tx() as db:
            db.execute("UPDATE inbox SET taken_until=0 WHERE done=0"
                       " AND substr(taken_by, 1, length(?) + 1) = ? || '/'", (node, node))
            return db.execute(
                "UPDATE jobs SET lease_until=0 WHERE node=? AND state='running'", (node,)
            ).rowcount

    def finish(self, job_id: int, state: JobState, *, reason: str | None = None,
               result: dict[str, Any] | None = None, retry_at: float = 0.0,
               owner: str | None = None) -> bool:
        state = JobState(state)
        sql = ("UPDATE jobs SET state=?, reason=?, result=?, updated=?, not_before=?,"
               " owner=NULL, lease_until=0 WHERE id=?")
        args: list[Any] = [state.value, reason, json.dumps(result) if result is not None
                           else None, time.time(), retry_at, job_id]
        if owner is not None:
            sql += " AND owner=? AND state='running'"
            args.append(owner)
        with self._tx() as db:
            return db.execute(sql, args).rowcount == 1

    def requeue(self, job_id: int, not_before: float = 0.0) -> Job | None:
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state='queued', attempts=0, deaths=0, not_before=?, updated=?"
                " WHERE id=? AND state != 'running' RETURNING *",
                (float(not_before), time.time(), job_id),
            ).fetchone()
        return job_from_row(row) if row else None

    def delete(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def get(self, job_id: int) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def by_key(self, key: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE job_key=?", (key,)).fetchone()
        return job_from_row(row) if row else None

    def for_instance(self, instance: str) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE instance=? AND kind='analysis' ORDER BY id",
            (instance,)).fetchall()
        return [job_from_row(r) for r in rows]

    def list(self, *, state: str | None = None, study: str | None = None,
             model: str | None = None, instance: str | None = None,
             series: str | None = None, node: str | None = None, since_id: int = 0,
             kind: str | None = JobKind.ANALYSIS.value, limit: int = 1000,
             newest_first: bool = False) -> list[Job]:
        where, args = ["id > ?"], [since_id]
        for column, value in (("state", state), ("study", study), ("model", model),
                              ("instance", instance), ("series", series), ("node", node),
                              ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        rows = self._conn().execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id"
            f"{' DESC' if newest_first else ''} LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [job_from_row(r) for r in rows]

    def counts(self, kind: str | None = JobKind.ANALYSIS.value) -> dict[str, int]:
        rows = self._conn().execute(
            "SELECT state, COUNT(*) FROM jobs WHERE ? IS NULL OR kind = ? GROUP BY state",
            (kind, kind))
        counts = dict.fromkeys(STATES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def forget_instance_outcomes(self, instance: str) -> int:
        with self._tx() as db:
            return db.execute(
                "DELETE FROM jobs WHERE instance=? AND model='' AND kind='analysis'"
                " AND state != 'running'",
                (instance,),
            ).rowcount

    # -- inbox ---------------------------------------------------------------

    def push_inbox(self, items: list[tuple[InboxKind, str]], *, again: bool = False) -> None:
        now = time.time()
        conflict = _REOPEN if again else "DO NOTHING"
        with self._tx() as db:
            db.executemany(
                "INSERT INTO inbox (kind, resource, received) VALUES (?, ?, ?)"
                f" ON CONFLICT(kind, resource) {conflict}",
                [(InboxKind(k).value, r, now) for k, r in items],
            )

    def mark_triaged(self, items: list[tuple[InboxKind, str]]) -> None:
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO inbox (kind, resource, received, done) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(kind, resource) DO UPDATE SET done=1",
                [(InboxKind(k).value, r, now) for k, r in items],
            )

    def add_changes(self, items: list[tuple[InboxKind, str]], cursor: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO inbox (kind, resource, received) VALUES (?, ?, ?)"
                f" ON CONFLICT(kind, resource) {_REOPEN} WHERE inbox.kind = 'series'",
                [(InboxKind(k).value, r, now) for k, r in items],
            )
            db.execute(
                "INSERT INTO kv (key, value) VALUES ('changes_cursor', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value"
                " WHERE CAST(excluded.value AS INTEGER) > CAST(kv.value AS INTEGER)",
                (str(cursor),),
            )
            db.execute("DELETE FROM inbox WHERE done=1 AND received < ?",
                       (now - INBOX_DONE_KEEP_SECONDS,))

    def take_from_inbox(self, owner: str, limit: int, lease_seconds: float) -> list[InboxItem]:
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "UPDATE inbox SET taken_by=?, taken_until=?, attempts=attempts+1"
                " WHERE row IN (SELECT row FROM inbox WHERE done=0 AND taken_until < ?"
                " ORDER BY received, row LIMIT ?)"
                " RETURNING row, kind, resource, received, attempts",
                (owner, now + lease_seconds, now, limit),
            ).fetchall()
        items = [InboxItem(InboxKind(r["kind"]), r["resource"], r["received"], r["row"],
                           r["attempts"]) for r in rows]
        return sorted(items, key=lambda i: (i.queued_at, i.row))

    def ack_inbox(self, rows: list[int], owner: str | None = None) -> None:
        if rows:
            with self._tx() as db:
                db.executemany("UPDATE inbox SET done=1, taken_by=NULL WHERE row=?"
                               " AND (? IS NULL OR taken_by = ?)",
                               [(r, owner, owner) for r in rows])

    def release_inbox(self, rows: list[int], delay: float) -> None:
        if rows:
            with self._tx() as db:
                db.executemany(
                    "UPDATE inbox SET taken_until=?, attempts=MAX(0, attempts-1) WHERE row=?",
                    [(time.time() + delay, r) for r in rows])

    def inbox_size(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM inbox WHERE done=0").fetchone()[0]

    # -- values --------------------------------------------------------------

    def get_value(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_value(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?)"
                       " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))
