"""Send each SR to the RIS as an HL7 v2.5.1 ORU^R01 over MLLP (``AI.HL7``).

Like forwarding (``dicom_forward.py``), the sink only records one *HL7 job*
per SR in the job store, keyed ``hl7:<host>:<port>:<SR SOP Instance UID>``:
durable across a restart or a ``kill -9``, and sent once however often the
SR is made. A revised SR is a new SR (a new SOP Instance UID): a new message.
Priors fetched for comparison are never sent, nor are their SRs.

The message is built when the job runs, from the SR as Orthanc holds it
(read back with pydicom), so that the RIS reads what the PACS holds: the
patient module, the accession number (placer and filler order number), the
procedure or study description, one group of OBX per finding (the coded
finding with Present/Absent, the probability, the volume, the interval
change), the algorithm's name and version and the SR's UIDs. Everything is
preliminary (OBR-25 and OBX-11 ``P``): no radiologist has read it yet.

MSH-10 (the message control ID) is derived from the SR's SOP Instance UID,
so a resend (a retry, a worker killed after the ACK) is the same message to
the RIS. The ACK decides: ``AA``/``CA`` done; ``AE``/``CE``, no answer, a
refused connection or a timeout are retried with back-off (``AI.HL7`` retry
keys, then ``dead``); ``AR``/``CR`` fail the job for good. The RIS's MSA-3
text is never quoted in a reason: it may name the patient.

The message is made of python-hl7's containers (``hl7.Message``, ``Segment``,
``Field``, ``Repetition``, ``Component``), values escaped with its escape
support, and rendered by ``str()``. Text outside ASCII is sent as UTF-8,
with MSH-18 ``UNICODE UTF-8``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import hl7
import hl7.util
from hl7.mllp import InvalidBlockError, open_hl7_connection
from pydicom.dataset import Dataset

from inference.errors import BadInput, SkipInput, TransientError
from inference.report import MANUFACTURER

from ..deliveries import hl7_control_id, hl7_destination_of, hl7_key
from ..source import InstanceGone
from ..stores import Job, JobKind, NewJob
from ..stores.base import iso
from . import Report

if TYPE_CHECKING:
    from ..config import _HL7
    from ..context import Context

VERSION = "2.5.1"
MESSAGE_TYPE = ("ORU", "R01", "ORU_R01")
STATUS = "P"  # preliminary: an AI result no radiologist has read yet
LOCAL = "99ORTHANCAI"  # our local coding system (HL7's 99zzz), for what has no code
SEPARATORS = "\r|~^&"
ESCAPE = "\\"
REASON_TEXT = 80  # at most this much of the RIS's MSA-3 text in a job's reason

# DICOM content items read from the SR (code value, coding scheme)
MEASUREMENT_GROUP = ("125007", "DCM")
FINDING = ("121071", "DCM")
PROBABILITY = ("122157", "DCM")
VOLUME = ("118565006", "SCT")
QUALITATIVE_DIFFERENCE = ("111049", "DCM")
COMMENT = ("121106", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
DEVICE_MODEL_NAME = ("121015", "DCM")
# Present, Absent (SCT, as our SRs say; DCM, as others may)
PRESENCE = {("52101004", "SCT"), ("272519000", "SCT"), ("121053", "DCM"), ("121054", "DCM")}

# OBX-3 of the observations
FINDING_CODE = ("121071", "Finding", "DCM")
PROBABILITY_CODE = ("122157", "Probability", "DCM")
VOLUME_CODE = ("118565006", "Volume", "SCT")
DIFFERENCE_CODE = ("111049", "Qualitative Difference", "DCM")
COMMENT_CODE = ("121106", "Comment", "DCM")
OBS_ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
OBS_ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
OBS_STUDY_UID = ("110180", "Study Instance UID", "DCM")
OBS_SERIES_UID = ("112002", "Series Instance UID", "DCM")
OBS_SOP_UID = ("SRUID", "SR SOP Instance UID", LOCAL)

Coded = tuple[str, str, str]  # (code, meaning, coding system): a CWE


# --------------------------------------------------------------------------
# The sink: one job per SR


class Hl7OruSink:
    name = "hl7"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def deliver(self, report: Report) -> dict[str, Any]:
        from ..priors import is_prior

        config = self.ctx.config.hl7
        if not config.host:
            return {}
        if is_prior(self.ctx, report.study):
            return {"hl7": "not sent: a prior fetched for comparison"}
        sr = report.sr
        sr_id = report.sr_instance
        job = self.ctx.ledger.record(NewJob(
            sr_id, report.study, report.series, model=report.card.id,
            version=report.card.version, kind=JobKind.HL7,
            key=hl7_key(config.host, config.port, str(sr.SOPInstanceUID))))
        return {"hl7": "queued" if job is not None else "already queued"}


def run(ctx: Context, job: Job) -> None:
    """Send one SR's ORU^R01; done once the RIS accepted it (AA or CA)."""
    host, port, uid = hl7_destination_of(job)
    config = ctx.config.hl7
    with ctx.ledger.outcome(job, policy=config) as done:
        if (host, port) != (config.host, config.port):
            raise SkipInput(f"HL7 {host}:{port} is no longer AI.HL7's Host and Port")
        try:
            data = ctx.source.instance_file(job.instance)
        except InstanceGone as exc:
            raise SkipInput("the SR was deleted from Orthanc before it could be sent") from exc
        sr = read_sr(data)
        if str(sr.get("SOPInstanceUID", "")) != uid:
            raise BadInput("the instance in Orthanc is not the SR this message was for")
        control_id = hl7_control_id(uid)
        message = build_oru(sr, config, now=dt.datetime.fromtimestamp(ctx.clock(), dt.UTC))
        ack = check_ack(parse_ack(send(host, port, message, config.timeout_seconds)),
                        control_id)
        # Audit: Export (110106), once the RIS accepted the message.
        ctx.audit.data_export(config.receiving_application or "HL7", host,
                              str(sr.get("PatientID", "")),
                              study_uids=[str(sr.get("StudyInstanceUID", ""))],
                              sop_classes={str(sr.get("SOPClassUID", "")): 1},
                              detail={"MSH-10": control_id, "ACK": ack.code},
                              description=f"HL7 ORU^R01 to {host}:{port}")
        done({"destination": f"{host}:{port}", "sr_instance": job.instance,
              "sr_sop_instance_uid": uid, "control_id": control_id, "ack": ack.code,
              "delivered": iso(ctx.clock())}, None)


