"""Head CT haemorrhage model: synthetic data through the runtime path, and evaluation.

Every slice goes the way a real one goes at run time: the phantom
(:mod:`training.synthetic.headct`) is rendered, encoded as a CT Image
Storage dataset (:mod:`training.synthetic.ct`) and turned into model inputs
by :func:`inference.preprocess.prepare_ct_slice`. Training, validation and
evaluation therefore see the same pixels and the same metadata features as
the plugin.

Held-out evaluation works on whole series, as the plugin does: every slice of
a fresh synthetic series (5 mm routine or 1.25 mm thin, 0.45-0.49 mm pixels,
512 x 512) is run through the model; the series probability is the maximum
slice probability, the key slice its argmax, and the haemorrhage volume the
sum over slices of the area of heatmap cells >= 0.5 times the slice spacing.

Each case is a pure function of ``(seed, stream, index)``, so a set of ``n``
cases is the first ``n`` cases of any larger one, whatever the number of
worker processes. TensorFlow is imported only where models run, so worker
processes that render stay light.

Usage::

    python -m training.evaluate_head_ct --model models/head-ct-haemorrhage \\
        --n-series 96 --seed 9103
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from inference.preprocess import fit_canvas, prepare_ct_slice
from training.metrics import (
    auroc,
    pearson,
    round4,
    sensitivity_specificity,
)
from training.synthetic.ct import ENCODINGS, ct_dataset
from training.synthetic.headct import (
    Head,
    lesion_mask_slice,
    lesion_z_range,
    render_slice,
    sample_head,
    true_volume_ml,
)

FEATURE_NAMES: tuple[str, ...] = (
    "age_years",
    "age_known",
    "sex_male",
    "sex_female",
    "slice_thickness",
)
CANVAS: tuple[int, int] = (256, 256)
TARGET_MM = 1.0
WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0))
STRIDE = 4  # model pixels per heatmap cell
HEATMAP_SHAPE = (CANVAS[0] // STRIDE, CANVAS[1] // STRIDE)
CELL_AREA_MM2 = (STRIDE * TARGET_MM) ** 2
HEATMAP_THRESHOLD = 0.5
# A slice is labelled positive when it holds at least this much haemorrhage
# (partial-volume weighted area): less is a sliver at a lesion's edge that
# no reader would call.
MIN_LESION_AREA_MM2 = 10.0
PREDICT_CHUNK = 32  # slices per model call (fixed: same batches, same floats)
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<18", 0.0, 18.0),
    ("18-59", 18.0, 60.0),
    (">=60", 60.0, 200.0),
)

# Independent random streams per purpose, so that sets never share a case.
STREAM_TRAIN, STREAM_VALIDATION, STREAM_HELD_OUT = 1, 2, 3


@dataclass(frozen=True)
class Acquisition:
    """How a slice or series is reconstructed and what its header says.

    Attributes
    ----------
    thickness_mm, spacing_mm
        Slice thickness and distance between slice centres.
    pixel_spacing_mm, matrix
        In-plane pixel size and rows = columns.
    encoding
        Pixel encoding (:data:`training.synthetic.ct.ENCODINGS`).
    pad_outside_circle
        Corners outside the reconstruction circle padded.
    hide_age, hide_sex
        PatientAge or PatientSex left out of the header.
    """

    thickness_mm: float
    spacing_mm: float
    pixel_spacing_mm: float
    matrix: int
    encoding: str
    pad_outside_circle: bool = True
    hide_age: bool = False
    hide_sex: bool = False


def sample_training_acquisition(
    rng: np.random.Generator, *, p_mask_age: float = 0.1, p_mask_sex: float = 0.1
) -> Acquisition:
    """Varied thickness (0.625-5 mm), pixel size, encoding; metadata masked ~10 % each.

    Most training slices use coarse pixels (0.6-1 mm, a 225-250 mm field):
    the runtime resamples every slice to 1 mm and the phantom's noise is
    defined in millimetres, so they look to the model like 0.45 mm slices,
    at a quarter of the rendering cost. A quarter are at scanner pixel sizes.
    """
    thickness = float(
        rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0], p=[0.1, 0.08, 0.17, 0.1, 0.15, 0.1, 0.3])
    )
    if rng.random() < 0.25:
        ps, matrix = float(rng.uniform(0.42, 0.5)), 512
    else:
        ps = float(rng.uniform(0.6, 0.98))
        matrix = int(round(rng.uniform(225.0, 250.0) / ps))
    return Acquisition(
        thickness_mm=thickness,
        spacing_mm=thickness,
        pixel_spacing_mm=ps,
        matrix=matrix,
        encoding=ENCODINGS[int(rng.integers(len(ENCODINGS)))],
        pad_outside_circle=bool(rng.random() < 0.7),
        hide_age=bool(rng.random() < p_mask_age),
        hide_sex=bool(rng.random() < p_mask_sex),
    )


def held_out_acquisition(rng: np.random.Generator) -> Acquisition:
    """Scanner protocols: 5 mm routine (60 %) or 1.25 mm thin, 0.45-0.49 mm pixels, 512^2."""
    thin = rng.random() < 0.4
    thickness = 1.25 if thin else 5.0
    return Acquisition(
        thickness_mm=thickness,
        spacing_mm=thickness,
        pixel_spacing_mm=float(rng.choice([0.45, 0.468, 0.488])),
        matrix=512,
        encoding=ENCODINGS[int(rng.integers(len(ENCODINGS)))],
        pad_outside_circle=bool(rng.random() < 0.7),
    )


def slice_dataset(
    head: Head, z_mm: float, acq: Acquisition, *, uid: str, number: int = 1
) -> Dataset:
    """Render one slice and wrap it in a CT Image Storage dataset (in memory)."""
    hu = render_slice(
        head,
        z_mm,
        pixel_spacing_mm=acq.pixel_spacing_mm,
        rows=acq.matrix,
        cols=acq.matrix,
        thickness_mm=acq.thickness_mm,
    )
    x0 = -(acq.matrix - 1) / 2.0 * acq.pixel_spacing_mm
    return ct_dataset(
        hu,
        pixel_spacing_mm=acq.pixel_spacing_mm,
        image_position=(x0, x0, z_mm),
        slice_thickness_mm=acq.thickness_mm,
        patient_id="SYNTHETIC",
        patient_name="SYNTHETIC^PHANTOM",
        patient_sex=None if acq.hide_sex else head.sex,
        patient_age_years=None if acq.hide_age else head.age_years,
        study_uid=f"{uid}.1",
        series_uid=f"{uid}.2",
        sop_uid=f"{uid}.3.{number}",
        frame_of_reference_uid=f"{uid}.4",
        instance_number=number,
        encoding=acq.encoding,
        pad_outside_circle=acq.pad_outside_circle,
    )


def model_inputs(ds: Dataset) -> tuple[np.ndarray, np.ndarray, object]:
    """The plugin's preprocessing: (image (256, 256, 2), features (5,), geometry)."""
    mi = prepare_ct_slice(
        ds, canvas=CANVAS, target_mm=TARGET_MM, windows=WINDOWS, feature_names=FEATURE_NAMES
    )
    return mi.image.pixels, mi.features, mi.image.geometry


