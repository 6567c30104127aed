"""Benchmarks of orthanc-ai, each a ratio of two measurements taken in the same run.

    .venv/bin/python -m bench.run_all [--quick] [--only MEASURE ...] [--out bench/out]

(a) ingest: storescu throughput into Orthanc with the plugin on / off
(b) pipeline: images/s stored -> SR stored on a backlog / bare decode+preprocess+predict
(c) latency p50/p95, C-STORE done -> SR in Orthanc / bare single-image compute,
    (c1) on an idle server and (c2) while a second client streams images steadily
(d) memory: the workers' resident size after 500 vs 5,000 instances; Orthanc's
    own growth beside Orthanc without the plugin
(e) stream: the AI's images/s while a modality sends back to back / on a backlog
plus the stored-instance callback's own cost (from /ai/health after the ingest
runs) and two nodes on PostgreSQL vs one node on SQLite (reported, no target).

Prints one table, writes ``report*.json`` and ``report*.png`` into ``--out``.
Never a timed assertion: the numbers are reported, the targets beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from engine.config import PROJECT_ROOT
from inference.backend import Batch, InProcessBackend
from inference.card import ModelCard
from inference.preprocess import prepare_radiograph
from inference.report import sr_uids

# Test helpers: what exists to run a real Orthanc and PostgreSQL (see bench/README.md).
from tests.harness import STORESCU, OrthancAI, dx_corpus, node_config, write_config

MODEL_ID = "limb-fracture-xr"
MEASURES = ("ingest", "pipeline", "latency", "memory", "stream", "nodes")
TARGETS = {
    "ingest_ratio": (">=", 0.95),
    "pipeline_efficiency": (">=", 0.8),
    "latency_idle_p50_ratio": ("<=", 1.5),
    "latency_idle_p95_ratio": ("<=", 1.5),
    "latency_load_p50_ratio": ("<=", 1.5),
    "latency_load_p95_ratio": ("<=", 1.5),
    "worker_memory_growth": ("<=", 0.05),
    "stream_ai_ratio": (">=", 0.5),
}
LATENCY_PAUSE_S = 0.3  # between probe images: each arrives at a quiet server
LOAD_RATE_MAX = 4.0  # images/s of the second client in (c2), at most
_T0 = time.perf_counter()


# -- progress ------------------------------------------------------------------

def log(phase: str, message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {phase}: {message}", flush=True)


# -- processes -----------------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def orthanc_pid(server: OrthancAI) -> int:
    # `orthanc-ai serve` execs Orthanc: the child process is Orthanc itself.
    assert server.proc is not None
    return server.proc.pid


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def tree_rss_kib(pids: list[int]) -> int:
    """VmRSS of these processes and all their descendants, summed."""
    tree, seen, todo, total = _children(), set(), list(pids), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            total += rss_kib(pid)
        except (OSError, RuntimeError):
            continue  # gone, or a zombie without memory
        todo += tree.get(pid, [])
    return total


def worker_pids(server: OrthancAI) -> tuple[list[int], int]:
    """The worker processes' pids from /ai/health, and their restarts so far."""
    workers = server.get("/ai/health")["workers"]
    return ([w["pid"] for w in workers if w.get("pid")],
            sum(int(w.get("restarts") or 0) for w in workers))


# -- Orthanc's counters (light polls: /ai/jobs would take CPU from the workers) --

def sr_count(server: OrthancAI) -> int:
    """SRs in Orthanc: every source image has a study of its own and its SR joins it."""
    stats = server.get("/statistics")
    return int(stats["CountInstances"]) - int(stats["CountStudies"])


