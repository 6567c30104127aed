"""The interval-change rule: new / resolved / unchanged / increased / decreased."""

import pytest

from inference.interval import (
    VOLUME_CHANGE_FRACTION,
    VOLUME_CHANGE_ML,
    Change,
    PriorFinding,
    PriorReference,
    change,
    compare,
    is_new_finding_alert,
)
from inference.postprocess import Finding

POS, NEG = 0.9, 0.1  # probabilities either side of the 0.5 threshold


def _now(probability: float, volume: float | None = None) -> Finding:
    return Finding(probability, 0.5, None, volume_ml=volume)


def _prior(probability: float, volume: float | None = None) -> PriorFinding:
    return PriorFinding(probability, 0.5, volume_ml=volume)


@pytest.mark.parametrize(("current", "prior", "expected"), [
    (_now(POS), _prior(NEG), Change.NEW),
    (_now(NEG), _prior(POS), Change.RESOLVED),
    (_now(NEG), _prior(NEG), Change.UNCHANGED),  # absent in both
    (_now(POS), _prior(POS), Change.UNCHANGED),  # present in both, no volume
    (_now(0.5), _prior(0.49), Change.NEW),  # the threshold itself is positive
    (_now(0.49), _prior(0.5), Change.RESOLVED),
    # volumes change nothing about new / resolved / absent
    (_now(POS, 30.0), _prior(NEG, 0.0), Change.NEW),
    (_now(NEG, 0.0), _prior(POS, 30.0), Change.RESOLVED),
    (_now(NEG, 5.0), _prior(NEG, 50.0), Change.UNCHANGED),
    # present in both: volume measured in one only
    (_now(POS, 30.0), _prior(POS), Change.UNCHANGED),
    (_now(POS), _prior(POS, 30.0), Change.UNCHANGED),
    # both thresholds must be passed: 1 mL and 20 % of the prior's volume
    (_now(POS, 20.0), _prior(POS, 10.0), Change.INCREASED),
    (_now(POS, 5.0), _prior(POS, 10.0), Change.DECREASED),
    (_now(POS, 11.9), _prior(POS, 10.0), Change.UNCHANGED),  # 1.9 mL < 20 % of 10
    (_now(POS, 12.0), _prior(POS, 10.0), Change.INCREASED),  # exactly 20 %
    (_now(POS, 8.0), _prior(POS, 10.0), Change.DECREASED),
    (_now(POS, 1.9), _prior(POS, 1.0), Change.UNCHANGED),  # 90 % but < 1 mL
    (_now(POS, 2.0), _prior(POS, 1.0), Change.INCREASED),  # exactly 1 mL
    (_now(POS, 0.0), _prior(POS, 0.5), Change.UNCHANGED),  # all of it, but < 1 mL
    (_now(POS, 100.0), _prior(POS, 90.0), Change.UNCHANGED),  # 10 mL < 20 % of 90
    (_now(POS, 1.0), _prior(POS, 0.0), Change.INCREASED),  # from nothing: 1 mL
], ids=["new", "resolved", "absent-both", "present-both", "threshold-new", "threshold-resolved",
        "new-with-volume", "resolved-with-volume", "absent-both-volume", "no-prior-volume",
        "no-current-volume", "increased", "decreased", "below-fraction", "at-fraction",
        "decreased-at-fraction", "below-ml", "at-ml", "small-all-gone", "large-below-fraction",
        "from-zero"])
def test_change_rule(current, prior, expected):
    assert change(current, prior) == expected


def test_thresholds_are_the_documented_ones():
    assert (VOLUME_CHANGE_ML, VOLUME_CHANGE_FRACTION) == (1.0, 0.2)


def test_compare_records_what_was_compared():
    reference = PriorReference("1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4.3", "1.2.3.4.2",
                               "1.2.3.4")
    current = _now(0.81, 14.25)
    comparison = compare(current, _prior(0.62, 10.0), prior_study_uid="1.2.3.4",
                         prior_study_date="20240301", prior_sr=reference)
    assert comparison.change == Change.INCREASED
    assert comparison.prior == _prior(0.62, 10.0)
    assert (comparison.prior_study_uid, comparison.prior_study_date) == ("1.2.3.4", "20240301")
    assert comparison.probability_difference == pytest.approx(0.19)
    assert comparison.volume_difference_ml == pytest.approx(4.25)
    assert comparison.prior_sr == reference
    assert comparison.describe() == \
        "increased since 2024-03-01 (probability 0.62 -> 0.81; volume +4.2 mL)"


def test_compare_without_volumes_or_date():
    comparison = compare(_now(0.12), _prior(0.9), prior_study_uid="1.2.3", prior_study_date="")
    assert comparison.change == Change.RESOLVED
    assert comparison.volume_difference_ml is None
    assert comparison.prior_sr is None
    assert comparison.probability_difference == pytest.approx(-0.78)
    assert comparison.describe() == "resolved since the prior study (probability 0.90 -> 0.12)"
    absent = compare(_now(0.1), _prior(0.2), prior_study_uid="1.2.3", prior_study_date="20240301")
    assert absent.describe().startswith("unchanged (absent in both) since 2024-03-01")
    one_volume = compare(_now(0.9, 3.0), _prior(0.9), prior_study_uid="1.2.3",
                         prior_study_date="20240301")
    assert one_volume.volume_difference_ml is None


def test_new_finding_alert():
    positive, negative = _now(POS), _now(NEG)
    assert is_new_finding_alert(positive, None)  # without a prior every positive is new
    assert not is_new_finding_alert(negative, None)
    for prior, alert in ((_prior(NEG), True), (_prior(POS), False)):
        comparison = compare(positive, prior, prior_study_uid="1.2.3", prior_study_date="")
        assert is_new_finding_alert(positive, comparison) is alert
    resolved = compare(negative, _prior(POS), prior_study_uid="1.2.3", prior_study_date="")
    assert not is_new_finding_alert(negative, resolved)