def heatmap_target(coverage: np.ndarray, pixel_spacing_mm: float) -> np.ndarray:
    """Haemorrhage fraction per heatmap cell (64, 64), on the model's canvas.

    The source-resolution coverage goes through the same resampling and
    centring as the image (:func:`inference.preprocess.fit_canvas`), then is
    averaged over 4 x 4 model pixels.
    """
    canvas = fit_canvas(coverage, (pixel_spacing_mm, pixel_spacing_mm), TARGET_MM, CANVAS)
    cells = canvas.pixels.reshape(HEATMAP_SHAPE[0], STRIDE, HEATMAP_SHAPE[1], STRIDE)
    return np.clip(cells.mean(axis=(1, 3)), 0.0, 1.0).astype(np.float32)


def heatmap_volume_ml(heatmaps: np.ndarray, spacing_mm: float) -> float:
    """The plugin's volume: cells >= 0.5 times their area times the slice spacing."""
    cells = int((np.asarray(heatmaps) >= HEATMAP_THRESHOLD).sum())
    return cells * CELL_AREA_MM2 * spacing_mm / 1000.0


# --------------------------------------------------------------------------
# Training and validation slices
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSpec:
    """How to draw a set of training or validation slices.

    Attributes
    ----------
    seed, stream
        Random seed and stream.
    slices_per_head
        Slices taken from each synthetic head.
    prevalence
        Share of heads with haemorrhage.
    p_mask_age, p_mask_sex
        Probability that PatientAge / PatientSex is left out of the header.
    """

    seed: int
    stream: int
    slices_per_head: int = 6
    prevalence: float = 0.5
    p_mask_age: float = 0.1
    p_mask_sex: float = 0.1


