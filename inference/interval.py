"""Interval change: what one model's finding became since a prior study.

The comparison is per model and per study: the prior's finding for a model
is the most suspicious of that model's results on the prior study (any
positive image makes the finding present in the prior). The rule is the
same in the engine, in the model cards' measured figures and in the SR:

- absent before, present now: ``new``
- present before, absent now: ``resolved``
- absent in both: ``unchanged``
- present in both: ``increased`` / ``decreased`` when a volume is measured
  and changed by more than :data:`VOLUME_CHANGE_ML` and
  :data:`VOLUME_CHANGE_FRACTION` of the prior's volume, else ``unchanged``.

Only ``new`` is a "new finding" alert; without a prior every positive
finding is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .postprocess import Finding

VOLUME_CHANGE_ML = 1.0  # below this a volume difference is measurement noise
VOLUME_CHANGE_FRACTION = 0.2  # ... and below this share of the prior's volume


class Change(StrEnum):
    NEW = "new"
    UNCHANGED = "unchanged"
    RESOLVED = "resolved"
    INCREASED = "increased"
    DECREASED = "decreased"


@dataclass(frozen=True)
class PriorFinding:
    """One model's finding on a prior study, as recorded by its job."""

    probability: float
    threshold: float
    volume_ml: float | None = None

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class PriorReference:
    """Our SR of the prior (to reference it as evidence)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class Comparison:
    """The interval change of one finding, with what it was compared with."""

    change: Change
    prior: PriorFinding
    prior_study_uid: str
    prior_study_date: str  # DICOM DA (YYYYMMDD), "" when the prior has none
    probability_difference: float  # current - prior
    volume_difference_ml: float | None  # current - prior, when both measured
    prior_sr: PriorReference | None = None

    def brief(self) -> str:
        """The change in a few words: "new since 2024-03-01"."""
        date = self.prior_study_date
        when = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else "the prior study"
        return f"{self.change.value} since {when}"

    def describe(self) -> str:
        """One line a radiologist reads: "new since 2024-03-01 (probability 0.12 -> 0.81)"."""
        what, since = self.brief().split(" since ", 1)
        if self.change == Change.UNCHANGED:
            what += " (present in both)" if self.prior.positive else " (absent in both)"
        text = (f"{what} since {since} (probability "
                f"{self.prior.probability:.2f} -> "
                f"{self.prior.probability + self.probability_difference:.2f}")
        if self.volume_difference_ml is not None:
            text += f"; volume {self.volume_difference_ml:+.1f} mL"
        return text + ")"


def change(current: Finding, prior: PriorFinding) -> Change:
    """The rule of the module docstring."""
    if current.positive and not prior.positive:
        return Change.NEW
    if prior.positive and not current.positive:
        return Change.RESOLVED
    if not current.positive:
        return Change.UNCHANGED
    if current.volume_ml is not None and prior.volume_ml is not None:
        diff = current.volume_ml - prior.volume_ml
        if abs(diff) >= max(VOLUME_CHANGE_ML, VOLUME_CHANGE_FRACTION * prior.volume_ml):
            return Change.INCREASED if diff > 0 else Change.DECREASED
    return Change.UNCHANGED


def compare(current: Finding, prior: PriorFinding, *, prior_study_uid: str,
            prior_study_date: str, prior_sr: PriorReference | None = None) -> Comparison:
    volume_diff = None
    if current.volume_ml is not None and prior.volume_ml is not None:
        volume_diff = round(current.volume_ml - prior.volume_ml, 3)
    return Comparison(
        change=change(current, prior),
        prior=prior,
        prior_study_uid=prior_study_uid,
        prior_study_date=prior_study_date,
        probability_difference=round(current.probability - prior.probability, 6),
        volume_difference_ml=volume_diff,
        prior_sr=prior_sr,
    )


def is_new_finding_alert(current: Finding, comparison: Comparison | None) -> bool:
    """Whether the result alerts a reader to a new finding."""
    if not current.positive:
        return False
    return comparison is None or comparison.change == Change.NEW
