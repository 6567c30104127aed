"""Several Orthanc nodes share the work through PostgreSQL; a dead node's jobs are taken over."""

from __future__ import annotations

import calendar
import time
from collections import Counter

import pydicom

from tests.harness import OrthancAI, dx_corpus, node_config, outputs

MODEL = "limb-fracture-xr"
LEASE = 10


def _node_config(path, pg, orthanc_db: str, queue_url: str, name: str):
    # Batches filled for up to a second: each node holds its jobs long enough
    # to be caught holding some.
    return node_config(path, pg, orthanc_db, queue_url, name, LeaseSeconds=LEASE,
                       BatchSize=16, BatchWaitMs=1000)


def test_two_nodes_share_the_work_and_the_survivor_takes_over_a_dead_nodes_jobs(
        tmp_path, postgres_server):
    pg = postgres_server
    orthanc_db = pg.create_database("orthanc_index").rsplit("/", 1)[1]
    queue_db = pg.create_database("orthanc_ai_queue")
    files = dx_corpus(tmp_path / "dx", 100, seed=7000)
    a = OrthancAI(tmp_path / "a", config=_node_config(tmp_path / "a.json", pg, orthanc_db,
                                                      queue_db, "node-a"))
    b = OrthancAI(tmp_path / "b", config=_node_config(tmp_path / "b.json", pg, orthanc_db,
                                                      queue_db, "node-b"))
    a.start()
    b.start()
    killed_at = 0.0
    held: list[dict] = []

    def busy() -> bool:
        """Node A holds jobs now, and has finished some (it did work before dying)."""
        return bool(b.jobs(state="running", node="node-a")) and bool(
            b.jobs(state="done", node="node-a", limit="1"))

    try:
        # Alternately, ten images at a time; node A is killed as soon as it is
        # seen holding jobs, and the modality sends the rest to node B.
        for i in range(0, 100, 10):
            target = a if i % 20 == 0 and not killed_at else b
            target.storescu(files[i:i + 10])
            if not killed_at and i >= 20 and busy():
                a.kill()
                killed_at = time.time()
        deadline = time.time() + 120
        while not killed_at and time.time() < deadline:  # not caught while sending
            if busy():
                a.kill()
                killed_at = time.time()
            time.sleep(0.02)
        held = b.jobs(state="running", node="node-a")  # what the dead node still held
        assert len(b.jobs(state="done")) < 100, "all done before the kill: make it harder"
        ids = [b.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
               for f in files]
        assert None not in ids  # one archive: node B sees node A's images
        jobs = b.wait_jobs(ids, timeout=900)
        taken_over = [b.get(f"/ai/jobs/{j['id']}") for j in held]
        finished = max(calendar.timegm(time.strptime(j["updated"], "%Y-%m-%dT%H:%M:%SZ"))
                       for j in taken_over) if taken_over else killed_at
        stats = b.get("/statistics")
    finally:
        a.kill()
        b.stop()
    per_instance = Counter(j["instance"] for j in jobs if j["model"] == MODEL)
    assert set(per_instance) == set(ids) and set(per_instance.values()) == {1}
    assert {j["state"] for j in jobs} == {"done"}
    assert {j["node"] for j in jobs} == {"node-a", "node-b"}  # both did work
    # 100 images, exactly one SR each (and a GSPS and KOS per located finding)
    assert stats["CountInstances"] == 100 + outputs(jobs)
    # What node A held when it died was finished by node B, soon after its lease ran out.
    assert held, "node A held no job at the kill"
    assert {j["node"] for j in taken_over} == {"node-b"}
    assert all(j["state"] == "done" and j["attempts"] == 2 for j in taken_over)
    assert finished - killed_at < LEASE + 20