def wait_srs(server: OrthancAI, n_srs: int, phase: str, *, poll: float = 0.5,
             every: float = 10.0, stall: float = 600.0) -> float:
    """Until Orthanc holds `n_srs` SRs; progress every `every` s. The time it happened."""
    last_n, last_change, last_print = -1, time.time(), time.time()
    while True:
        n = sr_count(server)
        now = time.time()
        if n >= n_srs:
            return time.perf_counter()
        if n != last_n:
            last_n, last_change = n, now
        elif now - last_change > stall:
            jobs = server.get("/ai/health")["queue"]["jobs"]
            raise TimeoutError(f"{phase}: {n}/{n_srs} SRs, none for {stall:.0f} s; jobs {jobs}"
                               f"\n{server.log_tail()}")
        if now - last_print >= every:
            log(phase, f"{n}/{n_srs} SRs")
            last_print = now
        time.sleep(poll)


def wait_idle(server: OrthancAI, timeout: float = 120.0) -> None:
    """Until no job is queued or running (the triage and SR rows included)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = server.get("/ai/health")["queue"]["jobs"]
        if not jobs.get("queued") and not jobs.get("running"):
            return
        time.sleep(0.5)


def storescu_seconds(server: OrthancAI, files: list[Path]) -> float:
    t0 = time.perf_counter()
    server.storescu(files)
    return time.perf_counter() - t0


def store_one(port: int, path: Path) -> bool:
    done = subprocess.run([STORESCU, "-R", "-aet", "BENCH", "-aec", "ORTHANC", "127.0.0.1",
                           str(port), str(path)], capture_output=True, timeout=120)
    return done.returncode == 0


# -- bare compute --------------------------------------------------------------

def bare_compute(files: list[Path], models: Path, batch_size: int = 8) -> dict[str, float]:
    """Decode + preprocess + batched predict in this plain process, no Orthanc."""
    card = ModelCard.from_folder(models / MODEL_ID)
    backend = InProcessBackend()
    backend.load(card)
    shape = tuple(card.image.shape[:2])
    feats = card.metadata.features if card.metadata else ()

    def prepare(path: Path):
        ds = pydicom.dcmread(path)
        return prepare_radiograph(ds, canvas=shape, target_mm=card.image.pixel_spacing_mm,
                                  feature_names=feats)

    backend.predict(card, Batch(np.zeros((1, *card.image.shape), np.float32),
                                np.zeros((1, len(feats)), np.float32)))  # warm-up
    singles = []
    for path in files[:20]:
        t0 = time.perf_counter()
        p = prepare(path)
        backend.predict(card, Batch(p.image.pixels[None, :, :, None], p.features[None]))
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(files), batch_size):
        prepared = [prepare(f) for f in files[i : i + batch_size]]
        backend.predict(card, Batch(np.stack([p.image.pixels[:, :, None] for p in prepared]),
                                    np.stack([p.features for p in prepared])))
    total = time.perf_counter() - t0
    return {"bare_images_per_s": len(files) / total,
            "bare_single_s": statistics.median(singles)}


# Top-level Orthanc settings of every measured server (--allow-threads).
ORTHANC_SETTINGS: dict[str, Any] = {}


def _config(path: Path, **ai: Any) -> Path:
    return write_config(path, orthanc=ORTHANC_SETTINGS, **ai)


# -- (a) ingest ----------------------------------------------------------------

def bench_ingest(work: Path, files: list[Path], extra: dict, repeats: int = 3) -> dict:
    """storescu throughput with the plugin off and on, alternated; medians of `repeats`.

    One storescu run varies by about 10 % on this kind of machine (disk
    write-back, other tenants), so one pair alone can mislead either way. The
    callback's own cost is read from /ai/health after each run with the plugin.
    """
    on = _config(work / "on.json", **extra)
    off = _config(work / "off.json", Enabled=False)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    callbacks: list[dict] = []
    for k in range(repeats):
        for name, config in (("off", off), ("on", on)):
            server = OrthancAI(work / f"ingest-{name}-{k}", config=config).start(
                wait_ready=name == "on")
            try:
                rates[name].append(len(files) / storescu_seconds(server, files))
                if name == "on":
                    callbacks.append(server.get("/ai/health")["callback"])
            finally:
                server.stop()
                shutil.rmtree(server.data, ignore_errors=True)
            log("ingest", f"run {k + 1}/{repeats} plugin {name}: "
                          f"{rates[name][-1]:.1f} images/s")
    out: dict[str, Any] = {f"ingest_{name}_per_s": statistics.median(r)
                           for name, r in rates.items()}
    out["ingest_ratio"] = out["ingest_on_per_s"] / out["ingest_off_per_s"]
    out["ingest_runs_per_s"] = rates
    out["callback_runs"] = callbacks
    measured = [c for c in callbacks if c.get("calls")]
    if measured:
        out["callback_calls"] = statistics.median(c["calls"] for c in measured)
        for q in ("p50_us", "p99_us", "max_us"):
            out[f"callback_{q}"] = statistics.median(c[q] for c in measured)
    return out


# -- (b) pipeline, (c) latency -------------------------------------------------

def stage_means(server: OrthancAI) -> dict[str, float]:
    """Mean seconds per pipeline stage from the plugin's own Prometheus histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    text = server.get_bytes("/ai/metrics").decode()
    for family in text_string_to_metric_families(text):
        if family.name != "orthanc_ai_stage_seconds":
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if sample.name.endswith("_sum"):
                sums[stage] = sample.value
            elif sample.name.endswith("_count"):
                counts[stage] = sample.value
    return {f"stage_{k}_ms": 1000 * sums[k] / counts[k] for k in sums if counts.get(k)}


