"""The AI result as a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

The content is highdicom's templates (valid by construction):

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

Interval change. With a :class:`~inference.interval.Comparison` for a
finding, its group also holds a second qualitative evaluation, CODE (111049,
DCM, "Qualitative Difference") = the change (CID 6002 / 6134 codes; SCT
"Resolved" for a finding gone), with HAS PROPERTIES children: the prior's
Study Date and Study Instance UID, its probability, the volume difference
(mL), a Comment in words and a COMPOSITE reference to our SR of the prior.
That SR, in another study, is listed in the Pertinent Other Evidence Sequence.

Series and SOP Instance UIDs are derived from the source UIDs and the model
id and version, so processing the same image again yields the same SR (and
Orthanc the same instance ID) instead of a duplicate.

Source values. highdicom copies the source's patient and study modules (and
its equipment, into the Contributing Equipment Sequence) as they are; values
that are invalid there (a PatientSex of ``X``, a PatientAge of ``45``, an
unknown Specific Character Set, an over-long Patient ID, ...) would make the
SR invalid or make highdicom refuse it. :func:`build_sr` first checks each
value that reaches the SR against its VR, VM and enumerated values: a value
with one meaning is normalised (``m`` -> ``M``, ``45`` -> ``045Y``,
``2004-08-26`` -> ``20040826``), any other is left empty (Type 2) or left
out, and the SR says so, by attribute keyword only, among the algorithm
parameters. What cannot be made valid (a source without a valid Study,
Series or SOP Instance UID) raises :class:`~inference.errors.BadInput`.

Speed. A direct highdicom build costs about 25 ms, more than decoding and
predicting the image; :func:`build_sr` builds the content once per model card
and shape of the result (number and kind of findings and parameters, source
SOP class, image library) with highdicom, with placeholder values, and for
each image clones that content, fills in the image's values the way highdicom
would set them, and adds the header highdicom's SR classes would write. The
result equals :func:`build_sr_highdicom` element by element (tests compare
them) in about a tenth of the time. pydicom's writer then costs twice the
build (~9 ms); :func:`sr_bytes` writes the same bytes in about 1 ms, with a
writer for the SR's closed set of value types that mirrors pydicom's and
leaves anything else (and SRs not built by :func:`build_sr`) to ``save_as``.
An SR with interval changes is built by highdicom directly (no template).
"""

from __future__ import annotations

import codecs
import copy
import datetime as dt
import functools
import logging
import math
import re
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pydicom.charset as _charset_module
import pydicom.filewriter as _fw
from highdicom.base_content import ContributingEquipment
from highdicom.sr import CodedConcept
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, Comprehensive3DSRStorage, ExplicitVRLittleEndian
from pydicom.valuerep import (
    AMBIGUOUS_VR,
    DA,
    DS,
    DT,
    EXPLICIT_VR_LENGTH_32,
    TM,
    VALIDATORS,
    format_number_as_ds,
)

from .card import Code, ModelCard
from .errors import BadInput, JobOutcome
from .interval import Change, Comparison
from .postprocess import Finding, Region, describe
from .uids import derived_uid
from .version import __version__

log = logging.getLogger(__name__)


def _memoise_iod_pixel_check() -> None:
    """Cache highdicom's "does this SOP class have pixel data" answer per SOP class.

    The Image Library (TID 1600) and the Contributing Equipment item of the
    source ask it for every image, and each answer scans the standard's module
    tables: 12 % of a worker's time in a profile of 200 radiographs, 1 ms per
    SR. The answer depends on the SOP Class UID alone, so a cache changes
    nothing but the time.
    """
    import highdicom.base_content as base_content
    import highdicom.sr.templates as templates

    for module in (templates, base_content):
        check = getattr(module, "does_iod_have_pixel_data", None)
        if check is not None and not hasattr(check, "cache_info"):
            module.does_iod_have_pixel_data = functools.lru_cache(maxsize=256)(check)


_memoise_iod_pixel_check()

MANUFACTURER = "orthanc-ai"


def software_versions(card: ModelCard) -> list[str]:
    """Software Versions (0018,1020), VM 1-n: the product's version, then the model's.

    The model's version alone names the algorithm (it is also in the TID 4019
    Algorithm Identification); the product's tells which orthanc-ai built the
    object. Each value is an LO (64 characters at most).
    """
    return [__version__[:64], card.version[:64]]


SR_SERIES_NUMBER = 9901
UNIT_NONE = CodedConcept("1", "UCUM", "no units")
UNIT_ML = CodedConcept("mL", "UCUM", "milliliter")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
PLAIN_RADIOGRAPHY = CodedConcept("168537006", "SCT", "Plain radiography")
CT_PROCEDURE = CodedConcept("77477000", "SCT", "CT")

# Interval change (see "Interval change" in the module docstring).
QUALITATIVE_DIFFERENCE = CodedConcept("111049", "DCM", "Qualitative Difference")
STUDY_DATE = CodedConcept("111060", "DCM", "Study Date")
STUDY_INSTANCE_UID = CodedConcept("110180", "DCM", "Study Instance UID")
DIFFERENCE_IN_SIZE = CodedConcept("129806009", "SCT", "Difference in size")
COMMENT = CodedConcept("121106", "DCM", "Comment")
PRIOR_REPORT = CodedConcept("122075", "DCM", "Prior report for current patient")
CHANGE_CODES = {
    Change.NEW: CodedConcept("129721008", "SCT", "New finding"),
    Change.UNCHANGED: CodedConcept("129723006", "SCT", "No significant changes in the finding"),
    Change.INCREASED: CodedConcept("15454001", "SCT", "Increase in size"),
    Change.DECREASED: CodedConcept("19776001", "SCT", "Decrease in size"),
    Change.RESOLVED: CodedConcept("723506003", "SCT", "Resolved"),
}

# Exceptions highdicom and pydicom raise for values they refuse.
_BUILD_ERRORS = (AttributeError, KeyError, IndexError, TypeError, ValueError, LookupError,
                 UnicodeError, OverflowError)


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


# --------------------------------------------------------------------------
# Source values: what highdicom copies into the SR, checked and normalised.

# The references: without valid ones the SR cannot point at its source.
_REFERENCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
# Type 2 in the Patient and General Study modules; highdicom reads each of them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")
# Read for the source's item of the Contributing Equipment Sequence.
_EQUIPMENT = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
              "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress",
              "StationName", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")
# Read for the Image Library entry (TID 1602-1604).
_LIBRARY = ("Modality", "Rows", "Columns", "FrameOfReferenceUID", "PatientOrientation",
            "ImagerPixelSpacing", "PixelSpacing", "ImageOrientationPatient",
            "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices")
_INSTANCE = ("InstanceNumber",)

# Enumerated values (PS3.3) of attributes in the copied modules: any other
# value is an error for dciodvfy.
_ENUMERATED: dict[str, frozenset] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "PregnancyStatus": frozenset({1, 2, 3, 4}),
}
# Spelled-out values with one meaning.
_SYNONYMS = {"PatientSex": {"MALE": "M", "FEMALE": "F", "OTHER": "O"}}

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # TAB LF FF CR ESC ok
# Stricter than pydicom's, which also accepts query ranges ("20040826-").
_STRICT = {
    "AS": re.compile(r"\d{3}[DWMY]"),
    "DA": re.compile(r"\d{8}"),
    "TM": re.compile(r"(?:[01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?"),
    "DT": re.compile(r"\d{4}(?:(?:0[1-9]|1[0-2])(?:(?:0[1-9]|[12]\d|3[01])(?:(?:[01]\d|2[0-3])"
                     r"(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?)?)?)?"
                     r"(?:[+-](?:0\d|1[0-4])[0-5]\d)?"),
}
_MAX_LEN = {"DT": 26, "TM": 14}
_AS_LOOSE = re.compile(r"0*(\d{1,3})\s*([DWMY]?)", re.IGNORECASE)
_DA_LOOSE = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_TM_LOOSE = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")


@dataclass(frozen=True)
class _Attr:
    """A source attribute that reaches the SR, and what its absence would mean."""

    tag: int
    keyword: str
    kind: str  # "module", "uid", "equipment", "library", "instance"
    type: str = "3"  # attribute type in its module ("1", "1C", "2", "2C", "3")
    module: str = ""  # module key, for modules that go as a whole
    usage: str = ""  # module usage in the source IOD ("M", "C", "U")