def head_slices(spec: SliceSpec, index: int) -> list[dict[str, object]]:
    """Slices of head ``index`` of ``spec``, through the runtime preprocessing.

    A head with haemorrhage contributes mostly slices through the lesion; a
    normal head, slices anywhere, with a share through its calcifications
    (the mimics). Each head gets one acquisition (thickness, pixel size,
    encoding, metadata masking), as a series would.
    """
    rng = np.random.default_rng([spec.seed, spec.stream, index])
    head = sample_head(rng, prevalence=spec.prevalence)
    acq = sample_training_acquisition(rng, p_mask_age=spec.p_mask_age, p_mask_sex=spec.p_mask_sex)
    # The whole range a series covers, skull base and vertex cap included:
    # the series probability is a maximum, so every level must be learnt.
    lo, hi = head.z_range_mm()
    lesion_z = lesion_z_range(head)

    def scanner_z(centre: tuple[float, float, float]) -> float:
        return float(head._to_scanner(*(np.asarray([v], np.float32) for v in centre))[2][0])

    calc_z = [scanner_z(c.centre) for c in head.calcifications]
    # Small foci (contusions) are sampled at their own levels: a uniform
    # draw over the span of scattered foci would mostly miss them.
    focus_z = [scanner_z(les.centre) for les in head.lesions if les.variant == "contusion"]
    out = []
    for k in range(spec.slices_per_head):
        draw = rng.random()
        if focus_z and draw < 0.65:
            z = float(focus_z[int(rng.integers(len(focus_z)))] + rng.uniform(-3.0, 3.0))
        elif lesion_z is not None and draw < 0.65:
            z = float(rng.uniform(lesion_z[0] - 2.0, lesion_z[1] + 2.0))
        elif calc_z and draw < 0.5:
            # Negative heads: half their slices through the calcifications (the mimics).
            z = float(calc_z[int(rng.integers(len(calc_z)))] + rng.uniform(-3.0, 3.0))
        else:
            z = float(rng.uniform(lo, hi))
        ds = slice_dataset(head, z, acq, uid=f"2.25.{spec.seed}.{spec.stream}.{index}", number=k)
        image, features, _ = model_inputs(ds)
        coverage = lesion_mask_slice(
            head,
            z,
            pixel_spacing_mm=acq.pixel_spacing_mm,
            rows=acq.matrix,
            cols=acq.matrix,
            thickness_mm=acq.thickness_mm,
        )
        area = float(coverage.sum()) * acq.pixel_spacing_mm**2
        out.append(
            {
                "image": image.astype(np.float16),
                "metadata": features.astype(np.float32),
                "label": float(area >= MIN_LESION_AREA_MM2),
                "heatmap": heatmap_target(coverage, acq.pixel_spacing_mm).astype(np.float16),
                "area_mm2": area,
                "age": head.age_years,
                "head": index,
                "kind": head.lesions[0].kind if head.lesions else "none",
                "thickness": acq.thickness_mm,
            }
        )
    return out


