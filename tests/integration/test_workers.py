"""The PACS process only receives and serves: the analysis runs in worker processes
that can die without harm."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pydicom

from engine.stores import DIED_REASON
from tests.factories import gdcm_crashing_j2k
from tests.harness import CURRENT, OrthancAI, dx_corpus, outputs, write_config

MODEL = "limb-fracture-xr"


def _ids(server: OrthancAI, files: list[Path]) -> list[str]:
    ids = [server.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
           for f in files]
    assert None not in ids
    return ids  # type: ignore[return-value]


def _workers(server: OrthancAI) -> list[dict]:
    return server.get("/ai/health")["workers"]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_orthanc_holds_no_tensorflow_and_the_token_shows_nowhere(tmp_path):
    files = dx_corpus(tmp_path / "dx", 2, base_images=2, seed=6000)
    server = OrthancAI(tmp_path / "srv").start()
    try:
        server.storescu(files)
        server.wait_jobs(_ids(server, files))
        assert server.proc is not None
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        worker_pids = [w["pid"] for w in _workers(server)]
        worker_maps = Path(f"/proc/{worker_pids[0]}/maps").read_text()
        commands = subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                  text=True).stdout
        environments = [Path(f"/proc/{p}/environ").read_bytes() for p in worker_pids]
    finally:
        server.stop()
    # TensorFlow and the pixel codecs are mapped by the worker, never by Orthanc.
    # (On Orthanc 1.13 the root's Python has no TensorFlow: it runs in the model
    # server outside the root, and the worker holds only the codecs.)
    assert ("tensorflow" in worker_maps) is not CURRENT
    for library in ("tensorflow", "_gdcmswig", "openjpeg", "libjpeg/_libjpeg"):
        assert library not in maps, library
    logs = [p.read_text(errors="replace") for p in (tmp_path / "srv").rglob("*.log")]
    for text in [commands, *logs, *(e.decode(errors="replace") for e in environments)]:
        assert "Bearer" not in text and "Authorization" not in text


def test_kill_9_of_a_worker_mid_batch_loses_nothing_and_stores_no_sr_twice(tmp_path):
    files = dx_corpus(tmp_path / "dx", 80, seed=6100)
    # Batches filled for up to a second: the worker is caught holding some jobs.
    config = write_config(tmp_path / "c.json", BatchSize=16, BatchWaitMs=1000)
    server = OrthancAI(tmp_path / "srv", config=config).start()
    try:
        server.storescu(files)
        _wait(lambda: len(server.jobs(state="done")) >= 5
              and len(server.jobs(state="running")) > 0, 120, "a batch in progress")
        (worker,) = _workers(server)
        os.kill(worker["pid"], signal.SIGKILL)
        assert len(server.jobs(state="done")) < 80, "the queue drained first: make it harder"
        ids = _ids(server, files)
        jobs = server.wait_jobs(ids, timeout=600)
        (after,) = _workers(server)
        stats = server.get("/statistics")
    finally:
        server.stop()
    assert after["restarts"] == 1 and after["pid"] != worker["pid"]
    assert after["last_exit"] == "killed by SIGKILL"
    per_instance = Counter(j["instance"] for j in jobs if j["model"] == MODEL)
    assert set(per_instance) == set(ids) and set(per_instance.values()) == {1}
    assert {j["state"] for j in jobs} == {"done"}
    # The jobs the dead worker held ran again: one more attempt, no second SR.
    assert any(j["attempts"] == 2 for j in jobs)
    assert stats["CountInstances"] == 80 + outputs(jobs)  # one SR each, its companions


def test_a_decoder_crash_kills_a_worker_not_orthanc_and_ends_failed(tmp_path):
    config = write_config(tmp_path / "c.json", MaxAttempts=3)
    hostile = tmp_path / "hostile.dcm"
    gdcm_crashing_j2k().save_as(hostile, enforce_file_format=True)
    good_before = dx_corpus(tmp_path / "dx1", 1, base_images=1, seed=6200)
    good_after = dx_corpus(tmp_path / "dx2", 1, base_images=1, seed=6300)
    server = OrthancAI(tmp_path / "srv", config=config).start()
    try:
        # Orthanc 1.10 refuses JPEG 2000 in its default C-STORE presentation
        # contexts; a REST upload (as from a viewer or a gateway) stores it.
        server.upload(hostile.read_bytes())
        server.storescu(good_before)
        (hostile_id,) = _ids(server, [hostile])
        (job,) = server.wait_jobs([hostile_id], timeout=300)
        assert server.get("/system")["Name"]  # Orthanc kept serving throughout
        (worker,) = _workers(server)
        _wait(lambda: _workers(server)[0]["state"] == "ready", 120, "a worker again")
        server.storescu(good_after)
        good = server.wait_jobs(_ids(server, good_before + good_after), timeout=300)
        stats = server.get("/statistics")
    finally:
        server.stop()
    assert job["state"] == "failed" and job["next_attempt"] is None
    assert job["reason"].startswith(DIED_REASON) and job["attempts"] == 3
    assert worker["restarts"] == 3 and worker["last_exit"] == "killed by SIGABRT"
    assert [j["state"] for j in good] == ["done", "done"]
    # the three sources and two SRs (with a GSPS and KOS each where located)
    assert stats["CountInstances"] == 3 + outputs(good)
