"""plugin/access.py: the incoming-HTTP-request filter, with the arguments
orthanc-python 4.0 passes (uri, method=int, ip=, headers= lower-case, get=)."""

from __future__ import annotations

import base64
import logging
import sys

import pytest

from plugin import access
from tests.orthanc_stub import StrictOrthanc

GET, POST, PUT, DELETE = 1, 2, 3, 4


def basic(user: str, password: str = "pw") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}", "host": "127.0.0.1:8042"}


@pytest.fixture
def check():
    allow = access.make_filter(["admin", "second-admin"])

    def call(uri: str, method: int, headers: dict[str, str], **more) -> bool:
        result = allow(uri, method=method, ip="10.0.0.7", headers=headers, **more)
        assert isinstance(result, bool)  # anything else is a 500 for every route
        return result

    return call


@pytest.mark.parametrize("route", ["/ai/jobs/12/retry",
                                   "/ai/studies/0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"
                                   "/reprocess"])
def test_administrator_may_change(check, route):
    assert check(route, POST, basic("admin"))
    assert check(route, POST, basic("second-admin"))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_other_user_is_refused_with_an_alert(check):
    # Our own handler: the adapter, once installed, stops propagation to root.
    records = _Records()
    logger = logging.getLogger("orthanc_ai")
    logger.addHandler(records)
    try:
        assert not check("/ai/jobs/12/retry", POST, basic("reader"))
    finally:
        logger.removeHandler(records)
    alert = " ".join(records.messages)
    assert "security alert: refused POST /ai/jobs/12/retry by user reader from 10.0.0.7" \
        in alert


@pytest.mark.parametrize("method", [POST, PUT, DELETE])
def test_every_method_but_get_needs_an_administrator(check, method):
    assert not check("/ai/jobs", method, basic("reader"))
    assert check("/ai/jobs", method, basic("admin"))


def test_alert_goes_through_the_single_call_site(check, monkeypatch):
    seen = []
    monkeypatch.setattr(access, "_alert", lambda *a: seen.append(a))
    check("/ai/studies/x/reprocess", POST, basic("reader"))
    assert seen == [("refused", "reader", "POST", "/ai/studies/x/reprocess", "10.0.0.7")]
    check("/ai/jobs/1/retry", POST, {})
    assert seen[-1] == ("refused", None, "POST", "/ai/jobs/1/retry", "10.0.0.7")


def test_get_is_allowed_to_any_user(check):
    assert check("/ai/jobs", GET, basic("reader"), get={"state": "done"})
    assert check("/ai/health", GET, basic("reader"), get={})
    assert check("/ai/metrics", GET, {}, get={})  # Orthanc has authenticated it already


@pytest.mark.parametrize("uri", ["/instances", "/tools/lookup", "/modalities/PACS/store",
                                 "/dicom-web/studies", "/aix/jobs", "/tools/ai/jobs"])
def test_routes_outside_ai_are_untouched(check, uri):
    assert check(uri, POST, basic("reader"))
    assert check(uri, DELETE, {})


@pytest.mark.parametrize("uri", ["//ai/jobs/1/retry", "/AI/jobs/1/retry", "/%61i/jobs/1/retry",
                                 "/tools/../ai/jobs/1/retry", "/./ai/jobs/1/retry",
                                 "/ai", "/ai/"])
def test_ai_however_spelt(check, uri):
    assert not check(uri, POST, basic("reader"))
    assert check(uri, POST, basic("admin"))


def test_the_workers_token(check):
    """The workers' loopback calls carry ``Authorization: Bearer <token>``
    (Orthanc 1.10.1 does not even pass them to the filter): their reads, and
    Orthanc's own routes, pass; it names no administrator for /ai changes."""
    token = {"authorization": "Bearer 6c4b9c3e-7a1d-4e33-9b0e-5f1f8c2a0d11"}
    for uri in ("/instances/abc/file", "/series/abc", "/changes", "/tools/lookup"):
        assert check(uri, GET, token, get={})
    assert check("/instances", POST, token)  # storing the SR
    assert check("/ai/jobs", GET, token, get={})
    assert not check("/ai/jobs/1/retry", POST, token)


