"""DICOM PS3.15 Annex A.5 audit messages (the DICOM schema of RFC 3881), as XML.

Only the standard library (``xml.etree``): the plugin builds messages inside
Orthanc's interpreter too. Each builder returns the ``AuditMessage`` element;
:func:`validate` checks what the schema requires of it, in general (A.5.1)
and per event type (A.5.3), and :func:`to_xml` serializes it.

No packaged copy of the DICOM RELAX NG schema is installable from PyPI, so
the validator checks the required elements, attributes and codes itself.
"""

from __future__ import annotations

import base64
import datetime as _dt
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# EventOutcomeIndicator (A.5.1)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
OUTCOMES = (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE)

# EventID (CID 400)
APPLICATION_ACTIVITY = ("110100", "Application Activity")
BEGIN_TRANSFERRING = ("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
DATA_EXPORT = ("110106", "Export")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")

# EventTypeCode (CID 401, CID 403)
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
NETWORK_CONFIGURATION = ("110128", "Network Configuration")
SECURITY_CONFIGURATION = ("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = ("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")
NODE_AUTHENTICATION = ("110126", "Node Authentication")

# RoleIDCode (CID 402)
ROLE_APPLICATION = ("110150", "Application")
ROLE_LAUNCHER = ("110151", "Application Launcher")
ROLE_DESTINATION = ("110152", "Destination Role ID")
ROLE_SOURCE = ("110153", "Source Role ID")

# ParticipantObjectIDTypeCode
ID_PATIENT = ("2", "Patient Number", "RFC-3881")
ID_STUDY = ("110180", "Study Instance UID", "DCM")
ID_SOP_CLASS = ("110181", "SOP Class UID", "DCM")
ID_NODE = ("110182", "Node ID", "DCM")
ID_URI = ("12", "URI", "RFC-3881")

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process (AE title, host) or a person (a REST user)."""

    user_id: str
    requestor: bool
    role: tuple[str, str] | None = None
    host: str = ""  # NetworkAccessPointID (a DNS name or an IP address)
    alternative_user_id: str = ""
    user_name: str = ""


@dataclass(frozen=True)
class Study:
    """A study as a participant object: its UID, SOP classes and how many of each."""

    uid: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)  # SOP Class UID -> count
    instances: int = 0  # when the SOP classes are not known: how many instances
    accession: str = ""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coded(parent: ET.Element, tag: str, code: tuple[str, str], system: str = "DCM"
           ) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": system,
                                       "originalText": code[1]})


def _host_type(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return "2"  # an IP address
    except ValueError:
        return "1"  # a machine (DNS) name


def _message(event: tuple[str, str], action: str, outcome: int,
             event_types: Sequence[tuple[str, str]] = (), when: str | None = None,
             outcome_description: str = "") -> ET.Element:
    if outcome not in OUTCOMES:
        raise ValueError(f"EventOutcomeIndicator must be one of {OUTCOMES}")
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": when or _now(),
        "EventOutcomeIndicator": str(outcome)})
    _coded(ev, "EventID", event)
    for t in event_types:
        _coded(ev, "EventTypeCode", t)
    if outcome_description:
        ET.SubElement(ev, "EventOutcomeDescription").text = outcome_description[:500]
    return root


def _participant(root: ET.Element, p: Participant) -> None:
    attrs = {"UserID": p.user_id or "-", "UserIsRequestor": "true" if p.requestor else "false"}
    if p.alternative_user_id:
        attrs["AlternativeUserID"] = p.alternative_user_id
    if p.user_name:
        attrs["UserName"] = p.user_name
    if p.host:
        attrs["NetworkAccessPointID"] = p.host
        attrs["NetworkAccessPointTypeCode"] = _host_type(p.host)
    el = ET.SubElement(root, "ActiveParticipant", attrs)
    if p.role is not None:
        _coded(el, "RoleIDCode", p.role)


def _source(root: ET.Element, source_id: str) -> None:
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id or "-"})
    # AuditSourceTypeCode 4: application server process (RFC 3881)
    src = root.find("AuditSourceIdentification")
    assert src is not None
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "RFC-3881",
                                               "originalText": "Application Server"})


def _study(root: ET.Element, study: Study) -> None:
    el = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study.uid, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    ET.SubElement(el, "ParticipantObjectIDTypeCode", {
        "csd-code": ID_STUDY[0], "codeSystemName": ID_STUDY[2], "originalText": ID_STUDY[1]})
    if study.accession:
        ET.SubElement(el, "Accession", {"Number": study.accession})
    if study.sop_classes:
        for uid, n in study.sop_classes.items():
            attrs = {"UID": uid} if uid else {}
            ET.SubElement(el, "SOPClass", {**attrs, "NumberOfInstances": str(int(n))})
    else:
        ET.SubElement(el, "SOPClass", {"NumberOfInstances": str(int(study.instances))})


def _patient(root: ET.Element, patient_id: str) -> ET.Element:
    el = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": patient_id or "-", "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1"})
    ET.SubElement(el, "ParticipantObjectIDTypeCode", {
        "csd-code": ID_PATIENT[0], "codeSystemName": ID_PATIENT[2],
        "originalText": ID_PATIENT[1]})
    return el


def _objects(root: ET.Element, studies: Iterable[Study], patient_id: str | None) -> None:
    for s in studies:
        _study(root, s)
    if patient_id is not None:
        _patient(root, patient_id)


# -- the messages (A.5.3) ---------------------------------------------------------

def application_activity(started: bool, application: Participant, source_id: str, *,
                         launcher: Participant | None = None, outcome: int = SUCCESS,
                         when: str | None = None) -> ET.Element:
    """A.5.3.1: Application Start (110120) or Stop (110121)."""
    root = _message(APPLICATION_ACTIVITY, "E", outcome,
                    [APPLICATION_START if started else APPLICATION_STOP], when)
    _participant(root, Participant(application.user_id, False, ROLE_APPLICATION,
                                   application.host, application.alternative_user_id,
                                   application.user_name))
    if launcher is not None:
        _participant(root, Participant(launcher.user_id, True, ROLE_LAUNCHER, launcher.host,
                                       launcher.alternative_user_id, launcher.user_name))
    _source(root, source_id)
    return root


def instances_accessed(accessor: Participant, source_id: str, studies: Sequence[Study],
                       patient_id: str, *, action: str = "R", outcome: int = SUCCESS,
                       description: str = "", when: str | None = None) -> ET.Element:
    """A.5.3.3: DICOM Instances Accessed (read, for inference: action R)."""
    root = _message(INSTANCES_ACCESSED, action, outcome, (), when, description)
    _participant(root, Participant(accessor.user_id, True, None, accessor.host,
                                   accessor.alternative_user_id, accessor.user_name))
    _source(root, source_id)
    _objects(root, studies, patient_id)
    return root


def _transfer(event: tuple[str, str], action: str, source: Participant,
              destination: Participant, source_id: str, studies: Sequence[Study],
              patient_id: str, outcome: int, others: Sequence[Participant],
              description: str, when: str | None) -> ET.Element:
    root = _message(event, action, outcome, (), when, description)
    _participant(root, Participant(source.user_id, source.requestor, ROLE_SOURCE, source.host,
                                   source.alternative_user_id, source.user_name))
    _participant(root, Participant(destination.user_id, destination.requestor,
                                   ROLE_DESTINATION, destination.host,
                                   destination.alternative_user_id, destination.user_name))
    for p in others:
        _participant(root, p)
    _source(root, source_id)
    _objects(root, studies, patient_id)
    return root


def begin_transferring(source: Participant, destination: Participant, source_id: str,
                       studies: Sequence[Study], patient_id: str, *, outcome: int = SUCCESS,
                       others: Sequence[Participant] = (), description: str = "",
                       when: str | None = None) -> ET.Element:
    """A.5.3.2: Begin Transferring DICOM Instances (action E)."""
    return _transfer(BEGIN_TRANSFERRING, "E", source, destination, source_id, studies,
                     patient_id, outcome, others, description, when)


def instances_transferred(source: Participant, destination: Participant, source_id: str,
                          studies: Sequence[Study], patient_id: str, *, action: str = "R",
                          outcome: int = SUCCESS, others: Sequence[Participant] = (),
                          description: str = "", when: str | None = None) -> ET.Element:
    """A.5.3.5: DICOM Instances Transferred; action C where the destination created
    new instances (an SR stored), R where the source sent what it had."""
    return _transfer(INSTANCES_TRANSFERRED, action, source, destination, source_id, studies,
                     patient_id, outcome, others, description, when)


def data_export(exporter: Participant, destination: Participant, source_id: str,
                studies: Sequence[Study], patient_id: str, *, outcome: int = SUCCESS,
                detail: Mapping[str, str] | None = None, description: str = "",
                when: str | None = None) -> ET.Element:
    """A.5.3.4: Export (action R), over the network: the receiver has the
    Destination role (there is no Destination Media)."""
    root = _message(DATA_EXPORT, "R", outcome, (), when, description)
    _participant(root, Participant(exporter.user_id, True, ROLE_SOURCE, exporter.host,
                                   exporter.alternative_user_id, exporter.user_name))
    _participant(root, Participant(destination.user_id, False, ROLE_DESTINATION,
                                   destination.host, destination.alternative_user_id,
                                   destination.user_name))
    _source(root, source_id)
    for s in studies:
        _study(root, s)
    patient = _patient(root, patient_id)
    for key, value in (detail or {}).items():
        ET.SubElement(patient, "ParticipantObjectDetail", {
            "type": key, "value": base64.b64encode(str(value).encode()).decode()})
    return root


def query(requestor: Participant, responder: Participant, source_id: str, sop_class: str,
          query_bytes: bytes, *, patient_id: str | None = None, outcome: int = SUCCESS,
          description: str = "", when: str | None = None) -> ET.Element:
    """A.5.3.10: Query; the SOP Queried carries the query itself (base64)."""
    root = _message(QUERY, "E", outcome, (), when, description)
    _participant(root, Participant(requestor.user_id, True, ROLE_SOURCE, requestor.host,
                                   requestor.alternative_user_id, requestor.user_name))
    _participant(root, Participant(responder.user_id, False, ROLE_DESTINATION, responder.host,
                                   responder.alternative_user_id, responder.user_name))
    _source(root, source_id)
    el = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": sop_class, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    ET.SubElement(el, "ParticipantObjectIDTypeCode", {
        "csd-code": ID_SOP_CLASS[0], "codeSystemName": ID_SOP_CLASS[2],
        "originalText": ID_SOP_CLASS[1]})
    ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(query_bytes).decode()
    ET.SubElement(el, "ParticipantObjectDetail", {
        "type": "TransferSyntax",
        "value": base64.b64encode(EXPLICIT_VR_LE.encode()).decode()})
    if patient_id:
        _patient(root, patient_id)
    return root


def security_alert(reporter: Participant, source_id: str, alert_type: tuple[str, str],
                   subject: str, description: str, *, performer: Participant | None = None,
                   outcome: int = MINOR_FAILURE, when: str | None = None) -> ET.Element:
    """A.5.3.11: Security Alert; the alert subject (a URI or a configuration key),
    with an Alert Description detail."""
    root = _message(SECURITY_ALERT, "E", outcome, [alert_type], when)
    _participant(root, Participant(reporter.user_id, performer is None, None, reporter.host,
                                   reporter.alternative_user_id, reporter.user_name))
    if performer is not None:
        _participant(root, Participant(performer.user_id, True, None, performer.host,
                                       performer.alternative_user_id, performer.user_name))
    _source(root, source_id)
    el = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": subject or "-", "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "13"})  # Security Resource
    ET.SubElement(el, "ParticipantObjectIDTypeCode", {
        "csd-code": ID_URI[0], "codeSystemName": ID_URI[2], "originalText": ID_URI[1]})
    ET.SubElement(el, "ParticipantObjectDetail", {
        "type": "Alert Description",
        "value": base64.b64encode(description[:1000].encode()).decode()})
    return root


def to_xml(message: ET.Element) -> str:
    return ET.tostring(message, encoding="unicode", short_empty_elements=True)


def event_of(message: ET.Element) -> str:
    ev = message.find("EventIdentification/EventID")
    return ev.get("csd-code", "") if ev is not None else ""


# -- the validator -------------------------------------------------------------------

_ACTIONS = {"C", "R", "U", "D", "E"}


def _check_coded(el: ET.Element | None, where: str, errors: list[str]) -> None:
    if el is None:
        errors.append(f"{where} missing")
        return
    for attr in ("csd-code", "originalText"):
        if not el.get(attr):
            errors.append(f"{where}: attribute {attr} missing")


def _roles(message: ET.Element) -> list[str]:
    return [r.get("csd-code", "") for r in message.findall("ActiveParticipant/RoleIDCode")]


def _objects_of(message: ET.Element, type_code: str, role: str) -> list[ET.Element]:
    return [o for o in message.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCode") == type_code
            and o.get("ParticipantObjectTypeCodeRole") == role]


def _need_study(message: ET.Element, errors: list[str]) -> None:
    studies = _objects_of(message, "2", "3")
    studies = [s for s in studies if (c := s.find("ParticipantObjectIDTypeCode")) is not None
               and c.get("csd-code") == ID_STUDY[0]]
    if not studies:
        errors.append("no Study participant object (type 2, role 3, ID type 110180)")
    for s in studies:
        classes = s.findall("SOPClass")
        if not classes:
            errors.append("Study: no SOPClass")
        for c in classes:
            if not (c.get("NumberOfInstances") or "").isdigit():
                errors.append("Study SOPClass: NumberOfInstances missing")


def _need_patient(message: ET.Element, errors: list[str]) -> None:
    patients = _objects_of(message, "1", "1")
    if not any((c := p.find("ParticipantObjectIDTypeCode")) is not None
               and c.get("csd-code") == ID_PATIENT[0] for p in patients):
        errors.append("no Patient participant object (type 1, role 1, ID type 2)")


def _need_requestor(message: ET.Element, errors: list[str]) -> None:
    if not any(p.get("UserIsRequestor") == "true" for p in message.findall("ActiveParticipant")):
        errors.append("no ActiveParticipant is the requestor")


def _need_roles(message: ET.Element, errors: list[str], *roles: tuple[str, str]) -> None:
    have = _roles(message)
    for code, name in roles:
        if code not in have:
            errors.append(f"no ActiveParticipant with RoleIDCode {code} ({name})")


def validate(message: ET.Element) -> list[str]:
    """What this message lacks of PS3.15 A.5.1 and of its event's A.5.3 table;
    an empty list when it has everything required."""
    errors: list[str] = []
    if message.tag != "AuditMessage":
        return [f"root element is {message.tag}, not AuditMessage"]
    ev = message.find("EventIdentification")
    if ev is None:
        return ["EventIdentification missing"]
    if ev.get("EventActionCode", "E") not in _ACTIONS:
        errors.append("EventActionCode must be one of C, R, U, D, E")
    when = ev.get("EventDateTime") or ""
    try:
        _dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        errors.append("EventDateTime missing or not an xsd:dateTime")
    if ev.get("EventOutcomeIndicator") not in {str(o) for o in OUTCOMES}:
        errors.append("EventOutcomeIndicator must be 0, 4, 8 or 12")
    _check_coded(ev.find("EventID"), "EventID", errors)
    for t in ev.findall("EventTypeCode"):
        _check_coded(t, "EventTypeCode", errors)
    participants = message.findall("ActiveParticipant")
    if not participants:
        errors.append("no ActiveParticipant")
    for p in participants:
        if not p.get("UserID"):
            errors.append("ActiveParticipant: UserID missing")
        if p.get("UserIsRequestor") not in ("true", "false"):
            errors.append("ActiveParticipant: UserIsRequestor missing")
        if p.get("NetworkAccessPointID") and p.get("NetworkAccessPointTypeCode") not in \
                ("1", "2", "3", "4", "5"):
            errors.append("ActiveParticipant: NetworkAccessPointTypeCode missing")
        for r in p.findall("RoleIDCode"):
            _check_coded(r, "RoleIDCode", errors)
    sources = message.findall("AuditSourceIdentification")
    if len(sources) != 1 or not sources[0].get("AuditSourceID"):
        errors.append("exactly one AuditSourceIdentification with an AuditSourceID required")
    for o in message.findall("ParticipantObjectIdentification"):
        if not o.get("ParticipantObjectID"):
            errors.append("ParticipantObjectIdentification: ParticipantObjectID missing")
        _check_coded(o.find("ParticipantObjectIDTypeCode"), "ParticipantObjectIDTypeCode",
                     errors)
        if o.find("ParticipantObjectName") is not None and \
                o.find("ParticipantObjectQuery") is not None:
            errors.append("ParticipantObjectName and ParticipantObjectQuery are exclusive")
        for d in o.findall("ParticipantObjectDetail"):
            if not d.get("type") or d.get("value") is None:
                errors.append("ParticipantObjectDetail: type and value required")
    event = event_of(message)
    types = [t.get("csd-code") for t in ev.findall("EventTypeCode")]
    action = ev.get("EventActionCode")
    if event == APPLICATION_ACTIVITY[0]:
        if action != "E":
            errors.append("Application Activity: EventActionCode must be E")
        if not set(types) & {APPLICATION_START[0], APPLICATION_STOP[0]}:
            errors.append("Application Activity: EventTypeCode 110120 or 110121 required")
        _need_roles(message, errors, ROLE_APPLICATION)
    elif event in (BEGIN_TRANSFERRING[0], INSTANCES_TRANSFERRED[0]):
        if event == BEGIN_TRANSFERRING[0] and action != "E":
            errors.append("Begin Transferring: EventActionCode must be E")
        if event == INSTANCES_TRANSFERRED[0] and action not in ("C", "R", "U"):
            errors.append("Instances Transferred: EventActionCode must be C, R or U")
        _need_roles(message, errors, ROLE_SOURCE, ROLE_DESTINATION)
        _need_study(message, errors)
        _need_patient(message, errors)
    elif event == INSTANCES_ACCESSED[0]:
        if action not in ("C", "R", "U", "D"):
            errors.append("Instances Accessed: EventActionCode must be C, R, U or D")
        _need_requestor(message, errors)
        _need_study(message, errors)
        _need_patient(message, errors)
    elif event == DATA_EXPORT[0]:
        if action != "R":
            errors.append("Export: EventActionCode must be R")
        _need_requestor(message, errors)
        if not set(_roles(message)) & {ROLE_DESTINATION[0], "110154"}:
            errors.append("Export: a Destination (110152) or Destination Media (110154) "
                          "participant required")
        _need_patient(message, errors)
    elif event == QUERY[0]:
        if action != "E":
            errors.append("Query: EventActionCode must be E")
        _need_roles(message, errors, ROLE_SOURCE, ROLE_DESTINATION)
        _need_requestor(message, errors)
        sops = [o for o in _objects_of(message, "2", "3")
                if (c := o.find("ParticipantObjectIDTypeCode")) is not None
                and c.get("csd-code") == ID_SOP_CLASS[0]]
        if len(sops) != 1:
            errors.append("Query: exactly one SOP Queried object (ID type 110181) required")
        elif not (sops[0].findtext("ParticipantObjectQuery") or "").strip():
            errors.append("Query: ParticipantObjectQuery required")
    elif event == SECURITY_ALERT[0]:
        if action != "E":
            errors.append("Security Alert: EventActionCode must be E")
        if not types:
            errors.append("Security Alert: EventTypeCode required")
        if not message.findall("ParticipantObjectIdentification"):
            errors.append("Security Alert: an alert subject participant object required")
    else:
        errors.append(f"EventID {event!r} is not one this validator knows")
    return errors
