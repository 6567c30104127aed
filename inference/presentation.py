"""The finding for viewers that do not render SR: a GSPS and a KOS beside the SR.

Many PACS viewers show neither a TID 1500 SR nor its SCOORD regions, but
apply a Grayscale Softcopy Presentation State (PS3.3 A.33.1) to the image
it references, and list the key images of a Key Object Selection document
(PS3.3 A.35.4, TID 2010). For each SR with a
located positive finding, :func:`build_companions` makes both, in the SR's
study:

- the **GSPS** references the source image (the key slice of a volume) and
  draws, on one graphic layer, each located positive finding's region as a
  closed POLYLINE in PIXEL units (the SR's SCOORD points: both use the
  sub-pixel convention of PS3.3 C.10.5.1.2 / C.18.6.1.1) with a text in
  words ("AI: Fracture present, probability 0.63; ..."). The tracking
  identifier and UID of each graphic are those of the SR's measurement
  group. The image keeps the look the modality gave it: the source's
  Modality LUT (rescale; HU for a CT that does not say), its VOI (Window
  Center / Width with their explanations and VOI LUT Function, or its VOI
  LUT Sequence), and MONOCHROME1 shown as MONOCHROME1 (Presentation LUT
  Shape INVERSE: a presentation state replaces the image's polarity);
- the **KOS**, titled (113000, DCM, "Of Interest") from CID 7010, holds a
  Key Object Description in words, the source image as an IMAGE item that
  names the GSPS as its presentation state (PS3.3 Table C.18.4-1: the
  viewers that show key images apply it), and the SR as a COMPOSITE item,
  for viewers that can open it; the device observer is the SR's.

Both carry the SR's Manufacturer (``orthanc-ai``: triage recognises them as
our own outputs), the model in the series description, Manufacturer Model
Name and Software Versions, and the patient and study attributes exactly as
the SR copies them (:func:`inference.report.source_header`). Their UIDs are
derived from the SR's (itself derived from the source UIDs, model id and
version), so the same SR always has the same companions, and Orthanc answers
``AlreadyStored`` on a rerun; :func:`companion_uids` gives them from the SR's
UIDs alone (:func:`companion_sop_uids`: how forwarding finds them).

A negative result, or a positive one without a region, has no companions.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

from .card import ModelCard
from .errors import BadInput
from .interval import Comparison
from .postprocess import Finding, describe
from .report import (
    _BUILD_ERRORS,
    MANUFACTURER,
    SR_SERIES_NUMBER,
    _tracking_uid,
    device_uid,
    refused_at,
    software_versions,
    source_header,
)
from .uids import derived_uid

log = logging.getLogger(__name__)

PR_SERIES_NUMBER = SR_SERIES_NUMBER + 1  # 9902
KO_SERIES_NUMBER = SR_SERIES_NUMBER + 2  # 9903
OF_INTEREST = hd.sr.CodedConcept("113000", "DCM", "Of Interest")  # CID 7010
LAYER = "AI_FINDINGS"  # CS, 16 characters at most
CONTENT_LABEL = "AI_FINDINGS"
# Yellow, the colour viewers commonly give annotations; CIELab as the layer's
# recommended display colour (PS3.3 C.10.7.1.1).
LAYER_COLOUR = hd.color.CIELabColor.from_rgb(255, 220, 0)
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_ST_MAX = 1024  # Unformatted Text Value (ST)
_LO_MAX = 64

@dataclass(frozen=True)
class CompanionUids:
    """(Series Instance UID, SOP Instance UID) of the GSPS and of the KOS of one SR."""

    presentation_state: tuple[str, str]
    key_objects: tuple[str, str]


def companion_uids(sr_series_uid: str, sr_sop_uid: str) -> CompanionUids:
    """The companions' UIDs, from the SR's: one GSPS and one KOS per SR, always the same."""
    pr, ko = companion_sop_uids(sr_sop_uid)
    return CompanionUids((derived_uid("orthanc-ai/pr-series", sr_series_uid), pr),
                         (derived_uid("orthanc-ai/ko-series", sr_series_uid), ko))


def companion_sop_uids(sr_sop_uid: str) -> tuple[str, str]:
    """(GSPS, KOS) SOP Instance UIDs of the SR's companions: what forwarding looks up."""
    return derived_uid("orthanc-ai/pr", sr_sop_uid), derived_uid("orthanc-ai/ko", sr_sop_uid)


def located(findings: Sequence[Finding]) -> list[tuple[int, Finding]]:
    """(1-based index among ``findings``, finding) of each positive finding with a region."""
    return [(i, f) for i, f in enumerate(findings, start=1)
            if f.positive and f.region is not None]


# --------------------------------------------------------------------------
# Words


