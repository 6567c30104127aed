"""The Orthanc glue, driven through a strict stub of the ``orthanc`` module."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from engine.config import ConfigError
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


def test_install_registers_callbacks_and_routes(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path / "no-models")})
    assert len(stub.stored_callbacks) == 1
    assert len(stub.change_callbacks) == 1
    assert {"/ai/jobs", "/ai/models", "/ai/metrics"} <= set(stub.rest_callbacks)
    assert (tmp_path / "db" / "orthanc-ai" / "jobs.sqlite").exists()


def test_stored_instance_callback_only_enqueues(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})
    stub.stored_callbacks[0](object(), "instance-1")
    assert adapter._service._inbox.get_nowait()[:2] == ("instance", "instance-1")
    assert adapter._service.store.counts()["queued"] == 0  # no work done in the callback


def test_stored_instance_callback_never_raises(load_adapter, tmp_path, monkeypatch):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})

    def broken(_):
        raise RuntimeError("queue broken")

    monkeypatch.setattr(adapter._service, "enqueue", broken)
    stub.stored_callbacks[0](object(), "instance-1")  # must not raise into Orthanc


def test_wrong_key_fails_loudly_naming_it(load_adapter):
    with pytest.raises(ConfigError, match="AI.Wrokers"):
        load_adapter({"Wrokers": 2})


def test_disabled_registers_nothing(load_adapter):
    stub, _ = load_adapter({"Enabled": False})
    assert not stub.stored_callbacks and not stub.rest_callbacks


def test_rest_routes_answer_json_and_check_method(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})
    out = RestOutput()
    stub.rest_callbacks["/ai/jobs"](out, "/ai/jobs", method="GET", get={})
    assert out.status == 200 and json.loads(out.body) == []
    out = RestOutput()
    stub.rest_callbacks["/ai/jobs"](out, "/ai/jobs", method="DELETE", get={})
    assert out.status == 405
    out = RestOutput()
    stub.rest_callbacks["/ai/jobs"](out, "/ai/jobs", method="GET", get={"state": "bogus"})
    assert out.status == 400
    out = RestOutput()
    stub.rest_callbacks["/ai/metrics"](out, "/ai/metrics", method="GET", get={})
    assert b"orthanc_ai_queue_depth" in out.body


def test_stable_series_is_queued_for_series_models(load_adapter, tmp_path):
    stub, adapter = load_adapter({"ModelsDirectory": str(tmp_path)})
    stub.change_callbacks[0](stub.ChangeType.STABLE_SERIES, 0, "series-1")
    assert adapter._service._inbox.get_nowait()[:2] == ("series", "series-1")


def test_workers_yield_to_a_burst_of_stores_but_not_to_one_image(load_adapter, tmp_path):
    import time

    _, adapter = load_adapter({"ModelsDirectory": str(tmp_path), "IngestQuietMs": 200,
                               "IngestMaxDeferMs": 400})
    service = adapter._service

    def timed_yield() -> float:
        t0 = time.monotonic()
        service._yield_to_ingest()
        return time.monotonic() - t0

    service.enqueue("instance-1")
    assert not service.in_ingest_burst()
    assert timed_yield() < 0.05  # a single image is analysed at once
    service.enqueue("instance-2")
    assert service.in_ingest_burst()
    assert 0.1 < timed_yield() < 0.35  # until 200 ms after the burst's first store
    assert not service.in_ingest_burst()
    # Endless ingest (stores always "just now"): the wait is capped.
    service._arrivals.extend([time.monotonic() + 60, time.monotonic() + 60])
    assert 0.35 < timed_yield() < 0.8


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
