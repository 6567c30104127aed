"""Benchmarks of orthanc-ai, each a ratio measured within one run.

    .venv/bin/python -m bench.run_all [--quick] [--out bench/out]

(a) ingest overhead: storescu throughput into Orthanc with the plugin on vs off
(b) pipeline efficiency: end-to-end images/s vs bare decode+preprocess+predict
(c) latency p50/p95 from C-STORE completion to SR available vs bare compute
(d) memory: Orthanc's resident size after 500 vs 5,000 instances

Prints a table, writes ``report.json`` and ``report.png`` into ``--out``.
Never a timed assertion: the numbers are reported, the targets beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from engine.config import PROJECT_ROOT
from inference.backend import Batch, InProcessBackend
from inference.card import ModelCard
from inference.preprocess import prepare_radiograph
from inference.report import sr_uids
from tests.harness import STORESCU, OrthancAI, dx_corpus, write_config

MODEL_ID = "limb-fracture-xr"
TARGETS = {"ingest_ratio": (">=", 0.95), "pipeline_efficiency": (">=", 0.8),
           "latency_p50_ratio": ("<=", 1.5), "latency_p95_ratio": ("<=", 1.5),
           "memory_growth": ("<=", 0.10)}


def storescu_seconds(server: OrthancAI, files: list[Path]) -> float:
    t0 = time.perf_counter()
    server.storescu(files)
    return time.perf_counter() - t0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def orthanc_pid(server: OrthancAI) -> int:
    # `orthanc-ai serve` execs Orthanc: the child process is Orthanc itself.
    assert server.proc is not None
    return server.proc.pid


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
    return {"images_per_s": len(files) / total, "single_s_p50": statistics.median(singles)}


def settle(server: OrthancAI, n_jobs: int, timeout: float = 3600, poll: float = 0.5) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = server.jobs()
        if len(jobs) >= n_jobs and all(j["state"] in ("done", "skipped", "failed", "dead")
                                       for j in jobs):
            return
        time.sleep(poll)
    raise TimeoutError("jobs did not settle")


def wait_for_srs(server: OrthancAI, n_sources: int, poll: float = 0.5,
                 timeout: float = 3600) -> None:
    """Until Orthanc holds an SR for each of `n_sources` images (its own counter:
    polling /ai/jobs would take the GIL from the workers being measured)."""
    deadline = time.time() + timeout
    while server.get("/statistics")["CountInstances"] < 2 * n_sources:
        if time.time() > deadline:
            raise TimeoutError(f"fewer than {n_sources} SRs after {timeout} s")
        time.sleep(poll)
    settle(server, n_sources)


def bench_ingest(work: Path, files: list[Path], extra: dict, repeats: int = 3) -> dict[str, float]:
    """storescu throughput with the plugin off and on, alternated; medians of `repeats`.

    One storescu run varies by about 10 % on this kind of machine (disk
    write-back, other tenants), so one pair alone can mislead either way.
    """
    on = write_config(work / "on.json", **extra)
    off = write_config(work / "off.json", Enabled=False)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for k in range(repeats):
        for name, config in (("off", off), ("on", on)):
            server = OrthancAI(work / f"ingest-{name}-{k}", config=config).start(
                wait_ready=name == "on")
            try:
                rates[name].append(len(files) / storescu_seconds(server, files))
            finally:
                server.stop()
                shutil.rmtree(server.data, ignore_errors=True)
    out = {f"ingest_{name}_per_s": statistics.median(r) for name, r in rates.items()}
    out["ingest_ratio"] = out["ingest_on_per_s"] / out["ingest_off_per_s"]
    out["ingest_runs_per_s"] = rates  # type: ignore[assignment]
    return out


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


def bench_pipeline(work: Path, files: list[Path], extra: dict,
                   bare: dict[str, float]) -> dict[str, float]:
    """Throughput stored -> SR stored on a backlog, then per-image latency when idle.

    The images are stored while the plugin is off, then the plugin starts and
    works the backlog from Orthanc's change log: the clock covers fetching,
    decoding, predicting, building and storing the SRs, not Orthanc's own
    ingest (measured apart, above).
    """
    data = work / "pipeline"
    on = write_config(work / "pipe.json", **extra)
    off = write_config(work / "pipe-off.json", Enabled=False)
    server = OrthancAI(data, config=on).start()  # first start sets the change-log cursor
    server.stop()
    down = OrthancAI(data, config=off)
    down.http_port, down.dicom_port, down.url = server.http_port, server.dicom_port, server.url
    down.start(wait_ready=False)
    down.storescu(files)
    down.stop()
    card = ModelCard.from_folder(Path(extra["ModelsDirectory"]) / MODEL_ID)
    server.start()
    try:
        t0 = time.perf_counter()
        wait_for_srs(server, len(files), poll=0.05)
        total = time.perf_counter() - t0
        stages = stage_means(server)
        # Latency, one image at a time on an idle system: C-STORE done -> SR in
        # Orthanc (its SOP Instance UID is known in advance). The pause keeps
        # each image apart from the last, as a single radiograph arriving at a
        # quiet Orthanc (no ingest burst); the first image is a warm-up.
        pause = float(extra.get("IngestQuietMs", 300)) / 1000.0 + 0.2
        latencies = []
        for k, path in enumerate(files[:21]):
            time.sleep(pause)
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
            single = work / f"lat-{k}.dcm"
            ds.save_as(single, enforce_file_format=True)
            sr_uid = sr_uids(ds, card)[1]
            subprocess.run([STORESCU, "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port),
                            str(single)], check=True, capture_output=True)
            t_stored = time.perf_counter()
            deadline = time.time() + 120
            while server.lookup(sr_uid) is None:
                if time.time() > deadline:
                    raise TimeoutError(f"no SR for latency image {k} in 120 s")
                time.sleep(0.002)
            if k:
                latencies.append(time.perf_counter() - t_stored)
    finally:
        server.stop()
    e2e = len(files) / total
    p50, p95 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))
    return {
        "pipeline_images_per_s": e2e,
        "bare_images_per_s": bare["images_per_s"],
        "pipeline_efficiency": e2e / bare["images_per_s"],
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "bare_single_s": bare["single_s_p50"],
        "latency_p50_ratio": p50 / bare["single_s_p50"],
        "latency_p95_ratio": p95 / bare["single_s_p50"],
        "latencies_s": [round(x, 4) for x in latencies],
        **stages,
    }


def bench_memory(work: Path, small: int, large: int, extra: dict) -> dict[str, float]:
    """Orthanc's resident size after `small` and `large` instances, plugin on and off.

    Orthanc grows by itself (index, storage cache); the plugin's part is the
    difference between the two runs.
    """
    files = dx_corpus(work / "mem-dx", large, base_images=10, seed=9000, spacing_mm=0.5)
    out: dict[str, float] = {"memory_instances": [small, large]}  # type: ignore[dict-item]
    for name, config in (("off", write_config(work / "mem-off.json", Enabled=False)),
                         ("on", write_config(work / "mem-on.json", **extra))):
        server = OrthancAI(work / f"memory-{name}", config=config).start(
            wait_ready=name == "on")
        try:
            rss = []
            for done, batch in ((small, files[:small]), (large, files[small:])):
                server.storescu(batch)
                if name == "on":
                    wait_for_srs(server, done)
                rss.append(rss_kib(orthanc_pid(server)))
        finally:
            server.stop()
        out[f"rss_small_{name}_mib"] = rss[0] / 1024
        out[f"rss_large_{name}_mib"] = rss[1] / 1024
    out["rss_small_mib"], out["rss_large_mib"] = out["rss_small_on_mib"], out["rss_large_on_mib"]
    out["memory_growth"] = (out["rss_large_on_mib"] - out["rss_small_on_mib"]) / out[
        "rss_small_on_mib"]
    out["memory_growth_orthanc_alone"] = (out["rss_large_off_mib"] - out["rss_small_off_mib"]) \
        / out["rss_small_off_mib"]
    out["memory_growth_plugin_mib"] = (
        (out["rss_large_on_mib"] - out["rss_small_on_mib"])
        - (out["rss_large_off_mib"] - out["rss_small_off_mib"]))
    return out


def verdict(key: str, value: float) -> str:
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{'meets' if ok else 'MISSES'} target {op} {target}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in TARGETS if k in report]
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    values = [report[k] for k in keys]
    ax.bar(range(len(keys)), values, color=["tab:blue"] * len(keys))
    ax.scatter(range(len(keys)), [TARGETS[k][1] for k in keys], color="red", zorder=3,
               label="target")
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    ax.set_title(f"orthanc-ai benchmarks ({report['backend']}, {report['n_images']} images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "out")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--memory", type=int, nargs=2, default=(500, 5000))
    parser.add_argument("--backend", choices=("in-process", "http"), default="in-process")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--models", type=Path, default=PROJECT_ROOT / "models")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", choices=("ingest", "pipeline", "memory"), action="append",
                        help="run only these measures (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.memory = 40, (50, 200)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {"Backend": args.backend, "ModelsDirectory": str(args.models.resolve()),
             "Workers": args.workers}
    report: dict = {"backend": args.backend, "workers": args.workers, "n_images": args.images,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": __import__("os").cpu_count()}
    with tempfile.TemporaryDirectory(prefix="orthanc-ai-bench-") as tmp:
        work = Path(tmp)
        files = dx_corpus(work / "dx", args.images, base_images=20, seed=8000, spacing_mm=0.2)
        report["image_size"] = list(pydicom.dcmread(files[0]).pixel_array.shape)
        only = set(args.only or ("ingest", "pipeline", "memory"))
        if "ingest" in only:
            report.update(bench_ingest(work, files, extra))
        if "pipeline" in only:
            bare = bare_compute(files, args.models)
            report.update(bench_pipeline(work, files, extra, bare))
        if "memory" in only:
            report.update(bench_memory(work, *args.memory, extra))
    name = "report" if not args.only else "report-" + "-".join(sorted(only))
    name += "" if (args.backend, args.workers) == ("in-process", 1) else \
        f"-{args.backend}-w{args.workers}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{name}.png")
    print(f"{'measure':28} {'value':>10}  verdict")
    for key in TARGETS:
        if key in report:
            print(f"{key:28} {report[key]:>10.3f}  {verdict(key, report[key])}")
    for key in ("ingest_off_per_s", "ingest_on_per_s", "pipeline_images_per_s",
                "bare_images_per_s", "latency_p50_s", "latency_p95_s", "bare_single_s",
                "rss_small_mib", "rss_large_mib", "rss_small_off_mib", "rss_large_off_mib",
                "memory_growth_orthanc_alone", "memory_growth_plugin_mib",
                *sorted(k for k in report if k.startswith("stage_"))):
        if key in report:
            print(f"{key:28} {report[key]:>10.3f}")
    print(f"report: {args.out / (name + '.json')}, plot: {args.out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