def work_backlog(servers: list[OrthancAI], n: int, phase: str) -> float:
    """Start the servers (the files already in their archive), time the SRs: images/s.

    The clock starts once every server is ready; SRs made before that are
    subtracted, so a node that became ready first gets no head start.
    """
    for server in servers:
        server.start(wait_ready=False)
    deadline = time.time() + 300
    while not all(s.get("/ai/models")["ready"] for s in servers):
        if time.time() > deadline:
            raise RuntimeError(f"{phase}: not ready in 300 s\n{servers[0].log_tail()}")
        time.sleep(0.25)
    t0, done0 = time.perf_counter(), sr_count(servers[0])
    log(phase, f"ready; working a backlog of {n} images ({done0} SRs already)")
    t1 = wait_srs(servers[0], n, phase, poll=0.05)
    return (n - done0) / (t1 - t0)


def backlog_server(work: Path, name: str, files: list[Path], extra: dict,
                   phase: str) -> tuple[OrthancAI, float]:
    """One node on SQLite: the files stored with the plugin off, then worked from the
    change log (the clock covers fetching, decoding, predicting, building and storing
    the SRs, not Orthanc's own ingest). The server is left running; images/s."""
    from engine.stores import open_store

    data = work / name
    down = OrthancAI(data, config=_config(work / f"{name}-off.json", Enabled=False))
    down.start(wait_ready=False)
    log(phase, f"storing {len(files)} images with the plugin off")
    down.storescu(files)
    down.stop()
    # The change-log cursor at 0: the plugin's first start works the whole log.
    store = open_store(data / "orthanc-db" / "orthanc-ai" / "jobs.sqlite")
    store.add_changes([], 0)
    store.close()
    server = OrthancAI(data, config=_config(work / f"{name}.json", **extra))
    server.http_port, server.dicom_port, server.url = down.http_port, down.dicom_port, down.url
    try:
        rate = work_backlog([server], len(files), phase)
    except BaseException:
        server.stop()
        raise
    log(phase, f"{rate:.2f} images/s on the backlog")
    return server, rate


