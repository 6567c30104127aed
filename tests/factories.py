"""Builders shared by tests: model folders a hospital might drop in, card JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

CARD: dict[str, Any] = {
    "schema": 1,
    "id": "tiny-xr",
    "name": "Tiny test model",
    "version": "0.0.1",
    "intended_use": "Tests only, not for clinical use.",
    "format": "keras",
    "weights": "model.keras",
    "accepts": {"level": "instance", "modalities": ["DX", "CR"]},
    "inputs": {
        "image": {"name": "image", "shape": [32, 32, 1], "pixel_spacing_mm": 4.0},
        "metadata": {"name": "metadata", "features": ["age_years", "age_known"]},
    },
    "outputs": {"probability": {"name": "probability"},
                "heatmap": {"name": "heatmap", "stride": 4}},
    "finding": {"value": "72704001", "scheme": "SCT", "meaning": "Fracture"},
    "threshold": 0.5,
}


def card_json(**changes: Any) -> dict[str, Any]:
    card = copy.deepcopy(CARD)
    card.update(changes)
    return card


def tiny_keras_model(folder: Path, *, image_shape=(32, 32, 1), n_features: int = 2,
                     output_names=("probability", "heatmap")) -> Path:
    """A real (untrained) Keras model with the named inputs and outputs."""
    import keras

    image = keras.Input(image_shape, name="image")
    meta = keras.Input((n_features,), name="metadata")
    x = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu")(image)
    heat = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    joined = keras.layers.Concatenate()([pooled, meta])
    prob = keras.layers.Dense(1, activation="sigmoid")(joined)
    outputs = dict(zip(output_names, (prob, heat), strict=True))
    model = keras.Model({"image": image, "metadata": meta}, outputs)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.keras"
    model.save(path)
    return path


def write_card(folder: Path, card: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(card))


def synthetic_dx(seed: int, *, fracture: bool | None = None, age: float | None = 50.0,
                 sex: str | None = "F", spacing_mm: float | None = None, **dx_kwargs: Any):
    """A valid synthetic DX dataset (our phantom), deterministic from ``seed``."""
    import numpy as np

    from inference.uids import derived_uid
    from training.synthetic.dx import dx_dataset
    from training.synthetic.radiograph import render, sample_case

    rng = np.random.default_rng(seed)
    extra = {"spacing_choices": (spacing_mm,)} if spacing_mm else {}
    case = sample_case(rng, fracture=fracture, age_years=age, sex=sex or "F", **extra)
    rendered = render(case, rng)
    kwargs = dict(
        patient_id=f"TEST{seed}",
        patient_name=f"TEST^PATIENT{seed}",
        patient_sex=sex,
        patient_age_years=age,
        study_uid=derived_uid("test-study", str(seed)),
        series_uid=derived_uid("test-series", str(seed)),
        sop_uid=derived_uid("test-instance", str(seed)),
    )
    kwargs.update(dx_kwargs)
    return dx_dataset(rendered, **kwargs)


def gdcm_crashing_j2k(seed: int = 5000) -> Any:
    """A DX whose JPEG 2000 frame is a start-of-codestream and SIZ marker
    followed by 0xFF bytes: python-gdcm 3.2.6 throws a C++ string that nothing
    catches, and the process that decodes it aborts (SIGABRT)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = synthetic_dx(seed, fracture=False, age=40.0, sex="F")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\xff" * 100])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def patient_study_dx(patient_id: str, study_date: str, *, issuer: str | None = None,
                     fracture: bool = False, seed: int | None = None, body_part: str = "FOREARM",
                     accession: str | None = None, study_time: str = "093000",
                     spacing_mm: float | None = 1.0, age: float | None = 50.0,
                     sex: str | None = "F"):
    """One DX image in a new study of ``patient_id`` on ``study_date`` (YYYYMMDD).

    UIDs derive from patient, issuer, date and seed, so the same call gives the
    same study; another date, issuer or seed gives another. ``body_part`` is a
    key of ``training.synthetic.dx.ANATOMIC_REGIONS`` (synthetic_dx's default
    is "FOREARM"). ``spacing_mm=1.0`` keeps the image small (about 230 x 230).
    """
    import zlib

    from inference.uids import derived_uid

    key = (patient_id, issuer or "", study_date, study_time, str(seed))
    if seed is None:
        seed = zlib.crc32("\x1f".join(key).encode()) % 100_000
    ds = synthetic_dx(
        seed, fracture=fracture, age=age, sex=sex, spacing_mm=spacing_mm,
        patient_id=patient_id, patient_name=f"PRIOR^{patient_id}",
        study_uid=derived_uid("patient-study", *key),
        series_uid=derived_uid("patient-series", *key),
        sop_uid=derived_uid("patient-instance", *key),
        study_date=study_date, study_time=study_time, body_part=body_part,
        accession_number=accession if accession is not None
        else f"ACC{zlib.crc32(derived_uid('acc', *key).encode()) % 10**8:08d}",
    )
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    return ds
