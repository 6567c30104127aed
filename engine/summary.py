"""An analysis' result in the words a radiologist reads at a glance.

"Fracture present, probability 0.63", "Hemorrhage present, probability 0.91,
volume 12.4 mL; new since 2024-03-01 (probability 0.10 -> 0.91)" (inference.words). Built from
the job result's own fields (``finding``, ``positive``, ``probability``,
``volume_ml``, ``comparison``), so a result written before the summary
existed reads the same. Standard library only: Orthanc's process imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.words import finding_words


def result_summary(result: Mapping[str, Any] | None) -> str | None:
    """The finding of an analysis' result in words; None for a result without one
    (a skipped input, a revise job's answer)."""
    if not result or result.get("probability") is None or not result.get("finding"):
        return None
    try:
        probability = float(result["probability"])
    except (TypeError, ValueError):
        return None
    positive = result.get("positive")
    if positive is None and result.get("threshold") is not None:
        positive = probability >= float(result["threshold"])
    volume = result.get("volume_ml")
    comparison = result.get("comparison") or {}
    compared = comparison.get("state") == "compared" and comparison.get("text")
    return finding_words(str(result["finding"]), bool(positive), probability,
                         volume if isinstance(volume, int | float) else None,
                         comparison["text"] if compared else None)