def _algorithm(card: ModelCard) -> str:
    return f"{card.name} {card.version}"


def _series_description(card: ModelCard, what: str) -> str:
    """LO: with the model's name where it fits, else its id."""
    text = f"AI {card.name} {card.version} ({what})"
    if len(text) > _LO_MAX:
        text = f"AI {card.id} {card.version} ({what})"
    return text[:_LO_MAX]


def _texts(card: ModelCard, findings: Sequence[tuple[int, Finding]],
           comparisons: Sequence[Comparison | None]) -> list[str]:
    """The text beside each region, and the KOS's description."""
    # The words of the SR's own Comment on the finding.
    lines = [describe(card.finding.meaning, f,
                      comparisons[i - 1].describe() if comparisons[i - 1] else None)
             for i, f in findings]
    labels = [f"AI: {line}"[:_ST_MAX] for line in lines]
    where = "outlined on the image" if len(lines) == 1 else "each outlined on the image"
    description = (f"{'; '.join(lines)}. Found by {_algorithm(card)} ({where}; details in the "
                   "AI structured report).")
    return [*labels, description]


# --------------------------------------------------------------------------
# The source image's look: Modality LUT, VOI, polarity


def _numbers(value) -> list[float] | None:
    """Finite numbers of a DS/IS value (multi-valued or not); None where one is not."""
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = [float(v) for v in values if v is not None and v != ""]
    except (TypeError, ValueError):
        return None
    return numbers if numbers and all(math.isfinite(n) for n in numbers) else None


def _texts_of(value) -> list[str]:
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v) for v in values if v is not None]


def _voi_source(source: Dataset) -> Dataset:
    """Where the source keeps its VOI: the image, else its shared or first frame's group."""
    if "WindowCenter" in source or "VOILUTSequence" in source:
        return source
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = source.get(keyword)
        if groups and "FrameVOILUTSequence" in groups[0] and groups[0].FrameVOILUTSequence:
            return groups[0].FrameVOILUTSequence[0]
    return source


def _window(source: Dataset) -> hd.pr.SoftcopyVOILUTTransformation | None:
    """The source's own VOI, where it has a valid one (PS3.3 C.11.2.1.2)."""
    voi = _voi_source(source)
    function = str(voi.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        function = "LINEAR"
    centers, widths = _numbers(voi.get("WindowCenter")), _numbers(voi.get("WindowWidth"))
    if centers and widths and len(centers) == len(widths):
        # Window Width >= 1 for LINEAR, > 0 for LINEAR_EXACT and SIGMOID.
        pairs = [(c, w) for c, w in zip(centers, widths, strict=True)
                 if (w >= 1 if function == "LINEAR" else w > 0)]
        if pairs:
            explanations = _texts_of(voi.get("WindowCenterWidthExplanation"))
            if len(pairs) != len(centers) or len(explanations) != len(centers) or any(
                    not e.isprintable() or "\\" in e or len(e) > _LO_MAX for e in explanations):
                explanations = []
            several = len(pairs) > 1
            window = hd.pr.SoftcopyVOILUTTransformation(
                window_center=[p[0] for p in pairs] if several else pairs[0][0],
                window_width=[p[1] for p in pairs] if several else pairs[0][1],
                window_explanation=explanations if several and explanations else None,
                voi_lut_function=function if "VOILUTFunction" in voi else None,
            )
            if explanations and not several:  # highdicom would split the string
                window.WindowCenterWidthExplanation = explanations[0]
            return window
    luts = voi.get("VOILUTSequence") if voi is source else None
    if luts:
        try:
            return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[_voi_lut(item) for item in luts])
        except _BUILD_ERRORS:
            log.info("orthanc-ai: presentation state: the source's VOI LUT Sequence is not "
                     "valid; the viewer's default window applies")
    return None


def _voi_lut(item: Dataset) -> hd.VOILUT:
    descriptor = [int(v) for v in item.LUTDescriptor]
    bits = descriptor[2]
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words, unless one byte per entry
        array = np.frombuffer(data, np.uint8 if bits <= 8 and len(data) == descriptor[0]
                              else np.dtype("<u2"))
    else:  # US, as pydicom reads it
        values = list(data) if isinstance(data, MultiValue | list | tuple) else [data]
        array = np.asarray(values, np.uint8 if bits <= 8 else np.uint16)
    explanation = item.get("LUTExplanation")
    return hd.VOILUT(first_mapped_value=descriptor[1], lut_data=array,
                     lut_explanation=str(explanation) if explanation else None)