@functools.lru_cache(maxsize=64)
def _source_attributes(sop_class: str) -> tuple[_Attr, ...] | None:
    """The root attributes highdicom copies from an image of this SOP class, and those it reads.

    highdicom copies the root attributes of every module of the Patient and
    Study information entities of the source's IOD; None for a SOP class it
    does not know (it could not build the SR).
    """
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map().get(sop_class)
    if iod is None:
        return None
    found: dict[int, _Attr] = {}
    for module in get_iod_module_map()[iod]:
        if module["ie"] not in ("Patient", "Study"):
            continue
        for item in get_module_attribute_map()[module["key"]]:
            tag = tag_for_keyword(str(item["keyword"]))
            if item["path"] or tag is None or tag in found:
                continue
            kind = "uid" if item["keyword"] in _REFERENCE_UIDS else "module"
            found[tag] = _Attr(tag, str(item["keyword"]), kind, str(item["type"]),
                               str(module["key"]), str(module["usage"]))
    for kind, keywords in (("uid", _REFERENCE_UIDS), ("equipment", _EQUIPMENT),
                           ("library", _LIBRARY), ("instance", _INSTANCE)):
        for keyword in keywords:
            tag = tag_for_keyword(keyword)
            if tag not in found:
                found[tag] = _Attr(tag, keyword, kind)
    if not all(tag_for_keyword(k) in found and found[tag_for_keyword(k)].kind in ("module", "uid")
               for k in _TYPE2):
        return None  # not an IOD with the Patient and General Study modules
    return tuple(found.values())


def _values(value: Any) -> list[Any]:
    if value is None or (isinstance(value, str | bytes) and not value):
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _is_date(s: str) -> bool:
    try:
        dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return False
    return True


def _valid_text(vr: str, s: Any, keyword: str) -> bool:
    """One value of a string VR, as dciodvfy would accept it."""
    if not isinstance(s, str):
        return False
    if (_CONTROL_FREE_TEXT if vr in _FREE_TEXT_VRS else _CONTROL).search(s):
        return False
    strict = _STRICT.get(vr)
    if strict is not None:
        if not strict.fullmatch(s) or len(s) > _MAX_LEN.get(vr, 64):
            return False
        if vr in ("DA", "DT") and len(s) >= 8 and not _is_date(s):
            return False
    else:
        validator = VALIDATORS.get(vr)
        if validator is not None and not validator(vr, s)[0]:
            return False
    if vr == "PN" and any(len(group.split("^")) > 5 for group in s.split("=")):
        return False
    if vr == "DS" and not math.isfinite(float(s)):
        return False
    if vr == "IS" and not -(2**31) <= int(s) < 2**31:
        return False
    allowed = _ENUMERATED.get(keyword)
    return allowed is None or s in allowed


def _tidy_person_name(s: str) -> str:
    groups = []
    for group in s.split("="):
        parts = [p.strip() for p in group.split("^")]
        while parts and not parts[-1]:
            parts.pop()
        groups.append("^".join(parts))
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _normalised_text(vr: str, s: str, keyword: str) -> str | None:
    """The value with the same meaning in valid form, or None where there is no such value."""
    s = s.rstrip(" \x00") if vr in _FREE_TEXT_VRS else s.strip(" \x00")
    if vr == "CS":
        s = s.upper()
        s = _SYNONYMS.get(keyword, {}).get(s, s)
    elif vr == "AS":
        m = _AS_LOOSE.fullmatch(s)
        if m:
            s = f"{int(m[1]):03d}{(m[2] or 'Y').upper()}"
    elif vr == "DA":
        m = _DA_LOOSE.fullmatch(s)
        if m:
            s = "".join(m.groups())
    elif vr == "TM":
        m = _TM_LOOSE.fullmatch(s)
        if m:
            s = "".join(g or "" for g in m.groups())
    elif vr == "DS":
        try:
            number = float(s)
        except ValueError:
            return None
        if math.isfinite(number) and not _valid_text(vr, s, keyword):
            s = format_number_as_ds(number)
    elif vr == "IS":
        try:
            number = float(s)
        except ValueError:
            return None
        if number.is_integer():
            s = str(int(number))
    elif vr == "PN":
        s = _tidy_person_name(s)
    return s if s == "" or _valid_text(vr, s, keyword) else None


def _vm_ok(tag: int, n: int) -> bool:
    if n == 0:
        return True
    try:
        spec = dictionary_VM(tag).strip()
        if spec.isdigit():
            return n == int(spec)
        low, high = spec.split("-")
        if high.endswith("n"):
            return n >= int(low) and n % int(high[:-1] or 1) == 0
        return int(low) <= n <= int(high)
    except (KeyError, ValueError):
        return True


def _as_text(v: Any) -> Any:
    return v if isinstance(v, str | bytes) else str(v)


def _check(elem: DataElement, keyword: str) -> tuple[str, Any]:
    """("ok", None), ("fixed", new value) or ("bad", None) for one element."""
    vr = elem.VR
    if vr == "SQ":
        return ("ok", None) if all(_item_ok(item) for item in elem.value) else ("bad", None)
    values = _values(elem.value)
    if vr in _TEXT_VRS:
        texts = [_as_text(v) for v in values]
        if _vm_ok(elem.tag, len(texts)) and all(_valid_text(vr, s, keyword) for s in texts):
            return "ok", None
        if not all(isinstance(s, str) for s in texts):
            return "bad", None
        fixed = [_normalised_text(vr, s, keyword) for s in texts]
        while fixed and fixed[-1] == "":
            fixed.pop()
        if any(f is None for f in fixed) or not _vm_ok(elem.tag, len(fixed)):
            return "bad", None
        return "fixed", (fixed[0] if len(fixed) == 1 else fixed) if fixed else None
    if vr in _NUMBER_VRS:
        validator = VALIDATORS[vr]
        allowed = _ENUMERATED.get(keyword)
        if all(validator(vr, v)[0] and (allowed is None or v in allowed) for v in values) \
                and _vm_ok(elem.tag, len(values)):
            return "ok", None
        return "bad", None
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV"):
        return "ok", None
    return "bad", None  # UN and the like: nothing to check it against


def _item_ok(item: Dataset) -> bool:
    for tag in list(item.keys()):
        if tag.is_private:
            continue
        try:
            elem = item[tag]
        except Exception:  # a value pydicom cannot even convert
            return False
        if _check(elem, elem.keyword)[0] != "ok":
            return False
    return True


# Specific Character Set ---------------------------------------------------

_SINGLE_CHARSETS = ("ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144",
                    "ISO_IR 127", "ISO_IR 126", "ISO_IR 138", "ISO_IR 148", "ISO_IR 203",
                    "ISO_IR 13", "ISO_IR 166", "ISO_IR 192", "GB18030", "GBK")
_EXTENSION_CHARSETS = ("ISO 2022 IR 6", "ISO 2022 IR 100", "ISO 2022 IR 101", "ISO 2022 IR 109",
                       "ISO 2022 IR 110", "ISO 2022 IR 144", "ISO 2022 IR 127",
                       "ISO 2022 IR 126", "ISO 2022 IR 138", "ISO 2022 IR 148",
                       "ISO 2022 IR 203", "ISO 2022 IR 13", "ISO 2022 IR 166")
_MULTIBYTE_CHARSETS = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
_UTF8 = "ISO_IR 192"


def _canonical(term: str) -> str:
    return re.sub(r"[\s_\-]", "", term.upper())


@functools.lru_cache(maxsize=1)
def _charset_spellings() -> dict[str, str]:
    """Ways a Specific Character Set term is spelled, to the defined term (or "" for ASCII)."""
    terms = _SINGLE_CHARSETS + _EXTENSION_CHARSETS + _MULTIBYTE_CHARSETS
    found = {_canonical(t): t for t in terms}
    found.update({"ISOIR6": "", "ASCII": "", "USASCII": ""})
    for term in _SINGLE_CHARSETS:  # Python's names: latin1, utf-8, ...
        codec = python_encoding.get(term)
        if codec:
            found.setdefault(codecs.lookup(codec).name, term)
    return found


def _charset_term(term: str) -> str | None:
    term = term.strip()
    if term in _SINGLE_CHARSETS or term in _EXTENSION_CHARSETS or term in _MULTIBYTE_CHARSETS:
        return term
    spellings = _charset_spellings()
    if _canonical(term) in spellings:
        return spellings[_canonical(term)]
    try:
        return spellings.get(codecs.lookup(term).name)
    except LookupError:
        return None


