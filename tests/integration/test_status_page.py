"""What a person sees on a real Orthanc: the AI status page (/ai/), one study's AI
state (/ai/studies/{id}, the Explorer panel's source) and the Orthanc Explorer
extension that Orthanc serves with its own pages."""

from __future__ import annotations

import html

import pydicom
import pytest

from tests.factories import synthetic_dx


@pytest.fixture(scope="module")
def analysed(server, tmp_path_factory):
    """One radiograph sent by C-STORE and analysed: (its instance ID, its job)."""
    path = tmp_path_factory.mktemp("dx") / "dx.dcm"
    synthetic_dx(401, fracture=True, age=81.0, sex="F").save_as(path, enforce_file_format=True)
    server.storescu([path])
    instance = server.lookup(str(pydicom.dcmread(path).SOPInstanceUID))
    (job,) = server.wait_jobs([instance])
    assert job["state"] == "done", job
    return instance, job


def test_a_finished_job_describes_its_finding_in_words(analysed):
    _, job = analysed
    result = job["result"]
    word = "present" if result["positive"] else "absent"
    assert result["summary"].startswith(
        f"{result['finding']} {word}, probability {result['probability']:.2f}")
    assert result["study_instance_uid"]


def test_status_page_lists_the_job_and_its_finding(server, analysed):
    _, job = analysed
    for path in ("/ai/", "/ai"):  # Orthanc hands both to the plugin alike
        r = server.http.get(server.url + path, timeout=30)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        page = r.text
        assert 'id="ai-jobs"' in page
        assert f'<tr data-job-id="{job["id"]}" data-state="done">' in page
        assert html.escape(job["result"]["summary"]) in page
        assert f'#study?uuid={job["study"]}' in page
        assert f'StudyInstanceUIDs={job["result"]["study_instance_uid"]}' in page
        assert "http://" not in page.replace("http://www.w3.org", "")  # nothing external
    # Authentication is off: everyone may retry (no failed job here, so no button).
    assert "sign in as one to retry" not in page


def test_study_summary_has_the_jobs_findings_and_uid(server, analysed):
    _, job = analysed
    info = server.get(f"/ai/studies/{job['study']}")
    study = server.get(f"/studies/{job['study']}")
    assert info["study_instance_uid"] == study["MainDicomTags"]["StudyInstanceUID"]
    assert [j["id"] for j in info["jobs"]] == [job["id"]]
    (finding,) = info["findings"]
    assert finding["summary"] == job["result"]["summary"]
    assert finding["sr_instance"] == job["result"]["sr_instance"]
    assert server.http.get(server.url + "/ai/studies/nope", timeout=30).status_code == 400
    missing = "00000000-00000000-00000000-00000000-00000000"
    assert server.http.get(server.url + f"/ai/studies/{missing}", timeout=30).status_code == 404


def test_orthanc_explorer_serves_the_ai_panel(server):
    explorer = server.http.get(server.url + "/app/explorer.html", timeout=30).text
    assert "../plugins/explorer.js" in explorer  # where Orthanc puts the plugins' code
    r = server.http.get(server.url + "/plugins/explorer.js", timeout=30)
    assert r.status_code == 200
    assert "orthanc-ai-panel" in r.text and "orthanc-ai-ohif" in r.text