def read_sr(data: bytes) -> Dataset:
    import pydicom

    try:
        sr = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise BadInput(f"the SR cannot be read back from Orthanc: {type(exc).__name__}") \
            from None
    if sr.get("Modality") != "SR" or "ContentSequence" not in sr:
        raise BadInput("the instance is not a structured report")
    return sr


# --------------------------------------------------------------------------
# What the message says, read from the SR


@dataclass
class Observation:
    """One finding's measurement group."""

    presence: tuple[Coded, Coded] | None = None  # (finding type, Present / Absent)
    finding: Coded | None = None  # the Finding (121071) item's value
    probability: tuple[str, Coded | None] | None = None  # (NM value, unit)
    volume: tuple[str, Coded | None] | None = None
    difference: Coded | None = None  # Qualitative Difference (interval change)
    comment: str = ""  # the interval change in words


@dataclass
class SrContent:
    findings: list[Observation] = field(default_factory=list)
    algorithm_name: str = ""
    algorithm_version: str = ""


def _code(item: Dataset, keyword: str) -> Coded | None:
    seq = item.get(keyword)
    if not seq:
        return None
    c = seq[0]
    value = c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue") or ""
    return str(value), str(c.get("CodeMeaning", "")), str(c.get("CodingSchemeDesignator", ""))


def _name(item: Dataset) -> tuple[str, str] | None:
    code = _code(item, "ConceptNameCodeSequence")
    return (code[0], code[2]) if code else None


def _number(value: Any) -> str:
    """A DICOM DS as an HL7 NM (no exponent)."""
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return ""
    return format(number, "f") if number.is_finite() else ""


def _measured(item: Dataset) -> tuple[str, Coded | None] | None:
    measured = item.get("MeasuredValueSequence")
    if not measured:
        return None
    return _number(measured[0].get("NumericValue", "")), \
        _code(measured[0], "MeasurementUnitsCodeSequence")