def _head_chunk(args: tuple[SliceSpec, int, int]) -> list[dict[str, object]]:
    spec, start, stop = args
    return [row for i in range(start, stop) for row in head_slices(spec, i)]


@dataclass
class SliceSet:
    """Stacked slices: model inputs, targets and per-slice facts."""

    image: np.ndarray  # (n, 256, 256, 2) float16
    metadata: np.ndarray  # (n, 5) float32
    label: np.ndarray  # (n,) float32
    heatmap: np.ndarray  # (n, 64, 64, 1) float16
    area_mm2: np.ndarray
    age: np.ndarray
    head: np.ndarray
    kind: np.ndarray
    thickness: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])


def _pool(workers: int) -> ProcessPoolExecutor:
    # "spawn": the parent may hold TensorFlow's threads, which fork does not copy safely.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def synthesize_slices(spec: SliceSpec, n_heads: int, *, workers: int | None = None) -> SliceSet:
    """Slices of heads 0..n_heads-1 of ``spec``, rendered in parallel processes."""
    workers = workers or os.cpu_count() or 1
    chunk = 10
    jobs = [(spec, s, min(s + chunk, n_heads)) for s in range(0, n_heads, chunk)]
    if workers <= 1 or len(jobs) <= 1:
        parts = [_head_chunk(job) for job in jobs]
    else:
        with _pool(workers) as pool:
            parts = list(pool.map(_head_chunk, jobs))
    rows = [row for part in parts for row in part]
    return SliceSet(
        image=np.stack([r["image"] for r in rows]),
        metadata=np.stack([r["metadata"] for r in rows]),
        label=np.asarray([r["label"] for r in rows], np.float32),
        heatmap=np.stack([r["heatmap"] for r in rows])[..., None],
        area_mm2=np.asarray([r["area_mm2"] for r in rows], np.float32),
        age=np.asarray([r["age"] for r in rows], np.float32),
        head=np.asarray([r["head"] for r in rows]),
        kind=np.asarray([r["kind"] for r in rows]),
        thickness=np.asarray([r["thickness"] for r in rows], np.float32),
    )


# --------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------


def series_case(
    seed: int, stream: int, index: int, prevalence: float = 0.5
) -> tuple[Head, Acquisition]:
    """Head and protocol of held-out (or validation) series ``index``.

    Haemorrhage alternates by index (even: with, odd: without) when the
    prevalence is 0.5, so any first ``n`` series are balanced.
    """
    rng = np.random.default_rng([seed, stream, index])
    positive = (index % 2 == 0) if prevalence == 0.5 else bool(rng.random() < prevalence)
    head = sample_head(rng, haemorrhage=positive)
    return head, held_out_acquisition(rng)


def series_inputs(args: tuple[int, int, int, float]) -> dict[str, object]:
    """Render series ``index`` slice by slice through the runtime preprocessing.

    Returns the model inputs of every slice (images as float16) and the
    truth: label, true volume, per-slice haemorrhage area (1 mm grid).
    """
    seed, stream, index, prevalence = args
    head, acq = series_case(seed, stream, index, prevalence)
    lo, hi = head.z_range_mm()
    n = max(1, math.floor((hi - lo) / acq.spacing_mm) + 1)
    zs = lo + np.arange(n) * acq.spacing_mm
    images, features, areas = [], [], []
    uid = f"2.25.{seed}.{stream}.{index}"
    for k, z in enumerate(zs):
        ds = slice_dataset(head, float(z), acq, uid=uid, number=k + 1)
        image, feats, _ = model_inputs(ds)
        images.append(image.astype(np.float16))
        features.append(feats)
        if head.lesions:
            cov = lesion_mask_slice(
                head,
                float(z),
                pixel_spacing_mm=1.0,
                rows=256,
                cols=256,
                thickness_mm=acq.thickness_mm,
                centre_xy=(head.position[0], head.position[1]),
            )
            areas.append(float(cov.sum()))
        else:
            areas.append(0.0)
    volume = true_volume_ml(head, 1.0)
    if 0.0 < volume < 3.0:
        volume = true_volume_ml(head, 0.5)  # finer grid for small haematomas
    return {
        "index": index,
        "label": int(head.haemorrhage),
        "age": head.age_years,
        "sex": head.sex,
        "kind": head.lesions[0].kind if head.lesions else "none",
        "isodense": bool(head.lesions and head.lesions[0].isodense),
        "thickness": acq.thickness_mm,
        "spacing": acq.spacing_mm,
        "n_slices": int(n),
        "true_volume_ml": volume,
        "slice_area_mm2": np.asarray(areas, np.float32),
        "image": np.stack(images),
        "metadata": np.stack(features).astype(np.float32),
    }


