"""CT Image Storage series from the synthetic head phantom.

:func:`ct_dataset` wraps one slice of Hounsfield units in a complete CT Image
Storage instance (PS3.3 A.3, SOP Class 1.2.840.10008.5.1.4.1.1.2) that passes
``dciodvfy`` without errors. :func:`write_ct_series` renders and encodes a
series one slice at a time, as a generator, so that a 1,000-slice series
costs the memory of one slice. :func:`write_demo_ct_study` writes the head CT
of the product demo.

Pixel encodings vary as they do between scanners (all with Rescale Slope 1
and Rescale Intercept -1024):

* ``"unsigned12"``: 12 bits stored, unsigned (stored 0 is -1024 HU; the
  corners outside the reconstruction circle are 0),
* ``"unsigned16"``: 16 bits stored, unsigned,
* ``"signed16"``: 16 bits stored, signed, with the corners outside the
  reconstruction circle set to Pixel Padding Value -2000.

Everything is built from the arguments: no clock, no random state, and UIDs
come from :func:`inference.uids.derived_uid`, so the same call always gives
the same bytes.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from inference.uids import derived_uid

from .common import base_dataset
from .headct import Head, render_slice, sample_head

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "orthanc-ai synthetic phantom"
RESCALE_INTERCEPT = -1024.0
ENCODINGS: tuple[str, ...] = ("unsigned12", "unsigned16", "signed16")
PADDING_VALUE = -2000  # stored value outside the reconstruction circle (signed16)
BRAIN_WINDOW = (40.0, 80.0)
SUBDURAL_WINDOW = (80.0, 200.0)


def encode_hu(
    hu: np.ndarray, encoding: str, *, padding_mask: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, object]]:
    """Hounsfield units to stored values and the Image Pixel attributes that decode them.

    Parameters
    ----------
    hu
        (rows, cols) HU.
    encoding
        One of :data:`ENCODINGS`.
    padding_mask
        True where there is no reconstructed data (outside the circle).

    Returns
    -------
    stored
        uint16 or int16 array.
    attributes
        BitsStored, HighBit, PixelRepresentation and, for ``signed16``,
        PixelPaddingValue.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {ENCODINGS}")
    values = np.rint(np.asarray(hu, np.float64) - RESCALE_INTERCEPT)
    attrs: dict[str, object] = {}
    if encoding == "signed16":
        stored = np.clip(values, -32768, 32767).astype(np.int16)
        if padding_mask is not None:
            stored[padding_mask] = PADDING_VALUE
            attrs["PixelPaddingValue"] = PADDING_VALUE
        attrs.update(BitsStored=16, HighBit=15, PixelRepresentation=1)
        return stored, attrs
    bits = 12 if encoding == "unsigned12" else 16
    stored = np.clip(values, 0, 2**bits - 1).astype(np.uint16)
    if padding_mask is not None:
        stored[padding_mask] = 0  # -1024 HU: air, as these scanners write it
    attrs.update(BitsStored=bits, HighBit=bits - 1, PixelRepresentation=0)
    return stored, attrs


def reconstruction_circle(rows: int, cols: int) -> np.ndarray:
    """True outside the inscribed circle of the matrix (no reconstructed data there)."""
    r = (np.arange(rows) - (rows - 1) / 2.0)[:, None]
    c = (np.arange(cols) - (cols - 1) / 2.0)[None, :]
    radius = min(rows, cols) / 2.0
    return (r * r + c * c) > radius * radius