def _walk(items: Iterable[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def sr_content(sr: Dataset) -> SrContent:
    """The findings and the algorithm, from the SR's content tree (TID 1500)."""
    content = SrContent()
    device_model = ""
    for item in _walk(sr.ContentSequence):
        name = _name(item)
        if name == DEVICE_MODEL_NAME and not device_model:
            device_model = str(item.get("TextValue", ""))
        elif name == ALGORITHM_NAME and not content.algorithm_name:
            content.algorithm_name = str(item.get("TextValue", ""))
        elif name == ALGORITHM_VERSION and not content.algorithm_version:
            content.algorithm_version = str(item.get("TextValue", ""))
        if item.get("ValueType") != "CONTAINER" or name != MEASUREMENT_GROUP:
            continue
        obs = Observation()
        for child in item.get("ContentSequence", []):
            child_name, kind = _name(child), child.get("ValueType")
            if kind == "CODE":
                value = _code(child, "ConceptCodeSequence")
                if child_name == FINDING:
                    obs.finding = value
                elif child_name == QUALITATIVE_DIFFERENCE:
                    obs.difference = value
                    for sub in child.get("ContentSequence", []):
                        if _name(sub) == COMMENT:
                            obs.comment = str(sub.get("TextValue", ""))
                elif value is not None and (value[0], value[2]) in PRESENCE:
                    concept = _code(child, "ConceptNameCodeSequence")
                    if concept is not None:
                        obs.presence = (concept, value)
            elif kind == "NUM" and child_name == PROBABILITY:
                obs.probability = _measured(child)
            elif kind == "NUM" and child_name == VOLUME:
                obs.volume = _measured(child)
        content.findings.append(obs)
    if not content.algorithm_name:  # an SR without TID 4019: the device observer's model
        content.algorithm_name = device_model or str(sr.get("ManufacturerModelName", ""))
    if not content.algorithm_version:
        # VM 1-n. Ours write [product version, model version]: the model's is last.
        # Another vendor's order is its own: all of them, as written.
        versions = sr.get("SoftwareVersions", "") or ""
        if not isinstance(versions, str):
            versions = [str(v) for v in versions]
            ours = str(sr.get("Manufacturer", "")) == MANUFACTURER
            versions = ", ".join(versions[-1:] if ours else versions)
        content.algorithm_version = str(versions)
    if not content.findings:
        raise BadInput("the SR holds no measurement group to report")
    return content


def _dtm(date: Any, time: Any = "") -> str:
    """DICOM DA (+ TM) as an HL7 DTM, to the second; "" when there is no valid date."""
    d = re.sub(r"\D", "", str(date or ""))
    if len(d) != 8:
        return ""
    t = re.sub(r"\D", "", str(time or "").split(".")[0])[:6]
    return d + (t if len(t) in (2, 4, 6) else "")


# --------------------------------------------------------------------------
# The message: python-hl7's containers

Value = str | tuple | None  # a field: text, or its components (text, or subcomponents)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class _Builder:
    def __init__(self) -> None:
        self.message = hl7.Message(separators=SEPARATORS, esc=ESCAPE, sequence=[])

    def escape(self, text: Any) -> str:
        """A value as HL7 text: delimiters escaped (python-hl7's escape), controls
        replaced by spaces, characters outside ASCII as they are (sent as UTF-8)."""
        text = _CONTROL.sub(" ", "" if text is None else str(text)).strip()
        return "".join(
            run if not run.isascii() else hl7.util.escape(self.message, run)
            for run in re.split(r"([^\x00-\x7f]+)", text) if run)

    @staticmethod
    def _trim(values: list) -> list:
        """Without the trailing empty values (an empty component, field or subcomponent)."""
        def empty(v: Any) -> bool:
            return v is None or v == "" or (isinstance(v, tuple) and all(map(empty, v)))

        while values and empty(values[-1]):
            values.pop()
        return values

    def field(self, value: Value) -> hl7.Field:
        m = self.message
        if value is None or isinstance(value, str):
            return m.create_field([self.escape(value)])
        components = []
        for c in self._trim(list(value)):
            if isinstance(c, tuple):
                subs = self._trim([self.escape(s) for s in c])
                components.append(m.create_component(subs) if len(subs) > 1 else
                                  (subs[0] if subs else ""))
            else:
                components.append(self.escape(c))
        return m.create_field([m.create_repetition(components)])

    def segment(self, name: str, *values: Value) -> hl7.Segment:
        fields = self._trim(list(values))
        segment = self.message.create_segment(
            [self.message.create_field([name]), *(self.field(v) for v in fields)])
        self.message.append(segment)
        return segment

    def msh(self, *values: Value) -> hl7.Segment:
        """MSH-1 (the field separator) and MSH-2 (the encoding characters), as they are."""
        m = self.message
        segment = m.create_segment([
            m.create_field(["MSH"]), m.create_field([SEPARATORS[1]]),
            m.create_field([SEPARATORS[3] + SEPARATORS[2] + ESCAPE + SEPARATORS[4]]),
            *(self.field(v) for v in self._trim(list(values)))])
        self.message.append(segment)
        return segment


def _hd(value: str) -> Value:
    """A configured application or facility (HD): ``^`` separates its components
    (namespace ID^universal ID^universal ID type), as it would in HL7."""
    parts = tuple(value.split("^"))
    return parts if len(parts) > 1 else value


def _cwe(code: Coded | None) -> Value:
    return tuple(code) if code else None


def _person_name(sr: Dataset) -> Value:
    """DICOM PN (family^given^middle^prefix^suffix) as an XPN
    (family^given^middle^suffix^prefix)."""
    pn = sr.get("PatientName")
    if not pn:
        return None
    return (pn.family_name, pn.given_name, pn.middle_name, pn.name_suffix, pn.name_prefix)


def _patient_id(sr: Dataset) -> Value:
    """PatientID^^^IssuerOfPatientID (CX; the issuer as the assigning authority)."""
    issuer: tuple = (str(sr.get("IssuerOfPatientID", "") or ""),)
    qualifiers = sr.get("IssuerOfPatientIDQualifiersSequence")
    if qualifiers:
        q = qualifiers[0]
        issuer = (*issuer, str(q.get("UniversalEntityID", "") or ""),
                  str(q.get("UniversalEntityIDType", "") or ""))
    return (str(sr.get("PatientID", "") or ""), "", "", issuer)


def _service(sr: Dataset, content: SrContent) -> Value:
    """OBR-4: the procedure code, else the study description, else the model."""
    procedure = _code(sr, "ProcedureCodeSequence")
    if procedure and procedure[0]:
        return procedure
    description = str(sr.get("StudyDescription", "") or "")
    if description:
        return ("", description)
    model = str(sr.get("ManufacturerModelName", "") or "AI")
    return (model, f"{content.algorithm_name} {content.algorithm_version}".strip(), LOCAL)


def build_oru(sr: Dataset, config: _HL7, *, now: dt.datetime) -> hl7.Message:
    """The ORU^R01 (v2.5.1) for one SR; ``now`` is MSH-7."""
    content = sr_content(sr)
    uid = str(sr.SOPInstanceUID)
    accession = str(sr.get("AccessionNumber", "") or "")
    observed = _dtm(sr.get("StudyDate"), sr.get("StudyTime")) or \
        _dtm(sr.get("ContentDate"), sr.get("ContentTime"))
    reported = _dtm(sr.get("ContentDate"), sr.get("ContentTime"))
    b = _Builder()
    msh = b.msh(_hd(config.sending_application), _hd(config.sending_facility),
                _hd(config.receiving_application), _hd(config.receiving_facility),
                now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S") + "+0000", None,
                MESSAGE_TYPE, hl7_control_id(uid), "P", VERSION)
    b.segment("PID", "1", None, _patient_id(sr), None, _person_name(sr), None,
              _dtm(sr.get("PatientBirthDate"))[:8],
              {"M": "M", "F": "F", "O": "O"}.get(str(sr.get("PatientSex", "") or ""), ""))
    order = (accession,) if accession else None
    b.segment("ORC", "RE", order, order)
    b.segment("OBR", "1", order, order, _service(sr, content), None, None, observed,
              *([None] * 14), reported, None, None, STATUS)

    set_id = 0

    def obx(kind: str, identifier: Value, sub_id: str, value: Value,
            units: Value = None) -> None:
        nonlocal set_id
        set_id += 1
        b.segment("OBX", str(set_id), kind, identifier, sub_id, value, units,
                  None, None, None, None, STATUS, None, None, reported)

    for index, obs in enumerate(content.findings, start=1):
        sub = str(index)
        if obs.presence is not None:
            obx("CWE", _cwe(obs.presence[0]), sub, _cwe(obs.presence[1]))
        elif obs.finding is not None:
            obx("CWE", _cwe(FINDING_CODE), sub, _cwe(obs.finding))
        if obs.probability is not None and obs.probability[0]:
            obx("NM", _cwe(PROBABILITY_CODE), sub, obs.probability[0],
                _cwe(obs.probability[1]))
        if obs.volume is not None and obs.volume[0]:
            obx("NM", _cwe(VOLUME_CODE), sub, obs.volume[0], _cwe(obs.volume[1]))
        if obs.difference is not None:
            obx("CWE", _cwe(DIFFERENCE_CODE), sub, _cwe(obs.difference))
            if obs.comment:
                obx("ST", _cwe(COMMENT_CODE), sub, obs.comment)
    if content.algorithm_name:
        obx("ST", OBS_ALGORITHM_NAME, "", content.algorithm_name)
    if content.algorithm_version:
        obx("ST", OBS_ALGORITHM_VERSION, "", content.algorithm_version)
    obx("ST", OBS_STUDY_UID, "", str(sr.get("StudyInstanceUID", "")))
    obx("ST", OBS_SERIES_UID, "", str(sr.get("SeriesInstanceUID", "")))
    obx("ST", OBS_SOP_UID, "", uid)
    if not str(b.message).isascii():
        msh.assign_field("UNICODE UTF-8", 18)
    return b.message



# --------------------------------------------------------------------------
# MLLP and the ACK


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1: AA, AE, AR (original mode) or CA, CE, CR (enhanced mode)
    control_id: str  # MSA-2: the control ID of the message acknowledged
    text: str  # MSA-3, truncated; "" when none


def parse_ack(answer: str | bytes | hl7.Message) -> Ack:
    """The RIS's answer as an Ack; TransientError when it is not one."""
    try:
        message = answer if isinstance(answer, hl7.Message) else hl7.parse(answer)
        message.segment("MSA")
        code = str(message["MSA.F1"]).strip().upper()
        control_id = str(message["MSA.F2"]).strip()
        text = str(message["MSA.F3"])
    except (KeyError, IndexError, ValueError, UnicodeDecodeError, hl7.HL7Exception):
        raise TransientError("the RIS answered something that is not an HL7 ACK") from None
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > REASON_TEXT:
        text = text[:REASON_TEXT - 3] + "..."
    return Ack(code, control_id, text)


def check_ack(ack: Ack, control_id: str) -> Ack:
    """An accepting ACK of our message, or the JobOutcome its code means."""
    # The RIS's own text (MSA-3) is not quoted: it may name the patient.
    said = " (its text is withheld: it may quote patient data)" if ack.text else ""
    if ack.control_id != control_id:
        raise TransientError(f"the RIS acknowledged another message (MSA-2 is not {control_id})")
    if ack.code in ("AA", "CA"):
        return ack
    if ack.code in ("AR", "CR"):
        raise BadInput(f"the RIS rejected message {control_id} ({ack.code}){said}")
    if ack.code in ("AE", "CE"):
        raise TransientError(f"the RIS answered {ack.code} (error) to message {control_id}{said}")
    raise TransientError(f"the RIS answered an unknown acknowledgment code to {control_id}")


async def _exchange(host: str, port: int, message: hl7.Message) -> hl7.Message:
    reader, writer = await open_hl7_connection(host, port, encoding="utf-8")
    try:
        writer.writemessage(message)
        await writer.drain()
        return await reader.readmessage()
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


def send(host: str, port: int, message: hl7.Message, timeout: float) -> hl7.Message:
    """One MLLP exchange (connect, send, read the ACK) in a fresh event loop,
    within ``timeout`` seconds; whatever keeps the ACK away is a TransientError."""
    where = f"HL7 {host}:{port}"

    async def bounded() -> hl7.Message:
        return await asyncio.wait_for(_exchange(host, port, message), timeout)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        raise TransientError(f"{where}: no ACK within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise TransientError(f"{where}: connection refused") from None
    except asyncio.IncompleteReadError:
        raise TransientError(f"{where}: the connection closed before an ACK came") from None
    except (InvalidBlockError, UnicodeDecodeError, ValueError, hl7.HL7Exception):
        raise TransientError(f"{where}: the answer is not an MLLP-framed HL7 message") from None
    except OSError as exc:
        raise TransientError(f"{where}: {exc.strerror or type(exc).__name__}") from None
