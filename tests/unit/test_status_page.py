"""The AI status page (/ai/), the study summary (/ai/studies/{id}) and the Explorer
extension, without Orthanc: HTML rendered from plain values, and the routes
driven through the strict stub of the ``orthanc`` module."""

from __future__ import annotations

import base64
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

from engine.stores import JobKind, JobState, NewJob
from engine.summary import result_summary
from plugin import access
from plugin.status_page import explorer_url, ohif_url, render_status
from tests.orthanc_stub import RestOutput, StrictOrthanc

HOSTILE = '<script>alert("x")</script>'
STUDY = "0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"
SERIES = "1a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"
INSTANCE = "2a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"
SR = "3a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"


def _job(id_: int, state: str, **kw) -> dict:
    job = {"id": id_, "kind": "analysis", "state": state, "model": "limb-fracture-xr",
           "model_version": "1.0", "level": "instance", "instance": INSTANCE, "study": STUDY,
           "series": SERIES, "attempts": 1, "next_attempt": None, "reason": None,
           "node": "node-a", "created": "2026-12-02T07:00:00Z",
           "updated": "2026-12-02T07:00:01Z", "result": None, "summary": None,
           "study_instance_uid": None}
    job.update(kw)
    return job


def _status(**kw) -> dict:
    status = {
        "node": "node-a", "version": "9.8.7", "ready": True, "generated": "2026-12-02 07:00:02 UTC",
        "workers": [{"index": 0, "pid": 123, "state": "ready", "restarts": 0,
                     "last_exit": None, "started": "2026-12-02T06:59:00Z"}],
        "nodes": [{"node": "node-a", "running": 0, "jobs": 3, "last_update": "x"}],
        "queue": {"location": "/data/jobs.sqlite", "reachable": True, "inbox": 2,
                  "jobs": {"analysis": {"queued": 1, "running": 1, "done": 1, "failed": 1}}},
        "jobs": [
            _job(3, "done", summary="Fracture present, probability 0.63",
                 study_instance_uid="1.2.3.4",
                 result={"sr_instance": SR, "finding": "Fracture", "probability": 0.63}),
            _job(2, "failed", reason="decode: JPEG 2000 codec missing"),
            _job(1, "dead", reason="Orthanc unreachable"),
        ],
        "models": [{"model": "limb-fracture-xr", "version": "1.0",
                    "counts": {"done": 1, "failed": 1, "dead": 1}, "p50_s": 0.4, "p95_s": 1.2}],
        "model_window": 1000,
        "latency": {"stages": {"infer": {"count": 3, "mean_s": 0.1, "p50_s": 0.1,
                                         "p95_s": 0.25}},
                    "end_to_end": {"count": 1, "mean_s": 0.9, "p50_s": 1, "p95_s": 1},
                    "finished": {"done": 1}},
        "deliveries": {"recent": [{"id": 9, "kind": "forward", "destination": "PACS",
                                   "state": "failed", "attempts": 2, "reason": "refused",
                                   "updated": "x", "sr_instance": SR}]},
        "audit": {"enabled": True, "log": "/data/orthanc-ai/audit.log", "size_bytes": 4096,
                  "last_seq": 12,
                  "repository": {"host": "arr.example", "port": 6514, "transport": "tls",
                                 "forwarded_seq": 10, "backlog": 2, "last_error": None}},
    }
    status.update(kw)
    return status


def _retry_ids(page: str) -> list[str]:
    return re.findall(r'<button type="button" class="ai-retry" data-job="([0-9]+)">', page)


# -- rendering ------------------------------------------------------------------------

def test_every_value_is_escaped():
    hostile_job = _job(7, "failed", reason=HOSTILE, model=HOSTILE, node=HOSTILE,
                       summary=HOSTILE, study_instance_uid='1.2"><img src=x onerror=alert(1)>',
                       study='x" onclick="alert(1)')
    status = _status(
        node=HOSTILE, jobs=[hostile_job],
        workers=[{"index": 0, "pid": 1, "state": HOSTILE, "restarts": 0,
                  "last_exit": HOSTILE, "started": None}],
        nodes=[{"node": HOSTILE, "running": 0, "jobs": 1, "last_update": HOSTILE}],
        models=[{"model": HOSTILE, "version": HOSTILE, "counts": {}, "p50_s": None,
                 "p95_s": None}],
        deliveries={"recent": [{"id": 1, "kind": HOSTILE, "destination": HOSTILE,
                                "state": HOSTILE, "attempts": 1, "reason": HOSTILE,
                                "updated": HOSTILE, "sr_instance": HOSTILE}]},
        audit={"enabled": True, "log": HOSTILE, "size_bytes": 1, "last_seq": 1,
               "repository": {"host": HOSTILE, "port": 1, "transport": HOSTILE,
                              "forwarded_seq": 0, "backlog": 1, "last_error": HOSTILE}},
        queue={"location": HOSTILE, "reachable": False, "inbox": 0,
               "jobs": {HOSTILE: {"queued": 1}}},
    )
    page = render_status(status, admin=True)
    assert HOSTILE not in page
    assert "<img" not in page and 'onclick="alert' not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 10
    # Our own one script, and no other.
    assert page.count("<script>") == 1