def _charset(raw: Any) -> tuple[str | list[str] | None, bool]:
    """(Specific Character Set in the form highdicom accepts, whether it is the source's).

    ("?", False) where the value cannot be read as any character set.
    """
    terms = _values(raw)
    if not terms:
        return None, True
    if len(terms) == 1:
        term = _charset_term(str(terms[0]))
        if term is None or term in _MULTIBYTE_CHARSETS:
            return "?", False
        if term in _EXTENSION_CHARSETS:  # alone, the code extension is the plain set
            term = "" if term == "ISO 2022 IR 6" else term.replace("ISO 2022 IR", "ISO_IR")
        return term or None, term == terms[0]
    converted = []
    for i, raw_term in enumerate(terms):
        term = "ISO 2022 IR 6" if i == 0 and not str(raw_term).strip() else \
            _charset_term(str(raw_term))
        if term in _SINGLE_CHARSETS and term.startswith("ISO_IR"):
            term = term.replace("ISO_IR", "ISO 2022 IR")
        if term is None or term == "" or term in ("ISO 2022 IR 192",):
            return "?", False
        if term in _SINGLE_CHARSETS or (i == 0 and term in _MULTIBYTE_CHARSETS):
            return "?", False
        converted.append(term)
    return converted, converted == [str(t) for t in terms]


def _highdicom_charset(raw: Any) -> tuple[str | list[str] | None, bool]:
    """_charset, where highdicom accepts the result (it refuses some valid terms)."""
    charset, same = _charset(raw)
    if charset not in (None, "?"):
        try:
            hd.valuerep._check_specific_character_set(charset)
        except ValueError:
            return "?", False
    return charset, same


def _encodable(texts: Iterable[str], charset: str | list[str] | None) -> bool:
    terms = [charset] if isinstance(charset, str) else list(charset or [])
    names = [python_encoding[t] for t in terms] if terms else []
    if not terms or terms[0] == "ISO 2022 IR 6":
        names = ["ascii", *names[1:]]
    for text in texts:
        if text.isascii():
            continue
        try:
            text.encode(names[0])
            continue
        except (UnicodeError, IndexError):
            pass
        if not all(any(_encodes(c, n) for n in names[1:]) for c in text):
            return False
    return True


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except UnicodeError:
        return False
    return True


