"""Synthetic data sets through the runtime preprocessing, metrics, and model evaluation.

Every example goes the way a real image goes at run time: the phantom is
rendered (:mod:`training.synthetic.radiograph`), wrapped in a DX DICOM
dataset (:mod:`training.synthetic.dx`) and turned into model inputs by
:func:`inference.preprocess.prepare_radiograph`. Training and deployment
therefore see the same pixels and the same metadata features.

Each example is a pure function of ``(seed, stream, index)``, so a data set of
``n`` cases is the first ``n`` cases of any larger one drawn with the same seed
and stream, whatever the number of worker processes.

TensorFlow is imported only inside :func:`evaluate`, so worker processes that
render data stay light.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.preprocess import prepare_radiograph
from training.metrics import (
    auroc,
    round4,
    sensitivity_specificity,
)
from training.synthetic.dx import dx_dataset
from training.synthetic.radiograph import EVAL_SPACINGS, TRAIN_SPACINGS, render, sample_case

FEATURE_NAMES: tuple[str, ...] = ("age_years", "age_known", "sex_male", "sex_female")
CANVAS: tuple[int, int] = (256, 256)
TARGET_MM = 1.0
STRIDE = 4  # model pixels per heatmap cell
HEATMAP_SHAPE = (CANVAS[0] // STRIDE, CANVAS[1] // STRIDE)
HIT_MARGIN_MM = 10.0  # a heatmap peak this close to the fracture box counts as a hit
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<18", 0.0, 18.0),
    ("18-64", 18.0, 65.0),
    (">=65", 65.0, 200.0),
)

# Appearance classes of the auxiliary training target: what a line looks
# like, whatever it means. Normal anatomy and fractures share classes on
# purpose; which one it is depends on age (see training/synthetic/radiograph.py).
APPEARANCE_CLASSES: dict[str, tuple[str, ...]] = {
    "transverse_lucent_at_physis": ("physis", "physeal_fracture"),
    "sclerotic_line": ("arrest_line", "sclerotic_fracture", "physeal_scar"),
    "cortical_crack": ("nutrient_canal", "incomplete_fracture"),
    "fracture_line": ("fracture_line",),
}

# Independent random streams per purpose, so that sets never share a case.
STREAM_TRAIN, STREAM_VALIDATION, STREAM_HELD_OUT = 1, 2, 3


@dataclass(frozen=True)
class DataSpec:
    """How to draw one data set.

    Attributes
    ----------
    seed, stream
        Random seed and stream (train, validation, held-out).
    spacing_choices
        Pixel spacings (mm) rendered.
    prevalence
        Fracture prevalence.
    p_mask_age, p_mask_sex
        Probability that PatientAge or PatientSex is left out of the DICOM
        header (training: the model must cope with missing metadata).
    """

    seed: int
    stream: int
    spacing_choices: tuple[float, ...]
    prevalence: float = 0.5
    p_mask_age: float = 0.0
    p_mask_sex: float = 0.0


@dataclass
class DataSet:
    """Model inputs, targets and per-case facts, stacked along the first axis.

    Attributes
    ----------
    image
        (n, 256, 256, 1) float16 model input at 1 mm (float16 halves memory;
        values in [0, 1] lose nothing a model could use).
    metadata
        (n, 4) float32 features in :data:`FEATURE_NAMES` order.
    label
        (n,) float32, 1 = fracture.
    heatmap
        (n, 64, 64, 1) float16 localisation target.
    appearance
        (n, 64, 64, 4) float16 auxiliary target: where each of the
        :data:`APPEARANCE_CLASSES` is (training only).
    age, spacing
        (n,) float32 true age (years) and pixel spacing (mm), for subgroups
        and for the localisation margin.
    sex
        (n,) str true sex.
    truth_box
        (n, 4) float32 fracture box in source pixels (NaN without fracture).
    geometry
        (n, 6) float64 :class:`inference.preprocess.Geometry` fields.
    kind
        (n,) str fracture kind or ``"none"``.
    """

    image: np.ndarray
    metadata: np.ndarray
    label: np.ndarray
    heatmap: np.ndarray
    appearance: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    spacing: np.ndarray
    truth_box: np.ndarray
    geometry: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def subset(self, n: int) -> DataSet:
        """The first ``n`` cases."""
        return DataSet(**{k: v[:n] for k, v in self.__dict__.items()})


def heatmap_target(box_model: tuple[float, float, float, float] | None) -> np.ndarray:
    """Gaussian blob over the fracture box on the stride-4 grid (zeros without fracture).

    The blob's spread follows the box (at least one cell) so that the peak
    lands on the fracture whatever its obliquity.
    """
    target = np.zeros(HEATMAP_SHAPE, np.float32)
    if box_model is None:
        return target
    r0, c0, r1, c1 = box_model
    cy, cx = 0.5 * (r0 + r1), 0.5 * (c0 + c1)
    sy = max(0.5 * (r1 - r0), STRIDE) / STRIDE
    sx = max(0.5 * (c1 - c0), STRIDE) / STRIDE
    ys = (np.arange(HEATMAP_SHAPE[0], dtype=np.float32) * STRIDE + STRIDE / 2 - cy) / STRIDE
    xs = (np.arange(HEATMAP_SHAPE[1], dtype=np.float32) * STRIDE + STRIDE / 2 - cx) / STRIDE
    target = np.exp(-0.5 * ((ys[:, None] / sy) ** 2 + (xs[None, :] / sx) ** 2))
    return target.astype(np.float32)


def _to_model_box(geometry: object, box: tuple[float, float, float, float]):  # noqa: ANN202
    top = geometry.to_model(box[0], box[1])  # type: ignore[attr-defined]
    bottom = geometry.to_model(box[2], box[3])  # type: ignore[attr-defined]
    return (top[0], top[1], bottom[0], bottom[1])


def appearance_target(
    structures: list[tuple[str, tuple[float, float, float, float]]], geometry: object
) -> np.ndarray:
    """One blob map per appearance class (maximum over that class's structures)."""
    target = np.zeros((*HEATMAP_SHAPE, len(APPEARANCE_CLASSES)), np.float32)
    for channel, kinds in enumerate(APPEARANCE_CLASSES.values()):
        for kind, box in structures:
            if kind in kinds:
                r0, c0, r1, c1 = _to_model_box(geometry, box)
                if r1 < 0 or c1 < 0 or r0 > CANVAS[0] or c0 > CANVAS[1]:
                    continue  # outside the model's view
                blob = heatmap_target((r0, c0, r1, c1))
                np.maximum(target[..., channel], blob, out=target[..., channel])
    return target


def make_example(spec: DataSpec, index: int) -> dict[str, object]:
    """Render case ``index`` of ``spec`` and run it through the runtime preprocessing."""
    rng = np.random.default_rng([spec.seed, spec.stream, index])
    case = sample_case(rng, prevalence=spec.prevalence, spacing_choices=spec.spacing_choices)
    rendered = render(case, rng)
    # Masking has its own stream: it must not change the case itself.
    mask_rng = np.random.default_rng([spec.seed, spec.stream, index, 1])
    hide_age = mask_rng.random() < spec.p_mask_age
    hide_sex = mask_rng.random() < spec.p_mask_sex
    ds = dx_dataset(
        rendered,
        patient_id=f"SYN{index:06d}",
        patient_name="SYNTHETIC^PHANTOM",
        patient_sex=None if hide_sex else case.sex,
        patient_age_years=None if hide_age else case.age_years,
        study_uid=f"2.25.{spec.seed}.{spec.stream}.{index}.1",
        series_uid=f"2.25.{spec.seed}.{spec.stream}.{index}.2",
        sop_uid=f"2.25.{spec.seed}.{spec.stream}.{index}.3",
        body_part=case.body_part,
    )
    model_input = prepare_radiograph(
        ds, canvas=CANVAS, target_mm=TARGET_MM, feature_names=FEATURE_NAMES
    )
    geometry = model_input.image.geometry
    box = rendered.truth_box
    box_model = None if box is None else _to_model_box(geometry, box)
    structures = rendered.details.get("structures", [])
    return {
        "image": model_input.image.pixels.astype(np.float16),
        "metadata": model_input.features.astype(np.float32),
        "label": float(case.fracture),
        "heatmap": heatmap_target(box_model).astype(np.float16),
        "appearance": appearance_target(structures, geometry).astype(np.float16),
        "age": case.age_years,
        "sex": case.sex,
        "spacing": rendered.spacing_mm[0],
        "truth_box": box if box is not None else (math.nan,) * 4,
        "geometry": (
            geometry.scale_row,
            geometry.scale_col,
            geometry.offset_row,
            geometry.offset_col,
            geometry.source_rows,
            geometry.source_cols,
        ),
        "kind": case.fracture_kind or "none",
    }


def _make_chunk(args: tuple[DataSpec, int, int]) -> list[dict[str, object]]:
    spec, start, stop = args
    return [make_example(spec, i) for i in range(start, stop)]


def synthesize(spec: DataSpec, n: int, *, workers: int | None = None) -> DataSet:
    """Draw ``n`` examples of ``spec`` (cases 0..n-1), in parallel processes.

    Parameters
    ----------
    spec
        What to draw.
    n
        Number of cases.
    workers
        Processes to use; default: the CPU count. 1 renders in this process.

    Returns
    -------
    DataSet
    """
    workers = workers or os.cpu_count() or 1
    chunk = 25
    jobs = [(spec, s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if workers <= 1 or n <= chunk:
        parts = [_make_chunk(job) for job in jobs]
    else:
        # "spawn": the parent may hold TensorFlow's threads, which fork does
        # not copy safely.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parts = list(pool.map(_make_chunk, jobs))
    rows = [row for part in parts for row in part]
    return DataSet(
        image=np.stack([r["image"] for r in rows])[..., None],
        metadata=np.stack([r["metadata"] for r in rows]),
        label=np.asarray([r["label"] for r in rows], np.float32),
        heatmap=np.stack([r["heatmap"] for r in rows])[..., None],
        appearance=np.stack([r["appearance"] for r in rows]),
        age=np.asarray([r["age"] for r in rows], np.float32),
        sex=np.asarray([r["sex"] for r in rows]),
        spacing=np.asarray([r["spacing"] for r in rows], np.float32),
        truth_box=np.asarray([r["truth_box"] for r in rows], np.float32),
        geometry=np.asarray([r["geometry"] for r in rows], np.float64),
        kind=np.asarray([r["kind"] for r in rows]),
    )


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------



def paired_bootstrap_auroc_difference(
    labels: np.ndarray, first: np.ndarray, second: np.ndarray, *, n: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC(first) - AUROC(second) on the same cases, with a paired bootstrap 95 % interval.

    Cases are resampled with replacement (the same cases for both scores),
    so the interval accounts for the two models being compared on one set.

    Returns
    -------
    (difference, low, high)
    """
    y = np.asarray(labels, dtype=bool)
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, y.size, y.size)
        d = auroc(y[idx], a[idx]) - auroc(y[idx], b[idx])
        if math.isfinite(d):
            diffs.append(d)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return auroc(y, a) - auroc(y, b), float(low), float(high)



def heatmap_peaks_source(heatmaps: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """Peak cell of each heatmap, its centre mapped to source pixels (row, col)."""
    from inference.preprocess import Geometry

    flat = heatmaps.reshape(heatmaps.shape[0], -1)
    idx = np.argmax(flat, axis=1)
    rows, cols = np.divmod(idx, heatmaps.shape[2])
    out = np.empty((heatmaps.shape[0], 2), np.float64)
    for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
        g = Geometry(*geometry[k][:4], int(geometry[k][4]), int(geometry[k][5]))
        out[k] = g.to_source(r * STRIDE + STRIDE / 2, c * STRIDE + STRIDE / 2)
    return out


def localisation_hits(data: DataSet, heatmaps: np.ndarray) -> np.ndarray:
    """Per case: heatmap peak inside the fracture box grown by 10 mm (False without box)."""
    peaks = heatmap_peaks_source(heatmaps, data.geometry)
    margin = HIT_MARGIN_MM / data.spacing.astype(np.float64)
    box = data.truth_box.astype(np.float64)
    with np.errstate(invalid="ignore"):
        inside = (
            (peaks[:, 0] >= box[:, 0] - margin)
            & (peaks[:, 0] <= box[:, 2] + margin)
            & (peaks[:, 1] >= box[:, 1] - margin)
            & (peaks[:, 1] <= box[:, 3] + margin)
        )
    return inside & np.isfinite(box[:, 0])


def summarise(
    data: DataSet, probability: np.ndarray, heatmaps: np.ndarray, threshold: float
) -> tuple[dict[str, object], np.ndarray]:
    """Metrics of one model on one data set, and the per-case localisation hits."""
    y = data.label.astype(bool)
    p = np.asarray(probability, np.float64).reshape(-1)
    sens, spec = sensitivity_specificity(y, p, threshold)
    hits = localisation_hits(data, heatmaps)
    true_pos = y & (p >= threshold)
    by_age = {}
    for name, low, high in AGE_BANDS:
        sel = (data.age >= low) & (data.age < high)
        by_age[name] = round4(auroc(y[sel], p[sel]))
    metrics = {
        "auroc": round4(auroc(y, p)),
        "sensitivity": round4(sens),
        "specificity": round4(spec),
        "localisation_hit_rate": round4(float(hits[true_pos].mean()) if true_pos.any() else 0.0),
        "auroc_by_age": by_age,
    }
    return metrics, hits



# --------------------------------------------------------------------------
# Evaluation of a trained model directory
# --------------------------------------------------------------------------


def held_out_spec(seed: int, prevalence: float = 0.5) -> DataSpec:
    """The held-out set: realistic detector spacings, complete metadata."""
    return DataSpec(seed, STREAM_HELD_OUT, EVAL_SPACINGS, prevalence)


def training_spec(seed: int, stream: int, *, masked: bool) -> DataSpec:
    """Training (metadata masked ~10 % each) or validation (complete) set, coarse spacings."""
    p = 0.1 if masked else 0.0
    return DataSpec(seed, stream, TRAIN_SPACINGS, 0.5, p, p)


def predict(model: object, data: DataSet, *, with_metadata: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n,) and heatmaps (n, 64, 64) of a Keras model on ``data``."""
    inputs: dict[str, np.ndarray] = {"image": data.image.astype(np.float32)}
    if with_metadata:
        inputs["metadata"] = data.metadata
    out = model.predict(inputs, batch_size=64, verbose=0)  # type: ignore[attr-defined]
    return np.asarray(out["probability"]).reshape(-1), np.asarray(out["heatmap"])[..., 0]


def evaluate(
    model_dir: Path,
    *,
    n: int,
    seed: int,
    prevalence: float = 0.5,
    workers: int | None = None,
    predictions_csv: Path | None = None,
) -> dict[str, object]:
    """Evaluate ``model.keras`` and ``ablation_image_only.keras`` on a fresh held-out set.

    Parameters
    ----------
    model_dir
        Folder with ``model.json`` (for the threshold), ``model.keras`` and
        ``ablation_image_only.keras``.
    n
        Number of held-out cases (cases 0..n-1 of the seed's held-out stream).
    seed
        Held-out seed; must differ from the training seed.
    prevalence
        Fracture prevalence of the held-out set.
    workers
        Rendering processes (default: CPU count).
    predictions_csv
        If given, per-case results are written there.

    Returns
    -------
    dict
        ``seed``, ``n``, ``prevalence``, ``threshold``, ``model`` and
        ``ablation`` (each: auroc, sensitivity, specificity at the card
        threshold, localisation_hit_rate, auroc_by_age), and ``per_case``
        (probabilities of both models per case).
    """
    import keras  # deferred: rendering workers must not load TensorFlow

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "model.json").read_text())
    threshold = float(card["threshold"])
    data = synthesize(held_out_spec(seed, prevalence), n, workers=workers)
    model = keras.models.load_model(model_dir / "model.keras", compile=False)
    ablation = keras.models.load_model(model_dir / "ablation_image_only.keras", compile=False)
    p_model, h_model = predict(model, data, with_metadata=True)
    p_abl, h_abl = predict(ablation, data, with_metadata=False)
    m_model, hits_model = summarise(data, p_model, h_model, threshold)
    m_abl, hits_abl = summarise(data, p_abl, h_abl, threshold)
    per_case = {
        "label": data.label.astype(int).tolist(),
        "age": [round(float(a), 2) for a in data.age],
        "sex": data.sex.tolist(),
        "kind": data.kind.tolist(),
        "probability": [float(x) for x in p_model],
        "probability_ablation": [float(x) for x in p_abl],
        "hit": hits_model.astype(int).tolist(),
        "hit_ablation": hits_abl.astype(int).tolist(),
    }
    if predictions_csv is not None:
        write_predictions(predictions_csv, per_case)
    return {
        "seed": seed,
        "n": n,
        "prevalence": float(data.label.mean()),
        "threshold": threshold,
        "model": m_model,
        "ablation": m_abl,
        "per_case": per_case,
    }


def write_predictions(path: Path, per_case: dict[str, list]) -> None:
    """Per-case held-out results as CSV (one row per case, in case order)."""
    keys = list(per_case)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", *keys])
        for i, row in enumerate(zip(*(per_case[k] for k in keys), strict=True)):
            writer.writerow([i, *(f"{v:.6f}" if isinstance(v, float) else v for v in row)])