def test_retry_buttons_only_for_administrators_and_only_for_failed_or_dead_jobs():
    admin = render_status(_status(), admin=True)
    assert _retry_ids(admin) == ["2", "1"]
    assert 'data-job="3"' not in admin  # done: nothing to retry
    other = render_status(_status(), admin=False)
    assert _retry_ids(other) == [] and "ai-retry\"" not in other.split("<style>")[0]
    assert 'class="ai-retry"' not in other


def test_jobs_table_lists_state_reason_finding_and_links():
    page = render_status(_status(), admin=False)
    table = page.split('id="ai-jobs"', 1)[1].split("</table>", 1)[0]
    assert '<tr data-job-id="3" data-state="done">' in table
    assert "Fracture present, probability 0.63" in table
    assert "decode: JPEG 2000 codec missing" in table
    assert f'href="../app/explorer.html#study?uuid={STUDY}"' in table
    assert f'href="../app/explorer.html#instance?uuid={SR}"' in table
    assert 'href="../ohif/viewer?StudyInstanceUIDs=1.2.3.4"' in table
    assert '<span class="st st-dead">dead</span>' in table


def test_page_sections_queue_workers_models_deliveries_audit():
    page = render_status(_status(), admin=False)
    assert '<strong id="ai-queue-depth">4</strong>' in page  # inbox 2 + queued 1 + running 1
    assert '<span id="ai-version" class="muted">orthanc-ai 9.8.7</span>' in page
    assert 'id="ai-worker-table"' in page and ">123<" in page
    assert "limb-fracture-xr" in page.split('id="ai-model-table"', 1)[1]
    assert ">infer<" in page and "end to end" in page
    assert ">PACS<" in page.split('id="ai-delivery-table"', 1)[1]
    assert "arr.example" in page and "<strong class=\"warn\">2</strong> waiting" in page
    assert "4.0 KiB" in page
    page = render_status(_status(audit={"enabled": True, "log": "/a.log", "size_bytes": 0,
                                        "last_seq": 0, "repository": None}), admin=False)
    assert "No audit repository configured" in page


def test_page_renders_with_nothing_yet():
    page = render_status({"node": "n"}, admin=True)
    assert "no analysis yet" in page and "no worker process" in page
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>")


def test_links_are_relative_and_quoted():
    assert explorer_url("study", STUDY) == f"../app/explorer.html#study?uuid={STUDY}"
    assert ohif_url("1.2.840.1") == "../ohif/viewer?StudyInstanceUIDs=1.2.840.1"
    assert ohif_url('1&x="y') == "../ohif/viewer?StudyInstanceUIDs=1%26x%3D%22y"


# -- the finding in words -----------------------------------------------------------

@pytest.mark.parametrize(("result", "text"), [
    ({"finding": "Fracture", "probability": 0.63, "positive": True},
     "Fracture present, probability 0.63"),
    ({"finding": "Fracture", "probability": 0.12, "threshold": 0.5},
     "Fracture absent, probability 0.12"),
    ({"finding": "Hemorrhage", "probability": 0.91, "positive": True, "volume_ml": 12.44,
      "comparison": {"state": "compared",
                     "text": "new since 2024-03-01 (probability 0.10 -> 0.91)"}},
     "Hemorrhage present, probability 0.91, volume 12.4 mL; new since 2024-03-01 "
     "(probability 0.10 -> 0.91)"),
    ({"finding": "Fracture", "probability": 0.7, "positive": True,
      "comparison": {"state": "pending", "reason": "r"}}, "Fracture present, probability 0.70"),
    ({"revised": False, "why": "x"}, None),
    (None, None),
])
def test_result_summary(result, text):
    assert result_summary(result) == text


# -- who is an administrator ----------------------------------------------------------

def _basic(user: str, password: str = "pw") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def test_is_administrator():
    assert access.is_administrator({}, (), authentication=False)  # nothing enforced
    assert access.is_administrator(_basic("alice"), ("alice",), authentication=True)
    assert not access.is_administrator(_basic("bob"), ("alice",), authentication=True)
    assert not access.is_administrator(None, ("alice",), authentication=True)
    assert not access.is_administrator({"authorization": "Bearer x"}, ("alice",), True)


# -- through the adapter ----------------------------------------------------------------