def _texts(ds: Dataset) -> Iterable[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _texts(item)
        elif elem.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC"):
            for v in _values(elem.value):
                yield str(v)


def _with_dictionary_vr(elem: DataElement, keyword: str, status: str,
                        fixed: Any) -> tuple[str, Any, DataElement]:
    """An element written with another VR than the standard's, in the standard's VR."""
    vr = dictionary_VR(elem.tag)
    if " or " in vr or vr == "SQ" or elem.VR not in _TEXT_VRS or vr not in _TEXT_VRS:
        return "bad", None, elem
    value = fixed if status == "fixed" else elem.value
    texts = [_as_text(v) for v in _values(value)]
    if not all(isinstance(t, str) for t in texts):
        return "bad", None, elem
    try:
        retyped = DataElement(elem.tag, vr, (texts[0] if len(texts) == 1 else texts) or None,
                              validation_mode=pydicom.config.IGNORE)
    except (TypeError, ValueError, OverflowError):
        return "bad", None, elem
    status, fixed = _check(retyped, keyword)
    if status == "ok":
        return "fixed", retyped.value, retyped
    return status, fixed, retyped


def _uid_or_bad_input(source: Dataset, keyword: str) -> str:
    try:
        value = source.get(keyword)
    except Exception:  # unreadable is as bad as absent
        value = None
    if isinstance(value, str) and value and _valid_text("UI", value, keyword):
        return value
    raise BadInput(f"the source's {keyword} is missing or not a valid UID; "
                   "an SR cannot reference it")


def _sanitised_header(source: Dataset, own_texts: Sequence[str]) -> tuple[Dataset, list[str]]:
    """The source attributes the SR needs, each valid, and a note per value changed or dropped.

    Notes name the attribute keyword only, never a value. Raises BadInput
    where the source cannot be referenced at all.
    """
    sop_class = _uid_or_bad_input(source, "SOPClassUID")
    for keyword in _REFERENCE_UIDS[1:]:
        _uid_or_bad_input(source, keyword)
    attributes = _source_attributes(sop_class)
    if attributes is None:
        raise BadInput("the source's SOP Class is not an image storage class highdicom "
                       "knows; an SR cannot copy its patient and study modules")
    by_tag = {a.tag: a for a in attributes}
    notes: list[str] = []

    def note(attr: _Attr, what: str) -> None:
        notes.append(f"source {attr.keyword} {what}")
        log.info("orthanc-ai: SR: source attribute %s %s", attr.keyword, what)

    header = Dataset()
    dropped_modules: set[str] = set()
    for tag in list(source.keys()):
        attr = by_tag.get(tag)
        if attr is None:
            continue
        try:
            elem = source[tag]
        except Exception:  # pydicom could not convert the value
            elem = None
        if attr.kind == "uid":
            header.add(elem)  # checked above
            continue
        status, fixed = _check(elem, attr.keyword) if elem is not None else ("bad", None)
        if elem is not None and status != "bad" and elem.VR != dictionary_VR(tag):
            status, fixed, elem = _with_dictionary_vr(elem, attr.keyword, status, fixed)
        empty = elem is not None and elem.VR != "SQ" and not _values(elem.value)
        if attr.kind == "library" and empty:
            continue  # nothing to describe the image with: highdicom leaves the library out
        if status == "ok" and empty and attr.kind == "module" and attr.type == "1":
            status = "bad"
        if status == "ok":
            header.add(elem)
        elif status == "fixed":
            header.add(DataElement(tag, elem.VR, fixed))
            note(attr, "normalised")
        elif attr.kind == "module" and attr.type in ("2", "2C"):
            vr = elem.VR if elem is not None else dictionary_VR(tag)
            header.add(DataElement(tag, vr, [] if vr == "SQ" else None))
            note(attr, "invalid, left empty")
        else:
            note(attr, "invalid, left out")
            if attr.kind == "module" and attr.type == "1" and attr.usage != "M":
                dropped_modules.add(attr.module)  # a user module without it is invalid
    for attr in attributes:
        if attr.module in dropped_modules and attr.tag in header:
            del header[attr.tag]
            note(attr, "left out with its module")
    for keyword in _TYPE2:
        if keyword not in header:
            tag = tag_for_keyword(keyword)
            header.add(DataElement(tag, dictionary_VR(tag), None))
    if str(header.get("PatientID") or "").strip() != str(source.get("PatientID") or "").strip():
        # PACS and Orthanc file an instance by its PatientID (Orthanc hashes it
        # into the IDs): an SR with another one would land with another patient.
        raise BadInput("the source's PatientID is not a valid LO value; an SR cannot carry "
                       "it, and one with another PatientID would be filed under another patient")

    charset, same = _highdicom_charset(source.get("SpecificCharacterSet"))
    texts = [*_texts(header), *own_texts]
    if charset == "?" or not _encodable(texts, charset):
        charset = None if all(t.isascii() for t in texts) else _UTF8
        same = False
    if not same:
        notes.append("source SpecificCharacterSet normalised")
        log.info("orthanc-ai: SR: source attribute SpecificCharacterSet normalised")
    if charset is not None:
        header.SpecificCharacterSet = charset
    return header, notes


def source_header(source: Dataset, own_texts: Sequence[str] = ()) -> Dataset:
    """The source's attributes as the SR copies them, each valid, for other objects
    that reference the source the same way (inference.presentation).

    ``own_texts`` are the texts the new object adds (for its character set).
    Raises BadInput where the source cannot be referenced, as build_sr does.
    """
    return _sanitised_header(source, [MANUFACTURER, *own_texts])[0]


# --------------------------------------------------------------------------
# What both builds start from.


@dataclass
class _Prepared:
    header: Dataset
    parameters: list[str] | None
    series_uid: str
    sop_uid: str
    instance_number: int
    institution: str | None
    procedure: CodedConcept
    now: dt.datetime
    predecessor: Dataset | None


def _own_texts(card: ModelCard, missing_inputs: Sequence[str], notes: Sequence[str],
               comparisons: Sequence[Comparison | None] = ()) -> list[str]:
    texts = [card.id, card.name, card.version, card.finding.meaning, MANUFACTURER,
             *missing_inputs, *notes, *(c.describe() for c in comparisons if c is not None)]
    if card.finding_site:
        texts.append(card.finding_site.meaning)
    return [str(t) for t in texts]


def _prepare(source: Dataset, card: ModelCard, *, missing_inputs: Sequence[str],
             notes: Sequence[str], uids: tuple[str, str] | None,
             predecessor: Dataset | None, now: dt.datetime | None,
             comparisons: Sequence[Comparison | None] = ()) -> _Prepared:
    header, source_notes = _sanitised_header(
        source, _own_texts(card, missing_inputs, notes, comparisons))
    series_uid, sop_uid = uids or sr_uids(header, card)
    number = header.get("InstanceNumber")
    if isinstance(number, int) and 1 <= number < 2**31:
        instance_number = int(number)
    else:
        if number not in (None, ""):
            source_notes.append("source InstanceNumber invalid, 1 used")
        instance_number = 1
    parameters = [f"missing input: {m}" for m in missing_inputs] + [
        f"note: {n}" for n in (*notes, *source_notes)
    ] or None
    pre = None
    if predecessor is not None:
        pre = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in predecessor:
                raise BadInput(f"the predecessor SR has no {keyword}")
            pre.add(predecessor[keyword])
    return _Prepared(
        header=header,
        parameters=parameters,
        series_uid=series_uid,
        sop_uid=sop_uid,
        instance_number=instance_number,
        institution=header.get("InstitutionName") or None,
        procedure=CT_PROCEDURE if header.get("Modality") == "CT" else PLAIN_RADIOGRAPHY,
        now=now or dt.datetime.now(),
        predecessor=pre,
    )


def _tracking_uid(sop_uid: str, index: int) -> str:
    return derived_uid("orthanc-ai/tracking", sop_uid, str(index))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


def _prior_sr_evidence(comparison: Comparison) -> Dataset | None:
    """Our SR of the prior, as an evidence item for highdicom; None where there is none to cite."""
    prior = comparison.prior_sr
    if prior is None:
        return None
    uids = {"StudyInstanceUID": prior.study_instance_uid,
            "SeriesInstanceUID": prior.series_instance_uid,
            "SOPInstanceUID": prior.sop_instance_uid, "SOPClassUID": prior.sop_class_uid}
    if not all(_valid_text("UI", str(v), k) for k, v in uids.items()):
        log.info("orthanc-ai: SR: the prior SR's UIDs are not valid; it is not referenced")
        return None
    ds = Dataset()
    for keyword, value in uids.items():
        setattr(ds, keyword, str(value))
    return ds


def _qualitative_difference(comparison: Comparison) -> hd.sr.QualitativeEvaluation:
    """The interval change as a qualitative evaluation, with what it was compared with.

    CODE (111049, DCM, "Qualitative Difference") = the change, with HAS
    PROPERTIES children: the prior's Study Date (DATE, when valid) and Study
    Instance UID (UIDREF, when valid), its probability (NUM), the volume
    difference (NUM, mL, when measured), a Comment (TEXT) and our SR of the
    prior (COMPOSITE, when known).
    """
    evaluation = hd.sr.QualitativeEvaluation(
        name=QUALITATIVE_DIFFERENCE, value=CHANGE_CODES[Change(comparison.change)])
    has = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    children: list[hd.sr.ContentItem] = []
    date = _normalised_text("DA", str(comparison.prior_study_date or ""), "StudyDate")
    if date:
        children.append(hd.sr.DateContentItem(name=STUDY_DATE, value=date,
                                               relationship_type=has))
    uid = str(comparison.prior_study_uid or "")
    if _valid_text("UI", uid, "StudyInstanceUID"):
        children.append(hd.sr.UIDRefContentItem(name=STUDY_INSTANCE_UID, value=uid,
                                                relationship_type=has))
    if _finite(comparison.prior.probability):
        children.append(hd.sr.NumContentItem(
            name=PROBABILITY, value=round(float(comparison.prior.probability), 6),
            unit=UNIT_NONE, relationship_type=has))
    if _finite(comparison.volume_difference_ml):
        children.append(hd.sr.NumContentItem(
            name=DIFFERENCE_IN_SIZE, value=round(float(comparison.volume_difference_ml), 3),
            unit=UNIT_ML, relationship_type=has))
    children.append(hd.sr.TextContentItem(name=COMMENT, value=comparison.describe(),
                                          relationship_type=has))
    if _prior_sr_evidence(comparison) is not None:
        prior = comparison.prior_sr
        children.append(hd.sr.CompositeContentItem(
            name=PRIOR_REPORT, referenced_sop_class_uid=prior.sop_class_uid,
            referenced_sop_instance_uid=prior.sop_instance_uid, relationship_type=has))
    evaluation[0].ContentSequence = children
    return evaluation


def _measurement_report(card: ModelCard, findings: Sequence[Finding],
                        parameters: list[str] | None, sop_class: str, src_uid: str,
                        tracking_uids: Sequence[str], procedure: CodedConcept,
                        library: Dataset | None,
                        comparisons: Sequence[Comparison | None] | None = None,
                        comments: Sequence[str] | None = None,
                        ) -> hd.sr.MeasurementReport:
    """The TID 1500 content, built by highdicom (for a real image or with placeholders).

    Two additions are for viewers, OHIF 3.13 among them. Each group has a
    Comment (TEXT) with the finding in words, which OHIF takes as the
    measurement's label. A located finding's Image Region is also given
    under its first NUM as INFERRED FROM (TID 300's coordinates of the
    measurement): OHIF's TID 1500 import looks for it only there, and without it
    the region cannot be loaded into the measurement panel.
    """
    if comments is None:
        comments = [finding_words(card, finding, comparisons[i] if comparisons else None)
                    for i, finding in enumerate(findings)]
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
    groups: list = []
    for index, finding in enumerate(findings, start=1):
        tracking = hd.sr.TrackingIdentifier(
            uid=tracking_uids[index - 1],
            identifier=f"{card.id} finding {index}",
        )
        located = finding.positive and finding.region is not None
        graphic = np.asarray(finding.region.polyline(), dtype=np.float64) if located else None
        measurements = [hd.sr.Measurement(
            name=PROBABILITY,
            value=round(float(finding.probability), 6),
            unit=UNIT_NONE,
            algorithm_id=algorithm,
        )]
        if finding.volume_ml is not None:
            measurements.append(hd.sr.Measurement(
                name=VOLUME, value=round(float(finding.volume_ml), 3), unit=UNIT_ML,
                algorithm_id=algorithm,
            ))
        presence = hd.sr.QualitativeEvaluation(
            name=finding_type,
            value=codes.SCT.Present if finding.positive else codes.SCT.Absent,
        )
        evaluations = [presence]
        comparison = comparisons[index - 1] if comparisons else None
        if comparison is not None:
            evaluations.append(_qualitative_difference(comparison))
        if located:
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=graphic,
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
                    qualitative_evaluations=evaluations,
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
                    qualitative_evaluations=evaluations,
                    source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class, src_uid)],
                )
            )
        content = groups[-1][0].ContentSequence
        if located:
            # TID 1419 is extensible; highdicom's constructor refuses coordinates there.
            probability = next(item for item in content if item.ValueType == "NUM")
            probability.ContentSequence.append(hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=graphic,
                source_image=hd.sr.SourceImageForRegion(sop_class, src_uid)))
        content.append(hd.sr.TextContentItem(
            name=COMMENT, value=comments[index - 1],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
        referenced_images=[library] if library is not None else None,
    )


def finding_words(card: ModelCard, finding: Finding, comparison: Comparison | None = None) -> str:
    """The finding in words ("Fracture present, probability 0.63"), with its interval change."""
    return describe(card.finding.meaning, finding, comparison.brief() if comparison else None)


def _series_description(card: ModelCard) -> str:
    return f"AI {card.name} {card.version}"[:64]


def _build_highdicom(card: ModelCard, findings: Sequence[Finding], prep: _Prepared,
                     comparisons: Sequence[Comparison | None] | None = None,
                     ) -> hd.sr.Comprehensive3DSR:
    header = prep.header
    sop_class, src_uid = str(header.SOPClassUID), str(header.SOPInstanceUID)
    tracking = [_tracking_uid(prep.sop_uid, i) for i in range(1, len(findings) + 1)]
    # TID 1600 (Image Library) is optional; highdicom needs the geometry
    # attributes of TID 1603/1604 to describe an image, which real-world
    # images may lack. The source image stays referenced by every group.
    try:
        report = _measurement_report(card, findings, prep.parameters, sop_class, src_uid,
                                     tracking, prep.procedure, header, comparisons)
    except _BUILD_ERRORS:
        report = _measurement_report(card, findings, prep.parameters, sop_class, src_uid,
                                     tracking, prep.procedure, None, comparisons)
    # Our SRs of prior studies that the content references: in another study,
    # highdicom lists them in the Pertinent Other Evidence Sequence.
    evidence = [header]
    for comparison in comparisons or ():
        prior = _prior_sr_evidence(comparison) if comparison is not None else None
        if prior is not None:
            evidence.append(prior)
    now = prep.now
    with warnings.catch_warnings():
        # highdicom warns about single-component names, quoting the name.
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=prep.series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=prep.sop_uid,
            instance_number=prep.instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            previous_versions=[prep.predecessor] if prep.predecessor is not None else None,
            series_description=_series_description(card),
            manufacturer_model_name=card.id[:64],
            software_versions=software_versions(card),
            institution_name=prep.institution,
            content_date=now.date(),
            content_time=now.time().replace(microsecond=0),
            series_date=now.date(),
            series_time=now.time().replace(microsecond=0),
        )


