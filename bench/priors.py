"""What prior comparison costs a result's latency, measured in one run.

    .venv/bin/python -m bench.priors [--n 12] [--out bench/out]

One PACS (a plain Orthanc) on loopback holds an earlier study for half of
the patients. For each patient a current DX study is stored by C-STORE,
one at a time, and the time from storescu's end to the job's end (its SR
in Orthanc) is measured:

- ``off``: priors not configured (the baseline);
- ``none``: priors on, nothing on the PACS (a local search and one C-FIND);
- ``fetched``: priors on, the prior on the PACS (C-FIND, C-MOVE, the prior
  analysed, the comparison, an SR built by highdicom).

Reported as ratios to ``off``; no target (the deadline bounds the worst case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tests.factories import patient_study_dx
from tests.harness import OrthancAI, write_config
from tests.peers import OrthancPacs

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] priors: {message}", flush=True)


def latency(ai: OrthancAI, path: Path, sop: str) -> float:
    ai.storescu([path])
    t0 = time.perf_counter()
    while True:
        instance = ai.lookup(sop)
        jobs = [j for j in ai.jobs(instance=instance) if j["model"]] if instance else []
        if jobs and all(j["state"] in ("done", "failed", "skipped", "dead") for j in jobs):
            return time.perf_counter() - t0
        time.sleep(0.01)


def run_case(ai: OrthancAI, work: Path, patients: list[str], label: str) -> list[float]:
    out = []
    for k, patient in enumerate(patients):
        ds = patient_study_dx(patient, "20251001", fracture=True, accession=f"C{k}")
        path = work / f"{label}-{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(latency(ai, path, str(ds.SOPInstanceUID)))
        log(f"{label} {k + 1}/{len(patients)}: {out[-1] * 1000:.0f} ms")
        time.sleep(0.3)
    return out[1:]  # the first warms the worker up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="studies per case")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    pacs = OrthancPacs(work / "pacs", "PACS")
    config = write_config(work / "on.json", Priors={"Sources": ["PACS"]})
    data = json.loads(config.read_text())
    on = OrthancAI(work / "on", config=config)
    off = OrthancAI(work / "off", config=write_config(work / "off.json"))
    data["DicomModalities"] = {"PACS": {"AET": "PACS", "Host": "127.0.0.1",
                                        "Port": pacs.dicom_port}}
    config.write_text(json.dumps(data))
    pacs.known = {"ORTHANC": ("ORTHANC", "127.0.0.1", on.dicom_port)}
    results: dict[str, list[float]] = {}
    try:
        pacs.start()
        fetched = [f"BENCH-F{k}" for k in range(args.n)]
        for k, patient in enumerate(fetched):
            ds = patient_study_dx(patient, "20240110", fracture=False, accession=f"P{k}")
            path = work / f"prior-{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            pacs.upload(path.read_bytes())
        log("baseline: priors off")
        with off:
            results["off"] = run_case(off, work, [f"BENCH-O{k}" for k in range(args.n)], "off")
        log("priors on")
        with on:
            results["none"] = run_case(on, work, [f"BENCH-N{k}" for k in range(args.n)], "none")
            results["fetched"] = run_case(on, work, fetched, "fetched")
    finally:
        pacs.stop()
    base = statistics.median(results["off"])
    report = {case: {"p50_ms": round(statistics.median(v) * 1000, 1),
                     "max_ms": round(max(v) * 1000, 1),
                     "p50_ratio_to_off": round(statistics.median(v) / base, 2)}
              for case, v in results.items()}
    print(f"\n{'case':<10} {'p50 ms':>8} {'max ms':>8} {'p50 / off':>10}")
    for case, r in report.items():
        print(f"{case:<10} {r['p50_ms']:>8} {r['max_ms']:>8} {r['p50_ratio_to_off']:>10}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "priors.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