@pytest.fixture
def plugin(tmp_path, monkeypatch):
    def load(**config):
        base = {"StorageDirectory": str(tmp_path / "db"), "HttpPort": 1,
                "AI": {"ModelsDirectory": str(tmp_path / "no-models"),
                       "Administrators": ["alice"]}}
        base.update(config)
        stub = StrictOrthanc(base)
        monkeypatch.setitem(sys.modules, "orthanc", stub)
        monkeypatch.delitem(sys.modules, "plugin.adapter", raising=False)
        adapter = importlib.import_module("plugin.adapter")
        adapter.install()
        return stub, adapter._plugin

    return load


def _get(stub, route: str, groups: tuple = (), headers: dict | None = None,
         get: dict | None = None) -> RestOutput:
    out = RestOutput()
    stub.rest_callbacks[route](out, route, method="GET", get=get or {}, groups=groups,
                               headers=headers or {})
    return out


def _failed_and_done(store) -> tuple[int, int]:
    failed = store.add(NewJob(INSTANCE, STUDY, SERIES, model="m", version="1"))
    store.finish(failed.id, JobState.FAILED, reason="decode: <broken>")
    done = store.add(NewJob(INSTANCE[:-1] + "f", STUDY, SERIES, model="m", version="1"))
    store.finish(done.id, JobState.DONE, result={
        "finding": "Fracture", "probability": 0.63, "positive": True, "sr_instance": SR,
        "study_instance_uid": "1.2.3"})
    return failed.id, done.id


def test_status_page_is_html_with_retry_for_administrators_only(plugin):
    stub, p = plugin(RemoteAccessAllowed=True, RegisteredUsers={"alice": "a", "bob": "b"})
    failed, _ = _failed_and_done(p.store)
    out = _get(stub, "/ai", headers=_basic("alice"))
    page = out.body.decode()
    assert out.status == 200 and out.content_type == "text/html; charset=utf-8"
    assert 'id="ai-jobs"' in page and "decode: &lt;broken&gt;" in page
    assert _retry_ids(page) == [str(failed)]
    assert "Fracture present, probability 0.63" in page  # summary made from the result
    # The failed job's OHIF link takes the UID another job of its study recorded.
    assert page.count('href="../ohif/viewer?StudyInstanceUIDs=1.2.3"') == 2
    assert _retry_ids(_get(stub, "/ai", headers=_basic("bob")).body.decode()) == []
    assert _retry_ids(_get(stub, "/ai").body.decode()) == []  # no credentials seen


def test_status_page_everyone_is_administrator_without_authentication(plugin):
    stub, p = plugin(AuthenticationEnabled=False)
    failed, _ = _failed_and_done(p.store)
    assert _retry_ids(_get(stub, "/ai").body.decode()) == [str(failed)]


def test_study_summary_lists_jobs_findings_and_deliveries(plugin):
    stub, p = plugin()
    failed, done = _failed_and_done(p.store)
    p.store.add(NewJob(SR, STUDY, None, kind=JobKind.FORWARD, key="forward:PACS:1.2.9"))
    out = _get(stub, "/ai/studies/([^/]+)", groups=(STUDY,))
    info = json.loads(out.body)
    assert out.status == 200
    assert info["study_instance_uid"] == "1.2.3"
    assert [j["id"] for j in info["jobs"]] == [failed, done]
    assert info["jobs"][0]["reason"] == "decode: <broken>"
    (finding,) = info["findings"]
    assert finding["summary"] == "Fracture present, probability 0.63"
    assert finding["sr_instance"] == SR
    assert [d["destination"] for d in info["deliveries"]] == ["PACS"]
    assert info["counts"]["failed"] == 1 and info["counts"]["done"] == 1


@pytest.mark.parametrize(("group", "get"), [("x';--", {}), ("../jobs", {}),
                                            (STUDY, {"colour": "red"})])
def test_study_summary_checks_its_parameters(plugin, group, get):
    stub, _ = plugin()
    out = _get(stub, "/ai/studies/([^/]+)", groups=(group,), get=get)
    assert out.status == 400 and json.loads(out.body)["error"]


def test_explorer_extension_is_registered_from_the_file(plugin):
    stub, _ = plugin()
    (js,) = stub.explorer_js
    assert js == (Path(__file__).resolve().parents[2] / "orthanc" / "explorer.js").read_text()
    for marker in ("orthanc-ai-panel", "orthanc-ai-ohif", "../ai/studies/",
                   "../ohif/viewer?StudyInstanceUIDs=", "$('#study').live('pagebeforeshow'",
                   "$('#series').live('pagebeforeshow'"):
        assert marker in js
    assert ".html(" not in js  # values go in with .text() / .attr() only