def probe_latencies(server: OrthancAI, files: list[Path], card: ModelCard, work: Path,
                    tag: int, phase: str, keep_going: Callable[[], bool] = lambda: True,
                    n: int = 21) -> list[float]:
    """C-STORE done -> SR in Orthanc (its SOP Instance UID is known in advance), one
    image at a time, LATENCY_PAUSE_S apart; the first is a warm-up, not counted."""
    latencies: list[float] = []
    for k, path in enumerate(files[:n]):
        if not keep_going():
            log(phase, f"stopped after {len(latencies)} probes")
            break
        time.sleep(LATENCY_PAUSE_S)
        ds = pydicom.dcmread(path)
        suffix = f".{tag}{k + 1:03d}"  # a new study, series and instance
        ds.StudyInstanceUID = f"{ds.StudyInstanceUID}{suffix}"
        ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}{suffix}"
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}{suffix}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        single = work / f"probe-{tag}-{k}.dcm"
        ds.save_as(single, enforce_file_format=True)
        sr_uid = sr_uids(ds, card)[1]
        if not store_one(server.dicom_port, single):
            raise RuntimeError(f"{phase}: storescu of probe {k} failed")
        t_stored = time.perf_counter()
        deadline = time.time() + 120
        while server.lookup(sr_uid) is None:
            if time.time() > deadline:
                raise TimeoutError(f"{phase}: no SR for probe {k} in 120 s")
            time.sleep(0.005)
        if k:
            latencies.append(time.perf_counter() - t_stored)
        if (k + 1) % 5 == 0:
            log(phase, f"probe {k + 1}/{n}: {latencies[-1] * 1000:.0f} ms")
    return latencies


class SteadyStream(threading.Thread):
    """A second client: one image per association at `rate` images/s (no bursts)."""

    def __init__(self, port: int, files: list[Path], rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.files, self.rate = port, files, rate
        self.halt = threading.Event()
        self.sent = self.failed = 0
        self.elapsed = 0.0

    def run(self) -> None:
        t0 = time.perf_counter()
        for i, path in enumerate(self.files):
            delay = t0 + i / self.rate - time.perf_counter()
            if self.halt.wait(max(delay, 0.0)):
                break
            if store_one(self.port, path):
                self.sent += 1
            else:
                self.failed += 1
        self.elapsed = time.perf_counter() - t0

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=180)


def latency_stats(latencies: list[float], bare_single: float, prefix: str) -> dict:
    if not latencies:
        return {}
    p50, p95 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))
    return {f"{prefix}_p50_s": p50, f"{prefix}_p95_s": p95,
            f"{prefix}_p50_ratio": p50 / bare_single, f"{prefix}_p95_ratio": p95 / bare_single,
            f"{prefix}_s": [round(x, 4) for x in latencies]}


def bench_pipeline(work: Path, files: list[Path], extra: dict, bare: dict[str, float],
                   latency: bool, out: dict[str, Any]) -> None:
    """(b) the backlog's images/s, then, on the same server, (c1) latency when idle
    and (c2) latency while a second client streams images at a steady rate.

    Fills `out` as it goes: a failure in (c) keeps (b)."""
    server, rate = backlog_server(work, "pipeline", files, extra, "pipeline")
    out.update({"pipeline_images_per_s": rate, **bare,
                "pipeline_efficiency": rate / bare["bare_images_per_s"]})
    try:
        out.update(stage_means(server))
        if not latency:
            return
        card = ModelCard.from_folder(Path(extra["ModelsDirectory"]) / MODEL_ID)
        log("latency", f"(c1) idle server, probes {LATENCY_PAUSE_S} s apart")
        idle = probe_latencies(server, files, card, work, 1, "latency idle")
        out.update(latency_stats(idle, bare["bare_single_s"], "latency_idle"))
        # (c2): a second client at a steady rate the AI keeps up with.
        load_rate = min(LOAD_RATE_MAX, rate / 2)
        expected = 21 * (LATENCY_PAUSE_S + 2 * out.get("latency_idle_p95_s", 1.0)) + 30
        n_stream = min(800, math.ceil(load_rate * expected))
        log("latency", f"(c2) preparing {n_stream} images for a second client at "
                       f"{load_rate:.2f} images/s")
        stream_files = dx_corpus(work / "load-dx", n_stream, base_images=4, seed=8500,
                                 spacing_mm=0.2)
        stream = SteadyStream(server.dicom_port, stream_files, load_rate)
        stream.start()
        time.sleep(3.0)  # steady state before the first probe
        try:
            loaded = probe_latencies(server, files, card, work, 2, "latency load",
                                     keep_going=stream.is_alive)
        finally:
            stream.stop()
        out.update(latency_stats(loaded, bare["bare_single_s"], "latency_load"))
        out.update({"latency_load_rate_per_s": load_rate,
                    "latency_load_sent": stream.sent, "latency_load_failed": stream.failed,
                    "latency_load_achieved_per_s": stream.sent / max(stream.elapsed, 1e-9)})
    finally:
        server.stop()
        shutil.rmtree(server.data, ignore_errors=True)


