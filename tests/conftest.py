"""Fixtures any test may use."""

import pytest


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One throw-away PostgreSQL server for the session (see tests/pg.py)."""
    from tests.pg import PostgresServer, PostgresUnavailable

    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()
