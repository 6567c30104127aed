import pytest

from tests.harness import OrthancAI


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Orthanc with orthanc-ai for the tests of a module."""
    srv = OrthancAI(tmp_path_factory.mktemp("orthanc"))
    srv.start()
    yield srv
    srv.stop()