# --------------------------------------------------------------------------
# The fast build: highdicom's content, built once per card and shape.

# The emulation of highdicom's SR header below follows these versions
# (pinned in pyproject.toml); with others build_sr uses highdicom directly.
_FAST_VERSIONS = ("0.28.2", "3.0.2")
_FAST = (hd.__version__, pydicom.__version__) == _FAST_VERSIONS

_PH_SOURCE = "2.25.1"  # placeholder SOP Instance UID of the source image
_PH_FRAME = "2.25.2"  # placeholder Frame of Reference UID
_PH_TEXT = "ZZORTHANCAIPH{:03d}"  # placeholder texts (valid CS), patient orientation
_CROSS_SECTIONAL = ("CT", "MR", "PT")  # as highdicom's TID 1602 tells them
_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _ph_tracking(index: int) -> str:
    return f"2.25.{1000 + index}"


def _ph_parameter(index: int) -> str:
    return f"@@orthanc-ai parameter {index}@@"


def _ph_comment(index: int) -> str:
    return f"@@orthanc-ai comment {index}@@"


def _ph_probability(index: int) -> float:
    return round(0.000101 + 0.000001 * index, 6)


def _ph_volume(index: int) -> float:
    return round(1000.101 + index, 3)


def _ph_polyline(index: int) -> Region:
    return Region(10.0 + index, 20.0, 30.5 + index, 40.25)


# Image library inputs: (keyword, index or None, placeholder) per branch.
_LIBRARY_COMMON = (("Rows", None, 40001), ("Columns", None, 40002))
_LIBRARY_PROJECTION = (("PatientOrientation", 0, _PH_TEXT.format(1)),
                       ("PatientOrientation", 1, _PH_TEXT.format(2)),
                       ("ImagerPixelSpacing", 0, "0.40003"), ("ImagerPixelSpacing", 1, "0.40004"))
_LIBRARY_CROSS = (("PixelSpacing", 0, "0.40005"), ("PixelSpacing", 1, "0.40006"),
                  ("SliceThickness", None, "0.40007"),
                  *(("ImagePositionPatient", i, f"0.4001{i}") for i in range(3)),
                  *(("ImageOrientationPatient", i, f"0.4002{i}") for i in range(6)))
_LIBRARY_SPACING = (("SpacingBetweenSlices", None, "0.40030"),)


def _library_inputs(shape: tuple) -> tuple:
    _, _, branch, _, spacing = shape
    inputs = _LIBRARY_COMMON
    if branch == "projection":
        inputs += _LIBRARY_PROJECTION
    elif branch == "cross":
        inputs += _LIBRARY_CROSS + (_LIBRARY_SPACING if spacing else ())
    return inputs


def _library_value(header: Dataset, keyword: str, index: int | None) -> Any:
    value = header.get(keyword)
    return value if index is None else value[index]


_NO_LIBRARY = "none"


def _library_shape(header: Dataset) -> tuple | str | None:
    """What highdicom's library entry for this image looks like, where its values are plain.

    _NO_LIBRARY where an attribute highdicom reads for it is absent (it would
    raise, and the library is left out); None where highdicom itself should
    decide (unusual values): then the library comes from highdicom per image.
    """
    modality = header.get("Modality")
    if modality is None or "Rows" not in header or "Columns" not in header:
        return _NO_LIBRARY
    if not isinstance(modality, str) or not modality:
        return None
    branch = "cross" if modality in _CROSS_SECTIONAL else \
        "projection" if modality in _PROJECTION else "other"
    frame = header.get("FrameOfReferenceUID")
    shape = (str(header.SOPClassUID), modality, branch, frame is not None,
             branch == "cross" and "SpacingBetweenSlices" in header)
    if any(keyword not in header for keyword, _, _ in _library_inputs(shape)):
        return _NO_LIBRARY
    if frame is not None and not (isinstance(frame, str) and frame):
        return None
    for keyword, index, placeholder in _library_inputs(shape):
        value = header.get(keyword)
        if index is not None:
            if not isinstance(value, MultiValue) or len(value) <= index:
                return None
            value = value[index]
        if isinstance(placeholder, int):
            if type(value) is bool or not isinstance(value, int):
                return None
        elif placeholder.startswith("ZZ"):
            if not isinstance(value, str) or not value:
                return None
        elif not isinstance(value, float) or not math.isfinite(value):
            return None
    return shape


def _library_placeholder(shape: tuple) -> Dataset:
    sop_class, modality, _, frame, _ = shape
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _PH_SOURCE
    ds.Modality = modality
    if frame:
        ds.FrameOfReferenceUID = _PH_FRAME
    grouped: dict[str, list] = {}
    for keyword, index, placeholder in _library_inputs(shape):
        if index is None:
            setattr(ds, keyword, placeholder)
        else:
            grouped.setdefault(keyword, []).append(placeholder)
    for keyword, values in grouped.items():
        setattr(ds, keyword, values)
    return ds


@dataclass
class _Template:
    root: Dataset  # root content item of the measurement report, with placeholders
    slots: dict[int, tuple]  # id() of a template element -> what to fill in


def _walk(ds: Dataset) -> Iterable[Dataset]:
    yield ds
    for elem in ds.values():
        if isinstance(elem, DataElement) and elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _make_template(card: ModelCard, sop_class: str, procedure: CodedConcept, n_parameters: int,
                   shapes: tuple, library: tuple | None) -> _Template | None:
    """highdicom's content for this shape of result, with a slot per per-image value."""
    parameters = [_ph_parameter(j) for j in range(n_parameters)] or None
    findings = []
    for i, (planar, positive, volume) in enumerate(shapes):
        findings.append(Finding(_ph_probability(i), 0.0 if positive else 1.0,
                                _ph_polyline(i) if planar else None,
                                _ph_volume(i) if volume else None))
    tracking = [_ph_tracking(i) for i in range(len(shapes))]
    placeholder = _library_placeholder(library) if library is not None else None
    try:
        report = _measurement_report(card, findings, parameters, sop_class, _PH_SOURCE, tracking,
                                     procedure, placeholder,
                                     comments=[_ph_comment(i) for i in range(len(shapes))])
    except _BUILD_ERRORS:
        return None
    root = report[0]
    texts = {_ph_parameter(j): ("parameter", j) for j in range(n_parameters)}
    texts.update({_ph_comment(i): ("comment", i) for i in range(len(shapes))})
    uids = {_ph_tracking(i): ("tracking", i) for i in range(len(shapes))}
    numbers: dict[float, tuple] = {}
    graphics = {}
    for i, (planar, _, volume) in enumerate(shapes):
        numbers[_ph_probability(i)] = ("probability", i)
        if volume:
            numbers[_ph_volume(i)] = ("volume", i)
        if planar:
            line = np.asarray(_ph_polyline(i).polyline(), dtype=np.float64).flatten().tolist()
            graphics[tuple(line)] = ("graphic", i)
    if library is not None:
        uids[_PH_FRAME] = ("library", "FrameOfReferenceUID", None)
        for keyword, index, value in _library_inputs(library):
            slot = ("library", keyword, index)
            if isinstance(value, str) and value.startswith("ZZ"):
                texts[value] = slot
            else:
                numbers[float(value)] = slot
    slots: dict[int, tuple] = {}
    seen: set[tuple] = set()

    def add(elem: DataElement, slot: tuple) -> None:
        slots[id(elem)] = slot
        seen.add(slot[2] if slot[0] == "number" else slot)

    for item in _walk(root):
        if "TextValue" in item and item.TextValue in texts:
            add(item["TextValue"], texts[item.TextValue])
        if "UID" in item and item.UID in uids:
            add(item["UID"], uids[item.UID])
        if "ReferencedSOPInstanceUID" in item and item.ReferencedSOPInstanceUID == _PH_SOURCE:
            add(item["ReferencedSOPInstanceUID"], ("source",))
        if "GraphicData" in item and tuple(item.GraphicData) in graphics:
            add(item["GraphicData"], graphics[tuple(item.GraphicData)])
        if "NumericValue" in item:
            value = item.get("FloatingPointValue", item.NumericValue)
            slot = numbers.get(float(value))
            if slot is None:
                continue
            add(item["NumericValue"], ("number", "DS", slot))
            if "FloatingPointValue" in item:
                add(item["FloatingPointValue"], ("number", "FD", slot))
    expected = {*texts.values(), *uids.values(), *numbers.values(), *graphics.values(),
                ("source",)}
    if library is not None and not library[3]:
        expected.discard(("library", "FrameOfReferenceUID", None))
    if seen != expected:
        log.warning("orthanc-ai: SR template for %s misses slots; using highdicom directly",
                    card.id)
        return None
    return _Template(root, slots)