def _modality_lut(source: Dataset) -> hd.ModalityLUTTransformation | None:
    """The source's rescale (PS3.3 C.11.1); CT values are HU where the image does not say."""
    where = source
    if "RescaleSlope" not in source:
        groups = source.get("SharedFunctionalGroupsSequence")
        if groups and groups[0].get("PixelValueTransformationSequence"):
            where = groups[0].PixelValueTransformationSequence[0]
    slope, intercept = _numbers(where.get("RescaleSlope")), _numbers(where.get("RescaleIntercept"))
    if not slope or not intercept or len(slope) != 1 or len(intercept) != 1:
        return None
    kind = str(where.get("RescaleType") or "").strip().upper()
    if not kind or len(kind) > _LO_MAX or not kind.isprintable() or "\\" in kind:
        kind = "HU" if str(source.get("Modality", "")).upper() == "CT" else "US"
    return hd.ModalityLUTTransformation(rescale_intercept=intercept[0],
                                        rescale_slope=slope[0], rescale_type=kind)


def _presentation_lut(source: Dataset) -> hd.PresentationLUTTransformation:
    inverse = str(source.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    shape = hd.PresentationLUTShapeValues.INVERSE if inverse else \
        hd.PresentationLUTShapeValues.IDENTITY
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


# --------------------------------------------------------------------------
# The objects


def _label_box(region, rows: int, columns: int, text: str) -> tuple[float, float, float, float]:
    """A box for the text (left, top, right, bottom, PIXEL): above the region, else below."""
    height = float(min(rows, max(10.0, rows * 0.025)))
    width = float(min(columns, max(region.col1 - region.col0, 0.5 * height * len(text))))
    left = float(min(max(0.0, region.col0), columns - width))
    if region.row0 - height - 1 >= 0:
        top = region.row0 - height - 1
    elif region.row1 + height + 1 <= rows:
        top = region.row1 + 1
    else:
        top = 0.0
    return left, float(top), left + width, float(top) + height


def _reference(header: Dataset, source: Dataset) -> Dataset:
    """The source as highdicom reads a referenced image: the SR's copy of its patient and
    study attributes and UIDs, and what describes its pixels."""
    image = Dataset()
    image.update(header)
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns"):
        if keyword not in image and keyword in source:
            image[keyword] = source[keyword]
    frames = _numbers(source.get("NumberOfFrames"))
    if frames and frames[0] >= 1:
        image.NumberOfFrames = int(frames[0])
        # highdicom reads a multi-frame image's groups even where it is handed
        # the transformations; they are taken from the source here (above).
        image.SharedFunctionalGroupsSequence = [Dataset()]
        image.PerFrameFunctionalGroupsSequence = []
    return image


def _instance_number(header: Dataset) -> int:
    number = header.get("InstanceNumber")
    return int(number) if isinstance(number, int) and 1 <= number < 2**31 else 1


def build_companions(
    source: Dataset,
    card: ModelCard,
    findings: Sequence[Finding],
    sr: Dataset,
    *,
    comparisons: Sequence[Comparison | None] | None = None,
    now: dt.datetime | None = None,
) -> list[Dataset]:
    """[GSPS, KOS] showing the SR's located positive findings; [] where there is none.

    ``source`` is the header the SR was built from (the key slice's, for a
    volume), ``sr`` the SR, ``comparisons`` aligned with ``findings`` as for
    :func:`inference.report.build_sr`. The GSPS is left out (the KOS alone
    then) for an image that is not grayscale. Raises BadInput where the
    source cannot be referenced (as the SR could not have been built).
    """
    found = located(findings)
    if not found:
        return []
    comparisons = list(comparisons) if comparisons is not None else [None] * len(findings)
    if len(comparisons) != len(findings):
        raise ValueError("comparisons must be aligned with findings")
    *labels, description = _texts(card, found, comparisons)
    own = [card.id, card.name, card.version, *labels, description]
    header = source_header(source, own)
    image = _reference(header, source)
    now = now or dt.datetime.now()
    uids = companion_uids(str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
    common = dict(
        instance_number=_instance_number(header),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=card.id[:_LO_MAX],
        software_versions=software_versions(card),
        institution_name=header.get("InstitutionName") or None,
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0),
        specific_character_set=image.get("SpecificCharacterSet"),
    )
    grayscale = str(source.get("SamplesPerPixel", 1)) == "1" and \
        str(source.get("PhotometricInterpretation", "")).strip() in ("MONOCHROME1", "MONOCHROME2")
    out: list[Dataset] = []
    try:
        with warnings.catch_warnings():
            # highdicom warns about single-component names, quoting the name.
            warnings.simplefilter("ignore", UserWarning)
            gsps = _gsps(image, source, card, sr, found, labels, uids, common) \
                if grayscale else None
            if gsps is not None:
                out.append(gsps)
            out.append(_kos(image, card, sr, gsps, description, uids, common))
    except _BUILD_ERRORS as exc:
        raise _cannot_build(exc) from None
    return out


def _cannot_build(exc: BaseException) -> BadInput:
    """BadInput naming where highdicom refused, never a value (patient data)."""
    where = refused_at(exc)
    log.warning("orthanc-ai: no presentation state or key object selection: %s at %s",
                type(exc).__name__, where)
    return BadInput(f"no presentation state or key object selection can be built from this "
                    f"source's header ({type(exc).__name__} at {where})")


def file_bytes(ds: Dataset) -> bytes:
    """A companion as a DICOM file (Part 10, Explicit VR Little Endian)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _gsps(image: Dataset, source: Dataset, card: ModelCard, sr: Dataset,
          found: Sequence[tuple[int, Finding]], labels: Sequence[str], uids: CompanionUids,
          common: dict) -> hd.pr.GrayscaleSoftcopyPresentationState:
    rows, columns = int(image.Rows), int(image.Columns)
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1,
                               description=f"AI {card.id} {card.version}"[:_LO_MAX],
                               display_color=LAYER_COLOUR)
    graphics, texts = [], []
    for (index, finding), label in zip(found, labels, strict=True):
        region = finding.region
        tracking = {"tracking_id": f"{card.id} finding {index}"[:_LO_MAX],
                    "tracking_uid": _tracking_uid(str(sr.SOPInstanceUID), index)}
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(region.polyline(), dtype=np.float64),
            units=hd.pr.AnnotationUnitsValues.PIXEL, **tracking))
        texts.append(hd.pr.TextObject(
            text_value=label, units=hd.pr.AnnotationUnitsValues.PIXEL,
            bounding_box=_label_box(region, rows, columns, label),
            text_justification=hd.pr.TextJustificationValues.LEFT, **tracking))
    # The frame the model read, where there are several (PS3.3 C.10.5: else all).
    frame = 1 if int(image.get("NumberOfFrames", 1)) > 1 else None
    annotation = hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer,
                                         referenced_frame_number=frame,
                                         graphic_objects=graphics, text_objects=texts)
    voi = _window(source)
    series_uid, sop_uid = uids.presentation_state
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=series_uid,
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        device_serial_number=device_uid(card),
        content_label=CONTENT_LABEL,
        content_description=f"AI {card.finding.meaning} {card.id} {card.version}"[:_LO_MAX],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        modality_lut_transformation=_modality_lut(source),
        voi_lut_transformations=[voi] if voi is not None else None,
        presentation_lut_transformation=_presentation_lut(source),
        series_description=_series_description(card, "annotations"),
        **common,
    )
    # General Series: the side of a paired structure, as the image says it.
    # Laterality is Type 2C (a paired structure without Image Laterality, which
    # a presentation state has not): empty where the image names no side. No
    # Body Part Examined: with it dciodvfy wants Laterality absent for an
    # unpaired part and a value for a paired one, which only a table tells.
    gsps.Laterality = _laterality(source)
    return gsps


def _laterality(source: Dataset) -> str | None:
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def _kos(image: Dataset, card: ModelCard, sr: Dataset,
         gsps: Dataset | None, description: str, uids: CompanionUids,
         common: dict) -> hd.ko.KeyObjectSelectionDocument:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(card), name=card.id, manufacturer_name=MANUFACTURER,
            model_name=_algorithm(card)[:_LO_MAX]),
    )
    report = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        setattr(report, keyword, str(sr[keyword].value))
    content = hd.ko.KeyObjectSelection(document_title=OF_INTEREST,
                                       referenced_objects=[image, report],
                                       observer_device_context=observer,
                                       description=description)
    evidence = [image, report]
    if gsps is not None:
        # The key image shown with its presentation state (Image Reference
        # Macro, PS3.3 Table C.18.4-1: Referenced SOP Sequence of the item).
        (item,) = [i for i in content[0].ContentSequence if i.ValueType == "IMAGE"]
        state = Dataset()
        state.ReferencedSOPClassUID = GrayscaleSoftcopyPresentationStateStorage
        state.ReferencedSOPInstanceUID = gsps.SOPInstanceUID
        item.ReferencedSOPSequence[0].ReferencedSOPSequence = [state]
        evidence.append(gsps)
    series_uid, sop_uid = uids.key_objects
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid,
        series_number=KO_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        series_description=_series_description(card, "key images"),
        content_date=common["series_date"],
        content_time=common["series_time"],
        **common,
    )
    # As the SR: the source's patient and study modules as a whole (issuer of
    # the patient ID, age, study description, ...), not only the Type 2 ones.
    kos.copy_patient_and_study_information(image)
    return kos
