"""Slice ordering and volume aggregation for series-level models."""

import numpy as np
import pytest

from inference.errors import SkipInput
from inference.volume import SeriesAccumulator, SliceRef, lesion_area_mm2, order_slices

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def refs(zs, orientation=AXIAL):
    return [SliceRef(f"i{k}", f"1.2.{k}", (0.0, 0.0, float(z)), orientation)
            for k, z in enumerate(zs)]


def test_slices_are_sorted_along_the_normal_whatever_the_arrival_order():
    ordered = order_slices(refs([10, 0, 5, 15, 20]))
    assert [s.sop_instance_uid for s in ordered.slices] == ["1.2.1", "1.2.2", "1.2.0",
                                                          "1.2.3", "1.2.4"]
    assert ordered.spacing_mm == 5.0 and set(ordered.slab_mm) == {5.0}
    assert ordered.notes == ()


def test_gaps_are_reported_and_slabs_follow_the_real_spacing():
    ordered = order_slices(refs([0, 5, 10, 25, 30]))
    assert any("gap of 15.0 mm" in n for n in ordered.notes)
    assert ordered.slab_mm[2] == pytest.approx((5 + 10) / 2)  # gap capped at 2x spacing


def test_other_orientations_and_duplicates_are_left_out_with_a_note():
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    ordered = order_slices(refs([0, 5, 10, 5]) + refs([0], sagittal)[:1])
    assert len(ordered.slices) == 3
    assert any("another orientation" in n for n in ordered.notes)
    assert any("duplicate position" in n for n in ordered.notes)


def test_too_few_slices_or_no_geometry():
    with pytest.raises(SkipInput):
        order_slices(refs([0, 5]))
    with pytest.raises(SkipInput, match="no slice has ImagePositionPatient"):
        order_slices([SliceRef("i", "1", None, None)])


def test_fingerprint_changes_with_a_late_slice_only():
    a = order_slices(refs([0, 5, 10]))
    b = order_slices(list(reversed(refs([0, 5, 10]))))
    c = order_slices(refs([0, 5, 10, 15]))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_volume_is_area_times_slab():
    acc = SeriesAccumulator()
    heat = np.zeros((64, 64), np.float32)
    heat[:10, :10] = 0.9  # 100 cells of 16 mm² = 1600 mm²
    for i, p in enumerate((0.1, 0.8, 0.4)):
        acc.add(i, p, lesion_area_mm2(heat, 0.5, 16.0) if p > 0.5 else 0.0, 5.0, f"slice{i}")
    assert acc.volume_ml == pytest.approx(8.0)  # 1600 mm² x 5 mm
    assert acc.best_index == 1 and acc.best == "slice1"


def test_series_finding_is_the_best_slice_at_the_series_threshold():
    from dataclasses import replace
    from pathlib import Path

    from inference.backend import RawOutput
    from inference.card import ModelCard
    from inference.preprocess import Geometry
    from inference.volume import series_finding, slice_area_mm2

    card = ModelCard.from_folder(Path(__file__).resolve().parents[2] / "models"
                                 / "head-ct-haemorrhage")
    heat = np.zeros((64, 64), np.float32)
    heat[:10, :10] = 0.9
    cell = (card.heatmap_stride * card.image.pixel_spacing_mm) ** 2
    assert slice_area_mm2(card, RawOutput(0.9, heat)) == pytest.approx(100 * cell)
    assert slice_area_mm2(card, RawOutput(0.9, None)) == 0.0
    geometry = Geometry(1.0, 1.0, 0.0, 0.0, 256, 256)
    for p, positive in ((0.95, True), ((card.threshold + card.series_threshold) / 2, False)):
        acc = SeriesAccumulator()
        raw = RawOutput(p, heat)
        acc.add(0, p, slice_area_mm2(card, raw), 5.0, None)
        finding = series_finding(card, acc, raw, geometry)
        assert finding.threshold == card.series_threshold and finding.positive is positive
        assert (finding.region is not None) is positive
        assert finding.volume_ml == (round(100 * cell * 5.0 / 1000, 3) if positive else None)
    unset = replace(card, series_threshold=None)
    assert series_finding(unset, acc, raw, geometry).threshold == card.threshold