_TEMPLATES: OrderedDict[tuple, _Template | None] = OrderedDict()
_TEMPLATES_LOCK = threading.Lock()
_TEMPLATES_MAX = 256


def _template(card: ModelCard, sop_class: str, procedure: CodedConcept, n_parameters: int,
              shapes: tuple, library: tuple | None) -> _Template | None:
    key = (card.id, card.name, card.version, card.finding, card.finding_site, sop_class,
           procedure.value, n_parameters, shapes, library)
    with _TEMPLATES_LOCK:
        if key in _TEMPLATES:
            _TEMPLATES.move_to_end(key)
            return _TEMPLATES[key]
    template = _make_template(card, sop_class, procedure, n_parameters, shapes, library)
    with _TEMPLATES_LOCK:
        _TEMPLATES[key] = template
        while len(_TEMPLATES) > _TEMPLATES_MAX:
            _TEMPLATES.popitem(last=False)
    return template


_BLANK_STATE = Dataset().__dict__
_BLANK_OK = all(v is None or isinstance(v, bool | str | dict) for v in _BLANK_STATE.values())


def _new_dataset() -> Dataset:
    """Dataset(), without the 14 attribute assignments through Dataset.__setattr__."""
    if not _BLANK_OK:
        return Dataset()
    ds = Dataset.__new__(Dataset)
    ds.__dict__.update({k: v.copy() if isinstance(v, dict) else v
                        for k, v in _BLANK_STATE.items()})
    return ds


def _clone(ds: Dataset, slots: dict[int, tuple], found: list) -> Dataset:
    """A copy of a template dataset, sharing only immutable values; slot elements are listed."""
    new = _new_dataset()
    elements = new._dict
    for tag, elem in ds._dict.items():
        twin = DataElement.__new__(DataElement)
        twin.__dict__.update(elem.__dict__)
        value = elem._value
        if elem.VR == "SQ":
            twin._value = DicomSequence([_clone(item, slots, found) for item in value])
        elif isinstance(value, MultiValue):
            twin._value = MultiValue(value._constructor, value)
        elements[tag] = twin
        slot = slots.get(id(elem))
        if slot is not None:
            found.append((slot, twin))
    return new


def _slot_value(slot: tuple, card: ModelCard, findings: Sequence[Finding],
                prep: _Prepared) -> Any:
    kind = slot[0]
    if kind == "parameter":
        return prep.parameters[slot[1]]
    if kind == "comment":
        return finding_words(card, findings[slot[1]])
    if kind == "tracking":
        return _tracking_uid(prep.sop_uid, slot[1] + 1)
    if kind == "source":
        return prep.header.SOPInstanceUID
    if kind == "graphic":
        region = findings[slot[1]].region
        return np.asarray(region.polyline(), dtype=np.float64).flatten().tolist()
    if kind == "probability":
        return round(float(findings[slot[1]].probability), 6)
    if kind == "volume":
        return round(float(findings[slot[1]].volume_ml), 3)
    if kind == "library":
        return _library_value(prep.header, slot[1], slot[2])
    raise KeyError(kind)


class _TemplatedComprehensive3DSR(hd.sr.Comprehensive3DSR):
    """A Comprehensive 3D SR assembled from a cached template.

    The same dataset as :class:`highdicom.sr.Comprehensive3DSR` would hold;
    ``content`` is parsed from it on first use rather than deep-copied always.
    """

    @property
    def content(self) -> hd.sr.MeasurementReport:
        content = self.__dict__.get("_content")
        if content is None:  # as _SR.__init__ makes it
            root = Dataset()
            for keyword in ("ConceptNameCodeSequence", "ContentSequence", "ValueType",
                            "ContinuityOfContent", "ContentTemplateSequence"):
                root.add(self[keyword])
            item = hd.sr.value_types.ContentItem._from_dataset_derived(copy.deepcopy(root))
            content = hd.sr.ContentSequence([item], is_root=True)
            self.__dict__["_content"] = content
        return content


@functools.lru_cache(maxsize=8)
def _group_length(uid_length: int) -> int:
    """As highdicom computes it (pydicom writes the right one on saving)."""
    meta = _file_meta("1" * uid_length, length=0)
    with BytesIO() as fp:
        write_file_meta_info(fp, meta, enforce_standard=True)
        return len(fp.getvalue())


def _file_meta(sop_uid: str, length: int | None = None) -> FileMetaDataset:
    """highdicom's file meta information (SOPClass.__init__)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    meta.MediaStorageSOPClassUID = UID(Comprehensive3DSRStorage)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.9.7433.1.1")
    meta.ImplementationVersionName = f"highdicom{hd.__version__}"
    meta.FileMetaInformationGroupLength = _group_length(len(sop_uid)) if length is None \
        else length
    return meta


@functools.lru_cache(maxsize=1)
def _highdicom_equipment() -> Dataset:
    """highdicom's own Contributing Equipment item; only its ContributionDateTime changes."""
    return ContributingEquipment.for_highdicom(purpose_of_reference=None)


def _copy_element(elem: DataElement) -> DataElement:
    twin = DataElement.__new__(DataElement)
    twin.__dict__.update(elem.__dict__)
    return twin


def _build_fast(card: ModelCard, findings: Sequence[Finding],
                prep: _Prepared) -> hd.sr.Comprehensive3DSR | None:
    """The dataset highdicom builds (see _build_highdicom), from a cached template."""
    header = prep.header
    sop_class = str(header.SOPClassUID)
    shapes = tuple((f.positive and f.region is not None, f.positive, f.volume_ml is not None)
                   for f in findings)
    library = _library_shape(header)
    template = _template(card, sop_class, prep.procedure, len(prep.parameters or ()), shapes,
                         library if isinstance(library, tuple) else None)
    if template is None:
        return None
    found: list = []
    root = _clone(template.root, template.slots, found)
    for slot, elem in found:
        if slot[0] == "number":
            value = _slot_value(slot[2], card, findings, prep)
            elem.value = DS(value, auto_format=True) if slot[1] == "DS" else value
        else:
            elem.value = _slot_value(slot, card, findings, prep)
    if library is None:  # unusual values: highdicom decides
        try:
            items = hd.sr.ImageLibrary([header])
        except _BUILD_ERRORS:
            items = []
        content = root.ContentSequence
        for item in items:
            content.insert(len(content) - 1, item)

    # highdicom.SOPClass.__init__
    sr = _TemplatedComprehensive3DSR.__new__(_TemplatedComprehensive3DSR)
    Dataset.__init__(sr)
    sr.preamble = b"\x00" * 128
    sr.file_meta = _file_meta(prep.sop_uid)
    sr.SeriesInstanceUID = str(prep.series_uid)
    sr.SeriesNumber = SR_SERIES_NUMBER
    sr.Modality = "SR"
    sr.SeriesDescription = _series_description(card)
    sr.Manufacturer = MANUFACTURER
    sr.ManufacturerModelName = card.id[:64]
    sr.SoftwareVersions = software_versions(card)
    sr.SOPInstanceUID = str(prep.sop_uid)
    sr.SOPClassUID = str(Comprehensive3DSRStorage)
    sr.InstanceNumber = prep.instance_number
    clock = dt.datetime.now()
    sr.InstanceCreationDate = DA(clock.date())
    sr.InstanceCreationTime = TM(clock.time())
    charset = header.get("SpecificCharacterSet")
    if charset is not None:
        sr.SpecificCharacterSet = hd.valuerep._check_specific_character_set(charset)
    now = prep.now
    sr.ContentDate = DA(now.date())
    sr.ContentTime = TM(now.time().replace(microsecond=0))
    sr.SeriesDate = DA(now.date())
    sr.SeriesTime = TM(now.time().replace(microsecond=0))
    # highdicom.sr.sop._SR.__init__
    if prep.institution is not None:
        sr.InstitutionName = prep.institution
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "UNVERIFIED"
    sr.PreliminaryFlag = "PRELIMINARY"
    for elem in root.values():
        sr[elem.tag] = elem
    evidence = Dataset()
    evidence.ReferencedSOPClassUID = header.SOPClassUID
    evidence.ReferencedSOPInstanceUID = header.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedSOPSequence = [evidence]
    study = Dataset()
    study.StudyInstanceUID = header.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    sr.CurrentRequestedProcedureEvidenceSequence = [study]
    if prep.predecessor is not None:
        sr.PredecessorDocumentsSequence = sr._collect_predecessors([prep.predecessor])
    sr.PerformedProcedureCodeSequence = []
    sr.ReferencedPerformedProcedureStepSequence = []
    # copy_patient_and_study_information: the source's Patient and Study modules
    for attr in _source_attributes(sop_class):
        if attr.module and attr.tag in header:
            sr.add(_copy_element(header[attr.tag]))
    equipment = []
    try:
        equipment.append(ContributingEquipment.for_image_acquisition(header))
    except Exception:  # as highdicom: no item for the source then
        pass
    item = _clone(_highdicom_equipment(), {}, [])
    item.ContributionDateTime = DT(dt.datetime.now())
    equipment.append(item)
    sr.ContributingEquipmentSequence = equipment
    return sr


