"""Follow-up pairs and the prior-comparison counts (training/priors.py).

The pair generator must be deterministic, put the finding only where the
pair's kind says (by the ground truth it returns), and show the same
patient in both studies; the counting must follow inference/interval.py.
No model runs here, except that the card figures are re-counted from the
per-pair CSV written next to each card.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inference.backend import RawOutput
from inference.card import ModelCard
from inference.interval import PriorFinding
from inference.postprocess import Finding
from inference.preprocess import Geometry
from inference.volume import SliceRef
from training import priors
from training.metrics import read_predictions
from training.synthetic import followup
from training.synthetic.headct import lesion_mask_slice, lesion_z_range, true_volume_ml
from training.synthetic.radiograph import TRAIN_SPACINGS, sample_case

MODELS = Path(__file__).resolve().parents[2] / "models"
SEED = 12345  # not a follow-up, training or held-out seed: tests only
FRACTURE_STRUCTURES = {"physeal_fracture", "fracture_line", "incomplete_fracture",
                       "sclerotic_fracture"}


def _first(kind: str) -> int:
    return followup.KIND_CYCLE.index(kind)


def _normal_structures(rendered):  # noqa: ANN001, ANN202
    return [(k, b) for k, b in rendered.details["structures"] if k not in FRACTURE_STRUCTURES]


# --------------------------------------------------------------------------
# Radiograph pairs
# --------------------------------------------------------------------------


def test_kind_cycle_holds_the_mix() -> None:
    cycle = [followup.pair_kind(i) for i in range(10)]
    assert {k: cycle.count(k) for k in followup.KINDS} == {
        "new": 4, "chronic": 3, "negative": 2, "resolved": 1}
    assert [followup.pair_kind(i) for i in range(10, 20)] == cycle


def test_dx_pair_is_deterministic_for_a_seed() -> None:
    a, b = followup.dx_pair(SEED, 1), followup.dx_pair(SEED, 1)
    assert a.case == b.case and a.kind == b.kind == "chronic"
    for x, y in ((a.prior, b.prior), (a.current, b.current)):
        np.testing.assert_array_equal(x.rendered.stored, y.rendered.stored)
        assert x.rendered.truth_box == y.rendered.truth_box
    other = followup.dx_pair(SEED + 1, 1)
    assert other.case != a.case


@pytest.mark.parametrize("kind", followup.KINDS)
def test_dx_kinds_draw_the_fracture_where_they_should(kind: str) -> None:
    pair = followup.dx_pair(SEED, _first(kind))
    assert pair.kind == kind
    for visit, present in zip((pair.prior, pair.current), followup.PRESENT[kind], strict=True):
        assert visit.fracture is present
        assert (visit.rendered.truth_box is not None) is present
        drawn = {k for k, _ in visit.rendered.details["structures"]} & FRACTURE_STRUCTURES
        assert bool(drawn) is present, drawn
    assert (pair.current.healing is not None) is (kind == "chronic")


def test_dx_prior_and_current_share_the_patient() -> None:
    pair = followup.dx_pair(SEED, _first("chronic"))
    prior, current = pair.prior.rendered, pair.current.rendered
    same = [f.name for f in fields(pair.case) if f.name not in ("dose", "contrast")]
    assert all(getattr(prior.case, n) == getattr(current.case, n) for n in same)
    assert prior.stored.shape == current.stored.shape
    assert abs(pair.current.theta_deg - pair.prior.theta_deg) <= 4.0
    # Same look-alikes (physes, arrest lines, scars, canals), moved by the tilt only.
    a, b = _normal_structures(prior), _normal_structures(current)
    assert a and [k for k, _ in a] == [k for k, _ in b]
    centre = lambda box: np.array([box[0] + box[2], box[1] + box[3]]) / 2  # noqa: E731
    moved = [np.linalg.norm(centre(x) - centre(y)) * pair.case.spacing_mm
             for (_, x), (_, y) in zip(a, b, strict=True)]
    assert np.median(moved) < 5.0, moved
    # The current study's acquisition differs: not the same pixels.
    assert not np.array_equal(prior.stored, current.stored)


def test_dx_pairs_render_alike_in_threads() -> None:
    # No module state is patched while a pair renders: threads may render at once.
    from concurrent.futures import ThreadPoolExecutor

    indices = [0, 1, 4, 7]
    alone = [followup.dx_pair(SEED, i) for i in indices]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda i: followup.dx_pair(SEED, i), indices * 2))
    for a, b in zip(alone * 2, together, strict=True):
        for x, y in ((a.prior, b.prior), (a.current, b.current)):
            np.testing.assert_array_equal(x.rendered.stored, y.rendered.stored)


def _case(seed: int):  # noqa: ANN202
    return sample_case(np.random.default_rng(seed), fracture=True, spacing_choices=TRAIN_SPACINGS)


def test_absent_fracture_changes_only_the_fracture() -> None:
    case = _case(5)
    seeds = dict(anatomy_seed=1, finding_seed=2, acquisition_seed=3)
    acute = followup.render_visit(case, present=True, **seeds)
    again = followup.render_visit(case, present=True, **seeds)
    absent = followup.render_visit(case, present=False, **seeds)
    np.testing.assert_array_equal(acute.stored, again.stored)
    assert acute.truth_box is not None and absent.truth_box is None
    assert (acute.stored != absent.stored).mean() < 0.1  # local change, same patient
    assert _normal_structures(absent) == _normal_structures(acute)
    with pytest.raises(ValueError, match="fracture"):
        followup.render_visit(sample_case(np.random.default_rng(5), fracture=False), present=False,
                              **seeds)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_healing_fracture_is_fainter(seed: int) -> None:
    case = _case(seed)
    seeds = dict(anatomy_seed=seed, finding_seed=seed + 1, acquisition_seed=seed + 2)
    acute = followup.render_visit(case, present=True, **seeds)
    healed = followup.render_visit(case, present=True, healing=followup.Healing(contrast=0.3,
                                                                                width=0.4),
                                   **seeds)
    absent = followup.render_visit(case, present=False, **seeds)
    assert healed.truth_box is not None
    r0, c0, r1, c1 = (int(v) for v in acute.truth_box)
    box = (slice(r0, r1 + 1), slice(c0, c1 + 1))

    def trace(img):  # noqa: ANN001, ANN202
        return np.abs(img.stored[box].astype(float) - absent.stored[box].astype(float)).sum()

    assert 0 < trace(healed) < 0.8 * trace(acute)


# --------------------------------------------------------------------------
# Head CT pairs
# --------------------------------------------------------------------------

_POSE = {"lesions", "position", "yaw_deg", "pitch_deg", "dose", "seed"}


def test_ct_pair_is_deterministic_for_a_seed() -> None:
    assert followup.ct_pair(SEED, 3) == followup.ct_pair(SEED, 3)
    assert followup.ct_pair(SEED, 3) != followup.ct_pair(SEED + 1, 3)


@pytest.mark.parametrize("kind", followup.KINDS)
def test_ct_kinds_and_shared_anatomy(kind: str) -> None:
    pair = followup.ct_pair(SEED, _first(kind))
    assert pair.kind == kind
    for name in {f.name for f in fields(pair.prior)} - _POSE:
        assert getattr(pair.prior, name) == getattr(pair.current, name), name
    assert pair.prior.seed != pair.current.seed  # own noise
    assert abs(pair.current.yaw_deg - pair.prior.yaw_deg) < 15.0
    for head, present in zip((pair.prior, pair.current), followup.PRESENT[kind], strict=True):
        assert head.haemorrhage is present
        assert (true_volume_ml(head, 1.0) > 0.0) is present
        if present:
            lo, hi = lesion_z_range(head)
            z = 0.5 * (lo + hi)
            mask = lesion_mask_slice(head, z, pixel_spacing_mm=2.0, rows=128, cols=128,
                                     centre_xy=head.position[:2])
            assert mask.sum() > 0 or head.lesions[0].variant == "contusion"


def test_ct_chronic_bleed_is_older_and_smaller() -> None:
    for index in range(10):
        pair = followup.ct_pair(SEED, index)
        if pair.kind != "chronic":
            continue
        for old, new in zip(pair.prior.lesions, pair.current.lesions, strict=True):
            assert new.kind == old.kind and new.centre == old.centre
            assert new.hu < old.hu and new.hu >= 20.0
        v_prior, v_current = true_volume_ml(pair.prior, 1.0), true_volume_ml(pair.current, 1.0)
        assert 0.0 < v_current <= v_prior, (index, v_prior, v_current)


def test_ct_series_datasets_carry_the_study() -> None:
    pair = followup.ct_pair(SEED, 0)
    ds = next(followup.ct_series(pair.current, pair.acquisition, uid="2.25.99",
                                 study_date=pair.current_date))
    assert ds.StudyDate == pair.current_date > pair.prior_date
    assert str(ds.StudyInstanceUID) == "2.25.99.1"
    assert float(ds.SliceThickness) == pair.acquisition.thickness_mm


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------


def _finding(p: float, volume: float | None = None, threshold: float = 0.5) -> Finding:
    return Finding(p, threshold, None, volume if p >= threshold else None)


def _prior(p: float, volume: float | None = None, threshold: float = 0.5) -> PriorFinding:
    return PriorFinding(p, threshold, volume if p >= threshold else None)


def _outcome(kind: str, current: float, prior: float, **kw: float) -> priors.Outcome:
    return priors.Outcome(kind, _finding(current, kw.get("cv")), _prior(prior, kw.get("pv")))


HAND_MADE = [
    _outcome("new", 0.9, 0.1),  # true alert in both modes
    _outcome("new", 0.8, 0.7),  # prior false positive: hidden by the comparison
    _outcome("new", 0.2, 0.1),  # missed in both modes
    _outcome("chronic", 0.9, 0.8),  # false alert without prior only
    _outcome("chronic", 0.9, 0.3),  # prior missed: a false alert in both modes
    _outcome("chronic", 0.2, 0.9),  # healed below the threshold: resolved, no alert
    _outcome("negative", 0.6, 0.7),  # the same false positive twice
    _outcome("negative", 0.1, 0.2),
    _outcome("resolved", 0.1, 0.9),
    _outcome("resolved", 0.7, 0.6),
]


def test_count_alerts_on_hand_made_findings() -> None:
    counts = priors.count_alerts(HAND_MADE)
    assert counts["n_pairs"] == 10
    assert counts["kinds"] == {"new": 3, "chronic": 3, "negative": 2, "resolved": 2}
    a, b = counts["without_prior"], counts["with_prior"]
    assert (a["alerts"], a["false_alerts"], a["true_alerts"], a["missed_new"]) == (6, 4, 2, 1)
    assert (b["alerts"], b["false_alerts"], b["true_alerts"], b["missed_new"]) == (2, 1, 1, 2)
    assert a["false_alert_rate"] == pytest.approx(4 / 6, abs=1e-4)
    assert b["false_alert_rate"] == pytest.approx(1 / 2)
    assert a["sensitivity_new"] == pytest.approx(2 / 3, abs=1e-4)
    assert b["sensitivity_new"] == pytest.approx(1 / 3, abs=1e-4)
    assert counts["false_alert_reduction_percent"] == 75.0
    low, high = counts["false_alert_reduction_ci95_percent"]
    assert low < 75.0 < high
    assert counts["true_new_hidden_by_prior"] == 1
    assert counts["by_kind"]["chronic"] == {
        "n": 3, "alerts_without_prior": 2, "alerts_with_prior": 1,
        "changes": {"new": 1, "resolved": 1, "unchanged": 1},
    }
    assert counts["by_kind"]["negative"]["alerts_with_prior"] == 0


def test_volume_changes_are_not_new_findings() -> None:
    grown = _outcome("chronic", 0.9, 0.9, cv=20.0, pv=5.0)
    shrunk = _outcome("chronic", 0.9, 0.9, cv=2.0, pv=12.0)
    assert grown.comparison().change == "increased" and shrunk.comparison().change == "decreased"
    counts = priors.count_alerts([grown, shrunk])
    assert counts["with_prior"]["alerts"] == 0 and counts["without_prior"]["false_alerts"] == 2
    assert counts["false_alert_reduction_percent"] == 100.0
    assert counts["with_prior"]["sensitivity_new"] is None  # no "new" pair


def test_count_alerts_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown pair kind"):
        priors.count_alerts([_outcome("worse", 0.9, 0.1)])


def test_wilson_interval() -> None:
    assert priors.wilson(5, 10) == [0.2366, 0.7634]
    assert priors.wilson(0, 10) == [0.0, 0.2775]
    assert priors.wilson(10, 10) == [0.7225, 1.0]
    assert priors.wilson(0, 0) is None


# --------------------------------------------------------------------------
# The engine's series aggregation (shared with engine/series_job.py)
# --------------------------------------------------------------------------


class _FakeBackend:
    """Slice probability and heatmap from the first pixel of each slice."""

    def predict(self, card, batch):  # noqa: ANN001, ANN201
        out = []
        for image in batch.images:
            p = float(image[0, 0, 0])
            heat = np.zeros((64, 64), np.float32)
            heat[: int(round(p * 10)), :2] = 0.9  # 2 * round(10 p) cells of 16 mm^2
            out.append(RawOutput(p, heat))
        return out


def _slices(probabilities: dict[float, float]) -> list:
    """(SliceRef, prepared input) per z, out of order; the image holds the probability."""
    geometry = Geometry(1.0, 1.0, 0.0, 0.0, 256, 256)
    out = []
    for k, (z, p) in enumerate(sorted(probabilities.items(), reverse=True)):
        image = np.full((256, 256, 2), p, np.float32)
        ref = SliceRef(f"i{k}", f"1.2.{k}", (0.0, 0.0, z), (1.0, 0, 0, 0, 1.0, 0))
        prepared = SimpleNamespace(image=SimpleNamespace(pixels=image, geometry=geometry),
                                   features=np.zeros(5, np.float32))
        out.append((ref, prepared))
    return out


def test_series_finding_aggregates_as_the_engine() -> None:
    card = ModelCard.from_folder(MODELS / "head-ct-haemorrhage")
    probabilities = {0.0: 0.1, 5.0: 0.9, 10.0: 0.3, 15.0: 0.2}
    finding, key = priors.series_finding(card, _FakeBackend(), _slices(probabilities),
                                         batch_size=3)
    assert key == 1  # the 5 mm slice, second along z
    assert finding.probability == pytest.approx(0.9) and finding.positive
    assert finding.threshold == card.series_threshold
    cells = sum(2 * round(10 * p) for p in probabilities.values())
    assert finding.volume_ml == pytest.approx(cells * 16.0 * 5.0 / 1000.0)
    assert finding.region is not None
    low, _ = priors.series_finding(card, _FakeBackend(), _slices({0.0: 0.1, 5.0: 0.3, 10.0: 0.2}),
                                   batch_size=8)
    assert not low.positive and low.volume_ml is None and low.region is None


# --------------------------------------------------------------------------
# README and the figures on the cards
# --------------------------------------------------------------------------


def test_readme_section_goes_before_limits_and_is_replaced(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Model\n\nText.\n\n## Limits\n\n- synthetic\n")
    block = {
        "seed": 1, "stream": 6, "n_pairs": 10, "threshold": 0.5,
        "kinds": {"new": 3, "chronic": 3, "negative": 2, "resolved": 2},
        **priors.count_alerts(HAND_MADE), "per_pair": "x.csv", "command": "c",
        "duration_s": 1.0,
    }
    priors.update_readme(tmp_path, priors.readme_section(block, series=False))
    first = readme.read_text()
    assert first.index(priors.README_HEADING) < first.index("## Limits")
    assert "by 75.0 %" in first
    priors.update_readme(tmp_path, priors.readme_section(block, series=True))
    second = readme.read_text()
    assert second.count(priors.README_HEADING) == 1 and second.endswith("- synthetic\n")
    assert "head CT" in second


@pytest.mark.parametrize("model", ["limb-fracture-xr", "head-ct-haemorrhage"])
def test_card_figures_match_the_per_pair_csv(model: str) -> None:
    card = json.loads((MODELS / model / "model.json").read_text())
    block = card.get("metrics", {}).get(priors.CARD_KEY)
    if block is None:
        pytest.skip(f"{model}: no {priors.CARD_KEY} on the card")
    assert block["seed"] not in (card["training"]["seed"], card["metrics"]["held_out"]["seed"])
    rows = read_predictions(MODELS / model / block["per_pair"])
    series = "prior_volume_ml" in rows

    def volume(column: str, i: int) -> float | None:
        v = str(rows[column][i]) if series else ""
        return float(v) if v not in ("", "nan") else None

    outcomes = [
        priors.Outcome(
            str(rows["kind"][i]),
            Finding(float(rows["current_probability"][i]), float(rows["threshold"][i]), None,
                    volume("current_volume_ml", i)),
            PriorFinding(float(rows["prior_probability"][i]), float(rows["threshold"][i]),
                         volume("prior_volume_ml", i)),
        )
        for i in range(len(rows["kind"]))
    ]
    counts = priors.count_alerts(outcomes)
    assert counts["n_pairs"] == block["n_pairs"]
    for mode in ("without_prior", "with_prior"):
        assert counts[mode] == block[mode], mode
    assert counts["false_alert_reduction_percent"] == block["false_alert_reduction_percent"]
    assert np.array_equal(rows["alert_with_prior"].astype(int),
                          [int(o.alert_with_prior) for o in outcomes])