# -- (e) the AI while a modality streams ---------------------------------------

def bench_stream(work: Path, n: int, extra: dict, idle_rate: float,
                 backlog: int = 400) -> dict:
    """SRs completed per second while storescu sends `n` images back to back (in
    associations of 200), over the streaming window, / the backlog's images/s.

    A backlog of `backlog` images stored beforehand (plugin off) keeps the AI
    busy for the whole window, so the figure is its rate under the stream, not
    the stream's own rate; ``stream_ai_kept_pace`` says when it ran out of work
    all the same (the ratio is then a lower bound).
    """
    from engine.stores import open_store

    files = dx_corpus(work / "stream-dx", n + backlog, base_images=10, seed=8800,
                      spacing_mm=0.2)
    data = work / "stream"
    down = OrthancAI(data, config=_config(work / "stream-off.json", Enabled=False))
    down.start(wait_ready=False)
    log("stream", f"storing a backlog of {backlog} images with the plugin off")
    down.storescu(files[:backlog])
    down.stop()
    store = open_store(data / "orthanc-db" / "orthanc-ai" / "jobs.sqlite")
    store.add_changes([], 0)  # the plugin's first start works the whole log
    store.close()
    server = OrthancAI(data, config=_config(work / "stream.json", **extra))
    server.http_port, server.dicom_port, server.url = down.http_port, down.dicom_port, down.url
    server.start()
    try:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                server.storescu(files[backlog:])
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        srs0 = sr_count(server)
        t0 = time.perf_counter()
        sender.start()
        log("stream", f"sending {n} images back to back ({srs0} of the backlog done)")
        last = t0
        while sender.is_alive():
            sender.join(timeout=1.0)
            if time.perf_counter() - last >= 5.0:
                stats = server.get("/statistics")
                log("stream", f"{stats['CountStudies'] - backlog}/{n} stored, "
                              f"{stats['CountInstances'] - stats['CountStudies']} SRs")
                last = time.perf_counter()
        window = time.perf_counter() - t0
        total = sr_count(server)
        srs = total - srs0
        if errors:
            raise errors[0]
    finally:
        server.stop()
        shutil.rmtree(server.data, ignore_errors=True)
    ai_rate = srs / window
    kept_pace = total >= 0.97 * (n + backlog)
    log("stream", f"{n / window:.1f} images/s stored, {ai_rate:.2f} SRs/s in {window:.1f} s"
                  + (" (the AI ran out of work: a lower bound)" if kept_pace else ""))
    return {"stream_images": n, "stream_backlog": backlog, "stream_window_s": window,
            "stream_srs": srs, "stream_ingest_per_s": n / window, "stream_ai_per_s": ai_rate,
            "stream_idle_ai_per_s": idle_rate, "stream_ai_ratio": ai_rate / idle_rate,
            "stream_ai_kept_pace": kept_pace}


# -- two nodes on PostgreSQL ---------------------------------------------------

