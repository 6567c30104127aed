"""Nothing lost, nothing twice: real processes killed, model servers down, events replayed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.harness import OrthancAI, dx_corpus, free_port, outputs, write_config

MODEL = "limb-fracture-xr"


def test_kill_9_with_a_full_queue_loses_nothing_and_duplicates_nothing(tmp_path):
    files = dx_corpus(tmp_path / "dx", 200)
    server = OrthancAI(tmp_path / "srv").start()
    try:
        server.storescu(files)
        deadline = time.time() + 120
        while len(server.jobs(state="done")) < 10 and time.time() < deadline:
            time.sleep(0.2)
        finished = len(server.jobs(state="done"))
        server.kill()
        assert finished < 200, "the queue drained before the kill; make the test harder"
        server.start()
        import pydicom

        ids = [server.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
               for f in files]
        assert None not in ids
        jobs = server.wait_jobs(ids, timeout=900)
        stats = server.get("/statistics")
    finally:
        server.stop()
    per_instance = Counter(j["instance"] for j in jobs if j["model"] == MODEL)
    assert set(per_instance) == set(ids) and set(per_instance.values()) == {1}
    assert {j["state"] for j in jobs} == {"done"}
    sr_uids = [j["result"]["sr_sop_instance_uid"] for j in jobs]
    assert len(set(sr_uids)) == 200
    # Orthanc holds exactly one SR per source (and a GSPS and KOS per located
    # finding): 200 sources + 200 SRs + their companions.
    assert stats["CountInstances"] == 200 + outputs(jobs)


def test_instances_stored_while_the_plugin_was_down_are_processed(tmp_path):
    data = tmp_path / "srv"
    on = write_config(tmp_path / "on.json")
    off = write_config(tmp_path / "off.json", Enabled=False)
    files = dx_corpus(tmp_path / "dx", 3, base_images=3, seed=2000)
    server = OrthancAI(data, config=on).start()  # first start: the change-log cursor is set
    server.stop()
    down = OrthancAI(data, config=off)
    down.http_port, down.dicom_port = server.http_port, server.dicom_port
    down.url = server.url
    down.start(wait_ready=False)
    down.storescu(files)
    assert down.get("/statistics")["CountInstances"] == 3
    down.stop()
    server.start()
    try:
        import pydicom

        ids = [server.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
               for f in files]
        jobs = server.wait_jobs(ids, timeout=300)
    finally:
        server.stop()
    assert sorted(j["state"] for j in jobs) == ["done"] * 3


def _model_server(port: int) -> subprocess.Popen:
    from engine.config import PROJECT_ROOT

    return subprocess.Popen(
        [sys.executable, "-m", "inference.server", "--models", str(PROJECT_ROOT / "models"),
         "--port", str(port)], cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _wait_http(url: str, timeout: float = 120) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise TimeoutError(url)


def test_transient_model_server_outage_is_retried_to_completion(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "http.json", Backend="http",
                          ModelServerUrl=f"http://127.0.0.1:{port}", MaxAttempts=10,
                          RetryBackoffSeconds=1)
    files = dx_corpus(tmp_path / "dx", 2, base_images=2, seed=3000)
    server = OrthancAI(tmp_path / "srv", config=config).start()  # model server not up yet
    model_server = None
    try:
        server.storescu(files)
        deadline = time.time() + 60
        while not [j for j in server.jobs() if j["state"] == "failed"] and time.time() < deadline:
            time.sleep(0.2)
        failed = [j for j in server.jobs() if j["state"] == "failed"]
        assert failed and failed[0]["next_attempt"] and "will retry" in failed[0]["reason"]
        model_server = _model_server(port)
        _wait_http(f"http://127.0.0.1:{port}/v1/models/{MODEL}")
        import pydicom

        ids = [server.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
               for f in files]
        jobs = server.wait_jobs(ids, timeout=300)
    finally:
        server.stop()
        if model_server is not None:
            model_server.terminate()
            model_server.wait(30)
    assert [j["state"] for j in jobs] == ["done", "done"]
    assert all(j["attempts"] >= 2 for j in jobs)


def test_the_plugins_own_model_server_serves_and_dies_with_orthanc(tmp_path):
    """Backend http without a URL: the plugin starts inference.server on a socket
    it made itself, and the server exits when Orthanc is killed."""
    import pydicom

    config = write_config(tmp_path / "own.json", Backend="http")
    files = dx_corpus(tmp_path / "dx", 2, base_images=2, seed=3100)
    server = OrthancAI(tmp_path / "srv", config=config).start()
    try:
        server.storescu(files)
        ids = [server.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
               for f in files]
        jobs = server.wait_jobs(ids, timeout=300)
        children = subprocess.run(["pgrep", "-f", "inference.server"], capture_output=True,
                                  text=True).stdout.split()
    finally:
        server.kill()
    assert [j["state"] for j in jobs] == ["done", "done"]
    assert children

    def alive(pid: str) -> bool:  # a zombie left for init to reap counts as gone
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.5)
    assert not any(alive(pid) for pid in children)


def test_a_backend_that_always_fails_ends_dead_with_the_reason(tmp_path):
    config = write_config(tmp_path / "dead.json", Backend="http",
                          ModelServerUrl=f"http://127.0.0.1:{free_port()}", MaxAttempts=3,
                          RetryBackoffSeconds=0.2)
    files = dx_corpus(tmp_path / "dx", 1, base_images=1, seed=4000)
    server = OrthancAI(tmp_path / "srv", config=config).start()
    try:
        server.storescu(files)
        import pydicom

        ids = [server.lookup(str(pydicom.dcmread(files[0], stop_before_pixels=True)
                                 .SOPInstanceUID))]
        (job,) = server.wait_jobs(ids, timeout=120)
    finally:
        server.stop()
    assert job["state"] == "dead"
    assert job["attempts"] == 3
    assert "gave up after 3 attempt(s)" in job["reason"] and "model server" in job["reason"]


def test_sigterm_stops_orthanc_and_its_workers_cleanly(tmp_path):
    config = write_config(tmp_path / "two.json", Workers=2)
    server = OrthancAI(tmp_path / "srv", config=config).start()
    pids = [w["pid"] for w in server.get("/ai/health")["workers"]]
    assert len(pids) == 2
    assert server.stop() == 0
    assert "Orthanc has stopped" in server.log_tail()
    for pid in pids:  # stopped with Orthanc, not left behind
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        assert state == "Z", f"worker {pid} still running after Orthanc stopped"
    log = (tmp_path / "srv" / "orthanc-db" / "orthanc-ai" / "worker-1.log").read_text()
    assert "stopped" in log.splitlines()[-1]


@pytest.mark.parametrize("route", ["/ai/jobs/999999/retry"])
def test_retry_of_an_unknown_job_is_a_clear_error(server, route):
    r = server.http.post(server.url + route, timeout=10)
    assert r.status_code == 409
