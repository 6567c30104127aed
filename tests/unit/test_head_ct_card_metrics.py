"""The head CT card's metrics are reproducible from its shipped weights.

The card was written by ``train_head_ct`` from per-series results on held-out
series 0..n-1 of its held-out seed, saved as ``held_out_series.csv``. Here:

1. the card parses (``ModelCard.from_folder``) and its metrics follow from
   the CSV (same AUROC, sensitivity, specificity, volume error, key-slice
   hit rate), so the numbers are not hand-edited;
2. the shipped weights are re-run on the *same first series* (rendered
   afresh, slice by slice through the runtime preprocessing): every
   per-series probability matches the CSV to float noise, so the card's
   AUROC with those series recomputed is within ``auroc_tolerance``
   (0.01: CPU kernels may reorder sums and move a probability by ~1e-6,
   which could only change the AUROC through an exact tie);
3. the metadata model beats the image-only ablation on the card's set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from inference.card import ModelCard

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "head-ct-haemorrhage"
N_RECHECK = 4  # series re-rendered and re-run (about 30 s on two cores)

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.keras").exists(), reason="head CT model not trained"
)


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODEL_DIR / "model.json").read_text())


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    from training.metrics import read_predictions

    return read_predictions(MODEL_DIR / "held_out_series.csv")


def test_card_parses_and_weights_are_small(card: dict) -> None:
    parsed = ModelCard.from_folder(MODEL_DIR)
    assert parsed.id == "head-ct-haemorrhage"
    assert parsed.accepts.level == "series" and parsed.accepts.modalities == ("CT",)
    assert parsed.image.windows == ((40.0, 80.0), (80.0, 200.0))
    assert parsed.metadata is not None
    assert parsed.metadata.features == (
        "age_years", "age_known", "sex_male", "sex_female", "slice_thickness",
    )
    assert parsed.heatmap_stride == 4
    assert 0.0 < card["series_threshold"] < 1.0
    assert card["volume"] == {"heatmap_threshold": 0.5, "unit": "mL"}
    for name in ("model.keras", "ablation_image_only.keras"):
        assert (MODEL_DIR / name).stat().st_size < 2 * 2**20


def test_card_metrics_follow_from_the_per_series_results(
    card: dict, stored: dict[str, np.ndarray]
) -> None:
    from training.evaluate_head_ct import series_metrics

    held = card["metrics"]["held_out"]
    abl = card["metrics"]["image_only_ablation"]
    assert len(stored["label"]) == held["n_series"] == abl["n_series"]
    for block, suffix in ((held, ""), (abl, "_ablation")):
        # Both models are read at the card's series threshold.
        again = series_metrics(stored, suffix, card["series_threshold"])
        for key in ("auroc", "sensitivity", "specificity", "volume_mae_ml",
                    "volume_correlation", "key_slice_hit_rate"):
            # The CSV keeps 6 decimals; the card, 4.
            assert again[key] == pytest.approx(block[key], abs=2e-4), key
    assert card["metrics"]["metadata_benefit_auroc"] == pytest.approx(
        held["auroc"] - abl["auroc"], abs=1e-4)


def test_shipped_weights_reproduce_the_first_held_out_series(
    card: dict, stored: dict[str, np.ndarray]
) -> None:
    from training.evaluate_head_ct import (
        STREAM_HELD_OUT,
        load_models,
        run_series,
    )
    from training.metrics import auroc

    seed = card["metrics"]["held_out"]["seed"]
    per = run_series(load_models(MODEL_DIR), seed, STREAM_HELD_OUT, N_RECHECK, workers=2)
    for key in ("label", "n_slices"):
        np.testing.assert_array_equal(np.asarray(per[key], float), stored[key][:N_RECHECK])
    np.testing.assert_allclose(per["true_volume_ml"], stored["true_volume_ml"][:N_RECHECK],
                               rtol=1e-4, atol=1e-3)
    for suffix in ("", "_ablation"):
        np.testing.assert_allclose(per[f"probability{suffix}"],
                                   stored[f"probability{suffix}"][:N_RECHECK], atol=1e-4)
        np.testing.assert_allclose(per[f"volume_ml{suffix}"],
                                   stored[f"volume_ml{suffix}"][:N_RECHECK], atol=0.05)
        # The card's AUROC with the re-run series substituted.
        p = stored[f"probability{suffix}"].copy()
        p[:N_RECHECK] = per[f"probability{suffix}"]
        key = "held_out" if suffix == "" else "image_only_ablation"
        assert math.isclose(auroc(stored["label"], p), card["metrics"][key]["auroc"],
                            abs_tol=card["metrics"]["auroc_tolerance"])


def test_metadata_beats_the_image_only_ablation(card: dict) -> None:
    metrics = card["metrics"]
    assert metrics["held_out"]["auroc"] > metrics["image_only_ablation"]["auroc"]
    assert metrics["metadata_benefit_auroc"] > 0.0