def iter_series(
    seed: int, stream: int, n_series: int, *, prevalence: float = 0.5, workers: int | None = None
) -> Iterator[dict[str, object]]:
    """Series inputs 0..n_series-1 in order, rendered ahead by worker processes.

    Only a few series are in flight at a time, so memory stays bounded
    whatever ``n_series``.
    """
    workers = workers or os.cpu_count() or 1
    jobs = [(seed, stream, i, prevalence) for i in range(n_series)]
    if workers <= 1:
        for job in jobs:
            yield series_inputs(job)
        return
    with _pool(workers) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.submit(series_inputs, job))
            if len(pending) > workers + 1:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def predict_slices(
    model: object, images: np.ndarray, metadata: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n,) and heatmaps (n, 64, 64) in fixed chunks of slices."""
    probs, heats = [], []
    n = images.shape[0]
    for start in range(0, n, PREDICT_CHUNK):
        stop = min(start + PREDICT_CHUNK, n)
        # The last chunk is padded to the full size: one traced graph, and
        # every slice is computed in a batch of the same shape.
        pad = PREDICT_CHUNK - (stop - start)
        image = images[start:stop].astype(np.float32)
        batch = {"image": np.pad(image, ((0, pad), (0, 0), (0, 0), (0, 0)))}
        if metadata is not None:
            batch["metadata"] = np.pad(metadata[start:stop], ((0, pad), (0, 0)))
        out = model.predict_on_batch(batch)  # type: ignore[attr-defined]
        probs.append(np.asarray(out["probability"]).reshape(-1)[: stop - start])
        heats.append(np.asarray(out["heatmap"])[: stop - start, ..., 0])
    return np.concatenate(probs), np.concatenate(heats)


def aggregate_series(
    probs: np.ndarray, heats: np.ndarray, spacing_mm: float, slice_area_mm2: np.ndarray
) -> dict[str, float]:
    """The plugin's series outputs and the key-slice check."""
    key = int(np.argmax(probs))
    return {
        "probability": float(probs.max()),
        "key_slice": key,
        "key_slice_hit": float(slice_area_mm2[key] > 0.0),
        "volume_ml": heatmap_volume_ml(heats, spacing_mm),
    }


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------



def auroc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC."""
    if not (0 < auc < 1) or n_pos == 0 or n_neg == 0:
        return 0.0
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (
        n_pos * n_neg
    )
    return float(math.sqrt(max(var, 0.0)))


def paired_auroc_difference(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same cases, with a stratified paired bootstrap.

    Positives and negatives are resampled separately (the prevalence stays
    fixed) and both scores are kept together, so the interval reflects the
    difference between the models, not the spread of either.

    Returns
    -------
    dict
        ``difference``, ``ci95`` ([low, high]) and ``p_not_better`` (share of
        resamples with a difference <= 0).
    """
    y = np.asarray(labels, bool)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for k in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        diffs[k] = auroc(y[idx], a[idx]) - auroc(y[idx], b[idx])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "difference": round4(auroc(y, a) - auroc(y, b)),
        "ci95": [round4(float(low)), round4(float(high))],
        "p_not_better": round4(float((diffs <= 0).mean())),
    }