def ct_dataset(
    hu: np.ndarray,
    *,
    pixel_spacing_mm: float,
    image_position: tuple[float, float, float],
    slice_thickness_mm: float,
    patient_id: str,
    patient_name: str,
    patient_sex: str | None,
    patient_age_years: float | None,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    frame_of_reference_uid: str,
    instance_number: int,
    encoding: str = "signed16",
    spacing_between_slices_mm: float | None = None,
    birth_date: str | None = None,
    study_date: str = "20260115",
    study_time: str = "093000",
    accession_number: str = "",
    study_description: str = "CT head without contrast",
    series_description: str | None = None,
    series_number: int = 2,
    kvp: float = 120.0,
    tube_current_ma: int = 250,
    exposure_mas: int = 250,
    ctdi_vol_mgy: float | None = None,
    institution: str = "Synthetic Teaching Hospital",
    station_name: str = "PHANTOM-CT1",
    body_part: str = "HEAD",
    pad_outside_circle: bool = True,
) -> Dataset:
    """Build one CT Image Storage dataset (axial, head first supine).

    Parameters
    ----------
    hu
        (rows, cols) Hounsfield units.
    pixel_spacing_mm
        Square pixel size.
    image_position
        ImagePositionPatient: scanner (x, y, z) of the centre of the top-left
        pixel (rows along +y, columns along +x).
    slice_thickness_mm
        Reconstructed thickness.
    patient_id, patient_name
        Patient identification (PN in DICOM ``^`` notation).
    patient_sex
        ``"M"``, ``"F"``, ``"O"`` or None (present but empty, Type 2).
    patient_age_years
        Age at the study; None omits PatientAge (Type 3).
    study_uid, series_uid, sop_uid, frame_of_reference_uid
        Identification.
    instance_number
        1-based position in the series.
    encoding
        One of :data:`ENCODINGS`.
    spacing_between_slices_mm
        Only described in SeriesDescription and the slice locations (the
        attribute is not part of the CT Image IOD).
    birth_date
        DA value or None (empty, Type 2).
    study_date, study_time
        DA and TM; also series, acquisition and content date and time.
    accession_number, study_description, series_description, series_number
        Descriptive attributes.
    kvp, tube_current_ma, exposure_mas, ctdi_vol_mgy
        Acquisition parameters (CT Image Module).
    institution, station_name
        General Equipment.
    body_part
        BodyPartExamined.
    pad_outside_circle
        Mark pixels outside the reconstruction circle as padding (signed16)
        or air (unsigned).

    Returns
    -------
    pydicom.Dataset
        With file meta information (Explicit VR Little Endian).
    """
    rows, cols = hu.shape
    padding = reconstruction_circle(rows, cols) if pad_outside_circle else None
    stored, pixel_attrs = encode_hu(hu, encoding, padding_mask=padding)

    ds = base_dataset(
        CT_IMAGE_STORAGE, sop_uid, instance_number=instance_number, patient_id=patient_id,
        patient_name=patient_name, patient_sex=patient_sex,
        patient_age_years=patient_age_years, birth_date=birth_date, study_uid=study_uid,
        study_date=study_date, study_time=study_time, accession_number=accession_number,
        study_description=study_description,
    )

    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.SeriesDescription = series_description or f"Head {slice_thickness_mm:g} mm axial"
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"  # Type 2C: required for CT without orientation codes

    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""

    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = institution
    ds.StationName = station_name
    ds.ManufacturerModelName = "head phantom renderer"
    ds.SoftwareVersions = "orthanc-ai"

    # General Acquisition / General Image
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = study_time
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # Image Plane
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [f"{v:.6g}" for v in image_position]
    ds.SliceThickness = f"{slice_thickness_mm:.6g}"
    ds.SliceLocation = f"{image_position[2]:.6g}"

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    for keyword, value in pixel_attrs.items():
        setattr(ds, keyword, value)

    # CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = f"{kvp:g}"
    ds.DataCollectionDiameter = "250"
    ds.ReconstructionDiameter = f"{pixel_spacing_mm * cols:.6g}"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = tube_current_ma
    ds.Exposure = exposure_mas
    ds.FilterType = "HEAD"
    ds.FocalSpots = "0.7"
    ds.ConvolutionKernel = "H30s"
    # FD (binary float) attributes of the enhanced CT family, allowed here.
    ds.RevolutionTime = 1.0
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.SpiralPitchFactor = 0.53
    if ctdi_vol_mgy is not None:
        ds.CTDIvol = float(ctdi_vol_mgy)
        phantom = Dataset()  # CID 4052: the 16 cm head phantom CTDIvol refers to
        phantom.CodeValue = "113691"
        phantom.CodingSchemeDesignator = "DCM"
        phantom.CodeMeaning = "IEC Head Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = Sequence([phantom])

    # VOI LUT: brain and subdural windows (the model ignores them; a viewer uses them)
    ds.WindowCenter = [f"{BRAIN_WINDOW[0]:g}", f"{SUBDURAL_WINDOW[0]:g}"]
    ds.WindowWidth = [f"{BRAIN_WINDOW[1]:g}", f"{SUBDURAL_WINDOW[1]:g}"]
    ds.WindowCenterWidthExplanation = ["BRAIN", "SUBDURAL"]

    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def slice_positions(
    head: Head,
    *,
    spacing_mm: float,
    n_slices: int | None = None,
    z_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Scanner z of each slice centre, inferior to superior.

    With ``z_range`` the slices run from its low end in steps of
    ``spacing_mm`` up to its high end; with ``n_slices`` they are centred on
    the head's extent (:meth:`Head.z_range_mm`); with neither they cover it.
    """
    lo, hi = z_range if z_range is not None else head.z_range_mm()
    if n_slices is None:
        n_slices = max(1, math.floor((hi - lo) / spacing_mm + 1e-9) + 1)
        start = lo
    elif z_range is not None:
        start = lo
    else:
        start = (lo + hi) / 2.0 - (n_slices - 1) * spacing_mm / 2.0
    return start + np.arange(n_slices) * spacing_mm


def write_ct_series(
    head: Head,
    out_dir: Path | str | None,
    *,
    slice_thickness_mm: float = 5.0,
    spacing_between_slices_mm: float | None = None,
    n_slices: int | None = None,
    z_range: tuple[float, float] | None = None,
    pixel_spacing_mm: float = 0.45,
    rows: int = 512,
    cols: int = 512,
    patient_id: str,
    patient_name: str,
    patient_sex: str | None,
    patient_age_years: float | None,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str | None = None,
    encoding: str = "signed16",
    noise: bool = True,
    centre_xy: tuple[float, float] = (0.0, 0.0),
    **attributes: object,
) -> Iterator[Dataset | Path]:
    """Render and encode an axial head CT series lazily, one slice per step.

    Parameters
    ----------
    head
        The phantom.
    out_dir
        Folder to write ``CT000001.dcm``... into (created), yielding paths;
        None yields the datasets instead (nothing written).
    slice_thickness_mm
        Reconstructed thickness (partial volume over it).
    spacing_between_slices_mm
        Distance between slice centres; default the thickness (contiguous).
    n_slices, z_range
        Which slices: see :func:`slice_positions`.
    pixel_spacing_mm, rows, cols
        In-plane grid (0.4-0.6 mm and 512 x 512 on scanners).
    patient_id, patient_name, patient_sex, patient_age_years
        Demographics written (None leaves sex empty and omits the age, as
        when a header is incomplete); the phantom itself is not changed.
    study_uid, series_uid
        Identification; SOP Instance UIDs derive from the series UID and the
        instance number, the Frame of Reference UID from the study UID.
    frame_of_reference_uid
        Override the derived Frame of Reference UID.
    encoding
        One of :data:`ENCODINGS`.
    noise
        Quantum noise and streaks (off for exact HU tests).
    centre_xy
        Scanner (x, y) of the reconstruction centre.
    **attributes
        Passed on to :func:`ct_dataset` (dates, descriptions, numbers...).

    Yields
    ------
    pydicom.Dataset or Path
        One per slice, inferior to superior, InstanceNumber from 1.
    """
    spacing = slice_thickness_mm if spacing_between_slices_mm is None \
        else spacing_between_slices_mm
    positions = slice_positions(head, spacing_mm=spacing, n_slices=n_slices, z_range=z_range)
    folder = None if out_dir is None else Path(out_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    frame_uid = frame_of_reference_uid or derived_uid(study_uid, "frame-of-reference")
    # Noise SD goes as 1 / sqrt(mAs) (headct.noise_sd_hu): 250 mAs is the reference dose.
    mas = int(round(250 * head.dose))
    x0 = centre_xy[0] - (cols - 1) / 2.0 * pixel_spacing_mm
    y0 = centre_xy[1] - (rows - 1) / 2.0 * pixel_spacing_mm
    description = attributes.pop(
        "series_description", f"Head {slice_thickness_mm:g} mm / {spacing:g} mm axial"
    )
    for k, z in enumerate(positions):
        hu = render_slice(head, float(z), pixel_spacing_mm=pixel_spacing_mm, rows=rows,
                          cols=cols, thickness_mm=slice_thickness_mm, centre_xy=centre_xy,
                          noise=noise)
        ds = ct_dataset(
            hu,
            pixel_spacing_mm=pixel_spacing_mm,
            image_position=(x0, y0, float(z)),
            slice_thickness_mm=slice_thickness_mm,
            patient_id=patient_id,
            patient_name=patient_name,
            patient_sex=patient_sex,
            patient_age_years=patient_age_years,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=derived_uid(series_uid, "instance", str(k + 1)),
            frame_of_reference_uid=frame_uid,
            instance_number=k + 1,
            encoding=encoding,
            spacing_between_slices_mm=spacing,
            series_description=str(description),
            tube_current_ma=mas,
            exposure_mas=mas,
            ctdi_vol_mgy=round(55.0 * head.dose, 1),
            **attributes,  # type: ignore[arg-type]
        )
        del hu
        if folder is None:
            yield ds
        else:
            path = folder / f"CT{k + 1:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            yield path


def write_demo_ct_study(
    out_dir: Path | str, *, seed: int = 20261202, haemorrhage: bool = True
) -> list[Path]:
    """Write the demo head CT: one 5 mm axial series of about 30 slices.

    With ``haemorrhage`` the patient (a 71-year-old man) has an
    intraparenchymal haematoma of about 20 mL (``headct.true_volume_ml`` of
    the same phantom gives the exact value); without, a normal head of the
    same age.

    Parameters
    ----------
    out_dir
        Folder to write into; files are ``<PatientID>/CT<n>.dcm``.
    seed
        Seed for the phantom and UIDs.
    haemorrhage
        Include the haematoma.

    Returns
    -------
    list of Path
        The files written, in slice order.
    """
    rng = np.random.default_rng([seed, 7])
    head = sample_head(rng, haemorrhage=haemorrhage, age_years=71.0, sex="M",
                       lesion_kind="iph" if haemorrhage else None, volume_ml=20.0)
    patient_id = f"SYNCT{seed % 10000:04d}{int(haemorrhage)}"
    study_day = dt.date(2026, 1, 20)
    birth = study_day - dt.timedelta(days=round(71.0 * 365.25) + 40)
    study_uid = derived_uid("orthanc-ai-demo-ct", str(seed), str(haemorrhage), "study")
    series_uid = derived_uid(study_uid, "series", "2")
    lo, hi = head.z_range_mm()
    n = max(1, round((hi - lo) / 5.0))
    paths = write_ct_series(
        head,
        Path(out_dir) / patient_id,
        slice_thickness_mm=5.0,
        n_slices=min(n, 32),
        pixel_spacing_mm=0.45,
        patient_id=patient_id,
        patient_name="PHANTOM^HEADCT",
        patient_sex="M",
        patient_age_years=71.0,
        study_uid=study_uid,
        series_uid=series_uid,
        encoding="signed16",
        birth_date=birth.strftime("%Y%m%d"),
        study_date=study_day.strftime("%Y%m%d"),
        study_time="221500",
        accession_number=f"ACCCT{seed % 10000:04d}",
        study_description="CT head without contrast (synthetic)",
    )
    return [p for p in paths if isinstance(p, Path)]
