"""The DICOM network port: C-FIND, C-MOVE and C-STORE through Orthanc's own client; C-GET.

Orthanc already is the hospital's DICOM application: its ``DicomModalities``
name the peers (AE title, host, port, what they allow), its AE title is the
one the PACS knows, and what a C-MOVE brings arrives through its own
C-STORE server. So the worker asks Orthanc (``/modalities/{peer}/query``,
``/move``, ``/store`` over loopback) instead of opening associations of its
own: one configuration, one AE title, every association in Orthanc's log,
and the same on every node.

C-GET is the exception: Orthanc 1.10 (Debian 12) has no C-GET client, so
:mod:`engine.dicom_get` opens that association with pynetdicom, from the
same ``DicomModalities`` entry and with Orthanc's AE title, and posts each
instance it receives to Orthanc.

Every failure is a :class:`PeerError` (transient: the job retries with
back-off) whose reason names the peer and Orthanc's message, never a query
value (patient data).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from inference.errors import TransientError

from .audit import Audit
from .audit.messages import SERIOUS_FAILURE
from .source import OrthancSource

_POLL = 0.2


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return " ".join(str(reason).split())[:200] if reason else type(exc).__name__


class PeerError(TransientError):
    """A peer that is down, refused, or answered with a failure."""


def _reason(status: int, body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body.get("Message") or ""), str(body.get("Details") or "")]
        text = ": ".join(p for p in parts if p)
    else:
        text = str(body or "")
    return f"HTTP {status}" + (f", {' '.join(text.split())[:200]}" if text else "")


class OrthancDimse:
    def __init__(self, source: OrthancSource,
                 configuration: Mapping[str, Any] | None = None, *,
                 audit: Audit | None = None) -> None:
        self.source = source
        self.audit = audit or Audit()  # every query, retrieve and store is audited
        # Orthanc's configuration (the worker's boot JSON): DicomModalities and
        # DicomAet, for the C-GET association the worker opens itself.
        self.configuration: Mapping[str, Any] = configuration or {}
        self._aet: str | None = None
        self._patients: dict[str, str] = {}  # StudyInstanceUID -> PatientID, from C-FIND

    def peer_aet(self, peer: str) -> str:
        """The AE title of a DicomModalities entry ("" when unknown here)."""
        modalities = self.configuration.get("DicomModalities") or {}
        entry = modalities.get(peer) if isinstance(modalities, Mapping) else None
        if isinstance(entry, Mapping):
            return str(entry.get("AET") or "").strip()
        if isinstance(entry, list | tuple) and entry:
            return str(entry[0]).strip()
        return ""

    def peer_host(self, peer: str) -> str:
        """The host of a DicomModalities entry ("" when unknown here)."""
        modalities = self.configuration.get("DicomModalities") or {}
        entry = modalities.get(peer) if isinstance(modalities, Mapping) else None
        if isinstance(entry, Mapping):
            return str(entry.get("Host") or "").strip()
        if isinstance(entry, list | tuple) and len(entry) > 1:
            return str(entry[1]).strip()
        return ""

    def _peer(self, peer: str) -> Any:
        return self.audit.peer(self.peer_aet(peer) or peer, self.peer_host(peer))

    def own_aet(self) -> str:
        """Our Orthanc's AE title: the C-MOVE destination the PACS must know."""
        if self._aet is None:
            self._aet = str(self.source.get_json("/system")["DicomAet"])
        return self._aet

    def _post(self, peer: str, what: str, path: str, body: dict[str, Any],
              timeout: float) -> Any:
        # Orthanc's DICOM timeout is per message; the HTTP one bounds the whole call.
        status, answer = self.source.call("POST", path,
                                          {**body, "Timeout": max(1, round(timeout))},
                                          timeout=timeout + 10)
        if status == 404:
            raise PeerError(f"{what} {peer}: {_reason(status, answer)} (no such "
                            "DicomModalities entry, route or resource in this Orthanc)")
        if status >= 400:
            raise PeerError(f"{what} {peer} failed: {_reason(status, answer)}")
        return answer

    def find(self, peer: str, level: str, query: dict[str, str], timeout: float
             ) -> list[dict[str, str]]:
        """C-FIND (Study Root); the answers' tags by keyword. Audited (Query), failed or not."""
        try:
            answers = self._find(peer, level, query, timeout)
        except Exception as exc:
            self.audit.query(self.peer_aet(peer) or peer, self.peer_host(peer), level, query,
                             outcome=SERIOUS_FAILURE, description=_why(exc))
            raise
        self.audit.query(self.peer_aet(peer) or peer, self.peer_host(peer), level, query)
        for a in answers:  # whose study is whose: for the retrieve's audit record
            patient = a.get("PatientID") or query.get("PatientID") or ""
            if a.get("StudyInstanceUID") and patient:
                if len(self._patients) > 10000:
                    self._patients.clear()
                self._patients[a["StudyInstanceUID"]] = str(patient)
        return answers

    def _find(self, peer: str, level: str, query: dict[str, str], timeout: float
              ) -> list[dict[str, str]]:
        created = self._post(peer, "C-FIND to", f"/modalities/{peer}/query",
                             {"Level": level, "Query": query, "Normalize": False}, timeout)
        qid = created.get("ID") if isinstance(created, dict) else None
        if not qid:
            raise PeerError(f"C-FIND to {peer}: Orthanc gave no query ID")
        try:
            status, answers = self.source.call("GET", f"/queries/{qid}/answers?expand&simplify")
            if status >= 400 or not isinstance(answers, list):
                raise PeerError(f"C-FIND to {peer}: answers unreadable "
                                f"({_reason(status, answers)})")
            return [{str(k): ("" if v is None else str(v) if not isinstance(v, list) else
                              "\\".join(str(x) for x in v)) for k, v in a.items()}
                    for a in answers if isinstance(a, dict)]
        finally:
            try:
                self.source.call("DELETE", f"/queries/{qid}")
            except TransientError:
                pass

    def retrieve_study(self, peer: str, study_uid: str, method: str, timeout: float) -> None:
        """C-MOVE the study to our own AE (or C-GET it); returns when it is stored.
        Audited: Begin Transferring, then Instances Transferred (failed or not)."""
        source, us = self._peer(peer), self.audit.us()
        patient = self._patient_of(study_uid)
        self.audit.begin_transfer(source, us, study_uid, patient,
                                  description=f"{method} from {peer}")
        count = 0
        try:
            count = self._retrieve(peer, study_uid, method, timeout)
        except Exception as exc:
            self.audit.transferred(source, us, study_uid, patient, action="C",
                                   outcome=SERIOUS_FAILURE,
                                   description=f"{method} from {peer}: {_why(exc)}")
            raise
        if not patient or not count:
            patient, count = self._patient_of(study_uid), count or self._count_of(study_uid)
        self.audit.transferred(source, us, study_uid, patient, action="C", instances=count,
                               description=f"{method} from {peer}")

    def _patient_of(self, study_uid: str) -> str:
        """The PatientID of a study Orthanc has ("" if none): for the audit record."""
        study = self._study_of(study_uid)
        return str((study or {}).get("PatientMainDicomTags", {}).get("PatientID", "")) or \
            self._patients.get(study_uid, "")

    def _count_of(self, study_uid: str) -> int:
        study = self._study_of(study_uid)
        if study is None:
            return 0
        try:
            status, stats = self.source.call("GET", f"/studies/{study['ID']}/statistics")
            return int(stats.get("CountInstances", 0)) if status < 400 else 0
        except Exception:
            return 0

    def _study_of(self, study_uid: str) -> dict[str, Any] | None:
        if not self.audit.enabled:
            return None
        try:
            status, found = self.source.call("POST", "/tools/lookup", study_uid)
            ids = [f["ID"] for f in found if isinstance(f, dict) and f.get("Type") == "Study"] \
                if status < 400 and isinstance(found, list) else []
            if not ids:
                return None
            status, study = self.source.call("GET", f"/studies/{ids[0]}")
            return study if status < 400 and isinstance(study, dict) else None
        except Exception:  # the audit record goes without it
            return None

    def _retrieve(self, peer: str, study_uid: str, method: str, timeout: float) -> int:
        if method == "C-GET":
            from .dicom_get import get_study  # pynetdicom: only where a source needs it

            return get_study(self.configuration, peer, study_uid, self.source.store, timeout)
        body: dict[str, Any] = {"Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
                                "Asynchronous": True, "TargetAet": self.own_aet()}
        path, what = f"/modalities/{peer}/move", "C-MOVE from"
        started = self._post(peer, what, path, body, timeout)
        job = started.get("ID") if isinstance(started, dict) else None
        if not job:  # an Orthanc that ran it synchronously: it is over
            return 0
        self._wait_job(job, peer, what, time.monotonic() + timeout)
        return 0  # Orthanc's move job does not count the instances: looked up after

    def _wait_job(self, job: str, peer: str, what: str, until: float) -> None:
        while True:
            status, info = self.source.call("GET", f"/jobs/{job}")
            if status >= 400 or not isinstance(info, dict):
                raise PeerError(f"{what} {peer}: its Orthanc job vanished ({status})")
            state = info.get("State")
            if state == "Success":
                return
            if state == "Failure":
                details = info.get("ErrorDetails") or info.get("ErrorDescription") or ""
                raise PeerError(f"{what} {peer} failed: "
                                f"{' '.join(str(details).split())[:200] or 'no details'}")
            if time.monotonic() > until:
                self.source.call("POST", f"/jobs/{job}/cancel", {})
                raise PeerError(f"{what} {peer} did not end in time")
            time.sleep(_POLL)

    def store(self, peer: str, instances: list[str], timeout: float) -> dict[str, Any]:
        """C-STORE Orthanc's instances to the peer, synchronously. Audited: Begin
        Transferring, then Instances Transferred (failed or not), per study."""
        studies = self._instances_by_study(instances)
        us, destination = self.audit.us(), self._peer(peer)
        for (study, patient), classes in studies.items():
            self.audit.begin_transfer(us, destination, study, patient, sop_classes=classes,
                                      description=f"C-STORE to {peer}")
        try:
            answer = self._store(peer, instances, timeout)
        except Exception as exc:
            for (study, patient), classes in studies.items():
                self.audit.transferred(us, destination, study, patient, sop_classes=classes,
                                       outcome=SERIOUS_FAILURE,
                                       description=f"C-STORE to {peer}: {_why(exc)}")
            raise
        for (study, patient), classes in studies.items():
            self.audit.transferred(us, destination, study, patient, sop_classes=classes,
                                   description=f"C-STORE to {peer}")
        return answer

    def _instances_by_study(self, instances: list[str]
                            ) -> dict[tuple[str, str], dict[str, int]]:
        """(StudyInstanceUID, PatientID) -> {SOP Class UID: count}, for the audit record."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        if not self.audit.enabled:
            return out
        for instance in instances:
            try:
                status, tags = self.source.call("GET", f"/instances/{instance}/tags?simplify")
            except Exception:
                continue
            if status >= 400 or not isinstance(tags, dict):
                continue
            key = (str(tags.get("StudyInstanceUID", "")), str(tags.get("PatientID", "")))
            sop_class = str(tags.get("SOPClassUID", ""))
            classes = out.setdefault(key, {})
            classes[sop_class] = classes.get(sop_class, 0) + 1
        return out

    def _store(self, peer: str, instances: list[str], timeout: float) -> dict[str, Any]:
        answer = self._post(peer, "C-STORE to", f"/modalities/{peer}/store",
                            {"Resources": instances, "Synchronous": True}, timeout)
        if isinstance(answer, dict) and int(answer.get("FailedInstancesCount", 0) or 0):
            raise PeerError(f"C-STORE to {peer}: the peer refused "
                            f"{answer['FailedInstancesCount']} instance(s)")
        return answer if isinstance(answer, dict) else {}
