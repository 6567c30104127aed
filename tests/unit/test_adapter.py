"""The Orthanc glue, driven through a strict stub of the ``orthanc`` module."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from engine.config import ConfigError
from inference.version import __version__
from tests.orthanc_stub import RestOutput, StrictOrthanc


@pytest.fixture
def load_adapter(tmp_path, monkeypatch):
    def load(ai: dict | None = None):
        config = {"StorageDirectory": str(tmp_path / "db"), "HttpPort": 1}
        if ai is not None:
            config["AI"] = ai
        stub = StrictOrthanc(config)
        monkeypatch.setitem(sys.modules, "orthanc", stub)
        monkeypatch.delitem(sys.modules, "plugin.adapter", raising=False)
        adapter = importlib.import_module("plugin.adapter")
        adapter.install()
        return stub, adapter

    return load


def _call(stub: StrictOrthanc, route: str, uri: str | None = None, method: str = "GET",
          get: dict | None = None, groups: tuple = ()) -> RestOutput:
    out = RestOutput()
    stub.rest_callbacks[route](out, uri or route, method=method, get=get or {}, groups=groups)
    return out


def test_install_registers_callbacks_and_routes(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path / "no-models")})
    assert len(stub.stored_callbacks) == 1
    assert len(stub.change_callbacks) == 1
    assert {"/ai/jobs", "/ai/models", "/ai/health", "/ai/metrics"} <= set(stub.rest_callbacks)
    assert (tmp_path / "db" / "orthanc-ai" / "jobs.sqlite").exists()


def _written(adapter) -> None:
    """Until the plugin's inbox writer has written what the callbacks queued."""
    import time

    deadline = time.time() + 5
    while adapter._plugin._pending and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def test_stored_instance_callback_only_enqueues(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})
    stub.stored_callbacks[0](object(), "instance-1")
    stub.stored_callbacks[0](object(), "instance-1")  # the same event twice: one row
    _written(adapter)
    store = adapter._plugin.store
    assert store.inbox_size() == 1
    (item,) = store.take_from_inbox("test/1", 10, 30)
    assert (item.kind, item.resource) == ("instance", "instance-1")
    assert store.counts()["queued"] == 0  # no work done in the callback
    cost = json.loads(_call(stub, "/ai/health").body)["callback"]
    assert cost["calls"] == 2 and 0 < cost["p50_us"] <= cost["p99_us"] <= cost["max_us"]


def test_stored_instance_callback_never_raises(load_adapter, tmp_path, monkeypatch):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})

    def broken(*_args, **_kw):
        raise RuntimeError("queue broken")

    monkeypatch.setattr(adapter._plugin.inbox, "push_inbox", broken)
    stub.stored_callbacks[0](object(), "instance-1")  # must not raise into Orthanc
    _written(adapter)
    assert adapter._plugin._writer.is_alive()  # and the writer goes on


def test_stable_series_is_queued(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})
    stub.change_callbacks[0](stub.ChangeType.STABLE_SERIES, 0, "series-1")
    _written(adapter)
    (item,) = adapter._plugin.store.take_from_inbox("test/1", 10, 30)
    assert (item.kind, item.resource) == ("series", "series-1")


def test_wrong_key_fails_loudly_naming_it(load_adapter):
    with pytest.raises(ConfigError, match="AI.Wrokers"):
        load_adapter({"Wrokers": 2})


def test_disabled_registers_nothing(load_adapter):
    stub, _ = load_adapter({"Enabled": False})
    assert not stub.stored_callbacks and not stub.rest_callbacks


