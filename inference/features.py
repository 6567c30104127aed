"""DICOM metadata as model inputs.

Each feature a model card may list is defined here once: which attributes it
reads, how it is normalised, and what it becomes when the attributes are
missing. The card names features; the registry refuses unknown names.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydicom loads every codec (GDCM too): not in Orthanc's process
    from pydicom.dataset import Dataset

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(frozen=True)
class Metadata:
    """What a model may know about the patient and the acquisition.

    Each ``*_source`` names the attribute a value came from, or ``None``
    when it is missing, so the report can say which inputs were missing.
    """

    age_years: float | None
    age_source: str | None
    sex: str | None  # "M" or "F"; "O" and missing are None
    pixel_spacing_mm: tuple[float, float] | None  # (row, column)
    spacing_source: str | None
    view_position: str | None
    slice_thickness_mm: float | None
    modality: str
    body_part: str | None
    missing: tuple[str, ...] = field(default=())


def parse_age_string(value: object) -> float | None:
    """PS3.5 AS value ("045Y", "006M", "010W", "003D") in years."""
    m = _AGE_RE.match(str(value or ""))
    if not m:
        return None
    return int(m.group(1)) * _UNIT_YEARS[m.group(2)]


def _parse_da(value: object) -> dt.date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_age(ds: Dataset) -> tuple[float | None, str | None]:
    """Age in years at the examination and the attribute(s) it came from.

    PatientAge (0010,1010) first; otherwise PatientBirthDate against the
    first of StudyDate, SeriesDate, AcquisitionDate, ContentDate. Values
    outside 0-130 years are treated as missing.
    """
    age = parse_age_string(ds.get("PatientAge"))
    if age is not None and 0 <= age <= 130:
        return age, "PatientAge"
    birth = _parse_da(ds.get("PatientBirthDate"))
    if birth is not None:
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            when = _parse_da(ds.get(keyword))
            if when is not None:
                years = (when - birth).days / 365.25
                if 0 <= years <= 130:
                    return years, f"PatientBirthDate/{keyword}"
                break
    return None, None


def patient_sex(ds: Dataset) -> str | None:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return sex if sex in ("M", "F") else None


def _spacing(value: object) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not (0.001 <= row <= 50 and 0.001 <= col <= 50):
        return None
    return row, col


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """Physical pixel size at the patient, in mm (row, column).

    For projection radiography (PS3.3 C.8.11.4 and 10.7.1.3) PixelSpacing,
    when present, is already calibrated to the patient plane. Otherwise
    ImagerPixelSpacing is at the detector and is divided by
    EstimatedRadiographicMagnificationFactor when that is given. For
    secondary capture, NominalScannedPixelSpacing.
    """
    ps = _spacing(ds.get("PixelSpacing"))
    if ps is not None:
        return ps, "PixelSpacing"
    ips = _spacing(ds.get("ImagerPixelSpacing"))
    if ips is not None:
        try:
            mag = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
        except (TypeError, ValueError):
            mag = 1.0
        if 1.0 <= mag <= 3.0 and mag != 1.0:
            return (ips[0] / mag, ips[1] / mag), (
                "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
            )
        return ips, "ImagerPixelSpacing"
    nps = _spacing(ds.get("NominalScannedPixelSpacing"))
    if nps is not None:
        return nps, "NominalScannedPixelSpacing"
    return None, None


def extract_metadata(ds: Dataset) -> Metadata:
    age, age_source = patient_age(ds)
    sex = patient_sex(ds)
    spacing, spacing_source = pixel_spacing(ds)
    view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
    try:
        thickness: float | None = float(ds.get("SliceThickness"))
        if not 0.05 <= thickness <= 50:
            thickness = None
    except (TypeError, ValueError):
        thickness = None
    missing = []
    if age is None:
        missing.append("age")
    if sex is None:
        missing.append("sex")
    if spacing is None:
        missing.append("pixel_spacing")
    if thickness is None:  # reported only to models that use it
        missing.append("slice_thickness")
    return Metadata(
        age_years=age,
        age_source=age_source,
        sex=sex,
        pixel_spacing_mm=spacing,
        spacing_source=spacing_source,
        view_position=view,
        slice_thickness_mm=thickness,
        modality=str(ds.get("Modality", "") or "").strip().upper(),
        body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper() or None,
        missing=tuple(missing),
    )


@dataclass(frozen=True)
class Feature:
    """One scalar model input computed from metadata."""

    name: str
    attributes: tuple[str, ...]
    normalisation: str
    when_missing: str
    compute: Callable[[Metadata], float]


def _age_norm(m: Metadata) -> float:
    return 0.0 if m.age_years is None else min(max(m.age_years, 0.0), 120.0) / 100.0


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "age_years",
            ("PatientAge", "PatientBirthDate", "StudyDate"),
            "age in years / 100, clipped to [0, 1.2]",
            "0.0 (and age_known = 0)",
            _age_norm,
        ),
        Feature(
            "age_known",
            ("PatientAge", "PatientBirthDate", "StudyDate"),
            "1.0 when an age could be derived",
            "0.0",
            lambda m: 0.0 if m.age_years is None else 1.0,
        ),
        Feature(
            "sex_male",
            ("PatientSex",),
            "1.0 when PatientSex is M",
            "0.0 (both sex inputs 0 for O or missing)",
            lambda m: 1.0 if m.sex == "M" else 0.0,
        ),
        Feature(
            "sex_female",
            ("PatientSex",),
            "1.0 when PatientSex is F",
            "0.0 (both sex inputs 0 for O or missing)",
            lambda m: 1.0 if m.sex == "F" else 0.0,
        ),
        Feature(
            "slice_thickness",
            ("SliceThickness",),
            "SliceThickness in mm / 10, clipped to [0, 1]",
            "0.5 (5 mm, the usual routine thickness)",
            lambda m: 0.5 if m.slice_thickness_mm is None
            else min(m.slice_thickness_mm, 10.0) / 10.0,
        ),
    )
}

# Which Metadata.missing entry a feature depends on.
FEATURE_NEEDS = {"age_years": "age", "age_known": None, "sex_male": "sex", "sex_female": "sex",
                 "slice_thickness": "slice_thickness"}


def feature_vector(meta: Metadata, names: tuple[str, ...]) -> list[float]:
    return [FEATURES[n].compute(meta) for n in names]