# --------------------------------------------------------------------------


def build_sr_highdicom(
    source: Dataset,
    card: ModelCard,
    findings: Sequence[Finding],
    *,
    missing_inputs: Sequence[str] = (),
    now: dt.datetime | None = None,
    uids: tuple[str, str] | None = None,
    predecessor: Dataset | None = None,
    notes: Sequence[str] = (),
    comparisons: Sequence[Comparison | None] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The same SR as :func:`build_sr`, built directly by highdicom (the reference; slow)."""
    comparisons = _checked_comparisons(findings, comparisons)
    prep = _prepare(source, card, missing_inputs=missing_inputs, notes=notes, uids=uids,
                    predecessor=predecessor, now=now, comparisons=comparisons or ())
    try:
        return _build_highdicom(card, findings, prep, comparisons)
    except JobOutcome:
        raise
    except _BUILD_ERRORS as exc:
        raise _cannot_build(exc) from None


def _checked_comparisons(findings: Sequence[Finding],
                         comparisons: Sequence[Comparison | None] | None,
                         ) -> list[Comparison | None] | None:
    """The comparisons, one per finding; None where there is none at all."""
    if not findings:
        raise ValueError("at least one finding (positive or negative) is required")
    if comparisons is None:
        return None
    comparisons = list(comparisons)
    if len(comparisons) != len(findings):
        raise ValueError(f"{len(comparisons)} comparisons for {len(findings)} findings")
    for comparison in comparisons:
        if comparison is not None and not isinstance(comparison, Comparison):
            raise TypeError(f"a comparison is an inference.interval.Comparison, "
                            f"not {type(comparison).__name__}")
    return comparisons if any(c is not None for c in comparisons) else None


class _ComparedComprehensive3DSR(hd.sr.Comprehensive3DSR):
    """An SR with interval changes, built by highdicom directly for :func:`build_sr`.

    The same dataset as :class:`highdicom.sr.Comprehensive3DSR`; the class
    only tells :func:`sr_bytes` that the lean writer may write it.
    """


def refused_at(exc: BaseException) -> str:
    """Where a library refused ("templates.py:3427"): its file and line, never a value."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return f"{frame.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.tb_lineno}" \
        if frame is not None else "?"


def _cannot_build(exc: BaseException) -> BadInput:
    """BadInput for an SR highdicom refuses, naming where, never a value (patient data)."""
    where = refused_at(exc)
    log.warning("orthanc-ai: SR cannot be built: %s at %s", type(exc).__name__, where)
    return BadInput(f"no valid SR can be built from this source's header "
                    f"({type(exc).__name__} at {where})")


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
    comparisons: Sequence[Comparison | None] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one source image (or key slice) and one model's findings on it.

    ``uids`` overrides the (series, SOP instance) UIDs, e.g. for a series-level
    result keyed by its set of slices; ``predecessor`` is the SR this one
    revises (PS3.3 C.17.2.3, Predecessor Documents Sequence). ``comparisons``,
    aligned with ``findings`` (None for a finding without one), adds each
    finding's interval change since a prior study (see the module docstring).
    Invalid source values are normalised or left out, with a note each (see
    the module docstring); raises BadInput where no valid SR can be built.
    """
    comparisons = _checked_comparisons(findings, comparisons)
    prep = _prepare(source, card, missing_inputs=missing_inputs, notes=notes, uids=uids,
                    predecessor=predecessor, now=now, comparisons=comparisons or ())
    if comparisons is not None:  # no template: highdicom builds it, the lean writer writes it
        try:
            sr = _build_highdicom(card, findings, prep, comparisons)
        except JobOutcome:
            raise
        except _BUILD_ERRORS as exc:
            raise _cannot_build(exc) from None
        sr.__class__ = _ComparedComprehensive3DSR
        return sr
    if _FAST:
        try:
            sr = _build_fast(card, findings, prep)
        except JobOutcome:
            raise
        except _BUILD_ERRORS as exc:
            log.warning("orthanc-ai: fast SR build failed (%s); using highdicom directly",
                        type(exc).__name__)
            sr = None
        if sr is not None:
            return sr
    try:
        return _build_highdicom(card, findings, prep)
    except JobOutcome:
        raise
    except _BUILD_ERRORS as exc:
        raise _cannot_build(exc) from None


# --------------------------------------------------------------------------
# The SR's bytes: a lean writer for the datasets build_sr makes.
#
# pydicom's writer costs about 9 ms for one SR (~100 nested items, each walked
# by correct_ambiguous_vr, each element through a fresh buffer). The SR holds
# a closed set of value types, so the writer below encodes them directly,
# mirroring pydicom's writer step by step (tag order, defined lengths, padding,
# character sets per item, the element writers' formatting), and hands any
# element it does not mirror (person names, non-ASCII text, unusual values) to
# pydicom's own element writer. Its output is byte for byte what
# ``save_as(..., enforce_file_format=True)`` writes (tests compare them); a
# dataset it cannot vouch for is left to save_as altogether.


class _LeaveToPydicom(Exception):
    """The lean writer does not mirror pydicom for this dataset."""


_EXPLICIT_LITTLE = (False, True)
_LONG_LENGTH_VRS = frozenset(vr.value for vr in EXPLICIT_VR_LENGTH_32)
_AMBIGUOUS_VRS = frozenset(vr.value for vr in AMBIGUOUS_VR)
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = b"\xff\xff\xff\xff"
_pack = struct.pack


def _writer_kinds() -> dict[str, tuple[str, str]]:
    """How pydicom's writer encodes each VR's value, for the VRs mirrored here."""
    kinds: dict[str, tuple[str, str]] = {}
    for vr, (fn, param) in _fw.writers.items():
        if vr.value in _AMBIGUOUS_VRS:
            continue
        if fn is _fw.write_UI:
            kinds[vr.value] = ("string", "\0")
        elif fn is _fw.write_string:
            kinds[vr.value] = ("string", " ")
        elif fn in (_fw.write_DA, _fw.write_DT, _fw.write_TM):
            kinds[vr.value] = ("date", " ")
        elif fn is _fw.write_text:
            kinds[vr.value] = ("text", "")
        elif fn is _fw.write_number_string:
            kinds[vr.value] = ("number string", "")
        elif fn is _fw.write_numbers and param:
            kinds[vr.value] = ("binary", param)
        elif fn in (_fw.write_OBvalue, _fw.write_OWvalue):
            kinds[vr.value] = ("bytes", "")
        elif fn is _fw.write_sequence:
            kinds[vr.value] = ("sequence", "")
        # the others (PN, AT, UN) go to pydicom's element writer
    return kinds


_KINDS = _writer_kinds()
_DATE_FORMATS = {cls: form for cls, form in ((DA, getattr(_fw, "_format_DA", None)),
                                             (DT, getattr(_fw, "_format_DT", None)),
                                             (TM, getattr(_fw, "_format_TM", None)))
                 if form is not None}
_HEADERS: dict[tuple[int, str], bytes] = {}
_ENCODINGS: dict[Any, tuple[list[str], bool]] = {}


def _element_header(tag: int, vr: str) -> bytes:
    """Tag and VR (and the reserved bytes of a 4-byte length), Explicit VR Little Endian."""
    key = (tag, vr)
    head = _HEADERS.get(key)
    if head is None:
        head = _pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
        if vr in _LONG_LENGTH_VRS:
            head += b"\0\0"
        if len(_HEADERS) < 4096:
            _HEADERS[key] = head
    return head


def _ascii_as_is(codec: str) -> bool:
    """Whether pydicom's encode_string writes ASCII text as ASCII bytes with this first codec."""
    if codec in _charset_module.custom_encoders or \
            codec in _charset_module.need_tail_escape_sequence_encodings:
        return False
    ascii = "".join(map(chr, range(128)))
    try:
        return ascii.encode(codec) == ascii.encode("ascii")
    except (LookupError, UnicodeError):
        return False


def _encodings(value: Any) -> tuple[list[str], bool]:
    """(pydicom's codecs for a Specific Character Set value, whether ASCII text is as is)."""
    key = value if isinstance(value, str) else tuple(value)
    found = _ENCODINGS.get(key)
    if found is None:
        codecs_ = _charset_module.convert_encodings(value)
        found = (codecs_, bool(codecs_) and _ascii_as_is(codecs_[0]))
        if len(_ENCODINGS) < 64:
            _ENCODINGS[key] = found
    return found


def _pydicom_element(elem: DataElement, encodings: list[str]) -> bytes:
    """One element as pydicom's own element writer encodes it."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    _fw.write_data_element(buffer, elem, encodings)
    return buffer.getvalue()


def _strings(value: Any) -> str | None:
    """A string value or multi-value as pydicom's multi_string joins it; None if not strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | MultiValue) and all(isinstance(v, str) for v in value):
        return "\\".join(value)
    return None


def _value(kind: str, param: str, value: Any, ascii_as_is: bool) -> bytes | None:
    """The encoded, padded value, as pydicom's writer for the VR makes it; None to delegate."""
    if value is None:
        return b""
    if kind == "string" or kind == "date":
        text = _strings(value)
        if text is None:
            if kind != "date" or not isinstance(value, dt.date | dt.time):
                return None
            form = _DATE_FORMATS.get(type(value))
            if form is None:
                return None
            text = form(value)  # pydicom's formatting of a DA, DT or TM object
        if len(text) % 2:
            text += param
        return text.encode(_charset_module.default_encoding)
    if kind == "text":
        text = _strings(value)
        if text is None or not (ascii_as_is and text.isascii()):
            return None
        if len(text) % 2:
            text += " "
        return text.encode("ascii")
    if kind == "number string":
        if isinstance(value, list | tuple | MultiValue):
            text = "\\".join(v.original_string if hasattr(v, "original_string") else str(v)
                             for v in value)
        elif isinstance(value, str | int | float):
            text = value.original_string if hasattr(value, "original_string") else str(value)
        else:
            return None
        if len(text) % 2:
            text += " "
        return text.encode(_charset_module.default_encoding)
    if kind == "binary":
        if isinstance(value, list | MultiValue):
            return _pack(f"<{len(value)}{param}", *value)
        if isinstance(value, int | float) and not isinstance(value, str):
            return _pack(f"<{param}", value)
        if value == "":
            return b""
        return None
    if kind == "bytes":
        if isinstance(value, bytes):
            return value + b"\0" if len(value) % 2 else value
        return None
    return None


def _dataset_bytes(ds: Dataset, parent: Any, out: list[bytes], skip: int = -1) -> None:
    """``ds`` as pydicom's write_dataset encodes it (Explicit VR Little Endian), into ``out``."""
    elements = ds._dict
    convert = ds.original_encoding != _EXPLICIT_LITTLE or \
        ds.original_character_set != ds._character_set
    charset = ds.get("SpecificCharacterSet", parent) if 0x00080005 in elements else parent
    encodings, ascii_as_is = _encodings(charset or [_charset_module.default_encoding])
    # plain ints: BaseTag compares in Python, sorting and looking up in _HEADERS
    for tag, elem in sorted(zip(map(int, elements), elements.values(), strict=True)):
        if (tag & 0xFFFF == 0 and tag >> 16 > 6) or tag == skip:
            continue  # retired group lengths: pydicom leaves them out
        if type(elem) is not DataElement:
            if not convert:  # pydicom writes it as read, or converts it on an ancestor's walk
                raise _LeaveToPydicom("raw element")
            elem = ds[tag]
        vr = elem.VR
        kind = _KINDS.get(vr)
        if kind is None:
            if vr in _AMBIGUOUS_VRS or vr not in _fw.writers:
                raise _LeaveToPydicom(f"VR {vr}")
            out.append(_pydicom_element(elem, encodings))
            continue
        if kind[0] == "sequence":
            head = _element_header(tag, vr)
            items: list[bytes] = []
            for item in elem._value:
                body: list[bytes] = []
                _dataset_bytes(item, encodings, body)
                data = b"".join(body)
                if getattr(item, "is_undefined_length_sequence_item", False):
                    items += (_ITEM, _UNDEFINED, data, _ITEM_END)
                else:
                    items += (_ITEM, _pack("<L", len(data)), data)
            data = b"".join(items)
            if elem.is_undefined_length:
                out += (head, _UNDEFINED, data, _SEQUENCE_END)
            else:
                out += (head, _pack("<L", len(data)), data)
            continue
        data = None if elem.is_undefined_length else \
            _value(kind[0], kind[1], elem._value, ascii_as_is)
        if data is None:
            out.append(_pydicom_element(elem, encodings))
        elif vr in _LONG_LENGTH_VRS:
            out += (_element_header(tag, vr), _pack("<L", len(data)), data)
        elif len(data) <= 0xFFFF:
            out += (_element_header(tag, vr), _pack("<H", len(data)), data)
        else:  # pydicom writes it as UN, with a warning
            out.append(_pydicom_element(elem, encodings))


def _required_meta(meta: FileMetaDataset, sr: Dataset) -> bool:
    """Whether save_as would write ``meta`` as it is (but for the group length)."""
    elements = meta._dict
    if any(tag >> 16 != 2 for tag in elements):
        return False
    for tag in (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012):
        if tag not in elements or meta[tag].is_empty:
            return False
    if 0x00020013 not in elements:
        return False
    if 0x00020000 in elements and meta[0x00020000].VR != "UL":
        return False
    if meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        return False
    for meta_keyword, keyword in (("MediaStorageSOPClassUID", "SOPClassUID"),
                                  ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        value = sr.get(keyword)
        if value and value != meta.get(meta_keyword):
            return False
    return True


def _part10(sr: Dataset) -> bytes | None:
    """What ``sr.save_as(fp, enforce_file_format=True)`` writes, or None where unsure."""
    meta = getattr(sr, "file_meta", None)
    preamble = getattr(sr, "preamble", None)
    if not isinstance(meta, FileMetaDataset) or not _required_meta(meta, sr):
        return None
    if preamble is not None and (not isinstance(preamble, bytes) or len(preamble) != 128):
        return None
    if sr.original_encoding[1] is False or 0x7FE00010 in sr._dict or \
            any(tag >> 16 in (0, 2) for tag in sr._dict):
        return None
    default = _charset_module.default_encoding
    meta_body: list[bytes] = []
    _dataset_bytes(meta, default, meta_body, skip=0x00020000)
    meta_data = b"".join(meta_body)
    out = [preamble or b"\0" * 128, b"DICM", b"\x02\x00\x00\x00UL\x04\x00",
           _pack("<L", len(meta_data)), meta_data]
    _dataset_bytes(sr, default, out)
    return b"".join(out)


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file, Explicit VR Little Endian.

    The bytes ``sr.save_as(fp, enforce_file_format=True)`` writes; for an SR
    from :func:`build_sr` in a fraction of its time.
    """
    data = None
    if isinstance(sr, _TemplatedComprehensive3DSR | _ComparedComprehensive3DSR):
        try:
            data = _part10(sr)
        except Exception as exc:  # noqa: BLE001 - pydicom's writer decides then
            log.debug("orthanc-ai: lean SR writer declined (%s); using pydicom",
                      type(exc).__name__)
            data = None
    if data is None:
        buffer = BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    return data


if not _FAST:
    log.warning("orthanc-ai: SR templates were verified with highdicom %s / pydicom %s, "
                "found %s / %s: SRs are built by highdicom directly (slower)",
                *_FAST_VERSIONS, hd.__version__, pydicom.__version__)
