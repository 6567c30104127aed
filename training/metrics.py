"""Classification and agreement metrics shared by the model evaluations.

Plain NumPy, so the numbers on a model card can be recomputed without
TensorFlow from the per-case CSV written next to the weights.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def auroc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) statistic.

    Tied scores get their average rank, which counts a positive-negative tie
    as half a correct ordering. NaN when one class is absent.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average rank (1-based) over each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def sensitivity_specificity(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Sensitivity and specificity of ``score >= threshold``."""
    y = np.asarray(labels, dtype=bool)
    positive = np.asarray(scores) >= threshold
    sens = float((positive & y).sum() / max(int(y.sum()), 1))
    spec = float((~positive & ~y).sum() / max(int((~y).sum()), 1))
    return sens, spec


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (= balanced accuracy).

    Candidates are midpoints between consecutive distinct scores, so the
    chosen value does not sit exactly on a validation case's score.
    """
    s = np.unique(np.asarray(scores, dtype=np.float64))
    if s.size < 2:
        return 0.5
    best, best_j = 0.5, -1.0
    for t in 0.5 * (s[1:] + s[:-1]):
        sens, spec = sensitivity_specificity(labels, scores, float(t))
        if sens + spec - 1.0 > best_j:
            best, best_j = float(t), sens + spec - 1.0
    return best


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation (NaN with fewer than 3 pairs or no spread)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def round4(x: float) -> float:
    """Four decimals for a model card; NaN and infinities pass through."""
    return float(round(x, 4)) if math.isfinite(x) else x


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """Read a per-case predictions CSV back as arrays keyed by column."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        try:
            out[key] = np.asarray(values, dtype=np.float64)
        except ValueError:
            out[key] = np.asarray(values)
    return out
