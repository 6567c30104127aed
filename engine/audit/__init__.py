"""The audit trail (IHE ATNA): DICOM PS3.15 A.5 messages, logged locally, sent to syslog.

:class:`Audit` is the port the plugin and the workers record events through.
Each event is validated, appended to the hash-chained local log (durable,
fsync'd) and, with an ``AI.Audit.Host``, shipped by a sender thread to the
collector (:mod:`engine.audit.syslog`). Recording never raises into the
caller: an audit failure is logged, and the job or request goes on.

Standard library only: Orthanc's interpreter imports this module too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.version import __version__

from . import messages as m
from .log import AuditLog
from .messages import Participant, Study

log = logging.getLogger("orthanc_ai")

LOG_NAME = "audit.log"

# Study Root C-FIND (the model Orthanc's /modalities/{id}/query uses)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
ALERTS = {
    "restricted-function": m.USE_OF_RESTRICTED_FUNCTION,
    "security-configuration": m.SECURITY_CONFIGURATION,
    "software-configuration": m.SOFTWARE_CONFIGURATION,
    "network-configuration": m.NETWORK_CONFIGURATION,
    "node-authentication": m.NODE_AUTHENTICATION,
}


def log_path(storage: Path) -> Path:
    """Where a node whose StorageDirectory is ``storage`` keeps its audit log."""
    return Path(storage) / "orthanc-ai" / LOG_NAME


class Audit:
    """Record audit events; ``Audit()`` without a log records nothing (tests, tools)."""

    def __init__(self, audit_log: AuditLog | None = None, *, source_id: str = "orthanc-ai",
                 aet: str = "ORTHANC", host: str = "", forwarder: Any = None) -> None:
        self.log = audit_log
        self.source_id = source_id
        self.aet = aet
        self.host = host or socket.gethostname()
        self.forwarder = forwarder
        self.invalid = 0  # messages recorded although the validator found them lacking

    @classmethod
    def open(cls, settings: Any, path: Path, *, source_id: str, aet: str,
             forward: bool = True) -> Audit:
        """The local log at ``path``; a sender thread when ``settings.host`` is set."""
        audit_log = AuditLog(path)
        forwarder = None
        host = socket.gethostname()
        if forward and getattr(settings, "host", ""):
            from .syslog import Forwarder

            forwarder = Forwarder(audit_log, settings, socket.getfqdn() or host).start()
        return cls(audit_log, source_id=source_id, aet=aet, host=host, forwarder=forwarder)

    @property
    def enabled(self) -> bool:
        return self.log is not None

    # -- participants --------------------------------------------------------------

    def us(self, *, requestor: bool = True) -> Participant:
        return Participant(self.aet, requestor, host=self.host,
                           alternative_user_id=f"AETITLES={self.aet}")

    @staticmethod
    def peer(aet: str, host: str = "", *, requestor: bool = False) -> Participant:
        return Participant(aet or "-", requestor, host=host,
                           alternative_user_id=f"AETITLES={aet}" if aet else "")

    @staticmethod
    def user(name: str, host: str = "") -> Participant:
        return Participant(name, True, host=host)

    # -- recording -----------------------------------------------------------------

    def emit(self, message: ET.Element) -> int | None:
        """Validate, append durably, wake the sender; the sequence number (None: not
        recorded). Never raises."""
        if self.log is None:
            return None
        try:
            errors = m.validate(message)
            if errors:  # recorded all the same: an imperfect record beats none
                self.invalid += 1
                log.warning("orthanc-ai: audit message %s lacks: %s", m.event_of(message),
                            "; ".join(errors[:3]))
            ev = message.find("EventIdentification")
            outcome = int(ev.get("EventOutcomeIndicator", "0")) if ev is not None else 0
            seq = self.log.append(m.to_xml(message), outcome=outcome, event=m.event_of(message))
        except Exception as exc:
            log.error("orthanc-ai: the audit log could not be written: %s: %s",
                      type(exc).__name__, exc)
            return None
        if self.forwarder is not None:
            self.forwarder.kick()
        return seq

    def _safe(self, build: Any, *args: Any, **kwargs: Any) -> int | None:
        if self.log is None:
            return None
        try:
            message = build(*args, **kwargs)
        except Exception as exc:
            log.error("orthanc-ai: an audit message could not be built: %s: %s",
                      type(exc).__name__, exc)
            return None
        return self.emit(message)

    # -- the events ----------------------------------------------------------------

    def application(self, started: bool, *, launcher: str = "",
                    outcome: int = m.SUCCESS) -> int | None:
        """Application Activity: Start (110120) or Stop (110121).

        A.5.3.1 leaves the application's UserName "not specialized": it names the
        product, its version and the process, so the trail tells which orthanc-ai
        ran from when to when.
        """
        who = Participant(launcher, True, host=self.host) if launcher else None
        app = Participant(self.aet, False, host=self.host,
                          alternative_user_id=f"AETITLES={self.aet}",
                          user_name=f"orthanc-ai {__version__} pid {os.getpid()}")
        return self._safe(m.application_activity, started, app, self.source_id, launcher=who,
                          outcome=outcome)

    def instances_accessed(self, study_uid: str, patient_id: str,
                           sop_classes: Mapping[str, int], *, outcome: int = m.SUCCESS,
                           description: str = "", user: str = "") -> int | None:
        """DICOM Instances Accessed (110103, read): pixels read for inference."""
        who = self.user(user) if user else self.us()
        return self._safe(m.instances_accessed, who, self.source_id,
                          [Study(study_uid, dict(sop_classes))], patient_id, outcome=outcome,
                          description=description)

    def query(self, peer_aet: str, peer_host: str, level: str, keys: Mapping[str, Any], *,
              outcome: int = m.SUCCESS, description: str = "",
              sop_class: str = STUDY_ROOT_FIND) -> int | None:
        """Query (110112): the keys we sent, base64 in ParticipantObjectQuery."""
        sent = json.dumps({"QueryRetrieveLevel": level, **dict(keys)}, sort_keys=True)
        patient = str(keys.get("PatientID") or "") or None
        return self._safe(m.query, self.us(), self.peer(peer_aet, peer_host), self.source_id,
                          sop_class, sent.encode(), patient_id=patient, outcome=outcome,
                          description=description)

    def begin_transfer(self, source: Participant, destination: Participant, study_uid: str,
                       patient_id: str, *, sop_classes: Mapping[str, int] | None = None,
                       instances: int = 0, outcome: int = m.SUCCESS,
                       description: str = "") -> int | None:
        """Begin Transferring DICOM Instances (110102)."""
        return self._safe(m.begin_transferring, source, destination, self.source_id,
                          [Study(study_uid, dict(sop_classes or {}), instances)], patient_id,
                          outcome=outcome, description=description)

    def transferred(self, source: Participant, destination: Participant, study_uid: str,
                    patient_id: str, *, sop_classes: Mapping[str, int] | None = None,
                    instances: int = 0, action: str = "R", outcome: int = m.SUCCESS,
                    description: str = "") -> int | None:
        """DICOM Instances Transferred (110104): C where the destination created the
        instances (an SR stored, a prior retrieved), R where the source sent them."""
        return self._safe(m.instances_transferred, source, destination, self.source_id,
                          [Study(study_uid, dict(sop_classes or {}), instances)], patient_id,
                          action=action, outcome=outcome, description=description)

    def data_export(self, destination: str, destination_host: str, patient_id: str, *,
                    study_uids: Sequence[str] = (), sop_classes: Mapping[str, int] | None = None,
                    outcome: int = m.SUCCESS, detail: Mapping[str, str] | None = None,
                    description: str = "") -> int | None:
        """Export (110106): data leaving us for another system (an HL7 message to the
        RIS). ``destination`` names the receiver (e.g. its HL7 application), ``detail``
        e.g. ``{"MSH-10": control_id}``."""
        studies = [Study(u, dict(sop_classes or {}), 1) for u in study_uids]
        return self._safe(m.data_export, self.us(), self.peer(destination, destination_host),
                          self.source_id, studies, patient_id, outcome=outcome, detail=detail,
                          description=description)

    def security_alert(self, alert: str, subject: str, description: str, *, user: str = "",
                       user_host: str = "", outcome: int = m.MINOR_FAILURE) -> int | None:
        """Security Alert (110113): ``alert`` one of :data:`ALERTS` (a refused request:
        "restricted-function"; a wrong configuration: "software-configuration"),
        ``subject`` what it is about (a URI, a configuration key), ``user`` who asked."""
        kind = ALERTS.get(alert, m.USE_OF_RESTRICTED_FUNCTION)
        performer = self.user(user, user_host) if user or user_host else None
        return self._safe(m.security_alert, self.us(requestor=False), self.source_id, kind,
                          subject, description, performer=performer, outcome=outcome)

    def status(self) -> dict[str, Any]:
        """What a person checks at a glance, cheaply (two small reads, no scan):
        the local log's path, size and last sequence number; with a collector,
        where it is, how far the sender got and how many entries wait."""
        out: dict[str, Any] = {"enabled": self.enabled, "log": None, "size_bytes": None,
                               "last_seq": None, "repository": None}
        if self.log is None:
            return out
        out["log"] = str(self.log.path)
        try:
            out["size_bytes"] = self.log.path.stat().st_size
        except OSError:
            out["size_bytes"] = 0
        out["last_seq"] = self.log.last_seq()
        if self.forwarder is not None:
            from .syslog import Cursor

            s = self.forwarder.settings
            sent = Cursor(self.log.path.with_suffix(".forwarded")).read()[0]
            out["repository"] = {
                "host": s.host, "port": s.port, "transport": s.transport,
                "forwarded_seq": sent, "backlog": max(0, out["last_seq"] - sent),
                "last_error": self.forwarder.last_error or None,
            }
        return out

    # -- the end -------------------------------------------------------------------

    def close(self, flush_seconds: float = 0.0) -> bool:
        """Stop the sender, after up to ``flush_seconds`` shipping what is logged;
        True when nothing is left unsent."""
        if self.forwarder is None:
            return True
        done = True
        try:
            if flush_seconds > 0:
                done = self.forwarder.flush(flush_seconds)
        finally:
            self.forwarder.stop()
        return done


def null() -> Audit:
    """An audit port that records nothing."""
    return Audit()


_current = Audit()


def current() -> Audit:
    """This process' audit port, as the plugin (or a worker) opened it; one that
    records nothing before. For code that has no context to be handed one, e.g.
    the plugin's HTTP filter: ``current().security_alert("restricted-function",
    uri, reason, user=user, user_host=ip)``."""
    return _current


def set_current(audit: Audit) -> None:
    global _current
    _current = audit