def bench_nodes(work: Path, files: list[Path], extra: dict, sqlite_rate: float) -> dict:
    """The same backlog worked by two nodes sharing PostgreSQL (archive and queue)."""
    from engine.stores import open_store
    from tests.pg import PostgresServer

    pg = PostgresServer(work / "pg")
    pg.start()
    nodes: list[OrthancAI] = []
    try:
        orthanc_db = pg.create_database("orthanc_index").rsplit("/", 1)[1]
        queue_url = pg.create_database("orthanc_ai_queue")
        loader = OrthancAI(work / "nodes-loader", config=node_config(
            work / "loader.json", pg, orthanc_db, queue_url, "loader", Enabled=False))
        loader.start(wait_ready=False)
        log("nodes", f"storing {len(files)} images into PostgreSQL with the plugin off")
        loader.storescu(files)
        loader.stop()
        store = open_store(queue_url)
        store.add_changes([], 0)  # the change-log cursor at 0: the nodes work the backlog
        store.close()
        for name in ("node-a", "node-b"):
            nodes.append(OrthancAI(work / name, config=node_config(
                work / f"{name}.json", pg, orthanc_db, queue_url, name, **extra)))
        rate = work_backlog(nodes, len(files), "nodes")
        per_node = {n: len(nodes[1].jobs(node=n, model=MODEL_ID, state="done"))
                    for n in ("node-a", "node-b")}
    finally:
        for node in nodes:
            node.stop()
        pg.stop()
    log("nodes", f"{rate:.2f} images/s on two nodes ({per_node}), "
                 f"{sqlite_rate:.2f} on one SQLite node")
    return {"nodes_pg2_per_s": rate, "nodes_sqlite1_per_s": sqlite_rate,
            "nodes_ratio": rate / sqlite_rate, "nodes_done_per_node": per_node}


# -- (d) memory ----------------------------------------------------------------

def bench_memory(work: Path, small: int, large: int, extra: dict,
                 out: dict[str, Any]) -> None:
    """Resident sizes after `small` and `large` instances: the workers (the plugin's
    analysis) and Orthanc itself, beside Orthanc without the plugin on the same files."""
    log("memory", f"preparing {large} images")
    files = dx_corpus(work / "mem-dx", large, base_images=10, seed=9000, spacing_mm=0.5)
    out["memory_instances"] = [small, large]
    for name, config in (("off", _config(work / "mem-off.json", Enabled=False)),
                         ("on", _config(work / "mem-on.json", **extra))):
        server = OrthancAI(work / f"memory-{name}", config=config).start(
            wait_ready=name == "on")
        try:
            orthanc, workers, restarts = [], [], []
            for done, batch in ((small, files[:small]), (large, files[small:])):
                log("memory", f"plugin {name}: storing up to {done} instances")
                server.storescu(batch)
                if name == "on":
                    wait_srs(server, done, f"memory {name}")
                    wait_idle(server)
                time.sleep(2.0)
                orthanc.append(rss_kib(orthanc_pid(server)))
                if name == "on":
                    pids, n_restarts = worker_pids(server)
                    workers.append(statistics.median(tree_rss_kib(pids) for _ in range(3)))
                    restarts.append(n_restarts)
                log("memory", f"plugin {name}, {done} instances: Orthanc "
                              f"{orthanc[-1] / 1024:.0f} MiB"
                    + (f", workers {workers[-1] / 1024:.0f} MiB" if workers else ""))
        finally:
            server.stop()
            shutil.rmtree(server.data, ignore_errors=True)
        out[f"orthanc_rss_small_{name}_mib"] = orthanc[0] / 1024
        out[f"orthanc_rss_large_{name}_mib"] = orthanc[1] / 1024
        out[f"orthanc_memory_growth_{name}"] = (orthanc[1] - orthanc[0]) / orthanc[0]
        if workers:
            out["worker_rss_small_mib"] = workers[0] / 1024
            out["worker_rss_large_mib"] = workers[1] / 1024
            out["worker_memory_growth"] = (workers[1] - workers[0]) / workers[0]
            out["worker_restarts"] = restarts[1] - restarts[0]


# -- the table -----------------------------------------------------------------

