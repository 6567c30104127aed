"""Access control on a real Orthanc started from orthanc/hardened.json:
authentication on, AI.Administrators for the /ai routes that change
anything, and C-STORE only from a known modality at its known address."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from engine.config import load_orthanc_json
from tests.factories import synthetic_dx
from tests.harness import ROOT, STORESCU, OrthancAI

ADMIN = ("test-admin", "admin-secret")
READER = ("test-reader", "reader-secret")


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardened")
    config = load_orthanc_json(ROOT / "orthanc" / "hardened.json")
    config["RegisteredUsers"] = dict([ADMIN, READER])
    config["DicomModalities"] = {
        "KNOWN": {"AET": "KNOWN_MOD", "Host": "127.0.0.1", "Port": 11112},
        # Known, but at another address (TEST-NET-1): DicomCheckModalityHost.
        "ELSEWHERE": {"AET": "ELSEWHERE_MOD", "Host": "192.0.2.1", "Port": 104},
    }
    config["StableAge"] = 2
    config["AI"] = {**config["AI"], "Administrators": [ADMIN[0]]}
    path = folder / "hardened-test.json"
    path.write_text(json.dumps(config, indent=2))
    srv = OrthancAI(folder / "data", config=path, auth=ADMIN)
    srv.start()
    yield srv
    srv.stop()


def _http(srv: OrthancAI, method: str, path: str, auth=None) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    return session.request(method, srv.url + path, auth=auth, timeout=30)


def _dx(tmp_path, seed: int):
    ds = synthetic_dx(seed, fracture=bool(seed % 2))
    path = tmp_path / f"dx-{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def _storescu(srv: OrthancAI, path, aet: str) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-R", "-aet", aet, "-aec", "ORTHANC", "127.0.0.1",
                           str(srv.dicom_port), str(path)],
                          capture_output=True, timeout=120, check=False)


def test_ai_routes_need_credentials(hardened):
    assert _http(hardened, "GET", "/ai/jobs").status_code == 401
    assert _http(hardened, "GET", "/ai/jobs", auth=("test-reader", "wrong")).status_code == 401
    assert _http(hardened, "POST", "/ai/jobs/1/retry").status_code == 401
    # A forged token is not the workers' token.
    r = requests.get(hardened.url + "/ai/jobs", headers={"Authorization": "Bearer forged"},
                     timeout=30)
    assert r.status_code == 401


def test_the_viewer_has_orthancs_authentication(hardened):
    """OHIF is served by Orthanc: the same users, and its DICOMweb calls on the same origin."""
    for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/app-config.js"):
        assert _http(hardened, "GET", path).status_code == 401, path
        r = _http(hardened, "GET", path, auth=READER)
        assert r.status_code == 200, (path, r.text[:200])
    assert "window.PUBLIC_URL=\"/ohif/\"" in _http(hardened, "GET", "/ohif/", auth=READER).text
    config = _http(hardened, "GET", "/ohif/app-config.js", auth=READER).text
    assert "routerBasename: prefix.replace" in config and "const prefix = '/ohif/'" in config
    assert _http(hardened, "GET", "/dicom-web/studies").status_code == 401
    assert _http(hardened, "GET", "/dicom-web/studies", auth=READER).status_code == 200
    assert _http(hardened, "GET", "/ohif/missing.bundle.js", auth=READER).status_code == 404


def test_any_user_reads(hardened):
    for user in (READER, ADMIN):
        r = _http(hardened, "GET", "/ai/jobs", auth=user)
        assert r.status_code == 200, r.text
        assert isinstance(r.json(), list)
        assert _http(hardened, "GET", "/ai/health", auth=user).status_code == 200


def test_known_modality_is_accepted_and_analysed(hardened, tmp_path):
    ds, path = _dx(tmp_path, 301)
    done = _storescu(hardened, path, "KNOWN_MOD")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    instance = hardened.lookup(ds.SOPInstanceUID)
    assert instance is not None
    jobs = hardened.wait_jobs([instance])
    assert jobs and all(j["state"] == "done" for j in jobs), jobs


def test_unknown_modality_is_refused(hardened, tmp_path):
    ds, path = _dx(tmp_path, 302)
    done = _storescu(hardened, path, "UNKNOWN_MOD")
    assert done.returncode != 0
    assert hardened.lookup(ds.SOPInstanceUID) is None


def test_known_ae_title_from_another_address_is_refused(hardened, tmp_path):
    ds, path = _dx(tmp_path, 305)
    assert _storescu(hardened, path, "ELSEWHERE_MOD").returncode != 0
    assert hardened.lookup(ds.SOPInstanceUID) is None


def test_known_ae_title_calling_another_ae_title_is_refused(hardened, tmp_path):
    ds, path = _dx(tmp_path, 303)
    done = subprocess.run([STORESCU, "-R", "-aet", "KNOWN_MOD", "-aec", "NOT_ORTHANC",
                           "127.0.0.1", str(hardened.dicom_port), str(path)],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode != 0
    assert hardened.lookup(ds.SOPInstanceUID) is None


def _a_study(srv: OrthancAI, tmp_path) -> str:
    ds, path = _dx(tmp_path, 304)
    assert _storescu(srv, path, "KNOWN_MOD").returncode == 0
    instance = srv.lookup(ds.SOPInstanceUID)
    return srv.get(f"/instances/{instance}/study")["ID"]


def test_only_administrators_change_anything(hardened, tmp_path):
    study = _a_study(hardened, tmp_path)
    route = f"/ai/studies/{study}/reprocess"
    r = _http(hardened, "POST", route, auth=READER)
    assert r.status_code == 403
    assert "security alert: refused POST" in hardened.log_tail(400)
    assert READER[0] in hardened.log_tail(400)
    # ... and a Security Alert (110113, Use of Restricted Function) in the audit trail.
    audit = (hardened.data / "orthanc-db" / "orthanc-ai" / "audit.log").read_text()
    alerts = [line for line in audit.splitlines() if "110113" in line]
    assert alerts and route in alerts[-1] and READER[0] in alerts[-1]
    assert _http(hardened, "POST", "/ai/jobs/1/retry", auth=READER).status_code == 403
    r = _http(hardened, "POST", route, auth=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"study": study, "queued": True}
    # Spelt otherwise, the route is still refused.
    assert _http(hardened, "POST", f"//ai/studies/{study}/reprocess",
                 auth=READER).status_code in (403, 404)
    # Orthanc's own routes are not ours to police.
    assert _http(hardened, "GET", "/system", auth=READER).status_code == 200


def test_status_page_offers_retry_to_administrators_only(hardened, tmp_path):
    ds, path = _dx(tmp_path, 305)
    ds.PixelData = ds.PixelData[:64]  # stored all the same; its analysis fails
    ds.save_as(path, enforce_file_format=True)
    assert _storescu(hardened, path, "KNOWN_MOD").returncode == 0
    (job,) = hardened.wait_jobs([hardened.lookup(ds.SOPInstanceUID)])
    assert job["state"] in ("failed", "dead"), job
    button = f'class="ai-retry" data-job="{job["id"]}"'
    admin = _http(hardened, "GET", "/ai/", auth=ADMIN)
    assert admin.status_code == 200 and button in admin.text
    reader = _http(hardened, "GET", "/ai/", auth=READER).text
    assert button not in reader and "sign in as one to retry" in reader
    assert _http(hardened, "GET", "/ai/").status_code == 401
