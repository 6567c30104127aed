"""Series-level analysis of volumes (CT): slice order, geometry checks, aggregation.

A series is analysed slice by slice, in order along the slice normal, so
that memory stays bounded whatever its length: only per-slice numbers and
the best slice so far are kept. The volume of a finding is the sum over
slices of its area times the slab each slice stands for (half the distance
to each neighbour), which stays right when slices are missing or unevenly
spaced. :func:`slice_area_mm2` and :func:`series_finding` are the engine's
aggregation (``engine/series_job.py``), pure functions that evaluation code
shares.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .backend import RawOutput
from .card import ModelCard
from .errors import BadInput, SkipInput
from .postprocess import Finding, to_finding
from .preprocess import Geometry


@dataclass(frozen=True)
class SliceRef:
    """What Orthanc's index tells about one slice, before downloading it."""

    instance: str
    sop_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    file_size: int = 0  # bytes, from the same listing


@dataclass(frozen=True)
class OrderedSeries:
    slices: tuple[SliceRef, ...]
    slab_mm: tuple[float, ...]  # thickness each slice stands for, for volumes
    spacing_mm: float  # median distance between neighbours
    notes: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """Identifies this set of slices: a late image gives a new fingerprint."""
        digest = hashlib.sha256()
        for uid in sorted(s.sop_instance_uid for s in self.slices):
            digest.update(uid.encode() + b"\0")
        return digest.hexdigest()[:16]


def parse_vector(value: object, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    parts = str(value).split("\\") if isinstance(value, str) else list(value)  # type: ignore
    try:
        floats = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        return None
    return floats if len(floats) == n and all(np.isfinite(floats)) else None


def order_slices(refs: list[SliceRef], min_slices: int = 3) -> OrderedSeries:
    """Sort by position along the normal; leave out what does not belong; report gaps."""
    notes: list[str] = []
    usable = [r for r in refs if r.position is not None and r.orientation is not None]
    if len(usable) < len(refs):
        notes.append(f"{len(refs) - len(usable)} instance(s) without ImagePositionPatient/"
                     "ImageOrientationPatient left out")
    if not usable:
        # e.g. enhanced multi-frame images, whose geometry is per frame: not supported
        raise SkipInput("no slice has ImagePositionPatient and ImageOrientationPatient")
    groups = Counter(tuple(round(v, 3) for v in r.orientation) for r in usable)  # type: ignore
    orientation, count = groups.most_common(1)[0]
    if len(groups) > 1:
        notes.append(f"{len(usable) - count} slice(s) with another orientation left out "
                     f"({len(groups)} orientations in the series)")
    usable = [r for r in usable if tuple(round(v, 3) for v in r.orientation) == orientation]
    if len(usable) < min_slices:
        raise SkipInput(f"only {len(usable)} parallel slice(s); a volume needs {min_slices}")
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise BadInput(f"ImageOrientationPatient {orientation} is not two unit vectors")
    keyed = sorted(usable, key=lambda r: float(np.dot(r.position, normal)))  # type: ignore
    distances = [float(np.dot(r.position, normal)) for r in keyed]  # type: ignore
    ordered, kept = [keyed[0]], [distances[0]]
    for ref, d in zip(keyed[1:], distances[1:], strict=True):
        if abs(d - kept[-1]) < 1e-3:
            continue  # same position twice (a resent or duplicated slice)
        ordered.append(ref)
        kept.append(d)
    if len(ordered) < len(keyed):
        notes.append(f"{len(keyed) - len(ordered)} slice(s) at a duplicate position left out")
    if len(ordered) < min_slices:
        raise SkipInput(f"only {len(ordered)} distinct slice position(s)")
    gaps = np.diff(kept)
    spacing = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if gap > 1.5 * spacing:
            notes.append(f"gap of {gap:.1f} mm after slice {i + 1} of {len(ordered)} "
                         f"(spacing {spacing:.2f} mm): missing slices?")
    slab = []
    for i in range(len(kept)):
        before = gaps[i - 1] if i > 0 else spacing
        after = gaps[i] if i < len(gaps) else spacing
        slab.append(float(min(before, 2 * spacing) + min(after, 2 * spacing)) / 2)
    return OrderedSeries(tuple(ordered), tuple(slab), spacing, tuple(notes))


@dataclass
class SeriesAccumulator:
    """Per-slice results folded into series results, keeping only the best slice."""

    n: int = 0
    volume_mm3: float = 0.0
    best_probability: float = -1.0
    best_index: int = -1
    best: object = None  # whatever the caller needs to report the key slice

    def add(self, index: int, probability: float, area_mm2: float, slab_mm: float,
            keep: object) -> None:
        self.n += 1
        self.volume_mm3 += area_mm2 * slab_mm
        if probability > self.best_probability:
            self.best_probability, self.best_index, self.best = probability, index, keep

    @property
    def volume_ml(self) -> float:
        return self.volume_mm3 / 1000.0


def lesion_area_mm2(heatmap: np.ndarray, threshold: float, cell_area_mm2: float) -> float:
    """Area of heatmap cells at or above the threshold, in mm² of the patient."""
    return float(np.count_nonzero(heatmap >= threshold)) * cell_area_mm2


def slice_area_mm2(card: ModelCard, raw: RawOutput) -> float:
    """Lesion area of one slice's output: its heatmap at the card's volume level.

    Cells at or above ``volume_heatmap_threshold`` (0.5 when unset), each
    ``(heatmap_stride * pixel_spacing_mm)²`` mm²; 0 without a heatmap.
    """
    if raw.heatmap is None:
        return 0.0
    level = card.volume_heatmap_threshold or 0.5
    cell_mm2 = (card.heatmap_stride * card.image.pixel_spacing_mm) ** 2
    return lesion_area_mm2(raw.heatmap, level, cell_mm2)


def series_finding(card: ModelCard, accumulator: SeriesAccumulator, key_raw: RawOutput,
                   geometry: Geometry) -> Finding:
    """The series' finding from its accumulated slices and its key (best) slice.

    The probability is the best slice's (``accumulator.best_probability``),
    compared with ``series_threshold`` (the card's threshold when unset);
    where positive, the region is the key slice's (``key_raw`` located with
    its ``geometry`` by :func:`inference.postprocess.to_finding`) and the
    volume the accumulated one, in ml (3 decimals).
    """
    threshold = card.series_threshold or card.threshold
    region = to_finding(card, key_raw, geometry).region
    positive = accumulator.best_probability >= threshold
    return Finding(
        probability=float(np.clip(accumulator.best_probability, 0.0, 1.0)),
        threshold=threshold,
        region=region if positive else None,
        volume_ml=round(accumulator.volume_ml, 3) if positive else None,
    )