def series_metrics(rows: dict[str, np.ndarray], suffix: str, threshold: float) -> dict[str, object]:
    """Series-level metrics of one model from per-series results.

    ``rows`` holds columns ``label``, ``age``, ``true_volume_ml`` and the
    model's ``probability{suffix}``, ``volume_ml{suffix}``,
    ``key_slice_hit{suffix}``.
    """
    y = rows["label"].astype(bool)
    p = rows[f"probability{suffix}"]
    sens, spec = sensitivity_specificity(y, p, threshold)
    vol_true = rows["true_volume_ml"][y]
    vol_pred = rows[f"volume_ml{suffix}"][y]
    auc = auroc(y, p)
    by_age = {}
    for name, low, high in AGE_BANDS:
        sel = (rows["age"] >= low) & (rows["age"] < high)
        by_age[name] = round4(auroc(y[sel], p[sel]))
    return {
        "auroc": round4(auc),
        "auroc_se": round4(auroc_standard_error(auc, int(y.sum()), int((~y).sum()))),
        "sensitivity": round4(sens),
        "specificity": round4(spec),
        "volume_mae_ml": round4(float(np.mean(np.abs(vol_pred - vol_true))))
        if y.any()
        else math.nan,
        "volume_correlation": round4(pearson(vol_true, vol_pred)),
        "key_slice_hit_rate": round4(float(rows[f"key_slice_hit{suffix}"][y].mean()))
        if y.any()
        else math.nan,
        "auroc_by_age": by_age,
    }


# --------------------------------------------------------------------------
# Evaluation of a trained model directory
# --------------------------------------------------------------------------

CASE_COLUMNS: tuple[str, ...] = (
    "index",
    "label",
    "age",
    "sex",
    "kind",
    "isodense",
    "thickness",
    "n_slices",
    "true_volume_ml",
)
PER_SERIES_COLUMNS: tuple[str, ...] = (
    *CASE_COLUMNS,
    "probability",
    "volume_ml",
    "key_slice_hit",
    "probability_ablation",
    "volume_ml_ablation",
    "key_slice_hit_ablation",
)


def run_series(
    models: dict[str, object],
    seed: int,
    stream: int,
    n_series: int,
    *,
    workers: int | None = None,
    prevalence: float = 0.5,
) -> dict[str, list]:
    """Per-series results of each model in ``models`` (``""``: with metadata,
    ``"_ablation"``: image only) on series 0..n_series-1."""
    per: dict[str, list] = {k: [] for k in PER_SERIES_COLUMNS}
    for case in iter_series(seed, stream, n_series, prevalence=prevalence, workers=workers):
        for key in CASE_COLUMNS:
            per[key].append(case[key])
        for suffix, model in models.items():
            meta = None if suffix == "_ablation" else case["metadata"]
            probs, heats = predict_slices(model, case["image"], meta)  # type: ignore[arg-type]
            agg = aggregate_series(
                probs,
                heats,
                float(case["spacing"]),  # type: ignore[arg-type]
                case["slice_area_mm2"],
            )  # type: ignore[arg-type]
            per[f"probability{suffix}"].append(agg["probability"])
            per[f"volume_ml{suffix}"].append(agg["volume_ml"])
            per[f"key_slice_hit{suffix}"].append(agg["key_slice_hit"])
    return per


def load_models(model_dir: Path) -> dict[str, object]:
    """``model.keras`` (key ``""``) and ``ablation_image_only.keras`` (``"_ablation"``)."""
    import keras  # deferred: rendering workers must not load TensorFlow

    return {
        "": keras.models.load_model(model_dir / "model.keras", compile=False),
        "_ablation": keras.models.load_model(
            model_dir / "ablation_image_only.keras", compile=False
        ),
    }