# (measure heading, [(key, unit)]): one table, the ratios with targets first.
TABLE = [
    ("(a) ingest, plugin on / off", [
        ("ingest_ratio", ""), ("ingest_on_per_s", "img/s"), ("ingest_off_per_s", "img/s")]),
    ("callback's own cost (after the ingest runs)", [
        ("callback_p50_us", "us"), ("callback_p99_us", "us"), ("callback_max_us", "us"),
        ("callback_calls", "calls")]),
    ("(b) pipeline, backlog / bare compute", [
        ("pipeline_efficiency", ""), ("pipeline_images_per_s", "img/s"),
        ("bare_images_per_s", "img/s"), ("stage_*", "ms")]),
    ("(c1) latency, idle server / bare single image", [
        ("latency_idle_p50_ratio", ""), ("latency_idle_p95_ratio", ""),
        ("latency_idle_p50_s", "s"), ("latency_idle_p95_s", "s"), ("bare_single_s", "s")]),
    ("(c2) latency, second client streaming / bare single image", [
        ("latency_load_p50_ratio", ""), ("latency_load_p95_ratio", ""),
        ("latency_load_p50_s", "s"), ("latency_load_p95_s", "s"),
        ("latency_load_rate_per_s", "img/s"), ("latency_load_achieved_per_s", "img/s")]),
    ("(d) memory, {memory[0]} -> {memory[1]} instances", [
        ("worker_memory_growth", ""), ("worker_rss_small_mib", "MiB"),
        ("worker_rss_large_mib", "MiB"), ("orthanc_memory_growth_on", ""),
        ("orthanc_memory_growth_off", ""), ("orthanc_rss_small_on_mib", "MiB"),
        ("orthanc_rss_large_on_mib", "MiB"), ("orthanc_rss_small_off_mib", "MiB"),
        ("orthanc_rss_large_off_mib", "MiB"), ("worker_restarts", "")]),
    ("(e) AI while a modality streams / on a backlog", [
        ("stream_ai_ratio", ""), ("stream_ai_per_s", "img/s"),
        ("stream_idle_ai_per_s", "img/s"), ("stream_ingest_per_s", "img/s"),
        ("stream_window_s", "s"), ("stream_ai_kept_pace", "")]),
    ("two nodes on PostgreSQL / one node on SQLite", [
        ("nodes_ratio", ""), ("nodes_pg2_per_s", "img/s"), ("nodes_sqlite1_per_s", "img/s")]),
]


def verdict(key: str, value: float) -> str:
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return "meets" if ok else "MISSES"