@pytest.mark.parametrize("value", ["Basic", "Basic !!!notbase64", "Basic " +
                                   base64.b64encode(b"admin").decode(), "Digest admin",
                                   "Basic " + base64.b64encode(b"\xff\xfe:x").decode()])
def test_malformed_credentials_name_no_one(check, value):
    assert not check("/ai/jobs/1/retry", POST, {"authorization": value})


def test_header_name_case_and_password_with_colons(check):
    token = base64.b64encode(b"admin:pa:ss").decode()
    assert check("/ai/jobs/1/retry", POST, {"Authorization": f"basic {token}"})
    # The user part is the whole user: "admin" is not a prefix match.
    assert not check("/ai/jobs/1/retry", POST, basic("admin2"))
    assert not check("/ai/jobs/1/retry", POST, basic("Admin"))


def test_no_administrators_means_no_changes():
    allow = access.make_filter(())
    assert not allow("/ai/jobs/1/retry", method=POST, ip="", headers=basic("admin"))
    assert allow("/ai/jobs", method=GET, ip="", headers=basic("admin"), get={})


def test_filter_never_raises(monkeypatch):
    allow = access.make_filter(["admin"])

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(access, "basic_user", broken)
    assert allow("/ai/jobs/1/retry", method=POST, ip="x", headers=basic("admin")) is False
    assert allow("/instances", method=POST, ip="x", headers=basic("admin")) is True
    assert allow(None, method=POST, ip="x", headers=None) is False


@pytest.mark.parametrize("config, enabled", [
    ({}, False),
    ({"AuthenticationEnabled": True}, True),
    ({"AuthenticationEnabled": False, "RemoteAccessAllowed": True}, False),
    ({"RemoteAccessAllowed": True}, True),  # Orthanc's default follows remote access
    ({"RemoteAccessAllowed": False}, False),
])
def test_authentication_enabled_like_orthanc(config, enabled):
    assert access.authentication_enabled(config) is enabled


def _install(monkeypatch, tmp_path, **config):
    import importlib

    stub = StrictOrthanc({"StorageDirectory": str(tmp_path / "db"), "HttpPort": 1,
                          "AI": {"ModelsDirectory": str(tmp_path / "no-models"),
                                 "Administrators": ["admin"]}, **config})
    monkeypatch.setitem(sys.modules, "orthanc", stub)
    monkeypatch.delitem(sys.modules, "plugin.adapter", raising=False)
    adapter = importlib.import_module("plugin.adapter")
    adapter.install()
    return stub, adapter


def test_adapter_registers_the_filter_when_authentication_is_on(monkeypatch, tmp_path):
    stub, adapter = _install(monkeypatch, tmp_path, AuthenticationEnabled=True)
    try:
        assert len(stub.http_filters) == 1
        allow = stub.http_filters[0]
        assert allow("/ai/jobs/1/retry", method=POST, ip="", headers=basic("admin")) is True
        assert allow("/ai/jobs/1/retry", method=POST, ip="", headers=basic("bob")) is False
    finally:
        adapter._plugin.stop()


def test_adapter_registers_no_filter_when_authentication_is_off(monkeypatch, tmp_path):
    stub, adapter = _install(monkeypatch, tmp_path)
    try:
        assert stub.http_filters == []
        assert any("not enforced" in m for _, m in stub.logs)
    finally:
        adapter._plugin.stop()


def test_hardened_configuration_is_valid_and_hardened():
    from engine.config import check_peers, load_orthanc_json, parse_ai_section
    from tests.harness import ROOT

    config = load_orthanc_json(ROOT / "orthanc" / "hardened.json")
    ai = parse_ai_section(config["AI"])  # what check-config and the plugin run
    check_peers(ai, config)
    assert access.authentication_enabled(config)
    assert config["RegisteredUsers"] and ai.administrators
    assert set(ai.administrators) <= set(config["RegisteredUsers"])
    assert all("CHANGE-ME" in p for p in config["RegisteredUsers"].values())
    assert config["DicomAlwaysAllowStore"] is False
    assert config["DicomCheckModalityHost"] is True
    assert config["DicomCheckCalledAet"] is True
    assert config["RemoteAccessAllowed"] is True
    assert len(config["DicomModalities"]) == 1
