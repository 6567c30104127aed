"""Raw model outputs -> typed findings located on the source image."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .backend import RawOutput
from .card import ModelCard
from .preprocess import Geometry
from .words import finding_words


@dataclass(frozen=True)
class Region:
    """Axis-aligned box in source pixel continuous coordinates (PS3.3 C.18.6.1.1)."""

    row0: float
    col0: float
    row1: float
    col1: float

    def __post_init__(self) -> None:
        if not (self.row1 > self.row0 and self.col1 > self.col0):
            raise ValueError(f"empty region {self}")

    def polyline(self) -> list[tuple[float, float]]:
        """Closed POLYLINE as (column, row) pairs, the order SCOORD uses."""
        return [
            (self.col0, self.row0),
            (self.col1, self.row0),
            (self.col1, self.row1),
            (self.col0, self.row1),
            (self.col0, self.row0),
        ]


@dataclass(frozen=True)
class Finding:
    """What one model concluded about one image."""

    probability: float
    threshold: float
    region: Region | None  # where, when the model located it and it is positive
    volume_ml: float | None = None  # series-level findings: estimated volume

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} outside [0, 1]")

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


def heatmap_box(heatmap: np.ndarray, stride: int, fraction: float = 0.5) -> tuple[int, ...]:
    """Cells connected to the peak and at least ``fraction`` of it, as a box.

    Returns (row0, col0, row1, col1) in model pixels, end-exclusive.
    """
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    level = float(heatmap[peak]) * fraction
    seen = np.zeros(heatmap.shape, bool)
    todo = deque([peak])
    seen[peak] = True
    r0, c0, r1, c1 = peak[0], peak[1], peak[0], peak[1]
    while todo:
        r, c = todo.popleft()
        r0, c0, r1, c1 = min(r0, r), min(c0, c), max(r1, r), max(c1, c)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if (
                0 <= rr < heatmap.shape[0]
                and 0 <= cc < heatmap.shape[1]
                and not seen[rr, cc]
                and heatmap[rr, cc] >= level
            ):
                seen[rr, cc] = True
                todo.append((rr, cc))
    return r0 * stride, c0 * stride, (r1 + 1) * stride, (c1 + 1) * stride


def to_finding(card: ModelCard, raw: RawOutput, geometry: Geometry) -> Finding:
    prob = float(np.clip(raw.probability, 0.0, 1.0))
    region = None
    if raw.heatmap is not None and prob >= card.threshold:
        r0, c0, r1, c1 = heatmap_box(raw.heatmap, card.heatmap_stride)
        sr0, sc0 = geometry.to_source(r0, c0)
        sr1, sc1 = geometry.to_source(r1, c1)
        if sr1 > sr0 and sc1 > sc0:
            region = Region(sr0, sc0, sr1, sc1)
    return Finding(prob, card.threshold, region)



def describe(finding_name: str, finding: Finding, change: str | None = None) -> str:
    """The finding in words (inference.words): "Fracture present, probability 0.63"."""
    volume = finding.volume_ml if finding.positive else None
    return finding_words(finding_name, finding.positive, finding.probability, volume, change)
