"""Job stores: SQLite for one node, PostgreSQL for several (``AI.QueueDatabase``)."""

from __future__ import annotations

from pathlib import Path

from .base import (
    DIED_REASON,
    STATES,
    InboxItem,
    InboxKind,
    Job,
    JobKind,
    JobState,
    JobStore,
    NewJob,
    job_key,
)

__all__ = ["DIED_REASON", "STATES", "InboxItem", "InboxKind", "Job", "JobKind", "JobState",
           "JobStore", "NewJob", "job_key", "is_postgres_url", "open_store"]


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, **options: float | bool) -> JobStore:
    """The store at ``location``: a ``postgresql://`` URL, or a SQLite file path."""
    if isinstance(location, str) and is_postgres_url(location):
        from .postgres import PostgresJobStore

        return PostgresJobStore(location, **options)
    from .sqlite import SqliteJobStore

    return SqliteJobStore(Path(location), **options)