def print_table(report: dict) -> None:
    print(f"\n{'measure':44} {'value':>10} {'unit':6} {'target':>8}  verdict", flush=True)
    print("-" * 80)
    for heading, rows in TABLE:
        keys = [(k, u) for key, u in rows
                for k in (sorted(x for x in report if x.startswith(key[:-1]))
                          if key.endswith("*") else [key]) if k in report]
        if not keys:
            continue
        print(heading.format(memory=report.get("memory_instances", ("?", "?"))))
        for key, unit in keys:
            value = report[key]
            text = f"{value:>10.3f}" if isinstance(value, float) else f"{value!s:>10}"
            if key in TARGETS:
                op, target = TARGETS[key]
                print(f"  {key:42} {text} {unit:6} {op + ' ' + str(target):>8}  "
                      f"{verdict(key, value)}")
            else:
                print(f"  {key:42} {text} {unit:6}")
    for phase, error in report.get("errors", {}).items():
        print(f"ERROR in {phase}: {error}")
    print("-" * 80, flush=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in TARGETS if k in report]
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    values = [report[k] for k in keys]
    colours = ["tab:green" if verdict(k, report[k]) == "meets" else "tab:red" for k in keys]
    ax.bar(range(len(keys)), values, color=colours)
    ax.scatter(range(len(keys)), [TARGETS[k][1] for k in keys], color="black", marker="_",
               s=600, zorder=3, label="target")
    ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right")
    ax.set_title(f"orthanc-ai benchmarks ({report['backend']}, {report['n_images']} images, "
                 f"{report['cpus']} CPUs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "out")
    parser.add_argument("--images", type=int, help="default 200 (--quick: 40)")
    parser.add_argument("--memory", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="instance counts of (d); default 500 5000 (--quick: 50 200)")
    parser.add_argument("--stream", type=int,
                        help="images a modality sends back to back in (e); default 600 "
                             "(--quick: 120)")
    parser.add_argument("--backend", choices=("in-process", "http"), default="in-process")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--models", type=Path, default=PROJECT_ROOT / "models")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--scheduling", choices=("normal", "idle"), default="normal",
                        help="AI.WorkerScheduling of the measured servers")
    parser.add_argument("--only", choices=MEASURES, action="append",
                        help="run only these measures (default: all)")
    parser.add_argument("--allow-threads", choices=("true", "false"),
                        help="Python.AllowThreads of the measured Orthancs (orthanc-python "
                             ">= 4.3; serve --orthanc current sets true); default: unset")
    args = parser.parse_args(argv)
    if args.allow_threads:
        ORTHANC_SETTINGS["Python"] = {"AllowThreads": args.allow_threads == "true"}
    sizes = (40, (50, 200), 120) if args.quick else (200, (500, 5000), 600)
    args.images = args.images or sizes[0]
    args.memory = tuple(args.memory or sizes[1])
    args.stream = args.stream or sizes[2]
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only or MEASURES)
    # Without the GSPS and KOS of located findings: SRs are counted from Orthanc's
    # statistics (instances less studies, sr_count), which companions would inflate.
    extra = {"Backend": args.backend, "ModelsDirectory": str(args.models.resolve()),
             "Workers": args.workers, "WorkerScheduling": args.scheduling,
             "PresentationStates": False}
    report: dict[str, Any] = {
        "backend": args.backend, "workers": args.workers, "scheduling": args.scheduling,
        "orthanc": os.environ.get("ORTHANC_AI_ORTHANC", "debian"),
        "allow_threads": args.allow_threads,
        "n_images": args.images,
        "measures": sorted(only), "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(), "errors": {}}

    def phase(name: str, fn: Callable[[], dict | None]) -> None:
        log(name, "start")
        t0 = time.perf_counter()
        try:
            report.update(fn() or {})
        except Exception as exc:
            traceback.print_exc()
            report["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        log(name, f"done in {time.perf_counter() - t0:.0f} s")

    with tempfile.TemporaryDirectory(prefix="orthanc-ai-bench-") as tmp:
        work = Path(tmp)
        log("setup", f"preparing {args.images} images; measures {', '.join(sorted(only))}")
        files = dx_corpus(work / "dx", args.images, base_images=20, seed=8000, spacing_mm=0.2)
        report["image_size"] = list(pydicom.dcmread(files[0]).pixel_array.shape)
        if "ingest" in only:
            phase("ingest", lambda: bench_ingest(work, files, extra))
        if only & {"pipeline", "latency"}:
            def pipeline() -> dict:
                log("pipeline", "bare decode + preprocess + predict in this process")
                bare = bare_compute(files, args.models)
                log("pipeline", f"bare: {bare['bare_images_per_s']:.1f} images/s, single "
                                f"{bare['bare_single_s'] * 1000:.0f} ms")
                bench_pipeline(work, files, extra, bare, "latency" in only, report)
                return None
            phase("pipeline", pipeline)
        if only & {"stream", "nodes"} and "pipeline_images_per_s" not in report:
            def backlog() -> dict:
                server, rate = backlog_server(work, "backlog", files, extra, "backlog")
                server.stop()
                shutil.rmtree(server.data, ignore_errors=True)
                return {"pipeline_images_per_s": rate}
            phase("backlog", backlog)
        idle_rate = report.get("pipeline_images_per_s")
        if "stream" in only and idle_rate:
            phase("stream", lambda: bench_stream(work, args.stream, extra, idle_rate))
        if "nodes" in only and idle_rate:
            phase("nodes", lambda: bench_nodes(work, files, extra, idle_rate))
        if "memory" in only:
            phase("memory", lambda: bench_memory(work, *args.memory, extra, report))
    name = "report" if not args.only else "report-" + "-".join(sorted(only))
    name += "" if (args.backend, args.workers) == ("in-process", 1) else \
        f"-{args.backend}-w{args.workers}"
    name += "" if args.scheduling == "normal" else f"-{args.scheduling}"
    name += "" if not args.allow_threads else f"-allowthreads-{args.allow_threads}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{name}.png")
    print_table(report)
    print(f"report: {args.out / (name + '.json')}, plot: {args.out / (name + '.png')}",
          flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