def test_rest_routes_answer_json_and_check_method(load_adapter, tmp_path):
    stub, _ = load_adapter({"ModelsDirectory": str(tmp_path)})
    out = _call(stub, "/ai/jobs")
    assert out.status == 200 and json.loads(out.body) == []
    assert _call(stub, "/ai/jobs", method="DELETE").status == 405
    out = _call(stub, "/ai/metrics")
    assert b"orthanc_ai_queue_depth" in out.body and b"orthanc_ai_workers" in out.body
    models = json.loads(_call(stub, "/ai/models").body)
    assert models["ready"] is False  # no worker has loaded anything yet
    assert models["version"] == __version__
    health = json.loads(_call(stub, "/ai/health").body)
    assert health["queue"]["reachable"] is True and health["workers"] == []


@pytest.mark.parametrize("query", [
    {"state": "bogus"}, {"limit": "0"}, {"limit": "-1"}, {"limit": "10001"}, {"limit": "x"},
    {"since": "-5"}, {"since": "1e3"}, {"study": "not-an-id"}, {"instance": "../x"},
    {"model": "a b"}, {"node": "x" * 300}, {"colour": "red"},
])
def test_job_list_parameters_are_checked(load_adapter, tmp_path, query):
    stub, _ = load_adapter({"ModelsDirectory": str(tmp_path)})
    out = _call(stub, "/ai/jobs", get=query)
    assert out.status == 400 and json.loads(out.body)["error"]


@pytest.mark.parametrize(("route", "uri", "method", "group", "status"), [
    ("/ai/jobs/([0-9]+)", "/ai/jobs/5", "GET", "5", 404),
    ("/ai/jobs/([0-9]+)", "/ai/jobs/9", "GET", "9" * 30, 400),
    ("/ai/jobs/([0-9]+)/retry", "/ai/jobs/5/retry", "POST", "5", 409),
    ("/ai/jobs/([0-9]+)/retry", "/ai/jobs/9/retry", "POST", "9" * 25, 400),
    ("/ai/studies/([^/]+)/reprocess", "/ai/studies/x/reprocess", "POST", "x';--", 400),
])
def test_routes_answer_4xx_never_500(load_adapter, tmp_path, route, uri, method, group, status):
    stub, _ = load_adapter({"ModelsDirectory": str(tmp_path)})
    assert _call(stub, route, uri, method=method, groups=(group,)).status == status


def test_relative_storage_directory_is_read_like_orthanc(tmp_path, monkeypatch):
    # Orthanc reads a relative StorageDirectory from the configuration file's folder.
    (tmp_path / "etc").mkdir()
    stub = StrictOrthanc({"StorageDirectory": "db", "HttpPort": 1,
                          "AI": {"ModelsDirectory": str(tmp_path)}},
                         path=str(tmp_path / "etc" / "orthanc.json"))
    monkeypatch.setitem(sys.modules, "orthanc", stub)
    monkeypatch.delitem(sys.modules, "plugin.adapter", raising=False)
    importlib.import_module("plugin.adapter").install()
    assert (tmp_path / "etc" / "db" / "orthanc-ai" / "jobs.sqlite").exists()


def test_the_plugin_imports_nothing_heavy():
    """Orthanc's interpreter gets no TensorFlow, no pixel codecs, no highdicom:
    pydicom alone loads GDCM, so it stays out too."""
    code = (
        "import sys; from tests.orthanc_stub import StrictOrthanc;"
        "sys.modules['orthanc'] = StrictOrthanc({'HttpPort': 1});"
        "import plugin.adapter, plugin.routes, plugin.supervisor;"
        "heavy = {'tensorflow', 'pydicom', 'highdicom', 'gdcm', 'numpy', 'PIL', 'pylibjpeg'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_workers_run_below_orthanc_priority(tmp_path):
    from plugin.supervisor import Supervisor

    def command(**kw) -> list[str]:
        return Supervisor(1, {}, node="n", log_dir=tmp_path, env={}, on_death=print,
                          **kw)._command()

    assert command(nice=10)[:5] == ["nice", "-n", "10", "ionice", "-c"]
    assert command(nice=10, idle=True)[:3] == ["chrt", "--idle", "0"]
    assert command(nice=0)[-2:] == ["-m", "engine.worker"] and "nice" not in command(nice=0)
