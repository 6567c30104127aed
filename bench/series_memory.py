"""Memory of a series job: a 1,000-slice head CT analysed with bounded memory.

    .venv/bin/python -m bench.series_memory [--slices 1000] [--out bench/out]

Writes the series slice by slice, sends it by C-STORE, waits for the series
job, and samples the resident size (VmRSS) of the worker process that runs
it, and of Orthanc, every 0.2 s: the growth during the job is compared with
the size of the series' pixel data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.run_all import rss_kib
from engine.config import PROJECT_ROOT
from inference.uids import derived_uid
from tests.harness import OrthancAI, write_config
from training.synthetic.ct import write_ct_series
from training.synthetic.headct import sample_head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orthanc-ai-series-") as tmp:
        work = Path(tmp)
        head = sample_head(np.random.default_rng(77), haemorrhage=True, age_years=70.0,
                           sex="F", lesion_kind="iph", volume_ml=25.0)
        spacing = 200.0 / args.slices  # a 200 mm head covered by N thin slices
        files = list(write_ct_series(
            head, work / "ct", slice_thickness_mm=max(spacing, 0.625),
            spacing_between_slices_mm=spacing, n_slices=args.slices,
            pixel_spacing_mm=0.45, rows=512, cols=512, patient_id="BENCH-CT",
            patient_name="BENCH^CT", patient_sex="F", patient_age_years=70.0,
            study_uid=derived_uid("bench-ct", "study"),
            series_uid=derived_uid("bench-ct", "series"),
        ))
        pixel_mib = sum(f.stat().st_size for f in files) / 2**20
        config = write_config(work / "c.json", StableAge=3)
        with OrthancAI(work / "srv", config=config) as server:
            pid = server.proc.pid
            (worker,) = [w["pid"] for w in server.get("/ai/health")["workers"]]
            print(f"sending {args.slices} slices ({pixel_mib:.0f} MiB) ...", flush=True)
            server.storescu(files)
            baseline, orthanc_baseline = rss_kib(worker), rss_kib(pid)
            samples: list[int] = []
            orthanc_samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(rss_kib(worker))
                    orthanc_samples.append(rss_kib(pid))
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            print("waiting for the series job (StableAge, then the analysis) ...", flush=True)
            while True:
                jobs = [j for j in server.jobs() if j["level"] == "series"]
                if jobs and jobs[0]["state"] not in ("queued", "running"):
                    break
                time.sleep(0.5)
            elapsed = time.perf_counter() - t0
            stop.set()
            sampler.join()
        job = jobs[0]
    report = {
        "slices": args.slices,
        "series_mib_on_disk": round(pixel_mib, 1),
        "worker_rss_before_mib": round(baseline / 1024, 1),
        "worker_rss_peak_mib": round(max(samples) / 1024, 1),
        "worker_rss_growth_mib": round((max(samples) - baseline) / 1024, 1),
        "orthanc_rss_growth_mib": round((max(orthanc_samples) - orthanc_baseline) / 1024, 1),
        "job_state": job["state"],
        "job_seconds": round(elapsed, 1),
        "volume_ml": (job.get("result") or {}).get("volume_ml"),
        "reason": job.get("reason"),
    }
    (args.out / "series_memory.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key:22} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
