"""Every job store, behind the same fixtures: SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import pytest

from engine.stores import JobStore, open_store

STORES = ("sqlite", "postgres")


class Clock:
    """Stands in for ``time`` in the store modules: time moves only when told."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture(params=STORES)
def store_kind(request) -> str:
    return request.param


@pytest.fixture
def store_location(store_kind, tmp_path, request):
    """Where a fresh, empty store lives: a SQLite path, or a new PostgreSQL database."""
    if store_kind == "sqlite":
        yield str(tmp_path / "jobs.sqlite")
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
def pg_url(postgres_server) -> str:
    """An empty PostgreSQL database (emptied for each test: quicker than a new one)."""
    return postgres_server.reset_database("contract")


@pytest.fixture
def open_another(store_location):
    """Opens more store objects on the same store (another node, another process)."""
    opened: list[JobStore] = []

    def open_(**options) -> JobStore:
        store = open_store(store_location, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_another) -> JobStore:
    return open_another()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Freezes the stores' clock (``time.time()`` in their modules)."""
    fake = Clock()
    monkeypatch.setattr("engine.stores.sqlite.time", fake)
    monkeypatch.setattr("engine.stores.postgres.time", fake)
    return fake