def evaluate(
    model_dir: Path,
    *,
    n_series: int,
    seed: int,
    workers: int | None = None,
    predictions_csv: Path | None = None,
    threshold: float | None = None,
    ablation_threshold: float | None = None,
) -> dict[str, object]:
    """Evaluate ``model.keras`` and ``ablation_image_only.keras`` on fresh held-out series.

    Parameters
    ----------
    model_dir
        Folder with ``model.json`` (for ``series_threshold``), ``model.keras``
        and ``ablation_image_only.keras``.
    n_series
        Held-out series 0..n_series-1 of the seed's held-out stream; even
        indices have haemorrhage, odd ones not (prevalence 0.5).
    seed
        Held-out seed; must differ from the training seed.
    workers
        Rendering processes (default: CPU count).
    predictions_csv
        If given, per-series results are written there.
    threshold
        Series threshold for both models (as the plugin would apply the
        card's); default the card's ``series_threshold``.
    ablation_threshold
        The ablation's own series threshold (chosen on its validation
        results), for a second, fairer sensitivity/specificity; default the
        card's ``metrics.details.ablation_series_threshold``.

    Returns
    -------
    dict
        ``seed``, ``n_series``, ``prevalence``, ``threshold``, ``model`` and
        ``ablation`` (each at ``threshold``: auroc, auroc_se, sensitivity,
        specificity, volume_mae_ml, volume_correlation, key_slice_hit_rate,
        auroc_by_age), ``metadata_benefit`` (paired AUROC difference with a
        bootstrap interval), ``ablation_own_threshold`` (threshold,
        sensitivity, specificity), ``per_series`` (columns of :data:`PER_SERIES_COLUMNS`)
        and ``duration_s``.
    """
    model_dir = Path(model_dir)
    start = time.monotonic()
    if threshold is None or ablation_threshold is None:
        card = json.loads((model_dir / "model.json").read_text())
        if threshold is None:
            threshold = float(card["series_threshold"])
        if ablation_threshold is None:
            details = card.get("metrics", {}).get("details", {})
            ablation_threshold = float(details.get("ablation_series_threshold", threshold))
    models = load_models(model_dir)
    per = run_series(models, seed, STREAM_HELD_OUT, n_series, workers=workers)
    rows = {k: np.asarray(v) for k, v in per.items()}
    for k in (
        "label",
        "age",
        "true_volume_ml",
        "probability",
        "probability_ablation",
        "volume_ml",
        "volume_ml_ablation",
        "key_slice_hit",
        "key_slice_hit_ablation",
    ):
        rows[k] = rows[k].astype(np.float64)
    if predictions_csv is not None:
        write_predictions(predictions_csv, per)
    return {
        "seed": seed,
        "n_series": n_series,
        "prevalence": float(rows["label"].mean()),
        "threshold": threshold,
        "model": series_metrics(rows, "", threshold),
        "ablation": series_metrics(rows, "_ablation", threshold),
        "metadata_benefit": paired_auroc_difference(
            rows["label"], rows["probability"], rows["probability_ablation"]
        ),
        "ablation_own_threshold": {
            "threshold": ablation_threshold,
            **dict(
                zip(
                    ("sensitivity", "specificity"),
                    map(
                        round4,
                        sensitivity_specificity(
                            rows["label"].astype(bool),
                            rows["probability_ablation"],
                            ablation_threshold,
                        ),
                    ),
                    strict=True,
                )
            ),
        },
        "per_series": per,
        "duration_s": round(time.monotonic() - start, 1),
    }


def write_predictions(path: Path, per: dict[str, list]) -> None:
    """Per-series results as CSV (one row per series, in index order)."""
    keys = list(per)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for row in zip(*(per[k] for k in keys), strict=True):
            writer.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/head-ct-haemorrhage"))
    parser.add_argument("--n-series", type=int, default=96)
    parser.add_argument("--seed", type=int, default=9103)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    result = evaluate(args.model, n_series=args.n_series, seed=args.seed, predictions_csv=args.csv)
    result.pop("per_series")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
