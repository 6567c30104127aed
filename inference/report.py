"""The AI result as a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

Built only through highdicom's templates (valid by construction):

- TID 1500 Measurement Report with a device observer (TID 1004), the
  procedure reported and the image library (TID 1600) of the source image;
- one TID 1410 planar ROI measurement group per located finding: tracking
  identifier and UID, finding type (coded), finding site, the image region as
  a SCOORD POLYLINE on the source image, the probability as a numeric
  measurement and a Present qualitative evaluation;
- a negative result is explicit: a TID 1501 group with the probability,
  ``Absent``, and the source image referenced;
- every group names the algorithm (TID 4019) by the card's name and version,
  with the inputs that were missing listed as algorithm parameters.

Series and SOP Instance UIDs are derived from the source UIDs and the model
id and version, so processing the same image again yields the same SR (and
Orthanc the same instance ID) instead of a duplicate.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from .card import Code, ModelCard
from .postprocess import Finding
from .uids import derived_uid


def _memoise_iod_pixel_check() -> None:
    """Cache highdicom's "does this SOP class have pixel data" answer per SOP class.

    The Image Library (TID 1600) asks it for every image, and each answer
    scans the standard's module tables: 12 % of a worker's time in a profile
    of 200 radiographs. The answer depends on the SOP Class UID alone, so a
    cache changes nothing but the time.
    """
    import highdicom.sr.templates as templates

    check = getattr(templates, "does_iod_have_pixel_data", None)
    if check is not None and not hasattr(check, "cache_info"):
        templates.does_iod_have_pixel_data = functools.lru_cache(maxsize=256)(check)


_memoise_iod_pixel_check()

MANUFACTURER = "orthanc-ai"
SR_SERIES_NUMBER = 9901
UNIT_NONE = CodedConcept("1", "UCUM", "no units")
UNIT_ML = CodedConcept("mL", "UCUM", "milliliter")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
PLAIN_RADIOGRAPHY = CodedConcept("168537006", "SCT", "Plain radiography")
CT_PROCEDURE = CodedConcept("77477000", "SCT", "CT")


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def sr_uids(source: Dataset, card: ModelCard) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR for this source and model version."""
    key = [card.id, card.version]
    series = derived_uid("orthanc-ai/sr-series", str(source.SeriesInstanceUID), *key)
    sop = derived_uid("orthanc-ai/sr", str(source.SOPInstanceUID), *key)
    return series, sop


def device_uid(card: ModelCard) -> str:
    """Stable UID of the observing device: this algorithm, any version."""
    return derived_uid("orthanc-ai/device", card.id)


_BULK = {"PixelData", "FloatPixelData", "DoubleFloatPixelData", "IconImageSequence",
         "ModalityLUTSequence", "VOILUTSequence", "RedPaletteColorLookupTableData",
         "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData"}


def _header_only(ds: Dataset) -> Dataset:
    """The source's public header without bulk data (pixels, LUTs, overlays, icons).

    highdicom copies the patient and study modules from it and deep-copies
    what it is given: vendor private blocks and LUTs would only cost time.
    """
    out = Dataset()
    for elem in ds:
        if elem.tag.is_private or elem.tag.group >= 0x5000 or elem.keyword in _BULK:
            continue
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def build_sr(
    source: Dataset,
    card: ModelCard,
    findings: Sequence[Finding],
    *,
    missing_inputs: Sequence[str] = (),
    now: dt.datetime | None = None,
    uids: tuple[str, str] | None = None,
    predecessor: Dataset | None = None,
    notes: Sequence[str] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR for one source image (or key slice) and one model's findings on it.

    ``uids`` overrides the (series, SOP instance) UIDs, e.g. for a series-level
    result keyed by its set of slices; ``predecessor`` is the SR this one
    revises (PS3.3 C.17.2.3, Predecessor Documents Sequence).
    """
    if not findings:
        raise ValueError("at least one finding (positive or negative) is required")
    series_uid, sop_uid = uids or sr_uids(source, card)
    header = _header_only(source)
    parameters = [f"missing input: {m}" for m in missing_inputs] + [
        f"note: {n}" for n in notes
    ] or None
    algorithm = hd.sr.AlgorithmIdentification(
        name=card.name, version=card.version, parameters=parameters, manufacturer=MANUFACTURER
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(card),
            name=card.id,
            manufacturer_name=MANUFACTURER,
            model_name=f"{card.name} {card.version}",
        ),
    )
    finding_type = _concept(card.finding)
    sites = [hd.sr.FindingSite(_concept(card.finding_site))] if card.finding_site else None
    sop_class = str(source.SOPClassUID)
    src_uid = str(source.SOPInstanceUID)
    groups: list = []
    for index, finding in enumerate(findings, start=1):
        tracking = hd.sr.TrackingIdentifier(
            uid=derived_uid("orthanc-ai/tracking", sop_uid, str(index)),
            identifier=f"{card.id} finding {index}",
        )
        measurements = [hd.sr.Measurement(
            name=PROBABILITY,
            value=round(finding.probability, 6),
            unit=UNIT_NONE,
            algorithm_id=algorithm,
        )]
        if finding.volume_ml is not None:
            measurements.append(hd.sr.Measurement(
                name=VOLUME, value=round(finding.volume_ml, 3), unit=UNIT_ML,
                algorithm_id=algorithm,
            ))
        presence = hd.sr.QualitativeEvaluation(
            name=finding_type,
            value=codes.SCT.Present if finding.positive else codes.SCT.Absent,
        )
        if finding.positive and finding.region is not None:
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.asarray(finding.region.polyline(), dtype=np.float64),
                source_image=hd.sr.SourceImageForRegion(sop_class, src_uid),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=region,
                    finding_type=finding_type,
                    algorithm_id=algorithm,
                    finding_sites=sites,
                    measurements=measurements,
                    qualitative_evaluations=[presence],
                )
            )
        else:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=finding_type,
                    algorithm_id=algorithm,
                    finding_sites=sites,
                    measurements=measurements,
                    qualitative_evaluations=[presence],
                    source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class, src_uid)],
                )
            )
    # TID 1600 (Image Library) is optional; highdicom needs the geometry
    # attributes of TID 1603/1604 to describe an image, which real-world
    # images may lack. The source image stays referenced by every group.
    modality = str(source.get("Modality", ""))
    procedure = CT_PROCEDURE if modality == "CT" else PLAIN_RADIOGRAPHY

    def measurement_report(library: list[Dataset] | None) -> hd.sr.MeasurementReport:
        return hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            imaging_measurements=groups,
            referenced_images=library,
        )

    try:
        report = measurement_report([header])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        report = measurement_report(None)
    now = now or dt.datetime.now()
    return hd.sr.Comprehensive3DSR(
        evidence=[header],
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[_header_only(predecessor)] if predecessor is not None else None,
        series_description=f"AI {card.name} {card.version}"[:64],
        manufacturer_model_name=card.id[:64],
        software_versions=card.version[:64],
        institution_name=str(source.get("InstitutionName", "")) or None,
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0),
    )
