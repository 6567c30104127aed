"""Cost of building one AI result SR: highdicom's direct build vs ``build_sr``; and its bytes.

    .venv/bin/python -m bench.sr_build [--n 200] [--profile highdicom|build_sr [--case 0-3]]

Builds the SR of a synthetic radiograph (positive with a region, negative),
of a CR test image and of a head CT key slice (volume finding) ``--n`` times
each, with the direct highdicom build (``inference.report.build_sr_highdicom``,
what ``build_sr`` did before it cached per model card) and with ``build_sr``,
and prints milliseconds per SR. Then it serialises each ``build_sr`` SR ``--n``
times with pydicom's ``save_as`` (what ``engine.context.sr_file`` did before)
and with ``inference.report.sr_bytes`` (what it does now), prints milliseconds
per SR and whether the two wrote the same bytes. ``--profile`` runs cProfile
over one of the builds and prints the 25 most expensive functions. Pure CPU,
no Orthanc needed.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from engine.config import PROJECT_ROOT
from inference import report
from inference.card import ModelCard
from inference.postprocess import Finding, Region

try:  # the synthetic phantoms moved from inference/ to training/
    from training.synthetic.ct import ct_dataset
    from training.synthetic.dx import dx_dataset
    from training.synthetic.radiograph import render, sample_case
except ImportError:  # pragma: no cover - older tree
    from inference.synthetic.ct import ct_dataset
    from inference.synthetic.dx import dx_dataset
    from inference.synthetic.radiograph import render, sample_case

Builder = Callable[..., Dataset]
NOW = dt.datetime(2026, 1, 2, 3, 4, 5)


def _dx() -> Dataset:
    rng = np.random.default_rng(7)
    rendered = render(sample_case(rng, fracture=True, age_years=50.0, sex="F"), rng)
    return dx_dataset(rendered, patient_id="BENCH-DX", patient_name="BENCH^DX",
                      patient_sex="F", patient_age_years=50.0,
                      study_uid="1.2.826.0.1.3680043.8.498.1",
                      series_uid="1.2.826.0.1.3680043.8.498.2",
                      sop_uid="1.2.826.0.1.3680043.8.498.3")


def _ct() -> Dataset:
    return ct_dataset(
        np.zeros((64, 64), np.int16), pixel_spacing_mm=0.45, image_position=(-14.0, -14.0, 40.0),
        slice_thickness_mm=5.0, patient_id="BENCH-CT", patient_name="BENCH^CT",
        patient_sex="M", patient_age_years=70.0, study_uid="1.2.826.0.1.3680043.8.498.11",
        series_uid="1.2.826.0.1.3680043.8.498.12", sop_uid="1.2.826.0.1.3680043.8.498.13",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.14", instance_number=9,
    )


def cases() -> list[tuple[str, Dataset, ModelCard, list[Finding]]]:
    from pydicom.data import get_testdata_file

    limb = ModelCard.from_folder(PROJECT_ROOT / "models" / "limb-fracture-xr")
    head = ModelCard.from_folder(PROJECT_ROOT / "models" / "head-ct-haemorrhage")
    dx, ct = _dx(), _ct()
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    box = Region(100.0, 200.0, 180.5, 260.25)
    return [
        ("DX positive + region", dx, limb, [Finding(0.87, 0.5, box)]),
        ("DX negative", dx, limb, [Finding(0.12, 0.5, None)]),
        ("CR positive + region", cr, limb, [Finding(0.91, 0.5, box)]),
        ("CT volume finding", ct, head, [Finding(0.95, 0.5, None, volume_ml=12.5)]),
    ]


def time_builds(build: Builder, source: Dataset, card: ModelCard, findings: list[Finding],
                n: int, label: str) -> list[float]:
    build(source, card, findings, missing_inputs=["age"], now=NOW)  # warm the caches
    times: list[float] = []
    step = max(1, n // 5)
    for i in range(n):
        t0 = time.perf_counter()
        build(source, card, findings, missing_inputs=["age"], now=NOW)
        times.append((time.perf_counter() - t0) * 1000.0)
        if (i + 1) % step == 0:
            print(f"\r  {label}: {i + 1}/{n}", end="", file=sys.stderr, flush=True)
    print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    return times


def save_as_bytes(sr: Dataset) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def serialisers() -> dict[str, Callable[[Dataset], bytes]]:
    found: dict[str, Callable[[Dataset], bytes]] = {"save_as": save_as_bytes}
    lean = getattr(report, "sr_bytes", None)
    if lean is not None:
        found["sr_bytes"] = lean
    return found


def time_serialise(serialise: Callable[[Dataset], bytes], sr: Dataset, n: int) -> list[float]:
    serialise(sr)  # warm the caches
    times: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        serialise(sr)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def print_serialise(all_cases: list, n: int) -> None:
    found = serialisers()
    print(f"\nms to serialise one build_sr SR, {n} times each (mean / median / p95)")
    header = f"{'case':<24}" + "".join(f"{s:>26}" for s in found)
    if len(found) == 2:
        header += f"{'speed-up':>10}{'same bytes':>12}"
    print(header)
    for name, source, card, findings in all_cases:
        sr = report.build_sr(source, card, findings, missing_inputs=["age"], now=NOW)
        row = f"{name:<24}"
        means = []
        for serialise in found.values():
            t = time_serialise(serialise, sr, n)
            means.append(statistics.fmean(t))
            row += f"{means[-1]:>10.2f} /{statistics.median(t):>6.2f} /" \
                   f"{float(np.percentile(t, 95)):>6.2f}"
        if len(means) == 2:
            same = len({s(sr) for s in found.values()}) == 1
            row += f"{means[0] / means[1]:>9.1f}x{'yes' if same else 'NO':>12}"
        print(row, flush=True)


def builders() -> dict[str, Builder]:
    found = {"build_sr": report.build_sr}
    direct = getattr(report, "build_sr_highdicom", None)
    if direct is not None:
        found = {"highdicom": direct, **found}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="builds per case and builder")
    parser.add_argument("--profile", choices=("highdicom", "build_sr"),
                        help="cProfile --n builds of one case with this builder")
    parser.add_argument("--case", type=int, default=0, help="the case to profile (0-3)")
    args = parser.parse_args(argv)
    all_cases = cases()
    found = builders()
    if args.profile:
        name, source, card, findings = all_cases[args.case]
        build = found[args.profile]
        build(source, card, findings, missing_inputs=["age"], now=NOW)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.n):
            build(source, card, findings, missing_inputs=["age"], now=NOW)
        profiler.disable()
        print(f"{args.profile}, {name}, {args.n} builds (cProfile adds overhead):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        return 0
    print(f"ms per SR, {args.n} builds each (mean / median / p95)")
    header = f"{'case':<24}" + "".join(f"{b:>26}" for b in found)
    if len(found) == 2:
        header += f"{'speed-up':>10}"
    print(header)
    for name, source, card, findings in all_cases:
        row = f"{name:<24}"
        means = []
        for label, build in found.items():
            t = time_builds(build, source, card, findings, args.n, f"{name} / {label}")
            p95 = float(np.percentile(t, 95))
            means.append(statistics.fmean(t))
            row += f"{means[-1]:>10.2f} /{statistics.median(t):>6.2f} /{p95:>6.2f}"
        if len(means) == 2:
            row += f"{means[0] / means[1]:>9.1f}x"
        print(row, flush=True)
    print_serialise(all_cases, args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
